"""Pure token code: claims, the CWT (COSE) and JWT codecs, COSE_Key/JWK, the token hash.

No I/O and no clock: time is passed in. Usable on a device.
"""

from coap_auth.tokens.claims import Claims
from coap_auth.tokens.cose_key import (
    PrivateKey,
    PublicKey,
    VerificationKey,
    alg_for_key,
    compress_cose_key,
    cose_key_from_public,
    jwk_from_public,
    kid_text,
    public_key_from_cose,
    same_public_key,
)
from coap_auth.tokens.cwt import (
    decode_cose,
    encode_cwt,
    encode_maced_cwt,
    peek_kid,
    verify_cwt,
    verify_maced_cwt,
)
from coap_auth.tokens.jwt import encode_jwt, verify_jwt
from coap_auth.tokens.token_hash import token_hash

__all__ = [
    "Claims",
    "PrivateKey",
    "PublicKey",
    "VerificationKey",
    "alg_for_key",
    "compress_cose_key",
    "cose_key_from_public",
    "decode_cose",
    "encode_cwt",
    "encode_jwt",
    "encode_maced_cwt",
    "jwk_from_public",
    "kid_text",
    "peek_kid",
    "public_key_from_cose",
    "same_public_key",
    "token_hash",
    "verify_cwt",
    "verify_jwt",
    "verify_maced_cwt",
]
