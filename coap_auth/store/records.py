"""What the store keeps, as frozen value objects (shared by every Store implementation)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from coap_auth.keys import ALG_NAMES, SYMMETRIC_ALGS

TokenFormat = Literal["cwt", "jwt"]
TOKEN_FORMATS: tuple[TokenFormat, ...] = ("cwt", "jwt")
# How a resource server takes its tokens (design of issue 15): "bearer" (today's tokens, cnf
# only when the client sends req_cnf), "coap_oscore" (RFC 9203: an encrypted CWT carrying
# OSCORE input material), "edhoc_oscore" (draft-ietf-ace-edhoc-oscore-profile-11: a token
# bound to the client's EDHOC key).
Profile = Literal["bearer", "coap_oscore", "edhoc_oscore"]
PROFILES: tuple[Profile, ...] = ("edhoc_oscore", "coap_oscore", "bearer")
BEARER: Profile = "bearer"
# The key algorithms whose keys are shared secrets (never published at /keys; exported), by
# the names audiences store: coap_auth.keys decides which.
SYMMETRIC_KEY_ALGS = tuple(name for name, alg in ALG_NAMES.items() if alg in SYMMETRIC_ALGS)
# The algorithm of a coap_oscore audience's own family: its tokens are encrypted for it.
OSCORE_TOKEN_ALG = "AES-CCM-16-64-128"


@dataclass(frozen=True, slots=True)
class Audience:
    """A resource server tokens are issued for. Raises ValueError when built as coap_oscore
    without its own AES-CCM-16-64-128 key family, or with one under another profile."""

    audience_id: str
    token_format: TokenFormat
    lifetime: int
    created_at: int
    # The signing-key family its tokens are signed with ("default": the shared one), and
    # the algorithm of its own family ("ES256", "EdDSA", "HMAC256/64" or, for coap_oscore,
    # "AES-CCM-16-64-128"; None: the default).
    key_family: str = "default"
    key_alg: str | None = None
    # How it authenticates to /introspect: a keyed digest of its secret, or its public key.
    introspect_secret_digest: bytes | None = field(default=None, repr=False)
    introspect_public_key: dict[Any, Any] | None = field(default=None, compare=False)
    # "bearer" for records (and rows) from before profiles; `audiences add` defaults to
    # "edhoc_oscore".
    profile: Profile = BEARER
    # The row's MAC as read from the store (b"": not read from one): what a grant decided from
    # a cached record names, so the store can tell the row has not changed since.
    version: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        # RFC 9203 §3.2: the token carries a master secret, so it is encrypted under a key
        # only this audience shares: an own family of AES keys, for this profile only.
        oscore_keys = self.key_alg == OSCORE_TOKEN_ALG
        if (self.profile == "coap_oscore") != (oscore_keys and self.key_family != "default"):
            raise ValueError(
                f"a coap_oscore audience (and only one) has its own {OSCORE_TOKEN_ALG} key family"
            )

    @property
    def symmetric(self) -> bool:
        """Its family's keys are shared with it, never published."""
        return self.key_alg in SYMMETRIC_KEY_ALGS

    def public_view(self) -> dict[str, Any]:
        if self.introspect_secret_digest is not None:
            introspection = "secret"
        elif self.introspect_public_key is not None:
            introspection = "public-key"
        else:
            introspection = None
        return {
            "audience_id": self.audience_id,
            "token_format": self.token_format,
            "lifetime": self.lifetime,
            "key_family": self.key_family,
            "key_alg": self.key_alg,
            "profile": self.profile,
            "introspection": introspection,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Client:
    client_id: str
    audiences: tuple[str, ...]
    scope: tuple[str, ...]
    created_at: int
    # Exactly one of these authenticates the client.
    secret_digest: bytes | None = field(default=None, repr=False)
    public_key: dict[Any, Any] | None = field(default=None, compare=False)  # COSE_Key
    disabled: bool = False
    # After `clients rotate-secret`: the secret before, still accepted until (exclusive) this
    # moment; both None otherwise (schema 7).
    previous_secret_digest: bytes | None = field(default=None, repr=False)
    previous_secret_until: int | None = None
    # As Audience.version.
    version: bytes = field(default=b"", compare=False, repr=False)

    def previous_secret_valid(self, now: int) -> bool:
        """Whether the secret before the last rotation is still accepted at `now`."""
        return (
            self.previous_secret_digest is not None
            and self.previous_secret_until is not None
            and now < self.previous_secret_until
        )

    def public_view(self) -> dict[str, Any]:
        """What listings show: never the secret digest, never key material beyond its type."""
        return {
            "client_id": self.client_id,
            "audiences": list(self.audiences),
            "scope": " ".join(self.scope),
            "auth": "public-key" if self.public_key is not None else "secret",
            "disabled": self.disabled,
            "created_at": self.created_at,
            "previous_secret_until": (
                self.previous_secret_until if self.previous_secret_digest is not None else None
            ),
        }


R = TypeVar("R", Client, Audience)


@dataclass(frozen=True, slots=True)
class RegistryChange(Generic[R]):
    """What an operator's change of a client or audience stores, decided from the record as
    stored (coap_auth.service.admin): the new record, its audit event and details (never a
    secret), and for a client, which of its live refresh families die with it (their access
    tokens revoked, in the same transaction)."""

    record: R
    event: str
    details: dict[str, Any] = field(default_factory=dict)
    kill: Callable[[RefreshFamily], bool] | None = None
    kill_reason: str = ""


@dataclass(frozen=True, slots=True)
class RefreshFamily:
    """Every refresh token descended from one grant (RFC 9700 §4.14): one client, audience,
    scope set and cnf, with an idle timeout and an absolute lifetime."""

    family_id: bytes
    client_id: str
    audience: str
    scope: str
    created_at: int
    last_used_at: int
    expires_at: int
    cnf: dict[Any, Any] | None = field(default=None, compare=False)
    killed_at: int | None = None
    kill_reason: str | None = None

    def public_view(self) -> dict[str, Any]:
        return {
            "family": self.family_id.hex(),
            "client_id": self.client_id,
            "audience": self.audience,
            "scope": self.scope,
            "pop": self.cnf is not None,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class IssuedAccess:
    """The record of an issued access token: enough to revoke it, to drop it when expired,
    and to tell whom its TRL entry pertains to (RFC 9770 §5: its client and its audience)."""

    token_hash: bytes
    client_id: str
    exp: int
    # None: recorded before schema 5 outside a refresh family; the hash is its client's only.
    audience: str | None = None


class RefreshStatus(StrEnum):
    """How a refresh ended (coap_auth.store.decisions.plan_refresh)."""

    ROTATED = "rotated"  # the token was live: spent, its successor stored
    GRACE = "grace"  # spent moments ago, successor unused: the successor replaced
    REUSED = "reused"  # spent otherwise: theft, the family killed
    UNKNOWN = "unknown"  # no such token for this client
    DEAD = "dead"  # its family was killed before
    EXPIRED = "expired"  # idle or absolute expiry: the family ends
    REFUSED = "refused"  # the mint refused (e.g. a wider scope): nothing changed
    STALE = "stale"  # a registry row the mint used changed meanwhile: nothing changed


class TokenStatus(StrEnum):
    """An issued access token we keep a record of."""

    LIVE = "live"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class RegistryVersions:
    """The registry rows a grant was decided from (the service's cache), as (id, MAC): the
    store writes the grant only if each row is still stored with that MAC (b"": no such row)."""

    clients: tuple[tuple[str, bytes], ...] = ()
    audiences: tuple[tuple[str, bytes], ...] = ()

    def __add__(self, other: RegistryVersions) -> RegistryVersions:
        return RegistryVersions(self.clients + other.clients, self.audiences + other.audiences)


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """The registry in one consistent read: the clients and audiences whose MAC verifies, and
    whether the rows as stored are the ones the audit head records (audit.registry_matches):
    a row put back to an older sealed copy, or deleted, outside coap-auth, fails that."""

    clients: tuple[Client, ...]
    audiences: tuple[Audience, ...]
    matches_head: bool


# A write that rests on no cached registry row.
UNCHECKED = RegistryVersions()

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Minted(Generic[M]):
    """What a refresh's mint made of the family: `value` for the caller (the token, or why it is
    refused), the record to store (`access`; None refuses: nothing is written), and the
    registry rows it was decided from."""

    value: M
    access: IssuedAccess | None
    registry: RegistryVersions = UNCHECKED


@dataclass(frozen=True, slots=True)
class RefreshOutcome(Generic[M]):
    status: RefreshStatus
    family: RefreshFamily | None = None
    # The mint's value, when it ran (rotated, grace, refused).
    minted: M | None = None


@dataclass(frozen=True, slots=True)
class TrlUpdate:
    """One change of the token revocation list, hashes removed and added, as one history
    holds it: the whole list's (every hash), or a requester's update collection (RFC 9770
    §6.2: only its hashes). `seq` numbers it in that history, from 1; its RFC 9770 index is
    `seq - 1`."""

    seq: int
    at: int
    removed: tuple[bytes, ...]
    added: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ChangeCounters:
    """The change feed: each counter grows with every change its observers must hear of."""

    keys: int
    revocations: int
    # The registry digest of the audit head (coap_auth.store.audit): it moves with every
    # client or audience change, so a registry cache knows to reload (b"": not read).
    registry: bytes = b""
