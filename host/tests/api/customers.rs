//! Customer CRUD, ETags, pagination, outbox events and email uniqueness.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, email, on_both_backends, spawn_app, Backend, TestApp};

async fn create_returns_201_with_location_etag_and_outbox_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let address = email("ada");
    let response = app
        .request(Method::POST, "/api/v1/customers")
        .header("x-request-id", "req-create-1")
        .json(&json!({
            "name": "Ada Lovelace",
            "email": format!("  {}  ", address.to_uppercase()),
            "phone": "+44 20 7946 0000",
            "address": {"line1": "12 St James's Square", "city": "London", "country": "gb"},
            "metadata": {"plan": "pro"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["etag"], "\"1\"");
    assert_eq!(response.headers()["x-request-id"], "req-create-1");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    assert!(id.starts_with("cus_"));
    assert_eq!(location, format!("/api/v1/customers/{id}"));
    assert_eq!(created["email"], address, "email is trimmed and lowercased");
    assert_eq!(created["address"]["country"], "GB");
    assert_eq!(created["version"], 1);
    assert_eq!(created["deleted_at"], Value::Null);

    let fetched = app.request(Method::GET, &location).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.headers()["etag"], "\"1\"");
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);

    let events = app.store.outbox_events(id).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].aggregate, "customer");
    assert_eq!(events[0].kind, "created");
    assert_eq!(events[0].version, 1);
    assert_eq!(events[0].correlation_id.as_deref(), Some("req-create-1"));
    // The relay takes it off the queue concurrently (tests/sync).

    // A request id ferry will not keep (too long, or text that could fake
    // a log field) is replaced by one id, which the answer and the stored
    // change share.
    for unusable in ["x".repeat(200), "a b=c".to_owned()] {
        let response = app
            .request(Method::POST, "/api/v1/customers")
            .header("x-request-id", &unusable)
            .json(&json!({"email": email("rid")}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let echoed = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_ne!(echoed, unusable);
        let created: Value = response.json().await.unwrap();
        let events = app
            .store
            .outbox_events(created["id"].as_str().unwrap())
            .await
            .unwrap();
        assert_eq!(events[0].correlation_id.as_deref(), Some(echoed.as_str()));
    }
}

async fn unknown_customer_is_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let missing = "/api/v1/customers/cus_0193f1b2c3d47e8f9a0b1c2d3e4f5a6b";
    let response = app.request(Method::GET, missing).send().await.unwrap();
    assert_problem(response, 404, "customer_not_found").await;
    let response = app
        .request(Method::GET, "/api/v1/customers/not-an-id")
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "customer_not_found").await;
}

async fn patch_merges_fields_and_bumps_version(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app
        .create_ok(&json!({
            "name": "Grace", "email": email("grace"), "phone": "+1 555 0100 ext. 12",
            "address": {"city": "Arlington", "country": "US"},
            "metadata": {"a": "1", "b": "2"}
        }))
        .await;
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": "Grace Hopper", "phone": null, "address": {"line1": "1 Navy Way"}, "metadata": {"a": null, "c": "3"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"2\"");
    let patched: Value = response.json().await.unwrap();
    assert_eq!(patched["name"], "Grace Hopper");
    assert_eq!(patched["phone"], Value::Null, "null clears");
    assert_eq!(patched["email"], created["email"], "absent stays");
    assert_eq!(
        patched["address"],
        json!({"line1": "1 Navy Way", "line2": null, "city": "Arlington", "postal_code": null, "state": null, "country": "US"})
    );
    assert_eq!(patched["metadata"], json!({"b": "2", "c": "3"}));
    assert_eq!(patched["version"], 2);
    assert_eq!(patched["created_at"], created["created_at"]);

    let events = app
        .store
        .outbox_events(created["id"].as_str().unwrap())
        .await
        .unwrap();
    let kinds: Vec<(&str, i64)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.version))
        .collect();
    assert_eq!(kinds, [("created", 1), ("updated", 2)]);

    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"email": null}))
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, 422, "validation_failed").await;
    assert_eq!(problem["errors"][0]["field"], "email");

    // A null under a misspelled name is refused like any unknown field
    // (before: 200, nothing cleared, a new version sent everywhere).
    for (typo, field) in [
        (json!({"phnoe": null}), "phnoe"),
        (json!({"address": {"citty": null}}), "address.citty"),
    ] {
        let response = app
            .request(Method::PATCH, &path)
            .json(&typo)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 422, "validation_failed").await;
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    // An address whose last line is cleared is no address (before: an
    // object of nulls, where an inbound record's reads null).
    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"address": {"line1": null, "city": null, "country": null}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cleared: Value = response.json().await.unwrap();
    assert_eq!(cleared["address"], Value::Null, "{cleared}");
    assert_eq!(cleared["version"], 3, "the typos wrote nothing");
    let empty = app
        .create_ok(&json!({"email": email("no-address"), "address": {}}))
        .await;
    assert_eq!(empty["address"], Value::Null, "{empty}");
}

async fn put_replaces_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app
        .create_ok(&json!({"name": "Linus", "email": email("linus"), "phone": "123", "metadata": {"k": "v"}}))
        .await;
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    let new_email = email("torvalds");
    let response = app
        .request(Method::PUT, &path)
        .header("if-match", "\"1\"")
        .json(&json!({"email": new_email}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let replaced: Value = response.json().await.unwrap();
    assert_eq!(replaced["email"], new_email);
    assert_eq!(replaced["name"], Value::Null);
    assert_eq!(replaced["phone"], Value::Null);
    assert_eq!(replaced["metadata"], json!({}));
    assert_eq!(replaced["version"], 2);
}

async fn delete_is_soft_and_twice_is_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let address = email("del");
    let created = app.create_ok(&json!({"email": address})).await;
    let id = created["id"].as_str().unwrap();
    let path = format!("/api/v1/customers/{id}");

    let response = app.request(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let deleted: Value = response.json().await.unwrap();
    assert_eq!(deleted["version"], 2);
    assert!(deleted["deleted_at"].is_string());

    let response = app.request(Method::GET, &path).send().await.unwrap();
    assert_problem(response, 404, "customer_not_found").await;
    let response = app.request(Method::DELETE, &path).send().await.unwrap();
    assert_problem(response, 404, "customer_not_found").await;
    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 404, "customer_not_found").await;

    let kinds: Vec<String> = app
        .store
        .outbox_events(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["created", "deleted"]);

    // The email of a deleted customer is free again.
    app.create_ok(&json!({"email": address})).await;
}

async fn stale_if_match_is_412(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app.create_ok(&json!({"email": email("etag")})).await;
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    let response = app
        .request(Method::PATCH, &path)
        .header("if-match", "\"1\"")
        .json(&json!({"name": "first"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    for method in [Method::PATCH, Method::PUT, Method::DELETE] {
        let mut request = app
            .request(method.clone(), &path)
            .header("if-match", "\"1\"");
        if method != Method::DELETE {
            request = request.json(&json!({"name": "second", "email": created["email"]}));
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.headers()["etag"],
            "\"2\"",
            "{method}: current ETag is sent back"
        );
        assert_problem(response, 412, "precondition_failed").await;
    }
    // Tags compare byte for byte: ones ferry never issued match nothing,
    // and If-Match compares strongly, so a weak tag matches nothing either.
    // A condition sent empty, `*` inside a list, or bytes that are not
    // text still condition the write: they match nothing.
    for tag in [
        "\"+2\"",
        "\"02\"",
        "\" 2\"",
        "W/\"2\"",
        "\"1\", \"3\"",
        "",
        ",",
        "\"1\", *",
    ] {
        let response = app
            .request(Method::PATCH, &path)
            .header("if-match", tag)
            .json(&json!({"name": "second"}))
            .send()
            .await
            .unwrap();
        assert_problem(response, 412, "precondition_failed").await;
    }
    let response = app
        .request(Method::PATCH, &path)
        .header(
            "if-match",
            reqwest::header::HeaderValue::from_bytes(b"\"\xe9\"").unwrap(),
        )
        .json(&json!({"name": "second"}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 412, "precondition_failed").await;
    let (_, current) = app.get_json(&path).await;
    assert_eq!(current["name"], "first");
    assert_eq!(current["version"], 2);
    let events = app
        .store
        .outbox_events(created["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(events.len(), 2, "refused writes leave no event");

    // A list (RFC 9110), in one header or several: one tag must be current.
    let response = app
        .request(Method::PATCH, &path)
        .header("if-match", "\"1\", \"2\"")
        .json(&json!({"name": "listed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["etag"], "\"3\"");
    let response = app
        .request(Method::DELETE, &path)
        .header("if-match", "\"1\"")
        .header("if-match", "\"3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the second header's tag is current");
}

async fn list_paginates_in_creation_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let created = app
            .create_ok(&json!({"email": email(&format!("page{i}"))}))
            .await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/customers?limit=2".to_owned();
    loop {
        let (status, page) = app.get_json(&path).await;
        assert_eq!(status, 200);
        for customer in page["data"].as_array().unwrap() {
            seen.push(customer["id"].as_str().unwrap().to_owned());
        }
        if !page["has_more"].as_bool().unwrap() {
            assert_eq!(page["next_cursor"], Value::Null);
            break;
        }
        path = format!(
            "/api/v1/customers?limit=2&starting_after={}",
            page["next_cursor"].as_str().unwrap()
        );
    }
    assert_eq!(seen, ids);

    let (status, past_end) = app
        .get_json(&format!("/api/v1/customers?starting_after={}", ids[4]))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        past_end,
        json!({"data": [], "has_more": false, "next_cursor": null})
    );

    let (_, all) = app.get_json("/api/v1/customers").await;
    assert_eq!(all["data"].as_array().unwrap().len(), 5);
    assert_eq!(all["has_more"], false);

    let (_, one) = app
        .get_json(&format!(
            "/api/v1/customers?email={}",
            ids_email(&all, 3).to_uppercase()
        ))
        .await;
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    assert_eq!(one["data"][0]["id"], ids[3].as_str());

    // A parameter given twice: the handler read the last, a proxy's rule
    // or a log may read the first.
    for bad in [
        "limit=0",
        "limit=201",
        "limit=ten",
        "starting_after=nope",
        "limit=2&limit=3",
        "email=a@example.com&email=b@example.com",
    ] {
        let response = app
            .request(Method::GET, &format!("/api/v1/customers?{bad}"))
            .send()
            .await
            .unwrap();
        assert_problem(response, 422, "validation_failed").await;
    }
}

fn ids_email(page: &Value, index: usize) -> String {
    page["data"][index]["email"].as_str().unwrap().to_owned()
}

async fn duplicate_email_is_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let address = email("dup");
    app.create_ok(&json!({"email": address})).await;
    let response = app.create(&json!({"email": address.to_uppercase()})).await;
    assert_problem(response, 409, "email_taken").await;

    // One address written several ways: `typed` is stored as `stored`,
    // and each of `others` is then taken.
    let (local, _) = address.split_once('@').unwrap();
    let one_address = |typed: String, stored: String, others: Vec<String>| {
        let app = &app;
        async move {
            let created = app.create_ok(&json!({ "email": typed })).await;
            assert_eq!(created["email"], stored);
            for other in others {
                let response = app.create(&json!({ "email": other })).await;
                assert_problem(response, 409, "email_taken").await;
            }
        }
    };
    // `é` composed and decomposed, the domain in Unicode and in its ASCII
    // (punycode) form.
    one_address(
        format!("{local}-ren\u{e9}@b\u{fc}cher.example"),
        format!("{local}-ren\u{e9}@xn--bcher-kva.example"),
        vec![format!("{local}-RENE\u{301}@xn--bcher-kva.example")],
    )
    .await;
    // A capital sigma ending a word lowercases as any other (`str`'s
    // lowercasing made it a final `ς`: two customers of one address), and
    // a final sigma typed so is the same address.
    one_address(
        format!("{local}-\u{391}\u{3a3}@example.com"),
        format!("{local}-\u{3b1}\u{3c3}@example.com"),
        vec![
            format!("{local}-\u{3b1}\u{3c3}@example.com"),
            format!("{local}-\u{3b1}\u{3c2}@example.com"),
        ],
    )
    .await;

    let other = app.create_ok(&json!({"email": email("other")})).await;
    let path = format!("/api/v1/customers/{}", other["id"].as_str().unwrap());
    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"email": address}))
        .send()
        .await
        .unwrap();
    assert_problem(response, 409, "email_taken").await;
}

async fn concurrent_creates_with_one_email_yield_one_customer(backend: Backend) {
    let app = spawn_app(backend).await;
    for round in 0..5 {
        let address = email(&format!("race{round}"));
        let body = json!({"email": address});
        let (a, b) = tokio::join!(app.create(&body), app.create(&body));
        let mut statuses = [a.status().as_u16(), b.status().as_u16()];
        statuses.sort_unstable();
        assert_eq!(statuses, [201, 409], "round {round}");
        let (_, page) = app
            .get_json(&format!("/api/v1/customers?email={address}"))
            .await;
        assert_eq!(page["data"].as_array().unwrap().len(), 1);
    }
}

/// Many creates at once (they are committed as groups): one
/// taken email fails alone, every other create is written once with its
/// outbox event, and a keyed create replays its stored answer. With no
/// connector taking part the relay looks only every 250 ms, and still takes
/// every change off the queue.
async fn a_burst_of_creates_answers_each_on_its_own(backend: Backend) {
    let app = spawn_app(backend).await;
    let taken = email("taken");
    app.create_ok(&json!({"email": taken})).await;
    let mut bodies: Vec<Value> = (0..40)
        .map(|i| json!({"email": email(&format!("burst{i}"))}))
        .collect();
    bodies[17] = json!({"email": taken});
    let responses = futures::future::join_all(bodies.iter().enumerate().map(|(i, body)| {
        app.request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", format!("burst-key-{i}"))
            .json(body)
            .send()
    }))
    .await;
    for (i, response) in responses.into_iter().enumerate() {
        let response = response.unwrap();
        if i == 17 {
            assert_problem(response, 409, "email_taken").await;
            continue;
        }
        assert_eq!(response.status(), 201, "create {i}");
        let created: Value = response.json().await.unwrap();
        let id = created["id"].as_str().unwrap();
        assert_eq!(
            app.store.outbox_events(id).await.unwrap().len(),
            1,
            "create {i}"
        );
        let again = app
            .request(Method::POST, "/api/v1/customers")
            .header("idempotency-key", format!("burst-key-{i}"))
            .json(&bodies[i])
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(
            again.json::<Value>().await.unwrap(),
            created,
            "create {i} replayed"
        );
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !app.store.unpublished_outbox(100).await.unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relay left changes on the queue"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Writes without `If-Match` to one customer at once all apply, one after
/// the other (docs/api.md: retried on the fresh record); on PostgreSQL
/// some used to lose the race five times and answer 500.
async fn concurrent_patches_without_if_match_all_apply(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app.create_ok(&json!({"email": email("busy")})).await;
    let path = format!("/api/v1/customers/{}", created["id"].as_str().unwrap());
    let patches = (0..16).map(|i| {
        app.request(Method::PATCH, &path)
            .json(&json!({"metadata": {format!("k{i}"): "v"}}))
            .send()
    });
    for response in futures::future::join_all(patches).await {
        let response = response.unwrap();
        let status = response.status();
        assert_eq!(status, 200, "{}", response.text().await.unwrap_or_default());
    }
    let (_, after) = app.get_json(&path).await;
    assert_eq!(after["version"], 17, "{after}");
    assert_eq!(after["metadata"].as_object().map(|m| m.len()), Some(16));
}

/// Runs `sql` with `binds` on the app's database, behind the API's back.
async fn execute_raw(app: &TestApp, backend: Backend, sql: &str, binds: &[&str]) {
    use sqlx::Connection;
    match backend {
        Backend::Postgres => {
            let mut db = sqlx::PgConnection::connect(&app.database_url)
                .await
                .unwrap();
            let mut query = sqlx::query(sql);
            for bind in binds {
                query = query.bind(*bind);
            }
            query.execute(&mut db).await.unwrap();
        }
        Backend::Sqlite => {
            let mut db = sqlx::SqliteConnection::connect(&app.database_url)
                .await
                .unwrap();
            let mut query = sqlx::query(sql);
            for bind in binds {
                query = query.bind(*bind);
            }
            query.execute(&mut db).await.unwrap();
        }
    }
}

/// A request's empty metadata value is refused (Stripe takes it as
/// removing the key: it never reached Stripe, and every reconciliation
/// found the two different), in a create, a replace and a patch; so is a
/// blank one (a sync's merge took it for none, and a remote's edit of any
/// field dropped it everywhere). One stored before is kept: a patch of
/// another field still applies.
async fn an_empty_metadata_value_is_refused_as_sent_and_kept_as_stored(backend: Backend) {
    let app = spawn_app(backend).await;
    let customer = app
        .create_ok(&json!({"email": email("empty-meta"), "metadata": {"plan": "pro"}}))
        .await;
    let id = customer["id"].as_str().unwrap();
    let path = format!("/api/v1/customers/{id}");
    for (method, body) in [
        (Method::PATCH, json!({"metadata": {"plan": ""}})),
        (Method::PATCH, json!({"metadata": {"plan": " \n"}})),
        (
            Method::PUT,
            json!({"email": email("empty-meta"), "metadata": {"plan": ""}}),
        ),
    ] {
        let response = app
            .request(method.clone(), &path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 422, "validation_failed").await;
        assert_eq!(
            problem["errors"][0]["field"], "metadata.plan",
            "{method}: {problem}"
        );
    }
    execute_raw(
        &app,
        backend,
        r#"UPDATE customers SET metadata = '{"plan": ""}' WHERE id = $1"#,
        &[id],
    )
    .await;
    let response = app
        .request(Method::PATCH, &path)
        .json(&json!({"name": "Still Writable"}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let patched: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["metadata"]["plan"], "", "{patched}");
}

/// A PATCH that does not name `email` keeps the stored one as it is. An
/// email stored before emails were kept in NFC, whose NFC form is another
/// live customer's, stays in its old form (`renormalise_emails`, for a
/// person to merge); every PATCH of that customer, of any field, was
/// refused 409 `email_taken` for the email it never sent (and 422 for one
/// today's rules refuse).
async fn a_patch_without_email_keeps_the_stored_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (nfc, nfd) = (
        format!("ren\u{e9}-{tag}@example.com"),
        format!("rene\u{301}-{tag}@example.com"),
    );
    app.create_ok(&json!({"email": nfc, "name": "Kept in NFC"}))
        .await;
    let older = app.create_ok(&json!({"email": email("older")})).await;
    let id = older["id"].as_str().unwrap();
    // Stores `email` behind ferry's back, then patches `patch`: the answer.
    let stored_then_patched = |email: String, patch: Value| {
        let app = &app;
        async move {
            execute_raw(
                app,
                backend,
                "UPDATE customers SET email = $1 WHERE id = $2",
                &[&email, id],
            )
            .await;
            let response = app
                .request(Method::PATCH, &format!("/api/v1/customers/{id}"))
                .json(&patch)
                .send()
                .await
                .unwrap();
            let status = response.status();
            let patched: Value = response.json().await.unwrap();
            assert_eq!(status, 200, "{patched}");
            patched
        }
    };
    let patched = stored_then_patched(nfd.clone(), json!({"name": "Renamed"})).await;
    assert_eq!(patched["name"], "Renamed");
    assert_eq!(patched["email"], nfd.as_str(), "the stored form kept");

    // Nor is it judged again: one stored before today's rules refused it
    // (an invisible combining grapheme joiner) made every PATCH 422 naming
    // `email`, a field the client never sent.
    let invisible = format!("ada\u{34f}-{tag}@example.com");
    let patched = stored_then_patched(invisible.clone(), json!({"phone": "+15550000009"})).await;
    assert_eq!(patched["phone"], "+15550000009");
    assert_eq!(patched["email"], invisible.as_str(), "kept byte for byte");

    // A client sending back what it read, the email as stored: by PATCH
    // naming it, and by PUT of the whole record (both answered 409 for the
    // older form, and 422 for the invisible one).
    for stored in [nfd.clone(), invisible.clone()] {
        let patched = stored_then_patched(
            stored.clone(),
            json!({"email": stored.as_str(), "name": "Sent back"}),
        )
        .await;
        assert_eq!(patched["name"], "Sent back");
        assert_eq!(patched["email"], stored.as_str());
        let mut read = app
            .request(Method::GET, &format!("/api/v1/customers/{id}"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        let whole: serde_json::Map<String, Value> =
            ["email", "name", "phone", "address", "metadata"]
                .iter()
                .map(|field| (field.to_string(), read[*field].take()))
                .collect();
        let mut whole = Value::Object(whole);
        whole["name"] = json!("Replaced");
        let response = app
            .request(Method::PUT, &format!("/api/v1/customers/{id}"))
            .json(&whole)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let replaced: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{replaced}");
        assert_eq!(replaced["name"], "Replaced");
        assert_eq!(replaced["email"], stored.as_str(), "kept byte for byte");
    }
    // A new email is judged as ever: another customer's is taken, and a
    // bad one is named beside another field's problem.
    let response = app
        .request(Method::PUT, &format!("/api/v1/customers/{id}"))
        .json(&json!({"email": nfc}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let response = app
        .request(Method::PUT, &format!("/api/v1/customers/{id}"))
        .json(&json!({"email": "not an email", "phone": "call me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(
        fields.contains(&"email") && fields.contains(&"phone"),
        "{problem}"
    );
}

on_both_backends!(
    an_empty_metadata_value_is_refused_as_sent_and_kept_as_stored,
    a_patch_without_email_keeps_the_stored_one,
    concurrent_patches_without_if_match_all_apply,
    a_burst_of_creates_answers_each_on_its_own,
    create_returns_201_with_location_etag_and_outbox_event,
    unknown_customer_is_404,
    patch_merges_fields_and_bumps_version,
    put_replaces_every_field,
    delete_is_soft_and_twice_is_404,
    stale_if_match_is_412,
    list_paginates_in_creation_order,
    duplicate_email_is_409,
    concurrent_creates_with_one_email_yield_one_customer,
);
