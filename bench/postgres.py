"""The PostgreSQL the bench's shared-store runs use: whether it answers, a fresh schema for each
run (dropped afterwards, as tests/pg.py does per test), and the CPU its processes here use."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from bench.processes import cpu_seconds

# What .ci/run gives the tests when a server answers on 127.0.0.1:5432.
LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
CONNECT_TIMEOUT = 5.0  # s


@dataclass(frozen=True)
class PostgresTarget:
    """The database the PostgreSQL runs use, or why there were none."""

    dsn: str = field(repr=False)  # it may hold a password: `shown` is for printing
    version: str = ""  # the server's, once it answered
    local: bool = False  # its processes run on this machine (their CPU is measured)
    skipped: str = ""  # why no PostgreSQL run was made; "" when they were

    @property
    def shown(self) -> str:
        """The DSN as the report may print it: no password."""
        parts = urlsplit(self.dsn)
        if parts.password is None:
            return self.dsn
        netloc = f"{parts.username}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))


def default_dsn() -> str:
    """The tests' database (COAP_AUTH_TEST_PG_DSN), else the local one CI uses."""
    return os.environ.get("COAP_AUTH_TEST_PG_DSN") or LOCAL_DSN


async def probe(dsn: str) -> PostgresTarget:
    """Whether the bench can run on `dsn`: the server answers and a schema can be made in it
    (one is made and dropped). Never raises: a problem is the returned target's `skipped`."""
    if not dsn:
        return PostgresTarget(dsn, skipped="no PostgreSQL DSN given (--pg-dsn '')")
    target = PostgresTarget(dsn)
    try:
        import asyncpg
    except ImportError:
        return PostgresTarget(dsn, skipped="asyncpg is not installed: pip install -e '.[postgres]'")
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
        try:
            version = str(await conn.fetchval("SHOW server_version")).split()[0]
        finally:
            await conn.close()
        async with fresh_schema(dsn):
            pass
    except (
        OSError,
        TimeoutError,
        ValueError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return PostgresTarget(dsn, skipped=f"PostgreSQL at {target.shown}: {why}")
    return PostgresTarget(dsn, version=version, local=bool(_postgres_processes()))


@contextlib.asynccontextmanager
async def fresh_schema(dsn: str) -> AsyncIterator[str]:
    """A new, empty schema in the database `dsn` names, dropped with all it holds on exit;
    yields its name (for COAP_AUTH_STORE_SCHEMA)."""
    import asyncpg

    name = f"bench_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
    finally:
        await conn.close()
    try:
        yield name
    finally:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        finally:
            await conn.close()


class ClusterCpu:
    """User + system CPU seconds of every `postgres` process on this machine (postmaster,
    backends, WAL writer, checkpointer; whoever they serve), as a running total from the first
    call: each call adds what every process used since the previous one, counting a process
    first seen now from zero (a backend that started meanwhile). A process that exited between
    two calls takes its last share with it (the bench's pools stay connected through a window;
    other clients' short connections may be undercounted). Always 0.0 when PostgreSQL runs
    elsewhere."""

    def __init__(self) -> None:
        self._last: dict[int, float] | None = None
        self._total = 0.0

    def __call__(self) -> float:
        now = _postgres_processes()
        if self._last is not None:
            self._total += sum(cpu - self._last.get(pid, 0.0) for pid, cpu in now.items())
        self._last = now
        return self._total


def _postgres_processes() -> dict[int, float]:
    """CPU seconds so far of each `postgres` process on this machine, by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == "postgres":
                found[int(entry.name)] = cpu_seconds(int(entry.name))
        except OSError:
            continue  # it exited meanwhile
    return found
