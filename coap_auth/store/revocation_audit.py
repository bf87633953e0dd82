"""Revocations cross-checked against the audit log: what the log says was revoked or killed,
as one consistent read of the token tables, and the pure comparison `audit verify` runs.

Someone with only the database can clear `revoked_at`, delist a hash or add a TRL update
removing it, and so put a revoked token back in service; the log, MACed under the master key,
still says it was revoked. An access token whose exp has not passed stays revoked and listed
until it expires (RFC 9770 §5.1), and a killed refresh family stays dead, so any difference is
tampering. Entries written before the exp and the family's token hashes were recorded
(`token.revoked` without `exp`, `family.killed` without `access_tokens`) are checked against
the exp and family the row itself holds, which the same person could have changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2

if TYPE_CHECKING:
    from coap_auth.store.audit import AuditEntry

# How much of a token hash or family id a problem line shows: enough to find the row.
PREFIX_HEX = 16


@dataclass(frozen=True, slots=True)
class AccessRow:
    """An `access_tokens` row as read: types unchecked, a forged row may hold anything."""

    token_hash: bytes
    family_id: Any
    exp: Any
    revoked_at: Any
    delisted_at: Any


@dataclass(frozen=True, slots=True)
class RevocationRows:
    """The revocation state as one read: access token rows, each family's `killed_at`, and
    each stored TRL update's `removed` (CBOR, as stored)."""

    access: tuple[AccessRow, ...] = ()
    families: tuple[tuple[bytes, Any], ...] = ()
    removals: tuple[tuple[int, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class RevocationReport:
    tokens: int  # revoked access tokens the log names, still unexpired
    families: int  # killed families the log names
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return (
            f"revocations match the audit log: {self.tokens} unexpired revoked tokens,"
            f" {self.families} killed families"
        )


@dataclass(slots=True)
class _Logged:
    seq: int
    exp: int | None  # None: an entry from before the exp was recorded


def _hex_bytes(text: Any) -> bytes | None:
    try:
        return bytes.fromhex(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _exp(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _removed_by(rows: RevocationRows) -> tuple[dict[bytes, list[int]], list[str]]:
    removed: dict[bytes, list[int]] = {}
    problems = []
    for seq, blob in rows.removals:
        try:
            hashes = cbor2.loads(blob)
            if not isinstance(hashes, list):
                raise ValueError("not a list")
        except Exception:  # a forged row may hold anything
            problems.append(f"TRL update {seq} does not decode (changed outside coap-auth?)")
            continue
        for h in hashes:
            if isinstance(h, bytes):
                removed.setdefault(h, []).append(seq)
    return removed, problems


def revocation_report(
    entries: Iterable[AuditEntry], rows: RevocationRows, now: int
) -> RevocationReport:
    """Every access token the (verified) `entries` say was revoked and whose exp has not
    passed must be revoked, listed, and removed by no TRL update; every family they say was
    killed must be dead, and its unexpired access tokens revoked when the kill revoked them."""
    tokens: dict[bytes, _Logged] = {}
    killed: dict[bytes, tuple[int, bool]] = {}  # family id -> (seq, its tokens were revoked)
    for entry in entries:
        event = entry.event
        if event.event == "token.revoked":
            token_hash = _hex_bytes(event.subject)
            if token_hash is not None:
                tokens[token_hash] = _Logged(entry.seq, _exp(event.details.get("exp")))
        elif event.event == "family.killed":
            family_id = _hex_bytes(event.subject)
            if family_id is None:
                continue
            revoked_access = "revoked_access_tokens" in event.details
            killed[family_id] = (entry.seq, revoked_access)
            listed = event.details.get("access_tokens")
            if isinstance(listed, Mapping):
                for text, exp in listed.items():
                    token_hash = _hex_bytes(text)
                    if token_hash is not None:
                        tokens[token_hash] = _Logged(entry.seq, _exp(exp))

    access = {row.token_hash: row for row in rows.access}
    # Old family kills name no hashes: their unexpired tokens are found by the row's family.
    for listed in rows.access:
        kill = killed.get(listed.family_id) if isinstance(listed.family_id, bytes) else None
        if kill is not None and kill[1] and listed.token_hash not in tokens:
            tokens[listed.token_hash] = _Logged(kill[0], None)
    removed_by, problems = _removed_by(rows)

    unexpired = 0
    for token_hash, logged in sorted(tokens.items(), key=lambda item: item[1].seq):
        row = access.get(token_hash)
        exp = logged.exp if logged.exp is not None else _exp(row.exp if row else None)
        if exp is not None and exp <= now:
            continue  # expired: delisted by the sweep, and refused on its exp anyway
        unexpired += 1
        faults = []
        if row is None:
            faults.append("its record is gone")  # revoked rows are never deleted
        elif exp is None:
            faults.append("its record's exp does not read")
        else:
            if row.revoked_at is None:
                faults.append("it is not revoked in access_tokens")
            elif row.delisted_at is not None:
                faults.append("it is delisted from the TRL")
        faults += [f"TRL update {seq} removes it" for seq in removed_by.get(token_hash, [])]
        if faults:
            problems.append(
                f"revocation undone: access token {token_hash.hex()[:PREFIX_HEX]}..."
                f" revoked by audit entry {logged.seq}"
                + ("" if exp is None else f" (exp {exp})")
                + ": "
                + "; ".join(faults)
            )

    families = dict(rows.families)
    for family_id, (seq, _) in sorted(killed.items(), key=lambda item: item[1][0]):
        if family_id not in families:
            fault = "its record is gone"
        elif families[family_id] is None:
            fault = "it is alive again (killed_at cleared)"
        else:
            continue
        problems.append(
            f"revocation undone: refresh family {family_id.hex()[:PREFIX_HEX]}..."
            f" killed by audit entry {seq}: {fault}"
        )
    return RevocationReport(unexpired, len(killed), tuple(problems))
