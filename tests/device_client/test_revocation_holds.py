"""Issue 13, items 2, 3 and 5, as they were found, over real UDP: a resource server that follows
the AS (/keys and /revoke/trl by Observe) against the real service.

- a token the RS already holds stops working when its signing key is revoked;
- a token signed with a stolen key and a far exp is refused;
- with the AS away the RS fails closed once past its staleness bound, and recovers when the
  AS returns;
- one client uploading its token from 64 ports cannot push out another client's token.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import aiocoap
import pytest

from coap_auth.clock import SettableClock
from coap_auth.tokens import decode_cose, encode_cwt, token_hash, verify_cwt
from device_client import (
    DeviceKey,
    KeySetWatcher,
    ResourceServer,
    StaleState,
    TokenClient,
    TokenVerifier,
    TrlWatcher,
    WatchPolicy,
)
from tests.conftest import Coap
from tests.device_client.conftest import (
    FAST_REFRESH,
    FAST_WATCH,
    ISSUER,
    Restarts,
    confirmed,
    eventually,
    fetch_key_set,
    issue_token,
)
from tests.device_client.lossy_proxy import LossyProxy
from tests.device_client.rs_site import CF_CWT, Temperature, Thermostat, serve

BOUND = 120  # the verifier's staleness bound in these tests (the default)


@dataclass
class FollowingRs(Thermostat):
    """A thermostat whose verifier follows the AS: its watchers of /keys and /revoke/trl."""

    port: int
    keys: KeySetWatcher
    trl: TrlWatcher


@pytest.fixture
async def rs(
    sensor: Coap, clock: SettableClock, device_context: aiocoap.Context
) -> AsyncIterator[FollowingRs]:
    watch_context = await aiocoap.Context.create_client_context()
    keys = KeySetWatcher(watch_context, sensor.base, clock=clock, policy=FAST_WATCH)
    trl = TrlWatcher(watch_context, sensor.base, clock=clock, policy=FAST_WATCH)
    await keys.start()
    await trl.start()
    verifier = TokenVerifier(
        keys, issuer=ISSUER, audience="thermostat", revocations=trl, clock=clock, leeway=0
    )
    assert verifier.max_staleness == BOUND
    resource_server = ResourceServer(verifier, as_uri=sensor.base)
    base, port, server = await serve(resource_server, {"temp": Temperature(resource_server)})
    try:
        yield FollowingRs(base, resource_server, device_context, port, keys, trl)
    finally:
        await keys.stop()
        await trl.stop()
        await server.shutdown()
        await watch_context.shutdown()


async def test_a_held_token_dies_with_its_revoked_key(
    sensor: Coap, rs: FollowingRs, clock: SettableClock
) -> None:
    token = await issue_token(sensor, clock)
    assert (await rs.upload(token)).code == aiocoap.CREATED
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT

    kid = decode_cose(token).kid
    await sensor.service.revoke_key(
        kid, actor="operator"
    )  # `coap-auth keys revoke` while the RS holds the token
    await sensor.server.check_changes()
    await eventually(lambda: kid not in rs.keys.key_set.kids, "the RS saw the key leave /keys")

    answer = await rs.send(aiocoap.GET, "/temp")
    assert answer.code == aiocoap.UNAUTHORIZED
    # A new upload of the same token is refused too (unknown kid, even after a fetch).
    clock.advance(30)  # past the refetch interval; the watchers poll and stay current
    await confirmed(clock, rs.keys, rs.trl)
    assert (await rs.upload(token)).code == aiocoap.UNAUTHORIZED


async def test_a_token_from_a_stolen_key_with_a_far_exp_is_refused(
    sensor: Coap, rs: FollowingRs, clock: SettableClock
) -> None:
    # The attacker holds the active private key (and can sign anything with it).
    active = sensor.service.key_ring.active
    genuine = verify_cwt(await issue_token(sensor, clock), sensor.service.key_ring.lookup)
    ten_years = replace(genuine, exp=clock.now() + 10 * 365 * 24 * 3600, cti=b"forged-1")
    forged = encode_cwt(ten_years, active.private_key, active.alg, active.kid)
    answer = await rs.upload(forged)
    assert answer.code == aiocoap.UNAUTHORIZED
    assert b"lifetime" in answer.payload
    # The same key and an ordinary lifetime is accepted: the lifetime bound refused it.
    within = replace(genuine, exp=clock.now() + 3600, cti=b"forged-2")
    assert (
        await rs.upload(encode_cwt(within, active.private_key, active.alg, active.kid))
    ).code == aiocoap.CREATED


async def test_with_the_as_away_the_rs_fails_closed_and_recovers(
    sensor: Coap, rs: FollowingRs, restarts: Restarts, clock: SettableClock
) -> None:
    token = await issue_token(sensor, clock)
    assert (await rs.upload(token)).code == aiocoap.CREATED
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT

    # The AS goes away; meanwhile the operator revokes the token (it is in the store).
    await sensor.server.stop()
    assert await sensor.service.revoke_token_hash(token_hash(token), actor="operator")

    # Within the bound the RS still serves from what it knew ...
    clock.advance(BOUND - 10)
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT
    # ... past it, it refuses every token, with 5.03 and a reason, held or new.
    clock.advance(20)
    answer = await rs.send(aiocoap.GET, "/temp")
    assert answer.code == aiocoap.SERVICE_UNAVAILABLE
    assert answer.opt.max_age is not None
    assert b"not confirmed" in answer.payload
    assert (await rs.upload(token)).code == aiocoap.SERVICE_UNAVAILABLE
    await asyncio.sleep(0.2)  # let the watchers fail a few times and back off
    assert rs.keys.retry_at is not None and rs.trl.retry_at is not None

    # The AS returns: within one back-off (at most 15 s) the RS is current again.
    await restarts.restart()
    clock.advance(16)
    await eventually(
        lambda: rs.keys.confirmed_at == clock.now() and rs.trl.confirmed_at == clock.now(),
        "the watchers hear from the AS again",
    )
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.UNAUTHORIZED  # revoked
    fresh = await issue_token(sensor, clock)
    assert (await rs.upload(fresh)).code == aiocoap.CREATED
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT


def _authz_info_datagram(token: bytes, message_id: int) -> bytes:
    message = aiocoap.Message(
        mtype=aiocoap.CON,
        token=message_id.to_bytes(2, "big"),
        code=aiocoap.POST,
        uri_path=("authz-info",),
        content_format=CF_CWT,
        payload=token,
    )
    message.mid = message_id
    return message.encode()


async def test_one_client_from_64_ports_cannot_evict_another(
    sensor: Coap, meter: DeviceKey, rs: FollowingRs, clock: SettableClock
) -> None:
    victim = await issue_token(sensor, clock)  # sensor-1: temp:read temp:write
    assert (await rs.upload(victim)).code == aiocoap.CREATED
    assert (await rs.send(aiocoap.PUT, "/temp", b"22")).code == aiocoap.CHANGED

    # meter-7 holds one valid read-only token and uploads it from 64 source ports.
    attacker = await TokenClient(
        sensor.context,
        sensor.base,
        meter,
        audience="thermostat",
        issuer=ISSUER,
        clock=clock,
        policy=FAST_REFRESH,
    ).token()
    sockets = []
    loop = asyncio.get_running_loop()
    try:
        for i in range(64):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            await loop.sock_sendto(
                sock, _authz_info_datagram(attacker.value, 0x100 + i), ("127.0.0.1", rs.port)
            )
        created = 0
        for sock in sockets:
            reply = aiocoap.Message.decode(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5.0))
            created += reply.code == aiocoap.CREATED
        assert created == 64  # each upload was a valid token, and was accepted
    finally:
        for sock in sockets:
            sock.close()

    held = [t.claims.sub for t in rs.resource_server._tokens.values()]
    assert held.count("meter-7") == rs.resource_server.max_tokens_per_subject
    assert (await rs.send(aiocoap.PUT, "/temp", b"23")).code == aiocoap.CHANGED


async def test_a_full_table_makes_room_from_the_largest_subject(
    sensor: Coap, clock: SettableClock
) -> None:
    """Unit-level check of the eviction order behind the 64-port test: a table of 3, at most 2
    per subject: a newcomer pushes out the oldest token of the subject holding the most."""
    key_set_lookup = sensor.service.key_ring.lookup

    class Keys:
        def lookup(self, kid: bytes):  # noqa: ANN201 - the KeySource protocol
            return key_set_lookup(kid)

        async def refetch(self) -> bool:
            return False

    verifier = TokenVerifier(
        Keys(), issuer=ISSUER, audience="thermostat", clock=clock, max_staleness=None
    )
    table = ResourceServer(verifier, max_tokens=3, max_tokens_per_subject=2)
    sensor_token = await issue_token(sensor, clock)
    await sensor.add_secret_client("sensor-2", ("thermostat",), "temp:read")
    other = await _issue_as(sensor, clock, "sensor-2")
    await table.accept(sensor_token, "a")
    await table.accept(sensor_token, "b")
    await table.accept(other, "c")
    await table.accept(other, "d")  # the table is full: sensor-1 (2 held, oldest "a") pays
    assert sorted(table._tokens) == ["b", "c", "d"]
    await table.accept(other, "e")  # sensor-2 over its share: its own oldest ("c") goes
    assert sorted(table._tokens) == ["b", "d", "e"]


async def _issue_as(coap: Coap, clock: SettableClock, client_id: str) -> bytes:
    response, body = await coap.post_ace(
        "/token", {24: client_id, 25: coap.secrets[client_id], 5: "thermostat"}
    )
    assert response.code == aiocoap.CREATED, body
    return body[1]


async def test_a_lost_observation_is_found_by_the_poll_behind_observe(
    sensor: Coap, rs: FollowingRs, restarts: Restarts, clock: SettableClock
) -> None:
    """The AS restarts and forgets its observers without a word; a key is then revoked. No
    notification comes, but the watcher's poll (every check_interval, 30 s) sees the change,
    takes it and re-registers, long before the key set's Max-Age (up to an hour) would."""
    token = await issue_token(sensor, clock)
    assert (await rs.upload(token)).code == aiocoap.CREATED
    server = await restarts.restart()
    registrations = rs.keys.registrations
    kid = decode_cose(token).kid
    await server.service.revoke_key(kid, actor="operator")
    await server.check_changes()
    await asyncio.sleep(0.2)  # a notification, had there been an observation, would be in
    assert kid in rs.keys.key_set.kids  # nobody told the RS

    clock.advance(30)
    await eventually(lambda: kid not in rs.keys.key_set.kids, "the poll saw the key leave")
    await eventually(lambda: rs.keys.registrations > registrations, "re-registration")
    assert (await rs.send(aiocoap.GET, "/temp")).code == aiocoap.UNAUTHORIZED


async def test_a_staleness_bound_below_the_poll_interval_is_refused(rs: FollowingRs) -> None:
    # It would refuse every token between two polls of a healthy AS (outsider test: an RS
    # run with --max-staleness 10 answered 5.03 while the AS was up).
    with pytest.raises(ValueError, match="check_interval"):
        TokenVerifier(
            rs.keys, issuer=ISSUER, audience="thermostat", revocations=rs.trl, max_staleness=30
        )


async def test_a_trl_watcher_is_not_current_until_its_list_is(
    sensor: Coap, device_context: aiocoap.Context, clock: SettableClock
) -> None:
    """Review finding: a diff answer whose full query is lost must not count as confirmed,
    or losing only the full queries would keep an RS accepting revoked tokens for ever."""
    proxy = await LossyProxy(("127.0.0.1", sensor.server.port)).start()
    lost = proxy.lose(lambda d: d.path == "/revoke/trl" and not d.query, limit=1)
    quick = WatchPolicy(request_timeout=0.5, poll_interval=0.02, backoff_initial=1)
    trl = TrlWatcher(device_context, proxy.uri, clock=clock, policy=quick)
    verifier = TokenVerifier(
        await fetch_key_set(sensor),
        issuer=ISSUER,
        audience="thermostat",
        revocations=trl,
        clock=clock,
    )
    try:
        await trl.start(wait=False)
        await eventually(lambda: lost.dropped == 1, "the full query's answer lost")
        await eventually(lambda: trl.retry_at is not None, "the watcher backs off")
        assert trl.confirmed_at is None
        with pytest.raises(StaleState):
            await verifier.verify(await issue_token(sensor, clock))
        clock.advance(2)  # the retry goes through
        await eventually(lambda: trl.confirmed_at == clock.now(), "the list confirmed")
        await verifier.verify(await issue_token(sensor, clock))
    finally:
        await trl.stop()
        proxy.close()


async def test_a_token_issued_in_the_future_is_refused(
    sensor: Coap, rs: FollowingRs, clock: SettableClock
) -> None:
    """Review finding: exp - iat of an hour, both ten years ahead, passed the lifetime bound."""
    active = sensor.service.key_ring.active
    genuine = verify_cwt(await issue_token(sensor, clock), sensor.service.key_ring.lookup)
    later = clock.now() + 10 * 365 * 24 * 3600
    forged = replace(genuine, iat=later, exp=later + 3600, cti=b"forged-3")
    answer = await rs.upload(encode_cwt(forged, active.private_key, active.alg, active.kid))
    assert answer.code == aiocoap.UNAUTHORIZED
    assert b"future" in answer.payload


async def test_a_source_that_cannot_say_how_current_it_is_fails_closed(
    sensor: Coap, clock: SettableClock
) -> None:
    class Keys:  # a home-made key source, without confirmed_at
        def lookup(self, kid: bytes):  # noqa: ANN201 - the KeySource protocol
            return sensor.service.key_ring.lookup(kid)

        async def refetch(self) -> bool:
            return False

    verifier = TokenVerifier(Keys(), issuer=ISSUER, audience="thermostat", clock=clock)
    with pytest.raises(StaleState):
        await verifier.verify(await issue_token(sensor, clock))
