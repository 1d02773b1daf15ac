-- The connector registry (PostgreSQL): every version of every connector,
-- which one is active, and whether the connector runs. Same shape as
-- migrations/sqlite. Replicas poll `connectors.revision` to pick up changes
-- (see host/src/registry/mod.rs).

CREATE TABLE connectors (
    name           TEXT    NOT NULL PRIMARY KEY,
    active_version TEXT,                          -- NULL: nothing active (none yet, or deleted)
    activated_by   TEXT    NOT NULL CHECK (activated_by IN ('bundle', 'api')), -- who chose active_version
    enabled        BOOLEAN,                       -- NULL: follow the file/environment configuration
    deleted_at     TIMESTAMPTZ,                   -- set: deleted; a bundled copy is not seeded again
    revision       BIGINT  NOT NULL DEFAULT 1,    -- bumped by every change to the connector
    updated_at     TIMESTAMPTZ NOT NULL
);

CREATE TABLE connector_versions (
    name        TEXT   NOT NULL,
    version     TEXT   NOT NULL,                  -- the manifest's semantic version
    sha256      TEXT   NOT NULL UNIQUE,           -- hex, of the component bytes
    world       TEXT   NOT NULL,                  -- the ferry:connector version it targets
    manifest    JSONB  NOT NULL,
    component   BYTEA  NOT NULL,
    size_bytes  BIGINT NOT NULL,
    source      TEXT   NOT NULL CHECK (source IN ('bundled', 'upload')),
    uploaded_by TEXT   NOT NULL,                  -- `admin`, `open` (no token configured) or the bundle's path
    uploaded_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (name, version)
);

-- Enablement moves here from connector_configs: it is a switch of its own,
-- not part of the settings (disabling must not drop settings from the
-- environment).
INSERT INTO connectors (name, active_version, activated_by, enabled, revision, updated_at)
    SELECT connector, NULL, 'bundle', enabled, 1, updated_at FROM connector_configs;
ALTER TABLE connector_configs DROP COLUMN enabled;
