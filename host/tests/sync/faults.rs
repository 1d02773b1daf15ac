//! Faults between ferry and Stripe: a proxy in front of localstripe times
//! out, rate-limits, fails, refuses, and goes down; it honours
//! `Idempotency-Key` the way Stripe documents it (localstripe does not).

use std::time::Duration;

use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
use ferry_test_support::localstripe::LocalStripe;
use serde_json::{json, Value};

use crate::helpers::{
    console_page, console_session, email, execute_raw, spawn_sync_app, stripe_customers_by_email,
    Backend, Setup, SyncApp,
};

struct Harness {
    stripe: LocalStripe,
    proxy: FaultProxy,
    app: SyncApp,
}

async fn harness(extra: Value) -> Harness {
    harness_on(Backend::Sqlite, extra).await
}

async fn harness_on(backend: Backend, extra: Value) -> Harness {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    proxy.emulate_stripe_idempotency();
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra = extra;
    let app = spawn_sync_app(setup).await;
    Harness { stripe, proxy, app }
}

/// `GET /api/v1/dead-letters?connector=stripe`, answered 200.
async fn stripe_dead_letters(app: &SyncApp) -> Value {
    let (status, letters) = app
        .send(
            reqwest::Method::GET,
            "/api/v1/dead-letters?connector=stripe",
            None,
        )
        .await;
    assert_eq!(status, 200, "{letters}");
    letters
}

/// A customer named `name` (its email tagged `tag`), synced to Stripe: its
/// id and its Stripe record's.
async fn synced_customer(h: &Harness, tag: &str, name: &str) -> (String, String) {
    let customer = h
        .app
        .create(json!({"email": email(tag), "name": name}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = h.app.wait_synced(&id, 1).await;
    (id, link["remote_id"].as_str().unwrap().to_owned())
}

/// Waits until a `POST` to `path` has gone through the proxy to Stripe.
async fn wait_forwarded(proxy: &FaultProxy, path: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !proxy.requests_to("POST", path).iter().any(|r| r.forwarded) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "POST {path} never went out"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn outcomes(status: &Value) -> Vec<String> {
    status["history"]
        .as_array()
        .expect("history")
        .iter()
        .rev()
        .map(|d| d["outcome"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The remote applied the create but the answer came too late: the retry
/// carries the same idempotency key, so Stripe answers with the customer it
/// already made and no second one exists. It waits a call timeout first,
/// as an update's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_after_the_remote_applied_the_write_creates_no_duplicate() {
    let h = harness(json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    let address = email("timeout");
    let customer = h
        .app
        .create(json!({"email": address, "name": "Slow"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    h.app.wait_synced(id, 1).await;

    let creates = h.proxy.requests_to("POST", "/v1/customers");
    assert_eq!(creates.len(), 2, "one timed-out attempt, one retry");
    assert_eq!(
        creates[0].header("idempotency-key"),
        creates[1].header("idempotency-key")
    );
    assert!(
        creates[0].forwarded && !creates[1].forwarded,
        "the retry was answered from Stripe's saved result"
    );
    // The replay waited a call timeout (2 s) more than the first took: at
    // once, it met the first still running under its key (Stripe's 409).
    let gap = creates[1].received_at - creates[0].received_at;
    assert!(gap >= Duration::from_secs(3), "replayed after {gap:?}");
    assert_eq!(
        stripe_customers_by_email(&h.stripe.url(), &address)
            .await
            .len(),
        1
    );
    assert_eq!(
        outcomes(&h.app.sync_status(id).await),
        ["retry_scheduled", "delivered"]
    );
}

/// An update that timed out may have been applied: the remote's content is
/// then unknown. Changed back meanwhile to what was pushed before, the
/// customer is pushed again, not skipped as "unchanged since the last
/// push": Stripe held the timed-out update's name while ferry said synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_undone_while_its_update_timed_out_is_pushed() {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "undone", "Before").await;
    let (id, update) = (id.as_str(), format!("/v1/customers/{remote_id}"));
    h.proxy.push(
        Match::request("POST", &update),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    h.app.patch(id, json!({"name": "Changed"})).await;
    wait_forwarded(&h.proxy, &update).await;
    // Stripe holds "Changed"; its answer is late, so the push times out.
    h.app.patch(id, json!({"name": "Before"})).await;
    h.app.wait_synced(id, 3).await;
    let held = crate::helpers::stripe_customer(&h.stripe.url(), &remote_id)
        .await
        .expect("the record");
    assert_eq!(held["name"], "Before", "{held:#}");
}

/// An update whose answer came too late may have been applied: its retry
/// is the same request under the same key, answered from the result
/// Stripe saved. It went whole, under another key: Stripe applied it as
/// well, over an edit made there between (the phone below, set back to
/// ferry's).
async fn a_timed_out_update_is_retried_as_the_same_request(backend: Backend) {
    let h = harness_on(backend, json!({})).await;
    let customer = h
        .app
        .create(json!({"email": email("same-request"), "name": "Before", "phone": "+15550100"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    let remote_id = h.app.wait_synced(id, 1).await["remote_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let update = format!("/v1/customers/{remote_id}");
    h.proxy.push(
        Match::request("POST", &update),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    h.app.patch(id, json!({"name": "Changed"})).await;
    wait_forwarded(&h.proxy, &update).await;
    // Stripe holds "Changed"; while its answer is late, someone changes
    // the phone in the dashboard.
    crate::helpers::stripe_write(&h.stripe.url(), &update, &[("phone", "+15550199")]).await;
    // Until the retry, the hash of the last delivered push is kept aside,
    // not as `pushed_hash`: a replica of an older release, which knows
    // only that column, would take it for version 2's and skip a version
    // with that content as unchanged.
    let timed_out = h.app.failed_stripe_link(id).await;
    assert_eq!(timed_out.pushed_hash, None);
    assert_eq!(timed_out.unsure_version, Some(2));
    assert!(timed_out.unsure_base.is_some());
    h.app.wait_synced(id, 2).await;

    let updates = h.proxy.requests_to("POST", &update);
    assert_eq!(updates.len(), 2, "one timed-out attempt, one retry");
    assert_eq!(
        updates[0].header("idempotency-key"),
        updates[1].header("idempotency-key")
    );
    assert_eq!(updates[0].body, updates[1].body);
    assert!(
        !updates[1].forwarded,
        "the retry was answered from Stripe's saved result"
    );
    let held = crate::helpers::stripe_customer(&h.stripe.url(), &remote_id)
        .await
        .expect("the record");
    assert_eq!(held["name"], "Changed", "{held:#}");
    assert_eq!(held["phone"], "+15550199", "{held:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_timed_out_update_is_retried_as_the_same_request() {
    a_timed_out_update_is_retried_as_the_same_request(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_timed_out_update_is_retried_as_the_same_request() {
    a_timed_out_update_is_retried_as_the_same_request(Backend::Postgres).await;
}

/// An update the call gave up on may still land at the remote. Retried at
/// once (jitter under the 400 ms backoff here), a newer version could go
/// out under a new key and land first, and the late one leave the older
/// values in Stripe while ferry counts the newer as synced. The retry after
/// a timed-out update waits a call timeout (2 s here) more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_update_is_retried_only_after_the_call_timeout_again() {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "settle", "Before").await;
    let (id, update) = (id.as_str(), format!("/v1/customers/{remote_id}"));
    h.proxy.push(
        Match::request("POST", &update),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    h.app.patch(id, json!({"name": "Slow"})).await;
    wait_forwarded(&h.proxy, &update).await;
    let link = h.app.failed_stripe_link(id).await;
    let recorded_at = ferry::store::now_ms();
    assert!(
        link.next_attempt_at_ms >= recorded_at + 1_500,
        "retried {} ms after the timeout was recorded",
        link.next_attempt_at_ms - recorded_at
    );
    h.app.wait_synced(id, 2).await;
}

/// A create whose answer is lost (the remote made the record; ferry's call
/// timed out), then given up on with the remote down: the customer's id,
/// its email and the record the remote made. The proxy stays down.
async fn a_create_whose_answer_was_lost(h: &Harness, tag: &str) -> (String, String, Value) {
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    let address = email(tag);
    let customer = h
        .app
        .create(json!({"email": address, "name": "Lost"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    wait_forwarded(&h.proxy, "/v1/customers").await;
    h.proxy.set_down(true);
    h.app
        .wait_link(&id, Duration::from_secs(20), |l| l["state"] == "dead")
        .await;
    let mut made = stripe_customers_by_email(&h.stripe.url(), &address).await;
    assert_eq!(made.len(), 1, "{made:?}");
    (id, address, made.remove(0))
}

/// Delivers the echo (`customer.created`, carrying the create's key) of
/// the record `made` for customer `id`'s lost create, and waits until the
/// link names that record: the link.
async fn echo_links(h: &Harness, event_id: &str, id: &str, made: &Value) -> Value {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, stripe_signature};
    let echo = json!({"id": event_id, "object": "event", "type": "customer.created",
        "created": chrono::Utc::now().timestamp(),
        "request": {"id": "req_1", "idempotency_key": format!("ferry-stripe-{id}-v1")},
        "data": {"object": made}})
    .to_string();
    let (status, _) = deliver(&h.app, &echo, &stripe_signature(&echo, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    h.app
        .wait_link(id, Duration::from_secs(10), |l| {
            l["remote_id"] == made["id"]
        })
        .await
}

/// A thin Stripe event (an event destination's `v2.core.event`) of type
/// `kind` naming customer `remote_id`.
fn thin_event(event_id: &str, kind: &str, remote_id: &str) -> Value {
    json!({"id": event_id, "object": "v2.core.event", "type": kind,
        "created": chrono::Utc::now().to_rfc3339(), "livemode": false, "context": null,
        "related_object": {"id": remote_id, "type": "customer",
            "url": format!("/v1/customers/{remote_id}")}})
}

/// The snapshot of customer `id`'s Stripe link (the next merge's base).
async fn stripe_snapshot(h: &Harness, id: &str) -> Option<Value> {
    h.app
        .store
        .links_of(id)
        .await
        .expect("links")
        .into_iter()
        .find(|l| l.connector == "stripe")
        .expect("the link")
        .snapshot
}

/// The same echo as a thin event (an event destination's `v2.core.event`
/// naming the create's idempotency key): the link takes the record, and
/// its base is what the remote holds, read for it. Before, thin events
/// carried no key; with it, the link was adopted without a snapshot, and
/// the next remote change was merged with no base. A read that fails for
/// a moment (a 503 here) is made again, not given up for a link without
/// a base.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_echo_of_a_create_whose_answer_was_lost_links_its_record() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, stripe_signature};
    let h = harness(json!({})).await;
    let (id, address, made) = a_create_whose_answer_was_lost(&h, "lost-answer-thin").await;
    let id = id.as_str();
    h.proxy.set_down(false);
    let remote_id = made["id"].as_str().unwrap().to_owned();
    h.proxy.push(
        Match::request("GET", &format!("/v1/customers/{remote_id}")),
        Fault::status(503),
    );

    let mut echo = thin_event("evt_lost_answer_thin", "v1.customer.created", &remote_id);
    echo["reason"] = json!({"type": "request",
        "request": {"id": "req_1", "idempotency_key": format!("ferry-stripe-{id}-v1")}});
    let echo = echo.to_string();
    let (status, _) = deliver(&h.app, &echo, &stripe_signature(&echo, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    h.app
        .wait_link(id, Duration::from_secs(10), |l| {
            l["remote_id"] == remote_id.as_str()
        })
        .await;
    let snapshot = stripe_snapshot(&h, id).await.expect("a snapshot");
    assert_eq!(snapshot["email"], address.as_str(), "{snapshot}");
}

/// The same over a record deleted remotely (the `unlink` policy keeps the
/// link naming it, marked deleted, and the next change creates anew): the
/// echo links the record the create made, and its record replaces the
/// deleted one's as the base. Adoption took only links without a remote
/// id: the echo was skipped, and a replay after Stripe forgot the key
/// made a second record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_a_create_over_a_deleted_record_links_its_record() {
    let h = harness(json!({})).await;
    let (id, address, made) = a_create_whose_answer_was_lost(&h, "lost-over-deleted").await;
    let id = id.as_str();
    let pool = sqlx::SqlitePool::connect(&h.app.database_url)
        .await
        .expect("sqlite");
    sqlx::query(
        "UPDATE sync_links SET remote_id = 'cus_deleted_before', remote_deleted = TRUE, \
         snapshot = '{\"email\": \"before@example.com\"}' WHERE customer_id = $1",
    )
    .bind(id)
    .execute(&pool)
    .await
    .expect("the link names a deleted record");

    let link = echo_links(&h, "evt_lost_over_deleted", id, &made).await;
    assert_eq!(link["remote_deleted"], false, "{link}");
    let snapshot = stripe_snapshot(&h, id).await.expect("a snapshot");
    assert_eq!(snapshot["email"], address.as_str(), "{snapshot}");
}

/// A create whose answer was lost, then given up on (the remote went down
/// for good): its echo, which carries ferry's idempotency key and the
/// record made, links the customer to that record. Before, the echo was
/// skipped and only a replay of the create under its key could find the
/// record, which Stripe forgets after a day: a second customer. The link
/// is in sync then: `synced`, its letter closed. It stayed `dead`, with
/// its letter open, for a person to replay what had nothing to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_a_create_whose_answer_was_lost_links_its_record() {
    let h = harness(json!({})).await;
    let (id, address, made) = a_create_whose_answer_was_lost(&h, "lost-answer").await;
    let id = id.as_str();
    let remote_id = made["id"].as_str().unwrap().to_owned();
    let letters = stripe_dead_letters(&h.app).await;
    assert_eq!(
        letters["data"].as_array().map(Vec::len),
        Some(1),
        "{letters}"
    );

    let link = echo_links(&h, "evt_lost_answer", id, &made).await;
    assert_eq!(
        (link["state"].as_str(), link["synced_version"].as_i64()),
        (Some("synced"), Some(1)),
        "{link}"
    );
    let letters = stripe_dead_letters(&h.app).await;
    assert_eq!(
        letters["data"].as_array().map(Vec::len),
        Some(0),
        "{letters}"
    );
    // The echo's record is the link's base for the next merge, as a
    // delivered create's answer would have been.
    let snapshot = stripe_snapshot(&h, id).await.expect("a snapshot");
    assert_eq!(snapshot["email"], address.as_str(), "{snapshot}");

    // Nothing to send: the record made holds version 1, and an update of
    // it would reuse the create's key on another endpoint, which Stripe
    // refuses (400 `idempotency_error`).
    h.proxy.set_down(false);
    assert!(h
        .proxy
        .requests_to("POST", &format!("/v1/customers/{remote_id}"))
        .is_empty());
    let creates = h.proxy.requests_to("POST", "/v1/customers");
    assert_eq!(creates.iter().filter(|r| r.forwarded).count(), 1);

    // The next change is an update of the record made, under its own key.
    h.app.patch(id, json!({"name": "Found"})).await;
    h.app.wait_synced(id, 2).await;
    let updates = h
        .proxy
        .requests_to("POST", &format!("/v1/customers/{remote_id}"));
    assert_eq!(updates.len(), 1);
    let key = updates[0]
        .headers
        .iter()
        .find(|(name, _)| name == "idempotency-key")
        .map(|(_, value)| value.as_str())
        .unwrap_or_default();
    assert!(key.starts_with(&format!("ferry-stripe-{id}-v2")), "{key}");
    assert_eq!(
        stripe_customers_by_email(&h.stripe.url(), &address)
            .await
            .len(),
        1
    );
}

/// A create that timed out is replayed as it was sent even when the
/// customer changed meanwhile (the same key with other parameters is a 400
/// from Stripe), and the change follows as an update. With an address:
/// PostgreSQL keeps a JSON object's keys in an order of its own.
async fn a_timed_out_create_is_replayed_as_sent_after_the_customer_changed(backend: Backend) {
    let h = harness_on(backend, json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(4)),
    );
    let address = email("moved-on");
    let customer = h
        .app
        .create(json!({
            "email": address,
            "name": "First",
            "address": {"line1": "1 Main St", "city": "Springfield", "postal_code": "12345", "country": "US"},
            "metadata": {"tier": "gold"},
        }))
        .await;
    let id = customer["id"].as_str().unwrap();
    h.proxy
        .wait_for(Duration::from_secs(10), |log| {
            log.iter()
                .any(|r| r.is("POST", "/v1/customers") && r.forwarded)
        })
        .await
        .expect("the create reached Stripe");
    h.app.patch(id, json!({"name": "Second"})).await;
    h.app.wait_synced(id, 2).await;

    let creates = h.proxy.requests_to("POST", "/v1/customers");
    assert_eq!(creates.len(), 2, "one timed-out attempt, one replay");
    assert_eq!(
        creates[0].header("idempotency-key"),
        creates[1].header("idempotency-key")
    );
    assert_eq!(
        String::from_utf8_lossy(&creates[0].body),
        String::from_utf8_lossy(&creates[1].body),
        "the replay sends the first create's record"
    );
    assert!(!creates[1].forwarded, "answered from Stripe's saved result");
    let remote = stripe_customers_by_email(&h.stripe.url(), &address).await;
    assert_eq!(remote.len(), 1);
    assert_eq!(remote[0]["name"], "Second", "then the change was pushed");
    assert_eq!(
        outcomes(&h.app.sync_status(id).await),
        ["retry_scheduled", "delivered", "delivered"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_timed_out_create_is_replayed_as_sent_after_the_customer_changed() {
    a_timed_out_create_is_replayed_as_sent_after_the_customer_changed(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_timed_out_create_is_replayed_as_sent_after_the_customer_changed() {
    a_timed_out_create_is_replayed_as_sent_after_the_customer_changed(Backend::Postgres).await;
}

/// A create whose answer comes after an inbound event linked another
/// record with the customer's email (made in Stripe by a person while the
/// create was on the wire): the record linked, whose fields the inbound
/// merge took in, stays linked; the create is settled, not replayed, and
/// its delivery names the second record the remote now holds. Before, the
/// answer wrote its own id over the link and orphaned the first record.
async fn a_create_answered_after_another_record_was_linked_keeps_it(backend: Backend) {
    use crate::helpers::{stripe_create, WEBHOOK_SECRET};
    use crate::inbound::{deliver, stripe_signature};
    let h = harness_on(
        backend,
        json!({"connector_call_timeout": "15s", "sync_lease": "30s"}),
    )
    .await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(3)),
    );
    let address = email("linked-meanwhile");
    let customer = h
        .app
        .create(json!({"email": address, "name": "Ours"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    h.proxy
        .wait_for(Duration::from_secs(10), |log| {
            log.iter().any(|r| r.held && r.forwarded)
        })
        .await
        .expect("the create reached Stripe");

    let theirs = stripe_create(&h.stripe.url(), &[("email", &address), ("name", "Theirs")]).await;
    let made = stripe_customers_by_email(&h.stripe.url(), &address).await;
    let record = made.iter().find(|c| c["id"] == theirs.as_str()).unwrap();
    let event = json!({"id": "evt_linked_meanwhile", "object": "event", "type": "customer.created",
        "created": chrono::Utc::now().timestamp(),
        "request": {"id": null, "idempotency_key": null},
        "data": {"object": record}})
    .to_string();
    let (status, _) = deliver(&h.app, &event, &stripe_signature(&event, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);

    let status = loop {
        let status = h.app.sync_status(id).await;
        if outcomes(&status).iter().any(|o| o == "delivered") {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let link = &status["connectors"][0];
    assert_eq!(link["remote_id"], theirs.as_str(), "{status:#}");
    let ours = made
        .iter()
        .find(|c| c["id"] != theirs.as_str())
        .expect("the create made a record")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let delivered = &status["history"][0];
    assert_eq!(delivered["outcome"], "delivered", "{status:#}");
    assert_eq!(delivered["remote_id"], ours.as_str(), "{status:#}");
    let detail = delivered["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&ours) && detail.contains(&theirs),
        "{detail}"
    );
    h.app
        .wait_link(id, Duration::from_secs(10), |l| l["state"] == "synced")
        .await;
    let link = h.app.sync_status(id).await["connectors"][0].clone();
    assert_eq!(link["remote_id"], theirs.as_str(), "{link}");
    // Nothing more went to the record the create made.
    assert!(h
        .proxy
        .requests_to("POST", &format!("/v1/customers/{ours}"))
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_create_answered_after_another_record_was_linked_keeps_it() {
    a_create_answered_after_another_record_was_linked_keeps_it(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_create_answered_after_another_record_was_linked_keeps_it() {
    a_create_answered_after_another_record_was_linked_keeps_it(Backend::Postgres).await;
}

/// A link wanting a version its customer never reached (a change message
/// taken in from before the database was restored behind it) settles at
/// the customer's version. Before, it was claimed and skipped again at
/// once, for ever, a delivery row each time.
async fn a_wanted_version_the_customer_never_reached_settles(backend: Backend) {
    let h = harness_on(backend, json!({})).await;
    let customer = h
        .app
        .create(json!({"email": email("ahead"), "name": "Ahead"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    h.app.wait_synced(&id, 1).await;
    let ahead = format!(
        "UPDATE sync_links SET wanted_version = 3, state = 'pending', next_attempt_at_ms = 0 \
         WHERE customer_id = '{id}'"
    );
    execute_raw(&h.app.database_url, &ahead, b"").await;
    h.app
        .wait_link(&id, Duration::from_secs(15), |l| {
            l["state"] == "synced" && l["wanted_version"] == 1
        })
        .await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let skipped = outcomes(&h.app.sync_status(&id).await)
        .iter()
        .filter(|o| *o == "skipped")
        .count();
    assert!(
        skipped <= 2,
        "settled once, not claimed again: {skipped} skips"
    );
    // The customer's next write goes as any change does.
    h.app.patch(&id, json!({"name": "Next"})).await;
    h.app.wait_synced(&id, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_wanted_version_the_customer_never_reached_settles() {
    a_wanted_version_the_customer_never_reached_settles(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_wanted_version_the_customer_never_reached_settles() {
    a_wanted_version_the_customer_never_reached_settles(Backend::Postgres).await;
}

/// 429 with Retry-After: the next attempt waits at least that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_honour_retry_after() {
    // A backoff of at most 100 ms against a Retry-After of 3 s.
    let h = harness(json!({"sync_backoff_base": "50ms", "sync_backoff_max": "100ms"})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::rate_limited(3),
    );
    let customer = h.app.create(json!({"email": email("limited")})).await;
    let id = customer["id"].as_str().unwrap();
    h.app.wait_synced(id, 1).await;
    let status = h.app.sync_status(id).await;
    assert_eq!(outcomes(&status), ["retry_scheduled", "delivered"]);
    let retry = &status["history"][1];
    let scheduled_at =
        chrono::DateTime::parse_from_rfc3339(retry["created_at"].as_str().unwrap()).unwrap();
    let delay = retry["next_attempt_at_ms"].as_i64().unwrap() - scheduled_at.timestamp_millis();
    // The next attempt is scheduled from when the 429 arrived; the delivery
    // row's `created_at` is taken later, when it is written (how much later
    // depends on the machine's load: up to 2.9 s passes). The backoff alone
    // is at most 100 ms, so a longer delay is Retry-After's.
    assert!(delay > 100, "Retry-After: 3 honoured (delay {delay} ms)");
    assert!(
        retry["detail"].as_str().unwrap().contains("rate limited"),
        "{retry}"
    );
}

/// A rate-limited update is retried as the same request (its changed
/// fields, its key): a failure the remote saved nothing for says nothing
/// of an earlier attempt's outcome, which may still be unknown. It went
/// whole under another key, as every failure but a timeout did for a
/// while (own review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_update_is_retried_as_the_same_request() {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "limited-update", "Before").await;
    let update = format!("/v1/customers/{remote_id}");
    h.proxy
        .push(Match::request("POST", &update), Fault::rate_limited(1));
    h.app.patch(&id, json!({"name": "Changed"})).await;
    h.app.wait_synced(&id, 2).await;
    let updates = h.proxy.requests_to("POST", &update);
    assert_eq!(updates.len(), 2, "rate-limited, then delivered");
    assert_eq!(
        updates[1].header("idempotency-key"),
        updates[0].header("idempotency-key")
    );
    assert_eq!(updates[1].body, updates[0].body);
}

/// A Stripe error answer with a `code`, which Stripe saves under no key:
/// the request did not run.
fn unsaved_stripe_error(status: u16, kind: &str, code: &str, message: &str) -> Fault {
    let body = json!({"error": {"type": kind, "code": code, "message": message}});
    Fault::Respond {
        status,
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: body.to_string().into_bytes(),
    }
}

/// Stripe answers 409 `idempotency_key_in_use` while a request under the
/// same key still runs, and 429 `lock_timeout` while another request holds
/// the customer; it saves neither under the key. The retry is the same
/// request under the same key: under a fresh one it would run beside (or
/// after) the first, setting the same fields again, over an edit made at
/// Stripe between.
async fn a_refused_update_is_retried_as_the_same_request(fault: Fault) {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "refused-update", "Before").await;
    let update = format!("/v1/customers/{remote_id}");
    h.proxy.push(Match::request("POST", &update), fault);
    h.app.patch(&id, json!({"name": "Changed"})).await;
    h.app.wait_synced(&id, 2).await;
    let updates = h.proxy.requests_to("POST", &update);
    assert_eq!(updates.len(), 2, "refused, then delivered");
    assert_eq!(
        updates[1].header("idempotency-key"),
        updates[0].header("idempotency-key")
    );
    assert_eq!(updates[1].body, updates[0].body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_refused_while_its_key_is_in_use_is_retried_as_the_same_request() {
    a_refused_update_is_retried_as_the_same_request(unsaved_stripe_error(
        409,
        "idempotency_error",
        "idempotency_key_in_use",
        "There is currently another in-progress request using this Idempotent Key.",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_refused_while_its_customer_is_locked_is_retried_as_the_same_request() {
    a_refused_update_is_retried_as_the_same_request(unsaved_stripe_error(
        429,
        "invalid_request_error",
        "lock_timeout",
        "This object cannot be accessed right now because another API request or Stripe process is currently accessing it.",
    ))
    .await;
}

/// A 429 without a Retry-After pauses the connector for the push's own
/// backoff, so that the other pushes do not meet the limit too; before,
/// nothing paused and every push spent attempts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_without_retry_after_pauses_the_connector() {
    a_rate_limit_pauses_the_connector(Fault::stripe_error(
        429,
        "rate_limit_error",
        "Too many requests",
    ))
    .await;
}

/// `Retry-After: 0` is read as none: taken as said, the connector was
/// never paused and a throttled remote was asked again within moments,
/// for ever (a rate limit spends no attempt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_with_a_zero_retry_after_pauses_the_connector() {
    a_rate_limit_pauses_the_connector(Fault::rate_limited(0)).await;
}

async fn a_rate_limit_pauses_the_connector(fault: Fault) {
    let h = harness(json!({"sync_backoff_base": "4s", "sync_backoff_max": "4s"})).await;
    h.proxy.push(Match::request("POST", "/v1/customers"), fault);
    let customer = h.app.create(json!({"email": email("limited-plain")})).await;
    let id = customer["id"].as_str().unwrap();
    h.app
        .wait_link(id, Duration::from_secs(10), |l| l["state"] == "retry")
        .await;
    let (_, connector) = h
        .app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["breaker"]["state"], "open", "{connector}");
    h.app.wait_synced(id, 1).await;
    assert_eq!(
        outcomes(&h.app.sync_status(id).await),
        ["retry_scheduled", "delivered"]
    );
}

/// Rate limits spend no attempt: the remote is up and says "later".
/// Three 429s, then a 500, against two attempts: the push waits the
/// limits out, has its attempts for the failure, and is delivered (it was
/// dead-lettered as `retries_exhausted` at the second 429).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_spends_no_attempt() {
    let h = harness(json!({
        "sync_max_attempts": 2,
        "sync_backoff_base": "50ms",
        "sync_backoff_max": "100ms",
    }))
    .await;
    for _ in 0..3 {
        h.proxy.push(
            Match::request("POST", "/v1/customers"),
            Fault::stripe_error(429, "rate_limit_error", "Too many requests"),
        );
    }
    h.proxy
        .push(Match::request("POST", "/v1/customers"), Fault::status(500));
    let customer = h
        .app
        .create(json!({"email": email("limited-thrice")}))
        .await;
    let id = customer["id"].as_str().unwrap();
    h.app.wait_synced(id, 1).await;
    assert_eq!(
        outcomes(&h.app.sync_status(id).await),
        [
            "retry_scheduled",
            "retry_scheduled",
            "retry_scheduled",
            "retry_scheduled",
            "delivered"
        ]
    );
}

/// The same for a read: a thin event's record fetched while Stripe answers
/// 429 waits the Retry-After and spends no attempt. Each 429 spent one,
/// and a bulk edit's events were dead-lettered while Stripe was healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_fetch_spends_no_attempt() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, stripe_signature};
    let h = harness(json!({
        "sync_max_attempts": 2,
        "sync_backoff_base": "50ms",
        "sync_backoff_max": "100ms",
    }))
    .await;
    let (_, remote_id) = synced_customer(&h, "limited-read", "Read").await;
    for _ in 0..3 {
        h.proxy.push(
            Match::request("GET", &format!("/v1/customers/{remote_id}")),
            Fault::rate_limited(1),
        );
    }
    let thin = thin_event("evt_limited_read", "v1.customer.updated", &remote_id).to_string();
    let (status, _) = deliver(&h.app, &thin, &stripe_signature(&thin, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let event = h
        .app
        .wait_inbox_settled("stripe", &remote_id, 1)
        .await
        .remove(0);
    assert_eq!(
        (event.state.as_str(), event.attempts),
        ("applied", 0),
        "{event:?}"
    );
}

/// A remote asking to be left alone for ever (a Retry-After of 584
/// billion years) pauses the connector for a day at most, and ferry goes
/// on serving: the push is scheduled a day later, and the breaker says
/// when it opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_retry_after_is_capped_at_a_day() {
    let h = harness(json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::rate_limited(u64::MAX / 1000),
    );
    let customer = h.app.create(json!({"email": email("forever")})).await;
    let id = customer["id"].as_str().unwrap();
    let link = h
        .app
        .wait_link(id, Duration::from_secs(15), |l| l["state"] == "retry")
        .await;
    let day = 24 * 60 * 60 * 1000;
    let due_in =
        link["next_attempt_at_ms"].as_i64().unwrap() - chrono::Utc::now().timestamp_millis();
    assert!(
        due_in > day - 60_000 && due_in <= day,
        "due in {due_in} ms: {link}"
    );
    let (status, connector) = h
        .app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(status, 200);
    let retry_in = connector["breaker"]["retry_in_ms"].as_i64().unwrap();
    assert!(retry_in > day - 60_000 && retry_in <= day, "{connector}");
    // Still serving.
    h.app.create(json!({"email": email("after-forever")})).await;
}

/// 500s then success: retried with backoff until delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_delivered() {
    let h = harness(json!({})).await;
    for _ in 0..2 {
        h.proxy
            .push(Match::request("POST", "/v1/customers"), Fault::status(500));
    }
    let address = email("flaky");
    let customer = h.app.create(json!({"email": address})).await;
    let id = customer["id"].as_str().unwrap();
    h.app.wait_synced(id, 1).await;
    assert_eq!(
        outcomes(&h.app.sync_status(id).await),
        ["retry_scheduled", "retry_scheduled", "delivered"]
    );
    assert_eq!(
        stripe_customers_by_email(&h.stripe.url(), &address)
            .await
            .len(),
        1
    );
}

/// An update that died timing out may still land: the link waits a call
/// timeout (5 s here) before a newer version goes, and a replay at once
/// keeps that wait. It pushed at once, and the late request could leave
/// the older values at the remote while ferry counted the newer synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_keeps_the_wait_of_an_update_that_died_timing_out() {
    let h = harness(
        json!({"sync_max_attempts": 1, "connector_call_timeout": "5s", "sync_lease": "12s"}),
    )
    .await;
    let (id, remote_id) = synced_customer(&h, "settle-replay", "Before").await;
    let update = format!("/v1/customers/{remote_id}");
    h.proxy.push(
        Match::request("POST", &update),
        Fault::ForwardThenDelay(Duration::from_secs(8)),
    );
    h.app.patch(&id, json!({"name": "Slow"})).await;
    h.app
        .wait_link(&id, Duration::from_secs(10), |l| l["state"] == "dead")
        .await;
    let due = h.app.failed_stripe_link(&id).await.next_attempt_at_ms;
    let letters = stripe_dead_letters(&h.app).await;
    let path = format!(
        "/api/v1/dead-letters/{}/replay",
        letters["data"][0]["id"].as_str().expect("a letter")
    );
    let replayed_at = ferry::store::now_ms();
    let (status, _) = h.app.send(reqwest::Method::POST, &path, None).await;
    assert_eq!(status, 200);
    let links = h.app.store.links_of(&id).await.expect("links");
    let link = links
        .iter()
        .find(|l| l.connector == "stripe")
        .expect("link");
    assert!(
        due > replayed_at + 1_000 && link.next_attempt_at_ms >= due,
        "due at {due}, replayed at {replayed_at}, due again at {}",
        link.next_attempt_at_ms
    );
    h.app.wait_synced(&id, 2).await;
}

/// An update Stripe answered with a 500 it saved under the key (the
/// request began executing; `Stripe-Should-Retry: false`): the retry goes
/// under a fresh key (the same fields), and is delivered. Under the same
/// key it would get the saved 500 back, for as long as Stripe keeps the
/// key (it was dead-lettered at once, or after ten identical answers).
/// So does one answered 424 (a dependency failed while it ran), which
/// Stripe saves alike, and a 503 with `Retry-After` (the SDK reads it as a
/// rate limit, which spends no attempt: under the same key it was retried,
/// and got back, until the key expired).
async fn an_update_answered_with_a_saved_server_error_is_retried_as_another_request(
    backend: Backend,
    status: u16,
) {
    let h = harness_on(backend, json!({})).await;
    let (id, remote_id) = synced_customer(&h, &format!("saved-{status}"), "Before").await;
    let update = format!("/v1/customers/{remote_id}");
    // A 5xx is retried whatever Stripe says; a 424 unless it says no.
    let mut fault = Fault::stripe_error(status, "api_error", "Something went wrong").with_header(
        "stripe-should-retry",
        if status >= 500 { "false" } else { "true" },
    );
    if status == 503 {
        fault = fault.with_header("retry-after", "1");
    }
    h.proxy.push(Match::request("POST", &update), fault.saved());
    h.app.patch(&id, json!({"name": "After"})).await;
    h.app.wait_synced(&id, 2).await;
    let updates = h.proxy.requests_to("POST", &update);
    assert_eq!(updates.len(), 2, "one failed attempt, one retry");
    assert_ne!(
        updates[0].header("idempotency-key"),
        updates[1].header("idempotency-key")
    );
    assert_eq!(updates[0].body, updates[1].body, "the same fields");
    let held = crate::helpers::stripe_customer(&h.stripe.url(), &remote_id)
        .await
        .expect("the record");
    assert_eq!(held["name"], "After", "{held:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_update_answered_with_a_saved_server_error_is_retried_as_another_request() {
    an_update_answered_with_a_saved_server_error_is_retried_as_another_request(
        Backend::Sqlite,
        500,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_answered_with_a_saved_unavailable_is_retried_as_another_request() {
    an_update_answered_with_a_saved_server_error_is_retried_as_another_request(
        Backend::Sqlite,
        503,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_answered_with_a_saved_failed_dependency_is_retried_as_another_request() {
    an_update_answered_with_a_saved_server_error_is_retried_as_another_request(
        Backend::Sqlite,
        424,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_update_answered_with_a_saved_server_error_is_retried_as_another_request() {
    an_update_answered_with_a_saved_server_error_is_retried_as_another_request(
        Backend::Postgres,
        500,
    )
    .await;
}

/// A create Stripe answered with a 500 it saved (`Stripe-Should-Retry:
/// false`): whether the customer was made is unknown, and every retry
/// under the key gets the 500 back. The create is not given up on as
/// refused, which forgets it (its replay a fresh create under a new key:
/// a second customer if the first was made): its retries run out, and the
/// link keeps the create, replayed under its key. So does one answered
/// with a saved 503 and `Retry-After` (read as a rate limit, which spends
/// no attempt: its retries got the 503 back until the key expired).
async fn a_create_answered_with_a_saved_failure_keeps_its_key(status: u16) {
    let h = harness(json!({"sync_max_attempts": 3})).await;
    let mut fault = Fault::stripe_error(status, "api_error", "Something went wrong")
        .with_header("stripe-should-retry", "false");
    if status == 503 {
        fault = fault.with_header("retry-after", "1");
    }
    h.proxy
        .push(Match::request("POST", "/v1/customers"), fault.saved());
    let customer = h.app.create(json!({"email": email("saved-create")})).await;
    let id = customer["id"].as_str().unwrap();
    h.app
        .wait_link(id, Duration::from_secs(20), |l| l["state"] == "dead")
        .await;
    let letters = stripe_dead_letters(&h.app).await;
    let letter = letters["data"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["customer_id"] == id))
        .expect("a dead letter");
    assert_eq!(letter["error_kind"], "retries_exhausted", "{letter}");
    let links = h.app.store.links_of(id).await.expect("links");
    let link = links
        .iter()
        .find(|l| l.connector == "stripe")
        .expect("a link");
    assert_eq!(link.pending_version, Some(1), "the create is kept");
    let creates = h.proxy.requests_to("POST", "/v1/customers");
    assert!(creates.len() >= 2, "retried");
    assert!(
        creates
            .iter()
            .all(|c| c.header("idempotency-key") == creates[0].header("idempotency-key")),
        "under one key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_a_saved_server_error_keeps_its_key() {
    a_create_answered_with_a_saved_failure_keeps_its_key(500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_a_saved_unavailable_keeps_its_key_and_ends() {
    a_create_answered_with_a_saved_failure_keeps_its_key(503).await;
}

/// The bus delivers a change at least once (a publish retried after a lost
/// acknowledgement, a consumer group that rewinds). A change delivered
/// again after its push was dead-lettered leaves the link dead: the same
/// version is not pushed again (nor dead-lettered twice). A person replays
/// it, or a newer change re-opens the link.
async fn a_change_delivered_again_leaves_its_dead_letter_alone(backend: Backend) {
    let h = harness_on(backend, json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::stripe_error(400, "invalid_request_error", "Invalid email address"),
    );
    let customer = h.app.create(json!({"email": email("again")})).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    h.app
        .wait_link(&id, Duration::from_secs(10), |l| l["state"] == "dead")
        .await;
    let notice = ferry::store::ChangeNotice {
        customer_id: id.clone(),
        version: 1,
        correlation_id: None,
        outbox_id: None,
        source_connector: None,
    };
    h.app
        .store
        .intake_changes(&[notice], &["stripe".to_owned()])
        .await
        .expect("intake");
    h.app.sync.wake();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let link = h
        .app
        .wait_link(&id, Duration::from_secs(1), |l| !l.is_null())
        .await;
    assert_eq!(
        (link["state"].as_str(), link["attempts"].as_i64()),
        (Some("dead"), Some(1)),
        "{link:#}"
    );
    assert_eq!(h.proxy.requests_to("POST", "/v1/customers").len(), 1);

    // A newer change re-opens it, and once it is delivered the letter of
    // the version that died is closed: nothing is left to send for it (it
    // stayed open, in the backlog and its alert, until a person replayed
    // it for nothing).
    h.app.patch(&id, json!({"name": "Newer"})).await;
    h.app.wait_synced(&id, 2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let letters = stripe_dead_letters(&h.app).await;
        if letters["data"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still open: {letters:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Looked at a page at a time, from where the last page stopped: every
    // delivered letter is closed however small the page, and one of a
    // version not delivered stays open.
    for (letter, version) in [
        ("dl_page_a", 1),
        ("dl_page_b", 2),
        ("dl_page_c", 99),
        ("dl_page_d", 1),
    ] {
        execute_raw(
            &h.app.database_url,
            &format!(
                "INSERT INTO dead_letters (id, customer_id, connector, direction, version, \
                 error_kind, error, attempts, created_at) SELECT '{letter}', customer_id, \
                 connector, direction, {version}, error_kind, error, attempts, created_at \
                 FROM dead_letters WHERE customer_id = '{id}' AND id NOT LIKE 'dl_page_%'"
            ),
            b"",
        )
        .await;
    }
    let (mut closed, mut after, mut pages) = (0, None, 0);
    loop {
        let (now, next) = h
            .app
            .store
            .close_superseded_dead_letters(after.as_ref(), 1)
            .await
            .expect("a page");
        (closed, after, pages) = (closed + now, next, pages + 1);
        if after.is_none() {
            break;
        }
        assert!(pages < 100, "the pages never end");
    }
    // Closed by these pages, or by the replica's own task if a round of it
    // came between.
    assert!(closed <= 3, "after {pages} pages");
    let letters = stripe_dead_letters(&h.app).await;
    let open: Vec<_> = letters["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["version"].clone())
        .collect();
    assert_eq!(open, [json!(99)], "{letters:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_change_delivered_again_leaves_its_dead_letter_alone() {
    a_change_delivered_again_leaves_its_dead_letter_alone(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_change_delivered_again_leaves_its_dead_letter_alone() {
    a_change_delivered_again_leaves_its_dead_letter_alone(Backend::Postgres).await;
}

/// A release rolled back to reads the dead letters a later one wrote: a
/// kind it does not know is listed as stored (the API's list and one
/// letter, the console's page) and replayed, not a 500 for every page
/// that holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_kind_from_a_later_release_is_listed_and_replayed() {
    let h = harness(json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::stripe_error(400, "invalid_request_error", "Invalid email address"),
    );
    let customer = h.app.create(json!({"email": email("later-kind")})).await;
    let id = customer["id"].as_str().unwrap();
    h.app
        .wait_link(id, Duration::from_secs(10), |l| l["state"] == "dead")
        .await;
    execute_raw(
        &h.app.database_url,
        "UPDATE dead_letters SET error_kind = 'a_kind_from_a_later_release'",
        &[],
    )
    .await;

    let letters = stripe_dead_letters(&h.app).await;
    let letter = &letters["data"][0];
    assert_eq!(
        letter["error_kind"], "a_kind_from_a_later_release",
        "{letters}"
    );
    let letter_id = letter["id"].as_str().unwrap();
    let (status, one) = h
        .app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/dead-letters/{letter_id}"),
            None,
        )
        .await;
    assert_eq!(
        (status, one["error_kind"].as_str()),
        (200, Some("a_kind_from_a_later_release")),
        "{one}"
    );
    let (client, cookie) = console_session(&h.app.base).await;
    let page = console_page(
        &client,
        &cookie,
        &format!("{}/console/dead-letters", h.app.base),
    )
    .await;
    assert!(page.contains("a_kind_from_a_later_release"), "{page}");

    let (status, replayed) = h
        .app
        .send(
            reqwest::Method::POST,
            &format!("/api/v1/dead-letters/{letter_id}/replay"),
            None,
        )
        .await;
    assert_eq!(
        (status, replayed["replayed"].as_u64()),
        (200, Some(1)),
        "{replayed}"
    );
    h.app.wait_synced(id, 1).await;
}

/// A permanent 400 dead-letters at once; replaying it after the cause is
/// fixed delivers it. Exhausted retries dead-letter too, and a bulk replay
/// by connector brings them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_dead_letter_and_replay_delivers() {
    let h = harness(json!({})).await;
    h.proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::stripe_error(400, "invalid_request_error", "Invalid email address"),
    );
    let customer = h.app.create(json!({"email": email("refused")})).await;
    let id = customer["id"].as_str().unwrap();
    let link = h
        .app
        .wait_link(id, Duration::from_secs(10), |l| l["state"] == "dead")
        .await;
    assert!(
        link["last_error"]
            .as_str()
            .unwrap()
            .contains("Invalid email"),
        "{link}"
    );
    assert_eq!(
        h.proxy.requests_to("POST", "/v1/customers").len(),
        1,
        "no retry of a permanent error"
    );

    let letters = stripe_dead_letters(&h.app).await;
    let letter = letters["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["customer_id"] == id)
        .expect("dead letter")
        .clone();
    assert_eq!(letter["error_kind"], "permanent");
    for (direction, expected) in [("outbound", 1), ("inbound", 0)] {
        let (status, filtered) = h
            .app
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/dead-letters?connector=stripe&direction={direction}"),
                None,
            )
            .await;
        assert_eq!(status, 200);
        let found = filtered["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["customer_id"] == id)
            .count();
        assert_eq!(found, expected, "{direction}");
    }
    let (status, problem) = h
        .app
        .send(
            reqwest::Method::GET,
            "/api/v1/dead-letters?direction=sideways",
            None,
        )
        .await;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (422, Some("direction"))
    );

    // The cause is fixed (the fault was one-off); replay.
    let path = format!(
        "/api/v1/dead-letters/{}/replay",
        letter["id"].as_str().unwrap()
    );
    let (status, replayed) = h.app.send(reqwest::Method::POST, &path, None).await;
    assert_eq!(
        (status, replayed["replayed"].as_u64()),
        (200, Some(1)),
        "{replayed}"
    );
    h.app.wait_synced(id, 1).await;
    let (_, open) = h
        .app
        .send(reqwest::Method::GET, "/api/v1/dead-letters", None)
        .await;
    assert_eq!(open["data"], json!([]), "nothing left open");
    let (status, again) = h.app.send(reqwest::Method::POST, &path, None).await;
    assert_eq!(
        (status, again["replayed"].as_u64()),
        (200, Some(0)),
        "a second replay is a no-op"
    );

    // Retries exhausted (5 attempts) → dead letter; bulk replay.
    for _ in 0..5 {
        h.proxy
            .push(Match::request("POST", "/v1/customers"), Fault::status(503));
    }
    let other = h.app.create(json!({"email": email("exhausted")})).await;
    let other_id = other["id"].as_str().unwrap();
    let link = h
        .app
        .wait_link(other_id, Duration::from_secs(20), |l| l["state"] == "dead")
        .await;
    assert_eq!(link["attempts"], 5, "{link}");
    let (status, replayed) = h
        .app
        .send(
            reqwest::Method::POST,
            "/api/v1/dead-letters/replay",
            Some(json!({"connector": "stripe"})),
        )
        .await;
    assert_eq!(
        (status, replayed["replayed"].as_u64()),
        (200, Some(1)),
        "{replayed}"
    );
    h.app.wait_synced(other_id, 1).await;

    let (status, problem) = h
        .app
        .send(
            reqwest::Method::POST,
            "/api/v1/dead-letters/dl_nope/replay",
            None,
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("dead_letter_not_found"))
    );
}

/// The remote goes down: the breaker opens, waiting behind it spends no
/// attempts, and when the remote is back everything is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_while_the_remote_is_down_and_recovers() {
    let h = harness(json!({"sync_max_attempts": 6})).await;
    h.proxy.set_down(true);
    let mut ids = Vec::new();
    for n in 0..6 {
        let customer = h
            .app
            .create(json!({"email": email(&format!("down{n}"))}))
            .await;
        ids.push(customer["id"].as_str().unwrap().to_owned());
    }
    // Three failures open the breaker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, connector) = h
            .app
            .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
            .await;
        if connector["breaker"]["state"] == "open" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "breaker never opened: {connector}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Pushes already in flight when it opened still fail and count; let
    // them land, then measure what waiting behind the breaker costs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spent_at_open = attempts(&h.app, &ids).await;
    let window = tokio::time::Instant::now();
    // Down for far longer than 6 attempts at ≤ 400 ms would take: only the
    // probes (one per 1 s cool-down) spend attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ids {
        let link = &h.app.sync_status(id).await["connectors"][0];
        assert_ne!(
            link["state"], "dead",
            "waiting behind the breaker spent the budget: {link}"
        );
    }
    let spent = attempts(&h.app, &ids).await - spent_at_open;
    // One probe per cool-down over the window as measured (the status
    // reads in it take longer on a busy machine), plus one in flight at
    // each end. Without the breaker, six customers retrying every 400 ms
    // would spend dozens.
    let probes = window.elapsed().as_secs_f64().ceil() as i64 + 2;
    assert!(
        spent <= probes,
        "only the probes count while open: {spent} attempts in {:?}",
        window.elapsed()
    );

    h.proxy.set_down(false);
    for id in &ids {
        h.app.wait_synced(id, 1).await;
    }
    let (_, connector) = h
        .app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["breaker"]["state"], "closed", "{connector}");
}

async fn attempts(app: &SyncApp, ids: &[String]) -> i64 {
    let mut total = 0;
    for id in ids {
        total += app.sync_status(id).await["connectors"][0]["attempts"]
            .as_i64()
            .unwrap_or(0);
    }
    total
}

/// One customer waiting for a retry does not hold up another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_for_one_customer_does_not_block_others() {
    let h = harness(json!({
        "sync_backoff_base": "2s",
        "sync_backoff_max": "3s",
        "sync_max_attempts": 20,
        "breaker_failure_threshold": 100,
    }))
    .await;
    let slow = h.app.create(json!({"email": email("slow")})).await;
    let slow_id = slow["id"].as_str().unwrap();
    let link = h.app.wait_synced(slow_id, 1).await;
    let remote = link["remote_id"].as_str().unwrap();
    // Its updates fail (on its own remote path) until the faults are
    // cleared: more of them than its retries (full jitter, so a retry can
    // come at once) can spend while the other customer syncs on a slow
    // machine.
    for _ in 0..10 {
        h.proxy.push(
            Match::request("POST", &format!("/v1/customers/{remote}")),
            Fault::status(500),
        );
    }
    h.app.patch(slow_id, json!({"name": "changed"})).await;
    h.app
        .wait_link(slow_id, Duration::from_secs(10), |l| l["state"] == "retry")
        .await;

    let fast = h.app.create(json!({"email": email("fast")})).await;
    let fast_id = fast["id"].as_str().unwrap();
    h.app.wait_synced(fast_id, 1).await;
    let slow_link = &h.app.sync_status(slow_id).await["connectors"][0];
    assert_eq!(
        slow_link["synced_version"], 1,
        "the other customer went first: {slow_link}"
    );
    h.proxy.clear_faults();
    h.app
        .wait_link(slow_id, Duration::from_secs(20), |l| {
            l["synced_version"] == 2
        })
        .await;
}

/// A replayed dead letter goes out under a new idempotency key. Stripe
/// saves the answer to a request that began executing, errors included,
/// under its key for a day: a replay under the old key got the saved error
/// back and was dead-lettered again, whatever had been fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_goes_under_a_new_key() {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "replay-key", "First").await;
    let (id, update) = (id.as_str(), format!("/v1/customers/{remote_id}"));
    h.proxy.push(
        Match::request("POST", &update),
        Fault::stripe_error(400, "invalid_request_error", "Refused for now").saved(),
    );
    h.app.patch(id, json!({"name": "Second"})).await;
    h.app
        .wait_link(id, Duration::from_secs(10), |l| l["state"] == "dead")
        .await;
    let letters = stripe_dead_letters(&h.app).await;
    let letter = letters["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["customer_id"] == id)
        .expect("dead letter")
        .clone();
    let path = format!(
        "/api/v1/dead-letters/{}/replay",
        letter["id"].as_str().unwrap()
    );
    let (status, replayed) = h.app.send(reqwest::Method::POST, &path, None).await;
    assert_eq!(status, 200, "{replayed}");
    h.app.wait_synced(id, 2).await;
    let updates = h.proxy.requests_to("POST", &update);
    let keys: Vec<_> = updates
        .iter()
        .map(|r| r.header("idempotency-key").expect("a key"))
        .collect();
    assert_eq!(keys.len(), 2, "{updates:?}");
    assert_ne!(keys[0], keys[1], "{updates:?}");
}

/// ferry's own pacing of a connector's requests is passing: a push whose
/// next token comes after its call's deadline waits for it, neither
/// dead-lettered as a refusal (the SDK takes `denied` for a request that
/// will never be allowed) nor counted against the remote. Twelve creates at
/// once against 3 requests a second and a 2 s call timeout: some calls run
/// out of budget, and every change still reaches Stripe, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_over_ferrys_own_rate_limit_wait_their_turn() {
    let h = harness(json!({"connector_requests_per_second": 3, "sync_max_attempts": 8})).await;
    let creates = (0..12).map(|n| {
        h.app
            .create(json!({"email": email(&format!("paced{n}")), "name": "Paced"}))
    });
    let customers = futures::future::join_all(creates).await;
    for customer in &customers {
        h.app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
    }
    let letters = stripe_dead_letters(&h.app).await;
    assert_eq!(letters["data"], json!([]), "{letters}");
    // A refusal by ferry's own pacing waits for the next slot: it spends
    // no attempt and leaves no failed delivery, and the breaker, which
    // judges the remote, never hears of it.
    for customer in &customers {
        let status = h.app.sync_status(customer["id"].as_str().unwrap()).await;
        let paced = status["history"]
            .as_array()
            .expect("history")
            .iter()
            .any(|d| {
                d["detail"]
                    .as_str()
                    .is_some_and(|detail| detail.contains("rate limit"))
            });
        assert!(
            !paced,
            "a refusal by ferry's own pacing was recorded: {status}"
        );
    }
    let (_, connector) = h
        .app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(connector["breaker"]["state"], "closed", "{connector}");
    // A create whose call ran out of time after it was sent goes again
    // under the same key (Stripe answers it from the first), so count the
    // creates that reached Stripe and their keys, not the requests.
    let creates = h.proxy.requests_to("POST", "/v1/customers");
    let reached = creates.iter().filter(|r| r.forwarded).count();
    assert_eq!(reached, 12, "{creates:?}");
    let keys: std::collections::BTreeSet<_> = creates
        .iter()
        .map(|r| r.header("idempotency-key").expect("every create has a key"))
        .collect();
    assert_eq!(keys.len(), 12, "{creates:?}");
}

/// An update whose record the remote no longer has (deleted there with no
/// event ferry took: Salesforce sends none) is a `not_found` dead letter
/// that says a replay meets the same answer and a reconciliation repairs
/// it; it said only "remote record not found".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_a_record_gone_says_how_to_repair_it() {
    let h = harness(json!({})).await;
    let (id, remote_id) = synced_customer(&h, "gone-update", "Before").await;
    h.proxy.push(
        Match::request("POST", &format!("/v1/customers/{remote_id}")),
        Fault::stripe_error(404, "invalid_request_error", "No such customer"),
    );
    h.app.patch(&id, json!({"name": "After"})).await;
    h.app
        .wait_link(&id, Duration::from_secs(20), |l| l["state"] == "dead")
        .await;
    let letters = stripe_dead_letters(&h.app).await;
    let letter = letters["data"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["customer_id"] == id.as_str()))
        .cloned()
        .expect("a dead letter");
    assert_eq!(letter["error_kind"], "not_found", "{letter}");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("No such customer") && error.contains("reconciliation"),
        "{letter}"
    );
}
