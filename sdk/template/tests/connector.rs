//! The connector, built for wasm32-wasip2 and run in ferry's real sandbox
//! by the SDK's test kit: HTTP answered by a script, or replayed from a
//! recorded session, no network. Run with `cargo test`.

use ferry_sdk::testkit::{self, sign, CallError, Http, TestKit};
use ferry_sdk::{ChangeKind, ConnectorError, Operation, PushRequest, RateLimit};
use serde_json::json;

const API: &str = "https://api.example-crm.com/v1/contacts";
const WEBHOOK_SECRET: &str = "whsec_test";

async fn kit() -> TestKit {
    // Builds this crate once per test binary, and compiles the component
    // once however many tests load it.
    TestKit::this_crate()
        .await
        .expect("build and load the connector")
        .secret("api_key", "sk_test_kit")
        .secret("webhook_secret", WEBHOOK_SECRET)
}

fn contact(id: &str, name: &str) -> serde_json::Value {
    json!({"id": id, "name": name, "email": "ada@example.com", "phone": null,
        "external_id": "c1", "updated_at": 1_700_000_000})
}

fn create_request() -> PushRequest {
    let record = json!({"id": "c1", "name": "Ada Lovelace", "email": "ada@example.com"});
    testkit::push_request(
        "customer",
        Operation::Create,
        "c1",
        None,
        record.to_string(),
    )
}

fn connector_error<T: std::fmt::Debug>(result: Result<T, CallError>) -> ConnectorError {
    match result {
        Err(CallError::Connector(error)) => error,
        other => panic!("expected an error from the connector, got {other:?}"),
    }
}

/// A setting the manifest does not declare is a typo ferry would refuse:
/// the kit says so rather than sending requests to the default host.
#[tokio::test]
#[should_panic(expected = "declares no setting `no_such_setting`")]
async fn a_setting_the_manifest_does_not_declare_is_refused() {
    let _ = TestKit::this_crate()
        .await
        .expect("the component loads")
        .setting("no_such_setting", "http://127.0.0.1:9");
}

/// A record ferry cannot make a customer of is dead-lettered when it
/// arrives: `check_record` runs ferry's own rules on it here, first.
#[test]
fn records_ferry_refuses_are_caught_here() {
    assert!(testkit::check_record(r#"{"email":"ada@example.com","name":"Ada"}"#).is_ok());
    let no_email = testkit::check_record(r#"{"name":"Ada"}"#).unwrap_err();
    assert!(no_email.contains("no email"), "{no_email}");
    let phone = testkit::check_record(r#"{"email":"ada@example.com","phone":"+1 555 CALL NOW"}"#)
        .unwrap_err();
    assert!(phone.contains("phone"), "{phone}");
}

#[tokio::test]
async fn the_manifest_declares_what_the_connector_needs() {
    let kit = kit().await;
    let manifest = kit.manifest();
    assert_eq!(manifest.entities, ["customer"]);
    assert_eq!(manifest.hosts, ["api.example-crm.com"]);
    assert!(manifest.webhooks);
    let secrets: Vec<&str> = manifest.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(secrets, ["api_key", "webhook_secret"]);
}

#[tokio::test]
async fn a_create_sends_the_key_and_the_idempotency_key() {
    let kit = kit().await;
    kit.http()
        .on("POST", API)
        .respond_json(201, &contact("ct_1", "Ada Lovelace"));
    let result = kit.push(create_request()).await.expect("created");
    assert_eq!(result.remote_id, "ct_1");
    let sent = kit.http().last_request().expect("one request");
    // The component named the secret; the host put its value in.
    assert_eq!(sent.header("authorization"), Some("Bearer sk_test_kit"));
    assert_eq!(sent.header("idempotency-key"), Some("ferry-example-c1-v1"));
    let body: serde_json::Value = serde_json::from_str(&sent.body_text()).expect("JSON");
    assert_eq!(body["name"], "Ada Lovelace");
    assert_eq!(body["external_id"], "c1");
}

/// An id ferry could not keep (here an empty one) fails the push in the
/// kit, as it would dead-letter the change in ferry after the contact was
/// made: better found here.
#[tokio::test]
async fn an_id_ferry_cannot_keep_fails_the_push() {
    let kit = kit().await;
    kit.http()
        .on("POST", API)
        .respond_json(201, &contact("", "Ada Lovelace"));
    let error = connector_error(kit.push(create_request()).await);
    assert!(
        matches!(&error, ConnectorError::Permanent(m) if m.contains("empty remote id")),
        "{error:?}"
    );
}

#[tokio::test]
async fn updates_and_deletes_go_to_the_linked_contact() {
    let kit = kit().await;
    kit.http()
        .on("PATCH", &format!("{API}/ct_1"))
        .respond_json(200, &contact("ct_1", "Ada King"));
    kit.http()
        .on("DELETE", &format!("{API}/ct_1"))
        .respond(204, &[], "");
    let mut update = create_request();
    update.operation = Operation::Update;
    update.remote_id = Some("ct_1".into());
    assert_eq!(kit.push(update.clone()).await.unwrap().remote_id, "ct_1");
    // An update that names what changed since the last sync sends only
    // that: a name someone just edited in the CRM is not written over.
    let mut changed = update.clone();
    let mut record: serde_json::Value = serde_json::from_str(&changed.record).unwrap();
    record["changed_fields"] = json!(["phone"]);
    changed.record = record.to_string();
    kit.push(changed).await.unwrap();
    let patch = kit.http().last_request().expect("patch");
    let body: serde_json::Value = serde_json::from_str(&patch.body_text()).unwrap();
    assert!(
        body.get("name").is_none() && body.get("email").is_none(),
        "{body}"
    );
    assert!(body.get("phone").is_some(), "{body}");
    update.operation = Operation::Delete;
    assert_eq!(kit.push(update.clone()).await.unwrap().remote_id, "ct_1");
    let methods: Vec<String> = kit
        .http()
        .requests()
        .into_iter()
        .map(|r| r.method)
        .collect();
    assert_eq!(methods, ["PATCH", "PATCH", "DELETE"]);
    // A 404 the API does not call `not_found` answered the route (an
    // `api_base` ending in `/v1`, a proxy's page), not the contact: read as
    // gone, ferry counted the delete as done and left the contact there.
    kit.http()
        .on("DELETE", &format!("{API}/ct_2"))
        .respond(404, &[], "404 page not found");
    update.remote_id = Some("ct_2".into());
    let refused = connector_error(kit.push(update).await);
    assert!(
        matches!(&refused, ConnectorError::Permanent(m) if m.contains("api_base")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn remote_answers_become_the_errors_ferrys_retries_key_off() {
    let kit = kit().await;
    kit.http()
        .on("POST", API)
        .respond(429, &[("retry-after", "3")], "{}")
        .respond(503, &[], "unavailable")
        .respond(
            401,
            &[],
            r#"{"error":{"code":"unauthorized","message":"bad key"}}"#,
        )
        .respond(
            422,
            &[],
            r#"{"error":{"code":"invalid_email","message":"email must contain @"}}"#,
        );
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::RateLimited(RateLimit {
            retry_after_ms: Some(3000),
            ..
        })
    ));
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Retryable(_)
    ));
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Unauthorized(_)
    ));
    let invalid = connector_error(kit.push(create_request()).await);
    assert!(
        matches!(&invalid, ConnectorError::Permanent(m) if m.contains("invalid_email")),
        "{invalid:?}"
    );
}

#[tokio::test]
async fn fetch_and_list_read_contacts_as_customers() {
    let kit = kit().await;
    kit.http().on("GET", &format!("{API}/ct_404")).respond(
        404,
        &[],
        r#"{"error":{"code":"not_found","message":"no such contact"}}"#,
    );
    kit.http()
        .on("GET", &format!("{API}?limit=2"))
        .respond_json(
            200,
            &json!({"data": [contact("ct_1", "A"), contact("ct_2", "B")], "has_more": true}),
        );
    kit.http()
        .on("GET", &format!("{API}?limit=2&starting_after=ct_2"))
        .respond_json(
            200,
            &json!({"data": [contact("ct_3", "C")], "has_more": false}),
        );
    assert!(matches!(
        connector_error(kit.fetch("customer", "ct_404").await),
        ConnectorError::NotFound(_)
    ));
    let first = kit.list("customer", None, 2).await.unwrap();
    assert_eq!(first.records.len(), 2);
    assert_eq!(first.next_cursor.as_deref(), Some("ct_2"));
    let record: serde_json::Value = serde_json::from_str(&first.records[0].record).unwrap();
    assert_eq!(record["name"], "A");
    let second = kit.list("customer", first.next_cursor, 2).await.unwrap();
    assert_eq!(second.records[0].remote_id, "ct_3");
    assert_eq!(second.next_cursor, None);
    // An empty page that says there is more is no end of the listing.
    kit.http()
        .on("GET", &format!("{API}?limit=2&starting_after=ct_3"))
        .respond_json(200, &json!({"data": [], "has_more": true}));
    assert!(matches!(
        connector_error(kit.list("customer", Some("ct_3".to_owned()), 2).await),
        ConnectorError::Retryable(_)
    ));
    // A page that leads back to itself would list for ever: ferry fails
    // the run, and the kit the call.
    kit.http()
        .on("GET", &format!("{API}?limit=2&starting_after=ct_9"))
        .respond_json(
            200,
            &json!({"data": [contact("ct_9", "I")], "has_more": true}),
        );
    assert!(matches!(
        connector_error(kit.list("customer", Some("ct_9".to_owned()), 2).await),
        ConnectorError::Permanent(m) if m.contains("never end")
    ));
    // An id ferry cannot keep (over 255 bytes): a run skips the record,
    // and reports the customer linked to it an orphan.
    kit.http()
        .on("GET", &format!("{API}?limit=2&starting_after=ct_long"))
        .respond_json(
            200,
            &json!({"data": [contact(&"c".repeat(300), "L")], "has_more": false}),
        );
    assert!(matches!(
        connector_error(kit.list("customer", Some("ct_long".to_owned()), 2).await),
        ConnectorError::Permanent(m) if m.contains("255 bytes")
    ));
}

fn event(id: &str, kind: &str, created_at: i64, name: &str) -> Vec<u8> {
    json!({"id": id, "type": kind, "created_at": created_at, "data": contact("ct_1", name)})
        .to_string()
        .into_bytes()
}

fn signed(body: Vec<u8>) -> ferry_sdk::WebhookRequest {
    let header = sign::timestamped(WEBHOOK_SECRET, sign::now_secs(), &body);
    testkit::webhook_request(&[("Example-Signature", &header)], body)
}

/// ferry answers 413 to a delivery over its default limit without calling
/// the connector; the kit refuses it too.
#[tokio::test]
async fn a_delivery_over_ferrys_limit_is_refused() {
    let kit = kit().await;
    let mut body = event("evt_big", "contact.updated", 1_700_000_000, "Big");
    body.resize(300 * 1024, b' ');
    let refused = connector_error(kit.receive_webhook(signed(body)).await);
    assert!(
        matches!(&refused, ConnectorError::Permanent(m) if m.contains("413")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_signed_webhook_becomes_a_ferry_event() {
    let kit = kit().await;
    let parsed = kit
        .receive_webhook(signed(event(
            "evt_1",
            "contact.updated",
            1_700_000_100,
            "Ada",
        )))
        .await
        .expect("verified and parsed");
    let first = &parsed.events[0];
    assert_eq!(
        (first.id.as_str(), first.kind, first.remote_id.as_str()),
        ("evt_1", ChangeKind::Upsert, "ct_1")
    );
    assert_eq!(first.occurred_at_ms, 1_700_000_100_000);
    // The record is ferry's canonical customer, not the API's contact.
    let record: serde_json::Value = serde_json::from_str(first.record.as_deref().unwrap()).unwrap();
    assert_eq!(
        record,
        json!({"id": "ct_1", "name": "Ada", "email": "ada@example.com"})
    );
    let ignored = kit
        .receive_webhook(signed(event("evt_2", "invoice.paid", 1_700_000_100, "Ada")))
        .await
        .unwrap();
    assert!(
        ignored.events.is_empty(),
        "other event types are acknowledged, not errors"
    );
    // Whatever their data holds.
    let invoice = json!({"id": "evt_3", "type": "invoice.paid", "created_at": 1_700_000_200,
        "data": {"amount": 5}})
    .to_string()
    .into_bytes();
    let ignored = kit.receive_webhook(signed(invoice)).await.unwrap();
    assert!(ignored.events.is_empty());
}

#[tokio::test]
async fn redelivered_reordered_and_tampered_webhooks() {
    let kit = kit().await;
    // Redelivery, missing event times and tampering, checked in one go.
    let report = testkit::webhooks::check_delivery(
        &kit,
        signed(event("evt_1", "contact.updated", 1_700_000_100, "Ada")),
    )
    .await
    .unwrap_or_else(|problem| panic!("{problem}"));
    assert_eq!(report.event_ids, ["evt_1"]);
    // Out of order: the older state says it is older, so ferry keeps the newer.
    let newer = kit
        .receive_webhook(signed(event(
            "evt_3",
            "contact.updated",
            1_700_000_300,
            "Ada King",
        )))
        .await
        .unwrap();
    let older = kit
        .receive_webhook(signed(event(
            "evt_2",
            "contact.updated",
            1_700_000_200,
            "Ada",
        )))
        .await
        .unwrap();
    assert!(older.events[0].occurred_at_ms < newer.events[0].occurred_at_ms);
    // A signature older than five minutes is a replay.
    let body = event("evt_4", "contact.updated", 1_700_000_400, "Eve");
    let stale = sign::timestamped(WEBHOOK_SECRET, sign::now_secs() - 301, &body);
    assert!(matches!(
        connector_error(
            kit.receive_webhook(testkit::webhook_request(
                &[("example-signature", &stale)],
                body
            ))
            .await
        ),
        ConnectorError::InvalidSignature(_)
    ));
}

/// The calls of the recorded session, in order; `record_a_session` and
/// `a_recorded_session_replays_offline` both run them.
async fn session(kit: &TestKit) -> Vec<String> {
    let created = kit.push(create_request()).await.expect("create");
    let fetched = kit
        .fetch("customer", &created.remote_id)
        .await
        .expect("fetch");
    let mut update = create_request();
    update.operation = Operation::Update;
    update.remote_id = Some(created.remote_id.clone());
    update.record = json!({"name": "Ada King", "email": "ada@example.com"}).to_string();
    let updated = kit.push(update.clone()).await.expect("update");
    let page = kit.list("customer", None, 10).await.expect("list");
    update.operation = Operation::Delete;
    kit.push(update).await.expect("delete");
    vec![
        created.remote_id,
        fetched.record,
        updated.record.unwrap_or_default(),
        page.records.len().to_string(),
    ]
}

const SESSION: &str = "tests/fixtures/session.json";

/// Runs the session against a live API and saves it (secrets scrubbed) for
/// the replay test. Run it when the API changes:
/// `EXAMPLE_API_BASE=https://… EXAMPLE_API_KEY=… cargo test --features record -- --ignored record_a_session`
#[cfg(feature = "record")]
#[tokio::test]
#[ignore = "needs a live Example CRM API: set EXAMPLE_API_BASE and EXAMPLE_API_KEY"]
async fn record_a_session() {
    let base = std::env::var("EXAMPLE_API_BASE").expect("EXAMPLE_API_BASE");
    let key = std::env::var("EXAMPLE_API_KEY").expect("EXAMPLE_API_KEY");
    let kit = TestKit::this_crate_with(Http::Record(SESSION.into()))
        .await
        .expect("load")
        .setting("api_base", base)
        .secret("api_key", key);
    session(&kit).await;
    kit.save_recording().expect("save the recording");
}

#[tokio::test]
async fn a_recorded_session_replays_offline() {
    let base = std::env::var("EXAMPLE_API_BASE").unwrap_or_else(|_| recorded_base());
    let kit = TestKit::this_crate_with(Http::Replay(SESSION.into()))
        .await
        .expect("load the recording")
        .setting("api_base", base)
        .secret("api_key", "any key: the recording holds none");
    let seen = session(&kit).await;
    assert!(seen[0].starts_with("ct_"), "{seen:?}");
    assert!(seen[2].contains("Ada King"), "{seen:?}");
    // Every recorded call was made again, with the body recorded: a
    // changed mapping sends another body, which the recording refuses.
    assert_eq!(kit.unreplayed(), Vec::<String>::new());
}

/// The base URL the session was recorded against.
fn recorded_base() -> String {
    let tape = testkit::Tape::load(std::path::Path::new(SESSION)).expect("the recording");
    let url = &tape.exchanges[0].url;
    url[..url.find("/v1/").expect("an API URL")].to_owned()
}
