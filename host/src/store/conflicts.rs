//! Conflicts: fields a local and a remote edit changed differently since the
//! last synced snapshot. Every conflict is recorded; a flagged one (`open`)
//! holds its link until a person resolves it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use utoipa::ToSchema;

use super::customers::{columns, CustomerRow};
use super::{dispatch, now, Customer, CustomerFields, CustomerId, Store, StoreError};

/// One recorded conflict.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Conflict {
    /// `cf_…`
    pub id: String,
    /// The customer.
    pub customer_id: String,
    /// The connector the remote edit came through.
    pub connector: String,
    /// The remote event that conflicted.
    pub event_id: String,
    /// The policy in force: `last_writer_wins`, `prefer_local`,
    /// `prefer_remote` or `flag`.
    pub policy: String,
    /// Per field: `field`, `base`, `local`, `remote`, `resolution`.
    #[schema(value_type = Vec<Object>)]
    pub fields: Json<serde_json::Value>,
    /// The remote state that conflicted.
    #[schema(value_type = Object)]
    pub remote_record: Json<serde_json::Value>,
    /// `open` (waits for a person) or `resolved`.
    pub state: String,
    /// How it was resolved: the policy's choice, `local`, `remote` or `fields`.
    pub resolution: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it was resolved.
    pub resolved_at: Option<DateTime<Utc>>,
    /// The correlation id of the webhook delivery that conflicted.
    pub correlation_id: Option<String>,
}

const CONFLICT_COLUMNS: &str = "id, customer_id, connector, event_id, policy, fields, \
     remote_record, state, resolution, created_at, resolved_at, correlation_id";

/// Filter for [`Store::conflicts`].
#[derive(Debug, Clone, Default)]
pub struct ListConflicts {
    /// `open`, `resolved`, or all.
    pub state: Option<String>,
    /// Only this customer's.
    pub customer_id: Option<String>,
    /// Only this connector's.
    pub connector: Option<String>,
    /// Ids after this one.
    pub starting_after: Option<String>,
    /// Page size.
    pub limit: u32,
}

/// What resolving a conflict did.
#[derive(Debug)]
pub enum Resolved {
    /// Resolved; the customer as now written.
    Done(Box<Customer>),
    /// It was not open.
    NotOpen,
    /// The customer changed meanwhile: compute again.
    Raced,
}

/// Remote changes that waited behind a conflict, taken into its
/// resolution (see [`crate::sync::SyncEngine::fold_waiting`]).
#[derive(Debug, Clone)]
pub struct Folded {
    /// The newest remote state among them: the link's snapshot from now on.
    pub snapshot: serde_json::Value,
    /// When the remote wrote it (unix ms).
    pub seen_at_ms: i64,
    /// The inbox events it stands for.
    pub seqs: Vec<i64>,
    /// Fields the remote changed again while the link was held, to values
    /// other than the conflict showed, that the resolution's value
    /// overrides (JSON array of `FieldConflict`, decided `local`): a
    /// conflict of their own, recorded as decided. Empty: none.
    pub overridden: serde_json::Value,
    /// The newest waiting event, which those values came with.
    pub event_id: String,
}

/// A deleted customer's open conflicts have nothing left to decide (and
/// their resolve answers 409 `conflict_not_open`): they close as
/// `customer_deleted`, in the delete's transaction. `$1` the customer, `$2` the time.
pub(super) const CLOSE_FOR_DELETED_SQL: &str = "UPDATE conflicts SET state = 'resolved', \
    resolution = 'customer_deleted', resolved_at = $2 WHERE customer_id = $1 AND state = 'open'";

/// ...and release the links they held, so the delete reaches every
/// connector (a held link is never claimed). `$1` the customer, `$2` the
/// time.
pub(super) const RELEASE_FOR_DELETED_SQL: &str = "UPDATE sync_links SET held_by = NULL, \
    updated_at = $2 WHERE customer_id = $1 AND held_by IS NOT NULL";

/// ...and wake the inbox events they held, due now (`retry`: see
/// [`Store::backlog`]). `$1` the customer, `$2` now (ms).
pub(super) const WAKE_FOR_DELETED_SQL: &str = "UPDATE inbox SET held_by = NULL, \
    state = 'retry', next_attempt_at_ms = $2 WHERE held_by IN (SELECT id FROM conflicts WHERE customer_id = $1) \
    AND state IN ('pending', 'retry')";

impl Store {
    /// A page of conflicts, oldest first.
    pub async fn conflicts(&self, request: &ListConflicts) -> Result<Vec<Conflict>, StoreError> {
        let sql = format!(
            "SELECT {CONFLICT_COLUMNS} FROM conflicts \
             WHERE (CAST($1 AS TEXT) IS NULL OR state = $1) \
             AND (CAST($2 AS TEXT) IS NULL OR customer_id = $2) \
             AND (CAST($3 AS TEXT) IS NULL OR connector = $3) \
             AND id > COALESCE(CAST($4 AS TEXT), '') ORDER BY id LIMIT $5"
        );
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(&request.state)
                .bind(&request.customer_id)
                .bind(&request.connector)
                .bind(&request.starting_after)
                .bind(i64::from(request.limit))
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// Whether conflict `id` is open (a parked event's recheck: the row's
    /// fields and remote record are not read).
    pub async fn conflict_is_open(&self, id: &str) -> Result<bool, StoreError> {
        let open: Option<i32> = dispatch!(self, read pool => {
            sqlx::query_scalar("SELECT 1 FROM conflicts WHERE id = $1 AND state = 'open'")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(open.is_some())
    }

    /// One conflict.
    pub async fn conflict(&self, id: &str) -> Result<Option<Conflict>, StoreError> {
        let sql = format!("SELECT {CONFLICT_COLUMNS} FROM conflicts WHERE id = $1");
        let row = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        });
        Ok(row)
    }

    /// Resolves an open conflict: writes `fields` to the customer (a new
    /// version, pushed to every connector, the source one included), marks
    /// the conflict resolved with its fields as `decided`, and releases the
    /// link it held, in one
    /// transaction. With `folded`, the remote changes that waited behind
    /// the conflict are in `fields`: their inbox events end there, and the
    /// link's snapshot becomes the newest remote state.
    #[tracing::instrument(skip_all, fields(conflict_id = %conflict.id))]
    #[allow(clippy::too_many_arguments)]
    pub async fn resolve_conflict(
        &self,
        conflict: &Conflict,
        resolution: &str,
        decided: &serde_json::Value,
        customer_id: &CustomerId,
        expected_version: i64,
        fields: &CustomerFields,
        correlation_id: Option<&str>,
        folded: Option<&Folded>,
    ) -> Result<Resolved, StoreError> {
        let at = now();
        let at_ms = at.timestamp_millis();
        let detail = format!("folded into the resolution of conflict {}", conflict.id);
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
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
            .bind(customer_id.as_str())
            .bind(expected_version)
            .fetch_optional(&mut *tx)
            .await
            .map_err(StoreError::from_customer_write)?;
            // The customer's row first, then its conflict's: the order a
            // delete takes them in (customers.rs), so the two never wait
            // on each other (a deadlock on PostgreSQL).
            let closed = sqlx::query(
                "UPDATE conflicts SET state = 'resolved', resolution = $1, resolved_at = $2, \
                 fields = $4 WHERE id = $3 AND state = 'open'",
            )
            .bind(resolution)
            .bind(at)
            .bind(&conflict.id)
            .bind(Json(decided))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if closed != 1 {
                return Ok(Resolved::NotOpen);
            }
            let Some(row) = row else {
                return Ok(Resolved::Raced);
            };
            let customer = Customer::from(row);
            sqlx::query(
                "INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, created_at) \
                 VALUES ('customer', $1, $2, 'updated', $3, $4)",
            )
            .bind(customer.id.as_str())
            .bind(customer.version)
            .bind(correlation_id)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            if let Some(folded) = folded {
                for seq in &folded.seqs {
                    // Taken from a worker that holds it under a lease (a
                    // parked event looked at again, which would park it
                    // once more): its finish then finds the lease gone.
                    // Left to the workers, a record with events always
                    // under a lease could not be resolved at all. One
                    // finished since it was read: decide again.
                    let ended = sqlx::query(
                        "UPDATE inbox SET state = 'skipped', detail = $1, customer_id = $2, \
                         lease_until_ms = 0, lease_token = NULL \
                         WHERE seq = $3 AND state IN ('pending', 'retry')",
                    )
                    .bind(&detail)
                    .bind(&conflict.customer_id)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if ended != 1 {
                        return Ok(Resolved::Raced);
                    }
                }
                if folded.overridden.as_array().is_some_and(|fields| !fields.is_empty()) {
                    sqlx::query(
                        "INSERT INTO conflicts (id, customer_id, connector, event_id, policy, \
                         fields, remote_record, state, resolution, created_at, resolved_at, \
                         correlation_id) \
                         VALUES ($1, $2, $3, $4, 'prefer_local', $5, $6, 'resolved', \
                         'prefer_local', $7, $7, $8)",
                    )
                    .bind(super::new_id("cf_"))
                    .bind(&conflict.customer_id)
                    .bind(&conflict.connector)
                    .bind(&folded.event_id)
                    .bind(Json(&folded.overridden))
                    .bind(Json(&folded.snapshot))
                    .bind(at)
                    .bind(correlation_id)
                    .execute(&mut *tx)
                    .await?;
                }
                // The waiting edits' record is the remote's state, as an
                // applied event's is: the hash of ferry's last push goes
                // (a later version with its content is pushed, not skipped),
                // and `remote` in its place lets the push name the fields it
                // changes, as after an event (`link_upsert_on_conflict!`).
                // Sent whole, it went over an edit made there after the
                // fold. A hash already forgotten stays so.
                sqlx::query(
                    "UPDATE sync_links SET snapshot = $1, \
                     pushed_hash = CASE WHEN pushed_hash IS NULL THEN NULL ELSE 'remote' END, \
                     remote_seen_at_ms = CASE WHEN $2 > remote_seen_at_ms THEN $2 \
                        ELSE remote_seen_at_ms END \
                     WHERE customer_id = $3 AND connector = $4 AND held_by = $5",
                )
                .bind(Json(&folded.snapshot))
                .bind(folded.seen_at_ms)
                .bind(&conflict.customer_id)
                .bind(&conflict.connector)
                .bind(&conflict.id)
                .execute(&mut *tx)
                .await?;
            }
            sqlx::query(
                "UPDATE sync_links SET held_by = NULL, updated_at = $1 \
                 WHERE customer_id = $2 AND connector = $3 AND held_by = $4",
            )
            .bind(at)
            .bind(&conflict.customer_id)
            .bind(&conflict.connector)
            .bind(&conflict.id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE inbox SET held_by = NULL, state = 'retry', next_attempt_at_ms = $1 \
                 WHERE held_by = $2 AND state IN ('pending', 'retry')",
            )
            .bind(at_ms)
            .bind(&conflict.id)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            // The new version goes out, and the inbox events the conflict
            // held for this link go on now.
            self.committed_outbox();
            self.committed_inbox();
            Ok(Resolved::Done(Box::new(customer)))
        })
    }
}
