"""OSCORE contexts an operator provisions for a device that cannot run EDHOC (RFC 8613
Appendix B; libcoap's client, for one, has OSCORE but no EDHOC): `coap-auth clients oscore`.

Unlike an EDHOC-made context, such a context outlives the process, so RFC 8613 Appendix B.1
applies, and aiocoap's `FilesystemSecurityContext` does what it says:
- B.1.1: the sender sequence number is persisted ahead of use (in growing steps), so a
  restarted AS never reuses a nonce, even after a crash;
- B.1.2: after an unclean stop the replay window is unknown, and the first request under the
  context is answered 4.01 with an Echo option; the device repeats it with the Echo and the
  window restarts from there. After a clean stop the window is saved and restored.

A context lives in `<data dir>/oscore/<hex of the id>.<generation>/` (settings.json with the
secret, mode 0600; sequence.json; a lock file, so two processes never use one context at
once). It belongs to one AS instance: instances sharing a PostgreSQL store each need their own,
or EDHOC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiocoap import oscore

from coap_auth.secure.contexts import MAX_ID_BYTES
from coap_auth.secure.credentials import PeerCredential

if TYPE_CHECKING:
    import filelock

log = logging.getLogger("coap_auth.oscore")

DIRECTORY = "oscore"
SECRET_BYTES = 16
SALT_BYTES = 8
ID_BYTES = 3
AEAD_ALG = 10  # AES-CCM-16-64-128 (COSE), suite 2's
HKDF_ALG = -10  # HKDF SHA-256 (COSE)
_PEER_FILE = "peer.json"


class ProvisionedContext(oscore.FilesystemSecurityContext):
    """A persisted context and the registered id it was provisioned for."""

    # Set by aiocoap's FilesystemSecurityContext (untyped): its lock, None once released.
    lockfile: filelock.FileLock | None

    def __init__(self, basedir: Path, peer_id: str, registered_at: int | None = None) -> None:
        super().__init__(str(basedir))
        self.peer = PeerCredential(peer_id, None, registered_at)
        self.authenticated_claims = [peer_id]

    def __repr__(self) -> str:  # never the keys
        return f"<ProvisionedContext peer={self.peer.id!r} recipient_id={self.recipient_id.hex()}>"

    def close(self) -> None:
        """Save the sequence number and replay window and release the lock (a clean stop).
        A withdrawn context's directory is gone: nothing to save, and the lock goes with the
        object."""
        if self.lockfile is None:
            return
        try:
            self._destroy()
        except OSError:
            if self.lockfile is not None:
                self.lockfile.release()
                self.lockfile = None


def provision(data_dir: Path, peer_id: str, registered_at: int | None = None) -> dict[str, Any]:
    """Create a fresh context for `peer_id` (registered at `registered_at`: the row's
    created_at, which the context then answers for), withdrawing any it had; returns what the
    device needs, from the device's side (its sender id is our recipient id).

    Never touches a directory a running server may hold: each context is a new directory
    (`<hex of the id>.<generation>`), built under a hidden name and renamed into place whole;
    an older one is renamed out of the server's sight (`.withdrawn-...`), and deleted once no
    process holds its lock."""
    root = data_dir / DIRECTORY
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _operator_lock(root):
        return _provision(root, data_dir, peer_id, registered_at)


def _provision(
    root: Path, data_dir: Path, peer_id: str, registered_at: int | None
) -> dict[str, Any]:
    taken = {context.recipient_id for context in load_all(data_dir, lock=False).values()}
    # The AS's view; the device's is the mirror image (its sender id is our recipient id).
    as_recipient = _fresh_id(taken)
    as_sender = _fresh_id(taken | {as_recipient})
    settings = {
        "secret_hex": secrets.token_bytes(SECRET_BYTES).hex(),
        "salt_hex": secrets.token_bytes(SALT_BYTES).hex(),
        "sender-id_hex": as_sender.hex(),
        "recipient-id_hex": as_recipient.hex(),
    }
    building = root / f".building-{secrets.token_hex(4)}"
    building.mkdir(mode=0o700)
    peer = {"id": peer_id, "registered_at": registered_at}
    _write_private(building / _PEER_FILE, json.dumps(peer))
    _write_private(building / "settings.json", json.dumps(settings))
    _withdraw(root, peer_id)
    building.rename(root / f"{_name(peer_id)}.{secrets.token_hex(4)}")
    return {
        "peer": peer_id,
        "master_secret": settings["secret_hex"],
        "master_salt": settings["salt_hex"],
        "sender_id": as_recipient.hex(),
        "recipient_id": as_sender.hex(),
        "aead_alg": AEAD_ALG,
        "hkdf_alg": HKDF_ALG,
    }


def remove(data_dir: Path, peer_id: str) -> bool:
    """Withdraw `peer_id`'s provisioned context (a running server drops it at its next
    tick); whether there was one."""
    root = data_dir / DIRECTORY
    if not root.is_dir():
        return False
    with _operator_lock(root):
        return _withdraw(root, peer_id)


def _withdraw(root: Path, peer_id: str) -> bool:
    mine = [d for d in root.iterdir() if d.name.split(".")[0] == _name(peer_id)]
    for directory in mine:
        directory.rename(root / f".withdrawn-{directory.name}")
    _delete_withdrawn(root)
    return bool(mine)


@contextlib.contextmanager
def _operator_lock(root: Path) -> Iterator[None]:
    """One `clients oscore` at a time (two at once could leave two contexts for one id)."""
    import filelock

    with filelock.FileLock(str(root / ".operator.lock"), timeout=30):
        yield


def load_all(data_dir: Path, *, lock: bool = True) -> dict[str, Any]:
    """Every provisioned context under `data_dir`, by directory name (with `lock`, ready for
    use and locked; without, only read for their ids). One that does not load is logged and
    skipped."""
    root = data_dir / DIRECTORY
    if not root.is_dir():
        return {}
    return {name: context for name in names(root) if (context := load(root / name, lock=lock))}


def names(root: Path) -> list[str]:
    """The context directories in use (hidden ones are being built or withdrawn)."""
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())


def load(directory: Path, *, lock: bool = True) -> Any:
    """One context (None, logged, when it does not load)."""
    try:
        peer = json.loads((directory / _PEER_FILE).read_text())
        peer_id, registered_at = peer["id"], peer.get("registered_at")
        if lock:
            return ProvisionedContext(directory, peer_id, registered_at)
        settings = json.loads((directory / "settings.json").read_text())
        return _Ids(bytes.fromhex(settings["recipient-id_hex"]))
    except Exception as error:  # noqa: BLE001 (one bad directory must not stop the rest)
        log.error(
            "provisioned OSCORE context %s not loaded: %s", directory.name, type(error).__name__
        )
        return None


def _name(peer_id: str) -> str:
    return peer_id.encode("utf-8").hex()


def _delete_withdrawn(root: Path) -> None:
    """Delete withdrawn contexts no process holds any more (a server drops one at its next
    tick; whatever it still holds is deleted by a later provision or remove)."""
    import filelock

    for directory in root.iterdir():
        if not directory.name.startswith(".withdrawn-"):
            continue
        lock = filelock.FileLock(str(directory / "lock"))
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            continue
        try:
            for file in directory.iterdir():
                file.unlink()
            directory.rmdir()
        except OSError:
            pass
        finally:
            lock.release()


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
