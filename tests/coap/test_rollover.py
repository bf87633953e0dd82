"""Key rollover over real UDP (issue 4): the schedule, Max-Age, revocation, key families,
symmetric audiences and block-wise key sets, watched the way a device watches: by Observe.

The clock is a SettableClock moved to each scheduled moment; `Server.tick()` is what the
server's own loop runs every poll interval.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import aiocoap
import cbor2
import pytest

from coap_auth.errors import OperatorError
from coap_auth.keys import KeyState
from coap_auth.store import Audience
from coap_auth.tokens import verify_maced_cwt
from coap_auth.wire import AceParam, CoapCode, CoseKeyParam
from tests.conftest import Coap

NOTIFY_TIMEOUT = 5


def kid_of(access_token: bytes) -> bytes:
    cose = cbor2.loads(access_token).value
    return cbor2.loads(cose.value[0])[4]


def kids_of(payload: bytes) -> set[bytes]:
    return {k[CoseKeyParam.KID] for k in cbor2.loads(payload)}


class KeysObserver:
    """An aiocoap observation of /keys, remembering the last set it was told."""

    def __init__(self, coap: Coap) -> None:
        self.coap = coap
        self.request = coap.context.request(
            aiocoap.Message(code=aiocoap.GET, uri=coap.base + "/keys", observe=0)
        )
        self.notified: set[bytes] = set()
        self.count = 0

    async def start(self) -> aiocoap.Message:
        first = await self.request.response
        assert first.opt.observe is not None, "/keys did not accept the observation"
        self.notified = kids_of(first.payload)
        self._updates = aiter(self.request.observation)
        return first

    async def next(self) -> aiocoap.Message:
        update = await asyncio.wait_for(anext(self._updates), NOTIFY_TIMEOUT)
        self.notified = kids_of(update.payload)
        self.count += 1
        return update

    def cancel(self) -> None:
        self.request.observation.cancel()


async def token_kid(coap: Coap, client_id: str = "sensor-1", audience: str | None = None) -> bytes:
    body = {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: coap.secrets[client_id]}
    if client_id == "sensor-1":
        body[AceParam.AUDIENCE] = audience or "thermostat"
    response, body = await coap.post_ace("/token", body)
    assert response.code == aiocoap.CREATED, body
    return kid_of(body[AceParam.ACCESS_TOKEN])


async def test_three_scheduled_rotations_and_a_revocation_reach_every_observer(
    sensor: Coap,
) -> None:
    service, clock = sensor.service, sensor.service.clock
    observer = KeysObserver(sensor)
    await observer.start()
    assert await token_kid(sensor) in observer.notified

    rotations = 0
    while rotations < 3:
        before = service.key_ring
        due = service.keys.next_change()
        assert due is not None and due > clock.now()
        clock.set(due - 1)
        await sensor.server.tick()
        assert service.key_ring == before, "changed before it was due"
        clock.set(due)
        await sensor.server.tick()
        update = await observer.next()
        ring = service.key_ring
        if ring.active.kid != before.active.kid:
            rotations += 1
            # The promoted key was published (and notified) a lead or more before it signs.
            assert ring.active.kid in kids_of_ring(before)
            assert clock.now() - ring.active.created_at >= service.settings.key_prepublication_lead
            assert before.active.kid in observer.notified  # now retiring, still published
        else:
            # A retiring key left once every token it signed had expired.
            removed = {k.kid for k in before.published} - {k.kid for k in ring.published}
            assert len(removed) == 1
            (gone,) = removed
            assert ring.find(gone).state == KeyState.REMOVED
            assert ring.find(gone).private_key is None  # its secret is destroyed
            assert gone not in observer.notified
        # A plain GET gives the notification's bytes; Max-Age never outlives the next change.
        plain = await sensor.request(aiocoap.GET, "/keys")
        assert plain.payload == update.payload and plain.opt.etag == update.opt.etag
        assert update.opt.max_age <= service.keys.next_change() - clock.now()
        # At no time is a token signed with a kid the observer has not been told.
        assert await token_kid(sensor) in observer.notified

    # Emergency: the active key is compromised. It vanishes from the set at once, and the
    # next key (already published) signs from now on.
    compromised = service.key_ring.active.kid
    await service.revoke_key(compromised, actor="operator")
    await sensor.server.tick()
    await observer.next()
    assert compromised not in observer.notified
    assert await token_kid(sensor) in observer.notified
    assert service.key_ring.find(compromised).state == KeyState.REVOKED
    observer.cancel()


def kids_of_ring(ring: Any) -> set[bytes]:
    return {k.kid for k in ring.published}


async def test_a_retiring_key_outlives_every_token_it_signed(coap: Coap) -> None:
    """An audience with a long token lifetime, added while the server runs (by another
    process, as the CLI would): the next scheduled rotation keeps the old key published until
    that audience's tokens have expired."""
    service, clock = coap.service, coap.service.clock
    await coap.add_audience("archive", lifetime=5 * 86400)  # longer than the rotation period
    await coap.add_secret_client("logger", ("archive",), "read")
    signed_by_old = service.key_ring.active.kid
    assert await token_kid(coap, "logger") == signed_by_old
    last_exp = clock.now() + 5 * 86400

    clock.set(service.keys.next_change())
    await coap.server.tick()
    old = service.key_ring.find(signed_by_old)
    assert old.state == KeyState.RETIRING and old.retire_until >= last_exp
    # Rotations go on; the old key stays published until the token it signed has expired.
    while clock.now() < last_exp:
        clock.set(min(service.keys.next_change(), last_exp))
        await coap.server.tick()
        published = kids_of((await coap.request(aiocoap.GET, "/keys")).payload)
        assert signed_by_old in published, clock.now() - last_exp
    clock.set(old.retire_until)
    await coap.server.tick()
    assert signed_by_old not in kids_of((await coap.request(aiocoap.GET, "/keys")).payload)


async def test_max_age_counts_down_to_the_next_scheduled_change(coap: Coap) -> None:
    service, clock = coap.service, coap.service.clock
    due = service.keys.next_change()
    assert due is not None
    far = await coap.request(aiocoap.GET, "/keys")
    assert far.opt.max_age == min(3600, due - clock.now())
    clock.set(due - 10)
    near = await coap.request(aiocoap.GET, "/keys")
    assert near.opt.max_age == 10
    assert near.payload == far.payload


async def test_rotation_before_the_lead_is_refused_unless_forced(coap: Coap) -> None:
    service = coap.service
    before = service.key_ring
    with pytest.raises(OperatorError, match="lead"):
        await service.rotate_keys(actor="operator")
    assert await coap.service.store.load_keys() == list(before.keys)
    audit_before = len(await service.store.audit_entries())

    await service.rotate_keys(force=True, actor="operator")
    assert service.key_ring.active.kid == before.next.kid
    events = [e.event.event for e in (await service.store.audit_entries())[audit_before:]]
    assert sorted(events) == ["key.activated", "key.created", "key.retired"]


async def test_revoking_next_or_retiring_keys_and_bad_kids(coap: Coap) -> None:
    service = coap.service
    service.clock.advance(service.settings.key_prepublication_lead)
    await service.rotate_keys(actor="operator")
    ring = service.key_ring
    retiring = next(k for k in ring.keys if k.state == KeyState.RETIRING)
    await service.revoke_key(ring.next.kid, actor="operator")
    assert service.key_ring.next is not None and service.key_ring.next.kid != ring.next.kid
    assert service.key_ring.active.kid == ring.active.kid  # the active key is untouched
    await service.revoke_key(retiring.kid, actor="operator")
    published = {k.kid for k in service.keys.published()}
    assert retiring.kid not in published and ring.next.kid not in published
    with pytest.raises(OperatorError, match="already revoked"):
        await service.revoke_key(retiring.kid, actor="operator")
    with pytest.raises(OperatorError, match="no key"):
        await service.revoke_key(b"\x00" * 8, actor="operator")


async def _own_family_audience(coap: Coap, audience_id: str, key_alg: str, lifetime: int) -> None:
    await coap.service.store.add_audience(
        Audience(
            audience_id,
            "cwt",
            lifetime,
            coap.service.clock.now(),
            key_family=audience_id,
            key_alg=key_alg,
        ),
        "operator",
    )
    await coap.service.load_keys()
    await coap.server.check_changes()


async def test_an_audience_with_its_own_family_is_isolated_from_the_default(sensor: Coap) -> None:
    service = sensor.service
    await _own_family_audience(sensor, "door", "EdDSA", 300)
    await sensor.add_secret_client("lock-1", ("door",), "open")
    default_ring, door_ring = service.keys.ring(), service.keys.ring("door")
    published = await sensor.request(aiocoap.GET, "/keys")
    assert kids_of(published.payload) == kids_of_ring(default_ring) | kids_of_ring(door_ring)

    door_kid = await token_kid(sensor, "lock-1")
    assert door_kid == door_ring.active.kid
    # Compromise of the door family: the default family goes on signing with the same key.
    await service.revoke_key(door_kid, actor="operator")
    assert service.keys.ring().active == default_ring.active
    assert await token_kid(sensor) == default_ring.active.kid
    assert await token_kid(sensor, "lock-1") == door_ring.next.kid


async def test_symmetric_audience_gets_maced_tokens_and_its_keys_are_never_published(
    sensor: Coap,
) -> None:
    service = sensor.service
    await _own_family_audience(sensor, "valve", "HMAC256/64", 120)
    await sensor.add_secret_client("valve-ctl", ("valve",), "open")
    ring = service.keys.ring("valve")
    response, body = await sensor.post_ace(
        "/token",
        {AceParam.CLIENT_ID: "valve-ctl", AceParam.CLIENT_SECRET: sensor.secrets["valve-ctl"]},
    )
    assert response.code == aiocoap.CREATED
    token = body[AceParam.ACCESS_TOKEN]
    assert token[:3] == b"\xd8\x3d\xd1"  # 61(17(...)): COSE_Mac0
    assert verify_maced_cwt(token, ring.active.private_key).aud == "valve"

    published = kids_of((await sensor.request(aiocoap.GET, "/keys")).payload)
    assert not {k.kid for k in ring.keys} & published
    jwks = (await sensor.request(aiocoap.GET, "/keys", accept=50)).payload
    assert ring.active.kid.hex().encode() not in jwks
    # No scheduled rotation for a family whose keys reach its audience out of band.
    assert ring.rotation_due_at(service.keys._policies["valve"]) is None
    response, body = await sensor.post_ace(
        "/token",
        {
            AceParam.CLIENT_ID: "valve-ctl",
            AceParam.CLIENT_SECRET: sensor.secrets["valve-ctl"],
            "token_format": "jwt",
        },
    )
    assert response.code == CoapCode.BAD_REQUEST and body[AceParam.ERROR] == 1


async def test_a_large_key_set_goes_block_wise(coap: Coap) -> None:
    for n in range(6):
        await _own_family_audience(coap, f"rs-{n}", "ES256", 600)
    full = await coap.request(aiocoap.GET, "/keys")  # aiocoap reassembles the blocks
    assert len(full.payload) > 1024
    assert len(cbor2.loads(full.payload)) == 14

    # A raw first request, as a constrained device would send it: only the first block
    # comes back, with Block2 saying there is more.
    request = aiocoap.Message(code=aiocoap.GET, uri_path=("keys",))
    request.mtype, request.mid, request.token = aiocoap.CON, 0x1234, b"\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(NOTIFY_TIMEOUT)
        await asyncio.to_thread(sock.sendto, request.encode(), ("127.0.0.1", coap.server.port))
        datagram = await asyncio.to_thread(sock.recv, 2048)
    response = aiocoap.Message.decode(datagram)
    assert response.code == aiocoap.CONTENT
    block = response.opt.block2
    assert block is not None and block.block_number == 0 and block.more
    assert len(response.payload) == block.size
    assert full.payload.startswith(response.payload)
