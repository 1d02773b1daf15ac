-- The record a duplicate-email `merge` took the link from: its later
-- events are not merged into the customer again (the link moved back to
-- it at its next event, and its old values overwrote the customer's).
ALTER TABLE sync_links ADD COLUMN released_remote_id TEXT;
