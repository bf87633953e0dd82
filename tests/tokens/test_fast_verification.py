"""The fast paths of CWT verification (issue 17) against the general path they shortcut.

`verify_cwt` reads a token in the form the AS writes straight from its bytes (cwt._plain_sign1,
cwt_claims.read_claims); other canonical tokens are sliced apart (cwt._canonical_message) and
their maps read by `deterministic.loads`' own reader. The reference below turns all three off,
so every token is decoded by cbor2 and re-encoded to compare, as before issue 17. Any input
must give the same claims (same types), or the same error (class and message), after the
same key lookups.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import (
    Claims,
    VerificationKey,
    cose_key_from_public,
    cwt,
    deterministic,
    es256,
)
from coap_auth.tokens.cwt_claims import _new_claims, read_claims
from coap_auth.wire import CoseAlg
from tests.tokens.variants import NOW, is_low_s, signature_twin

ES256_KEY = ec.generate_private_key(ec.SECP256R1())
EDDSA_KEY = ed25519.Ed25519PrivateKey.generate()
ES256_KID, EDDSA_KID = b"es256-k1", b"eddsa-k1"
KEYS = {
    ES256_KID: VerificationKey(ES256_KID, CoseAlg.ES256, ES256_KEY.public_key()),
    EDDSA_KID: VerificationKey(EDDSA_KID, CoseAlg.EDDSA, EDDSA_KEY.public_key()),
}
HOLDER_KEYS = [
    cose_key_from_public(ec.generate_private_key(ec.SECP256R1()).public_key()),
    cose_key_from_public(ed25519.Ed25519PrivateKey.generate().public_key()),
]
OSCORE_MATERIAL = {0: b"\x01", 2: bytes(16)}  # RFC 9203 §3.2.1: id, ms
MAC_KEY = bytes(range(32))

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def general_path_only() -> Iterator[None]:
    """Every fast reader off: what `verify_cwt` did before issue 17."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cwt, "_plain_sign1", lambda token: None)
        patch.setattr(cwt, "_canonical_message", lambda token: None)
        patch.setattr(deterministic, "_read", lambda data, at, depth: None)
        yield


def outcome(token: Any, *, maced: bool = False) -> tuple[Any, ...]:
    """What verify_cwt (verify_maced_cwt if `maced`) makes of `token`: its claims with their
    types, or its error, and the kids it looked up."""
    looked_up: list[bytes] = []

    def lookup(kid: bytes) -> VerificationKey | None:
        looked_up.append(kid)
        return KEYS.get(kid)

    try:
        claims = cwt.verify_maced_cwt(token, MAC_KEY) if maced else cwt.verify_cwt(token, lookup)
    except Exception as error:  # the kind of error is what is compared
        return ("error", type(error), str(error), looked_up)
    types = [type(getattr(claims, f.name)) for f in dataclasses.fields(claims)]
    return ("claims", type(claims), claims, types, looked_up)


def assert_same_as_general_path(token: Any, *, maced: bool = False) -> tuple[Any, ...]:
    fast = outcome(token, maced=maced)
    with general_path_only():
        general = outcome(token, maced=maced)
    assert fast == general
    return fast


# -- tokens, made by hand so that any part can be off ----------------------------------------


def sign(alg: CoseAlg, protected: bytes, payload: bytes, *, high_s: bool = False) -> bytes:
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    if alg == CoseAlg.EDDSA:
        return EDDSA_KEY.sign(to_sign)
    r, s = decode_dss_signature(ES256_KEY.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signature_twin(signature) if is_low_s(signature) == high_s else signature


def token_of(protected: bytes, payload: bytes, signature: bytes, tag: int = 18) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(tag, [protected, {}, payload, signature])))


def mac(protected: bytes, payload: bytes) -> bytes:
    to_mac = cbor2.dumps(["MAC0", protected, b"", payload])
    return hmac.new(MAC_KEY, to_mac, hashlib.sha256).digest()[:8]


texts = st.text(max_size=40) | st.text(min_size=250, max_size=300)
dates = st.integers(NOW, NOW + 10**6)
any_dates = st.integers(0, 2**64 - 1) | st.integers(-(2**64), 30)
cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**65), 2**65)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.integers(-30, 30) | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def claim_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """Mostly what the AS issues; sometimes a claim missing, of another type, or an extra."""
    date = any_dates if draw(st.integers(0, 3)) == 0 else dates
    claims = Claims(
        iss=draw(texts),
        sub=draw(texts),
        aud=draw(texts),
        exp=draw(date),
        iat=draw(date),
        cti=draw(st.binary(max_size=30)),
        scope=draw(st.none() | texts),
        nbf=draw(st.none() | date),
        cnf_key=draw(st.none() | st.sampled_from(HOLDER_KEYS)),
    )
    if claims.cnf_key is None and draw(st.integers(0, 9)) == 0:
        claims = dataclasses.replace(claims, cnf_osc=OSCORE_MATERIAL)
    out: dict[Any, Any] = {int(k): v for k, v in claims.to_cwt_map().items()}
    for _ in range(max(0, draw(st.integers(-2, 2)))):
        change = draw(st.integers(0, 2))
        label = draw(st.integers(1, 9) | st.integers(-3, 40) | st.text(max_size=2))
        if change == 0:
            out.pop(label, None)
        else:
            out[label] = draw(cbor_values)
    return out


@st.composite
def tokens(draw: st.DrawFn) -> bytes:
    alg = draw(st.sampled_from([CoseAlg.ES256, CoseAlg.EDDSA, CoseAlg.HMAC_256_64]))
    kid = {CoseAlg.ES256: ES256_KID, CoseAlg.EDDSA: EDDSA_KID}.get(alg, b"mac")
    if draw(st.integers(0, 3)) == 0:
        kid = draw(
            st.sampled_from([ES256_KID, EDDSA_KID, b"", b"unknown"])
            | st.binary(min_size=17, max_size=25)
        )
    header: dict[Any, Any] = {1: int(alg), 4: kid}
    if draw(st.integers(0, 7)) == 0:
        header[draw(st.sampled_from([2, 3, 99, "x"]))] = draw(cbor_values)
    protected = deterministic.dumps(header)
    claims = draw(claim_maps())
    encoder = draw(st.sampled_from(["deterministic", "deterministic", "cbor2"]))
    payload = deterministic.dumps(claims) if encoder == "deterministic" else cbor2.dumps(claims)
    high_s = alg == CoseAlg.ES256 and draw(st.integers(0, 9)) == 0
    if alg == CoseAlg.HMAC_256_64:
        token = token_of(protected, payload, mac(protected, payload), tag=17)
    else:
        token = token_of(protected, payload, sign(alg, protected, payload, high_s=high_s))
    edits = draw(
        st.lists(
            st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)), max_size=2
        )
    )
    data = bytearray(token)
    for kind, where, byte in edits if draw(st.booleans()) else ():
        at = where % (len(data) + 1)
        if kind == 0 and at < len(data):
            data[at] ^= byte or 1
        elif kind == 1:
            data.insert(at, byte)
        elif kind == 2:
            del data[at : at + 1 + byte % 3]
        else:
            del data[at:]
    return bytes(data)


@FUZZ
@given(token=tokens())
def test_any_token_verifies_as_the_general_path_does(token: bytes) -> None:
    assert_same_as_general_path(token)
    assert_same_as_general_path(token, maced=True)


@FUZZ
@given(payload=st.binary(max_size=60) | st.builds(deterministic.dumps, claim_maps()))
def test_read_claims_gives_what_the_general_decoder_gives_or_nothing(payload: bytes) -> None:
    claims = read_claims(payload)
    if claims is None:
        return
    with general_path_only():
        expected = Claims.from_cwt_map(deterministic.loads(payload, "CWT claims"))
    assert claims == expected
    for field in dataclasses.fields(Claims):
        assert type(getattr(claims, field.name)) is type(getattr(expected, field.name))


@FUZZ
@given(data=st.binary(max_size=40) | st.builds(deterministic.dumps, cbor_values))
def test_deterministic_reader_agrees_with_cbor2(data: bytes) -> None:
    def result() -> tuple[Any, ...]:
        try:
            # repr: NaN equals nothing, and it tells 1 from True and 1.0.
            return ("item", repr(deterministic.loads(data, "item")))
        except MalformedToken as error:
            return ("error", str(error))

    fast = result()
    with general_path_only():
        assert result() == fast


# -- each check the fast path makes, one by one: each of these fails without it ---------------


def _plain(
    alg: CoseAlg,
    kid: bytes,
    claims: dict[Any, Any],
    *,
    signer: CoseAlg | None = None,
    **signing: Any,
) -> bytes:
    """A token of the fast path's form, its header naming `alg`, signed with `signer`'s key."""
    protected = deterministic.dumps({1: int(alg), 4: kid})
    payload = deterministic.dumps(claims)
    token = token_of(protected, payload, sign(signer or alg, protected, payload, **signing))
    assert cwt._plain_sign1(token) is not None  # the fast path's form
    return token


def _altered(alg: CoseAlg, kid: bytes, claims: dict[Any, Any]) -> bytes:
    """A token of the fast path's form whose last payload byte changed after signing."""
    protected = deterministic.dumps({1: int(alg), 4: kid})
    payload = bytearray(deterministic.dumps(claims))
    signature = sign(alg, protected, bytes(payload))
    payload[-1] ^= 1
    token = token_of(protected, bytes(payload), signature)
    assert cwt._plain_sign1(token) is not None
    return token


def _claims(changes: dict[int, Any] | None = None) -> dict[Any, Any]:
    claims = {1: "coap://as.test", 2: "sensor-1", 3: "thermostat", 4: NOW + 600, 6: NOW}
    return {**claims, 7: b"\x01" * 8, 9: "temp:read", **(changes or {})}


CHECKS: dict[str, tuple[Callable[[], bytes], type[Exception], str]] = {
    "accepted": (lambda: _plain(CoseAlg.ES256, ES256_KID, _claims()), type(None), ""),
    "unknown kid": (
        lambda: _plain(CoseAlg.ES256, b"other", _claims()),
        InvalidSignature,
        "unknown key id",
    ),
    # A good ES256 signature by the key named, the header saying EdDSA: the key's algorithm
    # is the only one it verifies with, and the token's must be the same.
    "alg of another key": (
        lambda: _plain(CoseAlg.EDDSA, ES256_KID, _claims(), signer=CoseAlg.ES256),
        InvalidSignature,
        "algorithm not allowed for this key",
    ),
    "high s": (
        lambda: _plain(CoseAlg.ES256, ES256_KID, _claims(), high_s=True),
        MalformedToken,
        "ES256 signature must be 64 bytes with a low s",
    ),
    "altered claims": (
        lambda: _altered(CoseAlg.ES256, ES256_KID, _claims()),
        InvalidSignature,
        "signature does not verify",
    ),
    "signed, exp a text": (
        lambda: _plain(CoseAlg.EDDSA, EDDSA_KID, _claims({4: "soon"})),
        MalformedToken,
        "exp claim must be a NumericDate",
    ),
    "signed, no iss": (
        lambda: _plain(CoseAlg.EDDSA, EDDSA_KID, {k: v for k, v in _claims().items() if k != 1}),
        MalformedToken,
        "iss claim must be a text string",
    ),
}


@pytest.mark.parametrize("case", CHECKS)
def test_each_fast_path_check(case: str) -> None:
    make, error, message = CHECKS[case]
    result = assert_same_as_general_path(make())
    if error is type(None):
        assert result[0] == "claims"
    else:
        assert result[:3] == ("error", error, message)


def _head(major: int, argument: int, width: int) -> bytes:
    """A head with `argument` in `width` extra bytes (0: in the initial byte), shortest or not."""
    if width == 0:
        return bytes([major << 5 | argument])
    return bytes([major << 5 | {1: 24, 2: 25, 4: 26, 8: 27}[width]]) + argument.to_bytes(
        width, "big"
    )


def _entry(label: int, value: Any, width: int) -> bytes:
    if isinstance(value, int):
        return bytes([label]) + _head(0, value, width)
    data = value.encode() if isinstance(value, str) else value
    return bytes([label]) + _head(3 if isinstance(value, str) else 2, len(data), width) + data


LONG_HEADS = [
    (label, width)
    for label in (1, 2, 3, 4, 5, 6, 7, 9)
    for width in (0, 1, 2, 4, 8)
    if width >= 4 or label not in (4, 5, 6)  # a date needs 4 bytes
]


@pytest.mark.parametrize(("label", "width"), LONG_HEADS)
def test_a_value_in_a_longer_head_takes_the_general_path(label: int, width: int) -> None:
    """Each claim's value with a head of every width: only the shortest is read fast, and
    every other form is refused as the general path refuses it (after no key lookup)."""
    claims = _claims({5: NOW})
    entries = []
    for key, value in sorted(claims.items()):
        shortest = deterministic.dumps({key: value})[1:]
        entries.append(_entry(key, value, width) if key == label else shortest)
    payload = bytes([0xA0 | len(entries)]) + b"".join(entries)
    shortest_form = payload == deterministic.dumps(claims)
    assert (read_claims(payload) is not None) == shortest_form
    protected = deterministic.dumps({1: int(CoseAlg.EDDSA), 4: EDDSA_KID})
    token = token_of(protected, payload, sign(CoseAlg.EDDSA, protected, payload))
    result = assert_same_as_general_path(token)
    assert result[0] == "claims" if shortest_form else result[:2] == ("error", MalformedToken)


@pytest.mark.parametrize("token", [None, "text", bytearray(b"\xd8\x3d"), 5, b"", b"\xd8\x3d"])
def test_what_is_not_a_token(token: Any) -> None:
    assert assert_same_as_general_path(token)[:2] == ("error", MalformedToken)


def test_claims_read_fast_are_claims() -> None:
    """The verifier's Claims, built without the frozen __init__: the same value object."""
    fields = ("i", "s", "a", NOW + 600, NOW, b"c", "x y", NOW, HOLDER_KEYS[0])
    built, made = _new_claims(*fields), Claims(*fields)
    assert type(built) is Claims and built == made and repr(built) == repr(made)
    assert hash(_new_claims(*fields[:8], None)) == hash(Claims(*fields[:8]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.iss = "other"  # type: ignore[misc]
    assert dataclasses.replace(built, iss="j") == dataclasses.replace(made, iss="j")


def _der_cases() -> list[bytes]:
    tops = [0x00, 0x01, 0x7F, 0x80, 0xFF]
    edge = [bytes([r]) + bytes(31) + bytes([s]) + b"\x01" * 31 for r in tops for s in tops]
    zeros = [bytes(32) + b"\x01" * 32, b"\x01" * 32 + bytes(32), bytes(31) + b"\x05" * 33]
    return edge + zeros + [os.urandom(64) for _ in range(300)]


def test_der_signature_is_what_cryptography_makes() -> None:
    """es256.to_der's fixed-length shortcut and its general form, against
    encode_dss_signature, for any 64 bytes (high s too: client assertions may be)."""
    for raw in _der_cases():
        r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
        assert es256.to_der(raw) == encode_dss_signature(r, s), raw.hex()
