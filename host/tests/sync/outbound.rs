//! Local change → Stripe, on both backends with the in-process bus.

use ferry::sync::outbound::Outcome;
use ferry_test_support::localstripe::LocalStripe;
use serde_json::json;

use crate::helpers::{email, spawn_sync_app, stripe_customer, Backend, Setup};

async fn create_update_delete_reach_stripe(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let address = json!({"line1": "12 St James's Square", "city": "London", "postal_code": "SW1Y 4JH", "country": "GB"});
    let ada = email("ada");
    let customer = app
        .create(json!({"name": "Ada Lovelace", "email": ada, "phone": "+442079460000", "address": address, "metadata": {"tier": "gold"}}))
        .await;
    let id = customer["id"].as_str().expect("id");

    // create → a Stripe customer with the same fields, and the link stored
    let link = app.wait_synced(id, 1).await;
    let remote_id = link["remote_id"].as_str().expect("linked").to_owned();
    assert!(remote_id.starts_with("cus_"), "{link}");
    let remote = stripe_customer(&stripe.url(), &remote_id)
        .await
        .expect("exists in Stripe");
    assert_eq!(remote["email"], ada.as_str());
    assert_eq!(remote["name"], "Ada Lovelace");
    assert_eq!(remote["phone"], "+442079460000");
    assert_eq!(remote["address"]["city"], "London");
    assert_eq!(remote["metadata"]["tier"], "gold");
    assert_eq!(remote["metadata"]["ferry_id"], id);
    let stored = app
        .store
        .link_by_remote_id("stripe", &remote_id)
        .await
        .expect("store");
    assert_eq!(stored.expect("link by remote id").customer_id, id);

    // update → fields change, same remote record
    app.patch(
        id,
        json!({"name": "Augusta Ada King", "metadata": {"tier": "platinum"}}),
    )
    .await;
    let link = app.wait_synced(id, 2).await;
    assert_eq!(link["remote_id"], remote_id.as_str());
    let remote = stripe_customer(&stripe.url(), &remote_id)
        .await
        .expect("still exists");
    assert_eq!(remote["name"], "Augusta Ada King");
    assert_eq!(remote["metadata"]["tier"], "platinum");

    // delete → removed in Stripe
    app.delete(id).await;
    let link = app.wait_synced(id, 3).await;
    assert_eq!(link["remote_deleted"], true);
    assert!(
        stripe_customer(&stripe.url(), &remote_id).await.is_none(),
        "deleted in Stripe"
    );

    // the history tells the story: three deliveries, nothing else
    let status = app.sync_status(id).await;
    let outcomes: Vec<(String, String)> = status["history"]
        .as_array()
        .expect("history")
        .iter()
        .rev()
        .map(|d| {
            (
                d["operation"].as_str().unwrap_or("").to_owned(),
                d["outcome"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let delivered: Vec<&str> = outcomes
        .iter()
        .filter(|(_, outcome)| outcome == "delivered")
        .map(|(op, _)| op.as_str())
        .collect();
    assert_eq!(delivered, ["create", "update", "delete"], "{status:#}");
}

/// A burst of changes to one customer ends with Stripe holding the last
/// state, one remote customer, and no stale write after a newer one.
async fn bursts_converge_on_the_latest_state(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let address = email("burst");
    let customer = app.create(json!({"email": address, "name": "v1"})).await;
    let id = customer["id"].as_str().expect("id");
    for n in 2..=10 {
        app.patch(id, json!({"name": format!("v{n}")})).await;
    }
    let link = app.wait_synced(id, 10).await;
    let remote = stripe_customer(&stripe.url(), link["remote_id"].as_str().expect("linked"))
        .await
        .expect("exists");
    assert_eq!(remote["name"], "v10");
    let same_email = crate::helpers::stripe_customers_by_email(&stripe.url(), &address).await;
    assert_eq!(
        same_email.len(),
        1,
        "exactly one Stripe customer: {same_email:#?}"
    );
}

/// A connector without configuration is loaded but nothing is pushed, and
/// the API says so; configuring it through the API enables it.
async fn settings_through_the_api(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(backend, &stripe.url());
    setup.stripe_url = None;
    let app = spawn_sync_app(setup).await;
    let (status, connector) = app
        .send(reqwest::Method::GET, "/api/v1/connectors/stripe", None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(connector["enabled"], false);
    assert_eq!(connector["config_source"], "none");

    let (status, problem) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url(), "colour": "blue"}})),
        )
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["code"], "validation_failed");
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"settings.colour"), "{problem}");
    assert!(fields.contains(&"secrets.api_key"), "{problem}");

    let (status, connector) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()}, "secrets": {"api_key": "sk_test_from_api"}})),
        )
        .await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["enabled"], true);
    assert_eq!(connector["config_source"], "api");
    assert_eq!(connector["secrets"], json!(["api_key"]));
    assert!(
        !connector.to_string().contains("sk_test_from_api"),
        "secrets never come back"
    );
    let (_, listed) = app
        .send(reqwest::Method::GET, "/api/v1/connectors", None)
        .await;
    assert!(!listed.to_string().contains("sk_test_from_api"));

    let customer = app.create(json!({"email": email("api-configured")})).await;
    let id = customer["id"].as_str().expect("id");
    app.wait_synced(id, 1).await;

    // The secret is stored sealed, not in clear.
    let configs = app.store.connector_configs().await.expect("configs");
    let sealed = configs[0].sealed_secrets.as_ref().expect("sealed");
    assert!(!String::from_utf8_lossy(sealed).contains("sk_test_from_api"));

    // `null` keeps the value in effect: one secret changes, the other stays.
    let (status, connector) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()}, "secrets": {"api_key": null, "webhook_secret": "whsec_added"}})),
        )
        .await;
    assert_eq!(status, 200, "{connector}");
    assert_eq!(connector["secrets"], json!(["api_key", "webhook_secret"]));
    let configs = app.store.connector_configs().await.expect("configs");
    let box_ =
        ferry::secrets::SecretBox::new(&"test-master-key-0123456789abcdef".to_owned().into());
    let sealed = configs[0].sealed_secrets.as_ref().expect("sealed");
    let opened = box_.open("stripe", sealed).expect("opens");
    assert!(
        box_.open("salesforce", sealed).is_err(),
        "bound to its connector"
    );
    use secrecy::ExposeSecret;
    assert_eq!(
        opened["api_key"].expose_secret(),
        "sk_test_from_api",
        "kept"
    );
    assert_eq!(opened["webhook_secret"].expose_secret(), "whsec_added");
    let customer = app.create(json!({"email": email("api-kept")})).await;
    app.wait_synced(customer["id"].as_str().expect("id"), 1)
        .await;
    // A blob sealed before blobs named their connector (version 1, no
    // associated data) still opens, and the next settings write seals it
    // again, bound to the connector.
    let unbound = {
        use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
        let hkdf =
            hkdf::Hkdf::<sha2::Sha256>::new(Some(b"ferry"), b"test-master-key-0123456789abcdef");
        let mut key = [0u8; 32];
        hkdf.expand(b"ferry connector secrets v1", &mut key)
            .unwrap();
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&key.into());
        let nonce = chacha20poly1305::XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let clear = br#"{"api_key":"sk_test_from_api","webhook_secret":"whsec_added"}"#;
        let ciphertext = cipher.encrypt(&nonce, clear.as_slice()).unwrap();
        [[1u8].as_slice(), &nonce, &ciphertext].concat()
    };
    let mut stored = configs[0].clone();
    stored.sealed_secrets = Some(unbound);
    app.store
        .put_connector_config(&stored, Some(true), None)
        .await
        .expect("stored")
        .expect("live");
    let (status, connector) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()}})),
        )
        .await;
    assert_eq!(status, 200, "{connector}");
    let configs = app.store.connector_configs().await.expect("configs");
    let sealed = configs[0].sealed_secrets.as_ref().expect("sealed");
    assert_eq!(sealed[0], 2, "sealed again, bound");
    let opened = box_.open("stripe", sealed).expect("opens");
    assert_eq!(opened["api_key"].expose_secret(), "sk_test_from_api");
    assert_eq!(opened["webhook_secret"].expose_secret(), "whsec_added");
    let customer = app.create(json!({"email": email("api-rebound")})).await;
    app.wait_synced(customer["id"].as_str().expect("id"), 1)
        .await;

    // A secret with no value in effect cannot be kept.
    let (status, problem) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/stripe/settings",
            Some(json!({"settings": {"api_base": stripe.url()}, "secrets": {"api_key": null, "nope": null}})),
        )
        .await;
    assert_eq!(
        (status, problem["errors"][0]["field"].as_str()),
        (422, Some("secrets.nope")),
        "{problem}"
    );

    let (status, problem) = app
        .send(
            reqwest::Method::PUT,
            "/api/v1/connectors/nope/settings",
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(problem["code"], "connector_not_found");
}

/// A claim that waited for a push slot until its lease ended (a bus batch
/// larger than the permits, a slow remote): meanwhile another worker took
/// the link over and pushed a newer version. The waiting push, of the
/// customer as its claim read it, must not send that older version over
/// the newer one.
async fn a_push_whose_lease_ran_out_sends_nothing(backend: Backend) {
    let stripe = LocalStripe::start().expect("localstripe");
    let app = spawn_sync_app(Setup::new(backend, &stripe.url())).await;
    let customer = app
        .create(json!({"email": email("lease"), "name": "One"}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let remote_id = app.wait_synced(&id, 1).await["remote_id"]
        .as_str()
        .expect("linked")
        .to_owned();
    // The waiting claim: the link and version 2 as it read them, under a
    // lease that has ended by the time it gets a slot.
    let mut claimed = app
        .store
        .links_of(&id)
        .await
        .expect("links")
        .into_iter()
        .find(|l| l.connector == "stripe")
        .expect("the link");
    claimed.lease_token = Some("a-claim-that-waited".into());
    app.patch(&id, json!({"name": "Two"})).await;
    let read = app
        .store
        .get_customer_any(&id)
        .await
        .expect("read")
        .expect("the customer");
    assert_eq!(read.version, 2);
    let lease_ended = ferry::store::now_ms();

    // Another worker pushes version 3.
    app.patch(&id, json!({"name": "Three"})).await;
    app.wait_synced(&id, 3).await;
    let name = |c: Option<serde_json::Value>| c.map(|c| c["name"].clone());
    assert_eq!(
        name(stripe_customer(&stripe.url(), &remote_id).await),
        Some(json!("Three"))
    );

    // A lease that outlasts a call (2 s here) by a hair is not enough
    // either: another replica's clock may be that far ahead, and a create
    // first writes its marker. It used to push version 2 over version 3.
    let barely = ferry::store::now_ms() + 2_000 + 100;
    app.sync
        .push_link(claimed.clone(), Some(read.clone()), barely)
        .await;
    assert_eq!(
        name(stripe_customer(&stripe.url(), &remote_id).await),
        Some(json!("Three")),
        "an older version went out under a lease too short for its call"
    );
    let outcome = app.sync.push_link(claimed, Some(read), lease_ended).await;
    // Its lease is gone: nothing of it is recorded either.
    assert_eq!(outcome, Outcome::LeaseLost);
    assert_eq!(
        name(stripe_customer(&stripe.url(), &remote_id).await),
        Some(json!("Three")),
        "the older version went out over the newer one"
    );
    assert_eq!(app.sync_status(&id).await["version"], 3);
}

/// A consumer's batch at shutdown: the pushes it claimed and had not
/// started kept going (up to a lease's worth after SIGTERM, past the
/// deployment's grace) or, cut off, held their lease until it ran out. Once
/// cancelled none starts, and each claim is handed back, due at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cut_short_by_shutdown_starts_nothing_and_hands_its_claims_back() {
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    // No scheduler or relay of its own: only this test's batch pushes.
    setup.extra = json!({"workers": false});
    let app = spawn_sync_app(setup).await;
    let address = email("shutdown");
    let customer = app.create(json!({"email": address, "name": "Late"})).await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let notice = ferry::store::ChangeNotice {
        customer_id: id.clone(),
        version: 1,
        correlation_id: None,
        outbox_id: None,
        source_connector: None,
    };
    let keys = app.sync.accept(&[notice]).await.expect("taken in");
    assert_eq!(keys.len(), 1, "{keys:?}");
    let stopping = tokio_util::sync::CancellationToken::new();
    stopping.cancel();
    let outcomes = app.sync.push_now(keys, &stopping).await;
    assert!(outcomes.is_empty(), "{outcomes:?}");
    let link = app
        .store
        .links_of(&id)
        .await
        .expect("links")
        .into_iter()
        .find(|l| l.connector == "stripe")
        .expect("the link");
    assert_eq!(link.lease_token, None, "handed back: {link:?}");
    assert!(
        link.next_attempt_at_ms <= ferry::store::now_ms(),
        "{link:?}"
    );
    assert!(link.remote_id.is_none(), "{link:?}");
    assert!(
        crate::helpers::stripe_customers_by_email(&stripe.url(), &address)
            .await
            .is_empty(),
        "a push started after the shutdown"
    );
}

mod sqlite {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_update_delete() {
        create_update_delete_reach_stripe(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_converge() {
        bursts_converge_on_the_latest_state(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_api() {
        settings_through_the_api(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_ran_out() {
        a_push_whose_lease_ran_out_sends_nothing(Backend::Sqlite).await;
    }
}

mod postgres {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_update_delete() {
        create_update_delete_reach_stripe(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bursts_converge() {
        bursts_converge_on_the_latest_state(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn settings_api() {
        settings_through_the_api(Backend::Postgres).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_ran_out() {
        a_push_whose_lease_ran_out_sends_nothing(Backend::Postgres).await;
    }
}
