"""`coap-auth backup` and `coap-auth restore`: a consistent copy of the state, and putting
one back.

Both check a copy before anyone relies on it: SQLite's integrity check, then the audit chain,
its head and every registry row's MAC under the master key, and that every signing key
decrypts. The master key is never in a backup; the PostgreSQL store is backed up by pg_dump.
"""

from __future__ import annotations

import argparse
import copy
import hmac
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from coap_auth.cli import data_lock
from coap_auth.cli.registry import operator_actor
from coap_auth.cli.runtime import open_service
from coap_auth.clock import SystemClock
from coap_auth.config import Settings
from coap_auth.errors import OperatorError
from coap_auth.secure.provisioned import DIRECTORY as OSCORE_DIRECTORY
from coap_auth.service import AuthService
from coap_auth.store import ChainReport, MasterKey, SqliteStore, Store
from coap_auth.store import backup as copies
from coap_auth.store.master_key import ENV_VAR, FILE_NAME, KEY_BYTES, make_private
from coap_auth.store.sqlite import DB_FILE
from coap_auth.store.sqlite_schema import SCHEMA_VERSION

POSTGRES = (
    "back up the PostgreSQL store with `pg_dump --schema=SCHEMA` and restore it with psql or"
    " pg_restore (README: Backup and restore); backup and restore copy the SQLite store"
)
NO_MASTER_KEY = (
    "the master key is not in the backup: keep master.key (or COAP_AUTH_MASTER_KEY) apart from"
    " it; without that key the backup cannot be restored or read"
)
# Where a restore puts the copy while it is checked, inside the data directory.
STAGED = f".{DB_FILE}.restoring"


# -- backup -----------------------------------------------------------------------------------


async def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the SQLite store into FILE while it may be in use, check the copy, print what it
    holds; FILE appears (atomically) only once the copy has passed."""
    if settings.store:
        raise OperatorError(POSTGRES)
    data_dir = settings.data_dir
    database = data_dir / DB_FILE
    if not database.is_file():
        raise OperatorError(f"{data_dir} is not initialised: there is nothing to back up")
    target = _backup_target(args.file, data_dir, force=args.force)
    with data_lock.serving(data_dir):  # no restore replaces the database while it is read
        master_key = MasterKey.load(data_dir, create=False)
        # The copy is made in a directory of our own (0700, a fresh random name) beside the
        # target: a temporary file beside it in a shared directory could be swapped for
        # another user's symlink, which then received the copy.
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".coap-auth-backup-") as own:
            part = Path(own) / "copy.sqlite3"
            copies.write_copy(database, part)
            version = copies.check_copy(part)
            if version != SCHEMA_VERSION:
                raise OperatorError(
                    f"{database} has schema v{version}: run `coap-auth init` once to migrate"
                    " it, then back it up"
                )
            found = await _checked_copy(part, master_key, settings, f"the copy of {database}")
            os.replace(part, target)  # a symlink at the target is replaced, never followed
            copies.sync_directory(target.parent)
    print(f"backup written to {args.file}: {found.describe()}")
    print(NO_MASTER_KEY)
    return 0


def _backup_target(file: Path, data_dir: Path, *, force: bool) -> Path:
    """Where the backup goes: outside the data directory (a restore replaces what is in it,
    and a backup beside the database shares its disk's fate), new unless --force."""
    if not file.name or file.name in (".", ".."):
        raise OperatorError(f"{file} is not a file name")
    target = file.expanduser().parent.resolve() / file.name
    home = data_dir.resolve()
    if target == home or home in target.parents:
        raise OperatorError(f"{file} is inside the data directory {data_dir}: keep backups apart")
    if not target.parent.is_dir():
        raise OperatorError(f"{target.parent} is not a directory")
    mode = target.parent.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        # Anyone may rename or replace what is in it, the backup included.
        raise OperatorError(f"{target.parent} is writable by every user: keep backups elsewhere")
    if target.is_dir():
        raise OperatorError(f"{file} is a directory")
    if target.exists() and not force:
        raise OperatorError(f"{file} exists: give --force to replace it")
    return target


async def _checked_copy(
    path: Path, master_key: MasterKey, settings: Settings, shown: str
) -> copies.Contents:
    """Verify the copy at `path` read-only, as `audit verify` would, and count what it holds."""
    store = SqliteStore(path, master_key)
    await store.open_read_only()
    try:
        return await _verified(store, master_key, settings, shown)
    finally:
        await store.close()


async def _verified(
    store: Store, master_key: MasterKey, settings: Settings, shown: Path | str
) -> copies.Contents:
    service = AuthService(store, master_key, settings, SystemClock())
    report = await service.verify_audit()
    if not report.ok:
        raise OperatorError(f"{shown} does not verify: {report.problems()[0]}")
    return await copies.contents(service.store, report.chain, service.clock.now())


# -- restore ----------------------------------------------------------------------------------


async def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    """Put a backup in place as the data directory's database, under the exclusive lock (no
    `serve` may run on it meanwhile); a data directory made here is removed if it fails."""
    if settings.store:
        raise OperatorError(POSTGRES)
    if not args.file.is_file():
        raise OperatorError(f"{args.file} is not a file")
    data_dir = settings.data_dir
    fresh = not data_dir.exists()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    make_private(data_dir, 0o700)
    with data_lock.exclusive(data_dir):
        try:
            return await _restore(args, settings)
        except BaseException:
            if fresh:  # under the lock: a serve cannot have made anything of its own there
                shutil.rmtree(data_dir, ignore_errors=True)
            raise


async def _restore(args: argparse.Namespace, settings: Settings) -> int:
    data_dir, source = settings.data_dir, args.file
    database = data_dir / DB_FILE
    if database.exists() and not args.replace:
        raise OperatorError(
            f"{data_dir} holds a database already: give --replace to replace it (it is kept aside)"
        )
    master_key, new_key_file = _master_key(data_dir, args.master_key)
    staged = data_dir / STAGED
    _discard(staged)  # left by a restore that was killed
    now = SystemClock().now()
    try:
        copies.write_copy(source, staged)
        copies.check_copy(staged)
        # Checked in its own schema before anything migrates it: what a migration then seals
        # (the audit head of an older schema, the marker) was verified under the master key.
        backed_up = copies.audit_chain(staged, master_key)
        if not backed_up.ok:
            raise OperatorError(_refusal(source, backed_up))
        await _migrated_and_verified(staged, master_key, settings, source)
        if new_key_file is not None:
            _write_master_key(data_dir, new_key_file)
        copies.settle(staged)
        aside = copies.set_aside(database, now)
        copies.install(staged, data_dir)
    finally:
        _discard(staged)
    found = await _record_restore(settings, master_key, backed_up, now)
    print(f"restored {source} into {data_dir}: {found.describe()}")
    if aside is not None:
        print(f"the database it replaced is kept as {aside}")
    print(_oscore_note(data_dir))
    return 0


def _refusal(source: Path, chain: ChainReport) -> str:
    if chain.broken_at == 1 and chain.reason == "MAC does not match":
        return (
            f"{source} does not verify under this data directory's master key (its first audit"
            " entry's MAC does not match): wrong master key?"
        )
    if chain.broken_at is None and chain.entries == 0:
        return f"{source} does not verify under this data directory's master key: wrong key?"
    return f"{source} does not verify under this data directory's master key: {chain.describe()}"


async def _migrated_and_verified(
    staged: Path, master_key: MasterKey, settings: Settings, source: Path
) -> None:
    """Open the staged copy as a store (migrating a backup of an older schema to this one's),
    then verify it all: chain, head, registry MACs, revocations, and every key decrypts.
    Opened with the key detached from the data directory, so the sealed-schema marker there
    is neither consulted nor moved for a file that is not yet the data directory's."""
    detached = copy.copy(master_key)
    detached.home = None
    store = SqliteStore(staged, detached)
    await store.open()
    try:
        await _verified(store, detached, settings, source)
    finally:
        await store.close()


async def _record_restore(
    settings: Settings, master_key: MasterKey, backed_up: ChainReport, now: int
) -> copies.Contents:
    """Start the restored store as `serve` would (modes, WAL, the sealed-schema marker), record
    the restore in its audit log (a deliberate rollback is then visible there), verify it."""
    service = await open_service(settings)
    try:
        await service.admin.record_restore(backed_up.entries, backed_up.head_mac, operator_actor())
        return await _verified(service.store, master_key, settings, settings.data_dir / DB_FILE)
    finally:
        await service.store.close()


def _master_key(data_dir: Path, given: Path | None) -> tuple[MasterKey, bytes | None]:
    """The data directory's master key, and the bytes to write as its master.key (None: it
    has one already, or COAP_AUTH_MASTER_KEY gives it and it stays off the disk)."""
    has_key = (data_dir / FILE_NAME).exists() or bool(os.environ.get(ENV_VAR))
    if given is None:
        if not has_key:
            raise OperatorError(
                f"no master key for {data_dir}: give --master-key FILE (the master.key kept"
                f" apart from the backup) or set {ENV_VAR}"
            )
        return MasterKey.load(data_dir, create=False), None
    raw = given.read_bytes()
    if len(raw) != KEY_BYTES:
        raise OperatorError(f"{given} is not a master key ({KEY_BYTES} bytes)")
    key = MasterKey(raw, data_dir)
    if not has_key:
        return key, raw
    current = MasterKey.load(data_dir, create=False)
    label = b"coap-auth restore: the same master key?"
    if not hmac.compare_digest(current.derive(label), key.derive(label)):
        raise OperatorError(f"{given} is not the master key {data_dir} uses already")
    return current, None


def _write_master_key(data_dir: Path, raw: bytes) -> None:
    path = data_dir / FILE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(raw)
        out.flush()
        os.fsync(out.fileno())
    copies.sync_directory(data_dir)


def _discard(staged: Path) -> None:
    staged.unlink(missing_ok=True)
    copies.remove_side_files(staged)


def _oscore_note(data_dir: Path) -> str:
    """RFC 8613 Appendix B.1: a context copied back would send under sequence numbers
    already used, so nonces would repeat; contexts are never in a backup."""
    if (data_dir / OSCORE_DIRECTORY).is_dir():
        return (
            f"provisioned OSCORE contexts are never restored (a copy would reuse nonces):"
            f" {data_dir / OSCORE_DIRECTORY} is left as it was"
        )
    return (
        "provisioned OSCORE contexts are never restored (a copy would reuse nonces): provision"
        " each device that used one again with `coap-auth clients oscore ID`"
    )


def add_parsers(
    sub: Any, common: argparse.ArgumentParser, listing: argparse.ArgumentParser
) -> None:
    backup = sub.add_parser(
        "backup",
        parents=[common],
        help="copy the SQLite store into FILE while it runs, and check the copy",
    )
    backup.add_argument("file", type=Path, metavar="FILE", help="the backup (outside DATA_DIR)")
    backup.add_argument("--force", action="store_true", help="replace FILE if it exists")
    backup.set_defaults(command_fn=cmd_backup)

    restore = sub.add_parser(
        "restore",
        parents=[common],
        help="check a backup under the master key and make it the data directory's store",
    )
    restore.add_argument("file", type=Path, metavar="FILE", help="a file `coap-auth backup` made")
    restore.add_argument(
        "--replace",
        action="store_true",
        help="replace the data directory's database (kept aside as .replaced-<time>)",
    )
    restore.add_argument(
        "--master-key",
        type=Path,
        metavar="FILE",
        help="the master.key kept apart from the backup (copied into DATA_DIR, mode 0600)",
    )
    restore.set_defaults(command_fn=cmd_restore)
