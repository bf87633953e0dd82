"""Group commit for the SQLite store: concurrent writes share one transaction and one durable
commit, each op inside its own savepoint, so one that fails takes no other op with it.

Writes queue on the event loop. While no batch is in flight, everything queued (up to
MAX_BATCH ops) goes to the writer thread as one batch: BEGIN IMMEDIATE; per op SAVEPOINT, op,
RELEASE (ROLLBACK TO first, if it raised); one COMMIT. An op alone in its batch runs without a
savepoint: if it raises, the transaction is rolled back instead (the same outcome, without
copying every page it touches to the savepoint's journal). Every op's caller hears after that
COMMIT returned (synchronous=FULL: durable), all in one hop back to the loop. The writes that
arrive during a batch's fsync make up the next one, and a batch starts once the loop has run
what was ready (the callers just answered may write again): no timer, no wait when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from coap_auth.errors import StoreUnavailable

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], Any]
log = logging.getLogger("coap_auth.store")

# Ops one transaction takes at most: a write waits for at most the batch in flight and its own,
# each bounded (a batch's ops are short: indexed reads and a few inserts).
MAX_BATCH = 64
# Ops queued at most behind the batch in flight (16 batches): beyond, a write is refused at once
# (5.03) instead of waiting on a disk or a lock holder slower than the writes arriving.
MAX_QUEUED = 1024
# SQLite primary result codes that describe the store's condition, not a bug: BUSY, LOCKED,
# NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL (https://sqlite.org/rescode.html).
_STORE_CONDITIONS = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


def store_condition(exc: BaseException) -> bool:
    """Disk full, I/O error, locked past the busy timeout: the store, not the request. Anything
    else (a bad statement, a missing table) is our fault: a 5.00, logged. (sqlite3's own
    errors, e.g. undecodable text, carry no SQLite code: faults.)"""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return isinstance(exc, sqlite3.OperationalError) and code in _STORE_CONDITIONS


def unavailable() -> StoreUnavailable:
    return StoreUnavailable("the store cannot write now; retry shortly")


@dataclass(slots=True)
class _Queued:
    op: Op
    future: asyncio.Future[Any]


@dataclass(frozen=True, slots=True)
class _Done:
    """One op's outcome, carried back from the writer thread."""

    value: Any = None
    error: Exception | None = None


class GroupCommit:
    """The write queue of one connection, run on its (single) writer thread."""

    def __init__(
        self,
        executor: Executor,
        connection: Callable[[], sqlite3.Connection],
        max_batch: int = MAX_BATCH,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self._executor = executor
        self._connection = connection
        self._max_batch = max_batch
        self._max_queued = max_queued
        self._queue: deque[_Queued] = deque()
        self._in_flight = False  # a batch is on the writer thread
        self._starting = False  # a batch's start is scheduled on the loop
        self._idle: asyncio.Event | None = None
        # Transactions committed (read by tests and benchmarks: batches, not ops).
        self.commits = 0

    async def write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` in the next batch's transaction; its result once that batch committed.
        A caller cancelled while its op is queued drops it (it never runs); once its batch
        started, the op runs and commits all the same, unheard."""
        if len(self._queue) >= self._max_queued:
            # The disk (or a lock holder) is slower than the writes arriving: refuse more at
            # once, rather than queue them unboundedly and commit them for callers long gone.
            raise StoreUnavailable("the store is busy; retry shortly")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append(_Queued(op, future))
        if not self._in_flight:
            self._start_soon(loop)
        return await future

    async def idle(self) -> None:
        """Return once nothing is queued or in flight (what `close` waits for)."""
        while self._in_flight or self._starting or self._queue:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()

    # -- the event loop's side ---------------------------------------------------------------

    def _start_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a batch after the callbacks ready now: writes queued by them join it."""
        if not self._starting:
            self._starting = True
            loop.call_soon(self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._starting = False
        batch: list[_Queued] = []
        while self._queue and len(batch) < self._max_batch:
            queued = self._queue.popleft()
            if not queued.future.done():  # cancelled while queued: dropped, never run
                batch.append(queued)
        if not batch:
            self._went_idle()
            return
        try:
            self._executor.submit(self._run_batch, loop, batch)
        except BaseException as exc:  # the executor shut down (closed store), or worse
            self._fail(batch, exc)
            self._went_idle()
            raise
        self._in_flight = True

    def _finished(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[_Queued],
        outcome: list[_Done] | BaseException,
    ) -> None:
        self._in_flight = False
        try:
            if isinstance(outcome, BaseException):
                self._fail(batch, outcome)
            else:
                for queued, done in zip(batch, outcome, strict=True):
                    if queued.future.done():
                        continue  # cancelled after its batch started: committed, unheard
                    if done.error is None:
                        queued.future.set_result(done.value)
                    else:
                        queued.future.set_exception(_for_caller(done.error))
        finally:
            # Whatever arrived meanwhile, or arrives from the callers just answered, is the
            # next batch.
            if self._queue:
                self._start_soon(loop)
            else:
                self._went_idle()

    def _fail(self, batch: list[_Queued], error: BaseException) -> None:
        """The batch's transaction failed (BEGIN, a rollback SQLite made, COMMIT): none of its
        ops is stored, and each caller hears why."""
        if store_condition(error):
            log.error("store operation failed: %s", error)
        for queued in batch:
            if not queued.future.done():
                shown = unavailable() if store_condition(error) else error
                queued.future.set_exception(shown)

    def _went_idle(self) -> None:
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    # -- the writer thread's side ------------------------------------------------------------

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Queued]) -> None:
        """Run the batch, then hand its outcome to the loop: one call, no future chained
        between the threads."""
        outcome: list[_Done] | BaseException
        try:
            outcome = self._run([q.op for q in batch])
        except BaseException as exc:
            outcome = exc
        # The loop closed meanwhile (shutdown): nobody is left to answer.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finished, loop, batch, outcome)

    def _run(self, ops: list[Op]) -> list[_Done]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # writers queue on the lock, not fail mid-way
        try:
            if len(ops) == 1:
                done = [_alone(conn, ops[0])]
                if done[0].error is not None:
                    return done  # rolled back: nothing to commit
            else:
                done = [_one(conn, op) for op in ops]
            conn.execute("COMMIT")
        except BaseException:
            # Nothing of the batch is stored; the connection leaves no transaction open (a
            # failed COMMIT, e.g. a deferred constraint, keeps it open).
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1
        return done


def _one(conn: sqlite3.Connection, op: Op) -> _Done:
    conn.execute("SAVEPOINT op")
    try:
        value = op(conn)
    except Exception as exc:
        if not conn.in_transaction:
            # SQLite rolled the whole transaction back (disk full, I/O error, out of memory):
            # what the batch's earlier ops wrote is gone, so the batch fails as one.
            raise
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return _Done(error=exc)
    conn.execute("RELEASE op")
    return _Done(value)


def _alone(conn: sqlite3.Connection, op: Op) -> _Done:
    """An op alone in its transaction: what it wrote goes with the transaction if it raises."""
    try:
        return _Done(op(conn))
    except Exception as exc:
        if not conn.in_transaction:
            raise  # SQLite rolled it back already (as in _one: the batch fails)
        conn.execute("ROLLBACK")
        return _Done(error=exc)


def _for_caller(error: Exception) -> Exception:
    """What the caller of a failed op sees: the store's condition as a 5.03, logged."""
    if store_condition(error):
        log.error("store operation failed: %s", error)
        return unavailable()
    return error
