#!/usr/bin/env python3
"""`make demo`: the service, sensors and thermostats on this machine, each step printed.

Starts `coap-auth serve` on a temporary data directory (set up with the `coap-auth` CLI as
an operator would), runs examples/thermostat_rs.py and examples/sensor.py against it, and
walks through: grant, refresh, key rollover seen by the thermostat, revocation seen by the
thermostat, a stolen token refused, and the coap_oscore profile. The service runs with its
defaults, so /token and /revoke/trl answer only over the protected channel: the sensors and
the thermostats each run EDHOC with it (their keys registered, the AS's credential
provisioned from `coap-auth edhoc-credential --json`) and talk OSCORE.

The thermostat's audience has the default profile, edhoc_oscore: the sensor's tokens are
bound to its key, and it sends its readings under an OSCORE context from EDHOC with the
thermostat. In step 5 a second device, with a key of its own, takes the sensor's token and
tries it: EDHOC (the token in message_3, or uploaded first), plain CoAP, and an unprotected
datagram forged with the sensor's address and port (a raw socket: skipped, saying so, without
root or CAP_NET_RAW); all are refused. In step 6 a second audience, `lock`, has the
coap_oscore profile (RFC 9203): its AES keys are exported once (`coap-auth keys export lock`,
to a file, not shown) to a second thermostat, and sensor-2 sets its OSCORE context up at
/authz-info. Every child's output is shown with its name. Exit status 0 only if every step
happened within its time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
    """A running child process; every line it prints is shown and kept for `expect`, with
    its leading "[label]" replaced by `relabel` (two of one example tell apart)."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], relabel: str | None = None
    ) -> None:
        self.name = name
        self.relabel = relabel
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
            line = _relabel(raw.rstrip("\n"), self.relabel)
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


def _relabel(line: str, label: str | None) -> str:
    if label is not None and line.startswith("[") and "] " in line:
        return f"[{label}] {line.split('] ', 1)[1]}"
    return line


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
    lock_port = free_udp_port()
    lock_uri = f"coap://127.0.0.1:{lock_port}"
    lock_key, lock_pem = data_dir / "lock.key", data_dir / "lock.pem"
    lock_token_keys = data_dir / "lock-token-keys.txt"
    state_2, public_pem_2 = data_dir / "sensor-2.state", data_dir / "sensor-2.pem"

    def cli(*args: str, secret_out: Path | None = None) -> str:
        """Run one `coap-auth` command, showing what it prints; with `secret_out`, its output
        (secret keys) goes to that file, mode 0600, and is not shown."""
        show(f"$ coap-auth {' '.join(args)}" + (f" > {secret_out.name}" if secret_out else ""))
        result = subprocess.run(
            [COAP_AUTH, *args, "--data-dir", str(data_dir / "as")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        if secret_out is not None and result.returncode == 0:
            fd = os.open(secret_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(result.stdout)
            show(f"[coap-auth] ({secret_out.name}: secret keys, not shown)")
        for line in ((result.stdout if secret_out is None else "") + result.stderr).splitlines():
            show(f"[coap-auth] {line}")
        if result.returncode != 0:
            raise DemoFailed(f"coap-auth {args[0]} {args[1] if len(args) > 1 else ''} failed")
        return result.stdout

    def example(name: str, *args: str, relabel: str | None = None) -> None:
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
            show(_relabel(line, relabel))
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
        # The audience's key: how the thermostat authenticates (EDHOC) to read its TRL, and,
        # the audience having the default profile (edhoc_oscore), to devices (rs_cnf).
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
        # A second audience, `lock`, of the coap_oscore profile (RFC 9203): its tokens are
        # encrypted under AES keys of its own, exported once to its resource server.
        example(
            "thermostat_rs.py",
            "--generate-key",
            "--audience",
            "lock",
            "--key",
            str(lock_key),
            "--public-key-out",
            str(lock_pem),
            relabel="lock",
        )
        cli(
            "audiences",
            "add",
            "lock",
            "--profile",
            "coap_oscore",
            "--lifetime",
            str(LIFETIME),
            "--introspect-public-key",
            str(lock_pem),
        )
        cli("keys", "export", "lock", secret_out=lock_token_keys)
        example(
            "sensor.py",
            "provision",
            "--as",
            as_uri,
            "--client-id",
            "sensor-2",
            "--audience",
            "lock",
            "--scope",
            "temp:write",
            "--state",
            str(state_2),
            "--as-credential",
            str(as_credential),
            "--public-key-out",
            str(public_pem_2),
            relabel="sensor-2",
        )
        cli(
            "clients",
            "add",
            "sensor-2",
            "--audience",
            "lock",
            "--scope",
            "temp:write",
            "--public-key",
            str(public_pem_2),
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
        lock = Child(
            "lock",
            [
                PYTHON,
                str(HERE / "thermostat_rs.py"),
                "--as",
                as_uri,
                "--audience",
                "lock",
                "--bind",
                "127.0.0.1",
                "--port",
                str(lock_port),
                "--key",
                str(lock_key),
                "--as-credential",
                str(as_credential),
                "--token-keys",
                str(lock_token_keys),
            ],
            env,
            relabel="lock",
        )
        children.append(lock)
        thermostat.expect(r"keys: \d+ published keys", "first key set")
        lock.expect(r"ready on", "the lock's ready line")

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
        step(
            5,
            "a stolen token: another device (its own key) takes the sensor's token and tries"
            " it; the thermostat decides by the key proven in EDHOC, never by the address",
        )
        at_rs = thermostat.mark()
        match, at_rs = thermostat.expect(
            r"reading [\d.]+ C from sensor-1 \(edhoc_oscore, coap://127\.0\.0\.1:(\d+)\)",
            "a reading under the sensor's context",
            at_rs,
        )
        victim_port = int(match.group(1))
        stolen = _stolen_token(state)
        verdicts = asyncio.run(
            _thief(rs_uri, rs_port, stolen, thermostat_pem.read_bytes(), victim_port)
        )
        if any(verdict == "accepted" for verdict in verdicts.values()):
            raise DemoFailed(f"the thermostat took the stolen token: {verdicts}")
        # The sensor, which holds the key, goes on; the forged reading never landed.
        _, after = thermostat.expect(
            r"reading [\d.]+ C from sensor-1 \(edhoc_oscore,", "a reading after the theft", at_rs
        )
        if any(FORGED in line for line in thermostat.lines):
            raise DemoFailed("the forged reading reached the thermostat")
        done(
            "stolen token",
            "refused: "
            + ", ".join(f"{attempt} {verdict}" for attempt, verdict in verdicts.items())
            + "; the sensor's readings go on",
        )
        step(
            6,
            "the coap_oscore profile (RFC 9203): sensor-2's token for the lock is encrypted for"
            " it; /authz-info answers with a nonce and both derive an OSCORE context",
        )
        sensor_2 = Child(
            "sensor-2",
            [
                PYTHON,
                str(HERE / "sensor.py"),
                "run",
                "--state",
                str(state_2),
                "--rs",
                lock_uri,
                "--interval",
                "0.3",
                "--count",
                "3",
            ],
            env,
            relabel="sensor-2",
        )
        children.append(sensor_2)
        match, _ = sensor_2.expect(r"grant: new token (\w+)", "sensor-2's grant")
        th = match.group(1)
        match, at_lock = lock.expect(
            rf"accepted token {th} of sensor-2 .* coap_oscore: bound to a new OSCORE context",
            "the lock taking the token",
        )
        lock.expect(r"reading [\d.]+ C from sensor-2 \(coap_oscore,", "a reading", at_lock)
        sensor_2.expect(r"security context with the thermostat set up: coap_oscore", "context")
        done("coap_oscore", f"token {th} decrypted by the lock; readings under its context")
        show("\ndemo: all steps done")
    finally:
        for child in reversed(children):
            child.stop()


FORGED = "99.9"  # the reading the thief tries to plant


def _stolen_token(state: Path) -> bytes:
    """The sensor's current access token: it crossed the network in the clear (POSTed to the
    thermostat's /authz-info, too large for EDHOC's message_3), so anyone listening has it."""
    from device_client import StateFile

    saved = StateFile(state).load()
    if saved is None or saved.access_token is None:
        raise DemoFailed("the sensor holds no token to steal")
    return saved.access_token.value


async def _thief(
    rs_uri: str, rs_port: int, token: bytes, thermostat_pem: bytes, victim_port: int
) -> dict[str, str]:
    """Another device, with a key of its own, tries the stolen token every way it can; what
    each attempt got ("refused", "accepted" or "skipped")."""
    import aiocoap
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from coap_auth.secure.credentials import make_credential
    from coap_auth.secure.edhoc import EdhocRefused, establish
    from coap_auth.wire import EAD_ACCESS_TOKEN, ContentFormat
    from device_client import DeviceKey, create_client_context
    from device_client.resource_client import MAX_EAD_TOKEN_BYTES

    def say(text: str) -> None:
        show(f"[thief] {text}")

    # How any device authenticates the thermostat: the audience id and its key (rs_cnf).
    thermostat = make_credential("thermostat", load_pem_public_key(thermostat_pem))  # type: ignore[arg-type]
    own = DeviceKey.generate("thief")
    posing = DeviceKey("sensor-1", DeviceKey.generate("x").private_key)  # the sensor's name
    verdicts: dict[str, str] = {}
    context = await create_client_context()

    async def edhoc(attempt: str, key: DeviceKey, ead_3: list[tuple[int, bool, bytes]]) -> None:
        try:
            await asyncio.wait_for(
                establish(context, rs_uri, key.edhoc_identity(), thermostat, ead_3=ead_3), 10
            )
        except EdhocRefused as refused:
            verdicts[attempt] = "refused"
            say(f"{attempt}: refused ({str(refused).split(': ', 1)[-1]})")
        except Exception as exc:  # lakers on a token too large for message_3, say
            verdicts[attempt] = "skipped"
            say(f"{attempt}: skipped, not sent ({type(exc).__name__})")
        else:
            verdicts[attempt] = "accepted"
            say(f"{attempt}: ACCEPTED")

    try:
        say(f"took the sensor's token ({len(token)} bytes); runs EDHOC with its own key")
        if len(token) <= MAX_EAD_TOKEN_BYTES:
            for key in (own, posing):
                ead_3 = [(EAD_ACCESS_TOKEN, True, token)]
                await edhoc(f"EDHOC as {key.client_id}, token in message_3", key, ead_3)
        else:
            say(
                f"EDHOC with the token in message_3: skipped, {len(token)} bytes is more than"
                f" lakers takes in EAD_3 ({MAX_EAD_TOKEN_BYTES}); uploading it as the sensor did"
            )
        upload = aiocoap.Message(
            code=aiocoap.POST,
            uri=f"{rs_uri}/authz-info",
            payload=token,
            content_format=ContentFormat.CWT,
        )
        answer = await asyncio.wait_for(context.request(upload).response, 10)
        say(f"POST /authz-info with the token: {answer.code} (a valid token, held for its key)")
        for key in (own, posing):
            await edhoc(f"EDHOC as {key.client_id} after the upload", key, [])
        put = aiocoap.Message(
            code=aiocoap.PUT, uri=f"{rs_uri}/temperature", payload=FORGED.encode()
        )
        answer = await asyncio.wait_for(context.request(put).response, 10)
        verdicts["plain PUT"] = "refused" if answer.code == aiocoap.UNAUTHORIZED else "accepted"
        say(f"plain PUT /temperature from its own address: {answer.code}")
        verdicts["forged datagram"] = await _forged_put(rs_port, victim_port, say)
    finally:
        await context.shutdown()
    return verdicts


async def _forged_put(rs_port: int, victim_port: int, say: Callable[[str], None]) -> str:
    """An unprotected PUT in a UDP datagram forged with the sensor's address and port (a raw
    socket: root or CAP_NET_RAW); the thermostat's answer, seen going to the sensor's port."""
    import aiocoap

    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError:
        say("forged datagram: skipped, a raw socket needs root or CAP_NET_RAW")
        return "skipped"
    put = aiocoap.Message(code=aiocoap.PUT, payload=FORGED.encode())
    put.opt.uri_path = ("temperature",)
    put.mtype, put.mid, put.token = aiocoap.CON, 0x5EED, b"\x5e\xed\x00\x01"
    datagram = put.encode()
    loop = asyncio.get_running_loop()
    with raw:
        raw.setblocking(False)
        header = struct.pack("!HHHH", victim_port, rs_port, 8 + len(datagram), 0)
        raw.sendto(header + datagram, ("127.0.0.1", rs_port))
        deadline = loop.time() + 5
        while loop.time() < deadline:
            try:
                packet = await asyncio.wait_for(loop.sock_recv(raw, 4096), deadline - loop.time())
            except TimeoutError:
                break
            udp = packet[(packet[0] & 0x0F) * 4 :]  # after the IPv4 header
            if struct.unpack("!HH", udp[:4]) == (rs_port, victim_port):
                answer = aiocoap.Message.decode(udp[8:])
                if answer.token == put.token:
                    say(
                        f"forged datagram from the sensor's address 127.0.0.1:{victim_port}:"
                        f" {answer.code}"
                    )
                    return "refused" if answer.code == aiocoap.UNAUTHORIZED else "accepted"
    say("forged datagram: no answer seen")
    return "refused"


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
