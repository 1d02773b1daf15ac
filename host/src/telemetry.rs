//! Logging: a `tracing` subscriber writing text or JSON lines, filtered by
//! `RUST_LOG` (default `info`). Request spans carry the request id, which is
//! the correlation id stored with every outbox event. With an OTLP endpoint
//! the same spans are exported to an OpenTelemetry collector
//! (docs/operations.md).

use axum::http::Request;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
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
    init_with_export(format, default_filter, sink, None).map(drop)
}

/// Keeps the span exporter running; dropping it flushes what is buffered.
#[must_use = "dropping it stops the span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter's HTTP client blocks: keep that off the async
            // workers.
            let shutdown = move || {
                if let Err(error) = provider.shutdown() {
                    eprintln!("flushing the OTLP span export failed: {error}");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(_) => tokio::task::block_in_place(shutdown),
                Err(_) => shutdown(),
            }
        }
    }
}

/// The OTLP/HTTP traces URL for a collector address: `/v1/traces` is
/// appended unless the URL has a path of its own.
pub fn otlp_traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = url::Url::parse(trimmed).is_ok_and(|u| u.path() != "/" && !u.path().is_empty());
    if has_path {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

/// Builds the batch exporter (its HTTP client blocks: called off the async
/// workers).
fn otlp_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(otlp_traces_url(endpoint))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("ferry")
                .build(),
        )
        .build())
}

/// [`init`], and with `otlp_endpoint` the spans are exported too.
pub fn init_with_export<W>(
    format: LogFormat,
    default_filter: &str,
    sink: W,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Telemetry>
where
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let provider = match otlp_endpoint {
        Some(endpoint) => Some(match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| otlp_provider(endpoint))?,
            Err(_) => otlp_provider(endpoint)?,
        }),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("ferry")));
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
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
    Ok(Telemetry { provider })
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

#[cfg(test)]
mod tests {
    use super::otlp_traces_url;

    #[test]
    fn the_traces_path_is_added_to_a_bare_collector_address() {
        assert_eq!(
            otlp_traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            otlp_traces_url("https://x.example/otlp/v1/traces"),
            "https://x.example/otlp/v1/traces"
        );
    }
}
