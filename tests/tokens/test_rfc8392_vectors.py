"""RFC 8392 Appendix A tokens verify with our codec, and tampering with them is caught."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.errors import InvalidClaims, InvalidSignature, TokenError
from coap_auth.tokens import Claims, VerificationKey, verify_cwt, verify_maced_cwt
from coap_auth.wire import CoseAlg
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
    key = vector["key"]
    if vector["kind"] == "mac0":
        return verify_maced_cwt(token, bytes.fromhex(key["k"]))
    public = ec.EllipticCurvePublicNumbers(
        int(key["x"], 16), int(key["y"], 16), ec.SECP256R1()
    ).public_key()
    known = VerificationKey(key["kid"].encode(), CoseAlg.ES256, public)
    return verify_cwt(token, lambda kid: known if kid == known.kid else None)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["title"] for v in VECTORS])
def test_vector_verifies_with_its_claims(vector: dict[str, Any]) -> None:
    claims = _verify(vector, bytes.fromhex(vector["token"]))
    assert claims == _expected(vector)


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
