"""ResourceServer over real UDP: /authz-info (RFC 9200 §5.10.1) and require_scope on a resource,
with tokens from the running service and a device on its own CoAP endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiocoap
import cbor2
import pytest
from aiocoap.optiontypes import OpaqueOption

from coap_auth.clock import SettableClock
from coap_auth.wire import AceParam
from device_client import ResourceServer, TokenVerifier
from tests.conftest import Coap
from tests.device_client.conftest import ISSUER, fetch_key_set, fetch_trl, issue_token
from tests.device_client.rs_site import Temperature, Thermostat, serve

CF_ACE, CF_PROBLEM = 19, 257  # docs/protocol.md, written out on purpose


async def _serve(
    coap: Coap, clock: SettableClock, audience: str
) -> tuple[str, ResourceServer, aiocoap.Context]:
    verifier = TokenVerifier(
        await fetch_key_set(coap), issuer=ISSUER, audience=audience, clock=clock, leeway=0
    )
    # Bearer tokens: this RS predates the OSCORE profiles (tests/device_client/
    # test_rs_profiles*.py); they are accepted only when allowed.
    resource_server = ResourceServer(verifier, as_uri=coap.base, allow_bearer=True)
    base, _, context = await serve(resource_server, {"temp": Temperature(resource_server)})
    return base, resource_server, context


@pytest.fixture
async def thermostat(
    sensor: Coap, clock: SettableClock, device_context: aiocoap.Context
) -> AsyncIterator[Thermostat]:
    base, resource_server, context = await _serve(sensor, clock, "thermostat")
    yield Thermostat(base, resource_server, device_context)
    await context.shutdown()


def _problem(response: aiocoap.Message) -> str:
    assert response.opt.content_format == CF_PROBLEM
    body = cbor2.loads(response.payload)
    return body[-2]


async def test_upload_then_scope_guard(
    thermostat: Thermostat, sensor: Coap, clock: SettableClock
) -> None:
    token = await issue_token(sensor, clock, scope="temp:read")
    response = await thermostat.upload(token)
    assert response.code == aiocoap.CREATED

    response = await thermostat.send(aiocoap.GET, "/temp")
    assert response.code == aiocoap.CONTENT and response.payload == b"21.5"
    response = await thermostat.send(aiocoap.PUT, "/temp", b"19.0")
    assert response.code == aiocoap.FORBIDDEN  # RFC 9200 §5.10.2: valid token, narrow scope
    assert "scope" in _problem(response)

    # A new upload from the same endpoint replaces the token.
    wider = await issue_token(sensor, clock, scope="temp:read temp:write")
    assert (await thermostat.upload(wider)).code == aiocoap.CREATED
    response = await thermostat.send(aiocoap.PUT, "/temp", b"19.0")
    assert response.code == aiocoap.CHANGED
    assert (await thermostat.send(aiocoap.GET, "/temp")).payload == b"19.0"


async def test_no_token_gets_as_request_creation_hints(
    thermostat: Thermostat, sensor: Coap, clock: SettableClock
) -> None:
    await thermostat.upload(await issue_token(sensor, clock))
    # Another device (its own endpoint) has uploaded nothing.
    other = await aiocoap.Context.create_client_context()
    try:
        request = aiocoap.Message(code=aiocoap.GET, uri=thermostat.base + "/temp")
        response = await other.request(request).response
    finally:
        await other.shutdown()
    assert response.code == aiocoap.UNAUTHORIZED
    assert response.opt.content_format == CF_ACE
    # RFC 9200 §5.3: AS 1, audience 5, scope 9.
    assert cbor2.loads(response.payload) == {1: sensor.base, 5: "thermostat", 9: "temp:read"}


async def test_bad_uploads_are_refused_with_a_reason(
    thermostat: Thermostat, sensor: Coap, clock: SettableClock
) -> None:
    good = await issue_token(sensor, clock)
    foreign = await issue_token(sensor, clock, audience="dashboard", token_format="cwt")
    tampered = bytearray(good)
    tampered[-1] ^= 1
    # RFC 9200 §5.10.1.1: 4.01 for a token that does not verify, 4.03 for another audience.
    cases = {
        b"\x01\x02\x03": ("COSE", aiocoap.UNAUTHORIZED),
        foreign: ("another audience", aiocoap.FORBIDDEN),
        bytes(tampered): ("signature", aiocoap.UNAUTHORIZED),
    }
    for token, (reason, code) in cases.items():
        response = await thermostat.upload(token)
        assert response.code == code, reason
        detail = _problem(response)
        assert reason in detail, detail
        assert token.hex() not in response.payload.hex()
    response = await thermostat.upload(good, content_format=50)
    assert response.code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    response = await thermostat.upload(b"\xd8" * 5000)
    assert response.code == aiocoap.REQUEST_ENTITY_TOO_LARGE
    # Nothing was kept for this endpoint.
    assert (await thermostat.send(aiocoap.GET, "/temp")).code == aiocoap.UNAUTHORIZED

    clock.advance(600)  # the thermostat audience's lifetime: expired (leeway 0)
    response = await thermostat.upload(good)
    assert response.code == aiocoap.UNAUTHORIZED and "expired" in _problem(response)


async def test_kept_token_expires_and_revocation_drops_it(
    thermostat: Thermostat, sensor: Coap, clock: SettableClock
) -> None:
    token = await issue_token(sensor, clock)
    assert (await thermostat.upload(token)).code == aiocoap.CREATED
    clock.advance(599)
    assert (await thermostat.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT
    clock.advance(1)
    response = await thermostat.send(aiocoap.GET, "/temp")
    assert response.code == aiocoap.UNAUTHORIZED
    assert cbor2.loads(response.payload)[5] == "thermostat"

    token = await issue_token(sensor, clock)
    assert (await thermostat.upload(token)).code == aiocoap.CREATED
    revoked, _ = await sensor.post_ace(
        "/revoke",
        {
            AceParam.TOKEN: token,
            AceParam.CLIENT_ID: "sensor-1",
            AceParam.CLIENT_SECRET: sensor.secrets["sensor-1"],
        },
    )
    assert revoked.code == aiocoap.CHANGED
    verifier = thermostat.resource_server.verifier
    verifier.revocations = await fetch_trl(sensor)
    dropped = thermostat.resource_server.purge()
    assert [v.claims.sub for _, v in dropped] == ["sensor-1"]
    assert (await thermostat.send(aiocoap.GET, "/temp")).code == aiocoap.UNAUTHORIZED


async def test_bearer_tokens_are_refused_unless_allowed(
    sensor: Coap, clock: SettableClock, device_context: aiocoap.Context
) -> None:
    verifier = TokenVerifier(
        await fetch_key_set(sensor), issuer=ISSUER, audience="thermostat", clock=clock, leeway=0
    )
    resource_server = ResourceServer(verifier, as_uri=sensor.base)  # allow_bearer=False
    base, _, context = await serve(
        resource_server, {"temp": Temperature(resource_server)}, bearer=False
    )
    try:
        plain = Thermostat(base, resource_server, device_context)
        response = await plain.upload(await issue_token(sensor, clock))
        assert response.code == aiocoap.UNAUTHORIZED and "bearer" in _problem(response)
        response = await plain.send(aiocoap.GET, "/temp")
        assert response.code == aiocoap.UNAUTHORIZED
        assert cbor2.loads(response.payload) == {1: sensor.base, 5: "thermostat", 9: "temp:read"}
        assert resource_server._tokens == {}
    finally:
        await context.shutdown()


async def test_jwt_upload(
    sensor: Coap, clock: SettableClock, device_context: aiocoap.Context
) -> None:
    base, resource_server, context = await _serve(sensor, clock, "dashboard")
    try:
        dashboard = Thermostat(base, resource_server, device_context)
        token = await issue_token(sensor, clock, audience="dashboard")
        assert token.startswith(b"ey")
        assert (await dashboard.upload(token)).code == aiocoap.CREATED
        assert (await dashboard.send(aiocoap.GET, "/temp")).code == aiocoap.CONTENT
    finally:
        await context.shutdown()


@pytest.mark.parametrize("number", [9, 65001])
async def test_an_unknown_critical_option_gets_bad_option_and_changes_nothing(
    thermostat: Thermostat, sensor: Coap, clock: SettableClock, number: int
) -> None:
    """RFC 7252 §5.4.1, at the resource server too (found by the outsider test of issue 13:
    a PUT with option 65001 was applied)."""
    assert (await thermostat.upload(await issue_token(sensor, clock))).code == aiocoap.CREATED
    request = aiocoap.Message(code=aiocoap.PUT, uri=thermostat.base + "/temp", payload=b"99")
    request.opt.add_option(OpaqueOption(number, b"\x01"))
    answer = await thermostat.device.request(request).response
    assert answer.code == aiocoap.BAD_OPTION
    assert answer.opt.content_format == CF_PROBLEM
    reading = await thermostat.send(aiocoap.GET, "/temp")
    assert reading.code == aiocoap.CONTENT and reading.payload != b"99"
