"""A refresh whose answer the link loses: the device retries inside the grace window and its
refresh family survives (docs/protocol.md "Refresh tokens"). The loss is real: a UDP relay drops
the server's datagrams."""

from __future__ import annotations

import random

import aiocoap
import cbor2

from coap_auth.clock import SettableClock
from coap_auth.tokens import token_hash, verify_cwt
from coap_auth.wire import AceParam, GrantType
from device_client import SecretCredentials, TokenClient
from tests.conftest import Coap
from tests.device_client.conftest import FAST_REFRESH, ISSUER
from tests.device_client.lossy_proxy import Datagram, LossyProxy


def _is_refresh(message: Datagram) -> bool:
    if message.path != "/token":
        return False
    body = cbor2.loads(message.payload)
    return body.get(AceParam.GRANT_TYPE) == GrantType.REFRESH_TOKEN


async def test_lost_refresh_answer_recovers_through_the_grace_window(
    sensor: Coap,
    device_context: aiocoap.Context,
    secret_credentials: SecretCredentials,
    clock: SettableClock,
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    try:
        client = TokenClient(
            device_context,
            proxy.uri,
            secret_credentials,
            audience="thermostat",
            issuer=ISSUER,
            clock=clock,
            policy=FAST_REFRESH,
            rng=random.Random(1),
        )
        first = await client.token()
        lost = proxy.lose(_is_refresh)
        clock.advance(first.refresh_at - clock.now())

        # The AS spends the refresh token and answers; every datagram of the answer is lost.
        assert (await client.token()).value == first.value  # still valid: keep using it
        assert lost.matched >= 1 and lost.dropped >= 1
        assert client.retry_at is not None

        lost.limit = lost.dropped  # the link recovers
        clock.advance(client.retry_at - clock.now())
        assert clock.now() - first.refresh_at <= 30  # inside refresh_grace
        second = await client.token()

        assert second.value != first.value
        assert verify_cwt(second.value, sensor.service.key_ring.lookup).sub == "sensor-1"
        # No theft was detected: one live family, nothing revoked.
        families = await sensor.service.store.list_families("sensor-1", clock.now())
        assert len(families) == 1
        assert not await sensor.service.store.is_revoked(token_hash(first.value))
        assert not await sensor.service.store.is_revoked(token_hash(second.value))
        # And the chain goes on from the successor the device did receive.
        clock.advance(second.refresh_at - clock.now())
        third = await client.token()
        assert third.value not in (first.value, second.value)
        families = await sensor.service.store.list_families("sensor-1", clock.now())
        assert len(families) == 1
    finally:
        proxy.close()
