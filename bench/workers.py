"""Several `coap-auth serve` workers on one port (`serve --workers N`), against one worker:
on the SQLite data directory and, when it answers, on PostgreSQL (a fresh schema each run)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench import postgres
from bench.loadgen import (
    EndpointPool,
    PhaseResult,
    Workload,
    issue_workload,
    keys_workload,
    run_closed_loop,
)
from bench.processes import (
    HOST,
    DataDir,
    ServerProcess,
    cpu_seconds,
    free_udp_port,
    machine_busy_seconds,
    make_data_dir,
)

WORKER_CONCURRENCY = 64
WORKER_SEQUENCE = (1, 2, 1, 2, 1)
SQLITE = "SQLite"
POSTGRES = "PostgreSQL"


@dataclass(frozen=True)
class WorkerRun:
    workers: int
    phase: PhaseResult
    store: str = SQLITE


async def multi_process(
    base: Path, data: DataDir, target: postgres.PostgresTarget, duration: float, warmup: float
) -> tuple[postgres.PostgresTarget, list[WorkerRun]]:
    """`coap-auth serve --workers N` (N processes on one port by SO_REUSEPORT): 1, 2, 1, 2, 1
    workers, a fresh `serve` for each count, so that drift on a shared machine lands on both
    sides. At each count, first on the SQLite data directory `data` (issue, then GET /keys),
    then, unless `target` was skipped, on PostgreSQL: a fresh schema and data directory made
    for that run alone (issue), so that no run finds the tables an earlier one filled.
    Returns `target`, skipped with the reason if a PostgreSQL run failed, and the runs."""
    bench = WorkerBench(EndpointPool(HOST, free_udp_port()), duration, warmup)
    try:
        for number, count in enumerate(WORKER_SEQUENCE, 1):
            await bench.sqlite_run(data, base / f"workers-{number}.log", count)
            if target.skipped:
                continue
            path = base / f"workers-pg-{number}"
            try:
                await bench.postgres_run(target.dsn, path, count)
            # A PostgreSQL run that fails (the database went away, a step refused) ends the
            # PostgreSQL runs, not the bench: the SQLite figures and the rest still count.
            except Exception as exc:
                why = f"PostgreSQL run {number} failed: {failure(exc)}; see {path}.log"
                print(f"  {why}", flush=True)
                target = dataclasses.replace(target, skipped=why)
    finally:
        bench.pool.close()
    return target, bench.runs


def failure(exc: Exception) -> str:
    """One line saying why a run failed: a CLI step's last line of stderr, else the error."""
    if isinstance(exc, subprocess.CalledProcessError) and exc.stderr:
        return f"`coap-auth {exc.cmd[1]}`: {str(exc.stderr).strip().splitlines()[-1]}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


class WorkerBench:
    """The load generator's sockets towards the one port every `serve` takes in turn, and the
    runs measured so far."""

    def __init__(self, pool: EndpointPool, duration: float, warmup: float) -> None:
        self.pool = pool
        self.duration = duration
        self.warmup = warmup
        self.runs: list[WorkerRun] = []

    async def sqlite_run(self, data: DataDir, log: Path, count: int) -> None:
        server = await ServerProcess.worker(data.path, self.pool.port, log, count)
        try:
            issue = issue_workload(data.client_id, data.secret, "thermostat")
            await self._measure(server, count, SQLITE, [issue, keys_workload()])
        finally:
            await server.stop()

    async def postgres_run(self, dsn: str, path: Path, count: int) -> None:
        """A fresh schema, a data directory on it (`path` holds its master key), then `serve
        --workers COUNT` and token issue; the schema is dropped afterwards."""
        async with postgres.fresh_schema(dsn) as schema:
            settings = {"COAP_AUTH_STORE": dsn, "COAP_AUTH_STORE_SCHEMA": schema}
            data = make_data_dir(path, settings)
            log = path.with_suffix(".log")
            server = await ServerProcess.worker(path, self.pool.port, log, count, settings)
            try:
                issue = issue_workload(data.client_id, data.secret, "thermostat")
                await self._measure(server, count, POSTGRES, [issue])
            finally:
                await server.stop()

    async def _measure(
        self, server: ServerProcess, count: int, store: str, workloads: list[Workload]
    ) -> None:
        await asyncio.sleep(0.5)
        pids = worker_pids(server.pid)
        if len(pids) != count:
            raise RuntimeError(f"serve --workers {count} runs {len(pids)} worker(s)")
        database_cpu = postgres.ClusterCpu() if store == POSTGRES else lambda: 0.0
        for workload in workloads:
            endpoints = await self.pool.take(WORKER_CONCURRENCY)
            phase = await run_closed_loop(
                endpoints,
                workload,
                self.duration,
                self.warmup,
                lambda: sum(cpu_seconds(p) for p in pids),
                machine_busy_seconds,
                database_cpu,
            )
            self.runs.append(WorkerRun(count, phase, store))
            rate = f"{phase.rate:8.0f} req/s"
            print(f"  {store:10} {count} worker(s) {workload.name:9} {rate}", flush=True)


def worker_pids(pid: int) -> list[int]:
    """The processes serving: a supervisor's children (`--workers` above 1), or `pid`."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children] or [pid]
