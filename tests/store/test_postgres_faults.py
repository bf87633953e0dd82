"""How the PostgreSQL store behaves when the database misbehaves (a read-only standby, a change
feed whose callback fails, a stop while a query is stuck, a lost race) and when writes race: a
grant against a registry change in flight, grants sharing a transaction."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
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
    postgres_database,
    postgres_grants,
    postgres_tokens,
)
from coap_auth.store.audit import UNVERIFIED_HEAD, AuditEvent
from coap_auth.store.postgres import PostgresStore
from coap_auth.store.records import Minted, RefreshOutcome, RefreshStatus, RegistryVersions
from coap_auth.store.registry_mac import CLIENTS
from coap_auth.store.rows import client_to_row, sealed_row
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
                await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")

                # Failover in progress: the server this instance reaches is a standby.
                await admin.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
                await _cut_sessions(admin, role, store)
                with pytest.raises(StoreUnavailable, match="read-only"):
                    await store.add_audience(Audience("dashboard", "jwt", 600, T0), "operator")
                assert [a.audience_id for a in await store.list_audiences()] == ["thermostat"]
                # An instance starting against a standby says so.
                with pytest.raises(OperatorError, match="read-only"):
                    await PostgresStore(dsn, master_key, schema=schema).open()

                # The primary is back: writes work again without a restart.
                await admin.execute(f"ALTER ROLE {role} RESET default_transaction_read_only")
                await _cut_sessions(admin, role, store)
                await store.add_audience(Audience("dashboard", "jwt", 600, T0), "operator")
            finally:
                await store.close()
    finally:
        await admin.close()


async def test_change_feed_survives_a_failing_callback_and_stops_on_cancel(
    store: PostgresStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_database, "RECONNECT_DELAY", 0.05)
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
        await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
        await asyncio.wait_for(called_again.wait(), 5)
    finally:
        watcher.cancel()
        done, _ = await asyncio.wait([watcher], timeout=1)
    assert done and watcher.cancelled()


async def test_close_does_not_wait_for_a_stuck_query(
    store: PostgresStore, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_database, "CLOSE_TIMEOUT", 0.2)
    assert pg.PG_DSN is not None
    admin = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        # Another session holds the change-feed row: the store's write waits on it.
        blocker = admin.transaction()
        await blocker.start()
        await admin.execute("SELECT * FROM change_feed FOR UPDATE")
        stuck = asyncio.create_task(
            store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
        )
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
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    await store.add_client(
        Client("c", ("thermostat",), ("s",), T0, secret_digest=b"x" * 32), "operator"
    )
    family = RefreshFamily(secrets.token_bytes(16), "c", "thermostat", "s", T0, T0, T0 + 9999)
    refresh_digest = secrets.token_bytes(32)
    first = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600)
    await store.start_family(family, refresh_digest, first)

    store_rotation = postgres_tokens._store_rotation
    calls = 0

    async def deadlocks_once(conn: Any, *args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.DeadlockDetectedError("injected")
        await store_rotation(conn, *args)

    monkeypatch.setattr(postgres_tokens, "_store_rotation", deadlocks_once)
    minted: list[IssuedAccess] = []

    def mint(_family: RefreshFamily) -> Minted[bytes]:
        minted.append(IssuedAccess(secrets.token_bytes(33), "c", T0 + 700))
        return Minted(minted[-1].token_hash, minted[-1])

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
    assert outcome.minted == minted[-1].token_hash  # the value of the committed run
    assert await store.token_status(minted[-1].token_hash) == "live"
    assert await store.token_status(minted[0].token_hash) is None


async def _registered(store: PostgresStore) -> RegistryVersions:
    """Audience "thermostat" and client "c" added; the versions a cached grant names."""
    await store.add_audience(Audience("thermostat", "cwt", 600, T0), "operator")
    await store.add_client(
        Client("c", ("thermostat",), ("s",), T0, secret_digest=b"x" * 32), "operator"
    )
    client, audience = await store.get_client("c"), await store.get_audience("thermostat")
    assert client is not None and audience is not None
    return RegistryVersions((("c", client.version),), (("thermostat", audience.version),))


@contextlib.asynccontextmanager
async def _in_flight(schema: str, statement: str, *args: Any) -> AsyncIterator[asyncpg.Connection]:
    """`statement` run in a transaction left open (its row locks held); yields the connection,
    whose transaction the caller commits."""
    assert pg.PG_DSN is not None
    conn = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        await conn.execute("BEGIN")
        await conn.execute(statement, *args)
        yield conn
    finally:
        await conn.close()


async def test_a_grant_waits_for_a_disable_in_flight_and_sees_it(
    store: PostgresStore, schema: str
) -> None:
    """No grant commits for a client whose disable committed before it: the grant's check
    shares the client row, so it waits for the disable holding it, then reads its MAC."""
    registry = await _registered(store)
    client = await store.get_client("c")
    assert client is not None
    disabled = sealed_row(
        store._db.master_key.registry_mac, CLIENTS, client_to_row(replace(client, disabled=True))
    )
    family = RefreshFamily(secrets.token_bytes(16), "c", "thermostat", "s", T0, T0, T0 + 9999)
    access = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600, "thermostat")
    async with _in_flight(
        schema, "UPDATE clients SET disabled = TRUE, mac = $1 WHERE client_id = 'c'", disabled[-1]
    ) as disabling:
        grant = asyncio.create_task(
            store.start_family(family, secrets.token_bytes(32), access, registry)
        )
        await asyncio.sleep(0.3)
        assert not grant.done()  # waiting on the client row
        await disabling.execute("COMMIT")
        assert await asyncio.wait_for(grant, 5) is False
    assert await store.list_families("c", T0) == []
    assert await store.token_status(access.token_hash) is None


async def test_a_refresh_waits_for_an_audience_change_in_flight_and_sees_it(
    store: PostgresStore, schema: str
) -> None:
    """The family's audience row is shared before the family is locked (the lock order), so a
    refresh whose mint named the audience as cached is stale once a change of it commits."""
    registry = await _registered(store)
    family = RefreshFamily(secrets.token_bytes(16), "c", "thermostat", "s", T0, T0, T0 + 9999)
    digest = secrets.token_bytes(32)
    first = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600, "thermostat")
    assert await store.start_family(family, digest, first, registry)

    def mint(_family: RefreshFamily) -> Minted[str]:
        access = IssuedAccess(secrets.token_bytes(33), "c", T0 + 700, "thermostat")
        return Minted("token", access, RegistryVersions(audiences=registry.audiences))

    async def rotate() -> RefreshOutcome[str]:
        return await store.rotate_refresh(
            digest,
            secrets.token_bytes(32),
            client_id="c",
            now=T0 + 5,
            grace=30,
            idle_timeout=9999,
            mint=mint,
            registry=RegistryVersions(clients=registry.clients),
        )

    async with _in_flight(
        schema, "UPDATE audiences SET mac = $1 WHERE audience_id = 'thermostat'", b"m" * 32
    ) as changing:
        refresh = asyncio.create_task(rotate())
        await asyncio.sleep(0.3)
        assert not refresh.done()  # waiting on the audience row
        await changing.execute("COMMIT")
        outcome = await asyncio.wait_for(refresh, 5)
    assert outcome.status is RefreshStatus.STALE and outcome.minted is None
    # Nothing was written: the token presented is still live.
    rows = await pg.fetch(schema, "SELECT spent_at FROM refresh_tokens WHERE digest = $1", digest)
    assert [r["spent_at"] for r in rows] == [None]


async def test_concurrent_grants_share_a_transaction_each_with_its_outcome(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grants arriving while the grant transactions are busy go in one transaction (one
    commit); a stale one is refused alone, and one that fails (a duplicate family) fails
    alone: the others of its batch are written."""
    registry = await _registered(store)
    stale = RegistryVersions((("c", b"old mac"),), registry.audiences)
    monkeypatch.setattr(postgres_grants, "GRANT_TRANSACTIONS", 1)
    write_all = postgres_grants._write_all
    batches: list[int] = []

    async def counted(conn: Any, *, batch: list[Any], verified: Any) -> list[bool]:
        batches.append(len(batch))
        return await write_all(conn, batch=batch, verified=verified)

    monkeypatch.setattr(postgres_grants, "_write_all", counted)
    taken = RefreshFamily(secrets.token_bytes(16), "c", "thermostat", "s", T0, T0, T0 + 9999)
    first = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600, "thermostat")
    assert await store.start_family(taken, secrets.token_bytes(32), first, registry)
    batches.clear()

    grants = []
    for n in range(12):
        family_id = taken.family_id if n == 5 else secrets.token_bytes(16)
        family = RefreshFamily(family_id, "c", "thermostat", "s", T0, T0, T0 + 9999)
        access = IssuedAccess(secrets.token_bytes(33), "c", T0 + 600, "thermostat")
        grants.append((family, access, stale if n % 4 == 3 else registry))
    results = await asyncio.gather(
        *(store.start_family(f, secrets.token_bytes(32), a, r) for f, a, r in grants),
        return_exceptions=True,
    )

    assert batches[0] == 12  # all in one transaction, which failed; then each alone
    assert isinstance(results[5], asyncpg.UniqueViolationError)
    expected = [n % 4 != 3 for n in range(12)]
    assert [r for n, r in enumerate(results) if n != 5] == expected[:5] + expected[6:]
    for (_, access, _), result in zip(grants, results, strict=True):
        if result is True:
            assert await store.token_status(access.token_hash) == "live"
        elif result is False:
            assert await store.token_status(access.token_hash) is None
    live = {f.family_id for f in await store.list_families("c", T0)}
    assert live == {taken.family_id} | {
        f.family_id for (f, _, _), r in zip(grants, results, strict=True) if r is True
    }


async def test_opening_an_up_to_date_schema_takes_no_table_lock(
    store: PostgresStore, schema: str, tmp_path: Path
) -> None:
    """Another instance opening (or any CLI command) while grants are being written: opening
    a schema already at this version runs no DDL, so it takes no lock a grant holds (it
    deadlocked with grants, and the command died with a traceback)."""
    async with _in_flight(schema, "LOCK TABLE refresh_families IN ROW EXCLUSIVE MODE"):
        assert pg.PG_DSN is not None
        other = PostgresStore(pg.PG_DSN, MasterKey.load(tmp_path, create=False), schema=schema)
        await asyncio.wait_for(other.open(), 10)
        await other.close()


async def test_opening_makes_a_lost_table_or_index_anew(
    store: PostgresStore, schema: str, tmp_path: Path
) -> None:
    """An up-to-date schema is only read at open, but one that lost a table or an index
    (dropped by hand) gets the schema's DDL again, which makes them anew."""
    assert pg.PG_DSN is not None
    admin = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        await admin.execute("DROP INDEX refresh_tokens_family")
        await admin.execute("DROP TABLE trl_requester_updates")
        other = PostgresStore(pg.PG_DSN, MasterKey.load(tmp_path, create=False), schema=schema)
        await other.open()
        await other.close()
        made = await admin.fetchval(
            "SELECT to_regclass('refresh_tokens_family') IS NOT NULL"
            " AND to_regclass('trl_requester_updates') IS NOT NULL"
        )
        assert made
    finally:
        await admin.close()


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        (
            "CREATE FUNCTION keep_old() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RETURN OLD; END $$;"
            " CREATE TRIGGER k1 BEFORE UPDATE ON clients FOR EACH ROW EXECUTE FUNCTION keep_old()",
            "trigger k1 on clients",
        ),
        ("CREATE RULE r1 AS ON UPDATE TO clients DO INSTEAD NOTHING", "rule r1 on clients"),
        ("ALTER TABLE audiences ENABLE ROW LEVEL SECURITY", "row security on audiences"),
        (
            # Round 4: every sealed update changes the MAC, so it cascades into a table of
            # another schema, where a trigger may do anything in coap-auth's transaction.
            "ALTER TABLE clients ADD CONSTRAINT u1 UNIQUE (client_id, mac);"
            " CREATE SCHEMA {schema}_elsewhere;"
            " CREATE TABLE {schema}_elsewhere.shadow (client_id TEXT, mac BYTEA, FOREIGN KEY"
            " (client_id, mac) REFERENCES clients (client_id, mac) ON UPDATE CASCADE)",
            "foreign key shadow_client_id_mac_fkey on {schema}_elsewhere.shadow",
        ),
    ],
)
async def test_a_trigger_rule_or_row_security_it_did_not_make_is_refused_at_open(
    store: PostgresStore, schema: str, tmp_path: Path, ddl: str, named: str
) -> None:
    """Attack (issue 17, round 3): a BEFORE UPDATE trigger returning OLD turned `clients
    disable` and `rotate-secret` into nothing while the CLI said done, and the audit head,
    recorded from the unchanged rows, verified. As SQLite's open refuses what it did not make,
    so does PostgreSQL's (every CLI command and every instance opens the store)."""
    assert pg.PG_DSN is not None
    admin = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        await admin.execute(ddl.format(schema=schema))
        other = PostgresStore(pg.PG_DSN, MasterKey.load(tmp_path, create=False), schema=schema)
        named = named.format(schema=schema)
        with pytest.raises(OperatorError, match=f"holds what coap-auth did not make: {named}"):
            await other.open()
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema}_elsewhere CASCADE")
        await admin.close()


async def test_the_change_feed_gives_no_digest_of_a_head_put_back(
    store: PostgresStore, schema: str
) -> None:
    """Attack (issue 17, round 3, F1), PostgreSQL's half (tests/test_registry_head_putback.py
    runs it end to end on SQLite): the registry value the change feed gives readers is the
    digest of a verified, current audit head only; a digest or a whole older head put back
    by hand reads as UNVERIFIED_HEAD, which no digest equals, so every reader reloads."""
    assert pg.PG_DSN is not None
    trusted = (await store.change_counters()).registry
    assert trusted not in (b"", UNVERIFIED_HEAD)
    admin = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": schema})
    try:
        older = await admin.fetchrow("SELECT seq, last_mac, registry, mac FROM audit_head")
        await store.append_audit([AuditEvent(1, "operator", "test.event", "x")])
        assert (await store.change_counters()).registry == trusted  # a head that moved on
        await admin.execute("UPDATE audit_head SET registry = $1", b"\x00" * 32)
        assert (await store.change_counters()).registry == UNVERIFIED_HEAD
        await admin.execute(
            "UPDATE audit_head SET seq = $1, last_mac = $2, registry = $3, mac = $4", *older
        )
        assert (await store.change_counters()).registry == UNVERIFIED_HEAD
    finally:
        await admin.close()
