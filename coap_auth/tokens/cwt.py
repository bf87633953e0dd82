"""CBOR Web Tokens (RFC 8392): `61(18(...))` signed, `61(17(...))` MACed and `61(16(...))`
encrypted (for an audience of the ACE OSCORE profile: its cnf holds a master secret), as
docs/protocol.md fixes.

Signature checking (`verify_cwt`) is separate from claim validation (`Claims.validate`).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import cbor2

from coap_auth import untagged
from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import cose, deterministic, es256
from coap_auth.tokens.claims import Claims
from coap_auth.tokens.cose_key import PrivateKey, VerificationKey
from coap_auth.tokens.cwt_claims import read_claims, write_claims
from coap_auth.wire import CoseAlg, CoseHeader, CoseTag

KeyLookup = Callable[[bytes], VerificationKey | None]
# kid -> the AES-CCM-16-64-128 key of an encrypted CWT, or None.
SecretLookup = Callable[[bytes], bytes | None]

# Generous for any token we issue (~200-300 bytes) and small enough to bound work.
MAX_TOKEN_BYTES = 8192
# Tag 61 in its shortest head (RFC 8949 §3: 61 > 23 takes one extra byte).
_CWT_TAG = b"\xd8\x3d"
# The only tags a token holds outside its payload: CWT around the COSE message's own.
_ENVELOPE_TAGS = frozenset(map(int, CoseTag))
_ARRAY_OF_FOUR, _ARRAY_OF_THREE, _EMPTY_MAP = b"\x84", b"\x83", b"\xa0"
_MAJOR_BYTES, _MAJOR_TAG = 2, 6
# 61(18([...])) and 61(17([...])), array of four, every head shortest: how a canonical signed
# or MACed CWT starts.
_CANONICAL_STARTS = {
    _CWT_TAG + deterministic.head(_MAJOR_TAG, tag) + _ARRAY_OF_FOUR: tag
    for tag in (CoseTag.SIGN1, CoseTag.MAC0)
}
_START_LEN = 4
_ES256 = CoseAlg.ES256  # looked up once: read on every verification
# A signed CWT as the AS writes it (cose.sign1): 61(18([h'{1: alg, 4: kid}', {}, payload,
# signature])), alg ES256 or EdDSA (both sign in 64 bytes), a kid of at most 18 bytes (its
# protected header fits a one-byte head). Its first ten bytes, up to the kid, name the alg
# and the kid's length: d8 3d d2 84 4d a2 01 26 04 48 for ES256 and an 8-byte kid.
_SIGN1_START = _CWT_TAG + deterministic.head(_MAJOR_TAG, CoseTag.SIGN1) + _ARRAY_OF_FOUR
_LONGEST_PLAIN_KID = 18


def _plain_start(alg: CoseAlg, kid_len: int) -> bytes:
    header = deterministic.dumps({CoseHeader.ALG: alg, CoseHeader.KID: bytes(kid_len)})
    return _SIGN1_START + deterministic.head(_MAJOR_BYTES, len(header)) + header[: -kid_len or None]


_PLAIN_STARTS = {
    _plain_start(alg, kid_len): (alg, kid_len)
    for alg in (CoseAlg.ES256, CoseAlg.EDDSA)
    for kid_len in range(_LONGEST_PLAIN_KID + 1)
}
_KID_AT = len(_plain_start(CoseAlg.ES256, 0))
_SIGNATURE_LEN = 64
_SIGNATURE_HEAD = deterministic.head(_MAJOR_BYTES, _SIGNATURE_LEN)
# The shortest such token: an empty kid, {}, an empty payload, the signature.
_PLAIN_MIN = _KID_AT + 2 + len(_SIGNATURE_HEAD) + _SIGNATURE_LEN
# Byte-string heads (RFC 8949 §3): 0x40 + length up to 23, then 0x58 + 1 byte, 0x59 + 2.
_SHORT_BYTES, _BYTES_1, _BYTES_2 = 0x40, 0x58, 0x59
_EMPTY_BYTES = b"\x40"


def encode_cwt(claims: Claims, private_key: PrivateKey, alg: CoseAlg, kid: bytes) -> bytes:
    """A signed CWT: tag 61 around COSE_Sign1, protected {1: alg, 4: kid}, unprotected {}."""
    payload = write_claims(claims)
    protected = cose.protected_header(alg, kid)
    signature = cose.sign1_signature(protected, payload, private_key, alg)
    # What cbor2.dumps(61(18([protected, {}, payload, signature]))) writes: shortest heads.
    return _token_bytes(CoseTag.SIGN1, protected, payload, signature)


def encode_maced_cwt(claims: Claims, key: bytes, kid: bytes) -> bytes:
    """A MACed CWT (HMAC 256/64) for an audience that shares a symmetric key."""
    payload = write_claims(claims)
    return cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, cose.mac0(payload, key, kid)))


def encode_encrypted_cwt(claims: Claims, key: bytes, kid: bytes) -> bytes:
    """An encrypted CWT, tag 61 around COSE_Encrypt0 (AES-CCM-16-64-128, a fresh random IV in
    the protected header {1: 10, 4: kid, 5: iv}), for an audience that shares `key`."""
    payload = write_claims(claims)
    iv = secrets.token_bytes(cose.CCM_NONCE_LEN)
    return cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, cose.encrypt0(payload, key, kid, iv)))


def decode_cose(token: bytes, *, low_s: bool = True) -> cose.CoseMessage:
    """Parse a CWT into its COSE message, verifying nothing but its form.

    docs/protocol.md "Canonical tokens": one byte form per token, so its RFC 9770 hash is unique.
    Refused (MalformedToken), before any key is looked up: a missing or long tag 61 (RFC 8392
    §6 lets a context omit it; ours does not), any head not in its shortest form, an
    unprotected header other than the empty map, a protected header or claims not in core
    deterministic encoding (RFC 8949 §4.2.1), a `crit` naming what we do not process, a
    high-s ES256 signature (unless `low_s` is False: for client assertions, which the cti
    replay cache makes single-use whatever their form), trailing bytes.
    """
    return _decode(token, low_s=low_s)[0]


def peek_kid(token: bytes) -> bytes | None:
    """The kid of a CWT in its canonical form (for routing before verification)."""
    kid = decode_cose(token).kid
    return kid if isinstance(kid, bytes) else None


def verify_cwt(token: bytes, lookup: KeyLookup) -> Claims:
    """Verify a signed CWT against the key its kid names; return its (unvalidated) claims."""
    plain = _plain_sign1(token)
    if plain is None:
        message, claims_map = _decode(token)
        kid = message.kid
        key = lookup(kid) if isinstance(kid, bytes) else None
        if key is None:
            raise InvalidSignature("unknown key id")
        cose.verify_sign1(message, key.public_key, key.alg)
        return Claims.from_cwt_map(claims_map)
    # A token as the AS writes it: the checks above, in their order and with their errors,
    # less what its form settles (a canonical token, its header {1: alg, 4: kid}).
    alg, protected_end, payload_start, payload_end = plain
    payload = token[payload_start:payload_end]
    claims = read_claims(payload)
    if claims is None:
        claims_map = deterministic.loads(payload, "CWT claims")
    signature = token[-_SIGNATURE_LEN:]
    if alg == _ES256 and not es256.is_canonical(signature):
        raise MalformedToken("ES256 signature must be 64 bytes with a low s")
    key = lookup(token[_KID_AT:protected_end])
    if key is None:
        raise InvalidSignature("unknown key id")
    if key.alg != alg:
        raise InvalidSignature("algorithm not allowed for this key")
    # RFC 9052 §4.4: the Sig_structure's byte strings are the token's own, shortest heads
    # and all; external_aad (empty) stands where the token has its unprotected header.
    signed = b"".join(
        (
            cose.SIGNATURE1_HEAD,
            token[_START_LEN:protected_end],
            _EMPTY_BYTES,
            token[protected_end + 1 : payload_end],
        )
    )
    cose.verify_signature(signed, signature, key.public_key, key.alg)
    return Claims.from_cwt_map(claims_map) if claims is None else claims


def verify_maced_cwt(token: bytes, key: bytes) -> Claims:
    message, claims = _decode(token)
    cose.verify_mac0(message, key)
    return Claims.from_cwt_map(claims)


def decrypt_cwt(token: bytes, lookup: SecretLookup) -> Claims:
    """Decrypt an encrypted CWT with the key its kid names; return its (unvalidated) claims.
    Raises MalformedToken (not canonical, or claims not in deterministic encoding once
    decrypted) or InvalidSignature (unknown kid, wrong key, altered bytes)."""
    message, _ = _decode(token)
    if message.tag != CoseTag.ENCRYPT0:
        raise MalformedToken("not an encrypted CWT")
    kid = message.kid
    key = lookup(kid) if isinstance(kid, bytes) else None
    if key is None:
        raise InvalidSignature("unknown key id")
    return Claims.from_cwt_map(deterministic.loads(cose.decrypt0(message, key), "CWT claims"))


def decode_claims(payload: bytes) -> Claims:
    """The claims of a COSE payload, type-checked but neither verified nor validated."""
    return Claims.from_cwt_map(deterministic.loads(payload, "CWT claims"))


def _decode(token: bytes, *, low_s: bool = True) -> tuple[cose.CoseMessage, Any]:
    """The COSE message of a canonical CWT and its decoded claims map (see `decode_cose`)."""
    if not isinstance(token, bytes) or len(token) > MAX_TOKEN_BYTES:
        raise MalformedToken("token too large or not bytes")
    if not token.startswith(_CWT_TAG):
        raise MalformedToken("not a CWT: tag 61 around a COSE_Sign1 or COSE_Mac0")
    message = _canonical_message(token)
    if message is not None:
        # What the general path below would check too, in its order, less what the token's
        # canonical form already settles (well-formed, empty unprotected header, the bytes).
        claims = deterministic.loads(message.payload, "CWT claims")
        if low_s and message.alg == _ES256 and not es256.is_canonical(message.tag_or_signature):
            raise MalformedToken("ES256 signature must be 64 bytes with a low s")
        return message, claims
    try:
        item = untagged.loads(token, _ENVELOPE_TAGS)
    except Exception:
        raise MalformedToken("token is not well-formed CBOR") from None
    message = cose.decode(item.value)
    if message.unprotected:
        raise MalformedToken("CWT unprotected header must be the empty map")
    # An encrypted token's claims are read once it decrypts (`decrypt_cwt`).
    encrypted = message.tag == CoseTag.ENCRYPT0
    claims = None if encrypted else deterministic.loads(message.payload, "CWT claims")
    # Every head (tags, array, byte strings) in its shortest form, nothing after the end: the
    # parts put back together give the token again, byte for byte.
    if _canonical_bytes(message) != token:
        raise MalformedToken("CWT is not in its canonical encoding")
    if low_s and message.alg == CoseAlg.ES256 and not es256.is_canonical(message.tag_or_signature):
        raise MalformedToken("ES256 signature must be 64 bytes with a low s")
    return message, claims


def _plain_sign1(token: bytes) -> tuple[CoseAlg, int, int, int] | None:
    """(alg, where the protected header ends, where the payload starts and ends) of a signed
    CWT in the form the AS writes (`_PLAIN_STARTS`); None for anything else, which `_decode`
    reads (or refuses) as before. Such a token is canonical: every head shortest, the
    unprotected header empty, nothing after the signature, the protected header the
    deterministic map {1: alg, 4: kid} with no crit."""
    if not isinstance(token, bytes):
        return None
    size = len(token)
    plain = _PLAIN_STARTS.get(token[:_KID_AT]) if _PLAIN_MIN <= size <= MAX_TOKEN_BYTES else None
    if plain is None:
        return None
    alg, kid_len = plain
    protected_end = _KID_AT + kid_len
    if token[protected_end] != _EMPTY_MAP[0]:
        return None
    head = token[protected_end + 1]
    payload_start = protected_end + 2
    if head < _BYTES_1:
        payload_len = head - _SHORT_BYTES
        if payload_len < 0:
            return None
    elif head == _BYTES_1 and token[payload_start] >= 24:
        payload_len, payload_start = token[payload_start], payload_start + 1
    elif head == _BYTES_2:
        payload_len = int.from_bytes(token[payload_start : payload_start + 2], "big")
        payload_start += 2
        if payload_len < 2**8:
            return None
    else:
        return None
    payload_end = payload_start + payload_len
    if (
        payload_end + len(_SIGNATURE_HEAD) + _SIGNATURE_LEN != size
        or token[payload_end : payload_end + len(_SIGNATURE_HEAD)] != _SIGNATURE_HEAD
    ):
        return None
    return alg, protected_end, payload_start, payload_end


def _canonical_message(token: bytes) -> cose.CoseMessage | None:
    """The COSE_Sign1 or COSE_Mac0 of a token in canonical form, its members sliced out of
    the bytes (no CBOR decoder, no re-encoding to compare); None for anything else, which the
    general path in `_decode` decodes (or refuses) as before. Raises what `cose.message`
    raises for the protected header."""
    tag = _CANONICAL_STARTS.get(token[:_START_LEN])
    if tag is None:
        return None
    protected = _byte_string(token, _START_LEN)
    if protected is None or token[protected[1] : protected[1] + 1] != _EMPTY_MAP:
        return None
    payload = _byte_string(token, protected[1] + 1)
    if payload is None:
        return None
    last = _byte_string(token, payload[1])
    if last is None or last[1] != len(token):
        return None
    return cose.message(tag, protected[0], {}, payload[0], last[0])


def _byte_string(data: bytes, at: int) -> tuple[bytes, int] | None:
    """The byte string whose shortest head starts at `at`, and where it ends; None when
    the head is another type, not shortest, or the string runs past the end. (Heads of
    4 or 8 bytes never are shortest under MAX_TOKEN_BYTES.)"""
    if at >= len(data):
        return None
    initial = data[at]
    if initial >> 5 != _MAJOR_BYTES:
        return None
    length = initial & 0x1F
    start = at + 1
    if length == 24:  # RFC 8949 §3: one-byte argument, shortest only from 24
        if start >= len(data) or data[start] < 24:
            return None
        length, start = data[start], start + 1
    elif length == 25:  # two-byte argument, shortest only from 256
        length, start = int.from_bytes(data[start : start + 2], "big"), start + 2
        if length < 256 or start > len(data):
            return None
    elif length > 25:
        return None
    end = start + length
    if end > len(data):
        return None
    return data[start:end], end


def _canonical_bytes(message: cose.CoseMessage) -> bytes:
    """61(tag([protected, {}, payload, signature])), or 61(16([protected, {}, ciphertext])),
    with every head shortest (RFC 8949 §4.2.1)."""
    last = None if message.tag == CoseTag.ENCRYPT0 else message.tag_or_signature
    return _token_bytes(message.tag, message.protected_bytes, message.payload, last)


def _token_bytes(tag: int, protected: bytes, payload: bytes, last: bytes | None) -> bytes:
    """61(tag([protected, {}, payload, last])), or without `last` when None, every head
    shortest."""
    parts = [
        _CWT_TAG,
        deterministic.head(_MAJOR_TAG, tag),
        _ARRAY_OF_THREE if last is None else _ARRAY_OF_FOUR,
        deterministic.head(_MAJOR_BYTES, len(protected)),
        protected,
        _EMPTY_MAP,
        deterministic.head(_MAJOR_BYTES, len(payload)),
        payload,
    ]
    if last is not None:
        parts += [deterministic.head(_MAJOR_BYTES, len(last)), last]
    return b"".join(parts)
