-- Customers, their outbox and the idempotency keys of API writes (PostgreSQL).
-- Same shape as migrations/sqlite; only the column types differ.

CREATE TABLE customers (
    id          TEXT        NOT NULL PRIMARY KEY,
    name        TEXT,
    email       TEXT        NOT NULL,
    phone       TEXT,
    address     JSONB,
    metadata    JSONB       NOT NULL DEFAULT '{}'::jsonb,
    version     BIGINT      NOT NULL CHECK (version >= 1),
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    deleted_at  TIMESTAMPTZ
);

-- An email identifies one live customer; a soft-deleted one frees it.
CREATE UNIQUE INDEX customers_email_live ON customers (email) WHERE deleted_at IS NULL;

CREATE TABLE outbox (
    id             BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    aggregate      TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    kind           TEXT        NOT NULL CHECK (kind IN ('created', 'updated', 'deleted')),
    payload        JSONB       NOT NULL,
    correlation_id TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    published_at   TIMESTAMPTZ
);

CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_aggregate ON outbox (aggregate, aggregate_id, version);

CREATE TABLE idempotency_keys (
    scope            TEXT        NOT NULL,
    key              TEXT        NOT NULL,
    fingerprint      TEXT        NOT NULL,
    state            TEXT        NOT NULL CHECK (state IN ('in_flight', 'done')),
    response_status  INTEGER,
    response_headers JSONB,
    response_body    BYTEA,
    created_at       TIMESTAMPTZ NOT NULL,
    locked_at_ms     BIGINT      NOT NULL,
    expires_at_ms    BIGINT      NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
