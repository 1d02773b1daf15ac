//! `GET /api/v1/customers/{id}/sync`: where a customer stands with each
//! connector.

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::error::{ApiError, Problem};
use crate::api::extract::{page_limit, Principal, QueryPairs};
use crate::app::AppState;
use crate::store::inbox::InboxEvent;
use crate::store::{CustomerId, Delivery, LinkState};

/// How many recent deliveries and inbound events the status shows, unless
/// `history` asks for more.
const HISTORY: u32 = 20;
/// The most `history` may ask for.
const MAX_HISTORY: u32 = 1_000;

/// A customer's sync with one connector.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorSync {
    /// The connector.
    pub connector: String,
    /// The remote record's id, once linked.
    pub remote_id: Option<String>,
    /// Whether ferry deleted the remote record.
    pub remote_deleted: bool,
    /// The newest local version the remote holds.
    pub synced_version: i64,
    /// The newest local version seen.
    pub wanted_version: i64,
    /// `pending`, `retry`, `synced` or `dead`.
    pub state: LinkState,
    /// Failed attempts since the last success.
    pub attempts: i32,
    /// For `pending`/`retry`: when the next attempt is due, unix ms.
    pub next_attempt_at_ms: Option<i64>,
    /// The last error.
    pub last_error: Option<String>,
    /// When this was last updated.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A customer's sync status.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerSync {
    /// The customer.
    pub customer_id: String,
    /// The customer's current version.
    pub version: i64,
    /// One entry per connector the customer was scheduled for.
    pub connectors: Vec<ConnectorSync>,
    /// The most recent outbound delivery outcomes, newest first.
    pub history: Vec<Delivery>,
    /// The most recent inbound events applied to (or skipped for) this
    /// customer, newest first, with their outcome (`state`, `detail`) and
    /// correlation id.
    pub inbound: Vec<InboxEvent>,
}

/// Sync status of a customer.
///
/// Per connector: the remote id, the synced version, the state and the last
/// error; then the latest outbound delivery outcomes and inbound events
/// (`history` of each, default 20, at most 1,000; retention bounds how far
/// back they go). Works for deleted customers too.
#[utoipa::path(
    get, path = "/api/v1/customers/{id}/sync", tag = "sync",
    params(
        ("id" = String, Path, description = "Customer id", pattern = "^cus_[0-9a-f]{32}$"),
        ("history" = Option<u32>, Query, description = "How many recent deliveries and inbound events, 1 to 1000 (default 20)", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "The sync status", body = CustomerSync),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid `history`", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn customer_sync(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<CustomerSync>, ApiError> {
    let mut count = HISTORY;
    for (name, value) in pairs {
        if name == "history" {
            count = page_limit(&value, MAX_HISTORY).map_err(|_| {
                ApiError::field(
                    "history",
                    format!("must be an integer from 1 to {MAX_HISTORY}"),
                )
            })?;
        }
    }
    let id = CustomerId::parse(&id).ok_or(ApiError::CustomerNotFound)?;
    let customer = state
        .store
        .get_customer_any(id.as_str())
        .await?
        .ok_or(ApiError::CustomerNotFound)?;
    let links = state.store.links_of(id.as_str()).await?;
    let history = state.store.deliveries_of(id.as_str(), count).await?;
    let inbound = state.store.inbox_of(id.as_str(), count).await?;
    let connectors = links
        .into_iter()
        .map(|link| ConnectorSync {
            next_attempt_at_ms: matches!(link.state, LinkState::Pending | LinkState::Retry)
                .then_some(link.next_attempt_at_ms),
            connector: link.connector,
            remote_id: link.remote_id,
            remote_deleted: link.remote_deleted,
            synced_version: link.synced_version,
            wanted_version: link.wanted_version,
            state: link.state,
            attempts: link.attempts,
            last_error: link.last_error,
            updated_at: link.updated_at,
        })
        .collect();
    Ok(Json(CustomerSync {
        customer_id: id.as_str().to_owned(),
        version: customer.version,
        connectors,
        history,
        inbound,
    }))
}
