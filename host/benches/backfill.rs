//! Backfill throughput and memory: a real ferry (SQLite by default;
//! `FERRY_BENCH_BACKEND=postgres` runs it on a throw-away PostgreSQL) and
//! the fast fake Stripe pre-loaded with `FERRY_BENCH_RECORDS` customers
//! (default 100,000) that ferry has never seen, with the connector's
//! request budget lifted (`connector_requests_per_second = 0`: against
//! real Stripe the default 100/s caps a listing at 10,000 records/s).
//! Needs `make connectors`.
//!
//! `cargo bench -p ferry --bench backfill` prints:
//! - the ceiling: a bare HTTP client paging through the same fake with the
//!   same page size (no store, no guest), records per second;
//! - the backfill, end to end: from `POST /api/v1/reconciliations
//!   {"mode": "backfill"}` until every record is a customer linked to its
//!   Stripe record, records per second, and the ratio to the ceiling (same
//!   run, same machine);
//! - how long the run itself took (listing, classifying, scheduling the
//!   imports) and how long the inbox took to apply them after;
//! - the process's resident memory when 10% of the records were linked and
//!   at the end, and its peak during the run: flat when the run keeps
//!   nothing per record in memory.

use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use ferry_test_support::fake_remote::FakeStripe;
use serde_json::{json, Value};

/// Pages through the fake as fast as one client can: the ceiling.
async fn ceiling(url: &str, records: usize) -> f64 {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut after: Option<String> = None;
    let mut seen = 0;
    loop {
        let mut request = client
            .get(format!("{url}/v1/customers"))
            .query(&[("limit", "100")]);
        if let Some(after) = &after {
            request = request.query(&[("starting_after", after)]);
        }
        let page: Value = request
            .send()
            .await
            .expect("fake")
            .json()
            .await
            .expect("json");
        let data = page["data"].as_array().expect("data");
        seen += data.len();
        if page["has_more"] != true {
            break;
        }
        after = data
            .last()
            .and_then(|c| c["id"].as_str())
            .map(str::to_owned);
    }
    assert_eq!(seen, records);
    seen as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let records: usize = std::env::var("FERRY_BENCH_RECORDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(records));
}

async fn bench(records: usize) {
    let stripe = FakeStripe::start().await.expect("fake stripe");
    stripe.preload(records, |i| format!("backfill-{i}@example.com"));
    let ceiling = ceiling(&stripe.url(), records).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let connectors = ferry_test_support::bench::stripe_connectors_dir(dir.path());
    let (backend, database_url) = ferry_test_support::bench::database(dir.path()).await;
    let config = Config::from_overrides(json!({
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "database_max_connections": 16,
        "connectors_dir": connectors,
        "allow_private_hosts": true,
        // Measure ferry, not the politeness budget (100 requests/s by
        // default, i.e. at most 10,000 listed records/s against Stripe).
        "connector_requests_per_second": 0,
        "connectors": {"stripe": {"settings": {"api_base": stripe.url()}, "secrets": {"api_key": "sk_test_bench"}}},
    }))
    .expect("config");
    let app = App::build(config).await.expect("app");
    let base = format!("http://{}", app.address());
    let store = app.state().store.clone();
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();

    let rss_before = ferry_test_support::rss_mib();
    let started = Instant::now();
    let run: Value = client
        .post(format!("{base}/api/v1/reconciliations"))
        .json(&json!({"connector": "stripe", "mode": "backfill"}))
        .send()
        .await
        .expect("ferry")
        .json()
        .await
        .expect("json");
    let id = run["id"].as_str().expect("a run").to_owned();
    let (mut run_done, mut rss_at_tenth, mut peak) = (None, None, rss_before);
    let mut phases: Vec<(String, Duration)> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(ferry_test_support::rss_mib());
        let linked =
            usize::try_from(store.live_link_count("stripe").await.expect("links")).unwrap_or(0);
        if rss_at_tenth.is_none() && linked >= records / 10 {
            rss_at_tenth = Some(ferry_test_support::rss_mib());
        }
        if run_done.is_none() {
            let run: Value = client
                .get(format!("{base}/api/v1/reconciliations/{id}"))
                .send()
                .await
                .expect("ferry")
                .json()
                .await
                .expect("json");
            let phase = run["progress"]["phase"].as_str().unwrap_or("").to_owned();
            if phases.last().is_none_or(|(p, _)| *p != phase) {
                phases.push((phase, started.elapsed()));
            }
            if run["status"] != "running" {
                assert_eq!(run["status"], "completed", "{run:#}");
                run_done = Some(started.elapsed());
            }
        }
        if linked >= records {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1800),
            "{linked} of {records} linked"
        );
    }
    let total = started.elapsed();
    let rss_end = ferry_test_support::rss_mib();
    let rate = records as f64 / total.as_secs_f64();
    let run_done = run_done.unwrap_or(total);
    println!("backfill of {records} Stripe records ({backend}, fake Stripe)");
    println!("  ceiling (bare client paging the fake): {ceiling:.0} records/s");
    println!(
        "  backfill end to end: {rate:.0} records/s ({:.1} s), {:.3} of the ceiling",
        total.as_secs_f64(),
        rate / ceiling
    );
    println!(
        "  the run (list, classify, schedule): {:.1} s; imports applied {:.1} s after",
        run_done.as_secs_f64(),
        (total - run_done.min(total)).as_secs_f64()
    );
    let phases: Vec<String> = phases
        .iter()
        .map(|(phase, at)| format!("{phase} from {:.1} s", at.as_secs_f64()))
        .collect();
    println!("  phases: {}", phases.join(", "));
    println!(
        "  RSS: {rss_before:.0} MiB before, {:.0} MiB at 10% linked, {rss_end:.0} MiB at the end, peak {peak:.0} MiB",
        rss_at_tenth.unwrap_or(rss_end)
    );
    cancel.cancel();
    let _ = server.await;
}
