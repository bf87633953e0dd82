"""A small COSE_Sign1 / COSE_Mac0 codec (RFC 9052 §4.2, §6.2) over cbor2 and cryptography.

Only what CWTs need: ES256, EdDSA and HMAC 256/64, one signer, empty external AAD.
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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens.cose_key import PrivateKey, PublicKey
from coap_auth.wire import CoseAlg, CoseHeader, CoseTag

_ES256_HALF = 32
_MAC_64_LEN = 8


@dataclass(frozen=True, slots=True)
class CoseMessage:
    """A decoded, not yet verified COSE_Sign1 or COSE_Mac0."""

    tag: CoseTag
    protected_bytes: bytes
    protected: Mapping[int, Any]
    unprotected: Mapping[int, Any]
    payload: bytes
    tag_or_signature: bytes

    @property
    def alg(self) -> Any:
        return self.protected.get(CoseHeader.ALG)

    @property
    def kid(self) -> Any:
        # RFC 9052 §3.1: kid may be protected or not; protected wins when both are present.
        return self.protected.get(CoseHeader.KID, self.unprotected.get(CoseHeader.KID))


def _protected_header(alg: CoseAlg, kid: bytes | None) -> bytes:
    header: dict[int, Any] = {CoseHeader.ALG: alg}
    if kid is not None:
        header[CoseHeader.KID] = kid
    return cbor2.dumps(header)


def _sig_structure(context: str, protected: bytes, payload: bytes) -> bytes:
    # RFC 9052 §4.4 / §6.3; external_aad is the empty byte string.
    return cbor2.dumps([context, protected, b"", payload])


def sign1(
    payload: bytes, private_key: PrivateKey, alg: CoseAlg, kid: bytes | None
) -> cbor2.CBORTag:
    """COSE_Sign1 as a CBOR tag 18 object: [protected, {}, payload, signature]."""
    protected = _protected_header(alg, kid)
    to_sign = _sig_structure("Signature1", protected, payload)
    if alg == CoseAlg.ES256 and isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private_key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(_ES256_HALF, "big") + s.to_bytes(_ES256_HALF, "big")
    elif alg == CoseAlg.EDDSA and isinstance(private_key, ed25519.Ed25519PrivateKey):
        signature = private_key.sign(to_sign)
    else:
        raise ValueError("key does not match algorithm")
    return cbor2.CBORTag(CoseTag.SIGN1, [protected, {}, payload, signature])


def mac0(payload: bytes, key: bytes, kid: bytes | None) -> cbor2.CBORTag:
    """COSE_Mac0 with HMAC 256/64 as a CBOR tag 17 object."""
    protected = _protected_header(CoseAlg.HMAC_256_64, kid)
    tag = _hmac_256_64(key, _sig_structure("MAC0", protected, payload))
    return cbor2.CBORTag(CoseTag.MAC0, [protected, {}, payload, tag])


def decode(item: Any) -> CoseMessage:
    """Take apart a tag 17 or 18 object (already CBOR-decoded) without verifying it."""
    if not isinstance(item, cbor2.CBORTag) or item.tag not in (CoseTag.SIGN1, CoseTag.MAC0):
        raise MalformedToken("not a COSE_Sign1 or COSE_Mac0 object")
    parts = item.value
    if not isinstance(parts, list) or len(parts) != 4:
        raise MalformedToken("COSE structure must be an array of four")
    protected_bytes, unprotected, payload, last = parts
    if not (
        isinstance(protected_bytes, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(last, bytes)
    ):
        raise MalformedToken("COSE structure has members of the wrong type")
    protected = _decode_header(protected_bytes)
    return CoseMessage(CoseTag(item.tag), protected_bytes, protected, unprotected, payload, last)


def verify_sign1(message: CoseMessage, public_key: PublicKey, alg: CoseAlg) -> None:
    """Check a COSE_Sign1 signature with the algorithm the key is registered for."""
    if message.tag != CoseTag.SIGN1 or message.alg != alg:
        raise InvalidSignature("algorithm not allowed for this key")
    signed = _sig_structure("Signature1", message.protected_bytes, message.payload)
    signature = message.tag_or_signature
    try:
        if alg == CoseAlg.ES256 and isinstance(public_key, ec.EllipticCurvePublicKey):
            if len(signature) != 2 * _ES256_HALF:
                raise InvalidSignature("ES256 signature must be 64 bytes")
            r = int.from_bytes(signature[:_ES256_HALF], "big")
            s = int.from_bytes(signature[_ES256_HALF:], "big")
            public_key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(hashes.SHA256()))
        elif alg == CoseAlg.EDDSA and isinstance(public_key, ed25519.Ed25519PublicKey):
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


def _decode_header(protected_bytes: bytes) -> Mapping[int, Any]:
    # RFC 9052 §3: an empty protected header is the zero-length byte string.
    if not protected_bytes:
        return {}
    try:
        header = cbor2.loads(protected_bytes)
    except Exception:
        raise MalformedToken("protected header is not CBOR") from None
    if not isinstance(header, dict):
        raise MalformedToken("protected header must be a map")
    return header
