"""PostgreSQL records of issued access tokens and the revocation list (RFC 9770) built on them:
revoking, reading the TRL, and the sweep that delists and forgets expired tokens.

What to revoke, delist or forget is decided in coap_auth.store.decisions from rows read here;
the TRL's statements are in postgres_trl. Access rows are locked in token_hash order before the
TRL lock (postgres_database's lock order).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from coap_auth.store.decisions import (
    AccessRecord,
    delistable,
    forgettable,
    may_revoke,
    revocation_event,
    updates_kept,
)
from coap_auth.store.postgres_database import Change, Conn, PostgresDatabase
from coap_auth.store.postgres_trl import (
    prune,
    read_bounds,
    read_changes_since,
    read_trl,
    read_updates,
    record_update,
)
from coap_auth.store.records import TokenStatus, TrlUpdate
from coap_auth.store.trl_history import Owner

# An access_tokens row as decisions.AccessRecord reads it.
ACCESS_COLUMNS = "token_hash, family_id, client_id, audience, exp, revoked_at, delisted_at"


def access_record(row: Mapping[str, Any]) -> AccessRecord:
    family_id = row["family_id"]
    return AccessRecord(
        token_hash=bytes(row["token_hash"]),
        family_id=None if family_id is None else bytes(family_id),
        client_id=row["client_id"],
        audience=row["audience"],
        exp=row["exp"],
        revoked_at=row["revoked_at"],
        delisted_at=row["delisted_at"],
    )


async def access_records(
    conn: Conn, where: str, *args: Any, lock: bool = False
) -> list[AccessRecord]:
    """The access rows `where` selects, in token_hash order; `lock`: FOR UPDATE, in that
    order (the lock order of access rows)."""
    rows = await conn.fetch(
        f"SELECT {ACCESS_COLUMNS} FROM access_tokens WHERE {where} ORDER BY token_hash"
        + (" FOR UPDATE" if lock else ""),
        *args,
    )
    return [access_record(r) for r in rows]


class PostgresRevocations:
    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def revoke(self, conn: Conn, chosen: Mapping[bytes, Owner], now: int) -> list[bytes]:
        """Put these tokens (hash to owner, as decisions.revocable chose them from rows the
        caller has locked, in token_hash order) on the TRL, in one update; returns them."""
        if not chosen:
            return []
        hashes = sorted(chosen)
        await conn.execute(
            "UPDATE access_tokens SET revoked_at = $1 WHERE token_hash = ANY($2)", now, hashes
        )
        await self._update(conn, now, removed=[], added=hashes, owners=chosen)
        return hashes

    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        async def revoke(conn: Conn) -> bool:
            found = await access_records(conn, "token_hash = $1", token_hash, lock=True)
            record = found[0] if found else None
            if record is None or not may_revoke(record, client_id, now):
                return False
            await self.revoke(conn, {record.token_hash: record.owner}, now)
            await self._db.audit(conn, [revocation_event(record, actor, now)])
            return True

        return await self._db.transaction(revoke)

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        rows = await self._db.fetch(
            "SELECT revoked_at FROM access_tokens WHERE token_hash = $1", token_hash
        )
        if not rows:
            return None
        return TokenStatus.LIVE if rows[0]["revoked_at"] is None else TokenStatus.REVOKED

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        # bytea compares bytewise, as the protocol says.
        rows = await self._db.fetch(
            "SELECT token_hash FROM access_tokens WHERE token_hash BETWEEN $1 AND $2"
            " ORDER BY token_hash LIMIT $3",
            low,
            high,
            limit,
        )
        return [bytes(r["token_hash"]) for r in rows]

    async def is_revoked(self, token_hash: bytes) -> bool:
        return await self.token_status(token_hash) is TokenStatus.REVOKED

    # -- the TRL -------------------------------------------------------------------------------

    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        async with self._db.snapshot() as conn:
            return await read_trl(conn, requester)

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        async with self._db.connection() as conn:
            return await read_bounds(conn, requester)

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        async with self._db.connection() as conn:
            return await read_updates(conn, first_seq, last_seq, requester)

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        async with self._db.snapshot() as conn:
            return await read_changes_since(conn, trl_seq)

    async def next_trl_expiry(self) -> int | None:
        rows = await self._db.fetch(
            "SELECT MIN(exp) AS exp FROM access_tokens WHERE revoked_at IS NOT NULL"
            " AND delisted_at IS NULL"
        )
        exp = rows[0]["exp"]
        return None if exp is None else int(exp)

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        async def sweep(conn: Conn) -> int:
            # Candidates by the exp index, decided in decisions; the rows to forget are locked
            # (token_hash order, before the TRL lock) and decided again as locked, since a
            # kill may have revoked one meanwhile.
            # (Not delisted: those stay, and neither decision would pick one; without it every
            # token ever revoked would be read again at every sweep.)
            candidates = "exp <= $1 AND delisted_at IS NULL"
            forget = forgettable(await access_records(conn, candidates, now), now)
            if forget:
                locked = await access_records(conn, "token_hash = ANY($1)", forget, lock=True)
                forget = forgettable(locked, now)
                await conn.execute("DELETE FROM access_tokens WHERE token_hash = ANY($1)", forget)
            # Under the TRL lock no revocation can change the rows read next; the rows
            # delisted are revoked and committed, and nothing but a sweep (under this lock)
            # writes them again.
            await self._db.lock(conn, self._db.locks.trl)
            expired = delistable(await access_records(conn, candidates, now), now)
            if expired:
                await conn.execute(
                    "UPDATE access_tokens SET delisted_at = $1 WHERE token_hash = ANY($2)",
                    now,
                    list(expired),
                )
                await self._update(conn, now, removed=list(expired), added=[], owners=expired)
            await prune(conn, updates_kept(keep_updates))
            return len(expired)

        return await self._db.transaction(sweep)

    async def _update(
        self,
        conn: Conn,
        now: int,
        *,
        removed: Iterable[bytes],
        added: Iterable[bytes],
        owners: Mapping[bytes, Owner],
    ) -> None:
        # Numbered under a lock, so updates become visible in the order of their numbers.
        await self._db.lock(conn, self._db.locks.trl)
        await record_update(conn, now, removed=list(removed), added=list(added), owners=owners)
        await self._db.notify(conn, Change.REVOCATIONS)
