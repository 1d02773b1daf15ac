//! The HTTP API: `/api/v1` (admin, bearer token when configured), health
//! probes, the OpenAPI document and its browsable docs page.

pub mod conflicts;
pub mod connectors;
pub mod customers;
pub mod dead_letters;
pub mod docs;
pub mod error;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod reconciliations;
pub mod webhooks;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use self::error::ApiError;
use crate::app::AppState;

/// The OpenAPI document, generated from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "ferry", description = "Customer catalog kept in two-way sync with external systems."),
    paths(
        customers::create_customer,
        customers::list_customers,
        customers::get_customer,
        customers::patch_customer,
        customers::replace_customer,
        customers::delete_customer,
        customers::sync::customer_sync,
        connectors::upload_connector,
        connectors::list_connectors,
        connectors::get_connector,
        connectors::list_versions,
        connectors::activate,
        connectors::enable,
        connectors::disable,
        connectors::delete_connector,
        connectors::put_settings,
        dead_letters::list_dead_letters,
        dead_letters::get_dead_letter,
        dead_letters::replay_dead_letter,
        dead_letters::replay_dead_letters,
        webhooks::receive,
        conflicts::list_conflicts,
        conflicts::get_conflict,
        conflicts::resolve_conflict,
        reconciliations::start_reconciliation,
        reconciliations::list_reconciliations,
        reconciliations::get_reconciliation,
        reconciliations::cancel_reconciliation,
        reconciliations::list_mismatches,
        reconciliations::resolve_mismatch,
        health::health,
        health::list_links,
        health::list_inbox,
        healthz,
        health::readyz,
    ),
    components(schemas(error::Problem, error::FieldError)),
    modifiers(&BearerAuth, &EveryRoute),
    tags(
        (name = "customers", description = "The customer catalog"),
        (name = "connectors", description = "Connectors: upload, versions, activation, switches and configuration"),
        (name = "sync", description = "Sync status and dead letters"),
        (name = "reconciliation", description = "Reconciliation and backfill runs, their reports and findings"),
        (name = "webhooks", description = "Public endpoints remote systems deliver changes to"),
        (name = "health", description = "Probes"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// What any route may answer whatever its handler does, added to every
/// operation that does not describe it already: 408 once the request
/// outlives `request_timeout` (a layer over every route), and, on the
/// routes that read the store, 503 when it does not answer in time. Listed
/// by hand, most routes lacked them, and a client generated from the
/// document had no case for either.
struct EveryRoute;

impl Modify for EveryRoute {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, ResponseBuilder, Type};
        let problem = |description: &str| {
            ResponseBuilder::new().description(description).content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
        };
        let timeout = problem(
            "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)",
        )
        .build();
        let busy = problem(
            "The store did not answer in time (`store_busy`), or a write found it read-only \
             (`store_read_only`): nothing was written; or the connection to it was lost \
             (`store_unavailable`): a write under way may have landed (send it again with the \
             same `Idempotency-Key`)",
        )
        .header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(utoipa::openapi::ObjectBuilder::new().schema_type(Type::String))
                .description(Some("Seconds to wait before sending it again"))
                .build(),
        )
        .build();
        // Open mode (no admin token) serves the loopback only, and refuses
        // a request another site's page sent (`same_origin_only`), on
        // every route.
        let cross_site = problem(
            "Open mode: a request another site's page sent, one for another host, or one a \
             proxy forwarded (`cross_site_request`)",
        )
        .build();
        for (path, item) in &mut openapi.paths.paths {
            let reads_the_store = path.starts_with("/api/") || path.starts_with("/webhooks/");
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut operation.responses.responses;
                responses
                    .entry("408".to_owned())
                    .or_insert_with(|| RefOr::T(timeout.clone()));
                if reads_the_store {
                    responses
                        .entry("503".to_owned())
                        .or_insert_with(|| RefOr::T(busy.clone()));
                }
                responses
                    .entry("403".to_owned())
                    .or_insert_with(|| RefOr::T(cross_site.clone()));
            }
        }
    }
}

/// Process is up.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is up", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `/openapi.json`, built and written once: it is open to anyone, and was
/// built anew (every path, every schema) for each request.
async fn openapi_json() -> axum::response::Response {
    use axum::response::IntoResponse;
    use bytes::Bytes;
    static DOCUMENT: std::sync::LazyLock<Bytes> = std::sync::LazyLock::new(|| {
        serde_json::to_vec(&ApiDoc::openapi())
            .map(Bytes::from)
            .unwrap_or_default()
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        DOCUMENT.clone(),
    )
        .into_response()
}

/// The answer to a request whose handler panicked: 500 `internal`, the
/// panic's text in the log.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let text = crate::app::panic_text(&*panic);
    ApiError::Internal(anyhow::anyhow!("a request's handler panicked: {text}")).into_response()
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// Every answer under `/console` carries the console's security headers
/// (no framing, nothing loaded from elsewhere, no caching), the ones made
/// outside its routes too: a 404, a 405, a timeout, an open-mode refusal.
/// Every answer under `/webhooks/` is sandboxed: a connector chooses its
/// reply's body and content type (a SOAP acknowledgement), and one that
/// answered `text/html` echoing its request would run script on the
/// console's origin, which reads the console's forms and posts them.
async fn console_headers(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    let path = request.uri().path();
    let console = path == "/console" || path.starts_with("/console/");
    let webhook = path.starts_with("/webhooks/");
    let mut response = next.run(request).await;
    if console {
        return crate::console::security_headers(response);
    }
    if webhook {
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox; default-src 'none'; frame-ancestors 'none'"),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    response
}

/// A path that does not decode to UTF-8 names nothing here: 404 as
/// problem+json, not the text/plain 400 a path parameter's extraction
/// would answer.
async fn utf8_paths_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if percent_encoding::percent_decode_str(request.uri().path())
        .decode_utf8()
        .is_err()
    {
        return axum::response::IntoResponse::into_response(ApiError::NotFound);
    }
    next.run(request).await
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Open mode (no admin token, loopback only): nothing but the address
/// keeps a web page the operator visits from using the API, so a request
/// must name a loopback host (a page on a rebound DNS name cannot read or
/// write), and a write a browser sends must come from ferry's own origin
/// (a page elsewhere cannot post a form to it). Webhooks may come under
/// any host name (a tunnel forwards them under its public one), but not
/// from a browser: a sender (Stripe, Salesforce) sends neither `Origin`
/// nor `Sec-Fetch-Site`, and a page the operator visits could otherwise
/// post to a connector that signs nothing (Salesforce's Outbound Messages
/// carry an organization id, no signature; its proxy's checks are not on
/// the loopback path). A browser's webhook request is held to both rules:
/// a page on a name rebound to 127.0.0.1 sends an `Origin` equal to its
/// host.
async fn same_origin_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::header;
    use axum::response::IntoResponse;
    let browser = request.headers().contains_key(header::ORIGIN)
        || request.headers().contains_key("sec-fetch-site");
    let webhook = request.uri().path().starts_with("/webhooks/") && !browser;
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(|a| a.as_str().to_owned()));
    // A proxy on this machine forwards the world's requests from a
    // loopback address, and may keep a loopback `Host` (nginx's plain
    // `proxy_pass` to 127.0.0.1): the API was open to anyone who reached
    // the proxy. The headers most proxies add say it forwarded them; one
    // that adds none (nginx's plain `proxy_pass` again) cannot be told
    // apart, and the docs say to set a token behind any proxy.
    if !webhook {
        if let Some(forwarded) = request
            .headers()
            .keys()
            .map(axum::http::HeaderName::as_str)
            .find(|name| FORWARDED_HEADERS.contains(name) || name.starts_with("x-forwarded-"))
        {
            return ApiError::CrossSiteRequest(format!(
                "this ferry runs without an admin token and answers only requests made on its own machine, not one a proxy forwarded (`{forwarded}`); set FERRY_ADMIN_TOKEN to serve behind a proxy"
            ))
            .into_response();
        }
    }
    if let Some(host) = host.as_ref().filter(|_| !webhook) {
        if !is_loopback_host(host) {
            return ApiError::CrossSiteRequest(format!(
                "this ferry runs without an admin token and answers only requests to a loopback host, not `{host}`"
            ))
            .into_response();
        }
    }
    let safe = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !safe {
        let origin = request
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok());
        let fetch_site = request
            .headers()
            .get("sec-fetch-site")
            .and_then(|s| s.to_str().ok());
        let same_origin = match (origin, &host) {
            (Some(origin), Some(host)) => origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
            (Some(_), None) => false,
            // No Origin: not a browser's cross-origin write, unless the
            // browser says so.
            (None, _) => !matches!(fetch_site, Some("cross-site" | "same-site")),
        };
        if !same_origin {
            return ApiError::CrossSiteRequest(
                "a write from another origin is refused while this ferry runs without an admin token"
                    .to_owned(),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Headers a proxy adds to what it forwards (and any `X-Forwarded-*`).
const FORWARDED_HEADERS: [&str; 3] = ["forwarded", "x-real-ip", "via"];

/// `localhost`, `127.x.x.x` or `[::1]`, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The whole HTTP surface with its middleware.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.max_body_bytes;
    let max_component_bytes = state.settings.max_component_bytes;
    let request_timeout = state.settings.request_timeout;
    let v1 = Router::new()
        .merge(customers::router())
        .merge(connectors::router(state.settings.max_component_bytes))
        .merge(dead_letters::router())
        .merge(conflicts::router())
        .merge(reconciliations::router())
        .merge(health::router());
    let mut routes = Router::new()
        .nest("/api/v1", v1)
        .merge(webhooks::router())
        .route("/healthz", get(healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(docs::router())
        .merge(crate::console::router(max_component_bytes));
    // A handler's panic (a bug) answers 500 `internal` as documented;
    // uncaught, it ended the connection with no answer at all. Inside the
    // metrics layer, so that the 500 is counted.
    routes = routes.route_layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked));
    // A whole request fails after `request_timeout` (408 request_timeout).
    // Inside the metrics layer, so that a request cut off is counted too.
    routes = routes.route_layer(
        ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                move |_: tower::BoxError| async move {
                    ApiError::RequestTimeout {
                        seconds: request_timeout.as_secs(),
                    }
                },
            ))
            .layer(tower::timeout::TimeoutLayer::new(request_timeout)),
    );
    if state.metrics.is_some() {
        // Counted by route template; unmatched paths are not counted (a
        // client could otherwise mint a series per path).
        routes = routes.route_layer(axum::middleware::from_fn(crate::metrics::track_http));
    }
    if state.settings.admin_token.is_none() {
        routes = routes.layer(axum::middleware::from_fn(same_origin_only));
    }
    routes
        .layer(axum::middleware::from_fn(utf8_paths_only))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // And around the middleware and fallbacks too (their panics are
        // not counted: no route matched yet).
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .layer(axum::middleware::from_fn(console_headers))
        .layer(DefaultBodyLimit::max(max_body))
        // A stalled body fails after `body_read_timeout`.
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            state.settings.body_read_timeout,
        ))
        .layer(
            ServiceBuilder::new()
                .map_request(extract::keep_usable_request_id)
                .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(crate::telemetry::request_span)
                        // One access-log line per request, inside the request span.
                        .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                        .on_failure(on_failure),
                )
                .layer(PropagateRequestIdLayer::x_request_id()),
        )
        .with_state(state)
}

/// A failed response's log line: at `error`, but a 503 at `warn`. A 503
/// is mostly ferry saying "busy, send it again" (the store, the webhook
/// buffer or every connector instance busy): expected under load,
/// answered with `Retry-After`, and paged on at `error` for nothing. The
/// others log their own line at `error` (see `ApiError::into_response`).
fn on_failure(
    class: tower_http::classify::ServerErrorsFailureClass,
    latency: std::time::Duration,
    _span: &tracing::Span,
) {
    let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    if failure_level(&class) == tracing::Level::WARN {
        tracing::warn!(classification = %class, latency_ms, "response failed");
    } else {
        tracing::error!(classification = %class, latency_ms, "response failed");
    }
}

/// The level [`on_failure`] logs `class` at.
fn failure_level(class: &tower_http::classify::ServerErrorsFailureClass) -> tracing::Level {
    match class {
        tower_http::classify::ServerErrorsFailureClass::StatusCode(code)
            if *code == axum::http::StatusCode::SERVICE_UNAVAILABLE =>
        {
            tracing::Level::WARN
        }
        _ => tracing::Level::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    /// A handler that panics answers 500 `internal` as problem+json (the
    /// layer `router` puts on every route), not a dropped connection.
    #[tokio::test]
    async fn a_handler_that_panics_answers_500_internal() {
        let app = axum::Router::new()
            .route(
                "/boom",
                axum::routing::get(|| async {
                    panic!("a bug");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                super::panicked,
            ));
        let response = app
            .oneshot(Request::get("/boom").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["code"], "internal", "{problem}");
    }

    /// A 503 ("busy, send it again") is logged at `warn`, any other
    /// failure at `error`.
    #[test]
    fn a_503_is_a_warning() {
        use axum::http::StatusCode;
        use tower_http::classify::ServerErrorsFailureClass as Class;
        assert_eq!(
            super::failure_level(&Class::StatusCode(StatusCode::SERVICE_UNAVAILABLE)),
            tracing::Level::WARN
        );
        for failure in [
            Class::StatusCode(StatusCode::INTERNAL_SERVER_ERROR),
            Class::StatusCode(StatusCode::BAD_GATEWAY),
            Class::Error("a panic".to_owned()),
        ] {
            assert_eq!(super::failure_level(&failure), tracing::Level::ERROR);
        }
    }
}
