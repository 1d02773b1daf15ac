//! Operations: `/metrics` moves with what happens (parsed as Prometheus
//! text), one correlation id follows a change to Stripe and back in the
//! JSON logs, `/readyz` follows PostgreSQL going away and coming back,
//! retention trims what is finished and keeps what a person must see, and
//! `ferry status` shows a dead letter.

use std::collections::BTreeMap;
use std::time::Duration;

use ferry::runtime::{ConnectorConfig, Operation, PushRequest, Runtime, RuntimeConfig};
use ferry_test_support::localstripe::LocalStripe;
use ferry_test_support::postgres::PgCluster;
use serde_json::{json, Value};
use tokio::process::Command;

use crate::helpers::{
    email, execute_raw, new_database, salesforce_component, spawn_sync_app, stripe_component,
    Backend, Setup, SyncApp, STRIPE_KEY, WEBHOOK_SECRET,
};
use crate::inbound::{deliver, event, stripe_customer_json, stripe_signature};
use crate::process::FerryProcess;

const TOKEN: &str = "ops-test-admin-token-0123456789";

/// One scrape, parsed: (name, labels) → value (histograms by their
/// `_count`).
pub(crate) type Scrape = Vec<(String, BTreeMap<String, String>, f64)>;

pub(crate) async fn scrape(base: &str) -> Scrape {
    let response = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scraped");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let text = response.text().await.unwrap();
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text format");
    parsed
        .samples
        .into_iter()
        .filter_map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => buckets.last().map(|b| b.count)?,
                prometheus_parse::Value::Summary(_) => return None,
            };
            let labels = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Some((sample.metric, labels, value))
        })
        .collect()
}

/// The sum of `name`'s samples whose labels include `labels`.
pub(crate) fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

#[tokio::test]
async fn a_request_cut_off_by_the_request_timeout_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({"request_timeout": "500ms", "body_read_timeout": "30s"});
    let app = spawn_sync_app(setup).await;
    let before = scrape(&app.base).await;

    // A create whose body never ends: the whole request times out.
    let address = app.base.trim_start_matches("http://");
    let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
    stalled
        .write_all(b"POST /api/v1/customers HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"email\":")
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut reply))
        .await
        .expect("answered")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply[..read]);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");

    let after = scrape(&app.base).await;
    let timed_out = [
        ("method", "POST"),
        ("route", "/api/v1/customers"),
        ("status", "408"),
    ];
    assert!(
        moved(&before, &after, "ferry_http_requests_total", &timed_out) >= 1.0,
        "the 408 is counted"
    );
    assert!(
        moved(
            &before,
            &after,
            "ferry_http_request_duration_seconds",
            &timed_out
        ) >= 1.0
    );
}

/// The failure counters an alert watches are there at 0 before the first
/// failure: a series that first appears at 1 is no `increase()` to
/// Prometheus, and the documented dead-letter alert missed a replica's
/// first dead letter.
#[tokio::test]
async fn failure_counters_are_there_before_the_first_failure() {
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, "http://127.0.0.1:9")).await;
    let wanted = [
        ("ferry_dead_letters_total", "outbound"),
        ("ferry_dead_letters_total", "inbound"),
        ("ferry_sync_retries_total", "outbound"),
        ("ferry_sync_retries_total", "inbound"),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = scrape(&app.base).await;
        let there = |name: &str, labels: &[(&str, &str)]| {
            scrape.iter().any(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
        };
        let missing: Vec<_> = wanted
            .iter()
            .filter(|(name, direction)| {
                !there(name, &[("connector", "stripe"), ("direction", direction)])
            })
            .collect();
        let retention = there("ferry_retention_failures_total", &[])
            && ferry::metrics::BACKGROUND_TASKS
                .iter()
                .all(|task| there("ferry_background_failures_total", &[("task", task)]));
        if missing.is_empty() && retention {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "absent: {missing:?}, retention failures there: {retention}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_move_with_syncs_refused_webhooks_retries_and_traps() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let before = scrape(&app.base).await;

    // A customer synced to Stripe.
    let customer = app
        .create(json!({"email": email("metrics"), "name": "M"}))
        .await;
    app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
    // A create whose email is taken: its group fails and is committed
    // again write by write, which answers it 409.
    let (status, problem) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/customers",
            Some(json!({"email": customer["email"], "name": "Again"})),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    // A webhook with a wrong signature.
    let body = event(
        "evt_metrics_bad",
        "customer.updated",
        1,
        stripe_customer_json("cus_x", "x@example.com", "X"),
    );
    let (status, _) = deliver(&app, &body, "t=1,v1=00").await;
    assert_eq!(status, 400);

    let after = scrape(&app.base).await;
    let delivered = [
        ("connector", "stripe"),
        ("direction", "outbound"),
        ("outcome", "delivered"),
    ];
    assert!(moved(&before, &after, "ferry_sync_deliveries_total", &delivered) >= 1.0);
    let created = [
        ("method", "POST"),
        ("route", "/api/v1/customers"),
        ("status", "201"),
    ];
    assert!(moved(&before, &after, "ferry_http_requests_total", &created) >= 1.0);
    assert!(
        moved(
            &before,
            &after,
            "ferry_http_request_duration_seconds",
            &created
        ) >= 1.0
    );
    let refused = [("connector", "stripe"), ("result", "invalid_signature")];
    assert!(
        moved(
            &before,
            &after,
            "ferry_webhook_verifications_total",
            &refused
        ) >= 1.0
    );
    let pushes = [("connector", "stripe"), ("function", "push")];
    assert!(
        moved(
            &before,
            &after,
            "ferry_connector_call_duration_seconds",
            &pushes
        ) >= 1.0
    );
    // The create and the push's outcome went through their group commits.
    for writes in ["creates", "link_writes"] {
        let group = [("writes", writes)];
        assert!(
            moved(&before, &after, "ferry_group_commit_size", &group) >= 1.0,
            "{writes}"
        );
    }
    let creates = [("writes", "creates")];
    assert!(
        moved(
            &before,
            &after,
            "ferry_group_commit_failures_total",
            &creates
        ) >= 1.0
    );
    // Routes are templates, never raw paths.
    assert!(
        after
            .iter()
            .all(|(n, l, _)| n != "ferry_http_requests_total" || !l["route"].contains("cus_")),
        "raw path in a route label"
    );

    // Pushes to a Stripe that refuses connections: retried, then dead.
    let mut down = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    down.extra = json!({"admin_token": TOKEN, "sync_max_attempts": 2});
    let down = spawn_sync_app(down).await;
    let customer = down
        .create(json!({"email": email("retried"), "name": "R"}))
        .await;
    let id = customer["id"].as_str().unwrap().to_owned();
    wait_until("the push to be dead-lettered", || async {
        down.sync_status(&id).await["connectors"][0]["state"] == "dead"
    })
    .await;
    let later = scrape(&down.base).await;
    let outbound = [("connector", "stripe"), ("direction", "outbound")];
    assert!(moved(&after, &later, "ferry_sync_retries_total", &outbound) >= 1.0);
    assert!(moved(&after, &later, "ferry_dead_letters_total", &outbound) >= 1.0);

    // A guest that traps, and one that runs past its deadline.
    let runtime = Runtime::new(RuntimeConfig {
        call_timeout: Duration::from_millis(300),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let hostile = std::fs::read(ferry_test_support::wasm::component_path(
        "ferry_test_hostile",
    ))
    .expect("hostile.wasm");
    let connector = runtime.load(&hostile).await.expect("loads");
    let push = |what: &str| PushRequest {
        entity: "customer".into(),
        operation: Operation::Create,
        local_id: "cus_1".into(),
        remote_id: None,
        version: 1,
        idempotency_key: "k".into(),
        record: json!({"do": what}).to_string(),
    };
    let cfg = ConnectorConfig::default();
    assert!(connector.push(&cfg, push("trap")).await.is_err());
    assert!(connector.push(&cfg, push("loop")).await.is_err());
    let last = scrape(&app.base).await;
    let hostile_push = [("connector", "hostile"), ("function", "push")];
    assert!(moved(&later, &last, "ferry_connector_traps_total", &hostile_push) >= 1.0);
    assert!(
        moved(
            &later,
            &last,
            "ferry_connector_timeouts_total",
            &hostile_push
        ) >= 1.0
    );

    // The backlog gauges come from a background refresh.
    wait_until("the dead-letter gauge", || async {
        let now = scrape(&down.base).await;
        value(&now, "ferry_dead_letters_unreplayed", &outbound) >= 1.0
    })
    .await;

    // `ferry status` shows the dead letter, as a table and as JSON.
    let status = |json: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
        command
            .args(["status", "--url", &down.base])
            .env("FERRY_ADMIN_TOKEN", TOKEN);
        if json {
            command.arg("--json");
        }
        // Through tokio: the app answers it on this runtime.
        async move {
            let out = command.output().await.expect("ferry status runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let parsed: Value = serde_json::from_str(&status(true).await).expect("JSON");
    let stripe_health = parsed["connectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["connector"] == "stripe")
        .expect("stripe in the health summary")
        .clone();
    assert_eq!(stripe_health["dead_letters"], 1, "{parsed:#}");
    assert_eq!(stripe_health["links"]["dead"], 1, "{parsed:#}");
    assert!(stripe_health["last_error"].as_str().is_some(), "{parsed:#}");
    // Told by the configuration file where the instance listens and with
    // which token, as `ferry serve --config` would be.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ferry.toml");
    let listen = down.base.trim_start_matches("http://");
    std::fs::write(
        &file,
        format!("listen = \"{listen}\"\nadmin_token = \"{TOKEN}\"\n"),
    )
    .expect("config written");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("--config")
        .arg(&file)
        .args(["status", "--json"])
        .env_remove("FERRY_ADMIN_TOKEN")
        .env_remove("FERRY_LISTEN")
        .output()
        .await
        .expect("ferry status runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_file: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(from_file["connectors"].is_array(), "{from_file:#}");
    let table = status(false).await;
    let mut lines = table.lines().skip_while(|l| !l.starts_with("CONNECTOR"));
    let header = split_columns(lines.next().expect("a header"));
    let row = split_columns(
        lines
            .find(|l| l.starts_with("stripe"))
            .expect("a stripe row"),
    );
    let column = header
        .iter()
        .position(|h| h == "DEAD LETTERS")
        .expect("column");
    assert_eq!(row[column], "1", "{table}");
    // Without the token: refused, and said so.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["status", "--url", &down.base])
        .env_remove("FERRY_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

fn split_columns(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A collector that refuses the spans (a wrong path or port, a 401) is
/// named in the log: the exporter's failures were dropped without a
/// trace, and an operator believed tracing was on.
#[tokio::test]
async fn an_otlp_collector_that_refuses_the_spans_is_named_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let collector = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(|| async { axum::http::StatusCode::NOT_FOUND }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    };
    let env = BTreeMap::from([
        (
            "FERRY_DATABASE_URL".to_owned(),
            format!("sqlite://{}", dir.path().join("f.db").display()),
        ),
        ("FERRY_OTLP_ENDPOINT".to_owned(), collector),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ]);
    let ferry = FerryProcess::start(env, dir.path()).await;
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ferry.log_text().contains("ExportError") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no export failure in the log:\n{}",
            ferry.log_text()
        );
        let _ = client
            .get(format!("{}/api/v1/customers", ferry.base))
            .send()
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The real binary with JSON logs: a customer created through the API
/// reaches localstripe, localstripe's webhook comes back and is suppressed
/// as an echo, and every step logs the API request's correlation id; the
/// spans reach an OTLP collector with it.
#[tokio::test]
async fn one_correlation_id_follows_a_change_to_stripe_and_its_echo() {
    let stripe = LocalStripe::start().expect("localstripe");
    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).unwrap();
    std::fs::copy(stripe_component(), connectors.join("stripe.wasm")).unwrap();
    let env = BTreeMap::from([
        (
            "FERRY_DATABASE_URL".to_owned(),
            format!("sqlite://{}", dir.path().join("f.db").display()),
        ),
        (
            "FERRY_CONNECTORS_DIR".to_owned(),
            connectors.display().to_string(),
        ),
        ("FERRY_ALLOW_PRIVATE_HOSTS".to_owned(), "true".to_owned()),
        ("FERRY_LOG_FORMAT".to_owned(), "json".to_owned()),
        (
            "FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE".to_owned(),
            stripe.url(),
        ),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY".to_owned(),
            STRIPE_KEY.to_owned(),
        ),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET".to_owned(),
            WEBHOOK_SECRET.to_owned(),
        ),
    ]);
    // An OTLP/HTTP collector that keeps what it is sent.
    let exported = std::sync::Arc::new(std::sync::Mutex::new(Vec::<bytes::Bytes>::new()));
    let collector = {
        let exported = exported.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: bytes::Bytes| async move {
                exported.lock().unwrap().push(body);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{address}")
    };
    let mut env = env;
    env.insert("FERRY_OTLP_ENDPOINT".to_owned(), collector);
    env.insert("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned());
    let ferry = FerryProcess::start(env, dir.path()).await;
    stripe
        .register_webhook(
            "ferry",
            &format!("{}/webhooks/stripe", ferry.base),
            WEBHOOK_SECRET,
            None,
        )
        .await
        .expect("webhook registered");

    let correlation = format!("req-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/customers", ferry.base))
        .header("x-request-id", &correlation)
        .json(&json!({"email": email("correlated"), "name": "Correlated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.headers()["x-request-id"],
        correlation.as_str(),
        "returned in a header"
    );
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Every step's line, found by the one id.
    let lines_with = |text: &str| -> Vec<Value> {
        ferry
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l.to_string().contains(text))
            .collect()
    };
    wait_until("the echo to be suppressed", || async {
        lines_with(&correlation)
            .iter()
            .any(|l| l["message"] == "echo suppressed")
    })
    .await;
    let lines = lines_with(&correlation);
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    for step in ["finished processing request", "pushed", "echo suppressed"] {
        assert!(
            messages.iter().any(|m| m.starts_with(step)),
            "no `{step}` line with {correlation}: {messages:?}"
        );
    }
    let pushed = lines.iter().find(|l| l["message"] == "pushed").unwrap();
    assert_eq!(pushed["span"]["customer_id"], id.as_str(), "{pushed}");
    // The same spans, exported over OTLP (protobuf keeps strings as bytes).
    wait_until("the spans to be exported", || async {
        exported.lock().unwrap().iter().any(|body| {
            body.windows(correlation.len())
                .any(|w| w == correlation.as_bytes())
        })
    })
    .await;
    // Stored with the delivery, and named in the echo's inbound outcome
    // (logged as it is decided, and written a moment after: read once it
    // is there, within the wait's bound).
    let sync_view = || async {
        reqwest::get(format!("{}/api/v1/customers/{id}/sync", ferry.base))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    wait_until("the echo's outcome to be written", || async {
        sync_view().await["inbound"]
            .as_array()
            .is_some_and(|events| !events.is_empty())
    })
    .await;
    let sync = sync_view().await;
    assert_eq!(
        sync["history"][0]["correlation_id"],
        correlation.as_str(),
        "{sync:#}"
    );
    assert!(
        sync["inbound"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&correlation))),
        "the echo names the change: {sync:#}"
    );
}

/// The real binary's text log, under a refused Salesforce Outbound
/// Message whose organization id holds line breaks (no signature is
/// needed to be refused): the connector's refusal names that id, and the
/// forged "line" stays inside the refusal's own. Before, the host logged
/// the connector's text as it came, and anyone could write lines of
/// their choosing into the log.
#[tokio::test]
async fn a_refused_webhook_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).unwrap();
    std::fs::copy(salesforce_component(), connectors.join("salesforce.wasm")).unwrap();
    let env = BTreeMap::from([
        (
            "FERRY_DATABASE_URL".to_owned(),
            format!("sqlite://{}", dir.path().join("f.db").display()),
        ),
        (
            "FERRY_CONNECTORS_DIR".to_owned(),
            connectors.display().to_string(),
        ),
        // Never reached; a value the egress policy allows (a private
        // address would leave the connector waiting for its settings, and
        // its webhooks answered 404).
        (
            "FERRY_CONNECTORS__SALESFORCE__SETTINGS__LOGIN_URL".to_owned(),
            "https://login.example.com".to_owned(),
        ),
        (
            "FERRY_CONNECTORS__SALESFORCE__SETTINGS__ORGANIZATION_ID".to_owned(),
            "00D000000000001AAA".to_owned(),
        ),
        (
            "FERRY_CONNECTORS__SALESFORCE__SECRETS__CLIENT_ID".to_owned(),
            "client".to_owned(),
        ),
        (
            "FERRY_CONNECTORS__SALESFORCE__SECRETS__CLIENT_SECRET".to_owned(),
            "secret".to_owned(),
        ),
    ]);
    let ferry = FerryProcess::start(env, dir.path()).await;
    let forged = "2026-12-05T10:00:00.000000Z  INFO ferry::api: FORGED admin token rotated";
    let body = format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><notifications xmlns="http://soap.sforce.com/2005/09/outbound"><OrganizationId>00Dx&#10;{forged}&#13;&#10;{forged}</OrganizationId><Notification><Id>04l000000000001AAA</Id><sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><sf:Id>003000000000001AAA</sf:Id></sObject></Notification></notifications></soapenv:Body></soapenv:Envelope>"#
    );
    let response = reqwest::Client::new()
        .post(format!("{}/webhooks/salesforce", ferry.base))
        .header("content-type", "text/xml; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "refused as unsigned");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = ferry.log_text();
        if log.contains("webhook refused: signature") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal is logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refusal = log
        .lines()
        .find(|l| l.contains("webhook refused: signature"))
        .unwrap();
    assert!(
        refusal.contains("FORGED"),
        "the id is in the refusal: {refusal}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-12-05T10:00:00.000000Z")),
        "a forged line: {log}"
    );
}

/// `/readyz` names the store when PostgreSQL stops, and is ready again
/// when it is back; the process stays up throughout.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_postgres_going_away_and_coming_back() {
    let cluster = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .unwrap()
        .expect("a private cluster");
    let url = cluster.create_database().await.unwrap();
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.database_url = Some(url);
    let app = spawn_sync_app(setup).await;
    let readyz = |app: &SyncApp| {
        let url = format!("{}/readyz", app.base);
        async move {
            let response = reqwest::get(url).await.expect("answered");
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["status"], "ready");
    assert!(
        body["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "connector:stripe" && c["ok"] == true),
        "{body:#}"
    );

    tokio::task::block_in_place(|| cluster.pause()).expect("postgres stops");
    wait_until("/readyz to say 503", || async {
        readyz(&app).await.0 == 503
    })
    .await;
    let seen = readyz(&app).await;
    assert_eq!(seen.1["not_ready"], json!(["store"]), "{:#}", seen.1);
    // This route is open: the driver's error, which names the host, the
    // user and the database, goes to the log only.
    let detail = seen.1["checks"][0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("the store") && !detail.contains("127.0.0.1"),
        "{detail}"
    );

    tokio::task::block_in_place(|| cluster.resume()).expect("postgres starts again");
    wait_until("/readyz to say 200 again", || async {
        readyz(&app).await.0 == 200
    })
    .await;
    // And it serves again.
    app.create(json!({"email": email("back"), "name": "Back"}))
        .await;
}

/// `/readyz` on a database that takes no writes (set read-only, as a hot
/// standby is) says so, and is ready again once it takes them; before, a
/// replica left on a standby stayed in the load balancer answering every
/// write 5xx. And a burst of probes (the route is open) shares one probe
/// of the store instead of taking a pooled connection each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_when_the_database_takes_no_writes_and_shares_its_probes() {
    let app = spawn_sync_app(Setup::new(Backend::Postgres, "http://127.0.0.1:9")).await;
    // Leases follow the database's clock: on one machine, the same.
    let offset = app.store.follow_database_clock().await.unwrap();
    assert!(offset.abs() < 1_000, "{offset} ms");
    let readyz = |app: &SyncApp| {
        let url = format!("{}/readyz", app.base);
        async move {
            let response = reqwest::get(url).await.expect("answered");
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let before = app.probes.made();
    let burst = futures::future::join_all((0..64).map(|_| readyz(&app))).await;
    assert!(burst.iter().all(|(status, _)| *status == 200), "{burst:?}");
    // One probe answers a second's requests (a slow machine may spread
    // the burst over a few seconds).
    let made = app.probes.made() - before;
    assert!(made <= 8, "{made} probes for 64 requests");

    // One connection, made before the setting: it stays writable.
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.database_url)
        .await
        .unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    set_read_only(&mut admin, &database, true).await;
    wait_until("/readyz to say the store takes no writes", || async {
        let (status, body) = readyz(&app).await;
        status == 503
            && body["not_ready"] == json!(["store"])
            && body["checks"][0]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("takes no writes"))
    })
    .await;
    // Writes meanwhile are a 503 to send again, not a 500.
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/v1/customers", app.base))
        .json(&json!({"email": email("read-only"), "name": "Read Only"}));
    if let Some(token) = &app.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("answered");
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, problem) = (
        response.status().as_u16(),
        response.json::<Value>().await.unwrap(),
    );
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("store_read_only")),
        "{problem}"
    );
    assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"5"[..]));
    // A signed webhook is refused alike, and not counted as taken.
    let before = scrape(&app.base).await;
    let body = event(
        "evt_read_only",
        "customer.updated",
        chrono::Utc::now().timestamp(),
        stripe_customer_json("cus_ro", "ro@example.com", "Read Only"),
    );
    let (status, problem) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("store_read_only"))
    );
    let after = scrape(&app.base).await;
    let counted = |result| {
        let labels = [("connector", "stripe"), ("result", result)];
        moved(
            &before,
            &after,
            "ferry_webhook_verifications_total",
            &labels,
        )
    };
    assert_eq!((counted("unstored"), counted("verified")), (1.0, 0.0));
    set_read_only(&mut admin, &database, false).await;
    wait_until("/readyz to say 200 again", || async {
        readyz(&app).await.0 == 200
    })
    .await;
    app.create(json!({"email": email("writable"), "name": "Writable"}))
        .await;
}

/// `/readyz` asks PostgreSQL on a connection of its own: a pool busy under
/// load (every connection held past the probe's 2 s, here behind a lock)
/// is a slow replica, not one to take out of the load balancer. On the
/// shared pool, the probe waited for a connection and every replica of
/// the database went unready at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_busy_pool_leaves_the_replica_ready() {
    let mut setup = Setup::new(Backend::Postgres, "http://127.0.0.1:9");
    setup.extra = json!({"database_max_connections": 2, "database_lock_timeout": "60s"});
    let app = spawn_sync_app(setup).await;
    let mut ids = Vec::new();
    for n in 0..2 {
        let customer = app
            .create(json!({"email": email(&format!("busy-{n}")), "name": "Busy"}))
            .await;
        ids.push(customer["id"].as_str().unwrap().to_owned());
    }
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&app.database_url)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    // A write per pooled connection, each waiting on the lock.
    let writes: Vec<_> = ids
        .iter()
        .map(|id| {
            let mut request = reqwest::Client::new()
                .patch(format!("{}/api/v1/customers/{id}", app.base))
                .json(&json!({"name": "Busier"}));
            if let Some(token) = &app.token {
                request = request.bearer_auth(token);
            }
            tokio::spawn(request.send())
        })
        .collect();
    let waiting = || async {
        let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&app.database_url)
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap()
    };
    wait_until("both pooled connections to wait on the lock", || async {
        waiting().await >= 2
    })
    .await;
    // Past the shared probes' second, so the store is asked now.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let response = reqwest::get(format!("{}/readyz", app.base))
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("ready")),
        "{body:#}"
    );

    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    for write in writes {
        let response = write.await.unwrap().expect("answered");
        assert_eq!(response.status(), 200);
    }
}

/// Sets `database` read-only (or back) from `admin`, and makes every other
/// connection to it again under the setting.
async fn set_read_only(admin: &mut sqlx::PgConnection, database: &str, on: bool) {
    let set = if on {
        format!("ALTER DATABASE \"{database}\" SET default_transaction_read_only = on")
    } else {
        format!("ALTER DATABASE \"{database}\" RESET default_transaction_read_only")
    };
    sqlx::query(&set).execute(&mut *admin).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut *admin)
    .await
    .unwrap();
}

/// Retention deletes finished outbox events, applied inbox events and old
/// deliveries, and keeps dead letters and the inbox events they point at.
async fn retention_trims_what_is_finished(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    for n in 0..3 {
        let customer = app
            .create(json!({"email": email(&format!("ret{n}")), "name": "R"}))
            .await;
        app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
    }
    // One applied inbound event, and one dead-lettered (no email).
    let created = chrono::Utc::now().timestamp();
    let inbound_email = email("retin");
    let applied = event(
        "evt_ret_ok",
        "customer.created",
        created,
        stripe_customer_json("cus_ret_ok", &inbound_email, "In"),
    );
    assert_eq!(
        deliver(&app, &applied, &stripe_signature(&applied, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    let dead = event(
        "evt_ret_dead",
        "customer.created",
        created,
        json!({"id": "cus_ret_dead", "object": "customer", "email": null, "name": "No email", "metadata": {}}),
    );
    assert_eq!(
        deliver(&app, &dead, &stripe_signature(&dead, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    // And the delete of a record never linked (skipped): what tells a
    // late redelivery of its create that the record is gone.
    let gone = event(
        "evt_ret_gone",
        "customer.deleted",
        created,
        stripe_customer_json("cus_ret_gone", &email("retgone"), "Gone"),
    );
    assert_eq!(
        deliver(&app, &gone, &stripe_signature(&gone, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    app.wait_inbox_settled("stripe", "cus_ret_gone", 1).await;
    app.wait_customer_by_email(&inbound_email).await;
    wait_until("the inbound dead letter", || async {
        count(&app, "/api/v1/dead-letters").await == 1
    })
    .await;
    // The inbound change's own outbox event is relayed too.
    wait_until("the outbox to drain", || async {
        app.store.backlog().await.unwrap().outbox_unpublished == 0
    })
    .await;
    let before = app.store.table_rows().await.unwrap();
    assert!(
        before["outbox"] >= 3 && before["deliveries"] >= 3 && before["inbox"] >= 3,
        "{before:?}"
    );

    tokio::time::sleep(Duration::from_millis(50)).await;
    let retention = ferry::retention::Retention {
        keep: Duration::from_millis(10),
        every: Duration::from_secs(60),
        // Small batches: several steps per table.
        batch: 2,
    };
    let scraped = scrape(&app.base).await;
    let deleted = ferry::retention::pass(&app.store, retention, &Default::default())
        .await
        .unwrap();
    let after = app.store.table_rows().await.unwrap();
    // Counted (other tests share the process's recorder: at least ours).
    let now = scrape(&app.base).await;
    assert!(
        moved(&scraped, &now, "ferry_retention_deleted_total", &[]) >= deleted as f64,
        "{deleted}"
    );
    assert!(
        moved(
            &scraped,
            &now,
            "ferry_retention_deleted_total",
            &[("table", "deliveries")]
        ) >= 3.0
    );
    let finished = value(&now, "ferry_retention_last_success_timestamp_seconds", &[]);
    assert!(
        finished >= (chrono::Utc::now().timestamp() - 60) as f64,
        "{finished}"
    );
    assert_eq!(after["deliveries"], 0, "{after:?}");
    assert_eq!(after["outbox"], 0, "published and consumed: {after:?}");
    assert_eq!(
        after["inbox"], 2,
        "the dead event stays, and the delete for 4 days: {after:?}"
    );
    // What stays is not walked again by every pass: a window held the
    // dead event (and a writer's delete of nothing each step).
    let step = app
        .store
        .trim(
            ferry::store::health::Trimmed::Inbox,
            0,
            chrono::Utc::now(),
            1,
        )
        .await
        .unwrap();
    assert_eq!(step.next, None, "{step:?}");
    assert!(app
        .store
        .remote_deleted_since("stripe", "cus_ret_gone", created * 1000)
        .await
        .unwrap());
    assert_eq!(
        deleted as i64,
        before.values().sum::<i64>() - after.values().sum::<i64>()
    );
    assert_eq!(count(&app, "/api/v1/dead-letters").await, 1);
    assert_eq!(
        count(&app, "/api/v1/sync/inbox?state=dead&connector=stripe").await,
        1
    );
    assert_eq!(count(&app, "/api/v1/sync/inbox?state=applied").await, 0);
    // Nothing younger than the retention goes.
    let customer = app
        .create(json!({"email": email("young"), "name": "Y"}))
        .await;
    app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
    let long = ferry::retention::Retention {
        keep: Duration::from_secs(3600),
        ..retention
    };
    assert_eq!(
        ferry::retention::pass(&app.store, long, &Default::default())
            .await
            .unwrap(),
        0
    );
    // A pass that fails is counted too.
    let dir = tempfile::tempdir().unwrap();
    let failing = ferry::store::Store::connect(
        &new_database(backend, dir.path()).await,
        &ferry::store::StoreOptions::default(),
    )
    .await
    .unwrap();
    failing.close().await;
    let scraped = scrape(&app.base).await;
    assert!(
        ferry::retention::pass(&failing, retention, &Default::default())
            .await
            .is_err()
    );
    let now = scrape(&app.base).await;
    assert!(moved(&scraped, &now, "ferry_retention_failures_total", &[]) >= 1.0);
    // The backlog gauges say when they were last read.
    assert!(value(&now, "ferry_backlog_refreshed_timestamp_seconds", &[]) > 0.0);
}

/// A table retention cannot trim (here: the outbox's queue renamed away;
/// a lock or statement timeout, a privilege taken, elsewhere) leaves the
/// others trimmed, and the pass still fails. It stopped at the outbox, the
/// first, and the deliveries and the inbox grew unchecked.
#[tokio::test]
async fn a_table_retention_cannot_trim_leaves_the_others_trimmed() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let customer = app
        .create(json!({"email": email("ret-partial"), "name": "R"}))
        .await;
    app.wait_synced(customer["id"].as_str().unwrap(), 1).await;
    wait_until("the outbox to drain", || async {
        app.store.backlog().await.unwrap().outbox_unpublished == 0
    })
    .await;
    let before = app.store.table_rows().await.unwrap();
    assert!(
        before["outbox"] >= 1 && before["deliveries"] >= 1,
        "{before:?}"
    );
    execute_raw(
        &app.database_url,
        "ALTER TABLE outbox_queue RENAME TO outbox_queue_away",
        b"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let retention = ferry::retention::Retention {
        keep: Duration::from_millis(10),
        every: Duration::from_secs(60),
        batch: 100,
    };
    assert!(
        ferry::retention::pass(&app.store, retention, &Default::default())
            .await
            .is_err()
    );
    let after = app.store.table_rows().await.unwrap();
    assert_eq!(after["outbox"], before["outbox"], "{after:?}");
    assert_eq!(after["deliveries"], 0, "{after:?}");
    execute_raw(
        &app.database_url,
        "ALTER TABLE outbox_queue_away RENAME TO outbox_queue",
        b"",
    )
    .await;
}

/// An event waiting out a retry's backoff is not the pipeline behind: the
/// inbox's age counts the events that are due. Counted from its arrival,
/// one thin event whose fetch failed once paged the documented alert for
/// up to 17 minutes while every other event applied at once.
#[tokio::test]
async fn an_event_in_backoff_does_not_age_the_inbox() {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &stripe.url())).await;
    let body = event(
        "evt_backoff",
        "customer.created",
        chrono::Utc::now().timestamp(),
        stripe_customer_json("cus_backoff", &email("backoff"), "Backoff"),
    );
    assert_eq!(
        deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    app.wait_inbox_settled("stripe", "cus_backoff", 1).await;
    // Back to a retry due in ten minutes.
    let later = chrono::Utc::now().timestamp_millis() + 600_000;
    execute_raw(
        &app.database_url,
        &format!(
            "UPDATE inbox SET state = 'retry', next_attempt_at_ms = {later} \
             WHERE event_id = 'evt_backoff'"
        ),
        b"",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let backlog = app.store.backlog().await.unwrap();
    assert_eq!(
        backlog.inbox_unapplied.get("stripe"),
        Some(&1),
        "{backlog:?}"
    );
    assert_eq!(backlog.inbox_oldest_age, Duration::ZERO, "{backlog:?}");
    // Due (its backoff over, the loops not at it yet): it counts from then.
    let due = chrono::Utc::now().timestamp_millis() - 90_000;
    execute_raw(
        &app.database_url,
        &format!(
            "UPDATE inbox SET next_attempt_at_ms = {due}, lease_until_ms = {later} \
             WHERE event_id = 'evt_backoff'"
        ),
        b"",
    )
    .await;
    let backlog = app.store.backlog().await.unwrap();
    assert!(
        backlog.inbox_oldest_age >= Duration::from_secs(89),
        "{backlog:?}"
    );
    // A pending event that waits (a connector not loaded, a breaker open:
    // each look moves its next attempt a few seconds on) ages from its
    // arrival all the same: the pipeline is stuck.
    execute_raw(
        &app.database_url,
        &format!(
            "UPDATE inbox SET state = 'pending', next_attempt_at_ms = {later} \
             WHERE event_id = 'evt_backoff'"
        ),
        b"",
    )
    .await;
    let backlog = app.store.backlog().await.unwrap();
    assert!(
        backlog.inbox_oldest_age >= Duration::from_secs(1),
        "{backlog:?}"
    );
}

/// How many items `GET path` lists (one page).
async fn count(app: &SyncApp, path: &str) -> usize {
    let response = app
        .client
        .get(format!("{}{path}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json::<Value>().await.unwrap()["data"]
        .as_array()
        .unwrap()
        .len()
}

mod sqlite {
    use super::*;

    #[tokio::test]
    async fn retention_trims_what_is_finished() {
        super::retention_trims_what_is_finished(Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test]
    async fn retention_trims_what_is_finished() {
        super::retention_trims_what_is_finished(Backend::Postgres).await;
    }
}

/// The plan of the scheduler's claim of 16 due links, as JSON text.
async fn claim_plan(pool: &sqlx::PgPool) -> String {
    let plan: Value = sqlx::query_scalar(
        "EXPLAIN (FORMAT JSON) SELECT customer_id, connector FROM sync_links \
         WHERE state IN ('pending', 'retry') AND next_attempt_at_ms <= 1000000 \
         AND lease_until_ms < 1000000 AND held_by IS NULL \
         ORDER BY next_attempt_at_ms LIMIT 16 FOR UPDATE SKIP LOCKED",
    )
    .fetch_one(pool)
    .await
    .expect("plan");
    plan.to_string()
}

/// The tables the keeper analyses once the last writes' counts reached the
/// statistics views (within a moment); empty if none within 10 s.
/// Links `cus_<from>` to `cus_<to>`, synced, written on a connection that
/// ends at once (an idle one reports its counts only after 10 s).
async fn insert_synced_links(url: &str, from: i64, to: i64) {
    let raw = sqlx::PgPool::connect(url).await.expect("raw pool");
    sqlx::query(
        "INSERT INTO sync_links (customer_id, connector, wanted_version, state, \
         next_attempt_at_ms, updated_at) \
         SELECT 'cus_' || g, 'stripe', 1, 'synced', g, now() \
         FROM generate_series($1::int8, $2::int8) g",
    )
    .bind(from)
    .bind(to)
    .execute(&raw)
    .await
    .expect("links");
    raw.close().await;
}

/// `sync_links`' counter `column` in `pg_stat_user_tables` once it reached
/// `at_least` (the statistics collector reports a little later), or its
/// last reading.
async fn link_counter_reaching(url: &str, column: &str, at_least: i64) -> i64 {
    let raw = sqlx::PgPool::connect(url).await.expect("raw pool");
    let mut counted = 0_i64;
    for _ in 0..40 {
        counted = sqlx::query_scalar(&format!(
            "SELECT {column} FROM pg_stat_user_tables WHERE relname = 'sync_links'"
        ))
        .fetch_one(&raw)
        .await
        .expect("counts");
        if counted >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    raw.close().await;
    counted
}

/// What one look of the keeper (at its default growth of 1,000) analyses.
async fn analysed_now(store: &ferry::store::Store) -> Vec<String> {
    store.analyze_grown_tables(1000).await.expect("looked")
}

async fn analysed_once_counted(store: &ferry::store::Store) -> Vec<String> {
    for _ in 0..40 {
        let analysed = analysed_now(store).await;
        if !analysed.is_empty() {
            return analysed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Vec::new()
}

/// A table that filled faster than autovacuum looks (a new install under a
/// burst) is analysed once it outgrew its statistics, and the scheduler's
/// claim then reads the due index in order instead of sorting every due
/// link; a table analysed since is left alone.
#[tokio::test]
async fn a_table_that_outgrew_its_statistics_is_analysed() {
    let url = PgCluster::shared()
        .create_database()
        .await
        .expect("test database");
    let store = ferry::store::Store::connect(&url, &ferry::store::StoreOptions::default())
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    let raw = sqlx::PgPool::connect(&url).await.expect("raw pool");
    // Autovacuum's minute has not come yet.
    sqlx::query("ALTER TABLE sync_links SET (autovacuum_enabled = false)")
        .execute(&raw)
        .await
        .expect("autovacuum off");
    // What a burst leaves: 5,000 links, a tenth of them due.
    sqlx::query(
        "INSERT INTO sync_links (customer_id, connector, wanted_version, state, \
         next_attempt_at_ms, updated_at) \
         SELECT 'cus_' || g, 'stripe', 1, \
           CASE WHEN g % 10 = 0 THEN 'pending' ELSE 'synced' END, g, now() \
         FROM generate_series(1, 5000) g",
    )
    .execute(&raw)
    .await
    .expect("links");
    // An idle connection reports its counts after 10 s, one that ends at once.
    raw.close().await;
    let raw = sqlx::PgPool::connect(&url).await.expect("raw pool");
    let before = claim_plan(&raw).await;
    assert!(
        before.contains("\"Sort\""),
        "planned as nearly empty, the claim sorts every due link: {before}"
    );

    assert_eq!(
        analysed_once_counted(&store).await,
        ["sync_links"],
        "only the table that grew"
    );
    let after = claim_plan(&raw).await;
    assert!(
        !after.contains("\"Sort\"") && after.contains("sync_links_due"),
        "the claim reads the due index in order: {after}"
    );
    assert!(
        analysed_now(&store).await.is_empty(),
        "just analysed, nothing to do"
    );

    // Changes without growth: every link written twice (10,000 changes,
    // twice what the table holds) is autovacuum's business, not a reason
    // to analyse again.
    sqlx::query("UPDATE sync_links SET attempts = attempts + 1")
        .execute(&raw)
        .await
        .expect("first write");
    sqlx::query("UPDATE sync_links SET attempts = attempts + 1")
        .execute(&raw)
        .await
        .expect("second write");
    raw.close().await;
    let changed = link_counter_reaching(&url, "n_mod_since_analyze", 10_000).await;
    assert!(changed >= 10_000, "the writes were counted: {changed}");
    assert!(
        analysed_now(&store).await.is_empty(),
        "rewritten, not grown: nothing to do"
    );

    // Past twice its size, it is analysed again.
    insert_synced_links(&url, 5001, 11_000).await;
    assert_eq!(
        analysed_once_counted(&store).await,
        ["sync_links"],
        "doubled: analysed again"
    );

    // Analysed at 11,000 rows, past `SETTLED_ROWS`: growth is autovacuum's.
    insert_synced_links(&url, 11_001, 36_000).await;
    let live = link_counter_reaching(&url, "n_live_tup", 36_000).await;
    assert!(live >= 36_000, "the inserts were counted: {live}");
    assert!(
        analysed_now(&store).await.is_empty(),
        "statistics taken at {} rows or more are left to autovacuum",
        ferry::store::statistics::SETTLED_ROWS
    );
}

/// A delivery turned away before verification (here: over
/// `webhook_max_body_bytes`, 413) is counted `refused`: it was on no
/// webhook metric, only the HTTP status's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_refused_before_verification_is_counted() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({"webhook_max_body_bytes": 2048});
    let app = spawn_sync_app(setup).await;
    let before = scrape(&app.base).await;
    let body = format!("{{\"padding\":\"{}\"}}", "x".repeat(4096));
    let (status, problem) = deliver(&app, &body, "t=1,v1=00").await;
    assert_eq!(status, 413, "{problem}");
    let after = scrape(&app.base).await;
    let labels = [("connector", "stripe"), ("result", "refused")];
    assert_eq!(
        moved(
            &before,
            &after,
            "ferry_webhook_verifications_total",
            &labels
        ),
        1.0
    );
}

/// A delivery whose request ends before its answer (here its body stalls
/// past `request_timeout`, within `body_read_timeout`) is counted
/// `dropped`: it was on no metric but the HTTP status's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_cut_off_by_the_request_timeout_is_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({"request_timeout": "1s", "body_read_timeout": "30s"});
    let app = spawn_sync_app(setup).await;
    let before = scrape(&app.base).await;
    let address = app.base.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nhost: {address}\r\ncontent-type: application/json\r\n\
         stripe-signature: t=1,v1=00\r\ncontent-length: 100\r\n\r\n{{\"id\":"
    );
    socket.write_all(head.as_bytes()).await.expect("head");
    let mut answer = vec![0; 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut answer))
        .await
        .expect("answered")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let after = scrape(&app.base).await;
    let labels = [("connector", "stripe"), ("result", "dropped")];
    // At least: the counter is the process's, and another test's request
    // may be cut off too.
    let dropped = moved(
        &before,
        &after,
        "ferry_webhook_verifications_total",
        &labels,
    );
    assert!(dropped >= 1.0, "{dropped}");
}
