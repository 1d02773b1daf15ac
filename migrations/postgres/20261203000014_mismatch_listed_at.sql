-- When the remote record a finding carries was read (unix ms, ferry's
-- clock, taken before the page was requested). A repair built from that
-- record is stamped with it, not with the time the finding was written:
-- a webhook for an edit made after the listing must stay newer than the
-- repair, or the stale check would drop it, and a webhook already applied
-- must not be undone by the older listed copy (docs/reconciliation.md).
-- NULL for findings without a record, and for those written before.
ALTER TABLE reconciliation_mismatches ADD COLUMN listed_at_ms BIGINT;
