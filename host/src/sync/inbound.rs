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

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::merge::{merge, ConflictPolicy, Sides};
use super::outbound::canonical_record;
use super::SyncEngine;
use crate::runtime::{CallError, ConnectorError};
use crate::store::inbox::{Applied, CustomerWrite, InboundChange, InboxEvent, NewConflict};
use crate::store::sync::now_ms;
use crate::store::{Address, Customer, CustomerFields, CustomerId, ListCustomers, StoreError};

/// Inbox events claimed per round.
const INBOX_BATCH: u32 = 128;
/// Longest the inbox loop sleeps without being woken.
const INBOX_POLL: Duration = Duration::from_millis(250);
/// A webhook whose remote time is no later than ferry's last push through
/// the link plus this margin (clock skew, one-second remote clocks) may be
/// the late echo of an older push: its payload is not trusted, the record
/// is re-fetched.
const ECHO_WINDOW_MS: i64 = 2_000;
/// How often an event waiting behind an open conflict is looked at again.
const HELD_RECHECK_MS: i64 = 5_000;
/// How often a decision is retaken when the customer changed under it.
const RACE_RETRIES: usize = 5;

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

/// Canonical record → the fields a customer write takes. `None` when the
/// record has no usable email (a customer needs one).
pub(crate) fn fields_of(record: &serde_json::Value) -> Option<CustomerFields> {
    let text = |key: &str| {
        record
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let email = text("email")?.to_lowercase();
    let address = record
        .get("address")
        .filter(|a| a.is_object())
        .and_then(|a| serde_json::from_value::<Address>(strip_empty(a)).ok())
        .filter(|a| *a != Address::default());
    let metadata = record
        .get("metadata")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    Some(CustomerFields {
        name: text("name"),
        email,
        phone: text("phone"),
        address,
        metadata,
    })
}

/// Drops empty strings and unknown keys from an address object.
fn strip_empty(address: &serde_json::Value) -> serde_json::Value {
    let mut clean = serde_json::Map::new();
    for key in ["line1", "line2", "city", "state", "postal_code", "country"] {
        if let Some(value) = address
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
        {
            clean.insert(key.to_owned(), value.into());
        }
    }
    serde_json::Value::Object(clean)
}

pub(crate) fn local_record(customer: &Customer) -> Result<serde_json::Value, StoreError> {
    Ok(canonical_record(&serde_json::to_value(customer)?))
}

impl SyncEngine {
    /// Applies inbox events until cancelled, in arrival order.
    pub async fn run_inbox(self, cancel: CancellationToken) {
        loop {
            let (token, until) = self.lease();
            let grace_ms = i64::try_from(self.inner.inbox_grace.as_millis()).unwrap_or(i64::MAX);
            let claimed = self
                .inner
                .store
                .claim_due_inbox(&token, until, INBOX_BATCH, grace_ms)
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
            let busy = !claimed.is_empty();
            self.apply_in_record_order(claimed).await;
            if busy {
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.inner.inbox_wake.notified() => {}
                () = tokio::time::sleep(INBOX_POLL) => {}
            }
        }
    }

    /// Applies the inbox events a bus batch announced, in order (cluster
    /// mode); events not due or held elsewhere are left to their owner and
    /// the inbox loop.
    pub async fn apply_inbox_seqs(&self, seqs: &[i64]) -> Result<(), StoreError> {
        let (token, until) = self.lease();
        let claimed = self
            .inner
            .store
            .claim_inbox_seqs(seqs, &token, until)
            .await?;
        self.apply_in_record_order(claimed).await;
        Ok(())
    }

    /// Applies claimed events (in arrival order): the events of one remote
    /// record one after another, in order, and different records at once,
    /// up to `concurrency`. Records that meet in one customer (the same
    /// email, or linked to it from two connectors) are safe to run together:
    /// the customer write checks its version and the live-email index, and a
    /// loser decides again.
    async fn apply_in_record_order(&self, claimed: Vec<InboxEvent>) {
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
        futures::stream::iter(groups)
            .for_each_concurrent(self.inner.concurrency, |group| async move {
                for event in group {
                    self.apply_inbox_event(event).await;
                }
            })
            .await;
    }

    /// Wakes the inbox loop (a webhook stored events).
    pub fn wake_inbox(&self) {
        self.inner.inbox_wake.notify_one();
    }

    /// Runs one inbound step and records its outcome.
    #[tracing::instrument(skip_all, fields(
        connector = %event.connector,
        event_id = %event.event_id,
        remote_id = %event.remote_id,
        correlation_id = event.correlation_id.as_deref().unwrap_or(""),
    ))]
    pub async fn apply_inbox_event(&self, event: InboxEvent) -> InboundOutcome {
        for _ in 0..RACE_RETRIES {
            match self.try_apply(&event).await {
                Ok(Some(outcome)) => return outcome,
                // The customer changed while we decided: decide again.
                Ok(None) => continue,
                Err(error) => return self.inbound_failed(&event, error).await,
            }
        }
        self.inbound_failed(&event, Failure::Retry("the customer kept changing".into()))
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
            .finish_inbox(event, "skipped", reason, None, None)
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
    async fn try_apply(&self, event: &InboxEvent) -> Result<Option<InboundOutcome>, Failure> {
        let inner = &self.inner;
        if event.entity != super::ENTITY {
            return self.skip(event, "entity not synced").await;
        }
        if let Some(key) = &event.origin_key {
            if key.starts_with(&format!("ferry-{}-", event.connector)) {
                return self
                    .skip(event, "echo of ferry's own push (idempotency key)")
                    .await;
            }
        }
        let link = inner
            .store
            .link_by_remote_id(&event.connector, &event.remote_id)
            .await?;
        if let Some(held_by) = link.as_ref().and_then(|l| l.held_by.as_deref()) {
            // A person resolves the conflict first; then the event applies.
            let detail = format!("waiting: the link is held by open conflict {held_by}");
            let at = now_ms() + HELD_RECHECK_MS;
            self.inner
                .store
                .finish_inbox(event, "pending", &detail, Some(at), None)
                .await?;
            return Ok(Some(InboundOutcome::Deferred));
        }
        if let Some(link) = &link {
            if event.occurred_at_ms < link.remote_seen_at_ms {
                return self
                    .skip(event, "stale: older than a change already applied")
                    .await;
            }
        }
        let mut record = event.record.as_ref().map(|r| r.0.clone());
        // The payload may not be the newest state: the same remote tick as
        // the last applied event (Stripe's clock has one-second resolution,
        // so their order is unknown), or no later than ferry's own last push
        // (a late echo of an older push). Ask the remote what holds now.
        let doubtful = link.as_ref().is_some_and(|l| {
            event.occurred_at_ms == l.remote_seen_at_ms
                || (l.pushed_at_ms > 0 && event.occurred_at_ms <= l.pushed_at_ms + ECHO_WINDOW_MS)
        });
        if doubtful && event.kind == "upsert" {
            record = Some(self.fetch_current(event).await?);
        }
        if event.kind == "delete" {
            return self.apply_delete(event, link).await;
        }
        let Some(remote) = record.map(|r| canonical_record(&r)) else {
            return self.skip(event, "the event carries no record").await;
        };

        let (customer, base) = match &link {
            Some(link) => match inner.store.get_customer_any(&link.customer_id).await? {
                Some(customer) if customer.deleted_at.is_none() => {
                    (Some(customer), link.snapshot.clone())
                }
                Some(_) => return self.skip(event, "the customer was deleted locally").await,
                None => return self.skip(event, "the linked customer does not exist").await,
            },
            None => (self.customer_by_email(&remote).await?, None),
        };
        let Some(customer) = customer else {
            let Some(fields) = fields_of(&remote) else {
                return Err(Failure::Permanent(
                    "the remote record has no email; a customer needs one".into(),
                ));
            };
            return self
                .write(InboundChange {
                    event: event.clone(),
                    customer: CustomerWrite::Create(fields),
                    link_customer: None,
                    snapshot: Some(remote),
                    remote_has_result: true,
                    outcome: "applied",
                    detail: Some("created from the remote record".into()),
                    conflict: None,
                })
                .await;
        };

        let local = local_record(&customer)?;
        let merged = merge(
            Sides {
                base: base.as_ref(),
                local: &local,
                remote: &remote,
                local_changed_at_ms: customer.updated_at.timestamp_millis(),
                remote_changed_at_ms: event.occurred_at_ms,
            },
            inner.conflict_policy,
        );
        let conflict = (!merged.conflicts.is_empty()).then(|| NewConflict {
            policy: serde_json::to_value(inner.conflict_policy)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            fields: serde_json::to_value(&merged.conflicts).unwrap_or_default(),
            open: merged.has_pending_conflicts(),
        });
        let Some(fields) = fields_of(&merged.merged) else {
            return Err(Failure::Permanent("the merged record has no email".into()));
        };
        // The remote holds the result when nothing local survived the merge.
        let remote_has_result = merged.local_changed.is_empty() && conflict.is_none();
        let change = if merged.changes_local(&local) {
            CustomerWrite::Update {
                id: customer.id.clone(),
                expected_version: customer.version,
                fields,
            }
        } else {
            CustomerWrite::None
        };
        let detail = match (&change, base.is_none(), &conflict) {
            (_, _, Some(_)) => format!(
                "merged with {} conflicting field(s)",
                merged.conflicts.len()
            ),
            (CustomerWrite::None, true, None) => {
                "linked to the customer with the same email".to_owned()
            }
            (CustomerWrite::None, false, None) => {
                "echo: the remote matches the local state".to_owned()
            }
            (_, true, None) => "linked by email and updated".to_owned(),
            (_, false, None) => format!("updated: {}", merged.remote_changed.join(", ")),
        };
        self.write(InboundChange {
            event: event.clone(),
            customer: change,
            link_customer: Some(customer.id.clone()),
            snapshot: Some(remote),
            remote_has_result,
            outcome: "applied",
            detail: Some(detail),
            conflict,
        })
        .await
    }

    async fn apply_delete(
        &self,
        event: &InboxEvent,
        link: Option<crate::store::SyncLink>,
    ) -> Result<Option<InboundOutcome>, Failure> {
        let Some(link) = link else {
            return self
                .skip(event, "delete of a remote record ferry never linked")
                .await;
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
            customer,
            link_customer: Some(customer_id),
            snapshot: None,
            remote_has_result: true,
            outcome: "applied",
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
                self.inner.wake.notify_one();
                Ok(Some(InboundOutcome::Applied { customer_id }))
            }
            Ok(Applied::Raced) => Ok(None),
            Ok(Applied::LeaseLost) => Ok(Some(InboundOutcome::LeaseLost)),
            Err(StoreError::EmailTaken) => Ok(None),
            Err(StoreError::RemoteIdTaken) => Err(Failure::Permanent(
                "the local customer is already linked to another remote record".into(),
            )),
            Err(error) => Err(error.into()),
        }
    }

    async fn customer_by_email(
        &self,
        remote: &serde_json::Value,
    ) -> Result<Option<Customer>, Failure> {
        let Some(fields) = fields_of(remote) else {
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

    async fn fetch_current(&self, event: &InboxEvent) -> Result<serde_json::Value, Failure> {
        // Accepted while the connector was enabled: finish it even if the
        // connector was disabled since.
        let ready = self
            .inner
            .registry
            .loaded(&event.connector)
            .ok_or_else(|| Failure::Retry("connector not loaded".into()))?;
        let (connector, config) = (ready.connector, ready.config);
        match connector
            .fetch(&config, super::ENTITY, &event.remote_id)
            .await
        {
            Ok(remote) => serde_json::from_str(&remote.record).map_err(|e| {
                Failure::Permanent(format!("the connector returned invalid JSON: {e}"))
            }),
            Err(CallError::Connector(ConnectorError::NotFound(_))) => Err(Failure::Permanent(
                "the remote record no longer exists".into(),
            )),
            Err(CallError::Connector(
                ConnectorError::Permanent(m) | ConnectorError::Unauthorized(m),
            )) => Err(Failure::Permanent(m)),
            Err(error) => Err(Failure::Retry(error.to_string())),
        }
    }

    async fn inbound_failed(&self, event: &InboxEvent, failure: Failure) -> InboundOutcome {
        let attempt = u32::try_from(event.attempts + 1).unwrap_or(u32::MAX);
        let (state, detail, next) = match failure {
            Failure::Permanent(message) => ("dead", message, None),
            Failure::Retry(message) if self.inner.policy.exhausted(attempt) => (
                "dead",
                format!("gave up after {attempt} attempts: {message}"),
                Some(now_ms()),
            ),
            Failure::Retry(message) => {
                let delay = self.inner.policy.delay(attempt, None);
                let at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                ("retry", message, Some(at))
            }
        };
        tracing::warn!(state, detail, "inbound event failed");
        match self
            .inner
            .store
            .finish_inbox(event, state, &detail, next, None)
            .await
        {
            Ok(true) if state == "dead" => InboundOutcome::DeadLettered { reason: detail },
            Ok(true) => InboundOutcome::RetryScheduled,
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
    /// Will never work as it is: dead letter.
    Permanent(String),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        Self::Retry(format!("store: {:#}", anyhow::Error::from(error)))
    }
}

/// The policies inbound sync applies.
#[derive(Debug, Clone, Copy)]
pub struct InboundPolicies {
    /// Remote deletes.
    pub delete: DeletePolicy,
    /// Fields changed differently on both sides.
    pub conflict: ConflictPolicy,
}
