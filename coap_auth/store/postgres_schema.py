"""The PostgreSQL schema (same tables and column order as SQLite), its creation and migration.

`migrate` runs under an advisory lock, so several instances starting at once create (or
migrate) it once; migrating seals the registry rows and the audit head under the master key
(unless this instance's data directory says it was sealed before: a downgrade, see seal_marker).
"""

from __future__ import annotations

import re
from typing import Any

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
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime BIGINT NOT NULL CHECK (lifetime > 0),
    created_at BIGINT NOT NULL,
    key_family TEXT NOT NULL DEFAULT 'default',
    key_alg TEXT,
    introspect_secret_digest BYTEA,
    introspect_public_key BYTEA,
    profile TEXT NOT NULL DEFAULT 'bearer'
        CHECK (profile IN ('bearer', 'coap_oscore', 'edhoc_oscore')),
    mac BYTEA
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BYTEA,
    public_key BYTEA,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    mac BYTEA,
    previous_secret_digest BYTEA,
    previous_secret_until BIGINT,
    CHECK ((secret_digest IS NULL) <> (public_key IS NULL))
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid BYTEA PRIMARY KEY,
    alg INTEGER NOT NULL,
    state TEXT NOT NULL,
    private_key BYTEA,
    created_at BIGINT NOT NULL,
    activated_at BIGINT,
    retire_until BIGINT,
    family TEXT NOT NULL DEFAULT 'default',
    retired_at BIGINT,
    ended_at BIGINT
);
CREATE TABLE IF NOT EXISTS assertion_replay (
    client_id TEXT NOT NULL,
    cti BYTEA NOT NULL,
    exp BIGINT NOT NULL,
    PRIMARY KEY (client_id, cti)
);
CREATE TABLE IF NOT EXISTS refresh_families (
    family_id BYTEA PRIMARY KEY,
    client_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    scope TEXT NOT NULL,
    cnf BYTEA,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    killed_at BIGINT,
    kill_reason TEXT
);
CREATE INDEX IF NOT EXISTS refresh_families_client ON refresh_families (client_id);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    digest BYTEA PRIMARY KEY,
    family_id BYTEA NOT NULL REFERENCES refresh_families (family_id),
    issued_at BIGINT NOT NULL,
    spent_at BIGINT,
    successor BYTEA
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash BYTEA PRIMARY KEY,
    family_id BYTEA REFERENCES refresh_families (family_id),
    client_id TEXT NOT NULL,
    exp BIGINT NOT NULL,
    revoked_at BIGINT,
    delisted_at BIGINT,
    audience TEXT
);
CREATE INDEX IF NOT EXISTS access_tokens_family ON access_tokens (family_id);
CREATE INDEX IF NOT EXISTS access_tokens_exp ON access_tokens (exp);
CREATE TABLE IF NOT EXISTS change_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    counter BIGINT NOT NULL,
    revocations BIGINT NOT NULL DEFAULT 0
);
INSERT INTO change_feed (id, counter) VALUES (1, 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS trl_updates (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    removed BYTEA NOT NULL,
    added BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS trl_requester_updates (
    requester TEXT NOT NULL,
    seq BIGINT NOT NULL,
    trl_seq BIGINT NOT NULL,
    at BIGINT NOT NULL,
    removed BYTEA NOT NULL,
    added BYTEA NOT NULL,
    PRIMARY KEY (requester, seq)
);
CREATE INDEX IF NOT EXISTS trl_requester_updates_trl_seq ON trl_requester_updates (trl_seq);
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    mac BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT NOT NULL,
    last_mac BYTEA NOT NULL,
    mac BYTEA NOT NULL,
    registry BYTEA
);
"""

# Version 2 to 3: registry rows and the audit head are MACed (issue 13). The tables of version
# 2 gain the MAC column (new ones have it already); `_seal` fills it for the existing rows.
_FROM_2 = """
ALTER TABLE audiences ADD COLUMN IF NOT EXISTS mac BYTEA;
ALTER TABLE clients ADD COLUMN IF NOT EXISTS mac BYTEA;
"""

# Version 3 to 4: the audit head records a digest of the registry rows (`registry_digest`).
_FROM_3 = """
ALTER TABLE audit_head ADD COLUMN IF NOT EXISTS registry BYTEA;
"""

# Version 4 to 5: an access token records its audience (RFC 9770 §5: each TRL requester sees
# only the hashes pertaining to it); a token of a refresh family takes the family's, one
# without stays NULL (its hash pertains to its client only). `_LISTED_INDEXES` follow, then
# `_attribute_history` fills each requester's update collection (its table is in SCHEMA).
_FROM_4 = """
ALTER TABLE access_tokens ADD COLUMN IF NOT EXISTS audience TEXT;
UPDATE access_tokens SET audience = (
    SELECT f.audience FROM refresh_families f WHERE f.family_id = access_tokens.family_id
) WHERE family_id IS NOT NULL;
"""

# Listed tokens only, by client and by audience: a requester's full query reads its own rows.
# Not in SCHEMA: that runs first on every start, also on a version 4 table without `audience`.
_LISTED_INDEXES = """
CREATE INDEX IF NOT EXISTS access_tokens_listed_client ON access_tokens (client_id)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
CREATE INDEX IF NOT EXISTS access_tokens_listed_audience ON access_tokens (audience)
    WHERE revoked_at IS NOT NULL AND delisted_at IS NULL;
"""


# Version 5 to 6: an audience's ACE profile (issue 15); every existing one keeps today's
# tokens ("bearer"), which its row MAC does not cover (registry_mac.row_mac), so the rows
# sealed before stay sealed. Run before sealing: sealing an older schema reads the column.
_FROM_5 = """
ALTER TABLE audiences ADD COLUMN IF NOT EXISTS profile TEXT NOT NULL DEFAULT 'bearer'
    CHECK (profile IN ('bearer', 'coap_oscore', 'edhoc_oscore'));
"""


# Version 6 to 7: a client's secret before its last rotation and the end of its overlap
# (`clients rotate-secret`); NULL for every existing row, which its row MAC does not cover
# (registry_mac.row_mac). Run before sealing, like _FROM_5.
_FROM_6 = """
ALTER TABLE clients ADD COLUMN IF NOT EXISTS previous_secret_digest BYTEA;
ALTER TABLE clients ADD COLUMN IF NOT EXISTS previous_secret_until BIGINT;
"""


async def migrate(
    conn: Any, lock_key: int, master_key: MasterKey, now: int, sealed_before: int | None
) -> None:
    """Create the schema if absent, or bring version 2 to 6 up to date; refuse a newer one.
    `conn` is an asyncpg connection; `now` dates the audit entry that records a migration;
    `sealed_before` is the version this instance's marker records: an older database (or one
    that lost its version but holds data) is refused, not sealed again."""
    # An up-to-date schema is left alone: the DDL below locks every table (CREATE INDEX IF NOT
    # EXISTS takes a SHARE lock even when the index exists), which deadlocked with the grants
    # and refreshes other instances write meanwhile, so a CLI command or a new instance
    # failed at random under load.
    # (Read from the catalogue, which takes no table lock: a table or index lost since runs the
    # DDL again, as every open did before, which makes it anew.)
    if await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL"):
        if await conn.fetchval(
            "SELECT max(version) FROM schema_version"
        ) == SCHEMA_VERSION and await _all_present(conn):
            return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        await conn.execute(SCHEMA)
        version = await conn.fetchval("SELECT max(version) FROM schema_version")
        if version is None:
            holds_data = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM signing_keys) OR EXISTS (SELECT 1 FROM clients)"
                " OR EXISTS (SELECT 1 FROM audiences)"
            )
            problem = refusal(0, sealed_before) if holds_data else None
            if problem:
                raise OperatorError(problem)
            head = sealed_head(master_key.audit_mac, 0, GENESIS, EMPTY_REGISTRY)
            await write_head(conn, head, insert=True)
            # A no-op on tables just created; tables that lost their version get the columns.
            await conn.execute(_FROM_5)
            await conn.execute(_FROM_6)
            await conn.execute(_FROM_4)
            await conn.execute(_LISTED_INDEXES)
            await _attribute_history(conn)
            await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
        elif version > SCHEMA_VERSION:
            raise RuntimeError(f"database schema {version} is newer than this coap-auth")
        elif version < SCHEMA_VERSION:
            problem = refusal(version, sealed_before)
            if problem:
                raise OperatorError(problem)
            # Only now: ALTER TABLE locks the table against every other instance's reads.
            await conn.execute(_FROM_5)
            await conn.execute(_FROM_6)
            if version < 3:
                await conn.execute(_FROM_2)
                await _seal(conn, master_key, version, now)
            elif version < 4:
                await conn.execute(_FROM_3)
                await _reseal(conn, master_key, now)
            else:
                await _record_upgrade(conn, master_key, version, now)
            if version < 5:
                await conn.execute(_FROM_4)
                await conn.execute(_LISTED_INDEXES)
                await _attribute_history(conn)
            await conn.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION)


# Every table and index the DDL above makes, by name.
_MADE = tuple(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA + _LISTED_INDEXES))


async def _all_present(conn: Any) -> bool:
    """Whether every table and index of the schema exists (in the search path's schema)."""
    found = await conn.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) AS made(name)"
        " WHERE to_regclass(quote_ident(made.name)) IS NOT NULL",
        list(_MADE),
    )
    return int(found) == len(_MADE)


async def _attribute_history(conn: Any) -> None:
    """Build each requester's update collection from the TRL updates kept so far, as if it
    had been kept from the start (RFC 9770 §6.2: its MAX_N most recent pertaining updates
    must be at hand); every revoked token's record, and so its owners, is still there. Only
    into an empty table: tables that lost their version may still hold collections."""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM trl_requester_updates)"):
        return
    owners = {
        r[0]: (r[1], r[2])
        for r in await conn.fetch(
            "SELECT token_hash, client_id, audience FROM access_tokens WHERE revoked_at IS NOT NULL"
        )
    }
    updates = await conn.fetch(f"SELECT {TRL_UPDATE_COLUMNS} FROM trl_updates ORDER BY seq")
    await conn.executemany(
        f"INSERT INTO trl_requester_updates ({REQUESTER_UPDATE_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        attributed_history(updates, owners),
    )


async def registry_digest_of(conn: Any) -> bytes:
    """The registry digest of the rows as the connection sees them (in its transaction)."""
    return registry_digest(tuple(r) for r in await conn.fetch(REGISTRY_IDS))


async def insert_entries(conn: Any, entries: list[AuditEntry]) -> None:
    """Append these audit entries (the caller's transaction)."""
    await conn.executemany(
        f"INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [audit_entry_to_row(entry) for entry in entries],
    )


async def write_head(conn: Any, head: AuditHead, *, insert: bool) -> None:
    """Store the audit head (the first one: `insert`)."""
    if insert:
        query = (
            "INSERT INTO audit_head (id, seq, last_mac, mac, registry) VALUES (1, $1, $2, $3, $4)"
        )
    else:
        query = (
            "UPDATE audit_head SET seq = $1, last_mac = $2, mac = $3, registry = $4 WHERE id = 1"
        )
    await conn.execute(query, head.seq, head.last_mac, head.mac, head.registry)


async def _reseal(conn: Any, master_key: MasterKey, now: int) -> None:
    newest = await conn.fetchrow("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1")
    legacy = await conn.fetchrow("SELECT seq, last_mac, mac FROM audit_head WHERE id = 1")
    entries, head = reseal_plan(
        master_key.audit_mac,
        None if legacy is None else (legacy[0], legacy[1], legacy[2]),
        None if newest is None else (newest[0], newest[1]),
        now,
        await registry_digest_of(conn),
        SCHEMA_VERSION,
    )
    await insert_entries(conn, entries)
    if head is not None:
        await write_head(conn, head, insert=False)


async def _record_upgrade(conn: Any, master_key: MasterKey, version: int, now: int) -> None:
    newest = await conn.fetchrow("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1")
    entries, head = upgrade_plan(
        master_key.audit_mac,
        await read_head(conn),
        None if newest is None else (newest[0], newest[1]),
        version,
        SCHEMA_VERSION,
        now,
    )
    await insert_entries(conn, entries)
    if head is not None:
        await write_head(conn, head, insert=False)


async def read_head(conn: Any) -> AuditHead | None:
    row = await conn.fetchrow("SELECT seq, last_mac, registry, mac FROM audit_head WHERE id = 1")
    return None if row is None else AuditHead(row[0], row[1], row[2], row[3])


async def _seal(conn: Any, master_key: MasterKey, version: int, now: int) -> None:
    """Give every registry row written before MACs existed its MAC (trusted: the migration
    runs with the master key, on the operator's data); start the head at the newest audit
    entry and record the migration as the next one."""
    for table, select, key in REGISTRY_TABLES:
        rows = await conn.fetch(f"SELECT {select} FROM {table}")
        await conn.executemany(
            f"UPDATE {table} SET mac = $1 WHERE {key} = $2",
            seals(master_key.registry_mac, table, rows),
        )
    newest = await conn.fetchrow("SELECT seq, mac FROM audit_log ORDER BY seq DESC LIMIT 1")
    entries, head = migration_plan(
        master_key.audit_mac,
        None if newest is None else (newest[0], newest[1]),
        version,
        SCHEMA_VERSION,
        now,
        await registry_digest_of(conn),
    )
    await insert_entries(conn, entries)
    await write_head(conn, head, insert=True)
