-- Twofold control plane, schema version 2: merging data planes' usage reports.

-- The highest usage event id merged from each node, so a retried report is
-- merged once.
CREATE TABLE usage_cursors (
    node    TEXT PRIMARY KEY,
    through INTEGER NOT NULL
) STRICT;
