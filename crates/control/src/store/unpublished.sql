-- Twofold control plane, schema version 5: failures merged but not published.

-- A failure that does not change what its user may do is counted here instead
-- of being published to every data plane. `user_state` stays exactly what was
-- published (snapshots read it); a user's count is the sum of both.
CREATE TABLE unpublished_failures (
    tenant   TEXT NOT NULL REFERENCES tenants(id),
    user_id  TEXT NOT NULL,
    failures INTEGER NOT NULL,
    PRIMARY KEY (tenant, user_id)
) STRICT;

-- The first seq whose published states count the events a node's last report
-- merged, to answer a retry of that report (its answer was lost) exactly.
ALTER TABLE usage_cursors ADD COLUMN counted_from INTEGER NOT NULL DEFAULT 0;
