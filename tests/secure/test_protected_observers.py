"""Issue 16 (review): a device on the protected channel whose address was never verified
(EDHOC needs no Echo: message_2 fits the 3x bound) still gets the periodic CON of RFC 7641
§4.5, so that a device that went away is found out; its Observe answers keep the type the
registry chose, through OSCORE and the amplification guard."""

from __future__ import annotations

import asyncio
import dataclasses

import aiocoap
import pytest

from coap_auth.config import Settings
from tests.device_client.lossy_proxy import TYPE_CON, TYPE_NON, LossyProxy
from tests.secure.conftest import Protected

CON_INTERVAL = 60


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, verified_networks="", notify_con_interval=CON_INTERVAL)


async def notifications(proxy: LossyProxy, after: int, count: int) -> list[int]:
    """The types of the first `count` notifications the server sent after datagram `after`."""
    for _ in range(200):
        found = [d for d in proxy.from_server[after:] if d.observe and d.code >> 5 == 2]
        if len(found) >= count:
            return [d.type for d in found[:count]]
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} notifications came")


async def test_a_protected_observer_never_verified_gets_its_periodic_con(
    protected: Protected,
) -> None:
    server = protected.server
    proxy = await LossyProxy(("127.0.0.1", server.port)).start()  # type: ignore[arg-type]
    try:
        device = await protected.device("sensor-1")
        device.base = proxy.uri
        await device.handshake()
        request = aiocoap.Message(code=aiocoap.GET, uri=f"{proxy.uri}/revoke/trl", observe=0)
        observation = device.context.request(request)
        assert (await observation.response).code == aiocoap.CONTENT
        assert not server.verified.is_verified("127.0.0.1")  # nothing asked for an Echo
        observers = server.observers.of(server.trl_resource)
        assert len(observers) == 1

        seen = len(proxy.from_server)
        server.observers.notify(observers, force=True)
        assert await notifications(proxy, seen, 1) == [TYPE_NON]

        protected.service.clock.advance(CON_INTERVAL)  # type: ignore[attr-defined]
        seen = len(proxy.from_server)
        server.observers.notify(observers, force=True)
        assert await notifications(proxy, seen, 1) == [TYPE_CON]
        # The device acknowledged it: the observation goes on, NON again.
        seen = len(proxy.from_server)
        server.observers.notify(observers, force=True)
        assert await notifications(proxy, seen, 1) == [TYPE_NON]
        assert len(server.observers.of(server.trl_resource)) == 1
        observation.observation.cancel()
    finally:
        proxy.close()
