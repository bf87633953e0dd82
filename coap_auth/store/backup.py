"""Backups of the SQLite store: a consistent copy of a database in use, the checks a copy must
pass before anyone relies on it, and putting a checked copy in place of a data directory's.

Why not copy the file: in WAL mode the newest commits live in `coap-auth.sqlite3-wal` until a
checkpoint moves them, so a copy of the database file alone (or one taken while a commit is
half-written) misses them or is torn. SQLite's backup API reads through SQLite, WAL included.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coap_auth.errors import OperatorError
from coap_auth.store.audit import AuditSnapshot, ChainReport, verify_log
from coap_auth.store.base import Store
from coap_auth.store.master_key import MasterKey
from coap_auth.store.rows import AUDIT_COLUMNS, audit_entry_from_row
from coap_auth.store.sqlite import DB_FILE
from coap_auth.store.sqlite_schema import SCHEMA_VERSION, read_head, registry_digest_of

# The first schema whose audit head covers the registry rows (their ids and MACs): from it on,
# a copy can be checked under the master key before anything is migrated or sealed.
OLDEST_RESTORABLE = 4
# What SQLite may keep beside a database file. A stale -wal beside a new file would be
# replayed into it; -shm is only an index of the -wal.
SIDE_FILES = ("-wal", "-journal", "-shm")
_TABLES = frozenset({"audiences", "clients", "signing_keys", "refresh_families", "audit_log"})
_BUSY_MS = 5000


@dataclass(frozen=True, slots=True)
class Contents:
    """What a checked copy holds, for the one line `backup` and `restore` print."""

    clients: int
    audiences: int
    keys: int
    live_families: int
    audit_entries: int
    audit_head: bytes

    def describe(self) -> str:
        counts = (
            (self.clients, "client", "clients"),
            (self.audiences, "audience", "audiences"),
            (self.keys, "key", "keys"),
            (self.live_families, "live family", "live families"),
            (self.audit_entries, "audit entry", "audit entries"),
        )
        shown = ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)
        return f"{shown}; audit head {self.audit_head.hex()}"


async def contents(store: Store, chain: ChainReport, now: int) -> Contents:
    """Count what `store` holds; `chain` is its verified audit chain. Reading the keys decrypts
    their sealed private parts: a copy under another master key fails here too."""
    return Contents(
        clients=len(await store.list_clients()),
        audiences=len(await store.list_audiences()),
        keys=len(await store.load_keys()),
        live_families=len(await store.list_families(None, now)),
        audit_entries=chain.entries,
        audit_head=chain.head_mac,
    )


def write_copy(source: Path, destination: Path) -> None:
    """Copy the database at `source` into the new file `destination` (mode 0600, synced),
    as it stood at one instant, from a read-only connection of its own.

    One step of the backup API (all pages at once), not many small ones: a step sees one
    snapshot, and in WAL mode its read transaction blocks no writer, but a stepped copy starts
    over whenever another connection commits between two steps, so under steady grants it
    never ends (measured: 200k rows, 87 MB, 2 ms between commits; one step took 0.1-0.5 s
    while the writer kept committing, 1,000-page steps were still restarting after 10 s)."""
    fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    try:
        with _connection(source, read_only=True) as src, _connection(destination) as dst:
            src.backup(dst)
            # One self-contained file: no -wal beside it to lose on the way.
            dst.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.DatabaseError as exc:
        raise _unreadable(source, exc) from None
    sync_file(destination)


def check_copy(path: Path) -> int:
    """Refuse a file that is not a coap-auth database in good order; its schema version."""
    try:
        with _connection(path, read_only=True) as conn:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
            if problems != ["ok"]:
                raise OperatorError(f"{path} fails SQLite's integrity check: {problems[0]}")
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise _unreadable(path, exc) from None
    if not _TABLES <= tables:
        raise OperatorError(f"{path} is a SQLite database, but not a coap-auth one")
    if version > SCHEMA_VERSION:
        raise OperatorError(f"{path} has schema v{version}, newer than this coap-auth's")
    if version < OLDEST_RESTORABLE:
        raise OperatorError(
            f"{path} has schema v{version}: copies older than v{OLDEST_RESTORABLE} cannot be"
            " checked under the master key"
        )
    return version


def audit_chain(path: Path, master_key: MasterKey) -> ChainReport:
    """The audit chain of the copy at `path` checked under `master_key`, read in its own
    schema (any from OLDEST_RESTORABLE on), before a migration touches it: the entries, the
    head, and the registry rows' ids and MACs the head records."""
    try:
        with _connection(path, read_only=True) as conn:
            conn.execute("BEGIN")
            rows = conn.execute(f"SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq").fetchall()
            holds_data = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM signing_keys) OR EXISTS (SELECT 1 FROM clients)"
                " OR EXISTS (SELECT 1 FROM audiences)"
            ).fetchone()[0]
            snapshot = AuditSnapshot(
                tuple(audit_entry_from_row(row) for row in rows),
                read_head(conn),
                bool(holds_data),
                registry_digest_of(conn),
            )
    except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
        raise _unreadable(path, exc) from None
    return verify_log(master_key.audit_mac, snapshot)


def set_aside(database: Path, now: int) -> Path | None:
    """Move `database` and its -wal and -journal to `<name>.replaced-<UTC time>` (SQLite
    pairs them by name, so the copy kept aside opens whole) and drop its -shm; None when
    there is no database. No connection may be open on it (the caller holds the data
    directory exclusively)."""
    if not database.exists():
        remove_side_files(database)
        return None
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = database.with_name(f"{database.name}.replaced-{stamp}")
    for n in range(2, 100):
        if not any(aside.with_name(aside.name + s).exists() for s in ("", *SIDE_FILES)):
            break
        aside = database.with_name(f"{database.name}.replaced-{stamp}-{n}")
    # The side files first: a -wal left behind without its database would be replayed into
    # whatever file comes next under the name.
    for suffix in SIDE_FILES[:2]:
        side = database.with_name(database.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    remove_side_files(database)
    os.replace(database, aside)
    return aside


def remove_side_files(database: Path) -> None:
    for suffix in SIDE_FILES:
        database.with_name(database.name + suffix).unlink(missing_ok=True)


def settle(staged: Path) -> None:
    """Make the checked copy `staged` one durable file, ready to be renamed into place. Done
    before the old database is set aside: the time with no database in the directory is two
    renames long, not a journal change and an fsync of the whole file."""
    with _connection(staged) as conn:
        # Its WAL (left by the migration that checked it) goes into the file before it moves.
        conn.execute("PRAGMA journal_mode=DELETE")
    remove_side_files(staged)
    sync_file(staged)


def install(staged: Path, data_dir: Path) -> None:
    """Put the settled copy `staged` (in `data_dir`) in place as the data directory's
    database, durably; whatever was there has been set aside."""
    database = data_dir / DB_FILE
    remove_side_files(database)
    os.replace(staged, database)
    sync_directory(data_dir)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_directory(path: Path) -> None:
    """Make a rename in `path` survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _connection(path: Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    if read_only:
        # mode=ro: nothing done here can change the file, whoever else has it open.
        target, uri = f"{path.resolve().as_uri()}?mode=ro", True
    else:
        target, uri = str(path), False
    conn = sqlite3.connect(target, uri=uri, isolation_level=None, timeout=_BUSY_MS / 1000)
    conn.row_factory = sqlite3.Row  # rows are read by column name
    try:
        yield conn
    finally:
        conn.close()


def _unreadable(path: Path, exc: Exception) -> OperatorError:
    if isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorname == "SQLITE_NOTADB":
        return OperatorError(f"{path} is not a SQLite database")
    return OperatorError(f"cannot read {path} as a coap-auth database ({exc})")
