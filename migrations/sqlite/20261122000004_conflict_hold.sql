-- A flagged conflict holds its link: no push or inbound apply through it
-- until a person resolves the conflict.
ALTER TABLE sync_links ADD COLUMN held_by TEXT;
