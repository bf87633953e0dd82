"""The AS's verification keys as a device holds them: a COSE_KeySet parsed into a lookup table.

Pure: no I/O. `KeySetWatcher` (watch.py) keeps one current by observing `/keys`. An audience
with its own symmetric keys (HMAC 256/64 for MACed tokens, AES-CCM-16-64-128 for the encrypted
tokens of the ACE OSCORE profile, RFC 9203) gets them out of band (`coap-auth keys export
FAMILY`, read with `KeySet.from_export`); they are never at /keys, and never shown in repr.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from coap_auth import untagged
from coap_auth.errors import CoapAuthError
from coap_auth.tokens import VerificationKey, kid_text
from coap_auth.wire import CoseAlg, CoseKeyParam, CoseKty

log = logging.getLogger("device_client.keyset")

# A key set of a few keys is ~100 bytes a key; this bounds the work a hostile answer can cause.
MAX_KEY_SET_BYTES = 16384
# RFC 9053 §3.1: HMAC keys shorter than the hash output weaken it.
MIN_SHARED_KEY_BYTES = 32
# RFC 9053 §4.2: AES-CCM-16-64-128 takes a 128-bit key, exactly.
ENCRYPTION_KEY_BYTES = 16


@dataclass(frozen=True, slots=True)
class KeySet:
    """Published verification keys by kid; each verifies only with the algorithm of its key.
    The constructor raises nothing; `from_export` and `from_cose_key_set` raise ValueError."""

    keys: tuple[VerificationKey, ...] = ()
    # kid -> HMAC 256/64 key (RFC 9053 §3.1), for COSE_Mac0 tokens of a symmetric audience.
    shared: Mapping[bytes, bytes] = field(default_factory=dict, repr=False, hash=False)
    # kid -> AES-CCM-16-64-128 key (RFC 9053 §4.2), for the COSE_Encrypt0 tokens of an
    # audience of the OSCORE profile (RFC 9203 §3.2: the token carries a master secret).
    encryption: Mapping[bytes, bytes] = field(default_factory=dict, repr=False, hash=False)

    @classmethod
    def from_export(cls, text: str | bytes) -> KeySet:
        """What `coap-auth keys export FAMILY` printed: a COSE_KeySet in base64url (padding
        optional, surrounding whitespace ignored). Raises ValueError when it is not one; the
        message never quotes the input."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise ValueError("exported key set is not base64url text") from None
        stripped = "".join(text.split())
        try:
            payload = base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
        except (binascii.Error, ValueError):
            raise ValueError("exported key set is not base64url text") from None
        return cls.from_cose_key_set(payload)

    @classmethod
    def from_cose_key_set(cls, payload: bytes) -> KeySet:
        """Parse content format 102 (RFC 9052 §7: COSE_KeySet = [+ COSE_Key]).

        Entries this device cannot use (another key type, no kid) are skipped. Raises
        ValueError for anything that is not a CBOR array of maps, or too large.
        """
        if len(payload) > MAX_KEY_SET_BYTES:
            raise ValueError("key set too large")
        try:
            items = untagged.loads(payload)
        except Exception:
            raise ValueError("key set is not well-formed CBOR") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise ValueError("key set must be a CBOR array of COSE_Key maps")
        keys: dict[bytes, VerificationKey] = {}
        shared: dict[bytes, bytes] = {}
        encryption: dict[bytes, bytes] = {}
        for item in items:
            if item.get(CoseKeyParam.KTY) == CoseKty.SYMMETRIC:
                kid, secret = item.get(CoseKeyParam.KID), item.get(CoseKeyParam.K)
                if not isinstance(kid, bytes) or not isinstance(secret, bytes):
                    continue
                alg = item.get(CoseKeyParam.ALG)
                if alg == CoseAlg.HMAC_256_64 and len(secret) >= MIN_SHARED_KEY_BYTES:
                    shared.setdefault(kid, secret)
                elif alg == CoseAlg.AES_CCM_16_64_128 and len(secret) == ENCRYPTION_KEY_BYTES:
                    encryption.setdefault(kid, secret)
                else:
                    log.debug("skipping a symmetric key this device cannot use")
                continue
            try:
                key = VerificationKey.from_cose_key(item)
            except (ValueError, CoapAuthError):
                log.debug("skipping a key this device cannot use")
                continue
            keys.setdefault(key.kid, key)
        return cls(tuple(keys.values()), shared, encryption)

    @property
    def kids(self) -> frozenset[bytes]:
        """The kids of the verification keys (not of the symmetric ones)."""
        return frozenset(k.kid for k in self.keys)

    def lookup(self, kid: bytes) -> VerificationKey | None:
        """The verification key named `kid`, or None. Raises nothing."""
        for key in self.keys:
            if key.kid == kid:
                return key
        return None

    def shared_key(self, kid: bytes) -> bytes | None:
        """The HMAC 256/64 key named `kid`, or None. Raises nothing."""
        return self.shared.get(kid)

    def encryption_key(self, kid: bytes) -> bytes | None:
        """The AES-CCM-16-64-128 key named `kid`, or None. Raises nothing."""
        return self.encryption.get(kid)

    async def refetch(self) -> bool:
        """A fixed set learns nothing new (the KeySource protocol of verify.py): False.
        Raises nothing."""
        return False

    def describe(self) -> str:
        """The kids in their text form (hex), for logs. Raises nothing."""
        return ", ".join(sorted(kid_text(k) for k in self.kids)) or "no keys"
