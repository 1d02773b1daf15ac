//! Fan-out: a change made in one remote reaches every other enabled
//! connector and is never pushed back to its source; a change made through
//! ferry's API reaches each connector once, and Stripe's echoes of it start
//! nothing new.
//!
//! Two connectors are loaded: Stripe, against a real localstripe behind a
//! logging proxy (so every request ferry sends Stripe is on record), and the
//! recorder test connector (tests/guests/recorder), against an in-process
//! fake that keeps what it is sent and logs every request. Changes made "in
//! Stripe" go to localstripe directly, as a person in the dashboard would,
//! and reach ferry through localstripe's real signed webhooks.

use std::time::Duration;

use ferry_test_support::fault_proxy::{FaultProxy, LoggedRequest};
use ferry_test_support::localstripe::LocalStripe;
use serde_json::{json, Value};

use crate::helpers::{
    email, spawn_sync_app, stripe_customers_by_email, stripe_write, Backend, Setup, SyncApp,
};
use crate::recorder_remote::{RecorderRemote, RECORDER_KEY, SETTLE};

/// ferry with Stripe (through a logging proxy in front of localstripe,
/// whose webhooks are registered) and the recorder.
struct Rig {
    stripe: LocalStripe,
    proxy: FaultProxy,
    remote: RecorderRemote,
    app: SyncApp,
}

async fn rig(backend: Backend) -> Rig {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let remote = RecorderRemote::start().await;
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra_connectors.push(remote.connector());
    let app = spawn_sync_app(setup).await;
    app.assert_enabled("recorder").await;
    app.receive_stripe_webhooks(&stripe).await;
    Rig {
        stripe,
        proxy,
        remote,
        app,
    }
}

/// Requests ferry sent Stripe that could change something (anything but a
/// read: a same-second event is re-fetched with a GET, which is fine).
fn stripe_writes(proxy: &FaultProxy) -> Vec<String> {
    proxy
        .requests()
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r: &LoggedRequest| format!("{} {} {:?}", r.method, r.path, r.form()))
        .collect()
}

/// Outbound Stripe deliveries in the customer's sync history.
fn outbound_to(status: &Value, connector: &str) -> Vec<Value> {
    status["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|d| d["connector"] == connector && d["direction"] == "outbound")
        .cloned()
        .collect()
}

async fn customer(app: &SyncApp, id: &str) -> Value {
    let (status, customer) = app
        .send(
            reqwest::Method::GET,
            &format!("/api/v1/customers/{id}"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{customer}");
    customer
}

/// Both links settled at `version` or later: the recorder's by a push, the
/// Stripe one by the inbound apply (or a push, for API changes). Once the
/// recorder holds `version`, the relay's intake of it is done for every
/// connector, so a Stripe link still `synced` here was never scheduled.
async fn wait_both_synced(app: &SyncApp, id: &str, version: i64) -> (Value, Value) {
    let synced =
        |l: &Value| l["state"] == "synced" && l["synced_version"].as_i64() >= Some(version);
    let recorder = app.wait_link_of("recorder", id, SETTLE, synced).await;
    let stripe = app.wait_link_of("stripe", id, SETTLE, synced).await;
    (stripe, recorder)
}

/// Created, then renamed, in Stripe: the customer appears in ferry and the
/// recorder gets a create then an update; ferry sends Stripe no write.
async fn stripe_change_reaches_the_recorder_not_stripe(backend: Backend) {
    let Rig {
        stripe,
        proxy,
        remote,
        app,
    } = rig(backend).await;
    let address = email("fanout");

    let created = stripe_write(
        &stripe.url(),
        "/v1/customers",
        &[("email", &address), ("name", "Katherine Johnson")],
    )
    .await;
    let cus = created["id"].as_str().expect("stripe id").to_owned();
    let deadline = tokio::time::Instant::now() + SETTLE;
    let local = loop {
        if let Some(found) = app.customer_by_email(&address).await {
            break found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the Stripe customer never reached ferry"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(local["name"], "Katherine Johnson");
    let id = local["id"].as_str().expect("id").to_owned();
    let (stripe_link, recorder_link) = wait_both_synced(&app, &id, 1).await;
    assert_eq!(
        stripe_link["remote_id"],
        cus.as_str(),
        "linked to its source"
    );

    let creates = remote.requests_to("POST", "/records");
    assert_eq!(creates.len(), 1, "one create: {:#?}", remote.requests());
    let create = &creates[0];
    assert_eq!(create.body["local_id"], id.as_str());
    assert_eq!(create.body["version"], 1);
    assert_eq!(create.body["record"]["email"], address.as_str());
    assert_eq!(create.body["record"]["name"], "Katherine Johnson");
    let key = format!("ferry-recorder-{id}-v1");
    assert_eq!(create.body["idempotency_key"], key.as_str());
    assert_eq!(create.idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(
        create.authorization.as_deref(),
        Some(format!("Bearer {RECORDER_KEY}").as_str()),
        "the recorder's secret reached its remote"
    );
    let rec = recorder_link["remote_id"]
        .as_str()
        .expect("recorder link has the remote id")
        .to_owned();
    assert_eq!(
        remote.record(&rec).expect("stored")["email"],
        address.as_str()
    );

    stripe_write(
        &stripe.url(),
        &format!("/v1/customers/{cus}"),
        &[("name", "Katherine G. Johnson")],
    )
    .await;
    let record_path = format!("/records/{rec}");
    remote
        .wait_for("the rename", |log| {
            log.iter()
                .any(|r| r.method == "PUT" && r.path == record_path)
        })
        .await;
    wait_both_synced(&app, &id, 2).await;
    let renamed = customer(&app, &id).await;
    assert_eq!(renamed["name"], "Katherine G. Johnson");
    assert_eq!(renamed["version"], 2);
    let updates = remote.requests_to("PUT", &record_path);
    assert_eq!(updates.len(), 1, "one update: {:#?}", remote.requests());
    assert_eq!(updates[0].body["version"], 2);
    assert_eq!(updates[0].body["record"]["name"], "Katherine G. Johnson");
    assert_eq!(
        remote.requests().len(),
        2,
        "nothing else reached the recorder: {:#?}",
        remote.requests()
    );

    // Nothing went back to Stripe: no write through the proxy, no outbound
    // delivery to Stripe in the history, still one Stripe customer.
    assert_eq!(
        stripe_writes(&proxy),
        Vec::<String>::new(),
        "ferry wrote to Stripe"
    );
    let status = app.sync_status(&id).await;
    assert_eq!(
        outbound_to(&status, "stripe")
            .iter()
            .filter(|d| d["outcome"] == "delivered")
            .count(),
        0,
        "{status:#}"
    );
    assert_eq!(
        outbound_to(&status, "recorder")
            .iter()
            .filter(|d| d["outcome"] == "delivered")
            .count(),
        2,
        "{status:#}"
    );
    let in_stripe = stripe_customers_by_email(&stripe.url(), &address).await;
    assert_eq!(
        in_stripe.len(),
        1,
        "no second Stripe customer: {in_stripe:#?}"
    );
    assert_eq!(in_stripe[0]["name"], "Katherine G. Johnson");
}

/// Created, renamed and deleted through ferry's API: each change reaches
/// Stripe once and the recorder once; Stripe's webhooks for ferry's own
/// writes come back and change nothing, so the recorder gets nothing more.
async fn api_change_reaches_each_connector_once(backend: Backend) {
    let Rig {
        stripe,
        proxy,
        remote,
        app,
    } = rig(backend).await;
    let address = email("fanout-api");

    let created = app
        .create(json!({"email": address, "name": "Dorothy Vaughan"}))
        .await;
    let id = created["id"].as_str().expect("id").to_owned();
    let (stripe_link, recorder_link) = wait_both_synced(&app, &id, 1).await;
    let cus = stripe_link["remote_id"]
        .as_str()
        .expect("linked")
        .to_owned();
    let rec = recorder_link["remote_id"]
        .as_str()
        .expect("linked")
        .to_owned();
    // Stripe's customer.created webhook for ferry's own create.
    app.wait_inbox_settled("stripe", &cus, 1).await;

    app.patch(&id, json!({"name": "Dorothy J. Vaughan"})).await;
    wait_both_synced(&app, &id, 2).await;
    app.wait_inbox_settled("stripe", &cus, 2).await;
    assert_eq!(
        customer(&app, &id).await["version"],
        2,
        "the echoes wrote nothing"
    );
    assert_eq!(
        remote.record(&rec).expect("stored")["name"],
        "Dorothy J. Vaughan"
    );

    app.delete(&id).await;
    let (stripe_link, recorder_link) = wait_both_synced(&app, &id, 3).await;
    assert_eq!(stripe_link["remote_deleted"], true);
    assert_eq!(recorder_link["remote_deleted"], true);
    app.wait_inbox_settled("stripe", &cus, 3).await;
    assert!(remote.record(&rec).is_none(), "deleted at the recorder");

    let record_path = format!("/records/{rec}");
    let seen: Vec<(String, String)> = remote
        .requests()
        .into_iter()
        .map(|r| (r.method, r.path))
        .collect();
    let expected: Vec<(String, String)> = [
        ("POST", "/records"),
        ("PUT", record_path.as_str()),
        ("DELETE", record_path.as_str()),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    assert_eq!(seen, expected, "once each at the recorder");

    let customer_path = format!("/v1/customers/{cus}");
    let writes: Vec<(String, String)> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.path))
        .collect();
    let expected: Vec<(String, String)> = [
        ("POST", "/v1/customers"),
        ("POST", customer_path.as_str()),
        ("DELETE", customer_path.as_str()),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    assert_eq!(writes, expected, "once each at Stripe");
    assert!(
        stripe_customers_by_email(&stripe.url(), &address)
            .await
            .is_empty(),
        "deleted in Stripe"
    );
}

/// Each connector has its share of the push slots: with four slots and a
/// recorder remote that takes 1.5 s per write, Stripe's creates do not
/// wait behind the recorder's (with slots handed out oldest first, the
/// recorder's pushes held every slot and Stripe went at its pace), and the
/// recorder's pushes take the slots Stripe leaves idle once it is done.
async fn a_slow_remote_leaves_other_connectors_their_share(backend: Backend) {
    const CUSTOMERS: usize = 20;
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let remote = RecorderRemote::start().await;
    remote.delay_writes(Duration::from_millis(1500));
    let mut setup = Setup::new(backend, &proxy.url());
    setup.extra_connectors.push(remote.connector());
    setup.extra = json!({"sync_concurrency": 4});
    let app = spawn_sync_app(setup).await;
    app.assert_enabled("recorder").await;

    let mut ids = Vec::new();
    for i in 0..CUSTOMERS {
        let created = app
            .create(json!({"email": email(&format!("share-{i}")), "name": format!("Share {i}")}))
            .await;
        ids.push(created["id"].as_str().expect("id").to_owned());
    }
    for id in &ids {
        app.wait_link_of("stripe", id, SETTLE, |link| link["state"] == "synced")
            .await;
    }
    let recorder_writes = remote.requests_to("POST", "/records").len();
    assert!(
        recorder_writes < CUSTOMERS / 2,
        "Stripe's creates waited behind the slow remote's: {recorder_writes} of \
         {CUSTOMERS} recorder creates had started when Stripe's were done"
    );
    remote.writes_at_once();
    for id in &ids {
        app.wait_link_of("recorder", id, Duration::from_secs(60), |link| {
            link["state"] == "synced"
        })
        .await;
    }
    assert_eq!(
        remote.requests_to("POST", "/records").len(),
        CUSTOMERS,
        "one create each at the recorder"
    );
    // With Stripe done, the recorder took the slots beyond its share (2).
    let at_once = remote.writes_at_once();
    assert!(at_once > 2, "at most {at_once} recorder writes at once");
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_remote_leaves_others_their_share() {
        a_slow_remote_leaves_other_connectors_their_share(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stripe_change_fans_out() {
        stripe_change_reaches_the_recorder_not_stripe(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_change_fans_out() {
        api_change_reaches_each_connector_once(Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_remote_leaves_others_their_share() {
        a_slow_remote_leaves_other_connectors_their_share(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stripe_change_fans_out() {
        stripe_change_reaches_the_recorder_not_stripe(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn api_change_fans_out() {
        api_change_reaches_each_connector_once(Backend::Postgres).await;
    }
}

/// A connector that traps or spins in its webhook code gets the sender a
/// 503 (so it retries), stores nothing, and leaves ferry serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_connector_is_503_and_ferry_stays_up() {
    let rig = rig(Backend::Sqlite).await;
    let post = |body: &'static str| {
        rig.app
            .client
            .post(format!("{}/webhooks/recorder", rig.app.base))
            .body(body)
            .send()
    };
    for body in ["trap", "loop"] {
        let response = post(body).await.expect("answered");
        assert_eq!(response.status(), 503, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "connector_failed", "{body}: {problem}");
    }
    let response = post("{}").await.expect("answered");
    assert_eq!(response.status(), 200, "the next delivery works");
    let (status, _) = rig.app.send(reqwest::Method::GET, "/healthz", None).await;
    assert_eq!(status, 200);
}
