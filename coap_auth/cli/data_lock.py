"""Who is using a data directory: every `serve` holds a shared lock on it while it runs, and
`restore` an exclusive one, so a restore never replaces the state under a running service."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from coap_auth.errors import OperatorError

LOCK_FILE = "coap-auth.lock"


@contextlib.contextmanager
def serving(data_dir: Path) -> Iterator[None]:
    """Held by `serve` for as long as it runs; several services may share a data directory.
    Raises OperatorError while a restore holds it."""
    with _locked(data_dir, fcntl.LOCK_SH, f"{data_dir} is being restored; try again after"):
        yield


@contextlib.contextmanager
def exclusive(data_dir: Path) -> Iterator[None]:
    """Held by `restore`; raises OperatorError while a `serve` runs on the directory."""
    with _locked(data_dir, fcntl.LOCK_EX, f"{data_dir} is in use by a running coap-auth serve"):
        yield


@contextlib.contextmanager
def _locked(data_dir: Path, mode: int, busy: str) -> Iterator[None]:
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OperatorError(
            f"cannot write in {data_dir} ({reason}): is the disk full or the directory read-only?"
        ) from None
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OperatorError(busy) from None
        yield  # closing the descriptor releases the lock, also when the process dies
    finally:
        os.close(fd)
