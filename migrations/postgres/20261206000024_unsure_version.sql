-- The version of the last push whose outcome ferry does not know (it timed
-- out, the remote answered 5xx or 429): its retry sends the same request
-- under the same idempotency key, and `pushed_hash` stays the base for
-- that version alone (a later one is sent whole). Cleared on delivery.
ALTER TABLE sync_links ADD COLUMN unsure_version BIGINT;
