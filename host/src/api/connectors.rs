//! `/api/v1/connectors`: the connector plane. Upload a component, list
//! connectors and their versions, activate a version (rollback or roll
//! forward), enable, disable, configure and delete. Every route needs the
//! admin token; everything goes through the [`Registry`](crate::registry).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, FieldError, Problem};
use super::extract::{parse_json, IfMatch, JsonBody, Principal, QueryPairs};
use crate::app::AppState;
use crate::registry::{ConfigSource, Entry, NewSettings, NotReady, RegistryError, Switch};
use crate::store::connectors::VersionMeta;
use crate::store::reconciliations::RunRow;
use crate::sync::breaker::BreakerView;
use crate::sync::ENTITY;

/// A connector: its active version, switch, configuration and breaker.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorSummary {
    /// The manifest name connectors are addressed by.
    pub name: String,
    /// `enabled` (synced), `disabled` (paused: changes wait, webhooks 404)
    /// or `unconfigured` (loaded, never switched on).
    pub state: Switch,
    /// Whether ferry syncs through it now (`state` is `enabled`).
    pub enabled: bool,
    /// Whether changes are queued for it: switched on here or on any
    /// replica. One configured only in another replica's environment is
    /// `unconfigured` here and still takes them (they wait for a replica
    /// that can push them); so does one whose configuration was removed
    /// after it was switched on, until it is deleted.
    pub takes_changes: bool,
    /// The version calls run on, if one is loaded.
    pub active_version: Option<String>,
    /// sha256 of the active component, hex.
    pub sha256: Option<String>,
    /// The `ferry:connector` world version the active component targets.
    pub world: Option<String>,
    /// Where the active version came from: `bundled` or `upload`.
    pub source: Option<&'static str>,
    /// The active version's manifest.
    #[schema(value_type = Option<Object>)]
    pub manifest: Option<serde_json::Value>,
    /// Why the active version is not (or not the newest choice) loaded on
    /// this replica.
    pub load_problem: Option<String>,
    /// Where its configuration comes from: `api`, `environment` or `none`.
    pub config_source: ConfigSource,
    /// Its non-secret settings.
    pub settings: BTreeMap<String, String>,
    /// The names of the secrets that have a value (never the values).
    pub secrets: Vec<String>,
    /// A configuration problem: secrets that cannot be decrypted, or
    /// required settings or secrets of the active version the connector
    /// lacks (its work waits until they are given).
    pub problem: Option<String>,
    /// This replica's circuit breaker for it.
    pub breaker: BreakerView,
    /// The newest reconciliation or backfill run of it.
    pub last_reconciliation: Option<LastReconciliation>,
    /// True until its first reconciliation or backfill, and again while
    /// its newest run is a failed backfill: bring the data
    /// already on both sides into sync with
    /// `POST /api/v1/connectors/{name}/enable?backfill=true` or
    /// `POST /api/v1/reconciliations {"mode": "backfill"}`.
    pub backfill_offered: bool,
}

/// A connector's newest run.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastReconciliation {
    /// `rec_…`
    pub id: String,
    /// `reconcile` or `backfill`.
    pub mode: String,
    /// `running`, `completed`, `failed` or `aborted`.
    pub status: String,
}

/// The connectors.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorList {
    /// Connectors in name order.
    pub data: Vec<ConnectorSummary>,
}

/// One stored version of a connector.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorVersion {
    /// The connector.
    pub name: String,
    /// The manifest's semantic version.
    pub version: String,
    /// sha256 of the component bytes, hex.
    pub sha256: String,
    /// The `ferry:connector` world version it targets.
    pub world: String,
    /// Size of the component in bytes.
    pub size_bytes: i64,
    /// `bundled` (shipped with ferry, registered at start) or `upload`.
    pub source: &'static str,
    /// `admin`, `open` (no admin token configured) or the bundled file.
    pub uploaded_by: String,
    /// When it was stored.
    pub uploaded_at: DateTime<Utc>,
    /// Whether it is the active version, as the store records it (a
    /// replica that failed to load it still runs the previous one; see the
    /// connector's `load_problem`).
    pub active: bool,
    /// Its manifest.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

/// The stored versions of a connector.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorVersionList {
    /// Oldest first.
    pub data: Vec<ConnectorVersion>,
}

/// Which version to make active.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    /// A stored version of the connector.
    pub version: String,
}

/// A connector's configuration, as written.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    /// Whether ferry syncs through the connector (default true); `null`
    /// keeps the switch as it is (a connector never switched on stays so).
    #[serde(default = "yes")]
    pub enabled: Option<bool>,
    /// Non-secret settings by name, as the manifest declares them.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Secret values by name, replacing the set. Omitted: the stored
    /// secrets are kept (none, if only the environment gives them: name
    /// each as `null` to store those). `{}`: they are removed. A name given `null` keeps
    /// the value in effect for it (so one secret can be changed without
    /// sending the others). Stored encrypted; never returned.
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, Option<String>>>)]
    pub secrets: Option<BTreeMap<String, Option<SecretString>>>,
}

fn yes() -> Option<bool> {
    Some(true)
}

async fn summary(state: &AppState, entry: &Entry) -> Result<ConnectorSummary, ApiError> {
    let active = entry.active.as_ref();
    let effective = &entry.effective;
    let last = state.store.latest_run(&entry.name).await?;
    Ok(ConnectorSummary {
        name: entry.name.clone(),
        state: effective.switch,
        enabled: effective.switch == Switch::Enabled,
        takes_changes: entry.takes_changes(),
        active_version: active.map(|a| a.meta.version.clone()),
        sha256: active.map(|a| a.meta.sha256.clone()),
        world: active.map(|a| a.connector.world().to_string()),
        source: active.map(|a| a.meta.source.as_str()),
        manifest: active.map(|a| a.meta.manifest.clone()),
        load_problem: entry.problem.clone(),
        config_source: effective.source,
        settings: effective.config.settings.clone(),
        secrets: effective.secret_names.clone(),
        problem: effective.problem.clone().or_else(|| entry.incomplete()),
        breaker: state.sync.breakers().view(&entry.name),
        backfill_offered: crate::sync::reconcile::backfill_offered(last.as_ref()),
        last_reconciliation: last.map(|run| LastReconciliation {
            id: run.id,
            mode: run.mode,
            status: run.status,
        }),
    })
}

fn version_view(meta: VersionMeta, active: Option<&str>) -> ConnectorVersion {
    ConnectorVersion {
        active: active == Some(meta.version.as_str()),
        name: meta.name,
        version: meta.version,
        sha256: meta.sha256,
        world: meta.world,
        size_bytes: meta.size_bytes,
        source: meta.source.as_str(),
        uploaded_by: meta.uploaded_by,
        uploaded_at: meta.uploaded_at,
        manifest: meta.manifest,
    }
}

/// The version the store records as active for `name`: the one every
/// replica runs once loaded. This replica's own (a load of the stored one
/// failed here, so it runs the previous) marked the wrong version active
/// in a list an operator picks a rollback from.
async fn stored_active(state: &AppState, name: &str) -> Result<Option<String>, ApiError> {
    Ok(state.store.stored_active_version(name).await?)
}

/// A connector as answered: its summary, and its revision as `ETag` (a
/// settings write sent with it as `If-Match` lands only over it).
type Shown = (
    [(header::HeaderName, HeaderValue); 1],
    Json<ConnectorSummary>,
);

async fn current(state: &AppState, name: &str) -> Result<Shown, ApiError> {
    let entry = state
        .registry
        .entry(name)
        .ok_or(ApiError::ConnectorNotFound)?;
    let etag = HeaderValue::from_str(&format!("\"{}\"", entry.revision()))
        .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    Ok(([(header::ETAG, etag)], Json(summary(state, &entry).await?)))
}

/// The one query flag of a connector write, `true` or `false` (`default`
/// when absent). Any other parameter is refused: a misspelled flag
/// (`?backfil=true`) would otherwise do the write with the default.
fn flag(pairs: &[(String, String)], name: &str, default: bool) -> Result<bool, ApiError> {
    if let Some((other, _)) = pairs.iter().find(|(n, _)| n != name) {
        return Err(ApiError::field(
            other.as_str(),
            format!("not a parameter of this operation (it takes `{name}`)"),
        ));
    }
    match pairs.last() {
        None => Ok(default),
        Some((_, value)) => value
            .parse()
            .map_err(|_| ApiError::field(name, "must be true or false")),
    }
}

/// A component upload: `Content-Type: application/wasm` (or
/// `application/octet-stream`, what generic clients send), at most the
/// configured component size.
pub struct WasmBody(pub Bytes);

impl FromRequest<AppState> for WasmBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let wasm = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| v == "application/wasm" || v == "application/octet-stream");
        if !wasm {
            return Err(ApiError::UnsupportedMediaType {
                expected: "application/wasm",
            });
        }
        Bytes::from_request(request, state)
            .await
            .map(Self)
            .map_err(|rejection| {
                super::extract::unreadable_body(
                    rejection.status(),
                    &rejection,
                    rejection.body_text(),
                    state,
                    ApiError::ComponentTooLarge {
                        limit: state.settings.max_component_bytes,
                    },
                    |text| ApiError::field("body", text),
                )
            })
    }
}

/// Upload a connector.
///
/// The body is a connector component (`cargo build --target wasm32-wasip2
/// --release`), sent as `application/wasm`. ferry checks it before storing
/// anything: a component, not a core module; a `ferry:connector` world this
/// ferry runs; a sane manifest; hosts the operator allows; within the size
/// limit. A new version becomes active at once on every replica (within
/// about a second), unless `activate=false`; calls already running finish
/// on the version they started on. The same bytes again change nothing and
/// answer 200 with the stored version; a version number already stored
/// with other bytes is 409 `version_exists`. The component's manifest
/// names the connector it is a version of, and that connector's settings
/// and secrets are its; give `name` to refuse one that names another
/// (422 `name_mismatch`, nothing stored): a component handed over as
/// `acme-crm` that names itself `stripe` would otherwise take Stripe's key.
#[utoipa::path(
    post, path = "/api/v1/connectors", tag = "connectors",
    params(
        ("activate" = Option<bool>, Query, description = "Make the new version active (default true)"),
        ("name" = Option<String>, Query, description = "The connector the component must be a version of: one whose manifest names another is refused (`name_mismatch`)"),
    ),
    request_body(
        description = "The component, as `application/wasm` (or `application/octet-stream`)",
        content(
            ([u8] = "application/wasm"),
            ([u8] = "application/octet-stream"),
        ),
    ),
    responses(
        (status = 201, description = "Stored (and active, unless activate=false)", body = ConnectorVersion,
            headers(("Location" = String, description = "The connector: `/api/v1/connectors/{name}`"))),
        (status = 200, description = "These bytes were stored already; nothing changed", body = ConnectorVersion,
            headers(("Location" = String, description = "The connector: `/api/v1/connectors/{name}`"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "This version exists with other bytes (`version_exists`), or it would be made active without the `customer` entity while customers are linked through the connector (`customers_linked`), or over a running version while it needs settings the connector lacks (`settings_missing`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Larger than the component limit (`component_too_large`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not sent as application/wasm or application/octet-stream", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused: `not_wasm`, `core_module`, `invalid_component`, `not_a_connector`, `world_unsupported`, `world_too_new`, `world_mismatch`, `manifest_failed`, `invalid_manifest`, `forbidden_host` or `name_mismatch` (the manifest names another connector than `name`); or `validation_failed`, a query parameter other than `activate` and `name` or an invalid `activate`", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Every connector instance was busy (`runtime_busy`), or the store was (`store_busy`): nothing was written, send it again", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn upload_connector(
    State(state): State<AppState>,
    principal: Principal,
    QueryPairs(pairs): QueryPairs,
    WasmBody(bytes): WasmBody,
) -> Result<Response, ApiError> {
    let (named, others): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(n, _)| n == "name");
    if let Some((other, _)) = others.iter().find(|(n, _)| n != "activate") {
        return Err(ApiError::field(
            other.as_str(),
            "not a parameter of this operation (it takes `activate` and `name`)",
        ));
    }
    let activate = flag(&others, "activate", true)?;
    let expected = named.last().map(|(_, name)| name.as_str());
    let uploaded = state
        .registry
        .upload(&bytes, activate, expected, principal.scope())
        .await?;
    let name = uploaded.version.name.clone();
    // Stored already: a busy store only leaves the answer's `active` to
    // this replica's view.
    let active = match stored_active(&state, &name).await {
        Ok(active) => active,
        Err(_) => state
            .registry
            .entry(&name)
            .and_then(|e| e.active.as_ref().map(|a| a.meta.version.clone())),
    };
    let status = if uploaded.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = (
        status,
        Json(version_view(uploaded.version, active.as_deref())),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/v1/connectors/{name}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// List connectors.
///
/// Every connector with its active version, manifest, switch,
/// configuration (secret names only), load problems and circuit breaker.
#[utoipa::path(
    get, path = "/api/v1/connectors", tag = "connectors",
    responses(
        (status = 200, description = "The connectors", body = ConnectorList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_connectors(
    State(state): State<AppState>,
    _principal: Principal,
) -> Result<Json<ConnectorList>, ApiError> {
    let mut data = Vec::new();
    for entry in state.registry.entries() {
        data.push(summary(&state, &entry).await?);
    }
    Ok(Json(ConnectorList { data }))
}

/// Get one connector.
#[utoipa::path(
    get, path = "/api/v1/connectors/{name}", tag = "connectors",
    params(("name" = String, Path, description = "Connector name", example = "stripe")),
    responses(
        (status = 200, description = "The connector", body = ConnectorSummary,
            headers(("ETag" = String, description = "Strong entity tag: the connector's revision, for `If-Match` on a settings write"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_connector(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
) -> Result<Shown, ApiError> {
    // Uploaded through another replica a moment ago (a client's GET of the
    // upload's `Location`, through a load balancer): this replica's view
    // may not have it until its next poll. One fresh look before a 404.
    if state.registry.entry(&name).is_none() {
        state.registry.refresh().await?;
    }
    current(&state, &name).await
}

/// List a connector's versions.
#[utoipa::path(
    get, path = "/api/v1/connectors/{name}/versions", tag = "connectors",
    params(("name" = String, Path, description = "Connector name", example = "stripe")),
    responses(
        (status = 200, description = "Its stored versions, oldest first", body = ConnectorVersionList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_versions(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
) -> Result<Json<ConnectorVersionList>, ApiError> {
    let versions = state.registry.versions(&name).await?;
    let active = stored_active(&state, &name).await?;
    let data = versions
        .into_iter()
        .map(|v| version_view(v, active.as_deref()))
        .collect();
    Ok(Json(ConnectorVersionList { data }))
}

/// Activate a version.
///
/// Makes a stored version the active one on every replica: a rollback or a
/// roll forward. Calls already running finish on the version they started
/// on.
#[utoipa::path(
    post, path = "/api/v1/connectors/{name}/activate", tag = "connectors",
    params(
        ("name" = String, Path, description = "Connector name", example = "stripe"),
        ("If-Match" = Option<String>, Header, description = "The connector's ETag the change is based on, e.g. \"7\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
    ),
    request_body = Activate,
    responses(
        (status = 200, description = "The connector, now on that version", body = ConnectorSummary,
            headers(("ETag" = String, description = "Strong entity tag: the connector's revision"))),
        (status = 412, description = "`If-Match` names another revision than the current one; `ETag` is the current", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The current revision"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector or version", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The version does not sync `customer` while customers are linked through the connector (`customers_linked`), or it needs settings the running connector lacks (`settings_missing`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid body, or the version no longer loads under this ferry's rules", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Every connector instance was busy (`runtime_busy`), or the store was (`store_busy`): nothing was written, send it again", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn activate(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    if_match: IfMatch,
    JsonBody(body): JsonBody,
) -> Result<Shown, ApiError> {
    let request: Activate = parse_json(&body)?;
    let expected = expected(&state, &name, &if_match).await?;
    state
        .registry
        .activate(&name, &request.version, expected)
        .await?;
    current(&state, &name).await
}

/// Enable a connector.
///
/// Changes are pushed and webhooks accepted again; pushes that waited while
/// it was disabled go out at once. Needs every required setting and secret.
///
/// `?backfill=true` also starts a backfill (docs/reconciliation.md): remote
/// records are imported or linked by email, local customers pushed; the
/// run is in `last_reconciliation`.
#[utoipa::path(
    post, path = "/api/v1/connectors/{name}/enable", tag = "connectors",
    params(
        ("name" = String, Path, description = "Connector name", example = "stripe"),
        ("backfill" = Option<bool>, Query, description = "Also start a backfill run"),
        ("If-Match" = Option<String>, Header, description = "The connector's ETag the change is based on, e.g. \"7\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
    ),
    responses(
        (status = 200, description = "The connector", body = ConnectorSummary,
            headers(("ETag" = String, description = "Strong entity tag: the connector's revision"))),
        (status = 412, description = "`If-Match` names another revision than the current one; `ETag` is the current", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The current revision"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No version of it is loaded here (`connector_not_loaded`); with `?backfill=true`, a run of it goes on (`reconciliation_running`) or its version does not sync customers or is not loaded (`connector_not_ready`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Required settings or secrets are missing, or a query parameter other than `backfill` or an invalid `backfill`", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn enable(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    QueryPairs(pairs): QueryPairs,
    if_match: IfMatch,
) -> Result<Shown, ApiError> {
    let backfill = flag(&pairs, "backfill", false)?;
    let expected = expected(&state, &name, &if_match).await?;
    if !backfill {
        state.registry.set_enabled(&name, true, expected).await?;
        return current(&state, &name).await;
    }
    // What would refuse the run is checked before the switch: an error
    // must not leave the connector enabled without its run. Against the
    // store's connectors as they are now (a replica a poll behind
    // another's upload answered 404).
    state.registry.refresh().await?;
    // A backfill an earlier request stored and never switched on (its
    // switch met a store failure) is this one's: asked again, the same
    // request finishes what the first began instead of answering 409.
    if let Some(parked) = backfill_possible(&state, &name).await? {
        state.registry.set_enabled(&name, true, expected).await?;
        tracing::info!(run = %parked, connector = %name, "a parked backfill goes with the switch");
        return current(&state, &name).await;
    }
    // The run exists before the switch: the switch releases the pushes
    // that waited while the connector was off, and a create released
    // before the run was stored went out (no backfill held it), a second
    // record of a customer the backfill would have linked by email.
    let run = super::reconciliations::begin(
        &state,
        &name,
        crate::sync::reconcile::Mode::Backfill,
        crate::sync::reconcile::Repair::Merge,
    )
    .await?;
    if let Err(error) = state.registry.set_enabled(&name, true, expected).await {
        // Refused before the switch was written: the run goes with it. A
        // store failure may come after the write (the refresh that
        // follows it): the run stays, parked while the switch is off, and
        // holding the creates if it is on.
        let refused = matches!(
            error,
            RegistryError::Settings(_)
                | RegistryError::NotFound
                | RegistryError::NotLoaded(_)
                | RegistryError::Stale(_)
        );
        if refused {
            if let Err(forgotten) = state.store.forget_unstarted_run(&run.id).await {
                tracing::warn!(
                    run = %run.id,
                    error = format!("{:#}", anyhow::Error::from(forgotten)),
                    "the backfill of a switch refused stays, parked; delete it or switch on"
                );
            }
        }
        return Err(error.into());
    }
    current(&state, &name).await
}

/// Why a backfill of `name` could not start, whatever its switch: its
/// active version does not handle customers, or a run is going; or the
/// id of a backfill waiting for this switch (see [`parked_backfill`]).
async fn backfill_possible(state: &AppState, name: &str) -> Result<Option<String>, ApiError> {
    let ready = match state.registry.loaded(name) {
        Ok(ready) => ready,
        Err(NotReady::Unknown) => return Err(ApiError::ConnectorNotFound),
        // Missing settings: the switch answers 422 for them.
        Err(NotReady::Incomplete(_)) => return Ok(None),
        Err(other) => return Err(ApiError::ConnectorNotReady(other.to_string())),
    };
    if !ready
        .connector
        .manifest()
        .entities
        .iter()
        .any(|e| e == ENTITY)
    {
        return Err(ApiError::ConnectorNotReady(
            NotReady::Unsupported(format!("entity `{ENTITY}`")).to_string(),
        ));
    }
    match state.store.latest_run(name).await? {
        Some(run) if parked_backfill(state, name, &run) => Ok(Some(run.id)),
        Some(run) if run.status == "running" => Err(ApiError::ReconciliationRunning(run.id)),
        _ => Ok(None),
    }
}

/// Whether `run` is the backfill of an `enable?backfill=true` whose switch
/// failed after the run was stored: running, merging, nothing listed, and
/// parked because `name` is still off.
fn parked_backfill(state: &AppState, name: &str, run: &RunRow) -> bool {
    let off = state
        .registry
        .entry(name)
        .is_some_and(|entry| entry.effective.switch != Switch::Enabled);
    off && run.status == "running"
        && run.mode == "backfill"
        && run.repair == "merge"
        && run.phase == "listing"
        && run.pages == 0
}

/// Disable a connector.
///
/// A pause: its webhooks answer 404, and changes keep queueing for it
/// without spending attempts until it is enabled again. To stop syncing
/// with a system for good, delete the connector.
#[utoipa::path(
    post, path = "/api/v1/connectors/{name}/disable", tag = "connectors",
    params(
        ("name" = String, Path, description = "Connector name", example = "stripe"),
        ("If-Match" = Option<String>, Header, description = "The connector's ETag the change is based on, e.g. \"7\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
    ),
    responses(
        (status = 200, description = "The connector", body = ConnectorSummary,
            headers(("ETag" = String, description = "Strong entity tag: the connector's revision"))),
        (status = 412, description = "`If-Match` names another revision than the current one; `ETag` is the current", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The current revision"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn disable(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    if_match: IfMatch,
) -> Result<Shown, ApiError> {
    let expected = expected(&state, &name, &if_match).await?;
    state.registry.set_enabled(&name, false, expected).await?;
    current(&state, &name).await
}

/// Delete a connector.
///
/// Removes its versions and stored settings on every replica; a bundled
/// connector is not registered again at the next start. Refused with 409
/// `connector_in_use` while customers are linked to its records or changes
/// wait for it (pushes to make, inbound events to apply), unless
/// `force=true`; the links are kept either way, for audit.
#[utoipa::path(
    delete, path = "/api/v1/connectors/{name}", tag = "connectors",
    params(
        ("name" = String, Path, description = "Connector name", example = "stripe"),
        ("force" = Option<bool>, Query, description = "Delete even while customers are linked or changes wait"),
        ("If-Match" = Option<String>, Header, description = "The connector's ETag the change is based on, e.g. \"7\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = 412, description = "`If-Match` names another revision than the current one; `ETag` is the current", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The current revision"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Customers are linked or changes wait (`connector_in_use`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A query parameter other than `force`, or an invalid `force`", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn delete_connector(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    QueryPairs(pairs): QueryPairs,
    if_match: IfMatch,
) -> Result<StatusCode, ApiError> {
    let force = flag(&pairs, "force", false)?;
    let expected = expected(&state, &name, &if_match).await?;
    state.registry.delete(&name, force, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Configure a connector.
///
/// Replaces the connector's settings and switch (and its secrets, if
/// `secrets` is given), keeping those stored that the active version does
/// not declare but another stored version does (after a rollback or a roll
/// forward). Names are checked against the stored versions' manifests:
/// names none of them declares are refused and, for an enabled connector,
/// the active version's missing required ones are named. With `If-Match`
/// (the connector's `ETag`), the write lands only over that revision. Secrets are stored encrypted with
/// `FERRY_MASTER_KEY` and never returned. Every replica picks the change up
/// within about a second. Configuration stored here takes precedence over
/// `FERRY_CONNECTORS__*` variables.
#[utoipa::path(
    put, path = "/api/v1/connectors/{name}/settings", tag = "connectors",
    params(
        ("name" = String, Path, description = "Connector name", example = "stripe"),
        ("If-Match" = Option<String>, Header, description = "The connector's ETag the write is based on, e.g. \"7\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
    ),
    request_body = PutSettings,
    responses(
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "The connector as now configured", body = ConnectorSummary,
            headers(("ETag" = String, description = "Strong entity tag: the connector's revision"))),
        (status = 412, description = "`If-Match` names another revision than the current one; `ETag` is the current", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The current revision"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such connector", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Secrets given but no master key is configured, or no version is loaded", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing settings", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn put_settings(
    State(state): State<AppState>,
    _principal: Principal,
    Path(name): Path<String>,
    if_match: IfMatch,
    JsonBody(body): JsonBody,
) -> Result<Shown, ApiError> {
    let expected = expected(&state, &name, &if_match).await?;
    let request: PutSettings = parse_json(&body)?;
    // PostgreSQL's JSONB refuses a NUL (a 500); SQLite stored it.
    let with_nul: Vec<FieldError> = request
        .settings
        .iter()
        .filter(|(name, value)| name.contains('\0') || value.contains('\0'))
        .map(|(name, _)| {
            FieldError::new(
                format!("settings.{}", name.replace('\0', "\u{fffd}")),
                "must not contain a NUL character",
            )
        })
        .collect();
    if !with_nul.is_empty() {
        return Err(ApiError::Validation(with_nul));
    }
    state
        .registry
        .put_settings(
            &name,
            NewSettings {
                enabled: request.enabled,
                settings: request.settings,
                secrets: request.secrets,
            },
            expected,
        )
        .await?;
    current(&state, &name).await
}

/// The revision `If-Match` asks a change of `name` to find, if it sent
/// any: read from the store's connectors as they are now (a replica a
/// poll behind another's change would answer 412 for the current tag).
/// Another revision is a 412 at once, before any work (a backfill's run);
/// the write itself lands only over the one returned.
async fn expected(
    state: &AppState,
    name: &str,
    if_match: &IfMatch,
) -> Result<Option<i64>, ApiError> {
    if !if_match.given() {
        return Ok(None);
    }
    state.registry.refresh().await?;
    let entry = state
        .registry
        .entry(name)
        .ok_or(ApiError::ConnectorNotFound)?;
    match if_match.against(entry.revision()) {
        Some(named) if named != entry.revision() => Err(ApiError::PreconditionFailed {
            current: entry.revision(),
        }),
        expected => Ok(expected),
    }
}

/// Routes under `/api/v1/connectors`.
pub fn router(max_component_bytes: usize) -> Router<AppState> {
    Router::new()
        .route(
            "/connectors",
            get(list_connectors)
                .post(upload_connector)
                .layer(DefaultBodyLimit::max(max_component_bytes)),
        )
        .route(
            "/connectors/{name}",
            get(get_connector).delete(delete_connector),
        )
        .route("/connectors/{name}/versions", get(list_versions))
        .route("/connectors/{name}/activate", post(activate))
        .route("/connectors/{name}/enable", post(enable))
        .route("/connectors/{name}/disable", post(disable))
        .route("/connectors/{name}/settings", put(put_settings))
}
