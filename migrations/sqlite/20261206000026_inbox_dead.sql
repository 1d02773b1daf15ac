-- The dead inbox events, for their listing (`GET /api/v1/sync/inbox?state=dead`):
-- without it the listing read every event in arrival order to find the few
-- that died, the very listing an incident asks for.
CREATE INDEX inbox_dead ON inbox (seq) WHERE state = 'dead';
