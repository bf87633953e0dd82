"""Running the installed `coap-auth` command as a subprocess, shared by the process tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

COAP_AUTH = shutil.which("coap-auth") or str(Path(sys.executable).parent / "coap-auth")
STARTUP_TIMEOUT = 15  # s, until `serve` prints its listening line
CLI_TIMEOUT = 30  # s, for one short CLI command
SECRET_LINE = re.compile(r"^secret: (\S+)$")
# What `serve --bind 127.0.0.1 --port 0` prints once bound: the port the system chose.
LISTENING_LINE = re.compile(r"^coap-auth listening on (coap://127\.0\.0\.1:([1-9]\d*))$")


def clean_env(**settings: str) -> dict[str, str]:
    """The caller's environment without COAP_AUTH_* settings or a master key leaking in,
    plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_AUTH_")}
    env.update(settings)
    return env


def run_cli(
    *args: str | Path, data_dir: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One `coap-auth` command on `data_dir`, with a clean environment plus `env`."""
    return subprocess.run(
        [COAP_AUTH, *map(str, args), "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(**(env or {})),
        cwd=data_dir.parent,
    )


def cli_ok(*args: str | Path, data_dir: Path) -> str:
    """A command that must succeed; its stdout."""
    result = run_cli(*args, data_dir=data_dir)
    assert result.returncode == 0, (args, result.returncode, result.stderr)
    return result.stdout


def add_secret_client(data_dir: Path, client_id: str = "sensor-1") -> str:
    """`clients add` with a generated secret for audience `thermostat`; the printed secret."""
    stdout = cli_ok(
        "clients",
        "add",
        client_id,
        "--audience",
        "thermostat",
        "--scope",
        "temp:read",
        "--secret",
        data_dir=data_dir,
    )
    secrets = [m.group(1) for m in map(SECRET_LINE.match, stdout.splitlines()) if m]
    assert len(secrets) == 1, stdout
    return secrets[0]


def provision(data_dir: Path, *audience_options: str) -> str:
    """init, audience `thermostat` (with these options; bearer tokens unless they name a
    profile: a secret client has no key to bind a token to) and secret client `sensor-1`,
    all by the CLI; the client's secret."""
    cli_ok("init", data_dir=data_dir)
    profile = () if "--profile" in audience_options else ("--profile", "bearer")
    cli_ok("audiences", "add", "thermostat", *profile, *audience_options, data_dir=data_dir)
    return add_secret_client(data_dir)


def free_udp_port() -> int:
    """A port free now, for a command that must be given one in advance. Another process
    (a parallel test worker) may take it before the command binds it: `serve` is better
    given port 0 and asked which port it bound (LISTENING_LINE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_argv(data_dir: Path, port: int) -> list[str]:
    return [
        COAP_AUTH,
        "serve",
        "--data-dir",
        str(data_dir),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@dataclass
class ServerProcess:
    process: asyncio.subprocess.Process
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.asynccontextmanager
async def serve_process(
    data_dir: Path,
    log: Path,
    *,
    wrap: Sequence[str] = (),
    preexec_fn: Callable[[], None] | None = None,
    **settings: str,
) -> AsyncIterator[ServerProcess]:
    """`coap-auth serve` on 127.0.0.1 and a free port with these COAP_AUTH_* settings, its
    stderr in `log`; ready when it prints its listening line; killed on exit. `wrap` is a
    command prefix (e.g. `unshare ...`).

    Port 0: the server binds a port the system picks and prints it. A port picked here and
    bound later by the server could be taken in between (by another test worker)."""
    with log.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            *wrap,
            *serve_argv(data_dir, 0),
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,  # a file, not a pipe nobody reads: INFO logs must never block it
            # Plain CoAP (lab mode) unless a test asks for the default.
            env=clean_env(**{"COAP_AUTH_REQUIRE_OSCORE": "false", **settings}),
            cwd=data_dir.parent,
            preexec_fn=preexec_fn,
        )
    server = ServerProcess(process, "", log)
    try:
        server.url = await asyncio.wait_for(_listening(process, server), STARTUP_TIMEOUT)
        yield server
    finally:
        if process.returncode is None:
            process.kill()
        await asyncio.wait_for(process.wait(), 10)


async def _listening(process: asyncio.subprocess.Process, server: ServerProcess) -> str:
    """The URL the server prints once it listens."""
    assert process.stdout is not None
    while True:
        line = await process.stdout.readline()
        if not line:
            await process.wait()
            pytest.fail(
                f"server exited {process.returncode} before listening:\n{server.log_tail()}"
            )
        text = line.decode().rstrip("\n")
        if text.startswith("coap-auth listening on"):
            listening = LISTENING_LINE.match(text)
            assert listening, f"not a bound 127.0.0.1 port: {text!r}"
            return listening.group(1)
