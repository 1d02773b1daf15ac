//! `/api/v1/reconciliations`: runs that compare a connector's remote
//! records with the catalog, their reports and findings, and resolving a
//! finding by hand. See docs/reconciliation.md.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{
    is_id, next_cursor, page_limit, parse_json, text_param, JsonBody, Principal, QueryPairs,
};
use crate::app::AppState;
use crate::registry::{Need, NotReady};
use crate::store::reconciliations::{scheduling_claim, MismatchRow, RunRow};
use crate::sync::merge::FieldDifference;
use crate::sync::reconcile::{Kind, Mode, Repair, Resolved};
use crate::sync::ENTITY;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;

/// The counts every report has, zero when nothing was found.
const COUNTED: [&str; 12] = [
    "equal",
    "different",
    "missing_local",
    "missing_remote",
    "orphan",
    "duplicate",
    "unlinked",
    "in_flight",
    "invalid",
    "rate_limited",
    "listing_restarted",
    "repairs",
];

/// Start a run.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartReconciliation {
    /// The connector to reconcile.
    pub connector: String,
    /// `reconcile` (default) or `backfill`.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// `report`, `push_local`, `pull_remote` or `merge`. Default: `report`
    /// for `reconcile`, `merge` for `backfill`.
    #[serde(default)]
    pub repair: Option<Repair>,
}

/// Where a running run is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Progress {
    /// `listing`, `classifying`, `repairing` or `done`.
    pub phase: String,
    /// Pages of the connector's `list` read.
    pub pages: i64,
    /// Remote records read.
    pub records: i64,
    /// Records read per second since the run started.
    pub records_per_second: f64,
    /// Whether every page was read (only then are orphans and records
    /// missing remotely reported).
    pub listing_complete: bool,
}

/// A run and its report.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reconciliation {
    /// `rec_…`
    pub id: String,
    /// The connector.
    pub connector: String,
    /// `reconcile` or `backfill`.
    pub mode: String,
    /// `report`, `push_local`, `pull_remote` or `merge`.
    pub repair: String,
    /// `api` or `schedule`.
    pub trigger: String,
    /// `running`, `completed`, `failed` or `aborted`.
    pub status: String,
    /// The report: findings per kind (`equal`, `different`,
    /// `missing_local`, `missing_remote`, `orphan`, `duplicate`,
    /// `unlinked`), linked records not judged because a push or a person's
    /// decision is pending (`in_flight`), listed records that were not valid
    /// JSON (`invalid`), rate-limited waits (`rate_limited`), listings
    /// started again because another connector version became active
    /// (`listing_restarted`), and repairs scheduled (`repairs`).
    pub counts: BTreeMap<String, i64>,
    /// Where it is.
    pub progress: Progress,
    /// Why it failed or aborted.
    pub error: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last step.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<RunRow> for Reconciliation {
    fn from(run: RunRow) -> Self {
        let mut counts: BTreeMap<String, i64> =
            COUNTED.iter().map(|k| ((*k).to_owned(), 0)).collect();
        for (kind, n) in &run.counts.0 {
            counts.insert(kind.clone(), n.as_i64().unwrap_or(0));
        }
        counts.insert("repairs".to_owned(), run.repairs);
        let end = run.finished_at.unwrap_or(run.updated_at);
        #[allow(clippy::cast_precision_loss)]
        let seconds = (end - run.started_at).num_milliseconds().max(1) as f64 / 1000.0;
        #[allow(clippy::cast_precision_loss)]
        let rate = (run.records as f64 / seconds * 10.0).round() / 10.0;
        Self {
            progress: Progress {
                phase: run.phase,
                pages: run.pages,
                records: run.records,
                records_per_second: rate,
                listing_complete: run.listing_complete,
            },
            id: run.id,
            connector: run.connector,
            mode: run.mode,
            repair: run.repair,
            trigger: run.trigger,
            status: run.status,
            counts,
            error: run.error,
            started_at: run.started_at,
            updated_at: run.updated_at,
            finished_at: run.finished_at,
        }
    }
}

/// A page of runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReconciliationList {
    /// Newest first.
    pub data: Vec<Reconciliation>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// One finding of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct Mismatch {
    /// `mm_…`
    pub id: String,
    /// The run that found it.
    pub run_id: String,
    /// `different`, `missing_local`, `missing_remote`, `orphan`,
    /// `duplicate` or `unlinked`.
    pub kind: String,
    /// The remote record, if there is one.
    pub remote_id: Option<String>,
    /// The local customer, if there is one.
    pub customer_id: Option<String>,
    /// The fields that differ, with both values and the last synced one.
    pub fields: Vec<FieldDifference>,
    /// The remote record as listed (canonical JSON).
    #[schema(value_type = Option<Object>)]
    pub record: Option<serde_json::Value>,
    /// More about it.
    pub detail: Option<String>,
    /// `open`, `repaired` (by the run) or `resolved` (by a person).
    pub state: String,
    /// What was done about it.
    pub repair: Option<String>,
    /// When it was found.
    pub created_at: DateTime<Utc>,
    /// When a person resolved it.
    pub resolved_at: Option<DateTime<Utc>>,
}

impl From<MismatchRow> for Mismatch {
    fn from(row: MismatchRow) -> Self {
        Self {
            id: row.id,
            run_id: row.run_id,
            kind: row.kind,
            remote_id: row.remote_id,
            customer_id: row.customer_id,
            fields: serde_json::from_value(row.fields.0).unwrap_or_default(),
            record: row.record.map(|r| r.0),
            detail: row.detail,
            state: row.state,
            repair: row.repair,
            created_at: row.created_at,
            resolved_at: row.resolved_at,
        }
    }
}

/// A page of findings.
#[derive(Debug, Serialize, ToSchema)]
pub struct MismatchList {
    /// In the order they were found.
    pub data: Vec<Mismatch>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// How a person resolves a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResolveAction {
    /// Make the remote match ferry (push, create or delete remotely).
    PushLocal,
    /// Make ferry match the remote (import, update, or apply the remote
    /// delete per the delete policy).
    PullRemote,
    /// The three-way merge with the conflict policy.
    Merge,
    /// Change nothing; close the finding.
    Dismiss,
}

/// A resolution.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveMismatch {
    /// `push_local`, `pull_remote`, `merge` or `dismiss`.
    pub action: ResolveAction,
}

/// Start a reconciliation or backfill run.
///
/// The run starts at once on a worker, pages through the connector's
/// `list`, and writes its report; poll `GET /api/v1/reconciliations/{id}`.
/// One run per connector at a time.
#[utoipa::path(
    post, path = "/api/v1/reconciliations", tag = "reconciliation",
    request_body = StartReconciliation,
    responses(
        (status = 202, description = "Started", body = Reconciliation,
            headers(("Location" = String, description = "The run: `/api/v1/reconciliations/{id}`"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A run of this connector is going (`reconciliation_running`), or the connector cannot run one now: disabled, unconfigured, not loaded or not syncing customers (`connector_not_ready`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid request", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn start_reconciliation(
    State(state): State<AppState>,
    _principal: Principal,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let request: StartReconciliation = parse_json(&body)?;
    let mode = request.mode.unwrap_or(Mode::Reconcile);
    let repair = request.repair.unwrap_or(match mode {
        Mode::Reconcile => Repair::Report,
        Mode::Backfill => Repair::Merge,
    });
    // A backfill holds the connector's creates back to link them to the
    // records it lists; one that links nothing released each beside the
    // record it was held for. What a backfill would find is a reconcile's
    // report.
    if mode == Mode::Backfill && repair == Repair::Report {
        return Err(ApiError::field(
            "repair",
            "a backfill links and repairs; to see what it would find, run mode reconcile with repair report",
        ));
    }
    let run = start(&state, &request.connector, mode, repair).await?;
    let location = format!("/api/v1/reconciliations/{}", run.id);
    let mut response = (StatusCode::ACCEPTED, Json(Reconciliation::from(run))).into_response();
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// Starts a run of `connector` (the API's and the enable-with-backfill
/// path).
pub async fn start(
    state: &AppState,
    connector: &str,
    mode: Mode,
    repair: Repair,
) -> Result<RunRow, ApiError> {
    match state.registry.ready(connector, Need::Entity(ENTITY)) {
        Ok(_) => {}
        Err(NotReady::Unknown) => return Err(ApiError::ConnectorNotFound),
        Err(other) => return Err(ApiError::ConnectorNotReady(other.to_string())),
    }
    begin(state, connector, mode, repair).await
}

/// Stores a running run of `connector`, ready or not (one switched off
/// waits, parked, until it is on); 409 while another runs.
pub async fn begin(
    state: &AppState,
    connector: &str,
    mode: Mode,
    repair: Repair,
) -> Result<RunRow, ApiError> {
    let started = state
        .store
        .start_run(connector, mode.as_str(), repair.as_str(), "api")
        .await?;
    let Some(run) = started else {
        let running = state
            .store
            .latest_run(connector)
            .await?
            .map(|r| r.id)
            .unwrap_or_default();
        return Err(ApiError::ReconciliationRunning(running));
    };
    tracing::info!(
        run_id = run.id,
        connector,
        mode = mode.as_str(),
        repair = repair.as_str(),
        "reconciliation started"
    );
    Ok(run)
}

/// List runs.
///
/// Query: `connector`, `limit` (1–500), `starting_after`.
#[utoipa::path(
    get, path = "/api/v1/reconciliations", tag = "reconciliation",
    params(
        ("connector" = Option<String>, Query, description = "Only this connector's"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "Runs, newest first", body = ReconciliationList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_reconciliations(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<ReconciliationList>, ApiError> {
    let (mut connector, mut after, mut limit) = (None, None, DEFAULT_LIMIT);
    for (name, value) in pairs {
        match name.as_str() {
            "connector" => connector = Some(text_param("connector", value)?),
            "starting_after" => after = Some(text_param("starting_after", value)?),
            "limit" => limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let mut runs = state
        .store
        .runs(connector.as_deref(), after.as_deref(), limit + 1)
        .await?;
    let next_cursor = next_cursor(&mut runs, limit, |r| r.id.clone());
    Ok(Json(ReconciliationList {
        data: runs.into_iter().map(Reconciliation::from).collect(),
        next_cursor,
    }))
}

/// Get a run: its status, progress and report.
#[utoipa::path(
    get, path = "/api/v1/reconciliations/{id}", tag = "reconciliation",
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = Reconciliation),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_reconciliation(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Reconciliation>, ApiError> {
    Ok(Json(Reconciliation::from(find_run(&state, &id).await?)))
}

/// Cancel a run while it lists: it ends `failed` ("cancelled by admin"),
/// its findings so far kept, and a backfill's held creates let go, as a
/// failure does. For a run that will not end by itself (a remote that
/// answers 429 for hours, a listing of the wrong object, a connector no
/// replica loads), which holds the connector's one run. Its driver stops
/// at its next write under its lease (a page under way is not kept).
/// 409 `reconciliation_not_cancellable` once it ended, or once it is past
/// its listing (classifying and repairing end by themselves; a backfill
/// ended while its link events wait would let its held creates go
/// beside the records they link).
#[utoipa::path(
    post, path = "/api/v1/reconciliations/{id}/cancel", tag = "reconciliation",
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run, cancelled", body = Reconciliation),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The run ended, or is past its listing", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn cancel_reconciliation(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Reconciliation>, ApiError> {
    let run = find_run(&state, &id).await?;
    if run.status != "running"
        || !state
            .sync
            .cancel_reconciliation(&run, principal.scope())
            .await?
    {
        let now = state.store.run(&run.id).await?.unwrap_or(run);
        return Err(ApiError::ReconciliationNotCancellable(
            if now.status == "running" {
                format!(
                    "the run is past its listing ({}): it ends by itself",
                    now.phase
                )
            } else {
                format!("the run ended ({})", now.status)
            },
        ));
    }
    Ok(Json(Reconciliation::from(find_run(&state, &id).await?)))
}

async fn find_run(state: &AppState, id: &str) -> Result<RunRow, ApiError> {
    if !is_id(id, "rec_") {
        return Err(ApiError::ReconciliationNotFound);
    }
    state
        .store
        .run(id)
        .await?
        .ok_or(ApiError::ReconciliationNotFound)
}

/// List a run's findings.
///
/// Query: `kind`, `state` (`open`, `repaired`, `resolved`), `limit`
/// (1–500), `starting_after`.
#[utoipa::path(
    get, path = "/api/v1/reconciliations/{id}/mismatches", tag = "reconciliation",
    params(
        ("id" = String, Path, description = "Run id"),
        ("kind" = Option<String>, Query, description = "different, missing_local, missing_remote, orphan, duplicate or unlinked"),
        ("state" = Option<String>, Query, description = "open, repaired or resolved"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "Findings in the order found", body = MismatchList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_mismatches(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<MismatchList>, ApiError> {
    let run = find_run(&state, &id).await?;
    let (mut kind, mut finding_state, mut after, mut limit) = (None, None, None, DEFAULT_LIMIT);
    for (name, value) in pairs {
        match name.as_str() {
            "kind" => match Kind::parse(&value) {
                Some(k) => kind = Some(k.as_str()),
                None => {
                    return Err(ApiError::field(
                        "kind",
                        "must be different, missing_local, missing_remote, orphan, duplicate or unlinked",
                    ))
                }
            },
            "state" => match value.as_str() {
                "open" | "repaired" | "resolved" => finding_state = Some(value),
                _ => return Err(ApiError::field("state", "must be open, repaired or resolved")),
            },
            "starting_after" => after = Some(text_param("starting_after", value)?),
            "limit" => limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let mut rows = state
        .store
        .mismatches(
            &run.id,
            kind,
            finding_state.as_deref(),
            after.as_deref(),
            limit + 1,
        )
        .await?;
    let next_cursor = next_cursor(&mut rows, limit, |m| m.id.clone());
    Ok(Json(MismatchList {
        data: rows.into_iter().map(Mismatch::from).collect(),
        next_cursor,
    }))
}

/// Resolve a finding by hand.
///
/// `push_local`, `pull_remote` and `merge` schedule what a run with that
/// repair policy would (through the normal inbound and outbound paths);
/// `dismiss` changes nothing. The finding is then `resolved`.
#[utoipa::path(
    post, path = "/api/v1/reconciliations/{id}/mismatches/{mismatch_id}/resolve", tag = "reconciliation",
    params(
        ("id" = String, Path, description = "Run id"),
        ("mismatch_id" = String, Path, description = "Finding id"),
    ),
    request_body = ResolveMismatch,
    responses(
        (status = 200, description = "Resolved", body = Mismatch),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such run or finding", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Not open (`mismatch_not_open`), or its run is still going, or a repair was asked for while a newer run of its connector goes (`reconciliation_running`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The action does nothing for this kind of finding, or would do what a run leaves for a person (delete a customer whose email is on a record no link holds)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Whether an orphan's record still exists cannot be read from the remote now (`remote_unavailable`; the finding stays open), or the store did not answer in time", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn resolve_mismatch(
    State(state): State<AppState>,
    _principal: Principal,
    Path((id, mismatch_id)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<Mismatch>, ApiError> {
    let request: ResolveMismatch = parse_json(&body)?;
    let run = find_run(&state, &id).await?;
    if !is_id(&mismatch_id, "mm_") {
        return Err(ApiError::MismatchNotFound);
    }
    let mismatch = state
        .store
        .mismatch(&run.id, &mismatch_id)
        .await?
        .ok_or(ApiError::MismatchNotFound)?;
    if run.status == "running" {
        return Err(ApiError::ReconciliationRunning(run.id));
    }
    if mismatch.state != "open" {
        return Err(ApiError::MismatchNotOpen);
    }
    let repair = match request.action {
        ResolveAction::Dismiss => None,
        ResolveAction::PushLocal => Some(Repair::PushLocal),
        ResolveAction::PullRemote => Some(Repair::PullRemote),
        ResolveAction::Merge => Some(Repair::Merge),
    };
    // Nor repaired while a newer run of the connector goes (paused with
    // its connector too): it looks at the record again and may repair it
    // itself, and a repair of the older finding beside it would act on
    // what that run has moved past. Dismissing changes nothing.
    if repair.is_some() {
        if let Some(newer) = state.store.latest_run(&run.connector).await? {
            if newer.status == "running" {
                return Err(ApiError::ReconciliationRunning(newer.id));
            }
        }
    }
    // Claimed, scheduled and described in a task of its own: a client
    // that goes away (a closed tab, a timeout) drops this handler, not the
    // task, and cannot leave a claimed finding "being scheduled" with
    // nothing scheduled.
    let settled = {
        let state = state.clone();
        let run = run.clone();
        let mismatch = mismatch.clone();
        tokio::spawn(async move { settle(&state, &run, &mismatch, repair).await })
    };
    settled.await.map_err(|error| {
        ApiError::Internal(anyhow::anyhow!("resolving a finding stopped: {error}"))
    })??;
    let resolved = state
        .store
        .mismatch(&run.id, &mismatch.id)
        .await?
        .ok_or(ApiError::MismatchNotFound)?;
    Ok(Json(Mismatch::from(resolved)))
}

/// Resolves `mismatch` with `repair` (`None`: dismissed). The finding is
/// claimed before its repair is scheduled, so that two resolutions at once
/// (two operators, a double click) schedule one repair, never two that
/// contradict each other. A repair that cannot be scheduled opens it again;
/// a claim left by a process that died, or by a store that could not
/// reopen it, is opened again by the reconciler once stalled
/// ([`crate::store::Store::reopen_stalled_resolutions`]).
async fn settle(
    state: &AppState,
    run: &RunRow,
    mismatch: &MismatchRow,
    repair: Option<Repair>,
) -> Result<(), ApiError> {
    let claim = match repair {
        None => "dismissed".to_owned(),
        Some(repair) => scheduling_claim(repair.as_str()),
    };
    if !state
        .store
        .settle_mismatch(&mismatch.id, "resolved", &claim)
        .await?
    {
        return Err(ApiError::MismatchNotOpen);
    }
    let Some(repair) = repair else {
        return Ok(());
    };
    let scheduled = match state
        .sync
        .resolve_mismatch(run, mismatch, repair, &claim)
        .await
    {
        Ok(Resolved::Scheduled(what)) => Ok(what),
        Ok(Resolved::NotApplicable) => Err(ApiError::field(
            "action",
            format!(
                "{} does nothing for a {} finding",
                repair.as_str(),
                mismatch.kind
            ),
        )),
        Ok(Resolved::Refused(why)) => Err(ApiError::field("action", why)),
        Err(crate::sync::inbound::FoldError::Store(error)) => Err(error.into()),
        Err(crate::sync::inbound::FoldError::RemoteUnreadable(why)) => {
            Err(ApiError::RemoteUnavailable(why))
        }
    };
    match scheduled {
        Ok(what) => {
            state
                .store
                .describe_resolution(&mismatch.id, &claim, &what)
                .await?;
            Ok(())
        }
        Err(error) => {
            state.store.reopen_mismatch(&mismatch.id, &claim).await?;
            Err(error)
        }
    }
}

/// Routes under `/api/v1/reconciliations`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/reconciliations",
            post(start_reconciliation).get(list_reconciliations),
        )
        .route("/reconciliations/{id}", get(get_reconciliation))
        .route("/reconciliations/{id}/cancel", post(cancel_reconciliation))
        .route("/reconciliations/{id}/mismatches", get(list_mismatches))
        .route(
            "/reconciliations/{id}/mismatches/{mismatch_id}/resolve",
            post(resolve_mismatch),
        )
}
