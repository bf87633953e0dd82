"""device_client answers the AS's Echo challenge on its own (RFC 9175 §2.4): against an AS
that does not count 127.0.0.1 as verified (`verified_networks = ""`), TokenClient in lab mode,
KeySetWatcher and TrlWatcher get through the challenge, observe, and follow changes; aiocoap's
plain client, for comparison, stops at the 4.01.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.config import Settings
from coap_auth.echo import is_echo_challenge
from coap_auth.tokens import token_hash
from device_client import (
    KeySetWatcher,
    SecretCredentials,
    TokenClient,
    TrlWatcher,
    WatchPolicy,
)
from tests.conftest import Coap, second_server
from tests.device_client.conftest import FAST_REFRESH, FAST_WATCH, ISSUER, confirmed, eventually


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # Loopback is trusted by default; here it is not, so the device is an unverified source.
    return replace(settings, verified_networks="")


def _published(coap: Coap) -> frozenset[bytes]:
    return frozenset(k.kid for k in coap.service.keys.published())


async def test_aiocoap_plain_client_stops_at_the_challenge(sensor: Coap) -> None:
    # What every test below gets past: the AS does challenge this address.
    response = await sensor.request(aiocoap.GET, "/keys")
    assert is_echo_challenge(response)
    assert not response.payload


def sensor_client(context: aiocoap.Context, sensor: Coap, clock: SettableClock) -> TokenClient:
    """sensor-1's TokenClient (by its secret, lab mode) on `context`."""
    return TokenClient(
        context,
        sensor.base,
        SecretCredentials("sensor-1", sensor.secrets["sensor-1"]),
        audience="thermostat",
        issuer=ISSUER,
        clock=clock,
        policy=FAST_REFRESH,
    )


async def test_token_client_answers_the_echo_challenge_in_lab_mode(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    client = sensor_client(device_context, sensor, clock)
    guard = sensor.server.guard
    token = await client.token()
    assert token.value
    assert guard.challenges == 1  # the first /token: challenged, then answered
    # Verified now: the refresh goes through at once.
    await client.refresh_now()
    assert guard.challenges == 1
    # Challenged again once echo_verified_lifetime has passed; the refresh still works.
    clock.advance(sensor.server.verified.lifetime)
    refreshed = await client.refresh_now()
    assert refreshed.value != token.value
    assert guard.challenges == 2
    await client.revoke()
    assert client.cached is None


async def test_key_set_watcher_observes_through_the_challenge_and_follows_a_rotation(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    watcher = KeySetWatcher(device_context, sensor.base, clock=clock, policy=FAST_WATCH)
    await watcher.start()
    try:
        assert watcher.key_set.kids == _published(sensor)
        assert sensor.server.guard.challenges == 1  # the registration
        assert sensor.server.verified.is_verified("127.0.0.1")

        await sensor.service.rotate_keys(force=True, actor="operator")
        await sensor.server.check_changes()
        # The clock stands still, so no poll: the notification brought it.
        await eventually(lambda: watcher.key_set.kids == _published(sensor), "the rotation")
        assert watcher.registrations == 1

        # After echo_verified_lifetime the AS challenges again; the watcher re-registers
        # (its notifications are long overdue by then) through the challenge.
        clock.advance(sensor.server.verified.lifetime + 1)
        await confirmed(clock, watcher)
        assert sensor.server.guard.challenges == 2
        await sensor.service.rotate_keys(force=True, actor="operator")
        await sensor.server.check_changes()
        await eventually(lambda: watcher.key_set.kids == _published(sensor), "a second rotation")
    finally:
        await watcher.stop()


async def test_trl_watcher_observes_through_the_challenge(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    watcher = TrlWatcher(device_context, sensor.base, clock=clock, policy=FAST_WATCH)
    client = sensor_client(device_context, sensor, clock)
    await watcher.start()
    try:
        assert watcher.synced and watcher.registrations == 1
        token = (await client.token()).value
        await client.revoke()
        await sensor.server.check_changes()
        await eventually(lambda: watcher.is_revoked(token_hash(token)), "the revocation")
    finally:
        await watcher.stop()


# -- a registration the AS declines ---------------------------------------------------------


@pytest.fixture
async def one_observer_each(
    sensor: Coap, settings: Settings, clock: SettableClock
) -> AsyncIterator[Coap]:
    """A second AS on the same store holding one observation per source address."""
    async with second_server(sensor, settings, clock, observers_per_source=1) as limited:
        yield limited


RETRY = WatchPolicy(
    request_timeout=2.0,
    poll_interval=0.02,
    check_interval=30,
    observe_retry_initial=100,
    observe_retry_max=400,
    backoff_jitter=0,
)


async def test_a_declined_registration_polls_and_registers_again_after_a_back_off(
    one_observer_each: Coap, clock: SettableClock
) -> None:
    coap = one_observer_each
    first_context = await aiocoap.Context.create_client_context()
    second_context = await aiocoap.Context.create_client_context()
    observed = KeySetWatcher(first_context, coap.base, clock=clock, policy=RETRY)
    declined = KeySetWatcher(second_context, coap.base, clock=clock, policy=RETRY)
    try:
        await observed.start()
        await declined.start()
        # The AS holds one observation of 127.0.0.1: the second watcher has the state, and
        # no observation.
        assert declined.key_set.kids == _published(coap)
        assert (observed.declined, declined.declined) == (0, 1)
        assert declined.observe_retry_at == clock.now() + 100

        # No loop: real time passes, the clock does not, nothing more is sent.
        await asyncio.sleep(0.3)
        assert declined.registrations == 1

        # A rotation: notified to the first, polled by the second within check_interval.
        await coap.service.rotate_keys(force=True, actor="operator")
        await coap.server.check_changes()
        await eventually(lambda: observed.key_set.kids == _published(coap), "the notification")
        assert declined.key_set.kids != _published(coap)
        clock.advance(RETRY.check_interval)
        await eventually(lambda: declined.key_set.kids == _published(coap), "the poll")
        assert declined.registrations == 1

        # Registering again once the back-off has passed; declined again, it doubles.
        clock.advance(100 - RETRY.check_interval)
        await eventually(lambda: declined.declined == 2, "a second registration")
        assert declined.registrations == 2
        assert declined.observe_retry_at == clock.now() + 200

        # Once the AS has room (here: a larger limit), the next registration is an observation.
        coap.server.observers.per_source = 2
        clock.advance(200)
        await eventually(lambda: declined.observe_retry_at is None, "the observation")
        assert declined.registrations == 3 and declined.declined == 2
        await coap.service.rotate_keys(force=True, actor="operator")
        await coap.server.check_changes()
        await eventually(lambda: declined.key_set.kids == _published(coap), "a notification")
    finally:
        await declined.stop()
        await observed.stop()
        await first_context.shutdown()
        await second_context.shutdown()
