//! The test kit: runs your built connector in ferry's real sandbox (the
//! same runtime, host policy and secret substitution as the server) from
//! plain `cargo test`, with its HTTP answered by a script, recorded from a
//! real endpoint, or replayed from a recording.
//!
//! Enable the `testkit` feature in `[dev-dependencies]` (native targets
//! only). It builds ferry's connector runtime, `ferry-runtime`, and nothing
//! of the server; `testkit-record` adds the HTTP client that
//! [`Http::Record`] needs. Calls take and return the SDK's own types
//! ([`PushRequest`], [`ConnectorError`], ...), so a test reads like the
//! connector it tests.
//!
//! ```no_run
//! use ferry_sdk::testkit::{self, CallError, TestKit};
//! use ferry_sdk::{ConnectorError, Operation};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // Builds this crate for wasm32-wasip2 once per test binary, then loads it.
//! let kit = TestKit::this_crate().await?.secret("api_key", "sk_test_123");
//! kit.http()
//!     .on("POST", "https://api.example-crm.com/v1/contacts")
//!     .respond(429, &[("retry-after", "2")], "{}")
//!     .respond_json(201, &serde_json::json!({"id": "ct_1"}));
//! let req = testkit::push_request("customer", Operation::Create, "c1", None, r#"{"name":"Ada"}"#);
//! let err = kit.push(req.clone()).await.unwrap_err();
//! assert!(matches!(err, CallError::Connector(ConnectorError::RateLimited(_))));
//! assert_eq!(kit.push(req).await?.remote_id, "ct_1");
//! let sent = kit.http().requests();
//! assert_eq!(sent[0].header("authorization"), Some("Bearer sk_test_123"));
//! # Ok(()) }
//! ```
//!
//! The pieces:
//! - [`TestKit`]: load ([`TestKit::this_crate`], [`TestKit::load_file`],
//!   [`TestKit::load`]; a test binary compiles each component once),
//!   configure ([`TestKit::setting`],
//!   [`TestKit::secret`]) and call ([`TestKit::push`], [`TestKit::fetch`],
//!   [`TestKit::list`], [`TestKit::verify_webhook`],
//!   [`TestKit::parse_webhook`], [`TestKit::receive_webhook`]).
//! - [`ScriptedHttp`] (`kit.http()`): rules that answer requests, and every
//!   request as it went on the wire.
//! - [`Tape`]: record a session against a real endpoint, replay it offline.
//! - [`sign`]: webhook signatures that the SDK's [`crate::webhook`] checks
//!   accept.
//! - [`webhooks`]: duplicated, out-of-order and tampered deliveries.

mod convert;
mod scripted;
pub mod sign;
mod tape;
pub mod webhooks;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// The sandbox's settings, for [`TestKit::load_with`].
pub use ferry_runtime::RuntimeConfig;
/// Why the transport gave no response (for [`RuleHandle::fail`]).
pub use ferry_runtime::WireError;
use ferry_runtime::{Connector as Loaded, ConnectorConfig, HttpTransport, Runtime};
use secrecy::SecretString;

pub use self::scripted::{RecordedRequest, RuleHandle, ScriptedHttp};
pub use self::tape::{Exchange, Tape};
use crate::{
    ConnectorError, Manifest, Operation, Page, ParsedWebhook, PushRequest, PushResult,
    RemoteRecord, WebhookRequest,
};

/// Why the kit could not build or load a component.
#[derive(Debug)]
pub enum TestKitError {
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `cargo build --target wasm32-wasip2` failed or produced no component.
    Build(String),
    /// The runtime could not be created.
    Runtime(String),
    /// The runtime refused the component (the same checks as an upload).
    Load(String),
    /// A recording could not be read, written or used.
    Tape(String),
}

impl std::fmt::Display for TestKitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Self::Build(m) => write!(f, "building the component: {m}"),
            Self::Runtime(m) => write!(f, "creating the runtime: {m}"),
            Self::Load(m) => write!(f, "loading the component: {m}"),
            Self::Tape(m) => write!(f, "recording: {m}"),
        }
    }
}

impl std::error::Error for TestKitError {}

/// Why a call produced no result.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// Your connector returned this error.
    Connector(ConnectorError),
    /// The call ran past the sandbox's deadline (a loop, a slow remote).
    DeadlineExceeded,
    /// The guest hit the memory cap or the stack limit.
    ResourceExhausted(String),
    /// The guest trapped: a panic, an abort, an invalid operation.
    Trap(String),
    /// The host could not create an instance.
    Instantiate(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connector(e) => write!(f, "the connector returned {e:?}"),
            Self::DeadlineExceeded => f.write_str("the call exceeded its deadline"),
            Self::ResourceExhausted(m) => write!(f, "the call exhausted a sandbox limit: {m}"),
            Self::Trap(m) => write!(f, "the connector trapped: {m}"),
            Self::Instantiate(m) => write!(f, "cannot instantiate the connector: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// Where the component's HTTP goes.
#[derive(Debug, Clone)]
pub enum Http {
    /// Answered by rules the test adds with [`TestKit::http`] (the default).
    Scripted,
    /// Sent to the real network (through the host's policy, which allows
    /// private addresses here so a local service can be recorded), and every
    /// exchange kept; [`TestKit::save_recording`] writes them to the file,
    /// secrets and tokens scrubbed. Needs the `testkit-record` feature.
    Record(PathBuf),
    /// Answered from a file [`Http::Record`] wrote, without any network.
    Replay(PathBuf),
}

/// A loaded connector with scripted (or recorded, or replayed) HTTP,
/// settings and secrets.
///
/// Settings and secrets may change between calls: each call gets the
/// configuration as it is then, as in production.
pub struct TestKit {
    // Kept alive for the connector's sake: it owns the engine.
    _runtime: Runtime,
    connector: Arc<Loaded>,
    http: Arc<ScriptedHttp>,
    tape: Option<Arc<tape::TapeTransport>>,
    settings: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
    /// Values secrets had before they were set again (see `save_recording`).
    earlier_secrets: Vec<(String, String)>,
}

impl TestKit {
    /// Builds the crate under test (`CARGO_MANIFEST_DIR`, which `cargo
    /// test` sets) for `wasm32-wasip2` once per test binary, and loads it.
    pub async fn this_crate() -> Result<Self, TestKitError> {
        Self::this_crate_with(Http::Scripted).await
    }

    /// [`TestKit::this_crate`], with its HTTP recorded or replayed.
    pub async fn this_crate_with(http: Http) -> Result<Self, TestKitError> {
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").ok_or_else(|| {
            TestKitError::Build("CARGO_MANIFEST_DIR is not set: run under `cargo test`".into())
        })?;
        let wasm = build_component(PathBuf::from(dir))?;
        Self::load_file_with(wasm, http).await
    }

    /// Loads a `.wasm` file with scripted HTTP.
    pub async fn load_file(path: impl AsRef<Path>) -> Result<Self, TestKitError> {
        Self::load_file_with(path, Http::Scripted).await
    }

    /// Loads a `.wasm` file with the given HTTP.
    pub async fn load_file_with(path: impl AsRef<Path>, http: Http) -> Result<Self, TestKitError> {
        let path = path.as_ref();
        let wasm = std::fs::read(path).map_err(|source| TestKitError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::load_shared(&wasm, http).await
    }

    /// Loads component bytes with scripted HTTP and the default sandbox.
    pub async fn load(wasm: impl AsRef<[u8]>) -> Result<Self, TestKitError> {
        Self::load_shared(wasm.as_ref(), Http::Scripted).await
    }

    /// Loads on one of the process's shared runtimes, so a component is
    /// compiled once per test binary however many kits load it.
    async fn load_shared(wasm: &[u8], http: Http) -> Result<Self, TestKitError> {
        static PRODUCTION: OnceLock<Result<Runtime, String>> = OnceLock::new();
        static LOCAL: OnceLock<Result<Runtime, String>> = OnceLock::new();
        // Scripted HTTP runs under the server's own policy; a recording (or
        // its replay) often ran against a local service, so those may reach
        // private addresses and plain http.
        let local = !matches!(http, Http::Scripted);
        let base = if local { &LOCAL } else { &PRODUCTION }
            .get_or_init(|| {
                // Every request goes through a kit's own transport; this
                // one only exists because a runtime needs one.
                let nowhere: Arc<dyn HttpTransport> = Arc::new(ScriptedHttp::default());
                let config = RuntimeConfig {
                    allow_private_hosts: local,
                    ..shared_config()
                };
                Runtime::with_transport(config, nowhere).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| TestKitError::Runtime(e.clone()))?;
        let (transport, scripted, tape) = transport_for(&http)?;
        let runtime = base.with_other_transport(transport);
        let connector = runtime
            .load(wasm)
            .await
            .map_err(|e| TestKitError::Load(e.to_string()))?;
        Ok(Self {
            _runtime: runtime,
            connector,
            http: scripted,
            tape,
            settings: BTreeMap::new(),
            secrets: BTreeMap::new(),
            earlier_secrets: Vec::new(),
        })
    }

    /// Loads component bytes with a given sandbox configuration (for example
    /// `allow_private_hosts` to script a `http://127.0.0.1` base URL) and
    /// HTTP.
    pub async fn load_with(
        wasm: impl AsRef<[u8]>,
        mut config: RuntimeConfig,
        http: Http,
    ) -> Result<Self, TestKitError> {
        if !matches!(http, Http::Scripted) {
            // A recording runs against a real service, often a local one.
            config.allow_private_hosts = true;
        }
        let (transport, scripted, tape) = transport_for(&http)?;
        let runtime = Runtime::with_transport(config, transport)
            .map_err(|e| TestKitError::Runtime(e.to_string()))?;
        let connector = runtime
            .load(wasm.as_ref())
            .await
            .map_err(|e| TestKitError::Load(e.to_string()))?;
        Ok(Self {
            _runtime: runtime,
            connector,
            http: scripted,
            tape,
            settings: BTreeMap::new(),
            secrets: BTreeMap::new(),
            earlier_secrets: Vec::new(),
        })
    }

    /// Sets a (non-secret) setting.
    ///
    /// # Panics
    ///
    /// If the manifest declares no setting `name`: ferry refuses one (422
    /// from the API, an error at start), and in the kit the value would go
    /// nowhere (a typo's requests went to the default host).
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let manifest = self.connector.manifest();
        declared(
            "setting",
            manifest.settings.iter().map(|s| s.name.as_str()),
            &name,
        );
        self.settings.insert(name, value.into());
        self
    }

    /// Sets a secret's value. The component never sees it; recorded requests
    /// show it where the connector placed a `{{secret:NAME}}` placeholder.
    ///
    /// # Panics
    ///
    /// If the manifest declares no secret `name` (ferry refuses one).
    #[must_use]
    pub fn secret(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        let manifest = self.connector.manifest();
        declared(
            "secret",
            manifest.secrets.iter().map(|s| s.name.as_str()),
            &name,
        );
        // The value it replaces may be in what was recorded so far: the
        // tape scrubs it too.
        if let Some(earlier) = self.secrets.insert(name.clone(), value.into()) {
            self.earlier_secrets.push((name, earlier));
        }
        self
    }

    /// The scripted HTTP the component talks to (with [`Http::Scripted`]).
    pub fn http(&self) -> &ScriptedHttp {
        &self.http
    }

    /// The connector's manifest.
    pub fn manifest(&self) -> Manifest {
        convert::manifest(self.connector.manifest())
    }

    /// The `ferry:connector` world version the component targets.
    pub fn world(&self) -> &'static str {
        self.connector.world().as_str()
    }

    /// With [`Http::Record`]: writes what was recorded so far to the file,
    /// every secret value replaced by its `{{secret:NAME}}` placeholder and
    /// every OAuth token by `{{token}}`. Returns the file.
    pub fn save_recording(&self) -> Result<PathBuf, TestKitError> {
        match &self.tape {
            Some(tape) => {
                let secrets: Vec<(String, String)> = self
                    .secrets
                    .iter()
                    .map(|(name, value)| (name.clone(), value.clone()))
                    .chain(self.earlier_secrets.iter().cloned())
                    .collect();
                tape.save(&secrets)
            }
            None => Err(TestKitError::Tape(
                "this kit was not loaded with Http::Record".into(),
            )),
        }
    }

    /// With [`Http::Replay`]: the recorded exchanges the connector has not
    /// asked for (`METHOD URL`), in the recording's order. A session that
    /// replays with some left over no longer makes the calls recorded:
    /// assert it is empty after the session.
    pub fn unreplayed(&self) -> Vec<String> {
        self.tape
            .as_ref()
            .map_or_else(Vec::new, |tape| tape.unreplayed())
    }

    fn config(&self) -> ConnectorConfig {
        ConnectorConfig {
            settings: self.settings.clone(),
            secrets: self
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), SecretString::from(v.clone())))
                .collect(),
        }
    }

    /// Calls `verify-webhook`.
    pub async fn verify_webhook(&self, req: WebhookRequest) -> Result<(), CallError> {
        self.connector
            .verify_webhook(&self.config(), convert::webhook_request(req))
            .await
            .map_err(convert::call_error)
    }

    /// Calls `parse-webhook` (without verifying first).
    pub async fn parse_webhook(&self, req: WebhookRequest) -> Result<ParsedWebhook, CallError> {
        self.connector
            .parse_webhook(&self.config(), convert::webhook_request(req))
            .await
            .map(convert::parsed_webhook)
            .map_err(convert::call_error)
    }

    /// Handles a delivery the way ferry's webhook endpoint does:
    /// `verify-webhook`, then `parse-webhook` only if it passed, on one
    /// instance; and, as ferry does, refuses a connector whose manifest
    /// does not declare webhooks (ferry answers 404), and events ferry
    /// would not store: an id or remote id it could not keep (empty, over
    /// 255 bytes, a NUL), a record that is not a JSON object, or one id given to two
    /// different events; a reply over 64 KiB; and a delivery larger than
    /// ferry reads by default
    /// (ferry answers 413 without calling the connector).
    pub async fn receive_webhook(&self, req: WebhookRequest) -> Result<ParsedWebhook, CallError> {
        if req.body.len() > ferry_runtime::DEFAULT_WEBHOOK_MAX_BODY_BYTES {
            return Err(refusal(&format!(
                "a delivery of {} bytes: ferry answers 413 to one over webhook_max_body_bytes \
                 ({} by default) without reading it",
                req.body.len(),
                ferry_runtime::DEFAULT_WEBHOOK_MAX_BODY_BYTES
            )));
        }
        if !self.connector.manifest().webhooks {
            return Err(refusal(
                "no webhooks: the manifest does not declare them (`.webhooks()`), so ferry answers 404 to every delivery",
            ));
        }
        let parsed = self
            .connector
            .receive_webhook(&self.config(), convert::webhook_request(req))
            .await
            .map_err(convert::call_error)?;
        refused(ferry_runtime::delivery_problem(&parsed.events))?;
        refused(ferry_runtime::reply_problem(parsed.reply.as_ref()))?;
        Ok(convert::parsed_webhook(parsed))
    }

    /// Calls `push`; a remote id ferry could not store or key (empty, a
    /// NUL, longer than 255 bytes) fails the call: the first dead-letters
    /// the change in ferry, and the record of a longer one could never be
    /// listed (a reconciliation skips it, and reports its link an orphan)
    /// nor named by a webhook (refused); so does a result
    /// record that is not a JSON object (ferry ignores it, and takes what it
    /// pushed as the remote's state).
    pub async fn push(&self, req: PushRequest) -> Result<PushResult, CallError> {
        let result = self
            .connector
            .push(&self.config(), convert::push_request(req))
            .await
            .map(convert::push_result)
            .map_err(convert::call_error)?;
        refused(ferry_runtime::unkeyable("remote id", &result.remote_id))?;
        if let Some(record) = &result.record {
            let object = serde_json::from_str::<serde_json::Value>(record)
                .is_ok_and(|value| value.is_object());
            if !object {
                return Err(CallError::Connector(ConnectorError::permanent(
                    "the push result's record is not a JSON object: ferry ignores it (and logs a warning), \
                     taking what it pushed as the remote's state",
                )));
            }
        }
        Ok(result)
    }

    /// Calls `fetch`; a record that is not a JSON object fails the call,
    /// as ferry dead-letters the event it was fetched for.
    pub async fn fetch(&self, entity: &str, remote_id: &str) -> Result<RemoteRecord, CallError> {
        let record = self
            .connector
            .fetch(&self.config(), entity, remote_id)
            .await
            .map(convert::remote_record)
            .map_err(convert::call_error)?;
        refused(ferry_runtime::record_problem(&record.record))?;
        Ok(record)
    }

    /// Calls `list`; a `next_cursor` ferry could not follow (empty, a NUL,
    /// or the cursor that asked for the page) fails the call, as it fails a
    /// reconciliation run; so does a record's id ferry cannot key (empty, a
    /// NUL, longer than 255 bytes): a run skips the record, and reports the
    /// customer linked to it an orphan; so does a record that is not a
    /// JSON object (a run skips it as `invalid`: never imported, linked or
    /// compared).
    pub async fn list(
        &self,
        entity: &str,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<Page, CallError> {
        let page = self
            .connector
            .list(&self.config(), entity, cursor.clone(), limit)
            .await
            .map(convert::page)
            .map_err(convert::call_error)?;
        refused(ferry_runtime::cursor_problem(
            cursor.as_deref(),
            page.next_cursor.as_deref(),
        ))?;
        for record in &page.records {
            refused(ferry_runtime::unkeyable(
                "listed record's id",
                &record.remote_id,
            ))?;
            refused(
                ferry_runtime::record_problem(&record.record)
                    .map(|problem| format!("listed record {}: {problem}", record.remote_id)),
            )?;
        }
        Ok(page)
    }
}

/// The sandbox the kits of a test binary share: the server's limits and a
/// small instance pool (each slot reserves address space).
fn shared_config() -> RuntimeConfig {
    RuntimeConfig {
        max_instances: 32,
        ..RuntimeConfig::default()
    }
}

type Transports = (
    Arc<dyn HttpTransport>,
    Arc<ScriptedHttp>,
    Option<Arc<tape::TapeTransport>>,
);

/// The transport a kit's calls go through, its script (used when `http`
/// is scripted) and its tape (when recording or replaying).
fn transport_for(http: &Http) -> Result<Transports, TestKitError> {
    let scripted = Arc::new(ScriptedHttp::default());
    let tape = match http {
        Http::Scripted => None,
        Http::Record(path) => Some(Arc::new(tape::TapeTransport::record(
            path.clone(),
            RuntimeConfig::default().http_connect_timeout,
        )?)),
        Http::Replay(path) => Some(Arc::new(tape::TapeTransport::replay(path)?)),
    };
    let transport: Arc<dyn HttpTransport> = match &tape {
        Some(tape) => tape.clone(),
        None => scripted.clone(),
    };
    Ok((transport, scripted, tape))
}

/// A push request with version 1 and the idempotency key ferry would send
/// for it from a connector named `example` (`"ferry-example-{local_id}-v1"`:
/// ferry's form, but shorter than ferry's own keys, whose customer ids are
/// 36 bytes; see [`idempotency_key_as_sent`]); change the public fields for
/// anything else.
pub fn push_request(
    entity: &str,
    operation: Operation,
    local_id: &str,
    remote_id: Option<&str>,
    record: impl Into<String>,
) -> PushRequest {
    PushRequest {
        entity: entity.to_owned(),
        operation,
        local_id: local_id.to_owned(),
        remote_id: remote_id.map(str::to_owned),
        version: 1,
        idempotency_key: ferry_runtime::idempotency_key("example", local_id, 1, 0),
        record: record.into(),
    }
}

/// An idempotency key of the length ferry sends from `connector` for a
/// customer's first push (`ferry-{connector}-cus_…-v1`, a 36-byte customer
/// id; a forced push adds `-r{n}`): to test that the API takes keys that
/// long, as `push_request`'s short one does not show.
pub fn idempotency_key_as_sent(connector: &str) -> String {
    ferry_runtime::idempotency_key(connector, &format!("cus_{}", "0".repeat(32)), 1, 0)
}

/// A webhook delivery as the host passes it: header names lower-cased, the
/// body byte for byte.
pub fn webhook_request(headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> WebhookRequest {
    WebhookRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
        body: body.into(),
    }
}

/// Builds the connector crate at `manifest_dir` with `cargo build --release
/// --target wasm32-wasip2` and returns the component's path. Within one
/// process (a test binary) each crate is built once: concurrent tests wait
/// for that one build instead of running cargo side by side.
///
/// The build goes to the target dir the test binary was built in (`cargo
/// test --target-dir DIR` included, which a nested cargo does not see), or
/// `CARGO_TARGET_DIR`. It has the crate's default features: for a component
/// built otherwise, build it and use [`TestKit::load_file`].
pub fn build_component(manifest_dir: impl AsRef<Path>) -> Result<PathBuf, TestKitError> {
    /// One build per crate: the first caller runs it, the others wait.
    type Build = Arc<OnceLock<Result<PathBuf, String>>>;
    static BUILDS: OnceLock<Mutex<HashMap<PathBuf, Build>>> = OnceLock::new();
    let dir = manifest_dir.as_ref().to_owned();
    let slot = {
        let mut builds = BUILDS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        builds.entry(dir.clone()).or_default().clone()
    };
    slot.get_or_init(|| {
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .is_none()
            .then(|| std::env::current_exe().ok())
            .flatten()
            .and_then(|exe| ferry_runtime::build::target_dir_of(&exe));
        ferry_runtime::build::component_in(&dir, true, target_dir.as_deref())
    })
    .clone()
    .map_err(TestKitError::Build)
}

/// Panics unless the manifest declares the `kind` (setting or secret)
/// `name` among `names`: ferry refuses an undeclared one.
fn declared<'a>(kind: &str, names: impl Iterator<Item = &'a str>, name: &str) {
    let names: Vec<&str> = names.collect();
    assert!(
        names.contains(&name),
        "the manifest declares no {kind} `{name}` (it declares {names:?}): ferry refuses it"
    );
}

/// Whether ferry can make a customer of `record` (a connector's record, as
/// an upsert event, `fetch` or `list` gives it): JSON with an email, and a
/// name, phone, address and metadata the catalog takes (the API's own
/// rules and limits: docs/connector-contract.md). ferry dead-letters an
/// event whose record fails, and a reconciliation cannot import it. An
/// update of a linked customer needs the email too: a field a record
/// leaves out is cleared once the link holds the remote's record (only a
/// link with none, or with what ferry pushed assumed, keeps ferry's).
/// Returns ferry's reason.
pub fn check_record(record: &str) -> Result<(), String> {
    let value: serde_json::Value =
        serde_json::from_str(record).map_err(|e| format!("the record is not JSON: {e}"))?;
    ferry_runtime::customer::fields_of(&value)
        .map(|_| ())
        .map_err(|problem| format!("ferry would dead-letter it: {problem}"))
}

/// A permanent error, as ferry reports it, for a remote id it could not
/// store on a link.
fn refused(problem: Option<String>) -> Result<(), CallError> {
    problem.map_or(Ok(()), |problem| Err(refusal(&problem)))
}

/// A permanent error, as ferry reports what it refuses of a connector.
fn refusal(problem: &str) -> CallError {
    CallError::Connector(ConnectorError::permanent(format!(
        "ferry refuses what the connector returned: {problem}"
    )))
}
