"""Issue 14, RFC 9770 §5 as written: the TRL is served only over the protected channel, and
each registered device sees only the hashes pertaining to it (tokens issued to it as a
client, or for it as an audience). Over real UDP, EDHOC + OSCORE."""

from __future__ import annotations

import aiocoap
import cbor2

from coap_auth.tokens import token_hash
from coap_auth.wire import AceParam, ContentFormat, TrlParam
from tests.secure.conftest import Device, Protected


async def grant(device: Device, audience: str) -> bytes:
    response, body = await device.post_ace("/token", {AceParam.AUDIENCE: audience})
    assert response.code == aiocoap.CREATED, body
    return bytes(body[AceParam.ACCESS_TOKEN])


async def revoke(device: Device, token: bytes) -> None:
    response, _ = await device.post_ace("/revoke", {AceParam.TOKEN: token})
    assert response.code == aiocoap.CHANGED


async def full_list(device: Device) -> set[bytes]:
    response = await device.request(aiocoap.GET, "/revoke/trl")
    assert response.code == aiocoap.CONTENT, response
    assert response.opt.content_format == ContentFormat.ACE_TRL_CBOR
    return set(cbor2.loads(response.payload)[TrlParam.FULL_SET])


async def test_two_devices_see_only_their_own_entries(protected: Protected) -> None:
    boiler = await protected.resource_server("boiler")
    a = await protected.device("sensor-a", audiences=("boiler", "dashboard"))
    b = await protected.device("sensor-b", audiences=("boiler", "dashboard"))
    for device in (a, b, boiler):
        await device.handshake()
    a_boiler, a_dashboard = await grant(a, "boiler"), await grant(a, "dashboard")
    b_boiler, b_dashboard = await grant(b, "boiler"), await grant(b, "dashboard")
    for device, token in ((a, a_boiler), (a, a_dashboard), (b, b_boiler)):
        await revoke(device, token)
    # b_dashboard stays live: on nobody's list.
    assert await full_list(a) == {token_hash(a_boiler), token_hash(a_dashboard)}
    assert await full_list(b) == {token_hash(b_boiler)}
    # The resource server sees the tokens issued for its audience, whoever they went to.
    assert await full_list(boiler) == {token_hash(a_boiler), token_hash(b_boiler)}
    assert token_hash(b_dashboard) not in await full_list(b)
