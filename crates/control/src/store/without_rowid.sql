-- Twofold control plane, schema version 6: the two tables every reported
-- failure reads or writes keep their rows in the primary key's B-tree. A rowid
-- table with a composite key is two B-trees, so each lookup descended the key's
-- index and then the table, and each write changed pages in both.

CREATE TABLE user_state_new (
    tenant          TEXT NOT NULL REFERENCES tenants(id),
    user_id         TEXT NOT NULL,
    failures        INTEGER NOT NULL,
    locked          INTEGER NOT NULL,
    throttled_until INTEGER,
    PRIMARY KEY (tenant, user_id)
) STRICT, WITHOUT ROWID;
INSERT INTO user_state_new (tenant, user_id, failures, locked, throttled_until)
    SELECT tenant, user_id, failures, locked, throttled_until FROM user_state;
DROP TABLE user_state;
ALTER TABLE user_state_new RENAME TO user_state;

CREATE TABLE unpublished_failures_new (
    tenant   TEXT NOT NULL REFERENCES tenants(id),
    user_id  TEXT NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (tenant, user_id)
) STRICT, WITHOUT ROWID;
INSERT INTO unpublished_failures_new (tenant, user_id, failures)
    SELECT tenant, user_id, failures FROM unpublished_failures;
DROP TABLE unpublished_failures;
ALTER TABLE unpublished_failures_new RENAME TO unpublished_failures;
