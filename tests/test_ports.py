"""Ports: `coap-auth serve` refuses a port another process serves, shares one only among its
own `--workers`, and says in one line what failed when it cannot serve at all."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap import resource

from coap_auth.wire import ContentFormat
from tests.processes import (
    CLI_TIMEOUT,
    COAP_AUTH,
    LISTENING_LINE,
    STARTUP_TIMEOUT,
    clean_env,
    cli_ok,
    free_udp_port,
    serve_argv,
    serve_process,
)
from tests.raw_coap import exchange

THERMOSTAT = Path(__file__).resolve().parent.parent / "examples" / "thermostat_rs.py"
EXIT_TIMEOUT = 15  # s for a stopped process (and its workers) to be gone
IN_USE = "another process is serving that port"
RATE_LIMIT = 2  # POSTs per address per worker, in the workers test
SOURCES = 24  # source ports (each a fresh socket) in the workers test


def well_known_core() -> aiocoap.Message:
    return aiocoap.Message(code=aiocoap.GET, uri_path=(".well-known", "core"))


def serve_once(data_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`coap-auth serve` with these options, expected to refuse and exit at once."""
    return subprocess.run(
        [COAP_AUTH, "serve", "--data-dir", str(data_dir), *options],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(COAP_AUTH_REQUIRE_OSCORE="false"),
        cwd=data_dir.parent,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's one stderr line (exit 2, nothing on stdout); its text after the prefix."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("coap-auth: error: "), lines
    assert result.stdout == ""
    return lines[0].removeprefix("coap-auth: error: ")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


async def gone(pids: list[int]) -> bool:
    """Whether every pid ends within EXIT_TIMEOUT (they are not our children: no wait())."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + EXIT_TIMEOUT
    while any(alive(pid) for pid in pids):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    cli_ok("init", data_dir=path)
    return path


# -- one serve per port -------------------------------------------------------------------------


async def test_a_second_serve_on_the_port_is_refused_and_the_first_keeps_serving(
    data_dir: Path, tmp_path: Path
) -> None:
    # aiocoap's own switch for SO_REUSEPORT: our server socket ignores it.
    async with serve_process(data_dir, tmp_path / "serve.log", AIOCOAP_REUSE_PORT="1") as first:
        port = int(first.url.rsplit(":", 1)[1])
        other = tmp_path / "other"  # another data directory: another key set
        for bind, where in (("127.0.0.1", f"127.0.0.1:{port}"), ("::", f"[::]:{port}")):
            second = serve_once(other, "--bind", bind, "--port", str(port))
            assert one_error_line(second) == f"cannot serve on {where}: {IN_USE}"
            assert not other.exists()  # refused before anything was created
        assert first.process.returncode is None
        for _ in range(8):  # from as many source ports: each answered by the first
            assert (await exchange(port, well_known_core())).code == aiocoap.CONTENT


async def test_an_intruder_asking_for_so_reuseport_cannot_bind_the_served_port(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serve_process(data_dir, tmp_path / "serve.log") as served:
        port = int(served.url.rsplit(":", 1)[1])
        # What any process of the same user could open: aiocoap's server, forced to share.
        monkeypatch.setenv("AIOCOAP_REUSE_PORT", "1")
        with pytest.raises(OSError) as refused:
            await aiocoap.Context.create_server_context(
                resource.Site(), bind=("127.0.0.1", port), transports=["udp6"]
            )
        assert refused.value.errno == errno.EADDRINUSE
        # A bare socket asking for both kinds of sharing, on the wildcard and on loopback.
        for address in ("::", "::ffff:127.0.0.1"):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as intruder:
                intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                intruder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                with pytest.raises(OSError) as refused:
                    intruder.bind((address, port))
                assert refused.value.errno == errno.EADDRINUSE
        assert (await exchange(port, well_known_core())).code == aiocoap.CONTENT


# -- bad ports and addresses --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (("--port", "99999"), "port must be 0 to 65535, not 99999"),
        (("--port", "-1"), "port must be 0 to 65535, not -1"),
        (("--port", "65536"), "port must be 0 to 65535, not 65536"),
        (
            ("--bind", "no-such-host.invalid", "--port", "5683"),
            "cannot serve on no-such-host.invalid:5683: the address does not resolve",
        ),
        (
            ("--bind", "192.0.2.1", "--port", "5683"),  # TEST-NET-1: no host's own address
            "cannot serve on 192.0.2.1:5683: that address is not one of this host's",
        ),
        (
            ("--bind", "127.0.0.1", "--port", "0", "--workers", "2"),
            "workers above 1 need a fixed port",
        ),
    ],
    ids=["port 99999", "port -1", "port 65536", "unresolvable", "not local", "workers port 0"],
)
def test_a_port_or_address_that_cannot_be_served_gets_one_line(
    data_dir: Path, options: tuple[str, ...], expected: str
) -> None:
    assert one_error_line(serve_once(data_dir, *options)).startswith(expected)


def test_a_privileged_port_without_the_privilege_gets_one_line(data_dir: Path) -> None:
    unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if unprivileged_start <= 80:
        pytest.skip("this host lets every user bind port 80")
    wrap: list[str] = []
    if os.geteuid() == 0:  # root, but without the capability a port below 1024 needs
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_BIND_SERVICE as root")
        wrap = [setpriv, "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"]
    result = subprocess.run(
        [*wrap, COAP_AUTH, "serve", "--data-dir", str(data_dir), "--bind", "127.0.0.1"]
        + ["--port", "80"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(),
        cwd=data_dir.parent,
    )
    assert one_error_line(result) == (
        "cannot serve on 127.0.0.1:80: permission denied "
        "(a port below 1024 needs root or CAP_NET_BIND_SERVICE)"
    )


# -- serve --workers ----------------------------------------------------------------------------


@dataclass
class Workers:
    supervisor: asyncio.subprocess.Process
    port: int
    pids: list[int]
    log: Path


@contextlib.asynccontextmanager
async def serve_workers(
    data_dir: Path, log: Path, count: int, **settings: str
) -> AsyncIterator[Workers]:
    """`serve --workers COUNT` on 127.0.0.1 and a free port, ready once it prints its
    listening line; killed (with whatever worker is left) on exit."""
    for _ in range(3):  # a port picked here may be taken before the server binds it
        port = free_udp_port()
        with log.open("w") as log_file:
            supervisor = await asyncio.create_subprocess_exec(
                *serve_argv(data_dir, port),
                "--workers",
                str(count),
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=clean_env(COAP_AUTH_REQUIRE_OSCORE="false", **settings),
                cwd=data_dir.parent,
            )
        assert supervisor.stdout is not None
        line = await asyncio.wait_for(supervisor.stdout.readline(), STARTUP_TIMEOUT)
        if line:
            break
        await supervisor.wait()
        assert IN_USE in log.read_text(), log.read_text()
    listening = LISTENING_LINE.match(line.decode().rstrip("\n"))
    assert listening, line
    assert int(listening.group(2)) == port
    pid = supervisor.pid
    pids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    try:
        yield Workers(supervisor, port, pids, log)
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
        await asyncio.wait_for(supervisor.wait(), EXIT_TIMEOUT)
        for worker in pids:  # gone by themselves once the supervisor is (its pipe ends)
            if not await gone([worker]):
                os.kill(worker, signal.SIGKILL)


async def post_token(port: int) -> aiocoap.Message:
    request = aiocoap.Message(
        code=aiocoap.POST,
        uri_path=("token",),
        payload=cbor2.dumps({}),
        content_format=ContentFormat.ACE_CBOR,
    )
    return await exchange(port, request)


async def test_workers_share_the_port_and_nobody_else_does(data_dir: Path, tmp_path: Path) -> None:
    settings = {"COAP_AUTH_RATE_LIMIT_PER_ADDRESS": str(RATE_LIMIT)}
    async with serve_workers(data_dir, tmp_path / "workers.log", 2, **settings) as workers:
        assert len(workers.pids) == 2 and all(alive(pid) for pid in workers.pids)
        assert workers.supervisor.pid not in workers.pids
        # Every source port is answered. Each worker counts the address's requests on its
        # own, so from many source ports twice the per-address budget gets through: both
        # workers serve, each with the settings the supervisor was given.
        answers = [await post_token(workers.port) for _ in range(SOURCES)]
        codes = [answer.code for answer in answers]
        admitted = [code for code in codes if code != aiocoap.TOO_MANY_REQUESTS]
        assert len(admitted) == 2 * RATE_LIMIT, codes

        alone = serve_once(tmp_path / "other", "--bind", "127.0.0.1", "--port", str(workers.port))
        assert one_error_line(alone) == f"cannot serve on 127.0.0.1:{workers.port}: {IN_USE}"
        assert all(alive(pid) for pid in workers.pids)

        workers.supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(workers.supervisor.wait(), EXIT_TIMEOUT) == 0
        assert await gone(workers.pids)
        assert port_is_free(workers.port)


def free_tcp_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports on 127.0.0.1 free now."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = int(probe.getsockname()[1])
        if first + count - 1 <= 65535 and all(_tcp_free(first + i) for i in range(count)):
            return first
    raise AssertionError("no consecutive free TCP ports")


def _tcp_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_each_worker_has_its_own_metrics_listener(data_dir: Path, tmp_path: Path) -> None:
    metrics_port = free_tcp_ports(3)
    settings = {"COAP_AUTH_METRICS_PORT": str(metrics_port)}
    async with serve_workers(data_dir, tmp_path / "workers.log", 2, **settings):
        for port in (metrics_port, metrics_port + 1):  # worker i on metrics_port + i
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                assert answer.status == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", metrics_port + 2), timeout=5).close()


async def test_one_worker_ending_stops_them_all(data_dir: Path, tmp_path: Path) -> None:
    async with serve_workers(data_dir, tmp_path / "workers.log", 2) as workers:
        first, second = workers.pids
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(workers.supervisor.wait(), EXIT_TIMEOUT) == 1
        assert await gone([second])
        assert (
            f"coap-auth: error: worker 1 (pid {first}) was killed by signal 9; stopping the others"
            in workers.log.read_text().splitlines()
        )


async def test_workers_end_when_their_supervisor_is_killed(data_dir: Path, tmp_path: Path) -> None:
    async with serve_workers(data_dir, tmp_path / "workers.log", 2) as workers:
        workers.supervisor.kill()  # nothing forwarded: the workers see their pipe end
        await workers.supervisor.wait()
        assert await gone(workers.pids)
        assert port_is_free(workers.port)


# -- the example resource server ----------------------------------------------------------------


async def test_the_example_resource_server_refuses_the_services_port(
    data_dir: Path, tmp_path: Path
) -> None:
    async with serve_process(data_dir, tmp_path / "serve.log") as served:
        port = int(served.url.rsplit(":", 1)[1])
        thermostat = await asyncio.create_subprocess_exec(
            sys.executable,
            str(THERMOSTAT),
            "--plain",
            "--allow-bearer",
            "--as",
            served.url,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=clean_env(),
        )
        output, _ = await asyncio.wait_for(thermostat.communicate(), CLI_TIMEOUT)
        assert thermostat.returncode == 2, output
        lines = output.decode().splitlines()
        assert f"[thermostat] cannot serve on 127.0.0.1:{port}: {IN_USE}" in lines, lines
        assert not any("Traceback" in line for line in lines)
        assert (await exchange(port, well_known_core())).code == aiocoap.CONTENT
