-- The dead inbox events, for their listing (`GET /api/v1/sync/inbox?state=dead`):
-- without it the listing read every event in arrival order to find the few
-- that died, the very listing an incident asks for. `state` is already in
-- `inbox_due`'s predicate, so a finish's update is no less a heap-only one
-- than before. One table per migration: the build holds the table's writes
-- while it reads it, and two in one transaction held the first table's
-- until the second was built. Waits at most a second for the table.
SET LOCAL lock_timeout = '1s';
CREATE INDEX inbox_dead ON inbox (seq) WHERE state = 'dead';
