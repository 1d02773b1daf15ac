-- Customers, their outbox and the idempotency keys of API writes (SQLite).
-- Timestamps the store compares (expiry, leases) are unix milliseconds so that
-- ordering never depends on how a driver formats text timestamps.

CREATE TABLE customers (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT,
    email       TEXT    NOT NULL,
    phone       TEXT,
    address     TEXT,                       -- JSON object or NULL
    metadata    TEXT    NOT NULL DEFAULT '{}', -- JSON object of string -> string
    version     INTEGER NOT NULL CHECK (version >= 1),
    created_at  TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    deleted_at  TEXT
);

-- An email identifies one live customer; a soft-deleted one frees it.
CREATE UNIQUE INDEX customers_email_live ON customers (email) WHERE deleted_at IS NULL;

CREATE TABLE outbox (
    id             INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    aggregate      TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    kind           TEXT    NOT NULL CHECK (kind IN ('created', 'updated', 'deleted')),
    payload        TEXT    NOT NULL,
    correlation_id TEXT,
    created_at     TEXT    NOT NULL,
    published_at   TEXT
);

CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_aggregate ON outbox (aggregate, aggregate_id, version);

CREATE TABLE idempotency_keys (
    scope            TEXT    NOT NULL,
    key              TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('in_flight', 'done')),
    response_status  INTEGER,
    response_headers TEXT,
    response_body    BLOB,
    created_at       TEXT    NOT NULL,
    locked_at_ms     INTEGER NOT NULL,
    expires_at_ms    INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at_ms);
