"""Fixtures for the device side: the real server of tests/conftest.py, devices pointed at it.

The device and the service share one SettableClock; real waits are only for UDP delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.config import Settings
from coap_auth.service import AuthService
from coap_auth.store import MasterKey, SqliteStore
from coap_auth.tokens import cose_key_from_public
from coap_auth.wire import AceParam, ContentFormat
from device_client import (
    DeviceKey,
    KeySet,
    RefreshPolicy,
    RevocationList,
    SecretCredentials,
    TokenClient,
    WatchPolicy,
    decode_full_set,
)
from tests.conftest import Coap

ISSUER = "coap://as.test"  # tests/conftest.py settings
DELIVERY_TIMEOUT = 5.0  # real seconds for a notification to arrive

# Fast enough for tests: give up on an answer after 1 s, look at the clock every 20 ms.
FAST_REFRESH = RefreshPolicy(request_timeout=1.0, backoff_initial=2.0, backoff_max=16.0)
FAST_WATCH = WatchPolicy(request_timeout=2.0, poll_interval=0.02, min_refetch_interval=10)


@pytest.fixture
async def device_context() -> AsyncIterator[aiocoap.Context]:
    """The CoAP stack of one device (its own UDP socket)."""
    context = await aiocoap.Context.create_client_context()
    yield context
    await context.shutdown()


@pytest.fixture
def secret_credentials(sensor: Coap) -> SecretCredentials:
    return SecretCredentials("sensor-1", sensor.secrets["sensor-1"])


@pytest.fixture
async def meter(sensor: Coap) -> DeviceKey:
    """Client `meter-7`, registered by its P-256 public key, scope temp:read for thermostat."""
    device = DeviceKey.generate("meter-7")
    await sensor.add_key_client(
        "meter-7",
        ("thermostat",),
        "temp:read",
        cose_key_from_public(device.private_key.public_key()),
    )
    return device


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait (real time, for UDP delivery only) until `condition()` holds."""
    deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


async def confirmed(clock: SettableClock, *watchers: Any) -> None:
    """Wait until each watcher has heard from the AS at the clock's present time: after a jump
    of the clock a verifier is stale (fail closed) until its watchers have polled the AS."""
    await eventually(
        lambda: all(w.confirmed_at == clock.now() for w in watchers), "watchers current"
    )


async def eventually_async(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DELIVERY_TIMEOUT
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.01)


async def fetch_key_set(coap: Coap) -> KeySet:
    """GET /keys from the running server, as a fixed KeySet."""
    response = await coap.request(aiocoap.GET, "/keys")
    assert response.opt.content_format == ContentFormat.COSE_KEY_SET
    return KeySet.from_cose_key_set(response.payload)


async def fetch_trl(coap: Coap) -> RevocationList:
    """A full query of /revoke/trl from the running server."""
    response = await coap.request(aiocoap.GET, "/revoke/trl")
    assert response.code == aiocoap.CONTENT, response.payload
    return RevocationList.from_full_set(decode_full_set(response.payload))


async def issue_token(coap: Coap, clock: SettableClock, **options: Any) -> bytes:
    """A token for sensor-1 (thermostat unless `audience` says otherwise), over UDP."""
    client = TokenClient(
        coap.context,
        coap.base,
        SecretCredentials("sensor-1", coap.secrets["sensor-1"]),
        issuer=ISSUER,
        clock=clock,
        policy=FAST_REFRESH,
        **{"audience": "thermostat", **options},
    )
    return (await client.token()).value


async def revoke_token(coap: Coap, token: bytes) -> None:
    """sensor-1 revokes its own access token at /revoke (RFC 7009 semantics)."""
    response, body = await coap.post_ace(
        "/revoke",
        {
            AceParam.TOKEN: token,
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: coap.secrets["sensor-1"],
        },
    )
    assert response.code == aiocoap.CHANGED, body


@pytest.fixture
async def restarts(
    sensor: Coap, settings: Settings, clock: SettableClock
) -> AsyncIterator[Restarts]:
    restarts = Restarts(sensor.server, settings, clock)
    yield restarts
    await restarts.close()


class Restarts:
    """Restarts of the AS: stop the server, start a new one with a new store on the same data
    dir and port (its observers are forgotten, as after a power cut)."""

    def __init__(self, server: Server, settings: Settings, clock: SettableClock) -> None:
        self.server = server
        self.settings = settings
        self.clock = clock
        self._started: list[Server] = []

    async def restart(self) -> Server:
        port = self.server.port
        await self.server.stop()
        master_key = MasterKey.load(self.settings.data_dir, create=False)
        store = SqliteStore.in_data_dir(self.settings.data_dir, master_key)
        await store.open()
        service = AuthService(store, master_key, self.settings, self.clock)
        self.server = Server(service, "127.0.0.1", port)  # type: ignore[arg-type]
        self._started.append(self.server)
        await self.server.start()
        return self.server

    async def close(self) -> None:
        for server in self._started:
            await server.stop()
            await server.service.store.close()
