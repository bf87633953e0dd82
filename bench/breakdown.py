"""Where a token issue's server time goes: its parts timed one by one, in process, no CoAP.

CPU (process time, all threads) and wall time per operation. The store runs SQLite on one
thread behind an executor, so every store call is a thread hop; the hop and a durable commit
are also timed on their own, with a plain sqlite3 connection set up as the store sets its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.processes import BENCH_SETTINGS, DataDir
from bench.tokens_bench import sample_claims, signing_setups
from coap_auth.cli.runtime import open_service
from coap_auth.config import load_settings
from coap_auth.service import TokenRequest
from coap_auth.tokens import encode_cwt
from coap_auth.wire import GrantType


@dataclass(frozen=True)
class Part:
    name: str
    cpu_us: float
    wall_us: float


async def _time(name: str, operation: Callable[[], Awaitable[object]], count: int) -> Part:
    for _ in range(count // 20):
        await operation()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(count):
        await operation()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return Part(name, cpu / count * 1e6, wall / count * 1e6)


def _durable_connection(path: Path) -> sqlite3.Connection:
    # As SqliteDatabase._connect: WAL, synchronous=FULL, autocommit with explicit transactions.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS probe (value BLOB)")
    return conn


async def issue_breakdown(data: DataDir, scratch: Path, count: int = 1500) -> list[Part]:
    settings = load_settings(env=BENCH_SETTINGS, flags={"data_dir": data.path})
    service = await open_service(settings)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    conn = _durable_connection(scratch / "probe.sqlite3")
    setup = signing_setups()[0]
    claims = sample_claims(with_cnf=False)
    log = logging.getLogger("bench.breakdown")
    handler = logging.FileHandler(scratch / "breakdown.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    grant = TokenRequest(client_id=data.client_id, client_secret=data.secret, audience="thermostat")
    latest = {"refresh_token": (await service.issue_token(grant)).refresh_token}

    async def refresh() -> None:
        issued = await service.refresh(
            TokenRequest(
                grant_type=GrantType.REFRESH_TOKEN,
                client_id=data.client_id,
                client_secret=data.secret,
                refresh_token=latest["refresh_token"],
            )
        )
        latest["refresh_token"] = issued.refresh_token

    def commit_one_row() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO probe VALUES (?)", (os.urandom(32),))
        conn.execute("COMMIT")

    async def inline_commit() -> None:
        commit_one_row()

    async def sign() -> None:
        encode_cwt(claims, setup.private_key, setup.alg, setup.kid)

    async def log_line() -> None:
        log.info("token issued to %s for %s", data.client_id, "thermostat")

    parts: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("AuthService.issue_token (whole grant)", lambda: service.issue_token(grant)),
        ("AuthService.refresh (whole refresh)", refresh),
        ("one store read (store.get_audience)", lambda: service.store.get_audience("thermostat")),
        ("empty executor hop (run_in_executor)", lambda: loop.run_in_executor(executor, int)),
        ("durable 1-row SQLite commit, inline", inline_commit),
        ("the same commit through an executor hop",
         lambda: loop.run_in_executor(executor, commit_one_row)),
        ("ES256 CWT encode + sign", sign),
        ("one INFO log line to a file", log_line),
    ]  # fmt: skip
    try:
        return [await _time(name, operation, count) for name, operation in parts]
    finally:
        log.removeHandler(handler)
        handler.close()
        conn.close()
        executor.shutdown()
        await service.store.close()
