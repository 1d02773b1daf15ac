//! Outbound sync throughput and latency, from the commit of a change to the
//! remote's acknowledgement, against a fast in-process fake of Stripe's API
//! (`FakeStripe`; localstripe would be the bottleneck) through the real
//! Stripe connector.
//!
//! `cargo bench -p ferry --bench outbound` runs embedded mode (SQLite, the
//! outbox drained in-process). `FERRY_BENCH_MODES=embedded,postgres,cluster`
//! adds PostgreSQL with the in-process bus, and cluster mode: a throw-away
//! PostgreSQL and a tansu broker (needs `scripts/tansu.sh`). Needs
//! `make connectors`.
//!
//! Per mode it prints:
//! - sustained throughput: `FERRY_BENCH_CHANGES` (default 10000) creates
//!   committed by 16 writers as fast as the store takes them, divided by the
//!   time from the first commit to the last create arriving at the remote;
//! - its ceiling in the same run: the same creates committed on a fresh
//!   database of the mode with no connector taking part (pushes share the
//!   machine with the writers, so sustained can only approach it);
//! - latency at a fixed rate (`FERRY_BENCH_RATE`, default 1000/s, for 5 s):
//!   commit → arrival at the remote, p50 / p99 / max.
//!
//! `FERRY_PG_OPTIONS="-c shared_preload_libraries=pg_stat_statements"` also
//! prints PostgreSQL's top statements of the sustained run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use ferry::store::customers::WriteContext;
use ferry::store::CustomerFields;
use ferry_test_support::fake_remote::FakeStripe;
use serde_json::json;

struct Running {
    state: ferry::app::AppState,
    cancel: tokio_util::sync::CancellationToken,
    /// The PostgreSQL database, if the mode has one.
    database_url: Option<String>,
    _dir: tempfile::TempDir,
    _broker: Option<ferry_test_support::kafka::Broker>,
}

/// Starts ferry in `mode`; with `stripe`, the Stripe connector pushes to
/// it, without, no connector takes part (the creates' own ceiling).
async fn start(mode: &str, stripe: Option<&FakeStripe>) -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let connectors = ferry_test_support::bench::stripe_connectors_dir(dir.path());
    let mut overrides = json!({
        "listen": "127.0.0.1:0",
        "connectors_dir": connectors,
        "allow_private_hosts": true,
        "database_max_connections": 16,
        "sync_concurrency": 64,
        // The per-connector request limit protects real remotes (Stripe
        // allows 100/s); the fake needs none.
        "connector_requests_per_second": 0,
    });
    if let Some(stripe) = stripe {
        overrides["connectors"] = json!({"stripe": {"settings": {"api_base": stripe.url()}, "secrets": {"api_key": "sk_test_bench"}}});
    }
    let mut broker = None;
    match mode {
        "embedded" => {
            overrides["database_url"] = json!(format!(
                "sqlite://{}",
                dir.path().join("ferry.db").display()
            ));
        }
        // PostgreSQL with the in-process bus: tells the store's share from
        // the broker's.
        "postgres" => {
            let pg = ferry_test_support::postgres::PgCluster::shared();
            overrides["database_url"] = json!(pg.create_database().await.expect("database"));
        }
        "cluster" => {
            let pg = ferry_test_support::postgres::PgCluster::shared();
            overrides["database_url"] = json!(pg.create_database().await.expect("database"));
            let started = ferry_test_support::kafka::Broker::start_with(
                ferry_test_support::kafka::Storage::Memory,
            )
            .expect("tansu (scripts/tansu.sh)");
            overrides["kafka_brokers"] = json!(started.bootstrap());
            broker = Some(started);
        }
        other => panic!("unknown mode {other}"),
    }
    let database_url = overrides["database_url"]
        .as_str()
        .filter(|url| url.starts_with("postgres"))
        .map(str::to_owned);
    let config = Config::from_overrides(overrides).expect("config");
    let app = App::build(config).await.expect("app");
    let state = app.state().clone();
    let cancel = app.cancellation_token();
    tokio::spawn(app.run_until_stopped());
    Running {
        state,
        cancel,
        database_url,
        _dir: dir,
        _broker: broker,
    }
}

fn fields(n: usize, tag: &str) -> CustomerFields {
    CustomerFields {
        name: Some(format!("Customer {n}")),
        email: format!("{tag}-{n}@example.com"),
        phone: Some("+15555550100".into()),
        address: None,
        metadata: Default::default(),
    }
}

async fn commit(state: &ferry::app::AppState, n: usize, tag: &str) -> (String, Instant) {
    let customer = state
        .store
        .create_customer(fields(n, tag), WriteContext::default())
        .await
        .expect("create");
    let at = Instant::now();
    (customer.id.as_str().to_owned(), at)
}

/// Commits `changes` creates by 16 writers as fast as the store takes
/// them; returns when the last is committed.
async fn commit_all(state: &ferry::app::AppState, changes: usize) {
    let writers = 16;
    let tag = format!("tput{}", uuid::Uuid::new_v4().simple());
    let mut tasks = Vec::new();
    for w in 0..writers {
        let state = state.clone();
        let tag = tag.clone();
        tasks.push(tokio::spawn(async move {
            for n in (w..changes).step_by(writers) {
                commit(&state, n, &tag).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
}

/// Changes/s from the first commit to the last create arriving at the remote.
async fn throughput(state: &ferry::app::AppState, stripe: &FakeStripe, changes: usize) -> f64 {
    let before = stripe.counts().creates;
    let started = Instant::now();
    commit_all(state, changes).await;
    let committed = started.elapsed();
    stripe
        .wait_for_creates(before + changes as u64, Duration::from_secs(300))
        .await
        .expect("every change reaches the remote");
    let elapsed = started.elapsed();
    println!(
        "  committed {changes} changes in {:.2} s ({:.0}/s)",
        committed.as_secs_f64(),
        changes as f64 / committed.as_secs_f64()
    );
    changes as f64 / elapsed.as_secs_f64()
}

/// The ceiling of the sustained figure: the same creates committed with no
/// connector taking part (a fresh database of the same mode), per second.
async fn creates_alone(mode: &str, changes: usize) -> f64 {
    let running = start(mode, None).await;
    commit_all(&running.state, 500).await;
    let started = Instant::now();
    commit_all(&running.state, changes).await;
    let per_second = changes as f64 / started.elapsed().as_secs_f64();
    running.cancel.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    per_second
}

async fn latency(state: &ferry::app::AppState, stripe: &FakeStripe, rate: u64) -> Vec<Duration> {
    let before = stripe.counts().creates;
    let commits: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let total = rate * 5;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    for n in 0..total as usize {
        ticker.tick().await;
        let state = state.clone();
        let commits = commits.clone();
        tasks.push(tokio::spawn(async move {
            let (id, at) = commit(&state, n, "lat").await;
            commits.lock().unwrap().insert(id, at);
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    stripe
        .wait_for_creates(before + total, Duration::from_secs(120))
        .await
        .expect("every change reaches the remote");
    let arrivals = stripe.create_times();
    let commits = commits.lock().unwrap();
    let mut latencies: Vec<Duration> = commits
        .iter()
        .filter_map(|(id, at)| {
            arrivals
                .get(id)
                .map(|arrived| arrived.saturating_duration_since(*at))
        })
        .collect();
    latencies.sort();
    latencies
}

/// PostgreSQL's statement statistics, when the cluster loads
/// `pg_stat_statements` (`FERRY_PG_OPTIONS`).
struct Statements(sqlx::PgPool);

impl Statements {
    async fn reset(url: &str) -> Option<Self> {
        let pool = sqlx::PgPool::connect(url).await.expect("bench connection");
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await
            .ok()?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .ok()?;
        Some(Self(pool))
    }

    async fn print(self) {
        let rows: Vec<(i64, f64, f64, i64, String)> = sqlx::query_as(
            "SELECT calls, total_exec_time, mean_exec_time, rows, \
             left(regexp_replace(query, '\\s+', ' ', 'g'), 120) \
             FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT 12",
        )
        .fetch_all(&self.0)
        .await
        .expect("pg_stat_statements");
        println!("  top statements (calls, total ms, mean ms, rows):");
        for (calls, total, mean, rows, query) in rows {
            println!("    {calls:>7} {total:>8.0} {mean:>7.3} {rows:>8}  {query}");
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// The server binary's allocator, so the figures are the server's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    if let Ok(filter) = std::env::var("FERRY_BENCH_LOG") {
        // e.g. FERRY_BENCH_LOG=warn: what the app says while it is measured.
        let _ = ferry::telemetry::init(ferry::config::LogFormat::Text, &filter, std::io::stderr);
    }
    let modes = std::env::var("FERRY_BENCH_MODES").unwrap_or_else(|_| "embedded".into());
    let changes: usize = std::env::var("FERRY_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rate: u64 = std::env::var("FERRY_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for mode in modes.split(',') {
            let stripe = FakeStripe::start().await.expect("fake Stripe");
            let ceiling = creates_alone(mode, changes).await;
            let running = start(mode, Some(&stripe)).await;
            println!("outbound sync, {mode} mode");
            // Warm up: compile caches, pools, connections.
            throughput(&running.state, &stripe, 500).await;
            let statements = match &running.database_url {
                Some(url) => Statements::reset(url).await,
                None => None,
            };
            let per_second = throughput(&running.state, &stripe, changes).await;
            if let Some(statements) = statements {
                statements.print().await;
            }
            println!("  sustained: {per_second:.0} changes/s (commit → remote acknowledged)");
            println!(
                "  ceiling: {ceiling:.0} creates/s committed with no connector taking part; sustained is {:.0} % of it",
                per_second / ceiling * 100.0
            );
            let latencies = latency(&running.state, &stripe, rate).await;
            println!(
                "  at {rate}/s: commit → remote p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
                pct(&latencies, 0.50).as_secs_f64() * 1e3,
                pct(&latencies, 0.99).as_secs_f64() * 1e3,
                latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
                latencies.len()
            );
            running.cancel.cancel();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}
