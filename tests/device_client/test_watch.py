"""The observe loop when the AS is away: start fails fast, or backs off and syncs on return."""

from __future__ import annotations

import asyncio

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from device_client import KeySetWatcher, ServiceUnreachable, WatchPolicy
from tests.conftest import Coap
from tests.device_client.conftest import eventually
from tests.device_client.lossy_proxy import LossyProxy

QUICK = WatchPolicy(request_timeout=0.3, poll_interval=0.02, backoff_initial=4, backoff_max=60)


async def test_start_and_wait_raises_when_the_as_does_not_answer(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    try:
        proxy.lose(lambda m: True)
        watcher = KeySetWatcher(device_context, proxy.uri, clock=clock, policy=QUICK)
        with pytest.raises(ServiceUnreachable, match="/keys: no answer"):
            await watcher.start()
        assert not watcher.synced
        await watcher.stop()  # already stopped: harmless
    finally:
        proxy.close()


async def test_a_cancelled_start_ends_the_loop_it_began(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    try:
        proxy.lose(lambda m: True)
        watcher = KeySetWatcher(device_context, proxy.uri, clock=clock, policy=QUICK)
        starting = asyncio.create_task(watcher.start())
        await eventually(lambda: watcher.registrations > 0, "the first registration")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("watch ")]
    finally:
        proxy.close()


async def test_backs_off_while_the_as_is_away_and_syncs_when_it_returns(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    watcher = KeySetWatcher(device_context, proxy.uri, clock=clock, policy=QUICK)
    try:
        away = proxy.lose(lambda m: m.path == "/keys")
        await watcher.start(wait=False)
        await eventually(lambda: watcher.retry_at is not None, "the first failure")
        assert not watcher.synced
        delay = watcher.retry_at - clock.now()  # type: ignore[operator]
        assert 2 <= delay <= 4  # backoff_initial 4 s, jittered down by up to half
        sent = away.matched
        await asyncio.sleep(0.3)  # real time passes, the clock does not: no retry
        assert away.matched == sent

        away.limit = away.dropped  # the AS is back
        clock.advance(delay)
        await eventually(lambda: watcher.synced, "the key set")
        published = {k.kid for k in sensor.service.keys.published()}
        assert watcher.key_set.kids == published
        assert watcher.retry_at is None
    finally:
        await watcher.stop()
        proxy.close()
