"""Signing-key lifecycle (next -> active -> retiring -> removed, or revoked) and key-set export.

Pure: no storage, no clock. Every transition takes `now` and returns a new `KeyRing`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.tokens.cose_key import PrivateKey, VerificationKey
from coap_auth.wire import CoseAlg

KID_BYTES = 8


class KeyState(StrEnum):
    NEXT = "next"  # published, not yet signing (pre-publication)
    ACTIVE = "active"  # signs every new token
    RETIRING = "retiring"  # published until the last token it signed has expired
    REMOVED = "removed"  # no token it signed can still be valid
    REVOKED = "revoked"  # compromised: unpublished at once


PUBLISHED = (KeyState.NEXT, KeyState.ACTIVE, KeyState.RETIRING)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: bytes
    alg: CoseAlg
    state: KeyState
    private_key: PrivateKey = field(repr=False, compare=False)
    created_at: int
    activated_at: int | None = None
    # When a retiring key leaves the published set.
    retire_until: int | None = None

    def verification_key(self) -> VerificationKey:
        return VerificationKey(self.kid, self.alg, self.private_key.public_key())


def generate_key(alg: CoseAlg, now: int, state: KeyState = KeyState.NEXT) -> SigningKey:
    private_key: PrivateKey
    if alg == CoseAlg.ES256:
        private_key = ec.generate_private_key(ec.SECP256R1())
    elif alg == CoseAlg.EDDSA:
        private_key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"no signing keys for algorithm {alg!r}")
    activated = now if state == KeyState.ACTIVE else None
    return SigningKey(
        kid=secrets.token_bytes(KID_BYTES),
        alg=alg,
        state=state,
        private_key=private_key,
        created_at=now,
        activated_at=activated,
    )


@dataclass(frozen=True, slots=True)
class KeyRing:
    keys: tuple[SigningKey, ...]

    @classmethod
    def initial(cls, alg: CoseAlg, now: int) -> KeyRing:
        """A fresh ring: one active key and its published successor."""
        return cls((generate_key(alg, now, KeyState.ACTIVE), generate_key(alg, now)))

    @property
    def active(self) -> SigningKey:
        for key in self.keys:
            if key.state == KeyState.ACTIVE:
                return key
        raise LookupError("no active signing key")

    @property
    def next(self) -> SigningKey | None:
        return next((k for k in self.keys if k.state == KeyState.NEXT), None)

    @property
    def published(self) -> tuple[SigningKey, ...]:
        return tuple(k for k in self.keys if k.state in PUBLISHED)

    def lookup(self, kid: bytes) -> VerificationKey | None:
        """The published key with this kid: what a token may validly be signed with."""
        for key in self.published:
            if key.kid == kid:
                return key.verification_key()
        return None

    def rotate(self, now: int, max_token_lifetime: int) -> tuple[KeyRing, list[SigningKey]]:
        """Promote next to active, retire the active key, publish a new next key.

        The retiring key stays published until every token it signed has expired.
        Returns the new ring and the keys whose records changed.
        """
        old_active = self.active
        successor = self.next or generate_key(old_active.alg, now)
        changed = [
            replace(old_active, state=KeyState.RETIRING, retire_until=now + max_token_lifetime),
            replace(successor, state=KeyState.ACTIVE, activated_at=now),
            generate_key(old_active.alg, now),
        ]
        return self._with(changed), changed

    def _with(self, changed: list[SigningKey]) -> KeyRing:
        by_kid = {k.kid: k for k in self.keys}
        by_kid.update({k.kid: k for k in changed})
        return KeyRing(tuple(by_kid.values()))


def cose_key_set(keys: tuple[SigningKey, ...]) -> bytes:
    """The COSE_KeySet (content format 102) of the published keys: a CBOR array of COSE_Keys."""
    return cbor2.dumps([k.verification_key().to_cose_key() for k in keys])


def jwks(keys: tuple[SigningKey, ...]) -> bytes:
    """The same set as a JWKS (RFC 7517 §5), same kids in their text form."""
    document: dict[str, Any] = {"keys": [k.verification_key().to_jwk() for k in keys]}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")
