//! Reconciliation and backfill: page through a connector's `list`, compare
//! every remote record with the catalog, write a report, and repair what
//! the run's policy says through the normal inbound and outbound paths.
//!
//! A run goes through three phases, each resumable from the position it
//! stored with its last step (docs/reconciliation.md):
//!
//! 1. **listing**: one page at a time (one call in flight, inside the
//!    connector's breaker and rate limit). Linked records are compared with
//!    their customer at once; unlinked ones are kept in the store for the
//!    next phase. A page's findings and the next cursor commit together.
//! 2. **classifying**, only after a *complete* listing: unlinked records are
//!    matched by email (or found duplicate, or missing locally); customers
//!    with no record are missing remotely; links whose record the listing
//!    did not return are orphans. Then the mass-delete brake.
//! 3. **repairing**: each open finding the policy acts on becomes an inbox
//!    event (applied like a webhook: retried, deduplicated, in the
//!    customer's history) or a scheduled push, paced by the backlog so live
//!    traffic keeps going.
//!
//! A run holds a lease in the store: one replica drives it, and another
//! takes it over from its last step when the lease runs out (a crash).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::ToSchema;

use super::breaker::Deferred;
use super::inbound::{email_of, kept_apart, local_record, DeletePolicy, DuplicateEmail, FoldError};
use super::merge::{field_differences, unpushed_differences};
use super::outbound::canonical_record;
use super::{SyncEngine, ENTITY};
use crate::registry::{Need, NotReady};
use crate::runtime::{CallError, ConnectorError, Page};
use crate::store::inbox::{NewInboxEvent, RemoteChange};
use crate::store::now_ms;
use crate::store::reconciliations::{ForcedBy, MismatchRow, NewMismatch, PageFindings, RunRow};
use crate::store::LinkState;
use crate::store::StoreError;

/// Remote records asked for per `list` call.
pub const PAGE_SIZE: u32 = 100;
/// Empty pages in a row, each naming a next one, after which a listing is
/// taken to never end (a connector answering "more" past its last record;
/// a listing with records in between starts counting again).
const EMPTY_PAGES: u32 = 1000;
/// Stored records or findings handled per classification or repair step.
const STEP: u32 = 500;
/// How often the worker looks for runs to drive and schedules to start.
const POLL: Duration = Duration::from_secs(1);
/// How long a run's listing waits for a connector this replica does not
/// know yet before it fails.
const NOT_READY_GRACE: Duration = Duration::from_secs(30);
/// A repair step waits until fewer than this many inbox events, and as
/// many pushes, are waiting (and adds at most [`STEP`]): the queues never
/// run dry during a backfill, and a live webhook or push waits behind at
/// most this many.
const BACKLOG: i64 = 1000;
/// How often a waiting repair step looks at the backlog again.
const BACKLOG_POLL: Duration = Duration::from_millis(20);
/// How long a backfill waits, before it ends, for the imports and links it
/// stored to be applied (the creates it held wait with it), and how often
/// it looks.
const OWN_EVENTS_WAIT: Duration = Duration::from_secs(120);
const OWN_EVENTS_POLL: Duration = Duration::from_millis(100);
/// How long a person's resolution may hold a finding before its repair is
/// scheduled; older claims were left by a process that died.
const STALLED: Duration = Duration::from_secs(300);
/// How often claims older than [`STALLED`] are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// How long a run waiting on a paused connector leaves its place to
/// others before it looks again.
const PARKED: Duration = Duration::from_secs(5);
/// Scratch rows of ended runs one delete takes, per table.
const SCRATCH_BATCH: u32 = 1000;

/// What a run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Find drift and repair it per the run's policy.
    Reconcile,
    /// Bring existing data into sync (a connector's first enable): never
    /// deletes or unlinks anything.
    Backfill,
}

/// What a run changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Repair {
    /// Nothing: the report only.
    #[default]
    Report,
    /// The remote is made to match ferry.
    PushLocal,
    /// ferry is made to match the remote, importing remote-only records.
    PullRemote,
    /// Both ways, by the normal three-way rules and the conflict policy.
    Merge,
}

/// What a repair's push came to ([`SyncEngine::schedule_push`]).
enum Scheduled {
    /// Scheduled: what, for the finding's resolution.
    Done(String),
    /// Nothing to do (the remote has the record after all; a record with
    /// the customer's email stands there): why, for the finding's
    /// resolution. Closed, and not counted as a repair.
    Nothing(String),
    /// Not now: its link is busy (a push in flight carries the customer's
    /// state), or the customer is gone.
    Busy,
    /// Not now: whether the remote still has the record cannot be read
    /// (why).
    Unreadable(String),
    /// Not this driver's: its run lost its lease, or the finding was
    /// repaired by another.
    NotOurs,
}

/// A kind of finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Linked, with field differences.
    Different,
    /// A remote record with no live local customer.
    MissingLocal,
    /// A live customer with no remote record.
    MissingRemote,
    /// A link whose remote record a complete listing did not return.
    Orphan,
    /// An email shared by several remote records, or by a remote record
    /// and a customer already linked to another one.
    Duplicate,
    /// A remote record not linked yet, matching a customer by email.
    Unlinked,
}

macro_rules! names {
    ($($ty:ident { $($variant:ident => $name:literal),+ $(,)? })+) => {$(
        impl $ty {
            /// The `snake_case` name, as stored and served.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }

            /// The value a stored name stands for.
            pub fn parse(name: &str) -> Option<Self> {
                match name { $($name => Some(Self::$variant),)+ _ => None }
            }
        }
    )+};
}

names! {
    Mode { Reconcile => "reconcile", Backfill => "backfill" }
    Repair { Report => "report", PushLocal => "push_local", PullRemote => "pull_remote", Merge => "merge" }
    Kind {
        Different => "different",
        MissingLocal => "missing_local",
        MissingRemote => "missing_remote",
        Orphan => "orphan",
        Duplicate => "duplicate",
        Unlinked => "unlinked",
    }
}

/// A connector reconciled on a schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// The connector.
    pub connector: String,
    /// How often.
    pub every: Duration,
    /// With what repair policy.
    pub repair: Repair,
}

/// How runs are driven.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// A run aborts, repairing nothing, when it finds more orphans than this
    /// share of the connector's live links (at least one is always allowed).
    pub max_delete_share: f64,
    /// Runs this process drives at once (`reconcile_max_runs`).
    pub max_runs: usize,
    /// Scheduled runs.
    pub schedules: Vec<Schedule>,
}

/// Why driving a run stopped before its end.
enum Stop {
    /// Another replica took it over, or it ended meanwhile.
    LeaseLost,
    /// The process is shutting down: the lease runs out and a replica (or
    /// this one, restarted) resumes it.
    Cancelled,
    /// Its connector is paused (or waits for settings): the run gives its
    /// place up for [`PARKED`] and is taken again, here or elsewhere.
    Parked,
    /// It cannot go on: `failed`, with the reason.
    Failed(String),
    /// The store failed: left to the lease, retried.
    Store(StoreError),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

/// What repairing one finding means.
enum Action {
    /// Apply the remote record (or its delete) through the inbox.
    Event(Box<NewInboxEvent>),
    /// Push the customer's current version again (a new idempotency key).
    ForcePush(String),
    /// Push a deleted customer's delete to the record the finding saw
    /// listed (`seen`), also where its link says the remote deleted it
    /// (and has it again: restored).
    PushDelete {
        customer: String,
        seen: Option<String>,
    },
    /// Create the customer's record anew, provided its link still names
    /// no live record but the one the finding saw missing (`seen`: `None`
    /// for a customer never linked).
    Recreate {
        customer: String,
        seen: Option<String>,
    },
}

impl SyncEngine {
    /// Drives reconciliation runs until cancelled: takes over any running
    /// run whose lease expired (started through the API, by a schedule, or
    /// left by a replica that died), and starts scheduled runs when due.
    pub async fn run_reconciler(self, options: ReconcileOptions, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        // Not a run: it holds no place.
        let housekeeping = {
            let engine = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move { engine.clear_scratch(&cancel).await })
        };
        let mut swept: Option<Instant> = None;
        let mut told = HashSet::new();
        loop {
            if let Err(error) = self.start_scheduled(&options, &mut told).await {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "starting scheduled reconciliations failed"
                );
            }
            if swept.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
                self.reopen_stalled_resolutions().await;
                swept = Some(Instant::now());
            }
            while tracker.len() < options.max_runs {
                let token = uuid::Uuid::new_v4().simple().to_string();
                match self
                    .inner
                    .store
                    .claim_run(&token, now_ms() + self.lease_ms())
                    .await
                {
                    Ok(Some(run)) => {
                        let engine = self.clone();
                        let cancel = cancel.clone();
                        let share = options.max_delete_share;
                        tracker.spawn(async move { engine.drive(run, share, &cancel).await });
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            "claiming a reconciliation failed"
                        );
                        break;
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = self.inner.store.commits().runs.notified() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
        tracker.close();
        tracker.wait().await;
        let _ = housekeeping.await;
    }

    /// Starts the runs `options`' schedules make due. A connector's first
    /// run is a person's (its backfill, offered until then): a schedule
    /// waits for it, and says so once in `told`. Started by itself, a
    /// scheduled run took the backfill's place (`enable?backfill=true`
    /// answered 409 once it had enabled the connector) and reported every
    /// record of the remote as a finding.
    async fn start_scheduled(
        &self,
        options: &ReconcileOptions,
        told: &mut HashSet<String>,
    ) -> Result<(), StoreError> {
        for schedule in &options.schedules {
            if self
                .inner
                .registry
                .ready(&schedule.connector, Need::Entity(ENTITY))
                .is_err()
            {
                continue;
            }
            let last = self.inner.store.latest_run(&schedule.connector).await?;
            let due = match last {
                // After a failed backfill the backfill is offered again:
                // a scheduled run in its place linked and imported
                // without holding creates back, and took the offer away.
                // A run a person cancelled counts from its cancel: from its
                // start, a schedule's run stuck past its interval (a remote
                // answering 429 for hours) started again at once.
                Some(last) if !backfill_offered(Some(&last)) => {
                    let from = schedule_from(last.started_at, last.finished_at, last.cancelled());
                    last.status != "running"
                        && next_run_due(from, schedule.every, crate::store::now())
                }
                _ => {
                    if told.insert(schedule.connector.clone()) {
                        // A warning: a schedule that never starts is a trap
                        // (a deployment with nothing to backfill, old runs
                        // deleted by hand).
                        tracing::warn!(
                            connector = schedule.connector,
                            "scheduled reconciliations wait for the connector's first run (or a backfill after one that failed): start a backfill, or any run, through the API or the console"
                        );
                    }
                    false
                }
            };
            if due {
                let started = self
                    .inner
                    .store
                    .start_run(
                        &schedule.connector,
                        Mode::Reconcile.as_str(),
                        schedule.repair.as_str(),
                        "schedule",
                    )
                    .await?;
                if let Some(run) = started {
                    tracing::info!(
                        run_id = run.id,
                        connector = run.connector,
                        "scheduled reconciliation started"
                    );
                }
            }
        }
        Ok(())
    }

    /// Drives one claimed run from where it stands to its end.
    #[tracing::instrument(skip_all, fields(run_id = %run.id, connector = %run.connector))]
    async fn drive(&self, run: RunRow, max_delete_share: f64, cancel: &CancellationToken) {
        let result = self.drive_phases(&run, max_delete_share, cancel).await;
        let store = &self.inner.store;
        let ends = matches!(result, Ok(()) | Err(Stop::Failed(_)));
        let ended = match result {
            Ok(()) => Ok(()),
            Err(Stop::Failed(reason)) => {
                tracing::warn!(reason, "reconciliation failed");
                // The findings its pages made are counted, as a finished
                // run's are: some kinds are counted only once classified.
                if let Err(error) = store.recount(&run).await {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "a failed reconciliation's findings were not counted"
                    );
                }
                match store.finish_run(&run, "failed", Some(&reason)).await {
                    Ok(true) => Ok(()),
                    Ok(false) => {
                        tracing::info!("reconciliation taken over before its failure was written");
                        Ok(())
                    }
                    Err(error) => Err(error),
                }
            }
            Err(Stop::LeaseLost) => {
                tracing::info!("reconciliation taken over or ended elsewhere");
                Ok(())
            }
            Err(Stop::Cancelled) => Ok(()),
            Err(Stop::Parked) => {
                tracing::debug!("reconciliation waits for its connector, its place given up");
                let token = run.lease_token.as_deref().unwrap_or_default();
                let until = now_ms() + i64::try_from(PARKED.as_millis()).unwrap_or(i64::MAX);
                if let Err(error) = store.renew_run(&run.id, token, until).await {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "parking a reconciliation failed; resumed when its lease expires"
                    );
                }
                // Nothing of it ended: no scratch to clear, and its place
                // is free at once.
                return;
            }
            Err(Stop::Store(error)) => Err(error),
        };
        if let Err(error) = ended {
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "reconciliation interrupted by the store; resumed when its lease expires"
            );
        }
        // The creates a backfill held back go now (on any replica: they
        // wait in the store), as updates where it linked.
        if ends && run.mode == Mode::Backfill.as_str() {
            self.resume_held_creates(&run.connector).await;
        }
        self.clear_scratch(cancel).await;
    }

    /// Opens again the findings a person resolved whose repair a process
    /// that died never scheduled (claimed more than [`STALLED`] ago: a
    /// resolution under way on another replica takes well under that), at
    /// start and every [`SWEEP_EVERY`].
    async fn reopen_stalled_resolutions(&self) {
        let before = crate::store::now() - STALLED;
        match self.inner.store.reopen_stalled_resolutions(before).await {
            Ok(0) => {}
            Ok(reopened) => tracing::warn!(
                reopened,
                "findings whose resolution was never scheduled are open again"
            ),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "opening stalled resolutions again failed; tried again in a minute"
            ),
        }
    }

    /// Deletes what ended runs listed into the scratch tables, in small
    /// batches: after each run, and once at start for what a process that
    /// died after ending a run left behind.
    async fn clear_scratch(&self, cancel: &CancellationToken) {
        let store = &self.inner.store;
        let cleared =
            crate::retention::in_batches(cancel, || store.clear_ended_scratch(SCRATCH_BATCH)).await;
        match cleared {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "ended runs' scratch rows deleted"),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "deleting ended runs' scratch rows failed; the next run's end tries again"
            ),
        }
    }

    async fn drive_phases(
        &self,
        run: &RunRow,
        max_delete_share: f64,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let store = &self.inner.store;
        let repair = Repair::parse(&run.repair).unwrap_or_default();
        let mode = Mode::parse(&run.mode).unwrap_or(Mode::Reconcile);
        if run.phase == "listing" {
            self.list_remote(run, cancel).await?;
        }
        let run = self.reload(run).await?;
        if run.phase == "classifying" {
            self.classify(&run, cancel).await?;
            if !store.recount(&run).await? {
                return Err(Stop::LeaseLost);
            }
            let run = self.reload(&run).await?;
            if let Some(reason) = self.brake(&run, mode, repair, max_delete_share).await? {
                tracing::warn!(reason, "reconciliation aborted by the mass-delete brake");
                if !store.finish_run(&run, "aborted", Some(&reason)).await? {
                    return Err(Stop::LeaseLost);
                }
                return Ok(());
            }
            let next = if repair == Repair::Report {
                "done"
            } else {
                "repairing"
            };
            if !store.commit_step(&run, &[], None, next).await? {
                return Err(Stop::LeaseLost);
            }
            // Classified: a backfill's held creates of customers no listed
            // record matches go (outbound's `backfill_holds_create`).
            if mode == Mode::Backfill {
                self.resume_held_creates(&run.connector).await;
            }
        }
        let run = self.reload(&run).await?;
        if run.phase == "repairing" {
            self.repair(&run, mode, repair, cancel).await?;
            // A create a backfill held for a customer it links waits for
            // the link, not only for the event that makes it.
            if mode == Mode::Backfill {
                self.wait_for_own_events(&run, cancel).await?;
            }
        }
        if !store.recount(&run).await? {
            return Err(Stop::LeaseLost);
        }
        if !store.finish_run(&run, "completed", None).await? {
            return Err(Stop::LeaseLost);
        }
        tracing::info!("reconciliation completed");
        Ok(())
    }

    /// The run as stored, if this replica still holds it.
    async fn reload(&self, run: &RunRow) -> Result<RunRow, Stop> {
        match self.inner.store.run(&run.id).await? {
            Some(now) if now.status == "running" && now.lease_token == run.lease_token => Ok(now),
            _ => Err(Stop::LeaseLost),
        }
    }

    async fn renew(&self, run: &RunRow) -> Result<(), Stop> {
        let token = run.lease_token.as_deref().unwrap_or_default();
        if self
            .inner
            .store
            .renew_run(&run.id, token, now_ms() + self.lease_ms())
            .await?
        {
            Ok(())
        } else {
            Err(Stop::LeaseLost)
        }
    }

    /// Renews the run's lease when a third of it has passed since
    /// `renewed`, inside a step whose calls or waits could outlast it.
    async fn renew_when_due(&self, run: &RunRow, renewed: &mut Instant) -> Result<(), Stop> {
        if renewed.elapsed() > self.inner.lease / 3 {
            self.renew(run).await?;
            *renewed = Instant::now();
        }
        Ok(())
    }

    /// Forgets the run's listing so far, in steps under its lease, renewing
    /// it between batches (a large listing's scratch takes many).
    async fn restart_listing(&self, run: &RunRow) -> Result<(), Stop> {
        let store = &self.inner.store;
        if !store.begin_listing_restart(run).await? {
            return Err(Stop::LeaseLost);
        }
        while store.forget_listing_batch(run, SCRATCH_BATCH).await? > 0 {
            self.renew(run).await?;
        }
        if !store.end_listing_restart(run).await? {
            return Err(Stop::LeaseLost);
        }
        Ok(())
    }

    /// A run's lease lasts as long as a push's (`sync_lease`).
    fn lease_ms(&self) -> i64 {
        i64::try_from(self.inner.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Waits `wait` (a rate limit, a backoff, a backlog), renewing the
    /// run's lease on the way, or stops with the process.
    async fn wait(
        &self,
        run: &RunRow,
        cancel: &CancellationToken,
        wait: Duration,
    ) -> Result<(), Stop> {
        let step = self.inner.lease / 3;
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            pause(cancel, left.min(step)).await?;
            self.renew(run).await?;
        }
    }

    /// Phase 1: every page of the connector's `list`, from the stored
    /// cursor. A 429 waits (Retry-After, else a second) and asks again,
    /// however often; other failures retry with backoff, and when retries
    /// run out the run fails: no finding is trusted from a partial listing.
    async fn list_remote(&self, run: &RunRow, cancel: &CancellationToken) -> Result<(), Stop> {
        let inner = &self.inner;
        let mut cursor = run.cursor.clone();
        let mut listed_with = run.listed_with.clone();
        let mut unfinished_restart = run.restart_unfinished();
        let mut failures = 0u32;
        let mut not_ready_since: Option<Instant> = None;
        let mut empty_pages = 0u32;
        loop {
            if cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            self.renew(run).await?;
            let ready = match inner.registry.ready(&run.connector, Need::Entity(ENTITY)) {
                Ok(ready) => ready,
                // Paused by an operator, or waiting for the settings its
                // active version needs: the run waits with it, without
                // holding a place runs of other connectors need. So it does
                // for a replica that loaded it, as pushes do, when this one
                // has no version of it loaded (a load that failed here:
                // another master key, operator rules, a compile; or not
                // done yet). Failed, one run in N of a cluster with one
                // such replica failed, and a failed backfill released the
                // creates it held beside the records they were held for.
                Err(NotReady::Disabled | NotReady::Incomplete(_)) => return Err(Stop::Parked),
                // Waited for as pushes wait, however long: no bound tells
                // "no replica loads it" from a connector switched off, or
                // the replicas that load it busy with other runs (this
                // replica, without it, sees either as not loaded). The
                // connector's load problem is on `/readyz` and its page.
                Err(NotReady::NotLoaded(problem)) => {
                    tracing::debug!(%problem, "the connector is not loaded here; the run waits for a replica that has it");
                    return Err(Stop::Parked);
                }
                // Not known here yet (a connector uploaded a moment ago,
                // this replica's view refreshes every second): wait a
                // while before failing.
                Err(other @ (NotReady::Unknown | NotReady::Unconfigured))
                    if not_ready_since.get_or_insert_with(Instant::now).elapsed()
                        < NOT_READY_GRACE =>
                {
                    tracing::debug!(%other, "the connector is not ready here yet; waiting");
                    self.wait(run, cancel, POLL).await?;
                    continue;
                }
                Err(other) => {
                    return Err(Stop::Failed(format!("the connector is not ready: {other}")))
                }
            };
            not_ready_since = None;
            let code = listing_of(ready.connector.sha256(), &ready.config.settings);
            let other_version = cursor.is_some() && listed_with.as_deref() != Some(code.as_str());
            if other_version || unfinished_restart {
                // Another version made the cursor (activated or rolled
                // back since the last page): its format is that version's
                // own, so the listing starts again with the active one.
                // So does a settings change (Salesforce's `object`, a base
                // URL): the pages so far are of another set of records.
                if other_version {
                    tracing::info!(
                        run = %run.id,
                        "another version of the connector is active, or its settings changed; listing again from the first page"
                    );
                } else {
                    tracing::info!(run = %run.id, "finishing a listing's restart left half done");
                }
                self.restart_listing(run).await?;
                cursor = None;
                listed_with = None;
                unfinished_restart = false;
                continue;
            }
            let pass = match inner.breakers.allow(&run.connector) {
                Ok(pass) => pass,
                Err(Deferred(wait, behind_probe)) => {
                    // Behind a probe: looked at again each second, as
                    // before (nothing releases a listing when the probe
                    // succeeds).
                    let most = if behind_probe {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_secs(5)
                    };
                    self.wait(run, cancel, wait.clamp(Duration::from_millis(50), most))
                        .await?;
                    continue;
                }
            };
            let (listed, listed_at_ms) = {
                let _permit = inner.permits.acquire().await;
                // Before the request: the page holds no edit made later.
                let at = now_ms();
                let listed = ready
                    .connector
                    .list(&ready.config, ENTITY, cursor.clone(), PAGE_SIZE)
                    .await;
                (listed, at)
            };
            let mut findings = PageFindings {
                listed_at_ms,
                ..PageFindings::default()
            };
            let page = match listed {
                Ok(page) => {
                    self.answered(&run.connector);
                    failures = 0;
                    page
                }
                Err(
                    CallError::Connector(ConnectorError::RateLimited(limit))
                    | CallError::ServerFailed(ConnectorError::RateLimited(limit)),
                ) => {
                    let wait = super::retry::rate_limited_read_wait(limit.retry_after_ms);
                    // A probe this listing carried is handed back, as a
                    // push's is: the pause says when the next call goes.
                    // Kept, every push and read of the connector waited
                    // out the probe's cool-down behind it.
                    inner.breakers.unused(&run.connector, pass);
                    inner.breakers.pause(&run.connector, wait);
                    tracing::info!(
                        wait_ms = wait.as_millis() as u64,
                        "listing rate limited; waiting"
                    );
                    findings.counts.insert("rate_limited", 1);
                    if !inner.store.commit_counts(run, &findings).await? {
                        return Err(Stop::LeaseLost);
                    }
                    self.wait(run, cancel, wait).await?;
                    continue;
                }
                // ferry's own pacing, not the remote: wait for the next
                // slot, counting no failure.
                Err(CallError::Throttled { wait, .. }) => {
                    inner.breakers.unused(&run.connector, pass);
                    self.wait(run, cancel, wait).await?;
                    continue;
                }
                // The remote answered: it is up.
                Err(CallError::Connector(
                    ConnectorError::Permanent(m) | ConnectorError::Unauthorized(m),
                )) => {
                    self.answered(&run.connector);
                    return Err(Stop::Failed(format!("listing failed: {m}")));
                }
                Err(CallError::Connector(ConnectorError::Unsupported(m))) => {
                    inner.breakers.unused(&run.connector, pass);
                    return Err(Stop::Failed(format!("listing failed: {m}")));
                }
                Err(error) => {
                    inner.breakers.failure(&run.connector);
                    failures += 1;
                    if inner.policy.exhausted(failures) {
                        return Err(Stop::Failed(format!(
                            "listing failed after {failures} attempts: {error}"
                        )));
                    }
                    tracing::info!(%error, failures, "listing a page failed; retrying");
                    self.wait(run, cancel, inner.policy.delay(failures, None))
                        .await?;
                    continue;
                }
            };
            // A cursor the store cannot keep (a NUL) failed the page's
            // commit on PostgreSQL, and the run retried it every lease; one
            // that leads back to the page it came from would list that
            // page for ever.
            if let Some(problem) =
                ferry_runtime::cursor_problem(cursor.as_deref(), page.next_cursor.as_deref())
            {
                return Err(Stop::Failed(format!("listing failed: {problem}")));
            }
            // Cursors that go round over several pages (each differs from
            // the one that asked, so the check above passes them): the
            // listing came back to a page it had listed, and listed for
            // ever, its findings inserted again every round. A keyset
            // listing never lists a record twice; an offset one whose
            // first records were deleted by a page's length between two
            // pages would fail here too, and its run be started again.
            // Ids a key cannot hold are left out, as the comparison below
            // leaves them out: on PostgreSQL a NUL failed this read, and
            // the run listed the page again every lease, for ever.
            let ids: Vec<&str> = page
                .records
                .iter()
                .map(|r| r.remote_id.as_str())
                .filter(|id| crate::store::unkeyable("remote id", id).is_none())
                .collect();
            let before = if ids.is_empty() {
                std::collections::HashSet::new()
            } else {
                inner.store.run_listed(run, &ids).await?
            };
            if !ids.is_empty() && ids.iter().all(|id| before.contains(*id)) {
                return Err(Stop::Failed(
                    "listing failed: the connector's cursors went round (a page held only \
                     records the run had listed already); its listing would never end"
                        .into(),
                ));
            }
            // A record listed on an earlier page too (an offset listing
            // shifted by a record inserted ahead of it), or twice on this
            // one, is compared once: it was found, counted and repaired
            // twice.
            let mut page = page;
            let mut this_page = std::collections::HashSet::new();
            page.records.retain(|r| {
                !before.contains(&r.remote_id) && this_page.insert(r.remote_id.clone())
            });
            let listed = i64::try_from(page.records.len()).unwrap_or(i64::MAX);
            self.compare_page(run, &page, &mut findings).await?;
            if !inner
                .store
                .commit_page(run, &findings, page.next_cursor.as_deref(), &code, listed)
                .await?
            {
                return Err(Stop::LeaseLost);
            }
            listed_with = Some(code);
            // Empty pages that always name a next one pass both checks
            // above (the cursors differ, no record repeats): the run
            // listed for ever, and a backfill held every create meanwhile.
            empty_pages = if page.records.is_empty() {
                empty_pages + 1
            } else {
                0
            };
            match page.next_cursor {
                Some(_) if empty_pages >= EMPTY_PAGES => {
                    return Err(Stop::Failed(format!(
                        "listing failed: {EMPTY_PAGES} empty pages in a row, each naming a next \
                         one; the connector's listing would never end"
                    )))
                }
                Some(next) => cursor = Some(next),
                None => return Ok(()),
            }
        }
    }

    /// Compares a page's linked records with their customers; keeps the
    /// unlinked ones for classification.
    async fn compare_page(
        &self,
        run: &RunRow,
        page: &Page,
        findings: &mut PageFindings,
    ) -> Result<(), Stop> {
        let ids: Vec<String> = page
            .records
            .iter()
            .map(|r| r.remote_id.clone())
            .filter(|id| crate::store::unkeyable("remote id", id).is_none())
            .collect();
        let linked = self
            .inner
            .store
            .linked_records(&run.connector, &ids)
            .await?;
        for record in &page.records {
            // Not an id a key can hold (as the webhook endpoint judges
            // them): on PostgreSQL a few kB of id failed the page's
            // commit, and the run retried that page for ever.
            if let Some(problem) = crate::store::unkeyable("remote id", &record.remote_id) {
                tracing::warn!(%problem, "listed record has an id ferry cannot keep; skipped");
                *findings.counts.entry("invalid").or_default() += 1;
                continue;
            }
            // Not an object (`null`, `[]`) read as a record with every
            // field cleared: invalid too, as a delivery's is refused.
            let remote = match serde_json::from_str::<serde_json::Value>(&record.record) {
                Ok(mut remote) if remote.is_object() => {
                    crate::store::replace_nul(&mut remote);
                    canonical_record(&remote)
                }
                parsed => {
                    let error = parsed
                        .err()
                        .map_or_else(|| "not an object".to_owned(), |error| error.to_string());
                    tracing::warn!(remote_id = record.remote_id, %error, "listed record is not a JSON object; skipped");
                    *findings.counts.entry("invalid").or_default() += 1;
                    findings.seen.push(record.remote_id.clone());
                    continue;
                }
            };
            let link = linked
                .iter()
                .find(|(l, _)| l.remote_id.as_deref() == Some(record.remote_id.as_str()));
            let Some((link, customer)) = link else {
                let email = importable_email(&remote);
                findings
                    .unlinked
                    .push((record.remote_id.clone(), email, remote));
                continue;
            };
            findings.seen.push(record.remote_id.clone());
            let Some(customer) = customer else {
                *findings.counts.entry("invalid").or_default() += 1;
                continue;
            };
            // A push on its way or a person's decision pending: the
            // difference is being settled already (a delete too).
            if link.held_by.is_some() || matches!(link.state, LinkState::Pending | LinkState::Retry)
            {
                *findings.counts.entry("in_flight").or_default() += 1;
                continue;
            }
            if customer.deleted_at.is_some() {
                // A link marked deleted names a record the remote deleted
                // (and ferry the customer with it, or before it) and has
                // again: restored (Salesforce's undelete). Counted in no
                // kind and repaired by no mode, it stayed for good.
                let detail = if link.remote_deleted {
                    "the customer was deleted in ferry, and the remote deleted the record; \
                     the remote has it again (restored)"
                } else {
                    "the customer was deleted in ferry; the remote still has the record"
                };
                findings.mismatches.push(NewMismatch {
                    kind: Kind::MissingLocal.as_str(),
                    remote_id: Some(record.remote_id.clone()),
                    customer_id: Some(customer.id.as_str().to_owned()),
                    fields: serde_json::json!([]),
                    record: Some(remote),
                    detail: Some(detail.into()),
                    listed_at_ms: Some(findings.listed_at_ms),
                });
                continue;
            }
            // Deleted at the remote (applied under `unlink`) and listed
            // again: restored there (Salesforce's undelete). Counted equal,
            // the link still said deleted, and the customer's next edit
            // went out as a create, a second record beside it. Linked
            // again by its repair, as a record matching by email is.
            if link.remote_deleted {
                findings.mismatches.push(NewMismatch {
                    kind: Kind::Unlinked.as_str(),
                    remote_id: Some(record.remote_id.clone()),
                    customer_id: Some(customer.id.as_str().to_owned()),
                    fields: serde_json::json!([]),
                    record: Some(remote),
                    detail: Some(
                        "the remote deleted the record, and has it again (restored); \
                         its link still says deleted"
                            .into(),
                    ),
                    listed_at_ms: Some(findings.listed_at_ms),
                });
                continue;
            }
            // A version whose push gave up (a dead letter) never reached
            // the remote: a field it added is missing there, not unknown.
            let compare =
                if link.state == LinkState::Dead && link.wanted_version > link.synced_version {
                    unpushed_differences
                } else {
                    field_differences
                };
            let mut differences =
                compare(&local_record(customer)?, &remote, link.snapshot.as_ref());
            // A customer `auto_rename` kept apart holds its record's email
            // rewritten, and the remote keeps its own: not a difference
            // (it was one on every run, and `merge` pushed the rewrite).
            if kept_apart(&customer.email, &remote, &run.connector, &record.remote_id) {
                differences.retain(|d| d.field != "email");
            }
            if differences.is_empty() {
                *findings.counts.entry("equal").or_default() += 1;
            } else {
                findings.mismatches.push(NewMismatch {
                    kind: Kind::Different.as_str(),
                    remote_id: Some(record.remote_id.clone()),
                    customer_id: Some(customer.id.as_str().to_owned()),
                    fields: serde_json::to_value(&differences).unwrap_or_default(),
                    record: Some(remote),
                    detail: None,
                    listed_at_ms: Some(findings.listed_at_ms),
                });
            }
        }
        Ok(())
    }

    /// Phase 2, from the stored position: `u:` unlinked records, `m:`
    /// customers missing remotely, `o:` orphaned links (each followed by
    /// the last key handled).
    async fn classify(&self, run: &RunRow, cancel: &CancellationToken) -> Result<(), Stop> {
        let store = &self.inner.store;
        let position = run.cursor.clone().unwrap_or_else(|| "u:".to_owned());
        let (mut step, after) = position.split_once(':').unwrap_or(("u", ""));
        let mut after = (!after.is_empty()).then(|| after.to_owned());
        loop {
            // A large run's classification does not hold shutdown: the
            // run resumes from its stored position.
            if cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            self.renew(run).await?;
            let (found, last) = match step {
                "u" => self.classify_unlinked(run, after.as_deref()).await?,
                "m" => {
                    let customers = store
                        .customers_missing_remotely(run, after.as_deref(), STEP)
                        .await?;
                    let last = customers.last().map(|c| c.id.as_str().to_owned());
                    let found = customers
                        .into_iter()
                        .map(|c| NewMismatch {
                            kind: Kind::MissingRemote.as_str(),
                            remote_id: None,
                            customer_id: Some(c.id.as_str().to_owned()),
                            fields: serde_json::json!([]),
                            record: None,
                            detail: None,
                            listed_at_ms: None,
                        })
                        .collect();
                    (found, last)
                }
                _ => {
                    let links = store.unseen_links(run, after.as_deref(), STEP).await?;
                    let last = links.last().map(|(customer, _)| customer.clone());
                    let found = links
                        .into_iter()
                        .map(|(customer, remote)| NewMismatch {
                            kind: Kind::Orphan.as_str(),
                            remote_id: Some(remote),
                            customer_id: Some(customer),
                            fields: serde_json::json!([]),
                            record: None,
                            detail: Some(
                                "linked, but a complete listing did not return the remote record"
                                    .into(),
                            ),
                            listed_at_ms: None,
                        })
                        .collect();
                    (found, last)
                }
            };
            let next = match (&last, step) {
                (Some(last), _) => format!("{step}:{last}"),
                (None, "u") => "m:".to_owned(),
                (None, "m") => "o:".to_owned(),
                (None, _) => return Ok(()),
            };
            if !store
                .commit_step(run, &found, Some(&next), "classifying")
                .await?
            {
                return Err(Stop::LeaseLost);
            }
            let (s, a) = next.split_once(':').unwrap_or(("o", ""));
            step = match s {
                "u" => "u",
                "m" => "m",
                _ => "o",
            };
            after = (!a.is_empty()).then(|| a.to_owned());
        }
    }

    /// One step of unlinked records: matched by email, duplicate, or
    /// missing locally.
    async fn classify_unlinked(
        &self,
        run: &RunRow,
        after: Option<&str>,
    ) -> Result<(Vec<NewMismatch>, Option<String>), Stop> {
        let store = &self.inner.store;
        let batch = store.unlinked_records(&run.id, after, STEP).await?;
        let mut emails: Vec<String> = batch.iter().filter_map(|r| r.email.clone()).collect();
        emails.sort();
        emails.dedup();
        let owners = store.customers_by_emails(&run.connector, &emails).await?;
        let mut found = Vec::with_capacity(batch.len());
        for record in &batch {
            let same_email = record.same_email;
            let remote = &record.record.0;
            let owner = record
                .email
                .as_ref()
                .and_then(|email| owners.iter().find(|(c, _)| &c.email == email));
            // Linked to this very record since it was listed (a webhook,
            // an import of another run): in sync as far as this run can
            // tell, not a duplicate of itself.
            if owner.is_some_and(|(_, linked)| linked.as_deref() == Some(record.remote_id.as_str()))
            {
                continue;
            }
            let (kind, customer_id, fields, detail) = match (&record.email, owner) {
                (None, _) => (
                    Kind::MissingLocal,
                    None,
                    serde_json::json!([]),
                    Some("the remote record has no email".to_owned()),
                ),
                (Some(_), owner) if same_email > 1 => (
                    Kind::Duplicate,
                    owner.map(|(c, _)| c.id.as_str().to_owned()),
                    serde_json::json!([]),
                    Some(format!("{same_email} remote records have this email")),
                ),
                (Some(_), Some((customer, Some(other)))) => (
                    Kind::Duplicate,
                    Some(customer.id.as_str().to_owned()),
                    serde_json::json!([]),
                    Some(format!(
                        "the customer with this email is linked to remote record {other}"
                    )),
                ),
                (Some(_), Some((customer, None))) => (
                    Kind::Unlinked,
                    Some(customer.id.as_str().to_owned()),
                    serde_json::to_value(field_differences(&local_record(customer)?, remote, None))
                        .unwrap_or_default(),
                    Some("matches a customer by email".to_owned()),
                ),
                (Some(_), None) => (Kind::MissingLocal, None, serde_json::json!([]), None),
            };
            found.push(NewMismatch {
                kind: kind.as_str(),
                remote_id: Some(record.remote_id.clone()),
                customer_id,
                fields,
                record: Some(remote.clone()),
                detail,
                listed_at_ms: Some(record.listed_at_ms),
            });
        }
        Ok((found, batch.last().map(|r| r.remote_id.clone())))
    }

    /// The mass-delete brake: the reason to abort, if the run would act on
    /// more orphans of live customers than the allowed share of the
    /// connector's live links.
    /// Orphans are what a listing that silently stopped short produces.
    async fn brake(
        &self,
        run: &RunRow,
        mode: Mode,
        repair: Repair,
        max_delete_share: f64,
    ) -> Result<Option<String>, StoreError> {
        // Orphans the run leaves as they are: nothing to brake.
        let ignored = self.inner.delete_policy == DeletePolicy::Ignore
            && matches!(repair, Repair::PullRemote | Repair::Merge);
        if mode == Mode::Backfill || repair == Repair::Report || ignored {
            return Ok(None);
        }
        let orphans = run
            .counts
            .0
            .get("orphan")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        if orphans == 0 {
            return Ok(None);
        }
        // Orphans of customers deleted in ferry already (their delete
        // dead-lettered, the record deleted at the remote since) delete
        // nothing: every run finds them again, and they set the brake off
        // for good, stopping every other repair.
        let orphans = self.inner.store.live_orphans(&run.id).await?;
        let links = self.inner.store.live_link_count(&run.connector).await?;
        let allowed = allowed_deletes(links, max_delete_share);
        Ok((orphans > allowed).then(|| {
            format!(
                "mass-delete brake: {orphans} of {links} links name a remote record the listing did not return, \
                 more than the {allowed} allowed (reconcile_max_delete_share = {max_delete_share}); nothing was \
                 repaired. If the records are really gone, resolve the orphans by hand or raise the share."
            )
        }))
    }

    /// Phase 3: schedules the repair of every open finding the policy acts
    /// on, a step at a time, after the backlog drains.
    async fn repair(
        &self,
        run: &RunRow,
        mode: Mode,
        repair: Repair,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let store = &self.inner.store;
        let mut after = run.cursor.clone();
        loop {
            if cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            self.renew(run).await?;
            self.may_repair(run).await?;
            self.wait_for_backlog(run, cancel).await?;
            // The wait may have been long: switched off meanwhile, nothing
            // more is scheduled.
            self.may_repair(run).await?;
            let batch = store
                .mismatches(&run.id, None, Some("open"), after.as_deref(), STEP)
                .await?;
            if batch.is_empty() {
                return Ok(());
            }
            let mut events = Vec::new();
            let mut done = Vec::new();
            let mut renewed = Instant::now();
            // The last finding looked at: a shutdown stops the step there
            // (an orphan's read may take a call's whole timeout, and a
            // step's findings that add nothing to the backlog never wait
            // where a shutdown is seen), and what it scheduled is recorded.
            let mut looked = None;
            for mismatch in &batch {
                if cancel.is_cancelled() {
                    break;
                }
                looked = Some(mismatch.id.clone());
                // An orphan's repair reads its record first, one call each:
                // a step's reads outlast the lease (a replica took the run
                // over mid-step, and the step ran again from its start).
                self.renew_when_due(run, &mut renewed).await?;
                // Under `reject` and `merge`, the import of a record whose
                // email's customer is linked to another record would be
                // dead-lettered, or take the link from that record, again
                // by every run: it stays for a person.
                if self.duplicate_left_to_a_person(run, mismatch).await? {
                    continue;
                }
                let Some(action) =
                    plan_repair(run, mode, repair, self.inner.delete_policy, mismatch)
                else {
                    continue;
                };
                if let Some(nothing) = self.orphan_of_a_deleted_customer(&action, mismatch).await? {
                    done.push((mismatch.id.clone(), nothing, false));
                    continue;
                }
                if matches!(&action, Action::Event(e) if e.kind == RemoteChange::Delete)
                    && self.orphan_moved(run, mismatch).await?
                {
                    tracing::info!(
                        finding = %mismatch.id,
                        "an orphan's customer has its email on a record no link holds: \
                         left for a person, with the duplicate finding"
                    );
                    continue;
                }
                let (what, repaired) = match action {
                    Action::Event(event) => {
                        let what = format!("inbox event {} ({})", event.event_id, event.kind);
                        events.push(*event);
                        (what, true)
                    }
                    push => match self
                        .schedule_push(run, &mismatch.id, ForcedBy::Run, push)
                        .await?
                    {
                        Scheduled::Done(what) => (what, true),
                        Scheduled::Nothing(why) => (why, false),
                        // Its link is busy: the push in flight carries the
                        // current state anyway; the finding stays open.
                        Scheduled::Busy => continue,
                        Scheduled::NotOurs => return Err(Stop::LeaseLost),
                        // Open for the next run or a person: closed, the
                        // customer stayed linked to a record gone.
                        Scheduled::Unreadable(why) => {
                            tracing::warn!(finding = %mismatch.id, why, "repair not scheduled");
                            continue;
                        }
                    },
                };
                done.push((mismatch.id.clone(), what, repaired));
            }
            let Some(last) = looked else {
                return Err(Stop::Cancelled);
            };
            if !events.is_empty() {
                store
                    .store_inbox_many(&[(
                        run.connector.as_str(),
                        events.as_slice(),
                        Some(run.id.as_str()),
                    )])
                    .await?;
            }
            if !store.commit_repairs(run, &done, &last).await? {
                return Err(Stop::LeaseLost);
            }
            if cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            after = Some(last);
        }
    }

    /// Whether a run's repairs may be scheduled now. Switched off by an
    /// operator: none is (an import, a merge or an orphan's delete would
    /// change customers while the connector is paused); the run waits with
    /// it, without holding a place runs of other connectors need. Deleted:
    /// the run fails (its imports and deletes would be applied for a
    /// connector that is gone).
    async fn may_repair(&self, run: &RunRow) -> Result<(), Stop> {
        let registry = &self.inner.registry;
        match registry.ready(&run.connector, Need::Entity(ENTITY)) {
            Err(NotReady::Disabled | NotReady::Incomplete(_)) => Err(Stop::Parked),
            // This replica's view may lag: only a fresh read tells.
            Err(NotReady::Unknown) => {
                if registry.refresh().await.is_err() || registry.entry(&run.connector).is_some() {
                    return Ok(());
                }
                Err(Stop::Failed("the connector was deleted".into()))
            }
            _ => Ok(()),
        }
    }

    /// Schedules a push `action` (not an event) for `finding` of `run`. A
    /// forced push records what it did in the finding, in its transaction,
    /// while `by` holds it (see [`crate::store::Store::force_push_for`]).
    async fn schedule_push(
        &self,
        run: &RunRow,
        finding: &str,
        by: ForcedBy<'_>,
        action: Action,
    ) -> Result<Scheduled, StoreError> {
        let store = &self.inner.store;
        let connector = run.connector.as_str();
        let (customer, recreate, restored) = match action {
            Action::Event(_) => return Ok(Scheduled::Busy),
            Action::ForcePush(customer) => (customer, None, None),
            Action::PushDelete { customer, seen } => (customer, None, seen),
            Action::Recreate { customer, seen } => (customer, Some(seen), None),
        };
        let Some(current) = store.get_customer_any(&customer).await? else {
            return Ok(Scheduled::Nothing(format!(
                "nothing: customer {customer} no longer exists"
            )));
        };
        if let Some(Some(seen)) = &recreate {
            if let Some(known) = self.still_there(connector, seen).await {
                return Ok(known);
            }
            // Its record gone, but the run listed another with its email
            // that no link holds (a Salesforce merge deletes the losing
            // Contact; a dashboard delete whose webhook was lost, then a
            // record made by hand): a third would stand beside it. Which
            // one is the customer's is the duplicate finding's, a
            // person's.
            if store.run_lists_unlinked(run, &current.email).await? {
                return Ok(Scheduled::Nothing(format!(
                    "nothing: the remote has a record with {} that no link holds (a duplicate finding of this run); another create would stand beside it",
                    current.email
                )));
            }
        }
        let what = if recreate.is_some() { "create" } else { "push" };
        let what = format!("{what} of version {} scheduled", current.version);
        let scheduled = match &recreate {
            Some(seen) => {
                store
                    .recreate_remote(&customer, connector, current.version, seen.as_deref())
                    .await?
            }
            None => match store
                .force_push_for(
                    run,
                    finding,
                    by,
                    &what,
                    &customer,
                    current.version,
                    restored.as_deref(),
                )
                .await?
            {
                Some(forced) => forced,
                None => return Ok(Scheduled::NotOurs),
            },
        };
        if !scheduled {
            return Ok(Scheduled::Busy);
        }
        Ok(Scheduled::Done(what))
    }

    /// Whether record `remote_id`, which a finding saw missing, may be
    /// created anew: the remote says it is gone (or the connector cannot
    /// say: no `fetch`). A listing can miss records (a sharing rule, a
    /// narrowed key, a page dropped): recreated unasked, it stood at the
    /// remote twice, the old one unlinked.
    /// `None` when it may; otherwise what the repair came to.
    async fn still_there(&self, connector: &str, remote_id: &str) -> Option<Scheduled> {
        let unreadable = |why: String| {
            Some(Scheduled::Unreadable(format!(
                "whether the remote still has record {remote_id} cannot be read now ({why})"
            )))
        };
        let ready = match self.inner.registry.ready(connector, Need::Entity(ENTITY)) {
            Ok(ready) => ready,
            Err(not_ready) => return unreadable(not_ready.to_string()),
        };
        match ready
            .connector
            .fetch(&ready.config, ENTITY, remote_id)
            .await
        {
            Ok(_) => Some(Scheduled::Nothing(format!(
                "nothing: the remote has record {remote_id} (the listing missed it)"
            ))),
            Err(CallError::Connector(
                ConnectorError::NotFound(_) | ConnectorError::Unsupported(_),
            )) => None,
            Err(error) => unreadable(error.to_string()),
        }
    }

    /// Resolves one open finding by hand with `action`, the way a run with
    /// that repair policy would (orphans included, whatever the run's
    /// mode): what was scheduled, [`Resolved::NotApplicable`] when the
    /// action does nothing for this kind of finding, [`Resolved::Refused`]
    /// when it would do what a run leaves for a person.
    /// An orphan's recreate whose record the remote cannot be asked about
    /// now is [`FoldError::RemoteUnreadable`] (the finding stays open). A
    /// forced push records what it did in the finding while it holds
    /// `claim`, in the push's transaction.
    pub async fn resolve_mismatch(
        &self,
        run: &RunRow,
        mismatch: &MismatchRow,
        action: Repair,
        claim: &str,
    ) -> Result<Resolved, FoldError> {
        let store = &self.inner.store;
        let Some(planned) = plan_repair(
            run,
            Mode::Reconcile,
            action,
            self.inner.delete_policy,
            mismatch,
        ) else {
            return Ok(Resolved::NotApplicable);
        };
        if let Some(nothing) = self
            .orphan_of_a_deleted_customer(&planned, mismatch)
            .await?
        {
            return Ok(Resolved::Scheduled(nothing));
        }
        // As a run leaves it: the customer lives on in a record no link
        // holds (a Salesforce merge, a record made again by hand).
        // Deleted, it went from every system, and the next run imported
        // that record as a new customer.
        if matches!(&planned, Action::Event(e) if e.kind == RemoteChange::Delete)
            && self.orphan_moved(run, mismatch).await?
        {
            return Ok(Resolved::Refused(format!(
                "{} would delete the customer, whose email the remote has on a record no link \
                 holds (this run's duplicate finding): resolve that finding, which links it, \
                 or dismiss this one",
                action.as_str()
            )));
        }
        let what = match planned {
            Action::Event(mut event) => {
                // Not the run's own event of the finding; one per action:
                // a finding is resolved again only once it was opened
                // again, which a process that died after storing the event
                // and before describing it also leaves (its claim stalled),
                // and the same resolution then stores nothing twice.
                event.event_id = format!("{}:{}", event.event_id, action.as_str());
                let what = format!("inbox event {} ({})", event.event_id, event.kind);
                store
                    .store_inbox_many(&[(
                        run.connector.as_str(),
                        std::slice::from_ref(&*event),
                        Some(run.id.as_str()),
                    )])
                    .await?;
                what
            }
            push => match self
                .schedule_push(run, &mismatch.id, ForcedBy::Claim(claim), push)
                .await?
            {
                Scheduled::Done(what) | Scheduled::Nothing(what) => what,
                Scheduled::Busy | Scheduled::NotOurs => {
                    "nothing: a push of the customer is already on its way".to_owned()
                }
                Scheduled::Unreadable(why) => return Err(FoldError::RemoteUnreadable(why)),
            },
        };
        Ok(Resolved::Scheduled(what))
    }

    /// Cancels `run` (`by` whom) while it lists: ended as `failed`, and a
    /// backfill's held creates let go, as a failure does; `false` if it
    /// had ended or is past its listing (see
    /// [`Store::cancel_run`](crate::store::Store::cancel_run)). Its driver,
    /// on whichever replica, stops at its next write under its lease (a
    /// page under way there finishes, and is not kept).
    pub async fn cancel_reconciliation(&self, run: &RunRow, by: &str) -> Result<bool, StoreError> {
        let store = &self.inner.store;
        if !store.cancel_run(&run.id, by).await? {
            return Ok(false);
        }
        if run.mode == Mode::Backfill.as_str() {
            self.resume_held_creates(&run.connector).await;
        }
        tracing::info!(run_id = %run.id, connector = %run.connector, by, "reconciliation cancelled");
        Ok(true)
    }

    /// Lets the pushes a backfill held back go (they wait in the store, on
    /// any replica): at once, not at their next look.
    async fn resume_held_creates(&self, connector: &str) {
        let store = &self.inner.store;
        match store.resume_connector_links(connector).await {
            Ok(_) => store.committed_links(),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "resuming the creates a backfill held failed; they look again within a minute"
            ),
        }
    }

    /// Waits until the events `run` stored are applied, for up to
    /// [`OWN_EVENTS_WAIT`] (an event that waits for a person, or retries
    /// for long, does not hold the run for ever; a create it held then
    /// goes, and may meet the record the event links as a duplicate).
    async fn wait_for_own_events(
        &self,
        run: &RunRow,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let mut renewed = Instant::now();
        while self.inner.store.run_events_pending(run).await? {
            // Switched off meanwhile: the run waits with it (its events wait
            // too, and the creates it holds must not go before them).
            self.may_repair(run).await?;
            if started.elapsed() > OWN_EVENTS_WAIT {
                tracing::warn!(
                    "a backfill's imports and links are still not applied; the creates it held go"
                );
                return Ok(());
            }
            pause(cancel, OWN_EVENTS_POLL).await?;
            self.renew_when_due(run, &mut renewed).await?;
        }
        Ok(())
    }

    /// Waits while the inbox or the push queue holds more than [`BACKLOG`]
    /// due now. Work that waits by itself (a disabled connector's pushes,
    /// links in backoff, events held by a conflict) is not counted: the
    /// run would wait on it for as long.
    async fn wait_for_backlog(&self, run: &RunRow, cancel: &CancellationToken) -> Result<(), Stop> {
        let mut renewed = Instant::now();
        loop {
            let store = &self.inner.store;
            let room = BACKLOG - i64::from(STEP);
            let pushing: Vec<String> = self
                .inner
                .registry
                .entries()
                .iter()
                .map(|entry| entry.name.clone())
                .filter(|name| {
                    self.inner
                        .registry
                        .ready(name, Need::Entity(ENTITY))
                        .is_ok()
                })
                .collect();
            if store.inbox_backlog().await? <= room && store.push_backlog(&pushing).await? <= room {
                return Ok(());
            }
            pause(cancel, BACKLOG_POLL).await?;
            self.renew_when_due(run, &mut renewed).await?;
        }
    }
}

impl SyncEngine {
    /// Why orphan `mismatch` needs nothing of `action`, when its customer
    /// was deleted already (its delete dead-lettered, the record since
    /// deleted at the remote): created again it would be skipped as
    /// deleted, and a delete applied to it changes nothing; either was
    /// counted as a repair. Under the `unlink` delete policy the delete
    /// still unlinks the gone record: it is done.
    async fn orphan_of_a_deleted_customer(
        &self,
        action: &Action,
        mismatch: &MismatchRow,
    ) -> Result<Option<String>, StoreError> {
        let Some(customer) = mismatch.customer_id.as_deref() else {
            return Ok(None);
        };
        let unlinks = matches!(action, Action::Event(e) if e.kind == RemoteChange::Delete)
            && self.inner.delete_policy == DeletePolicy::Unlink;
        if action_kind(mismatch) != Kind::Orphan || unlinks {
            return Ok(None);
        }
        let deleted = self
            .inner
            .store
            .get_customer_any(customer)
            .await?
            .is_some_and(|c| c.deleted_at.is_some());
        Ok(deleted.then(|| "nothing: the customer was deleted already".to_owned()))
    }

    /// Whether orphan `mismatch`'s customer has its email on a record this
    /// run listed that no link holds: the remote merged its record into
    /// another (Salesforce's merge deletes the losing Contact) and the
    /// customer lives on there, which the duplicate finding leaves to a
    /// person. Deleted as an orphan, the customer went from every system,
    /// and the next run imported the record as a new one. The recreate
    /// asks the same ([`crate::store::Store::run_lists_unlinked`]).
    async fn orphan_moved(&self, run: &RunRow, mismatch: &MismatchRow) -> Result<bool, StoreError> {
        let Some(customer) = mismatch.customer_id.as_deref() else {
            return Ok(false);
        };
        let store = &self.inner.store;
        match store.get_customer_any(customer).await? {
            Some(current) => store.run_lists_unlinked(run, &current.email).await,
            None => Ok(false),
        }
    }

    /// Whether `mismatch` is a duplicate a run leaves to a person: its
    /// email's customer is linked to another live record of the connector,
    /// and the strategy would only refuse it (`reject`: a dead letter each
    /// run) or move the link to it (`merge`: the next run finds the record
    /// it left unlinked a duplicate, and moves the link back, each move a
    /// merge fanned out).
    async fn duplicate_left_to_a_person(
        &self,
        run: &RunRow,
        mismatch: &MismatchRow,
    ) -> Result<bool, StoreError> {
        if action_kind(mismatch) != Kind::Duplicate
            || !matches!(
                self.duplicate_email_policy(&run.connector),
                DuplicateEmail::Reject | DuplicateEmail::Merge
            )
        {
            return Ok(false);
        }
        let Some(customer) = &mismatch.customer_id else {
            return Ok(false);
        };
        let links = self.inner.store.links_of(customer).await?;
        Ok(links.iter().any(|l| {
            l.connector == run.connector
                && !l.remote_deleted
                && l.remote_id.is_some()
                && l.remote_id != mismatch.remote_id
        }))
    }
}

/// What a resolution by hand came to.
pub enum Resolved {
    /// What was scheduled (or, `nothing: …`, why nothing had to be).
    Scheduled(String),
    /// The action does nothing for this kind of finding.
    NotApplicable,
    /// The action would do what a run leaves for a person: why.
    Refused(String),
}

/// What repairing `mismatch` under `repair` does; `None`: it stays open
/// for a person.
///
/// `deletes`: the inbound delete policy. Under `ignore`, an orphan's
/// delete would be skipped and its link left as it is, for every run to
/// find again: the finding stays open (and the brake does not count it).
fn plan_repair(
    run: &RunRow,
    mode: Mode,
    repair: Repair,
    deletes: DeletePolicy,
    mismatch: &MismatchRow,
) -> Option<Action> {
    use Repair::{Merge, PullRemote, PushLocal, Report};
    let kind = action_kind(mismatch);
    let event = |kind: RemoteChange, policy: Option<&str>| {
        Some(Action::Event(Box::new(NewInboxEvent {
            event_id: format!("reconcile:{}:{}", run.id, mismatch.id),
            entity: ENTITY.to_owned(),
            kind,
            remote_id: mismatch.remote_id.clone()?,
            occurred_at_ms: repair_stamp(mismatch),
            record: mismatch.record.as_ref().map(|r| r.0.clone()),
            origin_key: None,
            remote_type: super::inbound::RECONCILIATION.to_owned(),
            policy: policy.map(str::to_owned),
        })))
    };
    let customer = mismatch.customer_id.clone();
    let recreate = |customer| Action::Recreate {
        customer,
        seen: mismatch.remote_id.clone(),
    };
    match (kind, repair) {
        (_, Report) => None,
        (Kind::Different, PushLocal) => customer.map(Action::ForcePush),
        (Kind::Different, PullRemote) => event(RemoteChange::Upsert, Some("prefer_remote")),
        (Kind::Different, Merge) => event(RemoteChange::Upsert, None),
        // The customer was deleted in ferry: the delete is pushed; ferry
        // never brings a deleted customer back. Not by a backfill, which
        // never deletes (a delete the remote refused stays dead-lettered
        // for a person).
        (Kind::MissingLocal, _) if customer.is_some() && mode == Mode::Backfill => None,
        (Kind::MissingLocal, PushLocal | Merge) if customer.is_some() => {
            customer.map(|customer| Action::PushDelete {
                customer,
                seen: mismatch.remote_id.clone(),
            })
        }
        (Kind::MissingLocal, _) if customer.is_some() => None,
        // A record without an email cannot become a customer: imported, it
        // would be dead-lettered by every run again.
        (Kind::MissingLocal, _)
            if mismatch
                .record
                .as_ref()
                .and_then(|r| importable_email(&r.0))
                .is_none() =>
        {
            None
        }
        // Under `pull_remote` an import that meets a customer with its
        // email (one that has it since the listing) merges as the repair
        // says, and writes nothing back (see `inbound::fills_gaps`).
        (Kind::MissingLocal, PullRemote) => event(RemoteChange::Upsert, Some("prefer_remote")),
        (Kind::MissingLocal, Merge) => event(RemoteChange::Upsert, None),
        // push_local never deletes a record ferry does not know.
        (Kind::MissingLocal, PushLocal) => None,
        (Kind::Unlinked, PushLocal) => event(RemoteChange::Upsert, Some("prefer_local")),
        (Kind::Unlinked, PullRemote) => event(RemoteChange::Upsert, Some("prefer_remote")),
        (Kind::Unlinked, Merge) => event(RemoteChange::Upsert, None),
        // The duplicate-email policy decides, as for a webhook.
        (Kind::Duplicate, PullRemote) => event(RemoteChange::Upsert, Some("prefer_remote")),
        (Kind::Duplicate, Merge) => event(RemoteChange::Upsert, None),
        (Kind::Duplicate, PushLocal) => None,
        (Kind::MissingRemote, PushLocal | Merge) => customer.map(recreate),
        // pull_remote never deletes a customer the remote lacks.
        (Kind::MissingRemote, PullRemote) => None,
        (Kind::Orphan, _) if mode == Mode::Backfill => None,
        (Kind::Orphan, PushLocal) => customer.map(recreate),
        (Kind::Orphan, PullRemote | Merge) if deletes == DeletePolicy::Ignore => None,
        // The delete policy decides, as for a remote delete.
        (Kind::Orphan, PullRemote | Merge) => event(RemoteChange::Delete, None),
    }
}

/// The email of a listed record, if a customer can have it: one no
/// customer can have (not an address, longer than the API takes) is none.
/// Imported, it could only be dead-lettered, by every run again; kept as a
/// key it failed the page's commit on PostgreSQL.
fn importable_email(record: &serde_json::Value) -> Option<String> {
    email_of(record).filter(|e| crate::api::customers::validate::is_valid_email(e))
}

/// When a repair event from `mismatch` happened, for the inbound stale
/// check: when its record was read, in whole seconds (a remote's clock,
/// Stripe's among them, may have no finer ones) and one second earlier (for
/// the two clocks' drift). An edit the listing missed is then never older
/// than the repair: a later second applies over it, the same second is
/// fetched afresh. A webhook applied since the listing is newer than the
/// repair, which is skipped instead of putting the older listed copy back.
/// Findings without a listed record keep the time they were found.
fn repair_stamp(mismatch: &MismatchRow) -> i64 {
    match mismatch.listed_at_ms {
        Some(listed) => listed.div_euclid(1_000) * 1_000 - 1_000,
        None => mismatch.created_at.timestamp_millis(),
    }
}

fn action_kind(mismatch: &MismatchRow) -> Kind {
    Kind::parse(&mismatch.kind).unwrap_or(Kind::Different)
}

/// Whether a backfill is offered for a connector whose newest run is
/// `last`: before its first run, and again after a backfill that failed
/// (what both sides held before the connector was switched on is still not
/// in sync). Schedules wait meanwhile.
pub fn backfill_offered(last: Option<&RunRow>) -> bool {
    last.is_none_or(|run| run.mode == Mode::Backfill.as_str() && run.status == "failed")
}

/// Orphans a run may act on: `share` of `links`, and at least one.
pub fn allowed_deletes(links: i64, share: f64) -> i64 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]
    let allowed = (links as f64 * share).floor() as i64;
    allowed.max(1)
}

/// Sleeps `wait`, or stops with the process.
/// What a run's pages were listed with: the sha256 of the connector's code
/// and of its settings (not its secrets), which a cursor belongs to.
fn listing_of(code: &str, settings: &std::collections::BTreeMap<String, String>) -> String {
    use sha2::{Digest, Sha256};
    let settings = serde_json::to_vec(settings).unwrap_or_default();
    hex::encode(
        Sha256::new()
            .chain_update(code)
            .chain_update(settings)
            .finalize(),
    )
}

async fn pause(cancel: &CancellationToken, wait: Duration) -> Result<(), Stop> {
    tokio::select! {
        () = cancel.cancelled() => Err(Stop::Cancelled),
        () = tokio::time::sleep(wait) => Ok(()),
    }
}

/// When a connector's schedule counts from after its newest run: its
/// start, or its end when a person cancelled it (see [`SyncEngine::start_scheduled`]).
fn schedule_from(
    started_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    cancelled: bool,
) -> chrono::DateTime<chrono::Utc> {
    match finished_at {
        Some(finished_at) if cancelled => finished_at,
        _ => started_at,
    }
}

/// Whether a scheduled run `every` after one started at `last` is due at
/// `now`. A period past what a date can hold (a `reconcile_every` of a
/// million years) is never due: adding it panicked the reconciler's task,
/// and no run was driven again, API-started ones included.
fn next_run_due(
    last: chrono::DateTime<chrono::Utc>,
    every: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> bool {
    chrono::Duration::from_std(every)
        .ok()
        .and_then(|every| last.checked_add_signed(every))
        .is_some_and(|next| next <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOFT: DeletePolicy = DeletePolicy::SoftDelete;

    #[test]
    fn a_schedule_beyond_what_a_date_holds_is_never_due() {
        let now = chrono::Utc::now();
        let hour = Duration::from_secs(3_600);
        assert!(next_run_due(now - chrono::Duration::hours(2), hour, now));
        assert!(!next_run_due(
            now - chrono::Duration::minutes(30),
            hour,
            now
        ));
        assert!(!next_run_due(now, Duration::from_secs(u64::MAX), now));
        assert!(!next_run_due(
            now,
            Duration::from_secs(10_000_000_000_000),
            now
        ));
    }

    fn run(mode: &str) -> RunRow {
        let at = chrono::Utc::now();
        RunRow {
            id: "rec_1".into(),
            connector: "stripe".into(),
            mode: mode.into(),
            repair: "merge".into(),
            trigger: "api".into(),
            status: "running".into(),
            phase: "repairing".into(),
            cursor: None,
            listed_with: None,
            listing_complete: true,
            pages: 1,
            records: 1,
            counts: sqlx::types::Json(serde_json::Map::new()),
            repairs: 0,
            error: None,
            lease_token: None,
            started_at: at,
            updated_at: at,
            finished_at: None,
        }
    }

    fn missing_local(customer: Option<&str>, record: serde_json::Value) -> MismatchRow {
        MismatchRow {
            id: "mm_1".into(),
            run_id: "rec_1".into(),
            kind: Kind::MissingLocal.as_str().into(),
            remote_id: Some("cus_remote".into()),
            customer_id: customer.map(str::to_owned),
            fields: sqlx::types::Json(serde_json::json!([])),
            record: Some(sqlx::types::Json(record)),
            detail: None,
            state: "open".into(),
            repair: None,
            created_at: chrono::Utc::now(),
            resolved_at: None,
            listed_at_ms: None,
        }
    }

    /// A backfill never pushes a delete (one the remote refused stays
    /// dead-lettered for a person); a reconciliation does. A record
    /// without an email is never imported: it could only be dead-lettered.
    #[test]
    fn a_backfill_never_deletes_and_no_email_is_never_imported() {
        let deleted = missing_local(Some("cus_local"), serde_json::json!({"email": "a@b.c"}));
        let backfill = run("backfill");
        assert!(plan_repair(&backfill, Mode::Backfill, Repair::Merge, SOFT, &deleted).is_none());
        let reconcile = run("reconcile");
        assert!(matches!(
            plan_repair(&reconcile, Mode::Reconcile, Repair::Merge, SOFT, &deleted),
            Some(Action::PushDelete { .. })
        ));
        // Nor one whose email no customer can have: the listing reports
        // it as having none.
        for record in [
            serde_json::json!({"name": "No Email"}),
            serde_json::json!({"email": "not-an-email"}),
            serde_json::json!({"email": format!("{}@b.c", "a".repeat(300))}),
        ] {
            let no_email = missing_local(None, record);
            for repair in [Repair::Merge, Repair::PullRemote] {
                assert!(
                    plan_repair(&reconcile, Mode::Reconcile, repair, SOFT, &no_email).is_none(),
                    "{:?}",
                    no_email.record
                );
            }
        }
        let importable = missing_local(None, serde_json::json!({"email": "a@b.c"}));
        assert!(matches!(
            plan_repair(
                &reconcile,
                Mode::Reconcile,
                Repair::Merge,
                SOFT,
                &importable
            ),
            Some(Action::Event(_))
        ));
    }

    /// Every event a `pull_remote` repair applies says so: a first sync it
    /// makes writes nothing back to the remote (`inbound::fills_gaps`).
    #[test]
    fn every_pull_remote_event_carries_its_policy() {
        let reconcile = run("reconcile");
        for kind in [
            Kind::Different,
            Kind::MissingLocal,
            Kind::Unlinked,
            Kind::Duplicate,
        ] {
            let mismatch = MismatchRow {
                kind: kind.as_str().into(),
                customer_id: (kind != Kind::MissingLocal && kind != Kind::Duplicate)
                    .then(|| "cus_local".to_owned()),
                ..missing_local(None, serde_json::json!({"email": "a@b.c"}))
            };
            match plan_repair(
                &reconcile,
                Mode::Reconcile,
                Repair::PullRemote,
                SOFT,
                &mismatch,
            ) {
                Some(Action::Event(event)) => {
                    assert_eq!(event.policy.as_deref(), Some("prefer_remote"), "{kind:?}")
                }
                _ => panic!("{kind:?}: no event"),
            }
        }
    }

    /// A scheduled run stuck past its interval and cancelled: the next is
    /// due an interval after the cancel, not at once.
    #[test]
    fn a_cancelled_run_is_scheduled_from_its_cancel() {
        let started = chrono::Utc::now() - chrono::Duration::hours(30);
        let cancelled = started + chrono::Duration::hours(29);
        let every = Duration::from_secs(24 * 3600);
        let now = chrono::Utc::now();
        let from = schedule_from(started, Some(cancelled), true);
        assert!(!next_run_due(from, every, now));
        let from = schedule_from(started, Some(cancelled), false);
        assert!(next_run_due(from, every, now), "a run that ended by itself");
    }

    #[test]
    fn the_brake_allows_a_share_and_at_least_one() {
        assert_eq!(allowed_deletes(0, 0.1), 1);
        assert_eq!(allowed_deletes(9, 0.1), 1);
        assert_eq!(allowed_deletes(100, 0.1), 10);
        assert_eq!(allowed_deletes(1000, 0.0), 1);
        assert_eq!(allowed_deletes(1000, 1.0), 1000);
    }

    #[test]
    fn names_round_trip() {
        for kind in [
            Kind::Different,
            Kind::MissingLocal,
            Kind::MissingRemote,
            Kind::Orphan,
            Kind::Duplicate,
            Kind::Unlinked,
        ] {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        for repair in [
            Repair::Report,
            Repair::PushLocal,
            Repair::PullRemote,
            Repair::Merge,
        ] {
            assert_eq!(Repair::parse(repair.as_str()), Some(repair));
            assert_eq!(serde_json::to_value(repair).unwrap(), repair.as_str());
        }
    }
}
