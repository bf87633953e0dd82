"""RFC 9770 §5 and §6.2 on every backend: each TRL requester (a client or an audience) sees
only the hashes of tokens issued to it or for it, in full reads, and has its own update
collection: only the updates that changed its hashes, numbered in its own sequence, pruned
to its own last ones. And the migration from schema 4, which gives the access tokens already
recorded their audience and builds the collections from the updates kept.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from contextlib import closing
from pathlib import Path

import cbor2
import pytest

from coap_auth.errors import OperatorError
from coap_auth.store import (
    Audience,
    Client,
    IssuedAccess,
    MasterKey,
    RefreshFamily,
    SqliteStore,
    Store,
)
from coap_auth.store.audit import verify_log
from coap_auth.store.records import TrlUpdate
from coap_auth.store.seal_marker import marker_path
from coap_auth.store.sqlite import DB_FILE
from coap_auth.store.sqlite_schema import SCHEMA_VERSION
from tests.store.conftest import Backend, back_to_version_4

T0 = 1_700_000_000
LIFETIME = 30 * 24 * 3600
SENSOR_1, SENSOR_2, THERMOSTAT, LOCK = "sensor-1", "sensor-2", "thermostat", "lock"


async def _registered(backend: Backend) -> Store:
    """Audiences `thermostat` and `lock`; `sensor-1` may reach the thermostat, `sensor-2`
    both."""
    store = await backend.open_store()
    for audience_id in (THERMOSTAT, LOCK):
        await store.add_audience(Audience(audience_id, "cwt", 600, T0), "operator")
    for client_id, audiences in ((SENSOR_1, (THERMOSTAT,)), (SENSOR_2, (THERMOSTAT, LOCK))):
        await store.add_client(
            Client(client_id, audiences, ("temp:read",), T0, secret_digest=bytes(32)), "operator"
        )
    return store


async def _issue(store: Store, client_id: str, audience: str, exp: int) -> bytes:
    """A grant of `client_id` for `audience` (a new refresh family); its token's hash."""
    family = RefreshFamily(
        family_id=secrets.token_bytes(16),
        client_id=client_id,
        audience=audience,
        scope="temp:read",
        created_at=T0,
        last_used_at=T0,
        expires_at=T0 + LIFETIME,
    )
    access = IssuedAccess(b"\x01" + secrets.token_bytes(32), client_id, exp, audience)
    await store.start_family(family, secrets.token_bytes(32), access)
    return access.token_hash


def _seen(updates: list[TrlUpdate]) -> list[tuple[int, tuple[bytes, ...], tuple[bytes, ...]]]:
    return [(u.seq, u.removed, u.added) for u in updates]


async def test_each_requester_has_its_own_update_collection(backend: Backend) -> None:
    """RFC 9770 §6.2: an update becomes a series item of each requester whose hashes it
    changes, holding only those, numbered in that requester's own sequence; a requester it
    does not affect gets nothing."""
    store = await _registered(backend)
    t1 = await _issue(store, SENSOR_1, THERMOSTAT, T0 + 100)
    t2 = await _issue(store, SENSOR_2, THERMOSTAT, T0 + 200)
    t3 = await _issue(store, SENSOR_2, LOCK, T0 + 100)
    assert await store.revoke_access(t1, None, T0 + 1, "operator")  # list update 1
    assert (
        await store.kill_families(SENSOR_2, "stolen", T0 + 2, "operator") == 2
    )  # update 2: t2, t3
    t2_t3 = tuple(sorted([t2, t3]))  # one update lists its hashes in order
    everyone = (SENSOR_1, SENSOR_2, THERMOSTAT, LOCK, "stranger")

    full = {r: await store.trl(r) for r in everyone}
    assert full == {
        SENSOR_1: ([t1], 1, 1),
        SENSOR_2: (list(t2_t3), 1, 1),
        THERMOSTAT: ([t1, t2], 1, 2),
        LOCK: ([t3], 1, 1),
        "stranger": ([], 0, 0),  # no update pertained to it: an empty collection
    }
    assert {r: await store.trl_bounds(r) for r in everyone} == {r: full[r][1:] for r in everyone}
    # No requester: the whole list and its history.
    assert await store.trl() == ([t1, *t2_t3], 1, 2)
    assert await store.trl_bounds() == (1, 2)

    diffs = {r: _seen(await store.trl_updates(1, 10, r)) for r in everyone}
    assert diffs == {
        SENSOR_1: [(1, (), (t1,))],
        SENSOR_2: [(1, (), t2_t3)],
        THERMOSTAT: [(2, (), (t2,)), (1, (), (t1,))],
        LOCK: [(1, (), (t3,))],
        "stranger": [],
    }
    assert _seen(await store.trl_updates(1, 2)) == [(2, (), t2_t3), (1, (), (t1,))]

    # Whose collections grew after a given update of the whole list (who is to be notified).
    assert await store.trl_changes_since(0) == (
        frozenset({SENSOR_1, SENSOR_2, THERMOSTAT, LOCK}),
        2,
    )
    assert await store.trl_changes_since(1) == (frozenset({SENSOR_2, THERMOSTAT, LOCK}), 2)
    assert await store.trl_changes_since(2) == (frozenset(), 2)
    assert await store.trl_changes_since(None) == (frozenset(), 2)

    # Expiry takes t1 and t3 off in one update: each requester's removal is its own item.
    assert await store.sweep_expired(T0 + 100, keep_updates=32) == 2
    removed = {r: _seen(await store.trl_updates(1, 10, r))[0] for r in everyone[:4]}
    assert removed == {
        SENSOR_1: (2, (t1,), ()),
        SENSOR_2: (2, (t3,), ()),
        THERMOSTAT: (3, (t1,), ()),
        LOCK: (2, (t3,), ()),
    }
    assert await store.trl_changes_since(2) == (
        frozenset({SENSOR_1, SENSOR_2, THERMOSTAT, LOCK}),
        3,
    )
    after = {r: (await store.trl(r))[0] for r in everyone}
    assert after == {SENSOR_1: [], SENSOR_2: [t2], THERMOSTAT: [t2], LOCK: [], "stranger": []}
    assert await store.trl_bounds("stranger") == (0, 0)


async def test_an_id_that_is_client_and_audience_sees_both_once(backend: Backend) -> None:
    """A device registered under one id as client and as resource server: one series item
    per update, each hash in it once."""
    store = await _registered(backend)
    await store.add_audience(Audience("gateway", "cwt", 600, T0), "operator")
    await store.add_client(
        Client("gateway", ("gateway", LOCK), ("temp:read",), T0, secret_digest=bytes(32)),
        "operator",
    )
    to_itself = await _issue(store, "gateway", "gateway", T0 + 100)
    to_lock = await _issue(store, "gateway", LOCK, T0 + 100)
    for_it = await _issue(store, SENSOR_1, "gateway", T0 + 100)
    await _issue(store, SENSOR_1, THERMOSTAT, T0 + 100)
    assert await store.kill_families("gateway", "lost", T0 + 1, "operator") == 2
    assert await store.kill_families(SENSOR_1, "lost", T0 + 2, "operator") == 2

    hashes, first, last = await store.trl("gateway")
    assert (hashes, first, last) == ([*sorted([to_itself, to_lock]), for_it], 1, 2)
    assert _seen(await store.trl_updates(1, 2, "gateway")) == [
        (2, (), (for_it,)),
        (1, (), tuple(sorted([to_itself, to_lock]))),
    ]


async def test_pruning_keeps_each_requester_its_own_last_updates(backend: Backend) -> None:
    """`keep_updates` counts per history: a requester whose last update is older than the
    whole list's kept window still has it (RFC 9770 §6.2: its MAX_N most recent), and
    numbering goes on after pruning."""
    store = await _registered(backend)
    lock_token = await _issue(store, SENSOR_2, LOCK, T0 + 600)
    assert await store.revoke_access(lock_token, None, T0 + 1, "operator")  # list update 1
    for n in range(4):  # list updates 2-5: sensor-1's and the thermostat's 1-4
        token = await _issue(store, SENSOR_1, THERMOSTAT, T0 + 600)
        assert await store.revoke_access(token, None, T0 + 2 + n, "operator")

    assert await store.sweep_expired(T0 + 10, keep_updates=2) == 0
    assert await store.trl_bounds() == (4, 5)
    assert await store.trl_bounds(SENSOR_1) == await store.trl_bounds(THERMOSTAT) == (3, 4)
    # The lock's only update is far out of the list's window, and still its newest.
    assert await store.trl_bounds(LOCK) == await store.trl_bounds(SENSOR_2) == (1, 1)
    assert _seen(await store.trl_updates(1, 1, LOCK)) == [(1, (), (lock_token,))]

    token = await _issue(store, SENSOR_1, THERMOSTAT, T0 + 600)
    assert await store.revoke_access(token, None, T0 + 20, "operator")
    assert await store.trl_bounds(SENSOR_1) == (3, 5)
    assert _seen(await store.trl_updates(5, 5, SENSOR_1)) == [(5, (), (token,))]
    assert await store.trl_bounds(LOCK) == (1, 1)


async def test_a_requester_numbering_has_no_gaps_across_instances(backend: Backend) -> None:
    """Two instances revoking tokens for one audience at once: its collection is numbered
    1..N, each update once (the list's own numbering is checked in the contract tests)."""
    store = await _registered(backend)
    other = await backend.open_store()
    tokens = [await _issue(store, SENSOR_1, THERMOSTAT, T0 + 600) for _ in range(12)]

    async def revoke(on: Store, mine: list[bytes]) -> None:
        for token in mine:
            assert await on.revoke_access(token, None, T0 + 1, "operator")

    await asyncio.gather(revoke(store, tokens[::2]), revoke(other, tokens[1::2]))

    updates = await store.trl_updates(1, 100, THERMOSTAT)
    assert [u.seq for u in updates] == list(range(12, 0, -1))
    assert sorted(h for u in updates for h in u.added) == sorted(tokens)
    assert await other.trl_bounds(SENSOR_1) == (1, 12)


async def test_an_update_of_many_hashes_is_split_whole(tmp_path: Path) -> None:
    """SQLite: one sweep delisting more hashes than older builds bind parameters in one
    statement (999): every requester's item holds all of its own."""
    store = SqliteStore.in_data_dir(tmp_path, MasterKey.load(tmp_path, create=True))
    await store.open()
    try:
        mine = [b"\x01" + secrets.token_bytes(32) for _ in range(1200)]
        others = [b"\x01" + secrets.token_bytes(32) for _ in range(300)]
        with closing(sqlite3.connect(tmp_path / DB_FILE)) as conn, conn:
            conn.executemany(
                "INSERT INTO access_tokens (token_hash, client_id, exp, revoked_at, audience)"
                " VALUES (?, ?, ?, ?, ?)",
                [(h, SENSOR_1, T0 + 600, T0, THERMOSTAT) for h in mine]
                + [(h, SENSOR_2, T0 + 600, T0, LOCK) for h in others],
            )
        assert await store.sweep_expired(T0 + 600, keep_updates=32) == 1500
        for requester, hashes in ((THERMOSTAT, mine), (SENSOR_1, mine), (LOCK, others)):
            (update,) = await store.trl_updates(1, 1, requester)
            assert sorted(update.removed) == sorted(hashes)
        (whole,) = await store.trl_updates(1, 1)
        assert len(whole.removed) == 1500
    finally:
        await store.close()


# -- migration from schema 4 -------------------------------------------------------------------


def _marker(backend: Backend) -> str:
    return "sqlite" if backend.name == "sqlite" else f"postgres-{backend.schema}"


async def _version_4_store(backend: Backend) -> tuple[bytes, bytes]:
    """A database as schema 4 left it, in a data directory sealed at 4: a revoked token of a
    refresh family (sensor-2, for the lock, list update 1), and a revoked one outside any
    family (sensor-1, list update 2). Returns their hashes."""
    store = await _registered(backend)
    in_family = await _issue(store, SENSOR_2, LOCK, T0 + 600)
    assert await store.revoke_access(in_family, None, T0 + 1, "operator")
    await store.close()
    backend.opened.remove(store)
    await back_to_version_4(backend)
    orphan = b"\x01" + secrets.token_bytes(32)
    await backend.execute(
        "INSERT INTO access_tokens (token_hash, family_id, client_id, exp, revoked_at)"
        " VALUES ($1, NULL, $2, $3, $4)",
        orphan,
        SENSOR_1,
        T0 + 600,
        T0 + 1,
    )
    await backend.execute(
        "INSERT INTO trl_updates (seq, at, removed, added) VALUES (2, $1, $2, $3)",
        T0 + 1,
        cbor2.dumps([]),
        cbor2.dumps([orphan]),
    )
    return in_family, orphan


async def test_a_version_4_database_migrates_and_gives_tokens_their_audience(
    backend: Backend,
) -> None:
    in_family, orphan = await _version_4_store(backend)
    marker = marker_path(backend.tmp_path, _marker(backend))
    marker.write_text("4\n")  # what coap-auth with schema 4 wrote

    store = await backend.open_store()

    rows = await backend.query("SELECT token_hash, audience FROM access_tokens")
    assert dict(rows) == {in_family: LOCK, orphan: None}
    # The family's token pertains to its client and its audience; the other to its client.
    assert (await store.trl(SENSOR_2))[0] == [in_family]
    assert (await store.trl(LOCK))[0] == [in_family]
    assert (await store.trl(SENSOR_1))[0] == [orphan]
    assert (await store.trl(THERMOSTAT))[0] == []
    # Each requester's collection is built from the updates kept, numbered from 1.
    assert _seen(await store.trl_updates(1, 10, SENSOR_2)) == [(1, (), (in_family,))]
    assert _seen(await store.trl_updates(1, 10, LOCK)) == [(1, (), (in_family,))]
    assert _seen(await store.trl_updates(1, 10, SENSOR_1)) == [(1, (), (orphan,))]
    assert await store.trl_bounds(THERMOSTAT) == (0, 0)
    assert await store.trl_changes_since(1) == (frozenset({SENSOR_1}), 2)
    # The migration is recorded after the chain, and the log still verifies to its head.
    entries = await store.audit_entries()
    assert entries[-1].event.event == "store.migrated"
    assert entries[-1].event.details == {"from": 4, "to": SCHEMA_VERSION}
    assert verify_log(backend.master_key.audit_mac, await store.audit_snapshot()).ok
    assert marker.read_text() == f"{SCHEMA_VERSION}\n"
    if backend.name == "sqlite":
        version = await backend.query("PRAGMA user_version")
    else:
        version = await backend.query("SELECT version FROM schema_version")
    assert version == [(SCHEMA_VERSION,)]
    # New tokens record their audience.
    fresh = await _issue(store, SENSOR_1, THERMOSTAT, T0 + 600)
    assert await store.revoke_access(fresh, None, T0 + 2, "operator")
    assert await store.trl(THERMOSTAT) == ([fresh], 1, 1)
    assert await store.trl(SENSOR_1) == ([orphan, fresh], 1, 2)
    # Reopening migrates nothing again.
    await backend.open_store()
    assert len(await store.audit_entries()) == len(entries) + 1  # the revocation only


async def test_a_version_4_database_in_a_directory_sealed_at_5_is_refused(
    backend: Backend,
) -> None:
    await _version_4_store(backend)
    with pytest.raises(OperatorError) as raised:
        await backend.open_store()
    assert "database claims schema v4" in raised.value.description
