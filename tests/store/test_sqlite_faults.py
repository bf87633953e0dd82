"""SQLite errors: the store's condition (read-only, full, busy) is a 5.03 the device retries;
a bad statement is our bug and stays a fault (5.00, logged with its stack), never a 5.03 that
would hide it behind retries."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coap_auth.errors import StoreUnavailable
from coap_auth.store import Audience, MasterKey, SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore.in_data_dir(tmp_path, MasterKey(secrets.token_bytes(32)))
    await store.open()
    yield store
    await store.close()


async def test_a_read_only_database_is_unavailable_and_changes_nothing(
    store: SqliteStore,
) -> None:
    connection = store.database.connection
    connection.execute("PRAGMA query_only=ON")  # SQLITE_READONLY on the next write

    with pytest.raises(StoreUnavailable):
        await store.add_audience(Audience("thermostat", "cwt", 600, 0), "operator")

    connection.execute("PRAGMA query_only=OFF")
    assert await store.list_audiences() == []


async def test_a_bad_statement_is_a_fault_not_unavailability(store: SqliteStore) -> None:
    def bad_statement() -> None:
        store.database.connection.execute("SELECT 1 FROM no_such_table")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await store.database.run(bad_statement)
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        await store.database.write(lambda conn: conn.execute("SELECT 1 FROM no_such_table"))
