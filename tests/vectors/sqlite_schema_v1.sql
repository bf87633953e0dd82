-- The SQLite schema of coap-auth 0.1 (schema version 1, before PRAGMA user_version was set),
-- kept to test the migration to the current schema.
CREATE TABLE IF NOT EXISTS audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime INTEGER NOT NULL CHECK (lifetime > 0),
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BLOB,
    public_key BLOB,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    CHECK ((secret_digest IS NULL) <> (public_key IS NULL))
);
CREATE TABLE IF NOT EXISTS signing_keys (
    kid BLOB PRIMARY KEY,
    alg INTEGER NOT NULL,
    state TEXT NOT NULL,
    private_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    activated_at INTEGER,
    retire_until INTEGER
);
CREATE TABLE IF NOT EXISTS assertion_replay (
    client_id TEXT NOT NULL,
    cti BLOB NOT NULL,
    exp INTEGER NOT NULL,
    PRIMARY KEY (client_id, cti)
);
CREATE TABLE IF NOT EXISTS refresh_families (
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
CREATE INDEX IF NOT EXISTS refresh_families_client ON refresh_families (client_id);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    digest BLOB PRIMARY KEY,
    family_id BLOB NOT NULL REFERENCES refresh_families (family_id),
    issued_at INTEGER NOT NULL,
    spent_at INTEGER,
    successor BLOB
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family ON refresh_tokens (family_id);
CREATE TABLE IF NOT EXISTS access_tokens (
    token_hash BLOB PRIMARY KEY,
    family_id BLOB REFERENCES refresh_families (family_id),
    client_id TEXT NOT NULL,
    exp INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS access_tokens_family ON access_tokens (family_id);
CREATE TABLE IF NOT EXISTS change_feed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    counter INTEGER NOT NULL
);
INSERT OR IGNORE INTO change_feed (id, counter) VALUES (1, 0);
