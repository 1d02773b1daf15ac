//! Cluster mode: PostgreSQL and a real Kafka-protocol broker (tansu).

use std::time::Duration;

use ferry_test_support::kafka::Broker;
use ferry_test_support::localstripe::LocalStripe;
use serde_json::json;

use crate::helpers::{
    email, spawn_sync_app, stripe_customer, stripe_customers_by_email, Backend, Setup,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_through_kafka() {
    let broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    let app = spawn_sync_app(setup).await;

    let ada = email("kafka");
    let customer = app.create(json!({"name": "Ada", "email": ada})).await;
    let id = customer["id"].as_str().expect("id");
    let link = app.wait_synced(id, 1).await;
    let remote_id = link["remote_id"].as_str().expect("linked").to_owned();
    assert_eq!(
        stripe_customer(&stripe.url(), &remote_id)
            .await
            .expect("created")["name"],
        "Ada"
    );

    app.patch(id, json!({"name": "Ada K."})).await;
    app.wait_synced(id, 2).await;
    assert_eq!(
        stripe_customer(&stripe.url(), &remote_id)
            .await
            .expect("exists")["name"],
        "Ada K."
    );

    app.delete(id).await;
    app.wait_synced(id, 3).await;
    assert!(stripe_customer(&stripe.url(), &remote_id).await.is_none());

    // Every outbox row went through the broker and was consumed: none is
    // left on the queue.
    let unpublished = app.store.unpublished_outbox(10).await.expect("outbox");
    assert!(unpublished.is_empty(), "{unpublished:?}");
    let events = app.store.outbox_events(id).await.expect("outbox");
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| !e.queued), "{events:?}");
    app.stop().await;
}

/// Two replicas on one database and one broker share the work: every
/// customer reaches Stripe exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_without_double_pushes() {
    let broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let proxy = ferry_test_support::fault_proxy::FaultProxy::start(&stripe.url())
        .await
        .expect("proxy");
    let mut setup = Setup::new(Backend::Postgres, &proxy.url());
    setup.kafka = Some(broker.bootstrap());
    let topic_prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    // Calls long enough that no create times out after it was sent on a
    // busy machine (its replay would be a second request, and localstripe
    // keeps no idempotency keys): every request counted is a push.
    let extra = json!({
        "kafka_topic_prefix": topic_prefix,
        "connector_call_timeout": "10s",
        "sync_lease": "15s",
    });
    setup.extra = extra.clone();
    let first = spawn_sync_app(setup).await;
    let mut setup = Setup::new(Backend::Postgres, &proxy.url());
    setup.kafka = Some(broker.bootstrap());
    setup.database_url = Some(first.database_url.clone());
    setup.extra = extra;
    let second = spawn_sync_app(setup).await;

    let mut ids = Vec::new();
    let mut emails = Vec::new();
    for n in 0..40 {
        let replica = if n % 2 == 0 { &first } else { &second };
        let address = email(&format!("replica{n}"));
        let customer = replica
            .create(json!({"email": address, "name": format!("n{n}")}))
            .await;
        ids.push(customer["id"].as_str().expect("id").to_owned());
        emails.push(address);
    }
    for id in &ids {
        first
            .wait_link(id, Duration::from_secs(30), |l| l["state"] == "synced")
            .await;
    }
    let creates = proxy.requests_to("POST", "/v1/customers");
    assert_eq!(
        creates.len(),
        40,
        "one create per customer, no double pushes"
    );
    for address in &emails {
        assert_eq!(
            stripe_customers_by_email(&stripe.url(), address)
                .await
                .len(),
            1
        );
    }
    first.stop().await;
    second.stop().await;
}

/// Cluster mode: webhook events travel through Kafka (`{prefix}.inbox`,
/// keyed by remote record) and are applied in order; a stale one is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_events_go_through_kafka_in_order() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, event, stripe_customer_json, stripe_signature};

    let broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    let app = spawn_sync_app(setup).await;
    let address = email("kafka-inbox");
    let now = chrono::Utc::now().timestamp() + 120;
    let bodies = [
        event(
            "evt_k1",
            "customer.created",
            now,
            stripe_customer_json("cus_kafka1", &address, "First"),
        ),
        event(
            "evt_k2",
            "customer.updated",
            now + 1,
            stripe_customer_json("cus_kafka1", &address, "Second"),
        ),
        event(
            "evt_k0",
            "customer.updated",
            now - 5,
            stripe_customer_json("cus_kafka1", &address, "Stale"),
        ),
    ];
    for body in &bodies {
        let (status, _) = deliver(&app, body, &stripe_signature(body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = app
            .store
            .inbox_of_remote("stripe", "cus_kafka1")
            .await
            .unwrap();
        let settled = events
            .iter()
            .filter(|e| e.state.as_str() == "applied" || e.state.as_str() == "skipped")
            .count();
        if settled == 3 {
            let stale = events.iter().find(|e| e.event_id == "evt_k0").unwrap();
            assert_eq!(stale.state.as_str(), "skipped", "{stale:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "inbox not applied through Kafka: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let customer = app.customer_by_email(&address).await.expect("created");
    assert_eq!(customer["name"], "Second");
    // Applied from the bus, not by the inbox loop's 60 s fallback.
    let published = app.store.unpublished_inbox(10).await.unwrap();
    assert!(
        published.is_empty(),
        "every inbox event was published: {published:?}"
    );
    app.stop().await;
}

/// An API-only replica left without the broker's address (it serves no
/// consumer, and its readiness asks no broker) stores its webhooks as no
/// bus will carry them: the worker replicas' inbox loops take them at
/// once. They were stored as handed over, and the workers, which wait
/// `bus_redelivery_after` for the bus to deliver a fresh event, applied
/// each that much later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_taken_by_a_replica_without_the_broker_is_applied_at_once() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, event, stripe_customer_json, stripe_signature};

    let broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    setup.extra = json!({"bus_redelivery_after": "60s"});
    let worker = spawn_sync_app(setup).await;
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.database_url = Some(worker.database_url.clone());
    setup.extra = json!({"workers": false});
    let api_only = spawn_sync_app(setup).await;

    let address = email("api-only-webhook");
    let body = event(
        "evt_api_only",
        "customer.created",
        chrono::Utc::now().timestamp(),
        stripe_customer_json("cus_api_only", &address, "Taken"),
    );
    let (status, _) = deliver(&api_only, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while worker.customer_by_email(&address).await.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not applied in 15 s (the grace is 60 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api_only.stop().await;
    worker.stop().await;
}

/// Webhooks taken while the broker is away are applied by the inbox loops
/// after their grace. Once it is back, the relay hands those over to no
/// one: it published every one of them (a day's outage is millions), each
/// a consumer's claim that found nothing, ahead of the webhooks that came
/// after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_applied_while_the_broker_was_away_are_not_published_after() {
    use crate::helpers::WEBHOOK_SECRET;
    use crate::inbound::{deliver, event, stripe_customer_json, stripe_signature};

    let mut broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    setup.extra = json!({"bus_redelivery_after": "1s", "kafka_topic_prefix": prefix});
    let app = spawn_sync_app(setup).await;
    let webhook = |id: &str, remote: &str, address: &str| {
        event(
            id,
            "customer.created",
            chrono::Utc::now().timestamp(),
            stripe_customer_json(remote, address, "Away"),
        )
    };
    let applied = |address: String| {
        let app = &app;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while app.customer_by_email(&address).await.is_none() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{address} not applied"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    broker.stop();
    for n in 0..2 {
        let address = email(&format!("away-{n}"));
        let body = webhook(&format!("evt_away_{n}"), &format!("cus_away_{n}"), &address);
        let (status, _) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
        assert_eq!(status, 200);
        applied(address).await;
    }
    broker.start_again().expect("broker back");
    wait_for_topic(&broker, &format!("{prefix}.inbox")).await;
    let address = email("back");
    let body = webhook("evt_back", "cus_back", &address);
    let (status, _) = deliver(&app, &body, &stripe_signature(&body, WEBHOOK_SECRET)).await;
    assert_eq!(status, 200);
    applied(address).await;
    let keys = published_keys(&broker, &format!("{prefix}.inbox"), "stripe:cus_back").await;
    assert!(keys.iter().any(|k| k == "stripe:cus_back"), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("stripe:cus_away_")),
        "published after they were applied: {keys:?}"
    );
    let unpublished = app.store.unpublished_inbox(10).await.expect("inbox");
    assert!(unpublished.is_empty(), "{unpublished:?}");
    app.stop().await;
}

/// The relay cannot reach the bus (here: the broker is down): changes
/// written meanwhile are not stranded on the outbox queue. Once they are
/// older than `bus_redelivery_after`, the safety net schedules them from
/// the outbox directly, and they reach Stripe with no broker at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_the_relay_cannot_publish_are_scheduled_from_the_outbox() {
    let mut broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    setup.extra = json!({"bus_redelivery_after": "2s"});
    let app = spawn_sync_app(setup).await;
    // Through the broker first: the relay and its topics are up.
    let first = app
        .create(json!({"name": "Online", "email": email("online")}))
        .await;
    app.wait_synced(first["id"].as_str().expect("id"), 1).await;
    let before = crate::operations::scrape(&app.base).await;
    // Exported before its first rise: `increase()` over a series that
    // appears at 40 reads 0, and the alert missed the burst.
    assert!(
        before
            .iter()
            .any(|(name, _, _)| name == "ferry_bus_redelivered_total"),
        "not exported at 0"
    );
    broker.stop();

    let id = reaches_stripe_without_the_bus(&app, &stripe, "offline").await;
    // Counted: a log line was all an operator had.
    let after = crate::operations::scrape(&app.base).await;
    let redelivered = crate::operations::value(&after, "ferry_bus_redelivered_total", &[])
        - crate::operations::value(&before, "ferry_bus_redelivered_total", &[]);
    assert!(redelivered >= 1.0, "{redelivered}");
    let events = app.store.outbox_events(&id).await.expect("outbox");
    assert!(events.iter().all(|e| !e.queued), "{events:?}");
    // Ready all along, saying the broker is away: unready, every running
    // replica left the load balancer at once (the API and webhooks with
    // them) while sync went on without the bus. And answered within a
    // kubelet's 1 s probe timeout (with room for a loaded machine): the
    // broker's metadata, awaited, took its full 2 s, and the probe's
    // timeout took every replica out all the same.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, ready) = tokio::time::timeout(
            Duration::from_millis(1_500),
            app.send(reqwest::Method::GET, "/readyz", None),
        )
        .await
        .expect("/readyz answered within 1.5 s");
        assert_eq!(status, 200, "{ready}");
        let bus_away = ready["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "bus" && c["ok"] == false);
        if bus_away {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    broker.start_again().expect("broker back");
    app.stop().await;
}

/// A replica started while the broker is away serves at once: its changes
/// reach Stripe through the redelivery net, and once the broker is back the
/// topics are made and the relay publishes on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_the_broker_is_away_serves_and_joins_it_later() {
    let mut broker = Broker::start().expect("broker");
    broker.stop();
    let stripe = LocalStripe::start().expect("localstripe");
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    setup.extra = json!({"bus_redelivery_after": "2s", "kafka_topic_prefix": prefix});
    let app = spawn_sync_app(setup).await;

    reaches_stripe_without_the_bus(&app, &stripe, "away").await;

    // Not ready while its bus is away, and says why.
    let (status, ready) = app.send(reqwest::Method::GET, "/readyz", None).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready.to_string().contains("bus_topics"), "{ready}");
    // Once creating the topics has failed, the reason stays in the log:
    // `/readyz` answers anyone, and the client's error names brokers.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, ready) = app.send(reqwest::Method::GET, "/readyz", None).await;
        let text = ready.to_string();
        assert!(!text.contains(&broker.bootstrap()), "{ready}");
        if text.contains("creating the bus's topics failed") {
            assert!(text.contains("the reason is in the log"), "{ready}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    broker.start_again().expect("broker back");
    // The replica makes the topics once the broker answers; a change
    // written after that goes through the relay.
    wait_for_topic(&broker, &format!("{prefix}.changes")).await;
    let online = app
        .create(json!({"name": "Online", "email": email("back")}))
        .await;
    let online_id = online["id"].as_str().expect("id").to_owned();
    app.wait_synced(&online_id, 1).await;
    let keys = published_keys(&broker, &format!("{prefix}.changes"), &online_id).await;
    assert!(keys.contains(&online_id), "{keys:?}");
    // Ready once its topics exist (made when the broker answered; the
    // shared probe's answer lags by a second), and `bus_topics` is gone
    // from the checks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, ready) = app.send(reqwest::Method::GET, "/readyz", None).await;
        if status == 200 {
            assert!(!ready.to_string().contains("bus_topics"), "{ready}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    app.stop().await;
}

/// A replica whose topics exist uses them without asking to create them:
/// a cluster that refuses the ask (ACLs on a managed Kafka, or here a
/// replication factor the one broker cannot hold) kept it unready for
/// good, asking again every 2 s, its relay and consumers never started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_uses_topics_that_exist_without_creating_them() {
    let broker = Broker::start().expect("broker");
    let stripe = LocalStripe::start().expect("localstripe");
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    setup.extra = json!({"kafka_topic_prefix": prefix});
    let first = spawn_sync_app(setup).await;
    wait_for_topic(&broker, &format!("{prefix}.changes")).await;
    wait_for_topic(&broker, &format!("{prefix}.inbox")).await;

    let mut setup = Setup::new(Backend::Postgres, &stripe.url());
    setup.kafka = Some(broker.bootstrap());
    setup.database_url = Some(first.database_url.clone());
    setup.extra = json!({"kafka_topic_prefix": prefix, "kafka_replication_factor": 3});
    let second = spawn_sync_app(setup).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, ready) = second.send(reqwest::Method::GET, "/readyz", None).await;
        if status == 200 && !ready.to_string().contains("bus_topics") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{ready}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And its relay publishes on them.
    let customer = second
        .create(json!({"name": "Existing topics", "email": email("existing")}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let keys = published_keys(&broker, &format!("{prefix}.changes"), &id).await;
    assert!(keys.contains(&id), "{keys:?}");
    first.stop().await;
    second.stop().await;
}

/// Creates a customer named "Offline" while the broker is away; waits
/// until the redelivery net has brought it to Stripe. Its id.
async fn reaches_stripe_without_the_bus(
    app: &crate::helpers::SyncApp,
    stripe: &LocalStripe,
    tag: &str,
) -> String {
    let customer = app
        .create(json!({"name": "Offline", "email": email(tag)}))
        .await;
    let id = customer["id"].as_str().expect("id").to_owned();
    let link = app
        .wait_link(&id, Duration::from_secs(30), |l| l["state"] == "synced")
        .await;
    let remote_id = link["remote_id"].as_str().expect("linked");
    assert_eq!(
        stripe_customer(&stripe.url(), remote_id)
            .await
            .expect("created")["name"],
        "Offline"
    );
    id
}

/// Waits until `topic` exists on the broker, asking for its metadata only
/// (never creating it).
async fn wait_for_topic(broker: &Broker, topic: &str) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("metadata client");
    let topic = topic.to_owned();
    let found =
        tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while std::time::Instant::now() < deadline {
                if let Ok(metadata) = client.fetch_metadata(Some(&topic), Duration::from_secs(2)) {
                    if metadata.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    }) {
                        return true;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
        .await
        .expect("metadata task");
    assert!(found, "the replica never made its topics");
}

/// The keys on `topic` read from its start until `wanted` is among them
/// (or 30 s have passed).
async fn published_keys(broker: &Broker, topic: &str, wanted: &str) -> Vec<String> {
    let settings = ferry::bus::kafka::KafkaSettings {
        brokers: broker.bootstrap(),
        group_id: format!("reader-{}", uuid::Uuid::new_v4().simple()),
        client_id: "ferry-test-reader".to_owned(),
        partitions: 3,
        replication_factor: 1,
        batch_handling: std::time::Duration::from_secs(60),
        properties: Default::default(),
    };
    let consumer = ferry::bus::kafka::KafkaConsumer::new(&settings, topic).expect("reader");
    let keys = std::sync::Mutex::new(Vec::new());
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = consumer.run(cancel.clone(), 100, |batch| {
        let mut keys = keys.lock().expect("keys");
        keys.extend(batch.into_iter().map(|m| m.key));
        if keys.iter().any(|k| k == wanted) {
            cancel.cancel();
        }
        async { Ok(()) }
    });
    let _ = tokio::time::timeout(Duration::from_secs(30), run).await;
    consumer.close().await;
    keys.into_inner().expect("keys")
}
