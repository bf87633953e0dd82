"""The SQLite schema and its migrations.

`PRAGMA user_version` numbers the schema; `migrate` brings any older file up to date in one
transaction, sealing the registry rows and the audit head under the master key as it goes
(unless the data directory says it was sealed before: a downgrade, see seal_marker).
"""

from __future__ import annotations

import sqlite3

import cbor2

from coap_auth.errors import OperatorError
from coap_auth.store.audit import (
    GENESIS,
    AuditEntry,
    AuditHead,
    migration_plan,
    reseal_plan,
    sealed_head,
    upgrade_plan,
)
from coap_auth.store.master_key import MasterKey
from coap_auth.store.registry_mac import (
    EMPTY_REGISTRY,
    registry_digest,
)
from coap_auth.store.rows import (
    AUDIT_COLUMNS,
    REGISTRY_IDS,
    REGISTRY_TABLES,
    TRL_UPDATE_COLUMNS,
    audit_entry_to_row,
    seals,
)
from coap_auth.store.seal_marker import refusal
from coap_auth.store.trl_history import REQUESTER_UPDATE_COLUMNS, attributed_history

SCHEMA_VERSION = 7

SCHEMA = """
CREATE TABLE audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime INTEGER NOT NULL CHECK (lifetime > 0),
    created_at INTEGER NOT NULL,
    key_family TEXT NOT NULL DEFAULT 'default',
    key_alg TEXT,
    introspect_secret_digest BLOB,
    introspect_public_key BLOB,
    profile TEXT NOT NULL DEFAULT 'bearer'
        CHECK (profile IN ('bearer', 'coap_oscore', 'edhoc_oscore')),
    mac BLOB
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BLOB,
    public_key BLOB,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    mac BLOB,
    previous_secret_digest BLOB,
    previous_secret_until INTEGER,
    CHECK ((secret_digest IS NULL) <> (public_key IS NULL))
);
CREATE TABLE signing_keys (
    kid BLOB PRIMARY KEY,
    alg INTEGER NOT NULL,
    state TEXT NOT NULL,
    private_key BLOB,
    created_at INTEGER NOT NULL,
    activated_at INTEGER,
    retire_until INTEGER,
    family TEXT NOT NULL DEFAULT 'default',
    retired_at INTEGER,
    ended_at INTEGER
);
CREATE TABLE assertion_replay (
    client_id TEXT NOT NULL,
    cti BLOB NOT NULL,
    exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, cti)
);
CREATE TABLE refresh_families (
    family_id BLOB PRIMARY KEY,
    client_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    scope TEXT NOT NULL,
    cnf BLOB,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    killed_at INTEGER,
    kill_reason TEXT
);
CREATE INDEX refresh_families_client ON refresh_families (client_id);
CREATE TABLE refresh_tokens (
    digest BLOB PRIMARY KEY,
    family_id BLOB NOT NULL REFERENCES refresh_families (family_id),
    issued_at INTEGER NOT NULL,
    spent_at INTEGER,
    successor BLOB
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE TABLE access_tokens (
    token_hash BLOB PRIMARY KEY,
    family_id BLOB REFERENCES refresh_families (family_id),
    client_id TEXT NOT NULL,
    exp INTEGER NOT NULL,
    revoked_at INTEGER,
    delisted_at INTEGER,
    audience TEXT
);
CREATE INDEX access_tokens_family ON access_tokens (family_id);
CREATE INDEX access_tokens_exp ON access_tokens (exp);
CREATE INDEX access_tokens_listed_client ON access_tokens (client_id)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
CREATE INDEX access_tokens_listed_audience ON access_tokens (audience)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
CREATE TABLE change_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    counter INTEGER NOT NULL,
    revocations INTEGER NOT NULL DEFAULT 0
);
INSERT INTO change_feed (id, counter) VALUES (1, 0);
CREATE TABLE trl_updates (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    removed BLOB NOT NULL,
    added BLOB NOT NULL
);
CREATE TABLE trl_requester_updates (
    requester TEXT NOT NULL,
    seq INTEGER NOT NULL,
    trl_seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    removed BLOB NOT NULL,
    added BLOB NOT NULL,
    PRIMARY KEY (requester, seq)
);
CREATE INDEX trl_requester_updates_trl_seq ON trl_requester_updates (trl_seq);
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    mac BLOB NOT NULL
);
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    last_mac BLOB NOT NULL,
    mac BLOB NOT NULL,
    registry BLOB
);
"""

# Version 1 (the first release) to 2: key families, ended keys without secrets, resource-server
# credentials, the TRL's history and delisting, the audit log, a revocation counter.
_FROM_1 = """
ALTER TABLE audiences ADD COLUMN key_family TEXT NOT NULL DEFAULT 'default';
ALTER TABLE audiences ADD COLUMN key_alg TEXT;
ALTER TABLE audiences ADD COLUMN introspect_secret_digest BLOB;
ALTER TABLE audiences ADD COLUMN introspect_public_key BLOB;
CREATE TABLE signing_keys_v2 (
    kid BLOB PRIMARY KEY, alg INTEGER NOT NULL, state TEXT NOT NULL, private_key BLOB,
    created_at INTEGER NOT NULL, activated_at INTEGER, retire_until INTEGER,
    family TEXT NOT NULL DEFAULT 'default', retired_at INTEGER, ended_at INTEGER
);
INSERT INTO signing_keys_v2 (kid, alg, state, private_key, created_at, activated_at, retire_until)
    SELECT kid, alg, state, private_key, created_at, activated_at, retire_until FROM signing_keys;
DROP TABLE signing_keys;
ALTER TABLE signing_keys_v2 RENAME TO signing_keys;
ALTER TABLE access_tokens ADD COLUMN delisted_at INTEGER;
CREATE INDEX access_tokens_exp ON access_tokens (exp);
ALTER TABLE change_feed ADD COLUMN revocations INTEGER NOT NULL DEFAULT 0;
CREATE TABLE trl_updates (
    seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, removed BLOB NOT NULL, added BLOB NOT NULL
);
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY, at INTEGER NOT NULL, actor TEXT NOT NULL, event TEXT NOT NULL,
    subject TEXT NOT NULL, details TEXT NOT NULL, mac BLOB NOT NULL
);
"""


# Version 2 to 3: registry rows and the audit log's head are MACed (issue 13). Existing rows get
# their MACs in the same transaction (`_seal_registry`); from then on a NULL MAC is refused.
_FROM_2 = """
ALTER TABLE audiences ADD COLUMN mac BLOB;
ALTER TABLE clients ADD COLUMN mac BLOB;
CREATE TABLE audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, last_mac BLOB NOT NULL,
    mac BLOB NOT NULL, registry BLOB
);
"""

# Version 3 to 4: the audit head records a digest of the registry rows (`registry_digest`), so
# an older sealed copy of a row put back, or a row deleted, shows.
_FROM_3 = """
ALTER TABLE audit_head ADD COLUMN registry BLOB
"""

# Version 4 to 5: an access token records its audience, so each TRL requester sees only the
# hashes pertaining to it (RFC 9770 §5). A token of a refresh family takes the family's
# audience; one without stays NULL: its hash pertains to its client only.
# The partial indexes hold listed tokens only: a requester's full query reads its own rows.
# Each requester gets its own update collection (RFC 9770 §6.2), filled from the updates
# kept so far by `_attribute_history`.
_FROM_4 = """
ALTER TABLE access_tokens ADD COLUMN audience TEXT;
UPDATE access_tokens SET audience = (
    SELECT f.audience FROM refresh_families f WHERE f.family_id = access_tokens.family_id
) WHERE family_id IS NOT NULL;
CREATE INDEX access_tokens_listed_client ON access_tokens (client_id)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
CREATE INDEX access_tokens_listed_audience ON access_tokens (audience)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
CREATE TABLE trl_requester_updates (
    requester TEXT NOT NULL, seq INTEGER NOT NULL, trl_seq INTEGER NOT NULL,
    at INTEGER NOT NULL, removed BLOB NOT NULL, added BLOB NOT NULL,
    PRIMARY KEY (requester, seq)
);
CREATE INDEX trl_requester_updates_trl_seq ON trl_requester_updates (trl_seq)
"""


# Version 5 to 6: an audience's ACE profile (issue 15); every existing one keeps today's
# tokens ("bearer"), which its row MAC does not cover (registry_mac.row_mac), so the rows
# sealed before stay sealed. Run first: sealing an older file reads the column.
_FROM_5 = """
ALTER TABLE audiences ADD COLUMN profile TEXT NOT NULL DEFAULT 'bearer'
    CHECK (profile IN ('bearer', 'coap_oscore', 'edhoc_oscore'))
"""


# Version 6 to 7: a client's secret before its last rotation, accepted until the end of the
# overlap (`clients rotate-secret`); NULL for every existing row, which its row MAC does not
# cover (registry_mac.row_mac), so the rows sealed before stay sealed. Run first, like _FROM_5.
_FROM_6 = """
ALTER TABLE clients ADD COLUMN previous_secret_digest BLOB;
ALTER TABLE clients ADD COLUMN previous_secret_until INTEGER
"""


def migrate(
    conn: sqlite3.Connection, master_key: MasterKey, now: int, sealed_before: int | None
) -> None:
    """Create the schema in an empty file, or bring an older one up to `SCHEMA_VERSION`
    (`now` dates the audit entry that records a migration). `sealed_before` is the version
    the data directory's marker records: an older database is refused, not sealed again."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        has_tables = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'signing_keys'"
        ).fetchone()
        if not has_tables:
            _script(conn, SCHEMA)
            head = sealed_head(master_key.audit_mac, 0, GENESIS, EMPTY_REGISTRY)
            write_head(conn, head, insert=True)
        elif version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema {version} is newer than this coap-auth")
        elif version < SCHEMA_VERSION:
            # Version 1 left user_version unset (0).
            problem = refusal(max(version, 1), sealed_before)
            if problem:
                raise OperatorError(problem)
            if version < 6:
                _script(conn, _FROM_5)
            _script(conn, _FROM_6)
            if version < 3:
                if version < 2:
                    _script(conn, _FROM_1)
                    _seed_trl_history(conn)
                _script(conn, _FROM_2)
                _seal_registry(conn, master_key)
                _seal_audit_head(conn, master_key, max(version, 1), now)
            elif version < 4:
                _script(conn, _FROM_3)
                _reseal_audit_head(conn, master_key, now)
            else:
                _record_upgrade(conn, master_key, version, now)
            if version < 5:
                _script(conn, _FROM_4)
                _attribute_history(conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _seed_trl_history(conn: sqlite3.Connection) -> None:
    """Version 1 revoked tokens but kept no TRL history: record what is listed as one update,
    so diff readers see it added (and later removed when it expires)."""
    rows = conn.execute(
        "SELECT token_hash, revoked_at FROM access_tokens WHERE revoked_at IS NOT NULL"
        " ORDER BY revoked_at, token_hash"
    ).fetchall()
    if rows:
        conn.execute(
            "INSERT INTO trl_updates (seq, at, removed, added) VALUES (1, ?, ?, ?)",
            (max(r[1] for r in rows), cbor2.dumps([]), cbor2.dumps([r[0] for r in rows])),
        )
        conn.execute("UPDATE change_feed SET revocations = revocations + 1 WHERE id = 1")


def _attribute_history(conn: sqlite3.Connection) -> None:
    """Build each requester's update collection from the TRL updates kept so far, as if it
    had been kept from the start (RFC 9770 §6.2: its MAX_N most recent pertaining updates
    must be at hand); every revoked token's record, and so its owners, is still there."""
    owners = {
        r[0]: (r[1], r[2])
        for r in conn.execute(
            "SELECT token_hash, client_id, audience FROM access_tokens WHERE revoked_at IS NOT NULL"
        )
    }
    updates = conn.execute(f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_updates ORDER BY seq")
    conn.executemany(
        f"INSERT INTO trl_requester_updates ({REQUESTER_UPDATE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        attributed_history(updates.fetchall(), owners),
    )


def _seal_registry(conn: sqlite3.Connection, master_key: MasterKey) -> None:
    """Give every registry row written before MACs existed its MAC (trusted: the migration
    runs with the master key, on the operator's data)."""
    for table, select, key in REGISTRY_TABLES:
        rows = conn.execute(f"SELECT {select} FROM {table}").fetchall()
        conn.executemany(
            f"UPDATE {table} SET mac = ? WHERE {key} = ?",
            seals(master_key.registry_mac, table, rows),
        )


def registry_digest_of(conn: sqlite3.Connection) -> bytes:
    """The registry digest of the rows as the connection sees them (in its transaction)."""
    return registry_digest(conn.execute(REGISTRY_IDS).fetchall())


def _seal_audit_head(
    conn: sqlite3.Connection, master_key: MasterKey, version: int, now: int
) -> None:
    newest = conn.execute("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    entries, head = migration_plan(
        master_key.audit_mac, newest, version, SCHEMA_VERSION, now, registry_digest_of(conn)
    )
    insert_entries(conn, entries)
    write_head(conn, head, insert=True)


def _reseal_audit_head(conn: sqlite3.Connection, master_key: MasterKey, now: int) -> None:
    newest = conn.execute("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    legacy = conn.execute("SELECT seq, last_mac, mac FROM audit_head WHERE id = 1").fetchone()
    entries, head = reseal_plan(
        master_key.audit_mac, legacy, newest, now, registry_digest_of(conn), SCHEMA_VERSION
    )
    insert_entries(conn, entries)
    if head is not None:
        write_head(conn, head, insert=False)


def _record_upgrade(
    conn: sqlite3.Connection, master_key: MasterKey, version: int, now: int
) -> None:
    newest = conn.execute("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1").fetchone()
    entries, head = upgrade_plan(
        master_key.audit_mac, read_head(conn), newest, version, SCHEMA_VERSION, now
    )
    insert_entries(conn, entries)
    if head is not None:
        write_head(conn, head, insert=False)


def read_head(conn: sqlite3.Connection) -> AuditHead | None:
    row = conn.execute(
        "SELECT seq, last_mac, registry, mac FROM audit_head WHERE id = 1"
    ).fetchone()
    return None if row is None else AuditHead(*row)


def insert_entries(conn: sqlite3.Connection, entries: list[AuditEntry]) -> None:
    """Append these audit entries (the caller's transaction)."""
    conn.executemany(
        f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [audit_entry_to_row(entry) for entry in entries],
    )


def write_head(conn: sqlite3.Connection, head: AuditHead, *, insert: bool) -> None:
    """Store the audit head (the first one: `insert`)."""
    values = (head.seq, head.last_mac, head.mac, head.registry)
    if insert:
        conn.execute(
            "INSERT INTO audit_head (id, seq, last_mac, mac, registry) VALUES (1, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE audit_head SET seq = ?, last_mac = ?, mac = ?, registry = ? WHERE id = 1",
            values,
        )


def _script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would commit the open transaction; run statement by statement instead.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)
