"""ES256 signatures in their one accepted form: raw r || s (RFC 9053 §2.1, RFC 7518 §3.4), low-s.

(r, s) and (r, n - s) both verify, so a verifier that took either would give one token two
byte forms and two RFC 9770 hashes; we sign and accept only s <= n/2 (as Bitcoin's BIP 62).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# The order n of the P-256 group (SEC 2 §2.4.2, FIPS 186-4 D.1.2.3).
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
HALF_ORDER = P256_ORDER // 2
COORD_LEN = 32
SIGNATURE_LEN = 2 * COORD_LEN
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())  # immutable: made once
_ZERO = bytes(COORD_LEN)
_ORDER_BYTES = P256_ORDER.to_bytes(COORD_LEN, "big")
_HALF_ORDER_BYTES = HALF_ORDER.to_bytes(COORD_LEN, "big")
# DER heads (X.690 §8.1.3.4, §8.3) around 32-byte r and s: SEQUENCE of 68 bytes, INTEGER of
# 32; or SEQUENCE of 69, INTEGER of 33 with a zero sign byte, when r's top bit is set.
_R_HEAD = bytes((0x30, 68, 2, COORD_LEN))
_R_HEAD_SIGNED = bytes((0x30, 69, 2, COORD_LEN + 1, 0))
_S_HEAD = bytes((2, COORD_LEN))


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """A raw, low-s ES256 signature of `data`."""
    r, s = decode_dss_signature(private_key.sign(data, _ECDSA_SHA256))
    return _raw(r, min(s, P256_ORDER - s))


def low_s(signature: bytes) -> bytes:
    """The low-s twin of a raw signature (itself when already low-s). For signatures another
    library made, e.g. PyJWT's. ValueError when it is not 64 bytes or s is out of range."""
    if len(signature) != SIGNATURE_LEN:
        raise ValueError("ES256 signature must be 64 bytes")
    r, s = _split(signature)
    if not 0 < s < P256_ORDER:
        raise ValueError("ES256 signature s out of range")
    return _raw(r, min(s, P256_ORDER - s))


def is_canonical(signature: bytes) -> bool:
    """64 bytes, 0 < r < n and 0 < s <= n/2: the only ES256 form we accept."""
    # Fixed-width big-endian byte strings compare as the integers they hold: no int needed
    # on the path every token takes.
    return (
        len(signature) == SIGNATURE_LEN
        and _ZERO < signature[:COORD_LEN] < _ORDER_BYTES
        and _ZERO < signature[COORD_LEN:] <= _HALF_ORDER_BYTES
    )


def to_der(signature: bytes) -> bytes:
    """The DER form `cryptography` verifies (the caller has checked the length): the
    SEQUENCE of two INTEGERs `encode_dss_signature` makes, written out (half its time)."""
    first_r, first_s = signature[0], signature[COORD_LEN]
    if first_r and 0 < first_s < 0x80:
        # All low-s signatures but ~1 in 85 (a zero top byte in r or s, to strip): s needs
        # no sign byte (low, below 0x80), r one when its top bit is set.
        r_head = _R_HEAD_SIGNED if first_r >= 0x80 else _R_HEAD
        return b"".join((r_head, signature[:COORD_LEN], _S_HEAD, signature[COORD_LEN:]))
    r = _der_integer(signature[:COORD_LEN])
    s = _der_integer(signature[COORD_LEN:])
    # X.690 §8.1.3.4: short-form lengths, as the body is at most 70 bytes.
    return b"".join((b"\x30", bytes((len(r) + len(s) + 4, 2, len(r))), r, bytes((2, len(s))), s))


def _der_integer(coordinate: bytes) -> bytes:
    """X.690 §8.3: the contents of a DER INTEGER holding a non-negative big-endian value:
    no leading zero byte, but one where the top bit would make it negative."""
    value = coordinate.lstrip(b"\x00")
    if not value or value[0] >= 0x80:
        return b"\x00" + value
    return value


def _split(signature: bytes) -> tuple[int, int]:
    return (
        int.from_bytes(signature[:COORD_LEN], "big"),
        int.from_bytes(signature[COORD_LEN:], "big"),
    )


def _raw(r: int, s: int) -> bytes:
    return r.to_bytes(COORD_LEN, "big") + s.to_bytes(COORD_LEN, "big")
