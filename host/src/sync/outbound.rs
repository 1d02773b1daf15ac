//! One outbound step: given a claimed link, decide what to push, push it
//! through the connector, and classify what happened.
//!
//! The step reads the *current* customer, never an event's payload, so a
//! retried or reordered event cannot push stale data, and a version already
//! synced is a no-op. The only exception is a create whose outcome is
//! unknown (it timed out): that exact request is replayed with the same
//! idempotency key first, so the remote can answer with the record it
//! already created instead of making a second one.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::breaker::{Deferred, Pass};
use super::inbound::kept_apart;
use super::retry::RetryPolicy;
use super::SyncEngine;
use crate::api::customers::normalise_email;
use crate::registry::{Need, NotReady};
use crate::runtime::{CallError, ConnectorError, Operation, PushRequest};
use crate::store::links::LinkWrite;
use crate::store::{now_ms, DeadLetterKind, StoreError};
use crate::store::{Address, Customer, RecordedOutcome, SyncLink};

/// The entity type ferry syncs today.
pub const ENTITY: &str = "customer";

/// How often a push waiting for a disabled connector looks again (enabling
/// the connector resumes its pushes at once; this is the fallback).
const PAUSED_RECHECK: Duration = Duration::from_secs(60);

/// What a claim's lease must have left beyond a call's timeout for a push
/// to start (clocks of replicas apart, the create marker's write); the
/// configuration keeps leases a second longer than a call at least.
const LEASE_MARGIN_MS: i64 = 500;

/// How soon a push looks again when this replica has no loaded version of
/// its connector.
const NOT_LOADED_RECHECK: Duration = Duration::from_secs(5);

/// How soon a create held back by a backfill of its connector looks again
/// (the run resumes it when it has classified and when it ends; this is the
/// fallback). Not due meanwhile, so the run's back-pressure does not count it.
const BACKFILL_RECHECK: Duration = Duration::from_secs(60);

/// How long a push waits, at least, when ferry's own store was too busy to
/// prepare it (up to five times as long, at random).
const STORE_BUSY_WAIT: Duration = Duration::from_secs(1);

/// What a failed push spends of its attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spend {
    /// One attempt: the remote failed.
    Attempt,
    /// None: the remote (or ferry's pacing, after part of the call went
    /// out) said "later" with a rate limit.
    Nothing,
}

/// Waits `after` without spending an attempt or writing a delivery.
fn deferred(after: Duration) -> (RecordedOutcome, Outcome) {
    (wait(after, None), Outcome::Deferred)
}

/// Waits `after` for what `waits_for` says (kept on the link, so the
/// customer's sync status shows it), spending no attempt.
fn wait(after: Duration, waits_for: Option<&'static str>) -> RecordedOutcome {
    let at_ms = now_ms().saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
    RecordedOutcome::Deferred { at_ms, waits_for }
}

/// The typed outcome of one step, as a test or a log sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The remote accepted the push.
    Delivered {
        /// `create`, `update` or `delete`.
        operation: String,
        /// The remote id.
        remote_id: String,
    },
    /// Nothing needed pushing.
    Skipped {
        /// Why.
        reason: String,
    },
    /// Failed; another attempt is scheduled.
    RetryScheduled {
        /// The attempt that failed (1-based).
        attempt: i32,
        /// When the next one is due, unix ms.
        at_ms: i64,
    },
    /// The breaker is open, or the claim's lease could not outlast a call;
    /// the link waits without spending an attempt.
    Deferred,
    /// The connector is disabled (or not configured on this replica); the
    /// link waits, without spending an attempt, until it is enabled.
    Paused,
    /// Given up: see the dead letter.
    DeadLettered {
        /// Why.
        reason: String,
    },
    /// Another worker took the link over (our lease expired).
    LeaseLost,
}

/// The idempotency key of pushing `customer_id` at `version` to `connector`
/// (the runtime's, which the SDK's test kit sends too). A push a repair
/// forced (`repairs` > 0: the remote drifted from a version it was already
/// pushed) gets a key of its own, or the remote would answer it with its
/// saved answer to the earlier push and change nothing.
pub use ferry_runtime::idempotency_key;

/// Whether `key` is one [`idempotency_key`] made for `connector`. The
/// customer id after the name tells `stripe` from `stripe-eu`: connector
/// names have no `_`, customer ids start with `cus_`.
pub fn is_own_key(connector: &str, key: &str) -> bool {
    key_parts(connector, key).is_some()
}

/// The customer and version of a key [`idempotency_key`] made for
/// `connector`.
pub fn key_parts(connector: &str, key: &str) -> Option<(crate::store::CustomerId, i64)> {
    let rest = key
        .strip_prefix("ferry-")?
        .strip_prefix(connector)?
        .strip_prefix('-')?;
    let customer = crate::store::CustomerId::parse(rest.get(..crate::store::CustomerId::LEN)?)?;
    let version = rest[crate::store::CustomerId::LEN..].strip_prefix("-v")?;
    // `-r{n}` (a forced push), `-u{hash}` (an update) follow.
    let version = version.split('-').next()?;
    Some((customer, version.parse().ok()?))
}

/// The canonical record ferry sends (docs/connector-contract.md), from a
/// customer as serialised. The claims that mark a create build the same
/// fields in SQL (`mark_create!` in store/links.rs).
pub fn canonical_record(customer: &serde_json::Value) -> serde_json::Value {
    let mut record = serde_json::Map::new();
    for field in ["id", "name", "email", "phone", "address", "metadata"] {
        if let Some(value) = customer.get(field) {
            record.insert(field.to_owned(), value.clone());
        }
    }
    serde_json::Value::Object(record)
}

/// The canonical record's fields, typed, in the order
/// [`canonical_record`] writes them.
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    name: Option<String>,
    email: String,
    phone: Option<String>,
    address: Option<Address>,
    metadata: BTreeMap<String, String>,
}

/// The text of a record kept on a link (a create's, see
/// [`SyncLink::pending_record`]), exactly as the create sent it. Read
/// through the typed fields: PostgreSQL's `jsonb` keeps an object's keys in
/// an order of its own, and the replay must send the same bytes.
pub fn kept_record(kept: &serde_json::Value) -> Result<String, serde_json::Error> {
    serde_json::to_string(&Record::deserialize(kept)?)
}

fn hash(record: &str) -> String {
    hex::encode(Sha256::digest(record.as_bytes()))
}

struct Plan {
    operation: Operation,
    version: i64,
    record: String,
    key: String,
    /// What the link keeps as `pushed_hash` once delivered: the record's
    /// hash, an update's without its [`CHANGED_FIELDS`] (which follow the
    /// snapshot, not the content).
    content_hash: String,
    /// The [`CHANGED_FIELDS`] the record names, when it names them
    /// (against the link's snapshot as the claim read it).
    changed: Option<Vec<String>>,
}

impl Plan {
    fn new(operation: Operation, version: i64, record: String, key: String) -> Self {
        Self {
            content_hash: hash(&record),
            changed: None,
            operation,
            version,
            record,
            key,
        }
    }
}

/// What to push for `customer`, or why nothing is (reason, and whether
/// that settles the version).
fn plan(
    link: &SyncLink,
    customer: &Customer,
) -> Result<Result<Plan, (String, bool)>, crate::store::StoreError> {
    // A create marked for the customer's current version (the claim
    // marks the create it is about to send) sends that version: the
    // same record as the one kept on the link. One marked for an older
    // version replays the record kept.
    let current_create = customer.deleted_at.is_none()
        && customer.version > link.synced_version
        && link.pending_version == Some(customer.version);
    // Replayed whether or not the customer was deleted since: the create
    // may have made a record (its answer was lost), which the delete that
    // follows then removes. A link whose record was deleted remotely
    // (`unlink`) is no different: its kept create was dropped, and a
    // record it made stayed at the remote for a deleted customer.
    if let Some(pending) = link.pending_version.filter(|_| !current_create) {
        if link.remote_id.is_none() || link.remote_deleted {
            if let Some(kept) = &link.pending_record {
                return Ok(Ok(Plan::new(
                    Operation::Create,
                    pending,
                    kept_record(kept)?,
                    idempotency_key(&link.connector, &link.customer_id, pending, link.repairs),
                )));
            }
        }
    }
    let current = serde_json::to_value(customer)?;
    let record = canonical_record(&current).to_string();
    let key = idempotency_key(
        &link.connector,
        &link.customer_id,
        customer.version,
        link.repairs,
    );
    if customer.deleted_at.is_some() {
        return Ok(match &link.remote_id {
            Some(_) if !link.remote_deleted => {
                Ok(Plan::new(Operation::Delete, customer.version, record, key))
            }
            Some(_) => Err(("remote record already deleted".into(), true)),
            None => Err(("deleted before it was ever pushed".into(), true)),
        });
    }
    if customer.version <= link.synced_version {
        return Ok(Err((
            format!("version {} already synced", customer.version),
            false,
        )));
    }
    // No record there, or the one the link names was deleted remotely and
    // unlinked by the delete policy while the customer stays: create one.
    if link.remote_id.is_none() || link.remote_deleted {
        return Ok(Ok(Plan::new(
            Operation::Create,
            customer.version,
            record,
            key,
        )));
    }
    let mut update = canonical_record(&current);
    // A customer `auto_rename` kept apart from another with its record's
    // email holds that email rewritten; the remote keeps its own.
    if let (Some(remote_id), Some(snapshot)) = (&link.remote_id, &link.snapshot) {
        if kept_apart(&customer.email, snapshot, &link.connector, remote_id) {
            update["email"] = snapshot["email"].clone();
        }
    }
    name_removed_metadata(&mut update, link.snapshot.as_ref());
    let content_hash = hash(&update.to_string());
    let delivered = link.delivered_base(customer.version);
    if delivered == Some(content_hash.as_str()) {
        return Ok(Err(("content unchanged since the last push".into(), true)));
    }
    // Only over a last push that was delivered (`pushed_hash` kept, or
    // `remote` since an event wrote the snapshot), or for the retry of one
    // whose outcome is unknown (the same request again): after such a push
    // (a timeout, a lease lost mid-call) the remote may hold what it sent,
    // not the snapshot, and a later version's field changed back to the
    // snapshot's value would not be sent. Nor after a forced push, which
    // makes the remote equal to ferry's record.
    let changed = delivered.and_then(|_| name_changed_fields(&mut update, link.snapshot.as_ref()));
    let record = update.to_string();
    // The request differs with the snapshot it was planned against (its
    // changed fields), not only with the version: a retry after the
    // snapshot moved (an event taken in between) sends another body, which
    // under the same key Stripe refuses (400 `idempotency_error`), and the
    // change was dead-lettered. Two bodies of one version each set fields
    // to the version's values: either may run.
    let key = format!("{key}-u{}", &hash(&record)[..16]);
    Ok(Ok(Plan {
        operation: Operation::Update,
        version: customer.version,
        record,
        key,
        content_hash,
        changed,
    }))
}

/// The remote's state after a push of `plan` that answered `returned`: the
/// next merge's base. A connector may leave the record out of its result
/// (the contract allows it); what was pushed is then what the remote holds,
/// and without a base the next remote event would take every differing
/// field, local edits included. It is marked assumed: the remote may not
/// keep every field pushed, and one its next record leaves out is not
/// known, not cleared (merge.rs). A record that is not a JSON object (a
/// connector's bug) is no record: it was dropped, and the next remote
/// event merged with no base at all. The metadata keys the push named as
/// removed keep their `previous` values there: whether the remote removed
/// them is not known, and a remote that kept them (a connector that does
/// not read the list) would otherwise seem to add them back at its next
/// event.
fn snapshot_after(
    returned: Option<&str>,
    plan: &Plan,
    previous: Option<&serde_json::Value>,
) -> Option<serde_json::Value> {
    let record = returned
        .and_then(|record| serde_json::from_str::<serde_json::Value>(record).ok())
        .filter(serde_json::Value::is_object);
    if record.is_none() && returned.is_some() {
        tracing::warn!(
            "the connector's push result holds a record that is not a JSON object; \
             what was pushed is taken as the remote's state"
        );
    }
    match record {
        Some(record) => Some(agreed_state(record, plan, previous)),
        None if plan.operation != Operation::Delete => {
            serde_json::from_str::<serde_json::Value>(&plan.record)
                .ok()
                .map(|mut pushed| {
                    if let Some(fields) = pushed.as_object_mut() {
                        keep_named_metadata(fields, previous);
                        fields.insert(
                            super::merge::ASSUMED_BASE.to_owned(),
                            serde_json::Value::Bool(true),
                        );
                    }
                    pushed
                })
        }
        None => None,
    }
}

/// A pushed record's `fields`, to be assumed as the remote's state, without
/// [`METADATA_REMOVED`] and with each key it named holding its `previous`
/// snapshot's value: whether the remote removed it is not known.
fn keep_named_metadata(
    fields: &mut serde_json::Map<String, serde_json::Value>,
    previous: Option<&serde_json::Value>,
) {
    fields.remove(CHANGED_FIELDS);
    let named = fields.remove(METADATA_REMOVED);
    let names = named.as_ref().and_then(serde_json::Value::as_array);
    let held = previous
        .and_then(|p| p.get("metadata"))
        .and_then(serde_json::Value::as_object);
    let (Some(names), Some(held)) = (names, held) else {
        return;
    };
    let kept: Vec<(String, serde_json::Value)> = names
        .iter()
        .filter_map(serde_json::Value::as_str)
        .filter_map(|name| Some((name.to_owned(), held.get(name)?.clone())))
        .collect();
    if let Some(metadata) = fields
        .entry("metadata")
        .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()))
        .as_object_mut()
    {
        metadata.extend(kept);
    }
}

/// The top-level field of an update's record naming the metadata keys
/// ferry removed since the last sync (see [`name_removed_metadata`]).
pub const METADATA_REMOVED: &str = "metadata_removed";

/// Adds to an update's `record` [`METADATA_REMOVED`], listing each
/// metadata key the remote held at the last sync (the link's `snapshot`)
/// that the customer no longer does: removed in ferry, so to be removed
/// there. A remote that merges metadata (Stripe's) kept such a key for
/// good, and the snapshot taken from its answer held it again. A field of
/// its own, not a `null` value in `metadata`: a connector built with an
/// SDK before `null` values were read as absent failed the whole record,
/// and an unknown field is ignored by every one
/// (`Customer::removed_metadata` in the SDK reads it).
fn name_removed_metadata(record: &mut serde_json::Value, snapshot: Option<&serde_json::Value>) {
    let Some(held) = snapshot
        .and_then(|s| s.get("metadata"))
        .and_then(serde_json::Value::as_object)
    else {
        return;
    };
    let kept = record
        .get("metadata")
        .and_then(serde_json::Value::as_object);
    // Sorted: PostgreSQL's `jsonb` keeps keys in an order of its own, and
    // a retry must send the same request under its idempotency key.
    let removed: std::collections::BTreeSet<&String> = held
        .iter()
        .filter(|(key, was)| {
            was.as_str().is_some_and(|v| !v.is_empty())
                && kept
                    .and_then(|m| m.get(*key))
                    .is_none_or(serde_json::Value::is_null)
        })
        .map(|(key, _)| key)
        .collect();
    if removed.is_empty() {
        return;
    }
    let removed: Vec<serde_json::Value> = removed
        .into_iter()
        .map(|key| serde_json::Value::String(key.clone()))
        .collect();
    if let Some(fields) = record.as_object_mut() {
        fields.insert(METADATA_REMOVED.to_owned(), removed.into());
    }
}

/// The top-level field of an update's record naming the fields whose
/// values differ from the link's snapshot (see [`name_changed_fields`]).
pub const CHANGED_FIELDS: &str = "changed_fields";

/// Adds to an update's `record` [`CHANGED_FIELDS`]: the fields (as the
/// merge names them: `name`, `address.city`, `metadata.tier`) whose values
/// differ from the remote's state at the last sync (the link's
/// `snapshot`), the ones the push changes. A connector that sends only
/// these (`Customer::changed_fields` in the SDK; Stripe's does) leaves
/// alone a field someone changed at the remote just before the push: sent
/// whole, the record pushed over it, and the edit's event, read again
/// after the push, was taken for its echo (lost on both sides). Named only
/// against a snapshot the remote answered: an assumed one holds what ferry
/// pushed, which the remote may not keep.
/// The names added, if they were.
fn name_changed_fields(
    record: &mut serde_json::Value,
    snapshot: Option<&serde_json::Value>,
) -> Option<Vec<String>> {
    let snapshot = snapshot.filter(|s| !super::merge::is_assumed(s))?;
    let changed = super::merge::differing_fields(record, snapshot);
    record
        .as_object_mut()?
        .insert(CHANGED_FIELDS.to_owned(), changed.clone().into());
    Some(changed)
}

/// The remote's state after a push of `plan` that answered `returned`:
/// the fields the push named as changed as the remote answered them, the
/// others as the `previous` snapshot held them. A field the push left
/// alone that the answer holds otherwise is another system's edit (made
/// just before the push) that ferry has not taken in: kept in the snapshot,
/// it read as agreed, and its event as no change, or as ferry having
/// changed it back (pushed over at the next update). Without a list (no
/// snapshot, or an assumed one), the answer stands, less the metadata the
/// push did not name ([`agreed_metadata`]).
fn agreed_state(
    mut returned: serde_json::Value,
    plan: &Plan,
    previous: Option<&serde_json::Value>,
) -> serde_json::Value {
    match (&plan.changed, previous) {
        (Some(changed), Some(previous)) => {
            let changed: Vec<&str> = changed.iter().map(String::as_str).collect();
            super::merge::overlay(&returned, previous, &changed)
        }
        _ => {
            agreed_metadata(&mut returned, &plan.record);
            returned
        }
    }
}

/// `returned`'s metadata less the keys the push did not name: a remote
/// that merges metadata answers with keys another system set there, which
/// ferry has not taken in yet. Kept in the snapshot, they read as agreed,
/// so the event that brings one (often just behind the push) read as ferry
/// having removed it: never taken in, and removed there by ferry's next
/// update. Left out, that event adds it. A key the push named as removed
/// and the remote still holds (a connector that does not remove keys)
/// stays: its next event then reads, as before, as ferry having removed
/// it, not as the remote adding it back.
fn agreed_metadata(returned: &mut serde_json::Value, pushed: &str) {
    let Some(metadata) = returned
        .get_mut("metadata")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    let pushed: serde_json::Value = serde_json::from_str(pushed).unwrap_or_default();
    let named = |key: &str| {
        pushed
            .get("metadata")
            .and_then(|m| m.get(key))
            .is_some_and(|v| !v.is_null())
            || pushed
                .get(METADATA_REMOVED)
                .and_then(serde_json::Value::as_array)
                .is_some_and(|removed| removed.iter().any(|k| k == key))
    };
    metadata.retain(|key, _| named(key));
}

/// What the connector is asked to do for `plan`. A create names no remote
/// record (the contract's promise): one the remote deleted (`unlink`) is
/// not the connector's to update.
fn push_request(link: &SyncLink, plan: &Plan) -> PushRequest {
    PushRequest {
        entity: ENTITY.to_owned(),
        operation: plan.operation,
        local_id: link.customer_id.clone(),
        remote_id: (plan.operation != Operation::Create)
            .then(|| link.remote_id.clone())
            .flatten(),
        version: u64::try_from(plan.version).unwrap_or_default(),
        idempotency_key: plan.key.clone(),
        record: plan.record.clone(),
    }
}

fn operation_name(operation: Operation) -> &'static str {
    match operation {
        Operation::Create => "create",
        Operation::Update => "update",
        Operation::Delete => "delete",
    }
}

impl SyncEngine {
    /// Runs one step for a claimed link and records its outcome. `customer`
    /// is the linked customer if a read of the claimed batch found it; if
    /// not, the step reads it. `lease_until_ms`: when the claim's lease
    /// ends (no push starts that could outlive it).
    #[tracing::instrument(skip_all, fields(
        customer_id = %link.customer_id,
        connector = %link.connector,
        correlation_id = link.correlation_id.as_deref().unwrap_or(""),
    ))]
    pub async fn push_link(
        &self,
        link: SyncLink,
        customer: Option<Customer>,
        lease_until_ms: i64,
    ) -> Outcome {
        // A panic in the push (ferry's bug: a guest's trap is an error)
        // spends an attempt, as a failure does, and ends in a dead letter
        // that says so. Uncaught, the task died in silence, and the link
        // waited out its lease to panic again, every lease, for ever.
        let push = std::panic::AssertUnwindSafe(self.try_push(&link, customer, lease_until_ms));
        let (recorded, outcome) = match futures::FutureExt::catch_unwind(push).await {
            Ok(done) => done,
            Err(panic) => {
                let text = crate::app::panic_text(&*panic);
                tracing::error!(
                    connector = %link.connector,
                    panic = text,
                    "a push panicked (a bug in ferry: please report it); retried as a failure"
                );
                let error = format!("ferry failed while pushing (a bug: please report it): {text}");
                self.retry_later(&link, None, None, error)
            }
        };
        let connector = &link.connector;
        // Counted once written: a write that loses its lease runs again.
        let retry_error = match &recorded {
            RecordedOutcome::RetryScheduled { error, .. } => Some(error.clone()),
            _ => None,
        };
        let observe = |outcome: &Outcome| match outcome {
            Outcome::Delivered { .. } => self.observe(connector, "outbound", "delivered", None),
            Outcome::Skipped { .. } => self.observe(connector, "outbound", "skipped", None),
            Outcome::RetryScheduled { .. } => {
                self.observe(
                    connector,
                    "outbound",
                    "retry_scheduled",
                    retry_error.as_deref(),
                );
            }
            Outcome::DeadLettered { reason } => {
                self.observe(connector, "outbound", "dead_lettered", Some(reason));
            }
            _ => {}
        };
        // The version the push sent (the claim may have read a customer
        // past its wanted version): the one a dead letter names.
        // Deferred behind a probe that may have succeeded before this write
        // (its release ran too early for it): looked at once written.
        let behind_probe = matches!(
            &recorded,
            RecordedOutcome::Deferred { waits_for: Some(why), .. }
                if *why == crate::store::links::PROBING_WAIT
        );
        let (pushed, answered) = match &recorded {
            RecordedOutcome::Delivered {
                version,
                operation,
                remote_id,
                ..
            } => (*version, Some((*operation, remote_id.clone()))),
            _ => (link.wanted_version, None),
        };
        match self.write_link(&link, LinkWrite::Outcome(recorded)).await {
            Ok(true) => {
                observe(&outcome);
                match &outcome {
                    Outcome::Delivered {
                        operation,
                        remote_id,
                    } => {
                        tracing::info!(operation, remote_id, "pushed");
                    }
                    _ => tracing::debug!(?outcome, "sync step done"),
                }
                if matches!(outcome, Outcome::Delivered { .. } | Outcome::Skipped { .. }) {
                    // A newer version may have arrived while we pushed.
                    self.inner.store.committed_links();
                }
                if outcome == Outcome::Paused {
                    self.resume_if_enabled_meanwhile(&link.connector).await;
                }
                if behind_probe && self.inner.breakers.is_closed(&link.connector) {
                    self.release_probed(&link.connector).await;
                }
                outcome
            }
            Ok(false) => {
                tracing::warn!("lease lost before the outcome was recorded");
                Outcome::LeaseLost
            }
            Err(crate::store::StoreError::RemoteIdTaken) => {
                // The remote applied the push: its answer names a record
                // another customer links (a create's echo made that
                // customer). Both named here, as the link keeps no trace
                // of them.
                let (operation, remote_id) = answered.unzip();
                let remote_id = remote_id.unwrap_or_default();
                // Which customer: read for the letter alone (a failed
                // read leaves it unnamed).
                let holder = self
                    .inner
                    .store
                    .link_by_remote_id(&link.connector, &remote_id)
                    .await
                    .ok()
                    .flatten()
                    .map_or_else(
                        || "another customer".to_owned(),
                        |l| format!("customer {}", l.customer_id),
                    );
                let reason = format!(
                    "the remote answered with record {remote_id}, which {holder} links \
                     (made from this create's echo, say)"
                );
                let dead = RecordedOutcome::DeadLettered {
                    version: pushed,
                    operation,
                    attempt: link.attempts + 1,
                    error_kind: DeadLetterKind::RemoteIdTaken,
                    error: reason.clone(),
                    settle_ms: 0,
                };
                match self.write_link(&link, LinkWrite::Outcome(dead)).await {
                    Ok(written) => {
                        let outcome = Outcome::DeadLettered { reason };
                        if written {
                            observe(&outcome);
                        }
                        outcome
                    }
                    Err(error) => self.unrecorded(error),
                }
            }
            Err(error) => self.unrecorded(error),
        }
    }

    fn unrecorded(&self, error: crate::store::StoreError) -> Outcome {
        // The lease expires and the step runs again; the idempotency key
        // makes the repeated push harmless.
        tracing::error!(
            error = format!("{:#}", anyhow::Error::from(error)),
            "could not record a sync outcome; the link will be retried when its lease expires"
        );
        Outcome::LeaseLost
    }

    /// The remote answered a call: the connector's breaker closes, and
    /// the pushes deferred behind its probe go now (they would wait out the
    /// probe's time otherwise).
    pub(crate) fn answered(&self, connector: &str) {
        if self.inner.breakers.success(connector) {
            let engine = self.clone();
            let connector = connector.to_owned();
            tokio::spawn(async move { engine.release_probed(&connector).await });
        }
    }

    /// Makes the pushes deferred behind `connector`'s probe due now.
    async fn release_probed(&self, connector: &str) {
        match self.inner.store.release_probed_links(connector).await {
            Ok(_) => self.inner.store.committed_links(),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "releasing the pushes behind a probe failed; they go when their wait ends"
            ),
        }
    }

    /// The connector may have been enabled between this step's look at it
    /// and the write that parked the link: the enable's resume then ran
    /// too early for it. Resume again, so it does not wait the recheck out.
    async fn resume_if_enabled_meanwhile(&self, connector: &str) {
        if self
            .inner
            .registry
            .ready(connector, Need::Entity(ENTITY))
            .is_err()
        {
            return;
        }
        match self.inner.store.resume_connector_links(connector).await {
            Ok(_) => self.inner.store.committed_links(),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "resuming waiting pushes failed; they are retried within a minute"
            ),
        }
    }

    async fn try_push(
        &self,
        link: &SyncLink,
        customer: Option<Customer>,
        lease_until_ms: i64,
    ) -> (RecordedOutcome, Outcome) {
        let inner = &self.inner;
        let skip = |version: i64, reason: &str, mark_synced: bool| {
            (
                RecordedOutcome::Skipped {
                    version,
                    reason: reason.to_owned(),
                    mark_synced,
                },
                Outcome::Skipped {
                    reason: reason.to_owned(),
                },
            )
        };
        let mut ready = inner.registry.ready(&link.connector, Need::Entity(ENTITY));
        if matches!(ready, Err(NotReady::Unknown | NotReady::Unconfigured)) {
            // Another replica queued the change: this one's view may not
            // have caught up with the upload or the enable yet.
            // A busy store spends no attempt, as everywhere else.
            if let Err(error) = inner.registry.refresh().await {
                return self.store_failed(link, error);
            }
            ready = inner.registry.ready(&link.connector, Need::Entity(ENTITY));
        }
        let ready = match ready {
            Ok(ready) => ready,
            // Paused, or never switched on here (its settings may live in
            // another replica's environment): wait, spending no attempt;
            // enabling it resumes the link at once, this is the fallback.
            Err(NotReady::Disabled | NotReady::Unconfigured | NotReady::Incomplete(_)) => {
                return (
                    wait(PAUSED_RECHECK, Some(crate::store::links::PAUSED_WAIT)),
                    Outcome::Paused,
                )
            }
            // This replica could not load the active version (yet): another
            // replica, or a later refresh, will.
            Err(NotReady::NotLoaded(_)) => return deferred(NOT_LOADED_RECHECK),
            // Deleted, or it does not sync customers: nothing to push to.
            Err(why @ (NotReady::Unknown | NotReady::Unsupported(_))) => {
                return skip(link.wanted_version, &why.to_string(), false)
            }
        };
        let (connector, config) = (ready.connector, ready.config);
        let customer = match customer {
            Some(customer) => Ok(Some(customer)),
            None => inner.store.get_customer_any(&link.customer_id).await,
        };
        let customer = match customer {
            Ok(Some(customer)) => customer,
            Ok(None) => return skip(link.wanted_version, "customer does not exist", true),
            Err(error) => return self.store_failed(link, error),
        };
        let plan = match plan(link, &customer) {
            Ok(Ok(plan)) => plan,
            Ok(Err((reason, mark_synced))) => return skip(customer.version, &reason, mark_synced),
            Err(error) => return self.store_failed(link, error),
        };
        // A backfill of the connector links customers to the remote
        // records with their emails: a create now would make a second
        // record of one it is about to link (a customer edited while a
        // listing of hours goes on). The create waits, spending no
        // attempt, until the run has classified (creates of customers no
        // listed record matches go then: its own among them) or, for a
        // match, until the run and the link it stored are done; the run
        // resumes it at each, and it goes as an update where the backfill
        // linked (a create's marker, which the claim wrote, is not
        // replayed over a link). One whose answer was lost waits too: the
        // record it may have made is listed and classified with the
        // other, as it would have been had it come back.
        // Asked for the customer's email and, when it differs, the one the
        // create sends (a kept record's, from before an edit).
        if plan.operation == Operation::Create {
            let sent = serde_json::from_str::<serde_json::Value>(&plan.record)
                .ok()
                .and_then(|record| record["email"].as_str().map(normalise_email))
                .filter(|sent| *sent != customer.email);
            for email in std::iter::once(customer.email.as_str()).chain(sent.as_deref()) {
                match inner
                    .store
                    .backfill_holds_create(&link.connector, email)
                    .await
                {
                    Ok(false) => {}
                    Ok(true) => {
                        let why = crate::store::links::BACKFILL_WAIT;
                        return (wait(BACKFILL_RECHECK, Some(why)), Outcome::Deferred);
                    }
                    Err(error) => return self.store_failed(link, error),
                }
            }
        }
        // The claim may have waited for a push slot (a bus batch larger
        // than the permits, a slow remote). A push that could outlive the
        // lease might land after another worker, once the lease ended,
        // pushed a newer version over which it would write this older one:
        // hand the link back for a fresh claim instead. Before the breaker
        // is asked, so a stale claim never takes the probe. With a margin:
        // another replica judges the lease by its own clock, and a create
        // writes its marker before it goes.
        let call_ms = i64::try_from(inner.call_timeout.as_millis()).unwrap_or(i64::MAX);
        let outlives_lease =
            || lease_until_ms.saturating_sub(now_ms()) <= call_ms.saturating_add(LEASE_MARGIN_MS);
        if outlives_lease() {
            return deferred(Duration::ZERO);
        }
        let pass = match inner.breakers.allow(&link.connector) {
            Ok(pass) => pass,
            // Behind a probe: released when it succeeds.
            Err(Deferred(after, true)) => {
                let why = crate::store::links::PROBING_WAIT;
                return (wait(after, Some(why)), Outcome::Deferred);
            }
            Err(Deferred(after, false)) => return deferred(after),
        };
        if plan.operation == Operation::Create && link.pending_version != Some(plan.version) {
            // Durable before the request leaves: if we crash or time out,
            // the next attempt replays this create with the same key and
            // the same record.
            let marked = match serde_json::from_str(&plan.record) {
                Ok(record) => {
                    let version = plan.version;
                    let write = LinkWrite::CreatePending { version, record };
                    self.write_link(link, write).await
                }
                Err(error) => Err(error.into()),
            };
            match marked {
                // The marker's write may have waited (a busy store, a
                // group behind a lock): the lease is judged again, or the
                // call could outlive it and another worker replay the
                // create while this one is still in flight. Marked, the
                // create is replayed with its key at the next claim.
                Ok(true) if outlives_lease() => {
                    inner.breakers.unused(&link.connector, pass);
                    return deferred(Duration::ZERO);
                }
                Ok(true) => {}
                Ok(false) => {
                    inner.breakers.unused(&link.connector, pass);
                    return (
                        RecordedOutcome::Deferred {
                            at_ms: now_ms(),
                            waits_for: None,
                        },
                        Outcome::LeaseLost,
                    );
                }
                Err(error) => {
                    inner.breakers.unused(&link.connector, pass);
                    return self.store_failed(link, error);
                }
            }
        }
        let pushed_hash = plan.content_hash.clone();
        let request = push_request(link, &plan);
        let operation = operation_name(plan.operation);
        tracing::debug!(operation, version = plan.version, "pushing");
        let pushed = connector.push(&config, request).await;
        // A remote id ferry cannot store (empty, a NUL) would fail the
        // write of a push that did reach the remote, and the push would
        // run again at every lease expiry; one too long to key (over 255
        // bytes) could never be listed by a reconciliation (which reports
        // the link an orphan) nor named by a webhook: the connector is broken,
        // and the change goes to a dead letter with the reason. The remote
        // applied it: a create keeps its marker, so the dead letter's
        // replay, once the connector is fixed, sends it under its key (the
        // remote answers with the record it made) instead of a second one.
        if let Some(problem) = pushed
            .as_ref()
            .ok()
            .and_then(|result| crate::runtime::unkeyable("remote id", &result.remote_id))
        {
            self.answered(&link.connector);
            let message = format!("the connector returned {problem}");
            return (
                RecordedOutcome::DeadLettered {
                    version: plan.version,
                    operation: Some(operation),
                    attempt: link.attempts + 1,
                    error_kind: DeadLetterKind::UnusableAnswer,
                    error: message.clone(),
                    settle_ms: 0,
                },
                Outcome::DeadLettered { reason: message },
            );
        }
        match pushed {
            Ok(result) => {
                self.answered(&link.connector);
                let mut snapshot =
                    snapshot_after(result.record.as_deref(), &plan, link.snapshot.as_ref());
                if let Some(snapshot) = &mut snapshot {
                    crate::store::replace_nul(snapshot);
                }
                (
                    RecordedOutcome::Delivered {
                        operation,
                        version: plan.version,
                        remote_id: result.remote_id.clone(),
                        remote_deleted: plan.operation == Operation::Delete,
                        pushed_hash,
                        snapshot,
                        snapshot_base: link.snapshot.clone().filter(|_| plan.changed.is_some()),
                    },
                    Outcome::Delivered {
                        operation: operation.to_owned(),
                        remote_id: result.remote_id,
                    },
                )
            }
            Err(CallError::Connector(ConnectorError::NotFound(message)))
                if plan.operation == Operation::Delete =>
            {
                self.answered(&link.connector);
                tracing::info!(message, "remote record already gone; delete counts as done");
                let remote_id = link.remote_id.clone().unwrap_or_default();
                (
                    RecordedOutcome::Delivered {
                        operation,
                        version: plan.version,
                        remote_id: remote_id.clone(),
                        remote_deleted: true,
                        pushed_hash,
                        snapshot: None,
                        snapshot_base: None,
                    },
                    Outcome::Delivered {
                        operation: operation.to_owned(),
                        remote_id,
                    },
                )
            }
            Err(error) => self.failed(link, plan.version, operation, error, pass),
        }
    }

    fn failed(
        &self,
        link: &SyncLink,
        version: i64,
        operation: &'static str,
        error: CallError,
        pass: Pass,
    ) -> (RecordedOutcome, Outcome) {
        let breakers = &self.inner.breakers;
        let dead = |kind: DeadLetterKind, message: String| {
            (
                RecordedOutcome::DeadLettered {
                    version,
                    operation: Some(operation),
                    attempt: link.attempts + 1,
                    error_kind: kind,
                    error: message.clone(),
                    settle_ms: 0,
                },
                Outcome::DeadLettered { reason: message },
            )
        };
        match error {
            CallError::Connector(ConnectorError::RateLimited(ref limit))
            | CallError::ServerFailed(ConnectorError::RateLimited(ref limit)) => {
                // `Retry-After: 0` is read as none, and a wait under a
                // second as one: taken as said, no pause, and a rate
                // limit spends no attempt, so the remote was asked again
                // within moments, for ever.
                let after = limit
                    .retry_after_ms
                    .filter(|ms| *ms > 0)
                    .map(|ms| Duration::from_millis(ms.max(1_000)));
                // Without a Retry-After (a daily API limit, an HTTP-date),
                // the connector rests for a backoff that grows with the
                // rate limits in a row (until a call succeeds), and so
                // does this push: every other push would
                // otherwise meet the same limit, and a rate limit spends
                // no attempt, so the link's own backoff never grew.
                // A probe this push carried is handed back: the pause, not
                // the probe's cool-down, says when the next call goes.
                let streak = breakers.rate_limited(&link.connector);
                let pause = after.unwrap_or_else(|| self.inner.policy.rate_limit_pause(streak));
                breakers.unused(&link.connector, pass);
                breakers.pause(&link.connector, pause);
                // The remote is up and says "later", not "no": a rate
                // limit spends no attempt (the pause above paces the
                // connector). A rate-limited bulk import, several replicas
                // sending at once, dead-lettered healthy changes.
                // A 503 with `Retry-After` the remote may have saved under
                // the key, as any 5xx: under the same key every retry got
                // it back, never spending an attempt, until the key
                // expired (a day at Stripe). An update or delete goes
                // under a fresh key (below); a create keeps its key (a
                // fresh one could make a second record), so it spends an
                // attempt, as after a saved 500, and its retries end.
                let saved = matches!(error, CallError::ServerFailed(_));
                let spend = if saved && operation == "create" {
                    Spend::Attempt
                } else {
                    Spend::Nothing
                };
                let (mut recorded, outcome) = schedule_retry(
                    &self.inner.policy,
                    link,
                    Some((version, operation)),
                    Some(pause),
                    format!("rate limited: {}", limit.message),
                    spend,
                );
                if let (
                    CallError::ServerFailed(_),
                    RecordedOutcome::RetryScheduled { answered, .. },
                ) = (&error, &mut recorded)
                {
                    *answered = true;
                }
                (recorded, outcome)
            }
            // ferry's own pacing said no, not the remote: no breaker
            // failure. Nothing went out, so the push waits for the next
            // slot; if an earlier request of the call went out, it is
            // retried like a remote's 429. Neither spends an attempt.
            CallError::Throttled {
                wait,
                reached_remote: false,
            } => {
                breakers.unused(&link.connector, pass);
                deferred(wait)
            }
            error @ CallError::Throttled { wait, .. } => {
                breakers.unused(&link.connector, pass);
                schedule_retry(
                    &self.inner.policy,
                    link,
                    Some((version, operation)),
                    Some(wait),
                    error.to_string(),
                    Spend::Nothing,
                )
            }
            CallError::Connector(ConnectorError::Permanent(message)) => {
                self.answered(&link.connector);
                dead(DeadLetterKind::Permanent, message)
            }
            CallError::Connector(ConnectorError::NotFound(message)) => {
                self.answered(&link.connector);
                // An update's record gone (deleted there with no event
                // ferry took: Salesforce sends none): a replay meets the
                // same 404; a reconciliation finds the link an orphan.
                let advice = if operation == "update" {
                    "; a replay meets the same answer: a reconciliation run finds the link an \
                     orphan and repairs it (`push_local` creates the record again)"
                } else {
                    ""
                };
                dead(
                    DeadLetterKind::NotFound,
                    format!("remote record not found: {message}{advice}"),
                )
            }
            CallError::Connector(ConnectorError::Unauthorized(message)) => {
                self.answered(&link.connector);
                dead(
                    DeadLetterKind::Unauthorized,
                    format!("unauthorized: {message}"),
                )
            }
            CallError::Connector(ConnectorError::Unsupported(message)) => {
                breakers.unused(&link.connector, pass);
                dead(
                    DeadLetterKind::Unsupported,
                    format!("unsupported: {message}"),
                )
            }
            CallError::Connector(ConnectorError::InvalidSignature(message)) => {
                breakers.unused(&link.connector, pass);
                dead(DeadLetterKind::Permanent, message)
            }
            // A failure the remote did not save (a 409 for a request
            // under the same key still running, a 429 for an object
            // another request holds, a refused connection): the retry is
            // the same request, under the same key.
            CallError::Connector(ConnectorError::Retryable(message)) => {
                breakers.failure(&link.connector);
                self.retry_later(link, Some((version, operation)), None, message)
            }
            CallError::ServerFailed(ConnectorError::Retryable(message)) => {
                breakers.failure(&link.connector);
                let (mut recorded, outcome) =
                    self.retry_later(link, Some((version, operation)), None, message);
                // An answer the remote may have saved under the key: the
                // retry goes under a fresh one (see
                // `RecordedOutcome::RetryScheduled`).
                if let RecordedOutcome::RetryScheduled { answered, .. } = &mut recorded {
                    *answered = true;
                }
                (recorded, outcome)
            }
            // The remote may still be working on an update or delete the
            // call gave up on: a retry at once (a newer version under a new
            // key) could land before it, and the late one would leave the
            // remote with the older values. The next attempt waits a call
            // timeout more, the time the first had. So does a create (it
            // keeps its marker and replays the same version and key): at
            // once, it met the first still running under its key (Stripe's
            // 409), which spent a second attempt and a second breaker
            // failure, and a remote without keys was likeliest then to
            // make a second record.
            CallError::DeadlineExceeded => {
                breakers.failure(&link.connector);
                let settle = Some(self.inner.call_timeout);
                let error = CallError::DeadlineExceeded.to_string();
                self.retry_later(link, Some((version, operation)), settle, error)
            }
            // The guest misbehaved or ran out of time: retry, since a
            // timeout may be the remote's, and let the attempt budget end it.
            other => {
                breakers.failure(&link.connector);
                self.retry_later(link, Some((version, operation)), None, other.to_string())
            }
        }
    }

    /// A failure of ferry's own store before anything went out.
    /// Contention that ends by itself (no pooled connection, SQLite's
    /// writer busy, a deadlock's victim, a lost connection) waits a moment
    /// without spending an attempt: a busy store dead-lettered healthy
    /// changes as `retries_exhausted`. Any other error (a record that does
    /// not decode) is an attempt, and gives up in the end.
    fn store_failed(&self, link: &SyncLink, error: StoreError) -> (RecordedOutcome, Outcome) {
        match store_spend(&error) {
            // Deferred, not a retry: no delivery row, no state written to
            // a store already busy; spread over a few seconds.
            Spend::Nothing => {
                tracing::debug!(
                    error = store_error(error),
                    "the store was busy; the push waits"
                );
                let after =
                    STORE_BUSY_WAIT + STORE_BUSY_WAIT * 4 / 1000 * (rand::random::<u32>() % 1000);
                (
                    wait(after, Some("waiting: ferry's store was busy")),
                    Outcome::Deferred,
                )
            }
            Spend::Attempt => self.retry_later(link, None, None, store_error(error)),
        }
    }

    fn retry_later(
        &self,
        link: &SyncLink,
        attempted: Option<(i64, &'static str)>,
        retry_after: Option<Duration>,
        error: String,
    ) -> (RecordedOutcome, Outcome) {
        schedule_retry(
            &self.inner.policy,
            link,
            attempted,
            retry_after,
            error,
            Spend::Attempt,
        )
    }
}

/// The next attempt, or a dead letter once the attempts are spent. A
/// failure that spends [`Spend::Nothing`] keeps the link's count (and so
/// never gives up, nor brings a later failure nearer its end).
fn schedule_retry(
    policy: &RetryPolicy,
    link: &SyncLink,
    attempted: Option<(i64, &'static str)>,
    retry_after: Option<Duration>,
    error: String,
    spend: Spend,
) -> (RecordedOutcome, Outcome) {
    let (version, operation) = attempted.unwrap_or((link.wanted_version, "none"));
    // A push of a version newer than the claim's wanted one (the
    // customer read past it: its change is taken in later, or was
    // while the push was out, and the intake reset the count) is that
    // version's first attempt, not the older one's next: counted on
    // from the older one's, it was dead-lettered after one try when
    // the older one's attempts ran out. The store counts the same way.
    let spent = if version > link.wanted_version {
        0
    } else {
        link.attempts
    };
    let next = spent + 1;
    let attempt = match spend {
        Spend::Attempt => next,
        Spend::Nothing => spent,
    };
    if spend == Spend::Attempt && policy.exhausted(u32::try_from(attempt).unwrap_or(u32::MAX)) {
        let message = format!("gave up after {attempt} attempts: {error}");
        // The wait this failure asked for (an update that timed out may
        // still be at work in the remote) holds for the newer version
        // the link reopens for.
        let settle = retry_after.map_or(0, |after| {
            i64::try_from(after.min(super::retry::MAX_RETRY_AFTER).as_millis()).unwrap_or(i64::MAX)
        });
        return (
            RecordedOutcome::DeadLettered {
                version,
                operation: attempted.map(|(_, op)| op),
                attempt,
                error_kind: DeadLetterKind::RetriesExhausted,
                error: message.clone(),
                settle_ms: settle,
            },
            Outcome::DeadLettered { reason: message },
        );
    }
    let delay = policy.delay(u32::try_from(next).unwrap_or(u32::MAX), retry_after);
    let at_ms = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
    tracing::info!(
        attempt,
        delay_ms = delay.as_millis() as u64,
        error,
        "push failed; retry scheduled"
    );
    (
        RecordedOutcome::RetryScheduled {
            version,
            operation,
            attempt,
            at_ms,
            error,
            pending_version: None,
            answered: false,
        },
        Outcome::RetryScheduled { attempt, at_ms },
    )
}

/// What a store failure before a push spends (see
/// [`SyncEngine::store_failed`]).
fn store_spend(error: &StoreError) -> Spend {
    let transient = error.passes()
        || matches!(
            error,
            StoreError::Database(sqlx::Error::Io(_) | sqlx::Error::PoolClosed)
        );
    if transient {
        Spend::Nothing
    } else {
        Spend::Attempt
    }
}

fn store_error(error: impl Into<anyhow::Error>) -> String {
    format!("store unavailable: {:#}", error.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_store_spends_no_attempt_and_a_broken_record_does() {
        let busy = StoreError::Database(sqlx::Error::PoolTimedOut);
        assert_eq!(store_spend(&busy), Spend::Nothing);
        let gone = StoreError::Database(sqlx::Error::Io(std::io::Error::other("reset")));
        assert_eq!(store_spend(&gone), Spend::Nothing);
        let broken = StoreError::from(serde_json::from_str::<i32>("{").unwrap_err());
        assert_eq!(store_spend(&broken), Spend::Attempt);
    }

    #[test]
    fn a_key_is_told_apart_from_another_connectors() {
        let id = "cus_0193a5c4a1b27c3d8e9f0a1b2c3d4e5f";
        let eu = idempotency_key("stripe-eu", id, 3, 0);
        assert!(is_own_key("stripe-eu", &eu));
        assert!(!is_own_key("stripe", &eu), "{eu}");
        assert!(is_own_key("stripe", &idempotency_key("stripe", id, 3, 2)));
        assert!(!is_own_key("stripe", "ferry-stripe-something-else"));
        assert!(!is_own_key("stripe", "user-key"));
        let (customer, version) =
            key_parts("stripe", &idempotency_key("stripe", id, 7, 2)).unwrap();
        assert_eq!((customer.as_str(), version), (id, 7));
        assert_eq!(key_parts("stripe-eu", &eu).map(|(_, v)| v), Some(3));
    }

    /// Customer `id` at `version`, named Ada.
    fn customer(id: &str, version: i64) -> Customer {
        let now = chrono::Utc::now();
        Customer {
            id: crate::store::CustomerId::parse(id).expect("id"),
            name: Some("Ada".to_owned()),
            email: "ada@example.com".to_owned(),
            phone: None,
            address: None,
            metadata: std::collections::BTreeMap::new(),
            version,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        }
    }

    /// `customer`'s link to a Stripe record, synced at version 1, its
    /// current version wanted.
    fn linked(customer: &Customer) -> SyncLink {
        SyncLink {
            customer_id: customer.id.as_str().to_owned(),
            connector: "stripe".to_owned(),
            remote_id: Some("cus_remote".to_owned()),
            remote_deleted: false,
            wanted_version: customer.version,
            synced_version: 1,
            pushed_hash: None,
            snapshot: None,
            pending_version: None,
            pending_record: None,
            unsure_version: None,
            unsure_base: None,
            state: crate::store::LinkState::Pending,
            attempts: 0,
            next_attempt_at_ms: 0,
            lease_token: None,
            last_error: None,
            correlation_id: None,
            updated_at: customer.updated_at,
            remote_seen_at_ms: 0,
            pushed_at_ms: 0,
            held_by: None,
            repairs: 0,
        }
    }

    /// The claim wanted version 3 and had spent 9 of 10 attempts on it;
    /// the push read the customer at version 4 (its change not yet taken
    /// in, or taken in while the push was out). Its failure is version 4's
    /// first: it was dead-lettered, "gave up after 10 attempts", after one.
    /// A failure of version 3 itself is still the last one.
    #[test]
    fn a_newer_version_pushed_on_an_older_ones_last_attempt_starts_its_count() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_millis(10),
            max_delay: Duration::from_millis(10),
        };
        let customer = customer("cus_0193a5c4a1b27c3d8e9f0a1b2c3d4e5f", 3);
        let link = SyncLink {
            attempts: 9,
            state: crate::store::LinkState::Retry,
            ..linked(&customer)
        };
        let failed = |version: i64, spend: Spend| {
            schedule_retry(
                &policy,
                &link,
                Some((version, "update")),
                None,
                "503".to_owned(),
                spend,
            )
            .0
        };
        assert!(
            matches!(
                failed(4, Spend::Attempt),
                RecordedOutcome::RetryScheduled {
                    version: 4,
                    attempt: 1,
                    ..
                }
            ),
            "{:?}",
            failed(4, Spend::Attempt)
        );
        assert!(matches!(
            failed(4, Spend::Nothing),
            RecordedOutcome::RetryScheduled {
                version: 4,
                attempt: 0,
                ..
            }
        ));
        assert!(matches!(
            failed(3, Spend::Attempt),
            RecordedOutcome::DeadLettered {
                version: 3,
                attempt: 10,
                ..
            }
        ));
    }

    /// A create kept for replay, on a link whose record was deleted
    /// remotely (`unlink`), of a customer deleted since: the create is
    /// replayed (its lost answer may have made a record; the customer's
    /// newer version, its delete, is pushed after it). It was settled as "remote record already deleted", and a
    /// record the create made stayed for a deleted customer.
    #[test]
    fn a_kept_create_over_a_deleted_record_is_replayed_for_a_deleted_customer() {
        let id = "cus_0193a5c4a1b27c3d8e9f0a1b2c3d4e5f";
        let mut customer = customer(id, 5);
        customer.deleted_at = Some(customer.updated_at);
        let link = SyncLink {
            remote_id: Some("cus_gone".to_owned()),
            remote_deleted: true,
            synced_version: 3,
            pending_version: Some(4),
            pending_record: Some(canonical_record(
                &serde_json::to_value(&customer).expect("json"),
            )),
            ..linked(&customer)
        };
        let plan = plan(&link, &customer).expect("plan").expect("a push");
        assert!(matches!(plan.operation, Operation::Create));
        assert_eq!(plan.version, 4);
        assert_eq!(plan.key, idempotency_key("stripe", id, 4, 0));
        // The record the remote deleted is not named to the connector: a
        // create has no remote id (one that branched on it updated the
        // deleted record, a `not_found` dead letter).
        assert_eq!(push_request(&link, &plan).remote_id, None);
    }

    #[test]
    fn a_result_record_that_is_not_an_object_is_taken_as_what_was_pushed() {
        let plan = Plan::new(
            Operation::Update,
            2,
            r#"{"name":"Ada"}"#.to_owned(),
            "k".to_owned(),
        );
        let assumed = serde_json::json!({"name": "Ada", super::super::merge::ASSUMED_BASE: true});
        for broken in ["not json", "[1]", "\"text\""] {
            assert_eq!(
                snapshot_after(Some(broken), &plan, None),
                Some(assumed.clone()),
                "{broken}"
            );
        }
        assert_eq!(snapshot_after(None, &plan, None), Some(assumed));
        assert_eq!(
            snapshot_after(Some(r#"{"name":"Ada L."}"#), &plan, None),
            Some(serde_json::json!({"name": "Ada L."}))
        );
    }

    #[test]
    fn metadata_ferry_removed_is_named_and_keys_it_did_not_send_are_not_agreed() {
        let snapshot = serde_json::json!({"metadata": {"tier": "gold", "plan": "pro", "gone": ""}});
        let record = serde_json::json!({"name": "Ada", "metadata": {"plan": "pro"}});
        let mut removing = record.clone();
        name_removed_metadata(&mut removing, Some(&snapshot));
        assert_eq!(
            removing,
            serde_json::json!({"name": "Ada", "metadata": {"plan": "pro"}, "metadata_removed": ["tier"]}),
            "a key held there as empty is not there"
        );
        let mut removing = serde_json::json!({"name": "Ada"});
        name_removed_metadata(&mut removing, Some(&snapshot));
        assert_eq!(
            removing["metadata_removed"],
            serde_json::json!(["plan", "tier"])
        );
        let mut unchanged = record.clone();
        name_removed_metadata(&mut unchanged, None);
        assert_eq!(unchanged, record);

        let plan = Plan::new(
            Operation::Update,
            2,
            r#"{"name":"Ada","metadata":{"plan":"pro"},"metadata_removed":["tier"]}"#.to_owned(),
            "k".to_owned(),
        );
        let returned = r#"{"name":"Ada","metadata":{"plan":"pro","tier":"gold","vip":"yes"}}"#;
        assert_eq!(
            snapshot_after(Some(returned), &plan, Some(&snapshot)),
            Some(serde_json::json!({"name": "Ada", "metadata": {"plan": "pro", "tier": "gold"}})),
            "another system's key is news to take in; one the remote kept is not"
        );
        let assumed = snapshot_after(None, &plan, Some(&snapshot)).unwrap();
        assert!(assumed.get("metadata_removed").is_none(), "{assumed}");
        assert_eq!(
            assumed["metadata"],
            serde_json::json!({"plan": "pro", "tier": "gold"}),
            "whether the remote removed it is not known"
        );
    }

    #[test]
    fn an_update_names_what_it_changes_and_keeps_what_it_left_alone() {
        let snapshot = serde_json::json!({"id": "cus_1", "name": "Ada", "email": "ada@example.com",
            "phone": null, "address": {"city": "Paris", "line1": "1 Rue"},
            "metadata": {"plan": "pro", "tier": "gold"}});
        let mut update = serde_json::json!({"id": "f1", "name": "Ada", "email": "ADA@example.com",
            "phone": "+4930123", "address": {"city": "Lyon", "line1": "1 Rue"},
            "metadata": {"plan": "pro"}});
        name_changed_fields(&mut update, Some(&snapshot));
        assert_eq!(
            update[CHANGED_FIELDS],
            serde_json::json!(["address.city", "metadata.tier", "phone"]),
            "an email differing in case only is the same"
        );
        for none in [
            None,
            Some(serde_json::json!({"name": "Ada", super::super::merge::ASSUMED_BASE: true})),
        ] {
            let mut update = serde_json::json!({"name": "Ann"});
            name_changed_fields(&mut update, none.as_ref());
            assert!(update.get(CHANGED_FIELDS).is_none(), "{none:?}");
        }

        // The answer holds a name and a metadata key someone set there
        // just before the push, and an address line: not ferry's changes.
        let plan = Plan {
            changed: name_changed_fields(&mut update, Some(&snapshot)),
            ..Plan::new(Operation::Update, 2, update.to_string(), "k".to_owned())
        };
        let returned = r#"{"id":"cus_1","name":"Ann","email":"ada@example.com","phone":"+4930123",
            "address":{"city":"Lyon","line1":"2 Rue"},"metadata":{"plan":"pro","vip":"yes"}}"#;
        assert_eq!(
            snapshot_after(Some(returned), &plan, Some(&snapshot)),
            Some(
                serde_json::json!({"id": "cus_1", "name": "Ada", "email": "ada@example.com",
                "phone": "+4930123", "address": {"city": "Lyon", "line1": "1 Rue"},
                "metadata": {"plan": "pro"}})
            ),
        );
        let assumed = snapshot_after(None, &plan, Some(&snapshot)).unwrap();
        assert!(assumed.get(CHANGED_FIELDS).is_none(), "{assumed}");
    }

    #[test]
    fn an_updates_key_follows_its_body_and_still_names_its_version() {
        let id = "cus_0123456789abcdef0123456789abcdef";
        let customer = customer(id, 3);
        let mut link = linked(&customer);
        link.snapshot = Some(serde_json::json!({"name": "Ann", "email": "ada@example.com"}));
        link.pushed_hash = Some("remote".to_owned());
        let whole = SyncLink {
            pushed_hash: None,
            ..link.clone()
        };
        let unsettled = plan(&whole, &customer).unwrap().unwrap();
        assert!(
            !unsettled.record.contains(CHANGED_FIELDS),
            "{}",
            unsettled.record
        );
        let first = plan(&link, &customer).unwrap().unwrap();
        assert!(first.record.contains(CHANGED_FIELDS), "{}", first.record);
        assert_eq!(first.key, plan(&link, &customer).unwrap().unwrap().key);
        assert!(first.key.starts_with(&idempotency_key("stripe", id, 3, 0)));
        assert_eq!(key_parts("stripe", &first.key).map(|(_, v)| v), Some(3));
        // An event taken in between: the same version, another body.
        link.snapshot = Some(serde_json::json!({"name": "Ada", "email": "ann@example.com"}));
        let second = plan(&link, &customer).unwrap().unwrap();
        assert_ne!(first.record, second.record);
        assert_ne!(first.key, second.key);
        assert_eq!(first.content_hash, second.content_hash);
    }

    /// After a push of version 3 whose outcome is unknown, its retry is
    /// the same request (its changed fields, its key); version 4 goes
    /// whole, and is not skipped as unchanged: the remote may hold 3.
    #[test]
    fn only_the_retry_of_an_unsure_push_keeps_its_base() {
        let id = "cus_0123456789abcdef0123456789abcdef";
        // Version 3 renames her; version 4 names her as before.
        let third = Customer {
            name: Some("Ada Lovelace".to_owned()),
            ..customer(id, 3)
        };
        let later = customer(id, 4);
        let mut link = linked(&third);
        link.snapshot = Some(serde_json::json!({"name": "Ann", "email": "ada@example.com"}));
        // Delivered last: the content version 4 has again.
        let delivered =
            hash(&canonical_record(&serde_json::to_value(&later).expect("json")).to_string());
        link.pushed_hash = Some(delivered.clone());
        let first = plan(&link, &third).unwrap().unwrap();
        assert!(first.record.contains(CHANGED_FIELDS), "{}", first.record);
        // Version 3's push timed out (what the store then writes).
        link.pushed_hash = None;
        link.unsure_version = Some(3);
        link.unsure_base = Some(delivered);
        let retry = plan(&link, &third).unwrap().unwrap();
        assert_eq!((&retry.record, &retry.key), (&first.record, &first.key));
        let whole = plan(&link, &later).unwrap().unwrap();
        assert!(!whole.record.contains(CHANGED_FIELDS), "{}", whole.record);
    }
}
