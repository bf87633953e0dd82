"""Group commit in the SQLite store: concurrent writes share one transaction and one durable
commit; an op that fails takes nothing else with it, a commit that fails takes every op of
its batch, and nobody hears of a write before its batch committed.

A batch is made deterministic by holding the writer thread in an op of its own (`Gate`) while
the writes under test queue behind it: they are then the next batch, in order.
"""

from __future__ import annotations

import asyncio
import resource
import secrets
import signal
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from coap_auth.errors import StoreUnavailable
from coap_auth.store import Audience, Client, IssuedAccess, MasterKey, RefreshFamily, SqliteStore
from coap_auth.store.sqlite_commit import MAX_BATCH, MAX_QUEUED

T0 = 1_700_000_000
WAIT = 10  # s, at most, for the writer thread to reach the gate


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore.in_data_dir(tmp_path, MasterKey(secrets.token_bytes(32)))
    await store.open()
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    await store.add_client(
        Client("sensor-1", ("thermostat",), ("temp:read",), T0, secret_digest=bytes(32)), "operator"
    )
    yield store
    await store.close()


def _family() -> RefreshFamily:
    return RefreshFamily(
        secrets.token_bytes(16), "sensor-1", "thermostat", "temp:read", T0, T0, T0 + 3600
    )


def _access() -> IssuedAccess:
    return IssuedAccess(secrets.token_bytes(16), "sensor-1", T0 + 600)


Grant = tuple[RefreshFamily, bytes, IssuedAccess]


def _grants(n: int) -> list[Grant]:
    return [(_family(), secrets.token_bytes(32), _access()) for _ in range(n)]


async def _stored(store: SqliteStore, grant: Grant) -> bool:
    """Whether the grant is stored whole (family and access record); asserts it is not half."""
    family, _, access = grant
    listed = family.family_id in {f.family_id for f in await store.list_families(None, T0)}
    recorded = await store.token_status(access.token_hash) is not None
    assert listed == recorded, "half a grant stored"
    return listed


@contextmanager
def _counting_transactions(store: SqliteStore) -> Iterator[list[str]]:
    """Every write transaction the connection begins, as SQLite traces it."""
    begun: list[str] = []
    connection = store.database.connection
    connection.set_trace_callback(
        lambda sql: begun.append(sql) if sql == "BEGIN IMMEDIATE" else None
    )
    try:
        yield begun
    finally:
        connection.set_trace_callback(None)


class Gate:
    """An op that holds the writer thread until opened, so what is written meanwhile queues
    into one batch behind it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, _conn: sqlite3.Connection) -> None:
        self.entered.set()
        assert self.opened.wait(WAIT)

    async def hold(self, store: SqliteStore) -> asyncio.Task[None]:
        task = asyncio.create_task(store.database.write(self))
        assert await asyncio.to_thread(self.entered.wait, WAIT)
        return task


def _queue(store: SqliteStore, grants: list[Grant]) -> list[asyncio.Task[bool]]:
    return [asyncio.create_task(store.start_family(*grant)) for grant in grants]


async def test_concurrent_grants_share_commits(store: SqliteStore) -> None:
    grants = _grants(40)
    before = store.database.commits
    with _counting_transactions(store) as begun:
        written = await asyncio.gather(*(store.start_family(*grant) for grant in grants))

    assert written == [True] * len(grants)
    # All queued in the same turn of the loop, before the batch starts: one transaction.
    assert len(begun) == 1, begun
    assert store.database.commits - before == len(begun)
    assert all([await _stored(store, grant) for grant in grants])


async def test_a_batch_is_capped(store: SqliteStore) -> None:
    gate = Gate()
    held = await gate.hold(store)
    grants = _grants(MAX_BATCH + 3)
    with _counting_transactions(store) as begun:
        tasks = _queue(store, grants)
        await asyncio.sleep(0)  # every task queues its write behind the gate
        gate.opened.set()
        await held
        assert await asyncio.gather(*tasks) == [True] * len(grants)
    assert len(begun) == 2  # MAX_BATCH, then the 3 left


async def test_a_failing_op_loses_nothing_else_and_leaves_no_half_write(
    store: SqliteStore,
) -> None:
    first = _grants(1)[0]
    assert await store.start_family(*first)
    gate = Gate()
    held = await gate.hold(store)
    before = _grants(3)
    # Its family is inserted, then its refresh token collides: the op fails half-way.
    failing: Grant = (_family(), first[1], _access())
    after = _grants(3)
    with _counting_transactions(store) as begun:
        tasks = _queue(store, [*before, failing, *after])
        await asyncio.sleep(0)
        gate.opened.set()
        await held
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(begun) == 1, "not one batch"

    assert isinstance(results[3], sqlite3.IntegrityError)
    assert results[:3] == results[4:] == [True] * 3
    assert all([await _stored(store, grant) for grant in (*before, *after)])
    assert not await _stored(store, failing)
    assert await store.database.run(lambda: store.database.connection.in_transaction) is False


async def test_an_op_alone_in_its_batch_that_fails_leaves_no_half_write(
    store: SqliteStore,
) -> None:
    """A batch of one op runs without a savepoint: its transaction is rolled back instead."""
    first = _grants(1)[0]
    assert await store.start_family(*first)
    failing: Grant = (_family(), first[1], _access())  # its refresh token collides
    with _counting_transactions(store) as begun:
        with pytest.raises(sqlite3.IntegrityError):
            await store.start_family(*failing)
    assert len(begun) == 1
    assert not await _stored(store, failing)
    assert await store.database.run(lambda: store.database.connection.in_transaction) is False
    assert await store.start_family(*_grants(1)[0])


@contextmanager
def _file_writes_fail() -> Iterator[Any]:
    """What the returned op starts (in the writer thread, just before the batch's COMMIT) and
    leaving the block ends: every write to a file fails (EFBIG), as on a disk that fails.
    SIGXFSZ, which would end the process, is ignored meanwhile."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def fail_file_writes(_conn: sqlite3.Connection) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, limit[1]))

    try:
        yield fail_file_writes
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


async def test_a_failed_commit_fails_the_whole_batch_and_changes_nothing(
    store: SqliteStore,
) -> None:
    counters = await store.change_counters()
    gate = Gate()
    held = await gate.hold(store)
    grants = _grants(5)
    with _file_writes_fail() as fail_file_writes, _counting_transactions(store) as begun:
        tasks = _queue(store, grants)
        last = asyncio.create_task(store.database.write(fail_file_writes))
        await asyncio.sleep(0)
        gate.opened.set()
        await held
        results = await asyncio.gather(*tasks, last, return_exceptions=True)
    assert len(begun) == 1, "not one batch"

    assert all(isinstance(r, StoreUnavailable) for r in results), results
    assert not any([await _stored(store, grant) for grant in grants])
    assert await store.change_counters() == counters
    assert await store.database.run(lambda: store.database.connection.in_transaction) is False
    # The disk is back: the same grants are written now.
    assert await asyncio.gather(*(store.start_family(*grant) for grant in grants)) == [True] * 5
    assert all([await _stored(store, grant) for grant in grants])


async def test_a_write_cancelled_while_queued_is_dropped(store: SqliteStore) -> None:
    gate = Gate()
    held = await gate.hold(store)
    dropped, kept = _grants(2)
    tasks = _queue(store, [dropped, kept])
    await asyncio.sleep(0)
    tasks[0].cancel()
    gate.opened.set()
    await held
    assert await tasks[1] is True
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    assert not await _stored(store, dropped)
    assert await _stored(store, kept)


async def test_a_write_cancelled_once_started_still_commits(store: SqliteStore) -> None:
    before = await store.change_counters()
    gate = Gate()

    def bump_then_wait(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE change_feed SET counter = counter + 1 WHERE id = 1")
        gate(conn)

    task = asyncio.create_task(store.database.write(bump_then_wait))
    assert await asyncio.to_thread(gate.entered.wait, WAIT)
    task.cancel()
    gate.opened.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.database.run(int)  # on the writer thread, after the batch it was in
    assert (await store.change_counters()).keys == before.keys + 1


class Abort(BaseException):
    """Neither an Exception nor one asyncio treats specially."""


async def test_a_base_exception_fails_its_batch_and_leaves_no_transaction(
    store: SqliteStore,
) -> None:
    gate = Gate()
    held = await gate.hold(store)
    grants = _grants(2)

    def abort(_conn: sqlite3.Connection) -> None:
        raise Abort

    tasks = [*_queue(store, grants[:1]), asyncio.create_task(store.database.write(abort))]
    tasks += _queue(store, grants[1:])
    await asyncio.sleep(0)
    gate.opened.set()
    await held
    results = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(r, Abort) for r in results), results
    assert not any([await _stored(store, grant) for grant in grants])
    assert await store.database.run(lambda: store.database.connection.in_transaction) is False
    assert await store.start_family(*grants[0])


async def test_close_waits_for_the_writes_in_flight(tmp_path: Path) -> None:
    master_key = MasterKey(secrets.token_bytes(32))
    store = SqliteStore.in_data_dir(tmp_path, master_key)
    await store.open()
    gate = Gate()
    held = await gate.hold(store)
    grants = _grants(3)
    tasks = _queue(store, grants)
    await asyncio.sleep(0)
    closing = asyncio.create_task(store.close())
    await asyncio.sleep(0)
    assert not closing.done()
    gate.opened.set()
    await held
    assert await asyncio.gather(*tasks) == [True] * 3
    await closing
    reopened = SqliteStore.in_data_dir(tmp_path, master_key)
    await reopened.open()
    try:
        assert all([await _stored(reopened, grant) for grant in grants])
    finally:
        await reopened.close()


async def test_writes_beyond_the_queue_bound_are_refused_at_once(store: SqliteStore) -> None:
    """A writer held up (a slow disk, a lock holder) does not make writes pile up without
    bound: beyond MAX_QUEUED behind the batch in flight, a write is refused (5.03) at once,
    and changes nothing; those queued before it commit once the writer moves on."""
    gate = Gate()
    held = await gate.hold(store)
    queued = _grants(MAX_QUEUED)
    tasks = _queue(store, queued)
    await asyncio.sleep(0)  # every queued write has reached the queue
    refused = _grants(3)
    for grant in refused:
        with pytest.raises(StoreUnavailable):
            await store.start_family(*grant)
    gate.opened.set()
    await held
    assert await asyncio.gather(*tasks) == [True] * MAX_QUEUED
    assert not any([await _stored(store, grant) for grant in refused])
    assert await store.start_family(*_grants(1)[0])  # and writes go on


async def test_commits_are_durable(store: SqliteStore) -> None:
    """No answer before its write is on disk: the writer connection commits with
    synchronous=FULL in WAL mode (a SIGKILL test cannot tell, the page cache survives it)."""
    connection = store.database.connection
    assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_write_after_close_is_refused_as_unavailable(tmp_path: Path) -> None:
    """A request still running when the server stops hears 5.03, not a fault."""
    store = SqliteStore.in_data_dir(tmp_path, MasterKey(secrets.token_bytes(32)))
    await store.open()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.start_family(*_grants(1)[0])
