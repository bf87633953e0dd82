"""The token hash of RFC 9770 §4: the one function the TRL, /revoke and every verifier use."""

from __future__ import annotations

import binascii
import hashlib

# Named Information Hash Algorithm Registry: 1 = sha-256.
SHA256_ID = 1
_PREFIX = bytes([SHA256_ID])
# RFC 4648 §5: base64url is base64 with 62 and 63 written "-" and "_".
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def token_hash(token: bytes) -> bytes:
    """docs/protocol.md: th = 0x01 || SHA-256(ascii(base64url_nopad(token bytes))), 33 bytes."""
    # base64.urlsafe_b64encode, without its two layers of Python: every verification hashes.
    text = binascii.b2a_base64(token, newline=False).rstrip(b"=").translate(_TO_URLSAFE)
    return _PREFIX + hashlib.sha256(text).digest()
