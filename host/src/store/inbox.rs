//! The webhook inbox and the one transaction that applies a remote change:
//! the customer write, its outbox event (tagged with the connector it came
//! from, so it is not pushed back there), the link, the inbox row's outcome
//! and any conflict.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use utoipa::ToSchema;

use super::customers::{columns, CustomerRow};
use super::DeadLetterKind;
use super::{dispatch, now, stored_names, Customer, CustomerFields, CustomerId, Store, StoreError};
use super::{now_ms, Backend, SyncLink};

/// `published_at_ms` of an event a replica without a bus stored: handed
/// over to no bus, so no inbox loop waits for one to deliver it (see
/// [`super::StoreOptions::inbox_bus`]). A published event holds the time
/// the broker acknowledged it.
pub const NO_BUS: i64 = 0;

/// What a remote event did to its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RemoteChange {
    /// Created or changed.
    Upsert,
    /// Deleted.
    Delete,
}

stored_names!(RemoteChange { Upsert => "upsert", Delete => "delete" });

/// Where an inbox event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InboxState {
    /// Waiting to be applied (or behind an open conflict).
    Pending,
    /// Failed; applied again when due.
    Retry,
    /// Applied to the catalog.
    Applied,
    /// Nothing to apply (an echo, stale, another entity…).
    Skipped,
    /// Given up: see its dead letter.
    Dead,
}

stored_names!(InboxState {
    Pending => "pending",
    Retry => "retry",
    Applied => "applied",
    Skipped => "skipped",
    Dead => "dead",
});

/// How an inbox event ends without a change being applied.
#[derive(Debug, Clone, Copy)]
pub enum InboxFinish<'a> {
    /// Nothing to apply; why.
    Skipped(&'a str),
    /// Waits, without using an attempt, until `at_ms` (a connector not
    /// loaded, the remote asking to wait); why.
    Deferred {
        /// Why it waits.
        detail: &'a str,
        /// When it is looked at again, unix ms.
        at_ms: i64,
    },
    /// Waits, without using an attempt, until a person resolves the open
    /// conflict that holds its link; looked at again at `at_ms`. The
    /// backlog's age leaves it out: it waits on a person, not on ferry.
    Held {
        /// The conflict.
        conflict: &'a str,
        /// When it is looked at again, unix ms.
        at_ms: i64,
    },
    /// Failed; tried again at `at_ms`.
    Retry {
        /// The error.
        error: &'a str,
        /// When, unix ms.
        at_ms: i64,
    },
    /// Given up, with a dead letter.
    Dead {
        /// The error.
        error: &'a str,
        /// Why it was given up.
        kind: DeadLetterKind,
    },
}

/// An event to store, as a connector parsed it.
#[derive(Debug, Clone)]
pub struct NewInboxEvent {
    /// The remote's event id.
    pub event_id: String,
    /// Entity type.
    pub entity: String,
    /// What the event did to its record.
    pub kind: RemoteChange,
    /// The remote record's id.
    pub remote_id: String,
    /// When the remote says it happened.
    pub occurred_at_ms: i64,
    /// The record, canonical JSON.
    pub record: Option<serde_json::Value>,
    /// The idempotency key of the request that caused it, if reported.
    pub origin_key: Option<String>,
    /// The remote's own event type.
    pub remote_type: String,
    /// A conflict policy (its `snake_case` name) to apply this event with
    /// instead of the configured one; set by reconciliation repairs.
    pub policy: Option<String>,
}

/// An inbox event the relay has not published yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unpublished {
    /// Arrival order: the message's payload.
    pub seq: i64,
    /// The connector it came through.
    pub connector: String,
    /// The remote record's id: with the connector, the message's key.
    pub remote_id: String,
    /// Where it stands: one settled already is not published.
    #[sqlx(try_from = "String")]
    pub state: InboxState,
}

/// One inbox row.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct InboxEvent {
    /// Arrival order.
    pub seq: i64,
    /// The connector it came through.
    pub connector: String,
    /// The remote's event id.
    pub event_id: String,
    /// Entity type.
    pub entity: String,
    /// What the event did to its record.
    #[sqlx(try_from = "String")]
    pub kind: RemoteChange,
    /// The remote record's id.
    pub remote_id: String,
    /// When the remote says it happened, unix ms.
    pub occurred_at_ms: i64,
    /// The record, canonical JSON.
    #[schema(value_type = Option<Object>)]
    pub record: Option<Json<serde_json::Value>>,
    /// The idempotency key of the request that caused it.
    pub origin_key: Option<String>,
    /// The remote's own event type.
    pub remote_type: String,
    /// Where it stands.
    #[sqlx(try_from = "String")]
    pub state: InboxState,
    /// Failed attempts.
    pub attempts: i32,
    /// Why it was skipped, or the last error.
    pub detail: Option<String>,
    /// The local customer it was applied to.
    pub customer_id: Option<String>,
    /// Request id of the webhook delivery.
    pub correlation_id: Option<String>,
    /// The lease that claimed it.
    #[serde(skip)]
    pub lease_token: Option<String>,
    /// When it arrived.
    pub received_at: DateTime<Utc>,
    /// The conflict policy it is applied with, if not the configured one.
    #[serde(skip)]
    pub policy: Option<String>,
    /// The open conflict it was parked behind, if it was.
    #[serde(skip)]
    pub held_by: Option<String>,
}

pub(crate) const INBOX_COLUMNS: &str =
    "seq, connector, event_id, entity, kind, remote_id, occurred_at_ms, \
     record, origin_key, remote_type, state, attempts, detail, customer_id, correlation_id, \
     lease_token, received_at, policy, held_by";

/// What applying a remote change does to the customer.
#[derive(Debug, Clone)]
pub enum CustomerWrite {
    /// Nothing (the link and the inbox row still change).
    None,
    /// A new customer from the remote record.
    Create(CustomerFields),
    /// New field values for an existing customer at `expected_version`.
    Update {
        /// The customer.
        id: CustomerId,
        /// Its version when the merge was computed.
        expected_version: i64,
        /// The merged fields.
        fields: CustomerFields,
    },
    /// Soft-delete an existing customer at `expected_version`.
    Delete {
        /// The customer.
        id: CustomerId,
        /// Its version when the decision was made.
        expected_version: i64,
    },
}

/// A field-level conflict to record with the change.
#[derive(Debug, Clone)]
pub struct NewConflict {
    /// The policy that was applied.
    pub policy: String,
    /// The conflicting fields (JSON array).
    pub fields: serde_json::Value,
    /// Whether a person must resolve it (`flag`).
    pub open: bool,
}

/// The remote record's link as a decision read it, for the write to find
/// unchanged. Two inbox loops can hold events of one record: if the other
/// applied one between this decision's read of the link and its read of
/// the customer, the customer looks changed since the link's snapshot and
/// the merge takes the other event's values for a local change. That
/// write moved the link on (a later `remote_seen_at_ms`, or the customer
/// version it wants), so the change decides again instead. A write that
/// only opened a conflict, of an event in the same remote tick, moves
/// neither: whether the link is held is compared too, or the second
/// event was applied on a held link, replaced its snapshot and took the
/// hold over, leaving the first conflict holding nothing. Nor does a
/// delete under `unlink` (it only marks the record deleted): an upsert of
/// the same tick decided on the live link wrote it live again, and the
/// next local change was pushed as an update of a record that is gone.
/// Nor does a push recorded as delivered meanwhile: it moves the
/// snapshot on (to what ferry sent), and the change, decided on the
/// snapshot before it, put that older one back (a later edit then met a
/// base that was no longer the remote's, and made a false conflict). The
/// push's time is compared too; decided again, the event is older than
/// the push, and the record is read afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct LinkRead {
    /// When the newest remote change applied to the link happened.
    pub remote_seen_at_ms: i64,
    /// The customer version the link wants the remote to hold.
    pub wanted_version: i64,
    /// Whether an open conflict holds the link.
    pub held: bool,
    /// Whether the remote record's delete was applied.
    pub remote_deleted: bool,
    /// When ferry's last push to the record was recorded as delivered.
    pub pushed_at_ms: i64,
}

impl From<&SyncLink> for LinkRead {
    fn from(link: &SyncLink) -> Self {
        Self {
            remote_seen_at_ms: link.remote_seen_at_ms,
            wanted_version: link.wanted_version,
            held: link.held_by.is_some(),
            remote_deleted: link.remote_deleted,
            pushed_at_ms: link.pushed_at_ms,
        }
    }
}

/// The link of `(connector, remote id)` as [`LinkRead`] compares it. The
/// group's links are locked already ([`GROUP_LINKS_POSTGRES`]).
const LINK_READ: &str =
    "SELECT remote_seen_at_ms, wanted_version, held_by IS NOT NULL AS held, remote_deleted, \
     pushed_at_ms FROM sync_links WHERE connector = $1 AND remote_id = $2";

/// The links of a group of changes' remote records (`$1`:
/// [`group_records`], one text for both backends, which the savepoint
/// path's generic body needs) as [`LinkRead`] compares them. On
/// PostgreSQL they are locked until the transaction ends, in (customer,
/// connector) order, the order the relay's intake and the push outcomes
/// lock links in too,
/// before any change of the group locks a link or a customer: every
/// inbound write locks its links first and in one order (the batch takes
/// the same lock with arrays, faster on its hot path), so two loops'
/// groups that share records wait for each other instead of deadlocking.
/// SQLite's one writer holds the database already.
const GROUP_LINKS_POSTGRES: &str =
    "SELECT connector, remote_id, remote_seen_at_ms, wanted_version, held_by IS NOT NULL, \
     remote_deleted, pushed_at_ms FROM sync_links WHERE (connector, remote_id) IN \
     (SELECT value ->> 0, value ->> 1 FROM jsonb_array_elements($1::jsonb)) \
     ORDER BY customer_id COLLATE \"C\", connector COLLATE \"C\" FOR NO KEY UPDATE";
pub(super) const GROUP_LINKS_SQLITE: &str =
    "SELECT connector, remote_id, remote_seen_at_ms, wanted_version, held_by IS NOT NULL, \
     remote_deleted, pushed_at_ms FROM json_each($1) JOIN sync_links ON connector = value ->> 0 AND remote_id = value ->> 1";

/// On PostgreSQL, before a group's links are read: the remote records of
/// its changes decided with no link (`$1`: [`unlinked_records`]) are
/// locked for the transaction, in one order. A link another transaction
/// is writing for such a record (two events of one record no link held, in
/// two loops' claims) has no row to lock yet: the read saw none, the change
/// wrote the customer, and its link upsert then waited for that link and
/// took it over, an older event's values and snapshot over a newer one's.
/// Waiting here, in a statement of its own, the read that follows sees
/// that link, and the change decides again. The lock goes with the
/// transaction; SQLite's one writer holds the database already. (A
/// connector's name has no space: the key is one record's alone.)
pub(super) const LOCK_UNLINKED_POSTGRES: &str =
    "SELECT pg_advisory_xact_lock(key) FROM (SELECT DISTINCT \
     hashtextextended((value ->> 0) || ' ' || (value ->> 1), 0) AS key \
     FROM jsonb_array_elements($1::jsonb) ORDER BY key) AS keys";

/// The remote records of `changes` decided with no link, as
/// [`group_records`] gives them; `None` if every one had a link.
pub(super) fn unlinked_records(
    changes: &[InboundChange],
) -> Result<Option<String>, serde_json::Error> {
    let mut unlinked = changes.iter().filter(|c| c.link_read.is_none()).peekable();
    if unlinked.peek().is_none() {
        return Ok(None);
    }
    records_json(unlinked).map(Some)
}

/// The changes' remote records as a JSON array of `[connector, remote id]`.
pub(super) fn group_records(changes: &[InboundChange]) -> Result<String, serde_json::Error> {
    records_json(changes.iter())
}

/// `changes`' remote records as a JSON array of `[connector, remote id]`.
fn records_json<'a>(
    changes: impl Iterator<Item = &'a InboundChange>,
) -> Result<String, serde_json::Error> {
    serde_json::to_string(
        &changes
            .map(|c| [c.event.connector.as_str(), c.event.remote_id.as_str()])
            .collect::<Vec<_>>(),
    )
}

/// Whether `change` links a record no link held to a customer it does
/// not write (matched by email, nothing to change): that customer must
/// still be live when it commits. A delete since the decision read it
/// (whose push found no record and settled the link) left the record
/// linked to a deleted customer, and its every change skipped for good;
/// decided again, the record makes a customer of its own.
pub(super) fn links_to_a_customer_unwritten(change: &InboundChange) -> bool {
    matches!(change.customer, CustomerWrite::None)
        && change.link_read.is_none()
        && change.link_remote
        && change.link_customer.is_some()
}

/// Everything one applied remote change writes, in one transaction.
#[derive(Debug, Clone)]
pub struct InboundChange {
    /// The claimed inbox event.
    pub event: InboxEvent,
    /// The link of the event's remote record the decision read (`None`:
    /// no link held it), which the write checks (see [`LinkRead`]).
    pub link_read: Option<LinkRead>,
    /// The customer write.
    pub customer: CustomerWrite,
    /// The local customer the link belongs to (for `None` and `Update` and
    /// `Delete`; a `Create` links the new customer).
    pub link_customer: Option<CustomerId>,
    /// A customer whose link to this remote record moves to
    /// `link_customer` (a duplicate email merged into its owner).
    pub unlink_customer: Option<CustomerId>,
    /// A live record of the same connector that `link_customer`'s link
    /// holds and this change means to replace (the duplicate-email policy
    /// `merge`: the event's record now stands for the customer). Any other
    /// live record found there when the change is written means deciding
    /// again: two records of one email applied at once must not take the
    /// link from each other.
    pub releases: Option<String>,
    /// Whether the remote record is linked to `link_customer` (false: a
    /// flagged duplicate, recorded as a conflict on the customer that has
    /// its email and left unlinked).
    pub link_remote: bool,
    /// The remote state to keep as the last synced snapshot.
    pub snapshot: Option<serde_json::Value>,
    /// Whether the remote already holds the result (nothing to push back).
    pub remote_has_result: bool,
    /// Push this version of the customer to the connector again, under a
    /// new idempotency key: the remote lacks a value the merge kept and no
    /// new version will carry it (see [`Store::force_push`]).
    pub push_back: Option<i64>,
    /// How it was applied (a merge, a conflict…).
    pub detail: Option<String>,
    /// A conflict to record.
    pub conflict: Option<NewConflict>,
}

/// What [`Store::apply_inbound`] did.
#[derive(Debug)]
pub enum Applied {
    /// Done; the customer as written (if it was written).
    Done(Option<Box<Customer>>),
    /// The customer changed since the decision: decide again.
    Raced,
    /// The lease on the inbox row was lost.
    LeaseLost,
}

/// How a remote change updates an existing link: the new remote id and
/// snapshot, and the synced version, the wanted version and the remote
/// time only forward. Moving `wanted_version` here, as an inserted link
/// already has it, leaves the relay's intake of the same change nothing to
/// write on this link (one row version fewer per inbound event), and the
/// intake leaves the source connector's link to the apply (see
/// [`super::links::ChangeNotice`]). So a version the remote lacks (a local
/// value survived the merge) re-opens a synced or dead-lettered link here,
/// as the intake would; a link inserted at a version it has not synced
/// starts pending. A new snapshot forgets the hash of ferry's last push:
/// the remote may hold other values now, so a later version with that
/// push's content is pushed, not skipped as unchanged. It leaves `remote`
/// in its place (no hash matches it), which still says the last push was
/// delivered: the snapshot is the remote's state, and the next update may
/// name only the fields it changes. A link an event inserts with a
/// snapshot starts so too (no push of ferry's is out on a link that did
/// not exist), and so does one the event moves to another record, or
/// gives its first (a link that waited with no record, a customer made
/// while the connector was off): no push of ferry's went to that record.
/// A hash already forgotten on the same record (a push whose outcome is
/// unknown, a timeout's) stays so: that push may land yet. A link that holds
/// another live record of the connector is left alone (no row written):
/// the change decides again (see [`InboundChange::releases`]). A link
/// that moves to another record takes that record's date: kept, the old
/// record's newest date made the new one's changes dated before it stale.
/// A dead link reopened waits for its last update to settle, as intake
/// does (see `FORCE_PUSH_SQL`).
macro_rules! link_upsert_on_conflict {
    () => {
        "ON CONFLICT (customer_id, connector) DO UPDATE SET remote_id = excluded.remote_id, \
         remote_deleted = excluded.remote_deleted, \
         state = CASE WHEN excluded.wanted_version > excluded.synced_version \
            AND excluded.wanted_version > sync_links.synced_version \
            AND sync_links.state IN ('synced', 'dead') THEN 'pending' ELSE sync_links.state END, \
         attempts = CASE WHEN excluded.wanted_version > excluded.synced_version \
            AND excluded.wanted_version > sync_links.synced_version \
            AND sync_links.state IN ('synced', 'dead') THEN 0 ELSE sync_links.attempts END, \
         next_attempt_at_ms = CASE WHEN excluded.wanted_version > excluded.synced_version \
            AND excluded.wanted_version > sync_links.synced_version \
            AND sync_links.state IN ('synced', 'dead') THEN \
              (CASE WHEN sync_links.state = 'dead' \
                AND sync_links.next_attempt_at_ms > excluded.next_attempt_at_ms \
              THEN sync_links.next_attempt_at_ms ELSE excluded.next_attempt_at_ms END) \
            ELSE sync_links.next_attempt_at_ms END, \
         snapshot = COALESCE(excluded.snapshot, sync_links.snapshot), \
         pushed_hash = CASE WHEN excluded.snapshot IS NULL THEN sync_links.pushed_hash \
            WHEN sync_links.remote_id IS NULL OR sync_links.remote_id <> excluded.remote_id \
              THEN 'remote' \
            WHEN sync_links.pushed_hash IS NULL THEN NULL ELSE 'remote' END, \
         synced_version = CASE WHEN excluded.synced_version > sync_links.synced_version \
            THEN excluded.synced_version ELSE sync_links.synced_version END, \
         remote_seen_at_ms = CASE WHEN excluded.remote_seen_at_ms > sync_links.remote_seen_at_ms \
            OR sync_links.remote_id IS NULL OR sync_links.remote_id <> excluded.remote_id \
            THEN excluded.remote_seen_at_ms ELSE sync_links.remote_seen_at_ms END, \
         wanted_version = CASE WHEN excluded.wanted_version > sync_links.wanted_version \
            THEN excluded.wanted_version ELSE sync_links.wanted_version END, \
         correlation_id = CASE WHEN excluded.wanted_version > sync_links.wanted_version \
            THEN excluded.correlation_id ELSE sync_links.correlation_id END, \
         updated_at = excluded.updated_at \
         WHERE sync_links.remote_id IS NULL OR sync_links.remote_deleted \
            OR sync_links.remote_id = excluded.remote_id"
    };
}
pub(super) use link_upsert_on_conflict;

impl Store {
    /// Stores several deliveries in ONE transaction (group commit: webhooks
    /// arriving together share the fsync). Returns, per delivery, how many
    /// events were new.
    #[tracing::instrument(skip_all, fields(deliveries = deliveries.len()))]
    pub async fn store_inbox_many(
        &self,
        deliveries: &[(&str, &[NewInboxEvent], Option<&str>)],
    ) -> Result<Vec<usize>, StoreError> {
        let at = now();
        let stored = super::inbound_batch::store_inbox(self, deliveries, at).await?;
        if stored.iter().any(|n| *n > 0) {
            // With a bus the relay's inbox loop publishes them first (woken
            // by `stored_inbox`; its changes loop has nothing to do with
            // them); the inbox loop applies them.
            self.stored_inbox();
            self.committed_inbox();
        }
        Ok(stored)
    }

    /// Claims up to `limit` due, free inbox events, oldest due first,
    /// returned in arrival order. A fresh `pending` event is only taken once
    /// it has waited `grace_ms` (cluster mode: Kafka delivers fresh events
    /// in order; this loop takes retries and what the bus did not deliver).
    /// One that was looked at already (`detail` says why it waits: a
    /// conflict's hold, a connector not loaded; or a replayed dead letter)
    /// is not on the bus again, and is taken as soon as it is due.
    ///
    /// The order is the `inbox_due` index's, `(next_attempt_at_ms, seq)`,
    /// so a claim reads its `limit` rows and stops; ordered by `seq` alone
    /// it read and sorted the whole due backlog (11.8 ms a claim at 27k
    /// pending, docs/performance.md). A fresh event is due when it arrives,
    /// so fresh events still go in arrival order; a retry goes when it is
    /// due, as before. Events of one remote record that meet in a claim
    /// are applied in `seq` order, and a stale one is skipped.
    ///
    /// Only rows due at `from_ms` or later are read (`i64::MIN`: all of
    /// them). On PostgreSQL the index keeps an entry for every row applied
    /// since the last vacuum, in front of the live ones; a loop that starts
    /// where its last claim did reads past its own and its peers' recent
    /// rows, not the whole day's (docs/performance.md, round 9).
    pub async fn claim_due_inbox(
        &self,
        lease_token: &str,
        lease_until_ms: i64,
        limit: u32,
        grace_ms: i64,
        from_ms: i64,
    ) -> Result<Vec<InboxEvent>, StoreError> {
        let now = now_ms();
        // The BETWEEN is the index's range; the CASE only filters in it.
        // An event stored where no bus runs gets no grace: none will carry it.
        let sql = format!(
            "UPDATE inbox SET lease_until_ms = $1, lease_token = $2 WHERE seq IN \
             (SELECT seq FROM inbox WHERE state IN ('pending', 'retry') \
             AND next_attempt_at_ms BETWEEN $6 AND $3 \
             AND next_attempt_at_ms <= (CASE WHEN state = 'pending' AND detail IS NULL \
                AND published_at_ms IS DISTINCT FROM {NO_BUS} THEN $3 - $5 ELSE $3 END) \
             AND lease_until_ms < $3 ORDER BY next_attempt_at_ms, seq LIMIT $4{}) RETURNING {INBOX_COLUMNS}",
            if matches!(self.backend, Backend::Postgres(_)) {
                " FOR UPDATE SKIP LOCKED"
            } else {
                ""
            }
        );
        let mut rows: Vec<InboxEvent> = dispatch!(self, write pool => {
            sqlx::query_as(&sql)
                .bind(lease_until_ms)
                .bind(lease_token)
                .bind(now)
                .bind(i64::from(limit))
                .bind(grace_ms)
                .bind(from_ms)
                .fetch_all(pool)
                .await?
        });
        rows.sort_by_key(|e| e.seq);
        Ok(rows)
    }

    /// Claims the given inbox events if they are due and free, in `seq`
    /// order (cluster mode: the ones a Kafka batch announced). A fresh
    /// event is due however this replica's clock compares with the one
    /// that received it: its `next_attempt_at_ms` is that replica's
    /// arrival time, and a consumer whose clock runs behind would
    /// otherwise leave it to the inbox loops' grace.
    pub async fn claim_inbox_seqs(
        &self,
        seqs: &[i64],
        lease_token: &str,
        lease_until_ms: i64,
    ) -> Result<Vec<InboxEvent>, StoreError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE inbox SET lease_until_ms = $1, lease_token = $2 WHERE seq = $3 \
             AND state IN ('pending', 'retry') AND lease_until_ms < $4 \
             AND (next_attempt_at_ms <= $4 OR (state = 'pending' AND detail IS NULL)) \
             RETURNING {INBOX_COLUMNS}"
        );
        // Row locks in rising seq order, the relay's marks' order: a
        // batch spanning partitions comes in partition order (14, then
        // 11), and a claim locking 14 while the relay's mark held 11 and
        // wanted 14 was a deadlock PostgreSQL broke after a second by
        // aborting one of them.
        let mut ordered = seqs.to_vec();
        ordered.sort_unstable();
        ordered.dedup();
        let mut claimed = Vec::with_capacity(ordered.len());
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            for seq in &ordered {
                let row: Option<InboxEvent> = sqlx::query_as(&sql)
                    .bind(lease_until_ms)
                    .bind(lease_token)
                    .bind(seq)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                claimed.extend(row);
            }
            tx.commit().await?;
        });
        Ok(claimed)
    }

    /// Inbox events not yet published to the bus, in arrival order: what
    /// the relay publishes of each, not its record (up to 1 MiB each, read
    /// and parsed for nothing, every second while the topic refuses them).
    pub async fn unpublished_inbox(&self, limit: u32) -> Result<Vec<Unpublished>, StoreError> {
        let rows = dispatch!(self, write pool => {
            sqlx::query_as(
                "SELECT seq, connector, remote_id, state FROM inbox \
                 WHERE published_at_ms IS NULL ORDER BY seq LIMIT $1",
            )
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// Marks inbox events published (after the broker acknowledged them).
    pub async fn mark_inbox_published(&self, seqs: &[i64]) -> Result<(), StoreError> {
        self.set_inbox_published(seqs, now_ms()).await
    }

    /// Marks inbox events the relay found settled already (applied,
    /// skipped or dead-lettered by the inbox loops while the broker was
    /// away) as handed over to no bus ([`NO_BUS`]): nothing is left for a
    /// consumer to do with them.
    pub async fn mark_inbox_unsent(&self, seqs: &[i64]) -> Result<(), StoreError> {
        self.set_inbox_published(seqs, NO_BUS).await
    }

    async fn set_inbox_published(&self, seqs: &[i64], at: i64) -> Result<(), StoreError> {
        // In rising seq order, as claims lock (see
        // [`Store::claim_inbox_seqs`]).
        let mut ordered = seqs.to_vec();
        ordered.sort_unstable();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            for seq in &ordered {
                sqlx::query("UPDATE inbox SET published_at_ms = $1 WHERE seq = $2")
                    .bind(at)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Ends an inbox event without applying anything (see
    /// [`InboxFinish`]); false when another worker holds it now.
    pub async fn finish_inbox(
        &self,
        event: &InboxEvent,
        finish: InboxFinish<'_>,
    ) -> Result<bool, StoreError> {
        let at = now();
        let held;
        let (state, detail, next_attempt_at_ms, held_by) = match finish {
            InboxFinish::Skipped(reason) => (InboxState::Skipped, reason, None, None),
            InboxFinish::Deferred { detail, at_ms } => {
                (InboxState::Pending, detail, Some(at_ms), None)
            }
            InboxFinish::Held { conflict, at_ms } => {
                held = format!("waiting: the link is held by open conflict {conflict}");
                (
                    InboxState::Pending,
                    held.as_str(),
                    Some(at_ms),
                    Some(conflict),
                )
            }
            InboxFinish::Retry { error, at_ms } => (InboxState::Retry, error, Some(at_ms), None),
            InboxFinish::Dead { error, .. } => (InboxState::Dead, error, None, None),
        };
        let attempts = if matches!(state, InboxState::Retry | InboxState::Dead) {
            event.attempts + 1
        } else {
            event.attempts
        };
        let postgres = matches!(self.backend, Backend::Postgres(_));
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            if let (InboxFinish::Held { conflict, .. }, true) = (&finish, postgres) {
                // A resolution of the conflict under way either commits
                // before the check below reads the conflict (it is then
                // closed there), or waits for this park to commit (its
                // wake then sees the event held). Without the lock, a
                // resolution committing in between missed it: held until
                // its next look. (SQLite runs one writer at a time.)
                sqlx::query("SELECT 1 FROM conflicts WHERE id = $1 FOR SHARE")
                    .bind(*conflict)
                    .execute(&mut *tx)
                    .await?;
            }
            // A parked event due again as a retry (a dead letter's
            // replay, a conflict's end) stays one: made pending, the
            // backlog counted it from its arrival, days before, once a
            // conflict let it go. Not a deferred one: its due time moves
            // at each look, and a retry behind an open breaker would read
            // as never behind.
            let keeps_retry = matches!(finish, InboxFinish::Held { .. });
            let updated = sqlx::query(
                "UPDATE inbox SET \
                 state = CASE WHEN $8 AND state = 'retry' THEN 'retry' ELSE $1 END, \
                 detail = $2, attempts = $3, \
                 next_attempt_at_ms = COALESCE($4, next_attempt_at_ms), held_by = $7, \
                 lease_until_ms = 0, lease_token = NULL WHERE seq = $5 AND lease_token = $6",
            )
            .bind(state.as_str())
            .bind(super::capped(detail))
            .bind(attempts)
            .bind(next_attempt_at_ms)
            .bind(event.seq)
            .bind(&event.lease_token)
            .bind(held_by)
            .bind(keeps_retry)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            if let InboxFinish::Held { conflict, .. } = finish {
                // The link was read held, but its conflict may have closed
                // since, its wake run before this park: not held, and due
                // now.
                sqlx::query(
                    "UPDATE inbox SET held_by = NULL, state = 'retry', next_attempt_at_ms = $1 \
                     WHERE seq = $2 AND held_by = $3 AND NOT EXISTS \
                     (SELECT 1 FROM conflicts WHERE id = $3 AND state = 'open')",
                )
                .bind(at.timestamp_millis())
                .bind(event.seq)
                .bind(conflict)
                .execute(&mut *tx)
                .await?;
            }
            if let InboxFinish::Dead { kind, .. } = finish {
                sqlx::query(
                    // The customer: the one the event named, else the one
                    // the remote record is linked to, so the operator sees
                    // whose change is stuck.
                    "INSERT INTO dead_letters (id, customer_id, connector, direction, version, \
                     error_kind, error, attempts, correlation_id, created_at, inbox_seq) \
                     VALUES ($1, COALESCE($2, (SELECT customer_id FROM sync_links \
                        WHERE connector = $3 AND remote_id = $10), ''), \
                     $3, 'inbound', 0, $4, $5, $6, $7, $8, $9)",
                )
                .bind(super::new_id("dl_"))
                .bind(&event.customer_id)
                .bind(&event.connector)
                .bind(kind.as_str())
                .bind(super::capped(detail))
                .bind(attempts)
                .bind(&event.correlation_id)
                .bind(at)
                .bind(event.seq)
                .bind(&event.remote_id)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })
    }

    /// Applies one remote change in one transaction (see [`InboundChange`]).
    pub async fn apply_inbound(&self, change: &InboundChange) -> Result<Applied, StoreError> {
        let mut results = self
            .apply_inbound_many(std::slice::from_ref(change))
            .await?;
        results
            .pop()
            .unwrap_or(Err(StoreError::Database(sqlx::Error::RowNotFound)))
    }

    /// Applies several remote changes in ONE transaction (group commit:
    /// one fsync for all), each in its own savepoint, so a change that
    /// raced, lost its lease or broke a constraint is rolled back alone and
    /// gets its own answer, in order. A group of common
    /// changes is first tried as one statement per table
    /// ([`super::inbound_batch`]).
    #[tracing::instrument(skip_all, fields(changes = changes.len()))]
    pub async fn apply_inbound_many(
        &self,
        changes: &[InboundChange],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let results = self.apply_inbound_group(changes).await?;
        if results.iter().any(Result::is_ok) {
            // Applied changes wrote outbox rows (fan-out to the other
            // connectors).
            self.committed_outbox();
        }
        Ok(results)
    }

    async fn apply_inbound_group(
        &self,
        changes: &[InboundChange],
    ) -> Result<Vec<Result<Applied, StoreError>>, StoreError> {
        let at = now();
        if let Some(results) = super::inbound_batch::apply(self, changes, at).await {
            return Ok(results);
        }
        let lock_links = match &self.backend {
            Backend::Postgres(_) => Some(GROUP_LINKS_POSTGRES),
            // One writer: nothing to wait for.
            Backend::Sqlite(_) => None,
        };
        // On PostgreSQL the customer's row is held until the commit: a
        // delete waits for the conflict, and then closes it.
        let customer_live = match &self.backend {
            Backend::Postgres(_) => {
                "SELECT 1 FROM customers WHERE id = $1 AND deleted_at IS NULL FOR SHARE"
            }
            Backend::Sqlite(_) => "SELECT 1 FROM customers WHERE id = $1 AND deleted_at IS NULL",
        };
        let records = group_records(changes)?;
        let unlinked = unlinked_records(changes)?;
        dispatch!(self, write pool => {
            let mut outer = pool.begin().await?;
            if let Some(lock_links) = lock_links {
                if let Some(unlinked) = &unlinked {
                    sqlx::query(LOCK_UNLINKED_POSTGRES)
                        .bind(unlinked)
                        .execute(&mut *outer)
                        .await?;
                }
                sqlx::query(lock_links)
                    .bind(&records)
                    // Planned for each call (the store module's "Plans
                    // kept from an empty table").
                    .persistent(false)
                    .execute(&mut *outer)
                    .await?;
            }
            let mut results = Vec::with_capacity(changes.len());
            for change in changes {
                let event = &change.event;
                let mut tx = sqlx::Acquire::begin(&mut *outer).await?;
                let result: Result<Applied, StoreError> = async {
            let link_now: Option<LinkRead> = sqlx::query_as(LINK_READ)
                .bind(&event.connector)
                .bind(&event.remote_id)
                .fetch_optional(&mut *tx)
                .await?;
            if link_now != change.link_read {
                return Ok(Applied::Raced);
            }
            if links_to_a_customer_unwritten(change) {
                let customer_id = change.link_customer.as_ref().map(|c| c.as_str());
                let live: Option<(i32,)> = sqlx::query_as(customer_live)
                    .bind(customer_id.unwrap_or_default())
                    .fetch_optional(&mut *tx)
                    .await?;
                if live.is_none() {
                    return Ok(Applied::Raced);
                }
            }
            let (customer, kind) = match &change.customer {
                CustomerWrite::None => (None, None),
                CustomerWrite::Create(fields) => {
                    let row: CustomerRow = sqlx::query_as(concat!(
                        "INSERT INTO customers (", columns!(), ") ",
                        "VALUES ($1, $2, $3, $4, $5, $6, 1, $7, $7, NULL) RETURNING ", columns!()
                    ))
                    .bind(CustomerId::generate().as_str())
                    .bind(&fields.name)
                    .bind(&fields.email)
                    .bind(&fields.phone)
                    .bind(fields.address.as_ref().map(Json))
                    .bind(Json(&fields.metadata))
                    .bind(at)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(StoreError::from_customer_write)?;
                    (Some(Customer::from(row)), Some("created"))
                }
                CustomerWrite::Update { id, expected_version, fields } => {
                    let row: Option<CustomerRow> = sqlx::query_as(concat!(
                        "UPDATE customers SET name = $1, email = $2, phone = $3, address = $4, metadata = $5, ",
                        "version = version + 1, updated_at = $6 ",
                        "WHERE id = $7 AND version = $8 AND deleted_at IS NULL RETURNING ", columns!()
                    ))
                    .bind(&fields.name)
                    .bind(&fields.email)
                    .bind(&fields.phone)
                    .bind(fields.address.as_ref().map(Json))
                    .bind(Json(&fields.metadata))
                    .bind(at)
                    .bind(id.as_str())
                    .bind(expected_version)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from_customer_write)?;
                    match row {
                        Some(row) => (Some(Customer::from(row)), Some("updated")),
                        None => return Ok(Applied::Raced),
                    }
                }
                CustomerWrite::Delete { id, expected_version } => {
                    let row: Option<CustomerRow> = sqlx::query_as(concat!(
                        "UPDATE customers SET deleted_at = $1, updated_at = $1, version = version + 1 ",
                        "WHERE id = $2 AND version = $3 AND deleted_at IS NULL RETURNING ", columns!()
                    ))
                    .bind(at)
                    .bind(id.as_str())
                    .bind(expected_version)
                    .fetch_optional(&mut *tx)
                    .await?;
                    let Some(row) = row else {
                        return Ok(Applied::Raced);
                    };
                    for sql in [
                        super::conflicts::CLOSE_FOR_DELETED_SQL,
                        super::conflicts::RELEASE_FOR_DELETED_SQL,
                    ] {
                        sqlx::query(sql).bind(id.as_str()).bind(at).execute(&mut *tx).await?;
                    }
                    sqlx::query(super::conflicts::WAKE_FOR_DELETED_SQL)
                        .bind(id.as_str())
                        .bind(at.timestamp_millis())
                        .execute(&mut *tx)
                        .await?;
                    (Some(Customer::from(row)), Some("deleted"))
                }
            };
            if let (Some(customer), Some(kind)) = (&customer, kind) {
                sqlx::query(
                    "INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, \
                     created_at, source_connector) VALUES ('customer', $1, $2, $3, $4, $5, $6)",
                )
                .bind(customer.id.as_str())
                .bind(customer.version)
                .bind(kind)
                .bind(&event.correlation_id)
                .bind(customer.updated_at)
                .bind(&event.connector)
                .execute(&mut *tx)
                .await?;
            }
            let link_customer = customer
                .as_ref()
                .map(|c| c.id.clone())
                .or_else(|| change.link_customer.clone());
            if let Some(old) = &change.unlink_customer {
                sqlx::query(
                    "UPDATE sync_links SET remote_id = NULL, snapshot = NULL, pushed_hash = NULL, unsure_base = NULL, \
                     pending_version = NULL, pending_record = NULL, updated_at = $3 \
                     WHERE customer_id = $1 AND connector = $2",
                )
                .bind(old.as_str())
                .bind(&event.connector)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
            if let (Some(old), Some(link_customer)) = (&change.releases, &link_customer) {
                // Remembered, so the released record's next event does not
                // take the link back; not while a conflict holds the link
                // (taken since the decision read it free: its hold would
                // move to the new record), nor once it moved on.
                let released = sqlx::query(
                    "UPDATE sync_links SET remote_id = NULL, released_remote_id = $3 \
                     WHERE customer_id = $1 AND connector = $2 AND remote_id = $3 \
                     AND held_by IS NULL",
                )
                .bind(link_customer.as_str())
                .bind(&event.connector)
                .bind(old)
                .execute(&mut *tx)
                .await?;
                if released.rows_affected() == 0 {
                    return Ok(Applied::Raced);
                }
            }
            if let Some(link_customer) = link_customer.as_ref().filter(|_| change.link_remote) {
                let version = customer.as_ref().map(|c| c.version).unwrap_or(0);
                let remote_deleted = event.kind == RemoteChange::Delete;
                // A change the remote already holds is synced at its new
                // version; one it lacks leaves the link pending, for the
                // push: the relay's intake leaves this link alone.
                let synced = if change.remote_has_result { version } else { 0 };
                let linked = sqlx::query(concat!(
                    "INSERT INTO sync_links (customer_id, connector, remote_id, remote_deleted, wanted_version, \
                     synced_version, snapshot, state, next_attempt_at_ms, remote_seen_at_ms, correlation_id, updated_at, \
                     pushed_hash) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, \
                     CASE WHEN $6 < $5 THEN 'pending' ELSE 'synced' END, $8, $9, $10, $11, \
                     CASE WHEN $7 IS NULL THEN NULL ELSE 'remote' END) ",
                    link_upsert_on_conflict!()
                ))
                .bind(link_customer.as_str())
                .bind(&event.connector)
                .bind(&event.remote_id)
                .bind(remote_deleted)
                .bind(version)
                .bind(synced)
                .bind(change.snapshot.as_ref().map(Json))
                .bind(at.timestamp_millis())
                .bind(event.occurred_at_ms)
                .bind(&event.correlation_id)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::RemoteIdTaken,
                    _ => StoreError::Database(e),
                })?;
                // The customer's link holds another live record of the
                // connector: linked since the decision read it free.
                if linked.rows_affected() == 0 {
                    return Ok(Applied::Raced);
                }
            }
            if let (Some(version), Some(link_customer)) = (change.push_back, &link_customer) {
                sqlx::query(super::links::PUSH_BACK_SQL)
                    .bind(link_customer.as_str())
                    .bind(&event.connector)
                    .bind(version)
                    .bind(at.timestamp_millis())
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(conflict) = &change.conflict {
                // An open conflict holds the link until a person resolves
                // it, and a deleted customer's conflict cannot be resolved:
                // a delete that committed since the decision read the
                // customer (its own closing of open conflicts found none
                // yet) means deciding again, which skips the event.
                if conflict.open {
                    let customer_id =
                        link_customer.as_ref().map(|c| c.as_str()).unwrap_or_default();
                    let live: Option<(i32,)> = sqlx::query_as(customer_live)
                        .bind(customer_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if live.is_none() {
                        return Ok(Applied::Raced);
                    }
                }
                let conflict_id = super::new_id("cf_");
                sqlx::query(
                    "INSERT INTO conflicts (id, customer_id, connector, event_id, policy, fields, remote_record, \
                     state, resolution, created_at, correlation_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(&conflict_id)
                .bind(link_customer.as_ref().map(|c| c.as_str()).unwrap_or_default())
                .bind(&event.connector)
                .bind(&event.event_id)
                .bind(&conflict.policy)
                .bind(Json(&conflict.fields))
                .bind(Json(change.snapshot.clone().unwrap_or_default()))
                .bind(if conflict.open { "open" } else { "resolved" })
                .bind((!conflict.open).then_some(conflict.policy.as_str()))
                .bind(at)
                .bind(&event.correlation_id)
                .execute(&mut *tx)
                .await?;
                if conflict.open {
                    // Held until a person resolves it: no push, no apply.
                    // A link another conflict took since the decision read
                    // it free (a duplicate email flagged on the owner's
                    // link, which the change read no further) keeps that
                    // hold: its resolution would otherwise release this
                    // one's. The change is decided again, and waits.
                    let held = sqlx::query(
                        "UPDATE sync_links SET held_by = $1 WHERE customer_id = $2 AND connector = $3 \
                         AND held_by IS NULL",
                    )
                    .bind(&conflict_id)
                    .bind(link_customer.as_ref().map(|c| c.as_str()).unwrap_or_default())
                    .bind(&event.connector)
                    .execute(&mut *tx)
                    .await?;
                    if held.rows_affected() == 0 {
                        return Ok(Applied::Raced);
                    }
                }
            }
            let updated = sqlx::query(
                "UPDATE inbox SET state = 'applied', detail = $1, customer_id = $2, lease_until_ms = 0, \
                 lease_token = NULL WHERE seq = $3 AND lease_token = $4",
            )
            .bind(&change.detail)
            .bind(link_customer.as_ref().map(|c| c.as_str()))
            .bind(event.seq)
            .bind(&event.lease_token)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(Applied::LeaseLost);
            }
            Ok(Applied::Done(customer.map(Box::new)))
                }
                .await;
                if matches!(result, Ok(Applied::Done(_))) {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
                results.push(result);
            }
            outer.commit().await?;
            Ok(results)
        })
    }

    /// How many events the inbox holds from `connector`.
    pub async fn inbox_count(&self, connector: &str) -> Result<u64, StoreError> {
        let count: i64 = dispatch!(self, read pool => {
            sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE connector = $1")
                .bind(connector)
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// Whether the inbox holds a delete of a remote record dated at or
    /// after `at_ms`, in any state (a delete that found no link is
    /// skipped, and still happened). A record's delete is its last change
    /// (Stripe's, and a Salesforce undelete comes later): an upsert dated
    /// no later, delivered after it (a `created` the remote retried, out
    /// of order), must not make the record ferry's again.
    pub async fn remote_deleted_since(
        &self,
        connector: &str,
        remote_id: &str,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let found: i64 = dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM inbox WHERE connector = $1 AND remote_id = $2 \
                 AND kind = 'delete' AND occurred_at_ms >= $3 LIMIT 1) AS deletes",
            )
            .bind(connector)
            .bind(remote_id)
            .bind(at_ms)
            .fetch_one(pool)
            .await?
        });
        Ok(found > 0)
    }

    /// When the earliest event of a remote record that a delete numbered
    /// `seq` waits for is due, if one is: one not settled yet (waiting,
    /// being applied, to be retried) and stored before it, or an upsert
    /// stored after it. Numbers are taken as inserts begin and commit in
    /// another order on PostgreSQL (two replicas' inbox writers): a create
    /// numbered after its delete, committed first, looked for the delete
    /// before it was there and made the record a customer, while the
    /// delete, waiting only for what was numbered before it, found no link
    /// and was skipped. Deletes never wait for a later delete, so two
    /// never wait for each other; an upsert waits for no delete.
    ///
    /// Read through the `inbox_due` index, which holds unsettled rows only
    /// (SQLite is told to: it chose `inbox_event`, and read every row the
    /// connector's inbox keeps); no index of every row's record is kept
    /// for this rare question (a delete of a record nothing links).
    pub async fn inbox_awaited_by_delete(
        &self,
        connector: &str,
        remote_id: &str,
        seq: i64,
    ) -> Result<Option<i64>, StoreError> {
        let index = match &self.backend {
            Backend::Sqlite(_) => "INDEXED BY inbox_due",
            Backend::Postgres(_) => "",
        };
        let sql = format!(
            "SELECT MIN(next_attempt_at_ms) FROM inbox {index} WHERE state IN ('pending', 'retry') \
             AND connector = $1 AND remote_id = $2 AND (seq < $3 OR kind = 'upsert')"
        );
        let due: Option<i64> = dispatch!(self, read pool => {
            sqlx::query_scalar(&sql)
                .bind(connector)
                .bind(remote_id)
                .bind(seq)
                .fetch_one(pool)
                .await?
        });
        Ok(due)
    }

    /// The events of a remote record that wait to be applied (a worker
    /// looking at one again included: the resolution takes it over) and
    /// happened at or after `after_ms` (a remote tick may hold more than
    /// one change), oldest first: what the remote changed while a conflict
    /// held its link.
    pub async fn inbox_waiting(
        &self,
        connector: &str,
        remote_id: &str,
        after_ms: i64,
    ) -> Result<Vec<InboxEvent>, StoreError> {
        let sql = format!(
            "SELECT {INBOX_COLUMNS} FROM inbox WHERE connector = $1 AND remote_id = $2 \
             AND state IN ('pending', 'retry') AND occurred_at_ms >= $3 \
             ORDER BY seq"
        );
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(connector)
                .bind(remote_id)
                .bind(after_ms)
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// Every event of a remote record, newest first.
    pub async fn inbox_of_remote(
        &self,
        connector: &str,
        remote_id: &str,
    ) -> Result<Vec<InboxEvent>, StoreError> {
        let sql = format!(
            "SELECT {INBOX_COLUMNS} FROM inbox WHERE connector = $1 AND remote_id = $2 ORDER BY seq DESC"
        );
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(connector).bind(remote_id).fetch_all(pool).await?
        });
        Ok(rows)
    }
}
