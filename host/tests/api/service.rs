//! Probes, the OpenAPI document and the docs page.

use reqwest::Method;
use serde_json::Value;

use crate::helpers::{on_both_backends, spawn_app, Backend};

async fn probes_and_openapi_answer(backend: Backend) {
    let app = spawn_app(backend).await;
    for path in ["/healthz", "/readyz", "/docs"] {
        let response = app.request(Method::GET, path).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let (status, openapi) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(openapi["paths"]["/api/v1/customers/{id}"]["patch"].is_object());
    assert!(openapi["components"]["schemas"]["Problem"].is_object());
    let (status, connectors) = app.get_json("/api/v1/connectors").await;
    assert_eq!(status, 200);
    assert_eq!(
        connectors["data"],
        Value::Array(Vec::new()),
        "the test app loads none"
    );
}

async fn shutdown_stops_listening_and_returns_ok(backend: Backend) {
    let mut app = spawn_app(backend).await;
    let created = app
        .create_ok(&serde_json::json!({"email": crate::helpers::email("bye")}))
        .await;
    app.shutdown().await.expect("stopped cleanly");
    let refused = app.client.get(format!("{}/healthz", app.base)).send().await;
    assert!(refused.is_err(), "no longer listening");
    // The pools are closed; what was acknowledged is in the database.
    let reopened = ferry::store::Store::connect(&app.database_url, &Default::default())
        .await
        .unwrap();
    let id = ferry::store::CustomerId::parse(created["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        reopened.get_customer(&id).await.unwrap().email,
        created["email"]
    );
    assert_eq!(reopened.outbox_events(id.as_str()).await.unwrap().len(), 1);
    reopened.close().await;
}

on_both_backends!(
    probes_and_openapi_answer,
    shutdown_stops_listening_and_returns_ok
);
