//! Outbound sync: from a committed local change to every enabled remote.
//!
//! The bus (the outbox drained in-process, or Kafka) hands changes to
//! [`SyncEngine::accept`], which schedules a push per (customer, connector)
//! in the store. Pushes then run as [`SyncEngine::push_link`] steps on links
//! claimed under a lease: by whoever accepted the change, at once, and by
//! the [`SyncEngine::run_scheduler`] loop for retries and for anything a
//! crashed process left behind. See docs/sync.md.

pub mod breaker;
pub mod group_commit;
pub mod inbound;
pub mod merge;
pub mod outbound;
pub mod reconcile;
pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::breaker::Breakers;
use self::group_commit::{Committer, GroupCommit};
pub use self::outbound::{Outcome, ENTITY};
use self::retry::RetryPolicy;
use crate::registry::{Need, Registry};
use crate::store::inbox::{Applied, InboundChange, NewInboxEvent};
use crate::store::links::{Intake, LinkWrite};
use crate::store::now_ms;
use crate::store::{ChangeNotice, ClaimedLink, LinkKey, Store, StoreError, SyncLink};

/// Longest the scheduler sleeps without being woken.
const IDLE_POLL: Duration = Duration::from_millis(500);

/// Tuning of the sync engine.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Retry schedule.
    pub policy: RetryPolicy,
    /// How long a claim on a link lasts.
    pub lease: Duration,
    /// The longest one connector call may take: a push starts only while
    /// its claim's lease outlasts it.
    pub call_timeout: Duration,
    /// Pushes in flight at once in this process.
    pub concurrency: usize,
    /// Breaker threshold.
    pub breaker_failure_threshold: u32,
    /// Breaker cool-down.
    pub breaker_cooldown: Duration,
    /// How remote deletes and conflicting edits are handled.
    pub inbound: inbound::InboundPolicies,
    /// How long a fresh inbox event is left to the bus before the inbox
    /// loop takes it (zero when the inbox is drained in-process).
    pub inbox_grace: Duration,
    /// Inbox loops, if set (see [`SyncEngine::inbox_loops`]).
    pub inbox_loops: Option<usize>,
    /// How long events may wait while webhooks keep arriving before the
    /// loops after the first join in (see [`SyncEngine::run_inbox`]).
    pub inbox_catch_up_after: Duration,
}

struct Inner {
    store: Store,
    registry: Registry,
    breakers: Breakers,
    policy: RetryPolicy,
    lease: Duration,
    call_timeout: Duration,
    permits: Arc<Semaphore>,
    concurrency: usize,
    /// Pushes running now, by connector (see [`SyncEngine::shares`]).
    pushing: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    link_writes: GroupCommit<LinkWrites>,
    inbox_writes: GroupCommit<InboxWrites>,
    inbound_applies: GroupCommit<InboundApplies>,
    delete_policy: inbound::DeletePolicy,
    conflict_policy: merge::ConflictPolicy,
    field_owners: merge::FieldOwners,
    duplicate_email: inbound::DuplicateEmail,
    duplicate_email_by_connector: std::collections::BTreeMap<String, inbound::DuplicateEmail>,
    inbox_grace: Duration,
    inbox_loops: Option<usize>,
    inbox_catch_up_after: Duration,
    /// When the oldest event of the latest claim arrived (unix ms): the
    /// inbox's lag, as the loops last saw it.
    oldest_claimed_ms: std::sync::atomic::AtomicI64,
    activity: std::sync::Mutex<std::collections::HashMap<String, Activity>>,
}

/// What this process last saw of a connector's sync, both directions.
#[derive(Debug, Clone, Default, serde::Serialize, utoipa::ToSchema)]
pub struct Activity {
    /// When a push or an inbound apply last succeeded.
    pub last_success_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When one last failed (retry scheduled or dead-lettered).
    pub last_error_at: Option<chrono::DateTime<chrono::Utc>>,
    /// That failure's message.
    pub last_error: Option<String>,
}

/// The outbound sync engine; cheap to clone.
#[derive(Clone)]
pub struct SyncEngine {
    inner: Arc<Inner>,
}

impl SyncEngine {
    /// An engine pushing through the connectors of `registry`.
    pub fn new(store: Store, registry: Registry, options: SyncOptions) -> Self {
        // SQLite has one writer anyway; on PostgreSQL an inbound batch's
        // statements are round trips, so several committers keep the
        // applies fed. The pushes' link writes and the webhooks' inbox
        // writes are one statement per group there (one round trip): one
        // committer makes the largest groups, which cost the database
        // least per write (docs/performance.md, rounds 13 and 15).
        let apply_committers = match store.kind() {
            crate::store::StoreKind::Sqlite => 1,
            crate::store::StoreKind::Postgres => 4,
        };
        let link_writes = GroupCommit::start(LinkWrites(store.clone()), 1);
        let inbox_writes = GroupCommit::start(InboxWrites(store.clone()), 1);
        let inbound_applies = GroupCommit::start(InboundApplies(store.clone()), apply_committers);
        Self {
            inner: Arc::new(Inner {
                store,
                registry,
                breakers: Breakers::new(
                    options.breaker_failure_threshold,
                    options.breaker_cooldown,
                )
                .with_calls_of(options.call_timeout),
                policy: options.policy,
                lease: options.lease,
                call_timeout: options.call_timeout,
                permits: Arc::new(Semaphore::new(options.concurrency)),
                concurrency: options.concurrency,
                pushing: Arc::default(),
                link_writes,
                inbox_writes,
                inbound_applies,
                delete_policy: options.inbound.delete,
                conflict_policy: options.inbound.conflict,
                field_owners: options.inbound.field_owners,
                duplicate_email: options.inbound.duplicate_email,
                duplicate_email_by_connector: options.inbound.duplicate_email_by_connector,
                inbox_grace: options.inbox_grace,
                inbox_loops: options.inbox_loops.map(|n| n.max(1)),
                inbox_catch_up_after: options.inbox_catch_up_after,
                oldest_claimed_ms: std::sync::atomic::AtomicI64::new(0),
                activity: std::sync::Mutex::default(),
            }),
        }
    }

    /// Counts one finished step in the metrics and remembers the
    /// connector's last success or failure. `outcome` is the metrics label;
    /// `error` is set for a failure.
    fn observe(
        &self,
        connector: &str,
        direction: &'static str,
        outcome: &'static str,
        error: Option<&str>,
    ) {
        crate::metrics::delivery(connector, direction, outcome);
        let now = chrono::Utc::now();
        if let Ok(mut activity) = self.inner.activity.lock() {
            // A push's hot path: no key allocation once the connector is known.
            if !activity.contains_key(connector) {
                activity.insert(connector.to_owned(), Activity::default());
            }
            let Some(entry) = activity.get_mut(connector) else {
                return;
            };
            match error {
                None => entry.last_success_at = Some(now),
                Some(error) => {
                    entry.last_error_at = Some(now);
                    entry.last_error = Some(error.chars().take(500).collect());
                }
            }
        }
    }

    /// What this process last saw of `connector`'s sync.
    pub fn activity(&self, connector: &str) -> Activity {
        self.inner
            .activity
            .lock()
            .ok()
            .and_then(|activity| activity.get(connector).cloned())
            .unwrap_or_default()
    }

    /// Writes to a claimed link through the group commit; true if the lease
    /// still held.
    async fn write_link(&self, link: &SyncLink, write: LinkWrite) -> Result<bool, StoreError> {
        self.inner.link_writes.submit((link.clone(), write)).await
    }

    /// Stores a verified delivery's events through the inbox group commit;
    /// returns how many were new. Durable when it returns.
    pub async fn store_webhook(
        &self,
        connector: &str,
        events: Vec<NewInboxEvent>,
        correlation_id: Option<String>,
    ) -> Result<usize, StoreError> {
        self.inner
            .inbox_writes
            .submit((connector.to_owned(), events, correlation_id))
            .await
    }

    /// The per-connector circuit breakers.
    pub fn breakers(&self) -> &Breakers {
        &self.inner.breakers
    }

    /// Wakes the link workers: the engine scheduled pushes itself (changes
    /// it accepted from the bus). The store raises the same signal after it
    /// commits a replay.
    pub fn wake(&self) {
        self.inner.store.committed_links();
    }

    /// Schedules pushes for `changes` to every switched-on connector
    /// (enabled, or disabled so they wait), durably, and takes their outbox
    /// rows off the queue in the same transaction. Returns the links to push.
    pub async fn accept(&self, changes: &[ChangeNotice]) -> Result<Vec<LinkKey>, StoreError> {
        let connectors = self.inner.registry.participants(ENTITY);
        self.inner.store.intake_changes(changes, &connectors).await
    }

    /// The in-process bus's round: takes up to `limit` changes off the
    /// outbox queue and schedules their pushes to every switched-on
    /// connector, atomically (see [`Store::intake_queued`]).
    pub async fn accept_queued(&self, limit: u32) -> Result<Intake, StoreError> {
        let connectors = self.inner.registry.participants(ENTITY);
        self.inner.store.intake_queued(limit, &connectors).await
    }

    fn lease(&self) -> (String, i64) {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let until = now_ms()
            .saturating_add(i64::try_from(self.inner.lease.as_millis()).unwrap_or(i64::MAX));
        (token, until)
    }

    /// Claims each of `keys` that is due and free (in one transaction),
    /// pushes them, at most `concurrency` at a time, and waits until every
    /// outcome is recorded. Links another worker holds, or that wait in
    /// backoff, are left to their owner and the scheduler. Once `cancel`
    /// fires (shutdown) no push starts: the claims not started are handed
    /// back, due at once, for any replica's scheduler, instead of holding
    /// their lease until it runs out.
    pub async fn push_now(&self, keys: Vec<LinkKey>, cancel: &CancellationToken) -> Vec<Outcome> {
        let (token, until) = self.lease();
        // Every connector ready to push (a ready one takes part): the claim
        // marks creates only for the keys' own.
        let participants = self.inner.registry.participants(ENTITY);
        let ready = self.ready_to_push(participants.iter().map(String::as_str));
        // A connector's links beyond its share of the slots are left to the
        // scheduler, which hands them out fairly, so a slow remote's pushes
        // hold neither another connector's nor the consumer's.
        let mut room = self.shares(&ready);
        let offered = keys.len();
        let keys: Vec<LinkKey> = keys
            .into_iter()
            .filter(|key| match room.get_mut(&key.connector) {
                Some(0) => false,
                Some(left) => {
                    *left -= 1;
                    true
                }
                None => true,
            })
            .collect();
        if keys.len() < offered {
            self.wake();
        }
        let claimed = match self
            .inner
            .store
            .claim_links(&keys, &ready, &token, until)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "claiming links failed; the scheduler will push them"
                );
                return Vec::new();
            }
        };
        let tasks = TaskTracker::new();
        let (outcomes_tx, mut outcomes_rx) = mpsc::unbounded_channel();
        let mut unstarted = Vec::new();
        for ClaimedLink { link, customer } in claimed {
            let permit = tokio::select! {
                biased;
                () = cancel.cancelled() => None,
                permit = self.inner.permits.clone().acquire_owned() => permit.ok(),
            };
            let Some(permit) = permit else {
                unstarted.push(link);
                continue;
            };
            let engine = self.clone();
            let outcomes_tx = outcomes_tx.clone();
            let pushing = self.pushing(&link.connector);
            tasks.spawn(async move {
                let _slot = (permit, pushing);
                let _ = outcomes_tx.send(engine.push_link(link, customer, until).await);
            });
        }
        drop(outcomes_tx);
        let give_back = async {
            for link in &unstarted {
                let due = LinkWrite::Outcome(crate::store::RecordedOutcome::Deferred {
                    at_ms: now_ms(),
                    waits_for: None,
                });
                if let Err(error) = self.write_link(link, due).await {
                    tracing::debug!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "handing a claim back at shutdown failed; its lease ends it"
                    );
                }
            }
        };
        tasks.close();
        tokio::join!(give_back, tasks.wait());
        let mut outcomes = Vec::new();
        while let Some(outcome) = outcomes_rx.recv().await {
            outcomes.push(outcome);
        }
        outcomes
    }

    /// The slots each of `ready` may still take of its share: with two or
    /// more connectors ready, each has an equal share of the pushes
    /// (`concurrency`) first, so one whose remote is slow cannot hold every
    /// slot while another's pushes wait (docs/sync.md). Empty with one.
    fn shares(&self, ready: &[String]) -> std::collections::HashMap<String, usize> {
        if ready.len() < 2 {
            return std::collections::HashMap::new();
        }
        let share = (self.inner.concurrency / ready.len()).max(1);
        let pushing = lock(&self.inner.pushing);
        ready
            .iter()
            .map(|c| {
                let busy = pushing.get(c).copied().unwrap_or(0);
                (c.clone(), share.saturating_sub(busy))
            })
            .collect()
    }

    /// Counts a push of `connector` as running until the guard is dropped.
    fn pushing(&self, connector: &str) -> Pushing {
        let pushing = Arc::clone(&self.inner.pushing);
        *lock(&pushing).entry(connector.to_owned()).or_default() += 1;
        Pushing {
            pushing,
            connector: connector.to_owned(),
        }
    }

    /// Of `connectors`, those a claim may mark creates for
    /// ([`ClaimedLink`]): loaded, enabled and with a closed breaker, so the
    /// push follows the claim unless one of those changes in between.
    fn ready_to_push<'a>(&self, connectors: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        connectors
            .into_iter()
            .filter(|c| {
                self.inner.registry.ready(c, Need::Entity(ENTITY)).is_ok()
                    && self.inner.breakers.is_closed(c)
            })
            .map(str::to_owned)
            .collect()
    }

    /// Runs due links until cancelled: retries when their time comes, and
    /// anything left pending (a crashed process's claims once their lease
    /// expired, links a busy worker skipped).
    pub async fn run_scheduler(self, cancel: CancellationToken) {
        let tasks = TaskTracker::new();
        // An enabled connector releases the pushes that waited for it.
        let mut registry_changes = self.inner.registry.subscribe();
        // A claim is a statement that walks the due links: it waits until a
        // quarter of the pushes can start, instead of claiming a handful
        // each time one finishes (docs/performance.md).
        let floor = (self.inner.concurrency / 4).max(1);
        loop {
            let mut capacity = tokio::select! {
                () = cancel.cancelled() => break,
                permits = self.inner.permits.clone().acquire_many_owned(u32::try_from(floor).unwrap_or(1)) => {
                    let Ok(permits) = permits else { break };
                    permits
                }
            };
            let more = self.inner.permits.available_permits();
            if let Ok(extra) = self
                .inner
                .permits
                .clone()
                .try_acquire_many_owned(u32::try_from(more).unwrap_or(0))
            {
                capacity.merge(extra);
            }
            let (token, until) = self.lease();
            let participants = self.inner.registry.participants(ENTITY);
            let ready = self.ready_to_push(participants.iter().map(String::as_str));
            // Each ready connector first, up to its share; then whatever is
            // due, oldest first, for the slots left (a connector borrows
            // the slots others leave idle).
            let shares = self.shares(&ready);
            let mut claims: Vec<(Option<&str>, usize)> = shares
                .iter()
                .filter(|&(_, &room)| room > 0)
                .map(|(connector, &room)| (Some(connector.as_str()), room))
                .collect();
            claims.sort_by_key(|&(_, room)| std::cmp::Reverse(room));
            claims.push((None, usize::MAX));
            let mut busy = false;
            for (of, room) in claims {
                let limit = room.min(capacity.num_permits());
                if limit == 0 {
                    continue;
                }
                let claimed = match self
                    .inner
                    .store
                    .claim_due_links(of, &ready, &token, until, u32::try_from(limit).unwrap_or(1))
                    .await
                {
                    Ok(claimed) => claimed,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            "claiming due links failed"
                        );
                        Vec::new()
                    }
                };
                busy |= !claimed.is_empty();
                for ClaimedLink { link, customer } in claimed {
                    let Some(permit) = capacity.split(1) else {
                        break;
                    };
                    let engine = self.clone();
                    let pushing = self.pushing(&link.connector);
                    tasks.spawn(async move {
                        let _slot = (permit, pushing);
                        engine.push_link(link, customer, until).await;
                    });
                }
            }
            drop(capacity);
            if busy {
                continue;
            }
            let sleep = match self.inner.store.next_due_ms().await {
                Ok(Some(due)) => {
                    Duration::from_millis(u64::try_from(due - now_ms()).unwrap_or(0)).min(IDLE_POLL)
                }
                _ => IDLE_POLL,
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.inner.store.commits().links.notified() => {}
                _ = registry_changes.changed() => {}
                () = tokio::time::sleep(sleep.max(Duration::from_millis(5))) => {}
            }
        }
        tasks.close();
        tasks.wait().await;
    }
}

/// A running push of one connector, counted in [`Inner::pushing`].
struct Pushing {
    pushing: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    connector: String,
}

impl Drop for Pushing {
    fn drop(&mut self) {
        let mut pushing = lock(&self.pushing);
        if let Some(busy) = pushing.get_mut(&self.connector) {
            *busy = busy.saturating_sub(1);
            if *busy == 0 {
                pushing.remove(&self.connector);
            }
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Link writes (create markers and outcomes) of concurrent pushes.
struct LinkWrites(Store);

impl Committer for LinkWrites {
    const NAME: &'static str = "link_writes";
    type Write = (SyncLink, LinkWrite);
    type Done = bool;

    fn commit<'a>(
        &'a self,
        writes: &'a [Self::Write],
    ) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        Box::pin(async move {
            let writes: Vec<(&SyncLink, &LinkWrite)> = writes.iter().map(|(l, w)| (l, w)).collect();
            self.0.write_links(&writes).await
        })
    }
}

/// Applied remote changes: each in its own savepoint of one transaction.
struct InboundApplies(Store);

impl Committer for InboundApplies {
    const NAME: &'static str = "inbound_applies";
    type Write = InboundChange;
    type Done = Result<Applied, StoreError>;

    fn commit<'a>(
        &'a self,
        writes: &'a [Self::Write],
    ) -> BoxFuture<'a, Result<Vec<Self::Done>, StoreError>> {
        Box::pin(self.0.apply_inbound_many(writes))
    }
}

/// Verified webhook deliveries: (connector, events, correlation id).
pub struct InboxWrites(pub Store);

impl Committer for InboxWrites {
    const NAME: &'static str = "inbox_writes";
    // Senders hold their connection until acknowledged and send the next
    // delivery at once: beside the peer, +5–10 % acknowledged/s at 32
    // connections (docs/performance.md, round 17).
    const GATHER: bool = true;
    type Write = (String, Vec<NewInboxEvent>, Option<String>);
    type Done = usize;

    fn commit<'a>(
        &'a self,
        writes: &'a [Self::Write],
    ) -> BoxFuture<'a, Result<Vec<usize>, StoreError>> {
        Box::pin(async move {
            let deliveries: Vec<(&str, &[NewInboxEvent], Option<&str>)> = writes
                .iter()
                .map(|(c, e, r)| (c.as_str(), e.as_slice(), r.as_deref()))
                .collect();
            self.0.store_inbox_many(&deliveries).await
        })
    }
}
