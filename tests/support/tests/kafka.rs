//! A real tansu broker driven by rdkafka (bundled librdkafka): topic
//! creation, an idempotent producer with `acks=all`, a consumer group that
//! commits offsets, and what survives a broker restart with each storage.

use std::time::Duration;

use ferry_test_support::kafka::{Broker, Storage};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

const TOPIC: &str = "ferry.outbound";
const GROUP: &str = "ferry-relay";
const WAIT: Duration = Duration::from_secs(20);

fn config(broker: &Broker) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", broker.bootstrap())
        .set("broker.address.family", "v4")
        // Restart tests: reconnect quickly once the broker is back.
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500");
    config
}

/// A client for metadata and watermark queries.
fn plain_client(broker: &Broker) -> FutureProducer {
    config(broker).create().expect("creating a client")
}

fn idempotent_producer(broker: &Broker) -> FutureProducer {
    config(broker)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "20000")
        .create()
        .expect("creating the producer")
}

fn consumer(broker: &Broker) -> StreamConsumer {
    let consumer: StreamConsumer = config(broker)
        .set("group.id", GROUP)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("creating the consumer");
    consumer.subscribe(&[TOPIC]).expect("subscribing");
    consumer
}

async fn create_topic(broker: &Broker, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config(broker).create().unwrap();
    let results = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(WAIT)),
        )
        .await
        .expect("CreateTopics");
    for result in results {
        result.expect("topic created");
    }
}

async fn produce(producer: &FutureProducer, from: usize, to: usize) -> Vec<i64> {
    let mut offsets = Vec::new();
    for i in from..to {
        let key = format!("customer-{i}");
        let payload = format!("{{\"n\":{i}}}");
        let delivery = producer
            .send(
                FutureRecord::to(TOPIC).key(&key).payload(&payload),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|(err, _)| panic!("delivering message {i}: {err}"));
        offsets.push(delivery.offset);
    }
    offsets
}

/// Receives `n` messages, returning their payloads, and commits after the
/// last one (synchronously, as a relay that must not lose its place would).
async fn consume_and_commit(consumer: &StreamConsumer, n: usize) -> Vec<String> {
    let mut payloads = Vec::new();
    while payloads.len() < n {
        let message = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .expect("a message within the wait")
            .expect("receiving");
        payloads.push(String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned());
        if payloads.len() == n {
            consumer
                .commit_message(&message, CommitMode::Sync)
                .expect("committing");
        }
    }
    payloads
}

fn committed(consumer: &StreamConsumer) -> Offset {
    let mut wanted = TopicPartitionList::new();
    wanted.add_partition(TOPIC, 0);
    let committed = consumer
        .committed_offsets(wanted, Duration::from_secs(10))
        .expect("reading committed offsets");
    committed.elements()[0].offset()
}

#[tokio::test]
async fn sqlite_broker_keeps_topics_records_and_offsets_across_a_restart() {
    let mut broker = Broker::start().unwrap();
    assert_eq!(broker.storage(), Storage::Sqlite);
    assert!(broker.persistent());
    create_topic(&broker, TOPIC, 1).await;
    let producer = idempotent_producer(&broker);
    assert_eq!(produce(&producer, 0, 5).await, vec![0, 1, 2, 3, 4]);
    {
        let consumer = consumer(&broker);
        let got = consume_and_commit(&consumer, 5).await;
        assert_eq!(got[0], "{\"n\":0}");
        assert_eq!(committed(&consumer), Offset::Offset(5));
    }

    let port = broker.port();
    broker.stop();
    assert!(!broker.is_running());
    broker.start_again().unwrap();
    assert_eq!(broker.port(), port);

    // The topic and its records are still there.
    let fresh = plain_client(&broker);
    let (low, high) = fresh
        .client()
        .fetch_watermarks(TOPIC, 0, Duration::from_secs(10))
        .expect("watermarks after the restart");
    assert_eq!((low, high), (0, 5));

    // The producer created before the restart keeps its idempotent session.
    assert_eq!(produce(&producer, 5, 7).await, vec![5, 6]);

    // The group resumes after its committed offset.
    let consumer = consumer(&broker);
    assert_eq!(committed(&consumer), Offset::Offset(5));
    let got = consume_and_commit(&consumer, 2).await;
    assert_eq!(got, vec!["{\"n\":5}", "{\"n\":6}"]);
    assert_eq!(committed(&consumer), Offset::Offset(7));
}

#[tokio::test]
async fn clients_ride_out_a_broker_outage() {
    let mut broker = Broker::start().unwrap();
    create_topic(&broker, TOPIC, 1).await;
    let producer = idempotent_producer(&broker);
    produce(&producer, 0, 2).await;
    let consumer = consumer(&broker);
    consume_and_commit(&consumer, 2).await;

    broker.stop();
    // A send while the broker is down waits in librdkafka's queue and is
    // delivered once it is back (within message.timeout.ms).
    let pending = producer
        .send_result(FutureRecord::to(TOPIC).key("k").payload("{\"n\":2}"))
        .map_err(|(err, _)| err)
        .expect("queueing during the outage");
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.start_again().unwrap();
    let delivery = tokio::time::timeout(WAIT, pending)
        .await
        .expect("delivered within the wait")
        .expect("delivery report")
        .unwrap_or_else(|(err, _)| panic!("delivery failed: {err}"));
    assert_eq!(delivery.offset, 2);

    // The consumer first reports the outage as errors (transport failure,
    // all brokers down), then carries on from where it was.
    let mut errors = 0;
    let message = loop {
        match tokio::time::timeout(WAIT, consumer.recv()).await {
            Ok(Ok(message)) => break message,
            Ok(Err(_)) => errors += 1,
            Err(_) => panic!("no message after the restart ({errors} errors)"),
        }
    };
    assert_eq!(message.offset(), 2);
    consumer
        .commit_message(&message, CommitMode::Sync)
        .expect("committing after the restart");
    assert_eq!(committed(&consumer), Offset::Offset(3));
}

#[tokio::test]
async fn memory_broker_restarts_empty_on_the_same_port() {
    let mut broker = Broker::start_with(Storage::Memory).unwrap();
    assert!(!broker.persistent());
    create_topic(&broker, TOPIC, 1).await;
    let producer = idempotent_producer(&broker);
    assert_eq!(produce(&producer, 0, 3).await, vec![0, 1, 2]);

    broker.stop();
    broker.start_again().unwrap();
    let client = plain_client(&broker);
    let metadata = client
        .client()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata after the restart");
    assert!(
        metadata.topics().iter().all(|t| t.name() != TOPIC),
        "memory storage forgets topics on restart"
    );
    create_topic(&broker, TOPIC, 1).await;
    let again = idempotent_producer(&broker);
    assert_eq!(produce(&again, 0, 1).await, vec![0]);
}
