"""The pure half of the operator's use cases (coap_auth.service.admin): what they return, and
their decisions (what a registry change stores and which families die with it, what a new client
or audience may be, which keys end). No I/O and no clock: time is passed in; a refusal raises
OperatorError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from coap_auth.errors import OperatorError, TokenError, UnsupportedPopKey
from coap_auth.keys import ENDED, KeyState, SigningKey
from coap_auth.store import Audience, Client, RefreshFamily
from coap_auth.store.audit import AuditName
from coap_auth.store.records import OSCORE_TOKEN_ALG, RegistryChange
from coap_auth.text import has_control_character
from coap_auth.tokens import cose_key_from_public, public_key_from_cose
from coap_auth.wire import MAX_TOKEN_LIFETIME

TOKEN_HASH_HEX = 66  # 0x01 || SHA-256: 33 bytes
MIN_HASH_PREFIX_HEX = 16  # what the access log prints of a token hash
Introspection = Literal["secret", "public-key", "none"]


# -- what the use cases return ----------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class ListedHash:
    """A hash on the TRL, with the update that listed it and when (None while the store no
    longer keeps that update)."""

    token_hash: bytes
    update: int | None = None
    at: int | None = None


@dataclass(frozen=True, slots=True)
class TrlListing:
    """The whole TRL and the seqs of the first and last updates kept (0, 0: none)."""

    hashes: tuple[ListedHash, ...]
    first: int
    last: int


# -- new clients and audiences ----------------------------------------------------------------


def wire_text(value: str, what: str) -> str:
    """An id or scope as devices will send it: the service refuses control characters on the
    wire, so one registered with them could never be used."""
    if not value or has_control_character(value):
        raise OperatorError(f"{what} must be non-empty text without control characters")
    return value


def client_scope(text: str) -> tuple[str, ...]:
    """The scopes of a new client, from space-separated text, each once, in order."""
    scope = tuple(dict.fromkeys(wire_text(s, "a scope") for s in text.split()))
    if not scope:
        raise OperatorError("--scope must name at least one scope")
    return scope


def checked_lifetime(lifetime: int) -> int:
    if not 1 <= lifetime <= MAX_TOKEN_LIFETIME:
        # Resource servers refuse longer-lived tokens (device_client's max_lifetime).
        raise OperatorError(f"--lifetime must be 1 to {MAX_TOKEN_LIFETIME} seconds")
    return lifetime


def own_key_family(
    profile: str, token_format: str, own_keys: bool, key_alg: str | None
) -> tuple[bool, str | None]:
    """Whether a new audience signs with a family of its own, and that family's algorithm
    (None: the service's signing algorithm), refusing combinations its tokens cannot have."""
    if profile == "coap_oscore":
        # RFC 9203 §3.2: its tokens carry a master secret, encrypted under keys it alone
        # shares with the AS.
        if key_alg not in (None, OSCORE_TOKEN_ALG):
            raise OperatorError(f"a coap_oscore audience's keys are {OSCORE_TOKEN_ALG}")
        if token_format == "jwt":
            raise OperatorError("a coap_oscore audience takes encrypted CWTs, not JWTs")
        key_alg, own_keys = OSCORE_TOKEN_ALG, True
    elif key_alg == OSCORE_TOKEN_ALG:
        raise OperatorError(f"{OSCORE_TOKEN_ALG} keys are for --profile coap_oscore")
    if key_alg is not None and not own_keys:
        raise OperatorError("--key-alg needs --own-keys")
    if key_alg == "HMAC256/64" and token_format == "jwt":
        raise OperatorError("an HMAC256/64 audience takes MACed CWTs, not JWTs")
    return own_keys, key_alg


# -- changes of the registry ------------------------------------------------------------------


def disabled(client: Client, revoke: bool) -> RegistryChange[Client]:
    """Disabled, and with `revoke` its families killed: also for a client disabled before
    without --revoke, the operator's natural second step."""
    if client.disabled and not revoke:
        raise OperatorError(f"client {client.client_id} is already disabled")
    return RegistryChange(
        replace(client, disabled=True),
        AuditName.CLIENT_DISABLED,
        {"revoke": revoke},
        kill=(lambda _family: True) if revoke else None,
        kill_reason="client disabled",
    )


def enabled(client: Client) -> RegistryChange[Client]:
    if not client.disabled:
        raise OperatorError(f"client {client.client_id} is not disabled")
    return RegistryChange(replace(client, disabled=False), AuditName.CLIENT_ENABLED)


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
        rotated,
        AuditName.CLIENT_SECRET_ROTATED,
        {"overlap": overlap, "previous_secret_until": until},
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
        AuditName.CLIENT_KEY_REPLACED,
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
        changed = replace(changed, lifetime=checked_lifetime(lifetime))
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
    return RegistryChange(changed, AuditName.AUDIENCE_CHANGED, details)


# -- keys and tokens ---------------------------------------------------------------------------


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
