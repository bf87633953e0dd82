"""PostgreSQL statements of the token revocation list (RFC 9770): numbering updates into the
whole list's history and each requester's update collection, reading them, pruning.

Functions of a connection inside the caller's transaction. Writers hold the TRL advisory lock
(postgres_base's lock order), so numbering by MAX(seq) + 1 cannot race and updates become
visible in the order of their numbers; readers take one repeatable-read snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

from coap_auth.store.records import TrlUpdate
from coap_auth.store.rows import TRL_UPDATE_COLUMNS, trl_update_from_row
from coap_auth.store.trl_history import Owner, requester_rows

Conn = Any  # an asyncpg connection

# RFC 9770 §5: the listed hashes pertaining to a requester, of tokens issued to it (a client)
# or for it (an audience). Each arm reads one partial index of listed tokens.
_LISTED_FOR = (
    "SELECT token_hash, revoked_at FROM access_tokens"
    " WHERE client_id = $1 AND revoked_at IS NOT NULL AND delisted_at IS NULL"
    " UNION SELECT token_hash, revoked_at FROM access_tokens"
    " WHERE audience = $1 AND revoked_at IS NOT NULL AND delisted_at IS NULL"
    " ORDER BY revoked_at, token_hash"
)
_LISTED = (
    "SELECT token_hash FROM access_tokens WHERE revoked_at IS NOT NULL AND delisted_at IS NULL"
    " ORDER BY revoked_at, token_hash"
)
_BOUNDS = "SELECT COALESCE(MIN(seq), 0) AS first, COALESCE(MAX(seq), 0) AS last FROM trl_updates"
_BOUNDS_FOR = (
    "SELECT COALESCE(MIN(seq), 0) AS first, COALESCE(MAX(seq), 0) AS last"
    " FROM trl_requester_updates"
    " WHERE requester = $1"
)
# One statement for every requester of an update, each numbered after its newest row (which
# pruning always keeps).
_APPEND_FOR = (
    "INSERT INTO trl_requester_updates (requester, seq, trl_seq, at, removed, added)"
    " SELECT u.requester, COALESCE((SELECT MAX(m.seq) FROM trl_requester_updates m"
    " WHERE m.requester = u.requester), 0) + 1, $2, $3, u.removed, u.added"
    " FROM unnest($1::text[], $4::bytea[], $5::bytea[]) AS u (requester, removed, added)"
)


async def record_update(
    conn: Conn,
    now: int,
    *,
    removed: list[bytes],
    added: list[bytes],
    owners: Mapping[bytes, Owner],
) -> None:
    """One TRL update, the caller holding the TRL lock: the next row of the whole list's
    history, and the next series item of each requester it pertains to (RFC 9770 §6.2)."""
    trl_seq = await conn.fetchval(
        "INSERT INTO trl_updates SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3 FROM trl_updates"
        " RETURNING seq",
        now,
        cbor2.dumps(removed),
        cbor2.dumps(added),
    )
    rows = requester_rows(trl_seq, now, removed, added, owners)
    if rows:
        await conn.execute(
            _APPEND_FOR,
            [r[0] for r in rows],
            trl_seq,
            now,
            [r[3] for r in rows],
            [r[4] for r in rows],
        )


async def read_trl(conn: Conn, requester: str | None) -> tuple[list[bytes], int, int]:
    if requester is None:
        rows = await conn.fetch(_LISTED)
    else:
        rows = await conn.fetch(_LISTED_FOR, requester)
    first, last = await read_bounds(conn, requester)
    return [bytes(r["token_hash"]) for r in rows], first, last


async def read_bounds(conn: Conn, requester: str | None) -> tuple[int, int]:
    if requester is None:
        row = await conn.fetchrow(_BOUNDS)
    else:
        row = await conn.fetchrow(_BOUNDS_FOR, requester)
    return int(row["first"]), int(row["last"])


async def read_updates(
    conn: Conn, first_seq: int, last_seq: int, requester: str | None
) -> list[TrlUpdate]:
    if requester is None:
        rows = await conn.fetch(
            f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_updates WHERE seq BETWEEN $1 AND $2"
            " ORDER BY seq DESC",
            first_seq,
            last_seq,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_requester_updates"
            " WHERE requester = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq DESC",
            requester,
            first_seq,
            last_seq,
        )
    return [trl_update_from_row(r) for r in rows]


async def read_changes_since(conn: Conn, trl_seq: int | None) -> tuple[frozenset[str], int]:
    newest = int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM trl_updates"))
    if trl_seq is None or trl_seq >= newest:
        return frozenset(), newest
    rows = await conn.fetch(
        "SELECT DISTINCT requester FROM trl_requester_updates WHERE trl_seq > $1", trl_seq
    )
    return frozenset(r["requester"] for r in rows), newest


async def prune(conn: Conn, keep: int) -> None:
    """Keep the last `keep` rows of each history (decisions.updates_kept: at least its newest,
    which the next is numbered after)."""
    await conn.execute(
        "DELETE FROM trl_updates WHERE seq <= (SELECT MAX(seq) FROM trl_updates) - $1", keep
    )
    await conn.execute(
        "DELETE FROM trl_requester_updates t WHERE seq <= (SELECT MAX(m.seq)"
        " FROM trl_requester_updates m WHERE m.requester = t.requester) - $1",
        keep,
    )
