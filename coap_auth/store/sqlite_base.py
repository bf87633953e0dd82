"""The SQLite store's plumbing: one connection on one thread, transactions, the audit chain
and the change feed. The tables themselves are handled by the classes built on it."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from coap_auth.errors import OperatorError, StoreUnavailable
from coap_auth.store.audit import AuditEntry, AuditEvent, entry_mac
from coap_auth.store.master_key import MasterKey
from coap_auth.store.records import ChangeCounters
from coap_auth.store.rows import audit_entry_from_row
from coap_auth.store.sqlite_schema import migrate

T = TypeVar("T")
log = logging.getLogger("coap_auth.store")
# Room the start-up probe writes: a few transactions' worth of WAL.
_PROBE_BYTES = 256 * 1024


# SQLite primary result codes that describe the store's condition, not a bug: BUSY, LOCKED,
# NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL (https://sqlite.org/rescode.html).
_STORE_CONDITIONS = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


class SqliteBase:
    def __init__(self, path: Path, master_key: MasterKey) -> None:
        self._path = path
        self._master_key = master_key
        self._audit_mac = master_key.audit_mac
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coap-auth-sqlite")
        self._conn: sqlite3.Connection | None = None

    # -- plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:
            # Disk full, I/O error, locked past the busy timeout: the store, not the request.
            # Anything else (a bad statement, a missing table) is our fault: a 5.00, logged.
            # (sqlite3's own errors, e.g. undecodable text, carry no SQLite code: faults.)
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _STORE_CONDITIONS:
                raise
            log.error("store operation failed: %s", exc)
            raise StoreUnavailable("the store cannot write now; retry shortly") from None

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # Durable commits: a 2.01 is only sent for what survives a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            migrate(conn)
            self._conn = conn
            self._probe_writes()
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OperatorError(
                f"cannot write the store in {self._path.parent} ({reason}):"
                " is the disk full or the directory read-only?"
            ) from None

    def _probe_writes(self) -> None:
        """Fail at start, not at the first request: write and sync some room in the data
        directory, and commit one transaction."""
        probe = self._path.parent / ".coap-auth-write-probe"
        try:
            with probe.open("wb") as out:
                out.write(bytes(_PROBE_BYTES))
                out.flush()
                os.fsync(out.fileno())
        finally:
            probe.unlink(missing_ok=True)
        self._tx(lambda conn: conn.execute("UPDATE change_feed SET counter = counter"))

    def _tx(self, fn: Callable[[sqlite3.Connection], T], begin: str = "BEGIN IMMEDIATE") -> T:
        """Run fn in one transaction; writers take the lock up front (IMMEDIATE) so they
        queue instead of failing mid-way."""
        conn = self._conn
        assert conn is not None, "store not open"
        conn.execute(begin)
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def _in_tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._run(self._tx, fn)

    async def _read(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One consistent read; takes no write lock."""
        return await self._run(
            self._tx, lambda conn: conn.execute(query, args).fetchall(), "BEGIN DEFERRED"
        )

    async def open(self) -> None:
        await self._run(self._connect)

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    # -- audit log --------------------------------------------------------------------------

    def _audit(self, conn: sqlite3.Connection, events: Iterable[AuditEvent]) -> None:
        for event in events:
            last = conn.execute(
                "SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            seq, previous = (last[0] + 1, last[1]) if last else (1, bytes(32))
            mac = entry_mac(self._audit_mac, previous, seq, event)
            conn.execute(
                "INSERT INTO audit_log VALUES (?, ?, ?, ?, ?, ?, ?)",
                (seq, event.at, event.actor, event.event, event.subject, event.details_json(), mac),
            )

    async def append_audit(self, events: Iterable[AuditEvent]) -> None:
        events = list(events)
        await self._in_tx(lambda conn: self._audit(conn, events))

    async def audit_entries(self, last: int | None = None) -> list[AuditEntry]:
        if last is None:
            rows = await self._read("SELECT * FROM audit_log ORDER BY seq")
        else:
            rows = await self._read(
                "SELECT * FROM (SELECT * FROM audit_log ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (last,),
            )
        return [audit_entry_from_row(r) for r in rows]

    # -- change feed -------------------------------------------------------------------------

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """No push from a file: readers poll `change_counters`."""
        return None

    async def change_counters(self) -> ChangeCounters:
        rows = await self._read("SELECT counter, revocations FROM change_feed WHERE id = 1")
        return ChangeCounters(int(rows[0][0]), int(rows[0][1]))
