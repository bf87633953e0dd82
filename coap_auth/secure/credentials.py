"""EDHOC credentials: CWT Claims Sets holding a P-256 COSE_Key (RFC 9528 §3.5.2).

A credential is `{2: sub, 8: {1: COSE_Key}}` in deterministic CBOR, the COSE_Key
`{1: 2 (EC2), 2: kid, -1: 1 (P-256), -2: x, -3: y}`. Both ends build a registered device's
credential the same way from its id and public key, so a device may name it by reference
(ID_CRED `{4: kid}`) or send it by value (`{14: CCS}`); docs/protocol.md "Protected channels".

- sub is the registered id (client or audience id);
- kid is the UTF-8 id when it is at most MAX_KID_BYTES long, else the first 8 bytes of the
  SHA-256 of the public key's COSE encoding; only an id-named kid can be sent by reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from coap_auth.tokens.deterministic import dumps

# What lakers-python 0.6 takes as a kid (measured: 16 bytes works, 20 does not).
MAX_KID_BYTES = 16
# lakers-python 0.6 refuses a CCS much over this (measured: a 60-character sub works).
MAX_CCS_BYTES = 160
_KTY_EC2, _CRV_P256 = 2, 1
# What these credentials are for (RFC 9528): method 3 (static DH keys on both sides) with
# cipher suite 2 (AES-CCM-16-64-128, SHA-256, 8, P-256, ES256, AES-CCM-16-64-128, SHA-256).
EDHOC_METHOD = 3
EDHOC_SUITE = 2


class CredentialError(ValueError):
    """A credential that is not a CCS with a P-256 COSE_Key we can use."""


@dataclass(frozen=True, slots=True)
class EdhocCredential:
    """A CCS: its exact bytes (the MAC covers them), who it names and its key. Made by
    parse_credential or device_credential, which check it; the constructor itself checks
    nothing and raises nothing."""

    ccs: bytes
    subject: str
    kid: bytes
    x: bytes
    y: bytes

    @property
    def by_reference(self) -> bool:
        """Whether the peer can find it from its kid alone (the kid is the id)."""
        return self.kid == self.subject.encode("utf-8")

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The P-256 public key. Raises ValueError only for a credential built by hand whose
        point is not on the curve (parse_credential never makes one)."""
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(self.x, "big"), int.from_bytes(self.y, "big"), ec.SECP256R1()
        )
        return numbers.public_key()

    def document(self) -> dict[str, Any]:
        """The credential as `coap-auth edhoc-credential --json` shows it for provisioning
        (device_client.load_as_credential reads it back). Raises what `public_key` raises."""
        from cryptography.hazmat.primitives import serialization

        pem = self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "subject": self.subject,
            "method": EDHOC_METHOD,
            "cipher_suite": EDHOC_SUITE,
            "kid": self.kid.hex(),
            "ccs": self.ccs.hex(),
            "public_key_pem": pem.decode("ascii"),
        }

    def same_key(self, key: Any) -> bool:
        """Whether a registered key (a COSE_Key map, its EC2 point uncompressed or compressed,
        or a P-256 public key) is this credential's key. Raises nothing: anything else is not
        it."""
        if isinstance(key, ec.EllipticCurvePublicKey):
            numbers = key.public_numbers()
            return (
                isinstance(key.curve, ec.SECP256R1)
                and numbers.x.to_bytes(32, "big") == self.x
                and numbers.y.to_bytes(32, "big") == self.y
            )
        if not (
            isinstance(key, dict)
            and key.get(1) == _KTY_EC2
            and key.get(-1) == _CRV_P256
            and key.get(-2) == self.x
        ):
            return False
        y = key.get(-3)
        if isinstance(y, bool):
            # RFC 9053 §7.1.1: the sign bit, y's parity. The two points with this x have
            # y and p - y, one odd and one even (p is odd): the parity tells them apart.
            return len(self.y) == 32 and y == bool(self.y[-1] & 1)
        return bool(y == self.y)


@dataclass(frozen=True, slots=True)
class EdhocIdentity:
    """Our own side: a credential and its private key (never shown in repr)."""

    credential: EdhocCredential
    private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    @property
    def private_scalar(self) -> bytes:
        return self.private_key.private_numbers().private_value.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class PeerCredential:
    """Who the channel authenticated: the registered id, and the EDHOC credential that named
    it; None for an OSCORE context the operator provisioned for that id (RFC 8613 Appendix B,
    `coap-auth clients oscore`), where holding the master secret is the proof."""

    id: str
    credential: EdhocCredential | None
    # A provisioned context's registration: the created_at of the row it was provisioned
    # for, so that a client removed and added again under the id does not inherit it
    # (another instance may still hold it). None: not tied (EDHOC, or an older context).
    registered_at: int | None = None


def make_credential(subject: str, public_key: ec.EllipticCurvePublicKey) -> EdhocCredential:
    """The credential of `subject` with this P-256 key, as both ends build it."""
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CredentialError("EDHOC (cipher suite 2) needs a P-256 key")
    numbers = public_key.public_numbers()
    x, y = numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
    named = subject.encode("utf-8")
    kid = named if 0 < len(named) <= MAX_KID_BYTES else _thumbprint(x, y)
    cose_key = {1: _KTY_EC2, 2: kid, -1: _CRV_P256, -2: x, -3: y}
    ccs = dumps({2: subject, 8: {1: cose_key}})
    if len(ccs) > MAX_CCS_BYTES:
        raise CredentialError(f"an id of {len(named)} bytes makes a CCS too large for EDHOC")
    return EdhocCredential(ccs, subject, kid, x, y)


def device_credential(subject: str, private_key: ec.EllipticCurvePrivateKey) -> EdhocIdentity:
    """A device's (or the AS's) own EDHOC identity from its P-256 private key."""
    return EdhocIdentity(make_credential(subject, private_key.public_key()), private_key)


def parse_credential(ccs: bytes) -> EdhocCredential:
    """A CCS received by value; raises CredentialError unless it is one we can use."""
    from coap_auth import untagged

    try:
        claims = untagged.loads(ccs)
    except Exception:
        raise CredentialError("credential is not CBOR") from None
    if not isinstance(claims, dict) or set(claims) - {2, 8}:
        raise CredentialError("credential is not a CCS of sub and cnf")
    subject, cnf = claims.get(2), claims.get(8)
    if not isinstance(subject, str) or not isinstance(cnf, dict) or set(cnf) != {1}:
        raise CredentialError("credential has no sub or no cnf COSE_Key")
    key = cnf[1]
    if (
        not isinstance(key, dict)
        or key.get(1) != _KTY_EC2
        or key.get(-1) != _CRV_P256
        or not all(isinstance(key.get(label), bytes) for label in (2, -2, -3))
        or len(key[-2]) != 32
        or len(key[-3]) != 32
    ):
        raise CredentialError("credential key is not a P-256 COSE_Key with a kid")
    # Exactly the labels we build, in deterministic CBOR, byte for byte: lakers reads the key
    # it verifies with from these same bytes with a decoder of its own (lakers-python 0.6 takes
    # label 254, 0x18 0xFE, for -2), so anything it could read differently is refused.
    if set(key) != {1, 2, -1, -2, -3} or dumps({2: subject, 8: {1: key}}) != ccs:
        raise CredentialError("credential is not in the one accepted encoding")
    credential = EdhocCredential(ccs, subject, key[2], key[-2], key[-3])
    try:
        credential.public_key  # noqa: B018  (a point on the curve, or ValueError)
    except ValueError:
        raise CredentialError("credential key is not on P-256") from None
    return credential


def _thumbprint(x: bytes, y: bytes) -> bytes:
    return hashlib.sha256(dumps({1: _KTY_EC2, -1: _CRV_P256, -2: x, -3: y})).digest()[:8]
