-- One connector's due links in due order, for the scheduler's claim of a
-- connector's share of the push slots (docs/sync.md): in the due index the
-- connector only filters, so that claim read every other connector's due
-- links before its own (a slow remote's backlog of hundreds of thousands,
-- on every pass). The build holds the table's writes while it reads it.
-- Waits at most a second for the table.
SET LOCAL lock_timeout = '1s';
CREATE INDEX sync_links_due_by_connector ON sync_links (connector, next_attempt_at_ms) WHERE state IN ('pending', 'retry');
