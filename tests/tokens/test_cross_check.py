"""Our CWT and JWT codecs against independent implementations: pycose and joserfc."""

from __future__ import annotations

import json

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from pycose.keys import CoseKey
from pycose.messages import CoseMessage, Sign1Message

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.keys import KeyRing, jwks
from coap_auth.tokens import (
    Claims,
    cose_key_from_public,
    encode_cwt,
    encode_jwt,
    token_hash,
    verify_cwt,
    verify_jwt,
)
from coap_auth.wire import CoseAlg, CoseHeader, CoseTag

NOW = 1_700_000_000
ALGS = [CoseAlg.ES256, CoseAlg.EDDSA]


def _claims(cnf: dict | None = None) -> Claims:
    return Claims(
        iss="coap://as.test",
        sub="sensor-1",
        aud="thermostat",
        exp=NOW + 600,
        iat=NOW,
        cti=b"\x01" * 8,
        scope="temp:read",
        cnf_key=cnf,
    )


def _pycose_key(public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> CoseKey:
    return CoseKey.from_dict(cose_key_from_public(public_key))


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_our_cwt_verifies_with_pycose(alg: CoseAlg) -> None:
    key = KeyRing.initial(alg, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)

    outer = cbor2.loads(token)
    assert outer.tag == CoseTag.CWT and outer.value.tag == CoseTag.SIGN1
    protected, unprotected, _, _ = outer.value.value
    assert cbor2.loads(protected) == {CoseHeader.ALG: alg, CoseHeader.KID: key.kid}
    assert unprotected == {}
    # Shortest tag encodings: 0xd8 0x3d (tag 61) then 0xd2 (tag 18).
    assert token[:3] == b"\xd8\x3d\xd2"

    message = CoseMessage.decode(cbor2.dumps(outer.value))
    assert isinstance(message, Sign1Message)
    message.key = _pycose_key(key.private_key.public_key())
    assert message.verify_signature()
    assert cbor2.loads(message.payload) == _claims().to_cwt_map()


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_pycose_signed_cwt_verifies_with_ours(alg: CoseAlg) -> None:
    key = KeyRing.initial(alg, NOW).active
    private = key.private_key
    cose_key = cose_key_from_public(private.public_key())
    if alg == CoseAlg.ES256:
        cose_key[-4] = private.private_numbers().private_value.to_bytes(32, "big")
    else:
        from cryptography.hazmat.primitives import serialization

        cose_key[-4] = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    message = Sign1Message(
        phdr={CoseHeader.ALG: int(alg), CoseHeader.KID: key.kid},
        payload=cbor2.dumps(_claims().to_cwt_map()),
    )
    message.key = CoseKey.from_dict(cose_key)
    token = message.encode()  # tag 18, no CWT tag: accepted as RFC 8392 §6 allows
    assert (
        verify_cwt(token, lambda kid: key.verification_key() if kid == key.kid else None)
        == _claims()
    )


def test_algorithm_in_token_must_match_the_key() -> None:
    ec_key = KeyRing.initial(CoseAlg.ES256, NOW).active
    ed_key = KeyRing.initial(CoseAlg.EDDSA, NOW).active
    token = encode_cwt(_claims(), ed_key.private_key, ed_key.alg, ec_key.kid)
    with pytest.raises(InvalidSignature):
        verify_cwt(token, lambda kid: ec_key.verification_key())


def test_unknown_kid_is_rejected() -> None:
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    token = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
    with pytest.raises(InvalidSignature, match="unknown key"):
        verify_cwt(token, lambda kid: None)


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_our_jwt_verifies_with_joserfc(alg: CoseAlg) -> None:
    ring = KeyRing.initial(alg, NOW)
    key = ring.active
    holder = ec.generate_private_key(ec.SECP256R1()).public_key()
    token = encode_jwt(_claims(cose_key_from_public(holder)), key.private_key, key.alg, key.kid)

    key_set = KeySet.import_key_set(json.loads(jwks(ring.published)))
    decoded = jose_jwt.decode(
        token.decode("ascii"), key_set, algorithms=["ES256" if alg == CoseAlg.ES256 else "EdDSA"]
    )
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.header["kid"] == key.kid.hex()
    assert decoded.claims["sub"] == decoded.claims["client_id"] == "sensor-1"
    assert decoded.claims["aud"] == "thermostat"
    assert decoded.claims["scope"] == "temp:read"
    assert decoded.claims["cnf"]["jwk"]["kty"] == "EC"
    for claim in ("iss", "exp", "iat", "jti"):
        assert claim in decoded.claims
    # And our own verifier agrees.
    assert verify_jwt(token, ring.lookup).sub == "sensor-1"


def test_jwt_with_other_typ_is_rejected() -> None:
    import jwt as pyjwt

    ring = KeyRing.initial(CoseAlg.ES256, NOW)
    key = ring.active
    text = pyjwt.encode(
        _claims().to_jwt_dict(),
        key.private_key,
        algorithm="ES256",
        headers={"kid": key.kid.hex(), "typ": "JWT"},
    )
    with pytest.raises(MalformedToken, match="typ"):
        verify_jwt(text.encode(), ring.lookup)


def test_token_hash_is_prefixed_sha256_of_base64url_text() -> None:
    import base64
    import hashlib

    token = bytes(range(40))
    text = base64.urlsafe_b64encode(token).rstrip(b"=")
    assert b"=" not in text
    th = token_hash(token)
    assert len(th) == 33 and th[0] == 0x01
    assert th[1:] == hashlib.sha256(text).digest()
    assert token_hash(token + b"\x00") != th
