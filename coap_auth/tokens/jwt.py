"""JWT access tokens (RFC 9068 `at+jwt`) through PyJWT, with the same keys and kids as CWTs.

Only ES256 and EdDSA are accepted, and only with the algorithm the key is registered for.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import jwt as pyjwt

from coap_auth.errors import InvalidSignature, MalformedToken
from coap_auth.tokens.claims import Claims
from coap_auth.tokens.cose_key import (
    JWS_ALG,
    PrivateKey,
    VerificationKey,
    b64url_decode,
    kid_text,
)
from coap_auth.wire import CoseAlg

TYP = "at+jwt"
MAX_JWT_BYTES = 8192

KeyLookup = Callable[[bytes], VerificationKey | None]


def encode_jwt(claims: Claims, private_key: PrivateKey, alg: CoseAlg, kid: bytes) -> bytes:
    """The JWS compact serialization, as ASCII bytes (the access_token bstr of PROTOCOL.md)."""
    headers = {"kid": kid_text(kid), "typ": TYP}
    text = pyjwt.encode(claims.to_jwt_dict(), private_key, algorithm=JWS_ALG[alg], headers=headers)
    return text.encode("ascii")


def verify_jwt(token: bytes, lookup: KeyLookup) -> Claims:
    """Verify signature and `typ`; claims are validated separately with `Claims.validate`."""
    if not isinstance(token, bytes) or len(token) > MAX_JWT_BYTES:
        raise MalformedToken("token too large or not bytes")
    try:
        text = token.decode("ascii")
        # Only the header, to find the key: PyJWT's get_unverified_header would parse and
        # check the whole token, which pyjwt.decode below does again (bench/: ~20% of a
        # verification). Nothing here is trusted until pyjwt.decode has checked it all.
        header = json.loads(b64url_decode(text.split(".", 1)[0]))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedToken("not a JWS compact serialization") from None
    if not isinstance(header, dict):
        raise MalformedToken("not a JWS compact serialization")
    # RFC 9068 §4: the resource server must check typ to tell access tokens from other JWTs.
    if header.get("typ") not in (TYP, "application/at+jwt"):
        raise MalformedToken("JWT typ is not at+jwt")
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
