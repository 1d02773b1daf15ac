//! An HTTP reverse proxy for fault-injection tests: it sits between a
//! connector and a real peer (a localstripe), forwards every request, and
//! applies a scripted FIFO of faults to the next matching requests — an
//! answer made up without forwarding (429, 500, a Stripe error), a reply held
//! back after the upstream already applied the write (so the client times out
//! on a write that happened), a request never answered — or drops every
//! connection while "down". Every request is logged for assertions.
//!
//! With [`FaultProxy::emulate_stripe_idempotency`] it also honours
//! `Idempotency-Key` on POSTs the way Stripe documents it, which localstripe
//! does not: the first request's result is saved once the upstream executed
//! it, a retry with the same key and body gets that saved result back
//! (header `Idempotent-Replayed: true`) without reaching the upstream, the
//! same key with a different body is a 400 `idempotency_error`, and a retry
//! while the first is still executing is a 409.
//!
//! Built on hyper directly rather than axum: going down must be able to close
//! a kept-alive connection mid-request, which only the connection driver can.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// What to do with one request instead of plainly forwarding it.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this response without forwarding anything upstream.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Forward (so the upstream applies the write), then hold the upstream's
    /// answer back this long before replying: a client with a shorter
    /// timeout sees a failure for a write that happened.
    ForwardThenDelay(Duration),
    /// Never answer (the connection stays open until the client gives up).
    Hang,
    /// Answer with this error as Stripe does for a request that began
    /// executing and failed: with an idempotency key (and
    /// [`FaultProxy::emulate_stripe_idempotency`]), the answer is saved, and
    /// every retry with that key gets it back (Stripe saves a result,
    /// errors included, once the method began executing).
    RespondSaved {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
}

impl Fault {
    /// A bare status with an empty body.
    pub fn status(status: u16) -> Self {
        Self::Respond {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Stripe's rate limit answer: 429 with `Retry-After: {seconds}` and
    /// Stripe's error body.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut fault = Self::stripe_error(429, "rate_limit_error", "Too many requests");
        if let Self::Respond { headers, .. } = &mut fault {
            headers.push(("retry-after".to_owned(), retry_after_secs.to_string()));
        }
        fault
    }

    /// A Stripe-style error: `{"error":{"type":kind,"message":message}}`
    /// with a JSON content type, e.g. `(400, "invalid_request_error", ..)`.
    pub fn stripe_error(status: u16, kind: &str, message: &str) -> Self {
        let body = serde_json::json!({ "error": { "type": kind, "message": message } });
        Self::Respond {
            status,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body: body.to_string().into_bytes(),
        }
    }

    /// This [`Fault::Respond`] as one Stripe saves under the request's
    /// idempotency key ([`Fault::RespondSaved`]).
    pub fn saved(self) -> Self {
        match self {
            Self::Respond {
                status,
                headers,
                body,
            } => Self::RespondSaved {
                status,
                headers,
                body,
            },
            other => other,
        }
    }

    /// Adds a header to a [`Fault::Respond`] (no effect on other faults).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }
}

/// Which requests a queued fault applies to.
#[derive(Debug, Clone, Default)]
pub struct Match {
    method: Option<Method>,
    path_prefix: Option<String>,
}

impl Match {
    /// Every request.
    pub fn any() -> Self {
        Self::default()
    }

    /// Requests with this method and a path starting with `path_prefix`,
    /// e.g. `Match::request("POST", "/v1/customers")`.
    ///
    /// # Panics
    /// If `method` is not a valid HTTP method (a typo in a test).
    pub fn request(method: &str, path_prefix: &str) -> Self {
        Self {
            method: Some(Method::from_bytes(method.as_bytes()).expect("an HTTP method")),
            path_prefix: Some(path_prefix.to_owned()),
        }
    }

    /// Requests whose path starts with `path_prefix`, any method.
    pub fn path(path_prefix: &str) -> Self {
        Self {
            method: None,
            path_prefix: Some(path_prefix.to_owned()),
        }
    }

    fn matches(&self, method: &Method, path: &str) -> bool {
        self.method.as_ref().is_none_or(|m| m == method)
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path.starts_with(prefix))
    }
}

/// One request the proxy received, in arrival order.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether it was sent upstream (and the upstream answered).
    pub forwarded: bool,
    /// Whether a [`Fault::ForwardThenDelay`] took it: its answer is held.
    /// Which request takes a fault is decided when its handling starts,
    /// not when the fault is pushed: one already arriving can take it.
    pub held: bool,
    /// The status the client got (or will get after a delay); `None` while
    /// in flight, for a hung request, or when the connection was dropped.
    pub answered_status: Option<u16>,
    /// When its handling started.
    pub received_at: std::time::Instant,
}

impl LoggedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body decoded as `application/x-www-form-urlencoded` pairs (empty
    /// if it is not a form).
    pub fn form(&self) -> Vec<(String, String)> {
        serde_urlencoded::from_bytes(&self.body).unwrap_or_default()
    }

    /// The first value of form field `name`.
    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Whether this is `method` on exactly `path`.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method.eq_ignore_ascii_case(method) && self.path == path
    }
}

#[derive(Default)]
struct State {
    faults: Mutex<VecDeque<(Match, Fault)>>,
    log: Mutex<Vec<LoggedRequest>>,
    down: AtomicBool,
    idempotency: AtomicBool,
    api_key: Mutex<Option<String>>,
    saved: Mutex<HashMap<String, Saved>>,
}

/// What Stripe remembers of a request made with an idempotency key.
#[derive(Clone)]
enum Saved {
    /// Still executing, with the body it was made with.
    Executing(Bytes),
    /// Done: the body and the result to replay.
    Done(Bytes, u16, Vec<(String, String)>, Bytes),
}

impl State {
    fn faults(&self) -> MutexGuard<'_, VecDeque<(Match, Fault)>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log(&self) -> MutexGuard<'_, Vec<LoggedRequest>> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn saved(&self) -> MutexGuard<'_, HashMap<String, Saved>> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_fault(&self, method: &Method, path: &str) -> Option<Fault> {
        let mut faults = self.faults();
        let at = faults.iter().position(|(m, _)| m.matches(method, path))?;
        faults.remove(at).map(|(_, fault)| fault)
    }

    fn settle(&self, index: usize, forwarded: bool, status: Option<u16>) {
        if let Some(entry) = self.log().get_mut(index) {
            entry.forwarded = forwarded;
            entry.answered_status = status;
        }
    }
}

/// A running proxy; stops (dropping every open connection) on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    server: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port in front of `upstream` (a
    /// base URL such as `http://127.0.0.1:41234`, no trailing path). Must be
    /// called inside a tokio runtime; the proxy runs on it.
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let upstream = upstream.trim_end_matches('/').to_owned();
        if !upstream.starts_with("http://") && !upstream.starts_with("https://") {
            bail!("upstream must be an http(s) base URL, got {upstream:?}");
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fault proxy")?;
        let addr = listener.local_addr()?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the proxy's HTTP client")?;
        let state = Arc::new(State::default());
        let server = tokio::spawn(serve(
            listener,
            Arc::new(Upstream {
                base: upstream,
                client,
            }),
            Arc::clone(&state),
        ));
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    /// The base URL to hand to a connector as its `api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Honour `Idempotency-Key` on POSTs as Stripe does (see the module docs).
    pub fn emulate_stripe_idempotency(&self) {
        self.state.idempotency.store(true, Ordering::SeqCst);
    }

    /// Refuse requests whose bearer token is not `key`, as Stripe does
    /// (401 `invalid_request_error`, "Invalid API Key provided"):
    /// localstripe accepts any key.
    pub fn require_api_key(&self, key: &str) {
        *self.state.api_key.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.to_owned());
    }

    /// Queues `fault` for the next request that `matcher` matches. Faults
    /// are tried in the order queued; each applies to one request.
    pub fn push(&self, matcher: Match, fault: Fault) {
        self.state.faults().push_back((matcher, fault));
    }

    /// Queues `fault` for the next request, whatever it is.
    pub fn push_any(&self, fault: Fault) {
        self.push(Match::any(), fault);
    }

    /// How many queued faults have not been used yet.
    pub fn pending_faults(&self) -> usize {
        self.state.faults().len()
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.state.faults().clear();
    }

    /// While down, new connections are closed as soon as they are accepted
    /// and a request on an open connection gets the connection closed
    /// instead of an answer: to a client, the peer is unreachable.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.state.log().clone()
    }

    /// The logged requests that are `method` on exactly `path`.
    pub fn requests_to(&self, method: &str, path: &str) -> Vec<LoggedRequest> {
        self.state
            .log()
            .iter()
            .filter(|r| r.is(method, path))
            .cloned()
            .collect()
    }

    /// Forgets the requests logged so far.
    pub fn clear_requests(&self) {
        self.state.log().clear();
    }

    /// Waits until `done` holds for the request log, polling every 10 ms;
    /// fails after `timeout` with the log in the message.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[LoggedRequest]) -> bool,
    ) -> anyhow::Result<Vec<LoggedRequest>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let log = self.requests();
            if done(&log) {
                return Ok(log);
            }
            if tokio::time::Instant::now() >= deadline {
                let seen: Vec<String> = log
                    .iter()
                    .map(|r| format!("{} {} -> {:?}", r.method, r.path, r.answered_status))
                    .collect();
                bail!("condition not met within {timeout:?}; requests: {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The connections live in the server task's JoinSet: aborting the
        // task drops the set, which aborts them too.
        self.server.abort();
    }
}

struct Upstream {
    base: String,
    client: reqwest::Client,
}

async fn serve(listener: TcpListener, upstream: Arc<Upstream>, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if state.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let upstream = Arc::clone(&upstream);
                let state = Arc::clone(&state);
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, Arc::clone(&upstream), Arc::clone(&state))
                    });
                    // An error here is a client that went away or a request
                    // dropped on purpose while down: nothing to report.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            // Reap finished connections so the set does not grow forever.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The error that makes hyper close the connection without an answer.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by the fault proxy")
    }
}

impl std::error::Error for Dropped {}

async fn handle(
    req: Request<Incoming>,
    upstream: Arc<Upstream>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Err(Dropped),
    };
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().map(str::to_owned);
    let index = {
        let mut log = state.log();
        log.push(LoggedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
            forwarded: false,
            held: false,
            answered_status: None,
            received_at: std::time::Instant::now(),
        });
        log.len() - 1
    };
    if state.down.load(Ordering::SeqCst) {
        return Err(Dropped);
    }
    let required = state
        .api_key
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(key) = required {
        let given = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            state.settle(index, false, Some(401));
            let body = br#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}"#;
            return Ok(made_up(
                401,
                &[("content-type".into(), "application/json".into())],
                body.to_vec(),
            ));
        }
    }
    let idempotency_key = (state.idempotency.load(Ordering::SeqCst)
        && parts.method == Method::POST)
        .then(|| parts.headers.get("idempotency-key"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &idempotency_key {
        let saved = state.saved().get(key).cloned();
        match saved {
            Some(Saved::Done(first, status, headers, saved_body)) if first == body => {
                state.settle(index, false, Some(status));
                let mut headers = headers;
                headers.push(("idempotent-replayed".into(), "true".into()));
                return Ok(made_up(status, &headers, saved_body.to_vec()));
            }
            Some(Saved::Executing(first)) if first == body => {
                state.settle(index, false, Some(409));
                return Ok(stripe_idempotency_error(
                    409,
                    "There is currently another in-progress request using this Idempotent Key.",
                ));
            }
            Some(_) => {
                state.settle(index, false, Some(400));
                return Ok(stripe_idempotency_error(400, "Keys for idempotent requests can only be used with the same parameters they were first used with."));
            }
            None => {}
        }
    }
    let fault = state.take_fault(&parts.method, &path);
    let delay = match fault {
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => {
            state.settle(index, false, Some(status));
            return Ok(made_up(status, &headers, body));
        }
        Some(Fault::RespondSaved {
            status,
            headers,
            body: answer,
        }) => {
            if let Some(key) = &idempotency_key {
                let saved = Saved::Done(body, status, headers.clone(), Bytes::from(answer.clone()));
                state.saved().insert(key.clone(), saved);
            }
            state.settle(index, false, Some(status));
            return Ok(made_up(status, &headers, answer));
        }
        Some(Fault::Hang) => std::future::pending().await,
        Some(Fault::ForwardThenDelay(delay)) => {
            if let Some(entry) = state.log().get_mut(index) {
                entry.held = true;
            }
            Some(delay)
        }
        None => None,
    };
    // Stripe runs a request to its end even when its client goes away (a
    // ferry killed mid-request, in the crash tests). Were this future
    // dropped with the client's connection, the key would stay
    // "executing" and every retry would get a 409 for good; a task of its
    // own runs the request to its end and saves the result.
    let resp = tokio::spawn(execute(
        upstream,
        state,
        parts,
        query,
        body,
        index,
        idempotency_key,
    ))
    .await
    .unwrap_or_else(|_| made_up(502, &[], b"fault proxy: the request's task failed".to_vec()));
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    Ok(resp)
}

/// Forwards one request upstream and, with an idempotency key, saves its
/// result (or forgets the key if it never reached the upstream).
async fn execute(
    upstream: Arc<Upstream>,
    state: Arc<State>,
    parts: http::request::Parts,
    query: Option<String>,
    body: Bytes,
    index: usize,
    idempotency_key: Option<String>,
) -> Response<Full<Bytes>> {
    if let Some(key) = &idempotency_key {
        state
            .saved()
            .insert(key.clone(), Saved::Executing(body.clone()));
    }
    match forward(&upstream, &parts, query.as_deref(), body.clone()).await {
        Ok(resp) => {
            state.settle(index, true, Some(resp.status().as_u16()));
            if let Some(key) = &idempotency_key {
                let headers = resp
                    .headers()
                    .iter()
                    .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                    .collect();
                let saved_body = resp.body().clone();
                let saved_body = saved_body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                state.saved().insert(
                    key.clone(),
                    Saved::Done(body, resp.status().as_u16(), headers, saved_body),
                );
            }
            resp
        }
        Err(err) => {
            // Never executed: Stripe saves no result.
            if let Some(key) = &idempotency_key {
                state.saved().remove(key);
            }
            state.settle(index, false, Some(502));
            made_up(502, &[], format!("fault proxy: {err:#}").into_bytes())
        }
    }
}

fn stripe_idempotency_error(status: u16, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": {"type": "idempotency_error", "message": message}});
    made_up(
        status,
        &[("content-type".into(), "application/json".into())],
        body.to_string().into_bytes(),
    )
}

fn made_up(status: u16, headers: &[(String, String)], body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(name, value);
        }
    }
    resp
}

/// Headers that describe one hop, not the message (RFC 9110 section 7.6.1),
/// plus those the HTTP libraries recompute for the new hop.
fn end_to_end(headers: &HeaderMap) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
    const HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ];
    headers
        .iter()
        .filter(|(name, _)| !HOP.contains(&name.as_str()))
}

async fn forward(
    upstream: &Upstream,
    parts: &http::request::Parts,
    query: Option<&str>,
    body: Bytes,
) -> anyhow::Result<Response<Full<Bytes>>> {
    let mut url = format!("{}{}", upstream.base, parts.uri.path());
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    let mut req = upstream
        .client
        .request(parts.method.clone(), url)
        .body(body);
    for (name, value) in end_to_end(&parts.headers) {
        req = req.header(name, value);
    }
    let answer = req.send().await.context("forwarding upstream")?;
    let status = answer.status();
    let headers = answer.headers().clone();
    let body = answer.bytes().await.context("reading the upstream body")?;
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    for (name, value) in end_to_end(&headers) {
        resp.headers_mut().append(name.clone(), value.clone());
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::FaultProxy;

    /// An upstream that takes `delay` to answer every request with a
    /// customer; returns its base URL.
    async fn slow_upstream(delay: Duration) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let _ = socket.read(&mut buf).await;
                    tokio::time::sleep(delay).await;
                    let body = r#"{"id":"cus_slow","object":"customer"}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    /// Stripe runs a request to its end when its client hangs up: a retry
    /// with the same key afterwards gets the saved result, not a 409 for
    /// a request that would otherwise stay "in progress" forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_client_hung_up_still_saves_its_result() {
        let upstream = slow_upstream(Duration::from_millis(600)).await;
        let proxy = FaultProxy::start(&upstream).await.expect("proxy");
        proxy.emulate_stripe_idempotency();
        let post = |timeout: Duration| {
            reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .unwrap()
                .post(format!("{}/v1/customers", proxy.url()))
                .header("idempotency-key", "k-hung-up")
                .body("email=a%40example.com")
                .send()
        };
        assert!(
            post(Duration::from_millis(100)).await.is_err(),
            "the first client hangs up"
        );
        tokio::time::sleep(Duration::from_millis(900)).await;
        let retry = post(Duration::from_secs(5)).await.expect("answered");
        assert_eq!(retry.status(), 200);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
    }
}
