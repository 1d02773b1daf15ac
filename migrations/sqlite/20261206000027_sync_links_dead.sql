-- The dead links, for their listing (`GET /api/v1/sync/links?state=dead`):
-- without it the listing read every link in its order to find the few
-- that died.
CREATE INDEX sync_links_dead ON sync_links (customer_id, connector) WHERE state = 'dead';
