-- The SQLite schema of coap-auth schema version 2 (PRAGMA user_version = 2), before registry
-- rows and the audit head were MACed; kept to test the migration to the current schema.
CREATE TABLE audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime INTEGER NOT NULL CHECK (lifetime > 0),
    created_at INTEGER NOT NULL,
    key_family TEXT NOT NULL DEFAULT 'default',
    key_alg TEXT,
    introspect_secret_digest BLOB,
    introspect_public_key BLOB
);
CREATE TABLE clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BLOB,
    public_key BLOB,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
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
    delisted_at INTEGER
);
CREATE INDEX access_tokens_family ON access_tokens (family_id);
CREATE INDEX access_tokens_exp ON access_tokens (exp);
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
CREATE TABLE audit_log (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    mac BLOB NOT NULL
);
PRAGMA user_version = 2;
