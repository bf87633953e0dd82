"""The state file across a reboot: a device resumes its token and refresh family, and a crash
between the AS's answer and the write to disk recovers through the grace window."""

from __future__ import annotations

import stat
from pathlib import Path

import aiocoap

from coap_auth.clock import SettableClock
from coap_auth.tokens import token_hash, verify_cwt
from device_client import DeviceKey, SecretCredentials, StateFile, TokenClient
from tests.conftest import Coap
from tests.device_client.conftest import FAST_REFRESH, ISSUER


async def _boot(state_file: StateFile, clock: SettableClock) -> tuple[aiocoap.Context, TokenClient]:
    context = await aiocoap.Context.create_client_context()
    return context, TokenClient.from_state_file(
        context, state_file, clock=clock, policy=FAST_REFRESH
    )


async def _provision(
    coap: Coap, state_file: StateFile, credentials: SecretCredentials | DeviceKey, clock
) -> None:
    """First boot: credentials and AS go into the state file."""
    context = await aiocoap.Context.create_client_context()
    try:
        TokenClient(
            context,
            coap.base,
            credentials,
            audience="thermostat",
            issuer=ISSUER,
            state_file=state_file,
            clock=clock,
        )
    finally:
        await context.shutdown()


async def _live_families(coap: Coap, client_id: str) -> int:
    return len(await coap.service.store.list_families(client_id, coap.service.clock.now()))


async def test_state_file_survives_a_reboot(
    sensor: Coap, meter: DeviceKey, clock: SettableClock, tmp_path: Path
) -> None:
    state_file = StateFile(tmp_path / "meter-7.state")
    await _provision(sensor, state_file, meter, clock)
    assert stat.S_IMODE(state_file.path.stat().st_mode) == 0o600

    context, client = await _boot(state_file, clock)
    first = await client.token()
    await context.shutdown()  # power off

    context, client = await _boot(state_file, clock)
    try:
        # The cached token comes back from the file, with its refresh time: no request.
        assert client.cached == first
        assert (await client.token()).value == first.value
        assert await _live_families(sensor, "meter-7") == 1
        # Its refresh token too: the refresh continues the same family.
        clock.advance(first.refresh_at - clock.now())
        second = await client.token()
        assert second.value != first.value
        assert verify_cwt(second.value, sensor.service.key_ring.lookup).sub == "meter-7"
        assert await _live_families(sensor, "meter-7") == 1
    finally:
        await context.shutdown()
    assert stat.S_IMODE(state_file.path.stat().st_mode) == 0o600
    assert StateFile(state_file.path).load().access_token == second  # type: ignore[union-attr]


async def test_crash_before_saving_a_refresh_recovers_through_the_grace_window(
    sensor: Coap,
    secret_credentials: SecretCredentials,
    clock: SettableClock,
    tmp_path: Path,
) -> None:
    state_file = StateFile(tmp_path / "sensor-1.state")
    await _provision(sensor, state_file, secret_credentials, clock)
    context, client = await _boot(state_file, clock)
    first = await client.token()
    before_refresh = state_file.path.read_bytes()

    clock.advance(first.refresh_at - clock.now())
    lost = await client.token()  # the AS spent the refresh token and sent a successor...
    await context.shutdown()
    state_file.path.write_bytes(before_refresh)  # ...that never reached the disk

    clock.advance(10)  # reboot inside refresh_grace (30 s)
    context, client = await _boot(state_file, clock)
    try:
        recovered = await client.token()
        assert recovered.value not in (first.value, lost.value)
        assert await _live_families(sensor, "sensor-1") == 1
        assert not await sensor.service.store.is_revoked(token_hash(first.value))
        clock.advance(recovered.refresh_at - clock.now())
        assert (await client.token()).value != recovered.value
        assert await _live_families(sensor, "sensor-1") == 1
    finally:
        await context.shutdown()


async def test_crash_recovered_after_the_grace_window_falls_back_to_a_new_grant(
    sensor: Coap, meter: DeviceKey, clock: SettableClock, tmp_path: Path
) -> None:
    state_file = StateFile(tmp_path / "meter-7.state")
    await _provision(sensor, state_file, meter, clock)
    context, client = await _boot(state_file, clock)
    first = await client.token()
    before_refresh = state_file.path.read_bytes()
    clock.advance(first.refresh_at - clock.now())
    lost = await client.token()
    await context.shutdown()
    state_file.path.write_bytes(before_refresh)

    clock.advance(120)  # the device was down longer than the grace window
    context, client = await _boot(state_file, clock)
    try:
        # The old refresh token now looks stolen: its family dies, with its access tokens.
        fresh = await client.token()
        assert verify_cwt(fresh.value, sensor.service.key_ring.lookup).sub == "meter-7"
        assert await sensor.service.store.is_revoked(token_hash(lost.value))
        assert not await sensor.service.store.is_revoked(token_hash(fresh.value))
        assert await _live_families(sensor, "meter-7") == 1  # the new grant's
    finally:
        await context.shutdown()
