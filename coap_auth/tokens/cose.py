"""A small COSE_Sign1 / COSE_Mac0 / COSE_Encrypt0 codec (RFC 9052 §4.2, §6.2, §5.2) over cbor2
and cryptography.

Only what CWTs need: ES256, EdDSA, HMAC 256/64 and AES-CCM-16-64-128, one signer or one
shared key, empty external AAD.
Chosen over pycose (pure-Python ECDSA, ~20x slower) and python-cwt (~2x slower): see README.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import deterministic, es256
from coap_auth.tokens.cose_key import PrivateKey, PublicKey
from coap_auth.wire import CoseAlg, CoseHeader, CoseTag

_MAC_64_LEN = 8
_MAJOR_BYTES, _MAJOR_TEXT = 2, 3
# RFC 9053 §4.2, AES-CCM-16-64-128: a 16-byte key, an 8-byte tag, a 13-byte nonce.
CCM_KEY_LEN = 16
CCM_NONCE_LEN = 13
_CCM_TAG_LEN = 8

# RFC 9052 §3.1, Table 3: crit. (Not in wire.CoseHeader yet; the verifier must know it.)
CRIT = 2
# The header parameters this verifier processes, the only ones a `crit` may name: alg (the
# key's registered algorithm must equal it) and kid (names the key). Everything else in a
# protected header is signed but ignored, so a token that makes it critical is refused.
PROCESSED_LABELS = frozenset({CoseHeader.ALG, CoseHeader.KID})
# ES256's signature algorithm: immutable, so made once rather than for every token.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
# The first two members of every Sig_structure / MAC_structure we build (RFC 9052 §4.4,
# §6.3): the array head and the context string, as cbor2 writes them.
_STRUCTURE_HEADS = {
    context: b"\x84" + deterministic.head(_MAJOR_TEXT, len(context)) + context.encode("ascii")
    for context in ("Signature1", "MAC0")
}
# The Sig_structure of a COSE_Sign1 up to its protected header (RFC 9052 §4.4).
SIGNATURE1_HEAD = _STRUCTURE_HEADS["Signature1"]
_EMPTY_BYTES = b"\x40"
# Members read on every verification, looked up once (an enum member lookup costs ~0.1 us).
_ALG, _KID = CoseHeader.ALG, CoseHeader.KID
_ES256, _EDDSA, _SIGN1 = CoseAlg.ES256, CoseAlg.EDDSA, CoseTag.SIGN1
# The protected header {1: alg, 4: kid} of a signed token up to its kid's head, by alg.
_SIGNED_HEADER_STARTS = {
    alg: deterministic.dumps({CoseHeader.ALG: alg, CoseHeader.KID: b""})[:-1]
    for alg in (CoseAlg.ES256, CoseAlg.EDDSA)
}


@dataclass(frozen=True, slots=True)
class CoseMessage:
    """A decoded, not yet verified COSE_Sign1 or COSE_Mac0, or a COSE_Encrypt0 not yet
    decrypted (its `payload` is the ciphertext, its `tag_or_signature` empty: the tag is the
    ciphertext's last 8 bytes)."""

    tag: CoseTag
    protected_bytes: bytes
    protected: Mapping[Any, Any]
    unprotected: Mapping[Any, Any]
    payload: bytes
    tag_or_signature: bytes

    @property
    def alg(self) -> Any:
        return self.protected.get(_ALG)

    @property
    def kid(self) -> Any:
        # RFC 9052 §3.1: kid may be protected or not; protected wins when both are present.
        return self.protected.get(_KID, self.unprotected.get(_KID))


def protected_header(alg: CoseAlg, kid: bytes | None) -> bytes:
    """The protected header {1: alg, 4: kid} (kid only when given) in deterministic CBOR."""
    start = _SIGNED_HEADER_STARTS.get(alg) if isinstance(alg, int) else None
    if start is not None and type(kid) is bytes:
        # What the AS signs with: the bytes below, less the map, its sorting and the enums.
        return start + deterministic.head(_MAJOR_BYTES, len(kid)) + kid
    header: dict[int, Any] = {CoseHeader.ALG: alg}
    if kid is not None:
        header[CoseHeader.KID] = kid
    return deterministic.dumps(header)


def _sig_structure(context: str, protected: bytes, payload: bytes) -> bytes:
    # RFC 9052 §4.4 / §6.3; external_aad is the empty byte string. The bytes of
    # cbor2.dumps([context, protected, b"", payload]), joined by hand: cbor2 took ~3 us.
    return b"".join(
        (
            _STRUCTURE_HEADS[context],
            deterministic.head(_MAJOR_BYTES, len(protected)),
            protected,
            _EMPTY_BYTES,
            deterministic.head(_MAJOR_BYTES, len(payload)),
            payload,
        )
    )


def sign1(
    payload: bytes, private_key: PrivateKey, alg: CoseAlg, kid: bytes | None
) -> cbor2.CBORTag:
    """COSE_Sign1 as a CBOR tag 18 object: [protected, {}, payload, signature].

    ES256 signatures are low-s (docs/protocol.md), so the token has one byte form."""
    protected = protected_header(alg, kid)
    signature = sign1_signature(protected, payload, private_key, alg)
    return cbor2.CBORTag(CoseTag.SIGN1, [protected, {}, payload, signature])


def sign1_signature(
    protected: bytes, payload: bytes, private_key: PrivateKey, alg: CoseAlg
) -> bytes:
    """The signature of a COSE_Sign1 with this protected header and payload (RFC 9052 §4.4;
    ES256 low-s). ValueError when the key is not one of `alg`."""
    to_sign = _sig_structure("Signature1", protected, payload)
    if alg == _ES256 and isinstance(private_key, ec.EllipticCurvePrivateKey):
        return es256.sign(private_key, to_sign)
    if alg == _EDDSA and isinstance(private_key, ed25519.Ed25519PrivateKey):
        return private_key.sign(to_sign)
    raise ValueError("key does not match algorithm")


def mac0(payload: bytes, key: bytes, kid: bytes | None) -> cbor2.CBORTag:
    """COSE_Mac0 with HMAC 256/64 as a CBOR tag 17 object."""
    protected = protected_header(CoseAlg.HMAC_256_64, kid)
    tag = _hmac_256_64(key, _sig_structure("MAC0", protected, payload))
    return cbor2.CBORTag(CoseTag.MAC0, [protected, {}, payload, tag])


def encrypt0(plaintext: bytes, key: bytes, kid: bytes, iv: bytes) -> cbor2.CBORTag:
    """COSE_Encrypt0 with AES-CCM-16-64-128 as a CBOR tag 16 object: [protected, {},
    ciphertext]. The IV goes in the protected header, so the unprotected header stays the
    empty map every canonical token has (docs/protocol.md "Canonical tokens"); `iv` must be
    CCM_NONCE_LEN random bytes, never reused under `key`."""
    if len(key) != CCM_KEY_LEN or len(iv) != CCM_NONCE_LEN:
        raise ValueError("AES-CCM-16-64-128 takes a 16-byte key and a 13-byte IV")
    header = {CoseHeader.ALG: CoseAlg.AES_CCM_16_64_128, CoseHeader.KID: kid, CoseHeader.IV: iv}
    protected = deterministic.dumps(header)
    ciphertext = AESCCM(key, tag_length=_CCM_TAG_LEN).encrypt(
        iv, plaintext, _enc_structure(protected)
    )
    return cbor2.CBORTag(CoseTag.ENCRYPT0, [protected, {}, ciphertext])


def decrypt0(message: CoseMessage, key: bytes) -> bytes:
    """The plaintext of a COSE_Encrypt0 under AES-CCM-16-64-128 with `key`; InvalidSignature
    when it is another algorithm or does not decrypt (wrong key, altered bytes)."""
    if message.tag != CoseTag.ENCRYPT0 or message.alg != CoseAlg.AES_CCM_16_64_128:
        raise InvalidSignature("algorithm not allowed for this key")
    iv = message.protected.get(CoseHeader.IV)
    if not isinstance(iv, bytes) or len(iv) != CCM_NONCE_LEN:
        raise MalformedToken("COSE_Encrypt0 needs a 13-byte IV in its protected header")
    if len(key) != CCM_KEY_LEN:
        raise InvalidSignature("algorithm not allowed for this key")
    try:
        return AESCCM(key, tag_length=_CCM_TAG_LEN).decrypt(
            iv, message.payload, _enc_structure(message.protected_bytes)
        )
    except InvalidTag:
        raise InvalidSignature("token does not decrypt") from None


def _enc_structure(protected: bytes) -> bytes:
    # RFC 9052 §5.3; external_aad is the empty byte string.
    return cbor2.dumps(["Encrypt0", protected, b""])


def decode(item: Any) -> CoseMessage:
    """Take apart a tag 16, 17 or 18 object (already CBOR-decoded) without verifying it.

    Checks the structure, that the protected header is a map in deterministic encoding, and
    `crit` (RFC 9052 §3.1): a non-empty array of labels present in the protected header, each
    one this verifier processes (PROCESSED_LABELS). The byte form of the whole token is the
    CWT layer's to check (`cwt.decode_cose`); use that for tokens."""
    if not isinstance(item, cbor2.CBORTag) or item.tag not in (
        CoseTag.SIGN1,
        CoseTag.MAC0,
        CoseTag.ENCRYPT0,
    ):
        raise MalformedToken("not a COSE_Sign1, COSE_Mac0 or COSE_Encrypt0 object")
    parts = item.value
    if item.tag == CoseTag.ENCRYPT0:
        if not isinstance(parts, list) or len(parts) != 3:
            raise MalformedToken("COSE_Encrypt0 must be an array of three")
        parts = [*parts, b""]
    elif not isinstance(parts, list) or len(parts) != 4:
        raise MalformedToken("COSE structure must be an array of four")
    protected_bytes, unprotected, payload, last = parts
    if not (
        isinstance(protected_bytes, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(last, bytes)
    ):
        raise MalformedToken("COSE structure has members of the wrong type")
    return message(CoseTag(item.tag), protected_bytes, unprotected, payload, last)


def message(
    tag: CoseTag,
    protected_bytes: bytes,
    unprotected: dict[Any, Any],
    payload: bytes,
    last: bytes,
) -> CoseMessage:
    """The checks of `decode` on a structure already taken apart (the CWT layer reads a
    canonical token's members straight from its bytes): the protected header and `crit`."""
    protected = _decode_header(protected_bytes)
    if unprotected and not all(_is_label(label) for label in unprotected):
        raise MalformedToken("COSE header labels must be integers or text strings")
    _check_crit(protected, unprotected)
    return CoseMessage(tag, protected_bytes, protected, unprotected, payload, last)


def verify_sign1(
    message: CoseMessage, public_key: PublicKey, alg: CoseAlg, *, low_s: bool = True
) -> None:
    """Check a COSE_Sign1 signature with the algorithm the key is registered for.

    ES256 signatures must be low-s: the high-s twin of a valid signature is refused, unless
    `low_s` is False (client assertions: single-use by their cti, so their form is no hash's
    business, and devices before issue 13 signed high-s half the time)."""
    if message.tag != _SIGN1 or message.alg != alg:
        raise InvalidSignature("algorithm not allowed for this key")
    signed = _sig_structure("Signature1", message.protected_bytes, message.payload)
    verify_signature(signed, message.tag_or_signature, public_key, alg, low_s=low_s)


def verify_signature(
    signed: bytes, signature: bytes, public_key: PublicKey, alg: CoseAlg, *, low_s: bool = True
) -> None:
    """The signature check of `verify_sign1`, on a Sig_structure already built (the CWT layer
    builds a canonical token's from its bytes) by a message whose alg is `alg`."""
    try:
        if alg == _ES256 and isinstance(public_key, ec.EllipticCurvePublicKey):
            if not (es256.is_canonical(signature) or (not low_s and len(signature) == 64)):
                raise InvalidSignature("ES256 signature must be 64 bytes with a low s")
            public_key.verify(es256.to_der(signature), signed, _ECDSA_SHA256)
        elif alg == _EDDSA and isinstance(public_key, ed25519.Ed25519PublicKey):
            # OpenSSL refuses S >= L (RFC 8032 §5.1.7), so EdDSA has one form already.
            public_key.verify(signature, signed)
        else:
            raise InvalidSignature("algorithm not allowed for this key")
    except _CryptoInvalidSignature:
        raise InvalidSignature("signature does not verify") from None


def verify_mac0(message: CoseMessage, key: bytes) -> None:
    if message.tag != CoseTag.MAC0 or message.alg != CoseAlg.HMAC_256_64:
        raise InvalidSignature("algorithm not allowed for this key")
    expected = _hmac_256_64(key, _sig_structure("MAC0", message.protected_bytes, message.payload))
    if not hmac.compare_digest(expected, message.tag_or_signature):
        raise InvalidSignature("MAC does not verify")


def _hmac_256_64(key: bytes, data: bytes) -> bytes:
    # RFC 9053 §3.1: HMAC 256/64 is HMAC-SHA-256 truncated to its first 64 bits.
    return hmac.new(key, data, sha256).digest()[:_MAC_64_LEN]


def _decode_header(protected_bytes: bytes) -> Mapping[Any, Any]:
    # RFC 9052 §3: an empty protected header is the zero-length byte string.
    if not protected_bytes:
        return {}
    header = deterministic.loads(protected_bytes, "protected header")
    if not isinstance(header, dict) or not header:
        raise MalformedToken("protected header must be a non-empty map")
    for label in header:
        # Exact ints (the usual labels) are labels; the rest takes the full check.
        if type(label) is not int and not _is_label(label):
            raise MalformedToken("COSE header labels must be integers or text strings")
    return header


def _check_crit(protected: Mapping[Any, Any], unprotected: Mapping[Any, Any]) -> None:
    """RFC 9052 §3.1: crit is protected, a non-empty array, and names protected labels; a
    label it names that we do not process makes the message one we must refuse."""
    if CRIT in unprotected:
        raise MalformedToken("crit must be in the protected header")
    if CRIT not in protected:
        return
    crit = protected[CRIT]
    if not isinstance(crit, list) or not crit:
        raise MalformedToken("crit must be a non-empty array")
    for label in crit:
        if not _is_label(label) or label not in protected:
            raise MalformedToken("crit names a label absent from the protected header")
        if label not in PROCESSED_LABELS:
            raise MalformedToken("crit names a header parameter this verifier does not process")


def _is_label(label: Any) -> bool:
    # RFC 9052 §1.4: label = int / tstr. (bool is an int to Python, not to CBOR.)
    return isinstance(label, str) or (isinstance(label, int) and not isinstance(label, bool))
