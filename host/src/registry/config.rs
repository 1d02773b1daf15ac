//! A connector's effective configuration and switch: what the operator
//! stored through the API (`PUT /api/v1/connectors/{name}/settings`, the
//! enable and disable calls), else what the file or environment gives
//! (`FERRY_CONNECTORS__{NAME}__...`).

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use utoipa::ToSchema;

use crate::config::ConnectorSettingsConfig;
use crate::runtime::{ConnectorConfig, Manifest};
use crate::secrets::SecretBox;
use crate::store::connector_configs::StoredConnectorConfig;

/// Where a connector's configuration comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// Stored through the API.
    Api,
    /// The configuration file or environment.
    Environment,
    /// Nothing configured.
    None,
}

/// Whether ferry syncs through a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Switch {
    /// Changes are pushed and webhooks accepted.
    Enabled,
    /// Paused: changes queue for it without spending attempts, its webhooks
    /// answer 404. Enabling it pushes what queued.
    Disabled,
    /// Loaded but never switched on: no changes queue for it.
    Unconfigured,
}

/// A connector's effective configuration.
#[derive(Debug, Clone)]
pub struct EffectiveConfig {
    /// The switch.
    pub switch: Switch,
    /// What the runtime hands the connector's calls.
    pub config: Arc<ConnectorConfig>,
    /// Where it came from.
    pub source: ConfigSource,
    /// Names of the secrets that have a value.
    pub secret_names: Vec<String>,
    /// Set when stored secrets could not be opened (wrong master key).
    pub problem: Option<String>,
}

/// The operator's switch (`None`: not set through the API), the stored
/// configuration and the environment's, combined. `switched_on`: whether
/// it was ever switched on (see [`crate::store::ConnectorRow::switched_on`]).
pub(crate) fn effective(
    name: &str,
    switch: Option<bool>,
    switched_on: bool,
    stored: Option<&StoredConnectorConfig>,
    environment: Option<&ConnectorSettingsConfig>,
    secret_box: Option<&SecretBox>,
) -> EffectiveConfig {
    let environment_switch = environment.map_or(Switch::Unconfigured, |env| {
        let configured = !env.settings.is_empty() || !env.secrets.is_empty();
        match env.enabled {
            Some(true) => Switch::Enabled,
            // As the API's disable: one never switched on stays so. Paused,
            // `ENABLED=false` (a deployment that does not use it) queued
            // every customer's change for it, and a later enable made them
            // all as creates beside the records a backfill would have linked.
            Some(false) if switched_on => Switch::Disabled,
            Some(false) => Switch::Unconfigured,
            None if configured => Switch::Enabled,
            None => Switch::Unconfigured,
        }
    });
    let switch = match switch {
        Some(true) => Switch::Enabled,
        Some(false) => Switch::Disabled,
        None => environment_switch,
    };
    match (stored, environment) {
        (Some(row), _) => {
            let (secrets, problem) = match (&row.sealed_secrets, secret_box) {
                (None, _) => (BTreeMap::new(), None),
                (Some(sealed), Some(secret_box)) => match secret_box.open(name, sealed) {
                    // Stored before they were trimmed on the way in.
                    Ok(secrets) => (
                        secrets
                            .iter()
                            .map(|(name, value)| (name.clone(), super::trimmed_secret(value)))
                            .collect(),
                        None,
                    ),
                    Err(error) => (BTreeMap::new(), Some(error.to_string())),
                },
                (Some(_), None) => (
                    BTreeMap::new(),
                    Some("stored secrets need FERRY_MASTER_KEY to be opened".to_owned()),
                ),
            };
            if let Some(problem) = &problem {
                tracing::error!(connector = name, problem, "connector secrets unavailable");
            }
            EffectiveConfig {
                switch,
                config: Arc::new(ConnectorConfig {
                    settings: row.settings.clone(),
                    secrets,
                }),
                source: ConfigSource::Api,
                secret_names: row.secret_names.clone(),
                problem,
            }
        }
        (None, Some(env)) => {
            // A blank secret (a variable left unset in a compose file, read
            // as "") is no secret: a required one is missing, so the
            // connector waits and says so, rather than sign with a key
            // anyone knows.
            let secrets: BTreeMap<String, SecretString> = env
                .secrets
                .iter()
                .filter(|(_, value)| !value.expose_secret().trim().is_empty())
                .map(|(name, value)| (name.clone(), super::trimmed_secret(value)))
                .collect();
            EffectiveConfig {
                switch,
                secret_names: secrets.keys().cloned().collect(),
                config: Arc::new(ConnectorConfig {
                    settings: env.settings.clone(),
                    secrets,
                }),
                source: ConfigSource::Environment,
                problem: None,
            }
        }
        (None, None) => EffectiveConfig {
            switch,
            config: Arc::default(),
            source: ConfigSource::None,
            secret_names: Vec::new(),
            problem: None,
        },
    }
}

/// One problem with a connector's configuration, by field (`settings.NAME`
/// or `secrets.NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsProblem {
    /// `settings.NAME` or `secrets.NAME`.
    pub field: String,
    /// What is wrong.
    pub message: std::borrow::Cow<'static, str>,
}

impl SettingsProblem {
    pub(crate) fn new(field: String, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }
}

/// The message of a required setting or secret without a value.
const REQUIRED: &str = "required by this connector";

/// The message of a secret given an empty value.
pub(crate) const BLANK_SECRET: &str = "a secret cannot be empty";

/// Checks names against `manifest`: settings and secrets it does not
/// declare, and (if the connector is to run) required ones without a value.
pub(crate) fn check_against_manifest<'a>(
    manifest: &Manifest,
    settings: impl Iterator<Item = &'a String> + Clone,
    secrets: impl Iterator<Item = &'a String> + Clone,
    running: bool,
) -> Vec<SettingsProblem> {
    let mut problems = Vec::new();
    for key in settings.clone() {
        if !manifest.settings.iter().any(|s| &s.name == key) {
            problems.push(SettingsProblem::new(
                format!("settings.{key}"),
                "not a setting of this connector",
            ));
        }
    }
    for key in secrets.clone() {
        if !manifest.secrets.iter().any(|s| &s.name == key) {
            problems.push(SettingsProblem::new(
                format!("secrets.{key}"),
                "not a secret of this connector",
            ));
        }
    }
    if running {
        problems.extend(missing_required(manifest, settings, secrets));
    }
    problems
}

/// The settings (without a default) and secrets `manifest` requires that
/// `settings` and `secrets` do not name, as [`REQUIRED`] problems.
pub(crate) fn missing_required<'a>(
    manifest: &Manifest,
    settings: impl Iterator<Item = &'a String> + Clone,
    secrets: impl Iterator<Item = &'a String> + Clone,
) -> Vec<SettingsProblem> {
    let settings = manifest
        .settings
        .iter()
        .filter(|spec| spec.required && spec.default.is_none())
        .filter(|spec| !settings.clone().any(|k| k == &spec.name))
        .map(|spec| format!("settings.{}", spec.name));
    let secrets = manifest
        .secrets
        .iter()
        .filter(|spec| spec.required)
        .filter(|spec| !secrets.clone().any(|k| k == &spec.name))
        .map(|spec| format!("secrets.{}", spec.name));
    settings
        .chain(secrets)
        .map(|field| SettingsProblem::new(field, REQUIRED))
        .collect()
}
