-- Reconciliation and backfill (SQLite): runs, the remote records a run
-- listed, and what it found. Same shape as migrations/postgres. See
-- host/src/sync/reconcile.rs.

CREATE TABLE reconciliation_runs (
    id                TEXT    NOT NULL PRIMARY KEY,   -- rec_…
    connector         TEXT    NOT NULL,
    mode              TEXT    NOT NULL CHECK (mode IN ('reconcile', 'backfill')),
    repair            TEXT    NOT NULL CHECK (repair IN ('report', 'push_local', 'pull_remote', 'merge')),
    trigger           TEXT    NOT NULL CHECK (trigger IN ('api', 'schedule')),
    status            TEXT    NOT NULL CHECK (status IN ('running', 'completed', 'failed', 'aborted')),
    -- Where a running run is: listing (from `cursor`), classifying, repairing.
    phase             TEXT    NOT NULL CHECK (phase IN ('listing', 'classifying', 'repairing', 'done')),
    cursor            TEXT,                           -- the next page to list
    listing_complete  INTEGER NOT NULL DEFAULT 0,
    pages             INTEGER NOT NULL DEFAULT 0,
    records           INTEGER NOT NULL DEFAULT 0,
    counts            TEXT    NOT NULL,               -- JSON object: kind -> count
    repairs           INTEGER NOT NULL DEFAULT 0,     -- repairs scheduled
    error             TEXT,                           -- why it failed or aborted
    lease_until_ms    INTEGER NOT NULL DEFAULT 0,     -- the replica running it renews this
    lease_token       TEXT,
    started_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL,
    finished_at       TEXT
);

-- One running run per connector, across replicas.
CREATE UNIQUE INDEX reconciliation_running ON reconciliation_runs (connector) WHERE status = 'running';
CREATE INDEX reconciliation_by_connector ON reconciliation_runs (connector, started_at);

-- The remote records a run listed that no link names: kept until the
-- listing is complete, then matched by email, checked for duplicates and
-- imported (never held in memory).
CREATE TABLE reconciliation_unlinked (
    run_id    TEXT   NOT NULL,
    remote_id TEXT   NOT NULL,
    email     TEXT,                                   -- lower-cased
    record    TEXT   NOT NULL,                        -- canonical JSON
    listed_at_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, remote_id)
);
CREATE INDEX reconciliation_unlinked_email ON reconciliation_unlinked (run_id, email);

-- The linked remote records a run saw, for finding links whose record is gone.
CREATE TABLE reconciliation_seen (
    run_id    TEXT NOT NULL,
    remote_id TEXT NOT NULL,
    PRIMARY KEY (run_id, remote_id)
);

CREATE TABLE reconciliation_mismatches (
    id          TEXT   NOT NULL PRIMARY KEY,          -- mm_…, in creation order
    run_id      TEXT   NOT NULL,
    kind        TEXT   NOT NULL CHECK (kind IN ('different', 'missing_local', 'missing_remote', 'orphan', 'duplicate', 'unlinked')),
    remote_id   TEXT,
    customer_id TEXT,
    fields      TEXT   NOT NULL,                      -- JSON array: field, local, remote, base
    record      TEXT,                                 -- the remote record, canonical JSON
    detail      TEXT,
    state       TEXT   NOT NULL CHECK (state IN ('open', 'repaired', 'resolved', 'skipped')),
    repair      TEXT,                                 -- what the run or a person did
    created_at  TEXT NOT NULL,
    resolved_at TEXT
);
CREATE INDEX reconciliation_mismatches_run ON reconciliation_mismatches (run_id, id);

-- A push a repair forces (the remote drifted from what ferry last pushed):
-- counted into the idempotency key, so the remote does not replay the
-- earlier answer to the same version's key.
ALTER TABLE sync_links ADD COLUMN repairs INTEGER NOT NULL DEFAULT 0;

-- A conflict policy an inbox event is applied with instead of the
-- configured one (a reconciliation's pull_remote: prefer_remote).
ALTER TABLE inbox ADD COLUMN policy TEXT;
