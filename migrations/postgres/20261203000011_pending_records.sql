-- The outbox stops carrying each change's payload (issue 15,
-- docs/performance.md round 18). Its rows say which customer reached which
-- version; the state is the customers row, and pushes read it there
-- (docs/sync.md). The payload, the customer as written again (≈ 1 KB for a
-- 1 KB customer), was read for one thing only: replaying a create whose
-- outcome is unknown after the customer moved on. That record now stays on
-- the link while the create is unsettled, written with the mark that the
-- create is about to be sent.
ALTER TABLE sync_links ADD COLUMN pending_record JSONB;

UPDATE sync_links l SET pending_record = (
    SELECT o.payload FROM outbox o
    WHERE o.aggregate = 'customer' AND o.aggregate_id = l.customer_id
      AND o.version = l.pending_version
    ORDER BY o.id LIMIT 1)
WHERE l.pending_version IS NOT NULL;

ALTER TABLE outbox DROP COLUMN payload;
