"""Our CWT and JWT codecs against independent implementations: pycose and joserfc."""

from __future__ import annotations

import json
from collections.abc import Callable

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from pycose.keys import CoseKey
from pycose.messages import CoseMessage, Sign1Message

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.keys import KeyRing, SigningKey, jwks
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose_key_from_public,
    encode_cwt,
    encode_jwt,
    token_hash,
    verify_cwt,
    verify_jwt,
)
from coap_auth.wire import CoseAlg, CoseHeader, CoseTag
from tests.tokens.variants import NOW, b64url_lenient, is_low_s, sample_claims, signature_twin

ALGS = [CoseAlg.ES256, CoseAlg.EDDSA]


def _claims(cnf: dict | None = None) -> Claims:
    return sample_claims(cnf=cnf)


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


def _pycose_signed(key: SigningKey) -> bytes:
    """A COSE_Sign1 (tag 18, no CWT tag) that pycose signs with our key."""
    private = key.private_key
    cose_key = cose_key_from_public(private.public_key())
    if key.alg == CoseAlg.ES256:
        cose_key[-4] = private.private_numbers().private_value.to_bytes(32, "big")
    else:
        from cryptography.hazmat.primitives import serialization

        cose_key[-4] = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    message = Sign1Message(
        phdr={CoseHeader.ALG: int(key.alg), CoseHeader.KID: key.kid},
        payload=cbor2.dumps(_claims().to_cwt_map()),
    )
    message.key = CoseKey.from_dict(cose_key)
    return message.encode()


def _with_signature(sign1: bytes, signature: bytes) -> bytes:
    item = cbor2.loads(sign1)
    return cbor2.dumps(
        cbor2.CBORTag(CoseTag.CWT, cbor2.CBORTag(item.tag, [*item.value[:3], signature]))
    )


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_pycose_signed_cwt_verifies_with_ours(alg: CoseAlg) -> None:
    """pycose's COSE_Sign1, put in tag 61 (docs/protocol.md), ES256 in its low-s form."""
    key = KeyRing.initial(alg, NOW).active
    sign1 = _pycose_signed(key)
    signature = cbor2.loads(sign1).value[3]
    if alg == CoseAlg.ES256:
        signature = signature if is_low_s(signature) else signature_twin(signature)
    token = _with_signature(sign1, signature)
    assert verify_cwt(token, key_lookup(key)) == _claims()
    # RFC 8392 §6 lets a context leave tag 61 out; docs/protocol.md's context does not.
    with pytest.raises(MalformedToken, match="tag 61"):
        verify_cwt(token[2:], key_lookup(key))


def test_high_s_twin_is_valid_ecdsa_that_we_refuse() -> None:
    """pycose verifies both signatures of the pair; ours takes only the low-s one, so the
    refusal is our rule (one form per token), not a broken signature."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    sign1 = _pycose_signed(key)
    signature = cbor2.loads(sign1).value[3]
    low = signature if is_low_s(signature) else signature_twin(signature)
    for twin in (low, signature_twin(low)):
        message = CoseMessage.decode(_with_signature(sign1, twin)[2:])
        message.key = _pycose_key(key.private_key.public_key())
        assert message.verify_signature()
    assert verify_cwt(_with_signature(sign1, low), key_lookup(key)) == _claims()
    with pytest.raises(MalformedToken, match="low s"):
        verify_cwt(_with_signature(sign1, signature_twin(low)), key_lookup(key))


def key_lookup(key: SigningKey) -> Callable[[bytes], VerificationKey | None]:
    return lambda kid: key.verification_key() if kid == key.kid else None


@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_independent_libraries_verify_our_low_s_tokens(alg: CoseAlg) -> None:
    """Normalising s keeps every signature valid for pycose (CWT) and joserfc (JWT)."""
    ring = KeyRing.initial(alg, NOW)
    key = ring.active
    key_set = KeySet.import_key_set(json.loads(jwks(ring.published)))
    jose_alg = "ES256" if alg == CoseAlg.ES256 else "EdDSA"
    for _ in range(20):
        cwt = encode_cwt(_claims(), key.private_key, key.alg, key.kid)
        message = CoseMessage.decode(cbor2.dumps(cbor2.loads(cwt).value))
        message.key = _pycose_key(key.private_key.public_key())
        assert message.verify_signature()
        jwt = encode_jwt(_claims(), key.private_key, key.alg, key.kid)
        jose_jwt.decode(jwt.decode("ascii"), key_set, algorithms=[jose_alg])
        if alg == CoseAlg.ES256:
            assert is_low_s(message.signature)
            assert is_low_s(b64url_lenient(jwt.decode().rpartition(".")[2]))


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


def test_pycose_encrypted_cwt_decrypts_with_ours() -> None:
    """The other direction of the coap_oscore token (tests/ace: pycose decrypts ours): a
    COSE_Encrypt0 pycose makes with AES-CCM-16-64-128, the IV in its protected header as
    docs/protocol.md fixes, put in tag 61, decrypts with ours to the same claims; under another
    key it does not."""
    import os

    from pycose.messages import Enc0Message

    from coap_auth.tokens.cwt import decrypt_cwt

    key, kid, iv = os.urandom(16), b"aes-1", os.urandom(13)
    claims = _claims()
    message = Enc0Message(
        phdr={CoseHeader.ALG: 10, CoseHeader.KID: kid, CoseHeader.IV: iv},
        payload=cbor2.dumps(claims.to_cwt_map()),
    )
    message.key = CoseKey.from_dict({1: 4, -1: key})
    encrypt0 = cbor2.loads(message.encode())
    token = cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, encrypt0))
    assert decrypt_cwt(token, {kid: key}.get) == claims
    with pytest.raises(InvalidSignature, match="does not decrypt"):
        decrypt_cwt(token, {kid: os.urandom(16)}.get)
