"""What the stores decide, written once: a refresh's outcome, what a family kill revokes, what a
sweep delists and forgets, whether a grant's registry view is current, and the audit events.

Pure functions of rows as read and `now`. Each store (sqlite_*, postgres_*) reads the rows in its
transaction, asks here, and writes what comes back: SQL, locking and retries stay there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from coap_auth.store.audit import SERVICE_ACTOR, AuditEvent, AuditName
from coap_auth.store.records import (
    Audience,
    Client,
    Minted,
    RefreshFamily,
    RefreshOutcome,
    RefreshStatus,
    RegistryVersions,
)
from coap_auth.store.trl_history import Owner

M = TypeVar("M")


class KillReason(StrEnum):
    """Why the store itself ends a family; an operator's kills give their own reason."""

    REUSED = "refresh token reused"
    EXPIRED = "expired"
    CLIENT_REMOVED = "client removed"
    AUDIENCE_REMOVED = "audience removed"


@dataclass(frozen=True, slots=True)
class FamilyKill:
    """Families to end, why, by whom; `revoke_access`: their unexpired access tokens go on the
    TRL (in one update). Expiry ends a family without revoking: expiry is not theft."""

    reason: str
    actor: str
    revoke_access: bool = True


REUSE_KILL = FamilyKill(KillReason.REUSED, SERVICE_ACTOR)
EXPIRY_END = FamilyKill(KillReason.EXPIRED, SERVICE_ACTOR, revoke_access=False)


# -- refresh ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PresentedToken:
    """The stored state of the refresh token a client presented: when it was spent (None:
    live), and whether its successor exists and is still unspent."""

    spent_at: int | None
    successor_unspent: bool


@dataclass(frozen=True, slots=True)
class RefreshPlan:
    """What a refresh does. `kill`: end the family (reused, expired). `rotates`: mint, spend the
    presented token, store its successor and touch the family; `spends_successor`: first spend
    the presented token's unused successor (grace: the device never got it)."""

    status: RefreshStatus
    kill: FamilyKill | None = None

    @property
    def rotates(self) -> bool:
        return self.status in (RefreshStatus.ROTATED, RefreshStatus.GRACE)

    @property
    def spends_successor(self) -> bool:
        return self.status is RefreshStatus.GRACE


def plan_refresh(
    token: PresentedToken | None,
    family: RefreshFamily | None,
    *,
    client_id: str,
    now: int,
    grace: int,
    idle_timeout: int,
) -> RefreshPlan:
    """The refresh state machine (docs/protocol.md "Refresh tokens", RFC 9700 §4.14)."""
    if token is None or family is None or family.client_id != client_id:
        # Another client's token is as unknown as a made-up one: nothing tells them apart.
        return RefreshPlan(RefreshStatus.UNKNOWN)
    if family.killed_at is not None:
        return RefreshPlan(RefreshStatus.DEAD)
    if now >= family.expires_at or now - family.last_used_at >= idle_timeout:
        return RefreshPlan(RefreshStatus.EXPIRED, EXPIRY_END)
    if token.spent_at is None:
        return RefreshPlan(RefreshStatus.ROTATED)
    if now - token.spent_at < grace and token.successor_unspent:
        # A device whose answer was lost asks again: its unused successor is replaced.
        return RefreshPlan(RefreshStatus.GRACE)
    # RFC 9700 §4.14.2: a spent refresh token used again means theft.
    return RefreshPlan(RefreshStatus.REUSED, REUSE_KILL)


def unminted(plan: RefreshPlan, family: RefreshFamily | None) -> RefreshOutcome[Any] | None:
    """The outcome of a refresh that does not rotate (after its kill, if the plan has one):
    the family is named unless the token was unknown. None: it rotates, mint first."""
    if plan.rotates:
        return None
    return RefreshOutcome(plan.status, None if plan.status is RefreshStatus.UNKNOWN else family)


def settle_refresh(
    plan: RefreshPlan, family: RefreshFamily, minted: Minted[M], registry_current: bool
) -> RefreshOutcome[M]:
    """The outcome of a rotating refresh once minted: STALE when a registry row it rests on
    changed, REFUSED when the mint refused (both write nothing), else the plan's status, and
    the rotation is written (the store writes only when the status is the plan's)."""
    if not registry_current:
        return RefreshOutcome(RefreshStatus.STALE)
    if minted.access is None:
        return RefreshOutcome(RefreshStatus.REFUSED, family, minted.value)
    return RefreshOutcome(plan.status, family, minted.value)


# -- family kills and revocation -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """An access_tokens row as a kill or a sweep reads it."""

    token_hash: bytes
    family_id: bytes | None
    client_id: str
    audience: str | None
    exp: int
    revoked_at: int | None = None
    delisted_at: int | None = None

    @property
    def owner(self) -> Owner:
        return (self.client_id, self.audience)


def revocable(records: Iterable[AccessRecord], now: int) -> dict[bytes, Owner]:
    """Those a revocation puts on the TRL: not revoked yet and not expired (an expired token
    needs no listing), hash to owner, in hash order."""
    chosen = sorted(
        (r for r in records if r.revoked_at is None and r.exp > now), key=lambda r: r.token_hash
    )
    return {r.token_hash: r.owner for r in chosen}


def kill_events(
    families: Iterable[RefreshFamily],
    kill: FamilyKill,
    records: Iterable[AccessRecord],
    revoked: Collection[bytes],
    now: int,
) -> list[AuditEvent]:
    """One `family.killed` event per family. When the kill revokes, it names the access tokens
    it put on the TRL (`revoked`, of `records`), hash to exp, so `audit verify` can tell one
    taken off the list early."""
    by_family: dict[bytes | None, dict[str, int]] = {}
    for r in records:
        if r.token_hash in revoked:
            by_family.setdefault(r.family_id, {})[r.token_hash.hex()] = r.exp
    events = []
    for family in families:
        details: dict[str, Any] = {"client_id": family.client_id, "reason": str(kill.reason)}
        if kill.revoke_access:
            tokens = by_family.get(family.family_id, {})
            details["revoked_access_tokens"] = len(tokens)
            details["access_tokens"] = dict(sorted(tokens.items()))
        events.append(
            AuditEvent(now, kill.actor, AuditName.FAMILY_KILLED, family.family_id.hex(), details)
        )
    return events


def revocation_event(record: AccessRecord, actor: str, now: int) -> AuditEvent:
    # The exp lets `audit verify` tell a token delisted early from one that expired.
    details = {"client_id": record.client_id, "exp": record.exp}
    return AuditEvent(now, actor, AuditName.TOKEN_REVOKED, record.token_hash.hex(), details)


def may_revoke(record: AccessRecord | None, client_id: str | None, now: int) -> bool:
    """A revocation request names a live, unrevoked token we issued (to `client_id`, when a
    client asks: RFC 7009 §2.1, a client revokes only its own tokens)."""
    return (
        record is not None
        and record.revoked_at is None
        and record.exp > now
        and (client_id is None or record.client_id == client_id)
    )


# -- sweep -----------------------------------------------------------------------------------


def delistable(records: Iterable[AccessRecord], now: int) -> dict[bytes, Owner]:
    """Revoked tokens still listed whose exp has passed: the sweep takes them off the TRL in
    one update (RFC 9770 §5: an expired token needs no listing), in revocation order."""
    chosen = sorted(
        (r for r in records if r.revoked_at is not None and r.delisted_at is None and r.exp <= now),
        key=lambda r: (r.revoked_at, r.token_hash),
    )
    return {r.token_hash: r.owner for r in chosen}


def forgettable(records: Iterable[AccessRecord], now: int) -> list[bytes]:
    """Records of tokens that expired unrevoked: nothing needs them any more."""
    return sorted(r.token_hash for r in records if r.revoked_at is None and r.exp <= now)


def updates_kept(keep_updates: int) -> int:
    """How many of the newest updates each history keeps: at least one, since the next update
    is numbered after the newest."""
    return max(keep_updates, 1)


# -- the registry view of a grant ------------------------------------------------------------


def registry_current(
    versions: RegistryVersions,
    client_macs: Mapping[str, bytes | None],
    audience_macs: Mapping[str, bytes | None],
) -> bool:
    """Whether every registry row a grant was decided from is still stored as it was: each
    client and audience named in `versions` has the MAC given there (b"": no such row). The
    `*_macs` are the stored MACs (None: no row), read in the grant's transaction."""
    return all(
        (client_macs.get(client_id) or b"") == mac for client_id, mac in versions.clients
    ) and all(
        (audience_macs.get(audience_id) or b"") == mac for audience_id, mac in versions.audiences
    )


# -- registry audit events -------------------------------------------------------------------


def audience_added_event(audience: Audience, actor: str) -> AuditEvent:
    details = {
        "token_format": audience.token_format,
        "key_family": audience.key_family,
        "profile": audience.profile,
    }
    return AuditEvent(
        audience.created_at, actor, AuditName.AUDIENCE_ADDED, audience.audience_id, details
    )


def client_added_event(client: Client, actor: str) -> AuditEvent:
    details = {
        "audiences": list(client.audiences),
        "scope": " ".join(client.scope),
        "auth": client.public_view()["auth"],
    }
    return AuditEvent(client.created_at, actor, AuditName.CLIENT_ADDED, client.client_id, details)


def removal_event(name: AuditName, subject: str, killed: int, actor: str, now: int) -> AuditEvent:
    """`client.removed` or `audience.removed`, with how many families died with it."""
    return AuditEvent(now, actor, name, subject, {"killed_families": killed})


def disable_event(client_id: str, actor: str, now: int) -> AuditEvent:
    return AuditEvent(now, actor, AuditName.CLIENT_DISABLED, client_id)
