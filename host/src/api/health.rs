//! What an operator asks a running ferry: `/readyz` (each dependency),
//! `/metrics` (Prometheus text), `GET /api/v1/health` (per connector), and
//! the links and inbox events still in flight.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::{next_cursor, page_limit, text_param, Principal, QueryPairs};
use crate::app::AppState;
use crate::registry::Switch;
use crate::store::health::{InboxFilter, LinkFilter, LinkSummary};
use crate::store::inbox::InboxEvent;
use crate::sync::breaker::BreakerView;
use crate::sync::Activity;

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;
/// How long `/readyz` waits for the Kafka cluster's metadata.
const BUS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `/readyz` waits for the store's answer.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one probe of the store and the bus answers every `/readyz`.
const PROBE_FRESH: Duration = Duration::from_secs(1);

/// `/readyz`'s probes of the store and the bus, made by one request at a
/// time and kept for [`PROBE_FRESH`]. The route is open: unshared, every
/// request took a pooled connection, and (in cluster mode) a blocking
/// thread for up to two seconds asking the whole cluster for its
/// metadata, so a flood of probes while Kafka was slow filled the
/// blocking pool the pushes' DNS lookups and the consumers' commits need,
/// and starved the store's pool. Now the requests that arrive while a
/// probe runs wait for it and share its answer.
///
/// The bus's check is the last answer of a probe that runs on its own:
/// the broker's metadata takes up to [`BUS_PROBE_TIMEOUT`] when the
/// broker is away, and awaited, every `/readyz` took that long, past a
/// kubelet's 1 s probe timeout, which took every replica out of the load
/// balancer for a check that gates nothing.
#[derive(Debug, Default)]
pub struct Probes {
    last: tokio::sync::Mutex<Option<(std::time::Instant, Vec<Check>)>>,
    /// Probes made (not answers shared), for the tests.
    made: std::sync::atomic::AtomicU64,
    /// The bus probe's last answer.
    bus: std::sync::Mutex<Option<Check>>,
    /// Whether a bus probe is running.
    bus_probing: std::sync::atomic::AtomicBool,
}

impl Probes {
    /// How many probes were made, answers shared not counted.
    pub fn made(&self) -> u64 {
        self.made.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One dependency's readiness.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Check {
    /// `store`, `bus`, `bus_topics` or `connector:NAME`.
    pub name: String,
    /// Whether it is ready. The `bus` check (the broker's answer) and a
    /// connector's are reported but never make the replica unready.
    pub ok: bool,
    /// What is wrong, or what it is.
    pub detail: String,
}

/// `/readyz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: &'static str,
    /// The names of the failed checks that make the replica unready (the
    /// store's, and `bus_topics` in cluster mode).
    pub not_ready: Vec<String>,
    /// Every check.
    pub checks: Vec<Check>,
}

/// Readiness of each dependency.
///
/// The store answers and, in cluster mode, the bus's topics exist (made
/// once, at start: a broker that refuses them stays visible); 503 names
/// what is not ready. The Kafka cluster's metadata is reported too, and so
/// is each connector's load state (`ok` false for a switched-on connector
/// with no loaded version), but neither makes the replica unready: a
/// broker away (every replica's at once) took every running replica out
/// of the load balancer, the API and webhooks with them, while the
/// outbox's redelivery net and the inbox's grace carry sync on without
/// the bus; a connector no replica can load would take the API and every
/// other connector with it.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "Something is not ready; `not_ready` names it", body = Readiness),
    ))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    // In a task of its own: a caller that gives up (a probe's own 1 s
    // timeout) does not cancel the probe the others wait for.
    let shared = state.clone();
    let mut checks = tokio::spawn(async move {
        let mut last = shared.probes.last.lock().await;
        match &*last {
            Some((at, checks)) if at.elapsed() < PROBE_FRESH => checks.clone(),
            _ => {
                let checks = probe(&shared).await;
                shared
                    .probes
                    .made
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *last = Some((std::time::Instant::now(), checks.clone()));
                checks
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        vec![Check {
            name: "store".into(),
            ok: false,
            detail: "the readiness probe failed (the log says why)".into(),
        }]
    });
    if let Some(why) = state.bus_topics.missing() {
        checks.push(Check {
            name: "bus_topics".into(),
            ok: false,
            detail: why,
        });
    }
    // What gates readiness: the store and the bus's topics. The broker's
    // answer and the connectors below are reported only.
    let not_ready: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok && c.name != "bus")
        .map(|c| c.name.clone())
        .collect();
    for entry in state.registry.entries() {
        let switched_on = entry.effective.switch == Switch::Enabled;
        // A replica still serving an older version (the new one failed to
        // load here) is ready, and says so.
        let (ok, detail) = match (&entry.active, &entry.problem) {
            // Loaded, but this replica cannot run it: settings it lacks, or
            // stored secrets its master key cannot open. Its webhooks are
            // refused here and its pushes wait.
            (Some(active), _) if entry.incomplete().is_some() => (
                false,
                format!(
                    "version {} loaded; {}",
                    active.meta.version,
                    entry.incomplete().unwrap_or_default()
                ),
            ),
            (Some(active), None) => (true, format!("version {} loaded", active.meta.version)),
            (Some(active), Some(problem)) => (
                true,
                format!("version {} loaded; {problem}", active.meta.version),
            ),
            (None, problem) => (
                !switched_on,
                problem
                    .clone()
                    .unwrap_or_else(|| "no version is active".into()),
            ),
        };
        checks.push(Check {
            name: format!("connector:{}", entry.name),
            ok,
            detail,
        });
    }
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        tracing::warn!(not_ready = ?not_ready, "not ready");
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        status: if not_ready.is_empty() {
            "ready"
        } else {
            "not_ready"
        },
        not_ready,
        checks,
    };
    (status, Json(body)).into_response()
}

/// The store's and the bus's checks (the probes [`Probes`] shares).
async fn probe(state: &AppState) -> Vec<Check> {
    let mut checks = Vec::new();
    // Bounded like the bus's: a store that does not answer (or a pool
    // busy under load) would otherwise hold the probe for the pool's
    // acquire timeout. The error's text stays in the log: this route is
    // open, and a driver's error names hosts, users and databases.
    let store = tokio::time::timeout(STORE_PROBE_TIMEOUT, state.store.ping()).await;
    checks.push(match store {
        Ok(Ok(())) => Check {
            name: "store".into(),
            ok: true,
            detail: state.store.kind().as_str().into(),
        },
        Ok(Err(crate::store::StoreError::ReadOnly)) => {
            tracing::warn!("readiness: the database takes no writes");
            Check {
                name: "store".into(),
                ok: false,
                detail: crate::store::StoreError::ReadOnly.to_string(),
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "readiness: the store failed"
            );
            Check {
                name: "store".into(),
                ok: false,
                detail: "the store failed (the log says why)".into(),
            }
        }
        Err(_) => Check {
            name: "store".into(),
            ok: false,
            detail: format!(
                "the store did not answer within {} s",
                STORE_PROBE_TIMEOUT.as_secs()
            ),
        },
    });
    if let Some(bus) = &state.bus_probe {
        checks.push(bus_check(&state.probes, bus));
    }
    checks
}

/// The bus probe's last answer, and a new probe started unless one runs
/// (see [`Probes`]).
fn bus_check(probes: &Arc<Probes>, bus: &Arc<crate::bus::kafka::KafkaProducer>) -> Check {
    use std::sync::atomic::Ordering;
    if !probes.bus_probing.swap(true, Ordering::AcqRel) {
        let (probes, bus) = (probes.clone(), bus.clone());
        tokio::spawn(async move {
            let check = match bus.probe(BUS_PROBE_TIMEOUT).await {
                Ok(()) => Check {
                    name: "bus".into(),
                    ok: true,
                    detail: "kafka".into(),
                },
                Err(error) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "readiness: the bus failed"
                    );
                    Check {
                        name: "bus".into(),
                        ok: false,
                        detail: "the Kafka cluster did not answer (the log says why)".into(),
                    }
                }
            };
            *probes.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(check);
            probes.bus_probing.store(false, Ordering::Release);
        });
    }
    probes
        .bus
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| Check {
            name: "bus".into(),
            ok: false,
            detail: "the Kafka cluster has not answered a probe yet".into(),
        })
}

/// Metrics in Prometheus text format (404 when `FERRY_METRICS=false`).
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => ApiError::NotFound.into_response(),
    }
}

/// Counts of a connector's links by state.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct LinkCounts {
    /// Linked and up to date.
    pub synced: i64,
    /// Waiting for their push.
    pub pending: i64,
    /// Failed, scheduled again.
    pub retrying: i64,
    /// Given up on (see the dead letters).
    pub dead: i64,
}

/// Inbox events of a connector not applied yet.
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct InboxCounts {
    /// Pending or retrying.
    pub unapplied: i64,
    /// How many of them wait for a person to resolve the open conflict
    /// holding their link (see `conflicts_open`).
    pub held: i64,
    /// Age of the oldest of them not held, in seconds: a pending one's
    /// since it arrived, a retrying one's since its backoff ended.
    pub oldest_age_seconds: f64,
}

/// One connector's sync health.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConnectorHealth {
    /// The connector.
    pub connector: String,
    /// How it is switched: `enabled`, `disabled`, `unconfigured` (never
    /// switched on), or `removed` (only its rows are left).
    pub switch: String,
    /// Why this replica cannot run it although it is switched on: no
    /// version loaded, or settings or secrets it lacks here.
    pub problem: Option<String>,
    /// Outbound links by state.
    pub links: LinkCounts,
    /// Inbound events waiting.
    pub inbox: InboxCounts,
    /// Dead letters not replayed, both directions.
    pub dead_letters: i64,
    /// Open conflicts.
    pub conflicts_open: i64,
    /// The circuit breaker.
    pub breaker: BreakerView,
    /// What this replica last saw: success, error.
    #[serde(flatten)]
    pub activity: Activity,
}

/// The health summary.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Outbox events not yet published.
    pub outbox_unpublished: i64,
    /// Age of the oldest of them, in seconds.
    pub outbox_oldest_age_seconds: f64,
    /// Per connector, by name.
    pub connectors: Vec<ConnectorHealth>,
}

/// Sync health per connector.
///
/// Counts synced, pending, retrying, dead-lettered and conflicted; breaker
/// state; the last success and error this replica saw; backlog ages.
#[utoipa::path(
    get, path = "/api/v1/health", tag = "sync",
    responses(
        (status = 200, description = "The health summary", body = Health),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn health(
    State(state): State<AppState>,
    _principal: Principal,
) -> Result<Json<Health>, ApiError> {
    let backlog = state.store.backlog().await?;
    let links = state.store.link_counts().await?;
    let mut names: Vec<String> = state
        .registry
        .entries()
        .into_iter()
        .map(|e| e.name.clone())
        .collect();
    names.extend(links.keys().map(|(c, _)| c.clone()));
    names.extend(backlog.inbox_unapplied.keys().cloned());
    // A removed connector left with only dead letters or open conflicts.
    names.extend(backlog.dead_letters.keys().map(|(c, _)| c.clone()));
    names.extend(backlog.conflicts_open.keys().cloned());
    names.sort();
    names.dedup();
    let entries = state.registry.entries();
    let switches: BTreeMap<&str, Switch> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.effective.switch))
        .collect();
    let problems: BTreeMap<&str, String> = entries
        .iter()
        .filter_map(|e| Some((e.name.as_str(), e.problem_running()?)))
        .collect();
    let connectors = names
        .into_iter()
        .map(|name| {
            let count = |s: &str| {
                links
                    .get(&(name.clone(), s.to_owned()))
                    .copied()
                    .unwrap_or(0)
            };
            ConnectorHealth {
                switch: switches
                    .get(name.as_str())
                    .map_or("removed", |s| match s {
                        Switch::Enabled => "enabled",
                        Switch::Disabled => "disabled",
                        Switch::Unconfigured => "unconfigured",
                    })
                    .to_owned(),
                problem: problems.get(name.as_str()).cloned(),
                links: LinkCounts {
                    synced: count("synced"),
                    pending: count("pending"),
                    retrying: count("retry"),
                    dead: count("dead"),
                },
                inbox: InboxCounts {
                    unapplied: backlog.inbox_unapplied.get(&name).copied().unwrap_or(0),
                    held: backlog.inbox_held.get(&name).copied().unwrap_or(0),
                    oldest_age_seconds: backlog
                        .inbox_oldest_age_by_connector
                        .get(&name)
                        .map_or(0.0, Duration::as_secs_f64),
                },
                dead_letters: backlog
                    .dead_letters
                    .iter()
                    .filter(|((c, _), _)| *c == name)
                    .map(|(_, n)| n)
                    .sum(),
                conflicts_open: backlog.conflicts_open.get(&name).copied().unwrap_or(0),
                breaker: state.sync.breakers().view(&name),
                activity: state.sync.activity(&name),
                connector: name,
            }
        })
        .collect();
    Ok(Json(Health {
        outbox_unpublished: backlog.outbox_unpublished,
        outbox_oldest_age_seconds: backlog.outbox_oldest_age.as_secs_f64(),
        connectors,
    }))
}

/// A page of links.
#[derive(Debug, Serialize, ToSchema)]
pub struct LinkList {
    /// By customer id, then connector.
    pub data: Vec<LinkSummary>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// List sync links.
///
/// Filter by `connector` and `state` (`pending`, `retry`, `synced`,
/// `dead`): `state=retry` lists the pushes being retried, with their last
/// error and when the next attempt is due.
#[utoipa::path(
    get, path = "/api/v1/sync/links", tag = "sync",
    params(
        ("connector" = Option<String>, Query, description = "Only this connector's"),
        ("state" = Option<String>, Query, description = "pending, retry, synced or dead"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "A page of links", body = LinkList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_links(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<LinkList>, ApiError> {
    let mut filter = LinkFilter {
        limit: DEFAULT_LIMIT,
        ..LinkFilter::default()
    };
    for (name, value) in pairs {
        match name.as_str() {
            "connector" => filter.connector = Some(text_param("connector", value)?),
            "state" => {
                filter.state = Some(one_of(
                    "state",
                    value,
                    &["pending", "retry", "synced", "dead"],
                )?)
            }
            "starting_after" => {
                let (customer, connector) = value.split_once('/').ok_or_else(|| {
                    ApiError::field("starting_after", "must be a cursor from a previous page")
                })?;
                filter.starting_after = Some((
                    text_param("starting_after", customer.to_owned())?,
                    text_param("starting_after", connector.to_owned())?,
                ));
            }
            "limit" => filter.limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let limit = filter.limit;
    filter.limit += 1;
    let mut data = state.store.list_links(&filter).await?;
    let next_cursor = next_cursor(&mut data, limit, |l| {
        format!("{}/{}", l.customer_id, l.connector)
    });
    Ok(Json(LinkList { data, next_cursor }))
}

/// A page of inbox events.
#[derive(Debug, Serialize, ToSchema)]
pub struct InboxList {
    /// Oldest first.
    pub data: Vec<InboxEvent>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// List inbox events.
///
/// Filter by `connector` and `state` (`pending`, `retry`, `applied`,
/// `skipped`, `dead`): `state=retry` lists the inbound events being
/// retried, with their last error.
#[utoipa::path(
    get, path = "/api/v1/sync/inbox", tag = "sync",
    params(
        ("connector" = Option<String>, Query, description = "Only this connector's"),
        ("state" = Option<String>, Query, description = "pending, retry, applied, skipped or dead"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "A page of inbox events", body = InboxList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_inbox(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<InboxList>, ApiError> {
    let mut filter = InboxFilter {
        limit: DEFAULT_LIMIT,
        ..InboxFilter::default()
    };
    for (name, value) in pairs {
        match name.as_str() {
            "connector" => filter.connector = Some(text_param("connector", value)?),
            "state" => {
                filter.state = Some(one_of(
                    "state",
                    value,
                    &["pending", "retry", "applied", "skipped", "dead"],
                )?);
            }
            "starting_after" => {
                filter.starting_after = Some(value.parse().map_err(|_| {
                    ApiError::field("starting_after", "must be a cursor from a previous page")
                })?);
            }
            "limit" => filter.limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let limit = filter.limit;
    filter.limit += 1;
    let mut data = state.store.list_inbox(&filter).await?;
    let next_cursor = next_cursor(&mut data, limit, |e| e.seq.to_string());
    Ok(Json(InboxList { data, next_cursor }))
}

fn one_of(field: &str, value: String, allowed: &[&str]) -> Result<String, ApiError> {
    if allowed.contains(&value.as_str()) {
        Ok(value)
    } else {
        Err(ApiError::field(
            field,
            format!("must be one of {}", allowed.join(", ")),
        ))
    }
}

/// Routes under `/api/v1`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/health", get(health))
        .route("/sync/links", get(list_links))
        .route("/sync/inbox", get(list_inbox))
}
