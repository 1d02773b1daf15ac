//! The connector runtime: loads connector components and runs their calls in
//! a sandbox.
//!
//! One wasmtime [`Engine`] with the pooling allocator, a compiled-component
//! cache keyed by the sha256 of the bytes, an `InstancePre` per loaded
//! connector and a fresh `Store` per call. Each call has a wall-clock
//! deadline (epoch interruption stops CPU loops; a timer stops waits) and a
//! memory cap. The imports a connector sees are one module each: [`http`]
//! (through [`policy`] and a [`HttpTransport`]), [`settings`], [`crypto`],
//! [`log`] and [`clock`]. WASI is linked but grants nothing. See
//! `docs/runtime.md`.

pub mod build;
mod clock;
mod crypto;
pub mod customer;
mod http;
mod log;
mod manifest;
#[cfg(feature = "network")]
mod network;
mod oauth;
mod policy;
mod settings;
mod state;
mod transport;
pub mod wit;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{
    Component, ComponentExportIndex, ComponentNamedList, ComponentType, Instance, InstancePre,
    Lift, Linker, Lower, ResourceTableError,
};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline,
};

#[cfg(feature = "network")]
pub use self::network::ReqwestTransport;
use self::oauth::TokenCache;
use self::state::{CallState, ConnectorShared, TokenBucket};
pub use self::transport::{HttpTransport, WireError, WireRequest, WireResponse};
pub use self::wit::latest::{
    ChangeKind, ConnectorError, Event, Manifest, Operation, Page, ParsedWebhook, PushRequest,
    PushResult, RateLimit, RemoteRecord, SecretSpec, SettingSpec, WebhookReply, WebhookRequest,
};

/// The longest event or remote id ferry keeps.
pub const MAX_ID_BYTES: usize = 255;

/// Why an id a connector produced in a webhook event (`what`: "event id",
/// "remote id") cannot key ferry's inbox, if it cannot: [`unstorable`], or
/// longer than [`MAX_ID_BYTES`]. ferry refuses such an event (503, so the
/// sender keeps it); the SDK's test kit fails the call.
pub fn unkeyable(what: &str, id: &str) -> Option<String> {
    unstorable(what, id).or_else(|| {
        (id.len() > MAX_ID_BYTES).then(|| format!("a {what} longer than {MAX_ID_BYTES} bytes"))
    })
}

/// How far ahead of the host's clock an event's own time may be (a
/// remote's clock may run ahead of a replica's): a later one is dated on
/// arrival plus this much, its order among its record's events lost. The
/// SDK's test kit holds a connector's deliveries to it.
pub const FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

/// The most events one delivery may hold (a Salesforce Outbound Message
/// carries up to 100 notifications, a Stripe delivery one event).
pub const MAX_DELIVERY_EVENTS: usize = 1000;

/// The longest record an event may carry, in bytes of JSON (a customer's
/// record is a few KiB).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The most bytes of JSON the records of one call's answer (a page, a
/// delivery's events) may hold together: a page of 100 records at 80 KiB
/// each. Each record within [`MAX_RECORD_BYTES`], 60 of them filled a
/// guest's 64 MiB, parsed on the host at up to 16 times that, for each of
/// the calls running at once.
pub const MAX_CALL_RECORD_BYTES: usize = 8 * 1024 * 1024;

/// Refuses records a connector read that are longer than
/// [`MAX_RECORD_BYTES`] each, or [`MAX_CALL_RECORD_BYTES`] together
/// (parsed on the host at many times their size).
fn oversized(records: &[RemoteRecord]) -> Result<(), CallError> {
    if records.iter().any(|r| r.record.len() > MAX_RECORD_BYTES) {
        return Err(CallError::Connector(ConnectorError::Permanent(format!(
            "the connector read a record longer than {MAX_RECORD_BYTES} bytes"
        ))));
    }
    let total: usize = records.iter().map(|r| r.record.len()).sum();
    if total > MAX_CALL_RECORD_BYTES {
        return Err(CallError::Connector(ConnectorError::Permanent(format!(
            "the connector read {total} bytes of records in one answer, more than {MAX_CALL_RECORD_BYTES}"
        ))));
    }
    Ok(())
}

/// One event of a delivery that [`checked_delivery`] passed.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedEvent {
    /// Its record, parsed.
    pub record: Option<serde_json::Value>,
    /// The same event again, earlier in the delivery: stored once.
    pub repeat: bool,
}

/// The events a connector parsed from one delivery, checked as ferry's
/// webhook endpoint stores them, with their records parsed once; or why
/// the endpoint refuses the delivery (503, so the sender keeps it; the
/// connector is what is broken): an event it cannot key ([`unkeyable`]), a
/// record that is not a JSON object, or one event id given to two different events
/// (the inbox would keep the first and drop the other as a redelivery).
/// The SDK's test kit fails the call with the same text.
/// A delivery is bounded too ([`MAX_DELIVERY_EVENTS`], [`MAX_RECORD_BYTES`]
/// and [`MAX_CALL_RECORD_BYTES`], its entity at [`MAX_ID_BYTES`]): a
/// guest's answer to a small body was as large as its memory, parsed on
/// the host at many times that.
pub fn checked_delivery(events: &[Event]) -> Result<Vec<CheckedEvent>, String> {
    if events.len() > MAX_DELIVERY_EVENTS {
        return Err(format!(
            "{} events in one delivery, more than {MAX_DELIVERY_EVENTS}",
            events.len()
        ));
    }
    let total: usize = events
        .iter()
        .filter_map(|e| e.record.as_ref())
        .map(String::len)
        .sum();
    if total > MAX_CALL_RECORD_BYTES {
        return Err(format!(
            "the delivery's records hold {total} bytes, more than {MAX_CALL_RECORD_BYTES}"
        ));
    }
    let mut checked: Vec<CheckedEvent> = Vec::with_capacity(events.len());
    let mut first_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (index, event) in events.iter().enumerate() {
        if let Some(problem) =
            unkeyable("event id", &event.id).or_else(|| unkeyable("remote id", &event.remote_id))
        {
            return Err(problem);
        }
        // An origin key or remote type too long is the endpoint's to drop
        // or cut (a client's key can never be ferry's own): the delivery
        // stands.
        if event.entity.len() > MAX_ID_BYTES {
            return Err(format!(
                "event {}'s entity is longer than {MAX_ID_BYTES} bytes",
                event.id
            ));
        }
        if event
            .record
            .as_ref()
            .is_some_and(|r| r.len() > MAX_RECORD_BYTES)
        {
            return Err(format!(
                "event {}'s record is longer than {MAX_RECORD_BYTES} bytes",
                event.id
            ));
        }
        let record = match event.record.as_deref().map(serde_json::from_str) {
            // A record is an object: `null` or `[]` read as a record whose
            // every field the remote cleared.
            Some(Ok(serde_json::Value::Object(record))) => Some(serde_json::Value::Object(record)),
            Some(Ok(_)) => return Err(format!("event {}'s record is not a JSON object", event.id)),
            Some(Err(error)) => {
                return Err(format!("event {}'s record is not JSON: {error}", event.id))
            }
            None => None,
        };
        let repeat = match first_of.get(event.id.as_str()) {
            Some(&first) => {
                let earlier = &events[first];
                let same = earlier.remote_id == event.remote_id
                    && earlier.entity == event.entity
                    && earlier.kind == event.kind
                    && checked[first].record == record;
                if !same {
                    return Err(format!(
                        "event id {} given to two different events of one delivery",
                        event.id
                    ));
                }
                true
            }
            None => {
                first_of.insert(&event.id, index);
                false
            }
        };
        checked.push(CheckedEvent { record, repeat });
    }
    Ok(checked)
}

/// The largest reply body a connector may give a webhook's sender (a
/// Salesforce acknowledgement is a few hundred bytes).
pub const MAX_REPLY_BYTES: usize = 64 * 1024;

/// Why a connector's reply to a webhook cannot be sent, if it cannot: a
/// body over [`MAX_REPLY_BYTES`] (a small delivery answered with as much
/// as the guest's memory made ferry an amplifier), or a content type over
/// [`MAX_ID_BYTES`] or not visible ASCII. ferry refuses the delivery as it refuses events it
/// cannot store (503, the sender keeps it); the SDK's test kit fails the
/// call.
pub fn reply_problem(reply: Option<&WebhookReply>) -> Option<String> {
    let reply = reply?;
    if reply.body.len() > MAX_REPLY_BYTES {
        Some(format!(
            "a reply of {} bytes, more than {MAX_REPLY_BYTES}",
            reply.body.len()
        ))
    } else if reply.content_type.len() > MAX_ID_BYTES {
        Some(format!(
            "a reply content type longer than {MAX_ID_BYTES} bytes"
        ))
    } else if !reply
        .content_type
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        // Not a header value: the reply went out with no content type, and
        // a sender that then did not take it as an acknowledgement
        // delivered the events again for a day.
        Some("a reply content type that is not visible ASCII".to_owned())
    } else {
        None
    }
}

/// Why [`checked_delivery`] refuses `events`, if it does.
pub fn delivery_problem(events: &[Event]) -> Option<String> {
    checked_delivery(events).err()
}

/// Why a remote id a connector returned (from a push or a listing) cannot
/// be stored on a link, if it cannot: empty, or holding a NUL (which
/// PostgreSQL cannot store). ferry dead-letters a push that returns one,
/// and a listing skips the record; the SDK's test kit fails the push. (No
/// length cap: links made before one existed may hold longer ids.)
pub fn unstorable(what: &str, id: &str) -> Option<String> {
    if id.is_empty() {
        Some(format!("an empty {what}"))
    } else if id.contains('\0') {
        Some(format!("a {what} with a NUL character"))
    } else {
        None
    }
}

/// Why a listing's `next_cursor` cannot be followed, if it cannot: one
/// ferry cannot store (see [`unstorable`]), or the cursor that asked for
/// the page (the listing would never end). A reconciliation run fails on
/// either; the SDK's test kit fails the `list` call.
pub fn cursor_problem(asked: Option<&str>, next: Option<&str>) -> Option<String> {
    let next = next?;
    if let Some(problem) = unstorable("cursor", next) {
        return Some(format!("the connector answered {problem}"));
    }
    (asked == Some(next)).then(|| {
        "the connector answered a page with the cursor that asked for it; its listing \
         would never end"
            .to_owned()
    })
}

/// Why a record a connector's `fetch` or `list` returned cannot be taken,
/// if it cannot: not JSON, or JSON that is no object (`null` or `[]`
/// would read as a record whose every field the remote cleared). ferry
/// dead-letters an event whose `fetch` returns one, and a listing skips
/// the record; the SDK's test kit fails the call.
pub fn record_problem(record: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(record) {
        Ok(value) if value.is_object() => None,
        Ok(_) => Some("the connector returned a record that is not a JSON object".to_owned()),
        Err(e) => Some(format!("the connector returned invalid JSON: {e}")),
    }
}

/// The largest webhook delivery ferry reads by default (its
/// `webhook_max_body_bytes`); a larger one is answered 413.
pub const DEFAULT_WEBHOOK_MAX_BODY_BYTES: usize = 256 * 1024;

/// The idempotency key ferry sends with a push of `customer_id` at
/// `version` to `connector` (`-r{repairs}` once a dead letter's replay, a
/// reconciliation's repair or a failure the remote answered asked for a
/// fresh one). A remote's key length limit must allow it: the
/// customer ids are 36 bytes, connector names up to 64.
pub fn idempotency_key(connector: &str, customer_id: &str, version: i64, repairs: i32) -> String {
    if repairs > 0 {
        format!("ferry-{connector}-{customer_id}-v{version}-r{repairs}")
    } else {
        format!("ferry-{connector}-{customer_id}-v{version}")
    }
}

/// Whether `name` is a valid connector name (what a manifest's `name` must
/// be): 1-64 characters of `[a-z0-9-]`, not starting or ending with `-`.
pub fn valid_connector_name(name: &str) -> bool {
    manifest::is_connector_name(name)
}

/// How often the epoch advances. A guest stuck in a loop is stopped at most
/// one tick after its deadline and yields to the executor once per tick.
const EPOCH_TICK: Duration = Duration::from_millis(2);

/// The most bytes a guest may hand the host in one crossing (the arguments
/// of one host call, or one export's results): above the largest a host
/// call takes (a 16 MiB message to sign) and an answer may hold (8 MiB of
/// records). wasmtime's default, 128 MiB, let a guest whose strings all
/// point at the same bytes make the host copy twice its memory limit, for
/// each call running at once.
const HOSTCALL_BYTES: usize = 24 * 1024 * 1024;

/// Core instances, tables and memories a connector component may create
/// per component instance (a Rust guest uses 3-4 core instances and one
/// memory; each memory slot reserves 4 GiB + guard of address space).
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
const TABLES_PER_COMPONENT: u32 = 4;
const MEMORIES_PER_COMPONENT: u32 = 1;

/// Operator settings for the sandbox and outbound HTTP.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Wall-clock limit of one call (instantiation included).
    pub call_timeout: Duration,
    /// Linear memory a call may grow to.
    pub memory_limit_bytes: usize,
    /// Allow loopback/private/link-local addresses and plain `http://`.
    /// For tests and local fakes; never in production.
    pub allow_private_hosts: bool,
    /// Operator allow-list of hosts (`api.stripe.com` or `*.stripe.com`);
    /// empty allows every host a connector declares.
    pub allowed_hosts: Vec<String>,
    /// Operator deny-list, same syntax; it wins over the allow-list.
    pub denied_hosts: Vec<String>,
    /// TCP + TLS connect timeout of outbound requests.
    pub http_connect_timeout: Duration,
    /// Total time of one outbound request; a connector may ask for less.
    pub http_total_timeout: Duration,
    /// Largest response body handed to a connector.
    pub max_response_bytes: usize,
    /// Instances that may run at once across all connectors (pool slots);
    /// further calls wait for a free slot.
    pub max_instances: u32,
    /// Instances one loaded connector may run at once, of `max_instances`:
    /// a connector whose calls wait (a slow remote, a guest sleeping until
    /// its deadline, a flood of webhooks to it) held every slot, and every
    /// other connector's calls failed as throttled.
    pub max_instances_per_connector: u32,
    /// Where compiled components are cached across restarts (wasmtime's
    /// own cache, keyed by the bytes and the engine settings; feature
    /// `disk-cache`); `None` keeps the in-memory cache only.
    pub cache_dir: Option<PathBuf>,
    /// Outbound requests per second per connector (token bucket, bursts of
    /// the same size); 0 disables the limit.
    pub http_requests_per_second: u32,
    /// Components compiled at once (uploads, loads, checks); further
    /// compiles wait. A compile takes cores and memory for seconds and
    /// cannot be stopped once begun: unbounded, a burst of uploads held
    /// compiler memory and blocking threads many times over. Default: half
    /// the cores, at least one.
    pub max_compiles: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(10),
            memory_limit_bytes: 64 * 1024 * 1024,
            allow_private_hosts: false,
            allowed_hosts: Vec::new(),
            denied_hosts: Vec::new(),
            http_connect_timeout: Duration::from_secs(5),
            http_total_timeout: Duration::from_secs(30),
            max_response_bytes: 4 * 1024 * 1024,
            max_instances: 1000,
            max_instances_per_connector: 250,
            cache_dir: None,
            http_requests_per_second: 100,
            max_compiles: std::thread::available_parallelism()
                .map_or(1, |cores| cores.get() / 2)
                .max(1),
        }
    }
}

/// The operator's per-connector configuration, passed to every call.
#[derive(Debug, Clone, Default)]
pub struct ConnectorConfig {
    /// Non-secret settings by name (what `settings.get` answers).
    pub settings: BTreeMap<String, String>,
    /// Secret values by name; a connector can only name them.
    pub secrets: BTreeMap<String, secrecy::SecretString>,
}

/// The runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime rejected the engine configuration (e.g. the pool cannot be
    /// reserved with these limits).
    #[error("cannot create the WebAssembly engine: {0}")]
    Engine(String),
    /// The compiled-code cache directory is unusable.
    #[error("cannot use the compiled-code cache: {0}")]
    Cache(String),
    /// The HTTP client could not be built.
    #[error("cannot create the HTTP client: {0}")]
    Transport(String),
}

/// Why a component was refused at load time.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly file: it does not start with the `\\0asm` magic bytes")]
    NotWasm,
    /// A core module, e.g. built for `wasm32-unknown-unknown` or `wasm32-wasip1`.
    #[error(
        "this is a core WebAssembly module, not a component; build the connector with \
         `cargo build --target wasm32-wasip2 --release`, which produces a component"
    )]
    CoreModule,
    /// The binary header names a WebAssembly version or layer we do not know.
    #[error("unsupported WebAssembly binary version/layer {0:02x?}")]
    UnknownVersion([u8; 4]),
    /// wasmtime could not validate or compile the component.
    #[error("invalid component: {0}")]
    Compile(String),
    /// The component targets no world this host runs (not a connector, a
    /// newer or an unsupported version of `ferry:connector`).
    #[error("{0}")]
    World(wit::WorldMismatch),
    /// The component's imports or exports do not match its world.
    #[error("the component does not implement the ferry:connector world it names: {0}")]
    WrongWorld(String),
    /// `manifest()` failed (trap, deadline, ...).
    #[error("calling manifest() failed: {0}")]
    ManifestCall(#[source] CallError),
    /// The manifest's content is invalid.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// The manifest declares a host the operator forbids (deny-list, not on
    /// the allow-list, or a private address).
    #[error("forbidden host: {0}")]
    ForbiddenHost(String),
}

impl LoadError {
    /// A stable, machine-readable code for the refusal: what the upload API
    /// answers and `ferry connector check` prints.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotWasm | Self::UnknownVersion(_) => "not_wasm",
            Self::CoreModule => "core_module",
            Self::Compile(_) => "invalid_component",
            Self::World(wit::WorldMismatch::NotAConnector) => "not_a_connector",
            Self::World(wit::WorldMismatch::Newer(_)) => "world_too_new",
            Self::World(wit::WorldMismatch::Unsupported(_)) => "world_unsupported",
            Self::WrongWorld(_) => "world_mismatch",
            Self::ManifestCall(_) => "manifest_failed",
            Self::InvalidManifest(_) => "invalid_manifest",
            Self::ForbiddenHost(_) => "forbidden_host",
        }
    }
}

/// Why a connector call produced no result.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CallError {
    /// The connector answered with an error; its case drives retries.
    #[error("connector error: {0}")]
    Connector(ConnectorError),
    /// The connector answered `retryable` or `rate-limited` (the error held
    /// here) after the remote answered one of the call's requests with a
    /// server error (5xx; the SDK reads a 503 with `Retry-After` as a rate
    /// limit). Transient like any of those, but the remote may have saved
    /// that answer under the request's idempotency key (Stripe saves a
    /// request's first answer, 500s included) and would give it to every
    /// retry under that key. A `retryable` after anything else (a 409 for
    /// a request under the same key still running, a 429 for an object
    /// another request holds, a refused connection) is
    /// [`CallError::Connector`]: nothing was saved.
    #[error("connector error: {0}")]
    ServerFailed(ConnectorError),
    /// The call ran past `call_timeout` and was stopped.
    #[error("the call exceeded its deadline")]
    DeadlineExceeded,
    /// The guest hit the memory cap (or another sandbox limit, e.g. its stack).
    #[error("the call exhausted a sandbox limit: {0}")]
    ResourceExhausted(String),
    /// The guest trapped (panic, abort, invalid operation): a connector bug.
    #[error("the connector trapped: {0}")]
    Trap(String),
    /// The host could not create an instance (e.g. the pool is exhausted).
    #[error("cannot instantiate the connector: {0}")]
    Instantiate(String),
    /// ferry's own pacing held the call back, not the remote: its outbound
    /// rate limit for the connector refused one of the call's requests (its
    /// next slot came after the call's deadline) and the call then failed
    /// as transient, or every sandbox instance stayed busy for most of the
    /// call's deadline and the call did not start.
    #[error(
        "ferry's own pacing held the call back (the connector's outbound rate limit, or every sandbox instance busy); the next try is due in {} ms",
        wait.as_millis()
    )]
    Throttled {
        /// How long until the connector's next request slot.
        wait: Duration,
        /// Whether an earlier request of the call went out, so the remote
        /// may have seen one of its writes.
        reached_remote: bool,
    },
}

/// How soon a call that found every instance busy is tried again.
const SLOT_RETRY: Duration = Duration::from_millis(200);

/// A call's outcome, and whether ferry's own rate limit refused one of its
/// requests on the way (see [`CallError::Throttled`]).
struct Ran<R> {
    result: Result<R, CallError>,
    throttled: Option<CallError>,
    /// Whether one of its requests timed out or was cut by the deadline:
    /// the remote may still apply it.
    unsettled: bool,
    /// Whether the remote answered one of its requests with a 5xx.
    server_error: bool,
}

impl<T> Ran<Result<T, ConnectorError>> {
    /// The connector's answer. A transient failure after ferry's own rate
    /// limit refused a request is that refusal: the guest saw a timeout and
    /// gave up, but it is ferry's pacing, not the remote, that said no.
    ///
    /// A transient failure after one of the call's requests timed out (the
    /// request's own timeout, shorter than the call's, or the deadline
    /// with it on the wire) is that timeout: the remote may still apply
    /// the request, so the caller waits before it sends a newer one (as
    /// for [`CallError::DeadlineExceeded`]), whatever ferry's pacing did
    /// before. A `retryable` or `rate-limited` after the remote answered a
    /// request with a 5xx is [`CallError::ServerFailed`].
    fn answer(self) -> Result<T, CallError> {
        match (self.result, self.throttled, self.unsettled) {
            (Ok(Ok(value)), _, _) => Ok(value),
            (Ok(Err(ConnectorError::Retryable(message))), _, true) => {
                let message = printable_text(message);
                tracing::debug!(%message, "a request of the call timed out; its outcome is unknown");
                Err(CallError::DeadlineExceeded)
            }
            (Err(CallError::DeadlineExceeded), _, true) => Err(CallError::DeadlineExceeded),
            (
                Ok(Err(ConnectorError::Retryable(_))) | Err(CallError::DeadlineExceeded),
                Some(t),
                _,
            ) => Err(t),
            (
                Ok(Err(error @ (ConnectorError::Retryable(_) | ConnectorError::RateLimited(_)))),
                _,
                _,
            ) if self.server_error => Err(CallError::ServerFailed(printable(error))),
            (Ok(Err(error)), _, _) => Err(CallError::Connector(printable(error))),
            (Err(error), _, _) => Err(error),
        }
    }
}

/// What a webhook delivery gives a call that came from outside: its body
/// and header values (see [`Connector::run`]'s `data`).
fn webhook_data(req: &WebhookRequest) -> Vec<&[u8]> {
    std::iter::once(req.body.as_slice())
        .chain(req.headers.iter().map(|(_, value)| value.as_bytes()))
        .collect()
}

/// `error` with every NUL in its text replaced (U+FFFD) and its other
/// control characters escaped. PostgreSQL refuses NUL in text: the write
/// that recorded the error (a dead letter, a retry's last error, an inbox
/// event's detail, a run's reason) failed, and the work ran again at every
/// lease, for ever, never counting an attempt. A remote's binary error body
/// (a gzipped error page) carries NULs into the SDK's messages; no
/// connector need be hostile. A line break is the other danger: the host
/// logs these texts, and one taken from a request (Salesforce's refusal
/// names the organization the body claims) started a forged log line.
/// Cut to [`MAX_ERROR_BYTES`]: the text goes into logs, stored rows and a
/// webhook sender's 400, and a guest's was as long as its memory.
fn printable(error: ConnectorError) -> ConnectorError {
    with_text(error, printable_text)
}

/// `error`, its case kept, with `f` applied to its text.
pub(crate) fn with_text(error: ConnectorError, f: impl Fn(String) -> String) -> ConnectorError {
    match error {
        ConnectorError::Retryable(m) => ConnectorError::Retryable(f(m)),
        ConnectorError::RateLimited(mut limit) => {
            limit.message = f(limit.message);
            ConnectorError::RateLimited(limit)
        }
        ConnectorError::Permanent(m) => ConnectorError::Permanent(f(m)),
        ConnectorError::NotFound(m) => ConnectorError::NotFound(f(m)),
        ConnectorError::Unauthorized(m) => ConnectorError::Unauthorized(f(m)),
        ConnectorError::InvalidSignature(m) => ConnectorError::InvalidSignature(f(m)),
        ConnectorError::Unsupported(m) => ConnectorError::Unsupported(f(m)),
    }
}

/// The longest error text a call's error keeps, in bytes (a remote's
/// error body quoted whole fits).
pub const MAX_ERROR_BYTES: usize = 4 * 1024;

/// An error text as [`printable`] keeps it: cut before it is escaped (the
/// work stays bounded), and again after (an escape takes up to six bytes).
fn printable_text(text: String) -> String {
    let text = log::cut(text, MAX_ERROR_BYTES);
    let text = if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    };
    log::cut(log::one_line(text), MAX_ERROR_BYTES)
}

pub use log::cut;
pub use policy::{encoded_forms, list_entry_problem, Redactor};

/// State shared by the runtime and all calls.
pub(crate) struct RuntimeShared {
    pub(crate) config: RuntimeConfig,
    pub(crate) transport: Arc<dyn HttpTransport>,
}

/// How many compiled components a runtime keeps for reuse.
const CACHED_COMPONENTS: usize = 16;

/// The most recently used [`CACHED_COMPONENTS`] compiled components, by
/// sha256 of their bytes. A loaded connector holds its own component, so
/// one that leaves the cache is compiled again (or read from the disk
/// cache) only if it is loaded again; without a bound, every refused
/// upload, replaced version and `connector dev` rebuild stayed in memory
/// for the life of the process.
#[derive(Default)]
struct ComponentCache {
    entries: HashMap<String, (Component, u64)>,
    uses: u64,
}

impl ComponentCache {
    fn get(&mut self, sha256: &str) -> Option<Component> {
        self.uses += 1;
        let now = self.uses;
        self.entries.get_mut(sha256).map(|(component, used)| {
            *used = now;
            component.clone()
        })
    }

    fn insert(&mut self, sha256: &str, component: Component) {
        self.uses += 1;
        while self.entries.len() >= CACHED_COMPONENTS && !self.entries.contains_key(sha256) {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(sha, _)| sha.clone());
            match oldest {
                Some(sha) => self.entries.remove(&sha),
                None => break,
            };
        }
        self.entries
            .insert(sha256.to_owned(), (component, self.uses));
    }
}

struct RuntimeInner {
    shared: Arc<RuntimeShared>,
    engine: Engine,
    linker: Linker<CallState>,
    /// Compiled components by sha256 of their bytes (shared with runtimes
    /// made by [`Runtime::with_other_transport`]).
    components: Arc<Mutex<ComponentCache>>,
    /// One permit per pool slot, so calls beyond the pool wait instead of failing.
    slots: Arc<tokio::sync::Semaphore>,
    /// `max_compiles` permits; a compile holds one until it ends, even when
    /// its caller has gone.
    compile_permits: Arc<tokio::sync::Semaphore>,
    /// Compiles running now.
    compiling: Arc<AtomicUsize>,
    /// Stops the epoch thread when the last runtime sharing it goes.
    _ticker: Arc<EpochTicker>,
}

/// The epoch thread's stop flag, set when the last runtime sharing the
/// engine is dropped.
struct EpochTicker(Arc<AtomicBool>);

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Loads and runs connectors. Cheap to clone; clones share the engine,
/// the caches and the instance pool.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.inner.shared.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Why a host setting's `value` (a base URL such as Stripe's
    /// `api_base`) could never be reached under the operator's rules, if it
    /// could not: not an absolute http(s) URL, plain `http://` without
    /// `allow_private_hosts`, or a host the deny-list, the allow-list or
    /// the private-address rule refuses. The registry asks where the value
    /// is given (`PUT /settings`): accepted, every push made with it was
    /// refused by the policy and dead-lettered.
    pub fn host_setting_problem(&self, value: &str) -> Option<String> {
        let config = &self.inner.shared.config;
        let Some(host) = policy::DeclaredHost::from_setting_url(value) else {
            return Some("must be an absolute http(s) URL".to_owned());
        };
        if !config.allow_private_hosts && !value.trim().to_ascii_lowercase().starts_with("https:") {
            return Some("plain http:// is not allowed; use https://".to_owned());
        }
        policy::OperatorHosts {
            allowed: &config.allowed_hosts,
            denied: &config.denied_hosts,
            allow_private: config.allow_private_hosts,
        }
        .refusal(&host.host, host.host.parse::<std::net::IpAddr>().ok())
    }

    /// A runtime whose connectors reach the network through [`ReqwestTransport`].
    #[cfg(feature = "network")]
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let transport =
            ReqwestTransport::new(config.http_connect_timeout, config.allow_private_hosts)
                .map_err(|e| RuntimeError::Transport(e.to_string()))?;
        Self::with_transport(config, Arc::new(transport))
    }

    /// A runtime whose connectors' allowed requests go to `transport`
    /// (the policy still applies before it).
    pub fn with_transport(
        config: RuntimeConfig,
        transport: Arc<dyn HttpTransport>,
    ) -> Result<Runtime, RuntimeError> {
        let engine = build_engine(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| RuntimeError::Engine(chain(&e)))?;
        wit::add_to_linker(&mut linker).map_err(|e| RuntimeError::Engine(chain(&e)))?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        spawn_epoch_ticker(engine.clone(), stop_ticker.clone())?;
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_instances as usize));
        let compile_permits = Arc::new(tokio::sync::Semaphore::new(config.max_compiles.max(1)));
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                shared: Arc::new(RuntimeShared { config, transport }),
                engine,
                linker,
                components: Arc::default(),
                slots,
                compile_permits,
                compiling: Arc::default(),
                _ticker: Arc::new(EpochTicker(stop_ticker)),
            }),
        })
    }

    /// A runtime that shares this one's engine, instance pool and compiled
    /// components, but sends its connectors' allowed requests to
    /// `transport`. The test kit gives each test its own scripted HTTP this
    /// way without compiling the component again.
    pub fn with_other_transport(&self, transport: Arc<dyn HttpTransport>) -> Runtime {
        let inner = &self.inner;
        Runtime {
            inner: Arc::new(RuntimeInner {
                shared: Arc::new(RuntimeShared {
                    config: inner.shared.config.clone(),
                    transport,
                }),
                engine: inner.engine.clone(),
                linker: inner.linker.clone(),
                components: Arc::clone(&inner.components),
                slots: Arc::clone(&inner.slots),
                compile_permits: Arc::clone(&inner.compile_permits),
                compiling: Arc::clone(&inner.compiling),
                _ticker: Arc::clone(&inner._ticker),
            }),
        }
    }

    /// The configuration this runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.shared.config
    }

    /// Validates `wasm` as a connector component, compiles it (or takes it
    /// from the cache), links it and reads and checks its manifest.
    #[tracing::instrument(skip_all, fields(bytes = wasm.len()))]
    pub async fn load(&self, wasm: &[u8]) -> Result<Arc<Connector>, LoadError> {
        check_header(wasm)?;
        let sha256 = hex::encode(Sha256::digest(wasm));
        let component = self.compile(&sha256, wasm).await?;
        let world = wit::detect(&component, &self.inner.engine).map_err(LoadError::World)?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(chain(&e)))?;
        // Checks that the world's exports exist; their types are checked on
        // a live instance when the manifest is read.
        let exports = ExportIndices::new(&component, world).map_err(LoadError::WrongWorld)?;

        let config = &self.inner.shared.config;
        let mut connector = Connector {
            runtime: self.inner.clone(),
            pre,
            exports,
            shared: Arc::new(ConnectorShared::loading()),
            own_slots: tokio::sync::Semaphore::new(
                config
                    .max_instances_per_connector
                    .clamp(1, config.max_instances.max(1)) as usize,
            ),
            sha256,
            code_bytes: code_size(&component),
        };
        let manifest = connector.read_manifest().await?;
        let hosts = manifest::validate(&manifest).map_err(LoadError::InvalidManifest)?;
        policy::check_declared_hosts(
            &hosts,
            &policy::OperatorHosts {
                allowed: &config.allowed_hosts,
                denied: &config.denied_hosts,
                allow_private: config.allow_private_hosts,
            },
        )
        .map_err(LoadError::ForbiddenHost)?;
        connector.shared = Arc::new(ConnectorShared {
            name: Arc::from(manifest.name.as_str()),
            manifest,
            hosts,
            bucket: Mutex::new(TokenBucket::new(
                self.inner.shared.config.http_requests_per_second,
            )),
            tokens: TokenCache::default(),
        });
        tracing::debug!(connector = %connector.name(), version = %connector.manifest().version,
            world = %world, sha256 = %connector.sha256, "connector compiled and checked");
        Ok(Arc::new(connector))
    }

    /// The names a component imports (`ferry:connector/http@0.2.0`,
    /// `wasi:cli/environment@0.2.3`, ...), in the component's order. Checks
    /// only that it compiles, so it answers for components `load` refuses.
    pub async fn imports(&self, wasm: &[u8]) -> Result<Vec<String>, LoadError> {
        check_header(wasm)?;
        let sha256 = hex::encode(Sha256::digest(wasm));
        let component = self.compile(&sha256, wasm).await?;
        Ok(component
            .component_type()
            .imports(&self.inner.engine)
            .map(|(name, _)| name.to_owned())
            .collect())
    }

    async fn compile(&self, sha256: &str, wasm: &[u8]) -> Result<Component, LoadError> {
        let cached = || {
            self.inner
                .components
                .lock()
                .ok()
                .and_then(|mut m| m.get(sha256))
        };
        if let Some(c) = cached() {
            return Ok(c);
        }
        let permit = Arc::clone(&self.inner.compile_permits)
            .acquire_owned()
            .await
            .map_err(|_| LoadError::Compile("the runtime is shutting down".into()))?;
        // The same bytes compiled while this one waited for its permit (an
        // upload sent twice at once, when compiles queue): taken from the
        // cache, not compiled again.
        if let Some(c) = cached() {
            return Ok(c);
        }
        // Compiling takes up to seconds of CPU: keep it off the async
        // workers. The permit and the cache go into the task: a caller that
        // gives up (a request past its timeout) leaves a compile that runs
        // on, and must still count, and whose result the caller's retry
        // finds.
        let engine = self.inner.engine.clone();
        let components = Arc::clone(&self.inner.components);
        let compiling = Arc::clone(&self.inner.compiling);
        let bytes = wasm.to_vec();
        let sha256 = sha256.to_owned();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = Running::count(&compiling);
            let component =
                Component::new(&engine, &bytes).map_err(|e| LoadError::Compile(chain(&e)))?;
            if let Ok(mut map) = components.lock() {
                map.insert(&sha256, component.clone());
            }
            Ok(component)
        })
        .await
        .map_err(|e| LoadError::Compile(format!("compiler task failed: {e}")))?
    }

    /// Compiles running now (at most `max_compiles`).
    pub fn compiles_running(&self) -> usize {
        self.inner.compiling.load(Ordering::Relaxed)
    }

    /// How many compiled components this runtime keeps for reuse (at most
    /// 16; the ones loaded connectors hold are kept by them).
    pub fn cached_components(&self) -> usize {
        self.inner.components.lock().map_or(0, |m| m.entries.len())
    }
}

/// One compile counted in [`Runtime::compiles_running`] while it lives
/// (a compile that panics, too).
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn count(running: &'a AtomicUsize) -> Self {
        running.fetch_add(1, Ordering::Relaxed);
        Self(running)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether the host has swap (or may: `/proc/meminfo` unreadable), read
/// once when an engine is built. Swap turned on after that needs a restart
/// for the safe reset (docs/runtime.md).
fn swap_configured() -> bool {
    std::fs::read_to_string("/proc/meminfo").map_or(true, |meminfo| has_swap(&meminfo))
}

/// Whether `meminfo` (`/proc/meminfo`'s text) names any swap; a text
/// without the line counts as swap, to stay on the safe side.
fn has_swap(meminfo: &str) -> bool {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("SwapTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .is_none_or(|kib| kib > 0)
}

fn build_engine(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let mut pool = PoolingAllocationConfig::default();
    let n = config.max_instances.max(1);
    let memory_limit = config.memory_limit_bytes.max(64 * 1024);
    // The per-component caps are what bound one call: without them a
    // component of a thousand core instances, each with a memory of its
    // own (the memory limit counts per memory), would take the whole pool
    // and the memory limit times a thousand. A component over them fails
    // to compile, so an upload is refused before it is stored.
    pool.max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT);
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(n.saturating_mul(MEMORIES_PER_COMPONENT))
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .total_stacks(n)
        .max_memory_size(memory_limit)
        // On reuse, reset only the pages a guest dirtied (Linux >= 6.7) and
        // do it with memset rather than madvise, so the next call on the
        // slot takes no page faults. A Rust guest's stack sits below 1 MiB.
        // Only without swap: the scan resets the written pages that are
        // resident, so a page swapped out would keep one call's data for
        // the next call on the slot, another connector's perhaps.
        .pagemap_scan(if swap_configured() {
            wasmtime::Enabled::No
        } else {
            wasmtime::Enabled::Auto
        })
        .linear_memory_keep_resident(2 * 1024 * 1024)
        .table_keep_resident(64 * 1024);

    let mut wasm = wasmtime::Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
        .cranelift_opt_level(wasmtime::OptLevel::Speed)
        .memory_init_cow(true)
        // Traps carry no wasm backtrace: cheaper to raise and a guest's
        // frames mean nothing to the operator.
        .wasm_backtrace_max_frames(None);
    #[cfg(not(feature = "disk-cache"))]
    if let Some(dir) = &config.cache_dir {
        return Err(RuntimeError::Cache(format!(
            "{}: this build of ferry-runtime has no disk cache (feature `disk-cache`)",
            dir.display()
        )));
    }
    #[cfg(feature = "disk-cache")]
    if let Some(dir) = &config.cache_dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| RuntimeError::Cache(format!("{}: {e}", dir.display())))?;
        let mut cache_config = wasmtime::CacheConfig::new();
        cache_config.with_directory(dir);
        let cache =
            wasmtime::Cache::new(cache_config).map_err(|e| RuntimeError::Cache(chain(&e)))?;
        wasm.cache(Some(cache));
    }
    Engine::new(&wasm).map_err(|e| RuntimeError::Engine(chain(&e)))
}

fn spawn_epoch_ticker(engine: Engine, stop: Arc<AtomicBool>) -> Result<(), RuntimeError> {
    // A plain thread: it must tick even when every async worker is busy.
    let weak = engine.weak();
    drop(engine);
    std::thread::Builder::new()
        .name("ferry-epoch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map(drop)
        .map_err(|e| RuntimeError::Engine(format!("cannot start the epoch thread: {e}")))
}

/// Tells garbage, core modules and components apart before wasmtime's
/// messages (which assume a component) would confuse the operator.
fn check_header(wasm: &[u8]) -> Result<(), LoadError> {
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    match [wasm[4], wasm[5], wasm[6], wasm[7]] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule),
        // Version 0x0d, layer 1: the component model's binary format.
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        other => Err(LoadError::UnknownVersion(other)),
    }
}

fn code_size(component: &Component) -> usize {
    let range = component.image_range();
    (range.end as usize).saturating_sub(range.start as usize)
}

/// An error and its causes on one line.
fn chain(e: &wasmtime::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&cause.to_string());
    }
    out
}

/// A loaded connector: its manifest and a linked, ready-to-instantiate
/// component. Every call runs in a fresh instance.
pub struct Connector {
    runtime: Arc<RuntimeInner>,
    pre: InstancePre<CallState>,
    exports: ExportIndices,
    shared: Arc<ConnectorShared>,
    /// Its share of the pool ([`RuntimeConfig::max_instances_per_connector`]).
    own_slots: tokio::sync::Semaphore,
    sha256: String,
    code_bytes: usize,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("name", &self.name())
            .field("version", &self.manifest().version)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Where a failed call failed: creating the instance or running the export.
enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

/// The world's exports, looked up by name once per component. A call then
/// type-checks only the one function it uses, not all six.
struct ExportIndices {
    world: wit::WorldVersion,
    get_manifest: ComponentExportIndex,
    verify_webhook: ComponentExportIndex,
    parse_webhook: ComponentExportIndex,
    push: ComponentExportIndex,
    fetch: ComponentExportIndex,
    list: ComponentExportIndex,
}

impl ExportIndices {
    fn new(component: &Component, world: wit::WorldVersion) -> Result<Self, String> {
        let handler = world.handler();
        let interface = component
            .get_export_index(None, &handler)
            .ok_or_else(|| format!("no exported instance named `{handler}`"))?;
        let lookup = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| format!("`{handler}` does not export `{name}`"))
        };
        Ok(Self {
            world,
            get_manifest: lookup("get-manifest")?,
            verify_webhook: lookup("verify-webhook")?,
            parse_webhook: lookup("parse-webhook")?,
            push: lookup("push")?,
            fetch: lookup("fetch")?,
            list: lookup("list")?,
        })
    }
}

impl Connector {
    /// The manifest the component returned at load time.
    pub fn manifest(&self) -> &Manifest {
        &self.shared.manifest
    }

    /// The connector's name (from the manifest).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The version of the `ferry:connector` world the component targets.
    pub fn world(&self) -> wit::WorldVersion {
        self.exports.world
    }

    /// Hex sha256 of the component bytes.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Bytes of compiled machine code held for this component.
    pub fn code_size(&self) -> usize {
        self.code_bytes
    }

    /// Checks a webhook's signature before anything is parsed.
    #[tracing::instrument(skip_all, fields(connector = %self.name()))]
    pub async fn verify_webhook(
        &self,
        cfg: &ConnectorConfig,
        req: WebhookRequest,
    ) -> Result<(), CallError> {
        self.call_export::<(&WebhookRequest,), Result<(), ConnectorError>>(
            "verify-webhook",
            cfg,
            &webhook_data(&req),
            &self.exports.verify_webhook,
            (&req,),
        )
        .await
        .answer()
    }

    /// Turns a verified webhook into events.
    #[tracing::instrument(skip_all, fields(connector = %self.name()))]
    pub async fn parse_webhook(
        &self,
        cfg: &ConnectorConfig,
        req: WebhookRequest,
    ) -> Result<ParsedWebhook, CallError> {
        self.call_export::<(&WebhookRequest,), Result<ParsedWebhook, ConnectorError>>(
            "parse-webhook",
            cfg,
            &webhook_data(&req),
            &self.exports.parse_webhook,
            (&req,),
        )
        .await
        .answer()
    }

    /// Handles one webhook delivery: `verify-webhook` and then
    /// `parse-webhook` on ONE fresh instance, under one deadline (a delivery
    /// is one logical call, and instantiating once halves the sandbox cost).
    ///
    /// If verification fails the call returns that error, normally
    /// `CallError::Connector(ConnectorError::InvalidSignature(..))`, and
    /// `parse-webhook` is never called: unverified bytes are never parsed.
    #[tracing::instrument(skip_all, fields(connector = %self.name()))]
    pub async fn receive_webhook(
        &self,
        cfg: &ConnectorConfig,
        req: WebhookRequest,
    ) -> Result<ParsedWebhook, CallError> {
        self.run(
            "receive-webhook",
            cfg,
            &webhook_data(&req),
            async |store, instance| {
                let verdict: Result<(), ConnectorError> =
                    call_typed(store, &instance, &self.exports.verify_webhook, (&req,)).await?;
                if let Err(e) = verdict {
                    return Ok(Err(e));
                }
                call_typed(store, &instance, &self.exports.parse_webhook, (&req,)).await
            },
        )
        .await
        .answer()
    }

    /// Creates, updates or deletes one remote record.
    #[tracing::instrument(skip_all, fields(connector = %self.name(), entity = %req.entity, local_id = %req.local_id))]
    pub async fn push(
        &self,
        cfg: &ConnectorConfig,
        req: PushRequest,
    ) -> Result<PushResult, CallError> {
        let data = [
            req.record.as_bytes(),
            req.local_id.as_bytes(),
            req.remote_id.as_deref().unwrap_or_default().as_bytes(),
        ];
        self.call_export::<(&PushRequest,), Result<PushResult, ConnectorError>>(
            "push",
            cfg,
            &data,
            &self.exports.push,
            (&req,),
        )
        .await
        .answer()
        .map(|mut result| {
            // The write happened: kept, the record taken as unreturned
            // (what was pushed stands for the remote's state).
            if result.record.as_ref().is_some_and(|r| r.len() > MAX_RECORD_BYTES) {
                tracing::warn!(
                    "the connector's push result holds a record longer than {MAX_RECORD_BYTES} bytes; it is not read"
                );
                result.record = None;
            }
            result
        })
    }

    /// Reads one remote record.
    #[tracing::instrument(skip_all, fields(connector = %self.name(), entity, remote_id))]
    pub async fn fetch(
        &self,
        cfg: &ConnectorConfig,
        entity: &str,
        remote_id: &str,
    ) -> Result<RemoteRecord, CallError> {
        self.call_export::<(&str, &str), Result<RemoteRecord, ConnectorError>>(
            "fetch",
            cfg,
            &[remote_id.as_bytes()],
            &self.exports.fetch,
            (entity, remote_id),
        )
        .await
        .answer()
        .and_then(|record| {
            oversized(std::slice::from_ref(&record))?;
            Ok(record)
        })
    }

    /// Reads a page of remote records after `cursor`, `limit` at most.
    #[tracing::instrument(skip_all, fields(connector = %self.name(), entity))]
    pub async fn list(
        &self,
        cfg: &ConnectorConfig,
        entity: &str,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<Page, CallError> {
        self.call_export::<(&str, Option<&str>, u32), Result<Page, ConnectorError>>(
            "list",
            cfg,
            &[cursor.as_deref().unwrap_or_default().as_bytes()],
            &self.exports.list,
            (entity, cursor.as_deref(), limit),
        )
        .await
        .answer()
        .and_then(|page| {
            if page.records.len() > usize::try_from(limit).unwrap_or(usize::MAX) {
                return Err(CallError::Connector(ConnectorError::Permanent(format!(
                    "the connector listed {} records on a page of {limit} at most",
                    page.records.len()
                ))));
            }
            oversized(&page.records)?;
            Ok(page)
        })
    }

    /// Reads the manifest on a fresh instance, checking on the way that every
    /// export has the world's types (a mismatch is a [`LoadError::WrongWorld`]).
    async fn read_manifest(&self) -> Result<Manifest, LoadError> {
        let mut type_error = None;
        let result = self
            .run(
                "get-manifest",
                &ConnectorConfig::default(),
                &[],
                async |store, instance| {
                    let typed = match self.exports.world {
                        wit::WorldVersion::V0_1_0 => {
                            wit::since_v0_1_0::Connector::new(&mut *store, &instance).map(drop)
                        }
                        wit::WorldVersion::V0_2_0 => {
                            wit::since_v0_2_0::Connector::new(&mut *store, &instance).map(drop)
                        }
                    };
                    if let Err(e) = typed {
                        type_error = Some(chain(&e));
                        return Err(Failure::Instantiate(e));
                    }
                    let f = instance
                        .get_typed_func::<(), (Manifest,)>(&mut *store, &self.exports.get_manifest)
                        .map_err(Failure::Instantiate)?;
                    let (manifest,) = f.call_async(&mut *store, ()).await.map_err(Failure::Call)?;
                    Ok(manifest)
                },
            )
            .await
            .result;
        match (result, type_error) {
            (_, Some(e)) => Err(LoadError::WrongWorld(e)),
            (Ok(manifest), None) => Ok(manifest),
            (Err(e), None) => Err(LoadError::ManifestCall(e)),
        }
    }

    /// Calls one export with `params` on a fresh instance.
    async fn call_export<P, R>(
        &self,
        function: &'static str,
        cfg: &ConnectorConfig,
        data: &[&[u8]],
        export: &ComponentExportIndex,
        params: P,
    ) -> Ran<R>
    where
        P: ComponentNamedList + Lower + Send + Sync,
        R: ComponentType + Lift + Send + Sync + 'static,
        (R,): ComponentNamedList + Lift + Send + Sync,
    {
        self.run(function, cfg, data, async |store, instance| {
            call_typed(store, &instance, export, params).await
        })
        .await
    }

    /// Runs `body` on a fresh instance in a fresh store, under the call's
    /// deadline and limits, and turns whatever went wrong into a [`CallError`].
    /// `body` may call several exports (see [`call_typed`]); they share the
    /// instance, the store and the one deadline.
    /// `data` is what the call is given that came from records and remotes
    /// (not ferry's own ids and settings): placeholder text in it stays text
    /// in request bodies.
    async fn run<R>(
        &self,
        function: &'static str,
        cfg: &ConnectorConfig,
        data: &[&[u8]],
        body: impl AsyncFnOnce(&mut Store<CallState>, Instance) -> Result<R, Failure>,
    ) -> Ran<R> {
        let runtime = &self.runtime;
        let timeout = runtime.shared.config.call_timeout;
        let deadline = Instant::now() + timeout;
        // Every instance busy (a burst of webhooks, slow remotes): the wait
        // counts against the call's deadline, so a call that got a slot
        // with less than half its time left would be cut short and blamed
        // on the remote (an attempt spent, a breaker failure). It does not
        // start: ferry's own pacing, retried without spending an attempt.
        let busy = || Ran {
            result: Err(CallError::Throttled {
                wait: SLOT_RETRY,
                reached_remote: false,
            }),
            throttled: None,
            unsettled: false,
            server_error: false,
        };
        let started_by = tokio::time::Instant::from_std(deadline - timeout / 2);
        let slots = async {
            let own = self.own_slots.acquire().await?;
            Ok::<_, tokio::sync::AcquireError>((own, runtime.slots.acquire().await?))
        };
        let _slots = match tokio::time::timeout_at(started_by, slots).await {
            Err(_busy) => return busy(),
            Ok(Err(_closed)) => {
                return Ran {
                    result: Err(CallError::Instantiate(
                        "the runtime is shutting down".into(),
                    )),
                    throttled: None,
                    unsettled: false,
                    server_error: false,
                }
            }
            Ok(Ok(slot)) => slot,
        };
        let mut state = CallState::new(
            runtime.shared.clone(),
            self.shared.clone(),
            cfg.clone(),
            deadline,
        );
        for data in data {
            state.note_data(data);
        }
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(HOSTCALL_BYTES);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                // Let other tasks on this worker run while a guest computes.
                Ok(UpdateDeadline::Yield(1))
            }
        });

        let run = async {
            let instance = self
                .pre
                .instantiate_async(&mut store)
                .await
                .map_err(Failure::Instantiate)?;
            body(&mut store, instance).await
        };
        // The epoch stops a computing guest; this timer stops one waiting on
        // the host (an HTTP request, a WASI clock's sleep, another call's
        // token refresh). Dropping the future abandons the store. It ends
        // at the call's deadline, which the wait for a slot counted
        // against: started from here, a call that waited for its slot ran
        // up to half a timeout past it.
        let started = Instant::now();
        let outcome = tokio::time::timeout_at(deadline.into(), run).await;
        let memory_hit = store.data().limiter.hit;
        let result = match outcome {
            Err(_elapsed) => Err(CallError::DeadlineExceeded),
            Ok(Ok(value)) => Ok(value),
            Ok(Err(Failure::Instantiate(e))) if memory_hit => {
                Err(CallError::ResourceExhausted(format!(
                    "instantiation needs more memory than the limit: {}",
                    chain(&e)
                )))
            }
            Ok(Err(Failure::Instantiate(e))) => Err(CallError::Instantiate(chain(&e))),
            Ok(Err(Failure::Call(e))) => Err(self.classify_trap(&e, memory_hit)),
        };
        self.observe(function, started.elapsed(), result.as_ref().err());
        let state = store.data();
        let throttled = state.throttled.map(|wait| CallError::Throttled {
            wait,
            reached_remote: state.requests_sent > 0,
        });
        Ran {
            result,
            throttled,
            unsettled: state.requests_unsettled > 0,
            server_error: state.server_errors > 0,
        }
    }

    /// Records one call in the process's metrics (a no-op unless the
    /// embedding program installed a `metrics` recorder): its duration, and
    /// whether the sandbox stopped it.
    fn observe(&self, function: &'static str, took: Duration, error: Option<&CallError>) {
        let connector = self.name().to_owned();
        metrics::histogram!("ferry_connector_call_duration_seconds",
            "connector" => connector.clone(), "function" => function)
        .record(took.as_secs_f64());
        let stopped = match error {
            Some(CallError::DeadlineExceeded) => "ferry_connector_timeouts_total",
            Some(CallError::Trap(_) | CallError::ResourceExhausted(_)) => {
                "ferry_connector_traps_total"
            }
            _ => return,
        };
        metrics::counter!(stopped, "connector" => connector, "function" => function).increment(1);
    }

    fn classify_trap(&self, e: &wasmtime::Error, memory_hit: bool) -> CallError {
        let limit = self.runtime.shared.config.memory_limit_bytes;
        let error = match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::DeadlineExceeded,
            Some(Trap::StackOverflow) => CallError::ResourceExhausted("stack overflow".into()),
            // A Rust guest aborts (an `unreachable` trap) when an allocation
            // fails; the limiter saw the refused growth, so say what happened.
            _ if memory_hit => {
                CallError::ResourceExhausted(format!("memory limit of {limit} bytes reached"))
            }
            // wasmtime's error for it is private: its text is what says so.
            _ if chain(e).contains("fuel allocated for hostcalls has been exhausted") => {
                CallError::ResourceExhausted(format!(
                    "the guest handed the host more than {HOSTCALL_BYTES} bytes at once"
                ))
            }
            _ if e.downcast_ref::<ResourceTableError>().is_some() => {
                CallError::ResourceExhausted(format!(
                    "limit of {} WASI handles held at once reached",
                    state::MAX_WASI_HANDLES
                ))
            }
            _ => CallError::Trap(chain(e)),
        };
        tracing::warn!(connector = %self.name(), error = %error, "connector call failed in the sandbox");
        error
    }
}

/// Calls one export of a live instance; a [`Connector::run`] body may call
/// several in a row (wasmtime runs each call's post-return before the next).
async fn call_typed<P, R>(
    store: &mut Store<CallState>,
    instance: &Instance,
    export: &ComponentExportIndex,
    params: P,
) -> Result<R, Failure>
where
    P: ComponentNamedList + Lower + Send + Sync,
    R: ComponentType + Lift + Send + Sync + 'static,
    (R,): ComponentNamedList + Lift + Send + Sync,
{
    let f = instance
        .get_typed_func::<P, (R,)>(&mut *store, export)
        .map_err(Failure::Instantiate)?;
    let (result,) = f
        .call_async(&mut *store, params)
        .await
        .map_err(Failure::Call)?;
    Ok(result)
}

#[cfg(test)]
mod tests {

    /// The dirty-page scan resets only resident pages: with swap it is off.
    #[test]
    fn the_page_scan_is_used_only_without_swap() {
        let without = "MemTotal:  8000000 kB\nSwapTotal:             0 kB\nSwapFree: 0 kB\n";
        let with = "MemTotal:  8000000 kB\nSwapTotal:       2097148 kB\n";
        assert!(!super::has_swap(without));
        assert!(super::has_swap(with));
        assert!(
            super::has_swap("MemTotal:  8000000 kB\n"),
            "unknown counts as swap"
        );
        assert!(
            super::has_swap("SwapTotal: lots\n"),
            "unreadable counts as swap"
        );
    }

    /// A remote's binary error body (a gzipped error page) put NULs in a
    /// connector's message; PostgreSQL refused the write that recorded it,
    /// and the work ran again at every lease for ever.
    #[test]
    fn a_connector_error_reaches_the_host_without_nul() {
        let cleaned = printable(ConnectorError::Permanent("bad\0gzip\0".into()));
        assert!(matches!(&cleaned, ConnectorError::Permanent(m) if m == "bad\u{fffd}gzip\u{fffd}"));
        let limited = printable(ConnectorError::RateLimited(RateLimit {
            retry_after_ms: Some(5),
            message: "slow\0".into(),
        }));
        assert!(
            matches!(&limited, ConnectorError::RateLimited(r) if r.message == "slow\u{fffd}" && r.retry_after_ms == Some(5))
        );
    }

    /// A guest's error text as long as its memory went whole into logs,
    /// stored rows and a webhook sender's 400: it is cut.
    #[test]
    fn a_connector_error_is_cut() {
        let escaped = printable(ConnectorError::Permanent("\u{1}".repeat(1 << 20)));
        assert!(
            matches!(&escaped, ConnectorError::Permanent(m) if m.len() <= MAX_ERROR_BYTES + '…'.len_utf8()),
            "escapes count"
        );
        let long = "é".repeat(1 << 20);
        let cut = printable(ConnectorError::InvalidSignature(long));
        let ConnectorError::InvalidSignature(text) = cut else {
            panic!("{cut:?}");
        };
        assert!(
            text.len() <= MAX_ERROR_BYTES + '…'.len_utf8(),
            "{}",
            text.len()
        );
        assert!(text.starts_with("éé") && text.ends_with('…'));
    }

    use super::*;

    fn event(id: &str, remote_id: &str, record: Option<&str>) -> Event {
        Event {
            id: id.to_owned(),
            entity: "customer".to_owned(),
            kind: ChangeKind::Upsert,
            remote_id: remote_id.to_owned(),
            occurred_at_ms: 1,
            record: record.map(str::to_owned),
            origin_key: None,
            remote_type: String::new(),
        }
    }

    #[test]
    fn a_reply_ferry_would_not_send_says_why() {
        let reply = |bytes: usize, content_type: &str| WebhookReply {
            content_type: content_type.to_owned(),
            body: vec![b'x'; bytes],
        };
        assert_eq!(reply_problem(None), None);
        assert_eq!(
            reply_problem(Some(&reply(MAX_REPLY_BYTES, "text/xml"))),
            None
        );
        assert!(reply_problem(Some(&reply(MAX_REPLY_BYTES + 1, "text/xml")))
            .is_some_and(|p| p.contains("more than")));
        assert!(reply_problem(Some(&reply(10, &"x".repeat(256))))
            .is_some_and(|p| p.contains("content type")));
        for odd in ["text/xml\r\nX-Injected: 1", "text/xml; charset=\u{e9}"] {
            assert!(
                reply_problem(Some(&reply(10, odd))).is_some_and(|p| p.contains("content type")),
                "{odd:?}"
            );
        }
        assert_eq!(
            reply_problem(Some(&reply(10, "text/xml; charset=utf-8"))),
            None
        );
    }

    #[test]
    fn a_delivery_ferry_would_refuse_says_why() {
        let ok = event("evt_1", "cus_1", Some(r#"{"name": "Ada"}"#));
        // The same event twice (a batch that repeats itself) is stored once.
        let same_again = event("evt_1", "cus_1", Some(r#"{ "name":"Ada" }"#));
        assert_eq!(delivery_problem(&[ok.clone(), same_again]), None);
        let other = event("evt_1", "cus_2", Some(r#"{"name": "Ada"}"#));
        assert!(delivery_problem(&[ok.clone(), other])
            .is_some_and(|p| p.contains("two different events")));
        let changed = event("evt_1", "cus_1", Some(r#"{"name": "Grace"}"#));
        assert!(delivery_problem(&[ok.clone(), changed]).is_some());
        let broken = event("evt_2", "cus_1", Some("{name: Ada"));
        assert!(delivery_problem(&[ok.clone(), broken]).is_some_and(|p| p.contains("not JSON")));
        for not_an_object in ["null", "[]", "\"Ada\"", "1"] {
            let odd = event("evt_2", "cus_1", Some(not_an_object));
            assert!(
                delivery_problem(&[odd]).is_some_and(|p| p.contains("not a JSON object")),
                "{not_an_object}"
            );
        }
        assert!(delivery_problem(&[event("", "cus_1", None)]).is_some());
        assert!(delivery_problem(&[event("evt_3", "a\0b", None)]).is_some());
        assert_eq!(
            delivery_problem(&[ok.clone(), event("evt_4", "cus_1", None)]),
            None
        );
        // Bounded: a guest's answer to a small body was as large as its
        // memory, parsed on the host at many times that.
        let many: Vec<Event> = (0..=MAX_DELIVERY_EVENTS)
            .map(|n| event(&format!("evt_{n}"), "cus_1", None))
            .collect();
        assert!(delivery_problem(&many).is_some_and(|p| p.contains("events in one delivery")));
        assert_eq!(delivery_problem(&many[1..]), None);
        let huge = format!("[{}0]", "0,".repeat(MAX_RECORD_BYTES / 2));
        assert!(delivery_problem(&[event("evt_5", "cus_1", Some(&huge))])
            .is_some_and(|p| p.contains("record is longer")));
        // Each record within its bound, together past the call's: 60 of
        // them filled a guest's memory, about 1 GiB once parsed here.
        let large = format!("{{\"a\":[{}0]}}", "0,".repeat(MAX_RECORD_BYTES / 2 - 8));
        let filled: Vec<Event> = (0..=MAX_CALL_RECORD_BYTES / MAX_RECORD_BYTES)
            .map(|n| event(&format!("evt_large_{n}"), "cus_1", Some(&large)))
            .collect();
        assert!(delivery_problem(&filled[..filled.len() - 1]).is_none());
        assert!(delivery_problem(&filled).is_some_and(|p| p.contains("records hold")));
        let page: Vec<RemoteRecord> = filled
            .iter()
            .map(|e| RemoteRecord {
                remote_id: e.id.clone(),
                record: large.clone(),
                updated_at_ms: None,
            })
            .collect();
        assert!(oversized(&page[..page.len() - 1]).is_ok());
        assert!(matches!(
            oversized(&page),
            Err(CallError::Connector(ConnectorError::Permanent(m))) if m.contains("bytes of records")
        ));
        let mut typed = ok.clone();
        typed.entity = "e".repeat(MAX_ID_BYTES + 1);
        assert!(delivery_problem(&[typed]).is_some_and(|p| p.contains("entity")));
        // A client's long idempotency key (Stripe's are 255 characters)
        // is not a reason to refuse a delivery: the endpoint drops it.
        let mut keyed = ok;
        keyed.origin_key = Some("ключ".repeat(MAX_ID_BYTES / 4));
        keyed.remote_type = "t".repeat(MAX_ID_BYTES + 1);
        assert_eq!(delivery_problem(&[keyed]), None);
    }

    #[test]
    fn header_check_tells_kinds_apart() {
        assert!(matches!(
            check_header(b"hello world"),
            Err(LoadError::NotWasm)
        ));
        assert!(matches!(
            check_header(b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule)
        ));
        assert!(check_header(b"\0asm\x0d\0\x01\0").is_ok());
        assert!(matches!(
            check_header(b"\0asm\x02\0\0\0"),
            Err(LoadError::UnknownVersion(_))
        ));
    }
}
