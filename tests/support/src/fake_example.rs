//! A fake of the Example CRM API, the public-style REST API that the
//! connector `ferry connector new` scaffolds is written against (its
//! README documents the API; `sdk/template/README.md` in this repository).
//! The scaffold walk test pushes to it, and the record-and-replay test
//! records a session against it.
//!
//! What it models, as documented:
//! - `Authorization: Bearer <api key>` on every call (401 otherwise);
//! - `POST /v1/contacts` (201), honouring `Idempotency-Key` (the first
//!   answer is replayed), `GET`, `PATCH` and `DELETE /v1/contacts/{id}`
//!   (404 `not_found` for an unknown or deleted id);
//! - `GET /v1/contacts?limit=N&starting_after=ID`, oldest first, with
//!   `has_more`;
//! - errors as `{"error": {"code", "message"}}`: 400 `invalid_request` for a
//!   body that is not a JSON object, 422 `invalid_email` for an email
//!   without `@`.
//!
//! Contacts carry `id` (`ct_…`), `name`, `email`, `phone`, `external_id`
//! and `updated_at` (unix seconds).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct ExampleRequest {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query.
    pub path: String,
    /// `Authorization`, if sent.
    pub authorization: Option<String>,
    /// `Idempotency-Key`, if sent.
    pub idempotency_key: Option<String>,
    /// The body as JSON (`Null` if none or not JSON).
    pub body: Value,
}

#[derive(Default)]
struct Data {
    /// Live contacts by id, in creation order of their ids.
    contacts: BTreeMap<String, Value>,
    /// Idempotency key -> the first create's answer.
    replies: HashMap<String, Value>,
    log: Vec<ExampleRequest>,
}

struct Shared {
    api_key: String,
    data: Mutex<Data>,
    next_id: AtomicU64,
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake; stops listening on drop.
pub struct FakeExampleCrm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl FakeExampleCrm {
    /// Starts the fake on a free 127.0.0.1 port, accepting `api_key`.
    pub async fn start(api_key: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the fake Example CRM")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            data: Mutex::new(Data::default()),
            next_id: AtomicU64::new(1),
        });
        let app = Router::new()
            .route("/v1/contacts", get(list).post(create))
            .route(
                "/v1/contacts/{id}",
                get(retrieve).patch(update).delete(remove),
            )
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&shared),
                authenticate,
            ))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            shared,
            server,
        })
    }

    /// The base URL to give the connector as `api_base`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<ExampleRequest> {
        self.shared.data().log.clone()
    }

    /// The live contacts.
    pub fn contacts(&self) -> Vec<Value> {
        self.shared.data().contacts.values().cloned().collect()
    }

    /// Creates a contact directly, as a person in the CRM's own UI would.
    pub fn insert(&self, name: &str, email: &str) -> Value {
        let contact = self
            .shared
            .new_contact(&json!({"name": name, "email": email}));
        self.shared.data().contacts.insert(
            contact["id"].as_str().unwrap_or_default().to_owned(),
            contact.clone(),
        );
        contact
    }
}

impl Drop for FakeExampleCrm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Shared {
    fn new_contact(&self, body: &Value) -> Value {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut contact = json!({
            "id": format!("ct_{n:06}"),
            "name": null, "email": null, "phone": null, "external_id": null,
            "updated_at": now_secs(),
        });
        merge(&mut contact, body);
        contact
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Copies the writable fields of `body` onto `contact`.
fn merge(contact: &mut Value, body: &Value) {
    for field in ["name", "email", "phone", "external_id"] {
        if let Some(value) = body.get(field) {
            contact[field] = value.clone();
        }
    }
    contact["updated_at"] = json!(now_secs());
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Logs the request and checks the bearer token.
async fn authenticate(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header("authorization");
    shared.data().log.push(ExampleRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        authorization: authorization.clone(),
        idempotency_key: header("idempotency-key"),
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    });
    if authorization.as_deref() != Some(&format!("Bearer {}", shared.api_key)) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
        );
    }
    next.run(axum::extract::Request::from_parts(parts, bytes.into()))
        .await
}

/// A documented refusal: status, code, message.
type Refusal = (StatusCode, &'static str, &'static str);

/// The request body as a JSON object, or the documented 400/422.
fn contact_body(bytes: &Bytes) -> Result<Value, Refusal> {
    const NOT_AN_OBJECT: Refusal = (
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the body must be a JSON object",
    );
    let body: Value = serde_json::from_slice(bytes).map_err(|_| NOT_AN_OBJECT)?;
    if !body.is_object() {
        return Err(NOT_AN_OBJECT);
    }
    if let Some(email) = body.get("email").and_then(Value::as_str) {
        if !email.contains('@') {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_email",
                "email must contain @",
            ));
        }
    }
    Ok(body)
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, bytes: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(reply) = key
        .as_ref()
        .and_then(|k| shared.data().replies.get(k).cloned())
    {
        return (StatusCode::CREATED, Json(reply)).into_response();
    }
    let body = match contact_body(&bytes) {
        Ok(body) => body,
        Err((status, code, message)) => return error(status, code, message),
    };
    let contact = shared.new_contact(&body);
    let mut data = shared.data();
    data.contacts.insert(
        contact["id"].as_str().unwrap_or_default().to_owned(),
        contact.clone(),
    );
    if let Some(key) = key {
        data.replies.insert(key, contact.clone());
    }
    (StatusCode::CREATED, Json(contact)).into_response()
}

async fn retrieve(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.data().contacts.get(&id) {
        Some(contact) => Json(contact.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such contact"),
    }
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let body = match contact_body(&bytes) {
        Ok(body) => body,
        Err((status, code, message)) => return error(status, code, message),
    };
    let mut data = shared.data();
    match data.contacts.get_mut(&id) {
        Some(contact) => {
            merge(contact, &body);
            Json(contact.clone()).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "not_found", "no such contact"),
    }
}

async fn remove(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.data().contacts.remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => error(StatusCode::NOT_FOUND, "not_found", "no such contact"),
    }
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(10)
        .clamp(1, 100);
    let data = shared.data();
    let after = query.get("starting_after");
    let mut page: Vec<Value> = data
        .contacts
        .iter()
        .filter(|(id, _)| after.is_none_or(|a| id.as_str() > a.as_str()))
        .map(|(_, c)| c.clone())
        .take(limit + 1)
        .collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    Json(json!({"data": page, "has_more": has_more})).into_response()
}
