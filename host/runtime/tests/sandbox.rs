//! The connector sandbox against a hostile guest (`tests/guests/hostile`,
//! built by `make connectors`): deadlines, memory, traps, the HTTP policy
//! and secret handling, with real sockets on 127.0.0.1 where it matters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ferry_runtime::wit::{WorldMismatch, WorldVersion};
use ferry_runtime::{
    CallError, Connector, ConnectorConfig, HttpTransport, LoadError, Operation, PushRequest,
    Runtime, RuntimeConfig, WireError, WireRequest, WireResponse,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use hmac::{Hmac, Mac};
use secrecy::SecretString;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SECRET: &str = "sk_test_hostile_secret_42";

/// One compiled-code cache for the whole test binary, so only the first
/// runtime pays for compiling the guest.
fn cache_dir() -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
        .path()
        .to_owned()
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        call_timeout: Duration::from_millis(500),
        memory_limit_bytes: 32 * 1024 * 1024,
        max_instances: 8,
        cache_dir: Some(cache_dir()),
        ..RuntimeConfig::default()
    }
}

fn hostile_bytes() -> Vec<u8> {
    std::fs::read(ferry_test_support::wasm::component_path(
        "ferry_test_hostile",
    ))
    .expect("read hostile guest")
}

async fn load(runtime: &Runtime) -> Arc<Connector> {
    runtime
        .load(&hostile_bytes())
        .await
        .expect("hostile guest loads")
}

fn connector_config(settings: &[(&str, &str)]) -> ConnectorConfig {
    ConnectorConfig {
        settings: settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: BTreeMap::from([("api_key".to_owned(), SecretString::from(SECRET))]),
    }
}

fn instruction(record: Value) -> PushRequest {
    PushRequest {
        entity: "customer".into(),
        operation: Operation::Create,
        local_id: "cus_local_1".into(),
        remote_id: None,
        version: 1,
        idempotency_key: "idem-1".into(),
        record: record.to_string(),
    }
}

/// What the guest reported back from a push (its `record` JSON).
async fn push_report(connector: &Connector, cfg: &ConnectorConfig, record: Value) -> Value {
    let result = connector
        .push(cfg, instruction(record))
        .await
        .expect("push succeeds");
    serde_json::from_str(result.record.as_deref().expect("guest reports")).expect("report is JSON")
}

/// How a call that found no free instance slot in time fails: ferry's own
/// pacing, nothing sent.
fn held_back() -> CallError {
    CallError::Throttled {
        wait: Duration::from_millis(200),
        reached_remote: false,
    }
}

async fn assert_healthy(connector: &Connector, cfg: &ConnectorConfig) {
    let result = connector
        .push(cfg, instruction(json!({"do": "ok"})))
        .await
        .expect("a plain call still works");
    assert_eq!(result.remote_id, "cus_local_1");
}

/// A transport that records what reaches the wire and answers 200.
#[derive(Default)]
struct RecordingTransport {
    requests: Mutex<Vec<WireRequest>>,
}

impl HttpTransport for RecordingTransport {
    fn send(&self, req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>> {
        self.requests.lock().unwrap().push(req);
        async {
            Ok(WireResponse {
                status: 200,
                headers: vec![],
                body: b"fine".to_vec(),
            })
        }
        .boxed()
    }
}

/// A transport that never answers.
struct HangingTransport;

impl HttpTransport for HangingTransport {
    fn send(&self, _req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>> {
        futures::future::pending().boxed()
    }
}

/// A transport whose connection always fails after the request went out.
struct InterruptedTransport;

impl HttpTransport for InterruptedTransport {
    fn send(&self, _req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>> {
        futures::future::ready(Err(WireError::Interrupted(
            "connection reset after the request was written".into(),
        )))
        .boxed()
    }
}

/// A minimal HTTP/1.1 server on 127.0.0.1 that counts connections, records
/// each raw request and echoes its body back.
struct EchoServer {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (c, r) = (connections.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let raw = read_request(&mut socket).await;
                    let body = raw
                        .split_once("\r\n\r\n")
                        .map(|(_, b)| b.to_owned())
                        .unwrap_or_default();
                    r.lock().unwrap().push(raw);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-echo: {}\r\nconnection: close\r\n\r\n{}",
                        body.len(),
                        body,
                        body
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        Self {
            port,
            connections,
            requests,
        }
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> String {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&data);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&data).into_owned()
}

#[tokio::test]
async fn an_infinite_loop_is_stopped_at_the_deadline_and_the_next_call_works() {
    let runtime = Runtime::new(RuntimeConfig {
        call_timeout: Duration::from_millis(200),
        ..config()
    })
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let started = Instant::now();
    // A guard, not a measure: a loop the deadline does not stop fails
    // here instead of hanging the suite.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        connector.push(&cfg, instruction(json!({"do": "loop"}))),
    )
    .await
    .expect("the deadline stops the loop")
    .unwrap_err();
    assert_eq!(err, CallError::DeadlineExceeded);
    // Not before the deadline (a floor a slow machine cannot break).
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_healthy(&connector, &cfg).await;
}

/// Every instance busy (one slot here, a looping guest in it): a call
/// waiting for a slot does not start with what is left of its deadline, to
/// be cut short and blamed on the remote as a timeout (an attempt spent, a
/// breaker failure); it is ferry's own pacing, retried without either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_finds_every_instance_busy_is_held_back_not_timed_out() {
    let runtime = Runtime::new(RuntimeConfig {
        call_timeout: Duration::from_secs(1),
        max_instances: 1,
        ..config()
    })
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let looping = {
        let (connector, cfg) = (connector.clone(), cfg.clone());
        tokio::spawn(async move {
            connector
                .push(&cfg, instruction(json!({"do": "loop"})))
                .await
        })
    };
    // The loop holds the one slot until its deadline (1 s); the call
    // below gives up waiting at half its own.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let held = connector
        .push(&cfg, instruction(json!({"do": "ok"})))
        .await
        .unwrap_err();
    assert_eq!(held, held_back());
    assert_eq!(
        looping.await.unwrap().unwrap_err(),
        CallError::DeadlineExceeded
    );
    assert_healthy(&connector, &cfg).await;
}

/// One connector's calls cannot hold the whole pool: a connector whose
/// calls wait (here, loop until their deadline) takes its share, and
/// another connector's calls still run. Before, every slot was the first
/// one's, and the other's calls failed as throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connector_cannot_hold_every_instance() {
    let runtime = Runtime::new(RuntimeConfig {
        call_timeout: Duration::from_secs(1),
        max_instances: 4,
        max_instances_per_connector: 2,
        ..config()
    })
    .unwrap();
    let (greedy, other) = (load(&runtime).await, load(&runtime).await);
    let cfg = connector_config(&[]);
    let looping: Vec<_> = (0..4)
        .map(|_| {
            let (connector, cfg) = (greedy.clone(), cfg.clone());
            tokio::spawn(async move {
                connector
                    .push(&cfg, instruction(json!({"do": "loop"})))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_healthy(&other, &cfg).await;
    let mut outcomes = Vec::new();
    for call in looping {
        outcomes.push(call.await.unwrap().unwrap_err());
    }
    outcomes.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(
        outcomes,
        [
            CallError::DeadlineExceeded,
            CallError::DeadlineExceeded,
            held_back(),
            held_back(),
        ]
    );
}

#[tokio::test]
async fn a_guest_waiting_on_the_host_is_stopped_at_the_deadline() {
    let runtime = Runtime::with_transport(
        RuntimeConfig {
            call_timeout: Duration::from_millis(200),
            // Only the call's deadline can end the wait.
            http_total_timeout: Duration::from_secs(3600),
            ..config()
        },
        Arc::new(HangingTransport),
    )
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    // A guard, not a measure: a wait the deadline does not end fails here
    // instead of hanging the suite.
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        connector.push(
            &cfg,
            instruction(json!({"do": "http", "url": "https://api.example.com/slow"})),
        ),
    )
    .await
    .expect("the deadline ends the wait");
    // The call's deadline fires, or the request's timeout, capped by the
    // remaining call time, reaches the guest first.
    match outcome {
        Err(CallError::DeadlineExceeded) => {}
        Ok(r) => assert!(r.record.unwrap().contains("Timeout"), "unexpected success"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A request that times out before the call's deadline (the operator's
/// HTTP timeout is the shorter), after which the guest gives up as
/// transient, is a call whose outcome is unknown: the remote may still
/// apply the request, and the caller must wait before sending a newer
/// version. It was a plain transient error, retried at once.
#[tokio::test]
async fn a_request_timed_out_is_an_unknown_outcome_not_a_plain_retry() {
    let runtime = Runtime::with_transport(
        RuntimeConfig {
            call_timeout: Duration::from_secs(5),
            http_total_timeout: Duration::from_millis(100),
            ..config()
        },
        Arc::new(HangingTransport),
    )
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let outcome = connector
        .push(
            &cfg,
            instruction(
                json!({"do": "http", "url": "https://api.example.com/slow", "give_up": true}),
            ),
        )
        .await;
    assert_eq!(outcome.unwrap_err(), CallError::DeadlineExceeded);
}

/// A connection lost after the request went out is an unknown outcome
/// too (the remote may have applied it): it was a plain transient error,
/// retried at once.
#[tokio::test]
async fn a_request_lost_after_it_went_out_is_an_unknown_outcome() {
    let runtime = Runtime::with_transport(config(), Arc::new(InterruptedTransport)).unwrap();
    let connector = load(&runtime).await;
    let outcome = connector
        .push(
            &connector_config(&[]),
            instruction(
                json!({"do": "http", "url": "https://api.example.com/reset", "give_up": true}),
            ),
        )
        .await;
    assert_eq!(outcome.unwrap_err(), CallError::DeadlineExceeded);
}

#[tokio::test]
async fn unbounded_allocation_fails_that_call_only() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let err = connector
        .push(&cfg, instruction(json!({"do": "alloc"})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::ResourceExhausted(m) if m.contains("memory")),
        "{err:?}"
    );
    assert_healthy(&connector, &cfg).await;
}

/// Handles a guest takes from WASI live in the host's memory, outside the
/// guest's cap: a guest taking them without end is stopped at the table's
/// bound, not when the deadline comes (wasmtime's default is a million).
#[tokio::test]
async fn endless_wasi_handles_fail_that_call_only() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let report = push_report(&connector, &cfg, json!({"do": "handles", "count": 200})).await;
    assert_eq!(report["held"], 200, "a guest's ordinary use fits");
    let started = Instant::now();
    let err = connector
        .push(
            &cfg,
            instruction(json!({"do": "handles", "count": u64::MAX})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CallError::ResourceExhausted(m) if m.contains("handles")),
        "{err:?} after {:?}",
        started.elapsed()
    );
    assert_healthy(&connector, &cfg).await;
}

/// `get-random-bytes` makes at most 64 KiB at once: at WASI's default of
/// 64 MiB, a guest had the host allocate and fill that much per call,
/// outside its memory cap and beyond the reach of its deadline.
#[tokio::test]
async fn random_bytes_are_bounded() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let report = push_report(&connector, &cfg, json!({"do": "random", "len": 65_536})).await;
    assert_eq!(report["random"], 65_536, "a guest's ordinary use fits");
    let err = connector
        .push(&cfg, instruction(json!({"do": "random", "len": 1 << 20})))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    assert_healthy(&connector, &cfg).await;
}

#[tokio::test]
async fn a_trap_fails_that_call_only() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let err = connector
        .push(&cfg, instruction(json!({"do": "trap"})))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    assert_healthy(&connector, &cfg).await;
    // Rust keeps its stack in linear memory: running off its end is a memory
    // fault in the guest, a trap like any other.
    let err = connector
        .push(&cfg, instruction(json!({"do": "stack"})))
        .await
        .unwrap_err();
    assert!(matches!(err, CallError::Trap(_)), "{err:?}");
    assert_healthy(&connector, &cfg).await;
}

#[tokio::test]
async fn a_guest_error_is_a_connector_error_not_a_trap() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let err = connector
        .fetch(&connector_config(&[]), "customer", "cus_1")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CallError::Connector(ferry_runtime::ConnectorError::Unsupported(_))
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_request_to_an_undeclared_host_is_refused_before_the_wire() {
    let transport = Arc::new(RecordingTransport::default());
    let runtime = Runtime::with_transport(config(), transport.clone()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "http", "url": "https://evil.example.net/steal"}),
    )
    .await;
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("Denied") && error.contains("not declared"),
        "{error}"
    );
    assert!(!report.to_string().contains(SECRET));
    assert!(
        transport.requests.lock().unwrap().is_empty(),
        "nothing may reach the wire"
    );

    // The declared host goes through, with the secret substituted on the wire only.
    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "http", "url": "https://api.example.com/v1/x"}),
    )
    .await;
    assert_eq!(report["status"], 200);
    let sent = transport.requests.lock().unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].headers,
        vec![("authorization".to_owned(), format!("Bearer {SECRET}"))]
    );
    assert_eq!(
        sent[0].body.as_deref(),
        Some(format!("key={SECRET}").as_bytes())
    );
}

/// The guest cannot set the headers the host's client owns: a `Host` of its
/// own would carry the secret to another site behind a declared host's
/// front end.
#[tokio::test]
async fn a_guest_cannot_set_the_host_header() {
    let transport = Arc::new(RecordingTransport::default());
    let runtime = Runtime::with_transport(config(), transport.clone()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    for name in [
        "Host",
        "content-length",
        "Transfer-Encoding",
        "proxy-authorization",
    ] {
        let report = push_report(
            &connector,
            &cfg,
            json!({"do": "http", "url": "https://api.example.com/v1/x",
                "headers": {name: "evil.example"}}),
        )
        .await;
        let error = report["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("InvalidRequest") && error.contains("set by the host"),
            "{name}: {report}"
        );
    }
    assert!(transport.requests.lock().unwrap().is_empty());
    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "http", "url": "https://api.example.com/v1/x",
            "headers": {"x-request-id": "r1"}}),
    )
    .await;
    assert_eq!(report["status"], 200, "{report}");
}

/// A guest cannot send more headers, or more header bytes, than a request
/// holds: past 24,576 names the HTTP client's header map panicked, and the
/// panic stopped ferry (the inbox loop is supervised) at every start.
#[tokio::test]
async fn a_request_is_bounded() {
    let transport = Arc::new(RecordingTransport::default());
    let runtime = Runtime::with_transport(config(), transport.clone()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let many: serde_json::Map<String, Value> = (0..30_000)
        .map(|n| (format!("x-{n}"), json!("v")))
        .collect();
    let long: serde_json::Map<String, Value> = (0..60)
        .map(|n| (format!("x-{n}"), json!("{{secret:api_key}}".repeat(64))))
        .collect();
    let url = "https://api.example.com/v1/x";
    // So is the rest of a request, before anything is read or copied: a
    // guest's was as large as its memory, sent at its request rate.
    let one_long = serde_json::Map::from_iter([("x-long".to_owned(), json!("v".repeat(70_000)))]);
    let long_url = format!("{url}?q={}", "a".repeat(17 * 1024));
    for (instruction, why) in [
        (json!({"url": url, "headers": many}), "headers; a request"),
        (json!({"url": url, "headers": long}), "bytes"),
        (json!({"url": url, "headers": one_long}), "bytes"),
        (json!({"url": long_url}), "URL is longer"),
        (json!({"url": url, "body_bytes": 9 << 20}), "body is longer"),
    ] {
        let mut instruction = instruction;
        instruction["do"] = json!("http");
        let report = push_report(&connector, &cfg, instruction).await;
        let error = report["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("InvalidRequest") && error.contains(why),
            "{why}: {}",
            &report.to_string()[..200.min(report.to_string().len())]
        );
    }
    assert!(transport.requests.lock().unwrap().is_empty());

    // Past what any host call takes, the copy itself stops: the host
    // allocated whatever the guest pointed at (twice its memory, strings
    // sharing bytes) before refusing it.
    let over = json!({"do": "http", "url": url, "body_bytes": 25 << 20});
    match connector.push(&cfg, instruction(over)).await {
        Err(CallError::ResourceExhausted(m)) => assert!(m.contains("bytes at once"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(transport.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn private_addresses_are_refused_even_when_declared_by_a_host_setting() {
    let server = EchoServer::start().await;
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    for base in [
        format!("https://127.0.0.1:{}", server.port),
        "https://169.254.169.254".to_owned(),
    ] {
        let cfg = connector_config(&[("api_base", &base)]);
        let report = push_report(
            &connector,
            &cfg,
            json!({"do": "http", "url": format!("{base}/v1")}),
        )
        .await;
        let error = report["error"].as_str().unwrap();
        assert!(
            error.contains("Denied") && error.contains("private"),
            "{base}: {error}"
        );
    }
    // Plain http to a public declared host is refused as well.
    let report = push_report(
        &connector,
        &connector_config(&[]),
        json!({"do": "http", "url": "http://api.example.com/"}),
    )
    .await;
    assert!(
        report["error"].as_str().unwrap().contains("Denied"),
        "{report}"
    );
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        0,
        "no connection may reach 127.0.0.1"
    );
}

#[tokio::test]
async fn a_secret_cannot_be_exfiltrated_to_an_undeclared_host() {
    let server = EchoServer::start().await;
    // Private hosts are allowed, so only the manifest declaration protects the secret.
    let runtime = Runtime::new(RuntimeConfig {
        allow_private_hosts: true,
        ..config()
    })
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let url = format!("http://127.0.0.1:{}/collect", server.port);
    let report = push_report(&connector, &cfg, json!({"do": "http", "url": url})).await;
    assert!(
        report["error"].as_str().unwrap().contains("Denied"),
        "{report}"
    );
    assert!(
        !report.to_string().contains(SECRET),
        "the guest must not see the secret"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        0,
        "the request must never leave"
    );
}

#[tokio::test]
async fn a_declared_local_host_receives_the_secret_and_the_guest_never_sees_it() {
    let server = EchoServer::start().await;
    let runtime = Runtime::new(RuntimeConfig {
        allow_private_hosts: true,
        ..config()
    })
    .unwrap();
    let connector = load(&runtime).await;
    let base = format!("http://127.0.0.1:{}", server.port);
    let cfg = connector_config(&[("api_base", &base)]);
    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "http", "url": format!("{base}/v1/customers")}),
    )
    .await;
    assert_eq!(report["status"], 200, "{report}");

    let requests = server.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let raw = &requests[0];
    assert!(raw.starts_with("POST /v1/customers HTTP/1.1"), "{raw}");
    assert!(
        raw.to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            SECRET.to_ascii_lowercase()
        )),
        "{raw}"
    );
    assert!(raw.ends_with(&format!("key={SECRET}")), "{raw}");

    // The server echoed the secret in its body and a header: redacted for the guest.
    assert!(!report.to_string().contains(SECRET), "{report}");
    assert_eq!(report["body"], "key={{secret:api_key}}");
}

#[tokio::test]
async fn outbound_requests_are_rate_limited_per_connector() {
    let transport = Arc::new(RecordingTransport::default());
    let runtime = Runtime::with_transport(
        RuntimeConfig {
            http_requests_per_second: 1,
            ..config()
        },
        transport.clone(),
    )
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let call = json!({"do": "http", "url": "https://api.example.com/v1/x"});
    // At once: the second call's deadline (500 ms) comes before the token
    // the first one took is back (1 s), however slow the machine is.
    let (a, b) = tokio::join!(
        push_report(&connector, &cfg, call.clone()),
        push_report(&connector, &cfg, call)
    );
    let (sent, report) = if a["status"] == 200 { (a, b) } else { (b, a) };
    assert_eq!(sent["status"], 200, "{sent}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("rate limit"), "{report}");
    // Passing, so a guest retries it: an SDK takes `denied` for a refusal
    // that will never change, and dead-letters the change.
    assert!(
        error.contains("Timeout") && !error.contains("Denied"),
        "{report}"
    );
    assert_eq!(transport.requests.lock().unwrap().len(), 1);
}

/// Within the burst requests go at once; beyond it they wait for the bucket
/// (paced, not refused) while the call's deadline allows.
#[tokio::test]
async fn outbound_requests_beyond_the_burst_are_paced() {
    let transport = Arc::new(RecordingTransport::default());
    let runtime = Runtime::with_transport(
        RuntimeConfig {
            http_requests_per_second: 5,
            call_timeout: Duration::from_secs(5),
            ..config()
        },
        transport.clone(),
    )
    .unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let call = json!({"do": "http", "url": "https://api.example.com/v1/x"});
    let started = std::time::Instant::now();
    for _ in 0..7 {
        let report = push_report(&connector, &cfg, call.clone()).await;
        assert_eq!(report["status"], 200, "{report}");
    }
    assert_eq!(transport.requests.lock().unwrap().len(), 7);
    // Two requests past a burst of five at five per second: at least
    // ~400 ms of waiting (a lower bound the bucket guarantees).
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
}

/// The component with a custom section appended: other bytes, the same
/// component.
fn with_custom_section(wasm: &[u8], n: u8) -> Vec<u8> {
    let mut bytes = wasm.to_vec();
    // Section id 0 (custom), size 3: a name of length 1, and one byte.
    bytes.extend_from_slice(&[0, 3, 1, b'n', n]);
    bytes
}

/// Compiled components are kept for reuse up to a bound: components
/// loaded once each (uploads refused, versions replaced, a dev loop's
/// rebuilds) no longer stay in memory for the life of the process.
#[tokio::test]
async fn compiled_components_are_kept_up_to_a_bound() {
    let runtime = Runtime::new(config()).unwrap();
    let wasm = hostile_bytes();
    let connector = runtime.load(&wasm).await.expect("loads");
    for n in 0..20u8 {
        runtime
            .load(&with_custom_section(&wasm, n))
            .await
            .expect("a rebuild loads");
    }
    assert_eq!(runtime.cached_components(), 16);
    // A connector whose component left the cache still runs.
    assert_healthy(&connector, &connector_config(&[])).await;
}

/// Compiles are bounded in number: a burst of uploads compiled all at
/// once, each taking a core and memory for seconds. A compile whose caller
/// gave up (a request past its timeout) still counts until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiles_run_one_at_a_time_when_so_bounded() {
    let runtime = Runtime::new(RuntimeConfig {
        // No disk cache: every variant below is compiled for real.
        cache_dir: None,
        max_compiles: 1,
        ..config()
    })
    .unwrap();
    let wasm = hostile_bytes();
    let load = |n: u8| {
        let runtime = runtime.clone();
        let wasm = with_custom_section(&wasm, n);
        tokio::spawn(async move { runtime.load(&wasm).await.map(|_| ()) })
    };
    let given_up = load(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime.compiles_running() == 0 {
        assert!(
            !given_up.is_finished(),
            "the compile ended before it was seen"
        );
        assert!(Instant::now() < deadline, "the compile never began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    given_up.abort();
    let loads: Vec<_> = (1..4).map(load).collect();
    let mut most = 0;
    while !loads.iter().all(|l| l.is_finished()) {
        most = most.max(runtime.compiles_running());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for l in loads {
        l.await.unwrap().expect("loads");
    }
    assert_eq!(most, 1, "compiles at once");
    // The compile given up ran to its end, and is cached for a retry.
    while runtime.compiles_running() > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(runtime.cached_components(), 4, "every variant is cached");
}

#[tokio::test]
async fn hmac_uses_declared_secrets_only() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let report = push_report(&connector, &cfg, json!({"do": "hmac", "secret": "api_key"})).await;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(b"message");
    let expected: Vec<u8> = mac.finalize().into_bytes().to_vec();
    assert_eq!(report["mac"], json!(expected));

    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "hmac", "secret": "root_password"}),
    )
    .await;
    assert!(
        report["error"].as_str().unwrap().contains("not declared"),
        "{report}"
    );

    // An empty key is one anyone knows: nothing is signed with it.
    let mut blank = connector_config(&[]);
    blank.secrets = BTreeMap::from([("api_key".to_owned(), SecretString::from(" "))]);
    let report = push_report(
        &connector,
        &blank,
        json!({"do": "hmac", "secret": "api_key"}),
    )
    .await;
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("empty")),
        "{report}"
    );
}

#[tokio::test]
async fn settings_are_visible_only_when_declared() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[("api_base", "https://api.example.com"), ("other", "x")]);
    let report = push_report(
        &connector,
        &cfg,
        json!({"do": "setting", "name": "api_base"}),
    )
    .await;
    assert_eq!(report["value"], "https://api.example.com");
    let report = push_report(&connector, &cfg, json!({"do": "setting", "name": "other"})).await;
    assert_eq!(report["value"], Value::Null);
}

#[tokio::test]
async fn the_manifest_is_read_checked_and_printable() {
    let runtime = Runtime::new(config()).unwrap();
    let bytes = hostile_bytes();
    let connector = runtime.load(&bytes).await.unwrap();
    assert_eq!(connector.name(), "hostile");
    assert_eq!(connector.sha256().len(), 64);
    let json: Value =
        serde_json::from_str(&serde_json::to_string_pretty(connector.manifest()).unwrap()).unwrap();
    assert_eq!(json["hosts"], json!(["api.example.com"]));
    assert_eq!(json["secrets"][0]["name"], "api_key");
    // A second load of the same bytes hits the compiled-component cache.
    let again = runtime.load(&bytes).await.unwrap();
    assert_eq!(again.sha256(), connector.sha256());
}

#[tokio::test]
async fn garbage_and_core_modules_are_refused_with_clear_errors() {
    let runtime = Runtime::new(config()).unwrap();
    let err = runtime.load(b"definitely not wasm").await.unwrap_err();
    assert!(matches!(err, LoadError::NotWasm), "{err:?}");
    assert!(err.to_string().contains("not a WebAssembly file"));

    let core = wat::parse_str("(module (func (export \"f\")))").unwrap();
    let err = runtime.load(&core).await.unwrap_err();
    assert!(matches!(err, LoadError::CoreModule), "{err:?}");
    assert!(err.to_string().contains("not a component"), "{err}");

    let empty_component = wat::parse_str("(component)").unwrap();
    let err = runtime.load(&empty_component).await.unwrap_err();
    assert!(
        matches!(err, LoadError::World(WorldMismatch::NotAConnector)),
        "{err:?}"
    );
    assert!(err.to_string().contains("ferry:connector"), "{err}");

    let mut truncated = hostile_bytes();
    truncated.truncate(truncated.len() / 2);
    let err = runtime.load(&truncated).await.unwrap_err();
    assert!(matches!(err, LoadError::Compile(_)), "{err:?}");
}

/// A component whose core instances each bring a memory of their own is
/// refused when it is compiled: the memory limit counts per memory, so
/// enough of them would take the whole instance pool and many times the
/// limit in one call.
#[tokio::test]
async fn a_component_of_many_memories_is_refused() {
    let runtime = Runtime::new(config()).unwrap();
    let many = wat::parse_str(
        r#"(component
            (core module $m (memory 1))
            (core instance (instantiate $m))
            (core instance (instantiate $m)))"#,
    )
    .unwrap();
    let err = runtime.load(&many).await.unwrap_err();
    assert!(matches!(err, LoadError::Compile(_)), "{err:?}");
    assert!(err.to_string().contains("linear memories"), "{err}");
    let one = wat::parse_str(
        r#"(component
            (core module $m (memory 1))
            (core instance (instantiate $m)))"#,
    )
    .unwrap();
    let err = runtime.load(&one).await.unwrap_err();
    assert!(
        matches!(err, LoadError::World(WorldMismatch::NotAConnector)),
        "one memory compiles: {err:?}"
    );
}

/// A component exporting only `handler@VERSION` (no functions): enough to
/// tell which world it claims.
fn claims_world(version: &str) -> Vec<u8> {
    wat::parse_str(format!(
        "(component (instance $h) (export \"ferry:connector/handler@{version}\" (instance $h)))"
    ))
    .unwrap()
}

#[tokio::test]
async fn an_old_world_component_still_loads_and_runs() {
    let runtime = Runtime::new(config()).unwrap();
    // The hostile guest is built against the oldest supported world, on
    // purpose: every test in this file runs a 0.1.0 component.
    let old = load(&runtime).await;
    assert_eq!(old.world(), WorldVersion::V0_1_0);
    assert_eq!(WorldVersion::SUPPORTED[0], WorldVersion::V0_1_0);
    let cfg = connector_config(&[]);
    assert_healthy(&old, &cfg).await;
    // Its imports reach the host through the 0.1.0 bindings.
    let report = push_report(&old, &cfg, json!({"do": "hmac", "secret": "api_key"})).await;
    assert!(report["mac"].is_array(), "{report}");
}

#[tokio::test]
async fn worlds_this_host_does_not_run_are_refused_by_version() {
    let runtime = Runtime::new(config()).unwrap();
    let err = runtime.load(&claims_world("9.0.0")).await.unwrap_err();
    assert!(
        matches!(&err, LoadError::World(WorldMismatch::Newer(v)) if v == "9.0.0"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("newer than this ferry supports"),
        "{err}"
    );
    let err = runtime.load(&claims_world("0.0.1")).await.unwrap_err();
    assert!(
        matches!(&err, LoadError::World(WorldMismatch::Unsupported(v)) if v == "0.0.1"),
        "{err:?}"
    );
    // A supported version whose exports are missing.
    let err = runtime.load(&claims_world("0.2.0")).await.unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err:?}");
}

#[tokio::test]
async fn declared_hosts_the_operator_forbids_are_refused_at_load() {
    let denied = Runtime::new(RuntimeConfig {
        denied_hosts: vec!["*.example.com".into()],
        ..config()
    })
    .unwrap();
    let err = denied.load(&hostile_bytes()).await.unwrap_err();
    assert!(matches!(err, LoadError::ForbiddenHost(_)), "{err:?}");
    assert!(err.to_string().contains("deny-list"), "{err}");
    let not_allowed = Runtime::new(RuntimeConfig {
        allowed_hosts: vec!["api.stripe.com".into()],
        ..config()
    })
    .unwrap();
    let err = not_allowed.load(&hostile_bytes()).await.unwrap_err();
    assert!(err.to_string().contains("allow-list"), "{err}");
    let allowed = Runtime::new(RuntimeConfig {
        allowed_hosts: vec!["*.example.com".into()],
        ..config()
    })
    .unwrap();
    allowed.load(&hostile_bytes()).await.expect("allowed");
}

/// Counts the log lines the test binary's subscriber writes that came from
/// a guest's stdout.
#[derive(Clone)]
struct StdoutLines(Arc<AtomicUsize>);

impl std::io::Write for StdoutLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let from_stdout = text.lines().filter(|l| l.contains("stdout")).count();
        self.0.fetch_add(from_stdout, Ordering::SeqCst);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// stdout counts against the call's log line budget, as `log.write` does:
/// a guest printing in a loop cannot flood the host's log.
#[tokio::test]
async fn stdout_shares_the_log_line_budget() {
    let lines = Arc::new(AtomicUsize::new(0));
    let writer = StdoutLines(lines.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The only test in this binary that installs one.
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let report = push_report(&connector, &cfg, json!({"do": "print", "count": 5000})).await;
    assert_eq!(report["printed"], 5000);
    let logged = lines.load(Ordering::SeqCst);
    assert!((1..=1000).contains(&logged), "{logged} stdout lines logged");
}

/// Records a connector reads are bounded (a page by its limit, a record by
/// `MAX_RECORD_BYTES`): a guest's answer was as large as its memory, and
/// parsed on the host at many times that. A push's oversized record is
/// dropped, not the push: the write happened.
#[tokio::test]
async fn records_a_connector_reads_are_bounded() {
    let runtime = Runtime::new(config()).unwrap();
    let connector = load(&runtime).await;
    let cfg = connector_config(&[]);
    let refused = |result: Result<_, CallError>, says: &str| match result {
        Err(CallError::Connector(ferry_runtime::ConnectorError::Permanent(m))) => {
            assert!(m.contains(says), "{m}");
        }
        other => panic!("{other:?}"),
    };
    refused(
        connector
            .list(&cfg, "customer", Some("over".into()), 10)
            .await
            .map(drop),
        "11 records on a page of 10",
    );
    refused(
        connector
            .list(&cfg, "customer", Some("huge".into()), 10)
            .await
            .map(drop),
        "longer than",
    );
    refused(
        connector.fetch(&cfg, "customer", "huge").await.map(drop),
        "longer than",
    );
    let pushed = connector
        .push(&cfg, instruction(json!({"do": "huge"})))
        .await
        .expect("the push stands");
    assert_eq!(pushed.record, None);
    assert_healthy(&connector, &cfg).await;
}
