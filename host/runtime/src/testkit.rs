//! Test kit for connector authors: runs a built component in the real
//! runtime (same sandbox, same host policy, same secret substitution) with
//! its HTTP answered by a script instead of the network, from plain
//! `cargo test`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry_runtime::testkit::{self, TestKit};
//!
//! let wasm = testkit::build_component(env!("CARGO_MANIFEST_DIR"))?;
//! let kit = TestKit::load_file(&wasm).await?.secret("api_key", "sk_test_123");
//! kit.http()
//!     .on("POST", "https://api.stripe.com/v1/customers")
//!     .respond(429, &[("retry-after", "2")], "{}");
//! let err = kit
//!     .push(testkit::push_request("customer", ferry_runtime::Operation::Create, "c1", None, "{}"))
//!     .await
//!     .unwrap_err();
//! let sent = kit.http().requests();
//! assert_eq!(sent[0].header("authorization"), Some("Bearer sk_test_123"));
//! # let _ = err; Ok(()) }
//! ```
//!
//! Connector crates reach this module as `ferry_sdk::testkit` through the
//! SDK's `testkit` feature.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use futures::FutureExt;
use secrecy::SecretString;

pub use crate::{
    CallError, ChangeKind, ConnectorError, Event, Manifest, Operation, Page, ParsedWebhook,
    PushRequest, PushResult, RateLimit, RemoteRecord, WebhookRequest, WireError, WireResponse,
};
use crate::{Connector, ConnectorConfig, HttpTransport, Runtime, RuntimeConfig, WireRequest};

/// Why the kit could not build or load a component.
#[derive(Debug, thiserror::Error)]
pub enum TestKitError {
    /// Reading the `.wasm` file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `cargo build --target wasm32-wasip2` failed or produced no component.
    #[error("building the component: {0}")]
    Build(String),
    /// The runtime could not be created.
    #[error("creating the runtime: {0}")]
    Runtime(String),
    /// The runtime refused the component.
    #[error("loading the component: {0}")]
    Load(String),
}

/// A loaded connector with scripted HTTP, settings and secrets.
///
/// Settings and secrets may change between calls: each call gets the
/// configuration as it is then, as in production.
pub struct TestKit {
    // Kept alive for the connector's sake: it owns the engine.
    _runtime: Runtime,
    connector: Arc<Connector>,
    http: Arc<ScriptedHttp>,
    settings: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
}

impl TestKit {
    /// Loads component bytes with the runtime's default policy (what an
    /// operator gets out of the box: declared hosts only, no private
    /// addresses) and a small instance pool.
    pub async fn load(wasm: impl AsRef<[u8]>) -> Result<Self, TestKitError> {
        let config = RuntimeConfig {
            // Each kit has its own pool, and each slot reserves address
            // space: tests running side by side must not reserve thousands.
            max_instances: 8,
            ..RuntimeConfig::default()
        };
        Self::load_with(wasm, config).await
    }

    /// Loads a `.wasm` file with the default runtime configuration.
    pub async fn load_file(path: impl AsRef<Path>) -> Result<Self, TestKitError> {
        let path = path.as_ref();
        let wasm = std::fs::read(path).map_err(|source| TestKitError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::load(wasm).await
    }

    /// Loads component bytes with a given runtime configuration (for
    /// example `allow_private_hosts` to script a `http://127.0.0.1` base URL).
    pub async fn load_with(
        wasm: impl AsRef<[u8]>,
        config: RuntimeConfig,
    ) -> Result<Self, TestKitError> {
        let http = Arc::new(ScriptedHttp::default());
        let transport: Arc<dyn HttpTransport> = http.clone();
        let runtime = Runtime::with_transport(config, transport)
            .map_err(|e| TestKitError::Runtime(e.to_string()))?;
        let connector = runtime
            .load(wasm.as_ref())
            .await
            .map_err(|e| TestKitError::Load(e.to_string()))?;
        Ok(Self {
            _runtime: runtime,
            connector,
            http,
            settings: BTreeMap::new(),
            secrets: BTreeMap::new(),
        })
    }

    /// Sets a (non-secret) setting.
    #[must_use]
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.insert(name.into(), value.into());
        self
    }

    /// Sets a secret's value. The component never sees it; recorded requests
    /// show it where the connector placed a `{{secret:NAME}}` placeholder.
    #[must_use]
    pub fn secret(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.secrets.insert(name.into(), value.into());
        self
    }

    /// The scripted HTTP the component talks to.
    pub fn http(&self) -> &ScriptedHttp {
        &self.http
    }

    /// The loaded connector, for calls the kit does not wrap.
    pub fn connector(&self) -> &Arc<Connector> {
        &self.connector
    }

    /// The connector's manifest.
    pub fn manifest(&self) -> &Manifest {
        self.connector.manifest()
    }

    /// The configuration the next call will get.
    pub fn config(&self) -> ConnectorConfig {
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
        self.connector.verify_webhook(&self.config(), req).await
    }

    /// Calls `parse-webhook`.
    pub async fn parse_webhook(&self, req: WebhookRequest) -> Result<ParsedWebhook, CallError> {
        self.connector.parse_webhook(&self.config(), req).await
    }

    /// Handles a delivery as one call ([`Connector::receive_webhook`]):
    /// `verify-webhook`, then `parse-webhook` only if it passed, on one
    /// instance.
    pub async fn receive_webhook(&self, req: WebhookRequest) -> Result<ParsedWebhook, CallError> {
        self.connector.receive_webhook(&self.config(), req).await
    }

    /// Calls `push`.
    pub async fn push(&self, req: PushRequest) -> Result<PushResult, CallError> {
        self.connector.push(&self.config(), req).await
    }

    /// Calls `fetch`.
    pub async fn fetch(&self, entity: &str, remote_id: &str) -> Result<RemoteRecord, CallError> {
        self.connector
            .fetch(&self.config(), entity, remote_id)
            .await
    }

    /// Calls `list`.
    pub async fn list(
        &self,
        entity: &str,
        cursor: Option<String>,
        limit: u32,
    ) -> Result<Page, CallError> {
        self.connector
            .list(&self.config(), entity, cursor, limit)
            .await
    }
}

/// A push request with version 1 and idempotency key `"{local_id}-v1"`;
/// change the public fields for anything else.
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
        idempotency_key: format!("{local_id}-v1"),
        record: record.into(),
    }
}

/// A webhook delivery as the host would pass it: header names lower-cased,
/// the body byte for byte.
pub fn webhook_request(headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> WebhookRequest {
    WebhookRequest {
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
        body: body.into(),
    }
}

/// Builds the connector crate at `manifest_dir` with
/// `cargo build --target wasm32-wasip2 --release` and returns the path of the
/// component. Cargo's own up-to-date check makes repeat calls cheap.
pub fn build_component(manifest_dir: impl AsRef<Path>) -> Result<PathBuf, TestKitError> {
    let manifest = manifest_dir.as_ref().join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-wasip2"])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| TestKitError::Build(format!("running cargo: {e}")))?;
    if !output.status.success() {
        return Err(TestKitError::Build(format!(
            "cargo build of {} failed (see its output above)",
            manifest.display()
        )));
    }
    let manifest = manifest.canonicalize().unwrap_or(manifest);
    // The package's own cdylib artifact (the last one reported), not one of
    // its dependencies'.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let wasm = stdout
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| {
            msg["manifest_path"]
                .as_str()
                .is_some_and(|p| Path::new(p) == manifest)
        })
        .filter_map(|msg| {
            msg["filenames"].as_array().and_then(|files| {
                files
                    .iter()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".wasm"))
                    .map(PathBuf::from)
            })
        })
        .next();
    wasm.ok_or_else(|| {
        TestKitError::Build(format!(
            "{} produced no .wasm (is its crate-type cdylib?)",
            manifest.display()
        ))
    })
}

/// One request the component sent, as it went on the wire: after the host
/// policy allowed it and substituted secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Upper-case method, e.g. `POST`.
    pub method: String,
    /// The absolute URL.
    pub url: String,
    /// Headers in the connector's order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (empty if none).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }

    /// The body decoded as `application/x-www-form-urlencoded` pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        serde_urlencoded::from_bytes(self.body.as_deref().unwrap_or_default()).unwrap_or_default()
    }

    /// The first value of form field `name`.
    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The query string decoded as pairs.
    pub fn query(&self) -> Vec<(String, String)> {
        url::Url::parse(&self.url)
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default()
    }
}

/// An [`HttpTransport`] answering from a script and recording every request.
///
/// A request is answered by the matching rule (method equal, URL starting
/// with the rule's prefix) with the longest prefix; among equals, the first
/// added. Each rule answers its responses in order and repeats the last one.
/// A request no rule matches fails with a connect error (which the SDK maps
/// to retryable) and is listed by [`ScriptedHttp::unmatched`].
#[derive(Default)]
pub struct ScriptedHttp {
    state: Mutex<ScriptState>,
}

#[derive(Default)]
struct ScriptState {
    rules: Vec<Rule>,
    requests: Vec<RecordedRequest>,
    unmatched: Vec<RecordedRequest>,
}

struct Rule {
    method: String,
    url_prefix: String,
    answers: VecDeque<Answer>,
}

#[derive(Clone)]
enum Answer {
    Response(WireResponse),
    Error(WireError),
}

impl ScriptedHttp {
    /// Starts a rule for requests with `method` (case-insensitive) to URLs
    /// starting with `url_prefix`; add answers with the returned handle.
    pub fn on(&self, method: &str, url_prefix: &str) -> RuleHandle<'_> {
        let mut state = self.lock();
        state.rules.push(Rule {
            method: method.to_ascii_uppercase(),
            url_prefix: url_prefix.to_owned(),
            answers: VecDeque::new(),
        });
        RuleHandle {
            http: self,
            index: state.rules.len() - 1,
        }
    }

    /// Every request sent so far, in order (matched or not).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The last request sent, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.lock().requests.last().cloned()
    }

    /// Requests no rule answered.
    pub fn unmatched(&self) -> Vec<RecordedRequest> {
        self.lock().unmatched.clone()
    }

    /// Forgets recorded requests (rules stay).
    pub fn clear_requests(&self) {
        let mut state = self.lock();
        state.requests.clear();
        state.unmatched.clear();
    }

    fn lock(&self) -> MutexGuard<'_, ScriptState> {
        // A panic while holding the lock happens only in a failing test; the
        // script is still usable for its report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn answer(&self, req: WireRequest) -> Result<WireResponse, WireError> {
        let recorded = RecordedRequest {
            method: req.method.as_str().to_ascii_uppercase(),
            url: req.url.to_string(),
            headers: req.headers,
            body: req.body,
        };
        let mut state = self.lock();
        state.requests.push(recorded.clone());
        let rule = state
            .rules
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| {
                r.method == recorded.method
                    && recorded.url.starts_with(&r.url_prefix)
                    && !r.answers.is_empty()
            })
            // Longest prefix wins; `max_by_key` keeps the last maximum, so
            // rank by (length, reversed index) to prefer the first added.
            .max_by_key(|(i, r)| (r.url_prefix.len(), usize::MAX - i))
            .map(|(_, r)| r);
        let answer = match rule {
            Some(rule) if rule.answers.len() > 1 => rule.answers.pop_front(),
            Some(rule) => rule.answers.front().cloned(),
            None => None,
        };
        match answer {
            Some(Answer::Response(resp)) => {
                if resp.body.len() > req.max_response_bytes {
                    return Err(WireError::TooLarge(format!(
                        "scripted body of {} bytes exceeds the limit of {}",
                        resp.body.len(),
                        req.max_response_bytes
                    )));
                }
                Ok(resp)
            }
            Some(Answer::Error(err)) => Err(err),
            None => {
                let message = format!(
                    "no scripted response for {} {}",
                    recorded.method, recorded.url
                );
                state.unmatched.push(recorded);
                Err(WireError::Connect(message))
            }
        }
    }
}

impl HttpTransport for ScriptedHttp {
    fn send(&self, req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>> {
        let result = self.answer(req);
        async move { result }.boxed()
    }
}

/// Adds answers to one rule of a [`ScriptedHttp`]; calls chain, and answers
/// are given in order, the last one repeating.
pub struct RuleHandle<'a> {
    http: &'a ScriptedHttp,
    index: usize,
}

impl RuleHandle<'_> {
    /// Answers with `status`, `headers` (names are lower-cased, as the host
    /// does) and `body`.
    pub fn respond(self, status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        let resp = WireResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
                .collect(),
            body: body.into(),
        };
        self.push(Answer::Response(resp))
    }

    /// Answers with `status` and `body` serialized as JSON.
    pub fn respond_json(self, status: u16, body: &serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.respond(status, &[("content-type", "application/json")], bytes)
    }

    /// Fails at the transport: a connect error, a timeout, a body too large.
    pub fn fail(self, error: WireError) -> Self {
        self.push(Answer::Error(error))
    }

    fn push(self, answer: Answer) -> Self {
        if let Some(rule) = self.http.lock().rules.get_mut(self.index) {
            rule.answers.push_back(answer);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(method: http::Method, url: &str) -> WireRequest {
        WireRequest {
            method,
            url: url::Url::parse(url).unwrap(),
            headers: vec![("authorization".into(), "Bearer k".into())],
            body: Some(b"a=1&b=x+y".to_vec()),
            timeout: std::time::Duration::from_secs(1),
            max_response_bytes: 1024,
        }
    }

    #[test]
    fn longest_prefix_wins_and_sequences_repeat_their_last_answer() {
        let http = ScriptedHttp::default();
        http.on("post", "https://x.example/v1/")
            .respond(500, &[], "general");
        http.on("POST", "https://x.example/v1/customers")
            .respond(429, &[("Retry-After", "1")], "")
            .respond(200, &[], "ok");
        let status = |url: &str| {
            http.answer(wire(http::Method::POST, url))
                .map(|r| r.status)
                .unwrap()
        };
        assert_eq!(status("https://x.example/v1/customers"), 429);
        assert_eq!(status("https://x.example/v1/customers"), 200);
        assert_eq!(status("https://x.example/v1/customers"), 200);
        assert_eq!(status("https://x.example/v1/other"), 500);

        let first = http.requests().remove(0);
        assert_eq!(first.method, "POST");
        assert_eq!(first.header("Authorization"), Some("Bearer k"));
        assert_eq!(first.form_value("b").as_deref(), Some("x y"));
    }

    #[test]
    fn unmatched_requests_fail_and_are_listed() {
        let http = ScriptedHttp::default();
        http.on("GET", "https://x.example/")
            .fail(WireError::Timeout("slow".into()));
        assert_eq!(
            http.answer(wire(http::Method::GET, "https://x.example/a")),
            Err(WireError::Timeout("slow".into()))
        );
        assert!(matches!(
            http.answer(wire(http::Method::DELETE, "https://x.example/a")),
            Err(WireError::Connect(_))
        ));
        assert_eq!(http.unmatched().len(), 1);
        assert_eq!(http.requests().len(), 2);
    }

    #[test]
    fn oversized_scripted_bodies_are_refused_like_the_real_wire() {
        let http = ScriptedHttp::default();
        http.on("GET", "https://x.example/")
            .respond(200, &[], vec![0u8; 2048]);
        assert!(matches!(
            http.answer(wire(http::Method::GET, "https://x.example/")),
            Err(WireError::TooLarge(_))
        ));
    }
}
