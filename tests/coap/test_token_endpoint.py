"""/token over real UDP: issue CWT and JWT, check them with independent libraries, and check
every error docs/protocol.md names."""

from __future__ import annotations

import json
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from pycose.keys import CoseKey
from pycose.messages import CoseMessage

from coap_auth.tokens import Claims, cose_key_from_public, verify_cwt
from coap_auth.tokens.cose import sign1
from coap_auth.wire import (
    AceErrorCode,
    AceParam,
    CoapCode,
    ContentFormat,
    CoseAlg,
    CoseHeader,
    CwtClaim,
)
from tests import raw_coap
from tests.conftest import Coap

TOKEN = "/token"


def _cred(coap: Coap, client_id: str = "sensor-1") -> dict[int, Any]:
    return {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: coap.secrets[client_id]}


async def _key_set(coap: Coap) -> list[dict[int, Any]]:
    response = await coap.request(aiocoap.GET, "/keys")
    assert response.code == aiocoap.CONTENT
    return cbor2.loads(response.payload)


def _ace_error(response: aiocoap.Message, body: Any, code: CoapCode, ace_code: int) -> None:
    assert response.code == code, (response.code, body)
    assert response.opt.content_format == ContentFormat.ACE_CBOR
    assert body[AceParam.ERROR] == ace_code
    # The description is left out when the answer would be over 3x the request (RFC 7252
    # §11.3; see test_limits.py); when it is there, it says something.
    description = body.get(AceParam.ERROR_DESCRIPTION)
    assert description is None or (isinstance(description, str) and description)
    assert set(body) <= {AceParam.ERROR, AceParam.ERROR_DESCRIPTION}


async def test_cwt_issued_over_udp_verifies_with_pycose(sensor: Coap) -> None:
    response, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat"}
    )
    assert response.code == aiocoap.CREATED
    assert response.opt.content_format == ContentFormat.ACE_CBOR
    assert body[AceParam.EXPIRES_IN] == 600
    assert body[AceParam.TOKEN_TYPE] == 1  # Bearer
    assert AceParam.SCOPE not in body  # granted exactly what was registered
    token = body[AceParam.ACCESS_TOKEN]
    # A normal token response fits one datagram without block-wise.
    assert len(response.payload) <= 256 and response.opt.block2 is None

    outer = cbor2.loads(token)
    assert outer.tag == 61 and outer.value.tag == 18
    kid = cbor2.loads(outer.value.value[0])[CoseHeader.KID]
    published = {k[2]: k for k in await _key_set(sensor)}
    assert kid in published

    message = CoseMessage.decode(cbor2.dumps(outer.value))
    cose_key = {k: v for k, v in published[kid].items() if k in (1, -1, -2, -3)}
    message.key = CoseKey.from_dict(cose_key)
    assert message.verify_signature()
    claims = cbor2.loads(message.payload)
    now = sensor.service.clock.now()
    assert claims[CwtClaim.ISS] == "coap://as.test"
    assert claims[CwtClaim.SUB] == "sensor-1"
    assert claims[CwtClaim.AUD] == "thermostat"
    assert claims[CwtClaim.IAT] == now and claims[CwtClaim.EXP] == now + 600
    assert len(claims[CwtClaim.CTI]) >= 8
    assert claims[CwtClaim.SCOPE] == "temp:read temp:write"
    assert CwtClaim.CNF not in claims


async def test_jwt_issued_over_udp_verifies_with_joserfc(sensor: Coap) -> None:
    response, body = await sensor.post_ace(TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "dashboard"})
    assert response.code == aiocoap.CREATED
    token = body[AceParam.ACCESS_TOKEN].decode("ascii")

    keys = await sensor.request(aiocoap.GET, "/keys", accept=ContentFormat.JSON)
    assert keys.code == aiocoap.CONTENT and keys.opt.content_format == ContentFormat.JSON
    decoded = jose_jwt.decode(
        token, KeySet.import_key_set(json.loads(keys.payload)), algorithms=["ES256"]
    )
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.claims["iss"] == "coap://as.test"
    assert decoded.claims["aud"] == "dashboard"
    assert decoded.claims["client_id"] == "sensor-1"
    assert decoded.claims["exp"] - decoded.claims["iat"] == 900


async def test_token_format_parameter_overrides_the_audience_default(sensor: Coap) -> None:
    _, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat", "token_format": "jwt"}
    )
    assert body[AceParam.ACCESS_TOKEN].count(b".") == 2
    _, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "dashboard", "token_format": "cwt"}
    )
    assert cbor2.loads(body[AceParam.ACCESS_TOKEN]).tag == 61


async def test_narrowed_scope_is_reported(sensor: Coap) -> None:
    response, body = await sensor.post_ace(
        TOKEN,
        {**_cred(sensor), AceParam.AUDIENCE: "thermostat", AceParam.SCOPE: "temp:read valve:open"},
    )
    assert response.code == aiocoap.CREATED
    assert body[AceParam.SCOPE] == "temp:read"
    claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
    assert claims.scope == "temp:read"


@pytest.mark.parametrize("holder", ["p256", "ed25519"])
async def test_req_cnf_makes_a_pop_token(sensor: Coap, holder: str) -> None:
    public = (
        ec.generate_private_key(ec.SECP256R1()).public_key()
        if holder == "p256"
        else ed25519.Ed25519PrivateKey.generate().public_key()
    )
    cose_key = cose_key_from_public(public)
    response, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat", AceParam.REQ_CNF: {1: cose_key}}
    )
    assert response.code == aiocoap.CREATED
    assert body[AceParam.TOKEN_TYPE] == 2  # PoP
    assert body[AceParam.CNF] == {1: cose_key}
    claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
    assert claims.cnf_key == cose_key


# -- client assertions ------------------------------------------------------------------------


def _assertion(
    device: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    alg: CoseAlg,
    now: int,
    *,
    client_id: str = "meter-7",
    cti: bytes = b"cti-0001",
    aud: str = "coap://as.test",
    exp_in: int = 120,
) -> bytes:
    claims = Claims(iss=client_id, sub=client_id, aud=aud, exp=now + exp_in, iat=now, cti=cti)
    return cbor2.dumps(
        cbor2.CBORTag(61, sign1(cbor2.dumps(claims.to_cwt_map()), device, alg, b"device-kid"))
    )


@pytest.fixture
async def meter(sensor: Coap) -> ec.EllipticCurvePrivateKey:
    """The private key of client `meter-7`, registered by its P-256 public key."""
    device = ec.generate_private_key(ec.SECP256R1())
    await sensor.add_key_client(
        "meter-7", ("thermostat",), "temp:read", cose_key_from_public(device.public_key())
    )
    return device


@pytest.mark.parametrize("alg", [CoseAlg.ES256, CoseAlg.EDDSA], ids=lambda a: a.name)
async def test_signed_assertion_authenticates_and_replay_is_refused(
    sensor: Coap, alg: CoseAlg
) -> None:
    device = (
        ec.generate_private_key(ec.SECP256R1())
        if alg == CoseAlg.ES256
        else ed25519.Ed25519PrivateKey.generate()
    )
    await sensor.add_key_client(
        "meter-7", ("thermostat",), "temp:read", cose_key_from_public(device.public_key())
    )
    assertion = _assertion(device, alg, sensor.service.clock.now())
    response, body = await sensor.post_ace(TOKEN, {"client_assertion": assertion})
    assert response.code == aiocoap.CREATED, body
    claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
    assert claims.sub == "meter-7"

    response, body = await sensor.post_ace(TOKEN, {"client_assertion": assertion})
    _ace_error(response, body, CoapCode.UNAUTHORIZED, 2)


async def test_bad_assertions_are_invalid_client(
    sensor: Coap, meter: ec.EllipticCurvePrivateKey
) -> None:
    device = meter
    now = sensor.service.clock.now()
    impostor = ec.generate_private_key(ec.SECP256R1())
    tampered = bytearray(_assertion(device, CoseAlg.ES256, now, cti=b"cti-tamper"))
    tampered[-1] ^= 1
    cases = {
        "wrong key": _assertion(impostor, CoseAlg.ES256, now, cti=b"cti-a"),
        "tampered": bytes(tampered),
        "wrong audience": _assertion(device, CoseAlg.ES256, now, cti=b"cti-b", aud="other-as"),
        "too long-lived": _assertion(device, CoseAlg.ES256, now, cti=b"cti-c", exp_in=3600),
        "expired": _assertion(device, CoseAlg.ES256, now - 600, cti=b"cti-d"),
        "unknown client": _assertion(device, CoseAlg.ES256, now, cti=b"cti-e", client_id="ghost"),
        "not a CWT": b"\x01\x02\x03",
    }
    for name, assertion in cases.items():
        response, body = await sensor.post_ace(TOKEN, {"client_assertion": assertion})
        assert response.code == CoapCode.UNAUTHORIZED, name
        assert body == {30: 2, 31: "client authentication failed"}, name
    # A refused (forged) assertion did not poison the replay cache: the real one with the
    # same cti as the tampered one still works.
    good = _assertion(device, CoseAlg.ES256, now, cti=b"cti-tamper")
    response, _ = await sensor.post_ace(TOKEN, {"client_assertion": good})
    assert response.code == aiocoap.CREATED


# -- errors -----------------------------------------------------------------------------------


async def test_wrong_secret_and_unknown_client_look_the_same(sensor: Coap) -> None:
    wrong, wrong_body = await sensor.post_ace(
        TOKEN, {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: "not-the-secret"}
    )
    unknown, unknown_body = await sensor.post_ace(
        TOKEN, {AceParam.CLIENT_ID: "ghost", AceParam.CLIENT_SECRET: "not-the-secret"}
    )
    _ace_error(wrong, wrong_body, CoapCode.UNAUTHORIZED, 2)
    assert wrong.payload == unknown.payload
    assert b"not-the-secret" not in wrong.payload


async def test_disabled_client_is_refused(sensor: Coap) -> None:
    assert await sensor.service.store.disable_client(
        "sensor-1", sensor.service.clock.now(), "operator"
    )
    response, body = await sensor.post_ace(TOKEN, _cred(sensor))
    _ace_error(response, body, CoapCode.UNAUTHORIZED, 2)


@pytest.mark.parametrize(
    ("extra", "code", "ace_code"),
    [
        ({AceParam.SCOPE: "valve:open"}, CoapCode.BAD_REQUEST, 6),
        ({AceParam.AUDIENCE: "someone-else"}, CoapCode.BAD_REQUEST, 6),
        ({AceParam.GRANT_TYPE: 0}, CoapCode.BAD_REQUEST, 5),
        ({AceParam.GRANT_TYPE: 99}, CoapCode.BAD_REQUEST, 5),
        ({AceParam.GRANT_TYPE: "two"}, CoapCode.BAD_REQUEST, 1),
        ({AceParam.SCOPE: 7}, CoapCode.BAD_REQUEST, 1),
        ({AceParam.AUDIENCE: b"thermostat"}, CoapCode.BAD_REQUEST, 1),
        ({"token_format": "xml"}, CoapCode.BAD_REQUEST, 1),
        ({AceParam.REQ_CNF: "key"}, CoapCode.BAD_REQUEST, 1),
        ({AceParam.REQ_CNF: {1: {1: 4, -1: b"k" * 16}}}, CoapCode.BAD_REQUEST, 7),
        (
            {AceParam.REQ_CNF: {1: {1: 2, -1: 1, -2: b"\x01" * 32, -3: b"\x02" * 32}}},
            CoapCode.BAD_REQUEST,
            7,
        ),
        ({AceParam.REQ_CNF: {3: b"kid"}}, CoapCode.BAD_REQUEST, 7),
    ],
    ids=[
        "disallowed-scope",
        "foreign-audience",
        "password-grant",
        "unknown-grant",
        "grant-type-text",
        "scope-int",
        "audience-bytes",
        "token-format",
        "req-cnf-text",
        "symmetric-pop-key",
        "point-off-curve",
        "cnf-by-kid",
    ],
)
async def test_bad_parameters(
    sensor: Coap, extra: dict[Any, Any], code: CoapCode, ace_code: int
) -> None:
    response, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat", **extra}
    )
    _ace_error(response, body, code, ace_code)


async def test_audience_required_when_client_has_several(sensor: Coap) -> None:
    response, body = await sensor.post_ace(TOKEN, _cred(sensor))
    _ace_error(response, body, CoapCode.BAD_REQUEST, 1)


async def test_unknown_parameters_are_ignored(sensor: Coap) -> None:
    # RFC 6749 §3.2: the AS MUST ignore unrecognized request parameters.
    response, _ = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat", 999: "x", "vendor_ext": [1, 2]}
    )
    assert response.code == aiocoap.CREATED


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xfe\xfd",
        b"\x18",
        b"",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps("map please"),
        cbor2.dumps({1.5: "float key"}),
        b"\x81" * 3000,
    ],
    ids=["garbage", "truncated", "empty", "array", "text", "float-key", "deep-nesting"],
)
async def test_non_map_or_non_cbor_body_is_invalid_request(sensor: Coap, payload: bytes) -> None:
    response = await sensor.request(aiocoap.POST, TOKEN, payload[:2000], ContentFormat.ACE_CBOR)
    body = cbor2.loads(response.payload)
    _ace_error(response, body, CoapCode.BAD_REQUEST, 1)


async def test_wrong_content_format_is_4_15(sensor: Coap) -> None:
    for content_format in (ContentFormat.JSON, None):
        response = await sensor.request(
            aiocoap.POST, TOKEN, cbor2.dumps(_cred(sensor)), content_format
        )
        assert response.code == CoapCode.UNSUPPORTED_CONTENT_FORMAT
        assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR
        assert cbor2.loads(response.payload)[-1] == "Unsupported Content-Format"


async def test_oversized_payload_is_4_13(sensor: Coap) -> None:
    body = cbor2.dumps({**_cred(sensor), "padding": "x" * 3000})
    response = await sensor.request(aiocoap.POST, TOKEN, body, ContentFormat.ACE_CBOR)
    assert response.code == CoapCode.REQUEST_ENTITY_TOO_LARGE
    assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR


async def test_one_oversized_datagram_is_4_13_with_size1(sensor: Coap) -> None:
    """Not block-wise: one 3,000-byte datagram. RFC 7252 §5.10.9: Size1 tells the largest
    body taken (max_payload, 2,048 by default); it was missing on this path."""
    request = aiocoap.Message(
        code=aiocoap.POST,
        uri_path=("token",),
        payload=cbor2.dumps({**_cred(sensor), "padding": "x" * 3000}),
        content_format=ContentFormat.ACE_CBOR,
    )
    response = await raw_coap.exchange(sensor.server.port, request)
    assert response.code == CoapCode.REQUEST_ENTITY_TOO_LARGE
    assert response.opt.size1 == 2048


@pytest.mark.parametrize("method", [aiocoap.GET, aiocoap.PUT, aiocoap.DELETE])
async def test_wrong_method_is_4_05(sensor: Coap, method: aiocoap.Code) -> None:
    response = await sensor.request(method, TOKEN)
    assert response.code == CoapCode.METHOD_NOT_ALLOWED
    assert response.opt.content_format == ContentFormat.PROBLEM_DETAILS_CBOR


async def test_rejected_requests_change_nothing(sensor: Coap) -> None:
    store = sensor.service.store
    before = (
        await store.list_clients(),
        await store.list_audiences(),
        await store.load_keys(),
        await store.change_counters(),
    )
    await sensor.post_ace(TOKEN, {AceParam.CLIENT_ID: "sensor-1", AceParam.CLIENT_SECRET: "bad"})
    await sensor.post_ace(TOKEN, {**_cred(sensor), AceParam.SCOPE: "valve:open"})
    await sensor.request(aiocoap.POST, TOKEN, b"\xff", ContentFormat.ACE_CBOR)
    after = (
        await store.list_clients(),
        await store.list_audiences(),
        await store.load_keys(),
        await store.change_counters(),
    )
    assert [k.kid for k in before[2]] == [k.kid for k in after[2]]
    assert before[:2] == after[:2] and before[3] == after[3]


async def test_pop_key_is_rebuilt_from_the_parsed_key(sensor: Coap) -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    canonical = cose_key_from_public(public)
    noisy = {**canonical, 3: -7, 99: "x" * 100, 2: b"client-chosen-kid"}
    response, body = await sensor.post_ace(
        TOKEN, {**_cred(sensor), AceParam.AUDIENCE: "thermostat", AceParam.REQ_CNF: {1: noisy}}
    )
    assert response.code == aiocoap.CREATED
    assert body[AceParam.CNF] == {1: canonical}
    claims = verify_cwt(body[AceParam.ACCESS_TOKEN], sensor.service.key_ring.lookup)
    assert claims.cnf_key == canonical

    raw = cbor2.dumps({**_cred(sensor), AceParam.AUDIENCE: "thermostat"})[1:]
    cyclic = bytes.fromhex("a4") + raw + cbor2.dumps(AceParam.REQ_CNF) + bytes.fromhex("a101a4")
    cyclic += cbor2.dumps(1) + cbor2.dumps(1) + cbor2.dumps(-1) + cbor2.dumps(6)
    cyclic += cbor2.dumps(-2) + cbor2.dumps(canonical[-2]) + cbor2.dumps(99)
    cyclic += bytes.fromhex("d81c81d81d00")  # 28([29(0)]): a list containing itself
    # A self-referencing value is endlessly deep: refused by the depth cap (test_limits.py)
    # before it could reach the token, whatever member it hides in.
    response = await sensor.request(aiocoap.POST, TOKEN, cyclic, ContentFormat.ACE_CBOR)
    _ace_error(response, cbor2.loads(response.payload), CoapCode.BAD_REQUEST, 1)


@pytest.mark.parametrize("kty", [True, 1.0], ids=["bool", "float"])
async def test_pop_key_labels_must_be_integers(sensor: Coap, kty: object) -> None:
    x = cose_key_from_public(ed25519.Ed25519PrivateKey.generate().public_key())[-2]
    response, body = await sensor.post_ace(
        TOKEN,
        {
            **_cred(sensor),
            AceParam.AUDIENCE: "thermostat",
            AceParam.REQ_CNF: {1: {1: kty, -1: 6, -2: x}},
        },
    )
    _ace_error(response, body, CoapCode.BAD_REQUEST, 7)


async def test_assertion_must_be_tagged_and_short_lived(
    sensor: Coap, meter: ec.EllipticCurvePrivateKey
) -> None:
    device = meter
    now = sensor.service.clock.now()
    untagged = cbor2.dumps(cbor2.loads(_assertion(device, CoseAlg.ES256, now, cti=b"u")).value)
    too_long = _assertion(device, CoseAlg.ES256, now, cti=b"l", exp_in=301)
    for assertion in (untagged, too_long):
        response, body = await sensor.post_ace(TOKEN, {"client_assertion": assertion})
        _ace_error(response, body, CoapCode.UNAUTHORIZED, 2)
    at_limit = _assertion(device, CoseAlg.ES256, now, cti=b"ok", exp_in=300)
    response, _ = await sensor.post_ace(TOKEN, {"client_assertion": at_limit})
    assert response.code == aiocoap.CREATED


async def test_a_tagged_request_body_is_refused_before_cbor2_decodes_its_tags(sensor: Coap) -> None:
    """Attack (issue 17 review): tag 35 makes cbor2 compile a regular expression, tag 36
    parse a MIME message, as it decodes; an unauthenticated /token body full of them cost
    the server milliseconds before any check. Refused unread now, as malformed CBOR."""
    body = {
        AceParam.CLIENT_ID: "sensor-1",
        AceParam.CLIENT_SECRET: cbor2.CBORTag(35, "(a|b)+c"),
        AceParam.AUDIENCE: [cbor2.CBORTag(36, "Subject: x\n\nbody") for _ in range(8)],
    }
    response, decoded = await sensor.post_ace("/token", body)
    _ace_error(response, decoded, CoapCode.BAD_REQUEST, AceErrorCode.INVALID_REQUEST)
    assert decoded[AceParam.ERROR_DESCRIPTION] == "request body is not well-formed CBOR"
