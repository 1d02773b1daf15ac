//! A fast in-process fake of Stripe's customer API for throughput
//! benchmarks, where localstripe (one Python process) would be the
//! bottleneck: create, update, retrieve and delete customers the way the
//! Stripe connector calls them, with `Idempotency-Key` replay, request
//! counters, and the arrival time of each create keyed by the
//! `metadata[ferry_id]` the connector sends (to measure end-to-end latency).
//!
//! It injects no faults: use [`crate::fault_proxy`] in front of localstripe
//! for that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How many requests of each kind the fake has answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// `POST /v1/customers` that created a customer (replays excluded).
    pub creates: u64,
    /// `POST /v1/customers/{id}` that updated one (replays excluded).
    pub updates: u64,
    /// `DELETE /v1/customers/{id}`.
    pub deletes: u64,
    /// `GET /v1/customers/{id}`.
    pub retrieves: u64,
    /// POSTs answered from the idempotency cache.
    pub replays: u64,
}

#[derive(Default)]
struct Counters {
    creates: AtomicU64,
    updates: AtomicU64,
    deletes: AtomicU64,
    retrieves: AtomicU64,
    replays: AtomicU64,
}

#[derive(Default)]
struct Data {
    /// By id; ids sort in creation order, as `list` pages them.
    customers: BTreeMap<String, Value>,
    deleted: HashSet<String>,
    /// Idempotency key -> the first answer (status, JSON body).
    replies: HashMap<String, (StatusCode, Value)>,
    created_at: HashMap<String, Instant>,
}

struct Shared {
    data: Mutex<Data>,
    counters: Counters,
    next_id: AtomicU64,
    creates_seen: watch::Sender<u64>,
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake; stops listening on drop.
pub struct FakeStripe {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeStripe {
    /// Starts the fake on a free 127.0.0.1 port, on the current tokio
    /// runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake Stripe")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            data: Mutex::new(Data::default()),
            counters: Counters::default(),
            next_id: AtomicU64::new(1),
            creates_seen: watch::channel(0).0,
        });
        let app = Router::new()
            .route("/v1/customers", post(create).get(list))
            .route(
                "/v1/customers/{id}",
                post(update).get(retrieve).delete(delete),
            )
            .route("/health", get(|| async { "ok" }))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            // Only fails if the listener breaks; the benchmark then sees
            // connection errors, which say more than a log line here would.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// The base URL to hand to the Stripe connector as `api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request counters so far.
    pub fn counts(&self) -> Counts {
        let c = &self.shared.counters;
        Counts {
            creates: c.creates.load(Ordering::SeqCst),
            updates: c.updates.load(Ordering::SeqCst),
            deletes: c.deletes.load(Ordering::SeqCst),
            retrieves: c.retrieves.load(Ordering::SeqCst),
            replays: c.replays.load(Ordering::SeqCst),
        }
    }

    /// Waits until at least `n` customers were created; fails after
    /// `timeout` saying how many arrived.
    pub async fn wait_for_creates(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut seen = self.shared.creates_seen.subscribe();
        let reached = tokio::time::timeout(timeout, async {
            seen.wait_for(|count| *count >= n).await.map(|_| ())
        })
        .await;
        match reached {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => bail!("the fake Stripe stopped"),
            Err(_) => bail!(
                "only {} of {n} creates arrived within {timeout:?}",
                self.counts().creates
            ),
        }
    }

    /// When the create carrying `metadata[ferry_id]=ferry_id` first arrived.
    pub fn created_at(&self, ferry_id: &str) -> Option<Instant> {
        self.shared.data().created_at.get(ferry_id).copied()
    }

    /// Arrival time of every create, keyed by its `metadata[ferry_id]`.
    pub fn create_times(&self) -> HashMap<String, Instant> {
        self.shared.data().created_at.clone()
    }

    /// The stored customer `id` as the API would return it.
    pub fn customer(&self, id: &str) -> Option<Value> {
        self.shared.data().customers.get(id).cloned()
    }

    /// Creates `n` customers directly, as if they existed before ferry
    /// was connected: `email_of(i)` gives the i-th one's email.
    pub fn preload(&self, n: usize, email_of: impl Fn(usize) -> String) {
        let mut data = self.shared.data();
        for i in 0..n {
            let id = format!(
                "cus_fake{:010}",
                self.shared.next_id.fetch_add(1, Ordering::SeqCst)
            );
            let customer = json!({
                "id": id, "object": "customer", "created": 1_700_000_000, "livemode": false,
                "name": format!("Preloaded {i}"), "email": email_of(i), "phone": null,
                "address": null, "metadata": {},
            });
            data.customers.insert(id, customer);
        }
    }

    /// How many customers exist (not deleted).
    pub fn customer_count(&self) -> usize {
        self.shared.data().customers.len()
    }

    /// Drops every record and remembered answer, keeping the counters: a
    /// soak benchmark calls it so that the fake's growth does not hide
    /// ferry's in the process's resident size (freed memory is reused, so
    /// the size levels off if ferry's does).
    pub fn forget(&self) {
        *self.shared.data() = Data::default();
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn stripe_error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "error": { "type": "invalid_request_error", "message": message } });
    (status, axum::Json(body)).into_response()
}

fn missing(id: &str) -> Response {
    let body = json!({ "error": {
        "type": "invalid_request_error",
        "code": "resource_missing",
        "message": format!("No such customer: '{id}'"),
    }});
    (StatusCode::NOT_FOUND, axum::Json(body)).into_response()
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn replay(shared: &Shared, key: Option<&str>) -> Option<Response> {
    let (status, body) = shared.data().replies.get(key?)?.clone();
    shared.counters.replays.fetch_add(1, Ordering::SeqCst);
    let mut resp = (status, axum::Json(body)).into_response();
    resp.headers_mut().insert(
        "idempotent-replayed",
        http::HeaderValue::from_static("true"),
    );
    Some(resp)
}

fn bad_form(err: serde_urlencoded::de::Error) -> Response {
    stripe_error(StatusCode::BAD_REQUEST, &format!("bad form body: {err}"))
}

/// Applies form pairs the way Stripe does: an empty value unsets the field
/// (an empty `address` unsets the whole address, an empty metadata value
/// removes the key); metadata is merged, never replaced.
fn apply(customer: &mut Map<String, Value>, form: &[(String, String)]) {
    let text = |v: &str| {
        if v.is_empty() {
            Value::Null
        } else {
            Value::String(v.to_owned())
        }
    };
    for (key, value) in form {
        if let Some(field) = key
            .strip_prefix("address[")
            .and_then(|k| k.strip_suffix(']'))
        {
            let address = customer.entry("address").or_insert(Value::Null).take();
            let mut address = match address {
                Value::Object(map) => map,
                _ => ["line1", "line2", "city", "state", "postal_code", "country"]
                    .into_iter()
                    .map(|k| (k.to_owned(), Value::Null))
                    .collect(),
            };
            address.insert(field.to_owned(), text(value));
            customer.insert("address".to_owned(), Value::Object(address));
        } else if let Some(meta) = key
            .strip_prefix("metadata[")
            .and_then(|k| k.strip_suffix(']'))
        {
            let entry = customer
                .entry("metadata")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(metadata) = entry {
                if value.is_empty() {
                    metadata.remove(meta);
                } else {
                    metadata.insert(meta.to_owned(), Value::String(value.clone()));
                }
            }
        } else {
            customer.insert(key.clone(), text(value));
        }
    }
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = Instant::now();
    let key = idempotency_key(&headers);
    if let Some(resp) = replay(&shared, key.as_deref()) {
        return resp;
    }
    let form: Vec<(String, String)> = match serde_urlencoded::from_bytes(&body) {
        Ok(form) => form,
        Err(err) => return bad_form(err),
    };
    let id = format!(
        "cus_fake{:010}",
        shared.next_id.fetch_add(1, Ordering::SeqCst)
    );
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut customer: Map<String, Value> = json!({
        "id": id, "object": "customer", "created": created, "livemode": false,
        "name": null, "email": null, "phone": null, "address": null, "metadata": {},
    })
    .as_object()
    .cloned()
    .unwrap_or_default();
    apply(&mut customer, &form);
    let customer = Value::Object(customer);
    let ferry_id = form
        .iter()
        .find(|(k, _)| k == "metadata[ferry_id]")
        .map(|(_, v)| v.clone());
    {
        let mut data = shared.data();
        // A concurrent request with the same key may have won the race.
        if let Some((status, body)) = key.as_ref().and_then(|k| data.replies.get(k)).cloned() {
            drop(data);
            shared.counters.replays.fetch_add(1, Ordering::SeqCst);
            return (status, axum::Json(body)).into_response();
        }
        data.customers.insert(id, customer.clone());
        if let Some(key) = key {
            data.replies.insert(key, (StatusCode::OK, customer.clone()));
        }
        if let Some(ferry_id) = ferry_id {
            data.created_at.entry(ferry_id).or_insert(arrived);
        }
    }
    shared.counters.creates.fetch_add(1, Ordering::SeqCst);
    shared.creates_seen.send_modify(|n| *n += 1);
    axum::Json(customer).into_response()
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = idempotency_key(&headers);
    if let Some(resp) = replay(&shared, key.as_deref()) {
        return resp;
    }
    let form: Vec<(String, String)> = match serde_urlencoded::from_bytes(&body) {
        Ok(form) => form,
        Err(err) => return bad_form(err),
    };
    let mut data = shared.data();
    let Some(Value::Object(customer)) = data.customers.get_mut(&id) else {
        return missing(&id);
    };
    apply(customer, &form);
    let customer = Value::Object(customer.clone());
    if let Some(key) = key {
        data.replies.insert(key, (StatusCode::OK, customer.clone()));
    }
    drop(data);
    shared.counters.updates.fetch_add(1, Ordering::SeqCst);
    axum::Json(customer).into_response()
}

/// `GET /v1/customers?limit=&starting_after=`: a page in id order, with
/// `has_more`, as the Stripe connector pages through it.
async fn list(
    State(shared): State<Arc<Shared>>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let data = shared.data();
    let after = query.get("starting_after").cloned();
    let range = match &after {
        Some(after) => data
            .customers
            .range::<String, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
        None => data.customers.range::<String, _>(..),
    };
    let mut page: Vec<Value> = range.take(limit + 1).map(|(_, c)| c.clone()).collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    axum::Json(
        json!({"object": "list", "url": "/v1/customers", "has_more": has_more, "data": page}),
    )
    .into_response()
}

async fn retrieve(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    shared.counters.retrieves.fetch_add(1, Ordering::SeqCst);
    let data = shared.data();
    if let Some(customer) = data.customers.get(&id) {
        return axum::Json(customer.clone()).into_response();
    }
    // Stripe answers a retrieve of a deleted customer with a stub, not 404.
    if data.deleted.contains(&id) {
        return axum::Json(json!({ "id": id, "object": "customer", "deleted": true }))
            .into_response();
    }
    missing(&id)
}

async fn delete(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let mut data = shared.data();
    if data.customers.remove(&id).is_none() {
        return missing(&id);
    }
    data.deleted.insert(id.clone());
    drop(data);
    shared.counters.deletes.fetch_add(1, Ordering::SeqCst);
    axum::Json(json!({ "id": id, "object": "customer", "deleted": true })).into_response()
}
