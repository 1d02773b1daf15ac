-- Inbound sync (SQLite): the webhook inbox, where a remote change came
-- from, and conflicts. Same shape as migrations/postgres.

-- Every event a connector parsed from a verified webhook, once per
-- (connector, remote event id): a redelivery is acknowledged, not stored twice.
CREATE TABLE inbox (
    seq                INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    connector          TEXT    NOT NULL,
    event_id           TEXT    NOT NULL,
    entity             TEXT    NOT NULL,
    kind               TEXT    NOT NULL CHECK (kind IN ('upsert', 'delete')),
    remote_id          TEXT    NOT NULL,
    occurred_at_ms     INTEGER NOT NULL,
    record             TEXT,               -- JSON, canonical
    origin_key         TEXT,
    remote_type        TEXT    NOT NULL,
    state              TEXT    NOT NULL CHECK (state IN ('pending', 'retry', 'applied', 'skipped', 'dead')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at_ms INTEGER NOT NULL,
    lease_until_ms     INTEGER NOT NULL DEFAULT 0,
    lease_token        TEXT,
    detail             TEXT,
    customer_id        TEXT,
    correlation_id     TEXT,
    received_at        TEXT    NOT NULL
);

CREATE UNIQUE INDEX inbox_event ON inbox (connector, event_id);
CREATE INDEX inbox_due ON inbox (next_attempt_at_ms, seq) WHERE state IN ('pending', 'retry');

-- The remote event time last applied through a link (stale events are older).
ALTER TABLE sync_links ADD COLUMN remote_seen_at_ms INTEGER NOT NULL DEFAULT 0;

-- A change that came from a connector: the relay does not push it back there.
ALTER TABLE outbox ADD COLUMN source_connector TEXT;

-- Fields changed differently on both sides since the last synced snapshot.
CREATE TABLE conflicts (
    id            TEXT    NOT NULL PRIMARY KEY,
    customer_id   TEXT    NOT NULL,
    connector     TEXT    NOT NULL,
    event_id      TEXT    NOT NULL,
    policy        TEXT    NOT NULL,
    fields        TEXT    NOT NULL,        -- JSON array of FieldConflict
    remote_record TEXT    NOT NULL,        -- JSON, the remote state that conflicted
    state         TEXT    NOT NULL CHECK (state IN ('resolved', 'open')),
    resolution    TEXT,
    created_at    TEXT    NOT NULL,
    resolved_at   TEXT
);

CREATE INDEX conflicts_open ON conflicts (state, id);
CREATE INDEX conflicts_customer ON conflicts (customer_id, connector);

-- An inbound dead letter points at its inbox event (outbound ones at a link).
ALTER TABLE dead_letters ADD COLUMN inbox_seq INTEGER;

-- When a consumer scheduled the pushes of an outbox row. A row the bus
-- published but nobody consumed in time is taken from the outbox directly.
ALTER TABLE outbox ADD COLUMN consumed_at TEXT;
CREATE INDEX outbox_unconsumed ON outbox (id) WHERE consumed_at IS NULL;

-- When ferry last pushed through a link (ferry's clock, unix ms): a webhook
-- from before then may be the echo of an older push and is re-fetched.
ALTER TABLE sync_links ADD COLUMN pushed_at_ms INTEGER NOT NULL DEFAULT 0;
