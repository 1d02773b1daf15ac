-- The outbox becomes insert-only (issue 15, docs/performance.md round 6):
-- what is still to move lives in a narrow queue, which an outbox row enters
-- with its insert (the trigger, so no writer can forget it) and leaves when
-- the consumer schedules the change's pushes, in the same transaction.
CREATE TABLE outbox_queue (
    outbox_id    INTEGER NOT NULL PRIMARY KEY,
    -- When the relay handed it to Kafka; null until then (and in embedded
    -- mode, where the consumer takes it from here directly).
    published_at TEXT
);

INSERT INTO outbox_queue (outbox_id, published_at)
    SELECT id, published_at FROM outbox WHERE consumed_at IS NULL;

CREATE TRIGGER outbox_enqueue AFTER INSERT ON outbox
BEGIN
    INSERT INTO outbox_queue (outbox_id) VALUES (NEW.id);
END;

DROP INDEX outbox_unpublished;
DROP INDEX outbox_unconsumed;
ALTER TABLE outbox DROP COLUMN published_at;
ALTER TABLE outbox DROP COLUMN consumed_at;
