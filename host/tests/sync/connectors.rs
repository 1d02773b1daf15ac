//! The connector plane: uploads (and every way one is refused), versions,
//! activation (rollback), enable and disable, delete, a version swap under
//! webhook load, and two `ferry serve` processes on one PostgreSQL following
//! each other's changes. The uploaded connector is the recorder test guest
//! (tests/guests/recorder) and its variants: `version-2` (0.2.0),
//! `version-3` (0.3.0, a new required setting), `rebuilt`
//! (0.1.0 with other bytes), `invalid-manifest`, `no-customer` (0.4.0,
//! syncing `invoice` only) and `version-5` (0.5.0, 0.3.0's setting
//! renamed). Its webhook answers
//! `recorder VERSION`, so a test sees which version served a delivery.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_test_support::postgres::PgCluster;
use ferry_test_support::wasm::{component_path, variant_path};
use serde_json::{json, Value};

use ferry::store::inbox::{InboxEvent, NewInboxEvent, RemoteChange};
use ferry::store::links::ChangeNotice;

use crate::helpers::{
    email, execute_raw, new_database, spawn_sync_app, stripe_component, Backend, Setup, SyncApp,
};
use crate::process::FerryProcess;
use crate::reconcile::{run_to_end, start_run, wait_run};
use crate::recorder_remote::{Recorded, RecorderRemote, SETTLE};

/// The admin token of the tests that need one.
const TOKEN: &str = "connector-plane-admin-token-0123";

fn recorder() -> Vec<u8> {
    std::fs::read(component_path("ferry_test_recorder")).expect("recorder.wasm")
}

fn recorder_variant(variant: &str) -> Vec<u8> {
    std::fs::read(variant_path("ferry_test_recorder", variant)).expect("a recorder variant")
}

fn setup(backend: Backend) -> Setup {
    let mut setup = Setup::new(backend, "http://127.0.0.1:9");
    setup.stripe_url = None;
    setup
}

/// `POST /api/v1/connectors` with `bytes` as `content_type`. A refusal
/// decided from the headers (413, 415) is answered before the body is read,
/// and the server closes the connection: a client still writing a large
/// body may see that close instead of the answer (the same race as
/// `hardening`'s oversized webhook, which checks it on a raw socket), so
/// such a request is sent once more before the test gives up on it.
async fn upload_as(app: &SyncApp, bytes: Vec<u8>, query: &str, content_type: &str) -> (u16, Value) {
    let send = || {
        let mut request = app
            .client
            .post(format!("{}/api/v1/connectors{query}", app.base))
            .header("content-type", content_type)
            .body(bytes.clone());
        if let Some(token) = &app.token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let response = match send().await {
        Ok(response) => response,
        Err(error) if error.is_request() => send().await.expect("answered"),
        Err(error) => panic!("answered: {error}"),
    };
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn upload(app: &SyncApp, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    upload_as(app, bytes, query, "application/wasm").await
}

async fn get(app: &SyncApp, path: &str) -> (u16, Value) {
    app.send(reqwest::Method::GET, path, None).await
}

async fn post(app: &SyncApp, path: &str, body: Option<Value>) -> (u16, Value) {
    app.send(reqwest::Method::POST, path, body).await
}

/// `PUT /api/v1/connectors/recorder/settings` with `body`.
async fn put_settings(app: &SyncApp, body: Value) -> (u16, Value) {
    app.send(
        reqwest::Method::PUT,
        "/api/v1/connectors/recorder/settings",
        Some(body),
    )
    .await
}

/// `POST /api/v1/connectors/recorder/activate` of `version`.
async fn activate(app: &SyncApp, version: &str) -> (u16, Value) {
    post(
        app,
        "/api/v1/connectors/recorder/activate",
        Some(json!({ "version": version })),
    )
    .await
}

/// Stores a recorder event that carries no record (another replica took
/// it in), wakes the inbox, and returns the event.
async fn store_thin_event(app: &SyncApp, event_id: &str, remote_id: &str) -> NewInboxEvent {
    let event = NewInboxEvent {
        event_id: event_id.into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: remote_id.into(),
        occurred_at_ms: chrono::Utc::now().timestamp_millis(),
        record: None,
        origin_key: None,
        remote_type: "record.updated".into(),
        policy: None,
    };
    app.store
        .store_inbox_many(&[("recorder", std::slice::from_ref(&event), None)])
        .await
        .expect("stored");
    app.sync.wake();
    event
}

/// Posts a recorder webhook carrying one event; the status and the body.
async fn recorder_webhook(client: &reqwest::Client, base: &str, id: &str) -> (u16, String) {
    let body = json!({
        "id": id,
        "remote_id": format!("rec_{id}"),
        "record": {"email": format!("{id}@example.com"), "name": id},
    });
    match client
        .post(format!("{base}/webhooks/recorder"))
        .json(&body)
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(error) => (0, error.to_string()),
    }
}

/// A webhook that finds every instance of its connector busy is answered
/// 503 `runtime_busy` with a Retry-After: before, it was a connector
/// failure (`connector_failed`, counted `failed`, a warning each) while
/// ferry itself was saturated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_finding_every_instance_busy_is_answered_busy() {
    let remote = RecorderRemote::start().await;
    let mut setup = setup(Backend::Sqlite);
    setup.extra = json!({"sync_concurrency": 1, "connector_max_instances": 1,
        "connector_call_timeout": "6s", "sync_lease": "30s"});
    let app = spawn_sync_app(setup).await;
    install_recorder(&app, &remote).await;
    remote.delay_writes(Duration::from_secs(5));
    app.create(json!({"email": format!("{}@example.com", uuid()), "name": "Slow"}))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while remote.writes_at_once() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the push never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = app
        .client
        .post(format!("{}/webhooks/recorder", app.base))
        .json(&json!({"id": uuid(), "remote_id": "rec_busy",
            "record": {"email": format!("{}@example.com", uuid()), "name": "Busy"}}))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.expect("problem+json");
    assert_eq!(problem["code"], "runtime_busy", "{problem}");
}

/// Uploads the recorder and enables it against `remote`.
async fn install_recorder(app: &SyncApp, remote: &RecorderRemote) {
    let (status, version) = upload(app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    configure_recorder(app, remote).await;
}

/// Points the uploaded recorder at `remote`, which enables it.
async fn configure_recorder(app: &SyncApp, remote: &RecorderRemote) {
    let (status, connector) =
        put_settings(app, json!({"settings": {"api_base": remote.url}})).await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["state"], "enabled");
}

/// Creates a customer named `name` and waits until the recorder holds it:
/// its id. The wait is generous: a push takes milliseconds, but the test
/// cluster fsyncs, and a shared disk has stalled a CI run's commits for
/// seconds (a CI run failed a test built on this step, some 10 s in).
async fn linked_customer(app: &SyncApp, name: &str) -> String {
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": name}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    app.wait_link_of("recorder", &id, Duration::from_secs(30), |l| {
        l["state"] == "synced"
    })
    .await;
    id
}

/// An upload is stored and active at once; the same bytes again change
/// nothing; a second version can be stored without activating it; the
/// same version number with other bytes is refused.
async fn upload_and_upload_again(backend: Backend) {
    let app = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    assert_eq!(version["name"], "recorder");
    assert_eq!(version["version"], "0.1.0");
    assert_eq!(version["active"], true);
    assert_eq!(version["source"], "upload");
    assert_eq!(version["world"], "0.2.0");
    assert_eq!(version["uploaded_by"], "open");
    assert_eq!(version["sha256"].as_str().map(str::len), Some(64));

    let (status, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["active_version"], "0.1.0");
    assert_eq!(connector["sha256"], version["sha256"]);
    assert_eq!(connector["manifest"]["name"], "recorder");
    // Uploaded, not yet switched on: nothing is queued for it.
    assert_eq!(connector["state"], "unconfigured");
    let (_, page) = get(&app, "/api/v1/connectors").await;
    let names: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["recorder", "stripe"]);

    let (status, again) = upload(&app, recorder(), "").await;
    assert_eq!(status, 200, "the same bytes again: {again}");
    assert_eq!(again["sha256"], version["sha256"]);
    assert_eq!(again["uploaded_at"], version["uploaded_at"]);
    let (status, again) = upload(&app, recorder(), "?name=recorder").await;
    assert_eq!(status, 200, "named as its manifest names it: {again}");

    // Handed over as another connector: a component naming itself
    // `recorder` (or `stripe`) would take that connector's settings and
    // secrets; given the name it must have, it is refused, stored or not.
    for bytes in [recorder(), recorder_variant("version-2")] {
        let (status, problem) = upload(&app, bytes, "?name=acme-crm&activate=false").await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["code"], "name_mismatch", "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("`recorder`, not `acme-crm`"),
            "{problem}"
        );
    }
    let (_, versions) = get(&app, "/api/v1/connectors/recorder/versions").await;
    assert_eq!(
        versions["data"].as_array().map(Vec::len),
        Some(1),
        "{versions}"
    );

    let (status, second) = upload(&app, recorder_variant("version-2"), "?activate=false").await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["version"], "0.2.0");
    assert_eq!(second["active"], false);
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "activate=false");

    let (status, problem) = upload(&app, recorder_variant("rebuilt"), "").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "version_exists");
    assert!(
        problem["detail"].as_str().unwrap().contains("0.1.0"),
        "{problem}"
    );

    let (status, versions) = get(&app, "/api/v1/connectors/recorder/versions").await;
    assert_eq!(status, 200);
    let listed: Vec<(&str, bool)> = versions["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap(),
                v["active"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(listed, [("0.1.0", true), ("0.2.0", false)]);

    // The bundled Stripe connector went through the same door.
    let (_, versions) = get(&app, "/api/v1/connectors/stripe/versions").await;
    assert_eq!(versions["data"][0]["source"], "bundled", "{versions}");
    assert_eq!(versions["data"][0]["active"], true);
}

/// Every way an upload is refused, each with its own code; nothing is
/// stored, and the admin token is required.
async fn invalid_uploads_are_refused(backend: Backend) {
    let mut setup = setup(backend);
    setup.extra = json!({
        "admin_token": TOKEN,
        // Between the recorder (≈ 250 KB) and Stripe (≈ 390 KB).
        "connector_max_bytes": 320_000,
        // Uploads have their own limit: the JSON one does not apply.
        "max_body_bytes": 100_000,
        // The hostile guest declares api.example.com.
        "connector_denied_hosts": "api.example.com, *.evil.example",
    });
    let app = spawn_sync_app(setup).await;

    let anonymous = app
        .client
        .post(format!("{}/api/v1/connectors", app.base))
        .header("content-type", "application/wasm")
        .body(recorder())
        .send()
        .await
        .expect("answered");
    assert_eq!(anonymous.status(), 401);

    let component = |wat: &str| wat::parse_str(wat).expect("valid WAT");
    let stripe = std::fs::read(stripe_component()).expect("stripe.wasm");
    let recorder_bytes = recorder();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "garbage",
            b"this is not webassembly".to_vec(),
            422,
            "not_wasm",
        ),
        (
            "a core module",
            component("(module (func (export \"f\")))"),
            422,
            "core_module",
        ),
        (
            "a truncated component",
            recorder_bytes[..recorder_bytes.len() / 2].to_vec(),
            422,
            "invalid_component",
        ),
        (
            "a component that is no connector",
            component("(component)"),
            422,
            "not_a_connector",
        ),
        (
            "a newer world",
            component(
                "(component (instance $h) (export \"ferry:connector/handler@9.1.0\" (instance $h)))",
            ),
            422,
            "world_too_new",
        ),
        (
            "an unsupported world",
            component(
                "(component (instance $h) (export \"ferry:connector/handler@0.0.7\" (instance $h)))",
            ),
            422,
            "world_unsupported",
        ),
        (
            "a supported world without its functions",
            component(
                "(component (instance $h) (export \"ferry:connector/handler@0.2.0\" (instance $h)))",
            ),
            422,
            "world_mismatch",
        ),
        (
            "a bad manifest",
            recorder_variant("invalid-manifest"),
            422,
            "invalid_manifest",
        ),
        (
            "a denied host",
            std::fs::read(component_path("ferry_test_hostile")).expect("hostile.wasm"),
            422,
            "forbidden_host",
        ),
        ("too large", stripe, 413, "component_too_large"),
    ];
    for (what, bytes, status, code) in cases {
        let (got, problem) = upload(&app, bytes, "").await;
        assert_eq!(
            (got, problem["code"].as_str()),
            (status, Some(code)),
            "{what}: {problem}"
        );
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {problem}"
        );
    }
    let (status, problem) = upload_as(&app, recorder(), "", "application/json").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );
    let (status, problem) = upload(&app, recorder(), "?activate=maybe").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("validation_failed"))
    );
    // A misspelled flag is refused, not read as the default (active).
    let (status, problem) = upload(&app, recorder(), "?activte=false").await;
    assert_eq!(
        (
            status,
            problem["code"].as_str(),
            problem["errors"][0]["field"].as_str()
        ),
        (422, Some("validation_failed"), Some("activte")),
        "{problem}"
    );

    let (_, page) = get(&app, "/api/v1/connectors").await;
    assert_eq!(
        page["data"].as_array().map(Vec::len),
        Some(1),
        "only the bundled Stripe connector: {page}"
    );
    // What is allowed still goes in.
    let (status, version) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    assert_eq!(version["uploaded_by"], "admin");
}

/// Roll forward and back; disable (webhooks 404, pushes wait without
/// spending attempts) and enable again (what waited is pushed).
async fn rollback_disable_and_enable(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let served_by = || async { recorder_webhook(&app.client, &app.base, &uuid()).await };
    assert_eq!(served_by().await, (200, "recorder 0.1.0".to_owned()));

    let (status, _) = upload(&app, recorder_variant("version-2"), "").await;
    assert_eq!(status, 201);
    assert_eq!(served_by().await, (200, "recorder 0.2.0".to_owned()));
    let (status, connector) = activate(&app, "0.1.0").await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["active_version"], "0.1.0");
    assert_eq!(served_by().await, (200, "recorder 0.1.0".to_owned()));
    let (status, problem) = activate(&app, "9.9.9").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("connector_version_not_found"))
    );

    let (status, connector) = post(&app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["state"], "disabled");
    assert_eq!(connector["enabled"], false);
    let (status, _) = served_by().await;
    assert_eq!(status, 404, "a disabled connector's webhooks");

    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Waits"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    // Queued, looked at and put back to wait (its next attempt is later
    // than now), however long the machine takes to get there.
    let link = app
        .wait_link_of("recorder", &id, Duration::from_secs(20), |l| {
            l["next_attempt_at_ms"].as_i64() > Some(chrono::Utc::now().timestamp_millis())
        })
        .await;
    assert!(
        remote.requests_to("POST", "/records").is_empty(),
        "nothing is pushed while disabled"
    );
    assert_eq!(link["state"], "pending", "{link}");
    assert_eq!(link["attempts"], 0, "no attempt spent: {link}");

    // A misspelled flag is refused: enabled without the backfill asked
    // for, the waiting pushes would go out as creates.
    let (status, problem) = post(
        &app,
        "/api/v1/connectors/recorder/enable?backfil=true",
        None,
    )
    .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("validation_failed")),
        "{problem}"
    );
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["state"], "disabled", "{connector}");
    let (status, connector) = post(&app, "/api/v1/connectors/recorder/enable", None).await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["state"], "enabled");
    let link = app
        .wait_link_of("recorder", &id, Duration::from_secs(10), |l| {
            l["state"] == "synced"
        })
        .await;
    assert!(link["remote_id"].as_str().is_some(), "{link}");
    assert_eq!(remote.requests_to("POST", "/records").len(), 1);
    let history = app.sync_status(&id).await;
    let retries = history["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .filter(|d| d["connector"] == "recorder" && d["outcome"] != "delivered")
                .count()
        })
        .unwrap_or(0);
    assert_eq!(retries, 0, "the wait left no failed attempts: {history}");
    assert_eq!(served_by().await.0, 200);
}

/// Installs the recorder against `remote`, switches it off, and creates a
/// customer named `name`: its id, once its create waits for the switch.
async fn a_create_parked_by_the_switch(
    app: &SyncApp,
    remote: &RecorderRemote,
    name: &str,
) -> String {
    install_recorder(app, remote).await;
    let (status, _) = post(app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200);
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": name}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let now = || chrono::Utc::now().timestamp_millis();
    app.wait_link_of("recorder", &id, Duration::from_secs(20), |l| {
        l["next_attempt_at_ms"].as_i64() > Some(now())
    })
    .await;
    id
}

/// A retry (its backoff over) that meets its connector switched off waits
/// with the pending pushes, and goes at the enable with them: it waited
/// out its minute's recheck, and its wait says why meanwhile.
async fn a_retry_parked_by_the_switch_goes_at_the_enable(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    let id = a_create_parked_by_the_switch(&app, &remote, "Retried").await;
    let now = || chrono::Utc::now().timestamp_millis();
    // A retry whose backoff is over (as a failed attempt before the switch
    // left it) meets the switch too.
    let sql = format!(
        "UPDATE sync_links SET state = 'retry', attempts = 1, next_attempt_at_ms = 0 \
         WHERE connector = 'recorder' AND customer_id = '{id}' AND $1 IS NOT NULL"
    );
    execute_raw(&app.database_url, &sql, b"").await;
    let parked = app
        .wait_link_of("recorder", &id, Duration::from_secs(20), |l| {
            l["state"] == "retry" && l["next_attempt_at_ms"].as_i64() > Some(now())
        })
        .await;
    assert_eq!(
        parked["last_error"], "waiting: the connector is paused or not configured here",
        "{parked}"
    );
    let (status, _) = post(&app, "/api/v1/connectors/recorder/enable", None).await;
    assert_eq!(status, 200);
    app.wait_link_of("recorder", &id, Duration::from_secs(15), |l| {
        l["state"] == "synced"
    })
    .await;
}

/// A change waiting for a paused connector holds a delete as a linked
/// customer does: the create has no remote record yet, and deleting the
/// connector without `force` skipped it for good.
async fn delete_refused_while_changes_wait(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    a_create_parked_by_the_switch(&app, &remote, "Waiting").await;

    deleted_only_with_force(&app).await;
}

/// A `DELETE` of the recorder is refused (409 `connector_in_use`, one
/// holding it), then goes with `force=true`.
async fn deleted_only_with_force(app: &SyncApp) {
    let (status, problem) = app
        .send(reqwest::Method::DELETE, "/api/v1/connectors/recorder", None)
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (409, Some("connector_in_use")),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().starts_with("1 "),
        "{problem}"
    );
    force_delete_recorder(app).await;
}

/// `DELETE /api/v1/connectors/recorder?force=true`, which must answer 204.
async fn force_delete_recorder(app: &SyncApp) {
    let (status, _) = app
        .send(
            reqwest::Method::DELETE,
            "/api/v1/connectors/recorder?force=true",
            None,
        )
        .await;
    assert_eq!(status, 204);
}

/// Enabling needs the manifest's required settings and secrets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_names_what_is_missing() {
    let app = spawn_sync_app(setup(Backend::Sqlite)).await;
    let (status, problem) = post(&app, "/api/v1/connectors/stripe/enable", None).await;
    assert_eq!(status, 422, "{problem}");
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["secrets.api_key"], "{problem}");
    let (status, problem) = post(&app, "/api/v1/connectors/nope/enable", None).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (404, Some("connector_not_found"))
    );
}

/// A connector with linked customers is only deleted with `force`, and its
/// links stay; a deleted bundled connector is not registered again at the
/// next start, and uploading it brings it back.
async fn delete_refused_while_linked_then_forced(backend: Backend) {
    let remote = RecorderRemote::start().await;
    // The database outlives the first app: the second starts on it.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut first = setup(backend);
    if backend == Backend::Sqlite {
        first.database_url = Some(format!(
            "sqlite://{}",
            dir.path().join("ferry.db").display()
        ));
    }
    let app = spawn_sync_app(first).await;
    install_recorder(&app, &remote).await;
    let id = linked_customer(&app, "Linked").await;

    deleted_only_with_force(&app).await;
    let (status, _) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(status, 404);
    assert_eq!(
        recorder_webhook(&app.client, &app.base, &uuid()).await.0,
        404
    );
    let kept = app.sync_status(&id).await;
    assert!(
        kept["connectors"].as_array().is_some_and(|l| l
            .iter()
            .any(|l| l["connector"] == "recorder" && l["remote_id"].is_string())),
        "the link is kept for audit: {kept}"
    );

    // Stripe, bundled and unlinked, goes at once and stays gone.
    let (status, _) = app
        .send(reqwest::Method::DELETE, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(status, 204);
    let mut again = setup(backend);
    again.database_url = Some(app.database_url.clone());
    drop(app);
    let app = spawn_sync_app(again).await;
    let (status, _) = get(&app, "/api/v1/connectors/stripe").await;
    assert_eq!(
        status, 404,
        "a deleted bundled connector is not seeded again"
    );
    // Uploaded again without activating it, it is not made active by the
    // next start's bundle (the deleted row still said `bundle` chose its
    // version: the deleted bundled Stripe came back on).
    let stripe = std::fs::read(stripe_component()).expect("stripe.wasm");
    let (status, version) = upload(&app, stripe, "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    let mut third = setup(backend);
    third.database_url = Some(app.database_url.clone());
    drop(app);
    let app = spawn_sync_app(third).await;
    let (status, connector) = get(&app, "/api/v1/connectors/stripe").await;
    assert_eq!(status, 200);
    assert_eq!(connector["active_version"], Value::Null, "{connector}");
    let (status, activated) = post(
        &app,
        "/api/v1/connectors/stripe/activate",
        Some(json!({ "version": version["version"] })),
    )
    .await;
    assert_eq!(status, 200, "{activated}");
    let (_, connector) = get(&app, "/api/v1/connectors/stripe").await;
    assert_eq!(connector["source"], "upload", "{connector}");
}

/// A version that does not sync `customer` is not made active, by an upload
/// or an activation, while customers are linked through the connector: its
/// pending pushes would be settled as skipped. Stored without activating it
/// is fine; once the connector is deleted (links kept), it can be uploaded
/// and made active.
async fn a_version_without_customers_is_refused_while_linked(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let id = linked_customer(&app, "Linked").await;

    let (status, problem) = upload(&app, recorder_variant("no-customer"), "").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "customers_linked");
    assert!(
        problem["detail"].as_str().unwrap().contains("1 customers"),
        "{problem}"
    );
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "{connector}");

    let (status, version) = upload(&app, recorder_variant("no-customer"), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    assert_eq!(version["active"], false);
    let (status, problem) = activate(&app, "0.4.0").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(problem["code"], "customers_linked");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "{connector}");

    // The version that stayed still pushes.
    let (status, _) = app
        .send(
            reqwest::Method::PATCH,
            &format!("/api/v1/customers/{id}"),
            Some(json!({"name": "Still synced"})),
        )
        .await;
    assert_eq!(status, 200);
    app.wait_link_of("recorder", &id, Duration::from_secs(10), |l| {
        l["state"] == "synced" && l["synced_version"] == 2
    })
    .await;

    let (status, _) = app
        .send(
            reqwest::Method::DELETE,
            "/api/v1/connectors/recorder?force=true",
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, version) = upload(&app, recorder_variant("no-customer"), "").await;
    assert_eq!(status, 201, "{version}");
    assert_eq!(version["active"], true, "{version}");
}

/// A new version goes live while 16 clients post webhooks as fast as they
/// can: every delivery is answered 2xx, by one version or the other, and
/// every event is stored.
async fn swap_under_webhook_load(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = Arc::new(spawn_sync_app(setup(backend)).await);
    install_recorder(&app, &remote).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<(u16, String)>::new()));
    let by_version = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let run = uuid();
    let mut clients = Vec::new();
    for client in 0..16 {
        let (app, stop, sent, failures, by_version, run) = (
            app.clone(),
            stop.clone(),
            sent.clone(),
            failures.clone(),
            by_version.clone(),
            run.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (status, body) =
                    recorder_webhook(&app.client, &app.base, &format!("{run}-{client}-{n}")).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if (200..300).contains(&status) {
                    *by_version.lock().unwrap().entry(body).or_default() += 1;
                } else {
                    failures.lock().unwrap().push((status, body));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = upload(&app, recorder_variant("version-2"), "").await;
    assert_eq!(status, 201);
    for version in ["0.1.0", "0.2.0", "0.1.0", "0.2.0"] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = activate(&app, version).await;
        assert_eq!(status, 200, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    let failures = failures.lock().unwrap().clone();
    let by_version = by_version.lock().unwrap().clone();
    let sent = sent.load(Ordering::Relaxed);
    eprintln!("{sent} deliveries during the swaps: {by_version:?}");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        by_version.contains_key("recorder 0.1.0") && by_version.contains_key("recorder 0.2.0"),
        "both versions served: {by_version:?}"
    );
    let stored = app
        .store
        .inbox_count("recorder")
        .await
        .expect("count the inbox");
    assert_eq!(stored, sent, "every acknowledged event is stored");
}

/// Two `ferry serve` processes on one PostgreSQL, started outside the
/// repository with no FERRY_CONNECTORS_DIR (they find the bundled
/// connectors beside the executable). An upload, an activation and a
/// disable made through one are in force on the other within seconds (and
/// the other configures an upload at once); no
/// secret value appears in any answer or log line along the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_replica_reaches_the_other() {
    const SECRET: &str = "rk_live_must_never_be_seen_4242";
    let database_url = PgCluster::shared()
        .create_database()
        .await
        .expect("test database");
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("compiled");
    let env = BTreeMap::from([
        ("FERRY_DATABASE_URL".to_owned(), database_url),
        ("FERRY_ALLOW_PRIVATE_HOSTS".to_owned(), "true".to_owned()),
        ("FERRY_ADMIN_TOKEN".to_owned(), TOKEN.to_owned()),
        (
            "FERRY_MASTER_KEY".to_owned(),
            "test-master-key-0123456789abcdef".to_owned(),
        ),
        (
            "FERRY_COMPILE_CACHE_DIR".to_owned(),
            cache.display().to_string(),
        ),
    ]);
    let a = FerryProcess::start(env.clone(), dir.path()).await;
    let b = FerryProcess::start(env, dir.path()).await;
    let client = reqwest::Client::new();
    let mut seen = Vec::<String>::new();
    let call = |base: &str, method: reqwest::Method, path: &str| {
        client
            .request(method, format!("{base}{path}"))
            .bearer_auth(TOKEN)
    };

    // Both found the bundled connectors without being told where.
    let listed: Value = call(&b.base, reqwest::Method::GET, "/api/v1/connectors")
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let bundled: Vec<(&str, &str)> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap(),
                c["source"].as_str().unwrap_or("none"),
            )
        })
        .collect();
    assert_eq!(bundled, [("salesforce", "bundled"), ("stripe", "bundled")]);
    seen.push(listed.to_string());

    let started = Instant::now();
    let response = call(&a.base, reqwest::Method::POST, "/api/v1/connectors")
        .header("content-type", "application/wasm")
        .body(recorder())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    seen.push(response.text().await.unwrap());
    // The upload's `Location`, read at once through the other replica (a
    // poll behind, it answered 404).
    let shown = call(&b.base, reqwest::Method::GET, &location)
        .send()
        .await
        .expect("get");
    assert_eq!(shown.status(), 200, "{location}");
    seen.push(shown.text().await.unwrap());
    let answer = |process: &FerryProcess| {
        let client = client.clone();
        let base = process.base.clone();
        async move {
            let response = client
                .put(format!("{base}/api/v1/connectors/recorder/settings"))
                .bearer_auth(TOKEN)
                .json(&json!({
                    "settings": {"send_api_key": "true"},
                    "secrets": {"api_key": SECRET},
                }))
                .send()
                .await
                .expect("settings");
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    // Configured at once through the other replica: it reads the store's
    // connectors first (a poll behind, it answered 404).
    let (status, body) = answer(&b).await;
    assert_eq!(status, 200, "{body}");
    seen.push(body);
    // `wait_served` fails the test past its 10 s.
    wait_served(&client, &b.base, "recorder 0.1.0").await;
    eprintln!("upload on A served by B after {:?}", started.elapsed());

    let started = Instant::now();
    let response = call(&a.base, reqwest::Method::POST, "/api/v1/connectors")
        .header("content-type", "application/wasm")
        .body(recorder_variant("version-2"))
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 201);
    seen.push(response.text().await.unwrap());
    wait_served(&client, &b.base, "recorder 0.2.0").await;
    eprintln!("new version on A served by B after {:?}", started.elapsed());

    let response = call(
        &b.base,
        reqwest::Method::POST,
        "/api/v1/connectors/recorder/activate",
    )
    .json(&json!({"version": "0.1.0"}))
    .send()
    .await
    .expect("activate");
    assert_eq!(response.status(), 200);
    seen.push(response.text().await.unwrap());
    wait_served(&client, &a.base, "recorder 0.1.0").await;

    let response = call(
        &a.base,
        reqwest::Method::POST,
        "/api/v1/connectors/recorder/disable",
    )
    .send()
    .await
    .expect("disable");
    assert_eq!(response.status(), 200);
    seen.push(response.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorder_webhook(&client, &b.base, &uuid()).await.0 != 404 {
        assert!(Instant::now() < deadline, "B never saw the disable");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for path in [
        "/api/v1/connectors",
        "/api/v1/connectors/recorder",
        "/api/v1/connectors/recorder/versions",
    ] {
        for process in [&a, &b] {
            seen.push(
                call(&process.base, reqwest::Method::GET, path)
                    .send()
                    .await
                    .expect("get")
                    .text()
                    .await
                    .unwrap(),
            );
        }
    }
    for (what, text) in seen
        .iter()
        .map(|s| ("an answer", s.clone()))
        .chain([("A's log", a.log_text()), ("B's log", b.log_text())])
    {
        assert!(!text.contains(SECRET), "the secret appears in {what}");
    }
    assert!(
        a.log_text().contains("connector uploaded"),
        "A logs the upload"
    );
}

/// Creates a customer named `name` and waits until its recorder link was
/// looked at and put back to wait (its next attempt in the future): its id
/// and the link.
async fn a_change_put_back_to_wait(app: &SyncApp, name: &str) -> (String, Value) {
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": name}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let link = app
        .wait_link_of("recorder", &id, Duration::from_secs(10), |l| {
            l["next_attempt_at_ms"].as_i64() > Some(chrono::Utc::now().timestamp_millis())
        })
        .await;
    (id, link)
}

/// While the recorder is not loaded here: an event whose payload cannot be
/// trusted (the same remote tick as the last one applied) must be fetched
/// afresh, and waits for the connector without spending an attempt. A
/// second customer's link is given a remote record behind ferry's back.
async fn an_event_to_fetch_waits_for_the_load(app: &SyncApp, database_url: &str) {
    let other = app
        .create(json!({"email": email("to-fetch"), "name": "To Fetch"}))
        .await;
    let other = other["id"].as_str().unwrap();
    app.wait_link_of("recorder", other, SETTLE, |l| l["state"] == "pending")
        .await;
    let sql = format!(
        "UPDATE sync_links SET remote_id = 'rec_to_fetch', remote_seen_at_ms = 5000 \
         WHERE connector = 'recorder' AND customer_id = '{other}' AND $1 IS NOT NULL"
    );
    execute_raw(database_url, &sql, b"").await;
    let event = NewInboxEvent {
        event_id: "evt_to_fetch".into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: "rec_to_fetch".into(),
        occurred_at_ms: 5000,
        record: Some(json!({"email": email("to-fetch"), "name": "Elsewhere"})),
        origin_key: None,
        remote_type: "record.updated".into(),
        policy: None,
    };
    app.store
        .store_inbox_many(&[("recorder", std::slice::from_ref(&event), None)])
        .await
        .expect("stored");
    app.sync.wake();
    let waiting = recorder_event(app, "rec_to_fetch", |e| {
        detail_has(e, "no version of the connector is loaded")
    })
    .await;
    assert_eq!(
        (waiting.state.as_str(), waiting.attempts),
        ("pending", 0),
        "{waiting:?}"
    );
}

/// Polls the recorder's inbox events of `remote_id` until one meets
/// `done`: that event. Fails with what it saw after [`SETTLE`].
async fn recorder_event(
    app: &SyncApp,
    remote_id: &str,
    done: impl Fn(&InboxEvent) -> bool,
) -> InboxEvent {
    let deadline = Instant::now() + SETTLE;
    loop {
        let events = app
            .store
            .inbox_of_remote("recorder", remote_id)
            .await
            .expect("inbox");
        if let Some(event) = events.iter().find(|e| done(e)) {
            return event.clone();
        }
        assert!(Instant::now() < deadline, "never came: {events:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether `event`'s detail says `text`.
fn detail_has(event: &InboxEvent, text: &str) -> bool {
    event.detail.as_deref().is_some_and(|d| d.contains(text))
}

/// A ferry on a database of its own (in `dir`) that stored the recorder
/// (pointed at `remote`), stopped, had `change` run on that database (`$1`
/// bound to `bytes`), and started again: the app, the database's URL, and
/// the recorder's active version before the change.
async fn restarted_after_a_change(
    backend: Backend,
    dir: &std::path::Path,
    remote: &RecorderRemote,
    change: &str,
    bytes: &[u8],
) -> (SyncApp, String, String) {
    let database_url = new_database(backend, dir).await;
    let mut first = setup(backend);
    first.database_url = Some(database_url.clone());
    let app = spawn_sync_app(first).await;
    install_recorder(&app, remote).await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    let version = connector["active_version"]
        .as_str()
        .expect("version")
        .to_owned();
    app.stop().await;
    execute_raw(&database_url, change, bytes).await;
    let mut again = setup(backend);
    again.database_url = Some(database_url.clone());
    (spawn_sync_app(again).await, database_url, version)
}

/// The recorder is enabled, but the replica that starts next cannot load
/// its active version (its stored bytes are damaged). A customer created
/// there is still queued for the recorder, and its push waits; once the
/// bytes are whole again (with no change to the connector that would tell
/// a replica to reload) the replica loads the version by itself and the
/// push goes out.
async fn a_version_that_fails_to_load_keeps_its_changes(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RecorderRemote::start().await;
    let damage = "UPDATE connector_versions SET component = $1 WHERE name = 'recorder'";
    let (app, database_url, _) =
        restarted_after_a_change(backend, dir.path(), &remote, damage, b"not a component").await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert!(
        connector["load_problem"]
            .as_str()
            .is_some_and(|p| p.contains("failed to load")),
        "{connector:#}"
    );
    // The versions list marks the version the store has active (every
    // replica's once loaded), not this replica's (here: none).
    let (_, versions) = get(&app, "/api/v1/connectors/recorder/versions").await;
    let active: Vec<&str> = versions["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["active"] == true)
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert_eq!(active, ["0.1.0"], "{versions:#}");
    // A webhook meanwhile is a passing failure, which its sender retries
    // (a 404 invited it to drop the delivery).
    let (status, problem) = recorder_webhook(&app.client, &app.base, &uuid()).await;
    assert!(
        status == 503 && problem.contains("connector_failed"),
        "{status} {problem}"
    );
    let address = email("unloaded");
    let customer = app
        .create(json!({"email": address, "name": "Unloaded"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    app.wait_link_of("recorder", id, SETTLE, |l| {
        l["state"] == "pending" && l["wanted_version"] == 1
    })
    .await;
    assert!(remote.requests_to("POST", "/records").is_empty());
    an_event_to_fetch_waits_for_the_load(&app, &database_url).await;

    execute_raw(&database_url, damage, &recorder()).await;
    remote
        .wait_for("the create", |log| {
            log.iter()
                .any(|r| r.method == "POST" && r.body["record"]["email"] == address.as_str())
        })
        .await;
    app.wait_link_of("recorder", id, SETTLE, |l| {
        l["state"] == "synced" && l["synced_version"] == 1
    })
    .await;
}

/// A reconciliation taken by a replica that cannot load its connector
/// (damaged bytes here; another master key, operator rules or a compile
/// its memory cannot hold elsewhere) waits for one that can, as pushes
/// do: it gives its place up and is taken again. Before, it failed after
/// 30 s, in a cluster one run in N, and a failed backfill released the
/// creates it held beside the records they were held for.
async fn a_run_waits_for_a_replica_that_loads_its_connector(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RecorderRemote::start().await;
    let damage = "UPDATE connector_versions SET component = $1 WHERE name = 'recorder'";
    let (app, database_url, _) =
        restarted_after_a_change(backend, dir.path(), &remote, damage, b"not a component").await;
    // Started through a replica that has it loaded (its API refuses one
    // here, 409 `connector_not_ready`); this one's reconciler takes it.
    let run = app
        .store
        .start_run("recorder", "reconcile", "report", "api")
        .await
        .unwrap()
        .expect("started");
    let id = run.id;
    // Past the grace a connector not known here yet gets.
    tokio::time::sleep(std::time::Duration::from_secs(32)).await;
    let (_, now) = get(&app, &format!("/api/v1/reconciliations/{id}")).await;
    assert_eq!(now["status"], "running", "{now:#}");
    execute_raw(&database_url, damage, &recorder()).await;
    // A change to the connector: the replica loads it at once (not at its
    // next retry, by then half a minute away).
    let bump = "UPDATE connectors SET revision = revision + 1 WHERE name = 'recorder'";
    execute_raw(&database_url, bump, b"").await;
    assert_eq!(wait_run(&app.base, &id).await["status"], "completed");
}

/// The version the store says is active syncs `customer` and takes
/// webhooks; the one this replica runs (its load of the new one failed:
/// here damaged bytes; or it has not caught up yet) does neither. A
/// customer change queued for the connector waits for a replica that
/// loaded the active version, as when none is loaded here. It was skipped
/// for good ("does not handle entity `customer`"), its link marked synced
/// with nothing pushed. A webhook is a passing failure (503), which its
/// sender retries: a 404 invited it to drop the delivery.
async fn a_version_loaded_here_without_customer_leaves_its_changes_waiting(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&app, recorder_variant("no-customer"), "").await;
    assert_eq!(status, 201, "{version}");
    configure_recorder(&app, &remote).await;
    let (status, version) = upload(&app, recorder(), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    // Made active where this replica cannot load it.
    execute_raw(
        &app.database_url,
        "UPDATE connector_versions SET component = $1 WHERE name = 'recorder' AND version = '0.1.0'",
        b"not a component",
    )
    .await;
    execute_raw(
        &app.database_url,
        "UPDATE connectors SET active_version = '0.1.0', revision = revision + 1 \
         WHERE name = 'recorder'",
        b"",
    )
    .await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
        if connector["load_problem"].is_string() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{connector:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, problem) = recorder_webhook(&app.client, &app.base, &uuid()).await;
    assert!(
        status == 503 && problem.contains("connector_failed"),
        "{status} {problem}"
    );
    let created_ms = chrono::Utc::now().timestamp_millis();
    let customer = app
        .create(json!({"email": email("loaded-without"), "name": "Waits"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    // Looked at and deferred: due again seconds later, not settled.
    let link = app
        .wait_link_of("recorder", id, SETTLE, |l| {
            (l.is_object() && l["state"] != "pending")
                || l["next_attempt_at_ms"]
                    .as_i64()
                    .is_some_and(|at| at > created_ms + 3_000)
        })
        .await;
    assert_eq!(link["state"], "pending", "{link}");
    assert_eq!(link["attempts"], 0, "{link}");

    execute_raw(
        &app.database_url,
        "UPDATE connector_versions SET component = $1 WHERE name = 'recorder' AND version = '0.1.0'",
        &recorder(),
    )
    .await;
    app.wait_link_of("recorder", id, SETTLE, |l| {
        l["state"] == "synced" && l["remote_id"].is_string()
    })
    .await;
    assert_eq!(remote.requests_to("POST", "/records").len(), 1);
}

/// A component whose manifest, read again at a later load, is not the one
/// stored with it (what the upload showed the operator: here its hosts)
/// is not loaded, at a start or by an activation: it would reach hosts
/// nobody was shown.
async fn a_manifest_unlike_the_stored_one_is_not_loaded(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let remote = RecorderRemote::start().await;
    let other_hosts = match backend {
        Backend::Sqlite => {
            "UPDATE connector_versions SET manifest = json_set(manifest, '$.hosts', \
             json('[\"stored.example\"]')) WHERE name = 'recorder'"
        }
        Backend::Postgres => {
            "UPDATE connector_versions SET manifest = jsonb_set(manifest, '{hosts}', \
             '[\"stored.example\"]'::jsonb) WHERE name = 'recorder'"
        }
    };
    let (app, _, version) =
        restarted_after_a_change(backend, dir.path(), &remote, other_hosts, b"").await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert!(
        connector["load_problem"]
            .as_str()
            .is_some_and(|p| p.contains("not the one stored with it (hosts differ)")),
        "{connector:#}"
    );
    let (status, problem) = activate(&app, &version).await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (422, Some("invalid_manifest")),
        "{problem:#}"
    );
}

/// Another replica queued a push for the recorder before this one saw it
/// configured (its settings came from that replica's environment, or this
/// replica's view lags an enable). The push waits for the connector to be
/// switched on here, instead of being marked done without going out.
async fn a_push_queued_before_the_enable_waits_for_it(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    let address = email("early");
    let customer = app.create(json!({"email": address, "name": "Early"})).await;
    let id = customer["id"].as_str().unwrap().to_owned();
    // The other replica's intake: a link for the recorder at version 1.
    let notice = ChangeNotice {
        customer_id: id.clone(),
        version: 1,
        correlation_id: None,
        outbox_id: None,
        source_connector: None,
    };
    app.store
        .intake_changes(&[notice], &["recorder".to_owned()])
        .await
        .expect("intake");
    app.sync.wake();
    // Claimed and looked at: put back to wait, or (before) marked done.
    let later = chrono::Utc::now().timestamp_millis() + 10_000;
    let link = app
        .wait_link_of("recorder", &id, SETTLE, |l| {
            l["state"] != "pending" || l["next_attempt_at_ms"].as_i64() > Some(later)
        })
        .await;
    assert_eq!(
        (link["state"].as_str(), link["attempts"].as_i64()),
        (Some("pending"), Some(0)),
        "{link:#}"
    );

    configure_recorder(&app, &remote).await;
    remote
        .wait_for("the create", |log| {
            log.iter()
                .any(|r| r.method == "POST" && r.body["record"]["email"] == address.as_str())
        })
        .await;
    app.wait_link_of("recorder", &id, SETTLE, |l| {
        l["state"] == "synced" && l["synced_version"] == 1
    })
    .await;
}

/// A connector that parses an event without an id: ferry cannot tell one
/// such event from the next, so it refuses the delivery (503, the sender
/// retries) instead of storing the first and acknowledging every later
/// one as a duplicate.
async fn an_event_without_an_id_is_refused(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let (status, body) = recorder_webhook(&client, &app.base, "").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("connector_failed"), "{body}");
    }
    let (status, body) = recorder_webhook(&client, &app.base, "evt_with_an_id").await;
    assert_eq!((status, body.as_str()), (200, "recorder 0.1.0"));
    let stored = app.store.inbox_of_remote("recorder", "rec_").await.unwrap();
    assert!(stored.is_empty(), "{stored:?}");
}

/// An event that must be fetched, of a connector deleted since it was
/// stored, is skipped with the reason: no version will ever fetch it. It
/// used to wait for a load that never came, looked at every 5 s for ever.
/// While the connectors cannot be read, nothing says it was deleted: the
/// event waits (it was skipped on any failed read).
async fn an_event_of_a_deleted_connector_to_fetch_is_skipped(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, _) = app
        .send(
            reqwest::Method::DELETE,
            "/api/v1/connectors/recorder?force=true",
            None,
        )
        .await;
    assert_eq!(status, 204);
    let away = "ALTER TABLE connectors RENAME TO connectors_away";
    execute_raw(&app.database_url, away, b"").await;
    let event = store_thin_event(&app, "evt_orphan", "rec_orphan").await;
    let waiting = recorder_event(&app, "rec_orphan", |e| {
        e.state.as_str() != "pending" || detail_has(e, "could not be read")
    })
    .await;
    assert_eq!(
        (waiting.state.as_str(), waiting.attempts),
        ("pending", 0),
        "{waiting:?}"
    );
    let back = "ALTER TABLE connectors_away RENAME TO connectors";
    execute_raw(&app.database_url, back, b"").await;
    app.sync.wake();
    let skipped = recorder_event(&app, "rec_orphan", |e| e.state.as_str() != "pending").await;
    assert_eq!(skipped.state.as_str(), "skipped", "{skipped:?}");
    assert!(detail_has(&skipped, "deleted"), "{skipped:?}");

    // One that carries its record is applied; without an email it is a
    // dead letter, and the health summary still lists the connector for
    // it (it listed registered connectors, links and the inbox backlog).
    let no_email = NewInboxEvent {
        event_id: "evt_no_email".into(),
        remote_id: "rec_no_email".into(),
        record: Some(json!({"id": "rec_no_email", "name": "No Email"})),
        ..event
    };
    app.store
        .store_inbox_many(&[("recorder", std::slice::from_ref(&no_email), None)])
        .await
        .expect("stored");
    app.sync.wake();
    let deadline = Instant::now() + SETTLE;
    loop {
        let (_, health) = get(&app, "/api/v1/health").await;
        let listed = health["connectors"]
            .as_array()
            .and_then(|all| all.iter().find(|c| c["connector"] == "recorder"))
            .cloned();
        if let Some(recorder) = listed.filter(|c| c["dead_letters"] == 1) {
            assert_eq!(recorder["connector"], "recorder");
            return;
        }
        assert!(Instant::now() < deadline, "not listed: {health:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settings written as the connector is deleted (a replica whose view had
/// not caught up) are refused, not stored: the next upload of the name
/// starts unconfigured, as after any delete, not enabled with the old
/// settings and secrets.
async fn settings_put_as_the_connector_is_deleted_are_not_kept(backend: Backend) {
    use ferry::store::connector_configs::StoredConnectorConfig;
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    assert!(app.store.delete_connector("recorder", None).await.unwrap());
    let late = StoredConnectorConfig {
        connector: "recorder".into(),
        settings: [("api_base".to_owned(), remote.url.clone())].into(),
        sealed_secrets: None,
        secret_names: Vec::new(),
        updated_at: chrono::Utc::now(),
    };
    let put = app
        .store
        .put_connector_config(&late, Some(true), None)
        .await
        .unwrap();
    assert!(put.is_none(), "{put:?}");
    let configs = app.store.connector_configs().await.unwrap();
    assert!(
        configs.iter().all(|c| c.connector != "recorder"),
        "{configs:?}"
    );
    let (status, version) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_ne!(connector["state"], "enabled", "{connector}");
}

/// A delivery whose connector gives one id to two different events would
/// lose the second (the store takes it for a redelivery) while the sender
/// hears 200: refused as the connector's fault (503), so the sender keeps
/// it. The same event twice in one delivery is stored once.
async fn one_id_for_two_events_of_a_delivery_is_refused(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let id = uuid();
    let event = |remote_id: &str| {
        json!({"id": id, "remote_id": remote_id,
            "record": {"email": format!("{remote_id}@example.com"), "name": remote_id}})
    };
    let post = |body: Value| {
        app.client
            .post(format!("{}/webhooks/recorder", app.base))
            .json(&body)
            .send()
    };
    let (first, second) = (format!("{id}_a"), format!("{id}_b"));
    let response = post(json!([event(&first), event(&second)])).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.text().await.unwrap().contains("connector_failed"));
    for remote_id in [&first, &second] {
        let stored = app
            .store
            .inbox_of_remote("recorder", remote_id)
            .await
            .unwrap();
        assert!(stored.is_empty(), "{stored:?}");
    }
    // A record that is not JSON is the connector's bug too: 503, so the
    // sender keeps the event (a 4xx makes many senders drop it). So is one
    // that is no object (`null` read as every field cleared remotely).
    for raw in ["{not json", "null", "[]"] {
        let broken = json!({"id": uuid(), "remote_id": first, "raw_record": raw});
        let response = post(broken).await.unwrap();
        assert_eq!(response.status(), 503, "{raw}");
        assert!(response.text().await.unwrap().contains("connector_failed"));
    }
    let response = post(json!([event(&first), event(&first)])).await.unwrap();
    assert_eq!(response.status(), 200);
    let stored = app.store.inbox_of_remote("recorder", &first).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
}

/// A remote record's delete that another inbox loop takes while the
/// record's create is being written (past the create's own look for a
/// delete) waits for the create: skipped as "never linked", the delete was
/// lost and the record lived on as a customer. PostgreSQL runs two inbox
/// loops; an uncommitted customer with the same email holds the create's
/// insert on the unique index while the delete is taken.
///
/// `delete_numbered_first`: the delete took its place in the inbox before
/// the create did, and committed after the create was taken (two replicas'
/// inbox writers, one slower): it waited only for events numbered before
/// it, found none and no link, and was skipped as "never linked" while the
/// create, which had looked for a delete before it committed, made the
/// record a customer for good.
async fn a_delete_taken_while_its_create_is_written_is_applied(
    backend: Backend,
    delete_numbered_first: bool,
) {
    use ferry::store::inbox::InboxState;
    use sqlx::Connection as _;
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let id = uuid();
    let (remote_id, email) = (format!("rec_{id}"), format!("{id}@example.com"));
    // The delete's insert, numbered now and committed later.
    let mut early_delete = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("postgres");
    if delete_numbered_first {
        sqlx::query("BEGIN")
            .execute(&mut early_delete)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO inbox (connector, event_id, entity, kind, remote_id, occurred_at_ms, \
             remote_type, state, next_attempt_at_ms, received_at) \
             VALUES ('recorder', $1, 'customer', 'delete', $2, $3, 'record.deleted', 'pending', \
             0, now())",
        )
        .bind(format!("{id}_deleted"))
        .bind(&remote_id)
        .bind(chrono::Utc::now().timestamp_millis() + 1_000)
        .execute(&mut early_delete)
        .await
        .unwrap();
    }
    let mut blocker = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("postgres");
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query(
        "INSERT INTO customers (id, email, version, created_at, updated_at) \
         VALUES ($1, $2, 1, now(), now())",
    )
    .bind(format!("cus_blocker_{id}"))
    .bind(&email)
    .execute(&mut blocker)
    .await
    .unwrap();
    let created = app
        .client
        .post(format!("{}/webhooks/recorder", app.base))
        .json(
            &json!({"id": format!("{id}_created"), "remote_id": remote_id,
            "record": {"email": email, "name": "Short-lived"}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app
        .store
        .inbox_of_remote("recorder", &remote_id)
        .await
        .unwrap()
        .iter()
        .any(|e| e.lease_token.is_some())
    {
        assert!(Instant::now() < deadline, "the create was never taken");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The create's write reaches the index and waits there; the delete is
    // taken by the other loop meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if delete_numbered_first {
        sqlx::query("COMMIT")
            .execute(&mut early_delete)
            .await
            .unwrap();
    } else {
        store_delete(&app, &id, &remote_id).await;
    }
    app.sync.wake();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let events = app
            .store
            .inbox_of_remote("recorder", &remote_id)
            .await
            .unwrap();
        if events.len() == 2
            && events
                .iter()
                .all(|e| !matches!(e.state, InboxState::Pending | InboxState::Retry))
        {
            break events;
        }
        assert!(Instant::now() < deadline, "never settled: {events:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deleted = events
        .iter()
        .find(|e| e.kind == RemoteChange::Delete)
        .unwrap();
    assert_eq!(deleted.state, InboxState::Applied, "{events:?}");
    assert_eq!(app.customer_by_email(&email).await, None, "{events:?}");
}

/// Stores the delete of `remote_id` (a recorder record) in the inbox.
async fn store_delete(app: &SyncApp, id: &str, remote_id: &str) {
    let delete = NewInboxEvent {
        event_id: format!("{id}_deleted"),
        entity: "customer".into(),
        kind: RemoteChange::Delete,
        remote_id: remote_id.to_owned(),
        occurred_at_ms: chrono::Utc::now().timestamp_millis(),
        record: None,
        origin_key: None,
        remote_type: "record.deleted".into(),
        policy: None,
    };
    app.store
        .store_inbox_many(&[("recorder", std::slice::from_ref(&delete), None)])
        .await
        .expect("stored");
}

/// Waits until `base` answers recorder webhooks with `expected` (fails
/// the test past 10 s).
async fn wait_served(client: &reqwest::Client, base: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = recorder_webhook(client, base, &uuid()).await;
        if status == 200 && body == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base} never served {expected}: last {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn uuid() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}{}",
        uuid::Uuid::new_v4().simple(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A connector that leaves the record out of its push result (the recorder
/// does; the contract allows it) still leaves the link a base for the next
/// merge: what was pushed. Without one, the next remote event would take
/// every field that differs, a local edit not yet pushed included.
async fn a_push_without_a_returned_record_keeps_a_base(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Based", "phone": "+15550000001"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    app.wait_link_of("recorder", &id, Duration::from_secs(10), |l| {
        l["state"] == "synced"
    })
    .await;
    let links = app.store.links_of(&id).await.expect("links");
    let link = links
        .iter()
        .find(|l| l.connector == "recorder")
        .expect("recorder link");
    let base = link.snapshot.as_ref().expect("a base for the next merge");
    assert_eq!(base["name"], "Based", "{base}");
    assert_eq!(base["phone"], "+15550000001", "{base}");
}

/// Two uploads of the same bytes at once (a client's retry that reached
/// another replica): the one whose insert comes second finds the first's
/// row and is answered 200 with it. Before, its unique violation was
/// answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_same_upload_twice_at_once() {
    use ferry_test_support::pg_proxy::PgProxy;
    let cluster = PgCluster::shared();
    let proxy = PgProxy::start(cluster.port()).await.expect("proxy");
    let url = cluster.create_database().await.expect("test database");
    let mut setup = setup(Backend::Postgres);
    // No statement cache: every statement's text goes over the wire, so
    // the proxy sees the upload's insert even on a connection that stored
    // the bundled connectors at start.
    setup.database_url = Some(format!("{}&statement-cache-capacity=0", proxy.url(&url)));
    let app = Arc::new(spawn_sync_app(setup).await);
    // The first upload's insert waits on its way to the server...
    let hold = proxy.hold_next("INSERT INTO connector_versions");
    let first = {
        let app = Arc::clone(&app);
        tokio::spawn(async move { upload(&app, recorder(), "").await })
    };
    hold.reached().await;
    // ...while the second one is stored.
    let (status, second) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{second}");
    hold.release();
    let (status, first) = first.await.expect("task");
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["sha256"], second["sha256"]);
}

/// A folder holding `bytes` as the bundled recorder.
fn recorder_bundle(bytes: Vec<u8>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("bundle dir");
    std::fs::write(dir.path().join("recorder.wasm"), bytes).expect("bundled");
    dir
}

/// A ferry on PostgreSQL whose connectors folder is `bundle`; on `app`'s
/// database, if given.
async fn with_bundle(bundle: &tempfile::TempDir, app: Option<&SyncApp>) -> SyncApp {
    let mut started = setup(Backend::Postgres);
    started.database_url = app.map(|app| app.database_url.clone());
    started.extra = json!({"connectors_dir": bundle.path()});
    spawn_sync_app(started).await
}

/// Every replica has `active` as the recorder's active version, and
/// `stored` among its versions.
async fn assert_active_and_stored(replicas: &[&SyncApp], active: &str, stored: &str) {
    for replica in replicas {
        let (_, connector) = get(replica, "/api/v1/connectors/recorder").await;
        assert_eq!(connector["active_version"], active, "{connector}");
        let (_, versions) = get(replica, "/api/v1/connectors/recorder/versions").await;
        let all: Vec<&str> = versions["data"]
            .as_array()
            .map(|v| v.iter().filter_map(|v| v["version"].as_str()).collect())
            .unwrap_or_default();
        assert!(all.contains(&stored), "{stored} is stored: {versions}");
    }
}

/// A NUL in a setting's value or in the version asked for is refused as
/// the customers API refuses one (422, and 404 for a version no manifest
/// can name), on both backends. Before, PostgreSQL refused the write and
/// the request answered 500.
async fn nul_in_settings_or_a_version_is_refused(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, problem) = put_settings(
        &app,
        json!({"settings": {"api_base": format!("{}\u{0}", remote.url)}}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "settings.api_base",
        "{problem}"
    );
    // Unknown names are listed 20 at most, and counted beyond: 3,000 of
    // them were an answer twice the request, each named twice.
    let many: serde_json::Map<String, Value> = (0..3_000)
        .map(|n| (format!("unknown_{n}_{}", "x".repeat(200)), json!("")))
        .collect();
    let (status, problem) = put_settings(&app, json!({ "settings": many })).await;
    let text = problem.to_string();
    let short: String = text.chars().take(300).collect();
    assert_eq!(status, 422, "{short}");
    let errors = problem["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 21, "{short}");
    assert_eq!(errors[20]["field"], "*", "{short}");
    assert!(text.len() < 16 * 1024, "{} bytes", text.len());
    let (status, problem) = app
        .send(
            reqwest::Method::POST,
            "/api/v1/connectors/recorder/activate",
            Some(json!({"version": "0.1.0\u{0}"})),
        )
        .await;
    assert_eq!(status, 404, "{problem}");
    assert_eq!(problem["code"], "connector_version_not_found", "{problem}");
}

/// A host setting's value the HTTP policy would refuse (a denied host, a
/// value that is no URL) is refused where it is given, 422 naming the
/// setting. Before, it was stored, and every push made with it was refused
/// by the policy and dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_setting_the_policy_refuses_is_refused_when_given() {
    let remote = RecorderRemote::start().await;
    let mut setup = setup(Backend::Sqlite);
    setup.extra = json!({"connector_denied_hosts": "*.evil.example"});
    let app = spawn_sync_app(setup).await;
    install_recorder(&app, &remote).await;
    for (value, says) in [
        ("https://api.evil.example", "deny-list"),
        ("not a url", "absolute http(s) URL"),
    ] {
        let (status, problem) = put_settings(&app, json!({"settings": {"api_base": value}})).await;
        assert_eq!(status, 422, "{value}: {problem}");
        assert_eq!(
            problem["errors"][0]["field"], "settings.api_base",
            "{problem}"
        );
        assert!(
            problem["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{value}: {problem}"
        );
    }
    // The settings in effect are untouched.
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(
        connector["settings"]["api_base"],
        remote.url.as_str(),
        "{connector}"
    );

    // Another stored version's host setting, given ahead of a rollback to
    // it: checked as well. Accepted, the activation that followed left the
    // connector waiting for settings.
    let (status, version) = upload(&app, recorder_variant("version-3"), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    execute_raw(
        &app.database_url,
        "UPDATE connector_versions SET manifest = json_set(manifest, '$.host_settings', \
         json('[\"api_base\", \"account\"]')) WHERE name = 'recorder' AND version = '0.3.0'",
        b"",
    )
    .await;
    let (status, problem) = put_settings(
        &app,
        json!({"settings": {"api_base": remote.url, "account": "https://api.evil.example"}}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "settings.account",
        "{problem}"
    );
}

/// A host setting the egress policy refuses where it is in effect (the
/// operator's deny-list changed since it was given, or it came from the
/// environment or the manifest's default, which no API call checks): the
/// connector waits for settings, naming it, and its pushes wait rather
/// than each be refused by the policy and dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_setting_the_policy_refuses_in_effect_leaves_pushes_waiting() {
    let dir = tempfile::tempdir().expect("dir");
    let database_url = new_database(Backend::Sqlite, dir.path()).await;
    let remote = RecorderRemote::start().await;
    let mut allowed = setup(Backend::Sqlite);
    allowed.database_url = Some(database_url.clone());
    let first = spawn_sync_app(allowed).await;
    install_recorder(&first, &remote).await;
    first.stop().await;

    let mut denied = setup(Backend::Sqlite);
    denied.database_url = Some(database_url);
    denied.extra = json!({"connector_denied_hosts": "127.0.0.1"});
    let app = spawn_sync_app(denied).await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert!(
        connector["problem"]
            .as_str()
            .is_some_and(|p| p.contains("settings.api_base") && p.contains("deny-list")),
        "{connector}"
    );
    let (_, link) = a_change_put_back_to_wait(&app, "Denied").await;
    assert_eq!(
        (&link["state"], &link["attempts"]),
        (&json!("pending"), &json!(0)),
        "{link}"
    );
    let (_, dead) = get(&app, "/api/v1/dead-letters").await;
    assert_eq!(dead["data"], json!([]), "{dead}");
    // Switched off, it is not switched on again (with a backfill that
    // would wait for good) until the setting is one the policy allows.
    for (path, status) in [("disable", 200), ("enable?backfill=true", 422)] {
        let (got, body) = app
            .send(
                reqwest::Method::POST,
                &format!("/api/v1/connectors/recorder/{path}"),
                None,
            )
            .await;
        assert_eq!(got, status, "{path}: {body}");
        if status == 422 {
            assert_eq!(body["errors"][0]["field"], "settings.api_base", "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_nul_in_settings_or_a_version_is_refused() {
    nul_in_settings_or_a_version_is_refused(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_nul_in_settings_or_a_version_is_refused() {
    nul_in_settings_or_a_version_is_refused(Backend::Sqlite).await;
}

/// A replica of an older ferry, started beside a newer one (a rolling
/// deploy), stores its older bundled connector but does not make it active:
/// the bundle only moves its own choice forward. Before, every restart of
/// the older replica took every replica back to its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_older_bundle_does_not_take_a_newer_one_back() {
    let (newer, older) = (
        recorder_bundle(recorder_variant("version-2")),
        recorder_bundle(recorder()),
    );
    let app = with_bundle(&newer, None).await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.2.0", "{connector}");

    let old = with_bundle(&older, Some(&app)).await;
    assert_active_and_stored(&[&app, &old], "0.2.0", "0.1.0").await;
}

/// The bundled version an operator made active is rebuilt under the same
/// number (another toolchain, other bytes), and a replica starts with it:
/// the bytes are replaced, and every replica loads them. Before, only the
/// replicas that restarted did; the others ran the old bytes, showing the
/// old sha256, until some other change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_rebuilt_bundle_reaches_every_replica() {
    let (first, rebuilt) = (
        recorder_bundle(recorder()),
        recorder_bundle(recorder_variant("rebuilt")),
    );
    let app = with_bundle(&first, None).await;
    let (status, connector) = activate(&app, "0.1.0").await;
    assert_eq!(status, 200, "{connector}");
    let before = connector["sha256"].clone();

    let replica = with_bundle(&rebuilt, Some(&app)).await;
    let (_, theirs) = get(&replica, "/api/v1/connectors/recorder").await;
    assert_ne!(theirs["sha256"], before, "{theirs}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, ours) = get(&app, "/api/v1/connectors/recorder").await;
        if ours["sha256"] == theirs["sha256"] {
            break;
        }
        assert!(Instant::now() < deadline, "{ours} still runs the old bytes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bundled version that does not sync customers is stored at start but
/// not made active while customers are linked through the connector, as
/// an upload or an activation is refused (409 `customers_linked`): their
/// pushes would be skipped as settled. Before, the bundle's newer version
/// was made active over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_bundle_without_customers_is_not_made_active_over_links() {
    let (first, next) = (
        recorder_bundle(recorder()),
        recorder_bundle(recorder_variant("no-customer")),
    );
    let remote = RecorderRemote::start().await;
    let app = with_bundle(&first, None).await;
    configure_recorder(&app, &remote).await;
    linked_customer(&app, "Linked").await;

    let replica = with_bundle(&next, Some(&app)).await;
    assert_active_and_stored(&[&app, &replica], "0.1.0", "0.4.0").await;
}

/// A webhook right after ferry's push (inside the echo window, where the
/// payload may be an older state) from a connector without `fetch` is
/// applied as it came: the base tells an echo from an edit. Before, it was
/// retried until dead-lettered, and the edit was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_doubtful_payload_from_a_connector_without_fetch_is_applied() {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(Backend::Sqlite)).await;
    install_recorder(&app, &remote).await;
    let address = format!("{}@example.com", uuid());
    let customer = app
        .create(json!({"email": address, "name": "Pushed"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let link = app
        .wait_link_of("recorder", &id, Duration::from_secs(10), |l| {
            l["state"] == "synced"
        })
        .await;
    let remote_id = link["remote_id"].as_str().expect("remote id").to_owned();
    let response = app
        .client
        .post(format!("{}/webhooks/recorder", app.base))
        .json(&json!({"id": "evt_right_after", "remote_id": remote_id,
            "record": {"id": remote_id, "email": address, "name": "Edited There"}}))
        .send()
        .await
        .expect("delivered");
    assert_eq!(response.status().as_u16(), 200);
    let events = app.wait_inbox_settled("recorder", &remote_id, 1).await;
    assert_eq!(events[0].state.as_str(), "applied", "{events:?}");
    let now = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert_eq!(now.name.as_deref(), Some("Edited There"));
}

/// An event dated to the millisecond a little behind the last applied one
/// is as old as it looks: skipped as stale. Read again as one dated in
/// whole seconds is (the remote's tick), a connector without `fetch`
/// applied its older payload, and the record rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_event_dated_to_the_millisecond_is_stale() {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(Backend::Sqlite)).await;
    install_recorder(&app, &remote).await;
    let address = format!("{}@example.com", uuid());
    let second = chrono::Utc::now().timestamp() * 1_000;
    let event = |id: &str, at: i64, name: &str| NewInboxEvent {
        event_id: id.into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: "rec_ms".into(),
        occurred_at_ms: at,
        record: Some(json!({"id": "rec_ms", "email": address, "name": name})),
        origin_key: None,
        remote_type: "record.updated".into(),
        policy: None,
    };
    for (id, at, name) in [
        ("evt_ms_newer", second + 500, "Newer"),
        ("evt_ms_older", second + 200, "Older"),
    ] {
        app.store
            .store_inbox_many(&[("recorder", &[event(id, at, name)], None)])
            .await
            .expect("stored");
        app.sync.wake();
        let settled = app
            .wait_inbox_settled(
                "recorder",
                "rec_ms",
                if id == "evt_ms_newer" { 1 } else { 2 },
            )
            .await;
        assert!(
            settled.iter().all(|e| e.state.as_str() != "dead"),
            "{settled:?}"
        );
    }
    let events = app.wait_inbox_settled("recorder", "rec_ms", 2).await;
    let older = events
        .iter()
        .find(|e| e.event_id == "evt_ms_older")
        .unwrap();
    assert_eq!(older.state.as_str(), "skipped", "{events:?}");
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "Newer");
}

/// A thin event (an upsert without a record) from a connector that cannot
/// fetch is skipped with the reason, as before thin events were fetched,
/// not retried into a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thin_event_from_a_connector_without_fetch_is_skipped() {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(Backend::Sqlite)).await;
    install_recorder(&app, &remote).await;
    let response = app
        .client
        .post(format!("{}/webhooks/recorder", app.base))
        .json(&json!({"id": "evt_thin", "remote_id": "rec_thin"}))
        .send()
        .await
        .expect("delivered");
    assert_eq!(response.status().as_u16(), 200);
    let events = app.wait_inbox_settled("recorder", "rec_thin", 1).await;
    assert_eq!(events[0].state.as_str(), "skipped", "{events:?}");
    assert!(
        events[0]
            .detail
            .as_deref()
            .is_some_and(|d| d.contains("cannot fetch")),
        "{events:?}"
    );
}

/// A new version that needs a setting the running connector does not
/// have is not made active over it (by an upload or an activation): 409
/// `settings_missing`, naming the setting and the way through, and the
/// running version goes on. Before, it was activated, and the connector
/// stopped until someone gave the setting: its pushes waited, its webhooks
/// were refused. Stored with `activate=false`, its setting given (a write
/// keeps what a newer stored version declares), it is made active.
async fn a_version_that_needs_a_new_setting_does_not_stop_the_connector(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, refused) = upload(&app, recorder_variant("version-3"), "").await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "settings_missing", "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("settings.account") && d.contains("activate=false")),
        "{refused}"
    );
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "{connector}");
    assert!(connector["problem"].is_null(), "{connector}");
    linked_customer(&app, "Still Running").await;

    let (status, stored) = upload(&app, recorder_variant("version-3"), "?activate=false").await;
    assert_eq!(status, 201, "{stored}");
    let (status, refused) = activate(&app, "0.3.0").await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "settings_missing", "{refused}");
    let (status, configured) = put_settings(
        &app,
        json!({"settings": {"api_base": remote.url, "account": "acme"}}),
    )
    .await;
    assert_eq!(status, 200, "{configured}");
    let (status, activated) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{activated}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.3.0", "{connector}");
    assert!(connector["problem"].is_null(), "{connector}");
    linked_customer(&app, "On The New Version").await;
}

/// The same through a replica that does not run the connector because
/// only the other replicas' environments configure it: it cannot read
/// their settings, so what the new version requires and the running one
/// does not declare counts as missing there. Before, this replica took the
/// connector for stopped and activated the version over the running ones.
async fn a_version_needing_a_setting_is_refused_through_a_replica_not_configured(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let database_url = new_database(backend, dir.path()).await;
    let remote = RecorderRemote::start().await;
    let mut configured = setup(backend);
    configured.database_url = Some(database_url.clone());
    configured.extra_connectors.push(remote.connector());
    let configured = spawn_sync_app(configured).await;

    let mut other = setup(backend);
    other.database_url = Some(database_url);
    let mut unconfigured = remote.connector();
    unconfigured.config = json!({});
    other.extra_connectors.push(unconfigured);
    let other = spawn_sync_app(other).await;
    let (status, refused) = upload(&other, recorder_variant("version-3"), "").await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "settings_missing", "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|d| d.contains("settings.account")),
        "{refused}"
    );
    let (_, connector) = get(&configured, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "{connector}");
    // Stored without activating, as the refusal says, it is taken.
    let (status, stored) = upload(&other, recorder_variant("version-3"), "?activate=false").await;
    assert_eq!(status, 201, "{stored}");
    // Paused and resumed through the API (the switch stored: enabled on
    // every replica, this one lacking every setting), an activation
    // through this replica is refused alike.
    for switch in ["disable", "enable"] {
        let (status, body) = post(
            &configured,
            &format!("/api/v1/connectors/recorder/{switch}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{switch}: {body}");
    }
    let (status, refused) = activate(&other, "0.3.0").await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "settings_missing", "{refused}");
    let (_, connector) = get(&configured, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["active_version"], "0.1.0", "{connector}");
}

/// Disabling a connector never switched on (loaded, not configured) leaves
/// it unconfigured, through `disable`, settings sent as off or the
/// configuration's `enabled = false`: it takes no changes. Before, it was
/// paused, counted as switched on for good, and queued a push of every
/// customer for a later enable to make as creates.
async fn disabling_a_connector_never_switched_on_queues_nothing(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let mut off_from_the_start = setup(backend);
    let mut off = remote.connector();
    off.config["enabled"] = json!(false);
    off_from_the_start.extra_connectors.push(off);
    let app = spawn_sync_app(off_from_the_start).await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(
        (
            connector["state"].as_str(),
            connector["takes_changes"].as_bool()
        ),
        (Some("unconfigured"), Some(false)),
        "{connector}"
    );
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Off"}))
        .await;
    let status = app.sync_status(customer["id"].as_str().expect("id")).await;
    assert!(
        status["connectors"]
            .as_array()
            .is_some_and(|links| links.iter().all(|l| l["connector"] != "recorder")),
        "{status}"
    );
    app.stop().await;
    disabled_through_the_api(backend, remote).await;
}

async fn disabled_through_the_api(backend: Backend, remote: RecorderRemote) {
    let mut never_on = setup(backend);
    let mut unconfigured = remote.connector();
    unconfigured.config = json!({});
    never_on.extra_connectors.push(unconfigured);
    let app = spawn_sync_app(never_on).await;
    let (status, disabled) = post(&app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200, "{disabled}");
    let (status, configured) = put_settings(
        &app,
        json!({"settings": {"api_base": remote.url}, "enabled": false}),
    )
    .await;
    assert_eq!(status, 200, "{configured}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(
        (
            connector["state"].as_str(),
            connector["takes_changes"].as_bool(),
            connector["settings"]["api_base"].as_str(),
        ),
        (Some("unconfigured"), Some(false), Some(remote.url.as_str())),
        "{connector}"
    );
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Never On"}))
        .await;
    let id = customer["id"].as_str().expect("id");
    let status = app.sync_status(id).await;
    assert!(
        status["connectors"]
            .as_array()
            .is_some_and(|links| links.iter().all(|l| l["connector"] != "recorder")),
        "{status}"
    );
}

/// Rolled back through `activate`, a version's settings the older one
/// does not declare are another version's: a write keeps them (the
/// console's form names the active version's fields only) and may send
/// them back as GET shows them. Dropped, the version rolled forward to
/// waited for its setting again; refused, GET's own answer was a 422.
async fn a_rollback_keeps_the_newer_versions_settings(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, version) = upload(&app, recorder_variant("version-3"), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    let put = |body: Value| put_settings(&app, body);
    let (status, configured) =
        put(json!({"settings": {"api_base": remote.url, "account": "acme"}})).await;
    assert_eq!(status, 200, "{configured}");
    let (status, forward) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{forward}");
    let (status, rolled_back) = activate(&app, "0.1.0").await;
    assert_eq!(status, 200, "{rolled_back}");
    // The older version's form: its own fields only.
    let (status, saved) = put(json!({"settings": {"api_base": remote.url}})).await;
    assert_eq!(status, 200, "{saved}");
    // What GET shows, sent back.
    let (_, shown) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(shown["settings"]["account"], "acme", "{shown}");
    let (status, again) = put(json!({"settings": shown["settings"].clone()})).await;
    assert_eq!(status, 200, "{again}");
    // A name no version declares is still refused.
    let (status, typo) = put(json!({"settings": {"api_base": remote.url, "acount": "acme"}})).await;
    assert_eq!(status, 422, "{typo}");
    let (status, forward) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{forward}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["settings"]["account"], "acme", "{connector}");
    assert!(connector["problem"].is_null(), "{connector}");
}

/// The console's settings form, drawn for the version active then and
/// saved after another was activated, saves nothing: it lacks the fields
/// only the active one declares, and the save replaces the whole set, so
/// their values (a sealed secret's too) were dropped.
async fn a_settings_form_drawn_for_another_version_saves_nothing(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, version) = upload(&app, recorder_variant("version-3"), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    let (status, configured) = put_settings(
        &app,
        json!({"settings": {"api_base": remote.url, "account": "acme"}}),
    )
    .await;
    assert_eq!(status, 200, "{configured}");
    let (client, cookie) = crate::helpers::console_session(&app.base).await;
    let page = crate::helpers::console_page(
        &client,
        &cookie,
        &format!("{}/console/connectors/recorder", app.base),
    )
    .await;
    assert!(
        page.contains(r#"name="version_was" value="0.1.0""#),
        "{page}"
    );
    let csrf = crate::helpers::csrf_field(&page);
    let (status, forward) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{forward}");
    let saved = client
        .post(format!("{}/console/connectors/recorder/settings", app.base))
        .header("cookie", &cookie)
        .form(&[
            ("csrf", csrf.as_str()),
            ("version_was", "0.1.0"),
            ("setting.api_base", &format!("{}/elsewhere", remote.url)),
            ("setting_was.api_base", remote.url.as_str()),
            ("enabled_was", "true"),
            ("enabled", "true"),
        ])
        .send()
        .await
        .expect("posted");
    assert_eq!(saved.status(), 303);
    let location = saved.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.contains("notice=Another+version+is+active"),
        "{location}"
    );
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["settings"]["account"], "acme", "{connector}");
    assert_eq!(connector["settings"]["api_base"], remote.url, "{connector}");
}

/// The other way: a write while a newer version runs keeps what only an
/// older stored version declares (a setting renamed since), so a rollback
/// to it runs. Dropped, the way back of an emergency answered 200 and left
/// the connector waiting for a setting no form offered.
async fn a_roll_forward_keeps_the_older_versions_settings(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let put = |body: Value| put_settings(&app, body);
    for variant in ["version-3", "version-5"] {
        let (status, version) = upload(&app, recorder_variant(variant), "?activate=false").await;
        assert_eq!(status, 201, "{version}");
    }
    let (status, configured) = put(json!({"settings": {
        "api_base": remote.url, "account": "acme", "account_number": "acme-1"
    }}))
    .await;
    assert_eq!(status, 200, "{configured}");
    let (status, forward) = activate(&app, "0.5.0").await;
    assert_eq!(status, 200, "{forward}");
    // 0.5.0's form: its own fields only.
    let (status, saved) =
        put(json!({"settings": {"api_base": remote.url, "account_number": "acme-2"}})).await;
    assert_eq!(status, 200, "{saved}");
    let (status, back) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{back}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["settings"]["account"], "acme", "{connector}");
    assert!(connector["problem"].is_null(), "{connector}");
    // Rolled forward again, what GET shows (the older version's name
    // among it) can be sent back, and the older version's setting given
    // ahead of the next rollback.
    let (status, _) = activate(&app, "0.5.0").await;
    assert_eq!(status, 200);
    let (_, shown) = get(&app, "/api/v1/connectors/recorder").await;
    let (status, again) = put(json!({"settings": shown["settings"].clone()})).await;
    assert_eq!(status, 200, "{again}");
    let (status, given) = put(json!({"settings": {
        "api_base": remote.url, "account_number": "acme-2", "account": "acme-3"
    }}))
    .await;
    assert_eq!(status, 200, "{given}");
    let (status, back) = activate(&app, "0.3.0").await;
    assert_eq!(status, 200, "{back}");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["settings"]["account"], "acme-3", "{connector}");
    // A name no version declares is still refused.
    let (status, typo) = put(json!({"settings": {"api_base": remote.url, "acount": "x"}})).await;
    assert_eq!(status, 422, "{typo}");
}

/// A secret of the wrong shape (a string where a map belongs, a number
/// for a value) is refused without quoting it: serde's message quoted the
/// value, and the 422 carried the secret back to the caller and into any
/// log of responses.
async fn a_refused_secret_is_not_quoted_back(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    for body in [
        json!({"secrets": "sk_live_quoted_back_0123"}),
        json!({"secrets": {"api_key": 98765432123_u64}}),
        json!({"secrets": {"api_key": ["sk_live_quoted_back_0123"]}}),
    ] {
        let (status, problem) = put_settings(&app, body.clone()).await;
        assert_eq!(status, 422, "{problem}");
        let text = problem.to_string();
        assert!(
            !text.contains("sk_live_quoted_back_0123") && !text.contains("98765432123"),
            "{text}"
        );
        assert!(text.contains("expected"), "{text}");
    }
}

/// A settings write sent with the `ETag` a client read (`If-Match`) lands
/// only over that revision: a client sending back settings it read before
/// another operator's change undid it, silently. Without `If-Match` a
/// write lands as before.
async fn a_settings_write_with_if_match_lands_only_over_what_was_read(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let url = format!("{}/api/v1/connectors/recorder", app.base);
    let authed = |request: reqwest::RequestBuilder| match &app.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let read = authed(app.client.get(&url)).send().await.expect("get");
    let etag = read.headers()["etag"].to_str().unwrap().to_owned();
    let shown: Value = read.json().await.unwrap();
    let put = |etag: Option<&str>, settings: Value| {
        let mut request =
            authed(app.client.put(format!("{url}/settings"))).json(&json!({"settings": settings}));
        if let Some(etag) = etag {
            request = request.header("if-match", etag);
        }
        request.send()
    };
    // Another operator changes a setting (no condition).
    let other = put(
        None,
        json!({"api_base": remote.url, "send_api_key": "true"}),
    )
    .await
    .expect("put");
    assert_eq!(other.status(), 200);
    let now = other.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(now, etag);
    // The first client's write, made against what it read: refused, the
    // current revision named, nothing written.
    let stale = put(Some(&etag), shown["settings"].clone())
        .await
        .expect("put");
    assert_eq!(stale.status(), 412);
    assert_eq!(stale.headers()["etag"].to_str().unwrap(), now);
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["settings"]["send_api_key"], "true", "{connector}");
    // Against the current one: it lands.
    let fresh = put(Some(&now), json!({"api_base": remote.url}))
        .await
        .expect("put");
    assert_eq!(fresh.status(), 200);
    assert_ne!(fresh.headers()["etag"].to_str().unwrap(), now);
}

/// Activation, the switch and deletion sent with the `ETag` a client read
/// (`If-Match`) land only over that revision, as a settings write does: a
/// rollback decided on a page read before another operator's change went
/// ahead over it. The 412 names the current revision; nothing is written.
async fn connector_changes_with_if_match_land_only_over_what_was_read(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, second) = upload(&app, recorder_variant("version-2"), "?activate=false").await;
    assert_eq!(status, 201, "{second}");
    let url = format!("{}/api/v1/connectors/recorder", app.base);
    let send = |request: reqwest::RequestBuilder, etag: &str| {
        let request = request.header("if-match", etag);
        match &app.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
        .send()
    };
    let etag_of =
        |response: &reqwest::Response| response.headers()["etag"].to_str().unwrap().to_owned();
    let read = send(app.client.get(&url), "*").await.expect("get");
    let read = etag_of(&read);
    // Another operator disables it (no condition).
    let (status, _) = post(&app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200);
    let (_, shown) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(shown["state"], "disabled", "{shown}");
    let now = send(app.client.get(&url), "*").await.expect("get");
    let now = etag_of(&now);
    assert_ne!(now, read);
    // Each change made against what was read: refused, the current
    // revision named, nothing written.
    let activate = || {
        app.client
            .post(format!("{url}/activate"))
            .json(&json!({"version": "0.2.0"}))
    };
    for (what, request) in [
        ("activate", activate()),
        ("enable", app.client.post(format!("{url}/enable"))),
        (
            "enable with a backfill",
            app.client.post(format!("{url}/enable?backfill=true")),
        ),
        ("disable", app.client.post(format!("{url}/disable"))),
        ("delete", app.client.delete(&url)),
    ] {
        let stale = send(request, &read).await.expect("sent");
        assert_eq!(stale.status(), 412, "{what}");
        assert_eq!(etag_of(&stale), now, "{what}");
        let problem: Value = stale.json().await.unwrap();
        assert_eq!(problem["code"], "precondition_failed", "{what}: {problem}");
    }
    // The writes themselves land only over the revision named (a change
    // committed between the API's check and the write): none of these
    // touches the connector.
    let stale: i64 = read.trim_matches('"').parse().expect("a revision");
    let store = &app.store;
    assert!(!store
        .activate_connector_version("recorder", "0.2.0", Some(stale))
        .await
        .unwrap());
    assert!(!store
        .set_connector_enabled("recorder", true, Some(stale))
        .await
        .unwrap());
    assert!(!store
        .delete_connector("recorder", Some(stale))
        .await
        .unwrap());
    let (_, shown) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(shown["state"], "disabled", "{shown}");
    assert_eq!(shown["active_version"], "0.1.0", "{shown}");
    let (_, runs) = get(&app, "/api/v1/reconciliations?connector=recorder").await;
    assert_eq!(runs["data"], json!([]), "{runs}");
    // Against the current revision: each lands, and moves it.
    let activated = send(activate(), &now).await.expect("sent");
    assert_eq!(activated.status(), 200);
    let after = etag_of(&activated);
    assert_ne!(after, now);
    let shown: Value = activated.json().await.unwrap();
    assert_eq!(shown["active_version"], "0.2.0", "{shown}");
    let enabled = send(app.client.post(format!("{url}/enable")), &after)
        .await
        .expect("sent");
    assert_eq!(enabled.status(), 200);
    let after = etag_of(&enabled);
    // A flag given twice is refused, whichever value is last: a proxy's
    // rule or a log may read the first.
    let twice = app.client.delete(format!("{url}?force=false&force=true"));
    let twice = send(twice, &after).await.expect("sent");
    assert_eq!(twice.status(), 422);
    // One of a list of tags, as for customers.
    let listed = format!("\"999\", {after}");
    let deleted = send(app.client.delete(&url), &listed).await.expect("sent");
    assert_eq!(deleted.status(), 204);
    let (status, _) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(status, 404);
}

/// The `ETag` of the write that switches a connector on for the first
/// time is current: the switch is recorded (its revision moves once
/// more), and the answer held the revision before that, so a change sent
/// straight back with it was a 412 though nobody else changed anything.
async fn the_etag_of_a_first_switch_is_current(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&app, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    let url = format!("{}/api/v1/connectors/recorder", app.base);
    let authed = |request: reqwest::RequestBuilder| match &app.token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let switched = authed(app.client.put(format!("{url}/settings")))
        .json(&json!({"settings": {"api_base": remote.url}}))
        .send()
        .await
        .expect("put");
    assert_eq!(switched.status(), 200);
    let etag = switched.headers()["etag"].to_str().unwrap().to_owned();
    let disabled = authed(app.client.post(format!("{url}/disable")))
        .header("if-match", &etag)
        .send()
        .await
        .expect("disable");
    assert_eq!(disabled.status(), 200, "{etag}");
}

/// A secret given with white space around it (a pasted value's newline, a
/// CRLF file's `\r`) is used without it: kept, its header was refused on
/// every push (each one dead-lettered), and a webhook secret failed every
/// signature.
async fn a_secret_is_used_without_white_space_around_it(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, configured) = put_settings(
        &app,
        json!({
            "settings": {"api_base": remote.url, "send_api_key": "true"},
            "secrets": {"api_key": "key-1\r\n"},
        }),
    )
    .await;
    assert_eq!(status, 200, "{configured}");
    let customer = app
        .create(json!({"email": email("trimmed-secret"), "name": "Trimmed"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    app.wait_link_of("recorder", id, SETTLE, |l| l["state"] == "synced")
        .await;
    let sent = remote.requests_to("POST", "/records");
    assert_eq!(
        sent.last().and_then(|r| r.authorization.as_deref()),
        Some("Bearer key-1"),
        "{sent:?}"
    );
}

/// A replica that cannot open the stored secrets (another master key, a
/// rotation half done) leaves the connector's pushes waiting, as for a
/// missing setting. Before, it ran the connector without them: the push
/// was refused as permanent ("secret has no value") and dead-lettered.
async fn secrets_a_replica_cannot_open_leave_pushes_waiting(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let first = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&first, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    let (status, connector) = put_settings(
        &first,
        json!({"settings": {"api_base": remote.url, "send_api_key": "true"},
                "secrets": {"api_key": "key-1"}}),
    )
    .await;
    assert_eq!(status, 200, "{connector}");
    let database_url = first.database_url.clone();
    first.stop().await;

    let mut other = setup(backend);
    other.database_url = Some(database_url);
    other.extra = json!({"master_key": "another-master-key-0123456789abcdef"});
    let app = spawn_sync_app(other).await;
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert!(
        connector["problem"]
            .as_str()
            .is_some_and(|p| p.contains("secrets")),
        "{connector}"
    );
    // Readiness and the health summary say so: this replica's probe is
    // where an operator looks for what only it lacks.
    let (_, ready) = get(&app, "/readyz").await;
    let check = ready["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == "connector:recorder"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(check["ok"], false, "{ready}");
    assert!(
        check["detail"]
            .as_str()
            .is_some_and(|d| d.contains("secrets")),
        "{ready}"
    );
    let (_, health) = get(&app, "/api/v1/health").await;
    let recorder_health = health["connectors"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["connector"] == "recorder"))
        .cloned()
        .unwrap_or_default();
    assert!(
        recorder_health["problem"]
            .as_str()
            .is_some_and(|p| p.contains("secrets")),
        "{health}"
    );
    // A delivery is refused as a passing failure, for the sender to retry:
    // a 404 invites it to drop the delivery, or the endpoint, for what is
    // one replica's problem.
    let (status, body) = recorder_webhook(&app.client, &app.base, "sealed").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connector_failed"), "{body}");
    let (_, link) = a_change_put_back_to_wait(&app, "Sealed").await;
    assert_eq!(link["state"], "pending", "{link}");
    assert_eq!(link["attempts"], 0, "{link}");
    assert!(remote.requests_to("POST", "/records").is_empty());

    // An inbound event to fetch (another replica accepted it) waits too,
    // rather than be read without the secrets and dead-lettered.
    store_thin_event(&app, "evt_sealed", "rec_sealed").await;
    let event = recorder_event(&app, "rec_sealed", |e| e.detail.is_some()).await;
    assert_eq!(
        (event.state.as_str(), event.attempts),
        ("pending", 0),
        "{event:?}"
    );
    assert!(
        detail_has(&event, "waiting: the active version needs"),
        "{event:?}"
    );
}

/// Two replicas, and only the first configures the recorder (in its file or
/// environment): a change made on the second while the first is away is
/// queued for the recorder there, waits, and is pushed once the first is
/// back. The second used to take such a change off the queue for no
/// connector at all: lost, with no link, retry or dead letter to show it.
async fn a_connector_configured_on_another_replica_takes_this_ones_changes(backend: Backend) {
    let dir = tempfile::tempdir().expect("dir");
    let database_url = new_database(backend, dir.path()).await;
    let remote = RecorderRemote::start().await;
    let mut first = setup(backend);
    first.database_url = Some(database_url.clone());
    first.extra_connectors.push(remote.connector());
    spawn_sync_app(first).await.stop().await;

    let mut other = setup(backend);
    other.database_url = Some(database_url.clone());
    let mut unconfigured = remote.connector();
    unconfigured.config = json!({});
    other.extra_connectors.push(unconfigured);
    let second = spawn_sync_app(other).await;
    let (_, connector) = get(&second, "/api/v1/connectors/recorder").await;
    assert_eq!(
        (
            connector["state"].as_str(),
            connector["takes_changes"].as_bool()
        ),
        (Some("unconfigured"), Some(true)),
        "{connector}"
    );
    let address = format!("{}@example.com", uuid());
    let customer = second
        .create(json!({"email": address, "name": "Made Elsewhere"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let link = second
        .wait_link_of("recorder", &id, SETTLE, |l| l["state"] == "pending")
        .await;
    assert_eq!(link["attempts"], 0, "{link}");

    let mut again = setup(backend);
    again.database_url = Some(database_url);
    again.extra_connectors.push(remote.connector());
    let _first = spawn_sync_app(again).await;
    remote
        .wait_for("the create", |log| {
            log.iter()
                .any(|r| r.method == "POST" && r.body["record"]["email"] == address.as_str())
        })
        .await;
}

/// Two replicas: one rotates the connector's key, the other saves a setting
/// a moment later, keeping the secrets "as they are" (null, as the console
/// sends every secret already set). The second write was built from its
/// replica's view, which still held the old key: it sealed that key back,
/// and the rotation was undone without a word. It now lands only over the
/// revision its view holds, and is built again over the rotation.
async fn a_settings_write_from_a_stale_view_keeps_a_rotated_key(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let first = spawn_sync_app(setup(backend)).await;
    let (status, version) = upload(&first, recorder(), "").await;
    assert_eq!(status, 201, "{version}");
    let settings = json!({"api_base": remote.url, "send_api_key": "true"});
    let (status, answer) = put_settings(
        &first,
        json!({"settings": settings, "secrets": {"api_key": "key-1"}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut other = setup(backend);
    other.database_url = Some(first.database_url.clone());
    let second = spawn_sync_app(other).await;

    let (status, answer) = put_settings(
        &first,
        json!({"settings": settings, "secrets": {"api_key": "key-2"}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = put_settings(
        &second,
        json!({"settings": settings, "secrets": {"api_key": null}}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Both replicas' views take the last write (each polls every second).
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let customer = first
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Rotated"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    first
        .wait_link_of("recorder", &id, SETTLE, |l| l["state"] == "synced")
        .await;
    let creates = remote.requests_to("POST", "/records");
    let sent: Vec<Option<String>> = creates.iter().map(|r| r.authorization.clone()).collect();
    assert!(
        sent.iter().all(|a| a.as_deref() == Some("Bearer key-2")),
        "{sent:?}"
    );
    // The store holds the rotated key, whichever replica pushed: the
    // stale write (`null`, "keep the value in effect", read from a view
    // from before the rotation) did not put the old one back.
    let stored = first
        .store
        .connector_configs()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.connector == "recorder")
        .expect("stored");
    let master_key = secrecy::SecretString::from("test-master-key-0123456789abcdef".to_owned());
    let opened = ferry::secrets::SecretBox::new(&master_key)
        .open(
            "recorder",
            stored.sealed_secrets.as_deref().expect("sealed"),
        )
        .expect("opened");
    assert_eq!(
        secrecy::ExposeSecret::expose_secret(&opened["api_key"]),
        "key-2"
    );
}

/// Waits until customer `id`'s recorder link is dead with an error that
/// says `why`.
async fn dead_saying(app: &SyncApp, id: &str, why: &str) {
    let link = app
        .wait_link_of("recorder", id, Duration::from_secs(10), |l| {
            l["state"] == "dead"
        })
        .await;
    assert!(
        link["last_error"].as_str().is_some_and(|e| e.contains(why)),
        "{link}"
    );
}

/// A push whose connector answers with a remote id ferry cannot keep (a
/// NUL, which PostgreSQL refuses; over 255 bytes) dead-letters with the reason, once,
/// rather than failing its write and running again at every lease expiry.
/// The remote made the record: the letter's replay, once the connector is
/// fixed, sends the create under its first key (the remote answers with
/// the record it made), not a new one that made a second record.
async fn a_remote_id_ferry_cannot_keep_is_dead_lettered(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    remote.answer_ids_with("rec\u{0}");
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Nul"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    dead_saying(&app, &id, "NUL").await;
    assert_eq!(remote.requests_to("POST", "/records").len(), 1);

    remote.answer_ids_with("rec_fixed_");
    let (status, letters) = app
        .send(
            reqwest::Method::GET,
            "/api/v1/dead-letters?connector=recorder",
            None,
        )
        .await;
    assert_eq!(status, 200, "{letters}");
    let letter = &letters["data"][0];
    assert_eq!(letter["error_kind"], "unusable_answer", "{letters}");
    let (status, replayed) = post(
        &app,
        &format!(
            "/api/v1/dead-letters/{}/replay",
            letter["id"].as_str().expect("id")
        ),
        None,
    )
    .await;
    assert_eq!(status, 200, "{replayed}");
    app.wait_link_of("recorder", &id, SETTLE, |l| l["state"] == "synced")
        .await;
    let keys: Vec<Option<String>> = remote
        .requests_to("POST", "/records")
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], keys[1], "the replay's key");

    // Nor one longer than ferry keys (255 bytes): linked, the record could
    // never be listed by a reconciliation (which reported the link an
    // orphan) nor named by a webhook.
    remote.answer_ids_with(&"r".repeat(300));
    let customer = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Long"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    dead_saying(&app, &id, "longer than 255 bytes").await;
}

/// A create the remote answers with a record another customer is linked to
/// is dead-lettered once, at the version it sent, naming the record and
/// the customer that links it, and not pushed again.
async fn a_remote_record_linked_elsewhere_is_dead_lettered_once(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    remote.answer_every_create_with("rec_shared");
    let first = linked_customer(&app, "First").await;
    let second = app
        .create(json!({"email": format!("{}@example.com", uuid()), "name": "Second"}))
        .await;
    let second = second["id"].as_str().expect("id").to_owned();
    let link = app
        .wait_link_of("recorder", &second, Duration::from_secs(10), |l| {
            l["state"] == "dead"
        })
        .await;
    assert_eq!(link["wanted_version"], 1, "{link}");
    // Time for a push the dead letter failed to stop.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(remote.requests_to("POST", "/records").len(), 2);
    let (_, letters) = get(&app, "/api/v1/dead-letters?connector=recorder").await;
    let theirs: Vec<&Value> = letters["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["customer_id"] == second.as_str())
        .collect();
    assert_eq!(theirs.len(), 1, "{letters}");
    assert_eq!(theirs[0]["error_kind"], "remote_id_taken", "{letters}");
    let error = theirs[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("rec_shared"), "names the record: {error}");
    assert!(error.contains(&first), "names its customer: {error}");

    // The connector deleted (its letters kept for the record): a replay
    // is refused, and the letter stays open. Before, it was closed and
    // its link settled `synced` as skipped, though nothing was delivered.
    let letter = theirs[0]["id"].as_str().unwrap().to_owned();
    force_delete_recorder(&app).await;
    for (path, body) in [
        (
            "/api/v1/dead-letters/replay".to_owned(),
            Some(json!({"connector": "recorder"})),
        ),
        (format!("/api/v1/dead-letters/{letter}/replay"), None),
    ] {
        let (status, problem) = post(&app, &path, body).await;
        assert_eq!(status, 404, "{path}: {problem}");
        assert_eq!(problem["code"], "connector_not_found", "{problem}");
    }
    let (_, kept) = get(&app, &format!("/api/v1/dead-letters/{letter}")).await;
    assert!(kept["replayed_at"].is_null(), "{kept}");
    let link = &app.store.links_of(&second).await.unwrap()[0];
    assert_eq!(link.state, ferry::store::LinkState::Dead, "{link:?}");
}

/// A switched-on connector with no version any replica can run (here:
/// configured in the environment, its first upload not activated) is
/// reported by `/readyz` but leaves the replica ready; before, every
/// replica answered 503 and the API went with it.
async fn a_connector_without_a_version_leaves_the_replica_ready(backend: Backend) {
    let mut setup = setup(backend);
    setup.extra =
        json!({"connectors": {"recorder": {"settings": {"api_base": "http://127.0.0.1:9"}}}});
    let app = spawn_sync_app(setup).await;
    let (status, version) = upload(&app, recorder(), "?activate=false").await;
    assert_eq!(status, 201, "{version}");
    let (status, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["active_version"], Value::Null, "{connector}");
    let (status, ready) = get(&app, "/readyz").await;
    assert_eq!(
        (status, ready["status"].as_str()),
        (200, Some("ready")),
        "{ready:#}"
    );
    let check = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "connector:recorder")
        .cloned()
        .unwrap_or_default();
    assert_eq!(check["ok"], false, "reported: {ready:#}");

    // A delivery to it is refused for the sender to retry, and counted.
    let failed = [("connector", "recorder"), ("result", "failed")];
    let metric = "ferry_webhook_verifications_total";
    let before = crate::operations::scrape(&app.base).await;
    let (status, body) = recorder_webhook(&app.client, &app.base, "no-version").await;
    assert_eq!(status, 503, "{body}");
    let after = crate::operations::scrape(&app.base).await;
    assert!(
        crate::operations::value(&after, metric, &failed)
            > crate::operations::value(&before, metric, &failed),
        "the refused delivery is counted"
    );
}

/// Runs a report of the recorder to its end, which must fail saying `says`.
async fn a_report_run_fails_saying(app: &SyncApp, says: &str) {
    let run = run_to_end(app, json!({"connector": "recorder", "repair": "report"})).await;
    assert_eq!(run["status"], "failed", "{run:#}");
    assert!(
        run["error"].as_str().is_some_and(|e| e.contains(says)),
        "{run:#}"
    );
}

/// A run that would not end by itself (here: a page the remote holds back)
/// is cancelled while it lists: it ends `failed`, saying who cancelled it,
/// its driver stops (the held page's answer changes nothing), and the
/// connector takes a new run at once. It held the connector's one run
/// until it ended. Cancelled again (it ended): 409.
async fn a_run_is_cancelled(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(150, "cancelled", "Cancelled");
    remote.delay_next_later_page(Duration::from_secs(4));
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    // A linked record renamed at the remote, on the first page (its id
    // sorts before the others'): a difference the page stores.
    remote.answer_ids_with("a_");
    let linked = linked_customer(&app, "Drifted").await;
    let link = app
        .wait_link_of("recorder", &linked, SETTLE, |l| l["state"] == "synced")
        .await;
    let remote_id = link["remote_id"].as_str().expect("remote id").to_owned();
    let mut drifted = remote.record(&remote_id).expect("pushed");
    drifted["name"] = json!("Renamed At The Remote");
    remote.insert(&remote_id, drifted);
    let run = start_run(&app, json!({"connector": "recorder", "repair": "report"})).await;
    let id = run["id"].as_str().expect("id").to_owned();
    // Its driver has listed a page and waits for the held one.
    let deadline = Instant::now() + SETTLE;
    loop {
        let (_, now) = get(&app, &format!("/api/v1/reconciliations/{id}")).await;
        if now["progress"]["pages"].as_i64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "never listed a page: {now:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cancel = format!("/api/v1/reconciliations/{id}/cancel");
    let (status, cancelled) = post(&app, &cancel, None).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "failed", "{cancelled}");
    assert!(
        cancelled["error"]
            .as_str()
            .is_some_and(|e| e.contains("cancelled by")),
        "{cancelled}"
    );
    let (status, again) = post(&app, &cancel, None).await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["code"], "reconciliation_not_cancellable", "{again}");
    let next = run_to_end(&app, json!({"connector": "recorder", "repair": "report"})).await;
    assert_eq!(next["status"], "completed", "{next:#}");
    // The held page came back meanwhile: the cancelled run stays as it
    // was cancelled.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, after) = get(&app, &format!("/api/v1/reconciliations/{id}")).await;
    assert_eq!(
        (
            &after["status"],
            &after["error"],
            &after["progress"]["pages"]
        ),
        (
            &cancelled["status"],
            &cancelled["error"],
            &cancelled["progress"]["pages"]
        ),
        "{after:#}"
    );
    assert!(
        cancelled["progress"]["pages"].as_i64() >= Some(1),
        "{cancelled:#}"
    );
    // Its findings are counted: a page counts only those it classifies at
    // once, and the cancelled run read "different: 0" beside the
    // difference it had stored.
    let (_, found) = get(
        &app,
        &format!("/api/v1/reconciliations/{id}/mismatches?kind=different"),
    )
    .await;
    assert_eq!(found["data"].as_array().map(Vec::len), Some(1), "{found:#}");
    assert_eq!(after["counts"]["different"], 1, "{after:#}");
    let (status, unknown) = post(&app, "/api/v1/reconciliations/rec_nope/cancel", None).await;
    assert_eq!(status, 404, "{unknown}");
}

/// An orphan of a connector without `fetch` (the SDK's default): the
/// listing left its record out (an API-side filter), and nothing can say
/// the record is gone, so its `merge` repair deletes nothing and says why.
/// It deleted the customer, and fanned the delete out, on the listing's
/// word alone.
async fn an_orphan_a_connector_cannot_read_is_not_deleted(backend: Backend) {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let id = linked_customer(&app, "Left Out").await;
    let link = app
        .wait_link_of("recorder", &id, SETTLE, |l| l["state"] == "synced")
        .await;
    let remote_id = link["remote_id"].as_str().expect("remote id").to_owned();
    remote.leave_out_of_listings(&remote_id);
    let run = run_to_end(&app, json!({"connector": "recorder", "repair": "merge"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    let repair = recorder_event(&app, &remote_id, |e| {
        e.remote_type == "reconciliation" && e.state.as_str() != "pending"
    })
    .await;
    assert_eq!(repair.state.as_str(), "skipped", "{repair:?}");
    assert!(detail_has(&repair, "cannot read the record"), "{repair:?}");
    let kept = app.store.get_customer_any(&id).await.unwrap().unwrap();
    assert!(kept.deleted_at.is_none(), "{kept:?}");
    assert!(remote.record(&remote_id).is_some());
}

/// A listing whose connector answers a page with the cursor that asked
/// for it would list that page for ever (the run's page count growing,
/// the connector's one run slot taken): the run fails and says why.
async fn a_listing_that_repeats_its_cursor_fails(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(150, "looped", "Looped");
    remote.repeat_later_cursors();
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    a_report_run_fails_saying(&app, "never end").await;
}

/// A backfill whose listing fails (here: the connector repeats a cursor;
/// as well a key that may not list, an outage longer than its retries)
/// leaves the connector offering a backfill again (what both sides held
/// before it was switched on is still not in sync; the offer was gone).
/// A backfill that would link nothing (`report`) is refused: it released
/// the creates it held beside the records they were held for.
async fn a_failed_backfill_is_offered_again(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(150, "held", "Held");
    remote.repeat_later_cursors();
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let (status, refused) = post(
        &app,
        "/api/v1/reconciliations",
        Some(json!({"connector": "recorder", "mode": "backfill", "repair": "report"})),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    let (status, switched) = post(&app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200, "{switched}");
    let (status, connector) = post(
        &app,
        "/api/v1/connectors/recorder/enable?backfill=true",
        None,
    )
    .await;
    assert_eq!(status, 200, "{connector}");
    let run = connector["last_reconciliation"]["id"].as_str().unwrap();
    assert_eq!(wait_run(&app.base, run).await["status"], "failed");
    let (_, connector) = get(&app, "/api/v1/connectors/recorder").await;
    assert_eq!(connector["backfill_offered"], true, "{connector}");
}

/// A listing whose cursors go round over several pages (the last page
/// names the second's cursor): each page's own cursor differs from the one
/// that asked for it, so only a repeat was caught, and the run listed for
/// ever (its pages and records growing, findings inserted again each
/// round, the connector's one run slot taken). A page all of whose
/// records the run has listed already ends it as failed.
async fn a_listing_that_goes_round_fails(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(250, "round", "Round");
    remote.loop_at_the_end();
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    a_report_run_fails_saying(&app, "went round").await;
}

/// A record an offset listing lists on two pages (here: every page after
/// the first starts with the last record of the one before) is compared
/// once: it was counted, found and repaired twice.
async fn a_record_listed_twice_is_compared_once(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(150, "twice", "Twice");
    remote.repeat_the_cursors_record();
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let run = run_to_end(&app, json!({"connector": "recorder", "repair": "report"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["progress"]["records"], 150, "{run:#}");
    assert_eq!(run["counts"]["missing_local"], 150, "{run:#}");
}

/// A listing whose connector answers "more" past its last record, with a
/// fresh cursor and nothing in each page, passed both checks above: the
/// run listed empty pages for ever. A thousand in a row end it as failed.
async fn a_listing_of_endless_empty_pages_fails(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(3, "endless", "Endless");
    remote.endless_empty_pages();
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    a_report_run_fails_saying(&app, "1000 empty pages in a row").await;
}

/// A record listed unlinked, then linked before the run classifies it
/// (here ferry's own create, answered with that record's id; as well a
/// webhook or another run's import): in sync, not reported as a duplicate
/// of itself ("linked to remote record" its own id).
async fn a_record_linked_during_the_listing_is_no_duplicate(backend: Backend) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(150, "linked", "Linked");
    remote.delay_next_later_page(Duration::from_secs(5));
    remote.answer_every_create_with("rec_005");
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let run = start_run(&app, json!({"connector": "recorder", "repair": "report"})).await;
    let id = run["id"].as_str().expect("a run id").to_owned();
    remote
        .wait_for("the second page asked for", |log| {
            log.iter().any(|r| {
                r.method == "GET" && r.query.as_deref().is_some_and(|q| q.contains("after="))
            })
        })
        .await;
    let customer = app
        .create(json!({"email": "linked-5@example.com", "name": "Linked 5"}))
        .await;
    let linked = |l: &Value| l["remote_id"] == "rec_005";
    let customer_id = customer["id"].as_str().unwrap();
    app.wait_link_of("recorder", customer_id, Duration::from_secs(10), linked)
        .await;
    let run = wait_run(&app.base, &id).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["counts"]["duplicate"], 0, "{run:#}");
    assert_eq!(run["counts"]["missing_local"], 149, "{run:#}");
}

/// A listed record whose id no key can hold, and one whose email is
/// longer than any customer's: on PostgreSQL their page's commit failed
/// ("index row size exceeds btree maximum") and the run retried it for
/// ever. The id is `invalid`, the email none (`missing_local`, as a
/// record without one), and the run completes.
async fn records_too_long_to_key_are_invalid(backend: Backend) {
    let remote = RecorderRemote::start().await;
    // Incompressible (PostgreSQL compresses a long key before it refuses
    // it): a linear congruential walk over the letters.
    let long: String = std::iter::successors(Some(12_345_u64), |x| {
        Some(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1))
    })
    .take(4_000)
    .map(|x| char::from(b'a' + ((x >> 33) % 26) as u8))
    .collect();
    remote.insert(
        &format!("rec_{long}"),
        json!({"email": "long-id@example.com", "name": "Long Id"}),
    );
    remote.insert(
        "rec_long_email",
        json!({"email": format!("{long}@example.com"), "name": "Long Email"}),
    );
    // A NUL: PostgreSQL refuses it in any text, and the check that the
    // listing goes round read it, failing the page every lease for ever.
    remote.insert(
        "rec_nul\u{0}",
        json!({"email": "nul-id@example.com", "name": "Nul Id"}),
    );
    let app = spawn_sync_app(setup(backend)).await;
    install_recorder(&app, &remote).await;
    let run = run_to_end(&app, json!({"connector": "recorder", "repair": "report"})).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["counts"]["invalid"], 2, "{run:#}");
    assert_eq!(run["counts"]["missing_local"], 1, "{run:#}");
}

/// A reconciliation run's listing cursor is its connector version's own: a
/// version made active between two pages lists again from the first page,
/// instead of being handed a cursor it cannot read (the recorder's
/// versions refuse each other's, as a connector whose cursor format
/// changed would) or mixing two versions' listings in one report. So is
/// it the settings' (`settings`: they change between two pages): a cursor
/// of one Salesforce object, or one base URL, read the next page of
/// another.
async fn a_version_activated_mid_listing_lists_again(backend: Backend, settings: bool) {
    let remote = RecorderRemote::start().await;
    remote.insert_numbered(250, "listed", "Listed");
    // Three pages; the second is held long enough for the upload to land
    // first on a busy machine, within a call timeout that outlasts it, so
    // the third is the first the new version lists.
    remote.delay_next_later_page(Duration::from_secs(8));
    let mut setup = setup(backend);
    setup.extra = json!({"connector_call_timeout": "20s", "sync_lease": "30s"});
    let app = spawn_sync_app(setup).await;
    install_recorder(&app, &remote).await;
    let run = start_run(&app, json!({"connector": "recorder", "repair": "report"})).await;
    let id = run["id"].as_str().expect("a run id").to_owned();
    let later_page = |r: &Recorded| {
        r.method == "GET" && r.query.as_deref().is_some_and(|q| q.contains("after="))
    };
    remote
        .wait_for("the second page asked for", |log| {
            log.iter().any(later_page)
        })
        .await;
    if settings {
        let (status, connector) = put_settings(
            &app,
            json!({"settings": {"api_base": remote.url, "send_api_key": "false"}}),
        )
        .await;
        assert_eq!(status, 200, "{connector}");
    } else {
        let (status, version) = upload(&app, recorder_variant("version-2"), "").await;
        assert_eq!(status, 201, "{version}");
        assert_eq!(version["active"], true, "{version}");
    }

    let run = wait_run(&app.base, &id).await;
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(run["counts"]["listing_restarted"], 1, "{run:#}");
    assert_eq!(
        run["counts"]["missing_local"], 250,
        "every record once: {run:#}"
    );
    assert_eq!(
        (
            run["progress"]["pages"].as_i64(),
            run["progress"]["records"].as_i64()
        ),
        (Some(3), Some(250)),
        "the second listing's pages only: {run:#}"
    );
    let (status, findings) = get(
        &app,
        &format!("/api/v1/reconciliations/{id}/mismatches?limit=500"),
    )
    .await;
    assert_eq!(status, 200, "{findings}");
    let mut remote_ids: Vec<&str> = findings["data"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|m| m["remote_id"].as_str().expect("a remote id"))
        .collect();
    remote_ids.sort_unstable();
    remote_ids.dedup();
    assert_eq!(remote_ids.len(), 250, "{findings:#}");
    let from_start = remote
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/records" && !later_page(r))
        .count();
    assert_eq!(from_start, 2, "the listing started again once");
}

mod sqlite {

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settings_form_drawn_for_another_version_saves_nothing() {
        super::a_settings_form_drawn_for_another_version_saves_nothing(Backend::Sqlite).await;
    }
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connector_configured_on_another_replica() {
        a_connector_configured_on_another_replica_takes_this_ones_changes(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_without_customers_while_linked() {
        a_version_without_customers_is_refused_while_linked(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_record_linked_elsewhere() {
        a_remote_record_linked_elsewhere_is_dead_lettered_once(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_put_as_the_connector_is_deleted() {
        settings_put_as_the_connector_is_deleted_are_not_kept(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_of_a_deleted_connector() {
        an_event_of_a_deleted_connector_to_fetch_is_skipped(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_id_for_two_events() {
        one_id_for_two_events_of_a_delivery_is_refused(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connector_without_a_version_leaves_ready() {
        a_connector_without_a_version_leaves_the_replica_ready(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_that_needs_a_new_setting() {
        super::a_version_that_needs_a_new_setting_does_not_stop_the_connector(Backend::Sqlite)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disabling_a_connector_never_switched_on() {
        super::disabling_a_connector_never_switched_on_queues_nothing(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_loaded_here_without_customer() {
        super::a_version_loaded_here_without_customer_leaves_its_changes_waiting(Backend::Sqlite)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_that_goes_round() {
        super::a_listing_that_goes_round_fails(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_of_endless_empty_pages_fails() {
        super::a_listing_of_endless_empty_pages_fails(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_listed_twice_is_compared_once() {
        super::a_record_listed_twice_is_compared_once(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_backfill_is_offered_again() {
        super::a_failed_backfill_is_offered_again(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rollback_keeps_the_newer_versions_settings() {
        super::a_rollback_keeps_the_newer_versions_settings(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settings_write_with_if_match_lands_only_over_what_was_read() {
        super::a_settings_write_with_if_match_lands_only_over_what_was_read(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connector_changes_with_if_match_land_only_over_what_was_read() {
        super::connector_changes_with_if_match_land_only_over_what_was_read(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_etag_of_a_first_switch_is_current() {
        super::the_etag_of_a_first_switch_is_current(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_secret_is_used_without_white_space_around_it() {
        super::a_secret_is_used_without_white_space_around_it(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_secret_is_not_quoted_back() {
        super::a_refused_secret_is_not_quoted_back(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_roll_forward_keeps_the_older_versions_settings() {
        super::a_roll_forward_keeps_the_older_versions_settings(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_id_with_a_nul() {
        a_remote_id_ferry_cannot_keep_is_dead_lettered(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_keeps_a_base() {
        a_push_without_a_returned_record_keeps_a_base(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn event_without_an_id() {
        an_event_without_an_id_is_refused(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_load_keeps_changes() {
        a_version_that_fails_to_load_keeps_its_changes(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_waits_for_a_replica_that_loads_its_connector() {
        super::a_run_waits_for_a_replica_that_loads_its_connector(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_manifest_is_not_loaded() {
        a_manifest_unlike_the_stored_one_is_not_loaded(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_waits_for_enable() {
        a_push_queued_before_the_enable_waits_for_it(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_and_upload_again() {
        super::upload_and_upload_again(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_activated_mid_listing() {
        a_version_activated_mid_listing_lists_again(Backend::Sqlite, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_changed_mid_listing() {
        a_version_activated_mid_listing_lists_again(Backend::Sqlite, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_is_cancelled() {
        super::a_run_is_cancelled(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_orphan_a_connector_cannot_read() {
        an_orphan_a_connector_cannot_read_is_not_deleted(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_listing_that_repeats_its_cursor() {
        a_listing_that_repeats_its_cursor_fails(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_linked_during_the_listing() {
        a_record_linked_during_the_listing_is_no_duplicate(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn invalid_uploads_are_refused() {
        super::invalid_uploads_are_refused(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollback_disable_and_enable() {
        super::rollback_disable_and_enable(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_parked_by_the_switch_goes_at_the_enable() {
        super::a_retry_parked_by_the_switch_goes_at_the_enable(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_refused_while_linked_then_forced() {
        super::delete_refused_while_linked_then_forced(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_refused_while_changes_wait() {
        super::delete_refused_while_changes_wait(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn swap_under_webhook_load() {
        super::swap_under_webhook_load(Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_is_cancelled() {
        super::a_run_is_cancelled(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connector_changes_with_if_match_land_only_over_what_was_read() {
        super::connector_changes_with_if_match_land_only_over_what_was_read(Backend::Postgres)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_etag_of_a_first_switch_is_current() {
        super::the_etag_of_a_first_switch_is_current(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_taken_while_its_create_is_written() {
        a_delete_taken_while_its_create_is_written_is_applied(Backend::Postgres, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_numbered_before_its_create_and_committed_after() {
        a_delete_taken_while_its_create_is_written_is_applied(Backend::Postgres, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connector_configured_on_another_replica() {
        a_connector_configured_on_another_replica_takes_this_ones_changes(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disabling_a_connector_never_switched_on() {
        disabling_a_connector_never_switched_on_queues_nothing(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_listed_twice_is_compared_once() {
        super::a_record_listed_twice_is_compared_once(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_needing_a_setting_through_a_replica_not_configured() {
        a_version_needing_a_setting_is_refused_through_a_replica_not_configured(Backend::Postgres)
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_without_customers_while_linked() {
        a_version_without_customers_is_refused_while_linked(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secrets_a_replica_cannot_open() {
        secrets_a_replica_cannot_open_leave_pushes_waiting(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotated_key_survives_a_stale_write() {
        a_settings_write_from_a_stale_view_keeps_a_rotated_key(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_remote_id_with_a_nul() {
        a_remote_id_ferry_cannot_keep_is_dead_lettered(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_keeps_a_base() {
        a_push_without_a_returned_record_keeps_a_base(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_load_keeps_changes() {
        a_version_that_fails_to_load_keeps_its_changes(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_changed_manifest_is_not_loaded() {
        a_manifest_unlike_the_stored_one_is_not_loaded(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_waits_for_enable() {
        a_push_queued_before_the_enable_waits_for_it(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upload_and_upload_again() {
        super::upload_and_upload_again(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollback_disable_and_enable() {
        super::rollback_disable_and_enable(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_parked_by_the_switch_goes_at_the_enable() {
        super::a_retry_parked_by_the_switch_goes_at_the_enable(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_refused_while_linked_then_forced() {
        super::delete_refused_while_linked_then_forced(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_refused_while_changes_wait() {
        super::delete_refused_while_changes_wait(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn swap_under_webhook_load() {
        super::swap_under_webhook_load(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_activated_mid_listing() {
        a_version_activated_mid_listing_lists_again(Backend::Postgres, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_too_long_to_key() {
        records_too_long_to_key_are_invalid(Backend::Postgres).await;
    }
}

/// An enable answers once the switch is made, not once every waiting push
/// is released: over a long backlog (here: a release held up behind rows
/// another transaction locks) the release held the enable's answer, past
/// `request_timeout` a 408 for a switch made, and the replica's poll,
/// which went on pushing with a version an operator had rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enable_answers_before_its_backlog_is_released() {
    let remote = RecorderRemote::start().await;
    let app = spawn_sync_app(setup(Backend::Postgres)).await;
    install_recorder(&app, &remote).await;
    let (status, disabled) = post(&app, "/api/v1/connectors/recorder/disable", None).await;
    assert_eq!(status, 200, "{disabled}");
    let customer = app
        .create(json!({"email": email("held-back"), "name": "Held Back"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    app.wait_link_of("recorder", &id, SETTLE, |l| {
        l["last_error"].as_str() == Some(ferry::store::links::PAUSED_WAIT)
    })
    .await;

    let pool = sqlx::PgPool::connect(&app.database_url)
        .await
        .expect("postgres");
    let mut holding = pool.begin().await.expect("a transaction");
    sqlx::query("SELECT 1 FROM sync_links WHERE connector = 'recorder' FOR UPDATE")
        .execute(&mut *holding)
        .await
        .expect("the links locked");
    // Within half the store's `lock_timeout` (10 s): awaited, the
    // release held the answer until the lock or the timeout ended (and,
    // refused at the timeout, left the push waiting out its minute).
    let enabled = app
        .client
        .post(format!("{}/api/v1/connectors/recorder/enable", app.base))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("an answer while the release waits");
    assert_eq!(enabled.status(), 200);

    holding.rollback().await.expect("released");
    app.wait_link_of("recorder", &id, SETTLE, |l| l["state"] == "synced")
        .await;
    assert_eq!(remote.requests_to("POST", "/records").len(), 1);
}
