"""Fixtures of the store tests: one storage location per test, SQLite or PostgreSQL.

Adding a backend means adding one param here and one branch in `Backend`.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from coap_auth.store import MasterKey, SqliteStore, Store
from coap_auth.store.postgres import PostgresStore
from coap_auth.store.sqlite import DB_FILE
from tests import pg
from tests.pg import PG_DSN


@dataclass
class Backend:
    """One storage location; `open_store` gives another independent instance on it (another
    process, as far as the store can tell)."""

    name: str
    tmp_path: Path
    master_key: MasterKey
    schema: str = ""  # PostgreSQL: the test's own schema
    opened: list[Store] = field(default_factory=list)

    async def open_store(self) -> Store:
        if self.name == "sqlite":
            store: Store = SqliteStore.in_data_dir(self.tmp_path, self.master_key)
        else:
            assert PG_DSN is not None
            store = PostgresStore(PG_DSN, self.master_key, schema=self.schema)
        await store.open()
        self.opened.append(store)
        return store

    async def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the backend directly, bypassing the store under test ($1-style parameters)."""
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.tmp_path / DB_FILE)) as conn:
                return conn.execute(re.sub(r"\$\d+", "?", sql), args).fetchall()
        return [tuple(r) for r in await pg.fetch(self.schema, sql, *args)]

    async def execute(self, sql: str, *args: Any) -> None:
        """Write the backend directly, as someone with the database but not the master key
        would ($1-style parameters); committed at once."""
        if self.name == "sqlite":
            with contextlib.closing(sqlite3.connect(self.tmp_path / DB_FILE)) as conn, conn:
                conn.execute(re.sub(r"\$\d+", "?", sql), args)
            return
        await pg.fetch(self.schema, sql, *args)  # autocommit: the write is committed

    async def unspent_digests(self, family_id: bytes) -> list[bytes]:
        rows = await self.query(
            "SELECT digest FROM refresh_tokens WHERE family_id = $1 AND spent_at IS NULL",
            family_id,
        )
        return [r[0] for r in rows]

    async def unspent_refresh_tokens(self, family_id: bytes) -> int:
        return len(await self.unspent_digests(family_id))

    async def raw_files(self) -> dict[str, bytes]:
        """Everything the backend keeps its key data in, as bytes (SQLite: the db and its
        WAL; PostgreSQL: the signing_keys rows as the server stores them)."""
        if self.name == "sqlite":
            files = {}
            for suffix in ("", "-wal", "-journal"):
                path = self.tmp_path / (DB_FILE + suffix)
                if path.exists():
                    files[path.name] = path.read_bytes()
            return files
        rows = await self.query("SELECT kid, alg, state, private_key FROM signing_keys")
        return {"signing_keys": b"".join(v for r in rows for v in r if isinstance(v, bytes))}


async def back_to_version_6(backend: Backend) -> None:
    """The database as schema 6 left it: clients without a previous secret."""
    for column in ("previous_secret_digest", "previous_secret_until"):
        await backend.execute(f"ALTER TABLE clients DROP COLUMN {column}")
    if backend.name == "sqlite":
        await backend.execute("PRAGMA user_version = 6")
    else:
        await backend.execute("UPDATE schema_version SET version = 6")


async def back_to_version_5(backend: Backend) -> None:
    """The database as schema 5 left it: audiences without their profile (nor clients with a
    previous secret)."""
    await back_to_version_6(backend)
    await backend.execute("ALTER TABLE audiences DROP COLUMN profile")
    if backend.name == "sqlite":
        await backend.execute("PRAGMA user_version = 5")
    else:
        await backend.execute("UPDATE schema_version SET version = 5")


async def back_to_version_4(backend: Backend) -> None:
    """The database as schema 4 left it: access tokens without their audience, no update
    collection per requester (nor audience profiles)."""
    await back_to_version_5(backend)
    for index in ("access_tokens_listed_client", "access_tokens_listed_audience"):
        await backend.execute(f"DROP INDEX {index}")
    await backend.execute("DROP TABLE trl_requester_updates")
    await backend.execute("ALTER TABLE access_tokens DROP COLUMN audience")
    if backend.name == "sqlite":
        await backend.execute("PRAGMA user_version = 4")
    else:
        await backend.execute("UPDATE schema_version SET version = 4")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pg.needs_postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    master_key = MasterKey.load(tmp_path, create=True)
    schema = await pg.create_schema() if request.param == "postgres" else ""
    backend = Backend(request.param, tmp_path, master_key, schema)
    try:
        yield backend
    finally:
        for store in backend.opened:
            await store.close()
        if schema:
            await pg.drop_schema(schema)
