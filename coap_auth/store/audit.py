"""The audit log's shape and its hash chain, shared by every Store implementation.

Each entry's MAC covers its own fields and the previous entry's MAC, keyed by a key derived
from the master key (kept outside the database): editing, reordering or removing any entry but
the newest breaks the chain, and someone with only the database cannot forge a new one.
Removing the newest entries leaves a shorter valid chain: only a head recorded elsewhere (as
`audit verify` prints it) shows that.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from coap_auth.keys import SigningKey

GENESIS = bytes(32)

# The state a key moved into, as the event name that records it.
_KEY_EVENTS = {
    "active": "key.activated",
    "retiring": "key.retired",
    "removed": "key.removed",
    "revoked": "key.revoked",
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
    # The first entry that does not verify, and why.
    broken_at: int | None = None
    reason: str | None = None
    head_mac: bytes = GENESIS


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
        if not hmac.compare_digest(entry_mac(mac, previous, entry.seq, entry.event), entry.mac):
            return ChainReport(False, count, entry.seq, "MAC does not match", previous)
        previous, count = entry.mac, count + 1
    return ChainReport(True, count, head_mac=previous)


def key_events(
    before: Mapping[bytes, SigningKey], changed: Iterable[SigningKey], actor: str, now: int
) -> list[AuditEvent]:
    """The audit events of a key transition: one per created key and per state change."""
    events = []
    for key in changed:
        old = before.get(key.kid)
        details = {"family": key.family, "alg": key.alg.name, "state": key.state.value}
        if old is None:
            events.append(AuditEvent(now, actor, "key.created", key.kid.hex(), details))
        elif old.state != key.state:
            events.append(AuditEvent(now, actor, _KEY_EVENTS[key.state], key.kid.hex(), details))
    return events
