//! The fake Stripe answers the connector's calls with the shapes it reads.

use std::time::Duration;

use ferry_test_support::fake_remote::{Counts, FakeStripe};

#[tokio::test]
async fn customer_lifecycle_with_idempotency_and_timing() {
    let fake = FakeStripe::start().await.unwrap();
    let http = reqwest::Client::new();
    let create = || {
        http.post(format!("{}/v1/customers", fake.url()))
            .header("Idempotency-Key", "create-1")
            .form(&[
                ("name", "Ada"),
                ("email", "ada@example.com"),
                ("address[city]", "London"),
                ("metadata[tier]", "gold"),
                ("metadata[ferry_id]", "f1"),
            ])
            .send()
    };
    let first: serde_json::Value = create().await.unwrap().json().await.unwrap();
    let id = first["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cus_"));
    assert_eq!(first["object"], "customer");
    assert_eq!(first["address"]["city"], "London");
    assert!(first["address"]["line1"].is_null());
    assert_eq!(first["metadata"]["ferry_id"], "f1");
    assert!(first["phone"].is_null());

    let replay = create().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay, first);
    fake.wait_for_creates(1, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(fake.created_at("f1").is_some());
    assert_eq!(fake.create_times().len(), 1);

    let updated: serde_json::Value = http
        .post(format!("{}/v1/customers/{id}", fake.url()))
        .header("Idempotency-Key", "update-1")
        .form(&[
            ("name", "Ada L"),
            ("email", ""),
            ("address", ""),
            ("metadata[ferry_id]", "f1"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(updated["name"], "Ada L");
    assert!(updated["email"].is_null());
    assert!(updated["address"].is_null());
    assert_eq!(updated["metadata"]["tier"], "gold", "metadata is merged");

    let fetched: serde_json::Value = http
        .get(format!("{}/v1/customers/{id}", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fetched, updated);

    let deleted: serde_json::Value = http
        .delete(format!("{}/v1/customers/{id}", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(deleted["deleted"], true);
    let stub: serde_json::Value = http
        .get(format!("{}/v1/customers/{id}", fake.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stub["deleted"], true);
    let missing = http
        .post(format!("{}/v1/customers/cus_nope", fake.url()))
        .form(&[("name", "x")])
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "resource_missing");

    assert_eq!(
        fake.counts(),
        Counts {
            creates: 1,
            updates: 1,
            deletes: 1,
            retrieves: 2,
            replays: 1,
        }
    );
    assert_eq!(fake.customer_count(), 0);
}

#[tokio::test]
async fn waiting_for_creates_times_out_with_the_count() {
    let fake = FakeStripe::start().await.unwrap();
    let err = fake
        .wait_for_creates(1, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only 0 of 1"), "{err}");
}
