"""The OSCORE profile of ACE (RFC 9203): the security context a client and a resource server
derive from the token's OSCORE_Input_Material and the nonces of the /authz-info exchange.

Both sides call `derive_context` with the same four inputs; only who sends with which id
differs (RFC 9203 §4.3): the client sends with ID2 (ace_server_recipientid, chosen by the RS)
and receives with ID1 (ace_client_recipientid, its own choice); the RS the other way round.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

import cbor2

from coap_auth.errors import MalformedToken
from coap_auth.secure.contexts import MAX_ID_BYTES, OscoreContext
from coap_auth.secure.credentials import PeerCredential
from coap_auth.wire import OscoreInput

# RFC 9203 §4.1/§4.2: 64-bit random nonces are RECOMMENDED; we send 8 bytes and accept
# 8 to 32 (a shorter one is not "very unlikely to have been used before").
NONCE_BYTES = 8
MIN_NONCE_BYTES, MAX_NONCE_BYTES = 8, 32
# The defaults RFC 8613 §3.2 gives and the only ones this side derives with.
_AEAD = {10, "AES-CCM-16-64-128"}
_HKDF = {-10, "HKDF SHA-256"}


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def check_nonce(nonce: Any, name: str) -> bytes:
    """A nonce from the other side, or MalformedToken naming it (never its value)."""
    if not isinstance(nonce, bytes) or not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise MalformedToken(f"{name} must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes")
    return nonce


def check_recipient_id(value: Any, name: str) -> bytes:
    """An OSCORE id from the other side: a byte string of at most 7 bytes (RFC 8613 §5 with
    a 13-byte nonce); the empty id is allowed."""
    if not isinstance(value, bytes) or len(value) > MAX_ID_BYTES:
        raise MalformedToken(f"{name} must be a byte string of at most {MAX_ID_BYTES} bytes")
    return value


def master_salt(material: Mapping[int, Any], nonce1: bytes, nonce2: bytes) -> bytes:
    """RFC 9203 §4.3: salt | N1 | N2, each as a CBOR byte string (head included). With no
    salt in the material the RFC is silent; like the authors' reference implementation
    (RISE ace-ucs), N1 | N2 alone. coap-auth always sends a salt."""
    salt = material.get(OscoreInput.SALT)
    prefix = cbor2.dumps(salt) if salt is not None else b""
    return prefix + cbor2.dumps(nonce1) + cbor2.dumps(nonce2)


def derive_context(
    material: Mapping[int, Any],
    nonce1: bytes,
    nonce2: bytes,
    *,
    sender_id: bytes,
    recipient_id: bytes,
    peer: PeerCredential,
    now: int = 0,
) -> OscoreContext:
    """The OSCORE context of RFC 9203 §4.3 from checked material (claims.check_oscore_input).
    Raises MalformedToken for what this side cannot derive with: an AEAD or HKDF other than
    the RFC 8613 defaults, or an ID Context (contextId; coap-auth never assigns one)."""
    if material.get(OscoreInput.ALG, 10) not in _AEAD:
        raise MalformedToken("OSCORE input material names an unsupported AEAD algorithm")
    if material.get(OscoreInput.HKDF, -10) not in _HKDF:
        raise MalformedToken("OSCORE input material names an unsupported HKDF")
    if OscoreInput.CONTEXT_ID in material:
        raise MalformedToken("OSCORE input material with a contextId is not supported")
    return OscoreContext(
        material[OscoreInput.MS],
        master_salt(material, nonce1, nonce2),
        sender_id=sender_id,
        recipient_id=recipient_id,
        peer=peer,
        now=now,
    )
