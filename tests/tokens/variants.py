"""Other byte forms of one signed token (issue 13): what a verifier must refuse.

Each keeps the signature valid, so a lenient verifier accepts it under a new RFC 9770 hash.
Built here by hand from the token's bytes, independently of the codecs of coap_auth.tokens;
the sample claims the token tests share are here too.
"""

from __future__ import annotations

import base64
from typing import Any

import cbor2

from coap_auth.tokens import Claims

# The order n of the P-256 group (FIPS 186-4 D.1.2.3), written out again on purpose.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# The order L of the Ed25519 group (RFC 8032 §5.1).
ED25519_L = 2**252 + 27742317777372353535851937790883648493

CWT_TAG = b"\xd8\x3d"  # tag 61, shortest head

# The issue time of the sample tokens.
NOW = 1_700_000_000


def sample_claims(
    *,
    aud: str = "thermostat",
    cti: bytes = b"\x01" * 8,
    nbf: int | None = None,
    cnf: dict[int, Any] | None = None,
) -> Claims:
    """The claims of a ten-minute sample token of sensor-1, issued at NOW."""
    return Claims(
        iss="coap://as.test",
        sub="sensor-1",
        aud=aud,
        exp=NOW + 600,
        iat=NOW,
        cti=cti,
        scope="temp:read",
        nbf=nbf,
        cnf_key=cnf,
    )


def signature_twin(signature: bytes) -> bytes:
    """(r, s) -> (r, n - s): the other ECDSA signature of the same message and key."""
    r, s = signature[:32], int.from_bytes(signature[32:], "big")
    return r + (P256_N - s).to_bytes(32, "big")


def is_low_s(signature: bytes) -> bool:
    return int.from_bytes(signature[32:], "big") <= P256_N // 2


def ed25519_plus_l(signature: bytes) -> bytes:
    """S -> S + L: the same EdDSA equation, a non-reduced S (RFC 8032 §5.1.7 refuses it)."""
    s = int.from_bytes(signature[32:], "little") + ED25519_L
    return signature[:32] + s.to_bytes(32, "little")


def cwt_parts(token: bytes) -> tuple[int, list]:
    """(inner tag, [protected, unprotected, payload, signature]) of a 61(tag([...])) CWT."""
    outer = cbor2.loads(token)
    assert outer.tag == 61
    return outer.value.tag, list(outer.value.value)


def _cwt(tag: int, parts: list) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(61, cbor2.CBORTag(tag, parts)))


def cwt_variants(token: bytes, *, es256: bool) -> dict[str, bytes]:
    """Re-encodings of a canonical CWT `61(18([...]))` that keep its signature valid."""
    assert token.startswith(CWT_TAG + b"\xd2\x84") or token.startswith(CWT_TAG + b"\xd1\x84")
    tag, parts = cwt_parts(token)
    inner = token[2:]  # the tag 17/18 item
    array = inner[2:]  # after the one-byte tag and the 0x84 head: the four members
    variants = {
        # RFC 8392 §6 lets a context omit tag 61; docs/protocol.md's does not.
        "tag 61 removed": inner,
        # A header parameter nobody signed.
        "{99: 0} in the unprotected header": _cwt(tag, [parts[0], {99: 0}, *parts[2:]]),
        # The array of four with a two-byte head.
        "COSE array head in two bytes": CWT_TAG + inner[:1] + b"\x98\x04" + array,
        # Tag 61 with a four-byte argument.
        "tag 61 in four bytes": b"\xda\x00\x00\x00\x3d" + inner,
        "tag 18/17 in two bytes": CWT_TAG + b"\xd8" + bytes([tag]) + inner[1:],
        "indefinite-length COSE array": CWT_TAG + inner[:1] + b"\x9f" + array + b"\xff",
        "unprotected header as a long empty map": _replace_member(token, 1, b"\xb9\x00\x00"),
        "payload with a longer length head": _replace_member(
            token, 2, b"\x59" + len(parts[2]).to_bytes(2, "big") + parts[2]
        ),
        "a byte after the end": token + b"\x00",
    }
    if es256:
        variants["ECDSA high-s twin"] = _cwt(tag, [*parts[:3], signature_twin(parts[3])])
    return variants


def _replace_member(token: bytes, index: int, encoded: bytes) -> bytes:
    """The token with member `index` of the COSE array replaced by raw `encoded` bytes."""
    tag, parts = cwt_parts(token)
    members = [cbor2.dumps(p) for p in parts]
    members[index] = encoded
    return CWT_TAG + bytes([0xC0 | tag, 0x84]) + b"".join(members)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_lenient(text: str) -> bytes:
    """What Python's base64 module makes of any text: skips strange characters, pads."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_variants(token: bytes, *, es256: bool) -> dict[str, bytes]:
    """Other texts of one JWS compact serialization that PyJWT's lenient base64 accepts."""
    head, _, signature = token.decode("ascii").rpartition(".")
    raw = b64url_lenient(signature)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 64 bytes are 86 characters: the last one carries 2 bits and 4 unused ones.
    other_last = alphabet[alphabet.index(signature[-1]) ^ 0b0001]
    variants = {
        "== padding on the signature": f"{head}.{signature}==",
        "last character with other unused bits": f"{head}.{signature[:-1]}{other_last}",
        # Skipped by the decoder; four of them keep the length PyJWT pads right.
        "characters outside the alphabet": f"{head}.{signature[:10]}!!!!{signature[10:]}",
        "whitespace at the end": f"{head}.{signature}\n\n\n",
    }
    if "-" in signature or "_" in signature:
        # urlsafe_b64decode maps '-' and '_' to '+' and '/', and takes those too.
        standard = signature.replace("-", "+").replace("_", "/")
        variants["standard base64 '+' '/' for '-' '_'"] = f"{head}.{standard}"
    if es256:
        variants["ECDSA high-s twin"] = f"{head}.{b64url(signature_twin(raw))}"
    return {name: text.encode("ascii") for name, text in variants.items()}
