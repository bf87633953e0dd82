"""The data directory remembers that its store was sealed (issue 13, downgrade): a database
that claims an older schema is refused, not sealed again; a legitimate older one (no marker)
migrates. On every backend, plus the pure decision.
"""

from __future__ import annotations

import cbor2
import pytest

from coap_auth.errors import OperatorError
from coap_auth.store import Client, MasterKey, SqliteStore, Store
from coap_auth.store.audit import LEGACY_HEAD_DOMAIN, verify_log
from coap_auth.store.postgres import PostgresStore
from coap_auth.store.seal_marker import marker_path, refusal
from coap_auth.store.sqlite_schema import SCHEMA_VERSION
from tests.pg import PG_DSN
from tests.store.conftest import Backend, back_to_version_4

T0 = 1_700_000_000
DOWNGRADE = (
    "database claims schema v{} but this data directory has sealed it before (downgrade?);"
    " put an older SQLite backup back with `coap-auth restore`, which checks it under the"
    " master key; for a PostgreSQL dump restored on purpose, remove the sealed-schema.* file"
    " in the data directory"
)


@pytest.mark.parametrize(
    ("db_version", "sealed", "refused"),
    [
        (2, None, False),
        (3, None, False),
        (2, 4, True),
        (3, 4, True),
        (4, 4, False),
        (0, 4, True),
        (4, 5, True),
        (5, 5, False),
    ],
)
def test_refusal(db_version: int, sealed: int | None, refused: bool) -> None:
    assert (refusal(db_version, sealed) is not None) == refused
    if refused:
        assert refusal(db_version, sealed) == DOWNGRADE.format(db_version)


def _marker(backend: Backend) -> str:
    return "sqlite" if backend.name == "sqlite" else f"postgres-{backend.schema}"


async def _unmarked_store(backend: Backend) -> Store:
    """Another store on the same database whose master key knows no data directory."""
    key = MasterKey((backend.tmp_path / "master.key").read_bytes())
    if backend.name == "sqlite":
        store: Store = SqliteStore.in_data_dir(backend.tmp_path, key)
    else:
        assert PG_DSN is not None
        store = PostgresStore(PG_DSN, key, schema=backend.schema)
    await store.open()
    backend.opened.append(store)
    return store


async def _back_to_version_3(backend: Backend) -> None:
    """The database as schema 3 left it: no registry digest, the head under its v1 MAC."""
    await back_to_version_4(backend)
    (seq, last_mac), *_ = await backend.query("SELECT seq, last_mac FROM audit_head")
    legacy = backend.master_key.audit_mac(
        cbor2.dumps([LEGACY_HEAD_DOMAIN, seq, last_mac], canonical=True)
    )
    await backend.execute("ALTER TABLE audit_head DROP COLUMN registry")
    await backend.execute("UPDATE audit_head SET mac = $1", legacy)
    if backend.name == "sqlite":
        await backend.execute("PRAGMA user_version = 3")
    else:
        await backend.execute("UPDATE schema_version SET version = 3")


async def test_open_writes_a_private_marker(backend: Backend) -> None:
    store = await backend.open_store()
    path = marker_path(backend.tmp_path, _marker(backend))
    assert path.read_text() == f"{SCHEMA_VERSION}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    await store.close()
    path.unlink()
    await backend.open_store()  # every start writes it again
    assert path.read_text() == f"{SCHEMA_VERSION}\n"


async def test_a_downgraded_database_is_refused(backend: Backend) -> None:
    store = await backend.open_store()
    await store.add_client(Client("sensor-1", (), (), T0, secret_digest=bytes(32)), "operator")
    await _back_to_version_3(backend)
    with pytest.raises(OperatorError) as raised:
        await backend.open_store()
    assert raised.value.description == DOWNGRADE.format(3)


async def test_a_version_3_database_without_a_marker_migrates(backend: Backend) -> None:
    store = await backend.open_store()
    await store.add_client(Client("sensor-1", (), (), T0, secret_digest=bytes(32)), "operator")
    await _back_to_version_3(backend)
    marker_path(backend.tmp_path, _marker(backend)).unlink()
    migrated = await _unmarked_store(backend)
    assert verify_log(backend.master_key.audit_mac, await migrated.audit_snapshot()).ok
    entries = await migrated.audit_entries()
    assert entries[-1].event.details == {"from": 3, "to": SCHEMA_VERSION}
    # The digest now follows registry writes: deleting a row shows.
    await backend.execute("DELETE FROM clients")
    assert not verify_log(backend.master_key.audit_mac, await migrated.audit_snapshot()).ok
