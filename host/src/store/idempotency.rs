//! Idempotency keys of API writes: claiming a key, replaying a finished
//! response, and expiring old keys.
//!
//! A key is claimed (state `in_flight`) in its own short transaction so that
//! concurrent requests see it; the write it guards completes it (state
//! `done`, with the response) inside the write's own transaction, so a
//! committed write always has its stored response. A request that fails
//! releases its claim; a claim left behind by a crashed process is taken over
//! once its lease expires.

use sqlx::types::Json;

use super::customers::Customer;
use super::{dispatch, now, Store, StoreError};

/// A response as recorded for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// The headers worth replaying (content type, location, etag).
    pub headers: Vec<(String, String)>,
    /// The exact body bytes.
    pub body: Vec<u8>,
}

/// Identifies one idempotency key.
#[derive(Debug, Clone)]
pub struct IdempotencyRecord {
    /// Whose key this is (keys of different principals never collide).
    pub scope: String,
    /// The client's `Idempotency-Key`.
    pub key: String,
    /// sha256 of method, path and body, hex.
    pub fingerprint: String,
    /// This request's claim, so that a release never frees another
    /// request's (a random id per request).
    pub claim: String,
}

/// How to complete a claimed key inside a write's transaction.
#[derive(Clone, Copy)]
pub struct IdempotencyCompletion<'a> {
    /// The key's scope.
    pub scope: &'a str,
    /// The key.
    pub key: &'a str,
    /// The claim of the request that runs the write: the key is completed
    /// only while that claim holds it, else the write is refused.
    pub claim: &'a str,
    /// Renders the response the write will answer, from the written record.
    pub render: &'a (dyn Fn(&Customer) -> StoredResponse + Send + Sync),
}

/// The result of [`Store::claim_idempotency_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key is ours: run the request.
    Claimed,
    /// Another request with this key is running.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
    /// The request already ran: answer this.
    Done(StoredResponse),
}

/// Completes a key still held by the write's own claim. A claim released
/// (its client went away while the write was queued) or taken over (a
/// retry after the lease) leaves nothing to complete: the write is rolled
/// back, so the retry that holds the key now runs it once, or the client's
/// next retry does.
pub(super) const COMPLETE_SQL: &str = "UPDATE idempotency_keys SET state = 'done', \
     response_status = $3, response_headers = $4, response_body = $5 \
     WHERE scope = $1 AND key = $2 AND claim = $6 AND state = 'in_flight'";

#[derive(sqlx::FromRow)]
struct KeyRow {
    fingerprint: String,
    state: String,
    response_status: Option<i32>,
    response_headers: Option<Json<Vec<(String, String)>>>,
    response_body: Option<Vec<u8>>,
    locked_at_ms: i64,
    expires_at_ms: i64,
    claim: Option<String>,
}

impl Store {
    /// Claims `record` for one request. `ttl_ms` is how long the key is
    /// remembered; `lease_ms` how long an unfinished claim blocks others.
    #[tracing::instrument(skip_all, fields(idempotency_key = %record.key))]
    pub async fn claim_idempotency_key(
        &self,
        record: &IdempotencyRecord,
        ttl_ms: i64,
        lease_ms: i64,
    ) -> Result<ClaimOutcome, StoreError> {
        let now_ms = super::now_ms();
        dispatch!(self, write pool => {
            let inserted = sqlx::query(
                "INSERT INTO idempotency_keys \
                 (scope, key, fingerprint, state, created_at, locked_at_ms, expires_at_ms, claim) \
                 VALUES ($1, $2, $3, 'in_flight', $4, $5, $6, $7) ON CONFLICT (scope, key) DO NOTHING",
            )
            .bind(&record.scope)
            .bind(&record.key)
            .bind(&record.fingerprint)
            .bind(now())
            .bind(now_ms)
            .bind(now_ms + ttl_ms)
            .bind(&record.claim)
            .execute(pool)
            .await?;
            if inserted.rows_affected() == 1 {
                return Ok(ClaimOutcome::Claimed);
            }
            let row: Option<KeyRow> = sqlx::query_as(
                "SELECT fingerprint, state, response_status, response_headers, response_body, \
                 locked_at_ms, expires_at_ms, claim FROM idempotency_keys \
                 WHERE scope = $1 AND key = $2",
            )
            .bind(&record.scope)
            .bind(&record.key)
            .fetch_optional(pool)
            .await?;
            let Some(row) = row else {
                // Released between our insert and our read: the caller retries.
                return Ok(ClaimOutcome::InFlight);
            };
            let expired = row.expires_at_ms <= now_ms;
            let abandoned = row.state == "in_flight" && row.locked_at_ms + lease_ms <= now_ms;
            // An abandoned claim is taken over whatever the request: no
            // write completed under it (a write completes its key in its
            // own transaction), so there is no answer a changed request
            // could contradict, and a client that fixed its request after
            // an error need not wait for the key to expire.
            if expired || abandoned {
                // Take the key over, only as it was read: the guard on the
                // old lock time makes sure only one of several racing
                // requests wins it, and the one on its state and claim that
                // a write completing it meanwhile (its commit waited for
                // nothing this read could see) keeps its answer, rather than
                // having it wiped and its write run a second time.
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET fingerprint = $3, state = 'in_flight', \
                     response_status = NULL, response_headers = NULL, response_body = NULL, \
                     created_at = $4, locked_at_ms = $5, expires_at_ms = $6, claim = $9 \
                     WHERE scope = $1 AND key = $2 AND locked_at_ms = $7 AND expires_at_ms = $8 \
                     AND state = $10 AND COALESCE(claim, '') = $11",
                )
                .bind(&record.scope)
                .bind(&record.key)
                .bind(&record.fingerprint)
                .bind(now())
                .bind(now_ms)
                .bind(now_ms + ttl_ms)
                .bind(row.locked_at_ms)
                .bind(row.expires_at_ms)
                .bind(&record.claim)
                .bind(&row.state)
                .bind(row.claim.as_deref().unwrap_or_default())
                .execute(pool)
                .await?;
                return Ok(if taken.rows_affected() == 1 {
                    ClaimOutcome::Claimed
                } else {
                    ClaimOutcome::InFlight
                });
            }
            // A key still claimed is busy whatever the body: the request
            // holding it may fail and release it, and a client that fixed
            // its body meanwhile retries a 409, not a 422 it takes for
            // final.
            if row.state == "in_flight" {
                return Ok(ClaimOutcome::InFlight);
            }
            if row.fingerprint != record.fingerprint {
                return Ok(ClaimOutcome::Mismatch);
            }
            Ok(ClaimOutcome::Done(StoredResponse {
                status: row
                    .response_status
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(500),
                headers: row.response_headers.map(|h| h.0).unwrap_or_default(),
                body: row.response_body.unwrap_or_default(),
            }))
        })
    }

    /// Forgets an unfinished claim, so the client may retry with the same key.
    #[tracing::instrument(skip_all, fields(idempotency_key = %record.key))]
    pub async fn release_idempotency_key(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self, write pool => {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND state = 'in_flight' \
                 AND claim = $3",
            )
            .bind(&record.scope)
            .bind(&record.key)
            .bind(&record.claim)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Deletes up to `batch` expired keys, those that expired first first;
    /// returns how many. Callers loop: one statement over every expired
    /// key (each with its stored answer) would hold the writer for as long
    /// as it takes.
    #[tracing::instrument(skip_all)]
    pub async fn purge_expired_idempotency_keys(&self, batch: u32) -> Result<u64, StoreError> {
        let now_ms = super::now_ms();
        let done = dispatch!(self, write pool => {
            sqlx::query(
                // Expiry checked again on the row deleted: a key taken
                // over since the subquery read it is kept.
                "DELETE FROM idempotency_keys WHERE expires_at_ms <= $1 AND (scope, key) IN \
                 (SELECT scope, key FROM idempotency_keys WHERE expires_at_ms <= $1 \
                 ORDER BY expires_at_ms LIMIT $2)",
            )
                .bind(now_ms)
                .bind(i64::from(batch))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }
}
