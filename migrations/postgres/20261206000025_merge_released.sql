-- The record a duplicate-email `merge` took the link from: its later
-- events are not merged into the customer again (the link moved back to
-- it at its next event, and its old values overwrote the customer's).
-- Waits at most a second for the table (a dump or an open transaction
-- holding it): queued without limit, the ALTER held every other session's
-- reads and writes of sync_links behind it. ferry asks again after a pause.
SET LOCAL lock_timeout = '1s';
ALTER TABLE sync_links ADD COLUMN released_remote_id TEXT;
