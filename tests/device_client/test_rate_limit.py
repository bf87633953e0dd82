"""A device rate-limited by the AS (4.29 with Max-Age, RFC 8516) waits as long as told."""

from __future__ import annotations

from dataclasses import replace

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from device_client import SecretCredentials, ServiceUnreachable, TokenClient
from tests.conftest import Coap
from tests.device_client.conftest import FAST_REFRESH, ISSUER

PER_CLIENT = 3


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """tests/conftest.py's settings with the per-client limit on (3 requests a minute)."""
    return replace(settings, rate_limit_per_client=PER_CLIENT, rate_limit_window=60)


async def test_rate_limited_device_waits_as_long_as_max_age_says(
    sensor: Coap,
    device_context: aiocoap.Context,
    secret_credentials: SecretCredentials,
    clock: SettableClock,
) -> None:
    for _ in range(PER_CLIENT):  # another process of the same client uses up the window
        response, _ = await sensor.post_ace(
            "/token",
            {24: "sensor-1", 25: secret_credentials.secret, 5: "thermostat"},
        )
        assert response.code == aiocoap.CREATED
    window_left = 60 - clock.now() % 60

    client = TokenClient(
        device_context,
        sensor.base,
        secret_credentials,
        audience="thermostat",
        issuer=ISSUER,
        clock=clock,
        policy=FAST_REFRESH,
    )
    with pytest.raises(ServiceUnreachable, match="4.29") as raised:
        await client.token()
    # Not before Max-Age, though the back-off alone (2 s) would retry sooner.
    assert window_left > 2
    assert raised.value.retry_at == clock.now() + window_left
    clock.advance(window_left - 1)
    with pytest.raises(ServiceUnreachable, match="backing off"):
        await client.token()
    clock.advance(1)
    assert (await client.token()).value
