//! Crash safety with the real binary: SIGKILL ferry, or restart the broker,
//! in the middle of a stream of writes; every accepted write still reaches
//! Stripe exactly once in effect.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
use ferry_test_support::kafka::Broker;
use ferry_test_support::localstripe::LocalStripe;
use ferry_test_support::postgres::PgCluster;
use serde_json::{json, Value};

use crate::helpers::{stripe_component, stripe_customers_by_email, STRIPE_KEY};
use crate::process::FerryProcess;

/// Writes that got a 201 (accepted) and those whose answer was lost.
#[derive(Default)]
struct Ledger {
    accepted: Vec<(String, String)>,
    unknown: Vec<String>,
}

fn base_env(dir: &std::path::Path, database_url: &str, stripe: &str) -> BTreeMap<String, String> {
    let connectors = dir.join("connectors");
    std::fs::create_dir_all(&connectors).expect("dir");
    std::fs::copy(stripe_component(), connectors.join("stripe.wasm")).expect("copy");
    BTreeMap::from([
        ("FERRY_DATABASE_URL".into(), database_url.into()),
        (
            "FERRY_CONNECTORS_DIR".into(),
            connectors.display().to_string(),
        ),
        ("FERRY_ALLOW_PRIVATE_HOSTS".into(), "true".into()),
        (
            "FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE".into(),
            stripe.into(),
        ),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY".into(),
            STRIPE_KEY.into(),
        ),
        ("FERRY_CONNECTOR_CALL_TIMEOUT".into(), "2s".into()),
        ("FERRY_SYNC_LEASE".into(), "3s".into()),
        ("FERRY_SYNC_BACKOFF_BASE".into(), "100ms".into()),
        ("FERRY_SYNC_BACKOFF_MAX".into(), "500ms".into()),
        ("FERRY_BUS_REDELIVERY_AFTER".into(), "5s".into()),
    ])
}

/// Creates `count` customers one after another through whichever base URL
/// `base` holds at the time, recording what was accepted.
async fn write_stream(
    base: Arc<Mutex<String>>,
    ledger: Arc<Mutex<Ledger>>,
    count: usize,
    tag: String,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut n = 0;
    while ledger.lock().unwrap().accepted.len() < count {
        n += 1;
        let email = format!("{tag}-{n}@example.com");
        let url = format!("{}/api/v1/customers", base.lock().unwrap());
        match client
            .post(url)
            .json(&json!({"email": email, "name": format!("n{n}")}))
            .send()
            .await
        {
            Ok(response) if response.status() == 201 => {
                let body: Value = response.json().await.unwrap();
                ledger
                    .lock()
                    .unwrap()
                    .accepted
                    .push((body["id"].as_str().unwrap().to_owned(), email));
            }
            // Refused or cut off: it may or may not have committed.
            _ => {
                ledger.lock().unwrap().unknown.push(email);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `ledger` with each write whose answer was lost settled by asking
/// `base`: one ferry committed is accepted (it must reach Stripe exactly
/// once, as an answered one), one it did not stays unknown (it must not
/// reach Stripe at all).
async fn settled(base: &str, mut ledger: Ledger) -> Ledger {
    let client = reqwest::Client::new();
    let mut uncommitted = Vec::new();
    for email in std::mem::take(&mut ledger.unknown) {
        let found = json_of(
            client
                .get(format!("{base}/api/v1/customers"))
                .query(&[("email", email.as_str())]),
        )
        .await;
        match found["data"].as_array().map(Vec::as_slice) {
            Some([customer]) => ledger
                .accepted
                .push((customer["id"].as_str().unwrap().to_owned(), email)),
            Some([]) => uncommitted.push(email),
            other => panic!("{email}: {other:?}"),
        }
    }
    ledger.unknown = uncommitted;
    ledger
}

/// The JSON body `request` is answered with.
async fn json_of(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// Waits until every accepted customer is synced, asking `base`.
async fn wait_all_synced(base: &str, ledger: &Ledger, log: impl Fn() -> String) {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for (id, _) in &ledger.accepted {
        loop {
            let status = json_of(client.get(format!("{base}/api/v1/customers/{id}/sync"))).await;
            if status["connectors"][0]["state"] == "synced" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never synced: {status:#}\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Exactly one Stripe customer per write ferry committed (answered, or
/// found after its answer was lost), none per write it did not.
async fn assert_exactly_once(stripe: &str, ledger: &Ledger) {
    for (_, email) in &ledger.accepted {
        let found = stripe_customers_by_email(stripe, email).await;
        assert_eq!(found.len(), 1, "{email}: {found:#?}");
    }
    for email in &ledger.unknown {
        let found = stripe_customers_by_email(stripe, email).await;
        assert!(found.is_empty(), "{email} was not committed: {found:#?}");
    }
}

/// Embedded mode: SIGKILL while a push is on the wire (Stripe applied it,
/// the answer never came back) and while writes stream in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    proxy.emulate_stripe_idempotency();
    let database_url = format!("sqlite://{}", dir.path().join("ferry.db").display());
    let mut ferry = FerryProcess::start(
        base_env(dir.path(), &database_url, &proxy.url()),
        dir.path(),
    )
    .await;

    let base = Arc::new(Mutex::new(ferry.base.clone()));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let writer = tokio::spawn(write_stream(
        base.clone(),
        ledger.clone(),
        60,
        format!("crash{}", uuid::Uuid::new_v4().simple()),
    ));

    // Let some writes through, then hold one create's answer after Stripe
    // applied it, and kill ferry while it waits.
    while ledger.lock().unwrap().accepted.len() < 15 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::ForwardThenDelay(Duration::from_secs(30)),
    );
    // The request that took the fault, wherever it sits in the log: one
    // already arriving when the fault was pushed can take it, and another
    // create can be answered before the held one is.
    let log = proxy
        .wait_for(Duration::from_secs(10), |log| {
            log.iter().any(|r| r.held && r.forwarded)
        })
        .await
        .expect("the held create reached Stripe");
    let held = log
        .iter()
        .find(|r| r.held)
        .and_then(|r| r.header("idempotency-key"))
        .expect("pushes carry an idempotency key")
        .to_owned();
    ferry.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ferry.restart().await;
    *base.lock().unwrap() = ferry.base.clone();

    writer.await.unwrap();
    let ledger = Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap();
    let ledger = settled(&ferry.base, ledger).await;
    wait_all_synced(&ferry.base, &ledger, || ferry.log_text()).await;
    assert_exactly_once(&stripe.url(), &ledger).await;
    let with_key: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.header("idempotency-key") == Some(held.as_str()))
        .collect();
    assert!(
        with_key.len() >= 2,
        "the held create was sent again after the restart"
    );
    assert!(
        with_key[1..].iter().all(|r| !r.forwarded),
        "and answered from Stripe's saved result"
    );
}

/// Cluster mode: two `ferry serve` processes on one PostgreSQL and one
/// broker share the stream; the broker restarts mid-stream and one replica
/// is SIGKILLed; every accepted write reaches Stripe exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_broker_restart_and_sigkill_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    proxy.emulate_stripe_idempotency();
    let mut broker = Broker::start().expect("broker");
    let database_url = PgCluster::shared()
        .create_database()
        .await
        .expect("database");
    let mut env = base_env(dir.path(), &database_url, &proxy.url());
    env.insert("FERRY_KAFKA_BROKERS".into(), broker.bootstrap());
    env.insert("FERRY_KAFKA_PARTITIONS".into(), "4".into());
    let mut first = FerryProcess::start(env.clone(), dir.path()).await;
    let second = FerryProcess::start(env, dir.path()).await;

    let tag = format!("cluster{}", uuid::Uuid::new_v4().simple());
    let first_base = Arc::new(Mutex::new(first.base.clone()));
    let second_base = Arc::new(Mutex::new(second.base.clone()));
    let first_ledger = Arc::new(Mutex::new(Ledger::default()));
    let second_ledger = Arc::new(Mutex::new(Ledger::default()));
    let writers = [
        tokio::spawn(write_stream(
            first_base.clone(),
            first_ledger.clone(),
            40,
            format!("{tag}a"),
        )),
        tokio::spawn(write_stream(
            second_base,
            second_ledger.clone(),
            40,
            format!("{tag}b"),
        )),
    ];

    while second_ledger.lock().unwrap().accepted.len() < 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    broker.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    broker.start_again().expect("broker back");
    while second_ledger.lock().unwrap().accepted.len() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.restart().await;
    *first_base.lock().unwrap() = first.base.clone();

    for writer in writers {
        writer.await.unwrap();
    }
    let mut ledger = Arc::try_unwrap(first_ledger)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    let other = Arc::try_unwrap(second_ledger)
        .ok()
        .unwrap()
        .into_inner()
        .unwrap();
    ledger.accepted.extend(other.accepted);
    ledger.unknown.extend(other.unknown);
    let ledger = settled(&second.base, ledger).await;
    wait_all_synced(&second.base, &ledger, || {
        format!("{}\n---\n{}", first.log_text(), second.log_text())
    })
    .await;
    assert_exactly_once(&stripe.url(), &ledger).await;
}

/// A relay leader whose publishes keep failing (its broker gone) gives the
/// leadership up after 30 s, so that a replica that reaches the broker
/// could take it, and leads again after a pause when no other does.
/// Before, it held the lock for as long as it lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_leader_that_cannot_publish_steps_down() {
    let dir = tempfile::tempdir().unwrap();
    let stripe = LocalStripe::start().expect("localstripe");
    let mut broker = Broker::start().expect("broker");
    let database_url = PgCluster::shared()
        .create_database()
        .await
        .expect("database");
    let mut env = base_env(dir.path(), &database_url, &stripe.url());
    env.insert("FERRY_KAFKA_BROKERS".into(), broker.bootstrap());
    let ferry = FerryProcess::start(env, dir.path()).await;
    let leads = |ferry: &FerryProcess| {
        ferry
            .log_text()
            .matches("this replica relays the outbox")
            .count()
    };
    wait_log(&ferry, Duration::from_secs(30), |_| leads(&ferry) >= 1).await;

    broker.stop();
    let created = reqwest::Client::new()
        .post(format!("{}/api/v1/customers", ferry.base))
        .json(&json!({"email": format!("relay-{}@example.com", uuid::Uuid::new_v4().simple())}))
        .send()
        .await
        .expect("created");
    assert_eq!(created.status(), 201);
    wait_log(&ferry, Duration::from_secs(120), |log| {
        log.contains("gave up the relay leadership")
    })
    .await;
    broker.start_again().expect("broker back");
    wait_log(&ferry, Duration::from_secs(60), |_| leads(&ferry) >= 2).await;
}

/// Waits until `ferry`'s log satisfies `check`.
async fn wait_log(ferry: &FerryProcess, limit: Duration, check: impl Fn(&str) -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let log = ferry.log_text();
        if check(&log) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not in the log after {limit:?}: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
