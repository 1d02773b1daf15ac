//! The Stripe connector through the host runtime against a real localstripe:
//! push (create, update, delete), fetch, paged list, and webhook signatures
//! made by localstripe's own sender and by the official Stripe library.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::HeaderMap;
use ferry_runtime::{
    CallError, ChangeKind, Connector, ConnectorConfig, ConnectorError, Operation, PushRequest,
    Runtime, RuntimeConfig, WebhookRequest,
};
use ferry_test_support::localstripe::{official_signature_header, official_verify, LocalStripe};
use secrecy::SecretString;
use serde_json::json;
use tokio::sync::mpsc;

const WEBHOOK_SECRET: &str = "whsec_ferry_test";

fn component() -> &'static [u8] {
    static WASM: OnceLock<Vec<u8>> = OnceLock::new();
    WASM.get_or_init(|| {
        // Built by `make connectors`, like every component the tests load.
        let path = ferry_test_support::wasm::component_path("ferry_connector_stripe");
        std::fs::read(path).expect("read the stripe connector")
    })
}

struct Harness {
    stripe: LocalStripe,
    connector: Arc<Connector>,
    // Owns the engine the connector runs in.
    _runtime: Runtime,
}

impl Harness {
    async fn start() -> Self {
        let stripe = LocalStripe::start().expect("start localstripe");
        let runtime = Runtime::new(RuntimeConfig {
            // localstripe listens on 127.0.0.1 over plain HTTP.
            allow_private_hosts: true,
            max_instances: 8,
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let connector = runtime.load(component()).await.expect("load");
        Self {
            stripe,
            connector,
            _runtime: runtime,
        }
    }

    fn config_with_secret(&self, webhook_secret: &str) -> ConnectorConfig {
        ConnectorConfig {
            settings: BTreeMap::from([("api_base".to_owned(), self.stripe.url())]),
            secrets: BTreeMap::from([
                ("api_key".to_owned(), SecretString::from("sk_test_ferry")),
                (
                    "webhook_secret".to_owned(),
                    SecretString::from(webhook_secret),
                ),
            ]),
        }
    }

    fn config(&self) -> ConnectorConfig {
        self.config_with_secret(WEBHOOK_SECRET)
    }

    async fn push(
        &self,
        operation: Operation,
        local_id: &str,
        remote_id: Option<&str>,
        record: serde_json::Value,
    ) -> Result<ferry_runtime::PushResult, CallError> {
        let req = PushRequest {
            entity: "customer".into(),
            operation,
            local_id: local_id.into(),
            remote_id: remote_id.map(str::to_owned),
            version: 1,
            idempotency_key: format!("{local_id}-{}", uuid::Uuid::new_v4()),
            record: record.to_string(),
        };
        self.connector.push(&self.config(), req).await
    }

    async fn create(&self, local_id: &str, name: &str, email: &str) -> String {
        let record = json!({"id": local_id, "name": name, "email": email});
        self.push(Operation::Create, local_id, None, record)
            .await
            .expect("create")
            .remote_id
    }

    async fn fetch(&self, remote_id: &str) -> Result<serde_json::Value, CallError> {
        let rec = self
            .connector
            .fetch(&self.config(), "customer", remote_id)
            .await?;
        assert_eq!(rec.remote_id, remote_id);
        Ok(serde_json::from_str(&rec.record).expect("canonical JSON"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_update_fetch_and_delete() {
    let h = Harness::start().await;
    let record = json!({
        "id": "c1", "name": "Ada Lovelace", "email": "ada@example.com", "phone": "+442079460000",
        "address": {"line1": "12 St James's Square", "city": "London", "postal_code": "SW1Y 4JH",
            "country": "GB"},
        "metadata": {"tier": "gold"}
    });
    let created = h
        .push(Operation::Create, "c1", None, record)
        .await
        .expect("create");
    assert!(
        created.remote_id.starts_with("cus_"),
        "{}",
        created.remote_id
    );
    let id = created.remote_id;

    let fetched = h.fetch(&id).await.expect("fetch");
    assert_eq!(fetched["name"], "Ada Lovelace");
    assert_eq!(fetched["email"], "ada@example.com");
    assert_eq!(fetched["phone"], "+442079460000");
    assert_eq!(fetched["address"]["city"], "London");
    // ferry's own id travels in Stripe metadata but is not customer data.
    assert_eq!(fetched["metadata"], json!({"tier": "gold"}));

    let raw: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/v1/customers/{id}", h.stripe.url()))
        .bearer_auth("sk_test_ferry")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["metadata"]["ferry_id"], "c1");

    let update = json!({"id": "c1", "name": "Ada King", "email": "ada@analytical.example",
        "metadata": {"tier": "platinum"}});
    let updated = h
        .push(Operation::Update, "c1", Some(&id), update)
        .await
        .expect("update");
    assert_eq!(updated.remote_id, id);
    let fetched = h.fetch(&id).await.expect("fetch after update");
    assert_eq!(fetched["name"], "Ada King");
    assert_eq!(fetched["email"], "ada@analytical.example");
    assert_eq!(fetched["metadata"]["tier"], "platinum");

    let deleted = h
        .push(Operation::Delete, "c1", Some(&id), json!({"id": "c1"}))
        .await
        .expect("delete");
    assert_eq!(deleted.remote_id, id);
    assert!(matches!(
        h.fetch(&id).await,
        Err(CallError::Connector(ConnectorError::NotFound(_)))
    ));
    assert!(matches!(
        h.push(Operation::Delete, "c1", Some(&id), json!({"id": "c1"}))
            .await,
        Err(CallError::Connector(ConnectorError::NotFound(_)))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_pages_through_every_customer() {
    let h = Harness::start().await;
    let mut created = Vec::new();
    for i in 0..5 {
        created.push(
            h.create(
                &format!("c{i}"),
                &format!("Customer {i}"),
                &format!("c{i}@example.com"),
            )
            .await,
        );
    }

    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = h
            .connector
            .list(&h.config(), "customer", cursor.take(), 2)
            .await
            .expect("list");
        pages += 1;
        assert!(page.records.len() <= 2);
        seen.extend(page.records.into_iter().map(|r| r.remote_id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 3);
    let mut expected = created.clone();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_api_key_is_unauthorized() {
    let h = Harness::start().await;
    let mut cfg = h.config();
    // localstripe accepts any key shaped like a secret key, and refuses others.
    cfg.secrets
        .insert("api_key".into(), SecretString::from("pk_test_public"));
    let err = h
        .connector
        .list(&cfg, "customer", None, 2)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CallError::Connector(ConnectorError::Unauthorized(_))),
        "{err:?}"
    );
}

/// A webhook delivery as received by a tiny local endpoint.
struct Delivery {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Delivery {
    fn request(&self) -> WebhookRequest {
        WebhookRequest {
            headers: self.headers.clone(),
            body: self.body.clone(),
        }
    }

    fn event_type(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        v["type"].as_str().unwrap_or_default().to_owned()
    }
}

/// Serves `POST /hook` on 127.0.0.1 and forwards each delivery.
async fn webhook_listener() -> (String, mpsc::UnboundedReceiver<Delivery>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let headers = headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_ascii_lowercase(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                let _ = tx.send(Delivery {
                    headers,
                    body: body.to_vec(),
                });
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, rx)
}

async fn next_delivery(rx: &mut mpsc::UnboundedReceiver<Delivery>, event_type: &str) -> Delivery {
    // localstripe waits a second before sending; allow for a slow machine.
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let d = rx.recv().await.expect("listener stopped");
            if d.event_type() == event_type {
                return d;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {event_type} webhook from localstripe"))
}

fn invalid_signature(result: Result<(), CallError>) -> bool {
    matches!(
        result,
        Err(CallError::Connector(ConnectorError::InvalidSignature(_)))
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn localstripe_signed_webhooks_verify_and_parse() {
    let h = Harness::start().await;
    let (url, mut rx) = webhook_listener().await;
    h.stripe
        .register_webhook("ferry", &url, WEBHOOK_SECRET, None)
        .await
        .expect("register webhook");
    let cfg = h.config();

    let id = h.create("c1", "Grace Hopper", "grace@example.com").await;
    let created = next_delivery(&mut rx, "customer.created").await;
    h.connector
        .verify_webhook(&cfg, created.request())
        .await
        .expect("localstripe's signature verifies");
    let parsed = h
        .connector
        .parse_webhook(&cfg, created.request())
        .await
        .expect("parse");
    assert_eq!(parsed.events.len(), 1);
    let event = &parsed.events[0];
    assert!(event.id.starts_with("evt_"), "{}", event.id);
    assert_eq!(
        (event.kind, event.remote_id.as_str(), event.entity.as_str()),
        (ChangeKind::Upsert, id.as_str(), "customer")
    );
    assert_eq!(event.remote_type, "customer.created");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!((now_ms - event.occurred_at_ms).abs() < 60_000);
    assert_eq!(event.occurred_at_ms % 1000, 0, "seconds → ms");
    let record: serde_json::Value = serde_json::from_str(event.record.as_deref().unwrap()).unwrap();
    assert_eq!(record["email"], "grace@example.com");

    // The official library agrees with localstripe's signature.
    let body = String::from_utf8(created.body.clone()).unwrap();
    let header = created
        .headers
        .iter()
        .find(|(k, _)| k == "stripe-signature")
        .map(|(_, v)| v.clone())
        .expect("localstripe signs");
    assert!(official_verify(&body, &header, WEBHOOK_SECRET).unwrap());

    // Tampered body, wrong secret, missing header.
    let mut tampered = created.request();
    tampered.body = body
        .replace("grace@example.com", "mallory@example.com")
        .into_bytes();
    assert!(invalid_signature(
        h.connector.verify_webhook(&cfg, tampered).await
    ));
    let wrong = h.config_with_secret("whsec_someone_else");
    assert!(invalid_signature(
        h.connector.verify_webhook(&wrong, created.request()).await
    ));
    let mut unsigned = created.request();
    unsigned.headers.retain(|(k, _)| k != "stripe-signature");
    assert!(invalid_signature(
        h.connector.verify_webhook(&cfg, unsigned).await
    ));

    h.push(
        Operation::Update,
        "c1",
        Some(&id),
        json!({"name": "Rear Admiral Hopper", "email": "grace@example.com"}),
    )
    .await
    .expect("update");
    let updated = next_delivery(&mut rx, "customer.updated").await;
    h.connector
        .verify_webhook(&cfg, updated.request())
        .await
        .expect("verify update");
    let parsed = h
        .connector
        .parse_webhook(&cfg, updated.request())
        .await
        .unwrap();
    let record: serde_json::Value =
        serde_json::from_str(parsed.events[0].record.as_deref().unwrap()).unwrap();
    assert_eq!(record["name"], "Rear Admiral Hopper");

    h.push(Operation::Delete, "c1", Some(&id), json!({}))
        .await
        .expect("delete");
    let deleted = next_delivery(&mut rx, "customer.deleted").await;
    h.connector
        .verify_webhook(&cfg, deleted.request())
        .await
        .expect("verify delete");
    let parsed = h
        .connector
        .parse_webhook(&cfg, deleted.request())
        .await
        .unwrap();
    assert_eq!(parsed.events[0].kind, ChangeKind::Delete);
    assert_eq!(parsed.events[0].remote_id, id);
}

#[tokio::test(flavor = "multi_thread")]
async fn official_library_signatures_verify_and_stale_ones_do_not() {
    let h = Harness::start().await;
    let cfg = h.config();
    let body = json!({
        "id": "evt_official", "object": "event", "type": "customer.updated",
        "created": 1_700_000_000, "api_version": "2024-06-20", "livemode": false,
        "data": {"object": {"id": "cus_official", "object": "customer", "name": "Katherine Johnson",
            "email": "kj@example.com", "metadata": {}}},
        "request": {"id": "req_1", "idempotency_key": "c9-v4"}
    })
    .to_string();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let request = |header: String| WebhookRequest {
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("stripe-signature".into(), header),
        ],
        body: body.clone().into_bytes(),
    };

    let fresh = official_signature_header(&body, WEBHOOK_SECRET, now).unwrap();
    h.connector
        .verify_webhook(&cfg, request(fresh.clone()))
        .await
        .expect("the official library's signature verifies");
    let parsed = h
        .connector
        .parse_webhook(&cfg, request(fresh))
        .await
        .unwrap();
    assert_eq!(parsed.events[0].id, "evt_official");
    assert_eq!(parsed.events[0].occurred_at_ms, 1_700_000_000_000);
    assert_eq!(parsed.events[0].origin_key.as_deref(), Some("c9-v4"));

    // Within tolerance on either side is fine; past 300 s is a replay.
    let recent = official_signature_header(&body, WEBHOOK_SECRET, now - 240).unwrap();
    h.connector
        .verify_webhook(&cfg, request(recent))
        .await
        .expect("4 minutes old is within tolerance");
    let stale = official_signature_header(&body, WEBHOOK_SECRET, now - 301).unwrap();
    assert!(invalid_signature(
        h.connector.verify_webhook(&cfg, request(stale)).await
    ));
    let other_secret = official_signature_header(&body, "whsec_other", now).unwrap();
    assert!(invalid_signature(
        h.connector
            .verify_webhook(&cfg, request(other_secret))
            .await
    ));
}
