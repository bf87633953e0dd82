"""Issue 13: Observe registrations from sockets that are then closed must not cost anyone else
their observation. Over real UDP: each notification to a dead observer draws an ICMP port
unreachable; the resource server observing /keys must still learn of a revoked key at once,
and the server log holds no traceback. Nor can forged ICMP errors naming the RS end its
observation (found by the outsider test of issue 13).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable

import aiocoap
import pytest

from coap_auth.coap.server import _bound_port
from coap_auth.udp import create_client_context
from device_client import KeySetWatcher, WatchPolicy
from tests.conftest import Coap

DEAD_OBSERVERS = 20
RUNS = 10
NOTICE_WITHIN = 2.0  # real seconds, for UDP delivery only
WATCH = WatchPolicy(request_timeout=2.0, poll_interval=0.02)

_message_ids = itertools.count(1)


_hosts = itertools.count(2)


async def register_and_vanish(port: int) -> None:
    """GET /keys with Observe from a fresh socket, wait for the registration, close. Each
    from its own loopback address (127.1.0.3, ...): one address holds at most
    observers_per_source observations."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        host = next(_hosts)
        sock.bind((f"127.1.{host // 250 % 250}.{host % 250 + 1}", 0))
        sock.connect(("127.0.0.1", port))
        echo = None
        for _ in range(2):  # a second time only when the AS asks for Echo (RFC 9175 §2.4)
            request = aiocoap.Message(code=aiocoap.GET, uri_path=("keys",), observe=0)
            mid = next(_message_ids) % 0xFFFF
            request.mtype, request.mid, request.token = aiocoap.CON, mid, mid.to_bytes(2, "big")
            if echo is not None:
                request.opt.echo = echo
            await loop.sock_sendall(sock, request.encode())
            answer = aiocoap.Message.decode(
                await asyncio.wait_for(loop.sock_recv(sock, 2048), NOTICE_WITHIN)
            )
            echo = answer.opt.echo
            if answer.code != aiocoap.UNAUTHORIZED or echo is None:
                break
        assert answer.code == aiocoap.CONTENT and answer.opt.observe is not None, answer


async def within(seconds: float, condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def resource_server(coap: Coap) -> AsyncIterator[KeySetWatcher]:
    """An RS following /keys by Observe, on its own plain aiocoap context."""
    context = await aiocoap.Context.create_client_context()
    watcher = KeySetWatcher(context, coap.base, clock=coap.service.clock, policy=WATCH)
    await watcher.start()
    yield watcher
    await watcher.stop()
    await context.shutdown()


@pytest.mark.parametrize("run", range(RUNS))
async def test_dead_observers_cannot_cancel_a_live_one(
    coap: Coap, resource_server: KeySetWatcher, caplog: pytest.LogCaptureFixture, run: int
) -> None:
    caplog.set_level(logging.DEBUG)
    service, server = coap.service, coap.server
    for _ in range(DEAD_OBSERVERS):
        await register_and_vanish(server.port)  # type: ignore[arg-type]

    compromised = service.key_ring.active.kid
    assert compromised in resource_server.key_set.kids
    await service.revoke_key(compromised, actor="operator")
    await server.tick()
    await within(
        NOTICE_WITHIN,
        lambda: compromised not in resource_server.key_set.kids,
        "the RS is told the key was revoked",
    )

    # The RS still hears every change. (The AS ignores ICMP: the dead observations end when
    # their periodic confirmable notification goes unacknowledged, RFC 7641 §4.5.)
    await service.rotate_keys(force=True, actor="operator")
    await server.tick()
    published = {k.kid for k in service.keys.published()}
    await within(
        NOTICE_WITHIN, lambda: resource_server.key_set.kids == published, "the next rotation"
    )
    assert resource_server.fetches == 0 and resource_server.registrations == 1

    gc.collect()  # "Task exception was never retrieved" is logged when the task is collected
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


async def test_a_device_send_after_one_to_a_gone_peer_is_not_refused(coap: Coap) -> None:
    """The device side: one context talks to a peer that is gone and, in the same turn of the
    loop, to the AS. The AS request must succeed and the /keys observation live on."""
    context = await create_client_context()
    try:
        observation = context.request(
            aiocoap.Message(code=aiocoap.GET, uri=coap.base + "/keys", observe=0)
        )
        first = await observation.response
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.bind(("127.0.0.1", 0))
            gone_port = gone.getsockname()[1]
        as_remote = first.remote
        gone_remote = type(as_remote)(("::ffff:127.0.0.1", gone_port, 0, 0), as_remote.interface)
        to_gone = aiocoap.Message(
            code=aiocoap.GET, uri_path=("x",), transport_tuning=aiocoap.Unreliable
        )
        to_gone.remote = gone_remote
        to_as = aiocoap.Message(code=aiocoap.GET, uri_path=("keys",))
        to_as.remote = as_remote
        gone_request, as_request = context.request(to_gone), context.request(to_as)

        with pytest.raises(aiocoap.error.NetworkError):  # the ICMP error reached its peer
            await asyncio.wait_for(gone_request.response, NOTICE_WITHIN)
        answer = await asyncio.wait_for(as_request.response, NOTICE_WITHIN)
        assert answer.code == aiocoap.CONTENT
        assert not observation.observation.cancelled
        observation.observation.cancel()
    finally:
        await context.shutdown()


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def forged_port_unreachable(source_port: int, destination_port: int) -> bytes:
    """An ICMP port unreachable (RFC 792) about a UDP datagram 127.0.0.1:source_port ->
    127.0.0.1:destination_port, as the host of a gone peer would send, but forged."""
    loopback = socket.inet_aton("127.0.0.1")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 32, 0, 0, 64, 17, 0, loopback, loopback)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    udp = struct.pack("!HHHH", source_port, destination_port, 12, 0) + b"\x40\x01\x00\x00"
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + ip + udp
    return icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]


async def test_forged_icmp_naming_the_rs_does_not_end_its_observation(
    coap: Coap, resource_server: KeySetWatcher
) -> None:
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        pytest.skip("forging ICMP needs a raw socket (root or CAP_NET_RAW)")
    service, server = coap.service, coap.server
    rs_port = _bound_port(resource_server._context)
    assert rs_port
    with raw:
        for _ in range(3):
            raw.sendto(forged_port_unreachable(server.port, rs_port), ("127.0.0.1", 0))
    await asyncio.sleep(0.1)  # the AS has read them from its error queue, and ignored them

    compromised = service.key_ring.active.kid
    await service.revoke_key(compromised, actor="operator")
    await server.tick()
    await within(
        NOTICE_WITHIN,
        lambda: compromised not in resource_server.key_set.kids,
        "the RS is told the key was revoked",
    )
    assert resource_server.registrations == 1 and resource_server.fetches == 0
