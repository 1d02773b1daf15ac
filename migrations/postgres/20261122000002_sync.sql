-- Outbound sync (PostgreSQL): connector configuration, links with their sync
-- state, the delivery log and dead letters. Same shape as migrations/sqlite.

-- Settings and (encrypted) secrets written through the API.
CREATE TABLE connector_configs (
    connector    TEXT    NOT NULL PRIMARY KEY,
    enabled      BOOLEAN NOT NULL,
    settings     JSONB    NOT NULL,            -- JSON object of string -> string
    secrets      BYTEA,                        -- sealed JSON object (see host/src/secrets.rs)
    secret_names JSONB   NOT NULL DEFAULT '[]'::jsonb, -- JSON array, so the API can list names without the key
    updated_at   TIMESTAMPTZ NOT NULL
);

-- One row per (customer, connector): the link to the remote record, the last
-- synced state, and the scheduling state of the next push.
CREATE TABLE sync_links (
    customer_id        TEXT    NOT NULL,
    connector          TEXT    NOT NULL,
    remote_id          TEXT,
    remote_deleted     BOOLEAN NOT NULL DEFAULT FALSE,
    wanted_version     BIGINT  NOT NULL,           -- newest local version seen on the bus
    synced_version     BIGINT  NOT NULL DEFAULT 0, -- newest local version the remote holds
    pushed_hash        TEXT,                       -- sha256 of the canonical record last pushed
    snapshot           JSONB,                       -- JSON: the remote's state after the last push
    pending_version    BIGINT ,                    -- a create whose outcome is unknown: replay it as is
    state              TEXT    NOT NULL CHECK (state IN ('pending', 'retry', 'synced', 'dead')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms BIGINT  NOT NULL,
    lease_until_ms     BIGINT  NOT NULL DEFAULT 0,
    lease_token        TEXT,
    last_error         TEXT,
    correlation_id     TEXT,
    updated_at         TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (customer_id, connector)
);

-- A remote record is linked to at most one customer.
CREATE UNIQUE INDEX sync_links_remote ON sync_links (connector, remote_id) WHERE remote_id IS NOT NULL;
CREATE INDEX sync_links_due ON sync_links (next_attempt_at_ms) WHERE state IN ('pending', 'retry');

-- Every outcome of every attempt, newest last.
CREATE TABLE deliveries (
    id                 BIGINT  NOT NULL GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id        TEXT    NOT NULL,
    connector          TEXT    NOT NULL,
    direction          TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    version            BIGINT  NOT NULL,
    operation          TEXT,
    outcome            TEXT    NOT NULL CHECK (outcome IN ('delivered', 'skipped', 'retry_scheduled', 'dead_lettered')),
    attempt            INTEGER NOT NULL,
    detail             TEXT,
    next_attempt_at_ms BIGINT ,
    remote_id          TEXT,
    correlation_id     TEXT,
    created_at         TIMESTAMPTZ NOT NULL
);

CREATE INDEX deliveries_customer ON deliveries (customer_id, id);

CREATE TABLE dead_letters (
    id             TEXT    NOT NULL PRIMARY KEY,
    customer_id    TEXT    NOT NULL,
    connector      TEXT    NOT NULL,
    direction      TEXT    NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    version        BIGINT  NOT NULL,
    error_kind     TEXT    NOT NULL,
    error          TEXT    NOT NULL,
    attempts       INTEGER NOT NULL,
    correlation_id TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    replayed_at    TIMESTAMPTZ
);

CREATE INDEX dead_letters_connector ON dead_letters (connector, id);
