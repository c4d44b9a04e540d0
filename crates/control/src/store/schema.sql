-- Twofold control plane, schema version 1.

-- Singleton settings: the change log's id and head, the operator token's hash.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

-- A key with no tenant is a node key (scope replicate).
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    tenant     TEXT REFERENCES tenants(id),
    name       TEXT NOT NULL,
    hash       BLOB NOT NULL UNIQUE,
    scopes     TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
) STRICT;
CREATE INDEX api_keys_by_tenant ON api_keys(tenant);

CREATE TABLE totp_factors (
    id           TEXT PRIMARY KEY,
    tenant       TEXT NOT NULL REFERENCES tenants(id),
    user         TEXT NOT NULL,
    label        TEXT NOT NULL,
    issuer       TEXT,
    algorithm    TEXT NOT NULL,
    digits       INTEGER NOT NULL,
    period       INTEGER NOT NULL,
    sealed       BLOB NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'active')),
    created_ms   INTEGER NOT NULL,
    expires_ms   INTEGER,
    activated_ms INTEGER,
    last_step    INTEGER
) STRICT;
CREATE INDEX totp_factors_by_user ON totp_factors(tenant, user);

-- One current set per user; `codes` is the JSON list of {hash, used}.
CREATE TABLE backup_codes (
    tenant     TEXT NOT NULL REFERENCES tenants(id),
    user       TEXT NOT NULL,
    set_id     TEXT NOT NULL,
    codes      TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (tenant, user)
) STRICT;

CREATE TABLE user_state (
    tenant          TEXT NOT NULL REFERENCES tenants(id),
    user            TEXT NOT NULL,
    failures        INTEGER NOT NULL,
    locked          INTEGER NOT NULL,
    throttled_until INTEGER,
    PRIMARY KEY (tenant, user)
) STRICT;

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms  INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    tenant TEXT,
    action TEXT NOT NULL,
    user   TEXT,
    target TEXT
) STRICT;
CREATE INDEX audit_by_tenant ON audit(tenant, id);

-- The change log: one row per committed transaction, in commit order.
CREATE TABLE changes (
    seq   INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    ops   TEXT NOT NULL
) STRICT;
