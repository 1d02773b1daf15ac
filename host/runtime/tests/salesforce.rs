//! The Salesforce connector through the host runtime against the fake
//! Salesforce (tests/support): push, fetch and paged list; the host's OAuth
//! token cache (one token for many calls, one refresh when the session
//! expires even with many calls failing at once, a refused client); and
//! request limits.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use ferry_runtime::{
    CallError, Connector, ConnectorConfig, ConnectorError, Operation, PushRequest, Runtime,
    RuntimeConfig,
};
use ferry_test_support::fake_salesforce::{FakeSalesforce, FakeSalesforceConfig};
use secrecy::SecretString;
use serde_json::{json, Value};

fn component() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        // Built by `make connectors`, like every component the tests load.
        let path = ferry_test_support::wasm::component_path("ferry_connector_salesforce");
        std::fs::read(path).expect("read the salesforce connector")
    })
}

struct Harness {
    salesforce: FakeSalesforce,
    connector: Arc<Connector>,
    // Owns the engine the connector runs in.
    _runtime: Runtime,
}

impl Harness {
    async fn start(config: FakeSalesforceConfig) -> Self {
        Self::start_with(config, Self::runtime_config()).await
    }

    fn runtime_config() -> RuntimeConfig {
        RuntimeConfig {
            // The fake listens on 127.0.0.1 over plain HTTP.
            allow_private_hosts: true,
            max_instances: 16,
            ..RuntimeConfig::default()
        }
    }

    async fn start_with(config: FakeSalesforceConfig, runtime: RuntimeConfig) -> Self {
        let salesforce = FakeSalesforce::start(config)
            .await
            .expect("fake salesforce");
        let runtime = Runtime::new(runtime).expect("runtime");
        let connector = runtime.load(component()).await.expect("load");
        Self {
            salesforce,
            connector,
            _runtime: runtime,
        }
    }

    fn config_with_secret(&self, client_secret: &str) -> ConnectorConfig {
        ConnectorConfig {
            settings: BTreeMap::from([
                ("login_url".to_owned(), self.salesforce.url()),
                (
                    "organization_id".to_owned(),
                    self.salesforce.org_id().to_owned(),
                ),
            ]),
            secrets: BTreeMap::from([
                (
                    "client_id".to_owned(),
                    SecretString::from(self.salesforce.config().client_id.clone()),
                ),
                (
                    "client_secret".to_owned(),
                    SecretString::from(client_secret.to_owned()),
                ),
            ]),
        }
    }

    fn config(&self) -> ConnectorConfig {
        self.config_with_secret(&self.salesforce.config().client_secret)
    }

    async fn push(
        &self,
        operation: Operation,
        local_id: &str,
        remote_id: Option<&str>,
        record: Value,
    ) -> Result<String, CallError> {
        let req = PushRequest {
            entity: "customer".into(),
            operation,
            local_id: local_id.into(),
            remote_id: remote_id.map(str::to_owned),
            version: 1,
            idempotency_key: format!("ferry-salesforce-{local_id}-v1"),
            record: record.to_string(),
        };
        Ok(self.connector.push(&self.config(), req).await?.remote_id)
    }

    async fn create(&self, local_id: &str, name: &str) -> String {
        let record = json!({"id": local_id, "name": name,
            "email": format!("{local_id}@example.com")});
        self.push(Operation::Create, local_id, None, record)
            .await
            .expect("create")
    }
}

fn connector_error<T: std::fmt::Debug>(result: Result<T, CallError>) -> ConnectorError {
    match result {
        Err(CallError::Connector(err)) => err,
        other => panic!("expected a connector error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_update_fetch_delete_and_list() {
    let h = Harness::start(FakeSalesforceConfig {
        query_page_size: Some(2),
        ..FakeSalesforceConfig::default()
    })
    .await;
    let record = json!({
        "id": "c1", "name": "Ada Lovelace", "email": "ada@example.com", "phone": "+442079460000",
        "address": {"line1": "12 St James's Square", "city": "London", "postal_code": "SW1Y 4JH",
            "country": "GB"},
    });
    let id = h
        .push(Operation::Create, "c1", None, record.clone())
        .await
        .expect("create");
    assert!(id.starts_with("003"), "{id}");
    let stored = h.salesforce.record("Contact", &id).expect("stored");
    assert_eq!(
        (&stored["FirstName"], &stored["LastName"]),
        (&json!("Ada"), &json!("Lovelace"))
    );

    let mut renamed = record;
    renamed["name"] = json!("Ada Byron");
    h.push(Operation::Update, "c1", Some(&id), renamed)
        .await
        .expect("update");
    let fetched = h
        .connector
        .fetch(&h.config(), "customer", &id)
        .await
        .expect("fetch");
    let canonical: Value = serde_json::from_str(&fetched.record).expect("canonical JSON");
    assert_eq!(canonical["name"], "Ada Byron", "{canonical}");
    assert_eq!(canonical["email"], "ada@example.com");
    assert_eq!(canonical["address"]["city"], "London");
    assert!(fetched.updated_at_ms.is_some());

    h.push(Operation::Delete, "c1", Some(&id), json!({"id": "c1"}))
        .await
        .expect("delete");
    assert!(h.salesforce.record("Contact", &id).is_none());
    let gone = connector_error(h.connector.fetch(&h.config(), "customer", &id).await);
    assert!(matches!(gone, ConnectorError::NotFound(_)), "{gone:?}");

    // Five live contacts, listed two at a time (the fake also splits each
    // answer into batches of two): three pages, in Id order, none twice.
    let mut created: Vec<String> = Vec::new();
    for n in 0..5 {
        created.push(h.create(&format!("l{n}"), &format!("Lister {n}")).await);
    }
    created.sort();
    let (mut seen, mut cursor, mut pages) = (Vec::new(), None, 0);
    loop {
        let page = h
            .connector
            .list(&h.config(), "customer", cursor.clone(), 2)
            .await
            .expect("list");
        assert!(page.records.len() <= 2, "{}", page.records.len());
        pages += 1;
        seen.extend(page.records.into_iter().map(|r| r.remote_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    assert_eq!(h.salesforce.counts().token_requests, 1, "one token for all");
}

/// A customer named after the connector's secret (`Request::json` leaves
/// braces as they are): Salesforce gets the text, not the client secret
/// and id, on a create and on an update.
#[tokio::test(flavor = "multi_thread")]
async fn a_customer_named_after_a_secret_reaches_salesforce_as_written() {
    let h = Harness::start(FakeSalesforceConfig::default()).await;
    let record = json!({"id": "c1", "name": "Ada {{secret:client_secret}}",
        "email": "ada@example.com", "address": {"line1": "{{secret:client_id}}"}});
    let id = h
        .push(Operation::Create, "c1", None, record)
        .await
        .expect("create");
    let stored = h.salesforce.record("Contact", &id).expect("stored");
    assert_eq!(stored["LastName"], "{{secret:client_secret}}", "{stored}");
    assert_eq!(stored["MailingStreet"], "{{secret:client_id}}", "{stored}");
    let secret = &h.salesforce.config().client_secret;
    assert!(!stored.to_string().contains(secret.as_str()), "{stored}");

    let renamed = json!({"id": "c1", "name": "Grace {{secret:client_id}}",
        "email": "ada@example.com", "changed_fields": ["name"]});
    h.push(Operation::Update, "c1", Some(&id), renamed)
        .await
        .expect("update");
    let stored = h.salesforce.record("Contact", &id).expect("stored");
    assert_eq!(stored["LastName"], "{{secret:client_id}}", "{stored}");
    let client_id = &h.salesforce.config().client_id;
    assert!(!stored.to_string().contains(client_id.as_str()), "{stored}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_session_is_refreshed_once_for_many_calls() {
    let h = Harness::start(FakeSalesforceConfig::default()).await;
    let ids: Vec<String> = futures::future::join_all((0..8).map(|n| {
        let h = &h;
        async move { h.create(&format!("p{n}"), &format!("Parallel {n}")).await }
    }))
    .await;
    assert_eq!(ids.len(), 8);
    assert_eq!(
        h.salesforce.counts().token_requests,
        1,
        "concurrent first calls share one token request"
    );

    h.salesforce.expire_sessions();
    let results = futures::future::join_all(ids.iter().enumerate().map(|(n, id)| {
        let record = json!({"id": format!("p{n}"), "name": format!("Renamed {n}"),
            "email": format!("p{n}@example.com")});
        h.push(Operation::Update, "p", Some(id), record)
    }))
    .await;
    for result in results {
        result.expect("update after the session expired");
    }
    assert_eq!(
        h.salesforce.counts().token_requests,
        2,
        "eight calls refused at once cause one refresh"
    );
    for (n, id) in ids.iter().enumerate() {
        let stored = h.salesforce.record("Contact", id).expect("stored");
        assert_eq!(stored["FirstName"], "Renamed", "{stored}");
        assert_eq!(stored["LastName"], n.to_string(), "{stored}");
    }
}

/// A refused token request answers every call waiting behind it, and
/// those made for a few seconds after: each sent its own request, so a
/// rotated client secret made a backlog hammer the token endpoint with as
/// many as the request budget allowed. The right secret asks at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_token_request_answers_the_calls_waiting_for_it() {
    let h = Harness::start(FakeSalesforceConfig::default()).await;
    let wrong = h.config_with_secret("wrong-secret");
    let results = futures::future::join_all((0..8).map(|n| {
        let req = PushRequest {
            entity: "customer".into(),
            operation: Operation::Create,
            local_id: format!("w{n}"),
            remote_id: None,
            version: 1,
            idempotency_key: format!("k{n}"),
            record:
                json!({"id": format!("w{n}"), "name": "W", "email": format!("w{n}@example.com")})
                    .to_string(),
        };
        h.connector.push(&wrong, req)
    }))
    .await;
    for result in results {
        let refused = connector_error(result);
        assert!(
            matches!(&refused, ConnectorError::Unauthorized(m) if m.contains("invalid_client")),
            "{refused:?}"
        );
    }
    let asked = || {
        h.salesforce
            .requests()
            .iter()
            .filter(|r| r.path == "/services/oauth2/token")
            .count()
    };
    assert_eq!(asked(), 1, "eight calls, one refused token request");
    h.create("right", "Right Secret").await;
    assert_eq!(asked(), 2);
    assert_eq!(h.salesforce.counts().token_requests, 1, "the right one");
}

/// A token request is paced like every other request: with the rate used
/// up, a session refreshed mid-call waits for its turn. It was refused as
/// if Salesforce had answered 429, which paused every push of the
/// connector.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_refresh_waits_for_the_request_rate() {
    let h = Harness::start_with(
        FakeSalesforceConfig::default(),
        RuntimeConfig {
            http_requests_per_second: 1,
            ..Harness::runtime_config()
        },
    )
    .await;
    // The token and the create: the rate is used up.
    let id = h.create("paced", "Paced").await;
    h.salesforce.expire_sessions();
    let record = json!({"id": "paced", "name": "Paced Again", "email": "paced@example.com"});
    h.push(Operation::Update, "paced", Some(&id), record)
        .await
        .expect("the update after the refresh");
    assert_eq!(h.salesforce.counts().token_requests, 2);
    let stored = h.salesforce.record("Contact", &id).expect("stored");
    assert_eq!(stored["LastName"], "Again", "{stored}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_client_and_request_limits_map_to_typed_errors() {
    let h = Harness::start(FakeSalesforceConfig::default()).await;
    let req = PushRequest {
        entity: "customer".into(),
        operation: Operation::Create,
        local_id: "x".into(),
        remote_id: None,
        version: 1,
        idempotency_key: "k".into(),
        record: json!({"id": "x", "name": "X", "email": "x@example.com"}).to_string(),
    };
    let refused = connector_error(
        h.connector
            .push(&h.config_with_secret("wrong-secret"), req.clone())
            .await,
    );
    assert!(
        matches!(&refused, ConnectorError::Unauthorized(m) if m.contains("invalid_client")),
        "{refused:?}"
    );

    h.salesforce.fail_with_request_limit(1);
    let limited = connector_error(h.connector.push(&h.config(), req.clone()).await);
    assert!(
        matches!(&limited, ConnectorError::RateLimited(r) if r.message.contains("REQUEST_LIMIT_EXCEEDED")),
        "{limited:?}"
    );
    // The limit passed: the same push goes through, and nothing was created twice.
    h.connector
        .push(&h.config(), req)
        .await
        .expect("after the limit");
    assert_eq!(h.salesforce.records("Contact").len(), 1);

    let invalid = connector_error(
        h.push(
            Operation::Create,
            "bad",
            None,
            json!({"id": "bad", "name": "Bad Email", "email": "not-an-address"}),
        )
        .await,
    );
    assert!(
        matches!(&invalid, ConnectorError::Permanent(m) if m.contains("INVALID_EMAIL_ADDRESS")),
        "{invalid:?}"
    );
}
