"""JWT access tokens (RFC 9068 `at+jwt`) through PyJWT, with the same keys and kids as CWTs.

Only ES256 and EdDSA are accepted, and only with the algorithm the key is registered for.
Only one text per token: three segments of unpadded, canonical base64url, ES256 low-s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import jwt as pyjwt

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens import es256
from coap_auth.tokens.claims import Claims
from coap_auth.tokens.cose_key import (
    JWS_ALG,
    PrivateKey,
    VerificationKey,
    b64url,
    b64url_decode,
    kid_text,
)
from coap_auth.wire import CoseAlg

TYP = "at+jwt"
MAX_JWT_BYTES = 8192

KeyLookup = Callable[[bytes], VerificationKey | None]

# RFC 7515 §7.1: header.payload.signature, each base64url without padding (§2).
_COMPACT = re.compile(rb"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def encode_jwt(claims: Claims, private_key: PrivateKey, alg: CoseAlg, kid: bytes) -> bytes:
    """The JWS compact serialization, as ASCII bytes (the access_token bstr of docs/protocol.md).

    PyJWT signs; an ES256 signature it returns high-s is replaced by its low-s twin."""
    headers = {"kid": kid_text(kid), "typ": TYP}
    text = pyjwt.encode(claims.to_jwt_dict(), private_key, algorithm=JWS_ALG[alg], headers=headers)
    if alg == CoseAlg.ES256:
        signing_input, _, signature = text.rpartition(".")
        text = signing_input + "." + b64url(es256.low_s(b64url_decode(signature)))
    return text.encode("ascii")


def verify_jwt(token: bytes, lookup: KeyLookup) -> Claims:
    """Verify form, signature and `typ`; claims are validated separately (`Claims.validate`).

    Refused before any key lookup (MalformedToken): anything but three segments of unpadded
    base64url in the strict alphabet with zero unused bits (decode then encode gives the
    same text), and an ES256 signature that is not 64 bytes with a low s."""
    if not isinstance(token, bytes) or len(token) > MAX_JWT_BYTES:
        raise MalformedToken("token too large or not bytes")
    if not _COMPACT.fullmatch(token):
        raise MalformedToken("not a JWS compact serialization of unpadded base64url")
    text = token.decode("ascii")
    encoded_header, encoded_payload, encoded_signature = text.split(".")
    try:
        # Only the header, to find the key: PyJWT's get_unverified_header would parse and
        # check the whole token, which pyjwt.decode below does again (bench/: ~20% of a
        # verification). Nothing here is trusted until pyjwt.decode has checked it all.
        header = json.loads(b64url_decode(encoded_header))
        signature = b64url_decode(encoded_signature)
        # PyJWT decodes the payload; here only its form counts.
        b64url_decode(encoded_payload)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedToken("not a JWS compact serialization") from None
    if not isinstance(header, dict):
        raise MalformedToken("not a JWS compact serialization")
    # RFC 9068 §4: the resource server must check typ to tell access tokens from other JWTs.
    if header.get("typ") not in (TYP, "application/at+jwt"):
        raise MalformedToken("JWT typ is not at+jwt")
    if header.get("alg") == JWS_ALG[CoseAlg.ES256] and not es256.is_canonical(signature):
        raise MalformedToken("ES256 signature must be 64 bytes with a low s")
    kid_hex = header.get("kid")
    try:
        kid = bytes.fromhex(kid_hex) if isinstance(kid_hex, str) else None
    except ValueError:
        kid = None
    key = lookup(kid) if kid is not None else None
    if key is None:
        raise InvalidSignature("unknown key id")
    try:
        payload = pyjwt.decode(
            text,
            key.public_key,
            algorithms=[JWS_ALG[key.alg]],
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "verify_iss": False,
            },
        )
    except pyjwt.InvalidSignatureError:
        raise InvalidSignature("signature does not verify") from None
    except pyjwt.InvalidAlgorithmError:
        raise InvalidSignature("algorithm not allowed for this key") from None
    except pyjwt.PyJWTError:
        raise MalformedToken("JWT does not decode") from None
    return Claims.from_jwt_dict(payload)
