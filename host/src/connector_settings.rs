//! Each connector's effective configuration: what the operator stored
//! through the API (`PUT /api/v1/connectors/{name}/settings`), else what the
//! file or environment gives (`FERRY_CONNECTORS__{NAME}__...`).
//!
//! Stored configuration is re-read at most every [`REFRESH`], so every
//! replica of a cluster picks up a change without a restart; the replica
//! that wrote it sees it at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::RwLock;
use utoipa::ToSchema;

use crate::config::ConnectorSettingsConfig;
use crate::runtime::ConnectorConfig;
use crate::secrets::SecretBox;
use crate::store::connector_configs::StoredConnectorConfig;
use crate::store::{Store, StoreError};

/// How stale another replica's view of stored settings may get.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Where a connector's configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// Stored through the API.
    Api,
    /// The configuration file or environment.
    Environment,
    /// Nothing configured: the connector is loaded but not synced.
    None,
}

/// A connector's effective configuration.
#[derive(Debug, Clone)]
pub struct EffectiveConfig {
    /// Whether ferry syncs through the connector.
    pub enabled: bool,
    /// What the runtime hands the connector's calls.
    pub config: Arc<ConnectorConfig>,
    /// Where it came from.
    pub source: ConfigSource,
    /// Names of the secrets that have a value.
    pub secret_names: Vec<String>,
    /// Set when stored secrets could not be opened (wrong master key).
    pub problem: Option<String>,
}

impl EffectiveConfig {
    fn unconfigured() -> Self {
        Self {
            enabled: false,
            config: Arc::default(),
            source: ConfigSource::None,
            secret_names: Vec::new(),
            problem: None,
        }
    }
}

struct Cache {
    loaded_at: Option<Instant>,
    stored: BTreeMap<String, EffectiveConfig>,
    /// Bumped by [`ConnectorSettings::invalidate`]: a refresh that read the
    /// table before the bump may hold rows older than the write that caused
    /// it, and must not install them.
    generation: u64,
}

/// The effective configuration of every connector.
pub struct ConnectorSettings {
    store: Store,
    environment: BTreeMap<String, EffectiveConfig>,
    secret_box: Option<SecretBox>,
    cache: RwLock<Cache>,
}

impl ConnectorSettings {
    /// Settings from `environment` (the config file and `FERRY_CONNECTORS__*`)
    /// overlaid by what `store` holds; `secret_box` opens stored secrets.
    pub fn new(
        store: Store,
        environment: &BTreeMap<String, ConnectorSettingsConfig>,
        secret_box: Option<SecretBox>,
    ) -> Self {
        let environment = environment
            .iter()
            .map(|(name, env)| {
                let configured = !env.settings.is_empty() || !env.secrets.is_empty();
                let effective = EffectiveConfig {
                    enabled: env.enabled.unwrap_or(configured),
                    config: Arc::new(ConnectorConfig {
                        settings: env.settings.clone(),
                        secrets: env.secrets.clone(),
                    }),
                    source: ConfigSource::Environment,
                    secret_names: env.secrets.keys().cloned().collect(),
                    problem: None,
                };
                (name.clone(), effective)
            })
            .collect();
        Self {
            store,
            environment,
            secret_box,
            cache: RwLock::new(Cache {
                loaded_at: None,
                generation: 0,
                stored: BTreeMap::new(),
            }),
        }
    }

    /// The box that seals secrets, if a master key is configured.
    pub fn secret_box(&self) -> Option<&SecretBox> {
        self.secret_box.as_ref()
    }

    /// The effective configuration of `name`.
    pub async fn get(&self, name: &str) -> Result<EffectiveConfig, StoreError> {
        self.refresh_if_stale().await?;
        let cache = self.cache.read().await;
        Ok(cache
            .stored
            .get(name)
            .or_else(|| self.environment.get(name))
            .cloned()
            .unwrap_or_else(EffectiveConfig::unconfigured))
    }

    /// Forgets the cached stored settings (after this replica wrote some).
    pub async fn invalidate(&self) {
        let mut cache = self.cache.write().await;
        cache.loaded_at = None;
        cache.generation += 1;
    }

    async fn refresh_if_stale(&self) -> Result<(), StoreError> {
        loop {
            let generation = {
                let cache = self.cache.read().await;
                if cache.loaded_at.is_some_and(|at| at.elapsed() < REFRESH) {
                    return Ok(());
                }
                cache.generation
            };
            let rows = self.store.connector_configs().await?;
            let stored = rows
                .into_iter()
                .map(|row| (row.connector.clone(), self.effective(row)))
                .collect();
            let mut cache = self.cache.write().await;
            if cache.generation != generation {
                // Invalidated while we read: what we read may predate the
                // write (e.g. a connector just disabled). Read again.
                continue;
            }
            cache.stored = stored;
            cache.loaded_at = Some(Instant::now());
            return Ok(());
        }
    }

    fn effective(&self, row: StoredConnectorConfig) -> EffectiveConfig {
        let (secrets, problem) = match (&row.sealed_secrets, &self.secret_box) {
            (None, _) => (BTreeMap::new(), None),
            (Some(sealed), Some(secret_box)) => match secret_box.open(sealed) {
                Ok(secrets) => (secrets, None),
                Err(error) => (BTreeMap::new(), Some(error.to_string())),
            },
            (Some(_), None) => (
                BTreeMap::new(),
                Some("stored secrets need FERRY_MASTER_KEY to be opened".to_owned()),
            ),
        };
        if let Some(problem) = &problem {
            tracing::error!(connector = %row.connector, problem, "connector secrets unavailable");
        }
        EffectiveConfig {
            enabled: row.enabled,
            config: Arc::new(ConnectorConfig {
                settings: row.settings,
                secrets,
            }),
            source: ConfigSource::Api,
            secret_names: row.secret_names,
            problem,
        }
    }
}
