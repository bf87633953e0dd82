"""Issue 13 over real UDP: a revoked token, re-encoded, stays refused.

For a CWT and a JWT audience: the AS issues a token, the holder revokes it at /revoke, and
every other byte form of it (tests/tokens/variants.py: same signature, another RFC 9770
hash) is refused at a resource server's /authz-info (4.01) and on its resource, and
/introspect answers {10: false} for it. Time is the SettableClock's; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import resource
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.clock import SettableClock
from coap_auth.store import Audience
from coap_auth.tokens import cose_key_from_public
from coap_auth.wire import AceParam
from device_client import ResourceServer, TokenVerifier, require_scope
from tests.conftest import Coap
from tests.device_client.conftest import ISSUER, fetch_key_set, fetch_trl
from tests.device_client.rs_site import serve
from tests.tokens.variants import cwt_variants, jwt_variants

CF_CWT, CF_PROBLEM = 61, 257  # docs/protocol.md, written out on purpose
ACTIVE = 10  # RFC 9200 §5.9.2
RS_SECRET = "introspection-secret-of-the-doors-0123"
CLIENT = "lock-1"


class Door(resource.Resource):
    def __init__(self, resource_server: ResourceServer) -> None:
        super().__init__()
        self.resource_server = resource_server  # where require_scope looks

    @require_scope("door:open")
    async def render_get(self, request: aiocoap.Message) -> aiocoap.Message:
        return aiocoap.Message(code=aiocoap.CONTENT, payload=b"open")


@dataclass
class DoorServer:
    """A resource server for one audience, on its own UDP endpoint, and a device talking to it."""

    audience: str
    base: str
    resource_server: ResourceServer
    device: aiocoap.Context

    async def send(self, method: aiocoap.Code, path: str, payload: bytes = b"") -> aiocoap.Message:
        message = aiocoap.Message(code=method, uri=self.base + path, payload=payload)
        if path == "/authz-info":
            message.opt.content_format = CF_CWT
        return await self.device.request(message).response


@pytest.fixture
async def doors(
    sensor: Coap, clock: SettableClock, device_context: aiocoap.Context
) -> AsyncIterator[dict[str, DoorServer]]:
    """Audiences door-cwt and door-jwt (each may introspect), client lock-1, and one resource
    server per audience verifying against the AS's published keys."""
    service = sensor.service
    for audience, token_format in (("door-cwt", "cwt"), ("door-jwt", "jwt")):
        await service.store.add_audience(
            Audience(
                audience,
                token_format,
                600,
                clock.now(),
                introspect_secret_digest=service.secret_digest(RS_SECRET),
            ),
            "operator",
        )
    await sensor.add_secret_client(CLIENT, ("door-cwt", "door-jwt"), "door:open")
    keys = await fetch_key_set(sensor)
    servers: dict[str, DoorServer] = {}
    contexts = []
    try:
        for audience in ("door-cwt", "door-jwt"):
            verifier = TokenVerifier(keys, issuer=ISSUER, audience=audience, clock=clock, leeway=0)
            resource_server = ResourceServer(verifier, as_uri=sensor.base)
            base, _, context = await serve(resource_server, {"door": Door(resource_server)})
            contexts.append(context)
            servers[audience] = DoorServer(audience, base, resource_server, device_context)
        yield servers
    finally:
        for context in contexts:
            await context.shutdown()


def _credentials(coap: Coap) -> dict[int, Any]:
    return {AceParam.CLIENT_ID: CLIENT, AceParam.CLIENT_SECRET: coap.secrets[CLIENT]}


async def _issue(coap: Coap, audience: str) -> bytes:
    response, body = await coap.post_ace(
        "/token", {**_credentials(coap), AceParam.AUDIENCE: audience}
    )
    assert response.code == aiocoap.CREATED, body
    return body[AceParam.ACCESS_TOKEN]


async def _introspect(coap: Coap, audience: str, token: bytes) -> dict[int, Any]:
    response, body = await coap.post_ace(
        "/introspect",
        {AceParam.CLIENT_ID: audience, AceParam.CLIENT_SECRET: RS_SECRET, AceParam.TOKEN: token},
    )
    assert response.code == aiocoap.CREATED, body
    return body


def _reason(response: aiocoap.Message) -> str:
    assert response.opt.content_format == CF_PROBLEM
    return cbor2.loads(response.payload)[-2]


@pytest.mark.parametrize("audience", ["door-cwt", "door-jwt"])
async def test_revoked_token_reencoded_is_refused_everywhere(
    sensor: Coap, doors: dict[str, DoorServer], audience: str
) -> None:
    door = doors[audience]
    token = await _issue(sensor, audience)
    is_jwt = token.startswith(b"ey")
    assert is_jwt == (audience == "door-jwt")
    variants = (jwt_variants if is_jwt else cwt_variants)(token, es256=True)
    assert "ECDSA high-s twin" in variants  # the AS signs ES256 by default

    # Live: the token works, and /introspect knows only its one form.
    assert (await door.send(aiocoap.POST, "/authz-info", token)).code == aiocoap.CREATED
    assert (await door.send(aiocoap.GET, "/door")).code == aiocoap.CONTENT
    assert (await _introspect(sensor, audience, token))[ACTIVE] is True
    for name, other in variants.items():
        assert await _introspect(sensor, audience, other) == {ACTIVE: False}, name

    # Revoked: the RS follows the TRL and drops the token it kept.
    response, _ = await sensor.post_ace("/revoke", {**_credentials(sensor), AceParam.TOKEN: token})
    assert response.code == aiocoap.CHANGED
    door.resource_server.verifier.revocations = await fetch_trl(sensor)
    assert [v.claims.sub for _, v in door.resource_server.purge()] == [CLIENT]
    assert (await door.send(aiocoap.GET, "/door")).code == aiocoap.UNAUTHORIZED
    response = await door.send(aiocoap.POST, "/authz-info", token)
    assert response.code == aiocoap.UNAUTHORIZED and "revoked" in _reason(response)
    assert await _introspect(sensor, audience, token) == {ACTIVE: False}

    # Every other form of the revoked token: refused at /authz-info, on the resource, and by
    # /introspect, and no answer echoes it.
    for name, other in variants.items():
        response = await door.send(aiocoap.POST, "/authz-info", other)
        assert response.code == aiocoap.UNAUTHORIZED, name
        assert "revoked" not in _reason(response), name  # refused for its form, not by the TRL
        assert other.hex() not in response.payload.hex()
        assert (await door.send(aiocoap.GET, "/door")).code == aiocoap.UNAUTHORIZED, name
        assert await _introspect(sensor, audience, other) == {ACTIVE: False}, name


@pytest.mark.parametrize("audience", ["door-cwt", "door-jwt"])
async def test_introspection_of_a_pop_token_returns_its_cnf(
    sensor: Coap, doors: dict[str, DoorServer], audience: str
) -> None:
    """RFC 9200 §5.9.2: cnf 8 = {1: COSE_Key} for a PoP token, the JWT's (RFC 7800 jwk)
    turned back into the COSE_Key it was issued for."""
    holder = cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    response, body = await sensor.post_ace(
        "/token",
        {**_credentials(sensor), AceParam.AUDIENCE: audience, AceParam.REQ_CNF: {1: holder}},
    )
    assert response.code == aiocoap.CREATED, body
    assert body[AceParam.TOKEN_TYPE] == 2  # PoP
    answer = await _introspect(sensor, audience, body[AceParam.ACCESS_TOKEN])
    assert answer[ACTIVE] is True and answer[2] == CLIENT
    assert answer[8] == {1: holder}
