"""The PostgreSQL store's plumbing: the pool, transactions, advisory locks, NOTIFY, the audit
chain and the LISTEN side of the change feed. The tables are handled by the classes built on it.

A lost database raises `StoreUnavailable` (5.03 with Max-Age on the wire) until the pool
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import asyncpg

from coap_auth.errors import OperatorError, StoreUnavailable
from coap_auth.store.audit import GENESIS, AuditEntry, AuditEvent, entry_mac
from coap_auth.store.master_key import MasterKey
from coap_auth.store.postgres_schema import migrate
from coap_auth.store.records import ChangeCounters
from coap_auth.store.rows import audit_entry_from_row

log = logging.getLogger("coap_auth.store")

T = TypeVar("T")
Conn = Any  # an asyncpg connection
CONNECT_TIMEOUT = 5.0  # s, to get a connection from the pool (or open one)
COMMAND_TIMEOUT = 10.0  # s, for one statement
RECONNECT_DELAY = 1.0  # s, between attempts of the LISTEN connection

# What a lost or refused database connection looks like from asyncpg.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InsufficientResourcesError,
)


class PostgresBase:
    def __init__(self, dsn: str, master_key: MasterKey, *, schema: str = "public") -> None:
        if not schema.isidentifier():
            raise OperatorError("the PostgreSQL schema name must be a plain identifier")
        self._dsn = dsn
        self._schema = schema
        self._master_key = master_key
        self._audit_mac = master_key.audit_mac
        self._pool: asyncpg.Pool | None = None
        self._channel = f"coap_auth_{schema}"
        digest = hashlib.sha256(f"coap-auth {schema}".encode()).digest()
        base = int.from_bytes(digest[:6], "big") << 4
        # One advisory lock per serialised concern, distinct per schema.
        self._lock_schema, self._lock_keys, self._lock_audit, self._lock_trl = (
            base,
            base + 1,
            base + 2,
            base + 3,
        )

    # -- plumbing -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=10,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"search_path": self._schema},
            )
            async with self._pool.acquire() as conn:
                await migrate(conn, self._lock_schema)
        except CONNECTION_ERRORS:
            if self._pool is not None:
                await self._pool.close()
                self._pool = None
            raise OperatorError("cannot connect to the PostgreSQL store") from None

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        assert self._pool is not None, "store not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except CONNECTION_ERRORS:
            raise StoreUnavailable("the database is unreachable; retry shortly") from None

    async def _in_tx(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        async with self._connection() as conn, conn.transaction():
            return await fn(conn)

    async def _read(self, query: str, *args: Any) -> list[Any]:
        async with self._connection() as conn:
            return list(await conn.fetch(query, *args))

    async def _lock(self, conn: Conn, key: int) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", key)

    async def _notify(self, conn: Conn, what: str) -> None:
        column = "counter" if what == "keys" else "revocations"
        await conn.execute(f"UPDATE change_feed SET {column} = {column} + 1 WHERE id = 1")
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, what)  # sent on commit

    # -- audit log --------------------------------------------------------------------------

    async def _audit(self, conn: Conn, events: Iterable[AuditEvent]) -> None:
        events = list(events)
        if not events:
            return
        await self._lock(conn, self._lock_audit)
        last = await conn.fetchrow("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1")
        seq, previous = (last[0], last[1]) if last else (0, GENESIS)
        for event in events:
            seq += 1
            previous = entry_mac(self._audit_mac, previous, seq, event)
            await conn.execute(
                "INSERT INTO audit_log VALUES ($1, $2, $3, $4, $5, $6, $7)",
                seq,
                event.at,
                event.actor,
                event.event,
                event.subject,
                event.details_json(),
                previous,
            )

    async def append_audit(self, events: Iterable[AuditEvent]) -> None:
        events = list(events)

        async def append(conn: Conn) -> None:
            await self._audit(conn, events)

        await self._in_tx(append)

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        if last is None:
            rows = await self._read("SELECT * FROM audit_log ORDER BY seq")
        else:
            rows = await self._read(
                "SELECT * FROM (SELECT * FROM audit_log ORDER BY seq DESC LIMIT $1) AS tail"
                " ORDER BY seq",
                last,
            )
        return [audit_entry_from_row(r) for r in rows]

    # -- change feed -------------------------------------------------------------------------

    async def change_counters(self) -> ChangeCounters:
        rows = await self._read("SELECT counter, revocations FROM change_feed WHERE id = 1")
        return ChangeCounters(int(rows[0][0]), int(rows[0][1]))

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """LISTEN for every instance's NOTIFY and call `changed`; reconnects forever."""
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=CONNECT_TIMEOUT,
                    server_settings={"search_path": self._schema},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._channel, lambda *_args: changed())
                changed()  # anything missed while not listening is picked up now
                await lost.wait()
                log.warning("change feed connection lost; reconnecting")
            except CONNECTION_ERRORS:
                pass
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close()
            await asyncio.sleep(RECONNECT_DELAY)
