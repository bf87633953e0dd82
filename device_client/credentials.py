"""How a device authenticates to the AS: a shared secret, or (preferred) its own key.

A `DeviceKey` signs a short-lived client assertion (docs/protocol.md), so no secret crosses the
network; a P-256 one is also the device's EDHOC credential for the protected channel
(docs/protocol.md "Protected channels"). Neither class shows its secret in repr.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from coap_auth.secure.credentials import CredentialError, EdhocIdentity, device_credential
from coap_auth.tokens import (
    Claims,
    PrivateKey,
    alg_for_key,
    cose_key_from_public,
    encode_cwt,
)
from coap_auth.wire import CLIENT_ASSERTION, AceParam
from device_client.errors import ChannelUnavailable

# docs/protocol.md: an assertion's exp is at most 300 s ahead; stay well inside it so a device
# clock a little ahead of the AS does not get refused.
ASSERTION_LIFETIME = 60
CTI_BYTES = 16


@dataclass(frozen=True, slots=True)
class SecretCredentials:
    """client_id + client_secret, exactly as `coap-auth clients add --secret` printed it.
    Raises nothing."""

    client_id: str
    secret: str = field(repr=False)

    def request_params(self, *, issuer: str, now: int) -> dict[Any, Any]:
        """The /token parameters that authenticate us: client_id and client_secret.
        Raises nothing."""
        return {AceParam.CLIENT_ID: self.client_id, AceParam.CLIENT_SECRET: self.secret}


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """The device's own P-256 or Ed25519 key, registered with `clients add --public-key`.
    Raises ValueError for a key of any other type."""

    client_id: str
    private_key: PrivateKey = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        alg_for_key(self.private_key)  # ValueError for anything but P-256 and Ed25519

    @classmethod
    def generate(cls, client_id: str, *, curve: str = "P-256") -> DeviceKey:
        """A new random key: P-256, or Ed25519 when `curve` is "Ed25519" (any other value
        means P-256). Raises nothing."""
        key: PrivateKey = (
            ed25519.Ed25519PrivateKey.generate()
            if curve == "Ed25519"
            else ec.generate_private_key(ec.SECP256R1())
        )
        return cls(client_id, key)

    @classmethod
    def from_pem(cls, client_id: str, pem: bytes) -> DeviceKey:
        """The key in an unencrypted PEM (PKCS#8 or traditional) private key. Raises
        ValueError when it is not one, or not P-256 or Ed25519."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ValueError("not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError("device key must be P-256 or Ed25519")
        return cls(client_id, key)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, for the device's own storage.
        Raises nothing."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        """What the operator registers: `coap-auth clients add ID --public-key FILE`.
        Raises nothing."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def kid(self) -> bytes:
        """A thumbprint of the public key: names the key in the assertion's header."""
        cose_key = cose_key_from_public(self.private_key.public_key())
        return hashlib.sha256(cbor2.dumps(cose_key, canonical=True)).digest()[:8]

    def assertion(self, *, issuer: str, now: int) -> bytes:
        """A client assertion: a tagged CWT signed with the device key (docs/protocol.md).

        iss = sub = client_id, aud = the AS's issuer id, a fresh cti (the AS refuses a cti
        it has seen before). Raises nothing.
        """
        claims = Claims(
            iss=self.client_id,
            sub=self.client_id,
            aud=issuer,
            exp=now + ASSERTION_LIFETIME,
            iat=now,
            cti=secrets.token_bytes(CTI_BYTES),
        )
        return encode_cwt(claims, self.private_key, alg_for_key(self.private_key), self.kid)

    def request_params(self, *, issuer: str, now: int) -> dict[Any, Any]:
        """The /token parameters that authenticate us: a fresh client assertion (see
        `assertion`). Raises nothing."""
        return {CLIENT_ASSERTION: self.assertion(issuer=issuer, now=now)}

    def edhoc_identity(self) -> EdhocIdentity:
        """This key as the device's EDHOC credential: a CCS naming `client_id`, built as the
        AS builds it from the registered public key. Raises ChannelUnavailable for an Ed25519
        key (cipher suite 2 is P-256) or an id too long for a credential."""
        if not isinstance(self.private_key, ec.EllipticCurvePrivateKey):
            raise ChannelUnavailable(
                f"{self.client_id}: EDHOC (cipher suite 2) needs a P-256 device key, not Ed25519"
            )
        try:
            return device_credential(self.client_id, self.private_key)
        except CredentialError as exc:
            raise ChannelUnavailable(f"{self.client_id}: {exc}") from None


Credentials = SecretCredentials | DeviceKey
