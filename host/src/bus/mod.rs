//! The bus between the outbox and the sync workers.
//!
//! Embedded mode ([`run_embedded_relay`]): the outbox table is the bus. The
//! relay takes the oldest rows off the outbox queue and schedules their
//! pushes, atomically (one statement on PostgreSQL); the sync scheduler then
//! pushes them.
//!
//! Cluster mode: [`run_kafka_relay`] publishes the outbox to Kafka (key =
//! customer id, so one customer's changes stay in one partition, in order)
//! and marks rows published only after the broker acknowledged them;
//! [`run_kafka_consumer`] consumes in the replicas' shared consumer group,
//! schedules and runs the pushes, and commits offsets only once their
//! outcomes are recorded. Any step may run twice after a crash: scheduling
//! is an idempotent upsert and pushes are keyed, so twice is harmless.

pub mod kafka;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::inbox::InboxState;
use crate::store::{ChangeNotice, Store};
use crate::sync::SyncEngine;

/// Outbox rows moved per relay round.
const RELAY_BATCH: u32 = 500;
/// Longest the relay waits without a signal before looking again (a write
/// by another process signals nothing).
const RELAY_POLL: Duration = Duration::from_millis(250);
/// Pause after a failed round.
const RELAY_BACKOFF: Duration = Duration::from_secs(1);
/// A leader whose rounds have failed for this long gives the leadership
/// up (a replica that reaches the broker may take it) and, if its producer
/// hit a fatal error, makes a new one. A round fails only when the broker
/// acknowledged none of its batch: one that timed out whole
/// (`message.timeout.ms`, 30 s) is enough, as the broker is then away from
/// this replica, while a partition away on its own fails only its share
/// and does not count, until its rows fill whole batches (the oldest are
/// read first): then the relay steps down too, and the redelivery net
/// carries every change until the partition is back.
const STEP_DOWN_AFTER: Duration = Duration::from_secs(30);
/// How long a leader that stepped down waits before it tries to lead
/// again: longer than the others' [`LEADER_POLL`], so one of them leads.
const STEP_DOWN_PAUSE: Duration = Duration::from_secs(6);
/// Shortest time between the starts of two relay rounds. Commits signal the
/// relay one by one; under load a round per commit costs two statements
/// (read the queue, take the rows off it with their pushes) per few rows.
/// Waiting out the rest of this interval lets a round take what several
/// commits wrote, for at most this much added latency.
const RELAY_MIN_INTERVAL: Duration = Duration::from_millis(2);

/// Embedded mode: drains the outbox into scheduled pushes until cancelled.
///
/// While no connector takes part, a round schedules nothing and only takes
/// the changes off the queue: nothing waits on that, so the relay then
/// looks every [`RELAY_POLL`] instead of after each commit, and the
/// creates keep the database to themselves (docs/performance.md, round 9).
pub async fn run_embedded_relay(store: Store, engine: SyncEngine, cancel: CancellationToken) {
    let commits = Arc::clone(store.commits());
    loop {
        let started = tokio::time::Instant::now();
        let (wait, on_commit) = match relay_round(&engine).await {
            Ok(Round { moved: 0, .. }) => (RELAY_POLL, true),
            Ok(Round { moved, scheduled }) => {
                tracing::debug!(moved, "outbox relayed");
                // A full batch: more waits, taken at once (unless the
                // process stops: its tasks stop at their next step).
                if moved == RELAY_BATCH as usize && !cancel.is_cancelled() {
                    continue;
                }
                if scheduled {
                    // A commit since the read has left a signal: the wait
                    // below returns at once, after the interval.
                    tokio::time::sleep_until(started + RELAY_MIN_INTERVAL).await;
                }
                (RELAY_POLL, scheduled)
            }
            // The pause holds whatever commits meanwhile: a store that
            // fails at once would otherwise be asked again on every commit.
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "outbox relay round failed");
                (RELAY_BACKOFF, false)
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = commits.outbox.notified(), if on_commit => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// What one relay round did.
struct Round {
    /// Changes taken off the queue.
    moved: usize,
    /// Whether any of them was scheduled for a connector.
    scheduled: bool,
}

async fn relay_round(engine: &SyncEngine) -> anyhow::Result<Round> {
    let intake = engine.accept_queued(RELAY_BATCH).await?;
    // No connector takes part: nothing was scheduled, nothing to wake for.
    if intake.scheduled {
        engine.wake();
    }
    Ok(Round {
        moved: intake.taken,
        scheduled: intake.scheduled,
    })
}

/// Cluster mode's safety net: a change the bus acknowledged but no consumer
/// took within `after` (a broker that lost it, a consumer group stuck
/// without partitions), or that the relay could not publish within `after`
/// (the bus unreachable from the relaying replica, a topic gone), is
/// scheduled from the outbox directly, a batch at a time until none is
/// left. Normally this finds nothing; when it does, it says so.
pub async fn run_redelivery(
    store: Store,
    engine: SyncEngine,
    after: Duration,
    cancel: CancellationToken,
) {
    let every = (after / 2).max(Duration::from_millis(500));
    // At 0 from the start: a series first seen at its first rise reads as
    // no increase, and the alert on it missed the one burst it is for.
    metrics::counter!("ferry_bus_redelivered_total").increment(0);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        // The configuration bounds `after`; a cutoff before what a date
        // holds is the earliest one.
        let older_than = chrono::Duration::from_std(after)
            .ok()
            .and_then(|after| crate::store::now().checked_sub_signed(after))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
        // A full batch: more may wait behind it (a stuck group under load).
        let mut full = true;
        while full && !cancel.is_cancelled() {
            full = false;
            match store.unconsumed_outbox(older_than, RELAY_BATCH).await {
                Ok(changes) if changes.is_empty() => {}
                Ok(changes) => {
                    tracing::warn!(
                        changes = changes.len(),
                        after_ms = after.as_millis() as u64,
                        "the bus did not deliver these changes in time; scheduling them from the outbox"
                    );
                    match engine.accept(&changes).await {
                        Ok(_) => {
                            // Counted: a change the relay published but no
                            // consumer took (a group's ACL, another member
                            // holding the partitions) left the outbox's
                            // gauges at 0, and this log line was all.
                            metrics::counter!("ferry_bus_redelivered_total")
                                .increment(changes.len() as u64);
                            engine.wake();
                            full = changes.len() >= RELAY_BATCH as usize;
                        }
                        Err(error) => tracing::warn!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            "redelivery failed"
                        ),
                    }
                }
                Err(error) => tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "looking for undelivered changes failed"
                ),
            }
        }
    }
}

/// How often a standby replica asks to become the relay leader.
const LEADER_POLL: Duration = Duration::from_secs(2);
/// Changes a consumer hands the sync engine at once.
const CONSUME_BATCH: usize = 256;

/// Pause between two attempts to create the topics while the broker is
/// away, and before a consumer that stopped on a fatal error is made again.
const BUS_RETRY: Duration = Duration::from_secs(2);

/// The topic of the outbox's changes under `prefix`.
pub fn changes_topic(prefix: &str) -> String {
    format!("{prefix}.changes")
}

/// Cluster mode: starts the redelivery safety net at once, then, as soon as
/// the topics exist (`{prefix}.changes` for the outbox, `{prefix}.inbox`
/// for webhook events; created if missing), the relay and the two
/// consumers, all under `tasks`.
///
/// A broker that cannot be reached does not keep the replica from serving:
/// the topics are asked for again every [`BUS_RETRY`] until they exist,
/// and meanwhile the outbox's changes reach their connectors through the
/// redelivery net and the inbox's events through the inbox loops' grace
/// (docs/deployment.md). `/readyz` says the bus is down. Only settings the
/// clients refuse fail the start.
pub async fn start_kafka(
    tasks: &crate::app::Supervised,
    settings: &kafka::KafkaSettings,
    prefix: &str,
    state: KafkaParts<'_>,
    redelivery_after: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let topics = Topics {
        changes: changes_topic(prefix),
        inbox: format!("{prefix}.inbox"),
    };
    let producer = kafka::KafkaProducer::new(settings)?;
    tasks.spawn(
        "redelivery",
        run_redelivery(
            state.store.clone(),
            state.sync.clone(),
            redelivery_after,
            cancel.clone(),
        ),
    );
    let store = state.store.clone();
    let sync = state.sync.clone();
    let topics_state = state.topics.clone();
    let settings = settings.clone();
    let settings_for_relay = settings.clone();
    let tracker = tasks.clone();
    tasks.spawn("kafka topics", async move {
        let names = [topics.changes.as_str(), topics.inbox.as_str()];
        loop {
            let created = tokio::select! {
                () = cancel.cancelled() => return,
                created = producer.ensure_topics(&names) => created,
            };
            match created {
                Ok(()) => break,
                Err(error) => {
                    let error = format!("{:#}", anyhow::Error::from(error));
                    tracing::warn!(
                        error,
                        retry_in_ms = BUS_RETRY.as_millis() as u64,
                        "cannot create the bus's topics yet; changes go through the redelivery net meanwhile"
                    );
                    // The reason is the log's: `/readyz` answers anyone,
                    // and librdkafka's text names brokers and SASL users.
                    topics_state.waiting(
                        "creating the bus's topics failed; the reason is in the log (warn)",
                    );
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(BUS_RETRY) => {}
                    }
                }
            }
        }
        topics_state.created();
        tracker.spawn("kafka consumer", run_kafka_consumer(
            settings.clone(),
            topics.changes.clone(),
            sync.clone(),
            cancel.clone(),
        ));
        tracker.spawn("kafka inbox consumer", run_inbox_consumer(
            settings,
            topics.inbox.clone(),
            sync,
            cancel.clone(),
        ));
        tracker.spawn(
            "kafka relay",
            run_kafka_relay(store, producer, settings_for_relay, topics, cancel),
        );
    });
    Ok(())
}

/// What the Kafka bus works with.
pub struct KafkaParts<'a> {
    /// The outbox and the inbox it publishes.
    pub store: &'a Store,
    /// What consumed changes and events go to.
    pub sync: &'a SyncEngine,
    /// Where `/readyz` learns whether the topics exist yet.
    pub topics: &'a TopicsState,
}

/// Why the bus's topics are not there yet (`None`: they are, or this
/// replica runs no bus workers), for `/readyz`: until they exist the relay
/// and the consumers have not started, and a broker that refuses them for
/// good (a replication factor above its broker count, an ACL) would
/// otherwise leave the replica ready on the redelivery net alone. (A
/// replica started while the broker is away is unready too, until it
/// answers: a mistyped broker address, a TLS or SASL mistake, looks the
/// same from here, docs/performance.md, round 42.)
#[derive(Debug, Clone, Default)]
pub struct TopicsState(Arc<std::sync::Mutex<Option<String>>>);

impl TopicsState {
    /// The topics are not there yet, because of `why`.
    pub fn waiting(&self, why: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_owned());
    }

    /// The topics exist.
    fn created(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why the topics are not there yet, if they are not.
    pub fn missing(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The topics of one deployment.
pub struct Topics {
    /// Outbox rows: customer changes, keyed by customer id.
    pub changes: String,
    /// Webhook events, keyed by (connector, remote id).
    pub inbox: String,
}

/// Cluster mode: publishes the outbox and the inbox while this replica
/// leads, one loop per topic: a topic that is slow to acknowledge or
/// refused (an ACL, a deleted topic) holds neither the other's rows nor
/// its pace back.
pub async fn run_kafka_relay(
    store: Store,
    mut producer: kafka::KafkaProducer,
    settings: kafka::KafkaSettings,
    topics: Topics,
    cancel: CancellationToken,
) {
    let commits = Arc::clone(store.commits());
    loop {
        let leadership = tokio::select! {
            () = cancel.cancelled() => return,
            leadership = store.try_lead_relay() => leadership,
        };
        let mut leadership = match leadership {
            Ok(Some(leadership)) => leadership,
            Ok(None) => {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(LEADER_POLL) => continue,
                }
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "relay leadership check failed"
                );
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RELAY_BACKOFF) => continue,
                }
            }
        };
        tracing::info!(
            changes = topics.changes,
            inbox = topics.inbox,
            "this replica relays the outbox and the inbox to Kafka"
        );
        let stop = cancel.child_token();
        let (changes, inbox) = (TopicState::default(), TopicState::default());
        let end = {
            let changes_loop = topic_loop(
                &changes,
                || publish_round(&store, &producer, &topics.changes),
                &commits.outbox,
                &stop,
            );
            let inbox_loop = topic_loop(
                &inbox,
                || publish_inbox_round(&store, &producer, &topics.inbox),
                &commits.inbox_stored,
                &stop,
            );
            let watch = async {
                loop {
                    tokio::time::sleep(LEADER_POLL).await;
                    if step_down_due(&changes, &inbox) {
                        return Lead::StepDown;
                    }
                    if !leadership.still_held().await {
                        return Lead::Lost;
                    }
                }
            };
            let (end, (), ()) = tokio::join!(
                async {
                    let end = tokio::select! {
                        () = cancel.cancelled() => Lead::Cancelled,
                        end = watch => end,
                    };
                    stop.cancel();
                    end
                },
                changes_loop,
                inbox_loop,
            );
            end
        };
        match end {
            Lead::Cancelled => return,
            Lead::Lost => {
                tracing::warn!("lost the relay leadership (database session ended)");
            }
            Lead::StepDown => {
                step_down(leadership, &mut producer, &settings).await;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(STEP_DOWN_PAUSE) => {}
                }
            }
        }
    }
}

/// Why a replica's leadership of the relay ended.
enum Lead {
    Cancelled,
    Lost,
    StepDown,
}

/// One topic loop's health, as the leadership's watch reads it.
#[derive(Default)]
struct TopicState {
    /// When its rounds started failing, if the last one failed.
    failing_since: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// Set by a round that failed [`STEP_DOWN_AFTER`] after the first of
    /// its failing run started (that start); cleared only by a round that
    /// publishes. A round with nothing to publish says nothing of the
    /// broker: the redelivery net may have taken the rows it failed on.
    stuck_since: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// When a round last published something.
    published_at: std::sync::Mutex<Option<tokio::time::Instant>>,
}

fn locked<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a relay round did: rows it moved on (published, or marked as
/// needing no message), and of those, messages the broker acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Published {
    moved: usize,
    sent: usize,
}

impl Published {
    fn sent(sent: usize) -> Self {
        Self { moved: sent, sent }
    }
}

impl TopicState {
    fn failed(&self, started: tokio::time::Instant) {
        let since = *locked(&self.failing_since).get_or_insert(started);
        if since.elapsed() >= STEP_DOWN_AFTER {
            locked(&self.stuck_since).get_or_insert(since);
        }
    }

    /// Only the broker's acknowledgement shows it reachable from here: a
    /// round that only marked rows (inbox events settled while it was away)
    /// asked it nothing, and counted as published it kept a leader that
    /// cannot reach the broker in place for as long as such a backlog
    /// lasted.
    fn succeeded(&self, round: Published) {
        if round.sent > 0 || round.moved == 0 {
            *locked(&self.failing_since) = None;
        }
        if round.sent > 0 {
            *locked(&self.stuck_since) = None;
            *locked(&self.published_at) = Some(tokio::time::Instant::now());
        }
    }

    fn failing(&self) -> bool {
        locked(&self.failing_since).is_some()
    }
}

/// Whether the leader should give the relay up: a topic's rounds have
/// failed for [`STEP_DOWN_AFTER`] and the other topic published nothing
/// since they started failing (which would show the broker reachable from
/// here: a topic refused for good is no better relayed by another
/// replica).
fn step_down_due(changes: &TopicState, inbox: &TopicState) -> bool {
    let stuck = |failing: &TopicState, other: &TopicState| {
        let since = *locked(&failing.stuck_since);
        since.is_some_and(|since| locked(&other.published_at).is_none_or(|at| at < since))
    };
    stuck(changes, inbox) || stuck(inbox, changes)
}

/// Publishes one topic's rows, round after round, until `stop`: at once
/// while rounds find rows, after a commit signals `wake` (or
/// [`RELAY_POLL`]) when idle, after [`RELAY_BACKOFF`] when a round failed.
/// A round cut short by `stop` leaves its rows unmarked: published again
/// by the next leader, which consumers take idempotently.
async fn topic_loop<F, Fut>(
    state: &TopicState,
    mut publish: F,
    wake: &tokio::sync::Notify,
    stop: &CancellationToken,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Published>>,
{
    loop {
        let started = tokio::time::Instant::now();
        let round = tokio::select! {
            () = stop.cancelled() => return,
            round = publish() => round,
        };
        let wait = match round {
            Ok(round) => {
                state.succeeded(round);
                if round.moved > 0 {
                    tracing::debug!(moved = round.moved, sent = round.sent, "published");
                    tokio::task::yield_now().await;
                    continue;
                }
                RELAY_POLL
            }
            Err(error) => {
                state.failed(started);
                tracing::warn!(error = format!("{error:#}"), "publishing to Kafka failed");
                RELAY_BACKOFF
            }
        };
        // After a failed round the pause holds whatever commits meanwhile:
        // a broker that refuses at once (an ACL, a fatal producer) would
        // otherwise be asked again on every commit.
        let failing = state.failing();
        tokio::select! {
            () = stop.cancelled() => return,
            () = wake.notified(), if !failing => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Gives the relay leadership up after its rounds failed for
/// [`STEP_DOWN_AFTER`], and replaces a producer librdkafka declared
/// fatally broken (every later publish of it would fail too).
async fn step_down(
    leadership: crate::store::outbox::RelayLeadership,
    producer: &mut kafka::KafkaProducer,
    settings: &kafka::KafkaSettings,
) {
    tracing::warn!(
        failing_for_s = STEP_DOWN_AFTER.as_secs(),
        "publishing keeps failing: gave up the relay leadership for a while; \
         meanwhile changes reach their connectors through the redelivery net"
    );
    leadership.resign().await;
    if let Some(fatal) = producer.fatal_error() {
        match kafka::KafkaProducer::new(settings) {
            Ok(fresh) => {
                tracing::warn!(fatal, "the Kafka producer failed for good; made a new one");
                *producer = fresh;
            }
            Err(error) => tracing::warn!(
                fatal,
                error = format!("{:#}", anyhow::Error::from(error)),
                "the Kafka producer failed for good and a new one cannot be made"
            ),
        }
    }
}

async fn publish_round(
    store: &Store,
    producer: &kafka::KafkaProducer,
    topic: &str,
) -> anyhow::Result<Published> {
    let changes = store.unpublished_outbox(RELAY_BATCH).await?;
    if changes.is_empty() {
        return Ok(Published::default());
    }
    let messages = changes
        .iter()
        .map(|change| {
            Ok(kafka::Message {
                key: change.customer_id.clone(),
                payload: serde_json::to_vec(change)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let acknowledged = acknowledged(producer.publish(topic, &messages).await, changes.len())?;
    // After the acknowledgement: a crash in between publishes these rows
    // again, which consumers absorb.
    let ids: Vec<i64> = acknowledged
        .iter()
        .filter_map(|&i| changes[i].outbox_id)
        .collect();
    store.mark_published(&ids).await?;
    Ok(Published::sent(acknowledged.len()))
}

/// The indexes of a published batch of `len` the broker acknowledged. A
/// batch partly acknowledged (a partition whose leader is away fails its
/// own messages) counts as progress: its acknowledged rows are marked, the
/// others stay for the next round. Nothing acknowledged is the round's
/// failure.
fn acknowledged(
    published: Result<(), kafka::Unacknowledged>,
    len: usize,
) -> anyhow::Result<Vec<usize>> {
    match published {
        Ok(()) => Ok((0..len).collect()),
        Err(unacked) if unacked.acknowledged.is_empty() => Err(unacked.into()),
        Err(unacked) => {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(unacked.error)),
                acknowledged = unacked.acknowledged.len(),
                of = len,
                "part of a batch was not acknowledged; the rest is published again next round"
            );
            Ok(unacked.acknowledged)
        }
    }
}

async fn publish_inbox_round(
    store: &Store,
    producer: &kafka::KafkaProducer,
    topic: &str,
) -> anyhow::Result<Published> {
    let mut events = store.unpublished_inbox(RELAY_BATCH).await?;
    if events.is_empty() {
        return Ok(Published::default());
    }
    // Settled by the inbox loops while the broker was away: published,
    // each would cost a consumer a claim that finds nothing, and hold back
    // the webhooks that came after (a day's outage is millions).
    let (open, settled): (Vec<_>, Vec<_>) = events
        .drain(..)
        .partition(|e| matches!(e.state, InboxState::Pending | InboxState::Retry));
    let events = open;
    if !settled.is_empty() {
        let seqs: Vec<i64> = settled.iter().map(|e| e.seq).collect();
        store.mark_inbox_unsent(&seqs).await?;
        if events.is_empty() {
            return Ok(Published {
                moved: seqs.len(),
                sent: 0,
            });
        }
    }
    // Key = the remote record: its events stay in one partition, in order.
    let messages: Vec<kafka::Message> = events
        .iter()
        .map(|e| kafka::Message {
            key: format!("{}:{}", e.connector, e.remote_id),
            payload: e.seq.to_string().into_bytes(),
        })
        .collect();
    let acknowledged = acknowledged(producer.publish(topic, &messages).await, events.len())?;
    let seqs: Vec<i64> = acknowledged.iter().map(|&i| events[i].seq).collect();
    store.mark_inbox_published(&seqs).await?;
    Ok(Published {
        moved: settled.len() + seqs.len(),
        sent: seqs.len(),
    })
}

/// Cluster mode: applies the inbox events the bus delivers, in order per
/// remote record; offsets are committed after they are applied.
pub async fn run_inbox_consumer(
    settings: kafka::KafkaSettings,
    topic: String,
    engine: SyncEngine,
    cancel: CancellationToken,
) {
    let handler = |batch: Vec<kafka::Message>| {
        let (engine, cancel) = (engine.clone(), cancel.clone());
        async move {
            let seqs: Vec<i64> = batch
                .iter()
                .filter_map(|m| {
                    let seq = std::str::from_utf8(&m.payload)
                        .ok()
                        .and_then(|text| text.parse().ok());
                    if seq.is_none() {
                        // Not ours: the event it may stand for is still
                        // taken by the inbox loops after their grace.
                        tracing::error!(
                            key = m.key,
                            bytes = m.payload.len(),
                            "unreadable inbox message skipped"
                        );
                    }
                    seq
                })
                .collect();
            engine.apply_inbox_seqs(&seqs, &cancel).await?;
            Ok(())
        }
    };
    consume(&settings, &topic, handler, &cancel).await;
}

/// Cluster mode: consumes changes in the replicas' group and pushes them.
pub async fn run_kafka_consumer(
    settings: kafka::KafkaSettings,
    topic: String,
    engine: SyncEngine,
    cancel: CancellationToken,
) {
    let handler = |batch: Vec<kafka::Message>| {
        let (engine, cancel) = (engine.clone(), cancel.clone());
        async move {
            let mut changes = Vec::with_capacity(batch.len());
            for message in batch {
                // Only ferry writes this topic; a message it cannot read, or
                // one the store would refuse (an id PostgreSQL cannot
                // key), would block the partition forever if retried.
                match serde_json::from_slice::<ChangeNotice>(&message.payload) {
                    Ok(change) => match usable(change) {
                        Ok(change) => changes.push(change),
                        Err(problem) => tracing::error!(
                            key = message.key,
                            problem,
                            "change message ferry cannot use skipped"
                        ),
                    },
                    Err(error) => {
                        tracing::error!(key = message.key, %error, "unreadable change message skipped")
                    }
                }
            }
            let keys = engine.accept(&changes).await?;
            // Taken in (durable): at shutdown, pushes not started are left
            // to the scheduler of whichever replica runs next.
            engine.push_now(keys, &cancel).await;
            Ok(())
        }
    };
    consume(&settings, &topic, handler, &cancel).await;
}

/// A readable change message, if it is one ferry can use: a customer or
/// connector id the store could not key is not ferry's, and may stand for
/// nothing (a change that is ferry's reaches its connectors through the
/// redelivery net anyway); a correlation id it could not keep is dropped.
fn usable(mut change: ChangeNotice) -> Result<ChangeNotice, String> {
    if let Some(problem) = crate::store::unkeyable("customer id", &change.customer_id) {
        return Err(problem);
    }
    if let Some(name) = change
        .source_connector
        .as_deref()
        .filter(|name| !crate::runtime::valid_connector_name(name))
    {
        return Err(format!(
            "a source connector ferry does not name so: {name:?}"
        ));
    }
    if change
        .correlation_id
        .as_deref()
        .is_some_and(|id| crate::store::unkeyable("correlation id", id).is_some())
    {
        change.correlation_id = None;
    }
    Ok(change)
}

/// Runs a consumer of `topic` with `handler` until `cancel` fires. A
/// consumer that stops on an error librdkafka cannot recover from is
/// closed and made again after [`BUS_RETRY`]: it rejoins the group and
/// reads on from the last committed offsets, so nothing is skipped.
async fn consume<F, Fut>(
    settings: &kafka::KafkaSettings,
    topic: &str,
    mut handler: F,
    cancel: &CancellationToken,
) where
    F: FnMut(Vec<kafka::Message>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    crate::metrics::kafka_started(&[topic]);
    while !cancel.is_cancelled() {
        let stopped = match kafka::KafkaConsumer::new(settings, topic) {
            Ok(consumer) => {
                let result = consumer
                    .run(cancel.clone(), CONSUME_BATCH, &mut handler)
                    .await;
                consumer.close().await;
                result
            }
            Err(error) => Err(error),
        };
        let Err(error) = stopped else { return };
        crate::metrics::kafka_consumer_restart(topic);
        tracing::error!(
            error = format!("{:#}", anyhow::Error::from(error)),
            topic,
            retry_in_ms = BUS_RETRY.as_millis() as u64,
            "Kafka consumer stopped; starting a new one"
        );
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(BUS_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The two topics were published in one round: a topic whose messages
    /// wait out the broker's 30 s timeout (a missing one) let the other
    /// publish one batch per 30 s. Each has its own loop now.
    #[tokio::test(start_paused = true)]
    async fn a_slow_topic_does_not_hold_the_other_back() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (changes, inbox) = (TopicState::default(), TopicState::default());
        let stop = CancellationToken::new();
        let (wake_changes, wake_inbox) = (tokio::sync::Notify::new(), tokio::sync::Notify::new());
        let (published, timed_out) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let changes_loop = topic_loop(
            &changes,
            || async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                published.fetch_add(1, Ordering::SeqCst);
                Ok(Published::sent(500))
            },
            &wake_changes,
            &stop,
        );
        let inbox_loop = topic_loop(
            &inbox,
            || async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                timed_out.fetch_add(1, Ordering::SeqCst);
                Err(anyhow::anyhow!("message timed out"))
            },
            &wake_inbox,
            &stop,
        );
        let watch = async {
            tokio::time::sleep(Duration::from_secs(65)).await;
            // The inbox has failed for half a minute, but the changes
            // publish: the broker is there, the leader stays.
            assert!(locked(&inbox.stuck_since).is_some());
            assert!(!step_down_due(&changes, &inbox));
            stop.cancel();
        };
        tokio::join!(changes_loop, inbox_loop, watch);
        assert_eq!(timed_out.load(Ordering::SeqCst), 2);
        let rounds = published.load(Ordering::SeqCst);
        assert!(rounds > 6_000, "{rounds} rounds of changes in 65 s");
        // Nothing published anywhere while one fails: step down, also
        // once a round finds nothing more to publish (the redelivery net
        // took the rows it failed on), until a round publishes.
        let idle = TopicState::default();
        assert!(step_down_due(&idle, &inbox));
        assert!(step_down_due(&inbox, &idle));
        inbox.succeeded(Published::default());
        assert!(step_down_due(&idle, &inbox));
        // Rows marked without a message (inbox events the loops settled
        // while the broker was away) ask the broker nothing: a leader that
        // cannot reach it still steps down, however long that backlog.
        inbox.succeeded(Published {
            moved: 500,
            sent: 0,
        });
        assert!(step_down_due(&idle, &inbox));
        assert!(step_down_due(&inbox, &idle));
        inbox.succeeded(Published::sent(1));
        assert!(!step_down_due(&idle, &inbox));
        assert!(!step_down_due(&idle, &TopicState::default()));
    }

    fn change(customer_id: &str) -> ChangeNotice {
        ChangeNotice {
            customer_id: customer_id.to_owned(),
            version: 2,
            correlation_id: Some("req-1".to_owned()),
            outbox_id: Some(7),
            source_connector: Some("stripe".to_owned()),
        }
    }

    #[test]
    fn a_change_message_the_store_would_refuse_is_not_used() {
        assert!(usable(change("cus_1")).is_ok());
        // Each would fail the intake on every retry, holding the
        // partition for good.
        assert!(usable(change("cus\u{0}1")).is_err());
        assert!(usable(change(&"c".repeat(300))).is_err());
        assert!(usable(change("")).is_err());
        let mut foreign = change("cus_1");
        foreign.source_connector = Some("Not A Name".to_owned());
        assert!(usable(foreign).is_err());
        // Only for the logs: dropped, the change kept.
        let mut traced = change("cus_1");
        traced.correlation_id = Some("req\u{0}1".to_owned());
        let kept = usable(traced).expect("kept");
        assert_eq!(kept.correlation_id, None);
        assert_eq!(kept.customer_id, "cus_1");
    }
}
