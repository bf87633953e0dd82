"""The token hash of RFC 9770 §4: the one function the TRL, /revoke and every verifier use."""

from __future__ import annotations

import base64
import hashlib

# Named Information Hash Algorithm Registry: 1 = sha-256.
SHA256_ID = 1


def token_hash(token: bytes) -> bytes:
    """docs/protocol.md: th = 0x01 || SHA-256(ascii(base64url_nopad(token bytes))), 33 bytes."""
    text = base64.urlsafe_b64encode(token).rstrip(b"=")
    return bytes([SHA256_ID]) + hashlib.sha256(text).digest()
