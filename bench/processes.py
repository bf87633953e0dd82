"""The processes a bench run starts: data directories made with the `coap-auth` CLI, the bench
server (`python -m bench.server`) and plain `coap-auth serve` workers; CPU and UDP counters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

COAP_AUTH = shutil.which("coap-auth", path=str(Path(sys.executable).parent)) or "coap-auth"
HOST = "127.0.0.1"
CLIENT_ID = "sensor-1"
SCOPE = "temp:read temp:write"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# The load comes from one address and one client id: the per-address and per-client rate
# limits would measure the limiter, not the endpoint. Plain CoAP is accepted next to OSCORE
# (lab mode), so that plain and protected /token run side by side on one server.
# Everything else is the default.
BENCH_SETTINGS = {
    "COAP_AUTH_RATE_LIMIT_PER_ADDRESS": "0",
    "COAP_AUTH_RATE_LIMIT_PER_CLIENT": "0",
    "COAP_AUTH_REQUIRE_OSCORE": "false",
}


def clean_env(settings: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without its COAP_AUTH_* settings, plus the bench's and then
    `settings` (COAP_AUTH_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_AUTH_")}
    return {**env, **BENCH_SETTINGS, **(settings or {})}


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(data_dir: Path, *args: str, settings: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [COAP_AUTH, *args, "--data-dir", str(data_dir)],
        env=clean_env(settings),
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@dataclass(frozen=True)
class DataDir:
    path: Path
    client_id: str
    secret: str


def make_data_dir(path: Path, settings: dict[str, str] | None = None) -> DataDir:
    """As an operator would: init, a CWT audience, a JWT audience, one client with a secret.
    The audiences are `bearer` (tokens bound only when the client sends req_cnf), so that a
    client with a secret gets a token without a registered key, as the bench's plain
    workloads need; the default profile (edhoc_oscore) would bind every token. `settings`
    (COAP_AUTH_* variables) name another store than the SQLite file in `path`; `path` then
    holds the master key."""
    _cli(path, "init", settings=settings)
    for audience, token_format in (("thermostat", "cwt"), ("dashboard", "jwt")):
        _cli(
            path, "audiences", "add", audience, "--token-format", token_format,
            "--profile", "bearer", settings=settings,
        )  # fmt: skip
    out = _cli(
        path, "clients", "add", CLIENT_ID,
        "--audience", "thermostat", "--audience", "dashboard", "--scope", SCOPE, "--secret",
        settings=settings,
    )  # fmt: skip
    secret = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                  if line.startswith("secret:"))  # fmt: skip
    return DataDir(path, CLIENT_ID, secret)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (or stolen by the hypervisor) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def udp_receive_drops() -> int:
    """Datagrams the kernel dropped because a socket's receive buffer was full (this
    network namespace, IPv4 and IPv6 together)."""
    drops = 0
    lines = Path("/proc/net/snmp").read_text().splitlines()
    udp = [line.split() for line in lines if line.startswith("Udp:")]
    if len(udp) == 2:
        drops += int(udp[1][udp[0].index("RcvbufErrors")])
    for line in Path("/proc/net/snmp6").read_text().splitlines():
        if line.startswith("Udp6RcvbufErrors"):
            drops += int(line.split()[1])
    return drops


def socket_drops(port: int) -> int:
    """Datagrams dropped so far at the UDP socket(s) bound to local `port` (not connected
    ones), IPv4 and IPv6: the server's own receive-buffer drops."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == port and int(remote.rsplit(":", 1)[1], 16) == 0:
                drops += int(fields[-1])
    return drops


class ServerProcess:
    """A running server: the bench server (with /noop and a control channel) or a plain
    `coap-auth serve` worker."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    async def bench_server(
        cls, data_dir: Path, port: int, log: Path, settings: dict[str, str] | None = None
    ) -> ServerProcess:
        """`settings`: COAP_AUTH_* variables over BENCH_SETTINGS."""
        argv = [sys.executable, "-m", "bench.server", "--data-dir", str(data_dir)]
        return await cls._start([*argv, "--port", str(port)], port, log, "listening", settings)

    @classmethod
    async def worker(
        cls,
        data_dir: Path,
        port: int,
        log: Path,
        count: int = 1,
        settings: dict[str, str] | None = None,
    ) -> ServerProcess:
        """`coap-auth serve --workers COUNT` on `port`, ready once it prints its listening
        line (all its workers bound). `settings`: COAP_AUTH_* variables over BENCH_SETTINGS."""
        argv = [COAP_AUTH, "serve", "--data-dir", str(data_dir), "--bind", HOST]
        argv += ["--port", str(port), "--workers", str(count)]
        return await cls._start(argv, port, log, "coap-auth listening", settings)

    @classmethod
    async def _start(
        cls,
        argv: list[str],
        port: int,
        log: Path,
        ready: str,
        settings: dict[str, str] | None = None,
    ) -> ServerProcess:
        with log.open("ab") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=clean_env(settings),
                cwd=Path(__file__).resolve().parent.parent,
            )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line.decode().startswith(ready):
            with contextlib.suppress(ProcessLookupError):  # it may have exited already
                process.kill()
            raise RuntimeError(f"server did not start: {line!r}; see {log}")
        return cls(process, port)

    async def command(self, text: str) -> list[str]:
        """A bench-server command; its one-line answer, split."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(text.encode() + b"\n")
        await self.process.stdin.drain()
        return (await asyncio.wait_for(self.process.stdout.readline(), 60)).decode().split()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
