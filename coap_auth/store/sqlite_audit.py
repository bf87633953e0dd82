"""The SQLite store's audit chain and change feed: appending to the chain in the caller's
transaction, reading it back (with what `audit verify` compares), and the change counters."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from coap_auth.store.audit import (
    AuditEntry,
    AuditEvent,
    AuditSnapshot,
    append_plan,
    registry_matches,
    registry_signal,
)
from coap_auth.store.records import ChangeCounters
from coap_auth.store.registry_mac import Mac
from coap_auth.store.rows import (
    ACCESS_STATE_QUERY,
    AUDIT_COLUMNS,
    FAMILY_STATE_QUERY,
    REMOVALS_QUERY,
    audit_entry_from_row,
    revocation_rows,
)
from coap_auth.store.sqlite_schema import (
    insert_entries,
    read_head,
    registry_digest_of,
    write_head,
)


class SqliteAudit:
    """The chain under the master key's audit MAC; every method runs in the caller's
    transaction (a write's, or a read's)."""

    def __init__(self, audit_mac: Mac) -> None:
        self._mac = audit_mac

    def change_counters(self, conn: sqlite3.Connection) -> ChangeCounters:
        """The change feed's counters and the verified audit head's registry digest
        (audit.registry_signal), in one read transaction."""
        row = conn.execute("SELECT counter, revocations FROM change_feed WHERE id = 1").fetchone()
        registry = registry_signal(self._mac, read_head(conn), _newest_seq(conn))
        return ChangeCounters(int(row["counter"]), int(row["revocations"]), registry)

    def registry_matches_head(self, conn: sqlite3.Connection) -> bool:
        """audit.registry_matches for the rows and head the transaction sees."""
        newest = _newest_seq(conn)
        return registry_matches(self._mac, read_head(conn), newest, registry_digest_of(conn))

    def append(
        self, conn: sqlite3.Connection, events: Iterable[AuditEvent], *, registry: bool = False
    ) -> None:
        """Append to the chain and move its head; `registry`: the transaction wrote a client
        or audience row, the head records the new digest."""
        events = list(events)
        if not events:
            return
        newest = conn.execute("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        last = None if newest is None else (newest["seq"], newest["mac"])
        digest = registry_digest_of(conn) if registry else None
        entries, head = append_plan(self._mac, read_head(conn), last, events, digest)
        insert_entries(conn, entries)
        if head is not None:
            write_head(conn, head, insert=False)


def entries(conn: sqlite3.Connection, last: int | None) -> list[AuditEntry]:
    """Every entry in order, or the last `last` ones."""
    if last is None:
        rows = conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
    else:
        rows = conn.execute(
            f"SELECT {AUDIT_COLUMNS} FROM"
            f" (SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (last,),
        )
    return [audit_entry_from_row(r) for r in rows]


def snapshot(conn: sqlite3.Connection) -> AuditSnapshot:
    """The chain, its head, the registry digest and the revocation state, as one read."""
    rows = conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq").fetchall()
    holds_data = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM signing_keys) OR EXISTS (SELECT 1 FROM clients)"
        " OR EXISTS (SELECT 1 FROM audiences) AS holds_data"
    ).fetchone()["holds_data"]
    revocation = revocation_rows(
        conn.execute(ACCESS_STATE_QUERY),
        conn.execute(FAMILY_STATE_QUERY),
        conn.execute(REMOVALS_QUERY),
    )
    return AuditSnapshot(
        tuple(audit_entry_from_row(r) for r in rows),
        read_head(conn),
        bool(holds_data),
        registry_digest_of(conn),
        revocation,
    )


def _newest_seq(conn: sqlite3.Connection) -> int | None:
    """The seq of the chain's newest entry (None: no entry)."""
    newest: int | None = conn.execute("SELECT MAX(seq) AS seq FROM audit_log").fetchone()["seq"]
    return newest


def bump_keys(conn: sqlite3.Connection) -> None:
    """Servers reload keys and rotation policies."""
    conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
