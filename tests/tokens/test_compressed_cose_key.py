"""EC2 keys with a compressed point (RFC 9053 §7.1.1): "If the sign bit is zero, then encode y
as a CBOR false value; otherwise, encode y as a CBOR true value", the sign bit being SEC 1
§2.3.3's ỹ = y mod 2. Checked against an independent encoder: cryptography's X9.62
CompressedPoint (0x02 for an even y, 0x03 for an odd one, then x), and the parity itself."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from coap_auth.errors import UnsupportedPopKey
from coap_auth.tokens import (
    compress_cose_key,
    cose_key_from_public,
    public_key_from_cose,
    same_public_key,
)
from coap_auth.tokens.cose_key import cose_key_to_jwk

# RFC 9052 §7.1 / RFC 9053 §7.1.1 labels, written out.
KTY, KID, ALG, CRV, X, Y, D = 1, 2, 3, -1, -2, -3, -4
EC2, OKP, P256, ED25519, ES256 = 2, 1, 1, 6, -7
P = 2**256 - 2**224 + 2**192 + 2**96 - 1  # the P-256 field prime


def _keys_of_both_parities() -> list[ec.EllipticCurvePublicKey]:
    """P-256 keys of fixed scalars (the same in every pytest-xdist worker, which must all
    collect the same tests) until three have an even y and three an odd y."""
    keys: list[ec.EllipticCurvePublicKey] = []
    parities = {0: 0, 1: 0}
    scalar = 0x5EED
    while min(parities.values()) < 3:
        scalar += 1
        key = ec.derive_private_key(scalar, ec.SECP256R1()).public_key()
        parities[key.public_numbers().y % 2] += 1
        keys.append(key)
    return keys


KEYS = _keys_of_both_parities()


@pytest.mark.parametrize(
    "public_key", KEYS, ids=lambda k: f"y-{'odd' if k.public_numbers().y % 2 else 'even'}"
)
def test_compressed_form_matches_x962_and_the_rfc(public_key: ec.EllipticCurvePublicKey) -> None:
    full = cose_key_from_public(public_key)
    compressed = compress_cose_key(full)

    x962 = public_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    assert x962[0] in (0x02, 0x03) and len(x962) == 33
    assert compressed == {KTY: EC2, CRV: P256, X: x962[1:], Y: x962[0] == 0x03}
    # RFC 9053 §7.1.1 with SEC 1 §2.3.3: true exactly when y is odd.
    assert compressed[Y] is (public_key.public_numbers().y % 2 == 1)
    assert type(compressed[Y]) is bool  # a CBOR simple value, not 0 / 1
    # 34 bytes of y (a 32-byte bstr and its header) become one (0xf4 / 0xf5).
    assert len(cbor2.dumps(full)) - len(cbor2.dumps(compressed)) == 33
    assert cbor2.dumps(compressed)[-1] in (0xF4, 0xF5)

    # Back: the same key, as cryptography reads the X9.62 form, and its one uncompressed map.
    decompressed = public_key_from_cose(compressed)
    assert isinstance(decompressed, ec.EllipticCurvePublicKey)
    assert decompressed.public_numbers() == public_key.public_numbers()
    reference = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), x962)
    assert decompressed.public_numbers() == reference.public_numbers()
    assert cose_key_from_public(decompressed) == full
    assert cose_key_to_jwk(compressed) == cose_key_to_jwk(full)  # a JWT gets the full JWK
    assert same_public_key(compressed, full) and same_public_key(full, compressed)


def test_the_other_sign_bit_is_the_other_point() -> None:
    public_key = KEYS[0]
    compressed = compress_cose_key(cose_key_from_public(public_key))
    flipped = {**compressed, Y: not compressed[Y]}
    other = public_key_from_cose(flipped)
    assert isinstance(other, ec.EllipticCurvePublicKey)
    numbers, theirs = public_key.public_numbers(), other.public_numbers()
    assert theirs.x == numbers.x and theirs.y == P - numbers.y
    assert not same_public_key(flipped, compressed)
    assert not same_public_key(flipped, cose_key_from_public(public_key))


def test_compression_keeps_other_members_and_leaves_other_keys_alone() -> None:
    full = {**cose_key_from_public(KEYS[0]), KID: b"k1", ALG: ES256}
    compressed = compress_cose_key(full)
    assert compressed[KID] == b"k1" and compressed[ALG] == ES256
    assert isinstance(compressed[Y], bool)
    assert compress_cose_key(compressed) == compressed  # already compressed: unchanged
    okp = cose_key_from_public(ed25519.Ed25519PrivateKey.generate().public_key())
    assert compress_cose_key(okp) == okp
    assert compress_cose_key(full) is not full and full[Y] != compressed[Y]  # a copy


@pytest.mark.parametrize(
    ("x", "why"),
    [
        (b"\xff" * 32, "x beyond the field prime"),
        (P.to_bytes(32, "big"), "x equal to the field prime"),
        ((3).to_bytes(32, "big"), "no point has this x"),
    ],
)
@pytest.mark.parametrize("sign", [False, True])
def test_off_curve_compressed_points_are_refused(x: bytes, why: str, sign: bool) -> None:
    with pytest.raises(UnsupportedPopKey, match="not on P-256"):
        public_key_from_cose({KTY: EC2, CRV: P256, X: x, Y: sign})
    assert not same_public_key({KTY: EC2, CRV: P256, X: x, Y: sign}, cose_key_from_public(KEYS[0]))


def test_a_sign_bit_must_be_a_cbor_boolean_with_a_full_x() -> None:
    x = cose_key_from_public(KEYS[0])[X]
    for y in (0, 1, None, b"\x01", "true"):
        with pytest.raises(UnsupportedPopKey):
            public_key_from_cose({KTY: EC2, CRV: P256, X: x, Y: y})
    for short in (x[1:], x + b"\x00", None):
        with pytest.raises(UnsupportedPopKey):
            public_key_from_cose({KTY: EC2, CRV: P256, X: short, Y: True})
    # A private key is still refused, compressed or not.
    with pytest.raises(UnsupportedPopKey, match="private"):
        public_key_from_cose({KTY: EC2, CRV: P256, X: x, Y: True, D: b"\x01" * 32})
    with pytest.raises(UnsupportedPopKey):
        compress_cose_key({KTY: EC2, CRV: P256, X: x, Y: b"\x00" * 32})  # off the curve


def test_same_public_key_raises_nothing() -> None:
    full = cose_key_from_public(KEYS[0])
    for junk in (None, 7, "key", [], {}, {KTY: EC2}, {KTY: True, CRV: P256, X: full[X], Y: True}):
        assert same_public_key(junk, full) is False
        assert same_public_key(full, junk) is False


def test_an_uncompressed_coordinate_past_the_field_prime_is_refused() -> None:
    """Outsider round 2: x + p named the point of x; one key has one form. (A point with a
    small x, so that x + p still fits in 32 bytes.)"""
    x = 1
    while True:
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x02" + x.to_bytes(32, "big")
            )
            break
        except ValueError:
            x += 1
    y = point.public_numbers().y
    valid = {KTY: EC2, CRV: P256, X: x.to_bytes(32, "big"), Y: y.to_bytes(32, "big")}
    assert public_key_from_cose(valid).public_numbers().x == x
    with pytest.raises(UnsupportedPopKey, match="not on P-256"):
        public_key_from_cose({**valid, X: (x + P).to_bytes(32, "big")})
