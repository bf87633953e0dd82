"""Key rollover seen from a device and a resource server, over real UDP: three rotations
followed by Observe, a server restart that loses the observation, and the unknown-kid fetch."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import aiocoap
import cbor2
import pytest

from coap_auth.clock import SettableClock
from coap_auth.coap.server import Server
from coap_auth.service import AuthService
from device_client import (
    InvalidSignature,
    KeySetWatcher,
    SecretCredentials,
    TokenClient,
    TokenVerifier,
)
from tests.conftest import Coap
from tests.device_client.conftest import (
    FAST_REFRESH,
    FAST_WATCH,
    ISSUER,
    Restarts,
    confirmed,
    eventually,
)


def _kid(token: bytes) -> bytes:
    """The kid in a tagged CWT's protected header (RFC 9052 §3.1, label 4)."""
    protected = cbor2.loads(cbor2.loads(token).value.value[0])
    return protected[4]


def _published(service: AuthService) -> frozenset[bytes]:
    return frozenset(k.kid for k in service.keys.published())


async def _sees(watcher: KeySetWatcher, kids: frozenset[bytes]) -> None:
    await eventually(lambda: watcher.key_set.kids == kids, "the key set notified")


async def _rotate(server: Server) -> frozenset[bytes]:
    # --force: the tests do not wait out the pre-publication lead on the clock; the new
    # active key was published (and notified) at the previous rotation all the same.
    await server.service.rotate_keys(force=True, actor="operator")
    await server.check_changes()  # what the change-feed poll does every 0.5 s
    return _published(server.service)


@pytest.fixture
async def device(
    sensor: Coap,
    device_context: aiocoap.Context,
    secret_credentials: SecretCredentials,
    clock: SettableClock,
) -> AsyncIterator[tuple[KeySetWatcher, TokenVerifier, TokenClient]]:
    """A resource server's watcher and verifier, and a device's token client, on one AS."""
    watcher = KeySetWatcher(device_context, sensor.base, clock=clock, policy=FAST_WATCH)
    await watcher.start()
    try:
        verifier = TokenVerifier(watcher, issuer=ISSUER, audience="thermostat", clock=clock)
        client = TokenClient(
            device_context,
            sensor.base,
            secret_credentials,
            audience="thermostat",
            issuer=ISSUER,
            clock=clock,
            policy=FAST_REFRESH,
            rng=random.Random(3),
        )
        yield watcher, verifier, client
    finally:
        await watcher.stop()


async def test_three_rotations_and_a_restart(
    sensor: Coap,
    restarts: Restarts,
    device: tuple[KeySetWatcher, TokenVerifier, TokenClient],
    clock: SettableClock,
) -> None:
    watcher, verifier, client = device
    token = await client.token()
    await verifier.verify(token.value)
    kids = [_kid(token.value)]

    for _ in range(3):
        published = await _rotate(sensor.server)
        await _sees(watcher, published)
        clock.advance(token.refresh_at - clock.now())
        await confirmed(clock, watcher)
        previous, token = token, await client.token()
        assert _kid(token.value) == sensor.service.key_ring.active.kid
        assert (await verifier.verify(token.value)).claims.sub == "sensor-1"
        # The token signed before the rotation still verifies: its key is retiring.
        await verifier.verify(previous.value)
        kids.append(_kid(token.value))
    assert len(set(kids)) == 4
    assert watcher.fetches == 0  # every change came by notification

    # The AS restarts and forgets its observers.
    server = await restarts.restart()
    registrations = watcher.registrations
    clock.advance(token.refresh_at - clock.now())
    await confirmed(clock, watcher)
    token = await client.token()  # the refresh family survived the restart
    await verifier.verify(token.value)
    assert len(await server.service.store.list_families("sensor-1", clock.now())) == 1

    # Max-Age (at most 3600 s) passes without a notification: the watcher re-registers
    # (RFC 7641 §3.3.1) and hears the next rotations again.
    clock.advance(3600)
    await eventually(lambda: watcher.registrations > registrations, "re-registration")
    for _ in range(2):
        published = await _rotate(server)
        await _sees(watcher, published)
    token = await client.token()
    await confirmed(clock, watcher)
    assert _kid(token.value) == server.service.key_ring.active.kid
    assert (await verifier.verify(token.value)).claims.sub == "sensor-1"
    assert watcher.fetches == 0


async def test_unknown_kid_is_fetched_once_rate_limited_then_rejected(
    restarts: Restarts,
    device: tuple[KeySetWatcher, TokenVerifier, TokenClient],
    clock: SettableClock,
) -> None:
    watcher, verifier, client = device
    # A restart loses the observation; two rotations later the active kid is one the
    # watcher has never been told about.
    server = await restarts.restart()
    registrations = watcher.registrations
    await _rotate(server)
    published = await _rotate(server)
    token = await client.token()
    assert _kid(token.value) not in watcher.key_set.kids

    with pytest.raises(InvalidSignature):
        verifier.verify_offline(token.value)  # no I/O: unknown kid
    assert watcher.fetches == 0

    verified = await verifier.verify(token.value)  # one fetch, then accepted
    assert verified.claims.sub == "sensor-1"
    assert watcher.fetches == 1
    assert watcher.key_set.kids == published
    # The fetch showed a change the observation never brought: re-registered.
    await eventually(lambda: watcher.registrations > registrations, "re-registration")

    # A token under a kid nobody published: one fetch per 10 s at most.
    forged = token.value.replace(_kid(token.value), b"\x00" * 8)
    clock.advance(10)
    for _ in range(3):
        with pytest.raises(InvalidSignature, match="unknown key id"):
            await verifier.verify(forged)
    assert watcher.fetches == 2
    clock.advance(10)
    with pytest.raises(InvalidSignature):
        await verifier.verify(forged)
    assert watcher.fetches == 3
