-- The outbox's index by customer served the replay of a pending create,
-- which read the payload of one customer's version (issue 15,
-- docs/performance.md round 18). The record now stays on the link, and
-- nothing ferry runs reads the outbox by customer; the index cost ≈ 160
-- bytes of write-ahead log and an index insert per change.
DROP INDEX outbox_aggregate;
