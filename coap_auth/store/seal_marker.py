"""What a data directory remembers outside the database: the schema version up to which its
store has been sealed, so a database that claims an older one is refused, not sealed again.

Threat (issue 13): with the database alone, put its schema back to before registry MACs
(`user_version = 2`, or `schema_version` and `audit_head` in PostgreSQL), add forged rows, and
the next start's migration would seal them under the master key. One marker file per store
(SQLite file, or PostgreSQL schema) next to the master key, written on every open that finds
or creates the sealed schema; every instance of a shared PostgreSQL keeps its own.
"""

from __future__ import annotations

import os
from pathlib import Path

from coap_auth.errors import OperatorError
from coap_auth.store.master_key import make_private

# The first schema that seals the registry (row MACs, the audit head).
FIRST_SEALED = 3
_PREFIX = "sealed-schema."


def refusal(db_version: int, sealed_version: int | None) -> str | None:
    """Why a migration from `db_version` may not run here (None: it may). Pure."""
    if sealed_version is None or db_version >= sealed_version:
        return None
    return (
        f"database claims schema v{db_version} but this data directory has sealed it"
        " before (downgrade?); put an older SQLite backup back with `coap-auth restore`,"
        " which checks it under the master key; for a PostgreSQL dump restored on purpose,"
        f" remove the {_PREFIX}* file in the data directory"
    )


def marker_path(data_dir: Path, store: str) -> Path:
    """`store` names the store in the data directory: "sqlite", or "postgres-<schema>"."""
    return data_dir / f"{_PREFIX}{store}"


def read_marker(path: Path | None) -> int | None:
    """The version recorded, None when there is no marker (or no data directory)."""
    if path is None:
        return None
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OperatorError(f"cannot read {path} ({exc.strerror or exc})") from None
    # Unreadable content is not "never sealed": refuse every sealing migration.
    return int(text) if text.isdigit() else 1 << 30


def write_marker(path: Path | None, version: int) -> None:
    """Record `version` (0600, fsynced, replaced atomically) unless it is recorded already."""
    if path is None:
        return
    recorded = read_marker(path)
    if recorded is not None and recorded >= version:
        make_private(path, 0o600)
        return
    part = path.with_name(path.name + ".part")
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{version}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise OperatorError(f"cannot write {path} ({exc.strerror or exc})") from None
