"""What a coap-auth SQLite database may hold: exactly the tables, indexes and columns its
schema makes, and no trigger or view. Checked whenever the store opens (a restore too)."""

from __future__ import annotations

import sqlite3

from coap_auth.store.sqlite_schema import SCHEMA

# Shape: (type, name) -> the table's columns (name, declared type, not null, primary key),
# or the table an index belongs to.
Shape = dict[tuple[str, str], frozenset[tuple[str, str, int, int]] | str]


def unexpected_objects(conn: sqlite3.Connection) -> list[str]:
    """What the database holds beyond what SCHEMA makes, or differently: "trigger x",
    "view v", "table t", "index i", "table t (columns)". No MAC covers the schema, and a
    trigger in a restored file (or written by someone with the database alone) could undo what
    the store writes, for one un-spending refresh tokens so that reuse goes unnoticed."""
    expected, found = _shape(_fresh()), _shape(conn)
    extra = [f"{kind} {name}" for kind, name in sorted(found.keys() - expected.keys())]
    missing = [f"{kind} {name}" for kind, name in sorted(expected.keys() - found.keys())]
    changed = [
        f"{kind} {name} (columns)"
        for kind, name in sorted(found.keys() & expected.keys())
        if found[kind, name] != expected[kind, name]
    ]
    return extra + missing + changed


def _fresh() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    return conn


def _shape(conn: sqlite3.Connection) -> Shape:
    shape: Shape = {}
    objects = conn.execute("SELECT type, name, tbl_name FROM sqlite_master").fetchall()
    for kind, name, table in objects:
        if name.startswith("sqlite_"):  # SQLite's own (autoindexes, statistics); reserved
            continue
        if kind == "table":
            columns = conn.execute(f'PRAGMA table_info("{name}")').fetchall()
            shape[kind, name] = frozenset((c[1], c[2].upper(), c[3], c[5]) for c in columns)
        else:
            shape[kind, name] = table
    return shape
