"""Signing-key lifecycle (next -> active -> retiring -> removed, or revoked) and key-set export.

Pure: no storage, no clock. Every transition takes `now` and returns a new `KeyRing` with the
keys whose records changed; the store applies those atomically.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.errors import OperatorError
from coap_auth.tokens.cose_key import PrivateKey, VerificationKey
from coap_auth.wire import CoseAlg, CoseKeyParam, CoseKty

KID_BYTES = 8
HMAC_KEY_BYTES = 32
AES_KEY_BYTES = 16  # AES-CCM-16-64-128 (RFC 9053 §4.2)
# The family every audience signs with unless configured with its own.
DEFAULT_FAMILY = "default"
ALG_NAMES = {
    "ES256": CoseAlg.ES256,
    "EdDSA": CoseAlg.EDDSA,
    "HMAC256/64": CoseAlg.HMAC_256_64,
    # A coap_oscore audience's family: its tokens are encrypted for it (RFC 9203 §3.2).
    "AES-CCM-16-64-128": CoseAlg.AES_CCM_16_64_128,
}
# Algorithms whose keys are shared secrets: never published, exported to their audience.
SYMMETRIC_ALGS = (CoseAlg.HMAC_256_64, CoseAlg.AES_CCM_16_64_128)


class KeyState(StrEnum):
    NEXT = "next"  # published, not yet signing (pre-publication)
    ACTIVE = "active"  # signs every new token
    RETIRING = "retiring"  # published until the last token it signed has expired
    REMOVED = "removed"  # no token it signed can still be valid; private part destroyed
    REVOKED = "revoked"  # compromised: unpublished at once; private part destroyed


PUBLISHED = (KeyState.NEXT, KeyState.ACTIVE, KeyState.RETIRING)
ENDED = (KeyState.REMOVED, KeyState.REVOKED)

# The secret half of a key: an asymmetric private key, or the bytes of an HMAC key.
KeySecret = PrivateKey | bytes


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: bytes
    alg: CoseAlg
    state: KeyState
    # None once the key has ended (removed or revoked): its secret is destroyed.
    private_key: KeySecret | None = field(repr=False, compare=False)
    created_at: int
    family: str = DEFAULT_FAMILY
    activated_at: int | None = None
    retired_at: int | None = None
    # When a retiring key leaves the published set.
    retire_until: int | None = None
    ended_at: int | None = None

    @property
    def symmetric(self) -> bool:
        """A shared secret (HMAC or AES key): never published, exported to its audience."""
        return self.alg in SYMMETRIC_ALGS

    def verification_key(self) -> VerificationKey:
        if self.symmetric or self.private_key is None or isinstance(self.private_key, bytes):
            raise ValueError("only a live asymmetric key has a public verification key")
        return VerificationKey(self.kid, self.alg, self.private_key.public_key())

    def public_view(self) -> dict[str, Any]:
        """What listings show: never key material."""
        return {
            "kid": self.kid.hex(),
            "family": self.family,
            "alg": self.alg.name,
            "state": self.state.value,
            "created_at": self.created_at,
            "activated_at": self.activated_at,
            "retired_at": self.retired_at,
            "retire_until": self.retire_until,
            "ended_at": self.ended_at,
        }


def generate_key(
    alg: CoseAlg, now: int, state: KeyState = KeyState.NEXT, family: str = DEFAULT_FAMILY
) -> SigningKey:
    """A new key of `alg` with a random kid. Raises ValueError for an algorithm we have no
    keys for."""
    secret: KeySecret
    if alg == CoseAlg.ES256:
        secret = ec.generate_private_key(ec.SECP256R1())
    elif alg == CoseAlg.EDDSA:
        secret = ed25519.Ed25519PrivateKey.generate()
    elif alg == CoseAlg.HMAC_256_64:
        secret = secrets.token_bytes(HMAC_KEY_BYTES)
    elif alg == CoseAlg.AES_CCM_16_64_128:
        secret = secrets.token_bytes(AES_KEY_BYTES)
    else:
        raise ValueError(f"no signing keys for algorithm {alg!r}")
    return SigningKey(
        kid=secrets.token_bytes(KID_BYTES),
        alg=alg,
        state=state,
        private_key=secret,
        created_at=now,
        family=family,
        activated_at=now if state == KeyState.ACTIVE else None,
    )


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """When a family rotates (docs/protocol.md "Keys and rollover").

    period: seconds between scheduled rotations, or None for manual rotation only.
    lead: how long a key is published before it may sign.
    retire_after: how long a retired key stays published (the longest token lifetime of
    the family's audiences plus a leeway), so every token it signed can still be verified.
    """

    period: int | None
    lead: int
    retire_after: int


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys of one family, in every state."""

    keys: tuple[SigningKey, ...]
    family: str = DEFAULT_FAMILY

    @classmethod
    def initial(cls, alg: CoseAlg, now: int, family: str = DEFAULT_FAMILY) -> KeyRing:
        """A fresh ring: one active key and its published successor."""
        return cls(
            (
                generate_key(alg, now, KeyState.ACTIVE, family),
                generate_key(alg, now, KeyState.NEXT, family),
            ),
            family,
        )

    @property
    def active(self) -> SigningKey:
        for key in self.keys:
            if key.state == KeyState.ACTIVE:
                return key
        raise LookupError(f"no active signing key in family {self.family!r}")

    @property
    def next(self) -> SigningKey | None:
        return next((k for k in self.keys if k.state == KeyState.NEXT), None)

    @property
    def published(self) -> tuple[SigningKey, ...]:
        return tuple(k for k in self.keys if k.state in PUBLISHED)

    def find(self, kid: bytes) -> SigningKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def lookup(self, kid: bytes) -> VerificationKey | None:
        """The published asymmetric key with this kid: what a token may validly be signed with."""
        key = self.find(kid)
        if key is None or key.state not in PUBLISHED or key.symmetric:
            return None
        return key.verification_key()

    # -- schedule ---------------------------------------------------------------------------

    def rotation_due_at(self, policy: RotationPolicy) -> int | None:
        """When the next scheduled rotation may happen: a period after the last activation,
        and never before the next key has been published for the lead."""
        if policy.period is None:
            return None
        active = self.active
        due = (active.activated_at or active.created_at) + policy.period
        successor = self.next
        if successor is not None:
            due = max(due, successor.created_at + policy.lead)
        return due

    def next_change(self, policy: RotationPolicy) -> int | None:
        """The next moment the published set changes on its own (rotation or a removal)."""
        moments = [k.retire_until for k in self.keys if k.state == KeyState.RETIRING]
        moments.append(self.rotation_due_at(policy))
        due = [m for m in moments if m is not None]
        return min(due) if due else None

    def advance(self, now: int, policy: RotationPolicy) -> tuple[KeyRing, list[SigningKey]]:
        """Everything the schedule says is due at `now`: remove retiring keys whose tokens
        have all expired, and rotate when the period is over."""
        changed = [
            _ended(k, KeyState.REMOVED, now)
            for k in self.keys
            if k.state == KeyState.RETIRING and k.retire_until is not None and k.retire_until <= now
        ]
        ring = self._with(changed)
        due = ring.rotation_due_at(policy)
        if due is not None and due <= now:
            ring, rotated = ring.rotate(now, policy)
            changed += rotated
        return ring, changed

    # -- operator actions ---------------------------------------------------------------------

    def rotate(
        self, now: int, policy: RotationPolicy, *, force: bool = False
    ) -> tuple[KeyRing, list[SigningKey]]:
        """Promote next to active, retire the active key, publish a new next key.

        Refused while the next key has been published for less than the lead (a device
        might not have it yet), unless forced.
        """
        old_active = self.active
        successor = self.next
        if successor is None:
            raise OperatorError(f"family {self.family!r} has no published next key")
        ready_at = successor.created_at + policy.lead
        if now < ready_at and not force:
            published_for = now - successor.created_at
            raise OperatorError(
                f"next key {successor.kid.hex()} has been published for {published_for} s,"
                f" less than the {policy.lead} s lead; try again in {ready_at - now} s"
                " or use --force"
            )
        changed = [
            replace(
                old_active,
                state=KeyState.RETIRING,
                retired_at=now,
                retire_until=now + policy.retire_after,
            ),
            replace(successor, state=KeyState.ACTIVE, activated_at=now),
            generate_key(old_active.alg, now, KeyState.NEXT, self.family),
        ]
        return self._with(changed), changed

    def revoke(self, kid: bytes, now: int) -> tuple[KeyRing, list[SigningKey]]:
        """Compromise: the key leaves the published set at once.

        Revoking the active key promotes the next key at once (it is already published;
        signing on with a compromised key would be worse than a short lead). Revoking the
        next key publishes a fresh one.
        """
        key = self.find(kid)
        if key is None:
            raise OperatorError(f"no key {kid.hex()} in family {self.family!r}")
        if key.state in ENDED:
            raise OperatorError(f"key {kid.hex()} is already {key.state.value}")
        changed = [_ended(key, KeyState.REVOKED, now)]
        if key.state == KeyState.ACTIVE:
            successor = self.next
            assert successor is not None, "an active key always has a published next key"
            changed.append(replace(successor, state=KeyState.ACTIVE, activated_at=now))
        if key.state in (KeyState.ACTIVE, KeyState.NEXT):
            changed.append(generate_key(key.alg, now, KeyState.NEXT, self.family))
        return self._with(changed), changed

    def _with(self, changed: list[SigningKey]) -> KeyRing:
        by_kid = {k.kid: k for k in self.keys}
        by_kid.update({k.kid: k for k in changed})
        return KeyRing(tuple(by_kid.values()), self.family)


def _ended(key: SigningKey, state: KeyState, now: int) -> SigningKey:
    return replace(key, state=state, ended_at=now, private_key=None)


def rings_by_family(keys: Iterable[SigningKey]) -> dict[str, KeyRing]:
    grouped: dict[str, list[SigningKey]] = {}
    for key in keys:
        grouped.setdefault(key.family, []).append(key)
    return {family: KeyRing(tuple(members), family) for family, members in grouped.items()}


def cose_key_set(keys: Iterable[SigningKey]) -> bytes:
    """The COSE_KeySet (content format 102) of the published keys: a CBOR array of COSE_Keys."""
    return cbor2.dumps([k.verification_key().to_cose_key() for k in keys])


def jwks(keys: Iterable[SigningKey]) -> bytes:
    """The same set as a JWKS (RFC 7517 §5), same kids in their text form."""
    document: dict[str, Any] = {"keys": [k.verification_key().to_jwk() for k in keys]}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def symmetric_cose_key(key: SigningKey) -> dict[int, Any]:
    """The COSE_Key (kty 4) of an HMAC or AES key, {1: 4, 2: kid, 3: alg (4 or 10), -1: k},
    for provisioning its audience out of band. Raises ValueError for any other key."""
    if not key.symmetric or not isinstance(key.private_key, bytes):
        raise ValueError("not a live symmetric key")
    return {
        CoseKeyParam.KTY: CoseKty.SYMMETRIC,
        CoseKeyParam.KID: key.kid,
        CoseKeyParam.ALG: key.alg,
        CoseKeyParam.K: key.private_key,
    }
