//! The remote the recorder test connector (tests/guests/recorder) talks
//! to: an in-process fake that keeps what it is sent and logs every request.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::helpers::{recorder_component, ExtraConnector};

/// The recorder's `api_key`; the fake checks it arrives as a bearer token.
pub const RECORDER_KEY: &str = "rk_test_recorder_key";

/// How long any one step may take to settle.
pub const SETTLE: Duration = Duration::from_secs(20);

/// One request the fake recorder remote received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The JSON body (`Null` when there is none or it is not JSON).
    pub body: Value,
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
}

#[derive(Default)]
struct RemoteState {
    log: Mutex<Vec<Recorded>>,
    records: Mutex<BTreeMap<String, Value>>,
    next_id: AtomicU64,
    /// What a create's id starts with (`rec_` unless a test says).
    id_prefix: Mutex<Option<String>>,
    /// The one id every create answers, when a test says (a remote that
    /// hands out a record ferry has linked already).
    fixed_id: Mutex<Option<String>>,
    /// How long the next page of a listing after its first waits before
    /// its answer.
    later_page_delay: Mutex<Option<Duration>>,
    /// How long every write waits before its answer (a slow remote).
    write_delay: Mutex<Option<Duration>>,
    /// Records a listing leaves out (an API-side filter, a narrowed key).
    unlisted: Mutex<std::collections::BTreeSet<String>>,
    /// Writes being answered now, and the most at once since the last
    /// [`RecorderRemote::writes_at_once`].
    writing: AtomicU64,
    most_writing: AtomicU64,
    /// Whether a page after a listing's first names the cursor that asked
    /// for it as the next one (a broken remote).
    repeat_later_cursors: AtomicBool,
    /// Whether the listing's last page names, as the next one, the cursor
    /// the listing's second page was asked with (a broken remote whose
    /// cursors go round), and that cursor once asked for.
    loop_at_the_end: AtomicBool,
    second_page_cursor: Mutex<Option<String>>,
    /// Whether the last page, and every page after it, names a fresh
    /// cursor past the last record (a broken remote whose listing says
    /// "more" for ever, with nothing in it).
    endless_empty_pages: AtomicBool,
    empty_pages: AtomicU64,
    /// Whether a page after the first starts with the record its cursor
    /// names (an offset listing shifted by a record inserted ahead).
    repeat_the_cursors_record: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The remote the recorder connector talks to: `POST /records` creates,
/// `PUT`/`DELETE /records/{id}` update and delete (404 for an unknown id),
/// `GET /records?after=ID&limit=N` lists in id order.
pub struct RecorderRemote {
    pub url: String,
    state: Arc<RemoteState>,
    server: tokio::task::JoinHandle<()>,
}

impl RecorderRemote {
    pub async fn start() -> Self {
        let state = Arc::new(RemoteState::default());
        // One fallback handler: every request is logged, expected or not.
        let app = axum::Router::new()
            .fallback(record_request)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recorder remote");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("recorder remote");
        });
        Self { url, state, server }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.log).clone()
    }

    pub fn requests_to(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }

    /// Creates answer ids starting with `prefix` from now on (a remote, or
    /// a broken one, whose ids ferry cannot keep).
    pub fn answer_ids_with(&self, prefix: &str) {
        *lock(&self.state.id_prefix) = Some(prefix.to_owned());
    }

    /// Answers every create with `id`.
    pub fn answer_every_create_with(&self, id: &str) {
        *lock(&self.state.fixed_id) = Some(id.to_owned());
    }

    /// Keeps `record` as `id`, as if made at the remote by someone else.
    pub fn insert(&self, id: &str, record: Value) {
        lock(&self.state.records).insert(id.to_owned(), record);
    }

    /// Keeps `n` records `rec_000`, `rec_001`…, each with email
    /// `{email}-{i}@example.com` and name `{name} {i}`.
    pub fn insert_numbered(&self, n: usize, email: &str, name: &str) {
        for i in 0..n {
            self.insert(
                &format!("rec_{i:03}"),
                json!({"email": format!("{email}-{i}@example.com"), "name": format!("{name} {i}")}),
            );
        }
    }

    /// Answers every page after a listing's first with the cursor that
    /// asked for it as the next one.
    pub fn repeat_later_cursors(&self) {
        self.state
            .repeat_later_cursors
            .store(true, Ordering::SeqCst);
    }

    /// Answers the listing's last page with the cursor its second page was
    /// asked with, so the listing goes round (never the cursor that asked).
    pub fn loop_at_the_end(&self) {
        self.state.loop_at_the_end.store(true, Ordering::SeqCst);
    }

    /// Starts every page after the first with the record its cursor names,
    /// listed last on the page before: an offset listing that a record
    /// inserted ahead of it shifted by one.
    pub fn repeat_the_cursors_record(&self) {
        self.state
            .repeat_the_cursors_record
            .store(true, Ordering::SeqCst);
    }

    /// Answers the listing's last page, and every page after it, with a
    /// fresh cursor past the last record: empty pages that never end.
    pub fn endless_empty_pages(&self) {
        self.state.endless_empty_pages.store(true, Ordering::SeqCst);
    }

    /// Holds the next page asked for after a listing's first for `delay`.
    pub fn delay_next_later_page(&self, delay: Duration) {
        *lock(&self.state.later_page_delay) = Some(delay);
    }

    /// Holds every write (create, update, delete) for `delay` before it
    /// is applied and answered: a slow remote.
    pub fn delay_writes(&self, delay: Duration) {
        *lock(&self.state.write_delay) = Some(delay);
    }

    /// The most writes answered at once since the last call (a write waits
    /// for [`RecorderRemote::delay_writes`]'s delay), and starts counting
    /// again.
    pub fn writes_at_once(&self) -> u64 {
        self.state
            .most_writing
            .swap(self.state.writing.load(Ordering::SeqCst), Ordering::SeqCst)
    }

    /// Leaves record `id` out of every listing from now on; it stays,
    /// and is written as before.
    pub fn leave_out_of_listings(&self, id: &str) {
        lock(&self.state.unlisted).insert(id.to_owned());
    }

    pub fn record(&self, id: &str) -> Option<Value> {
        lock(&self.state.records).get(id).cloned()
    }

    /// The recorder's `connectors.recorder` entry, pointing at this fake.
    pub fn connector(&self) -> ExtraConnector {
        ExtraConnector {
            name: "recorder".to_owned(),
            component: recorder_component(),
            config: json!({
                "settings": {"api_base": self.url, "send_api_key": "true"},
                "secrets": {"api_key": RECORDER_KEY},
            }),
        }
    }

    /// Polls the log until `done` holds; fails with the log after `SETTLE`.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Recorded]) -> bool) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            let log = self.requests();
            if done(&log) {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the recorder remote never saw {what}: {log:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RecorderRemote {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record_request(
    State(state): State<Arc<RemoteState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = uri.path().to_owned();
    lock(&state.log).push(Recorded {
        method: method.to_string(),
        path: path.clone(),
        query: uri.query().map(str::to_owned),
        body: body.clone(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
    });
    if method == Method::GET && path == "/records" {
        return list(&state, uri.query().unwrap_or("")).await;
    }
    let write_delay = *lock(&state.write_delay);
    if let Some(delay) = write_delay {
        let now = state.writing.fetch_add(1, Ordering::SeqCst) + 1;
        state.most_writing.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(delay).await;
        state.writing.fetch_sub(1, Ordering::SeqCst);
    }
    let mut records = lock(&state.records);
    match (method, path.strip_prefix("/records")) {
        (Method::POST, Some("")) => {
            let prefix = lock(&state.id_prefix).clone();
            let prefix = prefix.as_deref().unwrap_or("rec_");
            let id = match lock(&state.fixed_id).clone() {
                Some(id) => id,
                None => format!(
                    "{prefix}{}",
                    state.next_id.fetch_add(1, Ordering::SeqCst) + 1
                ),
            };
            records.insert(id.clone(), body["record"].clone());
            (StatusCode::CREATED, Json(json!({ "id": id }))).into_response()
        }
        (Method::PUT, Some(rest)) => match records.get_mut(rest.trim_start_matches('/')) {
            Some(record) => {
                *record = body["record"].clone();
                Json(json!({ "id": rest.trim_start_matches('/') })).into_response()
            }
            None => StatusCode::NOT_FOUND.into_response(),
        },
        (Method::DELETE, Some(rest)) => match records.remove(rest.trim_start_matches('/')) {
            Some(_) => StatusCode::NO_CONTENT.into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

/// `GET /records?after=ID&limit=N`: the records after `ID`, in id order.
async fn list(state: &RemoteState, query: &str) -> Response {
    let params: BTreeMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let after = params.get("after").cloned();
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(100)
        .max(1);
    if after.is_some() {
        let delay = lock(&state.later_page_delay).take();
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }
    let unlisted = lock(&state.unlisted).clone();
    let records = lock(&state.records);
    let from = match &after {
        Some(after) if state.repeat_the_cursors_record.load(Ordering::SeqCst) => {
            std::ops::Bound::Included(after.clone())
        }
        Some(after) => std::ops::Bound::Excluded(after.clone()),
        None => std::ops::Bound::Unbounded,
    };
    let page: Vec<Value> = records
        .range((from, std::ops::Bound::Unbounded))
        .filter(|(id, _)| !unlisted.contains(*id))
        .take(limit + 1)
        .map(|(id, record)| json!({"id": id, "record": record}))
        .collect();
    if let Some(after) = &after {
        lock(&state.second_page_cursor).get_or_insert_with(|| after.clone());
    }
    let next = match &after {
        Some(after) if state.repeat_later_cursors.load(Ordering::SeqCst) => Some(json!(after)),
        Some(_) if page.len() <= limit && state.loop_at_the_end.load(Ordering::SeqCst) => {
            lock(&state.second_page_cursor).clone().map(|c| json!(c))
        }
        _ if page.len() <= limit && state.endless_empty_pages.load(Ordering::SeqCst) => {
            // Sorts after every `rec_` id: the page it asks for is empty.
            let n = state.empty_pages.fetch_add(1, Ordering::SeqCst);
            Some(json!(format!("zz_more_{n:09}")))
        }
        _ => (page.len() > limit).then(|| page[limit - 1]["id"].clone()),
    };
    let page: Vec<Value> = page.into_iter().take(limit).collect();
    Json(json!({"records": page, "next": next})).into_response()
}
