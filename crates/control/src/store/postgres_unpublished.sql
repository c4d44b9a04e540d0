-- Twofold control plane on PostgreSQL, schema version 2: failures merged but
-- not published (as unpublished.sql on SQLite).
CREATE TABLE unpublished_failures (
    tenant   TEXT NOT NULL REFERENCES tenants(id),
    user_id  TEXT NOT NULL,
    failures BIGINT NOT NULL,
    PRIMARY KEY (tenant, user_id)
);

-- The first seq whose published states count the events a node's last report
-- merged, to answer a retry of that report (its answer was lost) exactly.
ALTER TABLE usage_cursors ADD COLUMN counted_from BIGINT NOT NULL DEFAULT 0;
