//! Connector configuration written through the API: settings in clear,
//! secrets sealed by [`crate::secrets::SecretBox`] (the store never sees
//! them in clear).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{dispatch, now, Store, StoreError};

/// One `connector_configs` row.
#[derive(Debug, Clone)]
pub struct StoredConnectorConfig {
    /// The connector's manifest name.
    pub connector: String,
    /// Non-secret settings.
    pub settings: BTreeMap<String, String>,
    /// The sealed secrets, if any.
    pub sealed_secrets: Option<Vec<u8>>,
    /// The names of the sealed secrets.
    pub secret_names: Vec<String>,
    /// Last write.
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct Row {
    connector: String,
    settings: Json<BTreeMap<String, String>>,
    secrets: Option<Vec<u8>>,
    secret_names: Json<Vec<String>>,
    updated_at: DateTime<Utc>,
}

impl From<Row> for StoredConnectorConfig {
    fn from(row: Row) -> Self {
        Self {
            connector: row.connector,
            settings: row.settings.0,
            sealed_secrets: row.secrets,
            secret_names: row.secret_names.0,
            updated_at: row.updated_at,
        }
    }
}

impl Store {
    /// Replaces a connector's stored configuration and sets its enabled
    /// switch, in one transaction that bumps the connector's revision (so
    /// every replica reloads it). With `revision`, only over that revision:
    /// the caller built `config` from what it held then (a secret kept from
    /// the view of that revision), and a change committed since must not be
    /// written over. `None` if the connector is deleted, or moved past
    /// `revision`.
    #[tracing::instrument(skip_all, fields(connector = %config.connector))]
    pub async fn put_connector_config(
        &self,
        config: &StoredConnectorConfig,
        enabled: Option<bool>,
        revision: Option<i64>,
    ) -> Result<Option<StoredConnectorConfig>, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            // First, and only for a live connector: a delete that committed
            // meanwhile would otherwise get its settings, its secrets and
            // its switch back, for the next upload of the name to start
            // with. Dropping the transaction rolls it back.
            let live = sqlx::query(
                "UPDATE connectors SET enabled = COALESCE($2, enabled), revision = revision + 1, updated_at = $3 \
                 WHERE name = $1 AND deleted_at IS NULL \
                 AND (CAST($4 AS BIGINT) IS NULL OR revision = $4)",
            )
            .bind(&config.connector)
            .bind(enabled)
            .bind(at)
            .bind(revision)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if live != 1 {
                return Ok(None);
            }
            sqlx::query(
                "INSERT INTO connector_configs (connector, settings, secrets, secret_names, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (connector) DO UPDATE SET \
                 settings = excluded.settings, secrets = excluded.secrets, \
                 secret_names = excluded.secret_names, updated_at = excluded.updated_at",
            )
            .bind(&config.connector)
            .bind(Json(&config.settings))
            .bind(&config.sealed_secrets)
            .bind(Json(&config.secret_names))
            .bind(at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(Some(StoredConnectorConfig {
            updated_at: at,
            ..config.clone()
        }))
    }

    /// Every stored connector configuration.
    pub async fn connector_configs(&self) -> Result<Vec<StoredConnectorConfig>, StoreError> {
        let rows: Vec<Row> = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT connector, settings, secrets, secret_names, updated_at \
                 FROM connector_configs ORDER BY connector",
            )
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(StoredConnectorConfig::from).collect())
    }
}
