"""SQLite statements of the token revocation list (RFC 9770): revoking, numbering updates into
the whole list's history and each requester's update collection, reading them, sweeping.

Functions of a connection inside the caller's transaction (a writer holds the lock: BEGIN
IMMEDIATE), so numbering by MAX(seq) + 1 cannot race. What a sweep delists and forgets is
decided in coap_auth.store.decisions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

import cbor2

from coap_auth.store.decisions import AccessRecord, delistable, forgettable, updates_kept
from coap_auth.store.records import TrlUpdate
from coap_auth.store.rows import TRL_UPDATE_COLUMNS, trl_update_from_row
from coap_auth.store.trl_history import Owner, requester_rows

# RFC 9770 §5: the listed hashes pertaining to a requester, of tokens issued to it (a client)
# or for it (an audience). Each arm reads one partial index of listed tokens.
_LISTED_FOR = (
    "SELECT token_hash, revoked_at FROM access_tokens"
    " WHERE client_id = ?1 AND revoked_at IS NOT NULL AND delisted_at IS NULL"
    " UNION SELECT token_hash, revoked_at FROM access_tokens"
    " WHERE audience = ?1 AND revoked_at IS NOT NULL AND delisted_at IS NULL"
    " ORDER BY revoked_at, token_hash"
)
_LISTED = (
    "SELECT token_hash FROM access_tokens WHERE revoked_at IS NOT NULL AND delisted_at IS NULL"
    " ORDER BY revoked_at, token_hash"
)
_BOUNDS = "SELECT COALESCE(MIN(seq), 0) AS first, COALESCE(MAX(seq), 0) AS last FROM trl_updates"
_BOUNDS_FOR = (
    "SELECT COALESCE(MIN(seq), 0) AS first, COALESCE(MAX(seq), 0) AS last"
    " FROM trl_requester_updates WHERE requester = ?"
)
# Numbered after the requester's newest row, which pruning always keeps.
_APPEND_FOR = (
    "INSERT INTO trl_requester_updates (requester, seq, trl_seq, at, removed, added)"
    " SELECT ?1, COALESCE(MAX(seq), 0) + 1, ?2, ?3, ?4, ?5 FROM trl_requester_updates"
    " WHERE requester = ?1"
)
# An access_tokens row as the decisions read it (decisions.AccessRecord).
ACCESS_COLUMNS = "token_hash, family_id, client_id, audience, exp, revoked_at, delisted_at"


def access_records(rows: Iterable[sqlite3.Row]) -> list[AccessRecord]:
    """Rows of ACCESS_COLUMNS, by name."""
    return [
        AccessRecord(
            token_hash=r["token_hash"],
            family_id=r["family_id"],
            client_id=r["client_id"],
            audience=r["audience"],
            exp=r["exp"],
            revoked_at=r["revoked_at"],
            delisted_at=r["delisted_at"],
        )
        for r in rows
    ]


def revoke(conn: sqlite3.Connection, owners: Mapping[bytes, Owner], now: int) -> list[bytes]:
    """Revoke those of these access tokens (hash to its client and audience) not revoked
    yet, in one TRL update; returns them. (No UPDATE ... RETURNING: it needs SQLite 3.35,
    newer than some hosts.)"""
    revoked = sorted(
        h
        for h in owners
        if conn.execute(
            "UPDATE access_tokens SET revoked_at = ? WHERE token_hash = ? AND revoked_at IS NULL",
            (now, h),
        ).rowcount
    )
    if revoked:
        record_update(conn, now, removed=[], added=revoked, owners=owners)
    return revoked


def record_update(
    conn: sqlite3.Connection,
    now: int,
    *,
    removed: list[bytes],
    added: list[bytes],
    owners: Mapping[bytes, Owner],
) -> None:
    """One TRL update: the next row of the whole list's history, and the next series item of
    each requester it pertains to (RFC 9770 §6.2); observers hear of it by the counter."""
    trl_seq = conn.execute(
        "INSERT INTO trl_updates (at, removed, added) VALUES (?, ?, ?)",
        (now, cbor2.dumps(removed), cbor2.dumps(added)),
    ).lastrowid
    assert trl_seq is not None
    conn.executemany(_APPEND_FOR, requester_rows(trl_seq, now, removed, added, owners))
    conn.execute("UPDATE change_feed SET revocations = revocations + 1 WHERE id = 1")


def read_trl(conn: sqlite3.Connection, requester: str | None) -> tuple[list[bytes], int, int]:
    if requester is None:
        hashes = [r["token_hash"] for r in conn.execute(_LISTED)]
    else:
        hashes = [r["token_hash"] for r in conn.execute(_LISTED_FOR, (requester,))]
    first, last = read_bounds(conn, requester)
    return hashes, first, last


def read_bounds(conn: sqlite3.Connection, requester: str | None) -> tuple[int, int]:
    if requester is None:
        row = conn.execute(_BOUNDS).fetchone()
    else:
        row = conn.execute(_BOUNDS_FOR, (requester,)).fetchone()
    return int(row["first"]), int(row["last"])


def read_updates(
    conn: sqlite3.Connection, first_seq: int, last_seq: int, requester: str | None
) -> list[TrlUpdate]:
    if requester is None:
        rows = conn.execute(
            f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_updates WHERE seq BETWEEN ? AND ?"
            " ORDER BY seq DESC",
            (first_seq, last_seq),
        )
    else:
        rows = conn.execute(
            f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_requester_updates"
            " WHERE requester = ? AND seq BETWEEN ? AND ? ORDER BY seq DESC",
            (requester, first_seq, last_seq),
        )
    return [trl_update_from_row(r) for r in rows]


def read_changes_since(conn: sqlite3.Connection, trl_seq: int | None) -> tuple[frozenset[str], int]:
    newest = int(
        conn.execute("SELECT COALESCE(MAX(seq), 0) AS newest FROM trl_updates").fetchone()["newest"]
    )
    if trl_seq is None or trl_seq >= newest:
        return frozenset(), newest
    rows = conn.execute(
        "SELECT DISTINCT requester FROM trl_requester_updates WHERE trl_seq > ?", (trl_seq,)
    )
    return frozenset(r["requester"] for r in rows), newest


def next_expiry(conn: sqlite3.Connection) -> int | None:
    """The earliest exp among listed hashes."""
    row = conn.execute(
        "SELECT MIN(exp) AS exp FROM access_tokens"
        " WHERE revoked_at IS NOT NULL AND delisted_at IS NULL"
    ).fetchone()
    return None if row["exp"] is None else int(row["exp"])


def sweep(conn: sqlite3.Connection, now: int, keep_updates: int) -> int:
    """Delist and forget what the decisions say, prune the histories; how many delisted."""
    # Candidates by the exp index. A delisted row is done with (neither decision takes it):
    # left out here so a sweep does not rebuild every token ever revoked.
    records = access_records(
        conn.execute(
            f"SELECT {ACCESS_COLUMNS} FROM access_tokens WHERE exp <= ? AND delisted_at IS NULL",
            (now,),
        )
    )
    delisted = delistable(records, now)
    if delisted:
        conn.executemany(
            "UPDATE access_tokens SET delisted_at = ? WHERE token_hash = ?",
            [(now, h) for h in delisted],
        )
        record_update(conn, now, removed=list(delisted), added=[], owners=delisted)
    conn.executemany(
        "DELETE FROM access_tokens WHERE token_hash = ?", [(h,) for h in forgettable(records, now)]
    )
    keep = updates_kept(keep_updates)
    conn.execute(
        "DELETE FROM trl_updates WHERE seq <= (SELECT MAX(seq) FROM trl_updates) - ?", (keep,)
    )
    conn.execute(
        "DELETE FROM trl_requester_updates WHERE seq <= (SELECT MAX(m.seq)"
        " FROM trl_requester_updates m WHERE m.requester = trl_requester_updates.requester) - ?",
        (keep,),
    )
    return len(delisted)
