//! The console's pages: each reads through the `/api/v1` handler that
//! answers the same question, and renders what it returned.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use minijinja::{context, Value};
use serde_json::json;

use super::session::Session;
use super::{page, problem, render};
use crate::api::extract::QueryPairs;
use crate::api::{conflicts, connectors, customers, dead_letters, health, reconciliations};
use crate::app::AppState;
use crate::store::CustomerId;

/// The answer of an API handler, or its problem shown as the page.
macro_rules! answer {
    ($session:expr, $call:expr) => {
        match $call.await {
            Ok(answered) => Answered::value(answered),
            Err(error) => return problem(&$session, error),
        }
    };
}

/// The value an API handler answered, without its headers.
pub(crate) trait Answered<T> {
    fn value(self) -> T;
}

impl<T> Answered<T> for Json<T> {
    fn value(self) -> T {
        self.0
    }
}

impl<T, H> Answered<T> for (H, Json<T>) {
    fn value(self) -> T {
        self.1 .0
    }
}

/// The first value of `name` in a query, if not empty.
fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Only the named, non-empty query parameters, for an API list handler.
fn pass(pairs: &[(String, String)], names: &[&str]) -> QueryPairs {
    QueryPairs(
        pairs
            .iter()
            .filter(|(n, v)| names.contains(&n.as_str()) && !v.trim().is_empty())
            .map(|(n, v)| (n.clone(), v.trim().to_owned()))
            .collect(),
    )
}

/// `path` with `query`: the page as filtered and paged, for a form to
/// come back to and a page to refresh to (without the notice it was
/// reached with).
fn here(path: &str, query: &QueryPairs) -> String {
    if query.0.is_empty() {
        return path.to_owned();
    }
    format!(
        "{path}?{}",
        serde_urlencoded::to_string(&query.0).unwrap_or_default()
    )
}

/// The connectors' names, for filters and forms.
fn connector_names(state: &AppState) -> Vec<String> {
    state
        .registry
        .entries()
        .iter()
        .map(|e| e.name.clone())
        .collect()
}

/// `GET /console/sign-in`.
pub async fn sign_in(State(state): State<AppState>, QueryPairs(pairs): QueryPairs) -> Response {
    render(
        None,
        StatusCode::OK,
        "sign_in.html",
        context! {
            next => super::session::safe_next(param(&pairs, "next")),
            open => state.settings.admin_token.is_none(),
            error => Value::from(()),
        },
    )
}

/// `GET /console`: per connector, links by state, backlog, breaker and last
/// error.
pub async fn overview(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let health = answer!(
        session,
        health::health(State(state.clone()), session.principal)
    );
    let connectors = answer!(
        session,
        connectors::list_connectors(State(state), session.principal)
    );
    page(
        &session,
        "overview.html",
        json!({ "section": "overview", "health": health, "connectors": connectors.data, "notice": session.notice(&pairs) }),
    )
}

/// `GET /console/customers?q=`: an id opens the customer, anything else is
/// looked up as an email; without `q`, the catalog page by page.
pub async fn customers(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let query = param(&pairs, "q").unwrap_or("");
    // An id (or what looks like one: its page says it is not found) opens
    // a customer; an email may start with `cus_` too.
    if query.starts_with("cus_") && !query.contains('@') {
        let path = serde_urlencoded::to_string([("", query)]).unwrap_or_default();
        return Redirect::to(&format!(
            "/console/customers/{}",
            path.trim_start_matches('=')
        ))
        .into_response();
    }
    let mut api_query = pass(&pairs, &["starting_after"]);
    if !query.is_empty() {
        api_query.0.push(("email".to_owned(), query.to_owned()));
    }
    api_query.0.push(("limit".to_owned(), "50".to_owned()));
    let list = answer!(
        session,
        customers::list_customers(State(state), session.principal, api_query)
    );
    page(
        &session,
        "customers.html",
        json!({ "section": "customers", "q": query, "list": list }),
    )
}

/// `GET /console/customers/{id}?history=`: the record, its links and its
/// history both ways (the newest 100 of each, or `history`).
pub async fn customer(
    session: Session,
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    // A hand-edited value is clamped to what the API serves (1–1000), not
    // shown as an error page.
    let history: u32 = param(&pairs, "history")
        .and_then(|h| h.parse::<u64>().ok())
        .map_or(100, |h| u32::try_from(h.clamp(1, 1000)).unwrap_or(1000));
    let sync = answer!(
        session,
        customers::sync::customer_sync(
            State(state.clone()),
            session.principal,
            Path(id.clone()),
            QueryPairs(vec![("history".to_owned(), history.to_string())]),
        )
    );
    // The record itself, deleted or not (the sync status answered for it).
    let record = match state.store.get_customer_any(&id).await {
        Ok(record) => record,
        Err(error) => return problem(&session, error.into()),
    };
    let conflicts = answer!(
        session,
        conflicts::list_conflicts(
            State(state),
            session.principal,
            // The first 500 open ones; the page links to the rest (and to
            // the resolved ones).
            QueryPairs(vec![
                ("customer_id".to_owned(), id),
                ("state".to_owned(), "open".to_owned()),
                ("limit".to_owned(), "500".to_owned()),
            ]),
        )
    );
    page(
        &session,
        "customer.html",
        json!({
            "section": "customers",
            "customer": record,
            "sync": sync,
            "conflicts": conflicts.data,
            "more_conflicts": conflicts.next_cursor.is_some(),
            "history": history,
        }),
    )
}

/// `GET /console/conflicts?state=` (`open` by default, `resolved`, `all`),
/// with `customer_id` or `connector` to narrow it.
pub async fn conflicts(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let shown = param(&pairs, "state").unwrap_or("open").to_owned();
    let mut query = pass(&pairs, &["starting_after", "customer_id", "connector"]);
    if shown != "all" {
        query.0.push(("state".to_owned(), shown.clone()));
    }
    let list = answer!(
        session,
        conflicts::list_conflicts(State(state), session.principal, query)
    );
    page(
        &session,
        "conflicts.html",
        json!({
            "section": "conflicts",
            "shown": shown,
            "list": list,
            "customer_id": param(&pairs, "customer_id"),
            "connector": param(&pairs, "connector"),
            "notice": session.notice(&pairs),
        }),
    )
}

/// `GET /console/conflicts/{id}`: base, local and remote per field.
pub async fn conflict(
    session: Session,
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let conflict = answer!(
        session,
        conflicts::get_conflict(State(state.clone()), session.principal, Path(id))
    );
    // ferry's side is ferry's value when the resolution is sent: the page
    // shows it as it is now (and the version it read, which the resolution
    // checks), not only as it was when the conflict was raised.
    let customer = match CustomerId::parse(&conflict.customer_id) {
        Some(id) if conflict.state == "open" => match state.store.get_customer(&id).await {
            Ok(customer) => Some(customer),
            Err(crate::store::StoreError::CustomerNotFound) => None,
            Err(error) => return problem(&session, error.into()),
        },
        _ => None,
    };
    let mut now = serde_json::Map::new();
    // Fields a write changed since the conflict, compared as the merge
    // compared them (trimmed, empty as unset): a stored `"silver "` read
    // "changed since the conflict, from silver" when nothing had.
    let mut changed = serde_json::Map::new();
    if let Some(customer) = &customer {
        for field in conflict.fields.0.as_array().into_iter().flatten() {
            let Some(name) = field["field"].as_str() else {
                continue;
            };
            match conflicts::current_value(customer, name) {
                Ok(value) => {
                    let recorded = field["local"].as_str();
                    let moved = !crate::sync::merge::same_text(name, value.as_deref(), recorded);
                    changed.insert(name.to_owned(), json!(moved));
                    now.insert(name.to_owned(), json!(value))
                }
                Err(error) => return problem(&session, error),
            };
        }
    }
    page(
        &session,
        "conflict.html",
        json!({
            "section": "conflicts",
            "conflict": conflict,
            "now": now,
            "changed": changed,
            "local_version": customer.map(|c| c.version),
            "notice": session.notice(&pairs),
        }),
    )
}

/// `GET /console/dead-letters?connector=&direction=&include_replayed=`.
pub async fn dead_letters(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let query = pass(
        &pairs,
        &[
            "connector",
            "direction",
            "include_replayed",
            "starting_after",
        ],
    );
    let back = here("/console/dead-letters", &query);
    let list = answer!(
        session,
        dead_letters::list_dead_letters(State(state.clone()), session.principal, query)
    );
    page(
        &session,
        "dead_letters.html",
        json!({
            "section": "dead-letters",
            "list": list,
            "connectors": connector_names(&state),
            "connector": param(&pairs, "connector"),
            "direction": param(&pairs, "direction"),
            "include_replayed": param(&pairs, "include_replayed") == Some("true"),
            "here": back,
            "notice": session.notice(&pairs),
        }),
    )
}

/// `GET /console/connectors`.
pub async fn connectors(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let list = answer!(
        session,
        connectors::list_connectors(State(state), session.principal)
    );
    page(
        &session,
        "connectors.html",
        json!({ "section": "connectors", "connectors": list.data, "notice": session.notice(&pairs) }),
    )
}

/// `GET /console/connectors/{name}`: versions, switch and settings (secret
/// names only).
pub async fn connector(
    session: Session,
    State(state): State<AppState>,
    Path(name): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    // The page an upload, an activation or a switch lands on: another
    // replica may have made it a moment ago, before this one's poll
    // (answered 404 for a connector just uploaded, or the old version
    // marked active under "Version 2.0.0 is active."). A busy store only
    // leaves the view as it is.
    if let Err(error) = state.registry.refresh().await {
        tracing::debug!(%error, "the connector page shows this replica's view as it is");
    }
    // The revision the switch's form is drawn at, read before what it
    // shows: a change between is older than the page, and its post a 412.
    let revision = state.registry.entry(&name).map(|entry| entry.revision());
    let summary = answer!(
        session,
        connectors::get_connector(State(state.clone()), session.principal, Path(name.clone()))
    );
    let versions = answer!(
        session,
        connectors::list_versions(State(state), session.principal, Path(name))
    );
    page(
        &session,
        "connector.html",
        json!({ "section": "connectors", "connector": summary, "revision": revision, "versions": versions.data, "notice": session.notice(&pairs) }),
    )
}

/// `GET /console/reconciliations`: runs, newest first, and a form to start
/// one; refreshes itself while one runs.
pub async fn reconciliations(
    session: Session,
    State(state): State<AppState>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let query = pass(&pairs, &["connector", "starting_after"]);
    let list = answer!(
        session,
        reconciliations::list_reconciliations(State(state.clone()), session.principal, query)
    );
    let running = list.data.iter().any(|r| r.status == "running");
    page(
        &session,
        "reconciliations.html",
        json!({
            "section": "reconciliations",
            "list": list,
            "connectors": connector_names(&state),
            "connector": param(&pairs, "connector"),
            "running": running,
            "notice": session.notice(&pairs),
        }),
    )
}

/// `GET /console/reconciliations/{id}`: progress (refreshing while it
/// runs), the report and its findings.
pub async fn reconciliation(
    session: Session,
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryPairs(pairs): QueryPairs,
) -> Response {
    let run = answer!(
        session,
        reconciliations::get_reconciliation(
            State(state.clone()),
            session.principal,
            Path(id.clone())
        )
    );
    let query = pass(&pairs, &["kind", "state", "starting_after"]);
    let back = here(&format!("/console/reconciliations/{id}"), &query);
    let findings = answer!(
        session,
        reconciliations::list_mismatches(State(state), session.principal, Path(id), query)
    );
    page(
        &session,
        "reconciliation.html",
        json!({
            "section": "reconciliations",
            "run": run,
            "findings": findings,
            "kind": param(&pairs, "kind"),
            "state": param(&pairs, "state"),
            "here": back,
            "notice": session.notice(&pairs),
        }),
    )
}
