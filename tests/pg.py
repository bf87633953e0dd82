"""PostgreSQL for tests: a fresh schema per test in the database COAP_AUTH_TEST_PG_DSN names.

Tests that need PostgreSQL are skipped, with the reason, when the variable is unset.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

PG_DSN = os.environ.get("COAP_AUTH_TEST_PG_DSN")
SKIP_REASON = "COAP_AUTH_TEST_PG_DSN is not set: PostgreSQL store not tested"
needs_postgres = pytest.mark.skipif(not PG_DSN, reason=SKIP_REASON)


async def create_schema() -> str:
    """A new, empty schema; the store under test creates its tables in it."""
    assert PG_DSN is not None
    name = f"t_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    return name


async def drop_schema(name: str) -> None:
    assert PG_DSN is not None
    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def fetch(schema: str, query: str, *args: object) -> list[asyncpg.Record]:
    """Read the database directly, bypassing the store under test."""
    assert PG_DSN is not None
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def own_role(schema: str) -> AsyncIterator[tuple[str, str]]:
    """A login role owning nothing but what it creates in `schema`; yields (role, dsn)."""
    assert PG_DSN is not None
    role = f"r_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT ALL ON SCHEMA {schema} TO {role}")
        parts = urlsplit(PG_DSN)
        netloc = f"{role}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        yield role, urlunsplit(parts._replace(netloc=netloc))
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
