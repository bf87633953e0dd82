"""One text per JWT (docs/protocol.md "Canonical tokens", issue 13): unpadded base64url in the
strict alphabet with zero unused bits, low-s ES256; and cnf back from the JWK form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.errors import InvalidSignature, MalformedToken, UnsupportedPopKey
from coap_auth.keys import KeyRing, SigningKey
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose_key_from_public,
    encode_jwt,
    token_hash,
    verify_jwt,
)
from coap_auth.tokens.cose_key import b64url, b64url_decode, cose_key_to_jwk, jwk_to_cose_key
from coap_auth.wire import CoseAlg
from tests.tokens.variants import (
    NOW,
    b64url_lenient,
    ed25519_plus_l,
    is_low_s,
    jwt_variants,
    sample_claims,
    signature_twin,
)

ALGS = [CoseAlg.ES256, CoseAlg.EDDSA]


def _claims(cnf: dict[int, Any] | None = None) -> Claims:
    return sample_claims(aud="dashboard", cti=b"\x02" * 8, cnf=cnf)


def _recording(key: SigningKey) -> tuple[Callable[[bytes], VerificationKey | None], list[bytes]]:
    looked_up: list[bytes] = []

    def lookup(kid: bytes) -> VerificationKey | None:
        looked_up.append(kid)
        return key.verification_key() if kid == key.kid else None

    return lookup, looked_up


def _signature(token: bytes) -> bytes:
    return b64url_lenient(token.decode().rpartition(".")[2])


_sample = KeyRing.initial(CoseAlg.ES256, NOW).active
JWT_VARIANTS = [
    *jwt_variants(encode_jwt(_claims(), _sample.private_key, _sample.alg, _sample.kid), es256=True),
    "standard base64 '+' '/' for '-' '_'",
]


@pytest.mark.parametrize("variant", sorted(set(JWT_VARIANTS)))
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_reencoded_jwt_is_refused_before_key_lookup(alg: CoseAlg, variant: str) -> None:
    key = KeyRing.initial(alg, NOW).active
    for _ in range(100):  # the '-'/'_' variant needs one of them in the signature
        token = encode_jwt(_claims(), key.private_key, key.alg, key.kid)
        variants = jwt_variants(token, es256=alg == CoseAlg.ES256)
        if variant in variants or variant == "ECDSA high-s twin":
            break
    if variant not in variants:
        pytest.skip("ES256 only")
    lookup, looked_up = _recording(key)
    assert verify_jwt(token, lookup) == _claims()
    looked_up.clear()

    other = variants[variant]
    assert token_hash(other) != token_hash(token)
    with pytest.raises(MalformedToken):
        verify_jwt(other, lookup)
    assert looked_up == []


def test_variants_decode_leniently_to_the_same_signature() -> None:
    """What made them dangerous: Python's base64 gives the same bytes (or the twin)."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    token = encode_jwt(_claims(), key.private_key, key.alg, key.kid)
    raw = _signature(token)
    for name, other in jwt_variants(token, es256=True).items():
        segment = other.decode().rpartition(".")[2]
        assert pyjwt.utils.base64url_decode(segment) in (raw, signature_twin(raw)), name


@pytest.mark.parametrize(
    "text",
    [
        "a.b",
        "a.b.c.d",
        "a..c",
        ".b.c",
        "a.b.",
        "a b.c.d",
        "é.b.c",
    ],
)
def test_anything_but_three_base64url_segments_is_refused(text: str) -> None:
    with pytest.raises(MalformedToken):
        verify_jwt(text.encode("utf-8"), lambda kid: pytest.fail("looked up"))


def test_es256_jwt_signatures_are_low_s() -> None:
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    for _ in range(200):  # PyJWT alone gives high-s half the time
        token = encode_jwt(_claims(), key.private_key, key.alg, key.kid)
        assert is_low_s(_signature(token))


def test_high_s_jwt_from_pyjwt_itself_is_refused() -> None:
    """A token exactly as PyJWT makes it, when its s is high, is not one we accept."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    headers = {"kid": key.kid.hex(), "typ": "at+jwt"}
    for _ in range(100):
        text = pyjwt.encode(
            _claims().to_jwt_dict(), key.private_key, algorithm="ES256", headers=headers
        )
        if not is_low_s(_signature(text.encode())):
            break
    assert not is_low_s(_signature(text.encode()))
    lookup, looked_up = _recording(key)
    with pytest.raises(MalformedToken, match="low s"):
        verify_jwt(text.encode(), lookup)
    assert looked_up == []


def test_eddsa_jwt_with_s_plus_l_is_refused() -> None:
    key = KeyRing.initial(CoseAlg.EDDSA, NOW).active
    token = encode_jwt(_claims(), key.private_key, key.alg, key.kid)
    head, _, _ = token.decode().rpartition(".")
    other = f"{head}.{b64url(ed25519_plus_l(_signature(token)))}".encode()
    with pytest.raises(InvalidSignature):
        verify_jwt(other, _recording(key)[0])


def test_critical_header_we_do_not_process_is_refused() -> None:
    """RFC 7515 §4.1.11, the JOSE twin of COSE crit: PyJWT refuses unknown extensions."""
    key = KeyRing.initial(CoseAlg.ES256, NOW).active
    headers = {"kid": key.kid.hex(), "typ": "at+jwt", "crit": ["exp-hint"], "exp-hint": 1}
    text = pyjwt.encode(
        _claims().to_jwt_dict(), key.private_key, algorithm="ES256", headers=headers
    )
    head, _, signature = text.rpartition(".")
    token = f"{head}.{b64url(_low(b64url_lenient(signature)))}".encode()
    with pytest.raises(MalformedToken):
        verify_jwt(token, _recording(key)[0])


def _low(signature: bytes) -> bytes:
    return signature if is_low_s(signature) else signature_twin(signature)


# -- strict base64url ----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "AA", "AAA", "AAAA", "_-8", "YWJj"])
def test_b64url_decode_takes_canonical_text(text: str) -> None:
    assert b64url(b64url_decode(text)) == text


@pytest.mark.parametrize(
    "text", ["A", "AB", "AAB", "AA==", "YW Jj", "YW\nJj", "YW+j", "YW/j", "YW!Jj", "ÿ", 7]
)
def test_b64url_decode_refuses_other_text(text: Any) -> None:
    with pytest.raises(MalformedToken):
        b64url_decode(text)


# -- cnf: a PoP JWT's key comes back as the COSE_Key ----------------------------------------------


def _holder(kind: str) -> ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey:
    if kind == "P-256":
        return ec.generate_private_key(ec.SECP256R1()).public_key()
    return ed25519.Ed25519PrivateKey.generate().public_key()


@pytest.mark.parametrize("holder", ["P-256", "Ed25519"])
@pytest.mark.parametrize("alg", ALGS, ids=lambda a: a.name)
def test_pop_jwt_cnf_round_trips_to_the_cose_key(alg: CoseAlg, holder: str) -> None:
    key = KeyRing.initial(alg, NOW).active
    cose_key = cose_key_from_public(_holder(holder))
    claims = _claims(cose_key)
    token = encode_jwt(claims, key.private_key, key.alg, key.kid)
    verified = verify_jwt(token, _recording(key)[0])
    assert verified == claims
    assert verified.cnf_key == cose_key
    assert Claims.from_jwt_dict(claims.to_jwt_dict()) == claims


@pytest.mark.parametrize("holder", ["P-256", "Ed25519"])
def test_jwk_to_cose_key_inverts_cose_key_to_jwk(holder: str) -> None:
    cose_key = cose_key_from_public(_holder(holder))
    assert jwk_to_cose_key(cose_key_to_jwk(cose_key)) == cose_key


def _ec_jwk() -> dict[str, Any]:
    return cose_key_to_jwk(cose_key_from_public(_holder("P-256")))


def _off_curve() -> dict[str, Any]:
    jwk = _ec_jwk()
    y = bytearray(b64url_decode(jwk["y"]))
    y[-1] ^= 1
    return {**jwk, "y": b64url(bytes(y))}


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(lambda: {**_ec_jwk(), "d": b64url(b"\x01" * 32)}, id="private part"),
        pytest.param(lambda: {**_ec_jwk(), "kid": "x"}, id="extra member"),
        pytest.param(lambda: {**_ec_jwk(), "crv": "P-384"}, id="other curve"),
        pytest.param(lambda: {**_ec_jwk(), "kty": "RSA"}, id="other kty"),
        pytest.param(lambda: {k: v for k, v in _ec_jwk().items() if k != "y"}, id="no y"),
        pytest.param(lambda: {**_ec_jwk(), "x": _ec_jwk()["x"] + "="}, id="padded x"),
        pytest.param(lambda: {**_ec_jwk(), "x": b64url(b"\x01" * 31)}, id="short x"),
        pytest.param(lambda: {**_ec_jwk(), "x": 5}, id="x not text"),
        pytest.param(_off_curve, id="not on the curve"),
        pytest.param(lambda: {"kty": "OKP", "crv": "X25519", "x": b64url(bytes(32))}, id="X25519"),
        pytest.param(lambda: ["EC"], id="not an object"),
    ],
)
def test_jwk_to_cose_key_is_strict(jwk: Callable[[], Any]) -> None:
    with pytest.raises(UnsupportedPopKey):
        jwk_to_cose_key(jwk())


@pytest.mark.parametrize(
    "cnf",
    [
        {"jwk": {"kty": "EC"}},
        {"kid": "abc"},
        {"jwk": None},
        "key",
    ],
    ids=["bad-jwk", "kid-method", "null-jwk", "not-object"],
)
def test_jwt_with_a_bad_cnf_is_malformed(cnf: Any) -> None:
    with pytest.raises(MalformedToken, match="cnf"):
        Claims.from_jwt_dict({**_claims().to_jwt_dict(), "cnf": cnf})


def test_jwt_cnf_with_a_second_method_is_malformed() -> None:
    cnf = {"jwk": _ec_jwk(), "kid": "abc"}
    with pytest.raises(MalformedToken, match="cnf"):
        Claims.from_jwt_dict({**_claims().to_jwt_dict(), "cnf": cnf})
