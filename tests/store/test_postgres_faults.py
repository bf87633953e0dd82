"""How the PostgreSQL store behaves when the database misbehaves: a read-only standby, a
change feed whose callback fails, a stop while a query is stuck."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from coap_auth.errors import OperatorError, StoreUnavailable
from coap_auth.store import (
    Audience,
    Client,
    IssuedAccess,
    MasterKey,
    RefreshFamily,
    postgres_base,
    postgres_tokens,
)
from coap_auth.store.postgres import PostgresStore
from tests import pg

pytestmark = pg.needs_postgres

T0 = 1_700_000_000


@pytest.fixture
async def store(schema: str, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    assert pg.PG_DSN is not None
    store = PostgresStore(pg.PG_DSN, MasterKey.load(tmp_path, create=True), schema=schema)
    await store.open()
    yield store
    await store.close()


async def _cut_sessions(admin: asyncpg.Connection, role: str, store: PostgresStore) -> None:
    """End the role's sessions; return once the store has a working connection again."""
    await admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
    )
    for _ in range(20):
        try:
            await store.change_counters()  # a read: works on a standby too
            return
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    raise AssertionError("the store did not reconnect")


async def test_a_read_only_database_answers_store_unavailable(schema: str, tmp_path: Path) -> None:
    master_key = MasterKey(secrets.token_bytes(32))
    assert pg.PG_DSN is not None
    admin = await asyncpg.connect(pg.PG_DSN)
    try:
        async with pg.own_role(schema) as (role, dsn):
            store = PostgresStore(dsn, master_key, schema=schema)
            await store.open()
            try:
                await store.add_audience(Audience("thermostat", "cwt", 600, T0))

                # Failover in progress: the server this instance reaches is a standby.
                await admin.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
                await _cut_sessions(admin, role, store)
                with pytest.raises(StoreUnavailable, match="read-only"):
                    await store.add_audience(Audience("dashboard", "jwt", 600, T0))
                assert [a.audience_id for a in await store.list_audiences()] == ["thermostat"]
                # An instance starting against a standby says so.
                with pytest.raises(OperatorError, match="read-only"):
                    await PostgresStore(dsn, master_key, schema=schema).open()

                # The primary is back: writes work again without a restart.
                await admin.execute(f"ALTER ROLE {role} RESET default_transaction_read_only")
                await _cut_sessions(admin, role, store)
                await store.add_audience(Audience("dashboard", "jwt", 600, T0))
            finally:
                await store.close()
    finally:
        await admin.close()


async def test_change_feed_survives_a_failing_callback_and_stops_on_cancel(
    store: PostgresStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_base, "RECONNECT_DELAY", 0.05)
    calls = 0
    called_again = asyncio.Event()

    def changed() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the observer")
        called_again.set()

    watcher = asyncio.create_task(store.watch_changes(changed))
    try:
        await asyncio.wait_for(called_again.wait(), 5)  # it reconnected after the failure
        assert any("change feed failed (RuntimeError)" in r.getMessage() for r in caplog.records), (
            caplog.text
        )
        assert pg.PG_DSN is not None and pg.PG_DSN not in caplog.text
        # Still listening: a change made now is heard.
        called_again.clear()
        await store.add_audience(Audience("thermostat", "cwt", 600, T0))
        await asyncio.wait_for(called_again.wait(), 5)
    finally:
        watcher.cancel()
        done, _ = await asyncio.wait([watcher], timeout=1)
    assert done and watcher.cancelled()


async def test_close_does_not_wait_for_a_stuck_query(
    store: PostgresStore, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_base, "CLOSE_TIMEOUT", 0.2)
    assert pg.PG_DSN is not None
    admin = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        # Another session holds the change-feed row: the store's write waits on it.
        blocker = admin.transaction()
        await blocker.start()
        await admin.execute("SELECT * FROM change_feed FOR UPDATE")
        stuck = asyncio.create_task(store.add_audience(Audience("thermostat", "cwt", 600, T0)))
        await asyncio.sleep(0.2)
        assert not stuck.done()

        await asyncio.wait_for(store.close(), 2)

        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(stuck, 2)
        await blocker.rollback()
    finally:
        await admin.close()


async def test_a_rolled_back_refresh_is_rerun_and_only_the_committed_token_counts(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock rolls the whole refresh back and it runs again: `mint` runs twice, and only
    the token of the committed run is recorded (the service answers with that one)."""
    await store.add_audience(Audience("thermostat", "cwt", 600, T0))
    await store.add_client(Client("c", ("thermostat",), ("s",), T0, secret_digest=b"x" * 32))
    family = RefreshFamily(secrets.token_bytes(16), "c", "thermostat", "s", T0, T0, T0 + 9999)
    refresh_digest = secrets.token_bytes(32)
    first = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600)
    await store.start_family(family, refresh_digest, first)

    record_access = postgres_tokens._record_access
    calls = 0

    async def deadlocks_once(conn: Any, access: IssuedAccess, family_id: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("injected")
        await record_access(conn, access, family_id)

    monkeypatch.setattr(postgres_tokens, "_record_access", deadlocks_once)
    minted: list[IssuedAccess] = []

    def mint(_family: RefreshFamily) -> IssuedAccess:
        minted.append(IssuedAccess(secrets.token_bytes(33), "c", T0 + 700))
        return minted[-1]

    outcome = await store.rotate_refresh(
        refresh_digest,
        secrets.token_bytes(32),
        client_id="c",
        now=T0 + 5,
        grace=30,
        idle_timeout=9999,
        mint=mint,
    )
    assert outcome.status == "rotated"
    assert len(minted) == 2
    assert await store.token_status(minted[-1].token_hash) == "live"
    assert await store.token_status(minted[0].token_hash) is None
