"""Faults (issue 8): the real server killed with SIGKILL during issuance and key rotation
restarts with its store intact; a full disk or a read-only data directory fails loudly at
start, and a disk that fills while serving answers 5.03, not 5.00.

(SIGKILL during a refresh storm is tests/test_refresh_crash.py.)
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.tokens import VerificationKey, verify_cwt
from tests.processes import (
    CLI_TIMEOUT,
    COAP_AUTH,
    clean_env,
    provision,
    run_cli,
    serve_argv,
    serve_process,
)

REQUEST_TIMEOUT = 5
STORM = 1.5  # s of grants and rotations before the kill
STORM_PROGRESS_TIMEOUT = 30  # s more, until a grant was answered and a rotation killed
CF_ACE_CBOR, CLIENT_ID, CLIENT_SECRET, ACCESS_TOKEN = 19, 24, 25, 1


def registered(tmp_path: Path) -> tuple[Path, str]:
    data_dir = tmp_path / "data"
    return data_dir, provision(data_dir)


async def grant(context: aiocoap.Context, url: str, secret: str) -> aiocoap.Message:
    message = aiocoap.Message(
        code=aiocoap.POST,
        uri=url + "/token",
        payload=cbor2.dumps({CLIENT_ID: "sensor-1", CLIENT_SECRET: secret}),
        content_format=CF_ACE_CBOR,
    )
    return await asyncio.wait_for(context.request(message).response, REQUEST_TIMEOUT)


def rotate_until(data_dir: Path, stop: threading.Event, killed: list[int]) -> None:
    """Forced rotations from the CLI, one after another; every other one is SIGKILLed at a
    different moment of its run (start-up, opening the store, inside the transaction)."""
    n = 0
    while not stop.is_set():
        process = subprocess.Popen(
            [COAP_AUTH, "keys", "rotate", "--force", "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=clean_env(),
        )
        n += 1
        if n % 2 == 0:
            stop.wait(0.05 * (n % 8))
            process.kill()
            killed.append(n)
        process.wait(timeout=CLI_TIMEOUT)


async def test_sigkill_during_issuance_and_rotation_leaves_the_store_intact(
    tmp_path: Path,
) -> None:
    data_dir, secret = registered(tmp_path)
    log = tmp_path / "serve.log"
    env = {"COAP_AUTH_RATE_LIMIT_PER_ADDRESS": "0", "COAP_AUTH_RATE_LIMIT_PER_CLIENT": "0"}
    context = await aiocoap.Context.create_client_context()
    try:
        async with serve_process(data_dir, log, **env) as server:
            stop, killed = threading.Event(), []
            rotations = threading.Thread(target=rotate_until, args=(data_dir, stop, killed))
            rotations.start()
            answers: list[Any] = []

            async def storm() -> None:
                while True:
                    answers.append(await grant(context, server.url, secret))

            tasks = [asyncio.create_task(storm()) for _ in range(8)]
            await asyncio.sleep(STORM)
            # Not on time alone: on a busy machine (a parallel test run) one CLI start can
            # take longer than STORM, and the kill would come before any rotation was killed.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + STORM_PROGRESS_TIMEOUT
            while not (killed and any(a.code == aiocoap.CREATED for a in answers)):
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            server.process.send_signal(signal.SIGKILL)  # mid-flight
            await server.process.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            stop.set()
            await asyncio.to_thread(rotations.join)
        issued = [a for a in answers if a.code == aiocoap.CREATED]
        assert issued and killed, (len(issued), killed)

        # Restart on the same data directory.
        async with serve_process(data_dir, tmp_path / "again.log", **env) as server:
            verified = run_cli("audit", "verify", data_dir=data_dir)
            assert verified.returncode == 0, verified.stderr
            keys = json.loads(run_cli("keys", "list", "--json", data_dir=data_dir).stdout)
            states = [k["state"] for k in keys]
            assert states.count("active") == 1 and states.count("next") == 1
            # Tokens issued before the kill verify against what /keys publishes now, unless
            # their key has since retired away; a fresh grant works and verifies.
            request = aiocoap.Message(code=aiocoap.GET, uri=server.url + "/keys")
            published = (await context.request(request).response).payload
            keyset = {k[2]: VerificationKey.from_cose_key(k) for k in cbor2.loads(published)}
            fresh = await grant(context, server.url, secret)
            assert fresh.code == aiocoap.CREATED
            claims = verify_cwt(cbor2.loads(fresh.payload)[ACCESS_TOKEN], keyset.get)
            assert claims.sub == "sensor-1"
            for answer in issued[-5:]:
                verify_cwt(cbor2.loads(answer.payload)[ACCESS_TOKEN], keyset.get)
            # Every grant answered 2.01 before the kill started a family that is still there.
            families = json.loads(run_cli("tokens", "families", "--json", data_dir=data_dir).stdout)
            assert len(families) >= len(issued)
    finally:
        await context.shutdown()


def _fail_to_start(argv: list[str], **popen: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=CLI_TIMEOUT, env=clean_env(), **popen
    )


def test_a_full_disk_fails_loudly_at_start(tmp_path: Path) -> None:
    data_dir, _ = registered(tmp_path)

    def small_files() -> None:  # files may not grow past 100 kB: the disk is "full"
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = _fail_to_start(serve_argv(data_dir, 0), preexec_fn=small_files)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"coap-auth: error: cannot write the store in {data_dir} (File too large):"
        " is the disk full or the directory read-only?"
    ]
    assert "listening" not in result.stdout


def test_a_read_only_data_dir_fails_loudly_at_start(tmp_path: Path) -> None:
    data_dir, _ = registered(tmp_path)
    # A read-only bind mount in a private mount namespace (root ignores file modes).
    remount = f"mount --bind {data_dir} {data_dir} && mount -o remount,ro,bind {data_dir}"
    probe = _fail_to_start(["unshare", "-m", "sh", "-c", f"{remount} && touch {data_dir}/x"])
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.strip()[:100]}")
    argv = " ".join(serve_argv(data_dir, 0))

    result = _fail_to_start(["unshare", "-m", "sh", "-c", f"{remount} && exec {argv}"])

    assert result.returncode == 2
    assert "is the disk full or the directory read-only?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


async def test_a_disk_filling_up_while_serving_answers_5_03(tmp_path: Path) -> None:
    data_dir, secret = registered(tmp_path)
    limit = (data_dir / "coap-auth.sqlite3").stat().st_size + 400_000

    def bounded_files() -> None:  # enough to start, soon too little for the write-ahead log
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {"COAP_AUTH_RATE_LIMIT_PER_ADDRESS": "0", "COAP_AUTH_RATE_LIMIT_PER_CLIENT": "0"}
    context = await aiocoap.Context.create_client_context()
    try:
        async with serve_process(
            data_dir, tmp_path / "serve.log", preexec_fn=bounded_files, **env
        ) as server:
            for _ in range(2000):
                answer = await grant(context, server.url, secret)
                if answer.code != aiocoap.CREATED:
                    break
            assert answer.code == aiocoap.SERVICE_UNAVAILABLE, answer.code
            assert answer.opt.max_age == 5
            keys = await context.request(
                aiocoap.Message(code=aiocoap.GET, uri=server.url + "/keys")
            ).response
            assert keys.code == aiocoap.CONTENT  # still serving what needs no write
            assert server.process.returncode is None
    finally:
        await context.shutdown()
