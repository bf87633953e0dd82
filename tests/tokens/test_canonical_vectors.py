"""Fixed tokens in their canonical form and in other forms of the same signature
(tests/vectors/canonical_tokens.json): only the canonical ones verify, whichever verifier."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.errors import MalformedToken
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    decode_cose,
    encode_maced_cwt,
    peek_kid,
    token_hash,
    verify_cwt,
    verify_jwt,
    verify_maced_cwt,
)
from coap_auth.wire import CoseAlg
from tests.conftest import VECTORS

DOCUMENT = json.loads((VECTORS / "canonical_tokens.json").read_text())
KEYS = DOCUMENT["keys"]
TOKENS = DOCUMENT["vectors"]
CANONICAL = {v["kind"]: v for v in TOKENS if v["expect"] == "accept"}


def _token(vector: dict[str, Any]) -> bytes:
    if vector["kind"] == "jwt":
        return vector["token"].encode("ascii")
    return bytes.fromhex(vector["token"])


def _claims() -> Claims:
    c = DOCUMENT["claims"]
    return Claims(
        iss=c["iss"],
        sub=c["sub"],
        aud=c["aud"],
        exp=c["exp"],
        iat=c["iat"],
        cti=bytes.fromhex(c["cti"]),
        nbf=c["nbf"],
    )


def _ec_key() -> VerificationKey:
    key = KEYS["sign1"]
    public = ec.EllipticCurvePublicNumbers(
        int(key["x"], 16), int(key["y"], 16), ec.SECP256R1()
    ).public_key()
    return VerificationKey(key["kid"].encode(), CoseAlg.ES256, public)


def _verify(vector: dict[str, Any], looked_up: list[bytes]) -> Claims:
    token = _token(vector)
    if vector["kind"] == "mac0":
        return verify_maced_cwt(token, bytes.fromhex(KEYS["mac0"]["k"]))
    known = _ec_key()

    def lookup(kid: bytes) -> VerificationKey | None:
        looked_up.append(kid)
        return known if kid == known.kid else None

    return (verify_jwt if vector["kind"] == "jwt" else verify_cwt)(token, lookup)


@pytest.mark.parametrize("vector", TOKENS, ids=[v["title"] for v in TOKENS])
def test_only_the_canonical_form_verifies(vector: dict[str, Any]) -> None:
    looked_up: list[bytes] = []
    if vector["expect"] == "accept":
        assert _verify(vector, looked_up) == _claims()
        return
    assert vector["expect"] == "MalformedToken"
    with pytest.raises(MalformedToken):
        _verify(vector, looked_up)
    assert looked_up == []  # refused before any key lookup
    # Why it matters: another form would be another entry on the TRL (RFC 9770 §4).
    assert token_hash(_token(vector)) != token_hash(_token(CANONICAL[vector["kind"]]))
    if vector["kind"] != "jwt":
        with pytest.raises(MalformedToken):
            decode_cose(_token(vector))
        with pytest.raises(MalformedToken):
            peek_kid(_token(vector))


def test_our_maced_cwt_is_these_exact_bytes() -> None:
    """HMAC is deterministic: the encoder's output is pinned byte for byte."""
    key = KEYS["mac0"]
    token = encode_maced_cwt(_claims(), bytes.fromhex(key["k"]), key["kid"].encode())
    assert token == _token(CANONICAL["mac0"])
    assert peek_kid(token) == key["kid"].encode()
