"""The operator's use cases: add, disable, enable, remove a client, rotate its secret, replace
its key, provision its OSCORE context; add, change, remove an audience; rotate and revoke keys;
revoke tokens; and the reads the operator lists. Each change names its actor.

What a change stores and which refresh families die with it are pure decisions
(coap_auth.service.admin_decisions); the store applies each in one transaction with its audit
events.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from coap_auth.clock import Clock
from coap_auth.config import LIMITS, Settings
from coap_auth.errors import OperatorError
from coap_auth.keys import ALG_NAMES, DEFAULT_FAMILY, KeyRing, SigningKey, symmetric_cose_key
from coap_auth.service.admin_decisions import (
    AudienceCredential,
    AudienceOutcome,
    ClientOutcome,
    Introspection,
    ListedHash,
    TrlListing,
    audience_changed,
    checked_lifetime,
    client_scope,
    disabled,
    enabled,
    family_ended,
    hash_range,
    own_key_family,
    rekeyed,
    secret_rotated,
    wire_text,
)
from coap_auth.service.client_auth import secret_digest
from coap_auth.service.rollover import KeyRollover
from coap_auth.store import (
    PROFILES,
    TOKEN_FORMATS,
    Audience,
    AuditEntry,
    AuditEvent,
    Client,
    MasterKey,
    RefreshFamily,
    Store,
)
from coap_auth.store.audit import AuditName
from coap_auth.store.records import Profile, RegistryChange, TokenFormat

# What the command line offers (choices, defaults), named here so that it needs no store or
# key internals (tests/test_layering.py).
__all__ = [
    "DEFAULT_FAMILY",
    "KEY_ALGS",
    "PROFILES",
    "TOKEN_FORMATS",
    "Administration",
    "AudienceOutcome",
    "ClientOutcome",
    "ListedHash",
    "TrlListing",
    "new_secret",
]
KEY_ALGS = tuple(ALG_NAMES)  # ES256, EdDSA, HMAC256/64, AES-CCM-16-64-128
SECRET_BYTES = 24  # 192 bits, as base64url text


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


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

    async def add_client(
        self,
        client_id: str,
        actor: str,
        *,
        audiences: Sequence[str],
        scope: str,
        public_key: dict[Any, Any] | None = None,
    ) -> ClientOutcome:
        """Register a client that authenticates with `public_key` (signed assertions) or,
        without one, with a generated secret, shown once (only a keyed digest is stored).
        `scope` is space-separated."""
        scopes = client_scope(scope)
        await self._id_is_free(client_id, "client")
        secret = new_secret() if public_key is None else None
        client = Client(
            client_id=wire_text(client_id, "the client id"),
            audiences=tuple(dict.fromkeys(wire_text(a, "an audience") for a in audiences)),
            scope=scopes,
            created_at=self.clock.now(),
            secret_digest=None if secret is None else secret_digest(self._master_key, secret),
            public_key=public_key,
        )
        await self.store.add_client(client, actor)
        return ClientOutcome(client_id, client, secret=secret)

    async def list_clients(self) -> list[Client]:
        return await self.store.list_clients()

    async def provision_oscore(
        self, client_id: str, actor: str, provision: Callable[[Client], dict[str, Any]]
    ) -> dict[str, Any]:
        """An OSCORE context for an enabled client that cannot run EDHOC: `provision` creates
        it (coap_auth.secure.provisioned, which the transport owns) and returns the device's
        side, which is returned as it is; the audit log records that it was made, not what."""
        client = await self.store.get_client(client_id)
        if client is None or client.disabled:
            raise OperatorError(f"no enabled client {client_id!r}")
        device = provision(client)
        await self._audit(actor, AuditName.CLIENT_OSCORE_PROVISIONED, client_id)
        return device

    async def withdraw_oscore(
        self, client_id: str, actor: str, withdraw: Callable[[str], bool]
    ) -> None:
        """Withdraw the OSCORE context provisioned for a client (`withdraw`: True if there
        was one; coap_auth.secure.provisioned.remove)."""
        if not withdraw(client_id):
            raise OperatorError(f"no OSCORE context provisioned for {client_id!r}")
        await self._audit(actor, AuditName.CLIENT_OSCORE_REMOVED, client_id)

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
            await self._audit(actor, AuditName.CLIENT_OSCORE_REMOVED, client_id)
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

    async def add_audience(
        self,
        audience_id: str,
        actor: str,
        *,
        profile: Profile,
        token_format: TokenFormat,
        lifetime: int | None = None,
        own_keys: bool = False,
        key_alg: str | None = None,
        introspect_secret: bool = False,
        introspect_public_key: dict[Any, Any] | None = None,
    ) -> AudienceOutcome:
        """Register an audience (its tokens live `lifetime` s, default the token_lifetime
        setting). With `own_keys` (always for coap_oscore) it signs with a key family of its
        own, whose first keys are created here. It calls /introspect with a generated secret
        (`introspect_secret`, shown once) or with assertions signed by `introspect_public_key`."""
        lifetime = checked_lifetime(self.settings.token_lifetime if lifetime is None else lifetime)
        own_keys, key_alg = own_key_family(profile, token_format, own_keys, key_alg)
        secret = new_secret() if introspect_secret else None
        await self._id_is_free(audience_id, "audience")
        if own_keys and audience_id in self._keys.rings:
            # Its keys ended with it (audiences remove); a family is never brought back to life.
            raise OperatorError(
                f"key family {audience_id} belonged to a removed audience: choose another id"
            )
        audience = Audience(
            wire_text(audience_id, "the audience id"),
            token_format,
            lifetime,
            self.clock.now(),
            key_family=audience_id if own_keys else DEFAULT_FAMILY,
            key_alg=key_alg or (self.settings.signing_alg if own_keys else None),
            introspect_secret_digest=(
                None if secret is None else secret_digest(self._master_key, secret)
            ),
            introspect_public_key=introspect_public_key,
            profile=profile,
        )
        await self.store.add_audience(audience, actor)
        # Creates its own family's keys. The audit log names the service as their creator: a
        # running server may create them first, on the change feed's news of the audience.
        await self._keys.load()
        return AudienceOutcome(audience_id, audience, introspection_secret=secret)

    async def list_audiences(self) -> list[Audience]:
        return await self.store.list_audiences()

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

    async def _id_is_free(self, wanted: str, kind: str) -> None:
        """EDHOC names a peer by its id alone, so clients, audiences and the AS itself share
        one name space: an id taken by the other kind (or the issuer id) is refused."""
        if wanted == self.settings.issuer:
            raise OperatorError(f"{wanted!r} is the AS's own issuer id")
        taken = (
            await self.store.get_audience(wanted)
            if kind == "client"
            else await self.store.get_client(wanted)
        )
        if taken is not None:
            other = "an audience" if kind == "client" else "a client"
            raise OperatorError(
                f"{wanted!r} is already {other} id (one name space for EDHOC peers)"
            )

    # -- keys -------------------------------------------------------------------------------

    @property
    def created_first_keys(self) -> bool:
        """Whether this process created the default family's first keys (a first start)."""
        return DEFAULT_FAMILY in self._keys.created_families

    def list_keys(self, family: str | None = None) -> list[SigningKey]:
        """Every key in every state, of one family or of all: the default family first, then
        by family, oldest first."""
        keys = [
            key
            for ring in self._keys.rings.values()
            for key in ring.keys
            if family is None or key.family == family
        ]
        keys.sort(key=lambda k: (k.family != DEFAULT_FAMILY, k.family, k.created_at))
        return keys

    async def rotate_keys(self, family: str, actor: str, *, force: bool = False) -> KeyRing:
        """Rotate now: next becomes active, active retires, a new next key is published
        (`force`: even before the pre-publication lead has passed). Returns the family."""
        await self._keys.rotate(family, force=force, actor=actor)
        return self._keys.ring(family)

    async def revoke_key(self, kid: bytes, actor: str) -> KeyRing:
        """A compromised key: unpublished at once and trusted no longer (its family's next
        key takes over if it was active). Returns its family."""
        changed = await self._keys.revoke(kid, actor=actor)
        return self._keys.ring(changed[0].family)

    def export_keys(self, family: str) -> list[dict[int, Any]]:
        """A symmetric family's published keys as COSE_Keys, secrets included, for the
        operator to provision its audience (asymmetric families are public at /keys)."""
        if family not in self._keys.rings:
            raise OperatorError(f"no key family {family!r}")
        ring = self._keys.ring(family)
        if not ring.published:  # `audiences remove` ended its keys
            raise OperatorError(f"key family {family!r} has no published keys")
        if not ring.active.symmetric:
            raise OperatorError("only symmetric families are exported; others are at /keys")
        return [symmetric_cose_key(k) for k in ring.published]

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

    async def list_families(self, client_id: str | None = None) -> list[RefreshFamily]:
        """Live refresh families, of one client or of all."""
        return await self.store.list_families(client_id, self.clock.now())

    async def revocation_listing(self) -> TrlListing:
        """The whole TRL, each hash with the update that listed it while the store keeps it."""
        hashes, first, last = await self.store.trl()
        listed_by: dict[bytes, tuple[int, int]] = {}
        if last:
            for update in reversed(await self.store.trl_updates(first, last)):  # oldest first
                for added in update.added:
                    listed_by[added] = (update.seq, update.at)
        listed = tuple(ListedHash(h, *listed_by.get(h, (None, None))) for h in hashes)
        return TrlListing(listed, first, last)

    # -- audit ------------------------------------------------------------------------------

    async def audit_tail(self, last: int) -> list[AuditEntry]:
        """The latest `last` entries of the audit log, oldest first."""
        return await self.store.audit_entries(last=last)

    async def record_restore(self, entries: int, head_mac: bytes, actor: str) -> None:
        """`coap-auth restore` put a backup in place: the log says so, and of which backup
        (its entries and head), so a deliberate rollback is visible there."""
        details = {"backup_entries": entries, "backup_head": head_mac.hex()}
        event = AuditEvent(self.clock.now(), actor, AuditName.STORE_RESTORED, "database", details)
        await self.store.append_audit([event])

    async def _audit(self, actor: str, event: AuditName, subject: str) -> None:
        await self.store.append_audit([AuditEvent(self.clock.now(), actor, event, subject)])
