"""The master key, kept outside the database: seals private keys, keys secret digests and MACs
the audit chain and the registry rows, each under a key of its own derived from it.

Taken from COAP_AUTH_MASTER_KEY (base64url, 32 bytes) or `master.key` in the data directory,
generated with mode 0600 when absent (and put back to 0600 when found otherwise).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coap_auth.errors import OperatorError

ENV_VAR = "COAP_AUTH_MASTER_KEY"
FILE_NAME = "master.key"
KEY_BYTES = 32
_NONCE_BYTES = 12


class MasterKey:
    def __init__(self, key: bytes, home: Path | None = None) -> None:
        if len(key) != KEY_BYTES:
            raise OperatorError("master key must be 32 bytes")
        # The data directory it was loaded for: what the stores remember there outside the
        # database (coap_auth.store.seal_marker). None: a key given without one (tests).
        self.home = home
        self._aead = AESGCM(hashlib.sha256(b"coap-auth key encryption" + key).digest())
        self._digest_key = hashlib.sha256(b"coap-auth secret digest" + key).digest()
        self._audit_key = hashlib.sha256(b"coap-auth audit chain" + key).digest()
        self._registry_key = hashlib.sha256(b"coap-auth registry rows" + key).digest()
        self._derive_key = hashlib.sha256(b"coap-auth derived keys" + key).digest()

    def __repr__(self) -> str:
        return "MasterKey(<hidden>)"

    @classmethod
    def load(cls, data_dir: Path, *, create: bool) -> MasterKey:
        """The environment variable wins; else the key file, created if asked to."""
        from_env = os.environ.get(ENV_VAR)
        if from_env:
            try:
                raw = base64.urlsafe_b64decode(from_env + "=" * (-len(from_env) % 4))
                return cls(raw, data_dir)
            except ValueError:
                raise OperatorError(f"{ENV_VAR} is not base64url of 32 bytes") from None
        path = data_dir / FILE_NAME
        if path.exists():
            make_private(path, 0o600)
            return cls(path.read_bytes(), data_dir)
        if not create:
            raise OperatorError(f"no master key: set {ENV_VAR} or run `coap-auth init`")
        key = secrets.token_bytes(KEY_BYTES)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        return cls(key, data_dir)

    def encrypt(self, plaintext: bytes, context: bytes) -> bytes:
        """AES-256-GCM; `context` (e.g. the kid) is bound as associated data."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context)

    def decrypt(self, sealed: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], context)
        except InvalidTag:
            raise OperatorError("stored key does not decrypt: wrong master key?") from None

    def audit_mac(self, data: bytes) -> bytes:
        """The MAC of the audit chain, under its own key derived from the master key."""
        return hmac.new(self._audit_key, data, hashlib.sha256).digest()

    def registry_mac(self, data: bytes) -> bytes:
        """The MAC of a client or audience row (coap_auth.store.registry_mac), under its own
        key derived from the master key."""
        return hmac.new(self._registry_key, data, hashlib.sha256).digest()

    def derive(self, label: bytes) -> bytes:
        """32 bytes for a purpose of its own (`label`), from the master key: the same on every
        instance that shares it, and nothing about the master key or any other label."""
        return hmac.new(self._derive_key, label, hashlib.sha256).digest()

    def digest(self, secret: bytes) -> bytes:
        """The keyed digest under which a client secret or refresh token is stored."""
        return hmac.new(self._digest_key, secret, hashlib.sha256).digest()


def make_private(path: Path, mode: int) -> None:
    """Give a file or directory of ours `mode` (0600, 0700) unless it has it already, so a
    correct file on a read-only disk is left alone and only a wrong one fails."""
    if path.stat().st_mode & 0o7777 == mode:
        return
    try:
        path.chmod(mode)
    except OSError as exc:
        raise OperatorError(
            f"cannot restrict {path} to mode {mode:04o} ({exc.strerror or exc})"
        ) from None
