"""Control characters in request text over real UDP: refused before the store (PostgreSQL
answers NUL with an error) and never written raw into a log line.

C0 controls, DEL and C1 controls (Unicode category Cc) are invalid_request in any text
parameter; in a client assertion's iss or sub they are the same invalid_client as any bad
assertion, decided before a lookup, so the answer says nothing about who exists.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.errors import InvalidClient
from coap_auth.service.client_auth import Authenticator, Credentials
from coap_auth.store import MasterKey
from coap_auth.text import has_control_character, loggable
from coap_auth.tokens import Claims, cose_key_from_public
from coap_auth.tokens.cose import sign1
from coap_auth.wire import AceParam, CoapCode, ContentFormat, CoseAlg
from tests.conftest import Coap

# NUL, TAB, LF, CR, ESC, DEL, and the C1 controls NEL (U+0085) and CSI (U+009B).
CONTROLS = ["\x00", "\t", "\n", "\r", "\x1b", "\x7f", "\x85", "\x9b"]


def _cred(coap: Coap, client_id: str = "sensor-1") -> dict[Any, Any]:
    return {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: coap.secrets[client_id]}


def _invalid_request(response: aiocoap.Message, body: Any) -> None:
    assert response.code == CoapCode.BAD_REQUEST, (response.code, body)
    assert response.opt.content_format == ContentFormat.ACE_CBOR
    assert body[AceParam.ERROR] == 1, body  # invalid_request, not invalid_client or _scope


@pytest.mark.parametrize("control", CONTROLS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("name", ["client_id", "client_secret", "audience", "scope"])
async def test_control_characters_in_token_parameters_are_invalid_request(
    sensor: Coap, name: str, control: str
) -> None:
    body: dict[Any, Any] = {**_cred(sensor), AceParam.AUDIENCE: "thermostat"}
    key = {
        "client_id": AceParam.CLIENT_ID,
        "client_secret": AceParam.CLIENT_SECRET,
        "audience": AceParam.AUDIENCE,
        "scope": AceParam.SCOPE,
    }[name]
    value = body.get(key, "temp:read")
    body[key] = value[:3] + control + value[3:]
    response, answer = await sensor.post_ace("/token", body)
    _invalid_request(response, answer)
    if AceParam.ERROR_DESCRIPTION in answer:
        assert answer[AceParam.ERROR_DESCRIPTION] == f"{name} must not contain control characters"


@pytest.mark.parametrize("path", ["/revoke", "/introspect"])
async def test_control_characters_in_the_caller_of_revoke_and_introspect(
    sensor: Coap, path: str
) -> None:
    body = {
        AceParam.CLIENT_ID: "rs\x00x",
        AceParam.CLIENT_SECRET: "guess-0123456789abcdef",
        AceParam.TOKEN: b"t",
    }
    response, answer = await sensor.post_ace(path, body)
    _invalid_request(response, answer)


async def test_nothing_is_written_for_a_refused_request(sensor: Coap) -> None:
    store = sensor.service.store
    before = await store.change_counters(), len(await store.audit_entries())
    body = {**_cred(sensor), AceParam.AUDIENCE: "thermostat", AceParam.SCOPE: "temp:read\n"}
    response, answer = await sensor.post_ace("/token", body)
    _invalid_request(response, answer)
    assert (await store.change_counters(), len(await store.audit_entries())) == before


async def test_printable_unicode_still_works(sensor: Coap) -> None:
    """Only controls are refused: an id in any script is fine."""
    await sensor.add_secret_client("capteur-été-1", ("thermostat",), "temp:read")
    body = {**_cred(sensor, "capteur-été-1"), AceParam.AUDIENCE: "thermostat"}
    response, _ = await sensor.post_ace("/token", body)
    assert response.code == aiocoap.CREATED


# -- client assertions ------------------------------------------------------------------------


def _assertion(
    device: ec.EllipticCurvePrivateKey, now: int, iss: str, sub: str, cti: bytes
) -> bytes:
    claims = Claims(iss=iss, sub=sub, aud="coap://as.test", exp=now + 120, iat=now, cti=cti)
    return cbor2.dumps(
        cbor2.CBORTag(61, sign1(cbor2.dumps(claims.to_cwt_map()), device, CoseAlg.ES256, b"k"))
    )


@pytest.mark.parametrize("field", ["iss", "sub"])
async def test_assertion_with_a_control_character_is_refused_before_any_lookup(
    sensor: Coap, field: str
) -> None:
    """The Authenticator is handed its lookup: it must not be asked about such an id."""
    service = sensor.service
    authenticator = Authenticator(
        service.store,
        MasterKey.load(service.settings.data_dir, create=False),
        service.settings,
        service.clock,
    )
    device = ec.generate_private_key(ec.SECP256R1())
    asked: list[str] = []

    async def lookup(client_id: str) -> Credentials[str] | None:
        asked.append(client_id)
        return Credentials(client_id, client_id, None, cose_key_from_public(device.public_key()))

    now = service.clock.now()
    good = _assertion(device, now, "meter-7", "meter-7", b"cti-good")
    assert await authenticator.authenticate(lookup, None, None, good) == "meter-7"
    assert asked == ["meter-7"]  # the lookup is really used on this path

    asked.clear()
    for number, control in enumerate(CONTROLS):
        bad_id = f"meter{control}7"
        iss, sub = (bad_id, "meter-7") if field == "iss" else ("meter-7", bad_id)
        assertion = _assertion(device, now, iss, sub, f"cti-{number}".encode())
        with pytest.raises(InvalidClient) as refused:
            await authenticator.authenticate(lookup, None, None, assertion)
        assert refused.value.description == "client authentication failed"
    assert asked == []


async def test_registered_client_with_a_control_character_cannot_use_an_assertion(
    sensor: Coap,
) -> None:
    """Over UDP: the same answer as an unknown client, although this one is in the store."""
    device = ec.generate_private_key(ec.SECP256R1())
    client_id = "meter\n7"
    await sensor.add_key_client(
        client_id, ("thermostat",), "temp:read", cose_key_from_public(device.public_key())
    )
    now = sensor.service.clock.now()
    for cti, iss in ((b"cti-1", client_id), (b"cti-2", "ghost\n7")):
        assertion = _assertion(device, now, iss, iss, cti)
        response, body = await sensor.post_ace("/token", {"client_assertion": assertion})
        assert response.code == CoapCode.UNAUTHORIZED
        assert body == {30: 2, 31: "client authentication failed"}


# -- the access log ---------------------------------------------------------------------------


def test_loggable_escapes_every_line_breaker() -> None:
    assert loggable("sensor-1") == "sensor-1"
    assert loggable("capteur-été") == "capteur-été"
    for raw, escaped in [
        ("a\nb", "a\\nb"),
        ("a\r\nb", "a\\r\\nb"),
        ("a\x00b", "a\\x00b"),
        ("a\x85b", "a\\x85b"),  # NEL
        ("a\u2028b", "a\\u2028b"),  # LINE SEPARATOR: printable in no log viewer
        ("a\\nb", "a\\\\nb"),  # a literal backslash cannot pose as an escape
    ]:
        assert loggable(raw) == escaped
        assert "\n" not in loggable(raw) and "\r" not in loggable(raw)
    assert all(has_control_character(c) for c in CONTROLS)
    assert not has_control_character("capteur-été \u2028")


async def test_request_text_in_the_access_log_is_escaped(
    sensor: Coap, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller id reaches the log line as the request wrote it; one with a line separator
    (allowed in an id: not a control character) cannot break the line."""
    caplog.set_level(logging.INFO, logger="coap_auth.access")
    client_id = "dev\u2028ice caller=admin -> 2.01 ok"
    await sensor.add_secret_client(client_id, ("thermostat",), "temp:read")
    response, _ = await sensor.post_ace("/token", _cred(sensor, client_id))
    assert response.code == aiocoap.CREATED
    lines = [r.getMessage() for r in caplog.records if r.name == "coap_auth.access"]
    assert len(lines) == 1
    assert 'caller="dev\\u2028ice caller=admin -> 2.01 ok" -> 2.01 ok' in lines[0]
    assert "\u2028" not in lines[0]


async def test_an_unauthenticated_caller_cannot_forge_fields_of_its_log_line(
    sensor: Coap, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coap_auth.access")
    client_id = 'x from=10.9.8.7 caller=sensor-1 -> 2.01 ok (0.1 ms) "#'
    body = {AceParam.CLIENT_ID: client_id, AceParam.CLIENT_SECRET: "not-the-secret-0123456789"}
    response, _ = await sensor.post_ace("/token", body)
    assert response.code == aiocoap.UNAUTHORIZED
    lines = [r.getMessage() for r in caplog.records if r.name == "coap_auth.access"]
    assert len(lines) == 1
    assert lines[0].startswith("POST /token from=127.0.0.1 caller=")
    assert 'caller="x from=10.9.8.7 caller=sensor-1 -> 2.01 ok (0.1 ms) \\"#" -> 4.01' in lines[0]
    # Only the quoted value holds a second "from=": outside the quotes there is one field each.
    assert lines[0].replace(json.dumps(client_id), "<caller>").count("from=") == 1
