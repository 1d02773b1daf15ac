-- The deletes the inbox holds, by remote record: an upsert of a record
-- nothing links yet asks whether the record's delete came first (Stripe
-- does not promise order: a `customer.created` answered 503 is retried
-- after the `customer.deleted` that followed it), so a deleted record is
-- not made a customer again. Only deletes are indexed, and no column of
-- it changes after the insert: the webhooks' writes and the finishes'
-- in-page updates are unchanged.
CREATE INDEX inbox_deletes ON inbox (connector, remote_id, occurred_at_ms)
    WHERE kind = 'delete';
