-- Operations: a customer's inbound history is read by customer
-- (GET /api/v1/customers/{id}/sync shows both directions).
CREATE INDEX inbox_customer ON inbox (customer_id, seq) WHERE customer_id IS NOT NULL;

-- The correlation id of the delivery that conflicted, as deliveries and
-- dead letters have.
ALTER TABLE conflicts ADD COLUMN correlation_id TEXT;

-- Which request holds an in-flight idempotency key, so that a cancelled
-- request releases its own claim and never another's.
ALTER TABLE idempotency_keys ADD COLUMN claim TEXT;
