//! The transactional outbox: one event per customer write, committed with the
//! write itself, for the relay to move onto the bus in id order. An event
//! says which customer reached which version; the state is the customer's
//! row (pushes read it there).
//!
//! The outbox is insert-only. What is still to move lives in
//! `outbox_queue`, one narrow row per outbox row, which a trigger adds with
//! the insert: the relay marks it published there (cluster mode) and the
//! consumer that schedules the change's pushes deletes it.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{dispatch, now, Backend, ChangeNotice, Store, StoreError};

/// What happened to the aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// The customer was created.
    Created,
    /// The customer's fields changed.
    Updated,
    /// The customer was (soft-)deleted.
    Deleted,
}

impl OutboxKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Updated => "updated",
            Self::Deleted => "deleted",
        }
    }
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct OutboxEvent {
    /// Monotonic id (assigned at insert).
    pub id: i64,
    /// Aggregate type, e.g. `customer`.
    pub aggregate: String,
    /// The aggregate's id.
    pub aggregate_id: String,
    /// The aggregate's version after the write.
    pub version: i64,
    /// `created`, `updated` or `deleted`.
    pub kind: String,
    /// The request id of the API call that caused the write.
    pub correlation_id: Option<String>,
    /// When the write committed.
    pub created_at: DateTime<Utc>,
    /// Whether the event is still queued: no consumer has scheduled its
    /// pushes yet.
    pub queued: bool,
}

impl Store {
    /// The events of one aggregate, oldest first. For tests and
    /// inspection: the outbox has no index by aggregate (nothing on the
    /// write path reads it that way), so this reads the whole table.
    #[tracing::instrument(skip_all, fields(aggregate_id))]
    pub async fn outbox_events(&self, aggregate_id: &str) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT id, aggregate, aggregate_id, version, kind, correlation_id, \
                 created_at, EXISTS (SELECT 1 FROM outbox_queue q WHERE q.outbox_id = outbox.id) \
                 AS queued FROM outbox WHERE aggregate_id = $1 ORDER BY id",
            )
            .bind(aggregate_id)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// The changes the oldest unpublished outbox rows announce, in id
    /// order. Every row is a customer's; the relays hand on which customer
    /// reached which version, not the payload (consumers act on the
    /// customer's current state), so the payload is not read.
    pub async fn unpublished_outbox(&self, limit: u32) -> Result<Vec<ChangeNotice>, StoreError> {
        self.queued_outbox(limit, false).await
    }

    /// The changes the oldest outbox rows still on the queue announce,
    /// published or not (the in-process bus: nothing publishes in that
    /// mode, and rows a Kafka relay published before the deployment left
    /// its broker would otherwise stay on the queue).
    pub(crate) async fn queued_outbox(
        &self,
        limit: u32,
        published_too: bool,
    ) -> Result<Vec<ChangeNotice>, StoreError> {
        // Planned for each call on PostgreSQL: the plan a connection kept
        // from an empty outbox scanned all of it (the store module's "Plans
        // kept from an empty table").
        let persistent = !matches!(self.backend, Backend::Postgres(_));
        let rows = dispatch!(self, write pool => {
            sqlx::query_as(
                "SELECT o.id AS outbox_id, o.aggregate_id AS customer_id, o.version, o.correlation_id, \
                 o.source_connector \
                 FROM outbox_queue q JOIN outbox o ON o.id = q.outbox_id \
                 WHERE ($2 OR q.published_at IS NULL) ORDER BY q.outbox_id LIMIT $1",
            )
            .bind(i64::from(limit))
            .bind(published_too)
            .persistent(persistent)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// The changes of outbox rows still queued that the bus published more
    /// than `older_than` ago (no consumer took them), or that were written
    /// that long ago and never published (the relay cannot reach the bus),
    /// oldest first.
    pub async fn unconsumed_outbox(
        &self,
        older_than: chrono::DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<ChangeNotice>, StoreError> {
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT o.id AS outbox_id, o.aggregate_id AS customer_id, o.version, o.correlation_id, \
                 o.source_connector \
                 FROM outbox_queue q JOIN outbox o ON o.id = q.outbox_id \
                 WHERE COALESCE(q.published_at, o.created_at) < $1 ORDER BY q.outbox_id LIMIT $2",
            )
            .bind(older_than)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// Marks outbox rows published (cluster mode, after the broker
    /// acknowledged them). On PostgreSQL the rows are locked in rising id
    /// order, as a consumer's intake locks them, whatever plan the update
    /// gets (a sequential scan goes in the table's order).
    pub async fn mark_published(&self, ids: &[i64]) -> Result<(), StoreError> {
        let at = now();
        if let Backend::Postgres(pool) = &self.backend {
            sqlx::query(
                "WITH locked AS MATERIALIZED (SELECT outbox_id FROM outbox_queue \
                 WHERE outbox_id = ANY($2) ORDER BY outbox_id FOR UPDATE) \
                 UPDATE outbox_queue q SET published_at = $1 FROM locked l \
                 WHERE q.outbox_id = l.outbox_id",
            )
            .bind(at)
            .bind(ids)
            .execute(pool)
            .await?;
            return Ok(());
        }
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            for id in ids {
                sqlx::query("UPDATE outbox_queue SET published_at = $1 WHERE outbox_id = $2")
                    .bind(at)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }
}

/// The advisory-lock key of the relay leader ("ferry" in ASCII).
const RELAY_LOCK_KEY: i64 = 0x0066_6572_7279;

/// Leadership of the outbox relay. In a cluster exactly one replica relays,
/// so the outbox reaches the bus in id order; the others stand by. On
/// PostgreSQL this is a session advisory lock held on a dedicated
/// connection: if the leader dies its session ends and the lock is free.
pub enum RelayLeadership {
    /// SQLite has one process: it always leads.
    Sole,
    /// The connection holding the advisory lock.
    Postgres(LockSession),
}

/// A pooled connection that may hold the relay lock. Dropped (a shutdown,
/// a future cancelled while it asked for the lock) it is closed, never
/// handed back to the pool: there, the lock would outlive the leadership
/// until the process exits, and no other replica could relay meanwhile.
pub struct LockSession(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl LockSession {
    /// The connection, while it is open.
    pub fn conn(&mut self) -> Option<&mut sqlx::PgConnection> {
        self.0.as_deref_mut()
    }

    /// Hands a connection that holds no lock back to the pool.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for LockSession {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Closing the socket ends the session, and its lock with it.
            drop(conn.detach());
        }
    }
}

/// The relay leader's session: probed after 10 s of silence, every 5 s,
/// dropped after 3 unanswered probes or 30 s of unacknowledged data.
const LEADER_KEEPALIVE: &str = "SELECT set_config('tcp_keepalives_idle', '10', false), \
     set_config('tcp_keepalives_interval', '5', false), \
     set_config('tcp_keepalives_count', '3', false), \
     set_config('tcp_user_timeout', '30000', false)";

impl RelayLeadership {
    /// Gives the leadership up: ends the lock's session, so that another
    /// replica's next try takes it.
    pub async fn resign(self) {
        if let Self::Postgres(mut session) = self {
            if let Some(conn) = session.0.take() {
                let _ = sqlx::Connection::close(conn.detach()).await;
            }
        }
    }

    /// Whether the lock is still held (its connection still answers).
    pub async fn still_held(&mut self) -> bool {
        match self {
            Self::Sole => true,
            Self::Postgres(session) => match session.conn() {
                Some(conn) => sqlx::query("SELECT 1").execute(conn).await.is_ok(),
                None => false,
            },
        }
    }
}

impl Store {
    /// Becomes the relay leader if no one else is.
    pub async fn try_lead_relay(&self) -> Result<Option<RelayLeadership>, StoreError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Some(RelayLeadership::Sole)),
            Backend::Postgres(pool) => {
                let mut session = LockSession(Some(pool.acquire().await?));
                let Some(conn) = session.conn() else {
                    return Ok(None);
                };
                // The lock lives as long as this session: if this
                // replica's host dies or is cut off, PostgreSQL must
                // notice within seconds, not after the system's TCP
                // keepalive of two hours, for another to take over.
                // (Ignored on a Unix socket, where a dead peer is seen at
                // once.) Set before the lock, so that a failure here never
                // hands a locked session back to the pool.
                sqlx::query(LEADER_KEEPALIVE).execute(&mut *conn).await?;
                let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(RELAY_LOCK_KEY)
                    .fetch_one(&mut *conn)
                    .await?;
                if locked {
                    // Never hand a connection holding the lock back to the
                    // pool, where another task could unlock it by accident.
                    Ok(Some(RelayLeadership::Postgres(session)))
                } else {
                    session.release();
                    Ok(None)
                }
            }
        }
    }
}
