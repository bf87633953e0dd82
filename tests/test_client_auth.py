"""An unknown client id is refused exactly like a known one with a bad credential (issue 13),
with the same answer over UDP and the same work behind it: a COSE_Key parsed and a signature
checked with the algorithm the assertion names (ES256 or EdDSA). The work is traced by a spy
that passes every call through; timing itself is measured outside the tests.
"""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.service import client_auth
from coap_auth.tokens import Claims, alg_for_key, cose_key_from_public
from coap_auth.tokens.cose import sign1
from coap_auth.wire import AceParam, CoapCode, CoseAlg
from tests.conftest import Coap
from tests.tokens.variants import is_low_s, signature_twin

INVALID_CLIENT = {AceParam.ERROR: 2, AceParam.ERROR_DESCRIPTION: "client authentication failed"}


def _new_key(alg: CoseAlg) -> Any:
    if alg == CoseAlg.ES256:
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _assertion(key: Any, alg: CoseAlg, client_id: str, now: int, cti: bytes) -> bytes:
    claims = Claims(
        iss=client_id, sub=client_id, aud="coap://as.test", exp=now + 60, iat=now, cti=cti
    )
    return cbor2.dumps(cbor2.CBORTag(61, sign1(cbor2.dumps(claims.to_cwt_map()), key, alg, b"k")))


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """What the authenticator parses and verifies with, call by call."""
    calls: list[tuple[str, Any]] = []
    parse, verify = client_auth.public_key_from_cose, client_auth.verify_sign1

    def traced_parse(cose_key: Any) -> Any:
        key = parse(cose_key)
        calls.append(("parse", alg_for_key(key)))
        return key

    def traced_verify(message: Any, public_key: Any, alg: CoseAlg, **options: Any) -> None:
        calls.append(("verify", (message.alg, alg_for_key(public_key), alg)))
        verify(message, public_key, alg, **options)

    monkeypatch.setattr(client_auth, "public_key_from_cose", traced_parse)
    monkeypatch.setattr(client_auth, "verify_sign1", traced_verify)
    return calls


@pytest.mark.parametrize("alg", [CoseAlg.ES256, CoseAlg.EDDSA], ids=lambda a: a.name)
async def test_an_unknown_id_costs_and_answers_what_a_bad_signature_does(
    sensor: Coap, trace: list[tuple[str, Any]], alg: CoseAlg
) -> None:
    device, impostor = _new_key(alg), _new_key(alg)
    await sensor.add_key_client(
        "meter-7", ("thermostat",), "temp:read", cose_key_from_public(device.public_key())
    )
    now = sensor.service.clock.now()

    answers, traces = [], []
    for client_id, cti in (("meter-7", b"cti-known"), ("ghost", b"cti-ghost")):
        trace.clear()
        forged = _assertion(impostor, alg, client_id, now, cti)
        response, body = await sensor.post_ace("/token", {"client_assertion": forged})
        answers.append((response.code, response.payload))
        traces.append(list(trace))
        assert (response.code, body) == (CoapCode.UNAUTHORIZED, INVALID_CLIENT)

    assert answers[0] == answers[1]
    assert traces[0] == traces[1] == [("parse", alg), ("verify", (alg, alg, alg))]


async def test_a_high_s_es256_assertion_still_authenticates(sensor: Coap) -> None:
    """Assertions are single-use by their cti, so their signature's form does not matter:
    devices built before issue 13 sign high-s about half the time, and keep working."""
    key = ec.generate_private_key(ec.SECP256R1())
    await sensor.add_key_client(
        "meter-9", ("thermostat",), "temp:read", cose_key_from_public(key.public_key())
    )
    now = sensor.service.clock.now()
    tagged = cbor2.loads(_assertion(key, CoseAlg.ES256, "meter-9", now, b"high-s-1"))
    parts = tagged.value.value
    if is_low_s(parts[3]):
        parts[3] = signature_twin(parts[3])
    assert not is_low_s(parts[3])
    response, body = await sensor.post_ace("/token", {"client_assertion": cbor2.dumps(tagged)})
    assert response.code == CoapCode.CREATED, body
