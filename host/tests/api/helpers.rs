//! `spawn_app()`: a ferry on a random port with a fresh database, and the
//! macro that runs one test body on both backends.

use std::sync::OnceLock;

use ferry::app::App;
use ferry::config::{Config, LogFormat};
use ferry::store::Store;
use ferry_test_support::postgres::PgCluster;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A running ferry and what a test needs to talk to it.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub database_url: String,
    pub token: Option<String>,
    cancel: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The admin token of [`spawn_app_with_token`].
pub const TOKEN: &str = "test-admin-token-0123456789";

fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = ferry::telemetry::init(LogFormat::Text, "info,ferry=debug", std::io::stdout);
        }
    });
}

/// A ferry without an admin token (open, loopback).
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn(backend, None).await
}

/// A ferry that requires [`TOKEN`].
pub async fn spawn_app_with_token(backend: Backend) -> TestApp {
    spawn(backend, Some(TOKEN)).await
}

/// A ferry without an admin token, with `extra` settings over the tests'.
pub async fn spawn_app_with(backend: Backend, extra: Value) -> TestApp {
    spawn_configured(backend, None, extra).await
}

async fn spawn(backend: Backend, token: Option<&str>) -> TestApp {
    spawn_configured(backend, token, json!({})).await
}

async fn spawn_configured(backend: Backend, token: Option<&str>, extra: Value) -> TestApp {
    init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("ferry.db").display()),
        Backend::Postgres => PgCluster::shared()
            .create_database()
            .await
            .expect("test database"),
    };
    let mut overrides = json!({
        "listen": "127.0.0.1:0",
        "database_url": &database_url,
        "database_max_connections": 4,
        "connectors_dir": dir.path().join("connectors"),
        "max_body_bytes": 16 * 1024,
    });
    if let Some(token) = token {
        overrides["admin_token"] = json!(token);
    }
    if let (Some(overrides), Value::Object(extra)) = (overrides.as_object_mut(), extra) {
        overrides.extend(extra);
    }
    let config = Config::from_overrides(overrides).expect("test config");
    let app = App::build(config).await.expect("app builds");
    let base = format!("http://{}", app.address());
    let store = app.state().store.clone();
    let cancel = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        base,
        client: reqwest::Client::new(),
        store,
        database_url,
        token: token.map(str::to_owned),
        cancel,
        server: Some(server),
        _dir: dir,
    }
}

impl TestApp {
    /// Stops the app as SIGTERM would and waits until it has stopped.
    pub async fn shutdown(&mut self) -> anyhow::Result<()> {
        self.cancel.cancel();
        match self.server.take() {
            Some(server) => server.await?,
            None => Ok(()),
        }
    }

    /// A request to `path` (relative to the server), authenticated if the
    /// app has a token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.client.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// POST /api/v1/customers with a JSON body.
    pub async fn create(&self, body: &Value) -> reqwest::Response {
        self.request(reqwest::Method::POST, "/api/v1/customers")
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    /// Creates a customer and returns its JSON.
    pub async fn create_ok(&self, body: &Value) -> Value {
        let response = self.create(body).await;
        assert_eq!(response.status(), 201, "create failed");
        response.json().await.expect("json body")
    }

    /// GET a path and return status and JSON.
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("request sent");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// Asserts a problem+json response with `status` and `code`; returns the body.
pub async fn assert_problem(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let body: Value = response.json().await.expect("problem body");
    assert_eq!(body["code"], code, "body: {body}");
    assert_eq!(body["status"], status);
    assert!(body["type"].as_str().unwrap_or_default().ends_with(code));
    body
}

/// A unique email for a test.
pub fn email(tag: &str) -> String {
    format!("{tag}-{}@example.com", uuid::Uuid::new_v4().simple())
}

/// Defines `mod sqlite` and `mod postgres`, each with one `#[tokio::test]`
/// per listed `async fn(Backend)` of the calling module.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;
