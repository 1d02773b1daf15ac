-- A push whose outcome ferry does not know (any failed attempt): its
-- version, and the hash of the last delivered push it was planned over.
-- Its retry is planned over that base again, the same request; a later
-- version goes whole. `pushed_hash` stays NULL meanwhile, as releases
-- before this one read it (a replica of one still running in a rolling
-- deploy takes a non-NULL hash for a delivered push). Cleared on delivery.
ALTER TABLE sync_links ADD COLUMN unsure_version BIGINT;
ALTER TABLE sync_links ADD COLUMN unsure_base TEXT;
