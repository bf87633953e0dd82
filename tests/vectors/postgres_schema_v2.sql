-- The PostgreSQL schema of coap-auth schema version 2, before registry rows and the audit
-- head were MACed; kept to test the migration to the current schema.
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS audiences (
    audience_id TEXT PRIMARY KEY,
    token_format TEXT NOT NULL CHECK (token_format IN ('cwt', 'jwt')),
    lifetime BIGINT NOT NULL CHECK (lifetime > 0),
    created_at BIGINT NOT NULL,
    key_family TEXT NOT NULL DEFAULT 'default',
    key_alg TEXT,
    introspect_secret_digest BYTEA,
    introspect_public_key BYTEA
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    audiences TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_digest BYTEA,
    public_key BYTEA,
    disabled BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
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
    delisted_at BIGINT
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
CREATE TABLE IF NOT EXISTS audit_log (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    event TEXT NOT NULL,
    subject TEXT NOT NULL,
    details TEXT NOT NULL,
    mac BYTEA NOT NULL
);
INSERT INTO schema_version VALUES (2);
