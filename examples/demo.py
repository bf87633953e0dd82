#!/usr/bin/env python3
"""`make demo`: the service, a sensor and a thermostat on this machine, each step printed.

Starts `coap-auth serve` on a temporary data directory (set up with the `coap-auth` CLI as
an operator would), runs examples/thermostat_rs.py and examples/sensor.py against it, and
walks through: grant, refresh, key rollover seen by the thermostat, revocation seen by the
thermostat. The service runs with its defaults, so /token and /revoke/trl answer only over
the protected channel: the sensor and the thermostat each run EDHOC with it (their keys
registered, the AS's credential provisioned from `coap-auth edhoc-credential --json`) and
talk OSCORE. Every child's output is shown with its name. Exit status 0 only if every step
happened within its time limit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
COAP_AUTH = str(Path(PYTHON).parent / "coap-auth")
if not Path(COAP_AUTH).exists():
    COAP_AUTH = shutil.which("coap-auth") or COAP_AUTH

STEP_TIMEOUT = 30.0  # s for one step's evidence to show up
LIFETIME = 6  # s: short access tokens so a refresh happens within seconds
OUTPUT = threading.Lock()


def show(line: str) -> None:
    with OUTPUT:
        print(line, flush=True)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoFailed(Exception):
    pass


class Child:
    """A running child process; every line it prints is shown and kept for `expect`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            show(line if line.startswith("[") else f"[{self.name}] {line}")
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the output: `expect(..., since=mark)` looks only after it."""
        with self._changed:
            return len(self.lines)

    def expect(
        self, pattern: str, what: str, since: int = 0, timeout: float = STEP_TIMEOUT
    ) -> tuple[re.Match[str], int]:
        """The first line after `since` matching `pattern`, waiting for it; and the position
        after that line."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        position = since
        with self._changed:
            while True:
                while position < len(self.lines):
                    match = regex.search(self.lines[position])
                    position += 1
                    if match:
                        return match, position
                if self.ended:
                    raise DemoFailed(f"{self.name} exited while waiting for {what}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoFailed(f"no {what} from {self.name} within {timeout:.0f} s")
                self._changed.wait(remaining)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def step(number: int, title: str) -> None:
    show(f"\n== step {number}: {title}")


def done(name: str, evidence: str) -> None:
    show(f"demo: {name} ok: {evidence}")


def run_demo(data_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_AUTH_")}
    # The examples import device_client from this checkout, installed or not.
    paths = [str(HERE.parent), *filter(None, [env.get("PYTHONPATH")])]
    env.update(
        PYTHONPATH=os.pathsep.join(paths),
        PYTHONUNBUFFERED="1",
        # Demo settings: a next key may sign 2 s after it was published (default 1 h), and
        # the server looks at its change feed every 0.2 s.
        COAP_AUTH_KEY_PREPUBLICATION_LEAD="2",
        COAP_AUTH_CHANGE_POLL_INTERVAL="0.2",
    )
    as_port, rs_port = free_udp_port(), free_udp_port()
    as_uri, rs_uri = f"coap://127.0.0.1:{as_port}", f"coap://127.0.0.1:{rs_port}"
    state = data_dir / "sensor-1.state"
    public_pem = data_dir / "sensor-1.pem"
    as_credential = data_dir / "as-credential.json"
    thermostat_key, thermostat_pem = data_dir / "thermostat.key", data_dir / "thermostat.pem"

    def cli(*args: str) -> str:
        show(f"$ coap-auth {' '.join(args)}")
        result = subprocess.run(
            [COAP_AUTH, *args, "--data-dir", str(data_dir / "as")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for line in (result.stdout + result.stderr).splitlines():
            show(f"[coap-auth] {line}")
        if result.returncode != 0:
            raise DemoFailed(f"coap-auth {args[0]} {args[1] if len(args) > 1 else ''} failed")
        return result.stdout

    def example(name: str, *args: str) -> None:
        """Run an example's one-off command (provisioning), showing what it prints."""
        show(f"$ {name} {args[0]} ...")
        result = subprocess.run(
            [PYTHON, str(HERE / name), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for line in result.stdout.splitlines():
            show(line)
        if result.returncode != 0:
            raise DemoFailed(f"{name} {args[0]} failed: {result.stderr.strip()}")

    children: list[Child] = []
    try:
        step(
            0,
            "an operator sets up the service; the sensor and the thermostat get their own keys"
            " and the AS's EDHOC credential",
        )
        cli("init")
        # What devices authenticate the AS by in EDHOC; copied to each device.
        as_credential.write_text(cli("edhoc-credential", "--json"))
        example(
            "thermostat_rs.py",
            "--generate-key",
            "--key",
            str(thermostat_key),
            "--public-key-out",
            str(thermostat_pem),
        )
        # The audience's key: how the thermostat authenticates (EDHOC) to read its TRL.
        cli(
            "audiences",
            "add",
            "thermostat",
            "--lifetime",
            str(LIFETIME),
            "--introspect-public-key",
            str(thermostat_pem),
        )
        example(
            "sensor.py",
            "provision",
            "--as",
            as_uri,
            "--client-id",
            "sensor-1",
            "--audience",
            "thermostat",
            "--scope",
            "temp:write",
            "--state",
            str(state),
            "--as-credential",
            str(as_credential),
            "--public-key-out",
            str(public_pem),
        )
        cli(
            "clients",
            "add",
            "sensor-1",
            "--audience",
            "thermostat",
            "--scope",
            "temp:write",
            "--public-key",
            str(public_pem),
        )
        server = Child(
            "coap-auth",
            [
                COAP_AUTH,
                "serve",
                "--data-dir",
                str(data_dir / "as"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(as_port),
            ],
            env,
        )
        children.append(server)
        server.expect(r"coap-auth listening on", "listening line")
        thermostat = Child(
            "thermostat",
            [
                PYTHON,
                str(HERE / "thermostat_rs.py"),
                "--as",
                as_uri,
                "--bind",
                "127.0.0.1",
                "--port",
                str(rs_port),
                "--key",
                str(thermostat_key),
                "--as-credential",
                str(as_credential),
            ],
            env,
        )
        children.append(thermostat)
        thermostat.expect(r"ready on", "ready line")
        thermostat.expect(r"keys: \d+ published keys", "first key set")

        step(
            1,
            "grant: the sensor runs EDHOC and gets a token over OSCORE; the thermostat verifies it",
        )
        sensor = Child(
            "sensor",
            [
                PYTHON,
                str(HERE / "sensor.py"),
                "run",
                "--state",
                str(state),
                "--rs",
                rs_uri,
                "--interval",
                "0.5",
                "--refresh-fraction",
                "0.5",
            ],
            env,
        )
        children.append(sensor)
        match, at_sensor = sensor.expect(r"grant: new token (\w+)", "grant")
        th = match.group(1)
        match, at_rs = thermostat.expect(
            rf"accepted token {th} of sensor-1 signed by key (\w+)", "accepting the token"
        )
        thermostat.expect(r"reading [\d.]+ C from sensor-1", "a reading", at_rs)
        done("grant", f"token {th} accepted by the thermostat (key {match.group(1)})")

        step(2, "refresh: ahead of expiry the sensor refreshes; the new token is accepted")
        match, at_sensor = sensor.expect(r"refresh: new token (\w+)", "refresh", at_sensor)
        th = match.group(1)
        thermostat.expect(rf"accepted token {th} of sensor-1", "accepting the refreshed token")
        done("refresh", f"token {th} accepted by the thermostat")

        step(3, "key rollover: the operator rotates; the thermostat follows by Observe")
        at_rs, at_sensor = thermostat.mark(), sensor.mark()
        active = re.search(r"active key (\w+)", cli("keys", "rotate"))
        if active is None:
            raise DemoFailed("keys rotate printed no active key")
        new_kid = active.group(1)
        thermostat.expect(r"keys: rollover seen", "rollover notification", at_rs)
        # A refresh racing the rotation may still be signed by the old key: take the first
        # token the thermostat accepts under the new one.
        for _ in range(3):
            match, at_sensor = sensor.expect(r"refresh: new token (\w+)", "refresh", at_sensor)
            th = match.group(1)
            match, _ = thermostat.expect(
                rf"accepted token {th} of sensor-1 signed by key (\w+)", "accepting it", at_rs
            )
            if match.group(1) == new_kid:
                break
        else:
            raise DemoFailed(f"no token signed by the new key {new_kid} reached the thermostat")
        done("rollover", f"token {th} signed by the new key {new_kid} accepted")

        step(
            4,
            "revocation: the operator revokes the sensor's tokens; the thermostat, observing its"
            " revocation list over OSCORE, drops them",
        )
        at_rs, at_sensor = thermostat.mark(), sensor.mark()
        cli("tokens", "revoke", "--client", "sensor-1")
        match, _ = thermostat.expect(
            r"revocation list: \d+ hashes, ([1-9]\d*) new", "the revocation list changing", at_rs
        )
        listed = match.group(1)
        match, _ = sensor.expect(r"grant: new token (\w+)", "a new grant", at_sensor)
        th = match.group(1)
        thermostat.expect(rf"accepted token {th} of sensor-1", "accepting the new grant", at_rs)
        done(
            "revocation",
            f"the thermostat listed {listed} revoked tokens; the sensor recovered with a new"
            f" grant {th}",
        )
        show("\ndemo: all steps done")
    finally:
        for child in reversed(children):
            child.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="coap-auth-demo-"))
    try:
        run_demo(data_dir)
        return 0
    except DemoFailed as failure:
        show(f"\ndemo: FAILED: {failure}")
        return 1
    finally:
        if args.keep:
            show(f"data directory kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
