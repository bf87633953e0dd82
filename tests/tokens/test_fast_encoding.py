"""The minter's shortcuts (issue 17) against the general encoder: claims written field by field
(cwt_claims.write_claims), the protected header and the token's envelope joined by hand. Every
claim set gives the bytes `deterministic.dumps(claims.to_cwt_map())` gives, or its error; every
token is the one cbor2 wrote before."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose,
    cose_key_from_public,
    cwt,
    deterministic,
    encode_cwt,
    encode_maced_cwt,
    verify_cwt,
)
from coap_auth.tokens.cwt_claims import write_claims
from coap_auth.wire import CoseAlg, CoseKeyOp, CoseKeyParam, CwtClaim
from tests.tokens.variants import NOW

ES256_KEY = ec.generate_private_key(ec.SECP256R1())
EDDSA_KEY = ed25519.Ed25519PrivateKey.generate()
HOLDER_KEYS: list[Mapping[int, Any]] = [
    cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key()),
    cose_key_from_public(EDDSA_KEY.public_key(), kid=b"k", key_ops=(CoseKeyOp.VERIFY,)),
    {1: 2, -1: 1, -2: b"x" * 32, -3: True, 2: b"kid", "text label": 1, 300: [1, "a"], -100: None},
    MappingProxyType({1: 1, -1: 6, -2: b"y" * 32}),
]


class Text(str):
    """A str subclass: not the exact type the fast writer takes."""


def _general(claims: Claims) -> tuple[str, Any]:
    try:
        return ("bytes", deterministic.dumps(claims.to_cwt_map()))
    except Exception as error:  # the kind of error is what is compared
        return ("error", (type(error), str(error)))


def _fast(claims: Claims) -> tuple[str, Any]:
    try:
        return ("bytes", write_claims(claims))
    except Exception as error:
        return ("error", (type(error), str(error)))


texts = st.text(max_size=30) | st.text(min_size=24, max_size=300) | st.sampled_from(["\ud800"])
odd = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.none(),
    st.binary(max_size=3),
    st.builds(Text, st.text(max_size=3)),
)
dates = st.integers(0, 2**64 - 1) | st.integers(NOW, NOW + 10**6)


@st.composite
def claim_sets(draw: st.DrawFn) -> Claims:
    """Mostly claims as the AS makes them; now and then a field of any other kind."""

    def field(usual: st.SearchStrategy[Any]) -> Any:
        return draw(odd if draw(st.integers(0, 15)) == 0 else usual)

    cnf_osc = None
    cnf_key = draw(st.none() | st.sampled_from(HOLDER_KEYS))
    if cnf_key is None and draw(st.integers(0, 9)) == 0:
        cnf_osc = {0: b"\x01", 2: bytes(16)}
    return Claims(
        iss=field(texts),
        sub=field(texts),
        aud=field(texts),
        exp=field(dates),
        iat=field(dates),
        cti=field(st.binary(max_size=40)),
        scope=field(st.none() | texts),
        nbf=field(st.none() | dates),
        cnf_key=cnf_key,
        cnf_osc=cnf_osc,
    )


@settings(max_examples=1000, deadline=None)
@given(claims=claim_sets())
def test_written_claims_are_the_deterministic_encoding(claims: Claims) -> None:
    assert _fast(claims) == _general(claims)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"nbf": NOW},
        {"scope": None},
        {"exp": 2**64 - 1, "iat": 0, "nbf": 23},
        {"exp": 2**64},
        {"exp": -1},
        {"exp": 1.5},
        {"exp": True},
        {"iss": Text("as")},
        {"sub": "\udfff"},
        {"cti": bytearray(b"c")},
        {"cnf_key": 5},
        {"cnf_key": {1: {1, 2}}},
        {"cnf_key": {1: "\ud800"}, "scope": "\ud800"},
    ],
    ids=repr,
)
def test_written_claims_case(changes: dict[str, Any]) -> None:
    fields: dict[str, Any] = {
        "iss": "coap://as.test",
        "sub": "sensor-1",
        "aud": "thermostat",
        "exp": NOW + 600,
        "iat": NOW,
        "cti": b"\x01" * 8,
        "scope": "temp:read",
        **changes,
    }
    claims = Claims(**fields)
    assert _fast(claims) == _general(claims)


@pytest.mark.parametrize("alg", [CoseAlg.ES256, CoseAlg.EDDSA, CoseAlg.HMAC_256_64, -7, 10])
@pytest.mark.parametrize("kid", [b"", b"k" * 8, b"k" * 23, b"k" * 24, b"k" * 300, None])
def test_protected_header_is_the_deterministic_map(alg: Any, kid: bytes | None) -> None:
    header: dict[int, Any] = {1: alg} if kid is None else {1: alg, 4: kid}
    assert cose.protected_header(alg, kid) == deterministic.dumps(header)


def test_protected_header_of_a_kid_of_another_type_fails_as_before() -> None:
    with pytest.raises(TypeError):
        deterministic.dumps({1: CoseAlg.ES256, 4: bytearray(b"k")})
    with pytest.raises(TypeError):
        cose.protected_header(CoseAlg.ES256, bytearray(b"k"))  # type: ignore[arg-type]


def _cbor2_token(claims: Claims, alg: CoseAlg, kid: bytes, signature: bytes) -> bytes:
    """The token as encode_cwt wrote it before issue 17, around a given signature."""
    protected = deterministic.dumps({1: alg, 4: kid})
    payload = deterministic.dumps(claims.to_cwt_map())
    return cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(18, [protected, {}, payload, signature])))


@settings(max_examples=150, deadline=None)
@given(
    claims=claim_sets(),
    alg=st.sampled_from([CoseAlg.ES256, CoseAlg.EDDSA]),
    kid=st.binary(max_size=30),
)
def test_signed_token_is_the_one_cbor2_wrote(claims: Claims, alg: CoseAlg, kid: bytes) -> None:
    key = ES256_KEY if alg == CoseAlg.ES256 else EDDSA_KEY
    try:
        expected_payload = deterministic.dumps(claims.to_cwt_map())
    except Exception as error:
        with pytest.raises(type(error)):
            encode_cwt(claims, key, alg, kid)
        return
    token = encode_cwt(claims, key, alg, kid)
    signature = token[-64:]
    assert token == _cbor2_token(claims, alg, kid, signature)
    assert cwt.decode_cose(token).payload == expected_payload
    verification = VerificationKey(kid, alg, key.public_key())
    if all(isinstance(getattr(claims, f), str) for f in ("iss", "sub", "aud")):
        lookup = {kid: verification}.get
        try:
            assert verify_cwt(token, lookup) is not None
        except Exception as error:  # only the claims' own types may be refused
            assert "claim" in str(error)


def test_eddsa_token_is_byte_identical() -> None:
    """EdDSA signs deterministically (RFC 8032): the whole token, signature included."""
    claims = Claims("as", "dev", "rs", NOW + 60, NOW, b"c", "s", NOW, HOLDER_KEYS[0])
    token = encode_cwt(claims, EDDSA_KEY, CoseAlg.EDDSA, b"kid")
    before = cbor2.dumps(
        cbor2.CBORTag(
            61,
            cbor2.CBORTag(
                18,
                [
                    deterministic.dumps({1: CoseAlg.EDDSA, 4: b"kid"}),
                    {},
                    deterministic.dumps(claims.to_cwt_map()),
                    EDDSA_KEY.sign(
                        cbor2.dumps(
                            [
                                "Signature1",
                                deterministic.dumps({1: CoseAlg.EDDSA, 4: b"kid"}),
                                b"",
                                deterministic.dumps(claims.to_cwt_map()),
                            ]
                        )
                    ),
                ],
            ),
        )
    )
    assert token == before


def test_key_of_another_algorithm_is_refused_as_before() -> None:
    claims = Claims("as", "dev", "rs", NOW + 60, NOW, b"c")
    with pytest.raises(ValueError, match="key does not match algorithm"):
        encode_cwt(claims, EDDSA_KEY, CoseAlg.ES256, b"k")
    with pytest.raises(ValueError, match="key does not match algorithm"):
        encode_cwt(claims, ES256_KEY, CoseAlg.HMAC_256_64, b"k")


def test_maced_token_is_the_one_cbor2_wrote() -> None:
    claims = Claims("as", "dev", "rs", NOW + 60, NOW, b"c", "s", None, HOLDER_KEYS[1])
    key = bytes(range(32))
    token = encode_maced_cwt(claims, key, b"mac")
    payload = deterministic.dumps(claims.to_cwt_map())
    protected = deterministic.dumps({1: CoseAlg.HMAC_256_64, 4: b"mac"})
    tag = cose._hmac_256_64(key, cbor2.dumps(["MAC0", protected, b"", payload]))
    assert token == cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(17, [protected, {}, payload, tag])))


@pytest.mark.parametrize("label", [*range(-30, 30), *CoseKeyParam, *CwtClaim, True, False])
def test_map_labels_encode_as_their_values(label: Any) -> None:
    """deterministic's one-byte labels (issue 17): an IntEnum as its int, a bool as a bool."""
    expected = cbor2.dumps({label if isinstance(label, bool) else int(label): 0})
    assert deterministic.dumps({label: 0}) == expected
