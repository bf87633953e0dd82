"""PostgreSQL tables of issued tokens: refresh families (row locks serialise every change
of a family) and the revocation list (updates numbered under an advisory lock; the statements
are in postgres_trl).

Locks follow the order in postgres_base: family rows, refresh-token rows, access-token rows
(in token_hash order), the TRL lock, the change_feed row, the audit lock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import cbor2

from coap_auth.store.audit import AuditEvent
from coap_auth.store.base import Mint, TokenStatus
from coap_auth.store.postgres_base import Conn, PostgresBase
from coap_auth.store.postgres_trl import (
    prune,
    read_bounds,
    read_changes_since,
    read_trl,
    read_updates,
    record_update,
)
from coap_auth.store.records import IssuedAccess, RefreshFamily, RefreshOutcome, TrlUpdate
from coap_auth.store.rows import family_from_row, family_kill_events
from coap_auth.store.trl_history import Owner


class PostgresTokenTables(PostgresBase):
    # -- refresh families ------------------------------------------------------------------

    async def start_family(
        self, family: RefreshFamily, refresh_digest: bytes, access: IssuedAccess
    ) -> None:
        cnf = None if family.cnf is None else cbor2.dumps(family.cnf)

        async def start(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO refresh_families VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL)",
                family.family_id,
                family.client_id,
                family.audience,
                family.scope,
                cnf,
                family.created_at,
                family.last_used_at,
                family.expires_at,
            )
            await conn.execute(
                "INSERT INTO refresh_tokens VALUES ($1, $2, $3, NULL, NULL)",
                refresh_digest,
                family.family_id,
                family.created_at,
            )
            await _record_access(conn, access, family.family_id)

        await self._in_tx(start)

    async def rotate_refresh(
        self,
        refresh_digest: bytes,
        successor_digest: bytes,
        *,
        client_id: str,
        now: int,
        grace: int,
        idle_timeout: int,
        mint: Mint,
    ) -> RefreshOutcome:
        async def rotate(conn: Conn) -> RefreshOutcome:
            # The family row is locked first, then the token: every path that changes a
            # family (refresh, kill) takes its row lock, so racers queue here.
            family_id = await conn.fetchval(
                "SELECT family_id FROM refresh_tokens WHERE digest = $1", refresh_digest
            )
            if family_id is None:
                return RefreshOutcome("unknown")
            family = family_from_row(
                await conn.fetchrow(
                    "SELECT * FROM refresh_families WHERE family_id = $1 FOR UPDATE", family_id
                )
            )
            token = await conn.fetchrow(
                "SELECT spent_at, successor FROM refresh_tokens WHERE digest = $1 FOR UPDATE",
                refresh_digest,
            )
            spent_at, successor = token[0], token[1]
            if family.client_id != client_id:
                return RefreshOutcome("unknown")
            if family.killed_at is not None:
                return RefreshOutcome("dead", family)
            if now >= family.expires_at or now - family.last_used_at >= idle_timeout:
                # Expiry is not theft: the family ends, its access tokens live out their time.
                await self._kill(conn, [family], "expired", now, "service", revoke_access=False)
                return RefreshOutcome("expired", family)
            status = "rotated"
            if spent_at is not None:
                successor_unused = successor is not None and await conn.fetchval(
                    "SELECT 1 FROM refresh_tokens WHERE digest = $1 AND spent_at IS NULL",
                    successor,
                )
                if now - spent_at >= grace or not successor_unused:
                    # RFC 9700 §4.14.2: reuse of a spent refresh token means theft.
                    await self._kill(conn, [family], "refresh token reused", now, "service")
                    return RefreshOutcome("reused", family)
                # A device whose response was lost: its successor is replaced, not kept live.
                await conn.execute(
                    "UPDATE refresh_tokens SET spent_at = $1 WHERE digest = $2", now, successor
                )
                status = "grace"
            access = mint(family)
            await conn.execute(
                "UPDATE refresh_tokens SET spent_at = COALESCE(spent_at, $1), successor = $2"
                " WHERE digest = $3",
                now,
                successor_digest,
                refresh_digest,
            )
            await conn.execute(
                "INSERT INTO refresh_tokens VALUES ($1, $2, $3, NULL, NULL)",
                successor_digest,
                family.family_id,
                now,
            )
            await conn.execute(
                "UPDATE refresh_families SET last_used_at = $1 WHERE family_id = $2",
                now,
                family.family_id,
            )
            await _record_access(conn, access, family.family_id)
            return RefreshOutcome(status, family)  # type: ignore[arg-type]

        # A kill inside the transaction must survive the outcome being "reused": it commits.
        return await self._in_tx(rotate)

    async def kill_families(
        self, client_id: str, reason: str, now: int, actor: str = "operator"
    ) -> int:
        async def kill(conn: Conn) -> int:
            families = await self._unkilled_families(conn, "client_id", client_id)
            # All of them in one go: one TRL update, and every access row locked before the
            # TRL lock (killing them one by one deadlocks with a concurrent revoke_access).
            await self._kill(conn, families, reason, now, actor)
            return len(families)

        return await self._in_tx(kill)

    async def _unkilled_families(self, conn: Conn, column: str, value: str) -> list[RefreshFamily]:
        """Unkilled families of one client or one audience (`column`), locked in family_id
        order; also those past their own expiry, since a token refreshed just before it
        outlives them."""
        assert column in ("client_id", "audience")
        rows = await conn.fetch(
            f"SELECT * FROM refresh_families WHERE {column} = $1 AND killed_at IS NULL"
            " ORDER BY family_id FOR UPDATE",
            value,
        )
        return [family_from_row(r) for r in rows]

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        async def kill(conn: Conn) -> bool:
            row = await conn.fetchrow(
                "SELECT f.* FROM refresh_tokens t JOIN refresh_families f USING (family_id)"
                " WHERE t.digest = $1 AND f.client_id = $2 AND f.killed_at IS NULL"
                " FOR UPDATE OF f",
                refresh_digest,
                client_id,
            )
            if row is None:
                return False
            await self._kill(conn, [family_from_row(row)], reason, now, "service")
            return True

        return await self._in_tx(kill)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        if client_id is None:
            rows = await self._read(
                "SELECT * FROM refresh_families WHERE killed_at IS NULL AND expires_at > $1"
                " ORDER BY created_at, family_id",
                now,
            )
        else:
            rows = await self._read(
                "SELECT * FROM refresh_families WHERE killed_at IS NULL AND expires_at > $1"
                " AND client_id = $2 ORDER BY created_at, family_id",
                now,
                client_id,
            )
        return [family_from_row(r) for r in rows]

    async def _kill(
        self,
        conn: Conn,
        families: list[RefreshFamily],
        reason: str,
        now: int,
        actor: str,
        *,
        revoke_access: bool = True,
    ) -> None:
        """Kill these families, whose rows the caller has locked: no refresh token of them
        works again; unless told otherwise, their unexpired access tokens are revoked, all
        in one TRL update."""
        if not families:
            return
        family_ids = [f.family_id for f in families]
        await conn.execute(
            "UPDATE refresh_families SET killed_at = $1, kill_reason = $2"
            " WHERE family_id = ANY($3)",
            now,
            reason,
            family_ids,
        )
        await conn.execute(
            "UPDATE refresh_tokens SET spent_at = $1"
            " WHERE family_id = ANY($2) AND spent_at IS NULL",
            now,
            family_ids,
        )
        revoked: dict[bytes, dict[bytes, int]] = {family_id: {} for family_id in family_ids}
        if revoke_access:
            # Every access row first, in token_hash order, then the TRL lock (in _revoke).
            rows = await conn.fetch(
                "SELECT token_hash, family_id, exp FROM access_tokens WHERE family_id = ANY($1)"
                " AND revoked_at IS NULL AND exp > $2 ORDER BY token_hash FOR UPDATE",
                family_ids,
                now,
            )
            selected = {r[0]: (r[1], r[2]) for r in rows}
            for h in await self._revoke(conn, list(selected), now):
                family_id, exp = selected[h]
                revoked[family_id][h] = exp
        tokens = revoked if revoke_access else None
        await self._audit(conn, family_kill_events(families, tokens, reason, actor, now))

    # -- revocation (RFC 9770 TRL) -------------------------------------------------------------

    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        async def revoke(conn: Conn) -> bool:
            row = await conn.fetchrow(
                "SELECT client_id, exp FROM access_tokens WHERE token_hash = $1"
                " AND revoked_at IS NULL AND exp > $2 FOR UPDATE",
                token_hash,
                now,
            )
            if row is None or (client_id is not None and row[0] != client_id):
                return False
            if not await self._revoke(conn, [token_hash], now):
                return False
            # The exp lets `audit verify` tell a token delisted early from one that expired.
            details = {"client_id": row[0], "exp": row[1]}
            event = AuditEvent(now, actor, "token.revoked", token_hash.hex(), details)
            await self._audit(conn, [event])
            return True

        return await self._in_tx(revoke)

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        rows = await self._read(
            "SELECT revoked_at FROM access_tokens WHERE token_hash = $1", token_hash
        )
        if not rows:
            return None
        return "live" if rows[0][0] is None else "revoked"

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        # bytea compares bytewise, as the protocol says.
        rows = await self._read(
            "SELECT token_hash FROM access_tokens WHERE token_hash BETWEEN $1 AND $2"
            " ORDER BY token_hash LIMIT $3",
            low,
            high,
            limit,
        )
        return [bytes(r[0]) for r in rows]

    async def is_revoked(self, token_hash: bytes) -> bool:
        return await self.token_status(token_hash) == "revoked"

    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        async with self._snapshot() as conn:
            return await read_trl(conn, requester)

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        async with self._connection() as conn:
            return await read_bounds(conn, requester)

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        async with self._connection() as conn:
            return await read_updates(conn, first_seq, last_seq, requester)

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        async with self._snapshot() as conn:
            return await read_changes_since(conn, trl_seq)

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[Conn]:
        """A connection in one read-only, repeatable-read transaction: reads that agree."""
        async with (
            self._connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield conn

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        async def sweep(conn: Conn) -> int:
            # Records of tokens that expired unrevoked are not needed for anything. Their rows
            # are locked like every other path's access rows: in token_hash order, before the
            # TRL lock.
            await conn.execute(
                "DELETE FROM access_tokens WHERE token_hash IN (SELECT token_hash"
                " FROM access_tokens WHERE revoked_at IS NULL AND exp <= $1"
                " ORDER BY token_hash FOR UPDATE) AND revoked_at IS NULL",
                now,
            )
            await self._lock(conn, self._lock_trl)
            expired = {
                r[0]: (r[1], r[2])
                for r in await conn.fetch(
                    "SELECT token_hash, client_id, audience FROM access_tokens"
                    " WHERE revoked_at IS NOT NULL AND delisted_at IS NULL AND exp <= $1"
                    " ORDER BY revoked_at, token_hash",
                    now,
                )
            }
            if expired:
                await conn.execute(
                    "UPDATE access_tokens SET delisted_at = $1 WHERE token_hash = ANY($2)",
                    now,
                    list(expired),
                )
                await self._trl_update(conn, now, removed=list(expired), added=[], owners=expired)
            await prune(conn, keep_updates)
            return len(expired)

        return await self._in_tx(sweep)

    async def next_trl_expiry(self) -> int | None:
        rows = await self._read(
            "SELECT MIN(exp) FROM access_tokens WHERE revoked_at IS NOT NULL"
            " AND delisted_at IS NULL"
        )
        return rows[0][0]

    async def _revoke(self, conn: Conn, hashes: list[bytes], now: int) -> list[bytes]:
        """Revoke those of these access tokens not revoked yet, in one TRL update; returns
        them. The caller has locked their rows (in token_hash order, if several)."""
        if not hashes:
            return []
        rows = await conn.fetch(
            "UPDATE access_tokens SET revoked_at = $1 WHERE token_hash = ANY($2)"
            " AND revoked_at IS NULL RETURNING token_hash, client_id, audience",
            now,
            hashes,
        )
        owners = {r[0]: (r[1], r[2]) for r in rows}
        revoked = sorted(owners)
        if revoked:
            await self._trl_update(conn, now, removed=[], added=revoked, owners=owners)
        return revoked

    async def _trl_update(
        self,
        conn: Conn,
        now: int,
        *,
        removed: list[bytes],
        added: list[bytes],
        owners: Mapping[bytes, Owner],
    ) -> None:
        # Numbered under a lock, so updates become visible in the order of their numbers.
        await self._lock(conn, self._lock_trl)
        await record_update(conn, now, removed=removed, added=added, owners=owners)
        await self._notify(conn, "revocations")


async def _record_access(conn: Conn, access: IssuedAccess, family_id: bytes) -> None:
    await conn.execute(
        "INSERT INTO access_tokens (token_hash, family_id, client_id, exp, audience)"
        " VALUES ($1, $2, $3, $4, $5)",
        access.token_hash,
        family_id,
        access.client_id,
        access.exp,
        access.audience,
    )
