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
<script>
Scalar.createApiReference('#app', {{
  url: '/openapi.json',
  withDefaultFonts: false,
  hideClientButton: true,
  showDeveloperTools: 'never',
  telemetry: false,
  agent: {{ disabled: true }},
}})
</script>
</body>
</html>"#
    );
    ([(header::CACHE_CONTROL, "no-cache")], Html(html))
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

/// `/docs`, its script and the script's licence.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/docs", get(page))
        .route(SCALAR_PATH, get(script))
        .route("/docs/LICENSE.scalar.txt", get(license))
}
