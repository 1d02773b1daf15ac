//! The Stripe connector as a third-party author tests one: the built
//! component in ferry's real runtime, HTTP answered by a script
//! (`ferry_sdk::testkit`), no network.

use ferry_sdk::testkit::{self, sign, CallError, TestKit, WireError};
use ferry_sdk::{ChangeKind, ConnectorError, Operation, PushRequest, RateLimit};
use serde_json::json;

const API: &str = "https://api.stripe.com/v1/customers";

async fn kit() -> TestKit {
    // Built once per test binary; the component is compiled once for all its tests.
    TestKit::this_crate()
        .await
        .expect("load")
        .secret("api_key", "sk_test_kit")
        .secret("webhook_secret", "whsec_kit")
}

fn stripe_customer(id: &str) -> serde_json::Value {
    json!({
        "id": id, "object": "customer", "name": "Ada Lovelace", "email": "ada@example.com",
        "phone": null, "address": {"line1": "12 St James's Sq", "line2": null, "city": "London",
            "state": null, "postal_code": "SW1Y 4JH", "country": "GB"},
        "metadata": {"ferry_id": "c1", "tier": "gold"}, "created": 1_700_000_000
    })
}

fn create_request() -> PushRequest {
    let record = json!({"id": "c1", "name": "Ada Lovelace", "email": "ada@example.com",
        "address": {"city": "London", "country": "GB"}, "metadata": {"tier": "gold"}});
    testkit::push_request(
        "customer",
        Operation::Create,
        "c1",
        None,
        record.to_string(),
    )
}

fn connector_error(result: Result<impl std::fmt::Debug, CallError>) -> ConnectorError {
    match result {
        Err(CallError::Connector(err)) => err,
        other => panic!("expected a connector error, got {other:?}"),
    }
}

/// A base URL given with white space around it (an env file's trailing
/// space) is used without it: kept, every request's URL was refused.
#[tokio::test]
async fn a_base_url_with_spaces_around_it_is_used_without_them() {
    let kit = kit().await.setting("api_base", " https://api.stripe.com/ ");
    kit.http()
        .on("GET", &format!("{API}/cus_spaced"))
        .respond_json(200, &stripe_customer("cus_spaced"));
    let record = kit.fetch("customer", "cus_spaced").await.expect("fetched");
    assert!(record.record.contains("Ada Lovelace"), "{}", record.record);
}

#[tokio::test]
async fn manifest_declares_what_the_connector_needs() {
    let kit = kit().await;
    let m = kit.manifest();
    assert_eq!(m.name, "stripe");
    assert_eq!(m.entities, ["customer"]);
    assert_eq!(m.hosts, ["api.stripe.com"]);
    assert_eq!(m.host_settings, ["api_base"]);
    let secrets: Vec<_> = m.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(secrets, ["api_key", "webhook_secret"]);
    assert!(m.webhooks);
}

#[tokio::test]
async fn create_sends_a_form_with_the_key_and_idempotency_key() {
    let kit = kit().await;
    kit.http()
        .on("POST", API)
        .respond_json(200, &stripe_customer("cus_new"));
    let result = kit.push(create_request()).await.expect("push");
    assert_eq!(result.remote_id, "cus_new");
    let record: serde_json::Value = serde_json::from_str(&result.record.unwrap()).unwrap();
    assert_eq!(record["email"], "ada@example.com");
    assert_eq!(record["metadata"], json!({"tier": "gold"}));

    let sent = kit.http().requests();
    assert_eq!(sent.len(), 1);
    let req = &sent[0];
    assert_eq!((req.method.as_str(), req.url.as_str()), ("POST", API));
    // The host substituted the placeholder: the component never saw the key.
    assert_eq!(req.header("authorization"), Some("Bearer sk_test_kit"));
    assert_eq!(req.header("idempotency-key"), Some("ferry-example-c1-v1"));
    // A key of the length ferry sends goes as it is (Stripe takes 255).
    let long = testkit::idempotency_key_as_sent("stripe");
    assert_eq!(long.len(), "ferry-stripe-".len() + 36 + "-v1".len());
    assert_eq!(
        req.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let form = req.form();
    let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(field("name"), Some("Ada Lovelace"));
    assert_eq!(field("email"), Some("ada@example.com"));
    assert_eq!(field("address[city]"), Some("London"));
    assert_eq!(field("metadata[tier]"), Some("gold"));
    assert_eq!(field("metadata[ferry_id]"), Some("c1"));
    // A create leaves unknown fields out rather than blanking them.
    assert_eq!(field("phone"), None);
}

#[tokio::test]
async fn update_and_delete_address_the_linked_customer() {
    let kit = kit().await;
    kit.http()
        .on("POST", &format!("{API}/cus_1"))
        .respond_json(200, &stripe_customer("cus_1"));
    kit.http()
        .on("DELETE", &format!("{API}/cus_1"))
        .respond_json(
            200,
            &json!({"id": "cus_1", "object": "customer", "deleted": true}),
        );

    let mut update = create_request();
    update.operation = Operation::Update;
    update.remote_id = Some("cus_1".into());
    assert_eq!(kit.push(update).await.unwrap().remote_id, "cus_1");
    let sent = kit.http().last_request().unwrap();
    // Fields unset locally are unset remotely.
    assert_eq!(sent.form_value("phone").as_deref(), Some(""));

    let mut delete = create_request();
    delete.operation = Operation::Delete;
    delete.remote_id = Some("cus_1".into());
    let result = kit.push(delete).await.unwrap();
    assert_eq!((result.remote_id.as_str(), result.record), ("cus_1", None));
    assert_eq!(kit.http().last_request().unwrap().method, "DELETE");

    let mut unlinked = create_request();
    unlinked.operation = Operation::Update;
    assert!(matches!(
        connector_error(kit.push(unlinked).await),
        ConnectorError::Permanent(_)
    ));
}

#[tokio::test]
async fn rate_limit_carries_retry_after() {
    let kit = kit().await;
    kit.http().on("POST", API).respond(
        429,
        &[("Retry-After", "2")],
        r#"{"error":{"type":"rate_limit_error","message":"Too many requests"}}"#,
    );
    match connector_error(kit.push(create_request()).await) {
        ConnectorError::RateLimited(RateLimit {
            retry_after_ms,
            message,
        }) => {
            assert_eq!(retry_after_ms, Some(2000));
            assert!(message.contains("Too many requests"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_errors_and_network_failures_are_retryable() {
    let kit = kit().await;
    kit.http()
        .on("POST", API)
        .respond(
            500,
            &[],
            r#"{"error":{"type":"api_error","message":"boom"}}"#,
        )
        .respond(
            424,
            &[],
            r#"{"error":{"type":"api_error","message":"an external dependency failed"}}"#,
        )
        .fail(WireError::Timeout("too slow".into()))
        .fail(WireError::Connect("refused".into()));
    for expected in ["500", "424", "timeout", "refused"] {
        let result = kit.push(create_request()).await;
        if expected == "timeout" {
            // The connector's transient answer after a request timed out is
            // the host's unknown outcome: it waits before a newer version.
            assert!(
                matches!(result, Err(CallError::DeadlineExceeded)),
                "{result:?}"
            );
            continue;
        }
        assert!(
            matches!(connector_error(result), ConnectorError::Retryable(_)),
            "{expected}"
        );
    }
}

/// A 5xx Stripe says it saved for the key (`Stripe-Should-Retry: false`)
/// is retryable all the same: the host retries an update under a fresh
/// key, and a create under its own (whether it made the customer is
/// unknown; one refused for good was forgotten, its replay a fresh
/// create).
#[tokio::test]
async fn a_saved_server_error_is_retryable() {
    let kit = kit().await;
    let saved = r#"{"error":{"type":"api_error","message":"An unknown error occurred"}}"#;
    let no_retry = [("stripe-should-retry", "false")];
    kit.http().on("POST", API).respond(500, &no_retry, saved);
    kit.http()
        .on("POST", &format!("{API}/cus_saved"))
        .respond(500, &no_retry, saved);
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Retryable(_)
    ));
    let mut update = create_request();
    update.operation = Operation::Update;
    update.remote_id = Some("cus_saved".into());
    assert!(matches!(
        connector_error(kit.push(update).await),
        ConnectorError::Retryable(_)
    ));
}

/// A phone longer than Stripe stores is refused before any call, with
/// the limit and the length (Stripe's own refusal names neither).
#[tokio::test]
async fn a_phone_stripe_cannot_store_is_refused_before_the_call() {
    let kit = kit().await;
    let record = json!({"id": "c1", "email": "ada@example.com",
        "phone": "+44 20 7946 0958 ext. 1234", "metadata": {}});
    let request = testkit::push_request(
        "customer",
        Operation::Create,
        "c1",
        None,
        record.to_string(),
    );
    match connector_error(kit.push(request).await) {
        ConnectorError::Permanent(m) => {
            assert!(
                m.contains("at most 20 characters") && m.contains("has 26"),
                "{m}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(kit.http().requests().is_empty(), "no call was made");
}

/// An update that does not send the phone goes through whatever its
/// length (a name change of a customer whose phone Stripe never took:
/// refused, every later change of that customer was dead-lettered); one
/// that sends it is refused as a create is.
#[tokio::test]
async fn an_update_that_leaves_a_long_phone_alone_goes_through() {
    let kit = kit().await;
    kit.http()
        .on("POST", &format!("{API}/cus_long"))
        .respond_json(200, &stripe_customer("cus_long"));
    let update = |changed: &[&str]| {
        let record = json!({"id": "c1", "email": "ada@example.com", "name": "Ada Lovelace",
            "phone": "+44 20 7946 0958 ext. 1234", "metadata": {}, "changed_fields": changed});
        testkit::push_request(
            "customer",
            Operation::Update,
            "c1",
            Some("cus_long"),
            record.to_string(),
        )
    };
    kit.push(update(&["name"])).await.expect("the name goes");
    let sent = kit.http().requests();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(
        !String::from_utf8_lossy(sent[0].body.as_deref().unwrap_or_default()).contains("phone")
    );
    assert!(matches!(
        connector_error(kit.push(update(&["phone"])).await),
        ConnectorError::Permanent(m) if m.contains("at most 20 characters")
    ));
}

#[tokio::test]
async fn client_errors_map_to_their_kinds() {
    let kit = kit().await;
    kit.http().on("GET", &format!("{API}/cus_gone")).respond(
        404,
        &[],
        r#"{"error":{"type":"invalid_request_error","message":"No such customer: 'cus_gone'"}}"#,
    );
    kit.http()
        .on("GET", &format!("{API}/cus_deleted"))
        .respond_json(
            200,
            &json!({"id": "cus_deleted", "object": "customer", "deleted": true}),
        );
    kit.http().on("POST", API).respond(
        401,
        &[],
        r#"{"error":{"type":"invalid_request_error","message":"Invalid API Key provided"}}"#,
    );
    kit.http().on("POST", &format!("{API}/cus_1")).respond(
        400,
        &[],
        r#"{"error":{"type":"invalid_request_error","message":"Invalid email address"}}"#,
    );

    // A 404 for the request, not the record: a path Stripe does not know,
    // a key of the other mode. Permanent, not "gone".
    kit.http().on("GET", &format!("{API}/cus_path")).respond(
        404,
        &[],
        r#"{"error":{"type":"invalid_request_error","message":"Unrecognized request URL (GET: /v1/v1/customers/cus_path). Please see https://stripe.com/docs"}}"#,
    );
    kit.http().on("GET", &format!("{API}/cus_proxy")).respond(
        404,
        &[("content-type", "text/html")],
        "<html><body>404 Not Found</body></html>",
    );
    kit.http().on("GET", &format!("{API}/cus_live")).respond(
        404,
        &[],
        r#"{"error":{"code":"resource_missing","param":"id","type":"invalid_request_error","message":"No such customer: 'cus_live'; a similar object exists in live mode, but a test mode key was used to make this request."}}"#,
    );

    match connector_error(kit.fetch("customer", "cus_gone").await) {
        ConnectorError::NotFound(m) => assert!(m.contains("No such customer"), "{m}"),
        other => panic!("{other:?}"),
    }
    // One object busy, not the account's rate: retried alone.
    kit.http().on("POST", &format!("{API}/cus_busy")).respond(
        429,
        &[],
        r#"{"error":{"code":"lock_timeout","type":"invalid_request_error","message":"This object cannot be accessed right now because another API request or Stripe process is currently accessing it."}}"#,
    );
    let mut busy = create_request();
    busy.operation = Operation::Update;
    busy.remote_id = Some("cus_busy".into());
    assert!(matches!(
        connector_error(kit.push(busy).await),
        ConnectorError::Retryable(m) if m.contains("cannot be accessed right now")
    ));
    // A request with the same key still in progress: retried; a conflict
    // Stripe says no retry resolves: not.
    kit.http().on("POST", &format!("{API}/cus_racing")).respond(
        409,
        &[],
        r#"{"error":{"type":"idempotency_error","message":"There is currently another in-progress request using this Idempotent Key."}}"#,
    );
    kit.http().on("POST", &format!("{API}/cus_final")).respond(
        409,
        &[("stripe-should-retry", "false")],
        r#"{"error":{"type":"invalid_request_error","message":"Conflict that no retry resolves"}}"#,
    );
    for (remote_id, retried) in [("cus_racing", true), ("cus_final", false)] {
        let mut push = create_request();
        push.operation = Operation::Update;
        push.remote_id = Some(remote_id.into());
        let error = connector_error(kit.push(push).await);
        assert_eq!(
            matches!(error, ConnectorError::Retryable(_)),
            retried,
            "{remote_id}: {error:?}"
        );
    }
    for misaddressed in ["cus_path", "cus_live", "cus_proxy"] {
        assert!(
            matches!(
                connector_error(kit.fetch("customer", misaddressed).await),
                ConnectorError::Permanent(_)
            ),
            "{misaddressed}"
        );
    }
    assert!(matches!(
        connector_error(kit.fetch("customer", "cus_deleted").await),
        ConnectorError::NotFound(_)
    ));
    assert!(matches!(
        connector_error(kit.push(create_request()).await),
        ConnectorError::Unauthorized(_)
    ));
    let mut update = create_request();
    update.operation = Operation::Update;
    update.remote_id = Some("cus_1".into());
    match connector_error(kit.push(update).await) {
        ConnectorError::Permanent(m) => assert!(m.contains("Invalid email address"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        connector_error(kit.fetch("invoice", "in_1").await),
        ConnectorError::Unsupported(_)
    ));
}

#[tokio::test]
async fn list_pages_with_starting_after() {
    let kit = kit().await;
    kit.http()
        .on("GET", &format!("{API}?limit=2&starting_after=cus_2"))
        .respond_json(
            200,
            &json!({"object": "list", "has_more": false,
            "data": [stripe_customer("cus_3")]}),
        );
    kit.http()
        .on("GET", &format!("{API}?limit=2"))
        .respond_json(
            200,
            &json!({"object": "list", "has_more": true,
            "data": [stripe_customer("cus_1"), stripe_customer("cus_2")]}),
        );

    let first = kit.list("customer", None, 2).await.unwrap();
    assert_eq!(first.records.len(), 2);
    assert_eq!(first.next_cursor.as_deref(), Some("cus_2"));
    let second = kit.list("customer", first.next_cursor, 2).await.unwrap();
    assert_eq!(second.records[0].remote_id, "cus_3");
    assert_eq!(second.next_cursor, None);
    assert!(kit.http().unmatched().is_empty());
}

/// An empty page that says more follow names no record to start after:
/// a retryable error, not the listing's end (which would count every
/// record after it missing).
#[tokio::test]
async fn an_empty_page_with_more_to_come_is_retried() {
    let kit = kit().await;
    kit.http()
        .on("GET", &format!("{API}?limit=2"))
        .respond_json(
            200,
            &json!({"object": "list", "has_more": true, "data": []}),
        );
    assert!(matches!(
        connector_error(kit.list("customer", None, 2).await),
        ConnectorError::Retryable(_)
    ));
}

fn now_secs() -> i64 {
    sign::now_secs()
}

/// Stripe's `Stripe-Signature` header for `body` at `t`.
fn stripe_signature(secret: &str, t: i64, body: &str) -> String {
    sign::timestamped(secret, t, body.as_bytes())
}

fn event_body(kind: &str) -> String {
    json!({"id": "evt_1", "object": "event", "type": kind, "created": 1_700_000_123,
        "data": {"object": stripe_customer("cus_1")},
        "request": {"id": "req_1", "idempotency_key": "c1-v3"}})
    .to_string()
}

#[tokio::test]
async fn webhook_signatures_are_checked() {
    let kit = kit().await;
    let body = event_body("customer.updated");
    let ok =
        |header: String| testkit::webhook_request(&[("Stripe-Signature", &header)], body.clone());
    let now = now_secs();

    kit.verify_webhook(ok(stripe_signature("whsec_kit", now, &body)))
        .await
        .expect("a valid signature");
    // Secret rotation: Stripe sends one v1 per active secret.
    let rotated = format!(
        "{},v1={}",
        stripe_signature("whsec_kit", now, &body),
        "ab".repeat(32)
    );
    kit.verify_webhook(ok(rotated))
        .await
        .expect("any v1 may match");

    let refused = |r: Result<(), CallError>| {
        assert!(
            matches!(
                r,
                Err(CallError::Connector(ConnectorError::InvalidSignature(_)))
            ),
            "{r:?}"
        )
    };
    refused(
        kit.verify_webhook(ok(stripe_signature("whsec_other", now, &body)))
            .await,
    );
    refused(
        kit.verify_webhook(ok(stripe_signature("whsec_kit", now - 301, &body)))
            .await,
    );
    let tampered = testkit::webhook_request(
        &[(
            "stripe-signature",
            &stripe_signature("whsec_kit", now, &body),
        )],
        body.replace("Ada", "Eve"),
    );
    refused(kit.verify_webhook(tampered).await);
    refused(
        kit.verify_webhook(testkit::webhook_request(&[], body.clone()))
            .await,
    );
}

#[tokio::test]
async fn customer_events_become_ferry_events() {
    let kit = kit().await;
    let parsed = kit
        .parse_webhook(testkit::webhook_request(
            &[],
            event_body("customer.updated"),
        ))
        .await
        .unwrap();
    assert_eq!(parsed.events.len(), 1);
    let event = &parsed.events[0];
    assert_eq!(event.id, "evt_1");
    assert_eq!(event.kind, ChangeKind::Upsert);
    assert_eq!(event.remote_id, "cus_1");
    assert_eq!(event.occurred_at_ms, 1_700_000_123_000);
    assert_eq!(event.origin_key.as_deref(), Some("c1-v3"));
    assert_eq!(event.remote_type, "customer.updated");
    let record: serde_json::Value = serde_json::from_str(event.record.as_deref().unwrap()).unwrap();
    assert_eq!(record["name"], "Ada Lovelace");
    assert_eq!(record["address"]["postal_code"], "SW1Y 4JH");

    let deleted = kit
        .parse_webhook(testkit::webhook_request(
            &[],
            event_body("customer.deleted"),
        ))
        .await
        .unwrap();
    assert_eq!(deleted.events[0].kind, ChangeKind::Delete);

    // Before API version 2017-05-25 `request` was a bare id: no origin key.
    let legacy = json!({"id": "evt_2", "object": "event", "type": "customer.created",
        "created": 1_700_000_123, "data": {"object": stripe_customer("cus_2")},
        "request": "req_legacy"});
    let legacy = kit
        .parse_webhook(testkit::webhook_request(&[], legacy.to_string()))
        .await
        .unwrap();
    assert_eq!(legacy.events[0].remote_id, "cus_2");
    assert_eq!(legacy.events[0].origin_key, None);

    // A Connect endpoint's event of a connected account: another account's
    // customer, ignored (matched by email, it would overwrite ours).
    let connected = json!({"id": "evt_3", "object": "event", "type": "customer.updated",
        "account": "acct_1Connected", "created": 1_700_000_123,
        "data": {"object": stripe_customer("cus_3")}});
    let connected = kit
        .parse_webhook(testkit::webhook_request(&[], connected.to_string()))
        .await
        .unwrap();
    assert!(connected.events.is_empty(), "{:?}", connected.events);

    let ignored = kit
        .parse_webhook(testkit::webhook_request(&[], event_body("invoice.paid")))
        .await
        .unwrap();
    assert!(ignored.events.is_empty());

    assert!(matches!(
        connector_error(
            kit.parse_webhook(testkit::webhook_request(&[], "not json"))
                .await
        ),
        ConnectorError::Permanent(_)
    ));
}

/// Thin events (an event destination with Stripe's thin payload style):
/// a customer's become thin ferry events (the host fetches the record),
/// dated on arrival; the destination's ping and another account's events
/// are acknowledged with nothing to apply.
#[tokio::test]
async fn thin_customer_events_become_thin_ferry_events() {
    let kit = kit().await;
    let thin = |id: &str, kind: &str, related: &str| {
        json!({"id": id, "object": "v2.core.event", "type": kind,
            "created": "2026-12-05T02:40:00.123Z", "livemode": false, "context": null,
            "related_object": {"id": related, "type": "customer", "url": format!("/v1/customers/{related}")}})
        .to_string()
    };
    let parse = |body: String| kit.parse_webhook(testkit::webhook_request(&[], body));
    let updated = parse(thin("evt_thin_1", "v1.customer.updated", "cus_9"))
        .await
        .unwrap();
    assert_eq!(updated.events.len(), 1);
    let event = &updated.events[0];
    assert_eq!(
        (
            event.kind,
            event.remote_id.as_str(),
            event.record.as_deref()
        ),
        (ChangeKind::Upsert, "cus_9", None)
    );
    assert_eq!(event.occurred_at_ms, 0, "dated on arrival");
    assert_eq!(event.remote_type, "v1.customer.updated");
    assert_eq!(event.origin_key, None, "no request caused it");
    // One an API request caused names its idempotency key: ferry's own
    // push is told by it (its echo), as with a snapshot event.
    let mut caused: serde_json::Value =
        serde_json::from_str(&thin("evt_thin_5", "v1.customer.updated", "cus_9")).unwrap();
    caused["reason"] = json!({"type": "request",
        "request": {"id": "req_1", "idempotency_key": "ferry-stripe-cus_1-v3"}});
    let caused = parse(caused.to_string()).await.unwrap();
    assert_eq!(
        caused.events[0].origin_key.as_deref(),
        Some("ferry-stripe-cus_1-v3")
    );
    let deleted = parse(thin("evt_thin_2", "v1.customer.deleted", "cus_9"))
        .await
        .unwrap();
    assert_eq!(deleted.events[0].kind, ChangeKind::Delete);
    let ping = parse(thin("evt_ping", "v2.core.event_destination.ping", "ed_1"))
        .await
        .unwrap();
    assert!(ping.events.is_empty());
    let mut other: serde_json::Value =
        serde_json::from_str(&thin("evt_thin_3", "v1.customer.updated", "cus_8")).unwrap();
    other["context"] = json!("acct_1Connected");
    let other = parse(other.to_string()).await.unwrap();
    assert!(other.events.is_empty(), "another account's");
    let nameless = json!({"id": "evt_thin_4", "object": "v2.core.event",
        "type": "v1.customer.updated", "created": "2026-12-05T02:40:00Z"});
    assert!(matches!(
        connector_error(parse(nameless.to_string()).await),
        ConnectorError::Permanent(_)
    ));
}

#[tokio::test]
async fn a_delivery_is_verified_then_parsed_in_one_call() {
    let kit = kit().await;
    let body = event_body("customer.updated");
    let now = now_secs();
    let delivery = |secret: &str, body: &str| {
        testkit::webhook_request(
            &[("Stripe-Signature", &stripe_signature(secret, now, body))],
            body.to_owned(),
        )
    };

    let parsed = kit
        .receive_webhook(delivery("whsec_kit", &body))
        .await
        .expect("a signed delivery is parsed");
    assert_eq!(parsed.events.len(), 1);
    assert_eq!(parsed.events[0].id, "evt_1");
    assert_eq!(parsed.events[0].remote_id, "cus_1");
    assert_eq!(parsed.events[0].kind, ChangeKind::Upsert);

    // A wrong signature is refused and yields no events.
    assert!(matches!(
        connector_error(kit.receive_webhook(delivery("whsec_other", &body)).await),
        ConnectorError::InvalidSignature(_)
    ));
    // Parsing never runs after a refusal: a body parse-webhook would reject
    // as not JSON still fails only with the signature error...
    assert!(matches!(
        connector_error(
            kit.receive_webhook(delivery("whsec_other", "not json"))
                .await
        ),
        ConnectorError::InvalidSignature(_)
    ));
    // ...while the same body, correctly signed, reaches the parser.
    assert!(matches!(
        connector_error(kit.receive_webhook(delivery("whsec_kit", "not json")).await),
        ConnectorError::Permanent(_)
    ));
}

#[tokio::test]
async fn redelivered_reordered_and_tampered_deliveries() {
    let kit = kit().await;
    let body = event_body("customer.updated");
    let signed = testkit::webhook_request(
        &[(
            "Stripe-Signature",
            &stripe_signature("whsec_kit", now_secs(), &body),
        )],
        body,
    );
    let report = testkit::webhooks::check_delivery(&kit, signed.clone())
        .await
        .unwrap_or_else(|problem| panic!("{problem}"));
    assert_eq!(report.event_ids, ["evt_1"]);
    // The header named, as for a remote whose header says nothing of a
    // signature (the guess found none, skipped the forged case and called
    // a correct connector open to anyone).
    let named =
        testkit::webhooks::check_delivery_signed_by(&kit, signed.clone(), &["stripe-signature"])
            .await
            .unwrap_or_else(|problem| panic!("{problem}"));
    assert_eq!(named, report);
    let mut renamed = signed;
    renamed.headers[0].0 = "X-Acme-Token".to_owned();
    let unnamed = testkit::webhooks::check_delivery(&kit, renamed)
        .await
        .expect_err("no header named like a signature");
    assert!(unnamed.contains("check_delivery_signed_by"), "{unnamed}");

    // A Stripe customer without an email is one ferry cannot make a
    // customer of: the check says so, as ferry's dead letter would.
    let mut event: serde_json::Value =
        serde_json::from_str(&event_body("customer.created")).unwrap();
    event["data"]["object"]["email"] = serde_json::Value::Null;
    let body = event.to_string();
    let no_email = testkit::webhook_request(
        &[(
            "Stripe-Signature",
            &stripe_signature("whsec_kit", now_secs(), &body),
        )],
        body,
    );
    let refused = testkit::webhooks::check_delivery(&kit, no_email)
        .await
        .expect_err("no email");
    assert!(refused.contains("no email"), "{refused}");

    // A delete's record is not read: the deleted customer had no email.
    event["type"] = json!("customer.deleted");
    let body = event.to_string();
    let deleted = testkit::webhook_request(
        &[(
            "Stripe-Signature",
            &stripe_signature("whsec_kit", now_secs(), &body),
        )],
        body,
    );
    testkit::webhooks::check_delivery(&kit, deleted)
        .await
        .unwrap_or_else(|problem| panic!("{problem}"));
}

/// While a secret rotates Stripe signs with both (two `v1`), and test mode
/// adds a `v0`: the forged delivery changes every one of them, not the
/// last only (the connector rightly accepted the valid first `v1`, and the
/// check called it open to anyone).
#[tokio::test]
async fn a_delivery_signed_twice_is_forged_whole() {
    let kit = kit().await;
    let body = event_body("customer.updated");
    let t = now_secs();
    let valid = stripe_signature("whsec_kit", t, &body);
    let old = stripe_signature("whsec_old", t, &body);
    let old_v1 = old.rsplit("v1=").next().expect("a v1");
    let header = format!("{valid},v1={old_v1},v0={old_v1}");
    let signed = testkit::webhook_request(&[("Stripe-Signature", &header)], body);
    testkit::webhooks::check_delivery(&kit, signed)
        .await
        .unwrap_or_else(|problem| panic!("{problem}"));
}
