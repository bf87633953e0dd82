"""What /introspect verifies of a token before it looks at our records: its signature, MAC or
encryption, under a published key of the asking audience's own key family."""

from __future__ import annotations

from coap_auth.errors import TokenError
from coap_auth.service.rollover import KeyRollover
from coap_auth.tokens import (
    Claims,
    decode_cose,
    verify_cwt,
    verify_jwt,
    verify_maced_cwt,
)
from coap_auth.tokens.cwt import decrypt_cwt
from coap_auth.wire import CoseAlg, CoseTag


def verified_claims(token: bytes, family: str, keys: KeyRollover) -> Claims | None:
    """Claims of a token signed, MACed or (coap_oscore) encrypted by a published key of
    `family`, else None."""
    try:
        if token[:1] == b"e":  # a JWS compact serialisation starts with base64url "ey"
            return verify_jwt(token, keys.lookup_in(family))
        message = decode_cose(token)
        if message.tag == CoseTag.ENCRYPT0:
            return decrypt_cwt(
                token, lambda kid: keys.secret_key(kid, family, CoseAlg.AES_CCM_16_64_128)
            )
        if message.tag == CoseTag.MAC0:
            kid = message.kid
            key = keys.mac_key(kid, family) if isinstance(kid, bytes) else None
            return None if key is None else verify_maced_cwt(token, key)
        return verify_cwt(token, keys.lookup_in(family))
    except TokenError:
        return None
