//! The Kafka bus adapter against a real Kafka-protocol broker (tansu, one
//! per test binary, in memory), through librdkafka like production: topic
//! creation, per-key order, retries of a failed batch, committed offsets and
//! a consumer group of two.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ferry::bus::kafka::{KafkaConsumer, KafkaProducer, KafkaSettings, Message};
use ferry_test_support::kafka::Broker;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

/// Long enough for a group to form on a loaded machine, short enough that
/// a broken test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

static BROKER: OnceLock<Broker> = OnceLock::new();

fn broker() -> &'static Broker {
    // SQLite storage, not tansu's in-memory engine: the latter answers a
    // fetch from inside a record batch with nothing (it returns only batches
    // that *start* at or after the offset), so a consumer resuming from a
    // committed or seeked-to offset in mid-batch would never see the rest.
    BROKER.get_or_init(|| Broker::start().expect("starting tansu"))
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn settings(partitions: i32) -> KafkaSettings {
    init_logs();
    KafkaSettings {
        brokers: broker().bootstrap(),
        group_id: unique("group"),
        client_id: "ferry-test".to_owned(),
        partitions,
        replication_factor: 1,
        batch_handling: std::time::Duration::from_secs(60),
        properties: Default::default(),
    }
}

/// `per_key` messages for each of `keys` customers, interleaved; the
/// payload is `key/sequence`.
fn messages(keys: usize, per_key: usize) -> Vec<Message> {
    (0..per_key)
        .flat_map(|seq| {
            (0..keys).map(move |key| Message {
                key: format!("customer-{key}"),
                payload: format!("customer-{key}/{seq}").into_bytes(),
            })
        })
        .collect()
}

fn sequence(message: &Message) -> usize {
    let payload = String::from_utf8(message.payload.clone()).expect("UTF-8 payload");
    let (key, seq) = payload.split_once('/').expect("key/sequence payload");
    assert_eq!(key, message.key, "payload belongs to its key");
    seq.parse().expect("numeric sequence")
}

/// The sequences seen per key, in the order they were handled.
fn by_key(messages: &[Message]) -> BTreeMap<String, Vec<usize>> {
    let mut keys: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for message in messages {
        keys.entry(message.key.clone())
            .or_default()
            .push(sequence(message));
    }
    keys
}

fn payloads(messages: &[Message]) -> BTreeSet<Vec<u8>> {
    messages.iter().map(|m| m.payload.clone()).collect()
}

/// A topic created with the settings' partitions, holding `published`.
async fn topic_with(settings: &KafkaSettings, published: &[Message]) -> String {
    let topic = unique("customers");
    let producer = KafkaProducer::new(settings).expect("producer");
    producer
        .ensure_topics(&[&topic])
        .await
        .expect("creating the topic");
    producer
        .publish(&topic, published)
        .await
        .expect("publishing");
    topic
}

/// Runs `consumer` until its handler has seen at least `want` messages,
/// then stops it (the last batch is committed before `run` returns).
async fn consume(consumer: &KafkaConsumer, max_batch: usize, want: usize) -> Vec<Message> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let cancel = CancellationToken::new();
    let run = consumer.run(cancel.clone(), max_batch, |batch| {
        let seen = Arc::clone(&seen);
        let cancel = cancel.clone();
        async move {
            assert!(!batch.is_empty() && batch.len() <= max_batch, "batch size");
            let mut seen = seen.lock().unwrap();
            seen.extend(batch);
            if seen.len() >= want {
                cancel.cancel();
            }
            Ok(())
        }
    });
    tokio::time::timeout(PATIENCE, run)
        .await
        .unwrap_or_else(|_| panic!("fewer than {want} messages within {PATIENCE:?}"))
        .expect("consumer run");
    let seen = seen.lock().unwrap().clone();
    seen
}

fn partition_count(brokers: &str, topic: &str) -> usize {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    metadata.topics()[0].partitions().len()
}

/// The operator's librdkafka properties (`kafka_properties`) reach the
/// clients: TLS spoken to the plaintext test broker fails (the property is
/// in force, where the same client without it answers), and a property
/// librdkafka does not know refuses the client, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_properties_reach_the_clients() {
    use ferry::bus::kafka::KafkaProperties;
    let with = |name: &str, value: &str| KafkaSettings {
        properties: KafkaProperties(vec![(name.to_owned(), value.into())]),
        ..settings(1)
    };
    let plain = Arc::new(KafkaProducer::new(&settings(1)).expect("client"));
    plain
        .probe(Duration::from_secs(5))
        .await
        .expect("the broker answers");
    let tls =
        Arc::new(KafkaProducer::new(&with("security.protocol", "ssl")).expect("a TLS client"));
    assert!(tls.probe(Duration::from_secs(2)).await.is_err());
    let refused = KafkaProducer::new(&with("sasl.passwrod", "hunter2-a-secret"))
        .err()
        .expect("refused");
    let refused = format!("{:#}", anyhow::Error::from(refused));
    assert!(refused.contains("sasl.passwrod"), "{refused}");
    assert!(
        !refused.contains("hunter2"),
        "the value never prints: {refused}"
    );
    assert!(
        KafkaConsumer::new(&with("ssl.no.such.property", "x"), &unique("t")).is_err(),
        "the consumers too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_topics_is_idempotent_and_leaves_existing_topics_alone() {
    let settings = settings(3);
    let producer = KafkaProducer::new(&settings).expect("producer");
    let (first, second) = (unique("customers"), unique("dead-letters"));

    producer
        .ensure_topics(&[&first, &second])
        .await
        .expect("creating");
    producer
        .ensure_topics(&[&first, &second])
        .await
        .expect("creating again is fine");
    // A replica configured with more partitions does not change the topic.
    let other = KafkaProducer::new(&KafkaSettings {
        partitions: 5,
        ..settings.clone()
    })
    .expect("producer");
    other
        .ensure_topics(&[&first])
        .await
        .expect("creating with other settings");

    let brokers = settings.brokers.clone();
    let counts = tokio::task::spawn_blocking(move || {
        (
            partition_count(&brokers, &first),
            partition_count(&brokers, &second),
        )
    })
    .await
    .unwrap();
    assert_eq!(counts, (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_consumes_everything_in_order_per_key() {
    let settings = settings(4);
    let published = messages(10, 100);
    let topic = topic_with(&settings, &published).await;

    let consumer = KafkaConsumer::new(&settings, &topic).expect("consumer");
    let seen = consume(&consumer, 100, published.len()).await;
    consumer.close().await;

    assert_eq!(seen.len(), published.len(), "each message exactly once");
    let expected: Vec<usize> = (0..100).collect();
    let keys = by_key(&seen);
    assert_eq!(keys.len(), 10);
    for (key, sequences) in keys {
        assert_eq!(sequences, expected, "order of {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_is_handed_over_again() {
    // One partition: the retried batch must be the identical batch.
    let settings = settings(1);
    let published = messages(3, 10);
    let topic = topic_with(&settings, &published).await;
    let consumer = KafkaConsumer::new(&settings, &topic).expect("consumer");

    let batches = Arc::new(Mutex::new(Vec::<Vec<Message>>::new()));
    let handled = Arc::new(Mutex::new(Vec::<Message>::new()));
    let cancel = CancellationToken::new();
    let run = consumer.run(cancel.clone(), 10, |batch| {
        let (batches, handled, cancel) = (batches.clone(), handled.clone(), cancel.clone());
        async move {
            let first_call = {
                let mut batches = batches.lock().unwrap();
                batches.push(batch.clone());
                batches.len() == 1
            };
            if first_call {
                anyhow::bail!("the store is down");
            }
            let mut handled = handled.lock().unwrap();
            handled.extend(batch);
            if handled.len() >= 30 {
                cancel.cancel();
            }
            Ok(())
        }
    });
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("consumed in time")
        .expect("consumer run");
    consumer.close().await;

    let batches = batches.lock().unwrap();
    assert!(batches.len() >= 2);
    assert_eq!(batches[1], batches[0], "the failed batch again");
    assert_eq!(*handled.lock().unwrap(), published, "nothing skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_across_partitions_skip_nothing_and_keep_key_order() {
    let settings = settings(4);
    let published = messages(10, 20);
    let topic = topic_with(&settings, &published).await;
    let consumer = KafkaConsumer::new(&settings, &topic).expect("consumer");

    let calls = Arc::new(Mutex::new(0usize));
    let handled = Arc::new(Mutex::new(Vec::<Message>::new()));
    let cancel = CancellationToken::new();
    let run = consumer.run(cancel.clone(), 25, |batch| {
        let (calls, handled, cancel) = (calls.clone(), handled.clone(), cancel.clone());
        async move {
            let call = {
                let mut calls = calls.lock().unwrap();
                *calls += 1;
                *calls
            };
            // Fails the 2nd and 3rd call: a batch in the middle fails twice.
            if call == 2 || call == 3 {
                anyhow::bail!("transient failure #{call}");
            }
            let mut handled = handled.lock().unwrap();
            handled.extend(batch);
            if handled.len() >= 200 {
                cancel.cancel();
            }
            Ok(())
        }
    });
    let outcome = tokio::time::timeout(PATIENCE, run).await;
    consumer.close().await;
    let handled = handled.lock().unwrap();
    outcome
        .unwrap_or_else(|_| panic!("{} of 200 messages handled in time", handled.len()))
        .expect("consumer run");
    assert_eq!(handled.len(), 200, "each message handled once successfully");
    let expected: Vec<usize> = (0..20).collect();
    for (key, sequences) in by_key(&handled) {
        assert_eq!(sequences, expected, "order of {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_member_resumes_after_the_committed_offsets() {
    let settings = settings(2);
    let published = messages(10, 10);
    let topic = topic_with(&settings, &published).await;

    let first = KafkaConsumer::new(&settings, &topic).expect("first consumer");
    let before = consume(&first, 10, 30).await;
    first.close().await;
    assert!(before.len() >= 30 && before.len() < published.len());

    let second = KafkaConsumer::new(&settings, &topic).expect("second consumer");
    let after = consume(&second, 10, published.len() - before.len()).await;
    second.close().await;

    let (before, after) = (payloads(&before), payloads(&after));
    assert!(
        before.is_disjoint(&after),
        "nothing committed is read again"
    );
    let all: BTreeSet<_> = before.union(&after).cloned().collect();
    assert_eq!(all, payloads(&published));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_split_the_partitions_and_see_everything() {
    let settings = settings(4);
    let topic = topic_with(&settings, &[]).await;
    let members = [
        Arc::new(KafkaConsumer::new(&settings, &topic).expect("consumer a")),
        Arc::new(KafkaConsumer::new(&settings, &topic).expect("consumer b")),
    ];
    let cancel = CancellationToken::new();
    let seen: [Arc<Mutex<Vec<Message>>>; 2] = Default::default();
    let mut runs = Vec::new();
    for (member, seen) in members.iter().zip(&seen) {
        let (member, seen, cancel) = (member.clone(), seen.clone(), cancel.clone());
        runs.push(tokio::spawn(async move {
            member
                .run(cancel, 50, move |batch| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().extend(batch);
                        Ok(())
                    }
                })
                .await
        }));
    }

    // The group settles with each member owning half of the partitions.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let assignments = loop {
        let a = members[0].assignment().expect("assignment a");
        let b = members[1].assignment().expect("assignment b");
        let union: BTreeSet<i32> = a.iter().chain(&b).copied().collect();
        if !a.is_empty() && !b.is_empty() && a.len() + b.len() == 4 && union.len() == 4 {
            break (a, b);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group did not settle: {a:?} {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let published = messages(40, 5);
    KafkaProducer::new(&settings)
        .expect("producer")
        .publish(&topic, &published)
        .await
        .expect("publishing");
    let want = payloads(&published);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let got: BTreeSet<Vec<u8>> = seen
            .iter()
            .flat_map(|seen| payloads(&seen.lock().unwrap()))
            .collect();
        if got.is_superset(&want) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} messages seen",
            got.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    for run in runs {
        run.await.expect("member task").expect("member run");
    }

    let (a, b) = (seen[0].lock().unwrap(), seen[1].lock().unwrap());
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both members got work ({} / {}) with partitions {assignments:?}",
        a.len(),
        b.len()
    );
    // 40 keys over 4 partitions: a key lives in one partition, so in one
    // member, as long as the group did not change meanwhile.
    let keys_a: BTreeSet<&String> = a.iter().map(|m| &m.key).collect();
    let keys_b: BTreeSet<&String> = b.iter().map(|m| &m.key).collect();
    assert!(keys_a.is_disjoint(&keys_b), "a key is owned by one member");
}
