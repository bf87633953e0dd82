"""The SQLite store refuses a database whose schema does what coap-auth's does not (attack
rounds 1 and 2 of issue 18): every edit below was accepted by an earlier check, and each
changes what the store's own writes do. Made with SQLite alone, as someone holding the
database (or a backup file) but not the master key would."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from coap_auth.errors import OperatorError
from coap_auth.store import MasterKey, SqliteStore
from coap_auth.store.sqlite import DB_FILE

UNSPEND = (
    " AFTER UPDATE OF spent_at ON refresh_tokens"
    " BEGIN UPDATE refresh_tokens SET spent_at = NULL WHERE digest = NEW.digest; END"
)
# Edits of the stored schema text (PRAGMA writable_schema): (object, old text, new text).
EDITS = {
    # The default of a column: every new access token born delisted, so a family's kill
    # never reaches the TRL.
    "column-default": ("access_tokens", "delisted_at INTEGER", "delisted_at INTEGER DEFAULT 0"),
    "collation": (
        "clients",
        "client_id TEXT PRIMARY KEY",
        "client_id TEXT PRIMARY KEY COLLATE NOCASE",
    ),
    "check-removed": (
        "clients",
        "CHECK ((secret_digest IS NULL) <> (public_key IS NULL))",
        "CHECK (1)",
    ),
    "without-rowid": ("change_feed", ")", ") WITHOUT ROWID"),
}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / DB_FILE


async def _open(tmp_path: Path) -> None:
    store = SqliteStore.in_data_dir(tmp_path, MasterKey.load(tmp_path, create=True))
    try:
        await store.open()
    finally:
        await store.close()


def _edit(database: Path, statement: str, *args: object) -> None:
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute(statement, args)


async def test_a_fresh_and_an_untouched_store_open(tmp_path: Path) -> None:
    await _open(tmp_path)
    await _open(tmp_path)  # the second open checks what the first made


@pytest.mark.parametrize("name", ["zz_unspend", "sqlite_unspend"])
async def test_a_trigger_is_refused_whatever_its_name(
    tmp_path: Path, database: Path, name: str
) -> None:
    """Round 2: a trigger named sqlite_* (written through writable_schema) passed, since
    SQLite's own objects were skipped by their prefix."""
    await _open(tmp_path)
    sql = f"CREATE TRIGGER {name}{UNSPEND}"
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute(
            "INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql)"
            " VALUES ('trigger', ?, 'refresh_tokens', 0, ?)",
            (name, sql),
        )
    with pytest.raises(OperatorError, match=f"trigger {name}"):
        await _open(tmp_path)


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
async def test_a_changed_table_definition_is_refused(
    tmp_path: Path, database: Path, edit: str
) -> None:
    await _open(tmp_path)
    table, old, new = EDITS[edit]
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        assert old in sql, (old, sql)
        changed = sql.replace(old, new) if old != ")" else sql[: sql.rfind(")") + 1] + new[1:]
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (changed, table))
    with pytest.raises(OperatorError, match=f"table {table} \\(definition\\)"):
        await _open(tmp_path)


async def test_an_index_made_unique_or_partial_is_refused(tmp_path: Path, database: Path) -> None:
    """Round 2: a UNIQUE index under an expected name (one refresh per family, then none)."""
    await _open(tmp_path)
    _edit(database, "DROP INDEX refresh_tokens_family")
    _edit(database, "CREATE UNIQUE INDEX refresh_tokens_family ON refresh_tokens (family_id)")
    with pytest.raises(OperatorError, match="index refresh_tokens_family"):
        await _open(tmp_path)
    _edit(database, "DROP INDEX refresh_tokens_family")
    _edit(database, "CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id) WHERE 0")
    with pytest.raises(OperatorError, match="index refresh_tokens_family"):
        await _open(tmp_path)
