"""The operator's use cases on the registry: disable, enable, remove a client, rotate its
secret, replace its key; change or remove an audience; revoke tokens. Each names its actor.

What a change stores and which refresh families die with it are pure decisions (the functions
below the class); the store applies each in one transaction with its audit events.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from coap_auth.clock import Clock
from coap_auth.config import LIMITS, Settings
from coap_auth.errors import OperatorError, TokenError, UnsupportedPopKey
from coap_auth.keys import DEFAULT_FAMILY, ENDED, KeyState, SigningKey
from coap_auth.service.client_auth import secret_digest
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import Audience, AuditEvent, Client, MasterKey, RefreshFamily, Store
from coap_auth.store.records import RegistryChange
from coap_auth.tokens import cose_key_from_public, public_key_from_cose
from coap_auth.wire import MAX_TOKEN_LIFETIME

SECRET_BYTES = 24  # 192 bits, as base64url text
TOKEN_HASH_HEX = 66  # 0x01 || SHA-256: 33 bytes
MIN_HASH_PREFIX_HEX = 16  # what the access log prints of a token hash
Introspection = Literal["secret", "public-key", "none"]


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


@dataclass(frozen=True, slots=True)
class ClientOutcome:
    """What a client use case did: the client as now stored (None: removed), how many refresh
    families died (their access tokens on the TRL), and a generated secret, shown once."""

    client_id: str
    client: Client | None
    killed_families: int = 0
    secret: str | None = field(default=None, repr=False)
    oscore_context_removed: bool = False

    def view(self) -> dict[str, Any]:
        """The result as JSON shows it (the secret only here, once)."""
        shown: dict[str, Any] = {"client_id": self.client_id, "removed": self.client is None}
        if self.client is not None:
            shown.update(self.client.public_view())
        shown["killed_families"] = self.killed_families
        if self.client is None:
            shown["oscore_context_removed"] = self.oscore_context_removed
        if self.secret is not None:
            shown["secret"] = self.secret
        return shown


@dataclass(frozen=True, slots=True)
class AudienceOutcome:
    audience_id: str
    audience: Audience | None  # None: removed
    killed_families: int = 0
    introspection_secret: str | None = field(default=None, repr=False)
    ended_keys: int = 0

    def view(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"audience_id": self.audience_id, "removed": self.audience is None}
        if self.audience is not None:
            shown.update(self.audience.public_view())
        else:
            shown["killed_families"] = self.killed_families
            shown["ended_keys"] = self.ended_keys
        if self.introspection_secret is not None:
            shown["introspection_secret"] = self.introspection_secret
        return shown


class Administration:
    def __init__(
        self,
        store: Store,
        keys: KeyRollover,
        master_key: MasterKey,
        settings: Settings,
        clock: Clock,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._keys = keys
        self._master_key = master_key

    # -- clients ----------------------------------------------------------------------------

    async def disable_client(self, client_id: str, actor: str, *, revoke: bool) -> ClientOutcome:
        """Refuse new grants at once (and the client's OSCORE contexts, checked per request);
        with `revoke`, its live families die and their access tokens go on the TRL."""
        return await self._change_client(client_id, actor, lambda c: disabled(c, revoke))

    async def enable_client(self, client_id: str, actor: str) -> ClientOutcome:
        return await self._change_client(client_id, actor, enabled)

    async def rotate_secret(
        self, client_id: str, actor: str, overlap: int | None = None
    ) -> ClientOutcome:
        """A new generated secret; the one before keeps working for `overlap` seconds
        (default: the client_secret_overlap setting), a rotation before ends at once."""
        overlap = self.settings.client_secret_overlap if overlap is None else overlap
        # The setting's range, one rule: an overlap of 31,000 years was stored and then failed
        # to print the new secret.
        limit = LIMITS["client_secret_overlap"]
        if not limit.accepts(overlap):
            raise OperatorError(limit.problem("--overlap", overlap))
        secret = new_secret()
        digest = secret_digest(self._master_key, secret)
        now = self.clock.now()
        outcome = await self._change_client(
            client_id, actor, lambda c: secret_rotated(c, digest, now, overlap)
        )
        return replace(outcome, secret=secret)

    async def set_client_key(
        self, client_id: str, actor: str, public_key: dict[Any, Any]
    ) -> ClientOutcome:
        """Replace the client's public key (a secret client moves to it, its secret ends);
        families bound to the old key die with their tokens."""
        return await self._change_client(client_id, actor, lambda c: rekeyed(c, public_key))

    async def remove_client(
        self, client_id: str, actor: str, withdraw_context: Callable[[str], bool]
    ) -> ClientOutcome:
        """Its live families die (tokens on the TRL, where its entries stay), it is deleted,
        and then `withdraw_context` withdraws an OSCORE context provisioned for it (True: there
        was one; coap_auth.secure.provisioned.remove, which the transport owns). Until then a
        server refuses that context anyway: its client is gone (peer_registered)."""
        killed = await self.store.remove_client(client_id, actor, self.clock.now())
        if killed is None:
            raise OperatorError(f"no client {client_id!r}")
        withdrawn = withdraw_context(client_id)
        if withdrawn:
            event = AuditEvent(self.clock.now(), actor, "client.oscore_removed", client_id)
            await self.store.append_audit([event])
        return ClientOutcome(client_id, None, killed, oscore_context_removed=withdrawn)

    async def _change_client(
        self, client_id: str, actor: str, change: Callable[[Client], RegistryChange[Client]]
    ) -> ClientOutcome:
        result = await self.store.update_client(client_id, change, actor, self.clock.now())
        if result is None:
            raise OperatorError(f"no client {client_id!r}")
        client, killed = result
        return ClientOutcome(client_id, client, killed)

    # -- audiences --------------------------------------------------------------------------

    async def update_audience(
        self,
        audience_id: str,
        actor: str,
        *,
        lifetime: int | None = None,
        token_format: str | None = None,
        introspection: Introspection | None = None,
        introspect_public_key: dict[Any, Any] | None = None,
    ) -> AudienceOutcome:
        """Change lifetime, token format or how it authenticates to /introspect (a new
        secret is generated, shown once). Profile and key family stay: a new audience."""
        secret = new_secret() if introspection == "secret" else None
        credential = AudienceCredential(
            introspection,
            None if secret is None else secret_digest(self._master_key, secret),
            introspect_public_key,
        )
        audience = await self.store.update_audience(
            audience_id,
            lambda a: audience_changed(a, lifetime, token_format, credential),
            actor,
            self.clock.now(),
        )
        if audience is None:
            raise OperatorError(f"no audience {audience_id!r}")
        return AudienceOutcome(audience_id, audience, introspection_secret=secret)

    async def remove_audience(self, audience_id: str, actor: str) -> AudienceOutcome:
        """Refused while a client names it; otherwise its live families die (tokens on the
        TRL) and it is deleted. Its own key family (if any) ends at once: every token it
        signed was just revoked, and nobody verifies for a removed audience; its keys are
        unpublished and their private parts erased."""
        audience = await self.store.get_audience(audience_id)
        killed = await self.store.remove_audience(audience_id, actor, self.clock.now())
        if killed is None or audience is None:
            raise OperatorError(f"no audience {audience_id!r}")
        ended = await self._end_family(audience.key_family, actor)
        return AudienceOutcome(audience_id, None, killed, ended_keys=ended)

    async def _end_family(self, family: str, actor: str) -> int:
        if family == DEFAULT_FAMILY:
            return 0
        if any(a.key_family == family for a in await self.store.list_audiences()):
            return 0  # another audience still signs with it
        now = self.clock.now()
        changed = await self.store.update_keys(
            lambda current: family_ended(current, family, now), actor, now
        )
        await self._keys.load()
        return len(changed)

    # -- tokens -----------------------------------------------------------------------------

    async def revoke_client_tokens(self, client_id: str, actor: str) -> int:
        """Kill every live family of a client (their access tokens in one TRL update)."""
        if await self.store.get_client(client_id) is None:
            raise OperatorError(f"no client {client_id!r}")
        return await self.store.kill_families(
            client_id, "revoked by operator", self.clock.now(), actor
        )

    async def revoke_token(self, hash_hex: str, actor: str) -> bytes:
        """Revoke the live access token whose hash (lowercase hex) is, or starts with,
        `hash_hex` (at least MIN_HASH_PREFIX_HEX digits, as the access log prints it); the
        full hash revoked."""
        low, high = hash_range(hash_hex)
        found = await self.store.token_hashes_between(low, high, 2)
        if not found:
            raise OperatorError("no access token we issued has that hash")
        if len(found) > 1:
            raise OperatorError("that prefix names more than one token: give more digits")
        if not await self.store.revoke_access(found[0], None, self.clock.now(), actor):
            raise OperatorError("no live, unrevoked access token has that hash")
        return found[0]


# -- pure decisions -------------------------------------------------------------------------


def disabled(client: Client, revoke: bool) -> RegistryChange[Client]:
    """Disabled, and with `revoke` its families killed: also for a client disabled before
    without --revoke, the operator's natural second step."""
    if client.disabled and not revoke:
        raise OperatorError(f"client {client.client_id} is already disabled")
    return RegistryChange(
        replace(client, disabled=True),
        "client.disabled",
        {"revoke": revoke},
        kill=(lambda _family: True) if revoke else None,
        kill_reason="client disabled",
    )


def enabled(client: Client) -> RegistryChange[Client]:
    if not client.disabled:
        raise OperatorError(f"client {client.client_id} is not disabled")
    return RegistryChange(replace(client, disabled=False), "client.enabled")


def secret_rotated(client: Client, digest: bytes, now: int, overlap: int) -> RegistryChange[Client]:
    """The new digest; the current one stays valid until now + overlap (none when 0). The
    secret before that, from an earlier rotation, ends here."""
    if client.secret_digest is None:
        raise OperatorError(
            f"client {client.client_id} authenticates with a key, not a secret"
            " (replace it with clients set-key)"
        )
    until = now + overlap if overlap > 0 else None
    rotated = replace(
        client,
        secret_digest=digest,
        previous_secret_digest=client.secret_digest if until is not None else None,
        previous_secret_until=until,
    )
    return RegistryChange(
        rotated, "client.secret_rotated", {"overlap": overlap, "previous_secret_until": until}
    )


def rekeyed(client: Client, public_key: dict[Any, Any]) -> RegistryChange[Client]:
    """The new key instead of the old key or secret; the families bound to the old key (cnf)
    die, so none keeps minting tokens bound to it."""
    old_key = client.public_key
    if old_key is not None and same_key(old_key, public_key):
        raise OperatorError(f"client {client.client_id} already has that key")
    changed = replace(
        client,
        public_key=public_key,
        secret_digest=None,
        previous_secret_digest=None,
        previous_secret_until=None,
    )
    was = "public-key" if old_key is not None else "secret"
    return RegistryChange(
        changed,
        "client.key_replaced",
        {"was": was},
        kill=None if old_key is None else (lambda family: bound_to(family, old_key)),
        kill_reason="client key replaced",
    )


def same_key(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> bool:
    """Whether two COSE_Keys are the same public key (compared in their canonical form)."""
    try:
        return cose_key_from_public(public_key_from_cose(a)) == cose_key_from_public(
            public_key_from_cose(b)
        )
    except (TokenError, UnsupportedPopKey):
        return False


def bound_to(family: RefreshFamily, key: Mapping[Any, Any]) -> bool:
    return family.cnf is not None and same_key(family.cnf, key)


@dataclass(frozen=True, slots=True)
class AudienceCredential:
    """How an audience is to authenticate to /introspect (None: unchanged)."""

    introspection: Introspection | None
    secret_digest: bytes | None = field(default=None, repr=False)
    public_key: dict[Any, Any] | None = None


def audience_changed(
    audience: Audience,
    lifetime: int | None,
    token_format: str | None,
    credential: AudienceCredential,
) -> RegistryChange[Audience]:
    """The audience with a new lifetime, token format or introspection credential, refused
    where `audiences add` would refuse the result."""
    if lifetime is None and token_format is None and credential.introspection is None:
        raise OperatorError("nothing to change: give --lifetime, --token-format or introspection")
    details: dict[str, Any] = {}
    changed = audience
    if lifetime is not None:
        if not 1 <= lifetime <= MAX_TOKEN_LIFETIME:
            # Resource servers refuse longer-lived tokens (device_client's max_lifetime).
            raise OperatorError(f"--lifetime must be 1 to {MAX_TOKEN_LIFETIME} seconds")
        changed = replace(changed, lifetime=lifetime)
        details["lifetime"] = lifetime
    if token_format is not None:
        if token_format not in ("cwt", "jwt"):
            raise OperatorError("--token-format is cwt or jwt")
        if token_format == "jwt" and audience.profile == "coap_oscore":
            raise OperatorError("a coap_oscore audience takes encrypted CWTs, not JWTs")
        if token_format == "jwt" and audience.symmetric:
            raise OperatorError(f"an {audience.key_alg} audience takes MACed CWTs, not JWTs")
        changed = replace(changed, token_format=token_format)  # type: ignore[arg-type]
        details["token_format"] = token_format
    if credential.introspection is not None:
        changed = replace(
            changed,
            introspect_secret_digest=credential.secret_digest,
            introspect_public_key=credential.public_key,
        )
        details["introspection"] = credential.introspection
    return RegistryChange(changed, "audience.changed", details)


def family_ended(current: list[SigningKey], family: str, now: int) -> list[SigningKey]:
    """Every key of `family` not ended yet, removed now (unpublished, private part erased)."""
    return [
        replace(key, state=KeyState.REMOVED, ended_at=now, private_key=None)
        for key in current
        if key.family == family and key.state not in ENDED
    ]


def hash_range(hash_hex: str) -> tuple[bytes, bytes]:
    """The lowest and highest token hash a lowercase hex prefix (or a whole hash) names.
    Raises OperatorError for anything else."""
    if not (
        MIN_HASH_PREFIX_HEX <= len(hash_hex) <= TOKEN_HASH_HEX
        and all(c in "0123456789abcdef" for c in hash_hex)
    ):
        raise OperatorError(
            f"--hash takes the token hash in lowercase hex: all {TOKEN_HASH_HEX} digits,"
            f" or the first {MIN_HASH_PREFIX_HEX} or more (as the access log prints it)"
        )
    pad = TOKEN_HASH_HEX - len(hash_hex)
    return bytes.fromhex(hash_hex + "0" * pad), bytes.fromhex(hash_hex + "f" * pad)
