//! The per-call store data: everything a connector's imports can see during
//! one call, the memory limiter, and the deny-all WASI context.
//!
//! A fresh [`CallState`] lives in a fresh `Store` for every call and is
//! dropped with it, so nothing a guest does survives into the next call.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::oauth::{CallTokens, TokenCache};
use super::policy::DeclaredHost;
use super::wit::latest::Manifest;
use super::{ConnectorConfig, RuntimeShared};

/// What the runtime knows about a loaded connector, shared by its calls.
pub(crate) struct ConnectorShared {
    /// The manifest's name, for logs.
    pub(crate) name: Arc<str>,
    pub(crate) manifest: Manifest,
    /// Parsed `manifest.hosts`.
    pub(crate) hosts: Vec<DeclaredHost>,
    /// Outbound request budget, shared by all calls of this connector.
    pub(crate) bucket: Mutex<TokenBucket>,
    /// OAuth tokens, shared by all calls of this connector.
    pub(crate) tokens: TokenCache,
}

impl ConnectorShared {
    /// The stand-in used while `manifest()` itself runs: it declares
    /// nothing, so every import that needs a declaration refuses.
    pub(crate) fn loading() -> Self {
        Self {
            name: Arc::from("(loading)"),
            manifest: Manifest {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                entities: Vec::new(),
                hosts: Vec::new(),
                host_settings: Vec::new(),
                settings: Vec::new(),
                secrets: Vec::new(),
                webhooks: false,
            },
            hosts: Vec::new(),
            bucket: Mutex::new(TokenBucket::new(0)),
            tokens: TokenCache::default(),
        }
    }
}

/// A token bucket: `rate` requests per second, bursts up to `rate`.
/// A rate of 0 means unlimited.
pub(crate) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&mut self) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Store data for one call.
pub(crate) struct CallState {
    pub(crate) runtime: Arc<RuntimeShared>,
    pub(crate) connector: Arc<ConnectorShared>,
    pub(crate) config: ConnectorConfig,
    /// Wall-clock end of the call, checked on every epoch tick.
    pub(crate) deadline: Instant,
    pub(crate) limiter: MemoryLimiter,
    /// Log lines written so far in this call, through `log.write` and to
    /// stdout or stderr alike (see [`super::log`]).
    pub(crate) log_lines: Arc<AtomicU32>,
    /// OAuth tokens this call obtained, for `{{token:NAME}}` substitution.
    pub(crate) tokens: CallTokens,
    /// What the call's responses are redacted with, and the version of the
    /// connector's issued tokens it holds (see [`TokenCache::issued_version`]):
    /// dropped when the call's own tokens change.
    pub(crate) redactor: Option<(u64, super::policy::Redactor)>,
    /// Set when ferry's own rate limit refused one of the call's requests:
    /// how long until the connector's next slot.
    pub(crate) throttled: Option<Duration>,
    /// Placeholder text the call's data holds (its arguments, its answers):
    /// left as written in request bodies ([`super::policy::placeholders_in`]).
    pub(crate) data_placeholders: super::policy::DataPlaceholders,
    /// Requests handed to the transport: whether the remote may have seen
    /// any of the call's writes.
    pub(crate) requests_sent: u32,
    /// Requests whose outcome the call never learnt: timed out, or still on
    /// the wire when the call's deadline cut it. The remote may apply one
    /// after the call has ended.
    pub(crate) requests_unsettled: u32,
    /// Requests the remote answered with a server error (5xx): it may have
    /// saved that answer under the request's idempotency key.
    pub(crate) server_errors: u32,
    /// Built on first use: most calls never touch WASI, and building a
    /// context seeds random number generators.
    wasi: Option<WasiCtx>,
    table: ResourceTable,
}

/// How many WASI handles (streams, timers) one call may hold at once. They
/// live in the host's memory, outside the guest's cap; wasmtime's default
/// (a million) let one call keep ≈ 60 MB there. A connector holds a few.
pub(crate) const MAX_WASI_HANDLES: usize = 4096;

impl CallState {
    pub(crate) fn new(
        runtime: Arc<RuntimeShared>,
        connector: Arc<ConnectorShared>,
        config: ConnectorConfig,
        deadline: Instant,
    ) -> Self {
        let limiter = MemoryLimiter::new(runtime.config.memory_limit_bytes);
        Self {
            runtime,
            connector,
            config,
            deadline,
            limiter,
            log_lines: Arc::default(),
            tokens: CallTokens::new(),
            redactor: None,
            throttled: None,
            data_placeholders: super::policy::DataPlaceholders::default(),
            requests_sent: 0,
            requests_unsettled: 0,
            server_errors: 0,
            wasi: None,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_WASI_HANDLES);
                table
            },
        }
    }

    /// Notes the placeholder text `data` holds: data the call was given or
    /// read, which a request body must carry as written.
    pub(crate) fn note_data(&mut self, data: &[u8]) {
        self.data_placeholders.note(data);
    }

    /// The connector's secret values, for substitution and redaction.
    pub(crate) fn secrets(&self) -> &BTreeMap<String, secrecy::SecretString> {
        &self.config.secrets
    }
}

// The shared `types` interface declares records only, no functions.
impl super::wit::latest::ferry::connector::types::Host for CallState {}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let name = self.connector.name.clone();
        let lines = self.log_lines.clone();
        let ctx = self.wasi.get_or_insert_with(|| deny_all_wasi(name, lines));
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

/// The most random bytes a guest gets in one call of `get-random-bytes`
/// (Rust's std asks for 16 or 32): WASI's default of 64 MiB had the host
/// allocate and fill that much for each call, outside the guest's memory
/// cap, in one step no deadline interrupts.
const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// WASI with nothing in it. Rust's std imports `wasi:*` even in a guest that
/// never uses it, so the interfaces must be linked, but they grant nothing:
/// no preopened directories, no environment, no arguments, no stdin, no
/// sockets and no name lookup. stdout and stderr go to the host log.
fn deny_all_wasi(connector: Arc<str>, lines: Arc<AtomicU32>) -> WasiCtx {
    WasiCtx::builder()
        .stdout(GuestOutput {
            connector: connector.clone(),
            stream: "stdout",
            lines: lines.clone(),
        })
        .stderr(GuestOutput {
            connector,
            stream: "stderr",
            lines,
        })
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM_BYTES)
        .build()
}

/// Caps a call's linear memory and remembers whether the cap was hit, so a
/// guest that aborts after a failed allocation is reported as out of memory
/// rather than as a generic trap.
pub(crate) struct MemoryLimiter {
    limit: usize,
    pub(crate) hit: bool,
}

impl MemoryLimiter {
    fn new(limit: usize) -> Self {
        Self { limit, hit: false }
    }
}

/// Table elements allowed per table; Rust guests use a few hundred.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.limit && maximum.is_none_or(|m| desired <= m);
        if !allowed {
            self.hit = true;
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= MAX_TABLE_ELEMENTS && maximum.is_none_or(|m| desired <= m);
        if !allowed {
            self.hit = true;
        }
        Ok(allowed)
    }
}

/// A guest's stdout or stderr, written to the host log a write at a time,
/// within the call's line budget (shared with `log.write`).
struct GuestOutput {
    connector: Arc<str>,
    stream: &'static str,
    lines: Arc<AtomicU32>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LogWriter {
            connector: self.connector.clone(),
            stream: self.stream,
            lines: self.lines.clone(),
        })
    }
}

struct LogWriter {
    connector: Arc<str>,
    stream: &'static str,
    lines: Arc<AtomicU32>,
}

/// Longest single write copied into the log; the rest is dropped so a guest
/// cannot flood the log with one write.
const MAX_OUTPUT_LOGGED: usize = 4096;

impl tokio::io::AsyncWrite for LogWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let shown = &buf[..buf.len().min(MAX_OUTPUT_LOGGED)];
        let text = String::from_utf8_lossy(shown);
        let text = text.trim_end();
        if !text.is_empty() && super::log::take_line(&self.lines, &self.connector) {
            let text = super::log::one_line(text.to_owned());
            tracing::info!(target: "ferry::connector", connector = %self.connector, stream = self.stream, "{text}");
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refuses_after_burst() {
        let mut bucket = TokenBucket::new(2);
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_err());
        let wait = bucket.take().expect_err("empty");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        let mut unlimited = TokenBucket::new(0);
        assert!((0..1000).all(|_| unlimited.take().is_ok()));
    }
}
