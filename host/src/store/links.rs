//! Links: per (customer, connector) the link to the remote record and the
//! schedule of its next push (`sync_links`): intake of changes, claims,
//! and the outcome of each attempt (with its delivery row and, when given
//! up, its dead letter).
//!
//! A link row is both the lock and the queue entry. Claiming it sets a lease
//! (`lease_until_ms`, `lease_token`) in one conditional `UPDATE`, which works
//! the same on SQLite's single writer and on PostgreSQL across replicas; a
//! crashed worker's lease simply expires. An outcome is written only under
//! the lease token that claimed the row, so a worker whose lease expired
//! cannot overwrite the newer owner's result.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use utoipa::ToSchema;

use super::customers::{joined_columns, JoinedCustomer};
use super::dead_letters::DeadLetterKind;
use super::deliveries::INSERT_DELIVERY_SQL;
use super::{dispatch, now, now_ms, Backend, Customer, Store, StoreError};

/// Scheduling state of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    /// A push is due.
    Pending,
    /// The last attempt failed; another is scheduled.
    Retry,
    /// The remote holds the newest version ferry knows of.
    Synced,
    /// Dead-lettered: waits for a replay or a newer local change.
    Dead,
}

impl LinkState {
    fn parse(text: &str) -> Self {
        match text {
            "pending" => Self::Pending,
            "retry" => Self::Retry,
            "synced" => Self::Synced,
            _ => Self::Dead,
        }
    }
}

/// One `sync_links` row.
#[derive(Debug, Clone)]
pub struct SyncLink {
    /// The local customer.
    pub customer_id: String,
    /// The connector's manifest name.
    pub connector: String,
    /// The remote record's id once linked.
    pub remote_id: Option<String>,
    /// Whether the remote record was deleted by ferry.
    pub remote_deleted: bool,
    /// Newest local version seen on the bus.
    pub wanted_version: i64,
    /// Newest local version the remote holds.
    pub synced_version: i64,
    /// sha256 (hex) of the canonical record last pushed.
    pub pushed_hash: Option<String>,
    /// The remote's state after the last push.
    pub snapshot: Option<serde_json::Value>,
    /// A create whose outcome is unknown (it timed out): the next attempt
    /// replays exactly that version's request with the same idempotency key.
    pub pending_version: Option<i64>,
    /// The record that create sent (at least its canonical fields), kept
    /// while it is unsettled: what the replay sends once the customer has
    /// moved on.
    pub pending_record: Option<serde_json::Value>,
    /// The version of the last push whose outcome is unknown (it failed
    /// after it may have been applied: a timeout, a 5xx), until a delivery.
    pub unsure_version: Option<i64>,
    /// The `pushed_hash` that push was planned over: the base of a retry
    /// of that version alone, which then sends the same request under the
    /// same key (see [`SyncLink::delivered_base`]).
    pub unsure_base: Option<String>,
    /// Scheduling state.
    pub state: LinkState,
    /// Failed attempts since the last success.
    pub attempts: i32,
    /// When the next attempt is due, unix ms.
    pub next_attempt_at_ms: i64,
    /// The lease of the worker holding the row, if any.
    pub lease_token: Option<String>,
    /// The last error, for the operator.
    pub last_error: Option<String>,
    /// Request id of the change that scheduled the push.
    pub correlation_id: Option<String>,
    /// Last write of this row.
    pub updated_at: DateTime<Utc>,
    /// The remote event time last applied through this link, unix ms.
    pub remote_seen_at_ms: i64,
    /// When ferry last pushed through this link (ferry's clock), unix ms.
    pub pushed_at_ms: i64,
    /// The open conflict that holds this link, if any.
    pub held_by: Option<String>,
    /// Fresh idempotency keys this link took (part of the key): a repair
    /// forced at a version the remote already had a push for (see
    /// [`Store::force_push`]), a dead letter's replay, a retry after a
    /// failure the remote answered and may have saved under the key.
    pub repairs: i32,
}

impl SyncLink {
    /// The hash of the last push the remote is known to hold, the base a
    /// push of `version` may name its changed fields against: none after a
    /// push whose outcome is unknown, unless `version` is that push's own
    /// (its retry sends the same request again).
    pub fn delivered_base(&self, version: i64) -> Option<&str> {
        self.pushed_hash.as_deref().or(self
            .unsure_base
            .as_deref()
            .filter(|_| self.unsure_version == Some(version)))
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct SyncLinkRow {
    customer_id: String,
    connector: String,
    remote_id: Option<String>,
    remote_deleted: bool,
    wanted_version: i64,
    synced_version: i64,
    pushed_hash: Option<String>,
    snapshot: Option<Json<serde_json::Value>>,
    pending_version: Option<i64>,
    pending_record: Option<Json<serde_json::Value>>,
    unsure_version: Option<i64>,
    unsure_base: Option<String>,
    state: String,
    attempts: i32,
    next_attempt_at_ms: i64,
    lease_token: Option<String>,
    last_error: Option<String>,
    correlation_id: Option<String>,
    updated_at: DateTime<Utc>,
    remote_seen_at_ms: i64,
    pushed_at_ms: i64,
    held_by: Option<String>,
    repairs: i32,
}

impl From<SyncLinkRow> for SyncLink {
    fn from(row: SyncLinkRow) -> Self {
        Self {
            customer_id: row.customer_id,
            connector: row.connector,
            remote_id: row.remote_id,
            remote_deleted: row.remote_deleted,
            wanted_version: row.wanted_version,
            synced_version: row.synced_version,
            pushed_hash: row.pushed_hash,
            snapshot: row.snapshot.map(|s| s.0),
            pending_version: row.pending_version,
            pending_record: row.pending_record.map(|r| r.0),
            unsure_version: row.unsure_version,
            unsure_base: row.unsure_base,
            state: LinkState::parse(&row.state),
            attempts: row.attempts,
            next_attempt_at_ms: row.next_attempt_at_ms,
            lease_token: row.lease_token,
            last_error: row.last_error,
            correlation_id: row.correlation_id,
            updated_at: row.updated_at,
            remote_seen_at_ms: row.remote_seen_at_ms,
            pushed_at_ms: row.pushed_at_ms,
            held_by: row.held_by,
            repairs: row.repairs,
        }
    }
}

/// What one [`Store::intake_queued`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intake {
    /// Changes taken off the queue.
    pub taken: usize,
    /// Whether they scheduled any push.
    pub scheduled: bool,
}

/// A link claimed under a lease, for one push step.
///
/// The claim marked the create the push is about to send when the link has
/// no remote record, its customer is live and newer than the remote's
/// version, and its connector is one of those the claimer said may push now
/// (`pending_version` is then the customer's version): the marker no longer
/// costs a transaction of its own. On PostgreSQL the claim also read the
/// link's customer (one statement for what took three); on SQLite one
/// read follows for the claimed batch.
#[derive(Debug, Clone)]
pub struct ClaimedLink {
    /// The link, as the claim left it.
    pub link: SyncLink,
    /// Its customer, if the claim read it (`None`: read it).
    pub customer: Option<Customer>,
}

#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    link: SyncLinkRow,
    #[sqlx(flatten)]
    customer: JoinedCustomer,
}

impl From<ClaimedRow> for ClaimedLink {
    fn from(row: ClaimedRow) -> Self {
        Self {
            link: row.link.into(),
            customer: row.customer.into_customer(),
        }
    }
}

macro_rules! link_columns {
    () => {
        "customer_id, connector, remote_id, remote_deleted, wanted_version, synced_version, \
         pushed_hash, snapshot, pending_version, pending_record, unsure_version, unsure_base, state, attempts, \
         next_attempt_at_ms, lease_token, last_error, correlation_id, updated_at, remote_seen_at_ms, \
         pushed_at_ms, held_by, repairs"
    };
}
pub(super) use link_columns;

/// A change the bus delivered: customer `customer_id` reached `version`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct ChangeNotice {
    /// The customer.
    pub customer_id: String,
    /// Its version after the change.
    pub version: i64,
    /// The request id of the write.
    pub correlation_id: Option<String>,
    /// The outbox row that announced it (absent in messages of older
    /// versions).
    #[serde(default)]
    pub outbox_id: Option<i64>,
    /// The connector whose remote change it was (none: the API, a person,
    /// or a message of an older version). That connector's link already
    /// holds the change, written with it (synced, or pending when the
    /// remote lacks part of the result), so the intake leaves the link
    /// alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_connector: Option<String>,
}

/// (customer, connector): the key of a link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkKey {
    /// The customer.
    pub customer_id: String,
    /// The connector.
    pub connector: String,
}

/// What an attempt ended with, as the store records it.
#[derive(Debug, Clone)]
pub enum RecordedOutcome {
    /// The remote accepted the push of `version`.
    Delivered {
        /// `create`, `update` or `delete`.
        operation: &'static str,
        /// The local version pushed.
        version: i64,
        /// The remote id after the push.
        remote_id: String,
        /// Whether the push deleted the remote record.
        remote_deleted: bool,
        /// sha256 of the canonical record pushed.
        pushed_hash: String,
        /// The remote's state after the push, if it returned one.
        snapshot: Option<serde_json::Value>,
        /// The link's snapshot the push named its changed fields against,
        /// when it did (the new `snapshot` holds its values for the others):
        /// `snapshot` and `pushed_hash` are written only over it. An event
        /// that wrote the snapshot while the push was out (its record read
        /// after the push landed) decides then, and the hash is forgotten:
        /// written over it, the snapshot put back a field's older value,
        /// and the remote's next edit of that field read as ferry's.
        snapshot_base: Option<serde_json::Value>,
    },
    /// Nothing to push.
    Skipped {
        /// The local version considered.
        version: i64,
        /// Why.
        reason: String,
        /// Whether `version` now counts as synced (e.g. a customer deleted
        /// before it was ever pushed).
        mark_synced: bool,
    },
    /// Failed; try again at `at_ms`.
    RetryScheduled {
        /// The local version attempted.
        version: i64,
        /// `create`, `update` or `delete`.
        operation: &'static str,
        /// This attempt's number (1-based).
        attempt: i32,
        /// When the next attempt is due, unix ms.
        at_ms: i64,
        /// The error.
        error: String,
        /// Set when the failed attempt was a create whose outcome is unknown.
        pending_version: Option<i64>,
        /// The remote answered the failure (a 5xx): it may have saved that
        /// answer under the key (Stripe does, 500s included) and give it to
        /// every retry under it, so the next attempt of an update or a
        /// delete goes under a fresh key (`repairs` + 1). A create keeps
        /// its key (its marker: a second record could be made). After no
        /// answer (the call's deadline passed), or a failure the remote
        /// did not save (a 409 for the same key still running, a 429), the
        /// retry is the same request under the same key, which the remote
        /// answers from the result it saved if the first landed.
        answered: bool,
    },
    /// Not attempted (breaker open); due again at `at_ms`. Costs no attempt
    /// and leaves no delivery record.
    Deferred {
        /// When to look again, unix ms.
        at_ms: i64,
        /// What it waits for, kept as the link's `last_error` while it
        /// waits for long (a paused connector, a backfill), so the
        /// customer's sync status says why nothing went; `None` leaves the
        /// last error as it is.
        waits_for: Option<&'static str>,
    },
    /// Given up: a dead letter waits for a person.
    DeadLettered {
        /// The local version attempted.
        version: i64,
        /// `create`, `update` or `delete`, if it got that far.
        operation: Option<&'static str>,
        /// Attempts made.
        attempt: i32,
        /// Why it was given up.
        error_kind: DeadLetterKind,
        /// The error.
        error: String,
        /// How long a newer version waits before it goes (the link reopens
        /// for it now, or when the intake takes one in later: a dead link
        /// keeps this time for it): the last attempt's own wait, as when an
        /// update that timed out may still be applied; 0 for none.
        settle_ms: i64,
    },
}

/// What a push waiting for its connector to be switched on (or configured
/// here) keeps as its last error: the switch's resume finds it by it,
/// retries included.
pub const PAUSED_WAIT: &str = "waiting: the connector is paused or not configured here";

/// What a push deferred behind its connector's breaker probe keeps as its
/// last error: the probe's success makes it due at once
/// ([`crate::store::Store::resume_connector_links`]).
pub const PROBING_WAIT: &str =
    "waiting: a probe of the remote is out (the connector's breaker is half-open)";

/// What a create a backfill holds back keeps as its last error (the run's
/// resume finds it by it, retries included).
pub const BACKFILL_WAIT: &str =
    "waiting: a backfill of the connector links records by email; the create goes when it is done";

/// A write to a claimed link, batched by the sync engine.
#[derive(Debug, Clone)]
pub enum LinkWrite {
    /// A create of `version` is about to send `record` (the canonical
    /// record): if its outcome is lost, the next attempt replays it exactly.
    CreatePending {
        /// The customer's version the create sends.
        version: i64,
        /// What it sends.
        record: serde_json::Value,
    },
    /// An attempt's outcome.
    Outcome(RecordedOutcome),
}

/// The assignments that make a link push the customer's current version
/// again (see [`FORCE_PUSH_SQL`]).
macro_rules! push_again {
    () => {
        "repairs = repairs + 1, \
    synced_version = CASE WHEN synced_version >= $3 THEN $3 - 1 ELSE synced_version END, \
    wanted_version = CASE WHEN wanted_version < $3 THEN $3 ELSE wanted_version END, \
    attempts = CASE WHEN state IN ('synced', 'dead') THEN 0 ELSE attempts END, \
    next_attempt_at_ms = CASE WHEN state = 'synced' THEN $4 \
        WHEN state = 'dead' THEN (CASE WHEN next_attempt_at_ms > $4 THEN next_attempt_at_ms ELSE $4 END) \
        ELSE next_attempt_at_ms END, \
    state = CASE WHEN state IN ('synced', 'dead') THEN 'pending' ELSE state END, \
    updated_at = $5 "
    };
}

/// Makes a link push `$3` (the customer's current version) again under a
/// new idempotency key: the remote drifted from what ferry pushed (a
/// reconciliation's repair). `$1` customer, `$2` connector, `$4` now (ms),
/// `$5` now. A link in backoff keeps its schedule (its attempt pushes
/// anyway), and a dead one whose last update died unanswered waits for it
/// to settle (its `next_attempt_at_ms`), as intake and a replay do: sent
/// at once, the forced push could land first and the late update put the
/// older values back. The push sends the whole record: what the remote holds is not
/// known field by field.
///
/// `$6`: the record a finding saw listed, or NULL. A link that names it
/// marked deleted (the remote deleted it, and ferry the customer with it,
/// then the remote restored it: a Recycle Bin undelete) is live again, so
/// that the deleted customer's delete is pushed to it; else nothing was
/// sent, and the restored record stayed for good.
pub(crate) const FORCE_PUSH_SQL: &str = concat!(
    "UPDATE sync_links SET pushed_hash = NULL, unsure_base = NULL, remote_deleted = FALSE, ",
    push_again!(),
    "WHERE customer_id = $1 AND connector = $2 AND remote_id IS NOT NULL \
     AND (NOT remote_deleted OR remote_id = $6)"
);

/// [`FORCE_PUSH_SQL`] for an inbound merge that kept values the remote
/// lacks (a conflict kept locally, an owned field, a first sync's gaps):
/// the snapshot was just written from the remote's record, so the update
/// names the fields that differ from it and sends those alone (a dashboard
/// edit of another field, made meanwhile, stays).
pub(crate) const PUSH_BACK_SQL: &str = concat!(
    "UPDATE sync_links SET ",
    push_again!(),
    "WHERE customer_id = $1 AND connector = $2 AND remote_id IS NOT NULL AND NOT remote_deleted"
);

// Upserts a link for a change. A newer version re-opens a synced link, and
// a dead-lettered one when it is newer than the version that died (see
// `intake_reopens`); a link waiting in backoff keeps its schedule (its next
// attempt pushes the current state anyway). A change the link already holds
// (the source connector's own link, written by the inbound apply) leaves
// the row as it is: rewriting it would only move `updated_at`, at the cost
// of a row version and its WAL (docs/performance.md, round 5).
// SQLite: one statement for a whole batch too (each statement is a hand-off
// to the connection's thread and back; docs/performance.md, round 14).
// `$1` holds one `[customer, connector, version, correlation]` row per
// link, the link's newest change (see `newest_per_link`, which leaves a
// change's source connector out).
const INTAKE_BATCH_SQLITE: &str = concat!(
    "INSERT INTO sync_links \
    (customer_id, connector, wanted_version, state, next_attempt_at_ms, correlation_id, updated_at) \
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), \
    'pending', $2, json_extract(value, '$[3]'), $3 FROM json_each($1) WHERE true ",
    intake_on_conflict!()
);

// PostgreSQL: one statement for a whole batch (one round trip, not one
// per change, and no transaction of its own to open and commit): the batch
// holds each (customer, connector) once, and its outbox rows ($7, with the
// customer $8 and version $9 each message named) leave the queue with it,
// those that announced that change only (see `CONSUMED_SQLITE`). Their
// queue rows are locked in rising id order first, as the relay's marks
// lock them ([`Store::mark_published`]): a batch spanning partitions
// names them in partition order, and a delete locking a later row while
// the relay's mark held an earlier one and wanted the later was a
// deadlock PostgreSQL broke by aborting one side.
const INTAKE_BATCH_POSTGRES: &str = concat!(
    "WITH locked AS MATERIALIZED (SELECT outbox_id FROM outbox_queue \
    WHERE outbox_id = ANY($7::bigint[]) ORDER BY outbox_id FOR UPDATE), \
    consumed AS (DELETE FROM outbox_queue q USING locked l, outbox o, \
    UNNEST($7::bigint[], $8::text[], $9::bigint[]) AS m(id, c, v) \
    WHERE q.outbox_id = l.outbox_id AND q.outbox_id = m.id AND o.id = m.id \
    AND o.aggregate_id = m.c AND o.version = m.v) \
    INSERT INTO sync_links \
    (customer_id, connector, wanted_version, state, next_attempt_at_ms, correlation_id, updated_at) \
    SELECT c, k, v, 'pending', $4, r, $5 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $6::text[]) \
    AS batch(c, k, v, r) ",
    intake_on_conflict!()
);

// SQLite: takes off the queue the outbox rows of `$1` (`[id, customer,
// version]` each) that announced that change: a message's outbox id alone
// may name another change's row (two deployments sharing a topic and a
// consumer group, both counting ids from 1; a database restored to a point
// behind its consumers), and deleting that row lost its change for good
// (its safety net reads the queue).
const CONSUMED_SQLITE: &str = "DELETE FROM outbox_queue WHERE outbox_id IN \
     (SELECT o.id FROM json_each($1) m JOIN outbox o ON o.id = json_extract(m.value, '$[0]') \
     AND o.aggregate_id = json_extract(m.value, '$[1]') \
     AND o.version = json_extract(m.value, '$[2]'))";

// A claim marks the create its push is about to send: `pending_version`
// becomes the customer's current version, and `pending_record` that
// version's record (`$record`, the canonical fields of customer `c` in the
// backend's JSON), for a link `$link` with no remote record and no create
// outstanding, whose customer is live and newer than the remote's version,
// to a connector that may push now (`$ready`, the membership test in the
// backend's form). Without it each create cost a marker write of its own, a
// transaction each (docs/performance.md, round 13). A marked create that is
// then not sent (the connector was disabled or its breaker opened in
// between) is replayed later like one that timed out.
macro_rules! mark_create {
    ($link:literal, $ready:literal, $record:literal) => {
        concat!(
            mark_create!(@set "pending_version", $link, $ready, "c.version"),
            ", ",
            mark_create!(@set "pending_record", $link, $ready, $record)
        )
    };
    (@set $column:literal, $link:literal, $ready:literal, $value:literal) => {
        concat!(
            $column,
            " = CASE WHEN ",
            $link,
            ".pending_version IS NULL AND ",
            $link,
            ".remote_id IS NULL AND ",
            $link,
            ".connector ",
            $ready,
            " THEN (SELECT ",
            $value,
            " FROM customers c WHERE c.id = ",
            $link,
            ".customer_id AND c.deleted_at IS NULL AND c.version > ",
            $link,
            ".synced_version) ELSE ",
            $link,
            ".",
            $column,
            " END"
        )
    };
}

// A claim: leases the claimable rows of `$table` (whose rows `$link` names)
// and marks their creates. A row still holding a lease token had its last
// claim end without an outcome written (a crash, a lost lease, a store
// error after the call): that push may have landed, so what the remote
// holds is unknown and the pushed content is forgotten, as after a failed
// push (every outcome written clears the token). As after a failed push,
// a retry of the version that claim pushed is planned over the base it
// was planned over (`unsure_version`, `unsure_base`): each claim over a
// delivered push marks them (the customer's version as the claim reads
// it, which the push sends, and the pushed hash), and the claim after an
// unrecorded one keeps them. Forgotten, the update's retry went whole,
// under another key, and the remote applied both, the second over an edit
// made there between.
macro_rules! claim {
    (
        $table:literal,
        $link:literal,
        $lease:literal,
        $ready:literal,
        $record:literal,
        $claimable:literal
    ) => {
        concat!(
            "UPDATE ",
            $table,
            " SET lease_until_ms = ",
            $lease,
            ", ",
            mark_create!($link, $ready, $record),
            ", unsure_version = CASE WHEN ",
            $link,
            ".lease_token IS NULL AND ",
            $link,
            ".pushed_hash IS NOT NULL THEN COALESCE((SELECT c.version FROM customers c WHERE c.id = ",
            $link,
            ".customer_id), ",
            $link,
            ".wanted_version) ELSE ",
            $link,
            ".unsure_version END",
            ", unsure_base = CASE WHEN ",
            $link,
            ".lease_token IS NULL AND ",
            $link,
            ".pushed_hash IS NOT NULL THEN ",
            $link,
            ".pushed_hash ELSE ",
            $link,
            ".unsure_base END",
            ", pushed_hash = CASE WHEN ",
            $link,
            ".lease_token IS NOT NULL THEN NULL ELSE ",
            $link,
            ".pushed_hash END",
            " WHERE ",
            $claimable,
            " RETURNING ",
            link_columns!()
        )
    };
}

// PostgreSQL's claims also read the claimed links' customers, in the same
// statement (a read of the batch's customers was a round trip of its own).
macro_rules! claim_postgres {
    ($lease:literal, $ready:literal, $claimable:literal) => {
        concat!(
            "WITH claimed AS (",
            claim!(
                "sync_links l",
                "l",
                $lease,
                $ready,
                "jsonb_build_object('id', c.id, 'name', c.name, 'email', c.email, \
                 'phone', c.phone, 'address', c.address, 'metadata', c.metadata)",
                $claimable
            ),
            ") SELECT claimed.*, ",
            joined_columns!(),
            " FROM claimed LEFT JOIN customers c ON c.id = claimed.customer_id"
        )
    };
}

// The links named, those another transaction holds skipped (the
// scheduler pushes them when due), as the due claim does: waiting for
// them, in whatever order the plan read them, it could hold one an
// intake wanted while waiting for one the intake held (40P01).
const CLAIM_KEYS_POSTGRES: &str = claim_postgres!(
    "$3, lease_token = $4",
    "= ANY($6::text[])",
    "(customer_id, connector) IN (SELECT customer_id, connector FROM sync_links \
     WHERE (customer_id, connector) IN (SELECT * FROM UNNEST($1::text[], $2::text[])) \
     AND state IN ('pending', 'retry') AND next_attempt_at_ms <= $5 AND lease_until_ms < $5 \
     AND held_by IS NULL FOR UPDATE SKIP LOCKED)"
);

// PostgreSQL, the in-process bus: takes up to `$1` changes off the outbox
// queue, oldest first, and schedules their pushes to the connectors `$2`, in
// one statement (the relay read the queue in a statement of its own
// before). Per link the newest version taken wins, as in
// `intake_postgres`, and the newest change's source connector is left out
// (see [`ChangeNotice`]; its upsert changed nothing but wrote a row lock
// to the log, docs/performance.md round 19). SKIP LOCKED: relays of two
// replicas take disjoint rows. The ids taken are an array, so the delete
// finds them by the queue's key; as an `IN (…)` join it read the whole
// queue, dead rows too, on every round (docs/performance.md, round 15).
// Rows a Kafka relay already published are taken too: nothing publishes in
// this mode, and a deployment that left the broker while its consumers
// lagged would otherwise strand them.
const INTAKE_QUEUED_POSTGRES: &str = concat!(
    "WITH taken AS (DELETE FROM outbox_queue q USING outbox o \
       WHERE o.id = q.outbox_id AND q.outbox_id = ANY(ARRAY(SELECT outbox_id FROM outbox_queue \
         ORDER BY outbox_id LIMIT $1 FOR UPDATE SKIP LOCKED)) \
       RETURNING o.id, o.aggregate_id, o.version, o.correlation_id, o.source_connector), \
     newest AS (SELECT DISTINCT ON (aggregate_id) aggregate_id, version, correlation_id, source_connector \
       FROM taken ORDER BY aggregate_id, version DESC, id DESC), \
     scheduled AS (INSERT INTO sync_links \
       (customer_id, connector, wanted_version, state, next_attempt_at_ms, correlation_id, updated_at) \
       SELECT n.aggregate_id, k.connector, n.version, 'pending', $3, n.correlation_id, $4 \
       FROM newest n CROSS JOIN UNNEST($2::text[]) AS k(connector) \
       WHERE k.connector IS DISTINCT FROM n.source_connector \
       ORDER BY n.aggregate_id COLLATE \"C\", k.connector COLLATE \"C\" ",
    intake_on_conflict!(),
    " RETURNING 1) \
     SELECT (SELECT count(*) FROM taken), (SELECT count(*) FROM scheduled)"
);

/// Whether an intake of `excluded` re-opens the link: a synced link below
/// the change's version, or a dead-lettered one for a newer change than the
/// one that died (a bus message delivered again, which cluster mode does
/// at least once, must not push a dead version again and dead-letter it a
/// second time).
macro_rules! intake_reopens {
    () => {
        "((sync_links.state = 'synced' AND excluded.wanted_version > sync_links.synced_version) \
          OR (sync_links.state = 'dead' AND excluded.wanted_version > sync_links.wanted_version))"
    };
}

use intake_reopens;

macro_rules! intake_on_conflict {
    () => {
        concat!(
            "ON CONFLICT (customer_id, connector) DO UPDATE SET \
      state = CASE WHEN ",
            intake_reopens!(),
            " THEN 'pending' ELSE sync_links.state END, \
      attempts = CASE WHEN ",
            intake_reopens!(),
            " OR excluded.wanted_version > sync_links.wanted_version \
                    THEN 0 ELSE sync_links.attempts END, \
      next_attempt_at_ms = CASE WHEN ",
            intake_reopens!(),
            " THEN (CASE WHEN sync_links.state = 'dead' \
                      AND sync_links.next_attempt_at_ms > excluded.next_attempt_at_ms \
                    THEN sync_links.next_attempt_at_ms ELSE excluded.next_attempt_at_ms END) \
                    ELSE sync_links.next_attempt_at_ms END, \
      wanted_version = CASE WHEN excluded.wanted_version > sync_links.wanted_version \
                    THEN excluded.wanted_version ELSE sync_links.wanted_version END, \
      correlation_id = CASE WHEN excluded.wanted_version >= sync_links.wanted_version \
                    THEN excluded.correlation_id ELSE sync_links.correlation_id END, \
      updated_at = excluded.updated_at \
      WHERE ",
            intake_reopens!(),
            " \
         OR excluded.wanted_version > sync_links.wanted_version \
         OR (excluded.wanted_version = sync_links.wanted_version \
             AND excluded.correlation_id IS DISTINCT FROM sync_links.correlation_id)"
        )
    };
}
use intake_on_conflict;

// SQLite's claims: `$ready` is a JSON array there.
macro_rules! claim_sqlite {
    ($lease:literal, $ready:literal, $claimable:literal) => {
        claim!(
            "sync_links",
            "sync_links",
            $lease,
            $ready,
            "json_object('id', c.id, 'name', c.name, 'email', c.email, 'phone', c.phone, \
             'address', json(c.address), 'metadata', json(c.metadata))",
            $claimable
        )
    };
}

const CLAIM_ONE_SQL: &str = claim_sqlite!(
    "$3, lease_token = $4",
    "IN (SELECT value FROM json_each($6))",
    "customer_id = $1 AND connector = $2 AND state IN ('pending', 'retry') \
     AND next_attempt_at_ms <= $5 AND lease_until_ms < $5 AND held_by IS NULL"
);

// A scheduler's claim: the due links, oldest due first (`$3` now, `$4` how
// many); `_OF_`: of the connector `$6` only. Two statements, not a
// nullable parameter: a plain `connector = $6` is one the per-connector
// due index (`sync_links_due_by_connector`) answers in due order.
const CLAIM_DUE_SQLITE: &str = claim_sqlite!(
    "$1, lease_token = $2",
    "IN (SELECT value FROM json_each($5))",
    "(customer_id, connector) IN (SELECT customer_id, connector FROM sync_links \
     WHERE state IN ('pending', 'retry') AND next_attempt_at_ms <= $3 AND lease_until_ms < $3 \
     AND held_by IS NULL ORDER BY next_attempt_at_ms LIMIT $4)"
);

const CLAIM_DUE_OF_SQLITE: &str = claim_sqlite!(
    "$1, lease_token = $2",
    "IN (SELECT value FROM json_each($5))",
    "(customer_id, connector) IN (SELECT customer_id, connector FROM sync_links \
     WHERE state IN ('pending', 'retry') AND next_attempt_at_ms <= $3 AND lease_until_ms < $3 \
     AND held_by IS NULL AND connector = $6 ORDER BY next_attempt_at_ms LIMIT $4)"
);

// SKIP LOCKED: replicas polling at once take disjoint rows instead of queueing.
const CLAIM_DUE_POSTGRES: &str = claim_postgres!(
    "$1, lease_token = $2",
    "= ANY($5::text[])",
    "(customer_id, connector) IN (SELECT customer_id, connector FROM sync_links \
     WHERE state IN ('pending', 'retry') AND next_attempt_at_ms <= $3 AND lease_until_ms < $3 \
     AND held_by IS NULL ORDER BY next_attempt_at_ms LIMIT $4 FOR UPDATE SKIP LOCKED)"
);

const CLAIM_DUE_OF_POSTGRES: &str = claim_postgres!(
    "$1, lease_token = $2",
    "= ANY($5::text[])",
    "(customer_id, connector) IN (SELECT customer_id, connector FROM sync_links \
     WHERE state IN ('pending', 'retry') AND next_attempt_at_ms <= $3 AND lease_until_ms < $3 \
     AND held_by IS NULL AND connector = $6 ORDER BY next_attempt_at_ms LIMIT $4 FOR UPDATE SKIP LOCKED)"
);

/// Whether a delivered push may write its remote id over the link in
/// `$table` (the `WHERE` condition, for `$remote_id` the id the push
/// answered with): the link has no live record, or it is that one. A
/// create's answer can come after another record with the customer's email
/// was linked by an inbound event (which takes a link without a remote id
/// as free: the echo of ferry's own create can come before its answer);
/// the record linked, and merged, stays (see [`KEEP_LINKED_SQL`]).
macro_rules! delivered_may_write {
    ($table:literal, $remote_id:literal) => {
        concat!(
            "(",
            $table,
            ".remote_id IS NULL OR ",
            $table,
            ".remote_deleted OR ",
            $table,
            ".remote_id = ",
            $remote_id,
            ")"
        )
    };
}

/// A delivered push whose link took another live record meanwhile (see
/// [`delivered_may_write!`]; `$6` the id the push answered with): the push
/// is settled (a create is not replayed: its record exists) and the lease
/// freed; the remote id, snapshot and synced version stay those of the
/// record linked. Returns that record's id; no row if the lease was lost,
/// or if the link moved again since the guarded write, which then runs
/// again.
const KEEP_LINKED_SQL: &str = "UPDATE sync_links SET pending_version = NULL, \
       pending_record = NULL, attempts = 0, last_error = NULL, lease_until_ms = 0, \
       lease_token = NULL, updated_at = $1, \
       state = CASE WHEN wanted_version > synced_version THEN 'pending' ELSE 'synced' END, \
       next_attempt_at_ms = $2, pushed_at_ms = $2 \
     WHERE customer_id = $3 AND connector = $4 AND lease_token = $5 \
       AND remote_id IS NOT NULL AND NOT remote_deleted AND remote_id <> $6 \
     RETURNING remote_id";

/// The delivery record's detail for a push whose link kept `linked` (see
/// [`KEEP_LINKED_SQL`]).
fn kept_detail(created: &str, linked: &str) -> String {
    format!(
        "the remote answered with record {created}, but record {linked}, with this customer's \
         email, was linked meanwhile and stays linked: the remote holds both, and \
         reconciliation reports {created}"
    )
}

/// Whether link `$t` takes a delivered push's hash and snapshot: no push
/// was forced over it since its claim read `$repairs`, and its snapshot is
/// still `$base`, the one the push named its changed fields against (any,
/// when `$base` is NULL).
macro_rules! takes_the_push {
    ($t:literal, $repairs:literal, $base:literal) => {
        concat!(
            $t,
            ".repairs = ",
            $repairs,
            " AND (",
            $base,
            " IS NULL OR ",
            $t,
            ".snapshot = ",
            $base,
            ")"
        )
    };
}

/// A delivered push's `synced_version`, `pushed_hash`, `snapshot` and
/// `state` assignments, for the link `$t` whose `repairs` the claim read as
/// `$repairs`, the push of `$synced` (the version it settles), `$hash` and
/// `$snapshot`. When `repairs` moved on while the push was out, a push was
/// forced over it (`FORCE_PUSH_SQL`: an inbound merge kept a value the
/// remote lacks, a repair): its result would mark that push done, and its
/// snapshot put back what the remote held before the change that forced it.
/// The link then keeps what the force wrote, and stays pending for it.
/// A version an inbound apply raised meanwhile is never lowered. With a
/// `$base` (not NULL: the snapshot the push's changed fields were named
/// against), the hash and snapshot are written only over that snapshot
/// (see [`RecordedOutcome::Delivered`]'s `snapshot_base`).
macro_rules! fenced_by_repairs {
    ($t:literal, $repairs:literal, $synced:literal, $hash:literal, $snapshot:literal, $base:literal) => {
        concat!(
            "synced_version = CASE WHEN ",
            $t,
            ".repairs <> ",
            $repairs,
            " THEN ",
            $t,
            ".synced_version \
               WHEN ",
            $t,
            ".synced_version > ",
            $synced,
            " THEN ",
            $t,
            ".synced_version ELSE ",
            $synced,
            " END, \
             pushed_hash = CASE WHEN ",
            takes_the_push!($t, $repairs, $base),
            " THEN ",
            $hash,
            " END, \
             snapshot = CASE WHEN ",
            takes_the_push!($t, $repairs, $base),
            " THEN ",
            $snapshot,
            " ELSE ",
            $t,
            ".snapshot END, \
             state = CASE WHEN ",
            $t,
            ".repairs <> ",
            $repairs,
            " OR (",
            $t,
            ".wanted_version > ",
            $synced,
            " \
               AND ",
            $t,
            ".wanted_version > ",
            $t,
            ".synced_version) THEN 'pending' ELSE 'synced' END"
        )
    };
}

/// The condition, in a dead letter's write, that the link wants a version
/// newer than the one that died (`$8`): one an intake raised while the
/// push was out (not the claim's, `$11`), or one the customer has reached.
macro_rules! dead_letter_leaves_newer {
    () => {
        "(wanted_version > $8 AND (wanted_version <> $11 \
           OR EXISTS (SELECT 1 FROM customers WHERE id = $4 AND version > $8)))"
    };
}

/// Inside a dispatched transaction `$tx`: writes `$outcome` for `$link`
/// under its lease. Evaluates to `Result<bool, StoreError>`: false if the
/// lease was lost.
macro_rules! record_in {
    ($tx:ident, $link:expr, $outcome:expr, $at:expr) => {
        async {
            // Set when a delivered create found the link holding another
            // live record (see `KEEP_LINKED_SQL`): that record's id.
            let mut kept: Option<String> = None;
            let updated = match $outcome {
                RecordedOutcome::Delivered { version, remote_id, remote_deleted, pushed_hash, snapshot, snapshot_base, .. } => {
                    // The version pushed, or what the link holds if more
                    // (an inbound apply raises it too); wanted_version may
                    // grow concurrently. A push forced meanwhile (`repairs`
                    // moved on: an inbound merge kept a value the remote
                    // then lacked, a repair) is still to go: the link stays
                    // pending with its version, hash and snapshot as the
                    // force left them (see `fenced_by_repairs!`).
                    let synced = $link.synced_version.max(*version);
                    // The guarded write, or the one that keeps the record
                    // linked; an inbound write committed between the two
                    // (the link unlinked again) sends it round once more.
                    let mut written = 0;
                    for _ in 0..3 {
                        let done = sqlx::query(concat!(
                            "UPDATE sync_links SET remote_id = $1, remote_deleted = $2, ",
                            fenced_by_repairs!("sync_links", "$11", "$3", "$4", "$5", "$12"),
                            ", pending_version = NULL, unsure_version = NULL, unsure_base = NULL, \
                             remote_seen_at_ms = CASE WHEN remote_id IS NULL OR remote_id <> $1 \
                                THEN 0 ELSE remote_seen_at_ms END, \
                             pending_record = NULL, attempts = 0, last_error = NULL, lease_until_ms = 0, lease_token = NULL, updated_at = $6, \
                             next_attempt_at_ms = $7, pushed_at_ms = $7 \
                             WHERE customer_id = $8 AND connector = $9 AND lease_token = $10 AND ",
                            delivered_may_write!("sync_links", "$1")
                        ))
                        .bind(remote_id)
                        .bind(remote_deleted)
                        .bind(synced)
                        .bind(pushed_hash)
                        .bind(snapshot.as_ref().map(Json))
                        .bind($at)
                        .bind($at.timestamp_millis())
                        .bind(&$link.customer_id)
                        .bind(&$link.connector)
                        .bind(&$link.lease_token)
                        .bind($link.repairs)
                        .bind(snapshot_base.as_ref().map(Json))
                        .execute(&mut *$tx)
                        .await
                        .map_err(|e| match &e {
                            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::RemoteIdTaken,
                            _ => StoreError::Database(e),
                        })?
                        .rows_affected();
                        if done == 1 {
                            written = 1;
                            break;
                        }
                        kept = sqlx::query_scalar(KEEP_LINKED_SQL)
                            .bind($at)
                            .bind($at.timestamp_millis())
                            .bind(&$link.customer_id)
                            .bind(&$link.connector)
                            .bind(&$link.lease_token)
                            .bind(remote_id)
                            .fetch_optional(&mut *$tx)
                            .await?;
                        if let Some(linked) = &kept {
                            tracing::warn!(customer_id = %$link.customer_id, connector = %$link.connector,
                                created = %remote_id, linked = %linked,
                                "a create's answer came after another record was linked: the remote holds both");
                            written = 1;
                            break;
                        }
                        // Read as a row, not a value: `1` is an `int4`
                        // on PostgreSQL and an integer on SQLite.
                        let held = sqlx::query(
                            "SELECT 1 FROM sync_links WHERE customer_id = $1 AND connector = $2 \
                             AND lease_token = $3",
                        )
                        .bind(&$link.customer_id)
                        .bind(&$link.connector)
                        .bind(&$link.lease_token)
                        .fetch_optional(&mut *$tx)
                        .await?;
                        if held.is_none() {
                            break;
                        }
                    }
                    written
                }
                RecordedOutcome::Skipped { version, mark_synced, .. } => {
                    let synced = if *mark_synced {
                        $link.synced_version.max(*version)
                    } else {
                        $link.synced_version
                    };
                    // A skip settles every version up to the one considered.
                    let settled = synced.max(*version);
                    // Never lowered: an adopted create raises it outside
                    // the lease (`adopt_created_remote`).
                    // A push forced meanwhile (`repairs` moved on, as in
                    // `fenced_by_repairs!`) is not this skip's to settle.
                    // A wanted version the customer has not reached (a
                    // change message taken in from before a database was
                    // restored, or failed over, behind it) is no change to
                    // wait for: left pending, the link was claimed and
                    // skipped again at once, for ever. It comes down to
                    // the version considered; the customer's next write
                    // re-opens the link as any change does. Only the
                    // wanted version the claim saw ($9): one an intake
                    // raised since is a change committed after this
                    // statement's snapshot of the customer.
                    // A create's marker on a link that holds a live record
                    // (a backfill or an inbound event linked one while the
                    // create waited) is settled, as a delivery settles it:
                    // no create is replayed over a live record, and left,
                    // it barred a repair from ever recreating the record
                    // (`recreate_remote`), and was replayed, old record and
                    // all, once that record was deleted remotely.
                    sqlx::query(
                        "UPDATE sync_links SET \
                         synced_version = CASE WHEN repairs <> $8 OR synced_version > $1 \
                           THEN synced_version ELSE $1 END, \
                         state = CASE WHEN repairs <> $8 OR (wanted_version > $2 AND (wanted_version <> $9 \
                           OR EXISTS (SELECT 1 FROM customers WHERE id = $5 AND version > $2))) \
                           THEN 'pending' ELSE 'synced' END, \
                         wanted_version = CASE WHEN wanted_version > $2 AND wanted_version = $9 \
                           AND NOT EXISTS (SELECT 1 FROM customers WHERE id = $5 AND version > $2) \
                           THEN $2 ELSE wanted_version END, \
                         attempts = 0, last_error = NULL, lease_until_ms = 0, lease_token = NULL, \
                         pending_version = CASE WHEN remote_id IS NOT NULL AND NOT remote_deleted \
                           THEN NULL ELSE pending_version END, \
                         pending_record = CASE WHEN remote_id IS NOT NULL AND NOT remote_deleted \
                           THEN NULL ELSE pending_record END, \
                         next_attempt_at_ms = $3, updated_at = $4 \
                         WHERE customer_id = $5 AND connector = $6 AND lease_token = $7",
                    )
                    .bind(synced)
                    .bind(settled)
                    .bind($at.timestamp_millis())
                    .bind($at)
                    .bind(&$link.customer_id)
                    .bind(&$link.connector)
                    .bind(&$link.lease_token)
                    .bind($link.repairs)
                    .bind($link.wanted_version)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected()
                }
                RecordedOutcome::RetryScheduled { version, operation, attempt, at_ms, error, pending_version, answered } => {
                    // A failed push may have been applied (a timeout): what
                    // the remote holds is unknown until the next delivery,
                    // so no later version is skipped as unchanged or sent
                    // as its changed fields alone (here and on a dead
                    // letter). The retry of this version is planned over
                    // the same base (`unsure_base`), the same request: sent
                    // whole under another key, the remote applied both, the
                    // second over an edit made there between. After an
                    // answered failure it goes under a fresh key (see
                    // `answered`), unless it was a create: judged by the
                    // push, not by a create marker on the link (one left
                    // by a create held back, then linked by an inbound
                    // event, kept every update's retry on the key whose
                    // 500 the remote had saved). A second version failing
                    // so leaves no base at all: its request was the whole
                    // record already. `pushed_hash` is NULL meanwhile, as a
                    // replica of an older release reads it.
                    // A newer version taken in while the push was out
                    // started its own count (the intake reset it): this
                    // failure is its first, not the older one's next; one
                    // that spends no attempt (a rate limit) leaves it at 0.
                    // A push of a version past the claim's wanted one was
                    // counted from 0 already (`schedule_retry`), whatever
                    // raised the wanted version meanwhile (an intake that
                    // reset the count, or an inbound link write or a
                    // forced push that kept it), and that version is the
                    // wanted one from now on: left below, a claim that read
                    // past it again, while its change was still not taken
                    // in, started the count afresh every time, and the push
                    // never gave up.
                    sqlx::query(
                        "UPDATE sync_links SET state = 'retry', \
                         attempts = CASE WHEN $11 > $9 THEN $1 \
                           WHEN wanted_version > $9 THEN attempts + $1 - $10 ELSE $1 END, \
                         wanted_version = CASE WHEN $11 > wanted_version THEN $11 ELSE wanted_version END, \
                         next_attempt_at_ms = $2, \
                         last_error = $3, pending_version = COALESCE($4, pending_version), \
                         unsure_base = CASE WHEN pushed_hash IS NOT NULL THEN pushed_hash \
                           WHEN unsure_version = $11 THEN unsure_base END, \
                         unsure_version = $11, pushed_hash = NULL, \
                         repairs = CASE WHEN $12 AND $13 <> 'create' \
                           THEN repairs + 1 ELSE repairs END, \
                         lease_until_ms = 0, lease_token = NULL, updated_at = $5 \
                         WHERE customer_id = $6 AND connector = $7 AND lease_token = $8",
                    )
                    .bind(attempt)
                    .bind(at_ms)
                    .bind(super::capped(error))
                    .bind(pending_version)
                    .bind($at)
                    .bind(&$link.customer_id)
                    .bind(&$link.connector)
                    .bind(&$link.lease_token)
                    .bind($link.wanted_version)
                    .bind($link.attempts)
                    .bind(version)
                    .bind(answered)
                    .bind(operation)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected()
                }
                RecordedOutcome::Deferred { at_ms, waits_for } => {
                    sqlx::query(
                        "UPDATE sync_links SET next_attempt_at_ms = $1, lease_until_ms = 0, \
                         lease_token = NULL, last_error = COALESCE($5, last_error) \
                         WHERE customer_id = $2 AND connector = $3 AND lease_token = $4",
                    )
                    .bind(at_ms)
                    .bind(&$link.customer_id)
                    .bind(&$link.connector)
                    .bind(&$link.lease_token)
                    .bind(waits_for)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected()
                }
                RecordedOutcome::DeadLettered { version, operation, attempt, error, error_kind, settle_ms } => {
                    // A create the remote refused was not applied: forget
                    // it, so a fixed record is sent fresh. Exhausted retries
                    // may have been applied (timeouts), refused credentials
                    // say nothing about an earlier attempt that timed out,
                    // and an answer ferry could not keep came from a
                    // create that was applied: keep replaying that create.
                    // Not one answered with a record another customer
                    // links: its replay would meet that link again, and so
                    // would every later version behind the kept create
                    // (docs/performance.md, round 49, "Left").
                    let forget_pending = !matches!(
                        error_kind,
                        DeadLetterKind::RetriesExhausted
                            | DeadLetterKind::Unauthorized
                            | DeadLetterKind::UnusableAnswer
                    );
                    // A newer change that came in during the push is not
                    // this failure's: the link stays open for it (intake
                    // only re-opens a dead link for a version above its
                    // wanted one, which this change already raised).
                    // Newer than what was pushed, too: the push sends the
                    // customer as the claim read it, which may already be
                    // past the wanted version the claim saw.
                    // The version that died is the wanted one from now on:
                    // the change that brings it later (the relay takes it
                    // in after the push read it) must not re-open the
                    // dead link and push it again.
                    // Not when the push was older than the claim's wanted
                    // version (the replay of a create the remote then
                    // refused, made before a fix came in): that version was
                    // never tried, and stays to push. A create kept for
                    // replay would only be replayed again, so there the
                    // wanted version dies with it.
                    // Only a create's replay: an update or delete below the
                    // claim's wanted version pushed a customer that never
                    // reached it (a database restored behind its bus), and
                    // dying at that version would leave every later edit
                    // up to it unpushed.
                    // And a create's replay only up to the version the
                    // customer reached: a first create under a wanted
                    // version from before a restore died there, and the
                    // edits up to it never re-opened the link.
                    let failed = if forget_pending
                        || *operation != Some("create")
                        || $link.wanted_version <= *version
                    {
                        *version
                    } else {
                        let reached: Option<i64> =
                            sqlx::query_scalar("SELECT version FROM customers WHERE id = $1")
                                .bind(&$link.customer_id)
                                .fetch_optional(&mut *$tx)
                                .await?;
                        (*version).max($link.wanted_version.min(reached.unwrap_or(*version)))
                    };
                    // Nor is a push forced meanwhile (`repairs` moved on, as
                    // in `fenced_by_repairs!`): it is still to go.
                    // A wanted version the customer has not reached (a
                    // change message from before the database was restored
                    // or failed over behind it) is no newer change, as for
                    // a skip: taken as one, the link was pending again at
                    // once, pushed, refused and dead-lettered again, for
                    // ever. It comes down to the version that died.
                    sqlx::query(concat!(
                        "UPDATE sync_links SET \
                         state = CASE WHEN ", dead_letter_leaves_newer!(), " OR repairs <> $10 THEN 'pending' ELSE 'dead' END, \
                         wanted_version = CASE WHEN ", dead_letter_leaves_newer!(), " THEN wanted_version ELSE $8 END, \
                         attempts = CASE WHEN ", dead_letter_leaves_newer!(), " OR repairs <> $10 THEN 0 ELSE $1 END, \
                         next_attempt_at_ms = $9, \
                         last_error = $2, \
                         pending_version = CASE WHEN $7 THEN NULL ELSE pending_version END, \
                         pending_record = CASE WHEN $7 THEN NULL ELSE pending_record END, \
                         pushed_hash = NULL, unsure_version = NULL, unsure_base = NULL, lease_until_ms = 0, lease_token = NULL, updated_at = $3 \
                         WHERE customer_id = $4 AND connector = $5 AND lease_token = $6",
                    ))
                    .bind(attempt)
                    .bind(super::capped(error))
                    .bind($at)
                    .bind(&$link.customer_id)
                    .bind(&$link.connector)
                    .bind(&$link.lease_token)
                    .bind(forget_pending)
                    .bind(failed)
                    .bind($at.timestamp_millis().saturating_add(*settle_ms))
                    .bind($link.repairs)
                    .bind($link.wanted_version)
                    .execute(&mut *$tx)
                    .await?
                    .rows_affected()
                }
            };
            if updated != 1 {
                return Ok(false);
            }
            let (version, operation, outcome_name, attempt, detail, next_at, remote_id) = match $outcome {
                RecordedOutcome::Delivered { operation, version, remote_id, .. } => {
                    let detail = kept.as_deref().map(|linked| kept_detail(remote_id, linked));
                    (*version, Some(*operation), "delivered", $link.attempts + 1, detail, None, Some(remote_id.clone()))
                }
                RecordedOutcome::Skipped { version, reason, .. } => {
                    (*version, None, "skipped", $link.attempts + 1, Some(reason.clone()), None, $link.remote_id.clone())
                }
                RecordedOutcome::RetryScheduled { version, operation, attempt, at_ms, error, .. } => {
                    (*version, Some(*operation), "retry_scheduled", *attempt, Some(error.clone()), Some(*at_ms), $link.remote_id.clone())
                }
                RecordedOutcome::Deferred { .. } => return Ok(true),
                RecordedOutcome::DeadLettered { version, operation, attempt, error, .. } => {
                    (*version, *operation, "dead_lettered", *attempt, Some(error.clone()), None, $link.remote_id.clone())
                }
            };
            sqlx::query(INSERT_DELIVERY_SQL)
                .bind(&$link.customer_id)
                .bind(&$link.connector)
                .bind(version)
                .bind(operation)
                .bind(outcome_name)
                .bind(attempt)
                .bind(detail.as_deref().map(super::capped))
                .bind(next_at)
                .bind(remote_id)
                .bind(&$link.correlation_id)
                .bind($at)
                .execute(&mut *$tx)
                .await?;
            if let RecordedOutcome::DeadLettered { version, attempt, error_kind, error, .. } = $outcome {
                sqlx::query(
                    "INSERT INTO dead_letters (id, customer_id, connector, direction, version, \
                     error_kind, error, attempts, correlation_id, created_at) \
                     VALUES ($1, $2, $3, 'outbound', $4, $5, $6, $7, $8, $9)",
                )
                .bind(super::new_id("dl_"))
                .bind(&$link.customer_id)
                .bind(&$link.connector)
                .bind(version)
                .bind(error_kind.as_str())
                .bind(super::capped(error))
                .bind(attempt)
                .bind(&$link.correlation_id)
                .bind($at)
                .execute(&mut *$tx)
                .await?;
            }
            Ok::<bool, StoreError>(true)
        }
        .await
    };
}

/// Inside a dispatched transaction `$tx`: records that a create of
/// `$version` is about to send `$record` for `$link`.
macro_rules! pending_in {
    ($tx:ident, $link:expr, $version:expr, $record:expr) => {
        async {
            let updated = sqlx::query(
                "UPDATE sync_links SET pending_version = $1, pending_record = $2 \
                 WHERE customer_id = $3 AND connector = $4 AND lease_token = $5",
            )
            .bind($version)
            .bind(Json($record))
            .bind(&$link.customer_id)
            .bind(&$link.connector)
            .bind(&$link.lease_token)
            .execute(&mut *$tx)
            .await?;
            Ok::<bool, StoreError>(updated.rows_affected() == 1)
        }
        .await
    };
}

/// Inside a dispatched transaction `$tx`: one link write on its own;
/// whether the lease still held.
macro_rules! write_in {
    ($tx:ident, $link:expr, $write:expr, $at:expr) => {
        match $write {
            LinkWrite::CreatePending { version, record } => {
                pending_in!($tx, $link, version, record)
            }
            LinkWrite::Outcome(outcome) => record_in!($tx, $link, outcome, $at),
        }
    };
}

impl Store {
    /// Links `customer`'s record at `connector` to `remote_id`, if the
    /// link has no live remote record (none, or one deleted remotely that
    /// the create replaces) and keeps a create of `version` whose
    /// answer was lost (its echo names the record it made). The kept
    /// create is dropped, and its version counts as synced: the record
    /// holds it, and an update of that version would reuse the create's
    /// idempotency key on another endpoint (Stripe refuses that: 400
    /// `idempotency_error`). The echo's `record` is the link's snapshot, as
    /// a delivered create's answer would be (without one, the next remote
    /// edit merged with no base, and under `flag` every field differing was
    /// a conflict); over a deleted record it replaces that one's. A later version is pushed as an update. False if the link
    /// moved on (a remote id, another pending create), or `remote_id` is
    /// another link's.
    ///
    /// A link dead-lettered at that version (the create's retry refused, or
    /// its attempts spent) is in sync: it is `synced` again, and its open
    /// outbound letters up to that version are closed (`replayed_at`). It
    /// stayed `dead`, counted on the health page and the letters' gauge,
    /// for a person to replay what had nothing left to send.
    pub async fn adopt_created_remote(
        &self,
        connector: &str,
        customer: &super::CustomerId,
        version: i64,
        remote_id: &str,
        record: Option<&serde_json::Value>,
    ) -> Result<bool, StoreError> {
        let at = now();
        let adopted = dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let adopted = sqlx::query(
                "UPDATE sync_links SET remote_id = $4, remote_deleted = FALSE, \
                 pending_version = NULL, pending_record = NULL, updated_at = $5, \
                 remote_seen_at_ms = CASE WHEN remote_id = $4 THEN remote_seen_at_ms ELSE 0 END, \
                 synced_version = CASE WHEN synced_version < $3 THEN $3 ELSE synced_version END, \
                 snapshot = CASE WHEN remote_deleted THEN $6 ELSE COALESCE(snapshot, $6) END, \
                 attempts = CASE WHEN state = 'dead' AND wanted_version <= $3 THEN 0 ELSE attempts END, \
                 last_error = CASE WHEN state = 'dead' AND wanted_version <= $3 THEN NULL ELSE last_error END, \
                 state = CASE WHEN state = 'dead' AND wanted_version <= $3 THEN 'synced' ELSE state END \
                 WHERE connector = $1 AND customer_id = $2 \
                 AND (remote_id IS NULL OR remote_deleted) AND pending_version = $3",
            )
            .bind(connector)
            .bind(customer.as_str())
            .bind(version)
            .bind(remote_id)
            .bind(at)
            .bind(record.map(Json))
            .execute(&mut *tx)
            .await;
            match adopted {
                Ok(done) if done.rows_affected() == 1 => {}
                Ok(_) => return Ok(false),
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() => return Ok(false),
                Err(e) => return Err(e.into()),
            }
            // Rare (a create's lost answer, found by its echo): the look
            // at the connector's open letters is not on a hot path.
            sqlx::query(
                "UPDATE dead_letters SET replayed_at = $4 WHERE connector = $1 \
                 AND customer_id = $2 AND direction = 'outbound' AND replayed_at IS NULL \
                 AND version <= $3",
            )
            .bind(connector)
            .bind(customer.as_str())
            .bind(version)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            true
        });
        Ok(adopted)
    }

    /// Schedules a push of each change to each connector and takes the
    /// changes' outbox rows off the queue, in the same transaction, so a
    /// change is never consumed twice nor lost.
    #[tracing::instrument(skip_all, fields(changes = changes.len(), connectors = connectors.len()))]
    pub async fn intake_changes(
        &self,
        changes: &[ChangeNotice],
        connectors: &[String],
    ) -> Result<Vec<LinkKey>, StoreError> {
        let at = now();
        let newest = newest_per_link(changes, connectors);
        let consumed: Vec<(i64, &str, i64)> = changes
            .iter()
            .filter_map(|c| Some((c.outbox_id?, c.customer_id.as_str(), c.version)))
            .collect();
        let pools = match &self.backend {
            Backend::Postgres(pool) => {
                intake_postgres(pool, &newest, &consumed, at).await?;
                return Ok(newest.into_keys().collect());
            }
            Backend::Sqlite(pools) => pools,
        };
        let rows: Vec<(&str, &str, i64, Option<&str>)> = newest
            .iter()
            .map(|(key, change)| {
                (
                    key.customer_id.as_str(),
                    key.connector.as_str(),
                    change.version,
                    change.correlation_id.as_deref(),
                )
            })
            .collect();
        let mut tx = pools.writer.begin().await?;
        if !rows.is_empty() {
            sqlx::query(INTAKE_BATCH_SQLITE)
                .bind(serde_json::to_string(&rows)?)
                .bind(at.timestamp_millis())
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
        if !consumed.is_empty() {
            sqlx::query(CONSUMED_SQLITE)
                .bind(serde_json::to_string(&consumed)?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(newest.into_keys().collect())
    }

    /// The in-process bus's round: takes up to `limit` changes off the
    /// outbox queue, oldest first, and schedules their pushes to
    /// `connectors`, atomically (one statement on PostgreSQL).
    pub async fn intake_queued(
        &self,
        limit: u32,
        connectors: &[String],
    ) -> Result<Intake, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            let changes = self.queued_outbox(limit, true).await?;
            let scheduled =
                !changes.is_empty() && !self.intake_changes(&changes, connectors).await?.is_empty();
            return Ok(Intake {
                taken: changes.len(),
                scheduled,
            });
        };
        let at = now();
        let (taken, scheduled): (i64, i64) = sqlx::query_as(INTAKE_QUEUED_POSTGRES)
            .bind(i64::from(limit))
            .bind(connectors)
            .bind(at.timestamp_millis())
            .bind(at)
            // Planned for each call (the store module's "Plans kept from an
            // empty table"): the queue is empty when a connection starts.
            .persistent(false)
            .fetch_one(pool)
            .await?;
        Ok(Intake {
            taken: usize::try_from(taken).unwrap_or_default(),
            scheduled: scheduled > 0,
        })
    }

    /// Claims each of `keys` that is due and free, in one transaction;
    /// returns the claimed links. `ready`: the connectors that may push
    /// now (see [`ClaimedLink`]).
    pub async fn claim_links(
        &self,
        keys: &[LinkKey],
        ready: &[String],
        lease_token: &str,
        lease_until_ms: i64,
    ) -> Result<Vec<ClaimedLink>, StoreError> {
        let now = now_ms();
        if let Backend::Postgres(pool) = &self.backend {
            let (customers, connectors): (Vec<&str>, Vec<&str>) = keys
                .iter()
                .map(|k| (k.customer_id.as_str(), k.connector.as_str()))
                .unzip();
            let rows: Vec<ClaimedRow> = sqlx::query_as(CLAIM_KEYS_POSTGRES)
                .bind(customers)
                .bind(connectors)
                .bind(lease_until_ms)
                .bind(lease_token)
                .bind(now)
                .bind(ready)
                .fetch_all(pool)
                .await?;
            return Ok(rows.into_iter().map(ClaimedLink::from).collect());
        }
        let mut claimed: Vec<SyncLinkRow> = Vec::new();
        let ready = json_array(ready);
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            for key in keys {
                let row: Option<SyncLinkRow> = sqlx::query_as(CLAIM_ONE_SQL)
                    .bind(&key.customer_id)
                    .bind(&key.connector)
                    .bind(lease_until_ms)
                    .bind(lease_token)
                    .bind(now)
                    .bind(&ready)
                    .fetch_optional(&mut *tx)
                    .await?;
                claimed.extend(row);
            }
            tx.commit().await?;
        });
        Ok(self.with_customers(claimed).await)
    }

    /// SQLite's claimed links with their customers, read in one statement
    /// for the batch (a read per push was a hand-off to a reader's thread
    /// each; docs/performance.md, round 14). If that read fails the links
    /// go without (`customer: None`): each push then reads its own, rather
    /// than the claim failing with its leases already taken.
    async fn with_customers(&self, rows: Vec<SyncLinkRow>) -> Vec<ClaimedLink> {
        let links: Vec<SyncLink> = rows.into_iter().map(SyncLink::from).collect();
        let ids: Vec<&str> = links.iter().map(|l| l.customer_id.as_str()).collect();
        let customers = match self.customers_any(&ids).await {
            Ok(customers) => customers,
            Err(error) => {
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "reading the claimed links' customers failed; each push reads its own"
                );
                Vec::new()
            }
        };
        let customers: std::collections::HashMap<&str, &Customer> =
            customers.iter().map(|c| (c.id.as_str(), c)).collect();
        links
            .into_iter()
            .map(|link| ClaimedLink {
                customer: customers.get(link.customer_id.as_str()).map(|&c| c.clone()),
                link,
            })
            .collect()
    }

    /// Claims up to `limit` due, free links, oldest due first: `of` one
    /// connector's only, or (`None`) any connector's. `ready`: the
    /// connectors that may push now (see [`ClaimedLink`]).
    pub async fn claim_due_links(
        &self,
        of: Option<&str>,
        ready: &[String],
        lease_token: &str,
        lease_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<ClaimedLink>, StoreError> {
        let now = now_ms();
        match &self.backend {
            Backend::Sqlite(pools) => {
                let sql = if of.is_some() {
                    CLAIM_DUE_OF_SQLITE
                } else {
                    CLAIM_DUE_SQLITE
                };
                let mut claim = sqlx::query_as(sql)
                    .bind(lease_until_ms)
                    .bind(lease_token)
                    .bind(now)
                    .bind(i64::from(limit))
                    .bind(json_array(ready));
                if let Some(of) = of {
                    claim = claim.bind(of);
                }
                let rows: Vec<SyncLinkRow> = claim.fetch_all(&pools.writer).await?;
                Ok(self.with_customers(rows).await)
            }
            Backend::Postgres(pool) => {
                let sql = if of.is_some() {
                    CLAIM_DUE_OF_POSTGRES
                } else {
                    CLAIM_DUE_POSTGRES
                };
                let mut claim = sqlx::query_as(sql)
                    .bind(lease_until_ms)
                    .bind(lease_token)
                    .bind(now)
                    .bind(i64::from(limit))
                    .bind(ready);
                if let Some(of) = of {
                    claim = claim.bind(of);
                }
                let rows: Vec<ClaimedRow> = claim.fetch_all(pool).await?;
                Ok(rows.into_iter().map(ClaimedLink::from).collect())
            }
        }
    }

    /// When the next link falls due (unix ms), if any is waiting: the
    /// earliest due one whose lease does not outlast its due time, or has
    /// ended. A push in flight is left out: its outcome's commit wakes the
    /// scheduler, and one that never ends is found at the next idle poll.
    /// Read from the due index, first row first: a minimum over every
    /// waiting link's due time and lease read them all, twice a second
    /// while the scheduler idled over a backlog waiting out a rate limit
    /// or a backoff.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let now = super::now_ms();
        let next: Option<i64> = dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT CASE WHEN lease_until_ms > next_attempt_at_ms THEN lease_until_ms \
                 ELSE next_attempt_at_ms END FROM sync_links WHERE state IN ('pending', 'retry') \
                 AND held_by IS NULL AND (lease_until_ms <= next_attempt_at_ms OR lease_until_ms < $1) \
                 ORDER BY next_attempt_at_ms LIMIT 1",
            )
            .bind(now)
            .fetch_optional(pool)
            .await?
        });
        Ok(next)
    }

    /// Applies link writes under their leases in ONE transaction (group
    /// commit: concurrent pushes share the fsync). Returns, per write,
    /// whether the lease still held. If the transaction fails (e.g. one
    /// write hit the unique remote id), nothing is applied and the caller
    /// retries the writes one by one to find the culprit.
    #[tracing::instrument(skip_all, fields(writes = writes.len()))]
    pub async fn write_links(
        &self,
        writes: &[(&SyncLink, &LinkWrite)],
    ) -> Result<Vec<bool>, StoreError> {
        let at = now();
        match &self.backend {
            Backend::Postgres(pool) => write_links_postgres(pool, writes, at).await,
            Backend::Sqlite(pools) => write_links_sqlite(&pools.writer, writes, at).await,
        }
    }

    /// The links of one customer, by connector.
    pub async fn links_of(&self, customer_id: &str) -> Result<Vec<SyncLink>, StoreError> {
        let rows: Vec<SyncLinkRow> = dispatch!(self, read pool => {
            sqlx::query_as(concat!(
                "SELECT ", link_columns!(), " FROM sync_links WHERE customer_id = $1 ORDER BY connector"
            ))
            .bind(customer_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(SyncLink::from).collect())
    }

    /// Whether a duplicate-email `merge` took `customer_id`'s link of
    /// `connector` from record `remote_id` (see the store's inbound write).
    pub async fn released_by_merge(
        &self,
        customer_id: &str,
        connector: &str,
        remote_id: &str,
    ) -> Result<bool, StoreError> {
        let row: Option<(i32,)> = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT 1 FROM sync_links WHERE customer_id = $1 AND connector = $2 \
                 AND released_remote_id = $3",
            )
            .bind(customer_id)
            .bind(connector)
            .bind(remote_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.is_some())
    }

    /// The link of `remote_id` in `connector`, if any.
    pub async fn link_by_remote_id(
        &self,
        connector: &str,
        remote_id: &str,
    ) -> Result<Option<SyncLink>, StoreError> {
        let row: Option<SyncLinkRow> = dispatch!(self, read pool => {
            sqlx::query_as(concat!(
                "SELECT ", link_columns!(), " FROM sync_links WHERE connector = $1 AND remote_id = $2"
            ))
            .bind(connector)
            .bind(remote_id)
            .fetch_optional(pool)
            .await?
        });
        Ok(row.map(SyncLink::from))
    }

    /// The links of several remote records at once (the inbound apply's
    /// read of a claimed batch), by `(connector, remote id)`.
    pub async fn links_by_remote_ids(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<Vec<SyncLink>, StoreError> {
        let rows: Vec<SyncLinkRow> = match &self.backend {
            Backend::Postgres(pool) => {
                let (connectors, remote_ids): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
                sqlx::query_as(concat!(
                    "SELECT ",
                    link_columns!(),
                    " FROM sync_links WHERE (connector, remote_id) IN ",
                    "(SELECT * FROM unnest($1::text[], $2::text[]))"
                ))
                .bind(connectors)
                .bind(remote_ids)
                // Planned for each call (the store module's "Plans kept
                // from an empty table").
                .persistent(false)
                .fetch_all(pool)
                .await?
            }
            // In-process reads: one indexed lookup each is as cheap.
            Backend::Sqlite(_) => {
                let mut links = Vec::with_capacity(keys.len());
                for (connector, remote_id) in keys {
                    links.extend(self.link_by_remote_id(connector, remote_id).await?);
                }
                return Ok(links);
            }
        };
        Ok(rows.into_iter().map(SyncLink::from).collect())
    }
}

/// Marks creates about to be sent, for a batch of links (`$1` the writes'
/// positions in the batch); returns the positions whose lease held.
const PENDING_BATCH_POSTGRES: &str = "UPDATE sync_links l SET pending_version = w.version, \
       pending_record = w.record \
     FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::jsonb[]) \
       AS w(i, customer_id, connector, lease_token, version, record) \
     WHERE l.customer_id = w.customer_id AND l.connector = w.connector \
       AND l.lease_token = w.lease_token \
     RETURNING w.i";

/// Records delivered pushes for a batch of links, with their delivery
/// records: the multi-row form of `record_in!`'s `Delivered` arm. Returns
/// the positions whose lease held.
/// A row whose link took another live record meanwhile is not written
/// here: it returns no position, and goes one by one (`record_in!`).
const DELIVERED_BATCH_POSTGRES: &str = concat!("WITH w AS (SELECT * FROM UNNEST($1::int4[], \
       $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[], $7::int8[], $8::text[], \
       $9::text[], $10::text[], $11::int8[], $12::int4[], $13::text[], $16::int4[], $17::text[]) \
       AS w(i, customer_id, connector, lease_token, remote_id, remote_deleted, synced_version, \
            pushed_hash, snapshot, operation, version, attempt, correlation_id, repairs, \
            snapshot_base)), \
     updated AS (UPDATE sync_links l SET remote_id = w.remote_id, \
       remote_deleted = w.remote_deleted, ",
    fenced_by_repairs!(
        "l",
        "w.repairs",
        "w.synced_version",
        "w.pushed_hash",
        "w.snapshot::jsonb",
        "w.snapshot_base::jsonb"
    ),
    ", pending_version = NULL, unsure_version = NULL, unsure_base = NULL, \
       pending_record = NULL, attempts = 0, last_error = NULL, lease_until_ms = 0, lease_token = NULL, \
       updated_at = $14, \
       remote_seen_at_ms = CASE WHEN l.remote_id IS NULL OR l.remote_id <> w.remote_id \
         THEN 0 ELSE l.remote_seen_at_ms END, \
       next_attempt_at_ms = $15, pushed_at_ms = $15 \
       FROM w WHERE l.customer_id = w.customer_id AND l.connector = w.connector \
         AND l.lease_token = w.lease_token AND \
       ", delivered_may_write!("l", "w.remote_id"), " \
       RETURNING w.i), \
     recorded AS (INSERT INTO deliveries (customer_id, connector, direction, version, \
       operation, outcome, attempt, remote_id, correlation_id, created_at) \
       SELECT w.customer_id, w.connector, 'outbound', w.version, w.operation, 'delivered', \
         w.attempt, w.remote_id, w.correlation_id, $14 \
       FROM w JOIN updated ON updated.i = w.i) \
     SELECT i FROM updated");

/// Per write, whether it is the first of its link in the group. One write
/// per link is the rule (one lease, one step at a time), but a batch
/// statement's `UPDATE … FROM` would apply only one of two, so a second
/// goes one by one, after the batches.
fn first_of_link(writes: &[(&SyncLink, &LinkWrite)]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(writes.len());
    writes
        .iter()
        .map(|(link, _)| seen.insert((link.customer_id.as_str(), link.connector.as_str())))
        .collect()
}

/// [`Store::write_links`] on PostgreSQL: create markers and deliveries, the
/// writes every push makes, go as one statement each for the whole batch
/// (round trips, not rows, are what a batch costs there); the rarer
/// outcomes as one statement per link, as on SQLite. One transaction; a
/// batch that is one statement (the usual: its pushes' deliveries) needs
/// none of its own, so it costs one round trip instead of three.
async fn write_links_postgres(
    pool: &sqlx::PgPool,
    writes: &[(&SyncLink, &LinkWrite)],
    at: DateTime<Utc>,
) -> Result<Vec<bool>, StoreError> {
    let mut batches = Batches::default();
    let mut others = Vec::new();
    let firsts = first_of_link(writes);
    // Links are locked in (customer, connector) order, as the relay's
    // intake locks them: in the order the pushes ended, a group and an
    // intake could each hold a link the other waits for (40P01). Byte
    // order, which the statements' `COLLATE "C"` follow: a database's
    // own collation (glibc's `en_US.UTF-8` passes over `-`) put
    // `sf-eu` and `sfa` the other way round.
    let in_key_order = |a: &usize, b: &usize| {
        let key = |i: usize| (&writes[i].0.customer_id, &writes[i].0.connector);
        key(*a).cmp(&key(*b)).then(a.cmp(b))
    };
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by(in_key_order);
    for index in order {
        let ((link, write), first) = (&writes[index], firsts[index]);
        let i = i32::try_from(index).unwrap_or(i32::MAX);
        match write {
            LinkWrite::CreatePending { version, record } if first => {
                batches.pending.push(i, link, *version, record)
            }
            LinkWrite::Outcome(outcome) if first => match Delivery::of(outcome) {
                Some(delivery) => batches.delivered.push(i, link, delivery),
                None => others.push(index),
            },
            _ => others.push(index),
        }
    }
    let mut applied = vec![false; writes.len()];
    let single = others.is_empty()
        && (batches.pending.links.i.is_empty() || batches.delivered.links.i.is_empty());
    if single {
        let mut conn = pool.acquire().await?;
        batches.write(&mut conn, at, &mut applied).await?;
        let mut missed = batches.delivered_missed(&applied);
        missed.sort_by(in_key_order);
        if missed.is_empty() {
            return Ok(applied);
        }
        // The batch has committed: a failure here leaves these writes
        // undone (as a lost lease would: the link is claimed again when it
        // expires), not the batch's reported as failed.
        let rest = async {
            let mut done = Vec::with_capacity(missed.len());
            let mut tx = sqlx::Acquire::begin(&mut *conn).await?;
            for &index in &missed {
                let (link, write) = writes[index];
                done.push((index, write_in!(tx, link, write, at)?));
            }
            tx.commit().await?;
            Ok::<_, StoreError>(done)
        };
        match rest.await {
            Ok(done) => {
                for (index, held) in done {
                    applied[index] = held;
                }
            }
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "writing pushes the batch left failed; their links are claimed again"
            ),
        }
        return Ok(applied);
    }
    let mut tx = pool.begin().await?;
    // Every link of the group locked first, in key order: the statements
    // below take theirs one after another (the create markers', then the
    // deliveries', then each other write's), and so in no one order, and
    // an intake locking the same links in key order meanwhile deadlocked
    // with it (40P01: a second's stall, and one side undone).
    let mut keys: Vec<(&str, &str)> = writes
        .iter()
        .map(|(link, _)| (link.customer_id.as_str(), link.connector.as_str()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let (customers, connectors): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
    sqlx::query(
        "SELECT 1 FROM sync_links WHERE (customer_id, connector) IN \
         (SELECT * FROM UNNEST($1::text[], $2::text[])) \
         ORDER BY customer_id COLLATE \"C\", connector COLLATE \"C\" FOR NO KEY UPDATE",
    )
    .bind(customers)
    .bind(connectors)
    .persistent(false)
    .execute(&mut *tx)
    .await?;
    batches.write(&mut tx, at, &mut applied).await?;
    // The lease lost, or the link took another record: the write alone
    // tells which.
    others.extend(batches.delivered_missed(&applied));
    // In key order, and for one link in the order of its writes: its
    // first write before its second.
    others.sort_by(in_key_order);
    for index in others {
        let (link, write) = writes[index];
        applied[index] = write_in!(tx, link, write, at)?;
    }
    tx.commit().await?;
    Ok(applied)
}

// SQLite: a batch's deliveries as one update over `json_each` (`$1`: one
// `[customer, connector, lease token, remote id, remote deleted, synced
// version, pushed hash, snapshot, operation, version, attempt, correlation]`
// array per push), returning the links whose lease held; their delivery
// records follow as one insert (`$1`: the held rows). A row whose link took
// another live record meanwhile is not written here, and goes one by one
// (`record_in!`).
const DELIVERED_BATCH_SQLITE: &str = concat!(
    "UPDATE sync_links SET \
       remote_id = json_extract(w.value, '$[3]'), remote_deleted = json_extract(w.value, '$[4]'), ",
    fenced_by_repairs!(
        "sync_links",
        "json_extract(w.value, '$[12]')",
        "json_extract(w.value, '$[5]')",
        "json_extract(w.value, '$[6]')",
        "json_extract(w.value, '$[7]')",
        "json_extract(w.value, '$[13]')"
    ),
    ", pending_version = NULL, pending_record = NULL, unsure_version = NULL, unsure_base = NULL, \
       attempts = 0, last_error = NULL, lease_until_ms = 0, lease_token = NULL, updated_at = $2, \
       remote_seen_at_ms = CASE WHEN sync_links.remote_id IS NULL \
         OR sync_links.remote_id <> json_extract(w.value, '$[3]') \
         THEN 0 ELSE sync_links.remote_seen_at_ms END, \
       next_attempt_at_ms = $3, pushed_at_ms = $3 \
     FROM json_each($1) AS w \
     WHERE sync_links.customer_id = json_extract(w.value, '$[0]') \
       AND sync_links.connector = json_extract(w.value, '$[1]') \
       AND sync_links.lease_token = json_extract(w.value, '$[2]') AND ",
    delivered_may_write!("sync_links", "json_extract(w.value, '$[3]')"),
    " RETURNING customer_id, connector"
);

const DELIVERIES_BATCH_SQLITE: &str = "INSERT INTO deliveries (customer_id, connector, \
       direction, version, operation, outcome, attempt, remote_id, correlation_id, created_at) \
     SELECT json_extract(w.value, '$[0]'), json_extract(w.value, '$[1]'), 'outbound', \
       json_extract(w.value, '$[9]'), json_extract(w.value, '$[8]'), 'delivered', \
       json_extract(w.value, '$[10]'), json_extract(w.value, '$[3]'), \
       json_extract(w.value, '$[11]'), $2 \
     FROM json_each($1) AS w ORDER BY w.key";

/// [`Store::write_links`] on SQLite: one transaction; the deliveries (the
/// write nearly every push makes) as two statements for the whole batch,
/// each statement being a hand-off to the writer's thread and back; the
/// rarer writes one by one, after them.
async fn write_links_sqlite(
    pool: &sqlx::SqlitePool,
    writes: &[(&SyncLink, &LinkWrite)],
    at: DateTime<Utc>,
) -> Result<Vec<bool>, StoreError> {
    let mut delivered = Vec::new();
    let mut others = Vec::new();
    for (index, ((link, write), first)) in writes.iter().zip(first_of_link(writes)).enumerate() {
        let delivery = match write {
            LinkWrite::Outcome(outcome) if first => Delivery::of(outcome),
            _ => None,
        };
        let Some(delivery) = delivery else {
            others.push(index);
            continue;
        };
        delivered.push((
            index,
            serde_json::json!([
                link.customer_id,
                link.connector,
                link.lease_token,
                delivery.remote_id,
                delivery.remote_deleted,
                // The statement keeps a higher one (see `record_in!`).
                link.synced_version.max(delivery.version),
                delivery.pushed_hash,
                delivery.snapshot,
                delivery.operation,
                delivery.version,
                link.attempts + 1,
                link.correlation_id,
                link.repairs,
                delivery.snapshot_base,
            ]),
        ));
    }
    let mut applied = vec![false; writes.len()];
    let mut tx = pool.begin().await?;
    if !delivered.is_empty() {
        let rows: Vec<&serde_json::Value> = delivered.iter().map(|(_, row)| row).collect();
        let held: std::collections::HashSet<(String, String)> =
            sqlx::query_as(DELIVERED_BATCH_SQLITE)
                .bind(serde_json::to_string(&rows)?)
                .bind(at)
                .bind(at.timestamp_millis())
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| match &e {
                    // As on PostgreSQL: a write alone is named.
                    sqlx::Error::Database(db) if db.is_unique_violation() && rows.len() == 1 => {
                        StoreError::RemoteIdTaken
                    }
                    _ => StoreError::Database(e),
                })?
                .into_iter()
                .collect();
        let mut recorded = Vec::with_capacity(held.len());
        for (index, row) in &delivered {
            let (link, _) = writes[*index];
            if held.contains(&(link.customer_id.clone(), link.connector.clone())) {
                applied[*index] = true;
                recorded.push(row);
            } else {
                // The lease lost, or the link took another record: the
                // write alone tells which.
                others.push(*index);
            }
        }
        if !recorded.is_empty() {
            sqlx::query(DELIVERIES_BATCH_SQLITE)
                .bind(serde_json::to_string(&recorded)?)
                .bind(at)
                .execute(&mut *tx)
                .await?;
        }
    }
    // In the order of the writes: a link's first write before its second.
    others.sort_unstable();
    for index in others {
        let (link, write) = writes[index];
        applied[index] = write_in!(tx, link, write, at)?;
    }
    tx.commit().await?;
    Ok(applied)
}

/// The writes of a batch that go as one statement per kind.
#[derive(Default)]
struct Batches<'a> {
    pending: PendingRows<'a>,
    delivered: DeliveredRows<'a>,
}

impl Batches<'_> {
    /// Runs the batch statements on `conn`, setting `applied` where a
    /// lease held.
    async fn write(
        &self,
        conn: &mut sqlx::PgConnection,
        at: DateTime<Utc>,
        applied: &mut [bool],
    ) -> Result<(), StoreError> {
        let (pending, delivered) = (&self.pending, &self.delivered);
        if !pending.links.i.is_empty() {
            let held: Vec<i32> = pending
                .links
                .bind(sqlx::query_scalar(PENDING_BATCH_POSTGRES))
                .bind(&pending.version)
                .bind(&pending.record)
                .fetch_all(&mut *conn)
                .await?;
            mark(applied, &held);
        }
        if !delivered.links.i.is_empty() {
            let held: Vec<i32> = delivered
                .links
                .bind(sqlx::query_scalar(DELIVERED_BATCH_POSTGRES))
                .bind(&delivered.remote_id)
                .bind(&delivered.remote_deleted)
                .bind(&delivered.synced_version)
                .bind(&delivered.pushed_hash)
                .bind(&delivered.snapshot)
                .bind(&delivered.operation)
                .bind(&delivered.version)
                .bind(&delivered.attempt)
                .bind(&delivered.correlation_id)
                .bind(at)
                .bind(at.timestamp_millis())
                .bind(&delivered.repairs)
                .bind(&delivered.snapshot_base)
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| match &e {
                    // A remote id taken fails the batch; the group commit
                    // then writes one by one, and a write alone is named.
                    sqlx::Error::Database(db)
                        if db.is_unique_violation() && delivered.links.i.len() == 1 =>
                    {
                        StoreError::RemoteIdTaken
                    }
                    _ => StoreError::Database(e),
                })?;
            mark(applied, &held);
        }
        Ok(())
    }
}

impl Batches<'_> {
    /// The positions of the deliveries the batch did not write.
    fn delivered_missed(&self, applied: &[bool]) -> Vec<usize> {
        self.delivered
            .links
            .i
            .iter()
            .filter_map(|i| usize::try_from(*i).ok())
            .filter(|i| !applied.get(*i).copied().unwrap_or(true))
            .collect()
    }
}

/// `names` as a JSON array, for SQLite's `json_each`.
fn json_array(names: &[String]) -> String {
    serde_json::Value::from(names).to_string()
}

/// Sets `applied` at the positions a batch statement returned.
fn mark(applied: &mut [bool], held: &[i32]) {
    for i in held {
        if let Some(slot) = usize::try_from(*i).ok().and_then(|i| applied.get_mut(i)) {
            *slot = true;
        }
    }
}

/// The columns both batch statements start with (`$1`–`$4`): the write's
/// position and the link under its lease.
#[derive(Default)]
struct LinkRows<'a> {
    i: Vec<i32>,
    customer_id: Vec<&'a str>,
    connector: Vec<&'a str>,
    lease_token: Vec<Option<&'a str>>,
}

type BatchQuery<'q> =
    sqlx::query::QueryScalar<'q, sqlx::Postgres, i32, sqlx::postgres::PgArguments>;

impl<'a> LinkRows<'a> {
    fn push(&mut self, i: i32, link: &'a SyncLink) {
        self.i.push(i);
        self.customer_id.push(&link.customer_id);
        self.connector.push(&link.connector);
        self.lease_token.push(link.lease_token.as_deref());
    }

    fn bind<'q>(&'q self, query: BatchQuery<'q>) -> BatchQuery<'q> {
        query
            .bind(&self.i)
            .bind(&self.customer_id)
            .bind(&self.connector)
            .bind(&self.lease_token)
    }
}

/// The columns of [`PENDING_BATCH_POSTGRES`].
#[derive(Default)]
struct PendingRows<'a> {
    links: LinkRows<'a>,
    version: Vec<i64>,
    record: Vec<Json<&'a serde_json::Value>>,
}

impl<'a> PendingRows<'a> {
    fn push(&mut self, i: i32, link: &'a SyncLink, version: i64, record: &'a serde_json::Value) {
        self.links.push(i, link);
        self.version.push(version);
        self.record.push(Json(record));
    }
}

/// One delivered push, as the batch statements take it.
struct Delivery<'a> {
    operation: &'static str,
    version: i64,
    remote_id: &'a str,
    remote_deleted: bool,
    pushed_hash: &'a str,
    snapshot: Option<String>,
    snapshot_base: Option<String>,
}

impl<'a> Delivery<'a> {
    /// The delivery `outcome` records, if it is one.
    fn of(outcome: &'a RecordedOutcome) -> Option<Self> {
        let RecordedOutcome::Delivered {
            operation,
            version,
            remote_id,
            remote_deleted,
            pushed_hash,
            snapshot,
            snapshot_base,
        } = outcome
        else {
            return None;
        };
        Some(Self {
            operation,
            version: *version,
            remote_id,
            remote_deleted: *remote_deleted,
            pushed_hash,
            snapshot: snapshot.as_ref().map(serde_json::Value::to_string),
            snapshot_base: snapshot_base.as_ref().map(serde_json::Value::to_string),
        })
    }
}

/// The columns of [`DELIVERED_BATCH_POSTGRES`].
#[derive(Default)]
struct DeliveredRows<'a> {
    links: LinkRows<'a>,
    remote_id: Vec<&'a str>,
    remote_deleted: Vec<bool>,
    synced_version: Vec<i64>,
    pushed_hash: Vec<&'a str>,
    snapshot: Vec<Option<String>>,
    operation: Vec<&'static str>,
    version: Vec<i64>,
    attempt: Vec<i32>,
    correlation_id: Vec<Option<&'a str>>,
    repairs: Vec<i32>,
    snapshot_base: Vec<Option<String>>,
}

impl<'a> DeliveredRows<'a> {
    fn push(&mut self, i: i32, link: &'a SyncLink, delivery: Delivery<'a>) {
        self.links.push(i, link);
        self.remote_id.push(delivery.remote_id);
        self.remote_deleted.push(delivery.remote_deleted);
        // The statement keeps a higher one (see `record_in!`).
        self.synced_version
            .push(link.synced_version.max(delivery.version));
        self.pushed_hash.push(delivery.pushed_hash);
        self.snapshot.push(delivery.snapshot);
        self.operation.push(delivery.operation);
        self.version.push(delivery.version);
        self.attempt.push(link.attempts + 1);
        self.correlation_id.push(link.correlation_id.as_deref());
        self.repairs.push(link.repairs);
        self.snapshot_base.push(delivery.snapshot_base);
    }
}

/// The links `changes` schedule a push on, each with the newest change of
/// its customer, unless that change came from the link's own connector
/// (see [`ChangeNotice`]).
fn newest_per_link<'a>(
    changes: &'a [ChangeNotice],
    connectors: &[String],
) -> std::collections::BTreeMap<LinkKey, &'a ChangeNotice> {
    let mut newest: std::collections::BTreeMap<LinkKey, &ChangeNotice> =
        std::collections::BTreeMap::new();
    for change in changes {
        for connector in connectors {
            let key = LinkKey {
                customer_id: change.customer_id.clone(),
                connector: connector.clone(),
            };
            let entry = newest.entry(key).or_insert(change);
            if change.version >= entry.version {
                *entry = change;
            }
        }
    }
    newest.retain(|key, change| change.source_connector.as_ref() != Some(&key.connector));
    newest
}

/// [`Store::intake_changes`] on PostgreSQL: one statement for the whole
/// batch (one row per link: ON CONFLICT may not touch a row twice in one
/// statement) instead of one round trip per change and connector.
async fn intake_postgres(
    pool: &sqlx::PgPool,
    newest: &std::collections::BTreeMap<LinkKey, &ChangeNotice>,
    consumed: &[(i64, &str, i64)],
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    if newest.is_empty() && consumed.is_empty() {
        return Ok(());
    }
    let mut customers = Vec::with_capacity(newest.len());
    let mut names = Vec::with_capacity(newest.len());
    let mut versions = Vec::with_capacity(newest.len());
    let mut correlations = Vec::with_capacity(newest.len());
    for (key, change) in newest {
        customers.push(key.customer_id.as_str());
        names.push(key.connector.as_str());
        versions.push(change.version);
        correlations.push(change.correlation_id.as_deref());
    }
    // With no connector taking part the insert has no rows and the
    // statement only takes the changes off the queue.
    sqlx::query(INTAKE_BATCH_POSTGRES)
        .bind(&customers)
        .bind(&names)
        .bind(&versions)
        .bind(at.timestamp_millis())
        .bind(at)
        .bind(&correlations)
        .bind(consumed.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(consumed.iter().map(|c| c.1).collect::<Vec<_>>())
        .bind(consumed.iter().map(|c| c.2).collect::<Vec<_>>())
        .execute(pool)
        .await?;
    Ok(())
}
