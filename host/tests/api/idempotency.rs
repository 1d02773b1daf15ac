//! `Idempotency-Key`: replay, reuse with another request, in-flight keys.

use ferry::api::idempotency::{fingerprint, LEASE_MS};
use ferry::store::{ClaimOutcome, IdempotencyRecord};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, email, on_both_backends, spawn_app, Backend};

async fn same_key_same_request_replays_the_first_response(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"email": email("idem"), "name": "Once"});
    let send = || {
        app.request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", "create-once-1")
            .json(&body)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_headers = first.headers().clone();
    let first_body = first.bytes().await.unwrap();

    for _ in 0..2 {
        let again = send().await.unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        for name in ["etag", "location", "content-type"] {
            assert_eq!(again.headers()[name], first_headers[name], "{name}");
        }
        assert_eq!(again.bytes().await.unwrap(), first_body);
    }
    let created: Value = serde_json::from_slice(&first_body).unwrap();
    let (_, page) = app.get_json("/api/v1/customers").await;
    assert_eq!(
        page["data"].as_array().unwrap().len(),
        1,
        "one customer only"
    );
    assert_eq!(
        app.store
            .outbox_events(created["id"].as_str().unwrap())
            .await
            .unwrap()
            .len(),
        1
    );

    // Keys work on every write, not only creates.
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    for _ in 0..2 {
        let response = app
            .request(Method::DELETE, &path)
            .header("idempotency-key", "delete-once-1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "a replayed delete is not a 404");
    }
}

async fn same_key_other_request_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let first = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "reused-key")
        .json(&json!({"email": email("one")}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let second = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "reused-key")
        .json(&json!({"email": email("two")}))
        .send()
        .await
        .unwrap();
    assert_problem(second, 422, "idempotency_key_reused").await;

    // Two keys on one request (a proxy that added its own): the second
    // was ignored, so a retry under it wrote again. Refused, naming it.
    let twice = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "client-key")
        .header("idempotency-key", "proxy-key")
        .json(&json!({"email": email("twice")}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(twice, 422, "validation_failed").await;
    assert_eq!(
        problem["errors"][0]["field"], "Idempotency-Key",
        "{problem}"
    );
}

async fn key_in_flight_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"email": email("flight")});
    let bytes = serde_json::to_vec(&body).unwrap();
    // Hold the key as a first request would while it runs.
    let record = IdempotencyRecord {
        scope: "open".into(),
        key: "held-key".into(),
        fingerprint: fingerprint(&Method::POST, "/api/v1/customers", &bytes),
        claim: "held-by-the-test".into(),
    };
    let claim = app
        .store
        .claim_idempotency_key(&record, 3_600_000, LEASE_MS)
        .await
        .unwrap();
    assert_eq!(claim, ClaimOutcome::Claimed);
    let send = || {
        app.request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", "held-key")
            .header("content-type", "application/json")
            .body(bytes.clone())
            .send()
    };
    let busy = send().await.unwrap();
    // Says when to look again, as a 503 does.
    let after = busy.headers().get("retry-after").cloned();
    assert_eq!(after.as_ref().and_then(|v| v.to_str().ok()), Some("1"));
    assert_problem(busy, 409, "idempotency_key_in_flight").await;
    // So is a fixed body under the key (the holder may fail and release
    // it): it answered 422 `idempotency_key_reused`, which a client takes
    // for final.
    let fixed = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "held-key")
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&json!({"email": email("flight-fixed")})).unwrap())
        .send()
        .await
        .unwrap();
    assert_problem(fixed, 409, "idempotency_key_in_flight").await;

    // Once the holder gives up, the key is free.
    app.store.release_idempotency_key(&record).await.unwrap();
    assert_eq!(send().await.unwrap().status(), 201);
}

async fn concurrent_requests_with_one_key_write_once(backend: Backend) {
    let app = spawn_app(backend).await;
    for round in 0..5 {
        let body = json!({"email": email(&format!("concurrent{round}"))});
        let key = format!("concurrent-{round}");
        let send = || {
            app.request(Method::POST, "/api/v1/customers")
                .header("idempotency-key", &key)
                .json(&body)
                .send()
        };
        let (a, b) = tokio::join!(send(), send());
        let outcomes = [a.unwrap(), b.unwrap()];
        let codes = one_write_of_two(outcomes, 201).await;
        assert!(codes.contains(&201), "{codes:?}");
        let (_, page) = app
            .get_json(&format!(
                "/api/v1/customers?email={}",
                body["email"].as_str().unwrap()
            ))
            .await;
        assert_eq!(page["data"].as_array().unwrap().len(), 1);
    }
}

/// Two answers to one request sent twice at once with one key: `done`
/// (the write, or its replay) and at most one 409
/// `idempotency_key_in_flight`. Their statuses.
async fn one_write_of_two(outcomes: [reqwest::Response; 2], done: u16) -> Vec<u16> {
    let mut codes = Vec::new();
    for response in outcomes {
        let status = response.status().as_u16();
        if status != done {
            assert_problem(response, 409, "idempotency_key_in_flight").await;
        }
        codes.push(status);
    }
    codes
}

/// Updates and deletes have no unique index behind them (a create's email
/// has one): two at once with one key still write once. A second update
/// would be a second version, a second delete a second outbox event.
async fn concurrent_updates_and_deletes_with_one_key_write_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let customer = app
        .create_ok(&json!({"email": email("concurrent-patch")}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/customers/{id}");
    for round in 0..5 {
        let key = format!("patch-{round}");
        let body = json!({"metadata": {"round": round.to_string()}});
        let send = || {
            app.request(Method::PATCH, &path)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
        };
        let (a, b) = tokio::join!(send(), send());
        one_write_of_two([a.unwrap(), b.unwrap()], 200).await;
    }
    let (_, after) = app.get_json(&path).await;
    assert_eq!(after["version"], 6, "one version per key: {after}");

    let send = || {
        app.request(Method::DELETE, &path)
            .header("idempotency-key", "delete-once")
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    let codes = one_write_of_two([a.unwrap(), b.unwrap()], 200).await;
    assert!(codes.contains(&200), "{codes:?}");
    let deletes = app
        .store
        .outbox_events(&id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "deleted")
        .count();
    assert_eq!(deletes, 1);
}

async fn failed_request_releases_its_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "retry-after-fix")
        .json(&json!({"email": "broken"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 422, "validation_failed").await;
    let response = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "retry-after-fix")
        .json(&json!({"email": email("fixed")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let response = app
        .request(Method::POST, "/api/v1/customers")
        .header("idempotency-key", "x".repeat(256))
        .json(&json!({"email": email("long")}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "Idempotency-Key");
}

/// A client that gives up while its write waits (here: behind another
/// process holding SQLite's write lock) does not leave its key stuck: the
/// retry runs instead of getting 409 for the whole lease.
#[tokio::test]
async fn a_cancelled_request_releases_its_key() {
    use sqlx::Connection;
    let app = spawn_app(Backend::Sqlite).await;
    let mut blocker = sqlx::SqliteConnection::connect(&app.database_url)
        .await
        .expect("a second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut blocker)
        .await
        .expect("write lock");
    let body = json!({"email": email("cancelled"), "name": "Cancelled"});
    let send = |timeout_ms: u64| {
        app.request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", "cancelled-1")
            .timeout(std::time::Duration::from_millis(timeout_ms))
            .json(&body)
            .send()
    };
    assert!(send(300).await.is_err(), "the client gave up");
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    drop(blocker);
    // The release runs once the writer is free; the retry then goes through.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let response = send(10_000).await.expect("answered");
        match response.status().as_u16() {
            201 => break,
            409 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => panic!("retry answered {other}: {}", response.text().await.unwrap()),
        }
    }
}

/// PostgreSQL: a create waits in the group-commit queue (a lock holds the
/// customers table) while its client gives up, and the key's claim is
/// released. The queued create must not commit afterwards without its key:
/// the client's retry with the same key would then be refused as a second
/// customer with that email, forever. It is rolled back instead, and the
/// retry creates the customer, once.
#[tokio::test]
async fn a_create_queued_past_its_cancel_is_rolled_back() {
    use sqlx::Connection;
    let app = spawn_app(Backend::Postgres).await;
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("a second connection");
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE customers IN SHARE MODE")
        .execute(&mut blocker)
        .await
        .expect("lock");
    let address = email("queued");
    let body = json!({"email": address, "name": "Queued"});
    let send = |timeout_ms: u64| {
        app.request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", "queued-1")
            .timeout(std::time::Duration::from_millis(timeout_ms))
            .json(&body)
            .send()
    };
    assert!(send(300).await.is_err(), "the client gave up");
    // The release does not wait for the customers table.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let held: i64 =
            sqlx::query_scalar("SELECT count(*) FROM idempotency_keys WHERE key = 'queued-1'")
                .fetch_one(&mut blocker)
                .await
                .unwrap();
        if held == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    // The queued create runs now.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let retry = send(10_000).await.expect("answered");
    let status = retry.status().as_u16();
    let created: Value = retry.json().await.unwrap();
    assert_eq!(status, 201, "{created}");
    let (_, page) = app
        .get_json(&format!("/api/v1/customers?email={address}"))
        .await;
    let found = page["data"].as_array().unwrap();
    assert_eq!(found.len(), 1, "{page}");
    assert_eq!(found[0]["id"], created["id"]);
}

/// A claim taken over after its lease (a retry of a request that ran
/// longer) leaves the first request nothing to complete: its write is
/// refused and rolled back, and only the request that holds the key now
/// writes.
async fn a_write_whose_claim_was_taken_over_is_refused(backend: Backend) {
    use ferry::store::customers::WriteContext;
    use ferry::store::idempotency::{IdempotencyCompletion, StoredResponse};
    use ferry::store::{CustomerFields, StoreError};

    let app = spawn_app(backend).await;
    let created = app
        .create_ok(&json!({"email": email("lease"), "name": "Lease"}))
        .await;
    let id = ferry::store::CustomerId::parse(created["id"].as_str().unwrap()).unwrap();
    let record = |claim: &str| IdempotencyRecord {
        scope: "open".into(),
        key: "lease-key".into(),
        fingerprint: "same-request".into(),
        claim: claim.into(),
    };
    let (first, retry) = (record("first"), record("retry"));
    let claimed = app.store.claim_idempotency_key(&first, 3_600_000, LEASE_MS);
    assert_eq!(claimed.await.unwrap(), ClaimOutcome::Claimed);
    // The retry finds the lease over (0 here) and takes the key.
    let taken = app.store.claim_idempotency_key(&retry, 3_600_000, 0);
    assert_eq!(taken.await.unwrap(), ClaimOutcome::Claimed);

    async fn rename(
        store: &ferry::store::Store,
        id: &ferry::store::CustomerId,
        record: &IdempotencyRecord,
        name: &str,
    ) -> Result<ferry::store::Customer, StoreError> {
        let render = |_: &ferry::store::Customer| StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: b"{}".to_vec(),
        };
        let ctx = WriteContext {
            correlation_id: None,
            idempotency: Some(IdempotencyCompletion {
                scope: &record.scope,
                key: &record.key,
                claim: &record.claim,
                render: &render,
            }),
        };
        store
            .update_customer(id, None, ctx, |current| {
                Ok::<_, StoreError>(CustomerFields {
                    name: Some(name.to_owned()),
                    email: current.email.clone(),
                    phone: current.phone.clone(),
                    address: current.address.clone(),
                    metadata: current.metadata.clone(),
                })
            })
            .await
    }
    let refused = rename(&app.store, &id, &first, "First").await;
    assert!(
        matches!(refused, Err(StoreError::IdempotencyClaimLost)),
        "{refused:?}"
    );
    let written = rename(&app.store, &id, &retry, "Retry")
        .await
        .expect("the retry writes");
    assert_eq!(
        (written.name.as_deref(), written.version),
        (Some("Retry"), 2)
    );
    let events = app.store.outbox_events(id.as_str()).await.unwrap();
    assert_eq!(events.len(), 2, "one create and one update: {events:?}");
}

/// A claim abandoned without a write (a request that failed and could not
/// release its key: the pool ran dry, the connection dropped) is taken
/// over once its lease is over by a request with another body: nothing was
/// answered under the key that the new body could contradict. Before, a
/// client that fixed its request after the error got 422
/// `idempotency_key_reused` until the key expired, a day later.
async fn an_abandoned_claim_is_taken_over_by_a_changed_request(backend: Backend) {
    let app = spawn_app(backend).await;
    let record = |fingerprint: &str, claim: &str| IdempotencyRecord {
        scope: "open".into(),
        key: "abandoned-key".into(),
        fingerprint: fingerprint.into(),
        claim: claim.into(),
    };
    let first = record("the-first-body", "first");
    let claimed = app.store.claim_idempotency_key(&first, 3_600_000, LEASE_MS);
    assert_eq!(claimed.await.unwrap(), ClaimOutcome::Claimed);
    // Within the lease the first request may still be running: busy (a
    // 409 to retry, not the 422 of a body that contradicts an answer).
    let fixed = record("the-fixed-body", "fixed");
    let early = app.store.claim_idempotency_key(&fixed, 3_600_000, LEASE_MS);
    assert_eq!(early.await.unwrap(), ClaimOutcome::InFlight);
    // The lease over (0 here), the fixed request takes the key.
    let late = app.store.claim_idempotency_key(&fixed, 3_600_000, 0);
    assert_eq!(late.await.unwrap(), ClaimOutcome::Claimed);
}

on_both_backends!(
    an_abandoned_claim_is_taken_over_by_a_changed_request,
    same_key_same_request_replays_the_first_response,
    same_key_other_request_is_refused,
    key_in_flight_is_409,
    concurrent_requests_with_one_key_write_once,
    concurrent_updates_and_deletes_with_one_key_write_once,
    failed_request_releases_its_key,
    a_write_whose_claim_was_taken_over_is_refused,
);
