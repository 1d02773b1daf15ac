//! `/api/v1/connectors`: the loaded connectors, their configuration
//! (settings, secrets, enabled) and their circuit breakers.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, FieldError, Problem};
use super::extract::{parse_json, JsonBody, Principal};
use crate::app::{AppState, LoadedConnector};
use crate::connector_settings::ConfigSource;
use crate::store::connector_configs::StoredConnectorConfig;
use crate::sync::breaker::BreakerView;

/// A loaded connector and how it is configured.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorSummary {
    /// The manifest name connectors are addressed by.
    pub name: String,
    /// sha256 of the component bytes, hex.
    pub sha256: String,
    /// The manifest the component declared.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// Whether ferry syncs through it.
    pub enabled: bool,
    /// Where its configuration comes from: `api`, `environment` or `none`.
    pub config_source: ConfigSource,
    /// Its non-secret settings.
    pub settings: BTreeMap<String, String>,
    /// The names of the secrets that have a value (never the values).
    pub secrets: Vec<String>,
    /// A configuration problem, e.g. secrets that cannot be decrypted.
    pub problem: Option<String>,
    /// This replica's circuit breaker for it.
    pub breaker: BreakerView,
}

/// The loaded connectors.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorList {
    /// Connectors in name order.
    pub data: Vec<ConnectorSummary>,
}

/// A connector's configuration, as written.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    /// Whether ferry syncs through the connector (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Non-secret settings by name, as the manifest declares them.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Secret values by name. Omitted: the stored secrets are kept. `{}`:
    /// they are removed. Stored encrypted; never returned.
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    pub secrets: Option<BTreeMap<String, SecretString>>,
}

fn yes() -> bool {
    true
}

async fn summary(
    state: &AppState,
    name: &str,
    loaded: &LoadedConnector,
) -> Result<ConnectorSummary, ApiError> {
    let manifest = serde_json::to_value(loaded.connector.manifest())
        .map_err(|e| ApiError::Internal(e.into()))?;
    let effective = state.connector_settings.get(name).await?;
    Ok(ConnectorSummary {
        name: name.to_owned(),
        sha256: loaded.sha256.clone(),
        manifest,
        enabled: effective.enabled,
        config_source: effective.source,
        settings: effective.config.settings.clone(),
        secrets: effective.secret_names.clone(),
        problem: effective.problem.clone(),
        breaker: state.sync.breakers().view(name),
    })
}

async fn loaded(state: &AppState, name: &str) -> Result<LoadedConnector, ApiError> {
    state
        .connectors
        .read()
        .await
        .get(name)
        .cloned()
        .ok_or(ApiError::ConnectorNotFound)
}

/// List loaded connectors.
///
/// The connectors found in the connectors directory at start, with their
/// manifests, configuration (secret names only) and circuit breakers.
#[utoipa::path(
    get, path = "/api/v1/connectors", tag = "connectors",
    responses(
        (status = 200, description = "Loaded connectors", body = ConnectorList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_connectors(
    State(state): State<AppState>,
    _principal: Principal,
) -> Result<Json<ConnectorList>, ApiError> {
    let registry: Vec<(String, LoadedConnector)> = state
        .connectors
        .read()
        .await
        .iter()
        .map(|(n, l)| (n.clone(), l.clone()))
        .collect();
    let mut data = Vec::with_capacity(registry.len());
    for (name, loaded) in &registry {
        data.push(summary(&state, name, loaded).await?);
    }
    Ok(Json(ConnectorList { data }))
}

/// Get one connector.
#[utoipa::path(
    get, path = "/api/v1/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    responses(
        (status = 200, description = "The connector", body = ConnectorSummary),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_connector(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<ConnectorSummary>, ApiError> {
    let connector = loaded(&state, &name).await?;
    Ok(Json(summary(&state, &name, &connector).await?))
}

/// Configure a connector.
///
/// Replaces the connector's settings and enabled flag (and its secrets, if
/// `secrets` is given). Names are checked against the manifest; an enabled
/// connector must have every required setting and secret. Secrets are
/// stored encrypted with `FERRY_MASTER_KEY` and never returned. Every
/// replica picks the change up within two seconds. Configuration stored
/// here takes precedence over `FERRY_CONNECTORS__*` variables.
#[utoipa::path(
    put, path = "/api/v1/connectors/{name}/settings", tag = "connectors",
    params(("name" = String, Path, description = "Connector name")),
    request_body = PutSettings,
    responses(
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The connector as now configured", body = ConnectorSummary),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Secrets given but no master key is configured", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing settings", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn put_settings(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<ConnectorSummary>, ApiError> {
    let connector = loaded(&state, &name).await?;
    let request: PutSettings = parse_json(&body)?;
    let manifest = connector.connector.manifest();
    let previous = state
        .store
        .connector_configs()
        .await?
        .into_iter()
        .find(|c| c.connector == name);

    let mut errors = Vec::new();
    for key in request.settings.keys() {
        if !manifest.settings.iter().any(|s| &s.name == key) {
            errors.push(FieldError::new(
                format!("settings.{key}"),
                "not a setting of this connector",
            ));
        }
    }
    if let Some(secrets) = &request.secrets {
        for key in secrets.keys() {
            if !manifest.secrets.iter().any(|s| &s.name == key) {
                errors.push(FieldError::new(
                    format!("secrets.{key}"),
                    "not a secret of this connector",
                ));
            }
        }
    }
    let secret_names: Vec<String> = match (&request.secrets, &previous) {
        (Some(secrets), _) => secrets.keys().cloned().collect(),
        (None, Some(previous)) => previous.secret_names.clone(),
        (None, None) => Vec::new(),
    };
    if request.enabled {
        for spec in &manifest.settings {
            if spec.required && spec.default.is_none() && !request.settings.contains_key(&spec.name)
            {
                errors.push(FieldError::new(
                    format!("settings.{}", spec.name),
                    "required by this connector",
                ));
            }
        }
        for spec in &manifest.secrets {
            if spec.required && !secret_names.contains(&spec.name) {
                errors.push(FieldError::new(
                    format!("secrets.{}", spec.name),
                    "required by this connector",
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    let sealed_secrets = match &request.secrets {
        Some(secrets) if secrets.is_empty() => None,
        Some(secrets) => {
            let secret_box = state
                .connector_settings
                .secret_box()
                .ok_or(ApiError::MasterKeyRequired)?;
            Some(secret_box.seal(secrets))
        }
        None => previous.and_then(|p| p.sealed_secrets),
    };
    state
        .store
        .put_connector_config(&StoredConnectorConfig {
            connector: name.clone(),
            enabled: request.enabled,
            settings: request.settings,
            sealed_secrets,
            secret_names,
            updated_at: chrono::Utc::now(),
        })
        .await?;
    state.connector_settings.invalidate().await;
    tracing::info!(connector = %name, enabled = request.enabled, "connector configured");
    Ok(Json(summary(&state, &name, &connector).await?))
}

/// Routes under `/api/v1/connectors`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/connectors", get(list_connectors))
        .route("/connectors/{name}", get(get_connector))
        .route("/connectors/{name}/settings", put(put_settings))
}
