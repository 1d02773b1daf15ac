-- Cluster mode: inbox events travel through Kafka like outbox rows; this is
-- when the relay's publish was acknowledged (unix ms; null until then).
ALTER TABLE inbox ADD COLUMN published_at_ms INTEGER;
CREATE INDEX inbox_unpublished ON inbox (seq) WHERE published_at_ms IS NULL;
