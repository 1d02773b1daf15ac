//! Logging: a `tracing` subscriber writing text or JSON lines, filtered by
//! `RUST_LOG` (default `info`). Request spans carry the request id, which is
//! the correlation id stored with every outbox event.

use axum::http::Request;
use tracing::Span;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter};

use crate::config::LogFormat;

/// Installs the global subscriber writing to `sink`. Fails if one is
/// already installed.
pub fn init<W>(format: LogFormat, default_filter: &str, sink: W) -> anyhow::Result<()>
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt::layer().with_writer(sink)).try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(sink),
            )
            .try_init()?,
    }
    Ok(())
}

/// The span of one HTTP request, named by method, path and request id.
pub fn request_span<B>(request: &Request<B>) -> Span {
    let request_id = crate::api::extract::request_id(request.headers());
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        correlation_id = %request_id,
    )
}
