//! Soak: do the append-only tables stay bounded under a steady load? A real
//! ferry on a throw-away PostgreSQL, the Stripe connector pushing to the
//! fast fake Stripe, and a steady stream of API creates (each an outbox
//! event and a push, so a delivery) and signed Stripe webhooks (each an
//! inbox event), with retention keeping 60 s and running every 10 s.
//! Needs `make connectors`.
//!
//! `cargo bench -p ferry --bench soak` runs `FERRY_SOAK_SECONDS` (default
//! 600) at `FERRY_SOAK_RATE` requests per second (default 200; four in five
//! are API creates, one in five a new customer by webhook), and prints the row counts of the outbox, the
//! inbox and the deliveries every minute, with the backlog and the
//! process's resident memory (the fake forgets its records every minute,
//! so what grows is ferry). Bounded means the counts level off at about
//! rate × (retention + interval) and stay there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use ferry_test_support::fake_remote::FakeStripe;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

const SECRET: &str = "whsec_soak_0123456789abcdef";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(soak(
        Duration::from_secs(env_u64("FERRY_SOAK_SECONDS", 600)),
        env_u64("FERRY_SOAK_RATE", 200),
    ));
}

fn signed_event(i: u64) -> (String, String) {
    let t = chrono::Utc::now().timestamp();
    let body = json!({
        "id": format!("evt_soak_{i}"), "object": "event", "type": "customer.created", "created": t,
        "data": {"object": {"id": format!("cus_soak_{i}"), "object": "customer",
            "email": format!("soak-in-{i}@example.com"), "name": "Soak", "metadata": {}}}
    })
    .to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{t}.{body}").as_bytes());
    (
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes())),
        body,
    )
}

async fn soak(length: Duration, rate: u64) {
    let stripe = FakeStripe::start().await.expect("fake stripe");
    let dir = tempfile::tempdir().expect("temp dir");
    let connectors = ferry_test_support::bench::stripe_connectors_dir(dir.path());
    let database_url = ferry_test_support::postgres::PgCluster::shared()
        .create_database()
        .await
        .expect("database");
    let config = Config::from_overrides(json!({
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "database_max_connections": 16,
        "connectors_dir": connectors,
        "allow_private_hosts": true,
        "connector_requests_per_second": 0,
        "retention": "60s",
        "retention_every": "10s",
        "connectors": {"stripe": {"settings": {"api_base": stripe.url()},
            "secrets": {"api_key": "sk_test_soak", "webhook_secret": SECRET}}},
    }))
    .expect("config");
    let app = App::build(config).await.expect("app");
    let base = format!("http://{}", app.address());
    let store = app.state().store.clone();
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();

    println!(
        "soak: {} s on PostgreSQL, {rate} requests/s (4 in 5 API creates, 1 in 5 Stripe webhooks), retention 60 s every 10 s",
        length.as_secs(),
    );
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (client, base, failures, sent) =
            (client.clone(), base.clone(), failures.clone(), sent.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            loop {
                tick.tick().await;
                i += 1;
                let (client, base, failures, sent) =
                    (client.clone(), base.clone(), failures.clone(), sent.clone());
                tokio::spawn(async move {
                    let ok = if i.is_multiple_of(5) {
                        let (signature, body) = signed_event(i);
                        client
                            .post(format!("{base}/webhooks/stripe"))
                            .header("stripe-signature", signature)
                            .header("content-type", "application/json")
                            .body(body)
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    } else {
                        client
                            .post(format!("{base}/api/v1/customers"))
                            .json(
                                &json!({"email": format!("soak-{i}@example.com"), "name": "Soak"}),
                            )
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    };
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };

    let started = Instant::now();
    println!("  minute  outbox  inbox  deliveries  unpublished  inbox-unapplied  requests  failed  RSS MiB");
    let mut minute = 0;
    while started.elapsed() < length {
        let next = Duration::from_secs(60 * (minute + 1)).min(length);
        tokio::time::sleep(next.saturating_sub(started.elapsed())).await;
        minute += 1;
        // The fake keeps every customer pushed to it; ferry is measured.
        stripe.forget();
        let rows = store.table_rows().await.expect("row counts");
        let backlog = store.backlog().await.expect("backlog");
        println!(
            "  {:>6}  {:>6}  {:>5}  {:>10}  {:>11}  {:>15}  {:>8}  {:>6}  {:>7.0}",
            minute,
            rows["outbox"],
            rows["inbox"],
            rows["deliveries"],
            backlog.outbox_unpublished,
            backlog.inbox_unapplied.values().sum::<i64>(),
            sent.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed),
            ferry_test_support::rss_mib(),
        );
    }
    load.abort();
    cancel.cancel();
    let _ = server.await;
}
