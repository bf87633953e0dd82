"""The audit log's shape, its hash chain and its head, shared by every Store implementation.

Each entry's MAC covers its own fields and the previous entry's MAC, keyed by a key derived
from the master key (kept outside the database): editing, reordering or removing any entry
breaks the chain, and someone with only the database cannot forge a new one. The head (the
newest seq and MAC, MACed too) is rewritten in the same transaction as every append, so
removing the newest entries, or all of them, leaves a chain that stops short of its head.
The head also records a digest of the registry (`registry_mac.registry_digest`), rewritten
with every registry write, so an older sealed copy of a client or audience row put back (a
disabled client enabled again, an old key), or a row deleted, no longer matches it.
What the database alone cannot show is a head and log both put back to an older copy of
themselves: compare the head `audit verify` prints with one recorded elsewhere.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import cbor2

from coap_auth.keys import SigningKey
from coap_auth.store.registry_mac import RegistryReport
from coap_auth.store.revocation_audit import RevocationReport, RevocationRows

GENESIS = bytes(32)
# v1 (schema 3) covered seq and last_mac; v2 (schema 4) covers the registry digest too.
LEGACY_HEAD_DOMAIN = "coap-auth audit head v1"
HEAD_DOMAIN = "coap-auth audit head v2"


class AuditName(StrEnum):
    """Every event the audit log records."""

    AUDIENCE_ADDED = "audience.added"
    AUDIENCE_CHANGED = "audience.changed"
    AUDIENCE_REMOVED = "audience.removed"
    CLIENT_ADDED = "client.added"
    CLIENT_DISABLED = "client.disabled"
    CLIENT_ENABLED = "client.enabled"
    CLIENT_KEY_REPLACED = "client.key_replaced"
    CLIENT_OSCORE_PROVISIONED = "client.oscore_provisioned"
    CLIENT_OSCORE_REMOVED = "client.oscore_removed"
    CLIENT_REMOVED = "client.removed"
    CLIENT_SECRET_ROTATED = "client.secret_rotated"
    FAMILY_KILLED = "family.killed"
    KEY_ACTIVATED = "key.activated"
    KEY_CREATED = "key.created"
    KEY_REMOVED = "key.removed"
    KEY_RETIRED = "key.retired"
    KEY_REVOKED = "key.revoked"
    STORE_MIGRATED = "store.migrated"
    STORE_RESTORED = "store.restored"
    TOKEN_REVOKED = "token.revoked"


# Who acts when no operator does: the service answering requests, the key scheduler.
SERVICE_ACTOR = "service"
SCHEDULER_ACTOR = "scheduler"

# The state a key moved into, as the event name that records it.
_KEY_EVENTS = {
    "active": AuditName.KEY_ACTIVATED,
    "retiring": AuditName.KEY_RETIRED,
    "removed": AuditName.KEY_REMOVED,
    "revoked": AuditName.KEY_REVOKED,
}


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What happened, to what, by whom. `details` never holds a secret, token or key."""

    at: int
    actor: str  # "operator", "scheduler" or "service"
    event: str  # e.g. "key.created", "family.killed", "client.added"
    subject: str  # the kid, client id, audience id or family id it concerns
    details: Mapping[str, Any] = field(default_factory=dict)

    def details_json(self) -> str:
        return json.dumps(dict(self.details), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class AuditEntry:
    seq: int
    event: AuditEvent
    mac: bytes

    def public_view(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.event.at,
            "actor": self.event.actor,
            "event": self.event.event,
            "subject": self.event.subject,
            "details": dict(self.event.details),
        }


@dataclass(frozen=True, slots=True)
class ChainReport:
    ok: bool
    entries: int
    # The first entry that does not verify (None: the fault is the head's), and why.
    broken_at: int | None = None
    reason: str | None = None
    head_mac: bytes = GENESIS

    def describe(self) -> str:
        if self.ok:
            return f"audit log intact: {self.entries} entries; head {self.head_mac.hex()}"
        if self.broken_at is None:
            return f"audit log broken: {self.reason}"
        return (
            f"audit log broken at entry {self.broken_at}: {self.reason}"
            f" ({self.entries} entries verified before it)"
        )


@dataclass(frozen=True, slots=True)
class AuditHead:
    """Where the chain ends, as the last append left it: its seq and MAC, the registry digest
    the last registry write left, and the head's MAC over them."""

    seq: int
    last_mac: bytes
    registry: bytes
    mac: bytes


@dataclass(frozen=True, slots=True)
class AuditSnapshot:
    """One consistent read of everything `audit verify` checks in the log."""

    entries: tuple[AuditEntry, ...]
    head: AuditHead | None  # None: the head row is gone
    holds_data: bool  # the store holds a signing key, a client or an audience
    registry: bytes  # the digest of the registry rows as read (`registry_digest`)
    # The revocation state in the same read, to cross-check against the entries.
    revocation: RevocationRows = RevocationRows()


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What `audit verify` found: the chain and its head, the registry rows' MACs, and the
    revocations the log records that the token tables no longer show."""

    chain: ChainReport
    registry: RegistryReport
    revocation: RevocationReport = RevocationReport(0, 0)

    @property
    def ok(self) -> bool:
        return self.chain.ok and self.registry.ok and self.revocation.ok

    def problems(self) -> list[str]:
        found = [] if self.chain.ok else [self.chain.describe()]
        found += [fault.describe() for fault in self.registry.faults]
        return found + list(self.revocation.problems)


Mac = Callable[[bytes], bytes]


def entry_mac(mac: Mac, previous: bytes, seq: int, event: AuditEvent) -> bytes:
    fields = [seq, event.at, event.actor, event.event, event.subject, event.details_json()]
    return mac(previous + cbor2.dumps(fields, canonical=True))


def verify_chain(mac: Mac, entries: Iterable[AuditEntry]) -> ChainReport:
    """Walk the chain from the first entry; report the first one that does not fit."""
    previous, count = GENESIS, 0
    for expected_seq, entry in enumerate(entries, start=1):
        if entry.seq != expected_seq:
            return ChainReport(False, count, entry.seq, f"expected entry {expected_seq}", previous)
        if not isinstance(entry.mac, bytes) or not hmac.compare_digest(
            entry_mac(mac, previous, entry.seq, entry.event), entry.mac
        ):
            return ChainReport(False, count, entry.seq, "MAC does not match", previous)
        previous, count = entry.mac, count + 1
    return ChainReport(True, count, head_mac=previous)


def head_mac(mac: Mac, seq: int, last_mac: bytes, registry: bytes) -> bytes:
    return mac(cbor2.dumps([HEAD_DOMAIN, seq, last_mac, registry], canonical=True))


def sealed_head(mac: Mac, seq: int, last_mac: bytes, registry: bytes) -> AuditHead:
    return AuditHead(seq, last_mac, registry, head_mac(mac, seq, last_mac, registry))


def head_verifies(mac: Mac, head: AuditHead | None) -> bool:
    # Checked before any other use of its fields: a forged row may hold any types.
    return (
        head is not None
        and isinstance(head.seq, int)
        and isinstance(head.last_mac, bytes)
        and isinstance(head.registry, bytes)
        and isinstance(head.mac, bytes)
        and hmac.compare_digest(head_mac(mac, head.seq, head.last_mac, head.registry), head.mac)
    )


def registry_matches(
    mac: Mac, head: AuditHead | None, newest_seq: int | None, rows_digest: bytes
) -> bool:
    """Whether the registry rows (their digest, registry_mac.registry_digest) are the ones a
    verified, current head records: what `audit verify` checks, for a reader that acts on the
    rows (the /token path's registry cache)."""
    return (
        head_is_current(mac, head, newest_seq)
        and head is not None
        and hmac.compare_digest(head.registry, rows_digest)
    )


def head_is_current(mac: Mac, head: AuditHead | None, newest_seq: int | None) -> bool:
    """Whether `head` verifies and is where the chain ends (its newest entry, `newest_seq`)."""
    return head_verifies(mac, head) and head is not None and head.seq == (newest_seq or 0)


# What the change feed gives for the registry while the audit head does not verify, or is not
# the end of the chain (a head put back, or its digest): no digest equals it, so every reader
# reloads the registry, and finds it untrusted (`registry_matches`).
UNVERIFIED_HEAD = b"unverified head"


def registry_signal(mac: Mac, head: AuditHead | None, newest_seq: int | None) -> bytes:
    """The change feed's registry value: the digest a verified, current head records, else
    UNVERIFIED_HEAD (b"" without a head). Readers reload when it moves; taking the stored
    digest unverified let a digest put back by hand, with the rows it names, hide a change
    from them (attack round 3, F1)."""
    if head is None:
        return b""
    if head_is_current(mac, head, newest_seq):
        return head.registry
    return UNVERIFIED_HEAD


def legacy_head_verifies(mac: Mac, seq: Any, last_mac: Any, stored: Any) -> bool:
    """A head as schema 3 sealed it (no registry digest); read only by the migration to 4."""
    return (
        isinstance(seq, int)
        and isinstance(last_mac, bytes)
        and isinstance(stored, bytes)
        and hmac.compare_digest(
            mac(cbor2.dumps([LEGACY_HEAD_DOMAIN, seq, last_mac], canonical=True)), stored
        )
    )


def append_plan(
    mac: Mac,
    head: AuditHead | None,
    newest: tuple[int, bytes] | None,
    events: Iterable[AuditEvent],
    registry: bytes | None = None,
) -> tuple[list[AuditEntry], AuditHead | None]:
    """The entries that record `events`, and the head to store after them (None: leave the
    stored head as it is). `registry` is the registry digest after a registry write that the
    events record (None: no registry write, the head keeps its digest).

    They continue from the head when it verifies and the log does not run past it, so entries
    removed from the end stay missing (a gap `audit verify` reports) instead of being papered
    over. A head that is missing, forged or behind the log is left alone for `audit verify` to
    report, and the entries continue from the newest one.
    """
    newest_seq, newest_mac = newest or (0, GENESIS)
    if head is not None and head_verifies(mac, head) and head.seq >= newest_seq:
        seq, previous, moves = head.seq, head.last_mac, True
        kept = head.registry
    else:
        seq, previous, moves, kept = newest_seq, newest_mac, False, GENESIS
    entries = []
    for event in events:
        seq += 1
        previous = entry_mac(mac, previous, seq, event)
        entries.append(AuditEntry(seq, event, previous))
    if not (moves and entries):
        return entries, None
    return entries, sealed_head(mac, seq, previous, kept if registry is None else registry)


def migration_plan(
    mac: Mac,
    newest: tuple[int, bytes] | None,
    from_version: int,
    to_version: int,
    now: int,
    registry: bytes,
) -> tuple[list[AuditEntry], AuditHead]:
    """A schema migration that brings in the head: the head starts at the newest entry, and
    the migration is recorded as the next one (so a store that kept no log before has one).
    `registry` is the digest of the registry rows as the migration sealed them."""
    seq, last_mac = newest or (0, GENESIS)
    event = AuditEvent(
        now,
        SERVICE_ACTOR,
        AuditName.STORE_MIGRATED,
        "schema",
        {"from": from_version, "to": to_version},
    )
    start = sealed_head(mac, seq, last_mac, registry)
    entries, head = append_plan(mac, start, newest, [event], registry)
    assert head is not None, "a head that was just sealed verifies"
    return entries, head


def reseal_plan(
    mac: Mac,
    legacy: tuple[Any, Any, Any] | None,
    newest: tuple[int, bytes] | None,
    now: int,
    registry: bytes,
    to_version: int,
) -> tuple[list[AuditEntry], AuditHead | None]:
    """The migration from schema 3 (to 4 and on, to `to_version`): the head (`legacy`: seq,
    last_mac, MAC as schema 3 sealed it) gains the registry digest, and the migration is
    recorded. A head that does not verify is not re-sealed (that would launder it): it stays
    for `audit verify` to report."""
    event = AuditEvent(
        now, SERVICE_ACTOR, AuditName.STORE_MIGRATED, "schema", {"from": 3, "to": to_version}
    )
    head = None
    if legacy is not None and legacy_head_verifies(mac, *legacy):
        head = sealed_head(mac, legacy[0], legacy[1], registry)
    return append_plan(mac, head, newest, [event], registry)


def upgrade_plan(
    mac: Mac,
    head: AuditHead | None,
    newest: tuple[int, bytes] | None,
    from_version: int,
    to_version: int,
    now: int,
) -> tuple[list[AuditEntry], AuditHead | None]:
    """A migration from a sealed schema (4 and on) that changes neither the registry nor the
    head: recorded as the next entry, like any other event (`append_plan`)."""
    event = AuditEvent(
        now,
        SERVICE_ACTOR,
        AuditName.STORE_MIGRATED,
        "schema",
        {"from": from_version, "to": to_version},
    )
    return append_plan(mac, head, newest, [event])


def verify_log(mac: Mac, snapshot: AuditSnapshot) -> ChainReport:
    """The chain from its genesis, and that it ends where its head says: a missing or forged
    head, entries removed from the end (or all of them), or an empty log in a store that holds
    data are all reported."""
    chain = verify_chain(mac, snapshot.entries)
    if not chain.ok:
        return chain
    count, head = chain.entries, snapshot.head

    def broken(at: int | None, reason: str) -> ChainReport:
        return ChainReport(False, count, at, reason, chain.head_mac)

    if head is None:
        return broken(None, "its head is missing (deleted outside coap-auth?)")
    if not head_verifies(mac, head):
        return broken(None, "its head does not verify (changed outside coap-auth?)")
    if head.seq > count:
        removed = f"all {head.seq} entries" if count == 0 else f"entries {count + 1}-{head.seq}"
        return broken(count + 1, f"{removed} removed; the head records {head.seq}")
    if head.seq < count:
        return broken(head.seq + 1, f"the log runs past its head ({head.seq}): head put back?")
    if not hmac.compare_digest(head.last_mac, chain.head_mac):
        return broken(count, "the newest entry is not the one the head records")
    if count == 0 and snapshot.holds_data:
        return broken(1, "the log is empty, but the store holds keys or registrations")
    if not hmac.compare_digest(head.registry, snapshot.registry):
        return broken(
            None,
            "the client and audience rows are not the ones its head records"
            " (a row put back to an older copy, or removed, outside coap-auth?)",
        )
    return chain


def key_events(
    before: Mapping[bytes, SigningKey], changed: Iterable[SigningKey], actor: str, now: int
) -> list[AuditEvent]:
    """The audit events of a key transition: one per created key and per state change."""
    events = []
    for key in changed:
        old = before.get(key.kid)
        details = {"family": key.family, "alg": key.alg.name, "state": key.state.value}
        if old is None:
            events.append(AuditEvent(now, actor, AuditName.KEY_CREATED, key.kid.hex(), details))
        elif old.state != key.state:
            events.append(AuditEvent(now, actor, _KEY_EVENTS[key.state], key.kid.hex(), details))
    return events
