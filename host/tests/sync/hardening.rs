//! Slow and hostile clients: a request head or body sent too slowly is cut
//! off, oversized and unaddressed webhook bodies are refused before they
//! are read, and SIGTERM ends the process within its grace time even with
//! a client stalled mid-request.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{spawn_sync_app, stripe_component, Backend, Setup};
use crate::process::FerryProcess;

/// Reads until the server answers or closes; returns what it sent. No
/// answer within `limit` fails the test: how long an answer took is a
/// benchmark's question, not a test's.
async fn answer(stream: &mut TcpStream, limit: Duration) -> String {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(4).any(|w| w == b"\r\n\r\n")
                    && String::from_utf8_lossy(&got).contains("\"code\"")
                {
                    break;
                }
            }
            Err(_) => panic!(
                "no answer within {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn slow_and_oversized_requests_are_cut_off() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({
        "header_read_timeout": "500ms",
        "body_read_timeout": "500ms",
        "webhook_max_body_bytes": 2048,
    });
    let app = spawn_sync_app(setup).await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let connect = || TcpStream::connect(address.clone());

    // A request head that never ends (slowloris): the connection is closed.
    let mut slow_head = connect().await.unwrap();
    slow_head
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = slow_head.write_all(b"x-slow: 1\r\n").await;
    }
    // Closed (else `answer` fails after 5 s): nothing was answered.
    let reply = answer(&mut slow_head, Duration::from_secs(5)).await;
    assert!(!reply.contains("HTTP/1.1 2"), "{reply}");

    // A body that stalls: 408 request_timeout.
    let mut slow_body = connect().await.unwrap();
    slow_body
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\":")
        .await
        .unwrap();
    let reply = answer(&mut slow_body, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
    // The same on an API write and an upload (they were 400 and 422, as if
    // the bytes were wrong, not their pace).
    for (path, content_type) in [
        ("/api/v1/customers", "application/json"),
        ("/api/v1/connectors", "application/wasm"),
    ] {
        let mut slow_write = connect().await.unwrap();
        slow_write
            .write_all(
                format!(
                    "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\ncontent-length: 1000\r\n\r\n{{\"email\":"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let reply = answer(&mut slow_write, Duration::from_secs(5)).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{path}: {reply}");
        assert!(reply.contains("request_timeout"), "{path}: {reply}");
    }

    // A declared length over the webhook limit: 413 before any body byte.
    let mut large = connect().await.unwrap();
    large
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .unwrap();
    // No body byte is ever sent: waiting for it would have ended in 408.
    let reply = answer(&mut large, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("payload_too_large"), "{reply}");

    // An unknown connector: 404 without reading the body.
    let mut unknown = connect().await.unwrap();
    unknown
        .write_all(b"POST /webhooks/nope HTTP/1.1\r\nhost: x\r\ncontent-length: 100000\r\n\r\n")
        .await
        .unwrap();
    let reply = answer(&mut unknown, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");

    // The server is still fine.
    let health: Value = reqwest::get(format!("{}/readyz", app.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ready", "{health}");
}

/// Webhook bodies held before anyone is known to have sent them have a
/// budget across every connection (`webhook_buffer_bytes`): beyond it, a
/// webhook is answered 503 `webhooks_busy` with `Retry-After`, before a
/// byte of its body is read; the budget comes back as bodies are answered.
/// Before, every connection's webhooks at their limit could be held at
/// once (about 4 GiB at the defaults).
#[tokio::test]
async fn webhook_bodies_held_at_once_have_a_budget() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({
        "body_read_timeout": "1s",
        "webhook_max_body_bytes": 1024,
        "webhook_buffer_bytes": 2048,
    });
    let app = spawn_sync_app(setup).await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let stalled = || async {
        let mut stream = TcpStream::connect(address.clone()).await.unwrap();
        stream
            .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
            .await
            .unwrap();
        stream
    };
    // Two bodies of 1,000 bytes declared, stalled: the budget is taken.
    let mut first = stalled().await;
    let mut second = stalled().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = stalled().await;
    // Answered before its body (never sent: waiting for it ends in 408).
    let reply = answer(&mut third, Duration::from_secs(5)).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(reply.contains("webhooks_busy"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("retry-after: 1"),
        "{reply}"
    );
    // The stalled ones are cut off (408), and give the budget back.
    for stream in [&mut first, &mut second] {
        let reply = answer(stream, Duration::from_secs(5)).await;
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    }
    let refused = reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", app.base))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400, "read and checked again");
}

/// Reads until the server closes the connection; fails the test if it is
/// still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("the connection was still open after {limit:?}"),
        }
    }
}

/// A connection that sends nothing, or only part of HTTP/2's preface, or
/// goes quiet after a request, is closed after `header_read_timeout`: with
/// `max_connections` such clients would otherwise hold every slot, and
/// ferry would accept nothing more (webhooks, the API, `/readyz`).
#[tokio::test]
async fn silent_and_idle_connections_give_their_slot_back() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({
        "header_read_timeout": "500ms",
        "body_read_timeout": "500ms",
        "request_timeout": "1s",
        "max_connections": 2,
    });
    let app = spawn_sync_app(setup).await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let connect = || TcpStream::connect(address.clone());
    let limit = Duration::from_secs(5);

    let mut silent = connect().await.unwrap();
    let mut preface = connect().await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Both slots are taken: the next client waits for one of them.
    let ready = tokio::spawn(reqwest::get(format!("{}/readyz", app.base)));
    closed_within(&mut silent, limit).await;
    closed_within(&mut preface, limit).await;
    let ready = tokio::time::timeout(limit, ready)
        .await
        .expect("a slot came free")
        .unwrap()
        .unwrap();
    assert_eq!(ready.status(), 200);

    // Quiet after an answered request on a kept-alive connection.
    let mut idle = connect().await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    closed_within(&mut idle, limit).await;

    // HTTP/2 that answers the server's pings and opens no stream: it had no
    // idle timeout, and held its slot for ever.
    let (_send, h2) = hyper::client::conn::http2::handshake::<_, _, String>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(connect().await.unwrap()),
    )
    .await
    .expect("an HTTP/2 connection");
    tokio::time::timeout(limit, h2)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .expect("closed cleanly");

    // HTTP/2 asking for the script with a window of 0: no write of the
    // answer is ever pending (the write timeout never starts), and once
    // idle its drain waited for ever.
    let (mut send, h2) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake::<_, String>(hyper_util::rt::TokioIo::new(connect().await.unwrap()))
            .await
            .expect("an HTTP/2 connection");
    let driver = tokio::spawn(h2);
    let request = hyper::Request::get(format!("http://{address}/docs/scalar-1.76.0.js"))
        .body(String::new())
        .unwrap();
    let unread = send.send_request(request).await.expect("the answer's head");
    assert_eq!(unread.status(), 200);
    let _ = tokio::time::timeout(limit, driver)
        .await
        .expect("the stalled HTTP/2 connection was closed");
    drop(unread);

    // Two clients that ask for /docs's 4.8 MB script and read none of it
    // (a small receive window, `Connection: close`): hyper flushed the
    // answer with no timer, and both slots were held for ever.
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(address.parse().unwrap()).await.unwrap();
        let request = format!(
            "GET /docs/scalar-1.76.0.js HTTP/1.1\r\nhost: {address}\r\nconnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let ready = tokio::time::timeout(limit, reqwest::get(format!("{}/readyz", app.base)))
        .await
        .expect("a slot came free")
        .unwrap();
    assert_eq!(ready.status(), 200);
    drop(stalled);
}

#[tokio::test]
async fn sigterm_ends_the_process_within_the_grace_time_despite_a_stalled_client() {
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
        ("FERRY_SHUTDOWN_GRACE".to_owned(), "1s".to_owned()),
        // Longer than the grace: a silent connection must not hold the
        // shutdown for it.
        ("FERRY_HEADER_READ_TIMEOUT".to_owned(), "20s".to_owned()),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY".to_owned(),
            "sk_test_x".to_owned(),
        ),
        (
            "FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET".to_owned(),
            "whsec_x".to_owned(),
        ),
    ]);
    let mut ferry = FerryProcess::start(env.clone(), dir.path()).await;

    // A second process on the same SQLite file is refused at start.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .env("FERRY_LISTEN", format!("127.0.0.1:{port}"))
        .output();
    let second = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second process exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("another ferry process is serving"),
        "{stderr}"
    );

    // A request whose body never comes (the body timeout is 10 s).
    let mut stalled = TcpStream::connect(ferry.base.trim_start_matches("http://"))
        .await
        .unwrap();
    stalled
        .write_all(b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    // And a connection that never says anything (a TCP health check, a
    // slowloris): it held the shutdown until its head's timeout.
    let _silent = TcpStream::connect(ferry.base.trim_start_matches("http://"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Exited before the body's 10 s timeout (or the head's) could end it.
    ferry
        .terminate(Duration::from_secs(8))
        .await
        .unwrap_or_else(|| panic!("still running after SIGTERM; log: {}", ferry.log_text()));
    assert!(
        ferry
            .log_text()
            .contains("connections still open after the shutdown grace"),
        "{}",
        ferry.log_text()
    );
    // The lock went with the process: a new one starts on the file.
    ferry.restart().await;
}

/// A signed webhook with data the API would refuse is dead-lettered with the
/// reason, never stored; text the rules can normalise is normalised, and the
/// customer stays editable.
async fn inbound_records_are_validated_like_the_api(backend: Backend) {
    use crate::helpers::{email, WEBHOOK_SECRET};
    use crate::inbound::{deliver, event, stripe_signature};
    let app = spawn_sync_app(Setup::new(backend, "http://127.0.0.1:9")).await;
    let now = chrono::Utc::now().timestamp();
    let metadata: serde_json::Map<String, Value> = (0..120)
        .map(|i| (format!("k{i}"), Value::from("v".repeat(2000))))
        .collect();
    let hostile = json!({"id": "cus_hostile", "object": "customer", "email": "NOT AN EMAIL <x>",
        "name": format!("{}\0\r\n", "n".repeat(5000)), "metadata": metadata});
    let body = event("evt_hostile", "customer.created", now, hostile);
    assert_eq!(
        deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    let dead = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, letters) = app
                .send(reqwest::Method::GET, "/api/v1/dead-letters", None)
                .await;
            if let Some(letter) = letters["data"].as_array().and_then(|d| d.first()).cloned() {
                break letter;
            }
            assert!(Instant::now() < deadline, "no dead letter");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let reason = dead["error"].as_str().unwrap();
    for field in ["email", "name", "metadata"] {
        assert!(reason.contains(field), "{reason}");
    }
    let (_, customers) = app
        .send(reqwest::Method::GET, "/api/v1/customers", None)
        .await;
    assert_eq!(customers["data"], json!([]), "nothing stored");

    // Normalised: surrounding spaces and an upper-case address.
    let address = email("Normalised");
    let messy = json!({"id": "cus_messy", "object": "customer",
        "email": format!("  {}  ", address.to_uppercase()), "name": "  Ada  ", "metadata": {}});
    let body = event("evt_messy", "customer.created", now, messy);
    assert_eq!(
        deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET))
            .await
            .0,
        200
    );
    let customer = app.wait_customer_by_email(&address.to_lowercase()).await;
    assert_eq!(customer["name"], "Ada");
    let id = customer["id"].as_str().unwrap();
    let patched = app.patch(id, json!({"name": "Ada L."})).await;
    assert_eq!(patched["name"], "Ada L.", "still editable: {patched}");
}

mod sqlite {
    #[tokio::test]
    async fn inbound_records_are_validated_like_the_api() {
        super::inbound_records_are_validated_like_the_api(super::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test]
    async fn inbound_records_are_validated_like_the_api() {
        super::inbound_records_are_validated_like_the_api(super::Backend::Postgres).await;
    }
}

/// A setting the connector does not declare (a typo in the environment) is
/// an error at start that names the variable; a connector nobody
/// registered only warns, since it may be uploaded later.
#[tokio::test]
async fn configuration_typos_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).unwrap();
    std::fs::copy(stripe_component(), connectors.join("stripe.wasm")).unwrap();
    let config = |extra: Value| {
        let mut overrides = json!({
            "listen": "127.0.0.1:0",
            "database_url": format!("sqlite://{}", dir.path().join("f.db").display()),
            "connectors_dir": connectors,
        });
        overrides["connectors"] = extra;
        ferry::config::Config::from_overrides(overrides).expect("config")
    };
    let typo = config(json!({"stripe": {"settings": {"apibase": "http://127.0.0.1:1"}}}));
    let error = match ferry::app::App::build(typo).await {
        Ok(_) => panic!("started with an undeclared setting"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("FERRY_CONNECTORS__STRIPE__SETTINGS__APIBASE"),
        "{error}"
    );
    assert!(
        error.contains("api_base"),
        "names what it declares: {error}"
    );
    let unknown = config(json!({"stripee": {"settings": {"api_base": "http://127.0.0.1:1"}}}));
    assert!(
        ferry::app::App::build(unknown).await.is_ok(),
        "an unknown connector only warns"
    );
}

/// A setting only another stored version declares is no typo: a version
/// that added `account` was rolled back through the API (no restart),
/// and the deployment still sets `…__SETTINGS__ACCOUNT`. Refused, every
/// replica's next start failed until someone edited the deployment.
#[tokio::test]
async fn a_setting_of_a_version_rolled_back_does_not_stop_a_start() {
    use ferry_test_support::wasm::{component_path, variant_path};
    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).unwrap();
    std::fs::copy(
        component_path("ferry_test_recorder"),
        connectors.join("recorder.wasm"),
    )
    .unwrap();
    let config = |settings: Value| {
        ferry::config::Config::from_overrides(json!({
            "listen": "127.0.0.1:0",
            "database_url": format!("sqlite://{}", dir.path().join("f.db").display()),
            "connectors_dir": connectors,
            // The recorder's `api_base` is a private address: allowed, the
            // connector runs.
            "allow_private_hosts": true,
            "connectors": {"recorder": {"settings": settings}},
        }))
        .expect("config")
    };
    let first = ferry::app::App::build(config(json!({"api_base": "http://127.0.0.1:9"})))
        .await
        .expect("started");
    // Stored, not active: it needs `account`, which this deployment lacks.
    let newer = std::fs::read(variant_path("ferry_test_recorder", "version-3")).unwrap();
    first
        .state()
        .registry
        .upload(&newer, false, None, "admin")
        .await
        .expect("0.3.0 uploaded");
    drop(first);
    let with_account = json!({"api_base": "http://127.0.0.1:9", "account": "acct_1"});
    let second = ferry::app::App::build(config(with_account.clone()))
        .await
        .expect("0.3.0 declares `account`");
    for (version, what) in [("0.3.0", "rolled forward"), ("0.1.0", "rolled back")] {
        second
            .state()
            .registry
            .activate("recorder", version, None)
            .await
            .expect(what);
    }
    drop(second);
    if let Err(error) = ferry::app::App::build(config(with_account)).await {
        panic!("a start after the rollback failed: {error:#}");
    }
    // A name no version declares is still a typo.
    let typo = json!({"api_base": "http://127.0.0.1:9", "acount": "acct_1"});
    assert!(ferry::app::App::build(config(typo)).await.is_err());
}

/// A deployment bundling a newer version with a typo in its environment
/// is refused at start before the version is made active: it had been
/// made active first, so every replica still running (whose environment
/// lacks what it needs) stopped the connector, and rolling the deployment
/// back left it so. A name only an older version declared (a roll forward
/// dropped it) does not stop a start.
#[tokio::test]
async fn a_start_refused_for_its_environment_makes_no_version_active() {
    use ferry_test_support::wasm::{component_path, variant_path};
    let dir = tempfile::tempdir().unwrap();
    let bundle = |component: std::path::PathBuf, folder: &str| {
        let connectors = dir.path().join(folder);
        std::fs::create_dir_all(&connectors).unwrap();
        std::fs::copy(component, connectors.join("recorder.wasm")).unwrap();
        connectors
    };
    let old = bundle(component_path("ferry_test_recorder"), "old");
    let new = bundle(variant_path("ferry_test_recorder", "version-3"), "new");
    let config = |connectors: &std::path::Path, settings: Value| {
        ferry::config::Config::from_overrides(json!({
            "listen": "127.0.0.1:0",
            "database_url": format!("sqlite://{}", dir.path().join("f.db").display()),
            "connectors_dir": connectors,
            "allow_private_hosts": true,
            "connectors": {"recorder": {"settings": settings}},
        }))
        .expect("config")
    };
    let running = ferry::app::App::build(config(&old, json!({"api_base": "http://127.0.0.1:9"})))
        .await
        .expect("0.1.0 started");
    let typo = json!({"api_base": "http://127.0.0.1:9", "account": "acct_1", "acount": "acct_1"});
    let error = match ferry::app::App::build(config(&new, typo)).await {
        Ok(_) => panic!("started with a setting no version declares"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("acount"), "{error}");
    let rows = running.state().store.connector_rows().await.expect("rows");
    let recorder = rows
        .iter()
        .find(|r| r.name == "recorder")
        .expect("recorder");
    assert_eq!(
        recorder.active_version.as_deref(),
        Some("0.1.0"),
        "{recorder:?}"
    );
    drop(running);

    // Rolled forward to 0.3.0 (which needs `account`), then to a version
    // without it: the deployment's `account` is another version's now.
    let with_account = json!({"api_base": "http://127.0.0.1:9", "account": "acct_1"});
    let forward = ferry::app::App::build(config(&new, with_account.clone()))
        .await
        .expect("0.3.0 started");
    let dropped = std::fs::read(variant_path("ferry_test_recorder", "no-customer")).unwrap();
    forward
        .state()
        .registry
        .upload(&dropped, true, None, "admin")
        .await
        .expect("0.4.0 uploaded");
    drop(forward);
    if let Err(error) = ferry::app::App::build(config(&new, with_account)).await {
        panic!("a start after a roll forward that dropped a setting failed: {error:#}");
    }
}

/// The operator's host allow-list (`connector_allowed_hosts`) is real: a
/// component declaring a host outside it is refused at upload, one inside
/// it is accepted.
#[tokio::test]
async fn the_host_allow_list_decides_uploads() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({"connector_allowed_hosts": "api.example.com"});
    let app = spawn_sync_app(setup).await;
    let upload = |bytes: Vec<u8>| {
        app.client
            .post(format!("{}/api/v1/connectors", app.base))
            .header("content-type", "application/wasm")
            .body(bytes)
            .send()
    };
    let stripe = upload(std::fs::read(stripe_component()).unwrap())
        .await
        .unwrap();
    assert_eq!(stripe.status(), 422);
    let problem: Value = stripe.json().await.unwrap();
    assert_eq!(problem["code"], "forbidden_host", "{problem}");
    let hostile = ferry_test_support::wasm::component_path("ferry_test_hostile");
    let allowed = upload(std::fs::read(hostile).unwrap()).await.unwrap();
    assert_eq!(allowed.status(), 201, "{}", allowed.text().await.unwrap());
}

/// At most `max_connections` are served at once; the next waits until one
/// closes.
#[tokio::test]
async fn connections_beyond_the_limit_wait() {
    let mut setup = Setup::new(Backend::Sqlite, "http://127.0.0.1:9");
    setup.extra = json!({"max_connections": 2});
    let app = spawn_sync_app(setup).await;
    let address = app.base.trim_start_matches("http://").to_owned();
    let first = TcpStream::connect(&address).await.unwrap();
    let second = TcpStream::connect(&address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let waiting = client
        .get(format!("{}/healthz", app.base))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(waiting.is_err(), "served beyond the limit: {waiting:?}");
    drop(first);
    let served = client
        .get(format!("{}/healthz", app.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("served once a connection closed");
    assert_eq!(served.status(), 200);
    drop(second);
}

/// The console's upload takes the name the component must have: one
/// handed over as another connector is refused on a page, nothing stored.
#[tokio::test]
async fn the_console_refuses_a_component_named_otherwise() {
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, "http://127.0.0.1:9")).await;
    let (client, cookie) = crate::helpers::console_session(&app.base).await;
    let page = crate::helpers::console_page(
        &client,
        &cookie,
        &format!("{}/console/connectors", app.base),
    )
    .await;
    assert!(page.contains("name=\"name\""), "the form asks for it");
    let csrf = crate::helpers::csrf_field(&page);
    let mut body = Vec::new();
    for (field, value) in [("csrf", csrf.as_bytes()), ("name", b"acme-crm".as_slice())] {
        body.extend_from_slice(
            format!("--XX\r\ncontent-disposition: form-data; name=\"{field}\"\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(
        b"--XX\r\ncontent-disposition: form-data; name=\"component\"; filename=\"c.wasm\"\r\n\r\n",
    );
    body.extend_from_slice(&std::fs::read(stripe_component()).expect("stripe.wasm"));
    body.extend_from_slice(b"\r\n--XX--\r\n");
    let refused = client
        .post(format!("{}/console/connectors", app.base))
        .header("cookie", &cookie)
        .header("content-type", "multipart/form-data; boundary=XX")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let page = refused.text().await.unwrap();
    assert!(
        page.contains("name_mismatch") && page.contains("</html>"),
        "{page}"
    );
}

/// The console answers as the API does: an upload that stalls is 408 (it
/// was 413 `component_too_large`, whatever went wrong), a conflict id with
/// a NUL is 404 (PostgreSQL refused it: a 500 without its cause logged),
/// an upload that is no multipart form is a problem page.
#[tokio::test]
async fn the_console_answers_stalls_and_odd_ids_as_the_api_does() {
    let mut setup = Setup::new(Backend::Postgres, "http://127.0.0.1:9");
    setup.extra = json!({ "body_read_timeout": "500ms" });
    let app = spawn_sync_app(setup).await;
    let (client, cookie) = crate::helpers::console_session(&app.base).await;
    let page =
        crate::helpers::console_page(&client, &cookie, &format!("{}/console", app.base)).await;
    let csrf = crate::helpers::csrf_field(&page);

    let odd = client
        .post(format!("{}/console/conflicts/cf_%00/resolve", app.base))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("resolution", "fields"),
            ("pick.name", "local"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(odd.status(), 404, "{}", odd.text().await.unwrap());

    // An upload that is no multipart form is refused as a form without
    // its token is, on a page (it was axum's plain-text 400).
    let plain = client
        .post(format!("{}/console/connectors", app.base))
        .header("cookie", &cookie)
        .header("content-type", "text/plain")
        .body("\0asm")
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 403);
    let page = plain.text().await.unwrap();
    assert!(
        page.contains("csrf_failed") && page.contains("</html>"),
        "{page}"
    );

    // A sign-in holds a token and a path: 1 MiB read before anyone is known,
    // on each of an HTTP/2 connection's streams, was memory for the taking.
    let large = client
        .post(format!("{}/console/sign-in", app.base))
        .form(&[("token", "x".repeat(9 * 1024))])
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 413);
    let page = large.text().await.unwrap();
    assert!(
        page.contains("payload_too_large") && page.contains("</html>"),
        "{page}"
    );

    let mut stalled = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /console/connectors HTTP/1.1\r\nhost: 127.0.0.1\r\ncookie: {cookie}\r\n\
         content-type: multipart/form-data; boundary=XX\r\ncontent-length: 100000\r\n\r\n\
         --XX\r\ncontent-disposition: form-data; name=\"component\"; filename=\"c.wasm\"\r\n\r\n\0asm"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("</html>") {
        match tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let reply = String::from_utf8_lossy(&got);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("request_timeout"), "{reply}");
}
