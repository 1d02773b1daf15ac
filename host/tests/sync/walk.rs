//! The connector author's walk, as a test, in a temporary directory outside
//! ferry's workspace: `ferry connector new`, build for wasm32-wasip2, the
//! scaffold's own tests, `ferry connector check`, upload to a running
//! `ferry serve`, configure it, a signed webhook that creates a customer
//! (and its redelivery, an older state arriving late, a tampered copy),
//! and a change made through ferry's API that reaches a local fake of the
//! Example CRM API. Then record a session against the fake and replay it
//! with the fake gone. Each step's time is printed (`--nocapture`).
//!
//! The scaffold builds into the suite's own target directory, with the
//! workspace's Cargo.lock copied in, so its dependencies are the ones the
//! suite built already and only the scaffold's own crates compile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_test_support::fake_example::FakeExampleCrm;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::process::FerryProcess;

const TOKEN: &str = "walk-admin-token-0123456789abcdef";
const API_KEY: &str = "sk_test_walk_must_not_leak_7f3a";
const WEBHOOK_SECRET: &str = "whsec_walk_secret";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"))
}

/// Runs `cargo ARGS` in `dir` with the suite's target directory; panics
/// with its output if it fails.
fn cargo(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Duration {
    let started = Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", target_dir())
        .envs(env.iter().copied())
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "cargo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    started.elapsed()
}

fn ferry(args: &[&str]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .output()
        .expect("run ferry");
    (output, started.elapsed())
}

fn signed(body: &Value, timestamp: i64) -> (String, String) {
    let body = body.to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let header = format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    );
    (header, body)
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn contact_event(id: &str, kind: &str, created_at: i64, name: &str) -> Value {
    json!({"id": id, "type": kind, "created_at": created_at,
        "data": {"id": "ct_walk_1", "name": name, "email": "grace@example.com", "phone": null}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_ferry_connector_new_to_a_live_webhook() {
    let work = tempfile::tempdir().expect("temp dir");
    let crate_dir = work.path().join("walkthrough");
    let mut times = BTreeMap::new();

    // 1. Scaffold, building against this checkout of the SDK.
    let (output, took) = ferry(&[
        "connector",
        "new",
        "walkthrough",
        "--dir",
        crate_dir.to_str().expect("utf-8 path"),
        "--sdk-path",
        repo().join("sdk").to_str().expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "{output:?}");
    times.insert("1 scaffold", took);
    std::fs::copy(repo().join("Cargo.lock"), crate_dir.join("Cargo.lock")).expect("lock file");

    // 2. Build the component; then an incremental build after an edit.
    times.insert(
        "2 first build",
        cargo(
            &crate_dir,
            &["build", "--quiet", "--target", "wasm32-wasip2", "--release"],
            &[],
        ),
    );
    let lib = crate_dir.join("src/lib.rs");
    let source = std::fs::read_to_string(&lib).expect("lib.rs");
    std::fs::write(&lib, source + "\n// an edit\n").expect("edit");
    times.insert(
        "2 incremental build",
        cargo(
            &crate_dir,
            &["build", "--quiet", "--target", "wasm32-wasip2", "--release"],
            &[],
        ),
    );
    let wasm = target_dir().join("wasm32-wasip2/release/ferry_connector_walkthrough.wasm");
    assert!(wasm.exists(), "{} was built", wasm.display());

    // 3. The scaffold's own tests, as generated.
    times.insert("3 cargo test", cargo(&crate_dir, &["test", "--quiet"], &[]));

    // 4. ferry connector check.
    let (output, took) = ferry(&["connector", "check", "--json", wasm.to_str().expect("path")]);
    times.insert("4 check", took);
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(report["accepted"], true, "{report}");
    assert_eq!(report["world"], "0.2.0");
    assert_eq!(report["manifest"]["name"], "walkthrough");

    // The dev loop: build, check, serve with it loaded; --watch reloads an
    // edit (a new version here).
    let started = Instant::now();
    let mut dev = DevProcess::start(&crate_dir);
    let connector = dev.wait_connector("0.1.0").await;
    times.insert("dev: serving", started.elapsed());
    assert_eq!(connector["source"], "bundled", "{connector}");
    // The printed way to configure it works: secrets are stored under the
    // loop's own master key.
    let configured = reqwest::Client::new()
        .put(format!("{}/api/v1/connectors/walkthrough/settings", dev.base))
        .json(&json!({"settings": {"api_base": "http://127.0.0.1:9"}, "secrets": {"api_key": API_KEY}}))
        .send()
        .await
        .expect("configure");
    let status = configured.status();
    assert!(
        status.is_success(),
        "{status}: {}",
        configured.text().await.unwrap_or_default()
    );
    let manifest = crate_dir.join("Cargo.toml");
    let toml = std::fs::read_to_string(&manifest).expect("Cargo.toml");
    std::fs::write(
        &manifest,
        toml.replacen("version = \"0.1.0\"", "version = \"0.1.1\"", 1),
    )
    .expect("bump the version");
    let started = Instant::now();
    dev.wait_connector("0.1.1").await;
    times.insert("dev: reload after an edit", started.elapsed());
    // A rollback made against the loop does not stop it: the next edit
    // serves what was just built again, not the version chosen before.
    let rolled_back = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/connectors/walkthrough/activate",
            dev.base
        ))
        .json(&json!({"version": "0.1.0"}))
        .send()
        .await
        .expect("roll back");
    assert_eq!(rolled_back.status(), 200);
    dev.wait_connector("0.1.0").await;
    let lib_rs = crate_dir.join("src/lib.rs");
    let mut source = std::fs::read_to_string(&lib_rs).expect("src/lib.rs");
    source.push_str("\n// An edit after the rollback.\n");
    std::fs::write(&lib_rs, source).expect("edit src/lib.rs");
    dev.wait_connector("0.1.1").await;
    // The author resets the loop's database by deleting the connector: the
    // next start serves it again (every later start failed, saying the
    // component was refused), as bundled: an edit under the same version
    // still replaces it.
    let deleted = reqwest::Client::new()
        .delete(format!(
            "{}/api/v1/connectors/walkthrough?force=true",
            dev.base
        ))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    dev.stop();
    // Started mid-edit (a source that does not build), the watching loop
    // waits for the fix, and serves once it builds: it exited.
    let whole = std::fs::read_to_string(&lib_rs).expect("src/lib.rs");
    std::fs::write(&lib_rs, format!("{whole}\ncompile_error!(\"mid-edit\");\n"))
        .expect("break src/lib.rs");
    let mut dev = DevProcess::start(&crate_dir);
    let log = dev.log.clone();
    wait_for(Duration::from_secs(120), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("not built").then_some(())
    })
    .await
    .expect("the first build failed, and the loop said so");
    std::fs::write(&lib_rs, &whole).expect("fix src/lib.rs");
    let served = dev.wait_connector("0.1.1").await;
    assert_eq!(served["source"], "bundled", "{served}");
    let source = std::fs::read_to_string(&lib_rs).expect("src/lib.rs");
    let described = ".description(\"Example CRM contacts";
    assert!(source.contains(described), "{source}");
    std::fs::write(
        &lib_rs,
        source.replacen(described, ".description(\"Edited: Example CRM contacts", 1),
    )
    .expect("edit the description");
    let client = reqwest::Client::new();
    let url = format!("{}/api/v1/connectors/walkthrough", dev.base);
    let last = std::sync::Mutex::new(Value::Null);
    let edited = wait_for(Duration::from_secs(120), || async {
        let connector: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
        *last.lock().unwrap() = connector.clone();
        let description = connector["manifest"]["description"].as_str()?;
        description.starts_with("Edited: ").then_some(())
    })
    .await;
    let versions: Value = client
        .get(format!("{url}/versions"))
        .send()
        .await
        .expect("versions")
        .json()
        .await
        .expect("versions json");
    assert!(
        edited.is_some(),
        "the edit was not served: {:#}\n{versions:#}\n{}",
        last.lock().unwrap(),
        std::fs::read_to_string(&dev.log).unwrap_or_default()
    );
    // The source put back as it was, with a time before the last build
    // (`cp -p`, a restore): cargo rebuilds nothing, and the loop says so
    // instead of "reloaded" over the edit it still serves.
    std::fs::write(&lib_rs, &source).expect("restore src/lib.rs");
    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&lib_rs)
        .and_then(|file| file.set_modified(an_hour_ago))
        .expect("date src/lib.rs back");
    let log = dev.log.clone();
    wait_for(Duration::from_secs(120), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("unchanged: the build gave the component served already")
            .then_some(())
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the loop did not say the build changed nothing:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    dev.stop();
    std::fs::write(&lib_rs, source).expect("restore src/lib.rs");
    std::fs::write(&manifest, toml).expect("restore the version");
    cargo(
        &crate_dir,
        &["build", "--quiet", "--target", "wasm32-wasip2", "--release"],
        &[],
    );

    // 5. Upload it to a running ferry.
    let fake = FakeExampleCrm::start(API_KEY)
        .await
        .expect("fake Example CRM");
    let env = BTreeMap::from([
        (
            "FERRY_DATABASE_URL".to_owned(),
            format!("sqlite://{}", work.path().join("ferry.db").display()),
        ),
        ("FERRY_ADMIN_TOKEN".to_owned(), TOKEN.to_owned()),
        (
            "FERRY_MASTER_KEY".to_owned(),
            "walk-master-key-0123456789abcdef".to_owned(),
        ),
        ("FERRY_ALLOW_PRIVATE_HOSTS".to_owned(), "true".to_owned()),
    ]);
    let ferry_serve = FerryProcess::start(env, work.path()).await;
    let client = reqwest::Client::new();
    let api = |method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{}{path}", ferry_serve.base))
            .bearer_auth(TOKEN)
    };
    let bytes = std::fs::read(&wasm).expect("the component");
    let started = Instant::now();
    let response = api(reqwest::Method::POST, "/api/v1/connectors")
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("upload");
    times.insert("5 upload", started.elapsed());
    assert_eq!(response.status(), 201);

    // 6. Configure it.
    let response = api(
        reqwest::Method::PUT,
        "/api/v1/connectors/walkthrough/settings",
    )
    .json(&json!({"settings": {"api_base": fake.url()},
            "secrets": {"api_key": API_KEY, "webhook_secret": WEBHOOK_SECRET}}))
    .send()
    .await
    .expect("settings");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);

    // 7. A signed webhook, and what happens to deliveries on the way.
    let deliver = |header: String, body: String| {
        client
            .post(format!("{}/webhooks/walkthrough", ferry_serve.base))
            .header("example-signature", header)
            .body(body)
            .send()
    };
    let t = now_secs();
    let (header, body) = signed(
        &contact_event("evt_w1", "contact.created", t - 20, "Grace Hopper"),
        t,
    );
    let first: Value = deliver(header.clone(), body.clone())
        .await
        .expect("webhook")
        .json()
        .await
        .expect("receipt");
    assert_eq!(first, json!({"events": 1, "stored": 1}));
    let again: Value = deliver(header, body.clone())
        .await
        .expect("redelivery")
        .json()
        .await
        .expect("receipt");
    assert_eq!(
        again,
        json!({"events": 1, "stored": 0}),
        "a redelivery is stored once"
    );
    let tampered = deliver(
        signed(&contact_event("evt_w9", "contact.updated", t, "x"), t).0,
        body.replace("Grace", "Mallory"),
    )
    .await
    .expect("tampered");
    assert_eq!(tampered.status(), 400);
    let refused = tampered.text().await.expect("body");
    assert!(refused.contains("invalid_signature"), "{refused}");
    let (newer, newer_body) = signed(
        &contact_event("evt_w3", "contact.updated", t - 5, "Grace B. Hopper"),
        t,
    );
    assert_eq!(
        deliver(newer, newer_body).await.expect("newer").status(),
        200
    );
    let (older, older_body) = signed(
        &contact_event("evt_w2", "contact.updated", t - 10, "G. Hopper"),
        t,
    );
    assert_eq!(
        deliver(older, older_body).await.expect("older").status(),
        200
    );
    let customer = wait_for(Duration::from_secs(15), || async {
        let page: Value = api(
            reqwest::Method::GET,
            "/api/v1/customers?email=grace@example.com",
        )
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
        page["data"]
            .get(0)
            .filter(|c| c["name"] == "Grace B. Hopper")
            .cloned()
    })
    .await
    .expect("the webhook's customer, at its newest state");
    // The older state arrived last and changed nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again: Value = api(
        reqwest::Method::GET,
        &format!("/api/v1/customers/{}", customer["id"].as_str().unwrap()),
    )
    .send()
    .await
    .expect("get")
    .json()
    .await
    .expect("json");
    assert_eq!(again["name"], "Grace B. Hopper");

    // 8. A change through ferry's API reaches the CRM.
    let created: Value = api(reqwest::Method::POST, "/api/v1/customers")
        .json(&json!({"name": "Ada Lovelace", "email": "ada@example.com"}))
        .send()
        .await
        .expect("create")
        .json()
        .await
        .expect("json");
    let id = created["id"].as_str().expect("id").to_owned();
    let contact = wait_for(Duration::from_secs(15), || async {
        fake.contacts()
            .into_iter()
            .find(|c| c["external_id"] == id.as_str())
    })
    .await
    .expect("the customer reached the Example CRM");
    assert_eq!(contact["name"], "Ada Lovelace");
    let pushes = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/contacts")
        .collect::<Vec<_>>();
    assert_eq!(pushes.len(), 1, "pushed once");
    assert_eq!(
        pushes[0].authorization.as_deref(),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert!(
        !ferry_serve.log_text().contains(API_KEY),
        "the API key appears in ferry's log"
    );

    // Record a session against the fake, then replay it with the fake gone.
    let session = crate_dir.join("tests/fixtures/session.json");
    std::fs::remove_file(&session).expect("remove the shipped session");
    times.insert(
        "record",
        cargo(
            &crate_dir,
            &[
                "test",
                "--quiet",
                "--features",
                "record",
                "--",
                "--ignored",
                "record_a_session",
            ],
            &[
                ("EXAMPLE_API_BASE", &fake.url()),
                ("EXAMPLE_API_KEY", API_KEY),
            ],
        ),
    );
    let recorded = std::fs::read_to_string(&session).expect("the recording");
    assert!(
        !recorded.contains(API_KEY),
        "the saved session holds the API key"
    );
    assert!(recorded.contains("{{secret:api_key}}"), "{recorded}");
    drop(ferry_serve);
    drop(fake);
    times.insert(
        "replay",
        cargo(
            &crate_dir,
            &["test", "--quiet", "a_recorded_session_replays_offline"],
            &[],
        ),
    );

    let size = std::fs::metadata(&wasm).expect("size").len();
    eprintln!(
        "the walk, on this machine (component {:.0} KiB):",
        size as f64 / 1024.0
    );
    for (step, took) in &times {
        eprintln!("  {step:<22} {:>8.2} s", took.as_secs_f64());
    }
}

/// `ferry connector dev --watch DIR` as a child process.
struct DevProcess {
    child: std::process::Child,
    base: String,
    log: PathBuf,
}

impl DevProcess {
    fn start(dir: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let log = dir.join("target-dev.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["connector", "dev", "--watch"])
            .arg(dir)
            .current_dir(dir)
            .env("CARGO_TARGET_DIR", target_dir())
            .env("FERRY_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn ferry connector dev");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// Waits until it serves the scaffold's connector at `version`.
    async fn wait_connector(&mut self, version: &str) -> Value {
        let client = reqwest::Client::new();
        let url = format!("{}/api/v1/connectors/walkthrough", self.base);
        let found = wait_for(Duration::from_secs(120), || async {
            let connector: Value = client.get(&url).send().await.ok()?.json().await.ok()?;
            (connector["active_version"] == version).then_some(connector)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "ferry connector dev never served {version}: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `probe` until it gives a value or `timeout` passes.
async fn wait_for<T, F, Fut>(timeout: Duration, probe: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `ferry connector check`: a report for people and for scripts, and a
/// non-zero exit status for what an upload would refuse, with the upload's
/// codes.
#[test]
fn check_reports_what_an_upload_would_refuse() {
    let stripe = ferry_test_support::wasm::component_path("ferry_connector_stripe");
    let hostile = ferry_test_support::wasm::component_path("ferry_test_hostile");
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();

    let (output, _) = ferry(&["connector", "check", &path(&stripe)]);
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "stripe 0.1.0",
        "ferry:connector@0.2.0",
        "api.stripe.com",
        "api_key (required)",
        "ferry:connector/http@0.2.0",
        "would be accepted",
        // Uploaded, a component named so would be Stripe's next version,
        // handed its settings and secrets.
        "WARNING     named `stripe`, a connector ferry ships",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    let json = |args: &[&str]| {
        let (output, _) = ferry(args);
        let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
        (output.status.success(), report)
    };
    let (ok, report) = json(&["connector", "check", "--json", &path(&hostile)]);
    assert!(ok, "{report}");
    assert_eq!(report["world"], "0.1.0", "an old-world component");
    let (ok, report) = json(&[
        "connector",
        "check",
        "--json",
        "--denied-hosts",
        "*.example.com",
        &path(&hostile),
    ]);
    assert!(!ok);
    assert_eq!(report["refusals"][0]["code"], "forbidden_host", "{report}");
    assert_eq!(
        report["manifest"]["name"], "hostile",
        "the manifest is shown anyway"
    );
    // The server's rules from its configuration file; a flag wins.
    let rules = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        rules.path(),
        "connector_denied_hosts = [\"*.example.com\"]\nconnector_max_bytes = 2000\n",
    )
    .expect("write");
    let config = path(rules.path());
    let (ok, report) = json(&[
        "--config",
        &config,
        "connector",
        "check",
        "--json",
        &path(&hostile),
    ]);
    assert!(!ok);
    let codes: Vec<&Value> = report["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .map(|r| &r["code"])
        .collect();
    assert!(codes.contains(&&Value::from("forbidden_host")), "{report}");
    assert!(
        codes.contains(&&Value::from("component_too_large")),
        "{report}"
    );
    let (_, report) = json(&[
        "--config",
        &config,
        "connector",
        "check",
        "--json",
        "--max-bytes",
        "100000000",
        &path(&hostile),
    ]);
    assert!(
        !report["refusals"]
            .as_array()
            .expect("refusals")
            .iter()
            .any(|r| r["code"] == "component_too_large"),
        "the flag wins: {report}"
    );
    let (ok, report) = json(&[
        "connector",
        "check",
        "--json",
        "--max-bytes",
        "1000",
        &path(&stripe),
    ]);
    assert!(!ok);
    assert_eq!(
        report["refusals"][0]["code"], "component_too_large",
        "{report}"
    );
    let garbage = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(garbage.path(), b"not a component").expect("write");
    let (ok, report) = json(&["connector", "check", "--json", &path(garbage.path())]);
    assert!(!ok);
    assert_eq!(report["refusals"][0]["code"], "not_wasm", "{report}");
}

/// `ferry-sdk` (with `ferry-runtime`, which its test kit needs) packages as
/// crates.io would take it, and a scaffold builds against the packages, not
/// the repository: the WIT and everything else it needs travel inside.
#[test]
fn the_sdk_packages_and_builds_outside_the_workspace() {
    cargo(
        &repo(),
        &[
            "package",
            "--quiet",
            "--no-verify",
            "--allow-dirty",
            "-p",
            "ferry-runtime",
            "-p",
            "ferry-sdk",
        ],
        &[],
    );
    let work = tempfile::tempdir().expect("temp dir");
    let version = env!("CARGO_PKG_VERSION");
    for package in ["ferry-runtime", "ferry-sdk"] {
        let archive = target_dir().join(format!("package/{package}-{version}.crate"));
        let status = Command::new("tar")
            .arg("xzf")
            .arg(&archive)
            .arg("-C")
            .arg(work.path())
            .status()
            .expect("tar");
        assert!(status.success(), "unpacking {}", archive.display());
    }
    let sdk = work.path().join(format!("ferry-sdk-{version}"));
    assert!(
        sdk.join("wit/since_v0.2.0/connector.wit").is_file(),
        "the WIT is packaged"
    );
    let crate_dir = work.path().join("packaged");
    let (output, _) = ferry(&[
        "connector",
        "new",
        "packaged",
        "--dir",
        crate_dir.to_str().expect("utf-8 path"),
        "--sdk-path",
        sdk.to_str().expect("utf-8 path"),
        "--runtime-path",
        work.path()
            .join(format!("ferry-runtime-{version}"))
            .to_str()
            .expect("utf-8 path"),
    ]);
    assert!(output.status.success(), "{output:?}");
    std::fs::copy(repo().join("Cargo.lock"), crate_dir.join("Cargo.lock")).expect("lock file");
    cargo(
        &crate_dir,
        &["build", "--quiet", "--target", "wasm32-wasip2", "--release"],
        &[],
    );
    assert!(target_dir()
        .join("wasm32-wasip2/release/ferry_connector_packaged.wasm")
        .is_file());
}
