"""/keys over real UDP: formats, ETag and Max-Age, observe notifications on rotation;
and /.well-known/core."""

from __future__ import annotations

import asyncio
import json

import aiocoap
import cbor2

from coap_auth.keys import KeyState
from coap_auth.wire import AceParam, CoapCode, ContentFormat, CoseKeyParam
from tests.conftest import Coap


async def test_cose_key_set_and_jwks_carry_the_same_kids(coap: Coap) -> None:
    cose = await coap.request(aiocoap.GET, "/keys")
    assert cose.code == aiocoap.CONTENT
    assert cose.opt.content_format == ContentFormat.COSE_KEY_SET
    key_set = cbor2.loads(cose.payload)
    ring = coap.service.key_ring
    assert {k[CoseKeyParam.KID] for k in key_set} == {ring.active.kid, ring.next.kid}
    for key in key_set:
        assert key[CoseKeyParam.KTY] == 2 and key[CoseKeyParam.CRV] == 1
        assert key[CoseKeyParam.ALG] == -7 and key[CoseKeyParam.KEY_OPS] == [2]
        assert len(key[CoseKeyParam.X]) == 32 and len(key[CoseKeyParam.Y]) == 32
        assert CoseKeyParam.D not in key  # never a private part

    jwks = await coap.request(aiocoap.GET, "/keys", accept=ContentFormat.JSON)
    assert jwks.opt.content_format == ContentFormat.JSON
    document = json.loads(jwks.payload)
    assert {k["kid"] for k in document["keys"]} == {k[CoseKeyParam.KID].hex() for k in key_set}
    assert all("d" not in k for k in document["keys"])


async def test_etag_and_max_age(coap: Coap) -> None:
    first = await coap.request(aiocoap.GET, "/keys")
    assert first.opt.etag and first.opt.max_age is not None and first.opt.max_age > 0
    again = await coap.request(aiocoap.GET, "/keys", etags=[first.opt.etag])
    assert again.code == CoapCode.VALID and again.payload == b""
    jwks = await coap.request(aiocoap.GET, "/keys", accept=ContentFormat.JSON)
    assert jwks.opt.etag != first.opt.etag


async def test_unknown_accept_is_4_06(coap: Coap) -> None:
    response = await coap.request(aiocoap.GET, "/keys", accept=ContentFormat.ACE_CBOR)
    assert response.code == CoapCode.NOT_ACCEPTABLE
    assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR


async def test_post_to_keys_is_4_05(coap: Coap) -> None:
    response = await coap.request(aiocoap.POST, "/keys", b"\xa0", ContentFormat.ACE_CBOR)
    assert response.code == CoapCode.METHOD_NOT_ALLOWED


async def test_rotation_notifies_observers_and_new_tokens_use_a_notified_kid(coap: Coap) -> None:
    await coap.add_audience("thermostat")
    await coap.add_secret_client("sensor-1", ("thermostat",), "temp:read")
    request = coap.context.request(
        aiocoap.Message(code=aiocoap.GET, uri=coap.base + "/keys", observe=0)
    )
    first = await request.response
    assert first.opt.observe is not None
    notified = {k[CoseKeyParam.KID] for k in cbor2.loads(first.payload)}
    notifications = request.observation.__aiter__()

    for _ in range(3):
        old_active = coap.service.key_ring.active.kid
        await coap.service.rotate_keys()
        assert await coap.server.check_changes()
        update = await asyncio.wait_for(notifications.__anext__(), timeout=5)
        kids = {k[CoseKeyParam.KID] for k in cbor2.loads(update.payload)}
        ring = coap.service.key_ring
        # The promoted key had been published before it signed anything.
        assert ring.active.kid in notified
        assert old_active in kids  # retiring, still published
        assert ring.next.kid in kids and ring.active.kid in kids
        # A plain GET returns the same bytes as the notification.
        plain = await coap.request(aiocoap.GET, "/keys")
        assert plain.payload == update.payload and plain.opt.etag == update.opt.etag
        notified = kids

        response, body = await coap.post_ace(
            "/token",
            {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: coap.secrets["sensor-1"]},
        )
        assert response.code == aiocoap.CREATED
        protected = cbor2.loads(cbor2.loads(body[AceParam.ACCESS_TOKEN]).value.value[0])
        assert protected[4] == ring.active.kid and protected[4] in notified
    states = sorted(k.state for k in coap.service.key_ring.keys)
    assert states.count(KeyState.RETIRING) == 3 and states.count(KeyState.ACTIVE) == 1
    request.observation.cancel()


async def test_no_change_means_no_notification(coap: Coap) -> None:
    assert not await coap.server.check_changes()


async def test_well_known_core_lists_the_resources(coap: Coap) -> None:
    response = await coap.request(aiocoap.GET, "/.well-known/core")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 40  # application/link-format
    links = response.payload.decode()
    assert '</token>;ct="19"' in links
    assert "</keys>;obs" in links and "102 50" in links
