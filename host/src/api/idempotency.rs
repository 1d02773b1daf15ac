//! `Idempotency-Key` handling for API writes, with Stripe's semantics: the
//! first response to a key is stored and replayed for the same request; the
//! same key with a different request is refused; a key whose request is
//! still running is refused with 409 until it finishes.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::Principal;
use crate::app::AppState;
use crate::store::{ClaimOutcome, IdempotencyRecord, Store, StoredResponse};

/// How long an unfinished claim blocks other requests with the same key
/// before it is presumed abandoned by a crashed process. No request runs this
/// long: writes are single transactions bounded by the store timeouts.
pub const LEASE_MS: i64 = 60_000;

/// Header set on replayed responses.
pub const REPLAYED: &str = "idempotent-replayed";

/// The fingerprint of a request: sha256 over method, path and body.
pub fn fingerprint(method: &Method, path: &str, body: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b"\n");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hex::encode(hash.finalize())
}

/// What to do with a write request.
enum Begin {
    /// Run it; complete this record (if any) in the write's transaction.
    Run(Option<IdempotencyRecord>),
    /// Answer this stored response.
    Replay(Response),
}

/// Runs one write under its idempotency key: answers a stored response for
/// a replay, otherwise runs `write` with the claimed record (which the write
/// completes in its own transaction) and releases the key if it fails.
pub async fn run<Fut>(
    state: &AppState,
    principal: Principal,
    key: Option<String>,
    method: &Method,
    path: &str,
    body: &[u8],
    write: impl FnOnce(Option<IdempotencyRecord>) -> Fut,
) -> Result<Response, ApiError>
where
    Fut: std::future::Future<Output = Result<StoredResponse, ApiError>>,
{
    let record = key.map(|key| IdempotencyRecord {
        scope: principal.scope().to_owned(),
        key,
        fingerprint: fingerprint(method, path, body),
        claim: uuid::Uuid::new_v4().simple().to_string(),
    });
    // A client that goes away cancels this future, possibly while the claim
    // or the write is still queued for the database: the guard then
    // releases this request's claim (if it landed), so the retry is not
    // refused for the whole lease.
    let mut guard = ReleaseOnCancel(record.clone().map(|r| (state.store.clone(), r)));
    let claim = record.clone();
    let record = match begin(state, record).await {
        Ok(Begin::Run(record)) => record,
        Ok(Begin::Replay(response)) => {
            guard.0 = None;
            return Ok(response);
        }
        Err(error @ (ApiError::IdempotencyKeyInFlight | ApiError::IdempotencyKeyReused)) => {
            guard.0 = None;
            return Err(error);
        }
        // The claim failed, or only its answer was lost and the key is
        // ours: release it, so the client's retry is not refused for the
        // whole lease (releasing deletes only this request's claim).
        // (The guard stays armed until the release has run: a client that
        // goes away meanwhile still has it released.)
        Err(error) => {
            let answer = finish(state, claim, Err(error)).await;
            guard.0 = None;
            return answer;
        }
    };
    let result = write(record.clone()).await;
    let answer = finish(state, record, result).await;
    guard.0 = None;
    answer
}

/// Releases a claimed key if the request is cancelled before its write
/// finished. Releasing only deletes a claim still `in_flight`: if the write
/// committed after all (its transaction marks the key done), the delete
/// waits for it and then finds nothing to do.
struct ReleaseOnCancel(Option<(Store, IdempotencyRecord)>);

impl Drop for ReleaseOnCancel {
    fn drop(&mut self) {
        let Some((store, record)) = self.0.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if store.release_idempotency_key(&record).await.is_ok() {
                tracing::info!(
                    idempotency_key = %record.key,
                    "request cancelled by the client; its idempotency key is released"
                );
                // The claim's own statement, dropped with the request, may
                // still be on its way (PostgreSQL finishes it when the
                // connection goes back to the pool) and land after this
                // release: release once more behind it.
                tokio::time::sleep(RELEASE_RETRY_EVERY).await;
            }
            release_until_the_lease_ends(&store, &record).await;
        });
    }
}

/// The first wait before a release that failed is tried again.
const RELEASE_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Releases `record`'s claim, trying again while it could still block the
/// client's retry (its lease; after that a retry takes it over): a release
/// fails when the store is busy or unreachable, the very moments a request
/// fails, and the client would otherwise get 409 for the rest of the
/// lease. The waits double from a second, so a store that is struggling
/// gets a handful of deletes per failed request, not one a second.
/// Releasing deletes only this claim, and only while it is `in_flight`, so
/// trying again is harmless.
async fn release_until_the_lease_ends(store: &Store, record: &IdempotencyRecord) {
    let lease = std::time::Duration::from_millis(LEASE_MS.unsigned_abs());
    let deadline = tokio::time::Instant::now() + lease;
    let mut wait = RELEASE_RETRY_EVERY;
    loop {
        match store.release_idempotency_key(record).await {
            Ok(()) => return,
            Err(error) if tokio::time::Instant::now() + wait >= deadline => {
                tracing::warn!(
                    idempotency_key = %record.key,
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "could not release an idempotency key; a retry takes it over after its lease"
                );
                return;
            }
            Err(_) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
        }
    }
}

/// Claims the key of a write request, if it has one.
async fn begin(state: &AppState, record: Option<IdempotencyRecord>) -> Result<Begin, ApiError> {
    let Some(record) = record else {
        return Ok(Begin::Run(None));
    };
    let ttl_ms = i64::try_from(state.settings.idempotency_ttl.as_millis()).unwrap_or(i64::MAX / 2);
    match state
        .store
        .claim_idempotency_key(&record, ttl_ms, LEASE_MS)
        .await?
    {
        ClaimOutcome::Claimed => Ok(Begin::Run(Some(record))),
        ClaimOutcome::InFlight => Err(ApiError::IdempotencyKeyInFlight),
        ClaimOutcome::Mismatch => Err(ApiError::IdempotencyKeyReused),
        ClaimOutcome::Done(stored) => {
            tracing::info!(idempotency_key = %record.key, "replaying stored response");
            Ok(Begin::Replay(into_response(stored, true)))
        }
    }
}

/// Finishes a write: on success the response (already stored with the
/// write) is sent; on failure the claim is released so the client may retry.
async fn finish(
    state: &AppState,
    record: Option<IdempotencyRecord>,
    result: Result<StoredResponse, ApiError>,
) -> Result<Response, ApiError> {
    match result {
        Ok(stored) => Ok(into_response(stored, false)),
        Err(error) => {
            if let Some(record) = record {
                if let Err(release) = state.store.release_idempotency_key(&record).await {
                    tracing::warn!(
                        idempotency_key = %record.key,
                        error = format!("{:#}", anyhow::Error::from(release)),
                        "could not release an idempotency key; trying again in the background"
                    );
                    let store = state.store.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RELEASE_RETRY_EVERY).await;
                        release_until_the_lease_ends(&store, &record).await;
                    });
                }
            }
            Err(error)
        }
    }
}

/// Builds the HTTP response from a stored one.
pub fn into_response(stored: StoredResponse, replayed: bool) -> Response {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() =
        StatusCode::from_u16(stored.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    if replayed {
        headers.insert(REPLAYED, HeaderValue::from_static("true"));
    }
    response
}
