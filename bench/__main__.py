"""`make bench` (`python -m bench`): every measurement of issues 7 and 16 in one run, printed
as a table and written to bench/results.md (the hand-written notes at its end are kept).
`--issue16` runs only issue 16's (amplification, 10,000 observers of /keys, TRL observers)
and prints them without writing results.md; `--workers` likewise the 1 vs 2 workers runs,
on SQLite and on the PostgreSQL `--pg-dsn` names (skipped, with the reason, if it does not
answer)."""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from bench import amplification, postgres, report, tokens_bench
from bench import coap_wire as wire
from bench.breakdown import issue_breakdown
from bench.fanout import ObserverGroup, measure_fan_out
from bench.loadgen import (
    TOKEN_OPTIONS,
    EndpointPool,
    PhaseResult,
    floor_workload,
    issue_workload,
    noop_workload,
    refresh_workload,
    run_closed_loop,
    token_request,
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
from bench.protected_channel import (
    Devices,
    measure_handshakes,
    oscore_issue_workload,
    register_devices,
)
from bench.revocations import fill_trl, measure_trl_fan_out
from bench.workers import WorkerRun, multi_process
from coap_auth.tokens import cose_key_from_public

CONCURRENCY = (1, 8, 64)
ROUNDS = 2  # each (workload, concurrency) twice, interleaved with the others
DURATION = 2.0  # measured seconds per phase
WARMUP = 0.5
FAN_OUT = (1000,)  # observers of /keys; KEYS_OBSERVERS more in issue16()
# The second rotation follows the first this long after: long enough for a notification whose
# ACK was lost to be retransmitted once (ACK_TIMEOUT 2 s x up to 1.5), not for a whole
# retransmission series.
SETTLE = 5.0
HANDSHAKE_RUNS = 200  # EDHOC + first /token, with each initiator
KEYS_OBSERVERS = 10_000  # issue 16's fan-out of /keys


async def token_responses(pool: EndpointPool, data: DataDir) -> list[report.ResponseSize]:
    """One real /token answer of each kind, as the device receives it."""
    device_key = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    kinds = [
        ("CWT ES256", "thermostat", {}),
        ("CWT ES256 + cnf", "thermostat", {4: {1: device_key}}),
        ("JWT ES256", "dashboard", {}),
        ("JWT ES256 + cnf", "dashboard", {4: {1: device_key}}),
    ]
    (endpoint,) = await pool.take(1)
    sizes = []
    for name, audience, extra in kinds:
        payload = token_request(data.client_id, data.secret, audience, extra)
        response = await endpoint.exchange(wire.POST, TOKEN_OPTIONS, payload)
        if response.code != wire.CREATED:
            raise RuntimeError(f"/token answered {wire.code_text(response.code)} for {name}")
        body = cbor2.loads(response.payload)
        sizes.append(
            report.ResponseSize(
                name,
                access_token=len(body[1]),
                payload=len(response.payload),
                datagram=response.size,
                blockwise=wire.BLOCK2 in response.options,
            )
        )
    return sizes


async def endpoint_throughput(
    server: ServerProcess, data: DataDir, devices: Devices
) -> dict[tuple[str, int], PhaseResult]:
    pool = EndpointPool(HOST, server.port)
    workloads = [
        noop_workload(data.client_id, data.secret, "thermostat"),
        floor_workload(data.client_id, data.secret, "thermostat"),
        issue_workload(data.client_id, data.secret, "thermostat"),
        oscore_issue_workload(devices),
        refresh_workload(data.client_id, data.secret, "thermostat"),
    ]
    results: dict[tuple[str, int], PhaseResult] = {}
    for concurrency in CONCURRENCY:
        for _ in range(ROUNDS):
            for workload in workloads:
                endpoints = await pool.take(concurrency)
                phase = await run_closed_loop(
                    endpoints,
                    workload,
                    DURATION,
                    WARMUP,
                    lambda: cpu_seconds(server.pid),
                    machine_busy_seconds,
                )
                key = (workload.name, concurrency)
                if key in results:
                    results[key].merge(phase)
                else:
                    results[key] = phase
                rate = f"{phase.rate:8.0f} req/s"
                print(f"  {workload.name:12} c={concurrency:<3} {rate}", flush=True)
    pool.close()
    return results


async def fan_out(
    data: DataDir, base: Path, sizes: tuple[int, ...] = FAN_OUT
) -> tuple[list[report.FanOutRun], dict[int, int]]:
    """For each size, a fresh bench server: register the observers of /keys, read the
    server's RSS (after a GC) before and after, rotate once from a quiet state and once more
    SETTLE seconds later."""
    runs: list[report.FanOutRun] = []
    memory: dict[int, int] = {}
    for count in sizes:
        log = base / f"fanout-{count}.log"
        server = await ServerProcess.bench_server(data.path, free_udp_port(), log)
        group = ObserverGroup(HOST, server.port)

        async def rotate(server: ServerProcess = server) -> tuple[float, float]:
            answer = await server.command("rotate")
            return float(answer[1]), float(answer[2])

        try:
            before = int((await server.command("rss"))[1])
            await group.grow_to(count)
            memory[count] = (int((await server.command("rss"))[1]) - before) // count
            for label in ("quiet", f"{SETTLE:.0f} s later"):
                result = await measure_fan_out(group, rotate, lambda s=server: cpu_seconds(s.pid))
                runs.append(report.FanOutRun(label, result))
                print(
                    f"  {count} observers ({label}): last notified {result.last * 1000:.0f} ms "
                    f"after the rotation, p99 {result.p99 * 1000:.0f} ms ({result.notified} "
                    f"notified, {result.con} CON / {result.non} NON, {result.receive_drops} "
                    "datagrams dropped by full receive buffers)",
                    flush=True,
                )
                await asyncio.sleep(SETTLE)
        finally:
            group.close()
            await server.stop()
    return runs, memory


async def issue16(base: Path) -> report.Issue16:
    """Amplification probes and the TRL observers, on one data directory whose revocation
    list holds TRL_ENTRIES entries; then 10,000 observers of /keys (with memory)."""
    data = make_data_dir(base / "issue16")
    server = await ServerProcess.bench_server(data.path, free_udp_port(), base / "trl.log")
    try:
        print("filling the revocation list (issue, then revoke, over CoAP) ...", flush=True)
        await fill_trl(server.port, data)
        print("amplification probes from unverified addresses ...", flush=True)
        probes = await amplification_probes(base, data)
        for probe in probes:
            print(
                f"  {probe.probe.server:9} {probe.probe.name:36} {probe.request_bytes:4} B -> "
                f"{probe.received_bytes:6} B ({probe.ratio:5.2f} x) {probe.codes}",
                flush=True,
            )
        print("1,000 observers of /revoke/trl, one revocation ...", flush=True)
        trl = await measure_trl_fan_out(server, data)
        print(
            f"  {trl.result.notified} notified, last {trl.result.last * 1000:.0f} ms, server "
            f"CPU {trl.result.server_cpu:.2f} s (last notification "
            f"{trl.result.last_first_block * 1000:.0f} ms, CPU until then "
            f"{trl.result.first_block_cpu:.2f} s; {trl.result.receive_drops} rcvbuf drops)",
            flush=True,
        )
    finally:
        await server.stop()
    print("10,000 observers of /keys ...", flush=True)
    keys, memory = await fan_out(data, base, (KEYS_OBSERVERS,))
    print(f"  server memory per observer: {memory[KEYS_OBSERVERS] / 1024:.1f} KiB", flush=True)
    return report.Issue16(probes, trl, keys, memory[KEYS_OBSERVERS])


async def amplification_probes(base: Path, data: DataDir) -> list[amplification.ProbeResult]:
    """The probes against a lab-mode and a protected server, both treating every address as
    unverified."""
    servers: dict[str, ServerProcess] = {}
    try:
        for mode, settings in amplification.UNVERIFIED_SETTINGS.items():
            log = base / f"amplification-{mode}.log"
            servers[mode] = await ServerProcess.bench_server(
                data.path, free_udp_port(), log, settings
            )
        return await amplification.measure(data, {m: s.port for m, s in servers.items()})
    finally:
        for server in servers.values():
            await server.stop()


async def run(keep: bool, pg_dsn: str) -> report.Results:
    raise_file_limit()
    base = Path(tempfile.mkdtemp(prefix="coap-auth-bench-"))
    started = time.monotonic()
    try:
        print("verification and sizes (in process) ...", flush=True)
        verification = tokens_bench.verification_rates()
        sizes = tokens_bench.token_sizes()

        data = make_data_dir(base / "single")
        # One EDHOC-authenticated device per concurrent OSCORE worker.
        devices = await register_devices(data, max(CONCURRENCY))
        print("parts of a token issue (in process) ...", flush=True)
        breakdown = await issue_breakdown(data, base)

        print("token endpoint vs /noop, plain and over OSCORE (bench server) ...", flush=True)
        server = await ServerProcess.bench_server(data.path, free_udp_port(), base / "server.log")
        try:
            pool = EndpointPool(HOST, server.port)
            responses = await token_responses(pool, data)
            handshakes = await measure_handshakes(
                pool, devices, HANDSHAKE_RUNS, lambda: cpu_seconds(server.pid)
            )
            for times in handshakes.runs:
                print(
                    f"  EDHOC + first /token, {times.initiator}: median "
                    f"{times.percentile(0.5) * 1000:.1f} ms, p99 "
                    f"{times.percentile(0.99) * 1000:.1f} ms",
                    flush=True,
                )
            pool.close()
            throughput = await endpoint_throughput(server, data, devices)
        finally:
            await server.stop()

        print("observe fan-out (a fresh bench server for each size) ...", flush=True)
        fan_out_runs, memory = await fan_out(data, base)

        print("issue 16: amplification, observers at scale ...", flush=True)
        issue16_results = await issue16(base)

        print("multi-process (coap-auth serve --workers N), SQLite and PostgreSQL ...", flush=True)
        target, worker_runs = await workers(base, pg_dsn)

        return report.Results(
            verification=verification,
            sizes=sizes,
            responses=responses,
            throughput=throughput,
            handshakes=handshakes,
            breakdown=breakdown,
            fan_out=fan_out_runs,
            memory_per_observer=memory,
            issue16=issue16_results,
            workers=worker_runs,
            postgres=target,
            wall_seconds=time.monotonic() - started,
        )
    finally:
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


async def workers(base: Path, pg_dsn: str) -> tuple[postgres.PostgresTarget, list[WorkerRun]]:
    """1 vs 2 workers: on a SQLite data directory, and on PostgreSQL if it answers."""
    target = await postgres.probe(pg_dsn)
    if target.skipped:
        print(f"  PostgreSQL runs skipped: {target.skipped}", flush=True)
    data = make_data_dir(base / "workers")
    return await multi_process(base, data, target, DURATION, WARMUP)


async def run_workers(keep: bool, pg_dsn: str) -> tuple[postgres.PostgresTarget, list[WorkerRun]]:
    base = Path(tempfile.mkdtemp(prefix="coap-auth-bench-"))
    try:
        return await workers(base, pg_dsn)
    finally:
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


async def run_issue16(keep: bool) -> report.Issue16:
    raise_file_limit()
    base = Path(tempfile.mkdtemp(prefix="coap-auth-bench-"))
    try:
        return await issue16(base)
    finally:
        if keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def raise_file_limit() -> None:
    """One socket per observer: KEYS_OBSERVERS of them at once, and the load generator's."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < KEYS_OBSERVERS + 1000:
        raise SystemExit(f"the bench needs {KEYS_OBSERVERS + 1000} open files; hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results.md", help="results file"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dirs and server logs")
    parser.add_argument(
        "--issue16", action="store_true", help="only issue 16's measurements, printed"
    )
    parser.add_argument(
        "--workers", action="store_true", help="only the 1 vs 2 workers runs, printed"
    )
    parser.add_argument(
        "--pg-dsn",
        default=postgres.default_dsn(),
        help="the PostgreSQL database for the workers runs, each in a schema of its own "
        f"(default: COAP_AUTH_TEST_PG_DSN, else {postgres.LOCAL_DSN}); '' skips them",
    )
    args = parser.parse_args()
    if args.workers:
        target, runs = asyncio.run(run_workers(args.keep, args.pg_dsn))
        targets: list[list[str]] = []
        print()
        print("\n".join(report.workers_section(runs, target, targets)))
        print("\n".join(report.targets_table(targets)))
        return
    if args.issue16:
        print()
        print("\n".join(report.issue16_section(asyncio.run(run_issue16(args.keep)), [])))
        return
    results = asyncio.run(run(args.keep, args.pg_dsn))
    text = report.render(results)
    print()
    print(text)
    report.write(args.output, text)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
