//! `/console`: the operator console. Server-rendered HTML (minijinja
//! templates compiled into the binary, one stylesheet, no script) over the
//! same handlers as `/api/v1`: every page reads through an API handler and
//! every form posts to one, so nothing is possible here that the API
//! refuses, and its errors are the API's problem details.
//!
//! Behind the admin token (see [`session`]); with no token configured it is
//! open, like the API, on a loopback listener only. Pages that show live
//! state refresh themselves (`<meta http-equiv="refresh">`).

mod actions;
mod pages;
pub mod session;

use std::sync::LazyLock;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use minijinja::{context, Environment, Value};
use serde::Serialize;

use self::session::Session;
pub use self::session::SessionKey;
use crate::api::error::ApiError;
use crate::app::AppState;

const STYLESHEET: &str = include_str!("console.css");

/// The templates, parsed once.
static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    let sources = [
        ("base.html", include_str!("templates/base.html")),
        ("sign_in.html", include_str!("templates/sign_in.html")),
        ("problem.html", include_str!("templates/problem.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("customers.html", include_str!("templates/customers.html")),
        ("customer.html", include_str!("templates/customer.html")),
        ("conflicts.html", include_str!("templates/conflicts.html")),
        ("conflict.html", include_str!("templates/conflict.html")),
        (
            "dead_letters.html",
            include_str!("templates/dead_letters.html"),
        ),
        ("connectors.html", include_str!("templates/connectors.html")),
        ("connector.html", include_str!("templates/connector.html")),
        (
            "reconciliations.html",
            include_str!("templates/reconciliations.html"),
        ),
        (
            "reconciliation.html",
            include_str!("templates/reconciliation.html"),
        ),
    ];
    for (name, source) in sources {
        if let Err(error) = env.add_template(name, source) {
            tracing::error!(template = name, %error, "console template does not parse");
        }
    }
    env.add_filter("when", when);
    env.add_filter("ms", unix_ms);
    env.add_filter("age", age);
    env
});

/// `2026-12-01T02:30:11.123456Z` → `2026-12-01 02:30:11 UTC`.
fn when(value: Option<String>) -> String {
    let Some(value) = value else {
        return String::new();
    };
    match chrono::DateTime::parse_from_rfc3339(&value) {
        Ok(at) => at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        Err(_) => value,
    }
}

/// Unix milliseconds → a time.
fn unix_ms(value: Option<i64>) -> String {
    value
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|at| at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Seconds → `3 s`, `4 min`, `2 h`.
fn age(seconds: f64) -> String {
    match seconds {
        s if s <= 0.0 => "–".to_owned(),
        s if s < 120.0 => format!("{s:.0} s"),
        s if s < 7_200.0 => format!("{:.0} min", s / 60.0),
        s => format!("{:.1} h", s / 3_600.0),
    }
}

/// Renders `template` with `data` for a signed-in operator (or for nobody:
/// sign-in and refusals).
fn render(session: Option<&Session>, status: StatusCode, template: &str, data: Value) -> Response {
    let csrf = session.map(|s| s.csrf.clone());
    let result = TEMPLATES.get_template(template).and_then(|t| {
        t.render(context! {
            csrf => csrf,
            signed_in => session.is_some(),
            ..data
        })
    });
    match result {
        Ok(html) => (status, Html(html)).into_response(),
        Err(error) => {
            tracing::error!(template, %error, "console page failed to render");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page failed to render",
            )
                .into_response()
        }
    }
}

/// A page from serialisable data.
fn page(session: &Session, template: &str, data: impl Serialize) -> Response {
    render(
        Some(session),
        StatusCode::OK,
        template,
        Value::from_serialize(&data),
    )
}

/// A refusal or failure, shown with the API's problem details.
fn render_problem(
    session: Option<&Session>,
    status: StatusCode,
    code: &str,
    title: &str,
    detail: &str,
) -> Response {
    render(
        session,
        status,
        "problem.html",
        context! { status => status.as_u16(), code, title, detail, errors => Vec::<Value>::new() },
    )
}

/// An API error as a page: its status, code, title, detail and field errors.
fn problem(session: &Session, error: ApiError) -> Response {
    let status = error.status();
    if status.is_server_error() {
        // An internal error's text is the same for every cause; the cause
        // goes to the log, as the API's answer writes it.
        match &error {
            ApiError::Internal(cause) => {
                tracing::error!(error = format!("{cause:#}"), "console action failed");
            }
            other => tracing::error!(error = %other, "console action failed"),
        }
    }
    let problem = error.problem();
    render(
        Some(session),
        status,
        "problem.html",
        Value::from_serialize(&problem),
    )
}

/// After a change: back to a page (303, so a reload does not post again),
/// with a notice for `session` (tagged: a page shows a notice only with
/// this session's tag, so a link cannot put words on ferry's pages).
fn done(session: &Session, to: &str, notice: &str) -> Response {
    let separator = if to.contains('?') { '&' } else { '?' };
    let tag = session.notice_tag(notice);
    let query = serde_urlencoded::to_string([("notice", notice), ("tag", tag.as_str())])
        .unwrap_or_default();
    Redirect::to(&format!("{to}{separator}{query}")).into_response()
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

/// Headers on every console response: nothing loads from elsewhere, no
/// framing, no caching of pages that show customer data. Put on every
/// answer under `/console` by the API's router (`api::console_headers`),
/// the ones made outside the console's routes too (a 404, a timeout).
pub fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Routes under `/console`.
pub fn router(max_component_bytes: usize) -> Router<AppState> {
    Router::new()
        .route("/console", get(pages::overview))
        .route(
            "/console/sign-in",
            get(pages::sign_in)
                .post(actions::sign_in)
                .layer(DefaultBodyLimit::max(actions::SIGN_IN_MAX_BYTES)),
        )
        .route("/console/sign-out", post(actions::sign_out))
        .route("/console/console.css", get(stylesheet))
        .route("/console/customers", get(pages::customers))
        .route("/console/customers/{id}", get(pages::customer))
        .route("/console/conflicts", get(pages::conflicts))
        .route("/console/conflicts/{id}", get(pages::conflict))
        .route(
            "/console/conflicts/{id}/resolve",
            post(actions::resolve_conflict),
        )
        .route("/console/dead-letters", get(pages::dead_letters))
        .route(
            "/console/dead-letters/replay",
            post(actions::replay_dead_letters),
        )
        .route(
            "/console/dead-letters/{id}/replay",
            post(actions::replay_dead_letter),
        )
        .route(
            "/console/connectors",
            get(pages::connectors)
                .post(actions::upload_connector)
                .layer(
                    // The component plus the form's few other bytes.
                    DefaultBodyLimit::max(max_component_bytes.saturating_add(64 * 1024)),
                ),
        )
        .route("/console/connectors/{name}", get(pages::connector))
        .route(
            "/console/connectors/{name}/activate",
            post(actions::activate),
        )
        .route("/console/connectors/{name}/enable", post(actions::enable))
        .route("/console/connectors/{name}/disable", post(actions::disable))
        .route(
            "/console/connectors/{name}/settings",
            post(actions::put_settings),
        )
        .route(
            "/console/reconciliations",
            get(pages::reconciliations).post(actions::start_reconciliation),
        )
        .route("/console/reconciliations/{id}", get(pages::reconciliation))
        .route(
            "/console/reconciliations/{id}/mismatches/{mismatch_id}/resolve",
            post(actions::resolve_mismatch),
        )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::TEMPLATES;

    fn render(name: &str, context: serde_json::Value) -> String {
        TEMPLATES
            .get_template(name)
            .and_then(|t| t.render(context))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    /// The link to a list's next page keeps the filters the page shows.
    #[test]
    fn next_pages_keep_their_filters() {
        let letters = render(
            "dead_letters.html",
            json!({"list": {"data": [], "next_cursor": "dl_1"}, "connector": "stripe",
                "direction": "outbound", "include_replayed": true}),
        );
        assert!(
            letters.contains("starting_after=dl_1&amp;connector=stripe&amp;direction=outbound&amp;include_replayed=true"),
            "{letters}"
        );
        let findings = render(
            "reconciliation.html",
            json!({"run": {"id": "rc_1", "status": "completed", "progress": {}, "counts": {}},
                "findings": {"data": [], "next_cursor": "mm_1"}, "kind": "orphan", "state": "open"}),
        );
        assert!(
            findings.contains("starting_after=mm_1&amp;kind=orphan&amp;state=open"),
            "{findings}"
        );
        let runs = render(
            "reconciliations.html",
            json!({"list": {"data": [], "next_cursor": "rc_9"}, "connector": "stripe"}),
        );
        assert!(
            runs.contains("/console/reconciliations?starting_after=rc_9&amp;connector=stripe"),
            "{runs}"
        );
        let conflicts = render(
            "conflicts.html",
            json!({"list": {"data": [], "next_cursor": "cf_1"}, "shown": "all", "customer_id": "cus_1"}),
        );
        assert!(
            conflicts.contains("state=all&amp;starting_after=cf_1&amp;customer_id=cus_1"),
            "{conflicts}"
        );
    }

    /// A value one side lacks reads "(empty)", not "None" (a remote whose
    /// value is the text "None" looked the same), and a resolved
    /// conflict shows what was written.
    #[test]
    fn a_missing_value_reads_empty_and_a_resolution_shows_what_it_wrote() {
        let findings = render(
            "reconciliation.html",
            json!({"run": {"id": "rc_1", "status": "completed", "progress": {}, "counts": {}},
                "findings": {"data": [{"id": "mm_1", "kind": "different", "state": "open",
                    "fields": [{"field": "phone", "local": "+15550100", "remote": null}]}],
                    "next_cursor": null}}),
        );
        assert!(findings.contains(">(empty)<"), "{findings}");
        assert!(!findings.contains(">None<"), "{findings}");
        let conflict = render(
            "conflict.html",
            json!({"conflict": {"id": "cf_1", "connector": "stripe", "state": "resolved",
                "resolution": "fields", "customer_id": "cus_1",
                "fields": [{"field": "name", "base": "Ada", "local": "Ada L", "remote": "Ada K",
                    "resolution": "fields", "value": "Grace"}]}}),
        );
        assert!(conflict.contains(">Grace<"), "{conflict}");
    }
}
