"""Cross-check with a CoAP implementation nobody here wrote: libcoap's `coap-client-notls`.

A token request, a /keys read (also block-wise, with libcoap choosing the block size), an
Observe of /keys through a rotation, a TRL read, and all of it from an address the AS has not
verified: libcoap answers the Echo challenge (RFC 9175 §2.4) on its own since 4.3.1. Skipped,
with the reason, where libcoap's client is not installed (`.ci/run` installs Debian's
libcoap3-bin when it can).
"""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from coap_auth.store import Audience
from coap_auth.tokens import verify_cwt
from tests.coap.observing import until
from tests.conftest import Coap, second_server

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
pytestmark = pytest.mark.skipif(
    COAP_CLIENT is None, reason="libcoap's coap-client-notls is not installed (libcoap3-bin)"
)
TIMEOUT = 20


async def coap_client(*args: str) -> bytes:
    """What libcoap printed: the payload of a 2.xx answer (it adds a newline after each)."""
    return (await coap_client_output(*args))[0]


async def coap_client_output(*args: str) -> tuple[bytes, bytes]:
    assert COAP_CLIENT is not None
    process = await asyncio.create_subprocess_exec(
        COAP_CLIENT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, stderr.decode(errors="replace")
    return stdout, stderr


def cbor_items(data: bytes) -> list[Any]:
    """The CBOR items libcoap printed one after another (one per notification), skipping
    the newline it may print between them."""
    stream, items = io.BytesIO(data), []
    while stream.tell() < len(data):
        if data[stream.tell()] == 0x0A:  # a newline, not an item: a key set is an array
            stream.seek(1, io.SEEK_CUR)
            continue
        items.append(cbor2.CBORDecoder(stream).decode())
    return items


async def test_libcoap_gets_a_token_that_verifies(sensor: Coap, tmp_path: Path) -> None:
    body = tmp_path / "request.cbor"
    body.write_bytes(cbor2.dumps({24: "sensor-1", 25: sensor.secrets["sensor-1"], 5: "thermostat"}))
    out = await coap_client("-m", "post", "-t", "19", "-f", str(body), f"{sensor.base}/token")
    answer = cbor2.loads(out.removesuffix(b"\n"))
    claims = verify_cwt(answer[1], sensor.service.key_ring.lookup)
    assert claims.sub == "sensor-1" and claims.aud == "thermostat"
    assert answer[2] == 600 and answer[34] == 1 and len(answer[37]) == 32


async def test_libcoap_reads_keys_whole_and_block_wise(coap: Coap) -> None:
    for n in range(6):  # a set over 1024 bytes
        audience = Audience(f"rs-{n}", "cwt", 600, coap.service.clock.now(), key_family=f"rs-{n}")
        await coap.service.store.add_audience(audience, "operator")
    await coap.server.tick()
    ours = (await coap.request(aiocoap.GET, "/keys")).payload
    assert len(ours) > 1024
    whole = await coap_client("-m", "get", f"{coap.base}/keys")
    in_blocks = await coap_client("-m", "get", "-b", "64", f"{coap.base}/keys")
    assert whole.removesuffix(b"\n") == ours and in_blocks.removesuffix(b"\n") == ours


async def test_libcoap_observes_a_rotation(coap: Coap) -> None:
    before = (await coap.request(aiocoap.GET, "/keys")).payload
    observer = asyncio.create_task(coap_client("-s", "3", f"{coap.base}/keys"))
    await until(lambda: len(coap.server.observers) == 1)  # libcoap is another process
    await coap.service.rotate_keys(force=True, actor="operator")
    await coap.server.tick()
    after = (await coap.request(aiocoap.GET, "/keys")).payload

    sets = cbor_items(await observer)

    assert cbor2.loads(before) == sets[0]
    assert sets[-1] == cbor2.loads(after) and len(sets) >= 2


async def test_libcoap_reads_the_trl_with_a_diff_query(sensor: Coap) -> None:
    out = await coap_client("-m", "get", f"{sensor.base}/revoke/trl?diff=2")
    assert cbor2.loads(out.removesuffix(b"\n")) == {1: [], 2: None, 3: False}
    # libcoap prints an error's code and payload on stderr (non-printable bytes as dots).
    _, error = await coap_client_output("-m", "get", f"{sensor.base}/revoke/trl?cursor=1")
    assert error.startswith(b"4.00") and b"cursor requires diff" in error


@pytest.fixture
async def unverified(sensor: Coap, settings: Settings, clock: SettableClock) -> AsyncIterator[Coap]:
    """A second AS on the same store that counts no address as verified, 127.0.0.1 included
    (`verified_networks = ""`): every answer over 3x its request is an Echo challenge."""
    async with second_server(sensor, settings, clock, verified_networks="") as strict:
        yield strict


async def test_libcoap_answers_the_echo_challenge(
    sensor: Coap, unverified: Coap, clock: SettableClock, tmp_path: Path
) -> None:
    guard, verified = unverified.server.guard, unverified.server.verified
    # aiocoap's plain client does not answer it: it gets the 4.01 with the Echo option.
    refused = await unverified.request(aiocoap.GET, "/keys")
    assert refused.code == aiocoap.UNAUTHORIZED and refused.opt.echo is not None
    assert guard.challenges == 1

    # libcoap repeats the request with the Echo value and gets the set, CON and NON.
    for challenges, mode in ((2, ()), (3, ("-N",))):
        ours = (await sensor.request(aiocoap.GET, "/keys")).payload
        out = await coap_client("-m", "get", *mode, f"{unverified.base}/keys")
        assert out.removesuffix(b"\n") == ours
        assert guard.challenges == challenges
        assert verified.is_verified("127.0.0.1")
        clock.advance(verified.lifetime)  # unverified again
        assert not verified.is_verified("127.0.0.1")

    # A lab-mode POST /token: challenged before it is rendered, then answered.
    body = tmp_path / "request.cbor"
    body.write_bytes(cbor2.dumps({24: "sensor-1", 25: sensor.secrets["sensor-1"], 5: "thermostat"}))
    out = await coap_client("-m", "post", "-t", "19", "-f", str(body), f"{unverified.base}/token")
    answer = cbor2.loads(out.removesuffix(b"\n"))
    assert verify_cwt(answer[1], unverified.service.key_ring.lookup).sub == "sensor-1"
    assert guard.challenges == 4
    assert verified.is_verified("127.0.0.1")


async def test_libcoap_observes_through_the_echo_challenge(unverified: Coap) -> None:
    observer = asyncio.create_task(coap_client("-s", "3", f"{unverified.base}/keys"))
    await until(lambda: len(unverified.server.observers) == 1)  # libcoap is another process
    assert unverified.server.guard.challenges == 1
    await unverified.service.rotate_keys(force=True, actor="operator")
    await unverified.server.tick()

    sets = cbor_items(await observer)

    published = {k.kid for k in unverified.service.keys.published()}
    assert {key[2] for key in sets[-1]} == published and len(sets) >= 2
