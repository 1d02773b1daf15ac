//! What operators look at: backlogs and their ages, per-connector counts,
//! the links and inbox events still in flight, and retention, which keeps
//! the append-only tables bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::inbox::InboxEvent;
use super::{dispatch, Store, StoreError};

/// Backlogs, counted with queries that stay on partial indexes (the
/// metrics task runs them every few seconds).
#[derive(Debug, Clone, Default)]
pub struct Backlog {
    /// Outbox events not yet published.
    pub outbox_unpublished: i64,
    /// Age of the oldest of them.
    pub outbox_oldest_age: Duration,
    /// Inbox events pending or retrying, per connector.
    pub inbox_unapplied: BTreeMap<String, i64>,
    /// How many of them wait behind an open conflict, per connector.
    pub inbox_held: BTreeMap<String, i64>,
    /// Age of the oldest of them: a pending one's since it arrived, a
    /// retrying one's since its backoff ended (none while it waits it
    /// out); those waiting behind an open conflict left out (they wait on
    /// a person, whom `conflicts_open` calls), per connector.
    pub inbox_oldest_age_by_connector: BTreeMap<String, Duration>,
    /// The same, all connectors.
    pub inbox_oldest_age: Duration,
    /// Links pending or retrying, per (connector, state).
    pub links: BTreeMap<(String, String), i64>,
    /// Dead letters not replayed, per (connector, direction).
    pub dead_letters: BTreeMap<(String, String), i64>,
    /// Open conflicts, per connector.
    pub conflicts_open: BTreeMap<String, i64>,
}

fn age(oldest: Option<DateTime<Utc>>) -> Duration {
    oldest
        .and_then(|at| (super::now() - at).to_std().ok())
        .unwrap_or_default()
}

/// Which links [`Store::list_links`] returns.
#[derive(Debug, Clone, Default)]
pub struct LinkFilter {
    /// One connector, or all.
    pub connector: Option<String>,
    /// `pending`, `retry`, `synced` or `dead`; all when `None`.
    pub state: Option<String>,
    /// (customer id, connector) to start after (paging).
    pub starting_after: Option<(String, String)>,
    /// Page size.
    pub limit: u32,
}

/// One link, as the operator lists see it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct LinkSummary {
    /// The local customer.
    pub customer_id: String,
    /// The connector.
    pub connector: String,
    /// The remote record, once linked.
    pub remote_id: Option<String>,
    /// `pending`, `retry`, `synced` or `dead`.
    pub state: String,
    /// Failed attempts since the last success.
    pub attempts: i32,
    /// When the next attempt is due, unix ms.
    pub next_attempt_at_ms: i64,
    /// The last error.
    pub last_error: Option<String>,
    /// The change that scheduled the push.
    pub correlation_id: Option<String>,
    /// Last write of the row.
    pub updated_at: DateTime<Utc>,
}

/// Which inbox events [`Store::list_inbox`] returns.
#[derive(Debug, Clone, Default)]
pub struct InboxFilter {
    /// One connector, or all.
    pub connector: Option<String>,
    /// `pending`, `retry`, `applied`, `skipped` or `dead`; all when `None`.
    pub state: Option<String>,
    /// Sequence number to start after (paging).
    pub starting_after: Option<i64>,
    /// Page size.
    pub limit: u32,
}

/// The append-only tables retention trims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trimmed {
    /// Outbox events published and consumed (a create whose outcome is
    /// unknown keeps its record on its link, not here).
    Outbox,
    /// Inbox events applied or skipped (dead ones stay until replayed).
    Inbox,
    /// The delivery log.
    Deliveries,
}

impl Trimmed {
    /// All of them, in the order a retention pass visits them.
    pub const ALL: [Trimmed; 3] = [Trimmed::Outbox, Trimmed::Inbox, Trimmed::Deliveries];

    /// The table's name.
    pub fn table(self) -> &'static str {
        match self {
            Trimmed::Outbox => "outbox",
            Trimmed::Inbox => "inbox",
            Trimmed::Deliveries => "deliveries",
        }
    }

    /// (key column, time column, what else a deletable row must satisfy).
    fn columns(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Trimmed::Outbox => (
                "id",
                "created_at",
                "NOT EXISTS (SELECT 1 FROM outbox_queue q WHERE q.outbox_id = outbox.id)",
            ),
            // A delete also stays for [`DELETES_KEPT`] whatever the
            // retention: it is what tells a late redelivery of the
            // record's create (Stripe retries for 3 days) that the record
            // is gone, not one to import.
            Trimmed::Inbox => (
                "seq",
                "received_at",
                "state IN ('applied', 'skipped') AND (kind <> 'delete' OR received_at < $3)",
            ),
            Trimmed::Deliveries => ("id", "created_at", "TRUE"),
        }
    }
}

/// How long an applied or skipped inbound delete is kept at least, whatever
/// the retention: longer than Stripe's redelivery window (3 days).
pub const DELETES_KEPT: chrono::TimeDelta = chrono::TimeDelta::days(4);

/// Where a retention pass over one table stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimStep {
    /// Rows deleted by this step.
    pub deleted: u64,
    /// The key to continue after, or `None` when the table's rows older
    /// than the cut-off are all visited (the next pass starts over).
    pub next: Option<i64>,
}

/// `state = $2` when a listing names a state, so SQLite can read that
/// state's partial index (the dead ones): it plans a statement before its
/// values are bound and cannot prove `(? IS NULL OR state = ?)` implies
/// `state = 'dead'`. `$2` is NULL otherwise.
fn state_filter(given: bool) -> &'static str {
    if given {
        "state = $2"
    } else {
        "CAST($2 AS TEXT) IS NULL"
    }
}

/// A page of links after the cursor (`$3`, `$4`: customer id and
/// connector; none: from the start), by connector `$1` and state `$2` if
/// given, at most `$5`. The cursor is one row-value range, which both
/// planners seek the primary key with: `(? IS NULL OR …)` kept SQLite
/// reading it from the start on every page.
pub(super) fn list_links_sql(state: bool) -> String {
    format!(
        "SELECT customer_id, connector, remote_id, state, \
         attempts, next_attempt_at_ms, last_error, correlation_id, updated_at FROM sync_links \
         WHERE (CAST($1 AS TEXT) IS NULL OR connector = $1) AND {} \
         AND (customer_id, connector) > (COALESCE(CAST($3 AS TEXT), ''), CAST($4 AS TEXT)) \
         ORDER BY customer_id, connector LIMIT $5",
        state_filter(state)
    )
}

/// A page of inbox events, filtered by connector and (when `state`) state,
/// after a `seq`.
pub(super) fn list_inbox_sql(state: bool) -> String {
    format!(
        "SELECT {} FROM inbox \
         WHERE (CAST($1 AS TEXT) IS NULL OR connector = $1) AND {} \
         AND seq > $3 ORDER BY seq LIMIT $4",
        super::inbox::INBOX_COLUMNS,
        state_filter(state)
    )
}

/// Per connector: events unapplied, held, the oldest pending one's arrival,
/// the earliest end of a retry's backoff that has passed.
type InboxBacklogRow = (String, i64, i64, Option<DateTime<Utc>>, Option<i64>);

impl Store {
    /// The backlogs, from partial indexes only.
    pub async fn backlog(&self) -> Result<Backlog, StoreError> {
        let now_ms = super::now_ms();
        let (outbox, inbox, links, dead, conflicts) = dispatch!(self, read pool => {
            // The oldest from the lowest id's row (ids grow with time): a
            // join read every queued change's outbox row, every few
            // seconds on every replica, through a broker outage's backlog.
            let outbox: (i64, Option<DateTime<Utc>>) = sqlx::query_as(
                "SELECT COUNT(*), (SELECT o.created_at FROM outbox o WHERE o.id = \
                 (SELECT MIN(outbox_id) FROM outbox_queue WHERE published_at IS NULL)) \
                 FROM outbox_queue WHERE published_at IS NULL",
            )
            .fetch_one(pool)
            .await?;
            // A pending event counts from its arrival (one that waits, for
            // a connector not loaded or a breaker open, stays pending and
            // ages); a retrying one from when its backoff ended, and not
            // before: waiting out a retry's backoff (a thin event whose
            // fetch failed once, for up to 17 minutes) is not the pipeline
            // behind, and counted from its arrival it paged the documented
            // alert while every other event applied at once. So is an
            // event a dead letter's replay or a conflict's end made due
            // again (`retry`): days held, it read as days behind.
            let inbox: Vec<InboxBacklogRow> =
                sqlx::query_as(
                    "SELECT connector, COUNT(*), COUNT(held_by), \
                     MIN(CASE WHEN held_by IS NULL AND state = 'pending' THEN received_at END), \
                     MIN(CASE WHEN held_by IS NULL AND state = 'retry' AND next_attempt_at_ms <= $1 \
                     THEN next_attempt_at_ms END) FROM inbox \
                     WHERE state IN ('pending', 'retry') GROUP BY connector",
                )
                .bind(now_ms)
                .fetch_all(pool)
                .await?;
            let links: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT connector, state, COUNT(*) FROM sync_links \
                 WHERE state IN ('pending', 'retry') GROUP BY connector, state",
            )
            .fetch_all(pool)
            .await?;
            let dead: Vec<(String, String, i64)> = sqlx::query_as(
                "SELECT connector, direction, COUNT(*) FROM dead_letters \
                 WHERE replayed_at IS NULL GROUP BY connector, direction",
            )
            .fetch_all(pool)
            .await?;
            let conflicts: Vec<(String, i64)> = sqlx::query_as(
                "SELECT connector, COUNT(*) FROM conflicts WHERE state = 'open' GROUP BY connector",
            )
            .fetch_all(pool)
            .await?;
            (outbox, inbox, links, dead, conflicts)
        });
        let mut backlog = Backlog {
            outbox_unpublished: outbox.0,
            outbox_oldest_age: age(outbox.1),
            ..Backlog::default()
        };
        for (connector, count, held, pending, retry_due) in inbox {
            let overdue = retry_due
                .and_then(|due| u64::try_from(now_ms.saturating_sub(due)).ok())
                .map_or(Duration::ZERO, Duration::from_millis);
            let oldest = age(pending).max(overdue);
            backlog.inbox_oldest_age = backlog.inbox_oldest_age.max(oldest);
            backlog
                .inbox_oldest_age_by_connector
                .insert(connector.clone(), oldest);
            backlog.inbox_held.insert(connector.clone(), held);
            backlog.inbox_unapplied.insert(connector, count);
        }
        for (connector, state, count) in links {
            backlog.links.insert((connector, state), count);
        }
        for (connector, direction, count) in dead {
            backlog.dead_letters.insert((connector, direction), count);
        }
        backlog.conflicts_open = conflicts.into_iter().collect();
        Ok(backlog)
    }

    /// Links per (connector, state), synced ones included: a full count,
    /// for the health endpoint only.
    pub async fn link_counts(&self) -> Result<BTreeMap<(String, String), i64>, StoreError> {
        let rows: Vec<(String, String, i64)> = dispatch!(self, read pool => {
            sqlx::query_as("SELECT connector, state, COUNT(*) FROM sync_links GROUP BY connector, state")
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(c, s, n)| ((c, s), n)).collect())
    }

    /// A page of links, by customer id.
    pub async fn list_links(&self, filter: &LinkFilter) -> Result<Vec<LinkSummary>, StoreError> {
        let sql = list_links_sql(filter.state.is_some());
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
            .bind(filter.connector.as_deref())
            .bind(filter.state.as_deref())
            .bind(filter.starting_after.as_ref().map(|(c, _)| c.as_str()))
            .bind(filter.starting_after.as_ref().map_or("", |(_, n)| n.as_str()))
            .bind(i64::from(filter.limit))
            // Planned for each call: see `list_inbox`.
            .persistent(false)
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }

    /// A page of inbox events, by arrival.
    pub async fn list_inbox(&self, filter: &InboxFilter) -> Result<Vec<InboxEvent>, StoreError> {
        let sql = list_inbox_sql(filter.state.is_some());
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(filter.connector.as_deref())
                .bind(filter.state.as_deref())
                .bind(filter.starting_after.unwrap_or(0))
                .bind(i64::from(filter.limit))
                // Planned for each call, with the filters given: a plan
                // PostgreSQL keeps for a prepared statement (after five
                // calls, when it looks no dearer) cannot use the partial
                // indexes of due rows, and read the whole table by `seq`
                // to find a few in `retry`, the very listing an incident
                // asks for.
                .persistent(false)
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// The newest inbox events applied to (or skipped for) a customer.
    pub async fn inbox_of(
        &self,
        customer_id: &str,
        limit: u32,
    ) -> Result<Vec<InboxEvent>, StoreError> {
        let sql = format!(
            "SELECT {} FROM inbox WHERE customer_id = $1 ORDER BY seq DESC LIMIT $2",
            super::inbox::INBOX_COLUMNS
        );
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(customer_id)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// One retention step over `table`: looks at up to `batch` rows after
    /// `after` in key order, and deletes those older than `cutoff` that
    /// are finished. Keys grow with time, so the old rows are a prefix; the
    /// step stops at the first row newer than `cutoff`. One short delete
    /// each, so writers never wait long (the window's read passes over
    /// the inbound deletes kept longer, a read that holds no lock).
    pub async fn trim(
        &self,
        table: Trimmed,
        after: i64,
        cutoff: DateTime<Utc>,
        batch: u32,
    ) -> Result<TrimStep, StoreError> {
        let (key, time, finished) = table.columns();
        let name = table.table();
        // Only rows a delete would take: a window of rows kept longer
        // (inbound deletes for `DELETES_KEPT`, dead events until replayed,
        // outbox rows still queued) made every pass walk over all of them
        // again, with a writer's delete of nothing each step (on SQLite,
        // the one writer the webhooks wait for).
        let window_sql = format!(
            "SELECT {key}, {time} FROM {name} WHERE {key} > $1 AND {finished} ORDER BY {key} LIMIT $2"
        );
        let deletes_cutoff = cutoff.min(super::now() - DELETES_KEPT);
        let window: Vec<(i64, DateTime<Utc>)> = dispatch!(self, read pool => {
            let query = sqlx::query_as(&window_sql).bind(after).bind(i64::from(batch));
            let query = match table {
                Trimmed::Inbox => query.bind(deletes_cutoff),
                Trimmed::Outbox | Trimmed::Deliveries => query,
            };
            query.fetch_all(pool).await?
        });
        let old = window.iter().take_while(|(_, at)| *at < cutoff).count();
        let Some(&(upto, _)) = window[..old].last() else {
            return Ok(TrimStep {
                deleted: 0,
                next: None,
            });
        };
        // The cutoff again: on PostgreSQL a key taken before the window
        // was read may commit after it, inside the range, and young.
        let cutoff_param = match table {
            Trimmed::Inbox => "$4",
            Trimmed::Outbox | Trimmed::Deliveries => "$3",
        };
        let delete_sql = format!(
            "DELETE FROM {name} WHERE {key} > $1 AND {key} <= $2 AND {finished} \
             AND {time} < {cutoff_param}"
        );
        let deleted = dispatch!(self, write pool => {
            let query = sqlx::query(&delete_sql).bind(after).bind(upto);
            let query = match table {
                Trimmed::Inbox => query.bind(deletes_cutoff),
                Trimmed::Outbox | Trimmed::Deliveries => query,
            };
            query.bind(cutoff).execute(pool).await?.rows_affected()
        });
        let whole_window = old == window.len() && window.len() == batch as usize;
        Ok(TrimStep {
            deleted,
            next: whole_window.then_some(upto),
        })
    }

    /// Rows in each trimmed table (for tests and the soak benchmark).
    pub async fn table_rows(&self) -> Result<BTreeMap<&'static str, i64>, StoreError> {
        let mut rows = BTreeMap::new();
        for table in Trimmed::ALL {
            let sql = format!("SELECT COUNT(*) FROM {}", table.table());
            let count: i64 = dispatch!(self, read pool => {
                sqlx::query_scalar(&sql).fetch_one(pool).await?
            });
            rows.insert(table.table(), count);
        }
        Ok(rows)
    }
}
