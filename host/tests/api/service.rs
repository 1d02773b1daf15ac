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
    // The reference shares the console's origin: it runs ferry's own
    // scripts alone, is never framed, and runs no inline script (the
    // browser test renders it under this policy).
    let docs = app.request(Method::GET, "/docs").send().await.unwrap();
    let policy = docs.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        policy.contains("script-src 'self';") && policy.contains("frame-ancestors 'none'"),
        "{policy}"
    );
    assert_eq!(docs.headers()["x-frame-options"], "DENY");
    let html = docs.text().await.unwrap();
    assert!(!html.contains("<script>"), "{html}");
    let (status, openapi) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(openapi["paths"]["/api/v1/customers/{id}"]["patch"].is_object());
    assert!(openapi["components"]["schemas"]["Problem"].is_object());
    // What every customer operation may answer, with the headers it sends.
    let delete = &openapi["paths"]["/api/v1/customers/{id}"]["delete"]["responses"];
    assert!(delete["200"]["headers"]["ETag"].is_object(), "{delete:#}");
    assert!(
        delete["200"]["headers"]["Idempotent-Replayed"].is_object(),
        "{delete:#}"
    );
    assert!(
        delete["409"]["headers"]["Retry-After"].is_object(),
        "{delete:#}"
    );
    assert!(
        delete["503"]["headers"]["Retry-After"].is_object(),
        "{delete:#}"
    );
    assert!(delete["408"].is_object(), "{delete:#}");
    // Every operation documents the timeout, and every one that reads the
    // store its busy answer: most routes listed neither.
    for (path, item) in openapi["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let responses = &operation["responses"];
            assert!(responses["408"].is_object(), "{method} {path}");
            if path.starts_with("/api/") || path.starts_with("/webhooks/") {
                assert!(
                    responses["503"]["content"]["application/problem+json"].is_object(),
                    "{method} {path}: {responses:#}"
                );
            }
        }
    }
    // A patch is a JSON merge patch (RFC 7396), under either media type.
    let patch = &openapi["paths"]["/api/v1/customers/{id}"]["patch"]["requestBody"]["content"];
    assert!(
        patch["application/merge-patch+json"].is_object(),
        "{patch:#}"
    );
    assert!(patch["application/json"].is_object(), "{patch:#}");
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

/// A request whose body is still arriving when shutdown begins is served to
/// the end and committed; only then does the app stop. A new connection
/// meanwhile is refused at once (it was taken into the listener's backlog
/// and held until the grace ended).
async fn shutdown_lets_an_in_flight_request_finish(backend: Backend) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut app = spawn_app(backend).await;
    let email = crate::helpers::email("in-flight");
    let body = serde_json::json!({"name": "Half Sent", "email": &email}).to_string();
    let (first, rest) = body.as_bytes().split_at(body.len() / 2);
    let mut stream = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /api/v1/customers HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    // Give the server time to start on the request before shutdown begins.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let address = app.base.trim_start_matches("http://").to_owned();
    let finish_request = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let refused = tokio::net::TcpStream::connect(&address).await.is_err();
        stream.write_all(rest).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        (String::from_utf8_lossy(&response).into_owned(), refused)
    };
    let (stopped, (response, refused)) = tokio::join!(app.shutdown(), finish_request);
    stopped.expect("stopped cleanly");
    assert!(refused, "a new connection during the grace is refused");
    assert!(
        response.starts_with("HTTP/1.1 201"),
        "the in-flight create was served: {response}"
    );

    let reopened = ferry::store::Store::connect(&app.database_url, &Default::default())
        .await
        .unwrap();
    let page = reopened
        .list_customers(&ferry::store::ListCustomers {
            limit: 10,
            starting_after: None,
            email: Some(email.clone()),
        })
        .await;
    reopened.close().await;
    assert_eq!(
        page.unwrap().data.len(),
        1,
        "committed before the app stopped"
    );
}

on_both_backends!(
    probes_and_openapi_answer,
    shutdown_stops_listening_and_returns_ok,
    shutdown_lets_an_in_flight_request_finish
);
