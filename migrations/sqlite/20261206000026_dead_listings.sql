-- The dead inbox events and dead links, for their listings
-- (`GET /v1/inbox?state=dead`, `GET /v1/links?state=dead`, the console):
-- without them a listing read every event or link in its order to find
-- the few that died, the very listing an incident asks for.
CREATE INDEX inbox_dead ON inbox (seq) WHERE state = 'dead';
CREATE INDEX sync_links_dead ON sync_links (customer_id, connector) WHERE state = 'dead';
