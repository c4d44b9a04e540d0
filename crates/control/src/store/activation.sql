-- Twofold control plane, schema version 3: wrong codes while activating.

-- Wrong activation codes so far; a pending factor is dropped after a few, so
-- its code cannot be guessed within its ten minutes.
ALTER TABLE totp_factors ADD COLUMN activation_failures INTEGER NOT NULL DEFAULT 0;
