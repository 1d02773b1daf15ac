//! The Kafka side of the bus in cluster mode: a producer the outbox relay
//! publishes customer changes with, and a consumer-group consumer the sync
//! workers read them with (rdkafka over a bundled librdkafka).
//!
//! Delivery is **at least once**, on both legs:
//! - [`KafkaProducer::publish`] returns only when the broker acknowledged every
//!   message (idempotent producer, `acks=all`), so the relay marks outbox rows
//!   as published only once they are durable in Kafka. A crash in between
//!   publishes them again; the idempotent producer removes the duplicates of
//!   its own retries, not those of a restarted relay.
//! - [`KafkaConsumer::run`] commits a batch's offsets only after the handler
//!   made its outcome durable in the store, and never moves past a batch the
//!   handler failed: it seeks back and hands it over again. A commit lost to a
//!   crash or a rebalance means the next owner of the partition sees the batch
//!   again, which the handlers tolerate because they are idempotent (an event
//!   is a trigger; the worker pushes the customer's *current* state).
//!
//! The message key is the customer id. Kafka orders messages only within a
//! partition and the partition is chosen from the key, so every change of
//! one customer lands in one partition and is handled in order by the one
//! group member that owns it, while different customers spread over the
//! partitions and the members of the group.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;
use tracing::level_filters::LevelFilter;

/// After the first message of a batch, how long to wait for more.
const BATCH_WINDOW: Duration = Duration::from_millis(10);
/// First wait before a failed batch is handed over again; doubles up to
/// [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Bound on the blocking librdkafka calls (seek, commit, topic creation).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait when librdkafka's local producer queue is full.
const QUEUE_FULL_WAIT: Duration = Duration::from_millis(10);

/// Where the bus is and how its topics look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]` of the bootstrap brokers.
    pub brokers: String,
    /// The consumer group the workers of every replica share.
    pub group_id: String,
    /// Names this process in the broker's logs and metrics.
    pub client_id: String,
    /// Partitions of a topic [`KafkaProducer::ensure_topics`] creates: the
    /// upper bound on how many workers of the group can share a topic.
    pub partitions: i32,
    /// Replication factor of a topic [`KafkaProducer::ensure_topics`] creates.
    pub replication_factor: i32,
    /// The longest a consumer may take over one batch (pushes run up to
    /// their lease): librdkafka's `max.poll.interval.ms` is set past it, or
    /// a member busy with a slow batch is put out of the group and its
    /// batch handled again elsewhere.
    pub batch_handling: std::time::Duration,
    /// librdkafka properties every client is given (security and
    /// connection: `kafka_properties`).
    pub properties: KafkaProperties,
}

/// `error` without the value librdkafka refused: rdkafka's message holds
/// it, and it may be a secret (a misspelled `sasl.password`, an OIDC
/// client secret this build cannot use), which the start's error printed.
fn without_values(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, description, key, _) => {
            KafkaError::ClientConfig(code, description, key, "(value not shown)".to_owned())
        }
        other => other,
    }
}

/// librdkafka properties by name; values (a SASL password) never print.
#[derive(Clone, Default)]
pub struct KafkaProperties(pub Vec<(String, secrecy::SecretString)>);

impl std::fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(name, _)| name))
            .finish()
    }
}

impl PartialEq for KafkaProperties {
    fn eq(&self, other: &Self) -> bool {
        use secrecy::ExposeSecret;
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.expose_secret() == y.expose_secret())
    }
}

impl Eq for KafkaProperties {}

impl KafkaSettings {
    fn validate(&self) -> Result<(), BusError> {
        let problem = if self.brokers.trim().is_empty() {
            "brokers is empty"
        } else if self.group_id.trim().is_empty() {
            "group_id is empty"
        } else if self.partitions < 1 {
            "partitions must be at least 1"
        } else if self.replication_factor < 1 {
            "replication_factor must be at least 1"
        } else {
            return Ok(());
        };
        Err(BusError::InvalidSettings(problem.to_owned()))
    }

    /// What producer, admin client and consumer share.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set_log_level(rdkafka_log_level());
        for (name, value) in &self.properties.0 {
            use secrecy::ExposeSecret;
            config.set(name, value.expose_secret());
        }
        config
    }
}

/// A publish the broker did not acknowledge in full: the indexes of the
/// messages it did acknowledge, and the first failure.
#[derive(Debug, thiserror::Error)]
#[error("publishing failed ({} messages of the batch acknowledged)", acknowledged.len())]
pub struct Unacknowledged {
    /// Indexes into the published slice, in order.
    pub acknowledged: Vec<usize>,
    /// Why the first of the others was not.
    #[source]
    pub error: BusError,
}

/// What went wrong talking to Kafka. The broker's (or librdkafka's) own
/// error text is in the source.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The settings cannot work; nothing was sent.
    #[error("invalid Kafka settings: {0}")]
    InvalidSettings(String),
    /// librdkafka refused the configuration or could not start a client.
    #[error("creating the Kafka {role}")]
    Client {
        role: &'static str,
        #[source]
        source: Box<KafkaError>,
    },
    /// A Kafka consumer must be created inside a Tokio runtime: its wake-up
    /// task runs there.
    #[error("a Kafka consumer must be created inside a Tokio runtime")]
    NoRuntime,
    /// The consumer could not subscribe.
    #[error("subscribing to topic {topic}")]
    Subscribe {
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
    /// The CreateTopics request as a whole failed.
    #[error("creating topics")]
    Admin(#[source] Box<KafkaError>),
    /// The broker refused to create one topic.
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    /// A message was not acknowledged by the broker (or could not even be
    /// queued); the caller should publish it again.
    #[error("publishing to topic {topic} (key {key})")]
    Publish {
        topic: String,
        key: String,
        #[source]
        source: Box<KafkaError>,
    },
    /// The producer shut down while a delivery was outstanding.
    #[error("the Kafka producer stopped before topic {topic} acknowledged key {key}")]
    ProducerGone { topic: String, key: String },
    /// librdkafka reported a fatal consumer error; this consumer cannot go
    /// on and must be recreated.
    #[error("fatal error consuming topic {topic}")]
    Consume {
        topic: String,
        #[source]
        source: Box<KafkaError>,
    },
    /// Reading the consumer's partition assignment failed.
    #[error("reading the partition assignment")]
    Assignment(#[source] Box<KafkaError>),
}

/// One message on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The customer id: it picks the partition, hence the order.
    pub key: String,
    pub payload: Vec<u8>,
}

/// Publishes messages and creates topics.
pub struct KafkaProducer {
    producer: FutureProducer<BusContext>,
    admin: AdminClient<BusContext>,
    settings: KafkaSettings,
    /// The topic [`KafkaProducer::probe`] asks about (see there).
    probe_topic: Option<String>,
}

impl KafkaProducer {
    /// A producer for the brokers in `settings`. Connects lazily: a broker
    /// that is down shows up as an error of the first call, not here.
    pub fn new(settings: &KafkaSettings) -> Result<Self, BusError> {
        Self::build(settings, &[])
    }

    /// A client for [`KafkaProducer::probe`] that asks about `topic`
    /// only, and never has the broker create it: librdkafka's producers
    /// ask the broker to create a topic they ask about by default, and one
    /// made so before ferry made its own would have the broker's default
    /// partitions, which ferry then leaves as they are.
    pub fn for_probe(settings: &KafkaSettings, topic: String) -> Result<Self, BusError> {
        let mut this = Self::build(settings, &[("allow.auto.create.topics", "false")])?;
        this.probe_topic = Some(topic);
        Ok(this)
    }

    fn build(settings: &KafkaSettings, extra: &[(&str, &str)]) -> Result<Self, BusError> {
        settings.validate()?;
        let mut config = settings.client_config();
        for (key, value) in extra {
            config.set(*key, *value);
        }
        config
            // No duplicates or reordering from librdkafka's own retries.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A relay batch goes out in a few requests rather than one each.
            .set("linger.ms", "5")
            // Bounded: a publish that cannot succeed fails and the relay
            // retries the outbox rows later, rather than hanging.
            .set("message.timeout.ms", "30000")
            .set("compression.type", "none")
            // The Java client's key hashing, so a key lands on the same
            // partition whichever client produced it.
            .set("partitioner", "murmur2_random");
        let producer = config
            .create_with_context(BusContext::default())
            .map_err(|source| BusError::Client {
                role: "producer",
                source: Box::new(without_values(source)),
            })?;
        let admin = settings
            .client_config()
            .create_with_context(BusContext::default())
            .map_err(|source| BusError::Client {
                role: "admin client",
                source: Box::new(without_values(source)),
            })?;
        Ok(Self {
            producer,
            admin,
            settings: settings.clone(),
            probe_topic: None,
        })
    }

    /// Creates the topics that are missing, with the configured partitions
    /// and replication factor. Existing topics are left as they are (their
    /// partition count included), so every replica may call this at start.
    #[tracing::instrument(skip_all, fields(topics = ?topics))]
    pub async fn ensure_topics(&self, topics: &[&str]) -> Result<(), BusError> {
        // Those that exist are not asked for: a cluster whose ACLs refuse
        // CreateTopics (a managed Kafka's usual setup, topics made by its
        // operator) answers the ask with an authorization error even for a
        // topic that exists, and the replica stayed unready for good,
        // asking again every 2 s. A metadata read that fails asks for all.
        let existing = match self.existing_topics().await {
            Some(existing) => existing,
            None => {
                tracing::debug!("the cluster's metadata could not be read; asking for every topic");
                Vec::new()
            }
        };
        let topics: Vec<&str> = topics
            .iter()
            .copied()
            .filter(|topic| !existing.iter().any(|e| e == topic))
            .collect();
        if topics.is_empty() {
            return Ok(());
        }
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|topic| {
                NewTopic::new(
                    topic,
                    self.settings.partitions,
                    TopicReplication::Fixed(self.settings.replication_factor),
                )
            })
            .collect();
        // The operation timeout makes the controller answer only once the
        // topic exists on its brokers, so a publish right after this call
        // does not race the creation.
        let options = AdminOptions::new()
            .request_timeout(Some(CALL_TIMEOUT))
            .operation_timeout(Some(CALL_TIMEOUT));
        let results = self
            .admin
            .create_topics(&new_topics, &options)
            .await
            .map_err(|error| BusError::Admin(Box::new(error)))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(%topic, "created topic"),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(%topic, "topic exists");
                }
                Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
            }
        }
        Ok(())
    }

    /// The cluster's topics that exist with partitions; `None` if its
    /// metadata could not be read.
    async fn existing_topics(&self) -> Option<Vec<String>> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = producer.client().fetch_metadata(None, CALL_TIMEOUT).ok()?;
            Some(
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                    .map(|t| t.name().to_owned())
                    .collect(),
            )
        })
        .await
        .ok()
        .flatten()
    }

    /// Sends every message to `topic` and returns once the broker
    /// acknowledged all of them. Messages are queued in slice order, so
    /// messages with the same key keep their order. On error every
    /// delivery has still been waited for, and the error says which
    /// messages were acknowledged: publish the others again (a partition
    /// the broker cannot reach fails its own messages, not the batch's).
    #[tracing::instrument(skip_all, fields(topic = %topic, messages = messages.len()))]
    pub async fn publish(&self, topic: &str, messages: &[Message]) -> Result<(), Unacknowledged> {
        let published = self.publish_all(topic, messages).await;
        if published.is_err() {
            crate::metrics::kafka_producer_error();
        }
        published
    }

    async fn publish_all(&self, topic: &str, messages: &[Message]) -> Result<(), Unacknowledged> {
        let mut deliveries = Vec::with_capacity(messages.len());
        let mut first_error = None;
        for message in messages {
            match self.enqueue(topic, message).await {
                Ok(delivery) => deliveries.push(delivery),
                // The rest stay unsent; those queued are waited for.
                Err(error) => {
                    first_error = Some(error);
                    break;
                }
            }
        }
        let mut acknowledged = Vec::with_capacity(deliveries.len());
        for (index, (delivery, message)) in deliveries.into_iter().zip(messages).enumerate() {
            match delivery.await {
                Ok(Ok(_)) => acknowledged.push(index),
                Ok(Err((source, _))) => {
                    first_error.get_or_insert_with(|| BusError::Publish {
                        topic: topic.to_owned(),
                        key: message.key.clone(),
                        source: Box::new(source),
                    });
                }
                Err(_canceled) => {
                    first_error.get_or_insert_with(|| BusError::ProducerGone {
                        topic: topic.to_owned(),
                        key: message.key.clone(),
                    });
                }
            }
        }
        match first_error {
            None => Ok(()),
            Some(error) => Err(Unacknowledged {
                acknowledged,
                error,
            }),
        }
    }

    /// The fatal error librdkafka raised on this producer, if it did: it
    /// cannot publish again (an idempotent producer whose sequence broke,
    /// or that the cluster refused for good), and must be replaced.
    pub fn fatal_error(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code}: {reason}"))
    }

    /// Asks the cluster for its metadata (`/readyz` in cluster mode): of
    /// ferry's changes topic only, when set ([`KafkaProducer::for_probe`]),
    /// which says as well whether the brokers answer. Of every topic, on a
    /// large shared cluster, it was a sizeable answer each second of each
    /// replica's probe.
    pub async fn probe(self: &std::sync::Arc<Self>, timeout: Duration) -> Result<(), BusError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            this.producer
                .client()
                .fetch_metadata(this.probe_topic.as_deref(), timeout)
                .map(drop)
                .map_err(|source| BusError::Client {
                    role: "readiness probe",
                    source: Box::new(source),
                })
        })
        .await
        .unwrap_or_else(|_| {
            Err(BusError::Client {
                role: "readiness probe",
                source: Box::new(KafkaError::Canceled),
            })
        })
    }

    /// Puts one message into librdkafka's queue, waiting while the queue is
    /// full (it drains as the broker acknowledges, or as messages time out).
    async fn enqueue(&self, topic: &str, message: &Message) -> Result<DeliveryFuture, BusError> {
        let mut record = FutureRecord::to(topic)
            .key(message.key.as_str())
            .payload(message.payload.as_slice());
        loop {
            match self.producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(QUEUE_FULL_WAIT).await;
                }
                Err((source, _)) => {
                    return Err(BusError::Publish {
                        topic: topic.to_owned(),
                        key: message.key.clone(),
                        source: Box::new(source),
                    })
                }
            }
        }
    }
}

/// A member of the consumer group, subscribed to one topic.
pub struct KafkaConsumer {
    // In an `Arc` so that the blocking librdkafka calls (commit, seek) can
    // run on the blocking pool.
    consumer: Arc<StreamConsumer<BusContext>>,
    topic: String,
    group_id: String,
}

/// Where a batch starts and ends, per partition.
#[derive(Debug, Default)]
struct BatchPositions {
    /// partition -> (first offset, last offset)
    partitions: BTreeMap<i32, (i64, i64)>,
}

impl BatchPositions {
    fn record(&mut self, partition: i32, offset: i64) {
        self.partitions
            .entry(partition)
            .and_modify(|(_, last)| *last = offset)
            .or_insert((offset, offset));
    }
}

/// librdkafka's `max.poll.interval.ms` for batches handled within
/// `handling`: a minute past it, at least librdkafka's default of five
/// minutes, at most its own bound of a day.
fn max_poll_interval_ms(handling: std::time::Duration) -> u64 {
    let ms = u64::try_from(handling.as_millis()).unwrap_or(u64::MAX);
    ms.saturating_add(60_000).clamp(300_000, 86_400_000)
}

impl KafkaConsumer {
    /// Joins `settings.group_id` and subscribes to `topic` (which should
    /// exist: see [`KafkaProducer::ensure_topics`]). Must be called inside a
    /// Tokio runtime. A partition without a committed offset is read from
    /// its beginning, so nothing published before the group first started
    /// is missed.
    pub fn new(settings: &KafkaSettings, topic: &str) -> Result<Self, BusError> {
        settings.validate()?;
        // rdkafka spawns the consumer's wake-up task on the current runtime
        // and would panic without one.
        tokio::runtime::Handle::try_current().map_err(|_| BusError::NoRuntime)?;
        let mut config = settings.client_config();
        config
            .set("group.id", &settings.group_id)
            // Offsets are committed by `run`, after the handler succeeded.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // How long the broker may hold a fetch that found nothing: it
            // bounds how late an idle worker sees a new change. Kafka answers
            // as soon as data arrives, so this only sets the idle polling rate
            // (10 per second); brokers that just wait it out (tansu) cost this
            // much latency on every fetch.
            .set("fetch.wait.max.ms", "100")
            // A crashed member's partitions move on within 10 s; the short
            // heartbeat lets members notice a rebalance quickly.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set(
                "max.poll.interval.ms",
                max_poll_interval_ms(settings.batch_handling).to_string(),
            )
            // Per-partition consumer lag for the metrics (see `stats`).
            .set("statistics.interval.ms", "5000");
        let consumer: StreamConsumer<BusContext> = config
            .create_with_context(BusContext::default())
            .map_err(|source| BusError::Client {
                role: "consumer",
                source: Box::new(without_values(source)),
            })?;
        consumer
            .subscribe(&[topic])
            .map_err(|source| BusError::Subscribe {
                topic: topic.to_owned(),
                source: Box::new(source),
            })?;
        Ok(Self {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            group_id: settings.group_id.clone(),
        })
    }

    /// Leaves the group at once, so that its partitions move to the other
    /// members now rather than after the session timeout. Dropping the
    /// consumer does the same but blocks the calling thread until the broker
    /// answered.
    pub async fn close(self) {
        // The lag it reported reads 0 from now on, as it would on a
        // partition moved away: the next consumer (or member) reports its
        // own, and one never reported again would read its last lag for
        // good.
        let reported = std::mem::take(
            &mut *self
                .consumer
                .context()
                .lagging
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (topic, partition) in reported {
            crate::metrics::kafka_consumer_lag(&topic, partition, 0);
        }
        let consumer = self.consumer;
        if let Err(join_error) = tokio::task::spawn_blocking(move || drop(consumer)).await {
            tracing::error!(%join_error, "closing the consumer failed");
        }
    }

    /// The partitions of the topic the group currently assigns to this
    /// member (empty before it joined).
    pub fn assignment(&self) -> Result<Vec<i32>, BusError> {
        let assignment = self
            .consumer
            .assignment()
            .map_err(|error| BusError::Assignment(Box::new(error)))?;
        Ok(assignment
            .elements_for_topic(&self.topic)
            .iter()
            .map(|element| element.partition())
            .collect())
    }

    /// Hands the messages to `handler` in batches of at most `max_batch`
    /// (the first message and whatever else arrives within 10 ms), in order
    /// within each partition, until `cancel` fires. One `run` per consumer
    /// at a time.
    ///
    /// After `handler` returns `Ok` the batch's offsets are committed: the
    /// handler must have made its outcome durable by then. After `Err` the
    /// consumer waits (100 ms, doubling up to 5 s) and hands the same
    /// messages again, starting from the first message of each partition of
    /// the failed batch; nothing is ever skipped. A batch being handled is
    /// finished and committed before cancellation is noticed.
    ///
    /// A commit that fails (typically because a rebalance gave the partition
    /// to another member) is logged and ignored: the new owner reads the
    /// messages again from the last committed offset.
    #[tracing::instrument(skip_all, fields(topic = %self.topic, group = %self.group_id))]
    pub async fn run<F, Fut>(
        &self,
        cancel: CancellationToken,
        max_batch: usize,
        mut handler: F,
    ) -> Result<(), BusError>
    where
        F: FnMut(Vec<Message>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let max_batch = max_batch.max(1);
        let mut retry_wait = RETRY_INITIAL;
        // After a failure, the retry is cut to the failed batch's size so
        // that it is the same batch, not a larger one.
        let mut limit = max_batch;
        let mut attempt: u32 = 1;
        loop {
            let Some((messages, positions)) = self.next_batch(&cancel, limit).await? else {
                return Ok(());
            };
            let size = messages.len();
            match handler(messages).await {
                Ok(()) => {
                    self.commit(&positions).await;
                    retry_wait = RETRY_INITIAL;
                    limit = max_batch;
                    attempt = 1;
                }
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        messages = size,
                        attempt,
                        retry_in_ms = retry_wait.as_millis() as u64,
                        "handler failed; the batch will be handed over again"
                    );
                    self.rewind(&positions).await;
                    limit = size;
                    attempt = attempt.saturating_add(1);
                    tokio::select! {
                        () = cancel.cancelled() => return Ok(()),
                        () = tokio::time::sleep(retry_wait) => {}
                    }
                    retry_wait = (retry_wait * 2).min(RETRY_MAX);
                }
            }
            if cancel.is_cancelled() {
                return Ok(());
            }
        }
    }

    /// Waits for the next message (or `cancel`), then collects what else
    /// arrives within [`BATCH_WINDOW`], up to `limit` messages. `None` when
    /// cancelled.
    async fn next_batch(
        &self,
        cancel: &CancellationToken,
        limit: usize,
    ) -> Result<Option<(Vec<Message>, BatchPositions)>, BusError> {
        let mut messages = Vec::with_capacity(limit.min(1024));
        let mut positions = BatchPositions::default();
        loop {
            let received = tokio::select! {
                // Cancellation safe: a message is taken off the queue only
                // when `recv` completes.
                () = cancel.cancelled() => return Ok(None),
                received = self.consumer.recv() => received,
            };
            // The borrowed message is converted at once: it must not be held
            // across an await (it is not `Send`).
            match received {
                Ok(message) => {
                    self.take(&message, &mut messages, &mut positions);
                    break;
                }
                Err(error) => self.consume_error(error)?,
            }
        }
        // Not raced with `cancel`: the window is short, and a message taken
        // off the queue must reach the handler, or this consumer would skip it.
        let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
        while messages.len() < limit {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_elapsed) => break,
                Ok(Ok(message)) => self.take(&message, &mut messages, &mut positions),
                Ok(Err(error)) => {
                    self.consume_error(error)?;
                    break;
                }
            }
        }
        tracing::debug!(
            messages = messages.len(),
            offsets = ?positions.partitions,
            "batch received"
        );
        Ok(Some((messages, positions)))
    }

    fn take(
        &self,
        message: &BorrowedMessage<'_>,
        messages: &mut Vec<Message>,
        positions: &mut BatchPositions,
    ) {
        let key = match message.key() {
            None => String::new(),
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(key) => key.to_owned(),
                // Not written by ferry; handed over rather than dropped so
                // that the handler decides (and nothing vanishes silently).
                Err(_) => {
                    tracing::warn!(
                        partition = message.partition(),
                        offset = message.offset(),
                        "message key is not UTF-8"
                    );
                    String::from_utf8_lossy(bytes).into_owned()
                }
            },
        };
        messages.push(Message {
            key,
            payload: message.payload().unwrap_or_default().to_vec(),
        });
        positions.record(message.partition(), message.offset());
    }

    /// Fatal errors end the consumer; the rest (a broker going away, a
    /// topic not there yet) librdkafka recovers from by itself.
    fn consume_error(&self, error: KafkaError) -> Result<(), BusError> {
        if matches!(error, KafkaError::MessageConsumptionFatal(_)) {
            return Err(BusError::Consume {
                topic: self.topic.clone(),
                source: Box::new(error),
            });
        }
        tracing::warn!(error = %error, "consumer error; librdkafka retries");
        Ok(())
    }

    /// Commits "next to read = last handled + 1" for each partition of the
    /// batch, waiting for the broker's answer so that a stopping worker does
    /// not leave its last batch uncommitted.
    #[tracing::instrument(skip_all, fields(partitions = positions.partitions.len()))]
    async fn commit(&self, positions: &BatchPositions) {
        let mut offsets = TopicPartitionList::with_capacity(positions.partitions.len());
        for (&partition, &(_, last)) in &positions.partitions {
            if let Err(error) =
                offsets.add_partition_offset(&self.topic, partition, Offset::Offset(last + 1))
            {
                tracing::warn!(%error, partition, "cannot record the offset to commit");
            }
        }
        let consumer = Arc::clone(&self.consumer);
        let result =
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync)).await;
        match result {
            Ok(Ok(())) => tracing::debug!("offsets committed"),
            Ok(Err(error)) => tracing::warn!(
                %error,
                "offset commit failed (a rebalance moved the partition?); \
                 its next owner sees these messages again"
            ),
            Err(join_error) => tracing::error!(%join_error, "offset commit task failed"),
        }
    }

    /// Moves each partition of a failed batch back to the batch's first
    /// message, so the next fetch hands it over again. A partition this
    /// member lost meanwhile cannot be moved back; its new owner starts from
    /// the last committed offset anyway.
    #[tracing::instrument(skip_all, fields(partitions = positions.partitions.len()))]
    async fn rewind(&self, positions: &BatchPositions) {
        let mut offsets = TopicPartitionList::with_capacity(positions.partitions.len());
        for (&partition, &(first, _)) in &positions.partitions {
            if let Err(error) =
                offsets.add_partition_offset(&self.topic, partition, Offset::Offset(first))
            {
                tracing::warn!(%error, partition, "cannot record the offset to seek to");
            }
        }
        let consumer = Arc::clone(&self.consumer);
        let result = tokio::task::spawn_blocking(move || {
            consumer.seek_partitions(offsets, CALL_TIMEOUT).map(|done| {
                done.elements()
                    .iter()
                    .filter_map(|element| {
                        element
                            .error()
                            .err()
                            .map(|error| (element.partition(), error))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .await;
        match result {
            Ok(Ok(failed)) => {
                for (partition, error) in failed {
                    tracing::warn!(partition, %error, "cannot seek back (partition reassigned?)");
                }
            }
            Ok(Err(error)) => tracing::warn!(%error, "cannot seek back"),
            Err(join_error) => tracing::error!(%join_error, "seek task failed"),
        }
    }
}

/// librdkafka's callbacks: its log lines and errors go to `tracing`, and
/// rebalances are logged.
#[derive(Default)]
struct BusContext {
    /// The partitions whose lag this client last reported: one it no
    /// longer consumes (moved to another member) reads 0, not its last lag.
    lagging: std::sync::Mutex<std::collections::HashSet<(String, i32)>>,
}

impl ClientContext for BusContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut now = std::collections::HashSet::new();
        for (name, topic) in &statistics.topics {
            for (id, partition) in &topic.partitions {
                // A lag of -1: not consumed here.
                if *id >= 0 && partition.consumer_lag >= 0 {
                    crate::metrics::kafka_consumer_lag(name, *id, partition.consumer_lag);
                    now.insert((name.clone(), *id));
                }
            }
        }
        let mut lagging = self.lagging.lock().unwrap_or_else(|p| p.into_inner());
        for (topic, partition) in lagging.difference(&now) {
            crate::metrics::kafka_consumer_lag(topic, *partition, 0);
        }
        *lagging = now;
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports transient trouble (a broker down, all brokers
        // down) here and keeps retrying; fatal errors also reach the caller.
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }
}

impl ConsumerContext for BusContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions revoked");
            }
            Rebalance::Assign(partitions) => {
                tracing::info!(partitions = %describe(partitions), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
        }
    }
}

/// `topic[0,1,2]` style list for logs.
fn describe(partitions: &TopicPartitionList) -> String {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    let elements = partitions.elements();
    for element in &elements {
        by_topic
            .entry(element.topic())
            .or_default()
            .push(element.partition());
    }
    by_topic
        .iter()
        .map(|(topic, partitions)| format!("{topic}{partitions:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// librdkafka formats only the lines `tracing` would keep.
fn rdkafka_log_level() -> RDKafkaLogLevel {
    match LevelFilter::current() {
        LevelFilter::TRACE | LevelFilter::DEBUG => RDKafkaLogLevel::Debug,
        LevelFilter::INFO => RDKafkaLogLevel::Info,
        LevelFilter::WARN => RDKafkaLogLevel::Warning,
        _ => RDKafkaLogLevel::Error,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// librdkafka's default (five minutes) put a member handling a batch
    /// for longer out of the group: a `sync_lease` over it made every slow
    /// batch a rebalance and a second handling elsewhere.
    #[test]
    fn a_batch_may_take_its_leases_before_the_group_gives_up_on_its_member() {
        assert_eq!(
            super::max_poll_interval_ms(Duration::from_secs(70)),
            300_000
        );
        assert_eq!(
            super::max_poll_interval_ms(Duration::from_secs(600)),
            660_000
        );
        assert_eq!(super::max_poll_interval_ms(Duration::MAX), 86_400_000);
    }
}
