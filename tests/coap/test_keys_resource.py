"""/keys over real UDP: formats, ETag, content negotiation; and /.well-known/core.

Rollover, Max-Age and notifications are in test_rollover.py."""

from __future__ import annotations

import json

import aiocoap
import cbor2

from coap_auth.wire import CoapCode, ContentFormat, CoseKeyParam
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


async def test_no_change_means_no_notification(coap: Coap) -> None:
    assert not await coap.server.check_changes()


async def test_well_known_core_lists_the_resources(coap: Coap) -> None:
    response = await coap.request(aiocoap.GET, "/.well-known/core")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 40  # application/link-format
    links = response.payload.decode()
    assert '</token>;ct="19"' in links
    assert "</keys>;obs" in links and "102 50" in links
