"""The PostgreSQL store's database: the pool, transactions and their retries, advisory locks,
the change feed (counters, NOTIFY, LISTEN) and the audit chain appended in a caller's transaction.

Lock order. Every transaction takes the locks it needs in this order, and never an earlier
one once it holds a later one, so two transactions cannot wait on each other:

1. row locks of the rows it reads or changes: audiences, then clients (a grant's registry
   check shares them, `FOR SHARE`), then refresh_families by family_id, then refresh_tokens,
   then access_tokens; several rows of one table in key order (`ORDER BY ... FOR UPDATE`);
2. the key-set advisory lock (`update_keys`) or the TRL advisory lock (revocations, sweeps).
   Rows changed only under one of them come after it: signing_keys under the key-set lock,
   trl_updates and trl_requester_updates under the TRL lock, and the rows a sweep delists,
   already revoked and committed, which nothing else locks;
3. the change_feed row (`notify`);
4. the audit advisory lock (`audit`), always last.

A transaction that still loses a race (deadlock_detected, serialization_failure) is retried
whole a few times. A lost or read-only database raises `StoreUnavailable` (5.03 with Max-Age
on the wire) until the pool reconnects or the primary is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import asyncpg

from coap_auth.errors import OperatorError, StoreUnavailable
from coap_auth.store.audit import (
    AuditEntry,
    AuditEvent,
    AuditSnapshot,
    append_plan,
    registry_matches,
    registry_signal,
)
from coap_auth.store.master_key import MasterKey
from coap_auth.store.postgres_schema import (
    SCHEMA_VERSION,
    insert_entries,
    migrate,
    read_head,
    registry_digest_of,
    write_head,
)
from coap_auth.store.records import ChangeCounters
from coap_auth.store.rows import (
    ACCESS_STATE_QUERY,
    AUDIT_COLUMNS,
    FAMILY_STATE_QUERY,
    REMOVALS_QUERY,
    audit_entry_from_row,
    revocation_rows,
)
from coap_auth.store.seal_marker import marker_path, read_marker, write_marker

log = logging.getLogger("coap_auth.store")

T = TypeVar("T")
Conn = Any  # an asyncpg connection
POOL_SIZE = 10  # connections per instance
CONNECT_TIMEOUT = 5.0  # s, to get a connection from the pool (or open one)
COMMAND_TIMEOUT = 10.0  # s, for one statement
RECONNECT_DELAY = 1.0  # s, between attempts of the LISTEN connection
CLOSE_TIMEOUT = 10.0  # s, for the pool to close gracefully before its connections are cut
LISTEN_CLOSE_TIMEOUT = 2.0  # s, for the LISTEN connection to close gracefully
TX_ATTEMPTS = 3  # a transaction rolled back by a deadlock or serialization failure is rerun
TX_RETRY_DELAY = 0.02  # s, the most a retry waits (randomised, so racers spread out)

# What a lost or refused database connection looks like from asyncpg.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InsufficientResourcesError,
    # A session the server ended (failover, restart, pg_terminate_backend) can surface as
    # "cannot switch to state N; another operation is in progress" (asyncpg issue 1069).
    asyncpg.exceptions.InternalClientError,
)


class Change(StrEnum):
    """What a change-feed notification says changed: the NOTIFY payload."""

    KEYS = "keys"  # signing keys, or audiences (rotation policies follow them)
    REVOCATIONS = "revocations"  # the TRL


# The change_feed column each kind of change bumps.
_COUNTER_COLUMNS = {Change.KEYS: "counter", Change.REVOCATIONS: "revocations"}


@dataclass(frozen=True, slots=True)
class AdvisoryLocks:
    """One transaction-scoped advisory lock per serialised concern, distinct per schema (so
    several deployments can share a database)."""

    schema: int
    keys: int
    audit: int
    trl: int

    @classmethod
    def of(cls, schema: str) -> AdvisoryLocks:
        digest = hashlib.sha256(f"coap-auth {schema}".encode()).digest()
        base = int.from_bytes(digest[:6], "big") << 4
        return cls(base, base + 1, base + 2, base + 3)


class PostgresDatabase:
    """One schema of one PostgreSQL database, as this instance reaches it."""

    def __init__(self, dsn: str, master_key: MasterKey, *, schema: str = "public") -> None:
        if not schema.isidentifier():
            raise OperatorError("the PostgreSQL schema name must be a plain identifier")
        self._dsn = dsn
        self._schema = schema
        self.master_key = master_key
        self._audit_mac = master_key.audit_mac
        self._pool: asyncpg.Pool | None = None
        # This instance's own marker, next to its master key: outside the shared database.
        home = master_key.home
        self._marker = None if home is None else marker_path(home, f"postgres-{schema}")
        self._read_only = False  # a write was refused as read-only, and none has worked since
        self._channel = f"coap_auth_{schema}"
        self.locks = AdvisoryLocks.of(schema)

    # -- the pool ---------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
                server_settings={"search_path": self._schema},
                reset=_keep_session,
            )
            sealed_before = read_marker(self._marker)
            async with self._pool.acquire() as conn:
                # Before the migration, which writes the tables (and would set off what is
                # found).
                foreign = [row["what"] for row in await conn.fetch(_FOREIGN_OBJECTS, self._schema)]
                if foreign:
                    raise OperatorError(
                        f"the PostgreSQL schema {self._schema} holds what coap-auth did not make:"
                        f" {', '.join(sorted(foreign))} (edited?); refusing to use it"
                    )
                await migrate(
                    conn, self.locks.schema, self.master_key, int(time.time()), sealed_before
                )
                # Fail at start, not at the first grant: a schema already up to date was only
                # read, so a standby (or a read-only role) is asked, without taking a lock.
                if await conn.fetchval(
                    "SELECT current_setting('transaction_read_only') = 'on' OR pg_is_in_recovery()"
                ):
                    raise asyncpg.exceptions.ReadOnlySQLTransactionError("read-only")
            write_marker(self._marker, SCHEMA_VERSION)
        except (*CONNECTION_ERRORS, asyncpg.exceptions.ReadOnlySQLTransactionError) as exc:
            await self.close()
            if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
                raise OperatorError("the PostgreSQL store is read-only (a standby?)") from None
            raise OperatorError("cannot connect to the PostgreSQL store") from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Close the pool; connections still in use after CLOSE_TIMEOUT are cut, so a stop
        never hangs on a stuck query."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except Exception as exc:
            # pool.close() terminates the pool when it fails or is cancelled; make sure.
            log.warning("PostgreSQL pool did not close cleanly (%s); closed it", describe(exc))
            pool.terminate()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A pooled connection; a lost or read-only database raises StoreUnavailable."""
        assert self._pool is not None, "store not open"
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                try:
                    yield conn
                except asyncpg.exceptions.InternalClientError:
                    # Left in that state, the connection would go back to the pool, and
                    # pool.close() would wait on it forever: drop it.
                    conn.terminate()
                    raise
        except CONNECTION_ERRORS:
            raise StoreUnavailable("the database is unreachable; retry shortly") from None
        except asyncpg.exceptions.ReadOnlySQLTransactionError:
            # A standby, or a primary being demoted: writes come back after the failover.
            if not self._read_only:
                log.warning("the PostgreSQL store refuses writes (read-only); answering 5.03")
            self._read_only = True
            raise StoreUnavailable("the database is read-only for now; retry shortly") from None

    # -- transactions -------------------------------------------------------------------------

    async def transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run fn in one read-committed transaction. A deadlock or serialization failure rolls
        it back as a whole, so it is rerun (fn may run more than once; only a committed run
        counts)."""
        for attempt in range(1, TX_ATTEMPTS + 1):
            try:
                async with self.connection() as conn, conn.transaction():
                    result = await fn(conn)
                self._read_only = False
                return result
            except asyncpg.exceptions.TransactionRollbackError as exc:
                if attempt == TX_ATTEMPTS:
                    log.warning(
                        "transaction rolled back %d times (%s); giving up", attempt, describe(exc)
                    )
                    raise StoreUnavailable("the store is busy; retry shortly") from None
                log.info("transaction rolled back (%s); retrying", describe(exc))
                await asyncio.sleep(random.uniform(0, TX_RETRY_DELAY) * attempt)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[Conn]:
        """A connection in one read-only, repeatable-read transaction: reads that agree."""
        async with (
            self.connection() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield conn

    async def registry_matches_head(self, conn: Conn) -> bool:
        """audit.registry_matches for the rows and head the transaction sees."""
        newest = await conn.fetchval("SELECT MAX(seq) FROM audit_log")
        head = await read_head(conn)
        return registry_matches(self._audit_mac, head, newest, await registry_digest_of(conn))

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """One statement's rows, outside any transaction."""
        async with self.connection() as conn:
            return list(await conn.fetch(query, *args))

    async def lock(self, conn: Conn, key: int) -> None:
        """Take one of `locks` until the transaction ends."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", key)

    async def notify(self, conn: Conn, change: Change) -> None:
        """Bump a change counter (locks the change_feed row: after any advisory lock but the
        audit lock, see the module docstring) and NOTIFY on commit."""
        column = _COUNTER_COLUMNS[change]
        await conn.execute(f"UPDATE change_feed SET {column} = {column} + 1 WHERE id = 1")
        await conn.execute("SELECT pg_notify($1, $2)", self._channel, str(change))

    # -- audit log --------------------------------------------------------------------------

    async def audit(
        self, conn: Conn, events: Iterable[AuditEvent], *, registry: bool = False
    ) -> None:
        """Append to the chain and move its head, in the caller's transaction; `registry`:
        the transaction wrote a client or audience row, the head records the new digest."""
        events = list(events)
        if not events:
            return
        # The last lock a transaction takes: nothing else is locked while holding it (the
        # head row is only ever written under it).
        await self.lock(conn, self.locks.audit)
        newest = await conn.fetchrow("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1")
        # Read under the audit lock: every other registry write has committed or waits, so
        # (read committed) the digest sees them all, and this transaction's own row.
        digest = await registry_digest_of(conn) if registry else None
        entries, head = append_plan(
            self._audit_mac,
            await read_head(conn),
            None if newest is None else (newest["seq"], newest["mac"]),
            events,
            digest,
        )
        await insert_entries(conn, entries)
        if head is not None:
            await write_head(conn, head, insert=False)

    async def append_audit(self, events: Iterable[AuditEvent]) -> None:
        events = list(events)

        async def append(conn: Conn) -> None:
            await self.audit(conn, events)

        await self.transaction(append)

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        if last is None:
            rows = await self.fetch(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
        else:
            rows = await self.fetch(
                f"SELECT {AUDIT_COLUMNS} FROM (SELECT {AUDIT_COLUMNS} FROM audit_log"
                " ORDER BY seq DESC LIMIT $1) AS tail ORDER BY seq",
                last,
            )
        return [audit_entry_from_row(r) for r in rows]

    async def audit_snapshot(self) -> AuditSnapshot:
        async with self.snapshot() as conn:
            rows = await conn.fetch(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq")
            holds_data = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM signing_keys) OR EXISTS (SELECT 1 FROM clients)"
                " OR EXISTS (SELECT 1 FROM audiences)"
            )
            head = await read_head(conn)
            registry = await registry_digest_of(conn)
            revocation = revocation_rows(
                await conn.fetch(ACCESS_STATE_QUERY),
                await conn.fetch(FAMILY_STATE_QUERY),
                await conn.fetch(REMOVALS_QUERY),
            )
        entries = tuple(audit_entry_from_row(r) for r in rows)
        return AuditSnapshot(entries, head, bool(holds_data), registry, revocation)

    # -- change feed -------------------------------------------------------------------------

    async def change_counters(self) -> ChangeCounters:
        """The change feed's counters and the verified audit head's registry digest
        (audit.registry_signal), in one snapshot."""
        async with self.snapshot() as conn:
            row = await conn.fetchrow(
                "SELECT counter, revocations, (SELECT MAX(seq) FROM audit_log) AS newest"
                " FROM change_feed WHERE id = 1"
            )
            head = await read_head(conn)
        registry = registry_signal(self._audit_mac, head, row["newest"])
        return ChangeCounters(int(row["counter"]), int(row["revocations"]), registry)

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """LISTEN for every instance's NOTIFY and call `changed`; reconnects forever, until
        cancelled."""
        reported: str | None = None  # the failure last logged: a repeat of it is not logged again
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
                reported = None
                changed()  # anything missed while not listening is picked up now
                await lost.wait()
                log.warning("change feed connection lost; reconnecting")
            except asyncio.CancelledError:
                if conn is not None:
                    conn.terminate()  # stop now: a goodbye could wait on a stuck server
                raise
            except CONNECTION_ERRORS:
                pass
            except Exception as exc:
                # Not a lost connection (a refused LISTEN, a failing callback, a bug): keep
                # the feed alive, and say so. The message may quote the DSN: name the class only.
                if describe(exc) != reported:
                    reported = describe(exc)
                    log.error("change feed failed (%s); reconnecting", reported)
            if conn is not None and not conn.is_closed():
                with contextlib.suppress(Exception):  # close() cuts the connection on failure
                    await conn.close(timeout=LISTEN_CLOSE_TIMEOUT)
            await asyncio.sleep(RECONNECT_DELAY)


# What coap-auth never makes on its tables, and what could change what its statements do
# unseen (as SQLite's open refuses a trigger or a view it did not make): a trigger can turn an
# operator's UPDATE into nothing (the CLI says done; the rows and the audit head agree), a rule
# rewrites statements, row security hides rows; a foreign key onto one of its tables (from any
# schema) makes its statements cascade into tables where anything may wait (a trigger outside
# this schema put a disabled client's older row back, in coap-auth's own transaction). Its own
# foreign keys are the two onto refresh_families, without actions.
_FOREIGN_OBJECTS = """
SELECT 'trigger ' || t.tgname || ' on ' || c.relname AS what
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND NOT t.tgisinternal
UNION ALL
SELECT 'rule ' || rulename || ' on ' || tablename FROM pg_rules WHERE schemaname = $1
UNION ALL
SELECT 'row security on ' || c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND (c.relrowsecurity OR c.relforcerowsecurity)
UNION ALL
SELECT 'foreign key ' || k.conname || ' on ' || n.nspname || '.' || c.relname
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE k.contype = 'f' AND (n.nspname = $1 OR rn.nspname = $1) AND NOT (
    n.nspname = $1 AND rn.nspname = $1 AND r.relname = 'refresh_families'
    AND c.relname IN ('refresh_tokens', 'access_tokens')
    AND k.confupdtype = 'a' AND k.confdeltype = 'a'
)
"""


async def _keep_session(_conn: Conn) -> None:
    """What a released connection needs beyond asyncpg's own reset (which rolls back a
    transaction left open): nothing. Pool connections keep no session state (advisory locks
    are transaction-scoped, LISTEN has its own connection, nothing is SET), so asyncpg's
    default reset query (unlock all, CLOSE ALL, UNLISTEN *, RESET ALL) would only cost a
    round trip per transaction."""


def describe(exc: BaseException) -> str:
    """An error for the log: its class and SQLSTATE, never its text (which may quote a
    statement's parameters or the DSN)."""
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{type(exc).__name__}, SQLSTATE {sqlstate}" if sqlstate else type(exc).__name__
