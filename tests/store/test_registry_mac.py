"""Registry rows are MACed under a key derived from the master key (issue 13).

A client or audience row changed or added with the database alone is never used (the store
answers as if it were not there), is logged in one line naming it, and is reported by
`registry_report`; the MAC covers every column; migrating a schema version 2 store gives every
existing row a valid MAC, and migrating schema 5 keeps them (its audiences are "bearer"). Run
on every backend, tampering with plain SQL as an attacker would.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.store import Audience, Client, MasterKey, Store
from coap_auth.store.audit import GENESIS, AuditEvent, entry_mac, verify_log
from coap_auth.store.records import RegistryChange
from coap_auth.store.registry_mac import AUDIENCES, CLIENTS, RegistryReport, row_mac
from coap_auth.store.rows import (
    AUDIENCE_COLUMNS,
    CLIENT_COLUMNS,
    VerifiedRows,
    audience_to_row,
    client_to_row,
    sealed_row,
)
from coap_auth.store.seal_marker import marker_path
from coap_auth.store.sqlite import DB_FILE
from coap_auth.store.sqlite_schema import SCHEMA_VERSION
from coap_auth.tokens import cose_key_from_public
from tests import pg
from tests.store.conftest import Backend, back_to_version_5, back_to_version_6

T0 = 1_700_000_000
VECTORS = Path(__file__).parent.parent / "vectors"
DEVICE_KEY = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
ATTACKER_KEY = cose_key_from_public(ed25519.Ed25519PrivateKey.generate().public_key())
SECRET_DIGEST = b"\x5a" * 32
INTROSPECT_DIGEST = b"\x6b" * 32

THERMOSTAT = Audience("thermostat", "cwt", 600, T0, introspect_secret_digest=INTROSPECT_DIGEST)
SENSOR = Client("sensor-1", ("thermostat",), ("temp:read",), T0, secret_digest=SECRET_DIGEST)
METER = Client("meter-7", ("thermostat",), ("temp:read",), T0, public_key=DEVICE_KEY)


@pytest.fixture
async def store(backend: Backend) -> Store:
    store = await backend.open_store()
    await store.add_audience(THERMOSTAT, "operator")
    await store.add_audience(Audience("dashboard", "jwt", 900, T0), "operator")
    await store.add_client(SENSOR, "operator")
    await store.add_client(METER, "operator")
    return store


async def _visible(store: Store) -> tuple[set[str], set[str]]:
    return (
        {c.client_id for c in await store.list_clients()},
        {a.audience_id for a in await store.list_audiences()},
    )


# Each: what an attacker with write access to the database (not the master key) does, and the
# (table, id) of the row it leaves unusable.
EDITS = {
    "client key replaced": (
        "UPDATE clients SET public_key = $1 WHERE client_id = 'meter-7'",
        (cbor2.dumps(ATTACKER_KEY),),
        CLIENTS,
        "meter-7",
    ),
    "client secret digest replaced": (
        "UPDATE clients SET secret_digest = $1 WHERE client_id = 'sensor-1'",
        (b"\x00" * 32,),
        CLIENTS,
        "sensor-1",
    ),
    "client scope widened": (
        "UPDATE clients SET scope = 'temp:read valve:open' WHERE client_id = 'sensor-1'",
        (),
        CLIENTS,
        "sensor-1",
    ),
    "client given another audience": (
        'UPDATE clients SET audiences = \'["thermostat", "dashboard"]\''
        " WHERE client_id = 'meter-7'",
        (),
        CLIENTS,
        "meter-7",
    ),
    "client MAC removed": (
        "UPDATE clients SET mac = NULL WHERE client_id = 'sensor-1'",
        (),
        CLIENTS,
        "sensor-1",
    ),
    "client given another row's MAC": (
        "UPDATE clients SET mac = (SELECT mac FROM clients WHERE client_id = 'meter-7')"
        " WHERE client_id = 'sensor-1'",
        (),
        CLIENTS,
        "sensor-1",
    ),
    "audience lifetime raised": (
        "UPDATE audiences SET lifetime = 999999999 WHERE audience_id = 'thermostat'",
        (),
        AUDIENCES,
        "thermostat",
    ),
    "audience introspection secret replaced": (
        "UPDATE audiences SET introspect_secret_digest = $1 WHERE audience_id = 'thermostat'",
        (b"\x00" * 32,),
        AUDIENCES,
        "thermostat",
    ),
    "audience given an introspection key": (
        "UPDATE audiences SET introspect_public_key = $1 WHERE audience_id = 'dashboard'",
        (cbor2.dumps(ATTACKER_KEY),),
        AUDIENCES,
        "dashboard",
    ),
    "audience token format changed": (
        "UPDATE audiences SET token_format = 'jwt' WHERE audience_id = 'thermostat'",
        (),
        AUDIENCES,
        "thermostat",
    ),
    "audience moved to another key family": (
        "UPDATE audiences SET key_family = 'dashboard' WHERE audience_id = 'thermostat'",
        (),
        AUDIENCES,
        "thermostat",
    ),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
async def test_a_row_changed_in_the_database_is_never_used(
    backend: Backend, store: Store, edit: str, caplog: pytest.LogCaptureFixture
) -> None:
    sql, args, table, row_id = EDITS[edit]
    await backend.execute(sql, *args)

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="coap_auth.store"):
        if table == CLIENTS:
            assert await store.get_client(row_id) is None
        else:
            assert await store.get_audience(row_id) is None
        clients, audiences = await _visible(store)
    assert row_id not in (clients if table == CLIENTS else audiences)
    # The rest of the registry is untouched and still used.
    assert clients | audiences | {row_id} == {"sensor-1", "meter-7", "thermostat", "dashboard"}
    # One line per refusal, naming the row, never a secret.
    lines = [r.getMessage() for r in caplog.records]
    kind = "client" if table == CLIENTS else "audience"
    assert lines and all(f"{kind} '{row_id}'" in line for line in lines), lines
    assert all("\n" not in line for line in lines)
    logged = "\n".join(lines)
    for secret in (SECRET_DIGEST, INTROSPECT_DIGEST):
        assert secret.hex() not in logged and repr(secret) not in logged

    report = await store.registry_report()
    assert (report.clients, report.audiences) == (2, 2)
    assert [(f.table, f.row_id) for f in report.faults] == [(table, row_id)]


@pytest.mark.parametrize("mac", ["none", "copied"])
async def test_a_rogue_row_inserted_in_the_database_is_never_used(
    backend: Backend, store: Store, mac: str
) -> None:
    """A public-key client the operator never registered: without a MAC, or with the MAC of a
    real client's row."""
    stolen = (await backend.query("SELECT mac FROM clients WHERE client_id = 'meter-7'"))[0][0]
    rogue = Client("mallory", ("thermostat",), ("temp:read",), T0, public_key=ATTACKER_KEY)
    await backend.execute(
        f"INSERT INTO clients ({', '.join(CLIENT_COLUMNS)}, mac)"
        f" VALUES ({', '.join(f'${n}' for n in range(1, len(CLIENT_COLUMNS) + 2))})",
        *client_to_row(rogue),
        None if mac == "none" else stolen,
    )
    await backend.execute(
        f"INSERT INTO audiences ({', '.join(AUDIENCE_COLUMNS)}, mac)"
        f" VALUES ({', '.join(f'${n}' for n in range(1, len(AUDIENCE_COLUMNS) + 2))})",
        *audience_to_row(Audience("rogue-rs", "cwt", 600, T0)),
        None,
    )

    assert await store.get_client("mallory") is None
    assert await store.get_audience("rogue-rs") is None
    assert await _visible(store) == ({"sensor-1", "meter-7"}, {"thermostat", "dashboard"})
    faults = (await store.registry_report()).faults
    assert sorted((f.table, f.row_id) for f in faults) == [
        (AUDIENCES, "rogue-rs"),
        (CLIENTS, "mallory"),
    ]
    reasons = {f.row_id: f.describe() for f in faults}
    expected = "it has no MAC" if mac == "none" else "its MAC does not match"
    assert expected in reasons["mallory"]


async def test_disabling_keeps_the_row_sealed_and_a_bad_row_is_not_resealed(
    backend: Backend, store: Store
) -> None:
    assert await store.disable_client("sensor-1", T0 + 1, "operator")
    assert (await store.get_client("sensor-1")) == Client(
        "sensor-1", ("thermostat",), ("temp:read",), T0, SECRET_DIGEST, None, True
    )
    # Turned back on in the database: refused, not re-enabled.
    await backend.execute("UPDATE clients SET disabled = FALSE WHERE client_id = 'sensor-1'")
    assert await store.get_client("sensor-1") is None
    # An edited row is not re-sealed by a later disable (that would launder the edit).
    await backend.execute(
        "UPDATE clients SET public_key = $1 WHERE client_id = 'meter-7'", cbor2.dumps(ATTACKER_KEY)
    )
    assert not await store.disable_client("meter-7", T0 + 2, "operator")
    faults = (await store.registry_report()).faults
    assert sorted(f.row_id for f in faults) == ["meter-7", "sensor-1"]


def _changed(value: Any) -> Any:
    """Another value of the same column."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, bytes):
        return value + b"x"
    assert value is None
    return b""  # a NULL column and an empty one are different rows


def test_the_mac_covers_every_column_and_names_its_table() -> None:
    mac = MasterKey(b"\x01" * 32).registry_mac
    for table, values in (
        (CLIENTS, client_to_row(METER)),
        (AUDIENCES, audience_to_row(THERMOSTAT)),
    ):
        reference = row_mac(mac, table, values)
        assert reference != row_mac(mac, CLIENTS if table == AUDIENCES else AUDIENCES, values)
        assert reference != row_mac(MasterKey(b"\x02" * 32).registry_mac, table, values)
        for index, value in enumerate(values):
            edited = (*values[:index], _changed(value), *values[index + 1 :])
            assert row_mac(mac, table, edited) != reference, (table, index)
    # The MAC key is not the audit chain's.
    master = MasterKey(b"\x01" * 32)
    assert master.registry_mac(b"x") != master.audit_mac(b"x")


class CountingMac:
    """A registry MAC that counts the rows it was computed over."""

    def __init__(self) -> None:
        self.calls = 0
        self._mac = MasterKey(b"\x01" * 32).registry_mac

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        return self._mac(data)


def test_a_row_is_maced_again_unless_read_exactly_as_it_verified(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mac = CountingMac()
    row = sealed_row(mac, CLIENTS, client_to_row(SENSOR))
    verified = VerifiedRows(mac)
    assert verified.mac(CLIENTS, None) is None
    assert verified.mac(CLIENTS, row) == row[-1]
    calls = mac.calls
    assert verified.mac(CLIENTS, list(row)) == row[-1] and mac.calls == calls

    # Another value in a column, or the same value of another type (one CBOR item more or
    # less, or another): checked in full, refused and logged every time, never kept.
    created = CLIENT_COLUMNS.index("created_at")
    for changed in (T0 + 1, float(T0), T0 + 1):
        edited = (*row[:created], changed, *row[created + 1 :])
        with caplog.at_level(logging.ERROR, logger="coap_auth.store"):
            caplog.clear()
            assert verified.mac(CLIENTS, edited) is None
        assert "refused the registry row of client 'sensor-1'" in caplog.text
    assert mac.calls == calls + 3
    assert verified.mac(CLIENTS, row) == row[-1] and mac.calls == calls + 3


def test_verified_rows_keep_the_newest_rows_up_to_their_limit() -> None:
    mac = CountingMac()
    rows = [
        sealed_row(mac, CLIENTS, client_to_row(replace(SENSOR, client_id=f"sensor-{n}")))
        for n in range(3)
    ]
    verified = VerifiedRows(mac, limit=2)
    for row in rows:
        assert verified.mac(CLIENTS, row) == row[-1]
    calls = mac.calls
    assert verified.mac(CLIENTS, rows[2]) == rows[2][-1] and mac.calls == calls
    assert verified.mac(CLIENTS, rows[0]) == rows[0][-1] and mac.calls == calls + 1


# -- migration from schema version 2 ----------------------------------------------------------


async def _v2_store(backend: Backend) -> None:
    """A store as schema version 2 left it: registry rows and audit entries, no MACs on rows,
    no audit head."""
    if backend.name == "sqlite":
        with contextlib.closing(sqlite3.connect(backend.tmp_path / DB_FILE)) as conn:
            conn.executescript((VECTORS / "sqlite_schema_v2.sql").read_text())
    else:
        assert pg.PG_DSN is not None
        conn = await asyncpg.connect(pg.PG_DSN, server_settings={"search_path": backend.schema})
        try:
            await conn.execute((VECTORS / "postgres_schema_v2.sql").read_text())
        finally:
            await conn.close()
    await backend.execute(
        "INSERT INTO audiences VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        *audience_to_row(THERMOSTAT)[:8],  # version 2 had no profile column
    )
    for client in (SENSOR, METER):
        await backend.execute(
            "INSERT INTO clients VALUES ($1, $2, $3, $4, $5, $6, $7)",
            *client_to_row(client)[:7],  # version 2 had no previous secret
        )
    previous = GENESIS
    for seq, event in enumerate(
        [
            AuditEvent(T0, "operator", "audience.added", "thermostat"),
            AuditEvent(T0, "operator", "client.added", "sensor-1"),
            AuditEvent(T0, "operator", "client.added", "meter-7"),
        ],
        start=1,
    ):
        previous = entry_mac(backend.master_key.audit_mac, previous, seq, event)
        await backend.execute(
            "INSERT INTO audit_log VALUES ($1, $2, $3, $4, $5, $6, $7)",
            seq,
            event.at,
            event.actor,
            event.event,
            event.subject,
            event.details_json(),
            previous,
        )


async def test_migrating_from_version_2_gives_every_row_a_valid_mac(backend: Backend) -> None:
    await _v2_store(backend)

    store = await backend.open_store()

    assert await store.registry_report() == RegistryReport(2, 1)
    assert await store.get_client("meter-7") == METER
    assert await store.get_client("sensor-1") == SENSOR
    assert await store.get_audience("thermostat") == THERMOSTAT
    # The chain is kept, the migration recorded after it, and the head ends there.
    entries = await store.audit_entries()
    assert [e.event.event for e in entries] == [
        "audience.added",
        "client.added",
        "client.added",
        "store.migrated",
    ]
    assert entries[-1].event.details == {"from": 2, "to": SCHEMA_VERSION}
    assert verify_log(backend.master_key.audit_mac, await store.audit_snapshot()).ok
    # From here on a row without a MAC is refused: the migration ran once.
    await store.close()
    backend.opened.remove(store)
    await backend.execute(
        f"INSERT INTO clients ({', '.join(CLIENT_COLUMNS)}, mac)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL)",
        *client_to_row(Client("late", ("thermostat",), ("temp:read",), T0, public_key=DEVICE_KEY)),
    )
    store = await backend.open_store()
    assert await store.get_client("late") is None
    assert [f.row_id for f in (await store.registry_report()).faults] == ["late"]
    assert len(await store.audit_entries()) == 4


async def test_rows_sealed_under_another_master_key_are_all_refused(backend: Backend) -> None:
    """A store opened with the wrong master key uses no registry row, and reports each."""
    await _v2_store(backend)
    store = await backend.open_store()
    await store.close()
    backend.opened.remove(store)
    backend.master_key = MasterKey(b"\x09" * 32)

    store = await backend.open_store()

    assert await _visible(store) == (set(), set())
    assert len((await store.registry_report()).faults) == 3


# -- schema 6: an audience's ACE profile (issue 15) ---------------------------------------------

OSCORE_RS = Audience(
    "oscore-rs",
    "cwt",
    600,
    T0,
    key_family="oscore-rs",
    key_alg="AES-CCM-16-64-128",
    profile="coap_oscore",
)
EDHOC_RS = Audience(
    "edhoc-rs", "cwt", 600, T0, introspect_public_key=DEVICE_KEY, profile="edhoc_oscore"
)


async def test_a_version_5_database_migrates_its_audiences_to_bearer(
    backend: Backend, store: Store
) -> None:
    await store.close()
    backend.opened.remove(store)
    await back_to_version_5(backend)
    store_name = "sqlite" if backend.name == "sqlite" else f"postgres-{backend.schema}"
    marker = marker_path(backend.tmp_path, store_name)
    marker.write_text("5\n")  # what coap-auth with schema 5 wrote

    store = await backend.open_store()

    # Every audience is "bearer", and the MACs sealed under schema 5 still verify.
    assert [(a.audience_id, a.profile) for a in await store.list_audiences()] == [
        ("dashboard", "bearer"),
        ("thermostat", "bearer"),
    ]
    assert await store.get_audience("thermostat") == THERMOSTAT
    assert await store.registry_report() == RegistryReport(2, 2)
    entries = await store.audit_entries()
    assert entries[-1].event.event == "store.migrated"
    assert entries[-1].event.details == {"from": 5, "to": SCHEMA_VERSION}
    assert verify_log(backend.master_key.audit_mac, await store.audit_snapshot()).ok
    assert marker.read_text() == f"{SCHEMA_VERSION}\n"
    # The new column takes the other profiles, and the audit records them.
    await store.add_audience(OSCORE_RS, "operator")
    assert await store.get_audience("oscore-rs") == OSCORE_RS
    added = (await store.audit_entries())[-1].event
    assert (added.event, added.details["profile"]) == ("audience.added", "coap_oscore")
    # Reopening migrates nothing again.
    await backend.open_store()
    assert len(await store.audit_entries()) == len(entries) + 1


async def test_the_mac_covers_a_profile_other_than_bearer(backend: Backend, store: Store) -> None:
    await store.add_audience(OSCORE_RS, "operator")
    await store.add_audience(EDHOC_RS, "operator")
    assert await store.get_audience("edhoc-rs") == EDHOC_RS
    assert (await store.get_audience("edhoc-rs")).profile == "edhoc_oscore"  # type: ignore[union-attr]
    assert (await store.registry_report()).ok
    # Downgraded to bearer tokens, or a bearer audience upgraded, with the database alone.
    await backend.execute("UPDATE audiences SET profile = 'bearer' WHERE audience_id = 'edhoc-rs'")
    await backend.execute(
        "UPDATE audiences SET profile = 'edhoc_oscore' WHERE audience_id = 'thermostat'"
    )
    assert await store.get_audience("edhoc-rs") is None
    assert await store.get_audience("thermostat") is None
    assert await store.get_audience("oscore-rs") == OSCORE_RS
    faults = (await store.registry_report()).faults
    assert sorted(f.row_id for f in faults) == ["edhoc-rs", "thermostat"]


def test_a_bearer_row_keeps_its_schema_5_mac_and_no_other_row_shares_it() -> None:
    mac = MasterKey(b"\x01" * 32).registry_mac
    values = audience_to_row(THERMOSTAT)
    assert values[-1] == "bearer"
    assert row_mac(mac, AUDIENCES, values) == row_mac(mac, AUDIENCES, values[:-1])
    for profile in ("edhoc_oscore", "coap_oscore"):
        assert row_mac(mac, AUDIENCES, (*values[:-1], profile)) != row_mac(mac, AUDIENCES, values)


# -- schema 7: a client's previous secret and the end of its overlap (issue 18) -----------------


def _rotated(client: Client) -> RegistryChange[Client]:
    return RegistryChange(
        replace(
            client,
            secret_digest=b"\x7c" * 32,
            previous_secret_digest=client.secret_digest,
            previous_secret_until=T0 + 60,
        ),
        "client.secret_rotated",
    )


@pytest.mark.parametrize(
    "edit",
    [
        "UPDATE clients SET previous_secret_until = 4102444800 WHERE client_id = 'sensor-1'",
        "UPDATE clients SET previous_secret_digest = secret_digest WHERE client_id = 'sensor-1'",
        "UPDATE clients SET previous_secret_until = NULL, previous_secret_digest = NULL"
        " WHERE client_id = 'sensor-1'",
    ],
    ids=["overlap-extended", "previous-digest-replaced", "overlap-erased"],
)
async def test_the_mac_covers_the_previous_secret_and_its_overlap(
    backend: Backend, store: Store, edit: str
) -> None:
    assert await store.update_client("sensor-1", _rotated, "operator", T0) is not None
    assert (await store.get_client("sensor-1")).previous_secret_until == T0 + 60  # type: ignore[union-attr]

    await backend.execute(edit)

    assert await store.get_client("sensor-1") is None
    assert [f.row_id for f in (await store.registry_report()).faults] == ["sensor-1"]


async def test_a_version_6_database_keeps_its_client_macs(backend: Backend, store: Store) -> None:
    await store.close()
    backend.opened.remove(store)
    await back_to_version_6(backend)
    store_name = "sqlite" if backend.name == "sqlite" else f"postgres-{backend.schema}"
    marker_path(backend.tmp_path, store_name).write_text("6\n")  # what schema 6 wrote

    store = await backend.open_store()

    assert await store.get_client("sensor-1") == SENSOR
    assert await store.get_client("meter-7") == METER
    assert await store.registry_report() == RegistryReport(2, 2)
    entries = await store.audit_entries()
    assert entries[-1].event.details == {"from": 6, "to": SCHEMA_VERSION}
    assert verify_log(backend.master_key.audit_mac, await store.audit_snapshot()).ok
    # And the new columns take a rotation.
    assert await store.update_client("sensor-1", _rotated, "operator", T0) is not None
    assert (await store.registry_report()).ok


def test_a_client_row_without_a_previous_secret_keeps_its_schema_6_mac() -> None:
    mac = MasterKey(b"\x01" * 32).registry_mac
    values = client_to_row(SENSOR)
    assert values[-2:] == (None, None)
    assert row_mac(mac, CLIENTS, values) == row_mac(mac, CLIENTS, values[:-2])
    rotated = client_to_row(_rotated(SENSOR).record)
    assert row_mac(mac, CLIENTS, rotated) != row_mac(mac, CLIENTS, values)
    # Only both at NULL leave them out: one set is MACed with both columns.
    half = (*values[:-1], T0)
    assert row_mac(mac, CLIENTS, half) not in {
        row_mac(mac, CLIENTS, values),
        row_mac(mac, CLIENTS, values[:-2]),
    }
