//! `/docs`: the browsable API reference. Scalar's script is vendored from
//! its npm package (`host/assets/scalar`, MIT) and served from the binary,
//! so the page renders without internet access; its default web fonts are
//! switched off for the same reason.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;

/// The vendored file, named by its version so it can be cached for good.
const SCALAR_PATH: &str = "/docs/scalar-1.76.0.js";
const SCALAR_JS: &[u8] = include_bytes!("../../assets/scalar/scalar-1.76.0.js");
const SCALAR_LICENSE: &str = include_str!("../../assets/scalar/LICENSE");

/// The page's own script, served as a file: the page's policy runs no
/// inline script.
const INIT_PATH: &str = "/docs/init.js";
const INIT_JS: &str = "Scalar.createApiReference('#app', {
  url: '/openapi.json',
  withDefaultFonts: false,
  hideClientButton: true,
  showDeveloperTools: 'never',
  telemetry: false,
  agent: { disabled: true },
})
";

/// The page shares the console's origin, and the console's cookie goes
/// with any request a script there makes to `/console/…`: a script that
/// ran here (a flaw in the third-party bundle, an injected one) could read
/// a console form's CSRF token and post it. So: scripts from ferry's own
/// files only, requests to ferry only, never framed. Styles may be inline
/// (Scalar sets them as it renders).
const DOCS_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; \
    connect-src 'self'; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

async fn page() -> impl IntoResponse {
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ferry API reference</title>
</head>
<body>
<div id="app"></div>
<script src="{SCALAR_PATH}"></script>
<script src="{INIT_PATH}"></script>
</body>
</html>"#
    );
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, DOCS_POLICY),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(html),
    )
}

async fn init() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        INIT_JS,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        SCALAR_JS,
    )
}

async fn license() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        SCALAR_LICENSE,
    )
}

/// `/docs`, its scripts and the bundle's licence.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/docs", get(page))
        .route(SCALAR_PATH, get(script))
        .route(INIT_PATH, get(init))
        .route("/docs/LICENSE.scalar.txt", get(license))
}
