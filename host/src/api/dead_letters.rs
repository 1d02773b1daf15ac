//! `/api/v1/dead-letters`: syncs ferry gave up on, and their replay.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{
    is_id, next_cursor, page_limit, parse_json, text_param, JsonBody, Principal, QueryPairs,
};
use crate::app::AppState;
use crate::store::{DeadLetter, ListDeadLetters};

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    /// Oldest first.
    pub data: Vec<DeadLetter>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// Which dead letters to replay in bulk.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkReplay {
    /// Replay every open dead letter of this connector.
    pub connector: String,
    /// Only those of this direction (`outbound` or `inbound`): the cause
    /// fixed may be one side's only (a mapping that refused inbound
    /// records), and a replay pushes the other side's again too.
    #[serde(default)]
    pub direction: Option<String>,
}

/// The dead letters a replay re-opened.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayResult {
    /// How many were replayed.
    pub replayed: usize,
    /// Their ids.
    pub ids: Vec<String>,
}

/// List dead letters.
///
/// Open dead letters (not yet replayed), oldest first. `connector` and
/// `direction` filter; `include_replayed=true` shows replayed ones too.
#[utoipa::path(
    get, path = "/api/v1/dead-letters", tag = "sync",
    params(
        ("connector" = Option<String>, Query, description = "Only this connector's"),
        ("direction" = Option<String>, Query, description = "outbound or inbound"),
        ("include_replayed" = Option<bool>, Query, description = "Include replayed dead letters"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_dead_letters(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<DeadLetterList>, ApiError> {
    let mut request = ListDeadLetters {
        limit: DEFAULT_LIMIT,
        ..ListDeadLetters::default()
    };
    for (name, value) in pairs {
        match name.as_str() {
            "connector" => request.connector = Some(text_param("connector", value)?),
            "direction" if value == "outbound" || value == "inbound" => {
                request.direction = Some(value);
            }
            "direction" => return Err(ApiError::field("direction", "must be outbound or inbound")),
            "include_replayed" => {
                request.include_replayed = value
                    .parse()
                    .map_err(|_| ApiError::field("include_replayed", "must be true or false"))?;
            }
            "starting_after" => request.starting_after = Some(text_param("starting_after", value)?),
            "limit" => request.limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let limit = request.limit;
    request.limit += 1;
    let mut data = state.store.dead_letters(&request).await?;
    let next_cursor = next_cursor(&mut data, limit, |d| d.id.clone());
    Ok(Json(DeadLetterList { data, next_cursor }))
}

/// Get one dead letter.
#[utoipa::path(
    get, path = "/api/v1/dead-letters/{id}", tag = "sync",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetter),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_dead_letter(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<DeadLetter>, ApiError> {
    if !is_id(&id, "dl_") {
        return Err(ApiError::DeadLetterNotFound);
    }
    let letter = state
        .store
        .dead_letter(&id)
        .await?
        .ok_or(ApiError::DeadLetterNotFound)?;
    Ok(Json(letter))
}

/// Replay one dead letter.
///
/// Schedules the sync again with a fresh attempt budget; it pushes the
/// customer's *current* state. Fix the cause first (the customer's data,
/// the connector's settings or secrets). Replaying an already replayed
/// dead letter is a no-op that answers `replayed: 0`.
#[utoipa::path(
    post, path = "/api/v1/dead-letters/{id}/replay", tag = "sync",
    params(("id" = String, Path, description = "Dead letter id")),
    responses(
        (status = 200, description = "Replayed", body = ReplayResult),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dead letter, or its connector was deleted", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ReplayResult>, ApiError> {
    if !is_id(&id, "dl_") {
        return Err(ApiError::DeadLetterNotFound);
    }
    let letter = state
        .store
        .dead_letter(&id)
        .await?
        .ok_or(ApiError::DeadLetterNotFound)?;
    registered(&state, &letter.connector).await?;
    let replayed = state
        .store
        .replay_dead_letters(Some(std::slice::from_ref(&id)), None, None)
        .await?;
    Ok(Json(done(replayed)))
}

/// Replay every open dead letter of a connector.
#[utoipa::path(
    post, path = "/api/v1/dead-letters/replay", tag = "sync",
    request_body = BulkReplay,
    responses(
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "Replayed", body = ReplayResult),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector (deleted, or never registered)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn replay_dead_letters(
    State(state): State<AppState>,
    _principal: Principal,
    JsonBody(body): JsonBody,
) -> Result<Json<ReplayResult>, ApiError> {
    let request: BulkReplay = parse_json(&body)?;
    let connector = text_param("connector", request.connector)?;
    let direction = match request.direction.as_deref() {
        None | Some("outbound" | "inbound") => request.direction.as_deref(),
        Some(_) => return Err(ApiError::field("direction", "must be outbound or inbound")),
    };
    registered(&state, &connector).await?;
    let replayed = state
        .store
        .replay_dead_letters(None, Some(&connector), direction)
        .await?;
    Ok(Json(done(replayed)))
}

/// 404 `connector_not_found` unless `connector` is registered (asked of
/// the store when this replica's view lacks it: an upload on another
/// replica reaches it within a second). A deleted connector's letters stay
/// open, for the record and for the connector's return: replayed, their
/// links were settled as skipped ("the connector was deleted") and read
/// `synced`, and the letter, the only trace of the undelivered change, was
/// closed, as was a letter of a mistyped name's: a silent `replayed: 0`.
async fn registered(state: &AppState, connector: &str) -> Result<(), ApiError> {
    let registry = &state.registry;
    if registry.entry(connector).is_none() {
        registry.refresh().await?;
        if registry.entry(connector).is_none() {
            return Err(ApiError::ConnectorNotFound);
        }
    }
    Ok(())
}

fn done(replayed: Vec<String>) -> ReplayResult {
    tracing::info!(replayed = replayed.len(), "dead letters replayed");
    ReplayResult {
        replayed: replayed.len(),
        ids: replayed,
    }
}

/// Routes under `/api/v1/dead-letters`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/replay", post(replay_dead_letters))
        .route("/dead-letters/{id}", get(get_dead_letter))
        .route("/dead-letters/{id}/replay", post(replay_dead_letter))
}
