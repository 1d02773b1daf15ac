//! `/api/v1/connectors`: the connectors this process has loaded.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::Principal;
use crate::app::AppState;

/// A loaded connector.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorSummary {
    /// The manifest name connectors are addressed by.
    pub name: String,
    /// sha256 of the component bytes, hex.
    pub sha256: String,
    /// The manifest the component declared.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

/// The loaded connectors.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorList {
    /// Connectors in name order.
    pub data: Vec<ConnectorSummary>,
}

/// List loaded connectors.
///
/// The connectors found in the connectors directory at start, with their
/// manifests and component hashes.
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
    let registry = state.connectors.read().await;
    let mut data = Vec::with_capacity(registry.len());
    for (name, loaded) in registry.iter() {
        let manifest = serde_json::to_value(loaded.connector.manifest())
            .map_err(|e| ApiError::Internal(e.into()))?;
        data.push(ConnectorSummary {
            name: name.clone(),
            sha256: loaded.sha256.clone(),
            manifest,
        });
    }
    Ok(Json(ConnectorList { data }))
}

/// Routes under `/api/v1/connectors`.
pub fn router() -> Router<AppState> {
    Router::new().route("/connectors", get(list_connectors))
}
