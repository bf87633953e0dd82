"""OSCORE contexts an operator provisions for a device that cannot run EDHOC (RFC 8613
Appendix B; libcoap's client, for one, has OSCORE but no EDHOC): `coap-auth clients oscore`.

Unlike an EDHOC-made context, such a context outlives the process, so RFC 8613 Appendix B.1
applies, and aiocoap's `FilesystemSecurityContext` does what it says:
- B.1.1: the sender sequence number is persisted ahead of use (in growing steps), so a
  restarted AS never reuses a nonce, even after a crash;
- B.1.2: after an unclean stop the replay window is unknown, and the first request under the
  context is answered 4.01 with an Echo option; the device repeats it with the Echo and the
  window restarts from there. After a clean stop the window is saved and restored.

A context lives in `<data dir>/oscore/<name>/` (settings.json with the secret, mode 0600;
sequence.json; a lock file, so two processes never use one context at once). It belongs to
one AS instance: instances sharing a PostgreSQL store each need their own, or EDHOC.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from aiocoap import oscore

from coap_auth.secure.contexts import MAX_ID_BYTES
from coap_auth.secure.credentials import PeerCredential

log = logging.getLogger("coap_auth.oscore")

DIRECTORY = "oscore"
SECRET_BYTES = 16
SALT_BYTES = 8
ID_BYTES = 3
_PEER_FILE = "peer.json"


class ProvisionedContext(oscore.FilesystemSecurityContext):  # type: ignore[misc]
    """A persisted context and the registered id it was provisioned for."""

    def __init__(self, basedir: Path, peer_id: str) -> None:
        super().__init__(str(basedir))
        self.peer = PeerCredential(peer_id, None)
        self.authenticated_claims = [peer_id]

    def __repr__(self) -> str:  # never the keys
        return f"<ProvisionedContext peer={self.peer.id!r} recipient_id={self.recipient_id.hex()}>"

    def close(self) -> None:
        """Save the sequence number and replay window and release the lock (a clean stop)."""
        if self.lockfile is not None:
            self._destroy()


def context_directory(data_dir: Path, peer_id: str) -> Path:
    """Where the context of `peer_id` lives (the id hex-encoded: any id is a safe name)."""
    return data_dir / DIRECTORY / peer_id.encode("utf-8").hex()


def provision(data_dir: Path, peer_id: str, taken: set[bytes]) -> dict[str, Any]:
    """Create a fresh context for `peer_id` (replacing any it had); returns what the device
    needs, from the device's side (its sender id is our recipient id)."""
    directory = context_directory(data_dir, peer_id)
    for used in load_all(data_dir, lock=False):
        taken |= {used.recipient_id}
    # The AS's view; the device's is the mirror image (its sender id is our recipient id).
    as_recipient = _fresh_id(taken)
    as_sender = _fresh_id(taken | {as_recipient})
    settings = {
        "secret_hex": secrets.token_bytes(SECRET_BYTES).hex(),
        "salt_hex": secrets.token_bytes(SALT_BYTES).hex(),
        "sender-id_hex": as_sender.hex(),
        "recipient-id_hex": as_recipient.hex(),
    }
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in ("sequence.json", "lock"):
        (directory / stale).unlink(missing_ok=True)
    _write_private(directory / "settings.json", json.dumps(settings))
    _write_private(directory / _PEER_FILE, json.dumps({"id": peer_id}))
    return {
        "peer": peer_id,
        "master_secret": settings["secret_hex"],
        "master_salt": settings["salt_hex"],
        "sender_id": as_recipient.hex(),
        "recipient_id": as_sender.hex(),
        "aead_alg": 10,
        "hkdf_alg": -10,
    }


def remove(data_dir: Path, peer_id: str) -> bool:
    """Delete `peer_id`'s provisioned context; whether there was one."""
    directory = context_directory(data_dir, peer_id)
    if not directory.is_dir():
        return False
    for file in directory.iterdir():
        file.unlink()
    directory.rmdir()
    return True


def load_all(data_dir: Path, *, lock: bool = True) -> list[Any]:
    """Every provisioned context under `data_dir` (with `lock`, ready for use and locked;
    without, only read for their ids). A context that does not load is logged and skipped."""
    root = data_dir / DIRECTORY
    if not root.is_dir():
        return []
    found: list[Any] = []
    for directory in sorted(root.iterdir()):
        try:
            peer_id = json.loads((directory / _PEER_FILE).read_text())["id"]
            if lock:
                found.append(ProvisionedContext(directory, peer_id))
            else:
                settings = json.loads((directory / "settings.json").read_text())
                found.append(_Ids(bytes.fromhex(settings["recipient-id_hex"])))
        except Exception as error:  # noqa: BLE001 (one bad directory must not stop the rest)
            log.error(
                "provisioned OSCORE context %s not loaded: %s", directory.name, type(error).__name__
            )
    return found


class _Ids:
    def __init__(self, recipient_id: bytes) -> None:
        self.recipient_id = recipient_id


def _fresh_id(taken: set[bytes]) -> bytes:
    while True:
        candidate = secrets.token_bytes(ID_BYTES)
        if candidate not in taken and len(candidate) <= MAX_ID_BYTES:
            return candidate


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
