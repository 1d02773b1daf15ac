//! Inbound paths beyond the happy one: the `unlink` and `ignore` policies
//! for remote deletes, and an inbound event that cannot apply because its
//! re-fetch fails: it retries, dead-letters in the same view as outbound
//! dead letters, and applies once replayed after the cause is fixed.

use std::time::Duration;

use ferry_test_support::fault_proxy::FaultProxy;
use ferry_test_support::localstripe::LocalStripe;
use serde_json::{json, Value};

use crate::helpers::{email, spawn_sync_app, Backend, Setup, SyncApp, STRIPE_KEY, WEBHOOK_SECRET};
use crate::inbound::{deliver, event, stripe_customer_json, stripe_signature};

/// Waits until the inbox event `event_id` of `remote_id` is in `state`;
/// its detail.
async fn wait_event(app: &SyncApp, remote_id: &str, event_id: &str, state: &str) -> String {
    let reached =
        |e: &ferry::store::inbox::InboxEvent| e.event_id == event_id && e.state.as_str() == state;
    let events = app
        .wait_inbox(remote_id, |events| events.iter().any(reached))
        .await;
    let event = events.into_iter().find(reached).expect("reached");
    event.detail.unwrap_or_default()
}

async fn signed(app: &SyncApp, body: &str) {
    let (status, reply) = deliver(app, body, &stripe_signature(body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200, "{reply}");
}

/// A Stripe customer deleted remotely: under `unlink` the customer stays
/// and its link is marked deleted; under `ignore` nothing changes at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_deletes_follow_the_unlink_and_ignore_policies() {
    let stripe = LocalStripe::start().expect("localstripe");
    for policy in ["unlink", "ignore"] {
        let mut setup = Setup::new(Backend::Sqlite, &stripe.url());
        setup.extra = json!({"inbound_delete_policy": policy});
        let app = spawn_sync_app(setup).await;
        let address = email(&format!("policy-{policy}"));
        let remote_id = format!("cus_{policy}{}", uuid::Uuid::new_v4().simple());
        let created = chrono::Utc::now().timestamp() - 10;
        let customer = stripe_customer_json(&remote_id, &address, "Deleted Remotely");
        signed(
            &app,
            &event("evt_c", "customer.created", created, customer.clone()),
        )
        .await;
        let local = app.wait_customer_by_email(&address).await;
        let id = local["id"].as_str().expect("id").to_owned();

        signed(
            &app,
            &event("evt_d", "customer.deleted", created + 1, customer),
        )
        .await;
        let (state, detail) = match policy {
            "unlink" => ("applied", "unlinked (policy)"),
            _ => ("skipped", "remote deletes are ignored (policy)"),
        };
        assert_eq!(
            wait_event(&app, &remote_id, "evt_d", state).await,
            detail,
            "{policy}"
        );
        let still = app.customer_by_email(&address).await;
        assert_eq!(
            still.as_ref().map(|c| &c["id"]),
            Some(&json!(id)),
            "{policy}: the customer stays"
        );
        let status = app.sync_status(&id).await;
        let link = status["connectors"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["connector"] == "stripe"))
            .cloned()
            .expect("stripe link");
        assert_eq!(link["remote_id"], remote_id.as_str(), "{policy}: {link}");
        assert_eq!(
            link["remote_deleted"],
            policy == "unlink",
            "{policy}: {link}"
        );
        assert_eq!(status["version"], 1, "{policy}: no local change");
        if policy == "unlink" {
            // The next local change creates a new Stripe record, as the
            // policy promises (it used to update the deleted one: 404, a
            // dead letter, every time).
            app.patch(&id, json!({"name": "Back In Stripe"})).await;
            let relinked = app
                .wait_link(&id, Duration::from_secs(30), |l| {
                    l["state"] == "synced" && l["remote_id"] != remote_id.as_str()
                })
                .await;
            assert_eq!(relinked["remote_deleted"], false, "{relinked}");
            let fresh = relinked["remote_id"].as_str().expect("a new record");
            let in_stripe = crate::helpers::stripe_customer(&stripe.url(), fresh)
                .await
                .expect("created in Stripe");
            assert_eq!(in_stripe["name"], "Back In Stripe", "{in_stripe}");
        }
    }
}

/// A same-second update needs a re-fetch from Stripe, and Stripe is down:
/// the event retries, then dead-letters (`direction: inbound`, in the same
/// list as outbound ones). Once Stripe is back, replaying it applies the
/// current Stripe state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_failures_retry_dead_letter_and_replay() {
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = FaultProxy::start(&stripe.url()).await.expect("proxy");
    let app = spawn_sync_app(Setup::new(Backend::Sqlite, &proxy.url())).await;
    let address = email("inbound-dead");
    let http = reqwest::Client::new();
    let remote: Value = http
        .post(format!("{}/v1/customers", stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .form(&[("name", "Before Outage"), ("email", address.as_str())])
        .send()
        .await
        .expect("localstripe")
        .json()
        .await
        .expect("json");
    let remote_id = remote["id"].as_str().expect("id").to_owned();
    let created = remote["created"].as_i64().expect("created");
    signed(
        &app,
        &event("evt_1", "customer.created", created, remote.clone()),
    )
    .await;
    let local = app.wait_customer_by_email(&address).await;
    let id = local["id"].as_str().expect("id").to_owned();

    proxy.set_down(true);
    let mut renamed = remote.clone();
    renamed["name"] = json!("Stale Payload");
    signed(&app, &event("evt_2", "customer.updated", created, renamed)).await;
    wait_event(&app, &remote_id, "evt_2", "dead").await;
    let (status, letters) = app
        .send(reqwest::Method::GET, "/api/v1/dead-letters", None)
        .await;
    assert_eq!(status, 200, "{letters}");
    let letter = letters["data"]
        .as_array()
        .and_then(|d| d.iter().find(|l| l["customer_id"] == id.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("an inbound dead letter for {id}: {letters:#}"));
    assert_eq!(letter["direction"], "inbound", "{letter}");
    assert_eq!(letter["connector"], "stripe", "{letter}");
    assert!(letter["attempts"].as_i64() >= Some(2), "retried: {letter}");

    // Stripe is back, and holds a newer name than the event's payload.
    proxy.set_down(false);
    let response = http
        .post(format!("{}/v1/customers/{remote_id}", stripe.url()))
        .bearer_auth(STRIPE_KEY)
        .form(&[("name", "After Outage")])
        .send()
        .await
        .expect("localstripe");
    assert!(response.status().is_success());
    let path = format!(
        "/api/v1/dead-letters/{}/replay",
        letter["id"].as_str().expect("id")
    );
    let (status, replayed) = app.send(reqwest::Method::POST, &path, None).await;
    assert_eq!(
        (status, replayed["replayed"].as_u64()),
        (200, Some(1)),
        "{replayed}"
    );
    wait_event(&app, &remote_id, "evt_2", "applied").await;
    let customer = app.customer_by_email(&address).await.expect("customer");
    assert_eq!(customer["name"], "After Outage", "{customer}");
    assert_eq!(customer["version"], 2, "{customer}");
}
