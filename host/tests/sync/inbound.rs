//! Remote change → local: localstripe's real signed webhooks, changes made
//! with Stripe's own Python library (as a person in the dashboard would),
//! and hand-signed deliveries for duplicates, replays and ordering.

use std::process::Command;
use std::time::Duration;

use ferry_test_support::localstripe::{venv_python, LocalStripe};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{email, spawn_sync_app, Backend, Setup, SyncApp, STRIPE_KEY, WEBHOOK_SECRET};

/// Runs Python with the official `stripe` library pointed at localstripe;
/// `code` may use `stripe` and prints a JSON result.
fn stripe_py(stripe_url: &str, code: &str) -> Value {
    let script = format!(
        "import json, stripe\nstripe.api_key = '{STRIPE_KEY}'\nstripe.api_base = '{stripe_url}'\n{code}"
    );
    let out = Command::new(venv_python().expect("venv"))
        .arg("-c")
        .arg(script)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "stripe library failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Signs `body` the way Stripe does (`t=…,v1=HMAC-SHA256("{t}.{body}")`).
pub(crate) fn stripe_signature(body: &str, secret: &str) -> String {
    let t = chrono::Utc::now().timestamp();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub(crate) async fn deliver(app: &SyncApp, body: &str, signature: &str) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/webhooks/stripe", app.base))
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("delivered");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

pub(crate) fn event(id: &str, kind: &str, created: i64, customer: Value) -> String {
    json!({"id": id, "object": "event", "type": kind, "created": created, "data": {"object": customer}}).to_string()
}

pub(crate) fn stripe_customer_json(id: &str, email: &str, name: &str) -> Value {
    json!({"id": id, "object": "customer", "email": email, "name": name, "metadata": {}})
}

async fn wait_for(
    app: &SyncApp,
    what: &str,
    check: impl AsyncFn(&SyncApp) -> Option<Value>,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = check(app).await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until stripe's inbox event `id` of `remote_id` is no longer
/// pending: its state and detail.
async fn outcome_of(app: &SyncApp, remote_id: String, id: &str) -> Value {
    outcome_past(app, &remote_id, id, &["pending"]).await
}

/// Waits until stripe's inbox event `id` of `remote_id` is in none of the
/// states `waiting`: its state and detail.
async fn outcome_past(app: &SyncApp, remote_id: &str, id: &str, waiting: &[&str]) -> Value {
    wait_for(app, id, async |app| {
        let events = app
            .store
            .inbox_of_remote("stripe", remote_id)
            .await
            .unwrap();
        events
            .into_iter()
            .find(|e| e.event_id == id && !waiting.contains(&e.state.as_str()))
            .map(|e| json!({"state": e.state.as_str(), "detail": e.detail}))
    })
    .await
}

/// Created, updated and deleted in Stripe by its own library: the same
/// happens in ferry, through localstripe's signed webhooks.
async fn dashboard_changes_reach_ferry(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    app.receive_stripe_webhooks(&stripe).await;
    let address = email("dashboard");

    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='Grace Hopper', phone='+15555550123')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let customer = wait_for(&app, "the Stripe customer in ferry", async |app| {
        app.customer_by_email(&address).await
    })
    .await;
    assert_eq!(customer["name"], "Grace Hopper");
    assert_eq!(customer["phone"], "+15555550123");
    let id = customer["id"].as_str().unwrap().to_owned();
    let link = app.wait_synced(&id, 1).await;
    assert_eq!(
        link["remote_id"],
        remote_id.as_str(),
        "linked to the Stripe customer"
    );

    stripe_py(
        &stripe.url(),
        &format!(
            "stripe.Customer.modify('{remote_id}', name='Rear Admiral Hopper')\nprint('null')"
        ),
    );
    wait_for(&app, "the rename", async |app| {
        let (_, c) = app
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/customers/{id}"),
                None,
            )
            .await;
        (c["name"] == "Rear Admiral Hopper").then_some(c)
    })
    .await;

    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.delete('{remote_id}')\nprint('null')"),
    );
    wait_for(&app, "the delete", async |app| {
        let (status, _) = app
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/customers/{id}"),
                None,
            )
            .await;
        (status == 404).then_some(Value::Null)
    })
    .await;
}

/// A change through ferry's API reaches Stripe; Stripe's webhooks come back
/// and are recognised as echoes: nothing applied twice, nothing pushed again.
async fn round_trip_is_not_applied_twice(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    // The second loop on PostgreSQL holds back while webhooks arrive.
    setup.extra = json!({"inbox_catch_up_after": "10s"});
    let app = spawn_sync_app(setup).await;
    app.receive_stripe_webhooks(&stripe).await;
    let customer = app
        .create(json!({"email": email("roundtrip"), "name": "Round Trip"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    app.wait_synced(id, 1).await;
    app.patch(id, json!({"name": "Round Trip 2"})).await;
    let link = app.wait_synced(id, 2).await;
    // Both echoes (the create's and the update's) landed and were settled.
    let remote_id = link["remote_id"].as_str().unwrap();
    app.wait_inbox_settled("stripe", remote_id, 2).await;
    let status = app.sync_status(id).await;
    assert_eq!(
        status["version"], 2,
        "no version from the echoes: {status:#}"
    );
    let delivered = status["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["outcome"] == "delivered")
        .count();
    assert_eq!(delivered, 2, "pushed once per change: {status:#}");
}

/// Bad signatures store nothing; duplicates are acknowledged once; old and
/// same-second events do not overwrite newer state; an unknown connector is
/// 404 and no admin token is needed.
async fn deliveries_are_verified_deduplicated_and_ordered(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    // One inbox loop, as `inbox_loops = 1` runs on PostgreSQL (SQLite
    // always runs one); the other tests run the default two.
    setup.extra = json!({"admin_token": "an-admin-token-0123456789", "inbox_loops": 1});
    let app = spawn_sync_app(setup).await;
    let address = email("ordered");
    let now = chrono::Utc::now().timestamp();
    let newer = event(
        "evt_newer",
        "customer.updated",
        now,
        stripe_customer_json("cus_remote1", &address, "Newer"),
    );
    let older = event(
        "evt_older",
        "customer.created",
        now - 10,
        stripe_customer_json("cus_remote1", &address, "Older"),
    );

    let (status, problem) = deliver(&app, &newer, &stripe_signature(&newer, "whsec_wrong")).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("invalid_signature"))
    );
    let (status, problem) = deliver(&app, &newer, "").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("invalid_signature"))
    );
    assert!(
        app.store
            .inbox_of_remote("stripe", "cus_remote1")
            .await
            .unwrap()
            .is_empty(),
        "nothing stored"
    );

    let (status, receipt) = deliver(&app, &newer, &stripe_signature(&newer, WEBHOOK_SECRET)).await;
    assert_eq!(
        (status, receipt["stored"].as_u64()),
        (200, Some(1)),
        "{receipt}"
    );
    let (status, receipt) = deliver(&app, &newer, &stripe_signature(&newer, WEBHOOK_SECRET)).await;
    assert_eq!(
        (status, receipt["stored"].as_u64()),
        (200, Some(0)),
        "a redelivery is acknowledged, not stored"
    );
    let customer = wait_for(&app, "the customer", async |app| {
        app.customer_by_email(&address).await
    })
    .await;
    let id = customer["id"].as_str().unwrap().to_owned();

    // The older event arrives late: stale, skipped.
    let (status, _) = deliver(&app, &older, &stripe_signature(&older, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    wait_for(&app, "the stale event to be skipped", async |app| {
        let events = app
            .store
            .inbox_of_remote("stripe", "cus_remote1")
            .await
            .unwrap();
        events
            .iter()
            .find(|e| e.event_id == "evt_older" && e.state.as_str() == "skipped")
            .map(|_| Value::Null)
    })
    .await;
    let (_, current) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/customers/{id}"),
            None,
        )
        .await;
    assert_eq!(current["name"], "Newer");
    assert_eq!(
        current["version"], 1,
        "neither the duplicate nor the stale event wrote"
    );
    // No bus: the events were stored as handed over, so a broker configured
    // later is not sent them and the unpublished index stays empty.
    assert!(app.store.unpublished_inbox(10).await.unwrap().is_empty());

    let (status, problem) = app
        .client
        .post(format!("{}/webhooks/nope", app.base))
        .body("{}")
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map(|s| (s, ()))
        .unwrap();
    assert_eq!(status, 404, "{problem:?}");
}

/// Several events of each of many new records, whose emails differ,
/// delivered many at once to two inbox loops, which then hold events of
/// one record at the same time:
/// - both may decide to create its customer (neither sees a link, and the
///   emails differ); the second to write finds the record linked and
///   decides again (its event is then stale) rather than dead-lettering
///   it. Delivered newest first, most events of a record meet this.
/// - one may read the record's link before the other applies an event and
///   its customer after: the customer looks changed since the link's
///   snapshot, and the merge would take the other event's values for a
///   local change ("merged with conflicting fields") and keep them over
///   the newer remote ones. Its write finds the link moved on and decides
///   again. Delivered oldest first, most events of a record are applied,
///   each over the one before; without the link's check this failed 18
///   runs in 20 (with it, 30 in 30 passed).
///
/// Each record ends as one customer at its newest event, and no event was
/// taken for a conflict (nothing changed locally).
async fn two_loops_on_the_events_of_new_records(
    backend: Backend,
    records: usize,
    events: usize,
    newest_first: bool,
) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.extra = json!({"inbox_loops": 2});
    let app = spawn_sync_app(setup).await;
    let now = chrono::Utc::now().timestamp();
    let emails: Vec<Vec<String>> = (0..records)
        .map(|r| {
            (0..events)
                .map(|k| email(&format!("rec{r}-event{k}")))
                .collect()
        })
        .collect();
    let newest = events - 1;
    let mut signed = Vec::new();
    let order: Vec<usize> = match newest_first {
        true => (0..events).rev().collect(),
        false => (0..events).collect(),
    };
    for k in order {
        for (r, emails) in emails.iter().enumerate() {
            let body = event(
                &format!("evt_rec_{r}_{k}"),
                "customer.updated",
                // One second apart: each event is newer than the one
                // before (a shared second would be fetched afresh).
                now - events as i64 + k as i64,
                stripe_customer_json(
                    &format!("cus_rec_{r}"),
                    &emails[k],
                    &format!("Record {r}, event {k}"),
                ),
            );
            let signature = stripe_signature(&body, WEBHOOK_SECRET);
            signed.push((body, signature));
        }
    }
    for chunk in signed.chunks(32) {
        let deliveries = chunk
            .iter()
            .map(|(body, signature)| deliver(&app, body, signature));
        for (status, receipt) in futures::future::join_all(deliveries).await {
            assert_eq!((status, receipt["stored"].as_u64()), (200, Some(1)));
        }
    }
    for (r, emails) in emails.iter().enumerate() {
        let remote = format!("cus_rec_{r}");
        let states = wait_for(&app, "the record's events to be applied", async |app| {
            let events = app.store.inbox_of_remote("stripe", &remote).await.unwrap();
            events
                .iter()
                .all(|e| matches!(e.state.as_str(), "applied" | "skipped" | "dead"))
                .then(|| {
                    json!(events
                        .iter()
                        .map(|e| format!("{} {} {:?}", e.event_id, e.state.as_str(), e.detail))
                        .collect::<Vec<_>>())
                })
        })
        .await;
        assert!(
            states.as_array().unwrap().iter().all(|s| {
                let s = s.as_str().unwrap();
                !s.contains(" dead ") && !s.contains("conflicting")
            }),
            "{remote}: {states:#}"
        );
        let customer = app
            .customer_by_email(&emails[newest])
            .await
            .unwrap_or_else(|| panic!("{remote}'s customer, at its newest email: {states:#}"));
        assert_eq!(customer["name"], format!("Record {r}, event {newest}"));
    }
    let (_, page) = app
        .send(reqwest::Method::GET, "/api/v1/customers?limit=100", None)
        .await;
    assert_eq!(
        page["data"].as_array().map(Vec::len),
        Some(records),
        "no record made two customers"
    );
}

/// A Stripe customer whose email a local customer already has is linked
/// to it, not duplicated; the city only Stripe had reaches ferry, and the
/// phone only ferry had reaches Stripe (a first sync's union goes both
/// ways), alone: nothing else is written there (Stripe's email keeps its
/// case). Without the city the customer does not change, and the push
/// goes as a push-back of the version ferry has (`remote_city` false): it
/// sent the whole record.
async fn remote_customer_matches_local_email(backend: Backend, remote_city: bool) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    // Stripe starts unconfigured, so nothing is queued for it: the local
    // customer is made before Stripe is switched on.
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let address = email("match");
    let local = app
        .create(json!({"email": address, "name": "Local Name", "phone": "+15550001111"}))
        .await;
    // Switch Stripe on only once the relay took the create in; otherwise
    // (a loaded machine) it would see Stripe on and push the customer.
    let local_id = local["id"].as_str().expect("id").to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app
        .store
        .outbox_events(&local_id)
        .await
        .expect("outbox")
        .iter()
        .any(|e| e.queued)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay never took the create in"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, _) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()}, "secrets": {"api_key": STRIPE_KEY, "webhook_secret": WEBHOOK_SECRET}})),
        )
        .await;
    assert_eq!(status, 200);
    let upper = address.to_uppercase();
    let created = stripe_py(
        &stripe.url(),
        &match remote_city {
            true => format!("c = stripe.Customer.create(email='{upper}', name='Local Name', address={{'city': 'Leeds'}})\nprint(str(c))"),
            false => format!("c = stripe.Customer.create(email='{upper}', name='Local Name')\nprint(str(c))"),
        },
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let body = event(
        "evt_match",
        "customer.created",
        chrono::Utc::now().timestamp(),
        created,
    );
    let (status, _) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let id = local["id"].as_str().unwrap();
    let link = app
        .wait_link(id, Duration::from_secs(10), |l| {
            l["remote_id"] == remote_id.as_str() && l["state"] == "synced"
        })
        .await;
    assert_eq!(link["remote_id"], remote_id.as_str());
    let read = format!("print(str(stripe.Customer.retrieve('{remote_id}')))");
    let at_stripe = stripe_py(&stripe.url(), &read);
    assert_eq!(at_stripe["phone"], "+15550001111", "ferry's phone pushed");
    assert_eq!(at_stripe["email"], upper, "only the phone was sent");
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["phone"], "+15550001111");
    if remote_city {
        assert_eq!(at_stripe["address"]["city"], "Leeds");
        assert_eq!(customer["address"]["city"], "Leeds");
    } else {
        assert_eq!(customer["version"], 1, "{customer}");
    }
    let (_, page) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/customers?email={address}"),
            None,
        )
        .await;
    assert_eq!(
        page["data"].as_array().unwrap().len(),
        1,
        "no duplicate customer"
    );
}

/// Deletes Stripe customer `remote_id` directly in localstripe.
async fn stripe_delete(stripe: &LocalStripe, remote_id: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{}/v1/customers/{remote_id}", stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .send()
        .await
        .expect("localstripe answers");
    assert!(deleted.status().is_success());
}

/// Stores a Stripe event carrying record `remote_id` (email `address`,
/// dated `occurred_at_ms`) as a webhook would, and wakes the workers.
async fn store_copy(
    app: &SyncApp,
    event_id: &str,
    remote_id: &str,
    address: &str,
    occurred_at_ms: i64,
) {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    let copy = NewInboxEvent {
        event_id: event_id.into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: remote_id.into(),
        occurred_at_ms,
        record: Some(json!({"id": remote_id, "email": address, "name": "Gone Since"})),
        origin_key: None,
        remote_type: "customer.updated".into(),
        policy: None,
    };
    app.store
        .store_inbox_many(&[("stripe", std::slice::from_ref(&copy), None)])
        .await
        .expect("stored");
    app.sync.wake();
}

/// Record `remote_id`'s inbox events once one of them is in `state`.
async fn inbox_once(
    app: &SyncApp,
    remote_id: &str,
    state: ferry::store::inbox::InboxState,
) -> Vec<ferry::store::inbox::InboxEvent> {
    app.wait_inbox(remote_id, |events| events.iter().any(|e| e.state == state))
        .await
}

/// A delivery its sender retried through an outage (dated more than an
/// hour ago) of a record no link holds is read again before it is applied:
/// deleted since, nothing is made of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_delivery_of_an_unlinked_record_is_read_again() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("late-copy");
    let remote_id = crate::helpers::stripe_create(
        &stripe.url(),
        &[("email", &address), ("name", "Gone Since")],
    )
    .await;
    stripe_delete(&stripe, &remote_id).await;
    let two_hours_ago = chrono::Utc::now().timestamp_millis() - 2 * 3_600_000;
    store_copy(&app, "evt_late_copy", &remote_id, &address, two_hours_ago).await;
    let events = inbox_once(&app, &remote_id, ferry::store::inbox::InboxState::Skipped).await;
    assert!(
        app.customer_by_email(&address).await.is_none(),
        "{events:?}"
    );
}

/// An inbound dead letter replayed long after it was taken in: a record
/// no link holds is read again before it is applied (deleted since, it is
/// skipped). Applied as it came, a record deleted since came back as a
/// customer and went to every other system (retention had trimmed the
/// delete that said so; Salesforce sends none); here, under `reject`, it
/// was dead-lettered again as a duplicate email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_copy_of_an_unlinked_record_is_read_again() {
    use ferry::store::inbox::InboxState;
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("old-copy");
    let local = app.create(json!({"email": address, "name": "Here"})).await;
    app.wait_synced(local["id"].as_str().expect("id"), 1).await;
    // Another Stripe record with the customer's email: refused (`reject`).
    let remote_id = crate::helpers::stripe_create(
        &stripe.url(),
        &[("email", &address), ("name", "Gone Since")],
    )
    .await;
    let now = chrono::Utc::now().timestamp_millis();
    store_copy(&app, "evt_old_copy", &remote_id, &address, now).await;
    inbox_once(&app, &remote_id, InboxState::Dead).await;

    // Days later the record is gone; the letter is replayed.
    stripe_delete(&stripe, &remote_id).await;
    crate::helpers::execute_raw(
        &app.database_url,
        "UPDATE inbox SET received_at = '2026-01-01 00:00:00+00:00' WHERE event_id = 'evt_old_copy'",
        b"",
    )
    .await;
    let (status, replayed) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/dead-letters/replay",
            Some(json!({"connector": "stripe", "direction": "inbound"})),
        )
        .await;
    assert_eq!(status, 200, "{replayed}");
    let events = inbox_once(&app, &remote_id, InboxState::Skipped).await;
    assert!(
        events[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("no longer exists")),
        "{events:?}"
    );
}

/// An event without a time (`created` 0) after a dated one is dated on
/// arrival and applied; at time zero it was skipped as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undated_event_is_dated_on_arrival() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("undated");
    let dated = event(
        "evt_dated",
        "customer.created",
        chrono::Utc::now().timestamp() - 60,
        stripe_customer_json("cus_undated", &address, "Dated"),
    );
    let undated = event(
        "evt_undated",
        "customer.updated",
        0,
        stripe_customer_json("cus_undated", &address, "Undated"),
    );
    let (status, _) = deliver(&app, &dated, &stripe_signature(&dated, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    app.wait_inbox_settled("stripe", "cus_undated", 1).await;
    let (status, _) = deliver(&app, &undated, &stripe_signature(&undated, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let events = app.wait_inbox_settled("stripe", "cus_undated", 2).await;
    assert!(
        events.iter().all(|e| e.state.as_str() == "applied"),
        "{events:?}"
    );
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "Undated");
}

/// Two events of one Stripe record no link holds yet, applied by two inbox
/// loops at once, the newer one first (PostgreSQL: the second loop claims
/// the older one while the first one's transaction is still open): the
/// older one is skipped as stale. Before, its decision read no link (the
/// newer one's was not committed), it wrote the customer, and its link
/// write waited for the newer one's and took it over: the customer and
/// the merge base went back to the older event's values. A trigger holds
/// the first link write open for two seconds, as a slow commit would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_events_of_a_record_no_link_held_apply_in_order() {
    let mut setup = Setup::new(Backend::Postgres, "http://127.0.0.1:9");
    setup.extra = json!({"duplicate_email_policy": "merge", "inbox_loops": 2});
    let app = spawn_sync_app(setup).await;
    let address = email("two-loops");
    let customer = app.create(json!({"email": address, "name": "Ada"})).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    // Its push to Stripe cannot land (nothing listens): its link waits,
    // without a record, for the one the events bring.
    app.wait_link_of("stripe", &id, Duration::from_secs(20), |l| !l.is_null())
        .await;
    for sql in [
        "CREATE FUNCTION ferry_test_slow_link() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$",
        "CREATE TRIGGER ferry_test_slow_link AFTER UPDATE ON sync_links FOR EACH ROW \
         WHEN (NEW.remote_id = 'cus_twoloops' AND OLD.remote_id IS DISTINCT FROM NEW.remote_id) \
         EXECUTE FUNCTION ferry_test_slow_link()",
    ] {
        crate::helpers::execute_raw(&app.database_url, sql, &[]).await;
    }
    let now = chrono::Utc::now().timestamp();
    let newer = event(
        "evt_twoloops_newer",
        "customer.updated",
        now,
        stripe_customer_json("cus_twoloops", &address, "Ada"),
    );
    let mut with_phone = stripe_customer_json("cus_twoloops", &address, "Ada");
    with_phone["phone"] = json!("+15555550100");
    let older = event(
        "evt_twoloops_older",
        "customer.created",
        now - 60,
        with_phone,
    );
    let (status, _) = deliver(&app, &newer, &stripe_signature(&newer, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    // The newer one's link write is under way (held by the trigger).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = deliver(&app, &older, &stripe_signature(&older, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let newer = outcome_of(&app, "cus_twoloops".into(), "evt_twoloops_newer").await;
    let older = outcome_of(&app, "cus_twoloops".into(), "evt_twoloops_older").await;
    assert_eq!(newer["state"], "applied", "{newer}");
    assert_eq!(older["state"], "skipped", "{older}");
    let customer = app.customer(&id).await;
    assert_eq!(customer["phone"], Value::Null, "{customer}");
}

/// A delete read no link (the batch's read, taken before an earlier group
/// of the claim was applied), and another loop meanwhile applied a newer
/// event of the record (an undelete) and linked it: the delete decides
/// again from the link, and is skipped as stale. It went on from the link
/// it found on its second look, past the stale and held checks, and
/// deleted the customer the newer event had made (and fanned the delete
/// out). The earlier group is a thin event whose read of Stripe is held
/// three seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_finds_a_newer_link_on_its_second_look_decides_again() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let mut setup = Setup::new(Backend::Postgres, &proxy.url());
    setup.extra = json!({"inbox_loops": 2, "sync_concurrency": 1});
    let app = spawn_sync_app(setup).await;
    let slow = stripe_py(
        &stripe.url(),
        &format!(
            "c = stripe.Customer.create(email='{}', name='Slow')\nprint(json.dumps({{'id': c.id}}))",
            email("second-look-slow")
        ),
    )["id"]
        .as_str()
        .expect("id")
        .to_owned();
    proxy.push(
        Match::request("GET", &format!("/v1/customers/{slow}")),
        Fault::ForwardThenDelay(Duration::from_secs(3)),
    );
    let address = email("second-look");
    let now = chrono::Utc::now().timestamp_millis();
    let delete = NewInboxEvent {
        kind: RemoteChange::Delete,
        remote_type: "customer.deleted".into(),
        ..stripe_upsert(
            "evt_second_look_delete",
            "cus_secondlook",
            now - 60_000,
            Some(stripe_customer_json("cus_secondlook", &address, "Ada")),
        )
    };
    app.store
        .store_inbox_many(&[(
            "stripe",
            &[
                stripe_upsert("evt_second_look_slow", &slow, now, None),
                delete,
            ][..],
            None,
        )])
        .await
        .expect("stored");
    app.sync.wake();
    // One loop holds both, reading the slow record; the other applies the
    // undelete.
    proxy
        .wait_for(Duration::from_secs(20), |log| {
            log.iter()
                .any(|r| r.is("GET", &format!("/v1/customers/{slow}")))
        })
        .await
        .expect("the slow read went out");
    store_stripe_event(
        &app,
        stripe_upsert(
            "evt_second_look_undelete",
            "cus_secondlook",
            now,
            Some(stripe_customer_json("cus_secondlook", &address, "Ada")),
        ),
    )
    .await;
    let undelete = outcome_of(&app, "cus_secondlook".into(), "evt_second_look_undelete").await;
    assert_eq!(undelete["state"], "applied", "{undelete}");
    let delete = outcome_of(&app, "cus_secondlook".into(), "evt_second_look_delete").await;
    assert_eq!(delete["state"], "skipped", "{delete}");
    assert!(
        delete["detail"]
            .as_str()
            .is_some_and(|d| d.contains("stale")),
        "{delete}"
    );
    assert!(
        app.customer_by_email(&address).await.is_some(),
        "the undeleted record's customer lives"
    );
}

/// A Stripe `customer.updated` of `remote_id` dated `at_ms`, as a replica
/// stores one it took in: `record` its payload, none for a thin event.
fn stripe_upsert(
    event_id: &str,
    remote_id: &str,
    at_ms: i64,
    record: Option<Value>,
) -> ferry::store::inbox::NewInboxEvent {
    ferry::store::inbox::NewInboxEvent {
        event_id: event_id.into(),
        entity: "customer".into(),
        kind: ferry::store::inbox::RemoteChange::Upsert,
        remote_id: remote_id.into(),
        occurred_at_ms: at_ms,
        record,
        origin_key: None,
        remote_type: "customer.updated".into(),
        policy: None,
    }
}

/// Stores `event` for Stripe and wakes the inbox.
async fn store_stripe_event(app: &SyncApp, event: ferry::store::inbox::NewInboxEvent) {
    app.store
        .store_inbox_many(&[("stripe", std::slice::from_ref(&event), None)])
        .await
        .expect("stored");
    app.sync.wake();
}

/// A thin event (no record: "look again") is applied by fetching what
/// holds now, so it is never stale, whatever its date. One dated ahead (a
/// replica's fast clock dated it on arrival) no longer makes the next one,
/// dated by a correct clock, look older than what was applied: that later
/// change was skipped as stale, and lost. A thin delete dated behind is
/// applied when the record is gone, and retried when asking failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_event_dated_behind_the_last_one_is_still_applied() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &proxy.url())).await;
    let address = email("thin");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='First')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let now = chrono::Utc::now().timestamp_millis();
    let thin = |id: &str, at: i64| stripe_upsert(id, &remote_id, at, None);
    let store = |event: NewInboxEvent| store_stripe_event(&app, event);
    let applied = |id: &'static str| outcome_of(&app, remote_id.clone(), id);
    store(thin("evt_thin_ahead", now + 2_000)).await;
    let first = applied("evt_thin_ahead").await;
    assert_eq!(first["state"], "applied", "{first}");
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.modify('{remote_id}', name='Second')\nprint('{{}}')"),
    );
    store(thin("evt_thin_behind", now)).await;
    let second = applied("evt_thin_behind").await;
    assert_eq!(second["state"], "applied", "{second}");
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "Second", "{customer}");

    // So is a thin delete dated behind, once the remote says the record
    // is gone: it was skipped as stale, and the link stayed live. Asking
    // fails first (a 503): the delete is retried, not skipped.
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.delete('{remote_id}')\nprint('{{}}')"),
    );
    proxy.push(
        Match::request("GET", &format!("/v1/customers/{remote_id}")),
        Fault::status(503),
    );
    store(NewInboxEvent {
        kind: RemoteChange::Delete,
        remote_type: "customer.deleted".into(),
        ..thin("evt_thin_delete_behind", now + 1_000)
    })
    .await;
    let mut deleted = applied("evt_thin_delete_behind").await;
    if deleted["state"] == "retry" {
        // Looked at again after its backoff.
        deleted = outcome_past(
            &app,
            &remote_id,
            "evt_thin_delete_behind",
            &["pending", "retry"],
        )
        .await;
    }
    assert_eq!(deleted["state"], "applied", "{deleted}");
    assert_eq!(proxy.pending_faults(), 0, "the failed read was made");
    assert!(app.customer_by_email(&address).await.is_none());
}

/// A dated event less than a remote tick behind a thin one is read again,
/// not skipped as stale: the thin event was dated on arrival in
/// milliseconds, Stripe dates its events in whole seconds, and an edit made
/// after the thin event's read in the same second looked older than it
/// (Stripe's snapshot endpoint beside an event destination).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dated_event_a_tick_behind_a_thin_one_is_read_again() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("tick");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='First')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let second = chrono::Utc::now().timestamp() * 1_000;
    let event = |id: &str, at: i64, record| stripe_upsert(id, &remote_id, at, record);
    let store = |event| store_stripe_event(&app, event);
    store(event("evt_tick_thin", second + 600, None)).await;
    let thin = outcome_of(&app, remote_id.clone(), "evt_tick_thin").await;
    assert_eq!(thin["state"], "applied", "{thin}");
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.modify('{remote_id}', name='Second')\nprint('{{}}')"),
    );
    let record = json!({"id": remote_id, "email": address, "name": "Second"});
    store(event("evt_tick_dated", second, Some(record))).await;
    let dated = outcome_of(&app, remote_id.clone(), "evt_tick_dated").await;
    assert_eq!(dated["state"], "applied", "{dated}");
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "Second", "{customer}");

    // So is a delete with its record in the same second, once the remote
    // says the record is gone: it was skipped as stale, the customer kept
    // live and every later push a `not_found` dead letter.
    store(event("evt_tick_thin_again", second + 700, None)).await;
    let thin = outcome_of(&app, remote_id.clone(), "evt_tick_thin_again").await;
    assert_eq!(thin["state"], "applied", "{thin}");
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.delete('{remote_id}')\nprint('{{}}')"),
    );
    let record = json!({"id": remote_id, "email": address, "name": "Second", "deleted": true});
    store(NewInboxEvent {
        kind: RemoteChange::Delete,
        remote_type: "customer.deleted".into(),
        ..event("evt_tick_deleted", second, Some(record))
    })
    .await;
    let deleted = outcome_of(&app, remote_id.clone(), "evt_tick_deleted").await;
    assert_eq!(deleted["state"], "applied", "{deleted}");
    assert!(app.customer_by_email(&address).await.is_none());
}

/// A thin event older than its record's delete is still stale: the fetch
/// would find nothing, and the late trigger would be dead-lettered where it
/// belongs skipped. So is one delivered after the delete (thin events are
/// dated on arrival: it looks newer than the delete), and one that comes
/// before its record's delete event although the record is gone already
/// (retried, not dead-lettered at once, until the delete is applied).
/// Before, both ended as dead letters no replay could mend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_event_older_than_the_records_delete_is_skipped() {
    use ferry::store::inbox::{NewInboxEvent, RemoteChange};
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("thin-gone");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='Gone')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let now = chrono::Utc::now().timestamp_millis();
    let event = |id: &str, kind: RemoteChange, at: i64| NewInboxEvent {
        event_id: id.into(),
        entity: "customer".into(),
        kind,
        remote_id: remote_id.clone(),
        occurred_at_ms: at,
        record: None,
        origin_key: None,
        remote_type: "customer.updated".into(),
        policy: None,
    };
    let finished = |id: &'static str| outcome_of(&app, remote_id.clone(), id);
    for (id, kind, at) in [
        ("evt_gone_first", RemoteChange::Upsert, now),
        ("evt_gone_deleted", RemoteChange::Delete, now + 2_000),
        ("evt_gone_late", RemoteChange::Upsert, now + 1_000),
        ("evt_gone_after", RemoteChange::Upsert, now + 3_000),
    ] {
        if kind == RemoteChange::Delete {
            stripe_py(
                &stripe.url(),
                &format!("stripe.Customer.delete('{remote_id}')\nprint('{{}}')"),
            );
        }
        app.store
            .store_inbox_many(&[("stripe", std::slice::from_ref(&event(id, kind, at)), None)])
            .await
            .expect("stored");
        app.sync.wake();
        let done = finished(id).await;
        let expected = if id.ends_with("_late") || id.ends_with("_after") {
            "skipped"
        } else {
            "applied"
        };
        assert_eq!(done["state"], expected, "{id}: {done}");
    }

    // Another record: deleted in Stripe, its thin update stored before the
    // delete event.
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{}', name='Gone Too')\nprint(json.dumps({{'id': c.id}}))", email("thin-gone-too")),
    );
    let other = created["id"].as_str().unwrap().to_owned();
    let other_event = |id: &str, kind: RemoteChange, at: i64| NewInboxEvent {
        remote_id: other.clone(),
        ..event(id, kind, at)
    };
    app.store
        .store_inbox_many(&[(
            "stripe",
            &[other_event("evt_too_first", RemoteChange::Upsert, now)],
            None,
        )])
        .await
        .expect("stored");
    app.sync.wake();
    let done = outcome_of(&app, other.clone(), "evt_too_first").await;
    assert_eq!(done["state"], "applied", "{done}");
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.delete('{other}')\nprint('{{}}')"),
    );
    app.store
        .store_inbox_many(&[(
            "stripe",
            &[other_event(
                "evt_too_thin",
                RemoteChange::Upsert,
                now + 1_000,
            )],
            None,
        )])
        .await
        .expect("stored");
    app.sync.wake();
    // Looked at, found gone, and put back to wait for the delete.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = app.store.inbox_of_remote("stripe", &other).await.unwrap();
        let thin = events
            .iter()
            .find(|e| e.event_id == "evt_too_thin")
            .unwrap();
        if thin.attempts > 0 {
            assert_eq!(thin.state.as_str(), "retry", "{thin:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{thin:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.store
        .store_inbox_many(&[(
            "stripe",
            &[other_event(
                "evt_too_deleted",
                RemoteChange::Delete,
                now + 2_000,
            )],
            None,
        )])
        .await
        .expect("stored");
    app.sync.wake();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let thin = loop {
        let events = app.store.inbox_of_remote("stripe", &other).await.unwrap();
        let thin = events
            .into_iter()
            .find(|e| e.event_id == "evt_too_thin")
            .unwrap();
        if ["applied", "skipped", "dead"].contains(&thin.state.as_str()) {
            break thin;
        }
        assert!(tokio::time::Instant::now() < deadline, "{thin:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(thin.state.as_str(), "skipped", "{thin:?}");

    // A record nothing links: its delete came (and was skipped: nothing to
    // delete), then its thin `created`, dated later on arrival. Gone, and
    // the delete in the inbox says so.
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{}', name='Never Linked')\nprint(json.dumps({{'id': c.id}}))", email("thin-never")),
    );
    let never = created["id"].as_str().unwrap().to_owned();
    stripe_py(
        &stripe.url(),
        &format!("stripe.Customer.delete('{never}')\nprint('{{}}')"),
    );
    let never_event = |id: &str, kind: RemoteChange, at: i64| NewInboxEvent {
        remote_id: never.clone(),
        ..event(id, kind, at)
    };
    for (id, kind, at) in [
        ("evt_never_deleted", RemoteChange::Delete, now + 1_000),
        ("evt_never_created", RemoteChange::Upsert, now + 2_000),
    ] {
        app.store
            .store_inbox_many(&[("stripe", &[never_event(id, kind, at)], None)])
            .await
            .expect("stored");
        app.sync.wake();
        let done = outcome_of(&app, never.clone(), id).await;
        assert_eq!(done["state"], "skipped", "{id}: {done}");
    }
}

/// Stripe does not promise order. A `customer.created` it retried (ferry
/// answered 503 the first time) can come after the `customer.deleted` that
/// followed it: the record is gone, and is not made a customer. And an
/// update dated the deleted record's last second, delivered after its
/// delete, is looked up again (its order is in doubt), found gone, and
/// left to the delete: skipped, not a dead letter no replay could mend.
async fn events_delivered_after_their_records_delete(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let create_in_stripe = |address: &str| {
        let created = stripe_py(
            &stripe.url(),
            &format!("c = stripe.Customer.create(email='{address}', name='Short Lived')\nprint(json.dumps({{'id': c.id}}))"),
        );
        created["id"].as_str().unwrap().to_owned()
    };
    let delete_in_stripe = |remote_id: &str| {
        stripe_py(
            &stripe.url(),
            &format!("stripe.Customer.delete('{remote_id}')\nprint('{{}}')"),
        );
    };
    let send = async |id: &str, kind: &str, at: i64, record: Value| {
        let body = event(id, kind, at, record);
        let (status, problem) =
            deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200, "{id}: {problem}");
    };
    let now = chrono::Utc::now().timestamp();

    // The delete first, then the create it followed.
    let address = email("deleted-first");
    let remote_id = create_in_stripe(&address);
    delete_in_stripe(&remote_id);
    let record = stripe_customer_json(&remote_id, &address, "Short Lived");
    send("evt_gone_deleted", "customer.deleted", now, record.clone()).await;
    let deleted = outcome_of(&app, remote_id.clone(), "evt_gone_deleted").await;
    assert_eq!(deleted["state"], "skipped", "{deleted}");
    send("evt_gone_created", "customer.created", now - 1, record).await;
    let created = outcome_of(&app, remote_id.clone(), "evt_gone_created").await;
    assert_eq!(created["state"], "skipped", "{created}");
    assert!(
        created["detail"]
            .as_str()
            .unwrap_or("")
            .contains("delete came first"),
        "{created}"
    );
    assert_eq!(
        app.customer_by_email(&address).await,
        None,
        "not brought back"
    );

    // Linked, deleted, then an update of the delete's second.
    let address = email("updated-last-second");
    let remote_id = create_in_stripe(&address);
    let record = stripe_customer_json(&remote_id, &address, "Short Lived");
    send(
        "evt_last_created",
        "customer.created",
        now - 5,
        record.clone(),
    )
    .await;
    let created = outcome_of(&app, remote_id.clone(), "evt_last_created").await;
    assert_eq!(created["state"], "applied", "{created}");
    delete_in_stripe(&remote_id);
    send("evt_last_deleted", "customer.deleted", now, record).await;
    let deleted = outcome_of(&app, remote_id.clone(), "evt_last_deleted").await;
    assert_eq!(deleted["state"], "applied", "{deleted}");
    let renamed = stripe_customer_json(&remote_id, &address, "Renamed Before The Delete");
    send("evt_last_updated", "customer.updated", now, renamed).await;
    let updated = outcome_of(&app, remote_id.clone(), "evt_last_updated").await;
    assert_eq!(updated["state"], "skipped", "not a dead letter: {updated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_after_their_records_delete_sqlite() {
    events_delivered_after_their_records_delete(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_delivered_after_their_records_delete_postgres() {
    events_delivered_after_their_records_delete(Backend::Postgres).await;
}

/// Thin events from an event destination (Stripe's thin payload style):
/// signed as any delivery, naming the customer without a snapshot. The
/// update is applied from what Stripe holds (fetched), the delete deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_thin_events_are_fetched_and_applied() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("thin-destination");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='Thin Ada')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let thin = |id: &str, kind: &str| {
        json!({"id": id, "object": "v2.core.event", "type": kind,
            "created": chrono::Utc::now().to_rfc3339(), "livemode": false, "context": null,
            "related_object": {"id": remote_id, "type": "customer",
                "url": format!("/v1/customers/{remote_id}")}})
        .to_string()
    };
    let body = thin("evt_thin_updated", "v1.customer.updated");
    let (status, problem) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{problem}");
    let applied = outcome_of(&app, remote_id.clone(), "evt_thin_updated").await;
    assert_eq!(applied["state"], "applied", "{applied}");
    let customer = app
        .customer_by_email(&address)
        .await
        .expect("fetched and created");
    assert_eq!(customer["name"], "Thin Ada");

    let body = thin("evt_thin_deleted", "v1.customer.deleted");
    let (status, problem) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{problem}");
    let deleted = outcome_of(&app, remote_id.clone(), "evt_thin_deleted").await;
    assert_eq!(deleted["state"], "applied", "{deleted}");
    assert_eq!(app.customer_by_email(&address).await, None, "deleted");
}

/// A customer keeping an older form of its email (left beside another
/// customer's by the start's renormalisation, for a person to merge) still
/// takes its record's edits: the merged email, the same address, was
/// looked up, found the other customer, and every event of the record was
/// dead-lettered, a phone edit's too. So does one whose stored email
/// today's rules refuse: the merged record failed validation on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_form_of_the_email_still_takes_remote_edits() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (nfc, nfd) = (
        format!("ren\u{e9}-{tag}@example.com"),
        format!("rene\u{301}-{tag}@example.com"),
    );
    app.create(json!({"email": nfc, "name": "Holds the NFC form"}))
        .await;
    let address = email("older-form");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='Older Form')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    let thin = |id: &str| {
        json!({"id": id, "object": "v2.core.event", "type": "v1.customer.updated",
            "created": chrono::Utc::now().to_rfc3339(), "livemode": false, "context": null,
            "related_object": {"id": remote_id, "type": "customer",
                "url": format!("/v1/customers/{remote_id}")}})
        .to_string()
    };
    let body = thin("evt_older_form_1");
    let (status, problem) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{problem}");
    let applied = outcome_of(&app, remote_id.clone(), "evt_older_form_1").await;
    assert_eq!(applied["state"], "applied", "{applied}");
    let customer = app.customer_by_email(&address).await.expect("created");
    let id = customer["id"].as_str().unwrap().to_owned();
    // The customer stored with `stored`, its record's phone edited to
    // `phone` and announced by event `event_id`: applied, the email kept.
    let phone_edit_keeps = async |stored: &str, phone: &str, event_id: &str| {
        let sql = format!("UPDATE customers SET email = '{stored}' WHERE id = '{id}'");
        crate::helpers::execute_raw(&app.database_url, &sql, &[]).await;
        stripe_py(
            &stripe.url(),
            &format!("stripe.Customer.modify('{remote_id}', phone='{phone}')\nprint('null')"),
        );
        let body = thin(event_id);
        let (status, problem) =
            deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200, "{problem}");
        let applied = outcome_of(&app, remote_id.clone(), event_id).await;
        assert_eq!(applied["state"], "applied", "{applied}");
        let customer = app.customer(&id).await;
        assert_eq!(customer["phone"], phone, "{customer}");
        assert_eq!(customer["email"], stored, "the stored email kept");
    };
    phone_edit_keeps(&nfd, "+15555550199", "evt_older_form_2").await;
    // One today's rules refuse (a combining grapheme joiner, drawn as
    // nothing, stored before the rules named it): the merge keeps the
    // local email, and the record failed validation on it.
    let refused = format!("older\u{34f}-{tag}@example.com");
    phone_edit_keeps(&refused, "+15555550123", "evt_older_form_3").await;
}

/// A blank webhook secret (a compose variable left unset, read as "") is no
/// secret: a delivery signed with the empty key is refused and stores
/// nothing, and the API refuses to store a blank secret. Before, HMAC took
/// the empty key, and anyone could sign customer events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_webhook_secret_verifies_nothing() {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Sqlite, &stripe.url());
    setup.extra = json!({"connectors": {"stripe": {"secrets": {"webhook_secret": ""}}}});
    let app = spawn_sync_app(setup).await;
    let now = chrono::Utc::now().timestamp();
    let forged = event(
        "evt_forged",
        "customer.created",
        now,
        stripe_customer_json("cus_forged", &email("forged"), "Forged"),
    );
    let (status, problem) = deliver(&app, &forged, &stripe_signature(&forged, "")).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (400, Some("invalid_signature")),
        "{problem}"
    );
    assert!(
        app.store
            .inbox_of_remote("stripe", "cus_forged")
            .await
            .unwrap()
            .is_empty(),
        "nothing stored"
    );
    let (status, problem) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()},
                "secrets": {"api_key": STRIPE_KEY, "webhook_secret": " "}})),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert!(
        problem.to_string().contains("secrets.webhook_secret"),
        "{problem}"
    );
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_changes() {
        dashboard_changes_reach_ferry(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip() {
        round_trip_is_not_applied_twice(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verified_deduplicated_ordered() {
        deliveries_are_verified_deduplicated_and_ordered(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn email_match() {
        remote_customer_matches_local_email(Backend::Sqlite, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn email_match_pushed_back() {
        remote_customer_matches_local_email(Backend::Sqlite, false).await;
    }

    // SQLite runs two loops when `inbox_loops` says so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_loops_creating_one_record() {
        two_loops_on_the_events_of_new_records(Backend::Sqlite, 48, 2, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_loops_on_a_burst_of_one_record() {
        two_loops_on_the_events_of_new_records(Backend::Sqlite, 12, 10, false).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dashboard_changes() {
        dashboard_changes_reach_ferry(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip() {
        round_trip_is_not_applied_twice(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verified_deduplicated_ordered() {
        deliveries_are_verified_deduplicated_and_ordered(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn email_match() {
        remote_customer_matches_local_email(Backend::Postgres, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn email_match_pushed_back() {
        remote_customer_matches_local_email(Backend::Postgres, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_loops_creating_one_record() {
        two_loops_on_the_events_of_new_records(Backend::Postgres, 48, 2, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_loops_on_a_burst_of_one_record() {
        two_loops_on_the_events_of_new_records(Backend::Postgres, 12, 10, false).await;
    }
}

/// A loop that dies holding events leaves them leased. The living loop's
/// claims start where its last one did, above those events (PostgreSQL
/// keeps an index entry for every applied event in front of them), and its
/// sweep once a second still finds them when the lease runs out: nothing
/// acknowledged is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_dead_loop_held_are_applied_once_its_lease_runs_out() {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.extra = json!({"inbox_loops": 1});
    let app = spawn_sync_app(setup).await;
    let now = chrono::Utc::now().timestamp();
    let deliver_new = async |event_id: &str, remote_id: &str, address: &str| {
        let body = event(
            event_id,
            "customer.created",
            now,
            stripe_customer_json(remote_id, address, "Delivered"),
        );
        let (status, _) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200);
        wait_for(&app, address, async |app| {
            app.customer_by_email(address).await
        })
        .await;
    };
    deliver_new("evt_first", "cus_first", &email("first")).await;

    // A dead loop's claim: another remote customer's event, due a minute
    // ago, leased for three more seconds.
    let held = email("held");
    let lease_until = chrono::Utc::now().timestamp_millis() + 3_000;
    let raw = sqlx::PgPool::connect(&app.database_url)
        .await
        .expect("raw pool");
    sqlx::query(
        "INSERT INTO inbox (connector, event_id, entity, kind, remote_id, occurred_at_ms, record, \
         origin_key, remote_type, state, next_attempt_at_ms, correlation_id, received_at, policy, \
         published_at_ms, lease_token, lease_until_ms) \
         SELECT connector, 'evt_held', entity, kind, 'cus_held', occurred_at_ms, \
         jsonb_set(jsonb_set(record, '{email}', to_jsonb($1::text)), '{name}', '\"Held\"'), \
         origin_key, remote_type, 'pending', next_attempt_at_ms - 60000, correlation_id, \
         received_at - interval '1 minute', policy, published_at_ms, 'a-dead-loop', $2 \
         FROM inbox WHERE event_id = 'evt_first'",
    )
    .bind(&held)
    .bind(lease_until)
    .execute(&raw)
    .await
    .expect("a held event");

    // The living loop claims a newer event: its floor is now above the
    // held one.
    deliver_new("evt_after", "cus_after", &email("after")).await;
    if chrono::Utc::now().timestamp_millis() < lease_until {
        assert!(
            app.customer_by_email(&held).await.is_none(),
            "applied while another loop held it"
        );
    }
    let customer = wait_for(
        &app,
        "the held event, once its lease ran out",
        async |app| app.customer_by_email(&held).await,
    )
    .await;
    assert_eq!(customer["name"], "Held");
}

/// Two deliveries in the same remote second cannot be ordered by time: the
/// second is not trusted and the record is re-fetched, so ferry ends with
/// what Stripe holds, whichever arrived first. An oversized body is 413.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_second_events_are_resolved_by_refetching() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let address = email("samesecond");
    let created = stripe_py(
        &stripe.url(),
        &format!("c = stripe.Customer.create(email='{address}', name='What Stripe Holds')\nprint(json.dumps({{'id': c.id}}))"),
    );
    let remote_id = created["id"].as_str().unwrap().to_owned();
    // Stripe's `created` is in seconds: these two are indistinguishable.
    let second = chrono::Utc::now().timestamp() + 60;
    let first = event(
        "evt_same_1",
        "customer.updated",
        second,
        stripe_customer_json(&remote_id, &address, "Second Name"),
    );
    let later = event(
        "evt_same_2",
        "customer.updated",
        second,
        stripe_customer_json(&remote_id, &address, "First Name"),
    );
    for body in [&first, &later] {
        let (status, _) = deliver(&app, body, &stripe_signature(body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200);
    }
    let customer = wait_for(&app, "both events applied", async |app| {
        let events = app
            .store
            .inbox_of_remote("stripe", &remote_id)
            .await
            .unwrap();
        let done = events
            .iter()
            .filter(|e| e.state.as_str() == "applied" || e.state.as_str() == "skipped")
            .count()
            == 2;
        if done {
            app.customer_by_email(&address).await
        } else {
            None
        }
    })
    .await;
    assert_eq!(
        customer["name"], "What Stripe Holds",
        "the remote's state, not the last payload"
    );
    // An oversized delivery is refused before its body is read, so a
    // client still writing it may see the connection close instead of the
    // 413: `hardening::slow_and_oversized_requests_are_cut_off` checks it
    // on a raw socket.
}
