//! The fault proxy in front of a real localstripe and of the fake Stripe:
//! forwarding, each fault kind, going down, and the request log.

use std::time::Duration;

use ferry_test_support::fake_remote::FakeStripe;
use ferry_test_support::fault_proxy::{Fault, FaultProxy, Match};
use ferry_test_support::localstripe::LocalStripe;

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn forwards_everything_to_localstripe() {
    let stripe = LocalStripe::start().unwrap();
    let proxy = FaultProxy::start(&stripe.url()).await.unwrap();
    let resp = client()
        .post(format!("{}/v1/customers", proxy.url()))
        .bearer_auth("sk_test_ferry")
        .header("Idempotency-Key", "key-1")
        .form(&[("name", "Ada"), ("metadata[ferry_id]", "f1")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let created: serde_json::Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["name"], "Ada");

    // Read it back through the proxy (path and query pass through) and
    // directly: the write reached localstripe.
    let via_proxy: serde_json::Value = client()
        .get(format!("{}/v1/customers?limit=10", proxy.url()))
        .bearer_auth("sk_test_ferry")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(via_proxy["data"][0]["id"], id.as_str());
    let direct = client()
        .get(format!("{}/v1/customers/{id}", stripe.url()))
        .bearer_auth("sk_test_ferry")
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 200);

    let log = proxy.requests();
    assert_eq!(log.len(), 2);
    assert!(log[0].is("POST", "/v1/customers"));
    assert_eq!(log[0].header("idempotency-key"), Some("key-1"));
    assert_eq!(log[0].header("Authorization"), Some("Bearer sk_test_ferry"));
    assert_eq!(
        log[0].form_value("metadata[ferry_id]").as_deref(),
        Some("f1")
    );
    assert!(log[0].forwarded);
    assert_eq!(log[0].answered_status, Some(200));
    assert_eq!(log[1].query.as_deref(), Some("limit=10"));
}

#[tokio::test]
async fn made_up_answers_are_not_forwarded_and_follow_the_fifo() {
    let fake = FakeStripe::start().await.unwrap();
    let proxy = FaultProxy::start(&fake.url()).await.unwrap();
    proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::rate_limited(1),
    );
    proxy.push(
        Match::request("POST", "/v1/customers"),
        Fault::stripe_error(400, "invalid_request_error", "Invalid email address"),
    );
    proxy.push(Match::path("/v1/customers"), Fault::status(500));
    assert_eq!(proxy.pending_faults(), 3);

    // A GET does not match the first two faults: it takes the third.
    let get = client()
        .get(format!("{}/v1/customers/cus_x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 500);

    let post = |name: &'static str| {
        let url = format!("{}/v1/customers", proxy.url());
        async move {
            client()
                .post(url)
                .form(&[("name", name)])
                .send()
                .await
                .unwrap()
        }
    };
    let first = post("a").await;
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after"], "1");
    let body: serde_json::Value = first.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let second = post("b").await;
    assert_eq!(second.status(), 400);
    let body: serde_json::Value = second.json().await.unwrap();
    assert_eq!(body["error"]["message"], "Invalid email address");
    let third = post("c").await;
    assert_eq!(third.status(), 200);
    assert_eq!(proxy.pending_faults(), 0);

    assert_eq!(fake.counts().creates, 1, "only the unfaulted POST arrived");
    let log = proxy.requests_to("POST", "/v1/customers");
    let outcome: Vec<_> = log
        .iter()
        .map(|r| (r.forwarded, r.answered_status))
        .collect();
    assert_eq!(
        outcome,
        vec![(false, Some(429)), (false, Some(400)), (true, Some(200))]
    );
}

#[tokio::test]
async fn forward_then_delay_applies_the_write_but_times_the_client_out() {
    let fake = FakeStripe::start().await.unwrap();
    let proxy = FaultProxy::start(&fake.url()).await.unwrap();
    proxy.push_any(Fault::ForwardThenDelay(Duration::from_secs(3)));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let err = impatient
        .post(format!("{}/v1/customers", proxy.url()))
        .header("Idempotency-Key", "k")
        .form(&[("name", "Ada"), ("metadata[ferry_id]", "f1")])
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(fake.counts().creates, 1, "the write happened upstream");
    let log = proxy.requests();
    assert!(log[0].forwarded);
    assert_eq!(log[0].answered_status, Some(200));

    // The retry with the same key is answered at once, from the upstream's
    // idempotency cache.
    let retry = client()
        .post(format!("{}/v1/customers", proxy.url()))
        .header("Idempotency-Key", "k")
        .form(&[("name", "Ada"), ("metadata[ferry_id]", "f1")])
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(fake.counts().creates, 1);
    assert_eq!(fake.counts().replays, 1);
}

#[tokio::test]
async fn hang_never_answers() {
    let fake = FakeStripe::start().await.unwrap();
    let proxy = FaultProxy::start(&fake.url()).await.unwrap();
    proxy.push(Match::request("DELETE", "/v1/customers/"), Fault::Hang);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = impatient
        .delete(format!("{}/v1/customers/cus_1", proxy.url()))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(fake.counts().deletes, 0);
    let log = proxy.requests();
    assert!(!log[0].forwarded);
    assert_eq!(log[0].answered_status, None);
}

#[tokio::test]
async fn down_drops_connections_until_up_again() {
    let fake = FakeStripe::start().await.unwrap();
    let proxy = FaultProxy::start(&fake.url()).await.unwrap();
    // One client throughout, so a kept-alive connection is tested too.
    let client = client();
    let url = format!("{}/health", proxy.url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    proxy.set_down(true);
    let err = client.get(&url).send().await.unwrap_err();
    assert!(!err.is_timeout(), "down must fail fast: {err:?}");
    let fresh = reqwest::Client::new().get(&url).send().await.unwrap_err();
    assert!(fresh.is_request() || fresh.is_connect(), "{fresh:?}");

    proxy.set_down(false);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let seen = proxy
        .wait_for(Duration::from_secs(1), |log| {
            log.iter()
                .filter(|r| r.answered_status == Some(200))
                .count()
                == 2
        })
        .await
        .unwrap();
    assert!(seen.iter().all(|r| r.path == "/health"));
}
