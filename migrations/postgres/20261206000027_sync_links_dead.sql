-- The dead links, for their listing (`GET /api/v1/sync/links?state=dead`):
-- without it the listing read every link in its order to find the few
-- that died. `state` is already in `sync_links_due`'s predicate, so an
-- update is no less a heap-only one than before. The build holds the
-- table's writes while it reads it. Waits at most a second for the table.
SET LOCAL lock_timeout = '1s';
CREATE INDEX sync_links_dead ON sync_links (customer_id, connector) WHERE state = 'dead';
