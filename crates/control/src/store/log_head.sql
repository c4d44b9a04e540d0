-- Twofold control plane, schema version 4: the seq counter in its own row, and
-- user columns not named after an SQL keyword, so one set of statements runs on
-- SQLite and PostgreSQL alike.

CREATE TABLE log_head (
    id  INTEGER PRIMARY KEY CHECK (id = 0),
    seq INTEGER NOT NULL
) STRICT;
INSERT INTO log_head (id, seq)
    SELECT 0, coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'head'), 0);
DELETE FROM meta WHERE key = 'head';

ALTER TABLE totp_factors RENAME COLUMN user TO user_id;
ALTER TABLE backup_codes RENAME COLUMN user TO user_id;
ALTER TABLE user_state RENAME COLUMN user TO user_id;
ALTER TABLE audit RENAME COLUMN user TO user_id;
