"""SQLite tables of issued tokens: refresh families (rotation, reuse, kills) and the
revocation list (RFC 9770; its statements are in sqlite_trl)."""

from __future__ import annotations

import sqlite3

import cbor2

from coap_auth.store.audit import AuditEvent
from coap_auth.store.base import Mint, TokenStatus
from coap_auth.store.records import IssuedAccess, RefreshFamily, RefreshOutcome, TrlUpdate
from coap_auth.store.rows import family_from_row, family_kill_events
from coap_auth.store.sqlite_base import SqliteBase
from coap_auth.store.sqlite_trl import (
    read_bounds,
    read_changes_since,
    read_trl,
    read_updates,
    revoke,
    sweep,
)


class TokenTables(SqliteBase):
    # -- refresh families ------------------------------------------------------------------

    async def start_family(
        self, family: RefreshFamily, refresh_digest: bytes, access: IssuedAccess
    ) -> None:
        cnf = None if family.cnf is None else cbor2.dumps(family.cnf)

        def start(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO refresh_families VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (
                    family.family_id,
                    family.client_id,
                    family.audience,
                    family.scope,
                    cnf,
                    family.created_at,
                    family.last_used_at,
                    family.expires_at,
                ),
            )
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, NULL, NULL)",
                (refresh_digest, family.family_id, family.created_at),
            )
            _record_access(conn, access, family.family_id)

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
        def rotate(conn: sqlite3.Connection) -> RefreshOutcome:
            row = conn.execute(
                "SELECT t.spent_at, t.successor, f.* FROM refresh_tokens t"
                " JOIN refresh_families f USING (family_id) WHERE t.digest = ?",
                (refresh_digest,),
            ).fetchone()
            if row is None:
                return RefreshOutcome("unknown")
            spent_at, successor, family = row[0], row[1], family_from_row(row[2:])
            if family.client_id != client_id:
                return RefreshOutcome("unknown")
            if family.killed_at is not None:
                return RefreshOutcome("dead", family)
            if now >= family.expires_at or now - family.last_used_at >= idle_timeout:
                # Expiry is not theft: the family ends, its access tokens live out their time.
                self._kill(conn, [family], "expired", now, "service", revoke_access=False)
                return RefreshOutcome("expired", family)
            status = "rotated"
            if spent_at is not None:
                successor_unused = (
                    successor is not None
                    and conn.execute(
                        "SELECT 1 FROM refresh_tokens WHERE digest = ? AND spent_at IS NULL",
                        (successor,),
                    ).fetchone()
                )
                if now - spent_at >= grace or not successor_unused:
                    # RFC 9700 §4.14.2: reuse of a spent refresh token means theft.
                    self._kill(conn, [family], "refresh token reused", now, "service")
                    return RefreshOutcome("reused", family)
                # A device whose response was lost: its successor is replaced, not kept live.
                conn.execute(
                    "UPDATE refresh_tokens SET spent_at = ? WHERE digest = ?", (now, successor)
                )
                status = "grace"
            access = mint(family)
            conn.execute(
                "UPDATE refresh_tokens SET spent_at = COALESCE(spent_at, ?), successor = ?"
                " WHERE digest = ?",
                (now, successor_digest, refresh_digest),
            )
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, NULL, NULL)",
                (successor_digest, family.family_id, now),
            )
            conn.execute(
                "UPDATE refresh_families SET last_used_at = ? WHERE family_id = ?",
                (now, family.family_id),
            )
            _record_access(conn, access, family.family_id)
            return RefreshOutcome(status, family)  # type: ignore[arg-type]

        return await self._in_tx(rotate)

    async def kill_families(
        self, client_id: str, reason: str, now: int, actor: str = "operator"
    ) -> int:
        def kill(conn: sqlite3.Connection) -> int:
            families = self._unkilled_families(conn, "client_id", client_id)
            self._kill(conn, families, reason, now, actor)  # one TRL update for all
            return len(families)

        return await self._in_tx(kill)

    def _unkilled_families(
        self, conn: sqlite3.Connection, column: str, value: str
    ) -> list[RefreshFamily]:
        """Unkilled families of one client or one audience (`column`), in family_id order; also
        those past their own expiry, since a token refreshed just before it outlives them."""
        assert column in ("client_id", "audience")
        rows = conn.execute(
            f"SELECT * FROM refresh_families WHERE {column} = ? AND killed_at IS NULL"
            " ORDER BY family_id",
            (value,),
        )
        return [family_from_row(r) for r in rows]

    async def kill_family_of(
        self, refresh_digest: bytes, client_id: str, reason: str, now: int
    ) -> bool:
        def kill(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT f.* FROM refresh_tokens t JOIN refresh_families f USING (family_id)"
                " WHERE t.digest = ? AND f.client_id = ? AND f.killed_at IS NULL",
                (refresh_digest, client_id),
            ).fetchone()
            if row is None:
                return False
            self._kill(conn, [family_from_row(row)], reason, now, "service")
            return True

        return await self._in_tx(kill)

    async def list_families(self, client_id: str | None, now: int) -> list[RefreshFamily]:
        query = (
            "SELECT * FROM refresh_families WHERE killed_at IS NULL AND expires_at > ?"
            + (" AND client_id = ?" if client_id is not None else "")
            + " ORDER BY created_at, family_id"
        )
        args = (now,) if client_id is None else (now, client_id)
        return [family_from_row(r) for r in await self._read(query, args)]

    def _kill(
        self,
        conn: sqlite3.Connection,
        families: list[RefreshFamily],
        reason: str,
        now: int,
        actor: str,
        *,
        revoke_access: bool = True,
    ) -> None:
        """Kill these families: no refresh token of them works again; unless told otherwise,
        their unexpired access tokens are revoked, all in one TRL update."""
        if not families:
            return
        family_ids = [f.family_id for f in families]
        conn.executemany(
            "UPDATE refresh_families SET killed_at = ?, kill_reason = ? WHERE family_id = ?",
            [(now, reason, family_id) for family_id in family_ids],
        )
        conn.executemany(
            "UPDATE refresh_tokens SET spent_at = ? WHERE family_id = ? AND spent_at IS NULL",
            [(now, family_id) for family_id in family_ids],
        )
        revoked: dict[bytes, dict[bytes, int]] = {family_id: {} for family_id in family_ids}
        if revoke_access:
            # The writer lock is held (BEGIN IMMEDIATE): what is selected here is what is
            # revoked. (No UPDATE ... RETURNING: it needs SQLite 3.35, newer than some hosts.)
            selected = {
                r[0]: r[1:]
                for family_id in family_ids
                for r in conn.execute(
                    "SELECT token_hash, family_id, exp, client_id, audience FROM access_tokens"
                    " WHERE family_id = ? AND revoked_at IS NULL AND exp > ?",
                    (family_id, now),
                )
            }
            owners = {h: (client, audience) for h, (_, _, client, audience) in selected.items()}
            for h in revoke(conn, owners, now):
                family_id, exp, _, _ = selected[h]
                revoked[family_id][h] = exp
        tokens = revoked if revoke_access else None
        self._audit(conn, family_kill_events(families, tokens, reason, actor, now))

    # -- revocation (RFC 9770 TRL) -------------------------------------------------------------

    async def revoke_access(
        self, token_hash: bytes, client_id: str | None, now: int, actor: str
    ) -> bool:
        def revoke_one(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT client_id, exp, audience FROM access_tokens"
                " WHERE token_hash = ? AND revoked_at IS NULL AND exp > ?",
                (token_hash, now),
            ).fetchone()
            if row is None or (client_id is not None and row[0] != client_id):
                return False
            if not revoke(conn, {token_hash: (row[0], row[2])}, now):
                return False
            # The exp lets `audit verify` tell a token delisted early from one that expired.
            details = {"client_id": row[0], "exp": row[1]}
            self._audit(conn, [AuditEvent(now, actor, "token.revoked", token_hash.hex(), details)])
            return True

        return await self._in_tx(revoke_one)

    async def token_status(self, token_hash: bytes) -> TokenStatus | None:
        rows = await self._read(
            "SELECT revoked_at FROM access_tokens WHERE token_hash = ?", (token_hash,)
        )
        if not rows:
            return None
        return "live" if rows[0][0] is None else "revoked"

    async def token_hashes_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        # BLOBs compare with memcmp(): bytewise, as the protocol says.
        rows = await self._read(
            "SELECT token_hash FROM access_tokens WHERE token_hash BETWEEN ? AND ?"
            " ORDER BY token_hash LIMIT ?",
            (low, high, limit),
        )
        return [r[0] for r in rows]

    async def is_revoked(self, token_hash: bytes) -> bool:
        return await self.token_status(token_hash) == "revoked"

    async def trl(self, requester: str | None = None) -> tuple[list[bytes], int, int]:
        return await self._run(self._tx, lambda conn: read_trl(conn, requester), "BEGIN DEFERRED")

    async def trl_bounds(self, requester: str | None = None) -> tuple[int, int]:
        return await self._run(
            self._tx, lambda conn: read_bounds(conn, requester), "BEGIN DEFERRED"
        )

    async def trl_updates(
        self, first_seq: int, last_seq: int, requester: str | None = None
    ) -> list[TrlUpdate]:
        return await self._run(
            self._tx,
            lambda conn: read_updates(conn, first_seq, last_seq, requester),
            "BEGIN DEFERRED",
        )

    async def trl_changes_since(self, trl_seq: int | None) -> tuple[frozenset[str], int]:
        return await self._run(
            self._tx, lambda conn: read_changes_since(conn, trl_seq), "BEGIN DEFERRED"
        )

    async def sweep_expired(self, now: int, keep_updates: int) -> int:
        return await self._in_tx(lambda conn: sweep(conn, now, keep_updates))

    async def next_trl_expiry(self) -> int | None:
        rows = await self._read(
            "SELECT MIN(exp) FROM access_tokens"
            " WHERE revoked_at IS NOT NULL AND delisted_at IS NULL"
        )
        return rows[0][0]


def _record_access(conn: sqlite3.Connection, access: IssuedAccess, family_id: bytes) -> None:
    conn.execute(
        "INSERT INTO access_tokens (token_hash, family_id, client_id, exp, audience)"
        " VALUES (?, ?, ?, ?, ?)",
        (access.token_hash, family_id, access.client_id, access.exp, access.audience),
    )
