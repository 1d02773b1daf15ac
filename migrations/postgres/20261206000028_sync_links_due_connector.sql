-- The scheduler claims each connector's due links up to its share of the
-- push slots (docs/sync.md): with the connector in the due index, a claim
-- of one connector's links passes over other connectors' earlier ones in
-- the index alone, without reading their rows. The new index is built
-- first, under its own name (the build holds the table's writes, not its
-- reads), and the old one dropped after it (a moment's exclusive lock).
-- Waits at most a second for the table.
SET LOCAL lock_timeout = '1s';
CREATE INDEX sync_links_due_connector ON sync_links (next_attempt_at_ms, connector) WHERE state IN ('pending', 'retry');
DROP INDEX sync_links_due;
