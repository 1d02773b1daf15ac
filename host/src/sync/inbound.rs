//! Inbound sync: applying a remote change stored in the inbox.
//!
//! One step per event: find the customer through the link, else a live
//! customer with the same email (and link it), else create one. Drop echoes
//! (the event reports ferry's own idempotency key, or the remote state equals
//! what ferry last synced) and stale events (older than what was applied for
//! that link; two events in the same remote second are told apart by
//! re-fetching the record). Both sides changed since the last synced
//! snapshot: merge three-way, and let the conflict policy decide the fields
//! changed differently on both sides.
//!
//! The applied change is one transaction: the customer, its outbox event
//! tagged with the source connector, the link (synced at the new version when
//! the remote already holds the result, so nothing is pushed back), the inbox
//! row and any conflict. The outbox event then fans out to every other
//! connector through the normal outbound path.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::merge::{
    field_of, merge_owned, same_text, set_field, ConflictPolicy, FieldConflict, FieldOwners,
    Resolution, Sides,
};
use super::outbound::canonical_record;
use super::SyncEngine;
use crate::registry::{NotReady, Ready};
use crate::runtime::{CallError, ConnectorError};
use crate::store::conflicts::{Conflict, Folded};
use crate::store::inbox::{
    Applied, CustomerWrite, InboundChange, InboxEvent, InboxFinish, LinkRead, NewConflict,
    RemoteChange,
};
use crate::store::now_ms;
use crate::store::DeadLetterKind;
use crate::store::{
    Customer, CustomerFields, CustomerId, LinkState, ListCustomers, StoreError, SyncLink,
};

/// Why a person's decision could not be carried out now: a conflict's
/// resolution that could not take in the remote edits waiting behind it
/// ([`SyncEngine::fold_waiting`]), or a finding's repair that needed the
/// remote's word first ([`SyncEngine::resolve_mismatch`]).
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The remote could not be read now for what the operation needs (the
    /// reason): a conflict's newest waiting edit that carries no record,
    /// an orphan's record before it is created anew. Nothing was written.
    #[error("{0}")]
    RemoteUnreadable(String),
}

/// The `remote_type` of the inbox events a reconciliation's repairs store.
pub const RECONCILIATION: &str = "reconciliation";

/// Inbox events claimed per round.
const INBOX_BATCH: u32 = 128;
/// Longest the inbox loop sleeps without being woken.
const INBOX_POLL: Duration = Duration::from_millis(250);
/// The webhook endpoint counts as busy while events were stored this
/// recently.
const ENDPOINT_BUSY_MS: i64 = 100;
/// How often a catch-up loop holding back looks again.
const HOLD_BACK_POLL: Duration = Duration::from_millis(20);

/// A webhook whose remote time is no later than ferry's last push through
/// the link plus this margin (clock skew, one-second remote clocks) may be
/// the late echo of an older push: its payload is not trusted, the record
/// is re-fetched.
const ECHO_WINDOW_MS: i64 = 2_000;
/// How old a reconciliation's listed copy of a record no customer links
/// may be and still be applied as listed; an older one is read again.
/// Younger, a run's imports cost no read each: a backfill of a million
/// records would make a million, and one lists, classifies and repairs
/// within the hour (a finding pulled by hand days later is what this is
/// for).
const LISTED_COPY_FRESH_MS: i64 = 60 * 60 * 1_000;
/// An upsert dated in whole seconds (Stripe's `created`) behind the
/// record's last applied change by less than this is read again, not
/// skipped as stale: a thin event applied before it was dated on arrival,
/// in milliseconds, and an edit made after that thin event's read, in the
/// same second, looked older than it and was lost. An event dated to the
/// millisecond is as old as it looks (a connector without `fetch` applies
/// what it carries: an older one would roll the record back).
const REMOTE_TICK_MS: i64 = 1_000;

/// Whether `event` is dated in whole seconds behind `seen_at_ms` by less
/// than a remote's tick (see [`REMOTE_TICK_MS`]).
fn within_a_tick(event: &InboxEvent, seen_at_ms: i64) -> bool {
    event.occurred_at_ms % REMOTE_TICK_MS == 0
        && event.occurred_at_ms <= seen_at_ms
        && seen_at_ms - event.occurred_at_ms < REMOTE_TICK_MS
}
/// How often an event waiting behind an open conflict is looked at again:
/// a safety net, since the conflict's resolution (or its customer's
/// delete) wakes the events it held. Every 5 s, a record busy over a
/// weekend (thousands of events parked) cost a write per event every 5 s,
/// ahead of fresh events.
const HELD_RECHECK_MS: i64 = 60_000;

/// How long an event waits when the store was too busy to take its write.
const STORE_BUSY_WAIT: Duration = Duration::from_secs(1);

/// How long a delete of a record nothing links waits for an earlier event
/// of the record (its create) to be applied.
const EARLIER_EVENT_WAIT: Duration = Duration::from_secs(1);

/// How long an event waits for its connector to be loaded here.
const NOT_LOADED_RECHECK: Duration = Duration::from_secs(5);
/// How often a decision is retaken when the customer changed under it.
const RACE_RETRIES: usize = 5;

/// Which inbox loop of a process this is (see [`SyncEngine::run_inbox`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxLoop {
    /// Always applies.
    First,
    /// Holds back while the webhook endpoint is busy and the backlog young.
    CatchUp,
}

/// Whether a catch-up loop leaves the machine to the webhook endpoint for
/// now: events were stored in the last [`ENDPOINT_BUSY_MS`] and the oldest
/// event of the latest claim arrived less than `catch_up_after_ms` ago
/// (all unix ms; a `catch_up_after_ms` of zero never holds back).
fn hold_back(now: i64, stored_at: i64, oldest_claimed: i64, catch_up_after_ms: i64) -> bool {
    catch_up_after_ms > 0
        && now - stored_at < ENDPOINT_BUSY_MS
        && now - oldest_claimed < catch_up_after_ms
}

/// How often an inbox loop's claim reads the due index from its start (see
/// [`ClaimFloor`]).
const CLAIM_SWEEP_EVERY_MS: i64 = 1_000;

/// How far below its last claim's oldest event a loop's next claim starts:
/// webhooks are stored by more than one writer (each replica commits its
/// own), and a group stamped earlier may commit after a later one was
/// claimed.
const CLAIM_FLOOR_MARGIN_MS: i64 = 250;

/// Where an inbox loop's next claim starts reading the due index:
/// [`CLAIM_FLOOR_MARGIN_MS`] before the arrival of the oldest event its last
/// claim took (an event is due no earlier than it arrived), and from the
/// start once every [`CLAIM_SWEEP_EVERY_MS`], which finds what lies below:
/// events whose lease ran out (a loop that died) and events whose commit
/// came later than that margin.
#[derive(Debug, Default)]
struct ClaimFloor {
    from_ms: i64,
    swept_at_ms: Option<i64>,
}

impl ClaimFloor {
    /// The `from_ms` of a claim made now (unix ms). A clock stepped back
    /// sweeps: the floor, read on the clock before the step, may lie past
    /// `now`, and every claim until the clock caught up was empty.
    fn next(&mut self, now: i64) -> i64 {
        match self.swept_at_ms {
            Some(at) if (0..CLAIM_SWEEP_EVERY_MS).contains(&(now.saturating_sub(at))) => {
                self.from_ms
            }
            swept => {
                // Stepped back: the floor, read before the step, may lie
                // past now until a claim moves it.
                if swept.is_some_and(|at| now < at) {
                    self.from_ms = i64::MIN;
                }
                self.swept_at_ms = Some(now);
                i64::MIN
            }
        }
    }

    /// A claim took events, the oldest of which arrived at `oldest_ms`.
    fn claimed(&mut self, oldest_ms: i64) {
        self.from_ms = oldest_ms.saturating_sub(CLAIM_FLOOR_MARGIN_MS);
    }
}

/// What one read of a claimed batch knows of an event's remote record: its
/// link, and the customer that link names (`None`: it does not exist).
#[derive(Debug)]
pub struct Known {
    link: Option<SyncLink>,
    customer: Option<Customer>,
}

/// What ferry does when a remote record is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletePolicy {
    /// Soft-delete the local customer (and so, by fan-out, everywhere).
    #[default]
    SoftDelete,
    /// Keep the customer; forget the link (the next local change creates a
    /// new remote record).
    Unlink,
    /// Keep everything as it is.
    Ignore,
}

/// The typed outcome of one inbound step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum InboundOutcome {
    /// The change was applied to this customer.
    Applied {
        /// The customer.
        customer_id: String,
    },
    /// Nothing to apply.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Failed; retried later.
    RetryScheduled,
    /// Waits behind an open conflict; costs no attempt.
    Deferred,
    /// Given up: see the dead letter.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// Another worker took the event over.
    LeaseLost,
}

/// What a duplicate-email `merge` moves when it links a record to the
/// customer that has its email.
struct Relink {
    /// The customer the record was linked to until now.
    from: Option<CustomerId>,
    /// The customer's own live record of the connector, which the record
    /// replaces.
    replaces: Option<String>,
}

/// The record's email, normalised as the catalog stores it (for matching).
pub(crate) fn email_of(record: &serde_json::Value) -> Option<String> {
    record
        .get("email")
        .and_then(|v| v.as_str())
        .map(crate::api::customers::validate::normalise_email)
        .filter(|e| !e.is_empty())
}

/// Whether `email`, a customer's, is the rewrite [`DuplicateEmail::AutoRename`]
/// gave the email of `record` (the remote record `remote_id` of
/// `connector`, or its snapshot): the customer was kept apart from the
/// customer with that email, and the remote keeps its own.
pub(crate) fn kept_apart(
    email: &str,
    record: &serde_json::Value,
    connector: &str,
    remote_id: &str,
) -> bool {
    email.contains("+dup-")
        && email_of(record).is_some_and(|own| renamed_email(&own, connector, remote_id) == email)
}

/// `record` with `email` in place of its own.
fn with_email(record: &serde_json::Value, email: &str) -> serde_json::Value {
    let mut record = record.clone();
    if let Some(fields) = record.as_object_mut() {
        fields.insert("email".to_owned(), email.into());
    }
    record
}

/// Canonical record → the fields a customer write takes, through the same
/// validation and normalisation as the API (trimmed text, lower-cased
/// email, the same limits), so a remote can never store what the API would
/// refuse and leave a customer nobody can edit. The error says which fields
/// fail and why; the event is dead-lettered with it. The rules are
/// `ferry_runtime::customer`'s, which the connector test kit applies too.
pub(crate) fn fields_of(record: &serde_json::Value) -> Result<CustomerFields, String> {
    crate::runtime::customer::fields_of(record)
}

/// The fields `record` (a merge's, or a resolution's) makes for a stored
/// customer whose email is `stored`: an email that is the customer's own,
/// as stored or the same address in another form, stays as stored and is
/// not judged again. An older form kept beside another customer's (by
/// `Store::renormalise_emails`) was looked up and found the other; one
/// today's rules refuse (an invisible character) failed the record; either
/// way every event of the record was dead-lettered, a phone edit's too.
pub(crate) fn fields_for(
    record: &serde_json::Value,
    stored: &str,
) -> Result<CustomerFields, String> {
    let own = record
        .get("email")
        .and_then(serde_json::Value::as_str)
        .map(str::trim)
        .is_some_and(|email| email == stored || same_text("email", Some(email), Some(stored)));
    if own {
        crate::runtime::customer::fields_keeping_email(record, stored)
    } else {
        fields_of(record)
    }
}

pub(crate) fn local_record(customer: &Customer) -> Result<serde_json::Value, StoreError> {
    Ok(canonical_record(&serde_json::to_value(customer)?))
}

impl SyncEngine {
    /// The remote changes that waited behind open conflict `conflict`
    /// (events of its remote record made after the state it recorded),
    /// folded into `resolved`, the record a person chose: the merged record
    /// to write instead, and what it stands for. `None` when nothing waits,
    /// or when a remote delete waits (it applies after the resolution, by
    /// the delete policy).
    ///
    /// Applied after the resolution instead, such an edit came too late:
    /// the resolution had pushed every field over it, and the event, now
    /// close to that push, was fetched afresh and taken for its echo. The
    /// base is the link's snapshot, the remote state the person saw; the
    /// person's choice is the newest word on every field it sets, the
    /// remote's edits are taken on the others (field owners first).
    /// `set_every_field`: the person set every field the conflict lists
    /// (`remote`, `fields`), not only kept ferry's (`local`).
    pub async fn fold_waiting(
        &self,
        conflict: &Conflict,
        resolved: &serde_json::Value,
        set_every_field: bool,
    ) -> Result<Option<(serde_json::Value, Folded)>, FoldError> {
        let store = &self.inner.store;
        let links = store.links_of(&conflict.customer_id).await?;
        let Some(link) = links
            .into_iter()
            .find(|l| l.connector == conflict.connector)
        else {
            return Ok(None);
        };
        let Some(remote_id) = link.remote_id.as_deref() else {
            return Ok(None);
        };
        let waiting = store
            .inbox_waiting(&conflict.connector, remote_id, link.remote_seen_at_ms)
            .await?;
        if waiting.iter().any(|e| e.kind != RemoteChange::Upsert) {
            return Ok(None);
        }
        let Some(newest) = waiting.iter().max_by_key(|e| (e.occurred_at_ms, e.seq)) else {
            return Ok(None);
        };
        // Events of one remote tick (Stripe's `created` is in seconds), with
        // each other or with the change that opened the conflict, cannot be
        // ordered: what the remote holds now says, as for any event in
        // doubt; its payload only if the connector cannot be asked.
        let tied = newest.occurred_at_ms == link.remote_seen_at_ms
            || waiting
                .iter()
                .filter(|e| e.occurred_at_ms == newest.occurred_at_ms)
                .count()
                > 1;
        // A thin event (Salesforce's Outbound Message lacking a field, an
        // event destination's) is asked about likewise. Left out, its edit
        // was pushed over by the resolution, then fetched and taken for
        // that push's echo.
        let fetched = if tied || newest.record.is_none() {
            match self.fetch_current(newest, false, true).await {
                Ok(fetched) => fetched,
                // A thin edit the remote cannot be asked about now: the
                // resolution waits for it. Made without it, the resolution
                // was pushed over the edit, and the edit, read after that
                // push, was taken for its echo: lost on both sides.
                Err(Failure::Retry(why) | Failure::Wait(why, _) | Failure::Unauthorized(why))
                    if newest.record.is_none() =>
                {
                    return Err(FoldError::RemoteUnreadable(why));
                }
                // Gone, or never to be read: the resolution stands alone
                // (the record's delete, or the dead letter, follows it);
                // an event asked about for its order only has its payload.
                Err(_) => None,
            }
        } else {
            None
        };
        let remote = match (&fetched, &newest.record) {
            (Some(fetched), _) => canonical_record(fetched),
            (None, Some(record)) => canonical_record(&record.0),
            (None, None) => return Ok(None),
        };
        let mut merged = merge_owned(
            Sides {
                base: link.snapshot.as_ref(),
                local: resolved,
                remote: &remote,
                local_changed_at_ms: now_ms(),
                remote_changed_at_ms: newest.occurred_at_ms,
            },
            ConflictPolicy::PreferLocal,
            &self.inner.field_owners,
            &conflict.connector,
        );
        // A field both sides changed while the link was held keeps the
        // resolution's value: recorded, unless it is the one the person
        // just decided (the remote value the conflict showed).
        let decided = conflict.fields.0.as_array();
        let mut overridden: Vec<FieldConflict> = merged
            .conflicts
            .iter()
            .filter(|c| {
                !decided.is_some_and(|decided| {
                    decided
                        .iter()
                        .any(|d| d["field"] == c.field.as_str() && d["remote"] == c.remote)
                })
            })
            .cloned()
            .collect();
        // So does a field the person set (`remote` or `fields`, which set
        // every field the conflict lists) to the value the conflict showed
        // for the remote: that value is the snapshot's, so the merge read
        // it as unchanged in ferry and took the later edit, a value nobody
        // picked, with nothing recorded. Not a `local` resolution's fields
        // (it sets none: a field the policy gave the remote stays open to
        // the remote's later edits), nor an owned field (its owner first).
        let value = |record: Option<&serde_json::Value>, field: &str| {
            record
                .and_then(|r| field_of(r, field))
                .cloned()
                .unwrap_or(serde_json::Value::Null)
        };
        let set = decided
            .into_iter()
            .flatten()
            .filter_map(|d| d["field"].as_str())
            .filter(|field| set_every_field && self.inner.field_owners.owner(field).is_none());
        for field in set {
            let chosen = value(Some(resolved), field);
            let now = value(Some(&merged.merged), field);
            if same_text(field, now.as_str(), chosen.as_str()) {
                continue;
            }
            set_field(&mut merged.merged, field, chosen.clone());
            overridden.push(FieldConflict {
                field: field.to_owned(),
                base: value(link.snapshot.as_ref(), field),
                local: chosen,
                remote: now,
                resolution: Resolution::Local,
            });
        }
        let folded = Folded {
            snapshot: remote,
            seen_at_ms: newest.occurred_at_ms,
            seqs: waiting.iter().map(|e| e.seq).collect(),
            overridden: serde_json::to_value(overridden).map_err(StoreError::from)?,
            event_id: newest.event_id.clone(),
        };
        Ok(Some((merged.merged, folded)))
    }

    /// How many inbox loops a process runs. One loop alternates between
    /// claiming (the database works, ferry waits) and deciding (ferry
    /// works, the database waits); a second loop fills those gaps, as a
    /// second replica would, and is as safe: claims skip each other's
    /// rows, a write checks the customer's version and the record's link
    /// as its decision read them, and a stale event is skipped. What the
    /// loops use of the machine the webhook endpoint does not have: one
    /// loop answers webhooks faster and applies them later
    /// (docs/performance.md, round 7). Unset, PostgreSQL runs two and
    /// SQLite one: its one writer serves the endpoint too, and a second
    /// loop there trades a third of the acknowledged rate for a drain of
    /// seconds instead of tens (round 20).
    pub fn inbox_loops(&self) -> usize {
        self.inner
            .inbox_loops
            .unwrap_or(match self.inner.store.kind() {
                crate::store::StoreKind::Sqlite => 1,
                crate::store::StoreKind::Postgres => 2,
            })
    }

    /// Applies inbox events until cancelled, in arrival order. A
    /// [`InboxLoop::CatchUp`] loop holds back while webhooks keep arriving,
    /// until the oldest event waiting has waited `inbox_catch_up_after`:
    /// on a burst the first loop applies and the endpoint has the rest of
    /// the machine (its acknowledgements are what the remote waits on);
    /// once the endpoint is quiet, or the backlog is that old, every loop
    /// applies (docs/performance.md, round 8).
    pub async fn run_inbox(self, role: InboxLoop, cancel: CancellationToken) {
        let catch_up_after =
            i64::try_from(self.inner.inbox_catch_up_after.as_millis()).unwrap_or(i64::MAX);
        let holding_back = metrics::gauge!("ferry_inbox_loops_holding_back");
        let mut held = false;
        let mut floor = ClaimFloor::default();
        loop {
            // Before every claim, not only when idle: a backlog (thin
            // events fetched at the connector's pace) would otherwise hold
            // shutdown until it drained, the endpoint already closed.
            if cancel.is_cancelled() {
                if held {
                    holding_back.decrement(1.0);
                }
                return;
            }
            let hold = role == InboxLoop::CatchUp
                && hold_back(
                    now_ms(),
                    self.inner.store.inbox_stored_at_ms(),
                    self.inner.oldest_claimed_ms.load(Ordering::Relaxed),
                    catch_up_after,
                );
            if hold != held {
                held = hold;
                if hold {
                    holding_back.increment(1.0);
                } else {
                    holding_back.decrement(1.0);
                }
            }
            if hold {
                tokio::select! {
                    () = cancel.cancelled() => {
                        holding_back.decrement(1.0);
                        return;
                    }
                    () = tokio::time::sleep(HOLD_BACK_POLL) => {}
                }
                continue;
            }
            let (token, until) = self.lease();
            let grace_ms = i64::try_from(self.inner.inbox_grace.as_millis()).unwrap_or(i64::MAX);
            let claimed = self
                .inner
                .store
                .claim_due_inbox(&token, until, INBOX_BATCH, grace_ms, floor.next(now_ms()))
                .await;
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "claiming inbox events failed"
                    );
                    Vec::new()
                }
            };
            let oldest = claimed
                .iter()
                .map(|e| e.received_at.timestamp_millis())
                .min();
            if let Some(oldest) = oldest {
                floor.claimed(oldest);
            }
            self.inner
                .oldest_claimed_ms
                .store(oldest.unwrap_or_else(now_ms), Ordering::Relaxed);
            let busy = !claimed.is_empty();
            self.apply_in_record_order(claimed, Some(&cancel)).await;
            if busy {
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.inner.store.commits().inbox.notified() => {}
                () = tokio::time::sleep(INBOX_POLL) => {}
            }
        }
    }

    /// Applies the inbox events a bus batch announced, in order (cluster
    /// mode); events not due or held elsewhere are left to their owner and
    /// the inbox loop, and at shutdown (`cancel`) the events not started
    /// are too, once their lease ends.
    pub async fn apply_inbox_seqs(
        &self,
        seqs: &[i64],
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let (token, until) = self.lease();
        let claimed = self
            .inner
            .store
            .claim_inbox_seqs(seqs, &token, until)
            .await?;
        self.apply_in_record_order(claimed, Some(cancel)).await;
        Ok(())
    }

    /// Applies claimed events (in arrival order): the events of one remote
    /// record one after another, in order, and different records at once,
    /// up to `concurrency`. Records that meet in one customer (the same
    /// email, or linked to it from two connectors) are safe to run together:
    /// the customer write checks its version and the live-email index, and a
    /// loser decides again. `cancel`: stop between events at shutdown (those left keep their
    /// lease until it ends, then any loop takes them).
    async fn apply_in_record_order(
        &self,
        claimed: Vec<InboxEvent>,
        cancel: Option<&CancellationToken>,
    ) {
        // An idle poll claims nothing: no batch read (on PostgreSQL a round
        // trip with empty arrays, several a second).
        if claimed.is_empty() {
            return;
        }
        let mut groups: Vec<Vec<InboxEvent>> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        for event in claimed {
            let key = (event.connector.clone(), event.remote_id.clone());
            match index.get(&key) {
                Some(&at) => groups[at].push(event),
                None => {
                    index.insert(key, groups.len());
                    groups.push(vec![event]);
                }
            }
        }
        // One read of the links and customers the groups start from, not
        // two round trips per event; later events of a group read afresh,
        // after the events before them were applied.
        let mut known = self.read_known(&groups).await.into_iter();
        futures::stream::iter(groups)
            .for_each_concurrent(self.inner.concurrency, |group| {
                let mut known = known.next().flatten();
                async move {
                    for event in group {
                        if cancel.is_some_and(CancellationToken::is_cancelled) {
                            return;
                        }
                        self.apply_inbox_event(event, known.take()).await;
                    }
                }
            })
            .await;
    }

    /// What a batch read knows of each group's first event, in group
    /// order; nothing (each event reads for itself) if the read failed.
    async fn read_known(&self, groups: &[Vec<InboxEvent>]) -> Vec<Option<Known>> {
        let store = &self.inner.store;
        let keys: Vec<(&str, &str)> = groups
            .iter()
            .filter_map(|g| g.first())
            .map(|e| (e.connector.as_str(), e.remote_id.as_str()))
            .collect();
        let read = async {
            let links = store.links_by_remote_ids(&keys).await?;
            let ids: Vec<&str> = links.iter().map(|l| l.customer_id.as_str()).collect();
            let customers = store.customers_any(&ids).await?;
            Ok::<_, StoreError>((links, customers))
        };
        let (links, customers) = match read.await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "reading the links of an inbox batch failed; each event reads its own"
                );
                return Vec::new();
            }
        };
        let mut links: HashMap<(String, String), SyncLink> = links
            .into_iter()
            .filter_map(|l| Some(((l.connector.clone(), l.remote_id.clone()?), l)))
            .collect();
        let customers: HashMap<String, Customer> = customers
            .into_iter()
            .map(|c| (c.id.as_str().to_owned(), c))
            .collect();
        keys.iter()
            .map(|(connector, remote_id)| {
                let link = links.remove(&((*connector).to_owned(), (*remote_id).to_owned()));
                // Records of two connectors may be linked to one customer:
                // each group gets it (the second write finds its version
                // moved on and decides again), not only the first.
                let customer = link
                    .as_ref()
                    .and_then(|l| customers.get(&l.customer_id).cloned());
                Some(Known { link, customer })
            })
            .collect()
    }

    /// Runs one inbound step and records its outcome.
    #[tracing::instrument(skip_all, fields(
        connector = %event.connector,
        // Debug-quoted: ids come from a delivery's body, and a line break
        // in one must not start a log line of its own.
        event_id = ?event.event_id,
        remote_id = ?event.remote_id,
        correlation_id = event.correlation_id.as_deref().unwrap_or(""),
    ))]
    pub async fn apply_inbox_event(
        &self,
        event: InboxEvent,
        known: Option<Known>,
    ) -> InboundOutcome {
        let outcome = self.apply_inbox_step(&event, known).await;
        let connector = &event.connector;
        match &outcome {
            InboundOutcome::Applied { .. } => self.observe(connector, "inbound", "applied", None),
            InboundOutcome::Skipped { .. } => self.observe(connector, "inbound", "skipped", None),
            InboundOutcome::DeadLettered { reason } => {
                self.observe(connector, "inbound", "dead_lettered", Some(reason));
            }
            // Retries are counted where their error is known.
            InboundOutcome::RetryScheduled
            | InboundOutcome::Deferred
            | InboundOutcome::LeaseLost => {}
        }
        outcome
    }

    async fn apply_inbox_step(
        &self,
        event: &InboxEvent,
        mut known: Option<Known>,
    ) -> InboundOutcome {
        // Parked behind a conflict still open: parked again, nothing
        // decided. Decided again at each recheck, an event of a record no
        // link holds (a duplicate of the email's owner, whose link the
        // conflict holds) read its record from the remote every minute
        // until a person resolved the conflict, the org's API allowance
        // and the connector's request rate spent on it.
        if let Some(conflict) = &event.held_by {
            match self.inner.store.conflict_is_open(conflict).await {
                Ok(true) => {
                    return match self.held(event, conflict).await {
                        Ok(Some(outcome)) => outcome,
                        Ok(None) => InboundOutcome::LeaseLost,
                        Err(error) => self.inbound_failed(event, error).await,
                    }
                }
                Ok(false) => {}
                Err(error) => return self.inbound_failed(event, error.into()).await,
            }
        }
        for _ in 0..RACE_RETRIES {
            // A decision taken again after a race reads afresh.
            match self.try_apply(event, known.take()).await {
                Ok(Some(outcome)) => return outcome,
                // The customer changed while we decided: decide again.
                Ok(None) => continue,
                Err(error) => return self.inbound_failed(event, error).await,
            }
        }
        self.inbound_failed(event, Failure::Retry("the customer kept changing".into()))
            .await
    }

    async fn skip(
        &self,
        event: &InboxEvent,
        reason: &str,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let finished = self
            .inner
            .store
            .finish_inbox(event, InboxFinish::Skipped(reason))
            .await?;
        tracing::debug!(reason, "inbound event skipped");
        Ok(Some(if finished {
            InboundOutcome::Skipped {
                reason: reason.to_owned(),
            }
        } else {
            InboundOutcome::LeaseLost
        }))
    }

    /// Decides and applies; `Ok(None)` means "raced, decide again".
    async fn try_apply(
        &self,
        event: &InboxEvent,
        known: Option<Known>,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let inner = &self.inner;
        if event.entity != super::ENTITY {
            return self.skip(event, "entity not synced").await;
        }
        let (link, known_customer) = match known {
            Some(known) => (known.link, Some(known.customer)),
            None => (
                inner
                    .store
                    .link_by_remote_id(&event.connector, &event.remote_id)
                    .await?,
                None,
            ),
        };
        // The link as this decision read it: the write finds it unchanged
        // or the change decides again (see [`LinkRead`]).
        let link_read = link.as_ref().map(LinkRead::from);
        // An upsert of a record nothing links, delivered after the
        // record's delete (a `created` the remote retried): the record is
        // gone, and neither made a customer nor adopted.
        let deleted_since = link.is_none()
            && event.kind == RemoteChange::Upsert
            && inner
                .store
                .remote_deleted_since(&event.connector, &event.remote_id, event.occurred_at_ms)
                .await?;
        if let Some(key) = &event.origin_key {
            if let Some((customer, version)) = super::outbound::key_parts(&event.connector, key) {
                // The echo of a create whose answer ferry never got (no
                // link has this record yet): it names the record made, so
                // the link takes it, and the next push is an update. A
                // replay of the create instead relied on the remote still
                // knowing the key (Stripe forgets it after a day), or made
                // a second record.
                if link.is_none() && event.kind == RemoteChange::Upsert && !deleted_since {
                    // A thin echo carries no record: the remote is asked,
                    // or the link would start without a snapshot, and the
                    // next remote change be merged with no base.
                    let fetched = match &event.record {
                        Some(_) => None,
                        None => match self.fetch_current(event, false, true).await {
                            Ok(record) => record,
                            // On its last attempt, linked without a base
                            // rather than dead-lettered: a link the echo
                            // never made leaves the create to a replay,
                            // which makes a second record once the remote
                            // forgot its key.
                            Err(Failure::Retry(_))
                                if self.inner.policy.exhausted(
                                    u32::try_from(event.attempts + 1).unwrap_or(u32::MAX),
                                ) =>
                            {
                                None
                            }
                            // Asked again later (a 429, a 5xx, a timeout,
                            // ferry's own pacing): adopted without a base
                            // and finished, it stayed so for good. Not a
                            // record the remote no longer has: linked, every
                            // push to it would be a `not_found`.
                            Err(
                                failure @ (Failure::Retry(_)
                                | Failure::Wait(..)
                                | Failure::Missing(_)),
                            ) => return Err(failure),
                            // It cannot be read at all: linked without one.
                            Err(
                                Failure::Permanent(_) | Failure::Unauthorized(_) | Failure::Skip(_),
                            ) => None,
                        },
                    };
                    let adopted = inner
                        .store
                        .adopt_created_remote(
                            &event.connector,
                            &customer,
                            version,
                            &event.remote_id,
                            event.record.as_ref().map(|r| &r.0).or(fetched.as_ref()),
                        )
                        .await?;
                    if adopted {
                        tracing::info!(customer_id = %customer, version, remote_id = ?event.remote_id,
                            "a create whose answer was lost is linked from its echo");
                    }
                }
                // The push it echoes carries the change's correlation id:
                // name it, so one id leads from the change to its echo.
                let push = link.as_ref().and_then(|l| l.correlation_id.as_deref());
                let reason = match push {
                    Some(id) => format!("echo of ferry's own push (idempotency key; change {id})"),
                    None => "echo of ferry's own push (idempotency key)".to_owned(),
                };
                tracing::info!(echo_of = push.unwrap_or(""), "echo suppressed");
                return self.skip(event, &reason).await;
            }
        }
        if let Some(held_by) = link.as_ref().and_then(|l| l.held_by.as_deref()) {
            // A person resolves the conflict first; then the event applies.
            return self.held(event, held_by).await;
        }
        if deleted_since {
            return self
                .skip(
                    event,
                    "the remote record was deleted: its delete came first",
                )
                .await;
        }
        // A thin upsert says only "look again": applying it fetches what
        // holds now, so it is never stale, however the sender (or the
        // replica that dated it on arrival, with its own clock) dated it.
        // Unless the record is gone: then it is as late as it looks.
        let thin_upsert = event.kind == RemoteChange::Upsert && event.record.is_none();
        if let Some(link) = link.as_ref().filter(|l| !thin_upsert || l.remote_deleted) {
            let stale = event.occurred_at_ms < link.remote_seen_at_ms;
            let in_the_same_tick = within_a_tick(event, link.remote_seen_at_ms);
            let read_again = event.kind == RemoteChange::Upsert && in_the_same_tick;
            if stale
                && (link.remote_deleted
                    || (!read_again && !self.gone_after_all(event, in_the_same_tick).await?))
            {
                return self
                    .skip(event, "stale: older than a change already applied")
                    .await;
            }
        }
        if event.kind == RemoteChange::Delete {
            // A reconciliation's orphan: a link whose record a complete
            // listing did not return. A listing can miss records (a
            // sharing rule, a narrowed key, an undelete since): the
            // remote is asked first, and only a record it no longer has
            // is deleted here (and fanned out).
            // Only a read that says the record is gone deletes: a
            // connector without `fetch` (the SDK's default) cannot say,
            // and its listing alone deleted every customer it left out
            // (an API-side filter, a narrowed key), and fanned them out.
            if event.remote_type == RECONCILIATION && event.record.is_none() {
                match self.record_there(event).await? {
                    Some(false) => {}
                    Some(true) => {
                        return self
                            .skip(
                                event,
                                "the remote has the record: the listing that found it missing missed it",
                            )
                            .await
                    }
                    None => {
                        return self
                            .skip(
                                event,
                                "the connector cannot read the record (no fetch), so nothing says it is gone: \
                                 a listing alone deletes nothing (if the record is gone, delete the customer)",
                            )
                            .await
                    }
                }
            }
            return self.apply_delete(event, link).await;
        }
        // The payload may not be the newest state: the same remote tick as
        // the last applied event (Stripe's clock has one-second resolution,
        // so their order is unknown), or no later than ferry's own last push
        // (a late echo of an older push). Ask the remote what holds now, as
        // for an event that carries no record at all (a thin event: the
        // remote, or a connector that does not trust the payload, says only
        // which record changed). So may a reconciliation's repair of a
        // linked record: it is dated by ferry's clock (the listing's second,
        // less one), and with that clock ahead of the remote's by more, an
        // edit made after the listing looked older than the repair, whose
        // listed copy then came back over it.
        // So is an old copy of a record no link holds: a reconciliation's
        // import or link by email whose listing is old (resolved by hand
        // days later, a long run's repairs), an event taken in long ago (an
        // inbound dead letter replayed, a backlog). The record may have
        // been deleted since, and a remote that sends no deletes
        // (Salesforce) never says; nor does Stripe's delete once retention
        // trimmed it. Applied as sent, it came back, and was pushed to
        // every other system. Old by the event's date (a delivery the
        // sender retried through an outage) or by when ferry took it in
        // (a replay, whose event may have been dated on arrival).
        let copied_at_ms = event
            .occurred_at_ms
            .min(event.received_at.timestamp_millis());
        let old_and_unlinked =
            link.is_none() && now_ms().saturating_sub(copied_at_ms) > LISTED_COPY_FRESH_MS;
        let doubtful = old_and_unlinked
            || link.as_ref().is_some_and(|l| {
                event.remote_type == RECONCILIATION
                    || event.occurred_at_ms == l.remote_seen_at_ms
                    || within_a_tick(event, l.remote_seen_at_ms)
                    || (l.pushed_at_ms > 0
                        && event.occurred_at_ms <= l.pushed_at_ms + ECHO_WINDOW_MS)
            });
        let remote = match &event.record {
            Some(record) if !doubtful => canonical_record(&record.0),
            record => match (
                self.fetch_current(
                    event,
                    link.as_ref().is_some_and(|l| l.remote_deleted),
                    link.is_some(),
                )
                .await?,
                record,
            ) {
                (Some(fetched), _) => canonical_record(&fetched),
                // A doubtful payload from a connector without `fetch` is
                // the best there is: applied (the base still tells an echo
                // from an edit). Retrying it would only fail the same way
                // until it was dead-lettered.
                (None, Some(record)) => canonical_record(&record.0),
                // Thin events from a connector without `fetch` say nothing
                // ferry can apply (as before thin events were fetched).
                (None, None) => {
                    return self
                        .skip(
                            event,
                            "the event carries no record, and the connector cannot fetch one",
                        )
                        .await
                }
            },
        };

        let (customer, base) = match &link {
            Some(link) => {
                let linked = match known_customer {
                    Some(known) => known,
                    None => inner.store.get_customer_any(&link.customer_id).await?,
                };
                match linked {
                    Some(customer) if customer.deleted_at.is_none() => {
                        (Some(customer), link.snapshot.clone())
                    }
                    Some(_) => return self.skip(event, "the customer was deleted locally").await,
                    None => return self.skip(event, "the linked customer does not exist").await,
                }
            }
            None => match self.customer_by_email(&remote).await? {
                Some(owner) => {
                    match self.owners_link(&owner.id, event).await? {
                        (Some(taken), _) => {
                            return self.apply_duplicate(event, remote, owner, taken).await
                        }
                        // The link this record would take waits for a
                        // person (its record was recreated or released
                        // while a conflict held it): so does the record,
                        // which would otherwise meet that hold at its
                        // write again and again.
                        (None, Some(held_by)) => return self.held(event, &held_by).await,
                        (None, None) => (Some(owner), None),
                    }
                }
                None => (None, None),
            },
        };
        let Some(customer) = customer else {
            let fields = fields_of(&remote).map_err(Failure::Permanent)?;
            return self
                .write(InboundChange {
                    event: event.clone(),
                    link_read,
                    customer: CustomerWrite::Create(fields),
                    link_customer: None,
                    unlink_customer: None,
                    releases: None,
                    link_remote: true,
                    snapshot: Some(remote),
                    remote_has_result: true,
                    push_back: None,
                    detail: Some("created from the remote record".into()),
                    conflict: None,
                })
                .await;
        };

        let local = local_record(&customer)?;
        // A customer `auto_rename` kept apart holds its record's email
        // rewritten, and the remote keeps its own: seen through the
        // rewrite, neither side changed it (it was a local change, and the
        // next remote edit pushed the rewrite over the remote's email).
        // The snapshot stays the remote's record as it is.
        let apart = |record: &serde_json::Value| {
            kept_apart(&customer.email, record, &event.connector, &event.remote_id)
        };
        let base = base.map(|base| {
            if apart(&base) {
                with_email(&base, &customer.email)
            } else {
                base
            }
        });
        let remote_seen = if apart(&remote) {
            std::borrow::Cow::Owned(with_email(&remote, &customer.email))
        } else {
            std::borrow::Cow::Borrowed(&remote)
        };
        let policy = self.event_policy(event);
        let merged = merge_owned(
            Sides {
                base: base.as_ref(),
                local: &local,
                remote: &remote_seen,
                local_changed_at_ms: customer.updated_at.timestamp_millis(),
                remote_changed_at_ms: event.occurred_at_ms,
            },
            policy,
            &inner.field_owners,
            &event.connector,
        );
        let mut conflict = (!merged.conflicts.is_empty()).then(|| NewConflict {
            policy: policy_name(policy),
            fields: serde_json::to_value(&merged.conflicts).unwrap_or_default(),
            open: merged.has_pending_conflicts(),
        });
        let mut fields = fields_for(&merged.merged, &customer.email).map_err(Failure::Permanent)?;
        let mut detail_prefix = String::new();
        if fields.email != customer.email {
            if let Some(owner) = self
                .other_customer_with(&fields.email, &customer.id)
                .await?
            {
                match self.duplicate_email_policy(&event.connector) {
                    DuplicateEmail::Reject => {
                        return Err(Failure::Permanent(format!(
                            "the email {} belongs to customer {}; duplicate_email policy is reject",
                            fields.email,
                            owner.id.as_str()
                        )))
                    }
                    DuplicateEmail::Flag => {
                        // The merge's own conflicts stay in it: a field
                        // flagged, or decided by the policy, is recorded
                        // with the email for the person who resolves it.
                        let mut entries = match conflict.take() {
                            Some(merged) => match merged.fields {
                                serde_json::Value::Array(entries) => entries,
                                _ => Vec::new(),
                            },
                            None => Vec::new(),
                        };
                        entries.retain(|e| e["field"] != "email");
                        entries.push(serde_json::json!({
                            "field": "email",
                            "base": base.as_ref().and_then(|b| b.get("email")).cloned(),
                            "local": customer.email,
                            "remote": fields.email,
                            "resolution": Resolution::Pending,
                            "detail": format!("the remote email belongs to customer {}", owner.id.as_str()),
                        }));
                        conflict = Some(NewConflict {
                            policy: "duplicate_email".to_owned(),
                            fields: serde_json::Value::Array(entries),
                            open: true,
                        });
                        fields.email = customer.email.clone();
                    }
                    DuplicateEmail::AutoRename => {
                        fields.email =
                            checked_rename(&fields.email, &event.connector, &event.remote_id)?;
                        detail_prefix = format!("email rewritten to {}; ", fields.email);
                    }
                    DuplicateEmail::Merge => {
                        // The remote record now stands for the customer
                        // that has its email: relink it there and merge
                        // into that customer as a first sync (no snapshot).
                        let detail = format!(
                            "relinked from customer {} to customer {}, whose email it has",
                            customer.id.as_str(),
                            owner.id.as_str()
                        );
                        // The owner's own record of this connector, if it
                        // has one, is replaced: as when an unlinked record
                        // with its email is merged into it.
                        let (owners, held_by) = self.owners_link(&owner.id, event).await?;
                        // The owner's link waits for a person, whatever
                        // its record (one a reconciliation let go keeps
                        // its hold): so does this event (relinking now
                        // would move the held link and leave its conflict
                        // pointing at nothing, or meet the hold at its
                        // write again and again).
                        if let Some(held_by) = held_by {
                            return self.held(event, &held_by).await;
                        }
                        let releases = owners.and_then(|l| l.remote_id);
                        return self
                            .merge_first_sync(
                                event,
                                link_read,
                                remote,
                                owner,
                                Relink {
                                    from: Some(customer.id.clone()),
                                    replaces: releases,
                                },
                                &detail,
                            )
                            .await;
                    }
                }
            }
        }
        // The remote holds the result when every local change the merge
        // kept is its value too (a conflict the remote won, an edit both
        // sides made), and nothing waits for a person or an owner's value.
        // (A remote-won conflict was pushed back to its source, identical:
        // an update racing the remote's next edit, for nothing.)
        // A first sync keeps ferry's values of the fields the remote left
        // empty; the remote gets them by a push of those fields.
        let fills_gaps = base.is_none() && fills_gaps(event, &merged, &remote_seen);
        let remote_has_result = !fills_gaps
            && merged.overridden.is_empty()
            && conflict.as_ref().is_none_or(|c| !c.open)
            && (merged.local_changed.is_empty() || {
                let differing = super::merge::differing_fields(&merged.merged, &remote_seen);
                merged.local_changed.iter().all(|f| !differing.contains(f))
            });
        let changes_local = merged.changes_local(&local) || fields.email != customer.email;
        let change = if changes_local {
            CustomerWrite::Update {
                id: customer.id.clone(),
                expected_version: customer.version,
                fields,
            }
        } else {
            CustomerWrite::None
        };
        // A value the remote lacks and cannot get from a new version (the
        // customer did not change): a conflict kept locally, or an owned
        // field the remote changed. Push the current version to it again.
        // A reconciliation's repair also brings the remote up to the merged
        // record where it lags (a local change whose push gave up).
        // A version whose push gave up never reached the remote: a field
        // it added is one the remote lacks, not one it does not know.
        let unpushed = link
            .as_ref()
            .is_some_and(|l| l.state == LinkState::Dead && l.wanted_version > l.synced_version);
        let compare = if unpushed {
            super::merge::unpushed_differences
        } else {
            super::merge::field_differences
        };
        let lags = event.remote_type == RECONCILIATION
            && !compare(&merged.merged, &remote_seen, base.as_ref()).is_empty();
        let push_back = (matches!(change, CustomerWrite::None)
            && (merged.remote_needs_push() || lags || fills_gaps))
            .then_some(customer.version);
        let detail = match (&change, base.is_none(), &conflict) {
            (_, _, Some(_)) => format!(
                "merged with {} conflicting field(s)",
                merged.conflicts.len().max(1)
            ),
            (CustomerWrite::None, true, None) if fills_gaps => {
                "linked to the customer with the same email; pushing the values it lacks".to_owned()
            }
            (CustomerWrite::None, true, None) => {
                "linked to the customer with the same email".to_owned()
            }
            (CustomerWrite::None, false, None) if push_back.is_some() => {
                "kept the owned or local values; pushing them back".to_owned()
            }
            (CustomerWrite::None, false, None) => {
                let push = link.as_ref().and_then(|l| l.correlation_id.as_deref());
                tracing::info!(echo_of = push.unwrap_or(""), "echo suppressed");
                match push {
                    Some(id) => format!("echo: the remote matches the local state (change {id})"),
                    None => "echo: the remote matches the local state".to_owned(),
                }
            }
            (_, true, None) => "linked by email and updated".to_owned(),
            (_, false, None) => format!("updated: {}", merged.remote_changed.join(", ")),
        };
        self.write(InboundChange {
            event: event.clone(),
            link_read,
            customer: change,
            link_customer: Some(customer.id.clone()),
            unlink_customer: None,
            releases: None,
            link_remote: true,
            snapshot: Some(remote),
            remote_has_result,
            push_back,
            detail: Some(format!("{detail_prefix}{detail}")),
            conflict,
        })
        .await
    }

    /// An unlinked remote record whose email belongs to `owner`, a customer
    /// already linked to another live record `taken` of the same connector
    /// (two remote records, one person): the duplicate-email policy decides.
    async fn apply_duplicate(
        &self,
        event: &InboxEvent,
        remote: serde_json::Value,
        owner: Customer,
        taken: crate::store::SyncLink,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let other = taken.remote_id.unwrap_or_default();
        let what = format!(
            "the email {} belongs to customer {}, already linked to {} record {other}",
            owner.email,
            owner.id.as_str(),
            event.connector
        );
        let policy = self.duplicate_email_policy(&event.connector);
        // Flagging or merging touches the owner's link: while a conflict
        // holds it, the event waits for the person too (a merge moved the
        // held link to this record, and a second conflict took its hold).
        if matches!(policy, DuplicateEmail::Flag | DuplicateEmail::Merge) {
            if let Some(held_by) = taken.held_by.as_deref() {
                return self.held(event, held_by).await;
            }
        }
        let (customer, link_customer, link_remote, detail, conflict) = match policy {
            DuplicateEmail::Reject => {
                return Err(Failure::Permanent(format!(
                    "{what}; duplicate_email policy is reject"
                )))
            }
            DuplicateEmail::Flag => {
                let conflict = NewConflict {
                    policy: "duplicate_email".to_owned(),
                    fields: serde_json::json!([{
                        "field": "email",
                        "base": null,
                        "local": owner.email,
                        "remote": owner.email,
                        "resolution": Resolution::Pending,
                        "detail": format!("{} record {} has this email too: {what}", event.connector, event.remote_id),
                    }]),
                    open: true,
                };
                // The record stays unlinked; the owner's link waits for
                // a person.
                (
                    CustomerWrite::None,
                    Some(owner.id.clone()),
                    false,
                    format!("flagged: {what}"),
                    Some(conflict),
                )
            }
            DuplicateEmail::Merge => {
                // The record a merge took the owner's link from: merged
                // again, it took the link back and its old values
                // overwrote the customer's, and the other record took it
                // back at its next event. Which of the two is the
                // customer's is a person's (a reconciliation reports it,
                // and the person's choice, an event of the run, merges:
                // the marker then names the other record).
                if event.remote_type != RECONCILIATION
                    && self
                        .inner
                        .store
                        .released_by_merge(owner.id.as_str(), &event.connector, &event.remote_id)
                        .await?
                {
                    let reason = format!(
                        "a merge gave this record's link to {} record {other}: {what}",
                        event.connector
                    );
                    return self.skip(event, &reason).await;
                }
                // The record now stands for the owner: it takes the
                // owner's link, first-sync rules (no snapshot).
                return self
                    .merge_first_sync(
                        event,
                        None,
                        remote,
                        owner,
                        Relink {
                            from: None,
                            replaces: Some(other.clone()),
                        },
                        &format!("relinked from {} record {other}: {what}", event.connector),
                    )
                    .await;
            }
            DuplicateEmail::AutoRename => {
                let mut fields = fields_of(&remote).map_err(Failure::Permanent)?;
                fields.email = checked_rename(&fields.email, &event.connector, &event.remote_id)?;
                let detail = format!(
                    "created with the email rewritten to {}: {what}",
                    fields.email
                );
                (CustomerWrite::Create(fields), None, true, detail, None)
            }
        };
        self.write(InboundChange {
            event: event.clone(),
            // Only a record no link holds is a duplicate.
            link_read: None,
            customer,
            link_customer,
            unlink_customer: None,
            releases: None,
            link_remote,
            snapshot: Some(remote),
            remote_has_result: true,
            push_back: None,
            detail: Some(detail),
            conflict,
        })
        .await
    }

    /// Links `event`'s record to `customer` as a first sync (no snapshot:
    /// the fields the remote sets differently follow the conflict policy);
    /// `link_read` is the record's link as the decision read it.
    async fn merge_first_sync(
        &self,
        event: &InboxEvent,
        link_read: Option<LinkRead>,
        remote: serde_json::Value,
        customer: Customer,
        relink: Relink,
        detail: &str,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let inner = &self.inner;
        let policy = self.event_policy(event);
        let local = local_record(&customer)?;
        let merged = merge_owned(
            Sides {
                base: None,
                local: &local,
                remote: &remote,
                local_changed_at_ms: customer.updated_at.timestamp_millis(),
                remote_changed_at_ms: event.occurred_at_ms,
            },
            policy,
            &inner.field_owners,
            &event.connector,
        );
        let fields = fields_for(&merged.merged, &customer.email).map_err(Failure::Permanent)?;
        let change = if merged.changes_local(&local) {
            CustomerWrite::Update {
                id: customer.id.clone(),
                expected_version: customer.version,
                fields,
            }
        } else {
            CustomerWrite::None
        };
        let fills_gaps = fills_gaps(event, &merged, &remote);
        let push_back = (matches!(change, CustomerWrite::None)
            && (merged.remote_needs_push() || fills_gaps))
            .then_some(customer.version);
        // The fields both sides set differently are recorded as on any
        // merge; under the `flag` policy they wait for a person (before,
        // the local values were kept silently and pushed over the remote's).
        let conflict = (!merged.conflicts.is_empty()).then(|| NewConflict {
            policy: policy_name(policy),
            fields: serde_json::to_value(&merged.conflicts).unwrap_or_default(),
            open: merged.has_pending_conflicts(),
        });
        self.write(InboundChange {
            event: event.clone(),
            link_read,
            customer: change,
            link_customer: Some(customer.id.clone()),
            unlink_customer: relink.from,
            releases: relink.replaces,
            link_remote: true,
            snapshot: Some(remote),
            remote_has_result: !merged.remote_needs_push()
                && !merged.has_pending_conflicts()
                && !fills_gaps,
            push_back,
            detail: Some(detail.to_owned()),
            conflict,
        })
        .await
    }

    /// The conflict policy `event` is applied with: its own (a
    /// reconciliation's `pull_remote`), else the configured one.
    fn event_policy(&self, event: &InboxEvent) -> ConflictPolicy {
        event
            .policy
            .as_deref()
            .and_then(|p| serde_json::from_value(serde_json::Value::from(p)).ok())
            .unwrap_or(self.inner.conflict_policy)
    }

    /// The duplicate-email policy for records from `connector`.
    pub(super) fn duplicate_email_policy(&self, connector: &str) -> DuplicateEmail {
        self.inner
            .duplicate_email_by_connector
            .get(connector)
            .copied()
            .unwrap_or(self.inner.duplicate_email)
    }

    /// A live customer other than `except` with `email`.
    async fn other_customer_with(
        &self,
        email: &str,
        except: &CustomerId,
    ) -> Result<Option<Customer>, Failure> {
        let page = self
            .inner
            .store
            .list_customers(&ListCustomers {
                limit: 1,
                starting_after: None,
                email: Some(email.to_owned()),
            })
            .await?;
        Ok(page.data.into_iter().find(|c| &c.id != except))
    }

    async fn apply_delete(
        &self,
        event: &InboxEvent,
        link: Option<crate::store::SyncLink>,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let link = match link {
            Some(link) => link,
            None => {
                // An earlier event of the record (its create) may be in
                // another loop's hands, past its own look for this delete
                // and about to link it: skipped now, the delete was lost
                // and the record lived on as a customer. The delete waits
                // for it (until it is due, if it waits for a retry), and
                // for any upsert of the record stored after it (numbered
                // later, it may have committed first).
                if let Some(due) = self
                    .inner
                    .store
                    .inbox_awaited_by_delete(&event.connector, &event.remote_id, event.seq)
                    .await?
                {
                    let until_due = u64::try_from(due - now_ms()).unwrap_or(0);
                    return Err(Failure::Wait(
                        "another event of this record is not applied yet".into(),
                        EARLIER_EVENT_WAIT.max(Duration::from_millis(until_due)),
                    ));
                }
                // Read again: that event may have been applied since the
                // link was read (its link and its state commit together,
                // so the look above saw it applied, and this one sees its
                // link). A link found now decides again, from the top: a
                // newer event another loop applied meanwhile (an undelete)
                // made it, and this delete is stale, or held behind a
                // conflict. Taken as it was, the delete went past both
                // checks and deleted what the newer event made.
                match self
                    .inner
                    .store
                    .link_by_remote_id(&event.connector, &event.remote_id)
                    .await?
                {
                    Some(_) => return Ok(None),
                    None => {
                        return self
                            .skip(event, "delete of a remote record ferry never linked")
                            .await
                    }
                }
            }
        };
        if link.remote_deleted {
            return self
                .skip(event, "echo: ferry deleted this remote record")
                .await;
        }
        let customer_id = CustomerId::parse(&link.customer_id)
            .ok_or_else(|| Failure::Permanent("the link names an invalid customer id".into()))?;
        let (customer, detail) = match self.inner.delete_policy {
            DeletePolicy::Ignore => {
                return self
                    .skip(event, "remote deletes are ignored (policy)")
                    .await
            }
            DeletePolicy::Unlink => (CustomerWrite::None, "unlinked (policy)"),
            DeletePolicy::SoftDelete => {
                match self.inner.store.get_customer_any(&link.customer_id).await? {
                    Some(c) if c.deleted_at.is_none() => (
                        CustomerWrite::Delete {
                            id: customer_id.clone(),
                            expected_version: c.version,
                        },
                        "deleted locally",
                    ),
                    _ => return self.skip(event, "the customer is already deleted").await,
                }
            }
        };
        self.write(InboundChange {
            event: event.clone(),
            link_read: Some(LinkRead::from(&link)),
            customer,
            link_customer: Some(customer_id),
            unlink_customer: None,
            releases: None,
            link_remote: true,
            snapshot: None,
            remote_has_result: true,
            push_back: None,
            detail: Some(detail.into()),
            conflict: None,
        })
        .await
    }

    /// Writes a decided change through the apply group commit.
    async fn write(&self, change: InboundChange) -> Result<Option<InboundOutcome>, Failure> {
        let link_customer = change.link_customer.clone();
        let detail = change.detail.clone();
        let applied = self.inner.inbound_applies.submit(change).await;
        match applied.and_then(|result| result) {
            Ok(Applied::Done(customer)) => {
                let customer_id = customer
                    .map(|c| c.id.as_str().to_owned())
                    .or_else(|| link_customer.map(|c| c.as_str().to_owned()))
                    .unwrap_or_default();
                tracing::info!(
                    customer_id,
                    detail = detail.as_deref().unwrap_or(""),
                    "inbound change applied"
                );
                // The outbox event fans the change out to the other connectors.
                self.inner.store.committed_links();
                Ok(Some(InboundOutcome::Applied { customer_id }))
            }
            Ok(Applied::Raced) => Ok(None),
            Ok(Applied::LeaseLost) => Ok(Some(InboundOutcome::LeaseLost)),
            Err(StoreError::EmailTaken) => Ok(None),
            // The decision found no link holding this remote record, and
            // one holds it now: another loop linked it meanwhile (two
            // events of one new record, in two claims). Deciding again
            // finds that link.
            Err(StoreError::RemoteIdTaken) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// `customer`'s link of `event`'s connector if it holds a live record
    /// other than `event`'s, and the open conflict holding that link,
    /// whatever its record.
    async fn owners_link(
        &self,
        customer: &CustomerId,
        event: &InboxEvent,
    ) -> Result<(Option<crate::store::SyncLink>, Option<String>), Failure> {
        let links = self.inner.store.links_of(customer.as_str()).await?;
        let own = links.into_iter().find(|l| l.connector == event.connector);
        let held_by = own.as_ref().and_then(|l| l.held_by.clone());
        let taken = own.filter(|l| {
            !l.remote_deleted && l.remote_id.as_deref().is_some_and(|r| r != event.remote_id)
        });
        Ok((taken, held_by))
    }

    async fn customer_by_email(
        &self,
        remote: &serde_json::Value,
    ) -> Result<Option<Customer>, Failure> {
        let Ok(fields) = fields_of(remote) else {
            return Ok(None);
        };
        let page = self
            .inner
            .store
            .list_customers(&ListCustomers {
                limit: 1,
                starting_after: None,
                email: Some(fields.email),
            })
            .await?;
        Ok(page.data.into_iter().next())
    }

    /// `event`'s connector as loaded here, to read its record with. Accepted
    /// while the connector was enabled, the event is finished even if the
    /// connector was disabled since. Not loaded on this replica (yet), or
    /// its settings missing here: a wait without spending an attempt
    /// (another replica, or this one's next load, reads it). Deleted (read
    /// again to tell, a failed read telling nothing): a skip, since no
    /// version will ever read it.
    async fn readable(&self, event: &InboxEvent) -> Result<Ready, Failure> {
        let registry = &self.inner.registry;
        let why = match registry.loaded(&event.connector) {
            Ok(ready) => return Ok(ready),
            Err(why) => why,
        };
        if !matches!(why, NotReady::Incomplete(_)) && registry.entry(&event.connector).is_none() {
            if let Err(error) = registry.refresh().await {
                return Err(Failure::Wait(
                    format!("waiting: the connectors could not be read: {error}"),
                    NOT_LOADED_RECHECK,
                ));
            }
            if registry.entry(&event.connector).is_none() {
                return Err(Failure::Skip("the connector was deleted".into()));
            }
        }
        let why = match why {
            NotReady::Incomplete(_) => why.to_string(),
            _ => "no version of the connector is loaded here".to_owned(),
        };
        Err(Failure::Wait(format!("waiting: {why}"), NOT_LOADED_RECHECK))
    }

    /// The record as the remote holds it now; `None` if the connector does
    /// not implement `fetch`.
    ///
    /// `link_deleted`: the record's link says its remote delete was
    /// applied already. `known`: ferry links the record, or made it.
    async fn fetch_current(
        &self,
        event: &InboxEvent,
        link_deleted: bool,
        known: bool,
    ) -> Result<Option<serde_json::Value>, Failure> {
        let ready = self.readable(event).await?;
        match self.fetch_guarded(event, &ready).await? {
            Ok(remote) => {
                // Not JSON, or no object (`null` or `[]` would read as a
                // record whose every field the remote cleared, as a
                // delivery's is refused).
                let mut record = match serde_json::from_str::<serde_json::Value>(&remote.record) {
                    Ok(record) if record.is_object() => record,
                    _ => {
                        return Err(Failure::Permanent(
                            ferry_runtime::record_problem(&remote.record).unwrap_or_default(),
                        ))
                    }
                };
                crate::store::replace_nul(&mut record);
                Ok(Some(record))
            }
            Err(CallError::Connector(ConnectorError::Unsupported(_))) => Ok(None),
            // Gone since the event was sent: an event that carried the
            // record was looked up again only because its order was in
            // doubt, and the record's delete (which the remote sends) is
            // the change that decides; nothing is left to apply or retry.
            Err(CallError::Connector(ConnectorError::NotFound(_))) => {
                // A thin event says only "look again". Its record's delete
                // decides, if the remote sent one: applied on the link, or
                // in the inbox at all (a record never linked, a delete the
                // policy ignores; thin events are dated on arrival, so a
                // date tells nothing). One the remote may not have
                // delivered yet (Stripe's) is waited for: the event is
                // retried. A connector that sends none (Salesforce's
                // Outbound Messages) has nothing else to say it: a dead
                // letter for a person once the attempts are spent.
                // A record ferry never knew that is gone leaves nothing to
                // do, delete or not: waiting for its delete only read it
                // again and again (a forged Outbound Message naming records
                // at random cost the org's API that many reads each).
                if !known {
                    return Err(Failure::Skip(
                        "the remote record no longer exists, and nothing here links it".into(),
                    ));
                }
                let deleted = event.record.is_some()
                    || link_deleted
                    || self
                        .inner
                        .store
                        .remote_deleted_since(&event.connector, &event.remote_id, i64::MIN)
                        .await?;
                Err(if deleted {
                    Failure::Skip("the remote record no longer exists: its delete decides".into())
                } else {
                    Failure::Missing(
                        "the remote record no longer exists (its delete, if the remote sends \
                         one, may not be here yet)"
                            .into(),
                    )
                })
            }
            Err(error) => Err(self.read_failed(event, error)),
        }
    }

    /// Reads `event`'s record as a push calls its remote: not while the
    /// connector's breaker is open or its remote asked for a pause (the
    /// event waits, spending no attempt), and each answer tells the
    /// breaker what it says of the remote. Without it, a remote down for
    /// minutes dead-lettered every event that needed a read meanwhile
    /// (Salesforce's, by default), each attempt a call timeout of an inbox
    /// loop's time.
    async fn fetch_guarded(
        &self,
        event: &InboxEvent,
        ready: &Ready,
    ) -> Result<Result<crate::runtime::RemoteRecord, CallError>, Failure> {
        let breakers = &self.inner.breakers;
        let pass = breakers.allow(&event.connector).map_err(|deferred| {
            Failure::Wait(
                "the connector's remote is failing (circuit breaker open); read again after \
                 its cool-down"
                    .into(),
                // Behind a probe: looked at again each second (nothing
                // releases an inbox event when the probe succeeds).
                if deferred.1 {
                    deferred.0.min(Duration::from_secs(1))
                } else {
                    deferred.0
                },
            )
        })?;
        let fetched = ready
            .connector
            .fetch(&ready.config, super::ENTITY, &event.remote_id)
            .await;
        match &fetched {
            // The remote answered: it is up.
            Ok(_)
            | Err(CallError::Connector(
                ConnectorError::NotFound(_)
                | ConnectorError::Permanent(_)
                | ConnectorError::Unauthorized(_),
            )) => self.answered(&event.connector),
            // Nothing said of the remote: the connector's own answer, a
            // rate limit (its pause is set by `read_failed`), ferry's
            // pacing.
            Err(
                CallError::Connector(
                    ConnectorError::Unsupported(_)
                    | ConnectorError::RateLimited(_)
                    | ConnectorError::InvalidSignature(_),
                )
                | CallError::ServerFailed(ConnectorError::RateLimited(_))
                | CallError::Throttled { .. },
            ) => breakers.unused(&event.connector, pass),
            // A timeout, a 5xx, a refused connection; a guest that trapped
            // (as a push's, the attempt budget ends it).
            Err(_) => breakers.failure(&event.connector),
        }
        Ok(fetched)
    }

    /// What a failed read of `event`'s record (but a "not found" or a
    /// `fetch` the connector lacks) makes of the event.
    fn read_failed(&self, event: &InboxEvent, error: CallError) -> Failure {
        match error {
            // ferry's own pacing, not the remote: a read waits for the next
            // slot without spending an attempt.
            error @ CallError::Throttled { wait, .. } => Failure::Wait(error.to_string(), wait),
            // The remote is up and says "later": no attempt spent (a bulk
            // edit's thin events, read back one by one, were dead-lettered
            // healthy), and the connector's pushes pause with them.
            CallError::Connector(ConnectorError::RateLimited(limit))
            | CallError::ServerFailed(ConnectorError::RateLimited(limit)) => {
                let wait = super::retry::rate_limited_read_wait(limit.retry_after_ms);
                self.inner.breakers.pause(&event.connector, wait);
                Failure::Wait(format!("rate limited: {}", limit.message), wait)
            }
            CallError::Connector(ConnectorError::Permanent(m)) => Failure::Permanent(m),
            // Its own kind, as a push's: replayed with the others once the
            // credentials are mended.
            CallError::Connector(ConnectorError::Unauthorized(m)) => Failure::Unauthorized(m),
            error => Failure::Retry(error.to_string()),
        }
    }

    /// Whether `event`, a thin delete that looks older than what was
    /// applied, is the delete all the same: the remote no longer has its
    /// record. Thin events are dated on arrival (by the database's clock
    /// now, and before that by the replica's own: one a second behind
    /// another's took the delete for stale, and the link stayed live, every
    /// later push a `not_found` dead letter); events dated by a remote's
    /// clock are compared with them too. A delete with its record, or an
    /// upsert, is dated by the remote, and is as old as it looks, unless
    /// dated in whole seconds within a tick of the last applied change
    /// (`in_a_tick`, see [`REMOTE_TICK_MS`]): a thin event applied before
    /// it, dated on arrival, made a delete in the same second look stale.
    /// The record there, a connector without `fetch`, or one deleted,
    /// leave it as stale as it looks; a read that failed, or a connector
    /// not loaded here ([`Self::readable`]), is the event's failure or
    /// wait: not a skip, which lost the delete.
    async fn gone_after_all(&self, event: &InboxEvent, in_a_tick: bool) -> Result<bool, Failure> {
        if event.kind != RemoteChange::Delete || (event.record.is_some() && !in_a_tick) {
            return Ok(false);
        }
        match self.record_there(event).await {
            Ok(there) => Ok(there == Some(false)),
            // Deleted: nothing will ever say; as stale as it looks.
            Err(Failure::Skip(_)) => Ok(false),
            Err(failure) => Err(failure),
        }
    }

    /// Whether the remote has `event`'s record now, read with `fetch`;
    /// `None` for a connector without it. A connector deleted or not
    /// loaded here, or a read that failed, is the event's skip, wait or
    /// failure ([`Self::readable`], [`Self::read_failed`]).
    async fn record_there(&self, event: &InboxEvent) -> Result<Option<bool>, Failure> {
        let ready = self.readable(event).await?;
        match self.fetch_guarded(event, &ready).await? {
            Ok(_) => Ok(Some(true)),
            Err(CallError::Connector(ConnectorError::NotFound(_))) => Ok(Some(false)),
            Err(CallError::Connector(ConnectorError::Unsupported(_))) => Ok(None),
            Err(error) => Err(self.read_failed(event, error)),
        }
    }

    /// Parks an event behind the open conflict holding its link, without
    /// spending an attempt, until a person resolves the conflict (which
    /// wakes it); looked at again every minute meanwhile.
    async fn held(
        &self,
        event: &InboxEvent,
        conflict: &str,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let at_ms = now_ms() + HELD_RECHECK_MS;
        let finish = InboxFinish::Held { conflict, at_ms };
        Ok(Some(
            if self.inner.store.finish_inbox(event, finish).await? {
                InboundOutcome::Deferred
            } else {
                InboundOutcome::LeaseLost
            },
        ))
    }

    async fn inbound_failed(&self, event: &InboxEvent, failure: Failure) -> InboundOutcome {
        let attempt = u32::try_from(event.attempts + 1).unwrap_or(u32::MAX);
        let (detail, retry_at, dead) = match failure {
            Failure::Wait(detail, after) => {
                let at_ms =
                    now_ms().saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
                let finish = InboxFinish::Deferred {
                    detail: &detail,
                    at_ms,
                };
                return match self.inner.store.finish_inbox(event, finish).await {
                    Ok(true) => InboundOutcome::Deferred,
                    Ok(false) => InboundOutcome::LeaseLost,
                    Err(error) => {
                        tracing::error!(
                            error = format!("{:#}", anyhow::Error::from(error)),
                            "could not defer an inbound event; retried when the lease expires"
                        );
                        InboundOutcome::LeaseLost
                    }
                };
            }
            Failure::Skip(reason) => {
                return match self.skip(event, &reason).await {
                    Ok(Some(outcome)) => outcome,
                    Ok(None) | Err(_) => InboundOutcome::LeaseLost,
                };
            }
            Failure::Permanent(message) => (message, None, Some(DeadLetterKind::Permanent)),
            Failure::Unauthorized(message) => (
                format!("unauthorized: {message}"),
                None,
                Some(DeadLetterKind::Unauthorized),
            ),
            Failure::Retry(message) | Failure::Missing(message)
                if self.inner.policy.exhausted(attempt) =>
            {
                (
                    format!("gave up after {attempt} attempts: {message}"),
                    None,
                    Some(DeadLetterKind::RetriesExhausted),
                )
            }
            Failure::Retry(message) | Failure::Missing(message) => {
                let delay = self.inner.policy.delay(attempt, None);
                let at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                (message, Some(at), None)
            }
        };
        let finish = match (dead, retry_at) {
            (Some(kind), _) => InboxFinish::Dead {
                error: &detail,
                kind,
            },
            (None, at_ms) => InboxFinish::Retry {
                error: &detail,
                at_ms: at_ms.unwrap_or_else(now_ms),
            },
        };
        tracing::warn!(dead = dead.is_some(), detail, "inbound event failed");
        match self.inner.store.finish_inbox(event, finish).await {
            Ok(true) if dead.is_some() => InboundOutcome::DeadLettered { reason: detail },
            Ok(true) => {
                self.observe(
                    &event.connector,
                    "inbound",
                    "retry_scheduled",
                    Some(&detail),
                );
                InboundOutcome::RetryScheduled
            }
            Ok(false) => InboundOutcome::LeaseLost,
            Err(error) => {
                tracing::error!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "could not record an inbound failure; retried when the lease expires"
                );
                InboundOutcome::LeaseLost
            }
        }
    }
}

/// Why an inbound step failed.
enum Failure {
    /// Try again later (store or remote unavailable).
    Retry(String),
    /// The remote no longer has the record, and no delete of it is here
    /// (yet): tried again later, as [`Failure::Retry`] is.
    Missing(String),
    /// Try again after the wait, spending no attempt: the connector is not
    /// loaded on this replica, or ferry's own rate limit refused a request.
    Wait(String, Duration),
    /// Will never work as it is: dead letter.
    Permanent(String),
    /// The remote refused the connector's credentials: dead letter of
    /// that kind (replayed once they are mended).
    Unauthorized(String),
    /// Nothing left to apply it with (its connector was deleted): skipped
    /// with the reason.
    Skip(String),
}

impl From<StoreError> for Failure {
    /// A write that met other writers (a deadlock's victim, no connection
    /// free) wrote nothing and says "later": no attempt is spent, as for a
    /// remote's 429. Deadlocks between two groups came back each time, and
    /// their events were dead-lettered healthy. A lock or statement
    /// timeout may come every time: it spends one.
    fn from(error: StoreError) -> Self {
        let busy = error.passes();
        let message = format!("store: {:#}", anyhow::Error::from(error));
        if busy {
            Self::Wait(message, STORE_BUSY_WAIT)
        } else {
            Self::Retry(message)
        }
    }
}

/// The policies inbound sync applies.
#[derive(Debug, Clone)]
pub struct InboundPolicies {
    /// Remote deletes.
    pub delete: DeletePolicy,
    /// Fields changed differently on both sides.
    pub conflict: ConflictPolicy,
    /// Fields a system owns: its value wins.
    pub field_owners: FieldOwners,
    /// A remote record whose email belongs to another customer, by default.
    pub duplicate_email: DuplicateEmail,
    /// The same, per connector.
    pub duplicate_email_by_connector: BTreeMap<String, DuplicateEmail>,
}

/// What ferry does with a remote record whose email belongs to another live
/// customer (emails are unique among live customers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateEmail {
    /// Dead-letter the event, naming the customer that has the email.
    #[default]
    Reject,
    /// Keep the local email and open a conflict on `email` for a person.
    Flag,
    /// Link the remote record to the customer that has the email instead
    /// (its old customer loses the link).
    Merge,
    /// Keep both: the incoming email is rewritten to
    /// `local+dup-CONNECTOR-REMOTEID@domain` locally.
    AutoRename,
}

/// Whether a first sync of `event` (no snapshot) pushes ferry's values of
/// the fields `remote` leaves empty, which the merge kept: both sides then
/// hold the union. Not for a `pull_remote` repair's event, which makes ferry
/// match the remote and writes nothing there.
fn fills_gaps(
    event: &InboxEvent,
    merged: &super::merge::Merge,
    remote: &serde_json::Value,
) -> bool {
    let pulls =
        event.remote_type == RECONCILIATION && event.policy.as_deref() == Some("prefer_remote");
    !pulls && merged.fills_remote_gaps(remote)
}

/// A policy's name as stored with a conflict.
fn policy_name(policy: ConflictPolicy) -> String {
    serde_json::to_value(policy)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The rewrite [`DuplicateEmail::AutoRename`] gives `email` for the record
/// `remote_id` of `connector`: a plus-address on the same domain, so it
/// stays deliverable on most mail servers and says where it came from.
/// It stays an address the API accepts (a local part of 64 characters at
/// most), or a later PATCH of the customer would be refused for an email
/// its client never sent: a tag too long becomes a short hash of it, and
/// a local part too long for even that is cut.
pub fn renamed_email(email: &str, connector: &str, remote_id: &str) -> String {
    const MAX_LOCAL: usize = 64;
    let (local, domain) = match email.rsplit_once('@') {
        Some((local, domain)) => (local, Some(domain)),
        None => (email, None),
    };
    // Within the whole address's bound too: a long domain left a local
    // part of 64 bytes making an address the API refuses.
    let max_local = domain.map_or(MAX_LOCAL, |domain| {
        MAX_LOCAL.min(crate::runtime::customer::MAX_EMAIL.saturating_sub(1 + domain.len()))
    });
    let mut tag = email_tag(connector, remote_id);
    if local.len() + 1 + tag.len() > max_local {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{connector}\0{remote_id}"));
        tag = format!("dup-{}", &hex::encode(digest)[..12]);
    }
    let mut keep = max_local.saturating_sub(1 + tag.len()).min(local.len());
    while !local.is_char_boundary(keep) {
        keep -= 1;
    }
    let local = local[..keep].trim_end_matches('.');
    match domain {
        Some(domain) => format!("{local}+{tag}@{domain}"),
        None => format!("{local}+{tag}"),
    }
}

/// [`renamed_email`], refused when no rewrite of it fits an address's
/// 254 bytes (a domain of more than 236): stored, it was an email the API
/// refuses.
fn checked_rename(email: &str, connector: &str, remote_id: &str) -> Result<String, Failure> {
    let renamed = renamed_email(email, connector, remote_id);
    if renamed.len() > crate::runtime::customer::MAX_EMAIL {
        return Err(Failure::Permanent(format!(
            "the email {email} cannot be rewritten apart within {} bytes (duplicate_email policy auto_rename)",
            crate::runtime::customer::MAX_EMAIL
        )));
    }
    Ok(renamed)
}

/// `dup-{connector}-{remote_id}`, in the characters a local part takes.
fn email_tag(connector: &str, remote_id: &str) -> String {
    format!("dup-{connector}-{remote_id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long domain shortens the local part so the whole address stays
    /// within 254 bytes; one too long for any rewrite is refused.
    #[test]
    fn a_renamed_email_fits_the_whole_address() {
        let labels = |n: usize| vec!["d".repeat(50); n].join(".");
        let domain = format!("{}.example.com", labels(4));
        let email = format!("{}@{domain}", "a".repeat(35));
        let renamed = renamed_email(&email, "stripe", "cus_1");
        assert!(
            renamed.len() <= crate::runtime::customer::MAX_EMAIL,
            "{renamed}"
        );
        assert!(
            crate::runtime::customer::is_valid_email(&renamed),
            "{renamed}"
        );
        assert_ne!(renamed, renamed_email(&email, "stripe", "cus_2"));
        let longer = format!("a@{}.example.com", labels(5));
        assert!(checked_rename(&longer, "stripe", "cus_1").is_err());
    }

    /// A renamed address stays one the API accepts, however long the
    /// remote's local part or id.
    #[test]
    fn a_renamed_email_stays_valid() {
        assert_eq!(
            renamed_email("ada@example.com", "stripe", "cus_1"),
            "ada+dup-stripe-cus_1@example.com"
        );
        let long_local = format!("{}@example.com", "a".repeat(50));
        let long_id = format!("cus_{}", "x".repeat(60));
        for (email, id) in [
            (long_local.as_str(), "cus_1"),
            ("ada@example.com", long_id.as_str()),
            (
                &*format!("{}@example.com", "b".repeat(64)),
                long_id.as_str(),
            ),
        ] {
            let renamed = renamed_email(email, "stripe", id);
            assert!(crate::api::customers::is_valid_email(&renamed), "{renamed}");
            assert_ne!(renamed, email);
        }
        assert_ne!(
            renamed_email(&long_local, "stripe", "cus_1"),
            renamed_email(&long_local, "stripe", "cus_2"),
            "still one address per record"
        );
    }

    #[test]
    fn a_claim_starts_where_the_last_one_did_and_sweeps_once_a_second() {
        let mut floor = ClaimFloor::default();
        let now = 1_700_000_000_000;
        assert_eq!(floor.next(now), i64::MIN, "the first claim reads it all");
        floor.claimed(now - 40);
        let from = now - 40 - CLAIM_FLOOR_MARGIN_MS;
        assert_eq!(floor.next(now + 10), from);
        // An empty claim leaves the floor where it was.
        assert_eq!(floor.next(now + 500), from);
        floor.claimed(now + 400);
        let from = now + 400 - CLAIM_FLOOR_MARGIN_MS;
        assert_eq!(floor.next(now + CLAIM_SWEEP_EVERY_MS - 1), from);
        assert_eq!(floor.next(now + CLAIM_SWEEP_EVERY_MS), i64::MIN);
        assert_eq!(floor.next(now + CLAIM_SWEEP_EVERY_MS + 1), from);
        // The clock stepped back ten minutes: a sweep, not a floor past
        // now until the clock catches up.
        let back = now - 600_000;
        assert_eq!(floor.next(back), i64::MIN);
        assert_eq!(
            floor.next(back + 1),
            i64::MIN,
            "nothing claimed: from the start"
        );
        floor.claimed(back - 5);
        assert_eq!(floor.next(back + 1), back - 5 - CLAIM_FLOOR_MARGIN_MS);
    }

    #[test]
    fn a_catch_up_loop_holds_back_only_while_the_endpoint_is_busy_and_the_backlog_young() {
        let now = 1_000_000;
        let after = 10_000;
        // Events stored 10 ms ago, the oldest claimed one 2 s old: hold back.
        assert!(hold_back(now, now - 10, now - 2_000, after));
        // The endpoint quiet for longer than it counts as busy: apply.
        assert!(!hold_back(now, now - ENDPOINT_BUSY_MS, now - 2_000, after));
        // Never stored anything: apply.
        assert!(!hold_back(now, 0, now - 2_000, after));
        // Busy, but the backlog is as old as allowed: apply.
        assert!(!hold_back(now, now - 10, now - after, after));
        // Nothing claimed yet (0): the backlog's age is unknown, apply.
        assert!(!hold_back(now, now - 10, 0, after));
        // Zero turns holding back off.
        assert!(!hold_back(now, now - 10, now - 2_000, 0));
    }
}
