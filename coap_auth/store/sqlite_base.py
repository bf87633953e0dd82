"""The SQLite store's plumbing: one connection on one thread, transactions, file modes, the
audit chain and the change feed. The tables themselves are handled by the classes built on it."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from coap_auth.errors import OperatorError, StoreUnavailable
from coap_auth.store.audit import AuditEntry, AuditEvent, AuditSnapshot, append_plan
from coap_auth.store.master_key import MasterKey, make_private
from coap_auth.store.records import ChangeCounters
from coap_auth.store.rows import (
    ACCESS_STATE_QUERY,
    AUDIT_COLUMNS,
    FAMILY_STATE_QUERY,
    REMOVALS_QUERY,
    audit_entry_from_row,
    audit_entry_to_row,
    revocation_rows,
    stand_in_rows,
)
from coap_auth.store.seal_marker import marker_path, read_marker, write_marker
from coap_auth.store.sqlite_schema import (
    SCHEMA_VERSION,
    migrate,
    read_head,
    registry_digest_of,
)
from coap_auth.store.sqlite_shape import active_objects, unexpected_objects

T = TypeVar("T")
log = logging.getLogger("coap_auth.store")
# Room the start-up probe writes: a few transactions' worth of WAL.
_PROBE_BYTES = 256 * 1024


# SQLite primary result codes that describe the store's condition, not a bug: BUSY, LOCKED,
# NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL (https://sqlite.org/rescode.html).
_STORE_CONDITIONS = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
# What SQLite keeps beside the database file; like it, readable by us alone.
_SIDE_FILES = ("-wal", "-shm", "-journal")


class SqliteBase:
    def __init__(self, path: Path, master_key: MasterKey) -> None:
        self._path = path
        self._master_key = master_key
        self._audit_mac = master_key.audit_mac
        self._registry_mac = master_key.registry_mac
        self._stand_in_client, self._stand_in_audience = stand_in_rows(self._registry_mac)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coap-auth-sqlite")
        self._conn: sqlite3.Connection | None = None
        # Next to the master key (its data directory), outside the database.
        home = master_key.home
        self._marker = None if home is None else marker_path(home, "sqlite")

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
            # Created (or put back to) 0600 before SQLite opens it: the -wal and -shm it
            # creates take the database file's mode.
            os.close(os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600))
            make_private(self._path, 0o600)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # Durable commits: a 2.01 is only sent for what survives a power cut.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            # Deleted and overwritten content (a sealed private key once its key has ended)
            # is zeroed in the pages, not left in free space.
            conn.execute("PRAGMA secure_delete=ON")
            try:
                # Triggers first: one would fire inside the migration, and its writes stay.
                _refuse(self._path, active_objects(conn))
                migrate(conn, self._master_key, int(time.time()), read_marker(self._marker))
                _refuse(self._path, unexpected_objects(conn))
                write_marker(self._marker, SCHEMA_VERSION)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._probe_writes()
            self._make_files_private()
        except (sqlite3.Error, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OperatorError(
                f"cannot write the store in {self._path.parent} ({reason}):"
                " is the disk full or the directory read-only?"
            ) from None

    def _make_files_private(self) -> None:
        """The database and its side files are 0600 on every start, also when an older
        version (or a restored backup) left them readable by others."""
        for path in (self._path, *(self._path.with_name(self._path.name + s) for s in _SIDE_FILES)):
            try:
                make_private(path, 0o600)
            except FileNotFoundError:
                pass  # a side file that does not exist (now)

    def _drop_old_frames(self) -> None:
        """Checkpoint the WAL into the database and truncate it: after a key's private part
        is dropped, no older frame still holds it (secure_delete has zeroed its old cell in
        the pages). A reader that holds the WAL makes this wait (busy_timeout), then give up
        until the next such change."""
        conn = self._conn
        assert conn is not None, "store not open"
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError as exc:
            busy, reason = 1, str(exc)
        else:
            reason = "a reader holds the write-ahead log"
        if busy:
            log.warning("the write-ahead log was not truncated after a key ended (%s)", reason)

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

    def _audit(
        self, conn: sqlite3.Connection, events: Iterable[AuditEvent], *, registry: bool = False
    ) -> None:
        """Append to the chain and move its head, in the caller's transaction; `registry`:
        the transaction wrote a client or audience row, the head records the new digest."""
        events = list(events)
        if not events:
            return
        newest = conn.execute("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
        digest = registry_digest_of(conn) if registry else None
        entries, head = append_plan(self._audit_mac, read_head(conn), newest, events, digest)
        conn.executemany(
            f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [audit_entry_to_row(entry) for entry in entries],
        )
        if head is not None:
            conn.execute(
                "UPDATE audit_head SET seq = ?, last_mac = ?, mac = ?, registry = ? WHERE id = 1",
                (head.seq, head.last_mac, head.mac, head.registry),
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

    async def audit_snapshot(self) -> AuditSnapshot:
        def read(conn: sqlite3.Connection) -> AuditSnapshot:
            rows = conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq").fetchall()
            holds_data = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM signing_keys) OR EXISTS (SELECT 1 FROM clients)"
                " OR EXISTS (SELECT 1 FROM audiences)"
            ).fetchone()[0]
            entries = tuple(audit_entry_from_row(r) for r in rows)
            revocation = revocation_rows(
                conn.execute(ACCESS_STATE_QUERY),
                conn.execute(FAMILY_STATE_QUERY),
                conn.execute(REMOVALS_QUERY),
            )
            return AuditSnapshot(
                entries, read_head(conn), bool(holds_data), registry_digest_of(conn), revocation
            )

        return await self._run(self._tx, read, "BEGIN DEFERRED")

    # -- change feed -------------------------------------------------------------------------

    async def watch_changes(self, changed: Callable[[], None]) -> None:
        """No push from a file: readers poll `change_counters`."""
        return None

    async def change_counters(self) -> ChangeCounters:
        rows = await self._read("SELECT counter, revocations FROM change_feed WHERE id = 1")
        return ChangeCounters(int(rows[0][0]), int(rows[0][1]))


def _refuse(path: Path, unexpected: list[str]) -> None:
    if unexpected:
        raise OperatorError(
            f"{path} holds what coap-auth did not make: {', '.join(unexpected)}"
            " (restored from an untrusted file, or edited?); refusing to use it"
        )
