"""TrlWatcher against the running service's /revoke/trl (RFC 9770) over real UDP: revocations
and delistings arrive by Observe as diffs; updates missed while the AS was away are fetched
from the cursor."""

from __future__ import annotations

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.tokens import token_hash
from device_client import (
    InvalidClaims,
    RevocationList,
    TokenRevoked,
    TokenVerifier,
    TrlWatcher,
)
from tests.conftest import Coap
from tests.device_client.conftest import (
    FAST_WATCH,
    ISSUER,
    Restarts,
    eventually,
    fetch_key_set,
    issue_token,
    revoke_token,
)


async def test_revocation_and_expiry_arrive_as_diffs(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    seen: list[frozenset[bytes]] = []

    def changed(revocations: RevocationList, added: frozenset[bytes]) -> None:
        seen.append(added)

    watcher = TrlWatcher(
        device_context, sensor.base, clock=clock, policy=FAST_WATCH, on_change=changed
    )
    await watcher.start()
    try:
        assert watcher.synced and len(watcher.revocations) == 0
        verifier = TokenVerifier(
            await fetch_key_set(sensor),
            issuer=ISSUER,
            audience="thermostat",
            revocations=watcher,
            clock=clock,
            leeway=0,
        )
        token = await issue_token(sensor, clock)
        kept = await issue_token(sensor, clock)
        await verifier.verify(token)

        await revoke_token(sensor, token)
        await sensor.server.check_changes()  # what the change-feed poll does every 0.5 s
        await eventually(lambda: watcher.is_revoked(token_hash(token)), "revocation notified")
        assert seen == [frozenset({token_hash(token)})]
        with pytest.raises(TokenRevoked):
            await verifier.verify(token)
        await verifier.verify(kept)

        # RFC 9770 §5.1: the hash leaves the list when the token expires.
        clock.advance(600)
        await sensor.server.tick()
        await eventually(lambda: not watcher.is_revoked(token_hash(token)), "delisting")
        with pytest.raises(InvalidClaims, match="expired"):
            await verifier.verify(token)
        # All of it came as diffs after the one full query at the start.
        assert watcher.full_queries == 1
    finally:
        await watcher.stop()


async def test_updates_missed_while_the_as_was_away_come_from_the_cursor(
    sensor: Coap,
    restarts: Restarts,
    device_context: aiocoap.Context,
    clock: SettableClock,
) -> None:
    # A window of one diff per notification: a re-registration shows only the newest.
    watcher = TrlWatcher(device_context, sensor.base, diff_window=1, clock=clock, policy=FAST_WATCH)
    await watcher.start()
    try:
        first = await issue_token(sensor, clock)
        await revoke_token(sensor, first)
        await sensor.server.check_changes()
        await eventually(lambda: watcher.is_revoked(token_hash(first)), "first revocation")

        server = await restarts.restart()  # the observation is lost
        coap = Coap(sensor.context, sensor.base, server, server.service, sensor.secrets)
        missed = [await issue_token(coap, clock) for _ in range(3)]
        for token in missed:
            await revoke_token(coap, token)
        await server.check_changes()
        registrations = watcher.registrations

        clock.advance(60)  # the TRL's Max-Age (none given: 60 s, RFC 7252 §5.10.5)
        await eventually(lambda: watcher.registrations > registrations, "re-registration")
        await eventually(
            lambda: all(watcher.is_revoked(token_hash(t)) for t in missed), "missed revocations"
        )
        assert watcher.is_revoked(token_hash(first))
        assert watcher.cursor_queries >= 1
        assert watcher.full_queries == 1
    finally:
        await watcher.stop()
