"""RFC 8392 Appendix A tokens: their signature and MAC verify with our COSE codec, tampering
is caught, and the tokens themselves are refused: neither is in docs/protocol.md's one form (A.3
has no tag 61, both carry the kid in the unprotected header)."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.errors import InvalidClaims, InvalidSignature, MalformedToken, TokenError
from coap_auth.tokens import Claims, VerificationKey, cose, verify_cwt, verify_maced_cwt
from coap_auth.tokens.cwt import decode_claims
from coap_auth.wire import CoseAlg, CoseTag
from tests.conftest import load_vectors

VECTORS = load_vectors("rfc8392.json")


def _expected(vector: dict[str, Any]) -> Claims:
    c = vector["claims"]
    return Claims(
        iss=c["iss"],
        sub=c["sub"],
        aud=c["aud"],
        exp=c["exp"],
        iat=c["iat"],
        cti=bytes.fromhex(c["cti"]),
        nbf=c["nbf"],
    )


def _verify(vector: dict[str, Any], token: bytes) -> Claims:
    """The COSE layer on the vector's structure (RFC 8392's layout, not ours), then claims."""
    try:
        item = cbor2.loads(token)
    except Exception:
        raise MalformedToken("truncated") from None
    if isinstance(item, cbor2.CBORTag) and item.tag == CoseTag.CWT:
        item = item.value
    message = cose.decode(item)
    key = vector["key"]
    if vector["kind"] == "mac0":
        cose.verify_mac0(message, bytes.fromhex(key["k"]))
    else:
        assert message.kid == key["kid"].encode()
        cose.verify_sign1(message, _public_key(key), CoseAlg.ES256)
    return decode_claims(message.payload)


def _public_key(key: dict[str, str]) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicNumbers(
        int(key["x"], 16), int(key["y"], 16), ec.SECP256R1()
    ).public_key()


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_vector_verifies_with_its_claims(vector: dict[str, Any]) -> None:
    claims = _verify(vector, bytes.fromhex(vector["token"]))
    assert claims == _expected(vector)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_vector_is_not_in_our_one_form(vector: dict[str, Any]) -> None:
    token = bytes.fromhex(vector["token"])
    key = vector["key"]
    with pytest.raises(MalformedToken):
        if vector["kind"] == "mac0":
            verify_maced_cwt(token, bytes.fromhex(key["k"]))
        else:
            known = VerificationKey(key["kid"].encode(), CoseAlg.ES256, _public_key(key))
            verify_cwt(token, lambda kid: known if kid == known.kid else None)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_flipped_signature_byte_is_rejected(vector: dict[str, Any]) -> None:
    token = bytearray(bytes.fromhex(vector["token"]))
    token[-1] ^= 0x01
    with pytest.raises(InvalidSignature):
        _verify(vector, bytes(token))


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_changed_claim_is_rejected(vector: dict[str, Any]) -> None:
    # "erikw" -> "erikx" inside the signed payload.
    token = bytes.fromhex(vector["token"]).replace(b"erikw", b"erikx")
    with pytest.raises(InvalidSignature):
        _verify(vector, token)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_truncated_token_is_rejected(vector: dict[str, Any]) -> None:
    token = bytes.fromhex(vector["token"])
    for cut in (1, 10, len(token) // 2, len(token) - 1):
        with pytest.raises(TokenError):
            _verify(vector, token[:cut])


def test_vector_claims_validate_only_in_their_window() -> None:
    claims = _expected(VECTORS[0])
    claims.validate(
        now=1443944944, issuer="coap://as.example.com", audience="coap://light.example.com"
    )
    with pytest.raises(InvalidClaims, match="expired"):
        claims.validate(now=1444064944)
    with pytest.raises(InvalidClaims, match="not yet valid"):
        claims.validate(now=1443944943)
    claims.validate(now=1443944943, leeway=1)
    with pytest.raises(InvalidClaims, match="audience"):
        claims.validate(now=1443944944, audience="coap://other.example.com")
