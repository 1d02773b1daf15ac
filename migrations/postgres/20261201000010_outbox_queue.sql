-- The outbox becomes insert-only (issue 15, docs/performance.md round 6).
-- Marking a row published and consumed rewrote the whole row (the customer
-- as written, ~450 bytes) and its index entries, once per change, in the
-- write-ahead log. What is still to move now lives in a narrow queue: an
-- outbox row enters it with its insert (the trigger below, so no writer can
-- forget it), the relay marks it published there (cluster mode), and the
-- consumer that schedules the change's pushes deletes it, in the same
-- transaction as the pushes.
CREATE TABLE outbox_queue (
    outbox_id    BIGINT      PRIMARY KEY,
    -- When the relay handed it to Kafka; null until then (and in embedded
    -- mode, where the consumer takes it from here directly).
    published_at TIMESTAMPTZ
);

INSERT INTO outbox_queue (outbox_id, published_at)
    SELECT id, published_at FROM outbox WHERE consumed_at IS NULL;

CREATE FUNCTION outbox_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox_queue (outbox_id) SELECT id FROM inserted;
    RETURN NULL;
END
$$;

-- Once per statement: a batch's multi-row insert enqueues its rows at once.
CREATE TRIGGER outbox_enqueue AFTER INSERT ON outbox
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_enqueue();

DROP INDEX outbox_unpublished;
DROP INDEX outbox_unconsumed;
ALTER TABLE outbox DROP COLUMN published_at, DROP COLUMN consumed_at;
