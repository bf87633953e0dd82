"""What a coap-auth SQLite database may hold: exactly the tables, columns, constraints and
indexes its schema makes, and no trigger or view. Checked whenever the store opens."""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from coap_auth.store.sqlite_schema import SCHEMA

# SQLite's own objects, which it makes by itself (an autoindex for a UNIQUE or PRIMARY KEY,
# AUTOINCREMENT's counter, ANALYZE's statistics); any other "sqlite_" name is not its own.
_SQLITE_OWN = re.compile(r"sqlite_(autoindex_.+|sequence|stat[1-4])")


def unexpected_objects(conn: sqlite3.Connection) -> list[str]:
    """What the database holds beyond what SCHEMA makes, or differently: "trigger x",
    "view v", "table t", "index i", "table t (definition)".

    No MAC covers the schema, and someone with the database alone (or a restored file) could
    change what the store's writes do: a trigger un-spending refresh tokens (reuse never
    detected), a column DEFAULT marking new tokens delisted (kills never reach the TRL), a
    UNIQUE index, a collation. So every object is compared by what it does: columns with
    their types, defaults and generation, CHECK and COLLATE clauses, table options, and each
    index's columns, collations, uniqueness and WHERE clause. Text formatting is not compared,
    since migrations (ALTER TABLE) write a table's SQL differently from a fresh schema."""
    expected, found = _shape(_fresh()), _shape(conn)
    extra = [name for name in sorted(found.keys() - expected.keys())]
    missing = [name for name in sorted(expected.keys() - found.keys())]
    changed = [
        f"{name} (definition)"
        for name in sorted(found.keys() & expected.keys())
        if found[name] != expected[name]
    ]
    return extra + missing + changed


def active_objects(conn: sqlite3.Connection) -> list[str]:
    """The triggers and views: never made by coap-auth, and checked before a migration
    writes (a trigger would fire during it)."""
    rows = conn.execute("SELECT type, name FROM sqlite_master WHERE type IN ('trigger', 'view')")
    return [f"{kind} {name}" for kind, name in rows]


def _fresh() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    return conn


def _shape(conn: sqlite3.Connection) -> dict[str, Any]:
    shape: dict[str, Any] = {}
    objects = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    for kind, name, table, sql in objects:
        if _SQLITE_OWN.fullmatch(name) and (kind != "index" or sql is None):
            continue  # an autoindex is compared as part of its table, below
        if kind == "table":
            shape[f"table {name}"] = _table(conn, name, sql or "")
        elif kind == "index":
            shape[f"index {name}"] = (table, _index(conn, name), _normalised(sql or ""))
        else:
            shape[f"{kind} {name}"] = kind  # a trigger or a view: never expected
    return shape


def _table(conn: sqlite3.Connection, name: str, sql: str) -> Any:
    quoted = name.replace('"', '""')
    columns = frozenset(
        (c[1], c[2].upper(), c[3], c[4], c[5], c[6])  # name, type, notnull, default, pk, hidden
        for c in conn.execute(f'PRAGMA table_xinfo("{quoted}")')
    )
    autoindexes = frozenset(
        (row[2], row[3], _index(conn, row[1]))  # unique, origin (pk/u), what it indexes
        for row in conn.execute(f'PRAGMA index_list("{quoted}")')
        if row[3] != "c"  # made by the table's own constraints, not by CREATE INDEX
    )
    text = _normalised(sql)
    clauses = sorted(_clauses(text, "CHECK(")) + sorted(re.findall(r"COLLATE\w+", text))
    options = text[text.rfind(")") + 1 :]  # WITHOUT ROWID, STRICT
    return columns, autoindexes, tuple(clauses), options


def _index(conn: sqlite3.Connection, name: str) -> tuple[Any, ...]:
    quoted = name.replace('"', '""')
    return tuple(
        (c[2], c[3], c[4], c[5])  # column, descending, collation, key or included
        for c in conn.execute(f'PRAGMA index_xinfo("{quoted}")')
    )


def _normalised(sql: str) -> str:
    """Without white space or quotes, in capitals: two texts of one definition compare equal."""
    return re.sub(r"[\s\"`\[\]]", "", sql).upper()


def _clauses(text: str, opener: str) -> list[str]:
    """Every `opener(...)` clause of `text`, to its matching parenthesis."""
    found = []
    start = text.find(opener)
    while start != -1:
        depth, end = 0, start + len(opener) - 1
        for end in range(start + len(opener) - 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        found.append(text[start : end + 1])
        start = text.find(opener, end + 1)
    return found
