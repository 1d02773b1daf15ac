//! Bad requests: every one answers problem+json with a stable code, never a
//! 500 and never axum's plain-text rejections.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{
    assert_problem, email, on_both_backends, spawn_app, spawn_app_with, spawn_app_with_token,
    Backend, TOKEN,
};

async fn malformed_json_is_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let deep = format!(
        "{{\"email\":\"a@b.co\",\"metadata\":{}1{}}}",
        "[".repeat(200),
        "]".repeat(200)
    );
    for body in [
        "{",
        "{\"email\": }",
        "not json",
        "",
        "{\"email\":\"a@b.co\"} trailing",
        // A number the parser refuses as it reads (docs/api.md).
        "{\"email\":\"a@b.co\",\"name\":1e400}",
    ] {
        let response = app
            .request(Method::POST, "/api/v1/customers")
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        assert_problem(response, 400, "malformed_json").await;
    }
    // A patch is read as a JSON value first: nesting past 128 levels is
    // refused as it reads too.
    let customer = app.create_ok(&json!({"email": email("deep")})).await;
    let path = format!("/api/v1/customers/{}", customer["id"].as_str().unwrap());
    let response = app
        .request(Method::PATCH, &path)
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "malformed_json").await;
}

async fn wrong_shapes_are_422_naming_the_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases = [
        (json!({"email": 42}), "email"),
        (json!({"name": "x"}), "email"),
        (
            json!({"email": email("t"), "metadata": {"k": 1}}),
            "metadata.k",
        ),
        (
            json!({"email": email("t"), "address": {"city": ["x"]}}),
            "address.city",
        ),
        (json!({"email": email("t"), "nickname": "x"}), "nickname"),
        (
            json!({"email": email("t"), "address": {"planet": "Mars"}}),
            "address.planet",
        ),
        (json!({"email": "not-an-email"}), "email"),
        (json!({"email": "a@b"}), "email"),
        (json!({"email": "a b@example.com"}), "email"),
        // Invisible format characters (a byte-order mark, a zero-width
        // space) would make a second customer of an address that looks
        // like one already there.
        (json!({"email": "\u{feff}ada@example.com"}), "email"),
        (json!({"email": "a\u{200b}da@example.com"}), "email"),
        (json!({"email": email("t"), "name": "  "}), "name"),
        (
            json!({"email": email("t"), "name": "n".repeat(257)}),
            "name",
        ),
        (json!({"email": email("t"), "phone": "call me"}), "phone"),
        (
            json!({"email": email("t"), "address": {"country": "GBR"}}),
            "address.country",
        ),
        (
            // Named no longer than a key may be, plus one.
            json!({"email": email("t"), "metadata": {"k".repeat(4_000): "v"}}),
            &*format!("metadata.{}", "k".repeat(41)),
        ),
        (
            json!({"email": email("t"), "metadata": {"k": "v".repeat(501)}}),
            "metadata.k",
        ),
        // Stripe removes a key sent empty: it would never get there.
        (
            json!({"email": email("t"), "metadata": {"k": ""}}),
            "metadata.k",
        ),
        (json!([1, 2]), "body"),
        (json!({"email": email("t"), "name": "a\u{0}b"}), "name"),
        (
            json!({"email": email("t"), "address": {"city": "x\u{7}"}}),
            "address.city",
        ),
        (
            json!({"email": email("t"), "metadata": {"k": "a\u{0}b"}}),
            "metadata.k",
        ),
    ];
    for (body, field) in cases {
        let response = app.create(&body).await;
        let problem = assert_problem(response, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }
    // A long name the client gave is cut where the shape error quotes it
    // (the field, its message and the detail): a megabyte's unknown key
    // or wrongly typed metadata key came back three times over.
    let long = "k".repeat(12_000);
    for body in [
        json!({"email": email("t"), &long: "x"}),
        json!({"email": email("t"), "metadata": {&long: 1}}),
    ] {
        let sent = body.to_string().len();
        let answer = app.create(&body).await;
        assert_eq!(answer.status(), 422);
        let answer = answer.text().await.unwrap();
        assert!(answer.len() < sent / 4, "{} bytes for {sent}", answer.len());
        let problem: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let field = problem["errors"][0]["field"].as_str().unwrap_or_default();
        assert!(field.chars().count() <= 129, "{field}");
    }
    // Too many keys, each one bad too: one error, not several per key.
    let many: serde_json::Map<String, serde_json::Value> =
        (0..51).map(|i| (format!("k[{i}]"), json!("v"))).collect();
    let response = app
        .create(&json!({"email": email("t"), "metadata": many}))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "metadata");
    assert_eq!(problem["errors"].as_array().unwrap().len(), 1, "{problem}");

    let response = app
        .request(Method::GET, "/api/v1/customers?email=a%00b@example.com")
        .send()
        .await
        .unwrap();
    assert_problem(response, 422, "validation_failed").await;

    // A `+` sent unencoded reads as a space: said, not an empty page.
    let response = app
        .request(
            Method::GET,
            "/api/v1/customers?email=ada+billing@example.com",
        )
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "email", "{problem}");
    let response = app
        .request(
            Method::GET,
            "/api/v1/customers?email=ada%2Bbilling@example.com",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A bulk replay's direction is one of the two.
    let response = app
        .request(Method::POST, "/api/v1/dead-letters/replay")
        .json(&json!({"connector": "stripe", "direction": "sideways"}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "direction", "{problem}");

    // A key given twice: refused naming it, for a create as for a patch
    // (which took the last, where a proxy or an audit log reads the first).
    let created = app.create(&json!({"email": email("twice")})).await;
    let created: serde_json::Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    for (method, path, body, field) in [
        (
            Method::POST,
            "/api/v1/customers".to_owned(),
            r#"{"email": "a@example.com", "metadata": {"plan": "pro", "plan": "free"}}"#,
            "metadata.plan",
        ),
        (
            Method::PATCH,
            format!("/api/v1/customers/{id}"),
            r#"{"email": "a@example.com", "email": "b@example.com"}"#,
            "email",
        ),
        (
            Method::PATCH,
            format!("/api/v1/customers/{id}"),
            r#"{"metadata": {"plan": "pro"}, "metadata": null}"#,
            "metadata",
        ),
    ] {
        let response = app
            .request(method, &path)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], field, "{body}: {problem}");
    }

    // A path that is not UTF-8 once decoded: 404 as problem+json.
    for (method, path) in [
        (Method::GET, "/api/v1/customers/%FF"),
        (Method::GET, "/api/v1/conflicts/%C3%28"),
        (Method::POST, "/webhooks/%FF"),
    ] {
        let response = app.request(method, path).send().await.unwrap();
        assert_problem(response, 404, "not_found").await;
    }
}

async fn oversized_body_is_413(backend: Backend) {
    let app = spawn_app(backend).await;
    // The test app's limit is 16 KiB.
    let response = app
        .create(&json!({"email": email("big"), "name": "x".repeat(20_000)}))
        .await;
    assert_problem(response, 413, "payload_too_large").await;
}

async fn non_json_content_type_is_415(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"email": email("ct")}).to_string();
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = app
            .request(Method::POST, "/api/v1/customers")
            .body(body.clone());
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        assert_problem(request.send().await.unwrap(), 415, "unsupported_media_type").await;
    }
    // A merge patch is a PATCH's alone: a replace sent as one would clear
    // every field the client left out, which it meant to keep.
    let created = app
        .create(&json!({"email": email("ct-merge"), "name": "Ada"}))
        .await;
    assert_eq!(created.status(), 201);
    let created: serde_json::Value = created.json().await.unwrap();
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    for method in [Method::PUT, Method::POST] {
        let path = if method == Method::PUT {
            path.as_str()
        } else {
            "/api/v1/customers"
        };
        let response = app
            .request(method, path)
            .header("content-type", "application/merge-patch+json")
            .body(json!({"email": email("ct-merge")}).to_string())
            .send()
            .await
            .unwrap();
        assert_problem(response, 415, "unsupported_media_type").await;
    }
    let kept: serde_json::Value = app
        .request(Method::GET, &path)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["name"], "Ada", "{kept}");
    let response = app
        .request(Method::POST, "/api/v1/customers")
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

async fn unknown_routes_and_methods_are_problems(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app
        .request(Method::GET, "/api/v1/nothing-here")
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "not_found").await;
    let response = app
        .request(Method::DELETE, "/api/v1/customers")
        .send()
        .await
        .unwrap();
    assert_problem(response, 405, "method_not_allowed").await;
}

async fn token_is_required_when_configured(backend: Backend) {
    let app = spawn_app_with_token(backend).await;
    let url = format!("{}/api/v1/customers", app.base);
    let response = app.client.get(&url).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_problem(response, 401, "unauthorized").await;
    let response = app
        .client
        .get(&url)
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "unauthorized").await;
    let response = app
        .client
        .post(&url)
        .json(&json!({"email": email("auth")}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 401, "unauthorized").await;

    let response = app
        .client
        .get(&url)
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    app.create_ok(&json!({"email": email("auth")})).await;
    // Probes stay open for load balancers.
    let response = app
        .client
        .get(format!("{}/healthz", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Every operation the OpenAPI document says needs the admin token refuses
/// a request without it (401 `unauthorized`), whatever its body: each
/// handler takes the token as its first extractor, and a new handler that
/// forgot it would be public.
async fn every_operation_needing_the_token_refuses_one_without(backend: Backend) {
    let app = spawn_app_with_token(backend).await;
    let (status, spec) = app.get_json("/openapi.json").await;
    assert_eq!(status, 200);
    let mut checked = 0;
    for (path, operations) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let needs_token = operation["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("admin_token").is_some()));
            if !needs_token {
                continue;
            }
            // Any value fills a path parameter: the token is checked first.
            let mut concrete = String::new();
            let mut rest = path.as_str();
            while let Some(open) = rest.find('{') {
                let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
                concrete.push_str(&rest[..open]);
                concrete.push_str("cus_00000000000000000000000000000001");
                rest = &rest[close..];
            }
            concrete.push_str(rest);
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("a method");
            let response = app
                .client
                .request(method.clone(), format!("{}{concrete}", app.base))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status().as_u16(),
                401,
                "{method} {path} answered without the token"
            );
            assert_problem(response, 401, "unauthorized").await;
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked} operations checked");
}

/// Open mode (no admin token) answers only requests to a loopback host,
/// and writes from its own origin: a page on a rebound DNS name cannot read
/// the catalog, and a page elsewhere cannot post a form to the API. Tools
/// (no Origin), ferry's own pages and webhooks go through.
async fn open_mode_refuses_other_hosts_and_origins(backend: Backend) {
    let app = spawn_app(backend).await;
    let port = app.base.rsplit(':').next().unwrap().to_owned();
    let url = format!("{}/api/v1/customers", app.base);
    let rebound = app
        .client
        .get(&url)
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_problem(rebound, 403, "cross_site_request").await;
    // The console too: its pages and its sign-in (any token signs in in
    // open mode) under a rebound name, and a form posted from elsewhere.
    let console_page = app
        .client
        .get(format!("{}/console", app.base))
        .header("host", format!("evil.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_problem(console_page, 403, "cross_site_request").await;
    let console_sign_in = app
        .client
        .post(format!("{}/console/sign-in", app.base))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("token=anything")
        .send()
        .await
        .unwrap();
    assert_problem(console_sign_in, 403, "cross_site_request").await;
    let forged = app
        .client
        .post(&url)
        .header("origin", "https://evil.example")
        .json(&json!({"email": email("forged")}))
        .send()
        .await
        .unwrap();
    assert_problem(forged, 403, "cross_site_request").await;
    let form = app
        .client
        .post(format!("{}/api/v1/dead-letters/replay", app.base))
        .header("sec-fetch-site", "cross-site")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("connector=stripe")
        .send()
        .await
        .unwrap();
    assert_problem(form, 403, "cross_site_request").await;
    let other_port = app
        .client
        .post(&url)
        .header("origin", "http://localhost:3000")
        .json(&json!({"email": email("other-port")}))
        .send()
        .await
        .unwrap();
    assert_problem(other_port, 403, "cross_site_request").await;
    // A proxy on this machine forwarding the world's requests under a
    // loopback `Host`: the headers it adds refuse them.
    for (name, value) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("via", "1.1 proxy"),
    ] {
        let proxied = app
            .client
            .get(&url)
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_problem(proxied, 403, "cross_site_request").await;
    }

    let own = app
        .client
        .post(&url)
        .header("origin", app.base.as_str())
        .json(&json!({"email": email("own")}))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 201);
    let local_name = app
        .client
        .get(&url)
        .header("host", format!("localhost:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(local_name.status(), 200);
    app.create_ok(&json!({"email": email("tool")})).await;
    // Webhooks come through tunnels under public names; their signatures
    // decide (here: no such connector).
    let webhook = app
        .client
        .post(format!("{}/webhooks/stripe", app.base))
        .header("host", "abc.tunnel.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(webhook, 404, "connector_not_found").await;
    // But not a browser's post from another origin: a page the operator
    // visits reached every webhook, and a connector that signs nothing
    // (Salesforce's Outbound Messages) took what it posted.
    // A page on a name rebound to 127.0.0.1 sends its own origin.
    let rebound = format!("evil.example:{port}");
    let rebound_origin = format!("http://{rebound}");
    for (name, value, host) in [
        ("origin", "https://evil.example", None),
        ("sec-fetch-site", "cross-site", None),
        ("origin", rebound_origin.as_str(), Some(rebound.as_str())),
    ] {
        let mut forged = app.client.post(format!("{}/webhooks/salesforce", app.base));
        if let Some(host) = host {
            forged = forged.header("host", host);
        }
        let forged = forged
            .header(name, value)
            .header("content-type", "text/plain")
            .body("<soapenv:Envelope/>")
            .send()
            .await
            .unwrap();
        assert_eq!(
            forged.headers()["x-content-type-options"],
            "nosniff",
            "every webhook answer is sandboxed"
        );
        assert_problem(forged, 403, "cross_site_request").await;
    }
}

/// Metadata fits Stripe with the key its connector adds: 49 keys at most,
/// and `ferry_id` is the connector's.
async fn metadata_leaves_room_for_the_connectors_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let keys = |n: usize| -> serde_json::Map<String, serde_json::Value> {
        (0..n).map(|i| (format!("k{i}"), json!("v"))).collect()
    };
    let response = app
        .create(&json!({"email": email("meta50"), "metadata": keys(50)}))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "metadata", "{problem}");
    let response = app
        .create(&json!({"email": email("metaid"), "metadata": {"ferry_id": "mine"}}))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(
        problem["errors"][0]["field"], "metadata.ferry_id",
        "{problem}"
    );
    // Square brackets nest Stripe's form fields: Stripe refuses them in
    // keys, and every push of the customer was dead-lettered.
    let response = app
        .create(&json!({"email": email("metabr"), "metadata": {"tier[gold]": "1"}}))
        .await;
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(
        problem["errors"][0]["field"], "metadata.tier[gold]",
        "{problem}"
    );
    let full = app
        .create_ok(&json!({"email": email("meta49"), "metadata": keys(49)}))
        .await;
    // A patch: refused when it sets more keys than a customer may have
    // (before its merge), or when its merge would; one removing a key to
    // add another fits.
    let path = format!("/api/v1/customers/{}", full["id"].as_str().unwrap());
    let patch = |body: serde_json::Value| app.request(Method::PATCH, &path).json(&body).send();
    let nulls: serde_json::Map<String, serde_json::Value> =
        (0..99).map(|i| (format!("n{i}"), json!(null))).collect();
    for body in [
        json!({"metadata": keys(50)}),
        json!({"metadata": {"k49": "v"}}),
        json!({"metadata": nulls}),
    ] {
        let problem = assert_problem(patch(body).await.unwrap(), 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], "metadata", "{problem}");
    }
    let swapped = patch(json!({"metadata": {"k0": null, "k49": "v"}}))
        .await
        .unwrap();
    assert_eq!(swapped.status(), 200);
    // Many unknown fields (the tests allow 16 KiB bodies, the default is
    // 1 MiB): ten named, the rest counted. Each one answered
    // an error naming it twice, an answer far larger than the request.
    let unknown: serde_json::Map<String, serde_json::Value> =
        (0..1_000).map(|i| (format!("x{i}"), json!(0))).collect();
    let body = serde_json::Value::Object(unknown);
    let sent = body.to_string().len();
    let response = patch(body).await.unwrap();
    assert_eq!(response.status(), 422);
    let answer = response.text().await.unwrap();
    assert!(
        answer.len() < sent / 10,
        "{} bytes for {sent}",
        answer.len()
    );
    let problem: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let errors = problem["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 11, "{problem}");
    assert_eq!(
        errors[10]["message"], "990 more unknown fields",
        "{problem}"
    );
}

on_both_backends!(
    metadata_leaves_room_for_the_connectors_key,
    open_mode_refuses_other_hosts_and_origins,
    malformed_json_is_400,
    wrong_shapes_are_422_naming_the_field,
    oversized_body_is_413,
    non_json_content_type_is_415,
    unknown_routes_and_methods_are_problems,
    token_is_required_when_configured,
    every_operation_needing_the_token_refuses_one_without,
);

/// A customer's row locked by another session (an operator's transaction
/// left open, a stuck process): a write to it fails after
/// `database_lock_timeout` with 503 `store_busy` and `Retry-After`, instead
/// of holding the request and its pooled connection for as long as the
/// lock stays; nothing was written, and the same request succeeds once the
/// lock is gone.
#[tokio::test]
async fn postgres_a_row_locked_elsewhere_is_503_store_busy() {
    use sqlx::Connection;
    let app = spawn_app_with(Backend::Postgres, json!({"database_lock_timeout": "300ms"})).await;
    let customer = app
        .create_ok(&json!({"email": email("locked"), "name": "Before"}))
        .await;
    let id = customer["id"].as_str().unwrap();
    let mut other = sqlx::PgConnection::connect(&app.database_url)
        .await
        .expect("a second session");
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SELECT 1 FROM customers WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut other)
        .await
        .unwrap();

    let path = format!("/api/v1/customers/{id}");
    let patch = || {
        app.request(Method::PATCH, &path)
            .json(&json!({"name": "After"}))
            .send()
    };
    let response = patch().await.unwrap();
    assert_eq!(
        response.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_problem(response, 503, "store_busy").await;
    // A patch of the wrong shape is answered without the row: it waited
    // for the lock (and held a pooled connection) to say 422.
    let wrong = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": 5}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(wrong, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "name", "{problem}");
    let (_, unchanged) = app.get_json(&path).await;
    assert_eq!(
        (unchanged["name"].as_str(), unchanged["version"].as_i64()),
        (Some("Before"), Some(1))
    );

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let response = patch().await.unwrap();
    assert_eq!(response.status(), 200);
    let (_, changed) = app.get_json(&path).await;
    assert_eq!(
        (changed["name"].as_str(), changed["version"].as_i64()),
        (Some("After"), Some(2))
    );
}
