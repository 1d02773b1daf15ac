//! The operator console: page weight and the overview's render time over a
//! large catalog. A real ferry (SQLite by default;
//! `FERRY_BENCH_BACKEND=postgres` on a throw-away PostgreSQL) with
//! `FERRY_BENCH_CUSTOMERS` customers (default 100,000), each linked and
//! synced to Stripe, written straight into the store. Needs
//! `make connectors`.
//!
//! `cargo bench -p ferry --bench console` prints, for 300 sequential
//! requests after a warm-up, the p50 and p99 of:
//! - `GET /healthz`: the HTTP floor;
//! - `GET /api/v1/health`: the same counts as JSON, the API's cost;
//! - `GET /console`: the overview page (health and connectors through the
//!   API handlers, then the template), and its ratio to the API call;
//!
//! and every page's weight: its HTML plus the one stylesheet, the only
//! other thing a console page loads (no script, no image, no font).

use std::time::{Duration, Instant};

use ferry::app::App;
use ferry::config::Config;
use serde_json::json;

const REQUESTS: usize = 300;

fn main() {
    let customers: i64 = std::env::var("FERRY_BENCH_CUSTOMERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench(customers));
}

/// Fills the catalog: `n` customers, each linked to a Stripe record and
/// synced at version 1.
async fn seed(database_url: &str, n: i64) {
    if database_url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(database_url)
            .await
            .expect("sqlite");
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
             INSERT INTO customers (id, name, email, metadata, version, created_at, updated_at) \
             SELECT 'cus_' || printf('%032x', i), 'Customer ' || i, 'bench-' || i || '@example.com', '{}', 1, $2, $2 FROM n",
        )
        .bind(n)
        .bind(&at)
        .execute(&pool)
        .await
        .expect("customers");
        sqlx::query(
            "INSERT INTO sync_links (customer_id, connector, remote_id, wanted_version, synced_version, state, next_attempt_at_ms, updated_at) \
             SELECT id, 'stripe', 'cus_remote_' || substr(id, 5), 1, 1, 'synced', 0, $1 FROM customers",
        )
        .bind(&at)
        .execute(&pool)
        .await
        .expect("links");
    } else {
        let pool = sqlx::PgPool::connect(database_url).await.expect("postgres");
        sqlx::query(
            "INSERT INTO customers (id, name, email, metadata, version, created_at, updated_at) \
             SELECT 'cus_' || lpad(to_hex(i), 32, '0'), 'Customer ' || i, 'bench-' || i || '@example.com', '{}', 1, now(), now() \
             FROM generate_series(1, $1) AS i",
        )
        .bind(n)
        .execute(&pool)
        .await
        .expect("customers");
        sqlx::query(
            "INSERT INTO sync_links (customer_id, connector, remote_id, wanted_version, synced_version, state, next_attempt_at_ms, updated_at) \
             SELECT id, 'stripe', 'cus_remote_' || substr(id, 5), 1, 1, 'synced', 0, now() FROM customers",
        )
        .execute(&pool)
        .await
        .expect("links");
        sqlx::query("ANALYZE")
            .execute(&pool)
            .await
            .expect("analyze");
    }
}

/// p50 and p99 of `REQUESTS` sequential GETs of `url`.
async fn latencies(client: &reqwest::Client, url: &str, cookie: &str) -> (Duration, Duration) {
    let get = || async {
        let response = client
            .get(url)
            .header("cookie", cookie)
            .send()
            .await
            .expect("ferry");
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
        response.bytes().await.expect("body");
    };
    for _ in 0..20 {
        get().await;
    }
    let mut times = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let started = Instant::now();
        get().await;
        times.push(started.elapsed());
    }
    times.sort();
    (times[REQUESTS / 2], times[REQUESTS * 99 / 100])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

async fn bench(customers: i64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let connectors = ferry_test_support::bench::stripe_connectors_dir(dir.path());
    let (backend, database_url) = ferry_test_support::bench::database(dir.path()).await;
    let config = Config::from_overrides(json!({
        "listen": "127.0.0.1:0",
        "database_url": database_url,
        "connectors_dir": connectors,
        "allow_private_hosts": true,
        "connectors": {"stripe": {"settings": {"api_base": "http://127.0.0.1:9"}, "secrets": {"api_key": "sk_test_bench"}}},
    }))
    .expect("config");
    let app = App::build(config).await.expect("app");
    let base = format!("http://{}", app.address());
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    let seeding = Instant::now();
    seed(&database_url, customers).await;
    println!(
        "console bench on {backend}: {customers} customers, each linked and synced (seeded in {:.1} s)",
        seeding.elapsed().as_secs_f64()
    );

    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    // Open mode (no admin token, loopback): signing in needs no token.
    let signed_in = client
        .post(format!("{base}/console/sign-in"))
        .form(&[("next", "/console")])
        .send()
        .await
        .expect("sign in");
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("cookie pair")
        .to_owned();

    let (floor50, floor99) = latencies(&client, &format!("{base}/healthz"), &cookie).await;
    let (api50, api99) = latencies(&client, &format!("{base}/api/v1/health"), &cookie).await;
    let (page50, page99) = latencies(&client, &format!("{base}/console"), &cookie).await;
    println!(
        "GET /healthz         p50 {:7.2} ms  p99 {:7.2} ms",
        ms(floor50),
        ms(floor99)
    );
    println!(
        "GET /api/v1/health   p50 {:7.2} ms  p99 {:7.2} ms",
        ms(api50),
        ms(api99)
    );
    println!(
        "GET /console         p50 {:7.2} ms  p99 {:7.2} ms  (×{:.2} the API call's p50)",
        ms(page50),
        ms(page99),
        page50.as_secs_f64() / api50.as_secs_f64()
    );

    let css = client
        .get(format!("{base}/console/console.css"))
        .send()
        .await
        .expect("css")
        .bytes()
        .await
        .expect("css body")
        .len();
    let first = format!("cus_{:032x}", 1);
    for path in [
        "/console/sign-in".to_owned(),
        "/console".to_owned(),
        "/console/customers".to_owned(),
        format!("/console/customers/{first}"),
        "/console/conflicts".to_owned(),
        "/console/dead-letters".to_owned(),
        "/console/connectors".to_owned(),
        "/console/connectors/stripe".to_owned(),
        "/console/reconciliations".to_owned(),
    ] {
        let response = client
            .get(format!("{base}{path}"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("page");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        let html = response.bytes().await.expect("html").len();
        println!(
            "page weight {path:<52} {:5.1} KB (HTML {:.1} KB + stylesheet {:.1} KB)",
            (html + css) as f64 / 1_000.0,
            html as f64 / 1_000.0,
            css as f64 / 1_000.0
        );
    }
    cancel.cancel();
    let _ = server.await;
}
