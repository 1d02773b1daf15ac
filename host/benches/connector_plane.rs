//! The connector plane's costs, measured through the HTTP API of a real
//! ferry (SQLite by default; `FERRY_BENCH_BACKEND=postgres` runs it on a
//! throw-away PostgreSQL). Needs `make connectors`.
//!
//! `cargo bench -p ferry --bench connector_plane` prints:
//! - upload-to-active time of the Stripe component (`POST
//!   /api/v1/connectors` until it answers, which is after the version is
//!   active on this replica), median of 5, with a cold compiled-code cache
//!   (an empty cache directory, a fresh process state) and a warm one (a
//!   fresh database and runtime over the cache the cold uploads filled);
//! - webhook latency at the recorder test connector while 32 clients post
//!   as fast as they can for `FERRY_BENCH_SECONDS` (default 5), once with
//!   no version change and once with the active version swapped every
//!   250 ms: p50, p99, max, deliveries and non-2xx answers, and the ratio
//!   of the two p99s (same run, same machine).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use serde_json::{json, Value};

struct Running {
    base: String,
    cancel: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    /// Stops it and waits until its background work has stopped, so the
    /// next measurement has the machine to itself.
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.server.await;
    }
}

/// A ferry with no bundled connectors, compiling into `cache`.
async fn start(cache: &std::path::Path) -> Running {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("connectors");
    std::fs::create_dir_all(&empty).expect("dir");
    let (_, database_url) = ferry_test_support::bench::database(dir.path()).await;
    let config = Config::from_overrides(json!({
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "database_max_connections": 16,
        "connectors_dir": empty,
        "compile_cache_dir": cache,
        "allow_private_hosts": true,
    }))
    .expect("config");
    let app = App::build(config).await.expect("app");
    let base = format!("http://{}", app.address());
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    Running {
        base,
        cancel,
        server,
        _dir: dir,
    }
}

fn component(name: &str) -> Vec<u8> {
    std::fs::read(ferry_test_support::wasm::component_path(name)).expect("make connectors")
}

async fn upload(client: &reqwest::Client, base: &str, bytes: Vec<u8>) -> Duration {
    let started = Instant::now();
    let response = client
        .post(format!("{base}/api/v1/connectors"))
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("upload");
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
    elapsed
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn upload_to_active(client: &reqwest::Client) {
    let stripe = component("ferry_connector_stripe");
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for _ in 0..5 {
        let cache = tempfile::tempdir().expect("cache dir");
        let app = start(cache.path()).await;
        cold.push(upload(client, &app.base, stripe.clone()).await);
        app.stop().await;
        // A new database and runtime: only the disk cache is shared.
        let app = start(cache.path()).await;
        warm.push(upload(client, &app.base, stripe.clone()).await);
        app.stop().await;
    }
    let (cold, warm) = (median(cold), median(warm));
    println!(
        "upload-to-active, Stripe component ({} KiB): cold cache {:.0} ms, warm cache {:.0} ms ({:.1}x faster)",
        stripe.len() / 1024,
        cold.as_secs_f64() * 1e3,
        warm.as_secs_f64() * 1e3,
        cold.as_secs_f64() / warm.as_secs_f64()
    );
}

struct Load {
    latencies: Vec<Duration>,
    failures: usize,
    /// How long each activation call took.
    swaps: Vec<Duration>,
}

impl Load {
    fn percentile(&self, p: f64) -> Duration {
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i]
    }

    fn report(&self, label: &str) {
        println!(
            "  {label:<28} {:>7} deliveries, {:>3} non-2xx, p50 {:>6.2} ms, p99 {:>6.2} ms, max {:>7.2} ms",
            self.latencies.len(),
            self.failures,
            self.percentile(0.50).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3,
            self.latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
}

/// 32 clients posting recorder webhooks for `seconds`; while `swap`, the
/// active version alternates every 250 ms.
async fn webhook_load(client: &reqwest::Client, base: &str, seconds: u64, swap: bool) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new(Load {
        latencies: Vec::new(),
        failures: 0,
        swaps: Vec::new(),
    }));
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let mut tasks = Vec::new();
    for worker in 0..32 {
        let (client, base, stop, results, tag) = (
            client.clone(),
            base.to_owned(),
            stop.clone(),
            results.clone(),
            tag.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("{tag}-{worker}-{n}");
                let body = json!({"id": id, "remote_id": id, "record": {"email": format!("{id}@example.com")}});
                let started = Instant::now();
                let ok = client
                    .post(format!("{base}/webhooks/recorder"))
                    .json(&body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                let elapsed = started.elapsed();
                let mut results = results.lock().unwrap();
                results.latencies.push(elapsed);
                if !ok {
                    results.failures += 1;
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut version = "0.2.0";
    let mut swaps = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if swap {
            let started = Instant::now();
            let response = if std::env::var_os("FERRY_BENCH_SWAP_NOOP").is_some() {
                client
                    .get(format!("{base}/api/v1/connectors/recorder/versions"))
                    .send()
                    .await
                    .expect("versions")
            } else {
                client
                    .post(format!("{base}/api/v1/connectors/recorder/activate"))
                    .json(&json!({"version": version}))
                    .send()
                    .await
                    .expect("activate")
            };
            assert_eq!(response.status(), 200);
            swaps.push(started.elapsed());
            if std::env::var_os("FERRY_BENCH_SWAP_SAME").is_none() {
                version = if version == "0.2.0" { "0.1.0" } else { "0.2.0" };
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("client");
    }
    let mut load = std::mem::replace(
        &mut *results.lock().unwrap(),
        Load {
            latencies: Vec::new(),
            failures: 0,
            swaps: Vec::new(),
        },
    );
    load.latencies.sort();
    load.swaps = swaps;
    load
}

/// A fresh ferry with both recorder versions stored and the recorder
/// enabled, warmed up.
async fn recorder_app(client: &reqwest::Client, cache: &std::path::Path) -> Running {
    let app = start(cache).await;
    upload(client, &app.base, component("ferry_test_recorder")).await;
    let bytes = std::fs::read(ferry_test_support::wasm::variant_path(
        "ferry_test_recorder",
        "version-2",
    ))
    .expect("make connectors");
    upload(client, &app.base, bytes).await;
    let enabled: Value = client
        .post(format!("{}/api/v1/connectors/recorder/enable", app.base))
        .send()
        .await
        .expect("enable")
        .json()
        .await
        .expect("json");
    assert_eq!(enabled["state"], "enabled", "{enabled}");
    webhook_load(client, &app.base, 1, true).await;
    app
}

async fn webhooks_during_swaps(client: &reqwest::Client) {
    let seconds: u64 = std::env::var("FERRY_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cache = tempfile::tempdir().expect("cache dir");
    println!(
        "webhooks at the recorder, 32 clients, {seconds} s per window, each on a fresh ferry, alternating:"
    );
    let (mut steady, mut swapping) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for swap in [false, true] {
            let app = recorder_app(client, cache.path()).await;
            let load = webhook_load(client, &app.base, seconds, swap).await;
            let label = if swap {
                format!("swap every 250 ms, #{}", round + 1)
            } else {
                format!("no change, #{}", round + 1)
            };
            load.report(&label);
            app.stop().await;
            if swap {
                swapping.push(load);
            } else {
                steady.push(load);
            }
        }
    }
    let median_p99 = |loads: &[Load]| median(loads.iter().map(|l| l.percentile(0.99)).collect());
    let activations: Vec<Duration> = swapping.iter().flat_map(|l| l.swaps.clone()).collect();
    println!(
        "  median p99: {:.2} ms without, {:.2} ms with swaps, ratio {:.2}; {} activations, median {:.1} ms each",
        median_p99(&steady).as_secs_f64() * 1e3,
        median_p99(&swapping).as_secs_f64() * 1e3,
        median_p99(&swapping).as_secs_f64() / median_p99(&steady).as_secs_f64(),
        activations.len(),
        median(activations).as_secs_f64() * 1e3,
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client");
        upload_to_active(&client).await;
        webhooks_during_swaps(&client).await;
    });
}
