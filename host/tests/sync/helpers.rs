//! `spawn_sync_app()`: a ferry with the Stripe connector loaded and pointed
//! at a given Stripe base URL, with fast retries; and waits on sync state.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use ferry::app::App;
use ferry::config::{Config, LogFormat};
use ferry::store::Store;
use ferry_test_support::localstripe::LocalStripe;
use ferry_test_support::postgres::PgCluster;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The API key ferry sends to localstripe (which accepts any).
pub const STRIPE_KEY: &str = "sk_test_ferry";

/// The signing secret of ferry's Stripe webhook endpoint in tests.
pub const WEBHOOK_SECRET: &str = "whsec_ferry_sync_test";

/// How a test's ferry is set up.
pub struct Setup {
    pub backend: Backend,
    /// Stripe's base URL (localstripe or a proxy in front of it).
    pub stripe_url: Option<String>,
    /// Kafka bootstrap servers: cluster mode.
    pub kafka: Option<String>,
    /// An existing database to share (two replicas); else a fresh one.
    pub database_url: Option<String>,
    /// More config overrides.
    pub extra: Value,
    /// More connectors loaded next to Stripe, each with its configuration.
    pub extra_connectors: Vec<ExtraConnector>,
}

/// A connector component loaded besides Stripe, e.g. the recorder for
/// fan-out tests.
pub struct ExtraConnector {
    /// The manifest name: its `.wasm` file name and its key under `connectors`.
    pub name: String,
    /// The built component.
    pub component: PathBuf,
    /// Its `connectors.{name}` configuration (`settings`, `secrets`, `enabled`).
    pub config: Value,
}

impl Setup {
    pub fn new(backend: Backend, stripe_url: &str) -> Self {
        Self {
            backend,
            stripe_url: Some(stripe_url.to_owned()),
            kafka: None,
            database_url: None,
            extra: json!({}),
            extra_connectors: Vec::new(),
        }
    }
}

pub struct SyncApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    /// The app's sync engine.
    pub sync: ferry::sync::SyncEngine,
    pub database_url: String,
    /// The admin token, when the setup configured one.
    pub token: Option<String>,
    /// `/readyz`'s shared probes.
    pub probes: std::sync::Arc<ferry::api::health::Probes>,
    cancel: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for SyncApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl SyncApp {
    /// Stops the app and waits until it has, its Kafka consumers out of
    /// their group. Dropping only cancels it: a test that then stops its
    /// broker leaves a consumer closing against a broker that is gone, and
    /// librdkafka's close then waits forever, and with it the test
    /// runtime's shutdown.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), &mut self.server).await;
    }
}

fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = ferry::telemetry::init(LogFormat::Text, "info,ferry=debug", std::io::stdout);
        }
    });
}

/// The built Stripe component.
pub fn stripe_component() -> PathBuf {
    ferry_test_support::wasm::component_path("ferry_connector_stripe")
}

/// The built Salesforce component.
pub fn salesforce_component() -> PathBuf {
    ferry_test_support::wasm::component_path("ferry_connector_salesforce")
}

/// The built recorder test connector (tests/guests/recorder).
pub fn recorder_component() -> PathBuf {
    ferry_test_support::wasm::component_path("ferry_test_recorder")
}

/// A fresh database of `backend`: a SQLite file in `dir`, or a database on
/// the shared PostgreSQL cluster.
pub async fn new_database(backend: Backend, dir: &std::path::Path) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("ferry.db").display()),
        Backend::Postgres => PgCluster::shared()
            .create_database()
            .await
            .expect("test database"),
    }
}

pub async fn spawn_sync_app(setup: Setup) -> SyncApp {
    init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let connectors = dir.path().join("connectors");
    std::fs::create_dir_all(&connectors).expect("connectors dir");
    std::fs::copy(stripe_component(), connectors.join("stripe.wasm")).expect("copy stripe.wasm");
    for extra in &setup.extra_connectors {
        std::fs::copy(
            &extra.component,
            connectors.join(format!("{}.wasm", extra.name)),
        )
        .expect("copy an extra connector");
    }
    let database_url = match setup.database_url {
        Some(url) => url,
        None => new_database(setup.backend, dir.path()).await,
    };
    let mut overrides = json!({
        "listen": "127.0.0.1:0",
        "database_url": &database_url,
        "database_max_connections": 8,
        "connectors_dir": connectors,
        "allow_private_hosts": true,
        "master_key": "test-master-key-0123456789abcdef",
        "sync_backoff_base": "100ms",
        "sync_backoff_max": "400ms",
        "sync_max_attempts": 5,
        "connector_call_timeout": "2s",
        "sync_lease": "4s",
        "breaker_failure_threshold": 3,
        "breaker_cooldown": "1s",
    });
    if let Some(url) = &setup.stripe_url {
        overrides["connectors"] = json!({
            "stripe": { "settings": { "api_base": url }, "secrets": { "api_key": STRIPE_KEY, "webhook_secret": WEBHOOK_SECRET } }
        });
    }
    if !setup.extra_connectors.is_empty() {
        if !overrides["connectors"].is_object() {
            overrides["connectors"] = json!({});
        }
        for extra in &setup.extra_connectors {
            overrides["connectors"][&extra.name] = extra.config.clone();
        }
    }
    if let Some(kafka) = &setup.kafka {
        overrides["kafka_brokers"] = json!(kafka);
        overrides["kafka_topic_prefix"] = json!(format!("t{}", uuid::Uuid::new_v4().simple()));
        overrides["kafka_partitions"] = json!(3);
    }
    merge_json(&mut overrides, &setup.extra);
    let token = overrides["admin_token"].as_str().map(str::to_owned);
    let config = Config::from_overrides(overrides).expect("test config");
    let app = App::build(config).await.expect("app builds");
    let base = format!("http://{}", app.address());
    let store = app.state().store.clone();
    let sync = app.state().sync.clone();
    let probes = app.state().probes.clone();
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    SyncApp {
        base,
        client: reqwest::Client::new(),
        store,
        sync,
        database_url,
        token,
        probes,
        cancel,
        server,
        _dir: dir,
    }
}

/// Merges `extra` into `target`, objects key by key (so `extra` can add
/// to `connectors.stripe` without replacing its settings).
fn merge_json(target: &mut Value, extra: &Value) {
    match (target.as_object_mut(), extra.as_object()) {
        (Some(target), Some(extra)) => {
            for (k, v) in extra {
                merge_json(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *target = extra.clone(),
    }
}

impl SyncApp {
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Customer `id` as the API answers it (a problem's body if none).
    pub async fn customer(&self, id: &str) -> Value {
        self.send(
            reqwest::Method::GET,
            &format!("/api/v1/customers/{id}"),
            None,
        )
        .await
        .1
    }

    pub async fn create(&self, body: Value) -> Value {
        let (status, customer) = self
            .send(reqwest::Method::POST, "/api/v1/customers", Some(body))
            .await;
        assert_eq!(status, 201, "create failed: {customer}");
        customer
    }

    pub async fn patch(&self, id: &str, body: Value) -> Value {
        let (status, customer) = self
            .send(
                reqwest::Method::PATCH,
                &format!("/api/v1/customers/{id}"),
                Some(body),
            )
            .await;
        assert_eq!(status, 200, "patch failed: {customer}");
        customer
    }

    pub async fn delete(&self, id: &str) {
        let (status, body) = self
            .send(
                reqwest::Method::DELETE,
                &format!("/api/v1/customers/{id}"),
                None,
            )
            .await;
        assert_eq!(status, 200, "delete failed: {body}");
    }

    pub async fn sync_status(&self, id: &str) -> Value {
        let (status, body) = self
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/customers/{id}/sync"),
                None,
            )
            .await;
        assert_eq!(status, 200, "sync status: {body}");
        body
    }

    /// Waits until the customer's Stripe link satisfies `done`; returns it.
    pub async fn wait_link(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_link_of("stripe", id, timeout, done).await
    }

    /// Waits until the customer's link to `connector` satisfies `done`
    /// (`Value::Null` while there is no link); returns it.
    pub async fn wait_link_of(
        &self,
        connector: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let status = self.sync_status(id).await;
            let link = status["connectors"]
                .as_array()
                .and_then(|links| links.iter().find(|l| l["connector"] == connector))
                .cloned()
                .unwrap_or(Value::Null);
            if done(&link) {
                return link;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "sync of {id} to {connector} did not settle within {timeout:?}: {status:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The live customer with this email, if any.
    pub async fn customer_by_email(&self, address: &str) -> Option<Value> {
        let (_, page) = self
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/customers?email={address}"),
                None,
            )
            .await;
        page["data"].as_array().and_then(|d| d.first().cloned())
    }

    /// Waits until a live customer with this email exists; returns it.
    pub async fn wait_customer_by_email(&self, address: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(customer) = self.customer_by_email(address).await {
                return customer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no customer {address} in ferry"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the inbox holds at least `count` events of the remote
    /// record and none is still waiting to be applied; returns them.
    pub async fn wait_inbox_settled(
        &self,
        connector: &str,
        remote_id: &str,
        count: usize,
    ) -> Vec<ferry::store::inbox::InboxEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = self
                .store
                .inbox_of_remote(connector, remote_id)
                .await
                .expect("inbox");
            let settled = events
                .iter()
                .all(|e| e.state.as_str() == "applied" || e.state.as_str() == "skipped");
            if events.len() >= count && settled {
                return events;
            }
            let seen: Vec<(&str, &str, &str)> = events
                .iter()
                .map(|e| {
                    (
                        e.event_id.as_str(),
                        e.remote_type.as_str(),
                        e.state.as_str(),
                    )
                })
                .collect();
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} settled inbox events of {remote_id} expected: {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Asserts that connector `name` is loaded and enabled.
    pub async fn assert_enabled(&self, name: &str) {
        let (status, connector) = self
            .send(
                reqwest::Method::GET,
                &format!("/api/v1/connectors/{name}"),
                None,
            )
            .await;
        assert_eq!(
            (status, &connector["enabled"]),
            (200, &json!(true)),
            "{connector}"
        );
    }

    /// Has `stripe` send this app its signed webhooks.
    pub async fn receive_stripe_webhooks(&self, stripe: &LocalStripe) {
        stripe
            .register_webhook(
                "ferry",
                &format!("{}/webhooks/stripe", self.base),
                WEBHOOK_SECRET,
                None,
            )
            .await
            .expect("webhook registered");
    }

    /// Stripe record `remote_id`'s inbox events once `done` holds for them
    /// (20 s at most).
    pub async fn wait_inbox(
        &self,
        remote_id: &str,
        done: impl Fn(&[ferry::store::inbox::InboxEvent]) -> bool,
    ) -> Vec<ferry::store::inbox::InboxEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = self
                .store
                .inbox_of_remote("stripe", remote_id)
                .await
                .expect("inbox");
            if done(&events) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the inbox never got there: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Customer `id`'s Stripe link once an attempt of its push has failed.
    pub async fn failed_stripe_link(&self, id: &str) -> ferry::store::SyncLink {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let links = self.store.links_of(id).await.expect("links");
            if let Some(link) = links
                .into_iter()
                .find(|l| l.connector == "stripe" && l.attempts > 0)
            {
                return link;
            }
            assert!(std::time::Instant::now() < deadline, "no failure recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until version `version` of the customer is synced to Stripe.
    pub async fn wait_synced(&self, id: &str, version: i64) -> Value {
        self.wait_link(id, Duration::from_secs(20), |link| {
            link["state"] == "synced" && link["synced_version"].as_i64() >= Some(version)
        })
        .await
    }
}

/// A customer as Stripe holds it (GET /v1/customers/{id}); 404 → None.
pub async fn stripe_customer(stripe_url: &str, remote_id: &str) -> Option<Value> {
    let response = reqwest::Client::new()
        .get(format!("{stripe_url}/v1/customers/{remote_id}"))
        .bearer_auth(STRIPE_KEY)
        .send()
        .await
        .expect("localstripe answers");
    if response.status() == 404 {
        return None;
    }
    let body: Value = response.json().await.expect("json");
    if body["deleted"] == true {
        return None;
    }
    Some(body)
}

/// A write made directly in localstripe (not through a proxy in front of
/// it: ferry did not send it), as the dashboard would; localstripe then
/// sends its signed webhook to the endpoints registered.
pub async fn stripe_write(stripe_url: &str, path: &str, form: &[(&str, &str)]) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{stripe_url}{path}"))
        .bearer_auth(STRIPE_KEY)
        .form(form)
        .send()
        .await
        .expect("localstripe answers");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("json")
}

/// Creates a Stripe customer directly in localstripe (as a person in the
/// dashboard would; no webhook reaches ferry); returns its id.
pub async fn stripe_create(stripe_url: &str, form: &[(&str, &str)]) -> String {
    let body: Value = reqwest::Client::new()
        .post(format!("{stripe_url}/v1/customers"))
        .bearer_auth(STRIPE_KEY)
        .form(form)
        .send()
        .await
        .expect("localstripe answers")
        .json()
        .await
        .expect("json");
    body["id"].as_str().expect("an id").to_owned()
}

/// Stripe customers with this email.
pub async fn stripe_customers_by_email(stripe_url: &str, email: &str) -> Vec<Value> {
    let body: Value = reqwest::Client::new()
        .get(format!("{stripe_url}/v1/customers"))
        .query(&[("email", email), ("limit", "100")])
        .bearer_auth(STRIPE_KEY)
        .send()
        .await
        .expect("localstripe answers")
        .json()
        .await
        .expect("json");
    body["data"].as_array().cloned().unwrap_or_default()
}

/// A unique email for a test.
pub fn email(tag: &str) -> String {
    format!("{tag}-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// Signs in to the console of the ferry at `base` (open mode: any token):
/// a client that does not follow redirects, and the session's cookie.
pub async fn console_session(base: &str) -> (reqwest::Client, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let signed_in = client
        .post(format!("{base}/console/sign-in"))
        .form(&[("next", "/console")])
        .send()
        .await
        .expect("signed in");
    let cookie = signed_in.headers()["set-cookie"]
        .to_str()
        .expect("a cookie")
        .split(';')
        .next()
        .expect("its value")
        .to_owned();
    (client, cookie)
}

/// A console page's HTML, read with a session's `cookie`.
pub async fn console_page(client: &reqwest::Client, cookie: &str, url: &str) -> String {
    client
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("its HTML")
}

/// The CSRF token a console page's forms carry.
pub fn csrf_field(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a csrf field")
        .to_owned()
}

/// Runs `sql`, with `bytes` bound as `$1` if it names it, on a database
/// behind ferry's back.
pub async fn execute_raw(database_url: &str, sql: &str, bytes: &[u8]) {
    let bind = sql.contains("$1");
    if database_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(database_url)
            .await
            .expect("sqlite");
        let query = sqlx::query(sql);
        let query = if bind { query.bind(bytes) } else { query };
        query.execute(&pool).await.expect(sql);
    } else {
        let pool = sqlx::PgPool::connect(database_url).await.expect("postgres");
        let query = sqlx::query(sql);
        let query = if bind { query.bind(bytes) } else { query };
        query.execute(&pool).await.expect(sql);
    }
}
