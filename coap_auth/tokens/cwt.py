"""CBOR Web Tokens (RFC 8392): `61(18(...))` signed and `61(17(...))` MACed, as PROTOCOL.md fixes.

Signature checking (`verify_cwt`) is separate from claim validation (`Claims.validate`).
"""

from __future__ import annotations

from collections.abc import Callable

import cbor2

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import cose
from coap_auth.tokens.claims import Claims
from coap_auth.tokens.cose_key import PrivateKey, VerificationKey
from coap_auth.wire import CoseAlg, CoseTag

KeyLookup = Callable[[bytes], VerificationKey | None]

# Generous for any token we issue (~200-300 bytes) and small enough to bound work.
MAX_TOKEN_BYTES = 8192


def encode_cwt(claims: Claims, private_key: PrivateKey, alg: CoseAlg, kid: bytes) -> bytes:
    """A signed CWT: tag 61 around COSE_Sign1, protected {1: alg, 4: kid}, unprotected {}."""
    payload = cbor2.dumps(claims.to_cwt_map())
    return cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, cose.sign1(payload, private_key, alg, kid)))


def encode_maced_cwt(claims: Claims, key: bytes, kid: bytes) -> bytes:
    """A MACed CWT (HMAC 256/64) for an audience that shares a symmetric key."""
    payload = cbor2.dumps(claims.to_cwt_map())
    return cbor2.dumps(cbor2.CBORTag(CoseTag.CWT, cose.mac0(payload, key, kid)))


def decode_cose(token: bytes) -> cose.CoseMessage:
    """Parse a CWT into its COSE message without verifying anything.

    The CWT tag 61 is optional on input (RFC 8392 §6: it may be omitted when the context
    says the data is a CWT); we always emit it.
    """
    if not isinstance(token, bytes) or len(token) > MAX_TOKEN_BYTES:
        raise MalformedToken("token too large or not bytes")
    try:
        item = cbor2.loads(token)
    except Exception:
        raise MalformedToken("token is not well-formed CBOR") from None
    if isinstance(item, cbor2.CBORTag) and item.tag == CoseTag.CWT:
        item = item.value
    return cose.decode(item)


def peek_kid(token: bytes) -> bytes | None:
    kid = decode_cose(token).kid
    return kid if isinstance(kid, bytes) else None


def verify_cwt(token: bytes, lookup: KeyLookup) -> Claims:
    """Verify a signed CWT against the key its kid names; return its (unvalidated) claims."""
    message = decode_cose(token)
    kid = message.kid
    key = lookup(kid) if isinstance(kid, bytes) else None
    if key is None:
        raise InvalidSignature("unknown key id")
    cose.verify_sign1(message, key.public_key, key.alg)
    return decode_claims(message.payload)


def verify_maced_cwt(token: bytes, key: bytes) -> Claims:
    message = decode_cose(token)
    cose.verify_mac0(message, key)
    return decode_claims(message.payload)


def decode_claims(payload: bytes) -> Claims:
    """The claims of a COSE payload, type-checked but neither verified nor validated."""
    try:
        decoded = cbor2.loads(payload)
    except Exception:
        raise MalformedToken("CWT payload is not CBOR") from None
    return Claims.from_cwt_map(decoded)
