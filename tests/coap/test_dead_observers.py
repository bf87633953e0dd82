"""Issue 13: Observe registrations from sockets that are then closed must not cost anyone else
their observation. Over real UDP: each notification to a dead observer draws an ICMP port
unreachable; the resource server observing /keys must still learn of a revoked key at once,
and the server log holds no traceback.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable

import aiocoap
import pytest

from device_client import KeySetWatcher, WatchPolicy
from device_client._aiocoap_fixes import create_client_context
from tests.conftest import Coap

DEAD_OBSERVERS = 20
RUNS = 10
NOTICE_WITHIN = 2.0  # real seconds, for UDP delivery only
WATCH = WatchPolicy(request_timeout=2.0, poll_interval=0.02)

_message_ids = itertools.count(1)


async def register_and_vanish(port: int) -> None:
    """GET /keys with Observe from a fresh socket, wait for the registration, close."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
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
    await service.revoke_key(compromised)
    await server.tick()
    await within(
        NOTICE_WITHIN,
        lambda: compromised not in resource_server.key_set.kids,
        "the RS is told the key was revoked",
    )

    # The ICMP errors ended exactly the dead observations: the RS still hears every change.
    observations = server.keys_resource._observations  # aiocoap's set of ServerObservation
    await within(NOTICE_WITHIN, lambda: len(observations) == 1, "only the RS still observes")
    await service.rotate_keys(force=True)
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
