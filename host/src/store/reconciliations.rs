//! Reconciliation runs: the run (its phase, listing cursor, counts and the
//! lease of the replica driving it), the remote records it listed, and what
//! it found. Everything a run needs between pages lives here, not in
//! memory, so a run resumes after a crash and its memory does not grow with
//! the number of records (see `crate::sync::reconcile`).

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::customers::{columns, CustomerRow};
use super::links::{link_columns, SyncLinkRow};
use super::{dispatch, now, placeholders, Customer, Store, StoreError, SyncLink};
use super::{now_ms, Backend};

/// What a finding claimed by a person's resolution says until its repair is
/// scheduled: `<repair>: being scheduled`.
const SCHEDULING: &str = ": being scheduled";

/// Opens again the claims older than `$1`. [`SCHEDULING`] is written out,
/// as the partial index that serves this reads it (migration 23): a bound
/// pattern would not match it.
const REOPEN_STALLED_SQL: &str = "UPDATE reconciliation_mismatches SET state = 'open', \
     repair = NULL, resolved_at = NULL WHERE state = 'resolved' \
     AND repair LIKE '%: being scheduled' AND resolved_at < $1";

/// Who forces a finding's push ([`Store::force_push_for`]).
#[derive(Debug, Clone, Copy)]
pub enum ForcedBy<'a> {
    /// The run's repair step, under its lease.
    Run,
    /// A person's resolution, under its claim
    /// ([`Store::settle_mismatch`]'s `repair` text).
    Claim(&'a str),
}

/// The claim [`Store::settle_mismatch`] marks a finding with while
/// `repair` is scheduled for it.
pub fn scheduling_claim(repair: &str) -> String {
    format!("{repair}{SCHEDULING}")
}

/// How a run a person cancelled starts its error (then who).
const CANCELLED_BY: &str = "cancelled by ";

/// One `reconciliation_runs` row. The enumerations are stored as their
/// `snake_case` names and typed by `crate::sync::reconcile`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunRow {
    /// `rec_…`
    pub id: String,
    /// The connector reconciled.
    pub connector: String,
    /// `reconcile` or `backfill`.
    pub mode: String,
    /// `report`, `push_local`, `pull_remote` or `merge`.
    pub repair: String,
    /// `api` or `schedule`.
    pub trigger: String,
    /// `running`, `completed`, `failed` or `aborted`.
    pub status: String,
    /// `listing`, `classifying`, `repairing` or `done`.
    pub phase: String,
    /// The next page to list.
    pub cursor: Option<String>,
    /// What `cursor` came from: the sha256 of the connector's code and
    /// settings.
    pub listed_with: Option<String>,
    /// Whether every page was listed.
    pub listing_complete: bool,
    /// Pages listed.
    pub pages: i64,
    /// Remote records listed.
    pub records: i64,
    /// Count per kind of finding (`equal`, `different`, ...).
    pub counts: Json<serde_json::Map<String, serde_json::Value>>,
    /// Repairs scheduled.
    pub repairs: i64,
    /// Why it failed or aborted.
    pub error: Option<String>,
    /// The lease of the replica driving it.
    pub lease_token: Option<String>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last write.
    pub updated_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

impl RunRow {
    /// Whether the run ended by a person's cancel.
    pub fn cancelled(&self) -> bool {
        self.status == "failed"
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(CANCELLED_BY))
    }
}

impl RunRow {
    /// A listing whose restart did not finish (the process died after the
    /// cursor was forgotten): it has no cursor, yet pages still count
    /// what the old listing found, which must go before the first page.
    pub fn restart_unfinished(&self) -> bool {
        self.phase == "listing" && self.cursor.is_none() && self.pages > 0
    }
}

const RUN_COLUMNS: &str = "id, connector, mode, repair, trigger, status, phase, cursor, \
     listed_with, listing_complete, pages, records, counts, repairs, error, lease_token, started_at, \
     updated_at, finished_at";

/// One `reconciliation_mismatches` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MismatchRow {
    /// `mm_…`, in creation order.
    pub id: String,
    /// The run that found it.
    pub run_id: String,
    /// `different`, `missing_local`, `missing_remote`, `orphan`,
    /// `duplicate` or `unlinked`.
    pub kind: String,
    /// The remote record, if there is one.
    pub remote_id: Option<String>,
    /// The local customer, if there is one.
    pub customer_id: Option<String>,
    /// Differing fields: `[{field, local, remote, base}]`.
    pub fields: Json<serde_json::Value>,
    /// The remote record as listed, canonical JSON.
    pub record: Option<Json<serde_json::Value>>,
    /// More about it.
    pub detail: Option<String>,
    /// `open`, `repaired`, `resolved` or `skipped`.
    pub state: String,
    /// What was done about it.
    pub repair: Option<String>,
    /// When it was found.
    pub created_at: DateTime<Utc>,
    /// When a person resolved it.
    pub resolved_at: Option<DateTime<Utc>>,
    /// When `record` was read from the remote (unix ms).
    pub listed_at_ms: Option<i64>,
}

const MISMATCH_COLUMNS: &str = "id, run_id, kind, remote_id, customer_id, fields, record, \
     detail, state, repair, created_at, resolved_at, listed_at_ms";

/// A finding to record.
#[derive(Debug, Clone)]
pub struct NewMismatch {
    /// Its kind's name.
    pub kind: &'static str,
    /// The remote record.
    pub remote_id: Option<String>,
    /// The local customer.
    pub customer_id: Option<String>,
    /// Differing fields.
    pub fields: serde_json::Value,
    /// The remote record.
    pub record: Option<serde_json::Value>,
    /// More about it.
    pub detail: Option<String>,
    /// When `record` was read from the remote (unix ms).
    pub listed_at_ms: Option<i64>,
}

/// A listed remote record that no link names.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnlinkedRecord {
    /// Its id.
    pub remote_id: String,
    /// Its email, lower-cased.
    pub email: Option<String>,
    /// Canonical JSON.
    pub record: Json<serde_json::Value>,
    /// When its page was listed (unix ms).
    pub listed_at_ms: i64,
    /// How many of the run's unlinked records have its email.
    pub same_email: i64,
}

/// What one listed page adds to a run, committed with its cursor.
#[derive(Debug, Default)]
pub struct PageFindings {
    /// When the page was requested (unix ms).
    pub listed_at_ms: i64,
    /// Linked remote ids seen.
    pub seen: Vec<String>,
    /// Unlinked records.
    pub unlinked: Vec<(String, Option<String>, serde_json::Value)>,
    /// Mismatches among the linked records.
    pub mismatches: Vec<NewMismatch>,
    /// Counts to add: linked records `equal` to their customer, `in_flight`
    /// (a push or a person's decision pending), `invalid`, `rate_limited`.
    pub counts: std::collections::BTreeMap<&'static str, i64>,
}

/// Inside a dispatched transaction `$tx`: inserts `$mismatches` for run `$run`.
macro_rules! insert_mismatches {
    ($tx:ident, $run:expr, $mismatches:expr, $at:expr) => {
        async {
            for mismatch in $mismatches {
                sqlx::query(
                    "INSERT INTO reconciliation_mismatches (id, run_id, kind, remote_id, customer_id, \
                     fields, record, detail, state, created_at, listed_at_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'open', $9, $10)",
                )
                .bind(super::new_id("mm_"))
                .bind($run)
                .bind(mismatch.kind)
                .bind(&mismatch.remote_id)
                .bind(&mismatch.customer_id)
                .bind(Json(&mismatch.fields))
                .bind(mismatch.record.as_ref().map(Json))
                .bind(&mismatch.detail)
                .bind($at)
                .bind(mismatch.listed_at_ms)
                .execute(&mut *$tx)
                .await?;
            }
            Ok::<(), StoreError>(())
        }
        .await
    };
}

/// Inside a dispatched transaction `$tx`: adds `$n` to count `$kind` of
/// run `$run` (read, then written: the run's lease serialises its writers).
macro_rules! add_counts {
    ($tx:ident, $run:expr, $kind:expr, $n:expr) => {
        async {
            let counts: Json<serde_json::Map<String, serde_json::Value>> =
                sqlx::query_scalar("SELECT counts FROM reconciliation_runs WHERE id = $1")
                    .bind($run)
                    .fetch_one(&mut *$tx)
                    .await?;
            let mut counts = counts.0;
            let current = counts.get($kind).and_then(|v| v.as_i64()).unwrap_or(0);
            counts.insert($kind.to_owned(), (current + $n).into());
            sqlx::query("UPDATE reconciliation_runs SET counts = $2 WHERE id = $1")
                .bind($run)
                .bind(Json(counts))
                .execute(&mut *$tx)
                .await?;
            Ok::<(), StoreError>(())
        }
        .await
    };
}

/// Inside a dispatched transaction `$tx`: sets `$counts` (run `$run`'s) of
/// each kind of finding a run stores to the number it stored.
macro_rules! count_findings {
    ($tx:ident, $run:expr, $counts:expr) => {
        async {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT kind, COUNT(*) FROM reconciliation_mismatches WHERE run_id = $1 GROUP BY kind",
            )
            .bind($run)
            .fetch_all(&mut *$tx)
            .await?;
            for kind in [
                "different",
                "missing_local",
                "missing_remote",
                "orphan",
                "duplicate",
                "unlinked",
            ] {
                let n = rows.iter().find(|(k, _)| k == kind).map_or(0, |(_, n)| *n);
                $counts.insert(kind.to_owned(), n.into());
            }
            Ok::<(), StoreError>(())
        }
        .await
    };
}

/// Inside a statement whose `$1` is a run id and `$2` its lease token:
/// that run is still listing under that lease.
const LISTING_HELD: &str = "EXISTS (SELECT 1 FROM reconciliation_runs r WHERE r.id = $1 \
     AND r.lease_token = $2 AND r.status = 'running' AND r.phase = 'listing')";

/// Ids one `IN (…)` list binds at most.
const IN_LIST_CHUNK: usize = 1000;

impl Store {
    /// Starts a run; `None` if one is already running for the connector.
    pub async fn start_run(
        &self,
        connector: &str,
        mode: &str,
        repair: &str,
        trigger: &str,
    ) -> Result<Option<RunRow>, StoreError> {
        let id = super::new_id("rec_");
        let at = now();
        let inserted = dispatch!(self, write pool => {
            sqlx::query(
                "INSERT INTO reconciliation_runs (id, connector, mode, repair, trigger, status, phase, \
                 counts, started_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'running', 'listing', $6, $7, $7)",
            )
            .bind(&id)
            .bind(connector)
            .bind(mode)
            .bind(repair)
            .bind(trigger)
            .bind(Json(serde_json::Map::new()))
            .bind(at)
            .execute(pool)
            .await
            .map(drop)
        });
        match inserted {
            Ok(_) => {
                self.commits.runs.notify_one();
                self.run(&id).await
            }
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// One run.
    pub async fn run(&self, id: &str) -> Result<Option<RunRow>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM reconciliation_runs WHERE id = $1");
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        }))
    }

    /// Runs, newest first: of `connector` if given, after `before` (an id).
    pub async fn runs(
        &self,
        connector: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RunRow>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM reconciliation_runs \
             WHERE (CAST($1 AS TEXT) IS NULL OR connector = $1) \
             AND (CAST($2 AS TEXT) IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
        );
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(connector)
                .bind(before)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        }))
    }

    /// The newest run of `connector`, if any.
    pub async fn latest_run(&self, connector: &str) -> Result<Option<RunRow>, StoreError> {
        Ok(self
            .runs(Some(connector), None, 1)
            .await?
            .into_iter()
            .next())
    }

    /// Whether a backfill of `connector` holds back a create of a customer
    /// with `email`: while it lists and classifies, every create (the
    /// listing may hold a record with that email, which the backfill
    /// links); while it repairs, one whose email a listed record has (its
    /// link is on the way). A create now would make a second record of a
    /// customer the backfill links to the remote's.
    pub async fn backfill_holds_create(
        &self,
        connector: &str,
        email: &str,
    ) -> Result<bool, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM reconciliation_runs r \
                 WHERE r.connector = $1 AND r.status = 'running' AND r.mode = 'backfill' \
                 AND (r.phase <> 'repairing' OR EXISTS (SELECT 1 FROM reconciliation_unlinked u \
                   WHERE u.run_id = r.id AND u.email = $2)))",
            )
            .bind(connector)
            .bind(email)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Which of `remote_ids` `run` listed already (on an earlier page: a
    /// page commits them with its cursor).
    pub async fn run_listed(
        &self,
        run: &RunRow,
        remote_ids: &[&str],
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut ids: Vec<&str> = remote_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let listed: Vec<String> = match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query_scalar(
                    "SELECT remote_id FROM reconciliation_seen \
                     WHERE run_id = $1 AND remote_id = ANY($2) UNION SELECT remote_id \
                     FROM reconciliation_unlinked WHERE run_id = $1 AND remote_id = ANY($2)",
                )
                .bind(&run.id)
                .bind(&ids)
                .fetch_all(pool)
                .await?
            }
            Backend::Sqlite(pools) => {
                sqlx::query_scalar(
                    "SELECT remote_id FROM reconciliation_seen \
                     WHERE run_id = $1 AND remote_id IN (SELECT value FROM json_each($2)) \
                     UNION SELECT remote_id FROM reconciliation_unlinked WHERE run_id = $1 \
                     AND remote_id IN (SELECT value FROM json_each($2))",
                )
                .bind(&run.id)
                .bind(serde_json::to_string(&ids).unwrap_or_default())
                .fetch_all(&pools.writer)
                .await?
            }
        };
        Ok(listed.into_iter().collect())
    }

    /// Whether `run` listed a record with `email` that no link held: in
    /// its scratch while it runs, in its findings (a duplicate, an import)
    /// once it has ended and the scratch is cleared (a person resolving an
    /// orphan after a report run).
    pub async fn run_lists_unlinked(&self, run: &RunRow, email: &str) -> Result<bool, StoreError> {
        let found_email = match self.backend {
            Backend::Postgres(_) => "lower(m.record ->> 'email')",
            Backend::Sqlite(_) => "lower(json_extract(m.record, '$.email'))",
        };
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM reconciliation_unlinked WHERE run_id = $1 AND email = lower($2)) \
             OR EXISTS (SELECT 1 FROM reconciliation_mismatches m WHERE m.run_id = $1 \
             AND m.kind IN ('duplicate', 'missing_local', 'unlinked') AND {found_email} = lower($2))"
        );
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(&sql)
                .bind(&run.id)
                .bind(email)
                .fetch_one(pool)
                .await?
        }))
    }

    /// Whether events a run stored (its imports and links, correlated by
    /// its id) wait in the inbox, not yet applied.
    pub async fn run_events_pending(&self, run: &RunRow) -> Result<bool, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM inbox WHERE state IN ('pending', 'retry') \
                 AND connector = $1 AND correlation_id = $2)",
            )
            .bind(&run.connector)
            .bind(&run.id)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Claims a running run whose lease expired (none yet, or its replica
    /// died): this replica drives it from where it stopped.
    pub async fn claim_run(
        &self,
        token: &str,
        until_ms: i64,
    ) -> Result<Option<RunRow>, StoreError> {
        let now = now_ms();
        let sql = format!(
            "UPDATE reconciliation_runs SET lease_token = $1, lease_until_ms = $2 \
             WHERE id = (SELECT id FROM reconciliation_runs WHERE status = 'running' \
             AND lease_until_ms < $3 ORDER BY id LIMIT 1) AND lease_until_ms < $3 \
             RETURNING {RUN_COLUMNS}"
        );
        Ok(dispatch!(self, write pool => {
            sqlx::query_as(&sql)
                .bind(token)
                .bind(until_ms)
                .bind(now)
                .fetch_optional(pool)
                .await?
        }))
    }

    /// Extends the lease; false if another replica took the run over.
    pub async fn renew_run(
        &self,
        id: &str,
        token: &str,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let updated = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE reconciliation_runs SET lease_until_ms = $3 WHERE id = $1 AND lease_token = $2 \
                 AND status = 'running'",
            )
            .bind(id)
            .bind(token)
            .bind(until_ms)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Commits one listed page under the lease: what it found, the counts,
    /// and the cursor of the next page (`None`: the listing is complete),
    /// in one transaction, so a crash redoes at most this page.
    pub async fn commit_page(
        &self,
        run: &RunRow,
        findings: &PageFindings,
        next_cursor: Option<&str>,
        listed_with: &str,
        listed: i64,
    ) -> Result<bool, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            for remote_id in &findings.seen {
                sqlx::query(
                    "INSERT INTO reconciliation_seen (run_id, remote_id) VALUES ($1, $2) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(&run.id)
                .bind(remote_id)
                .execute(&mut *tx)
                .await?;
            }
            for (remote_id, email, record) in &findings.unlinked {
                sqlx::query(
                    "INSERT INTO reconciliation_unlinked (run_id, remote_id, email, record, listed_at_ms) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                )
                .bind(&run.id)
                .bind(remote_id)
                .bind(email)
                .bind(Json(record))
                .bind(findings.listed_at_ms)
                .execute(&mut *tx)
                .await?;
            }
            insert_mismatches!(tx, &run.id, &findings.mismatches, at)?;
            let updated = sqlx::query(
                "UPDATE reconciliation_runs SET cursor = $3, listing_complete = $4, \
                 phase = CASE WHEN $4 THEN 'classifying' ELSE phase END, pages = pages + 1, \
                 records = records + $5, updated_at = $6, listed_with = $7 \
                 WHERE id = $1 AND lease_token = $2",
            )
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(next_cursor)
            .bind(next_cursor.is_none())
            .bind(listed)
            .bind(at)
            .bind(listed_with)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            for (kind, n) in &findings.counts {
                add_counts!(tx, &run.id, *kind, *n)?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// The first step of a listing that starts again from the first page
    /// (the cursor came from a version no longer active, whose cursor
    /// format may not be the active one's): forgets the cursor, under the
    /// lease. Then [`Store::forget_listing_batch`] until it deletes
    /// nothing, then [`Store::end_listing_restart`]. A process that dies
    /// between the steps leaves a run without a cursor whose `pages` still
    /// count the old listing ([`RunRow::restart_unfinished`]): the next
    /// holder finishes the restart before its first page. `false` if the
    /// lease was lost.
    pub async fn begin_listing_restart(&self, run: &RunRow) -> Result<bool, StoreError> {
        let forgot = dispatch!(self, write pool => {
            sqlx::query(&format!(
                "UPDATE reconciliation_runs SET cursor = NULL, listed_with = NULL, updated_at = $3 \
                 WHERE id = $1 AND {LISTING_HELD}"
            ))
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(now())
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(forgot == 1)
    }

    /// Deletes up to `batch` rows of each of the run's listing findings
    /// (the linked ids seen, the unlinked records, the open findings; ones
    /// a person resolved stay), under the lease; how many. A statement at
    /// a time, so that a listing of a million records neither holds the
    /// writer nor meets the statement timeout in one delete.
    pub async fn forget_listing_batch(&self, run: &RunRow, batch: u32) -> Result<u64, StoreError> {
        let deletes = [
            format!(
                "DELETE FROM reconciliation_seen WHERE (run_id, remote_id) IN (SELECT run_id, remote_id \
                 FROM reconciliation_seen WHERE run_id = $1 LIMIT $3) AND {LISTING_HELD}"
            ),
            format!(
                "DELETE FROM reconciliation_unlinked WHERE (run_id, remote_id) IN (SELECT run_id, remote_id \
                 FROM reconciliation_unlinked WHERE run_id = $1 LIMIT $3) AND {LISTING_HELD}"
            ),
            format!(
                "DELETE FROM reconciliation_mismatches WHERE id IN (SELECT id FROM reconciliation_mismatches \
                 WHERE run_id = $1 AND state = 'open' LIMIT $3) AND {LISTING_HELD}"
            ),
        ];
        let mut deleted = 0;
        for sql in &deletes {
            deleted += dispatch!(self, write pool => {
                sqlx::query(sql)
                    .bind(&run.id)
                    .bind(&run.lease_token)
                    .bind(i64::from(batch.max(1)))
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
        }
        Ok(deleted)
    }

    /// The last step of a listing's restart: its counts start again,
    /// keeping the rate-limited waits and counting the restart. `false` if
    /// the lease was lost.
    pub async fn end_listing_restart(&self, run: &RunRow) -> Result<bool, StoreError> {
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let counts: Option<Json<serde_json::Map<String, serde_json::Value>>> =
                sqlx::query_scalar(&format!(
                    "SELECT counts FROM reconciliation_runs WHERE id = $1 AND {LISTING_HELD}"
                ))
                .bind(&run.id)
                .bind(&run.lease_token)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(counts) = counts else {
                return Ok(false);
            };
            let count = |kind: &str| {
                counts.0.get(kind).and_then(serde_json::Value::as_i64).unwrap_or(0)
            };
            let mut kept = serde_json::Map::new();
            kept.insert("rate_limited".to_owned(), count("rate_limited").into());
            kept.insert(
                "listing_restarted".to_owned(),
                (count("listing_restarted") + 1).into(),
            );
            let updated = sqlx::query(&format!(
                "UPDATE reconciliation_runs SET pages = 0, records = 0, counts = $3, updated_at = $4 \
                 WHERE id = $1 AND {LISTING_HELD}"
            ))
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(Json(kept))
            .bind(now())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Adds `findings.counts` to the run's counts (a page that was not
    /// listed: a rate-limited wait), under the lease.
    pub async fn commit_counts(
        &self,
        run: &RunRow,
        findings: &PageFindings,
    ) -> Result<bool, StoreError> {
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE reconciliation_runs SET updated_at = $3 WHERE id = $1 AND lease_token = $2 \
                 AND status = 'running'",
            )
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(now())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            for (kind, n) in &findings.counts {
                add_counts!(tx, &run.id, *kind, *n)?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Recounts the findings by kind into the run's counts (`equal` kept),
    /// while `run`'s lease holds it: read and written in one transaction
    /// under the run's row lock, so a driver that lost its lease cannot
    /// write its counts over the new driver's increments. False when the
    /// lease no longer holds it.
    pub async fn recount(&self, run: &RunRow) -> Result<bool, StoreError> {
        let lock = match &self.backend {
            super::Backend::Postgres(_) => {
                "SELECT counts FROM reconciliation_runs WHERE id = $1 AND lease_token = $2 \
                 AND status = 'running' FOR UPDATE"
            }
            super::Backend::Sqlite(_) => {
                "SELECT counts FROM reconciliation_runs WHERE id = $1 AND lease_token = $2 \
                 AND status = 'running'"
            }
        };
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let held: Option<Json<serde_json::Map<String, serde_json::Value>>> = sqlx::query_scalar(lock)
                .bind(&run.id)
                .bind(&run.lease_token)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(Json(mut counts)) = held else {
                return Ok(false);
            };
            count_findings!(tx, &run.id, counts)?;
            sqlx::query("UPDATE reconciliation_runs SET counts = $2, updated_at = $3 WHERE id = $1")
                .bind(&run.id)
                .bind(Json(counts))
                .bind(now())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Ends a run: `completed`, `failed` or `aborted` (with the reason);
    /// `false` when `run`'s lease no longer holds it.
    pub async fn finish_run(
        &self,
        run: &RunRow,
        status: &str,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            // Only under the lease that drove it: a driver that lost the
            // run to another (its lease ran out while it waited) must not
            // end it, nor delete what the new driver works from.
            let ended = sqlx::query(
                "UPDATE reconciliation_runs SET status = $2, phase = 'done', error = $3, \
                 finished_at = $4, updated_at = $4, lease_until_ms = 0 \
                 WHERE id = $1 AND status = 'running' AND lease_token = $5",
            )
            .bind(&run.id)
            .bind(status)
            .bind(error.map(super::capped))
            .bind(at)
            .bind(&run.lease_token)
            .execute(pool)
            .await?
            .rows_affected();
            if ended != 1 {
                return Ok(false);
            }
        });
        // What only a running run needs (its listing's scratch rows) goes
        // with [`Self::clear_ended_scratch`], in small batches.
        Ok(true)
    }

    /// Ends run `id` as `failed` ([`CANCELLED_BY`] `by`) if it is still
    /// listing, whoever drives it: its lease is taken away, and every
    /// write its driver makes under it (a page, counts, a renewal) finds
    /// none and stops it; `false` if it had ended or is past its listing.
    /// Only while listing: nothing is classified or scheduled yet (a
    /// backfill's repairs under way hold creates back until their link
    /// events are applied; ended there, the creates went beside the
    /// records those events link). Its findings are counted as it ends:
    /// a page counts only those it classified at once (`equal`,
    /// `in_flight`, `invalid`), and a cancelled run read "different: 0"
    /// beside the differences it had stored.
    pub async fn cancel_run(&self, id: &str, by: &str) -> Result<bool, StoreError> {
        let at = now();
        let lock = match &self.backend {
            super::Backend::Postgres(_) => {
                "SELECT counts FROM reconciliation_runs WHERE id = $1 AND status = 'running' \
                 AND phase = 'listing' FOR UPDATE"
            }
            super::Backend::Sqlite(_) => {
                "SELECT counts FROM reconciliation_runs WHERE id = $1 AND status = 'running' \
                 AND phase = 'listing'"
            }
        };
        let ended = dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let held: Option<Json<serde_json::Map<String, serde_json::Value>>> =
                sqlx::query_scalar(lock).bind(id).fetch_optional(&mut *tx).await?;
            let Some(Json(mut counts)) = held else {
                return Ok(false);
            };
            count_findings!(tx, id, counts)?;
            let ended = sqlx::query(
                "UPDATE reconciliation_runs SET status = 'failed', phase = 'done', error = $2, \
                 finished_at = $3, updated_at = $3, lease_until_ms = 0, lease_token = NULL, \
                 counts = $4 WHERE id = $1 AND status = 'running' AND phase = 'listing'",
            )
            .bind(id)
            .bind(super::capped(&format!("{CANCELLED_BY}{by}")))
            .bind(at)
            .bind(Json(counts))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            ended
        });
        Ok(ended == 1)
    }

    /// Forgets run `id`, stored for a switch that was then refused: it
    /// never started (parked while its connector was off, it listed
    /// nothing), and kept it would end the connector's backfill offer.
    pub async fn forget_unstarted_run(&self, id: &str) -> Result<(), StoreError> {
        dispatch!(self, write pool => {
            sqlx::query(
                "DELETE FROM reconciliation_runs WHERE id = $1 AND status = 'running' \
                 AND phase = 'listing' AND pages = 0",
            )
            .bind(id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Deletes up to `batch` rows of each scratch table
    /// (`reconciliation_seen`, `reconciliation_unlinked`) whose run has
    /// ended; returns how many. A statement at a time, so that a run that
    /// listed a million records does not hold the writer (SQLite has one)
    /// for the seconds one delete of them all would take.
    pub async fn clear_ended_scratch(&self, batch: u32) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for (table, key) in [
            ("reconciliation_seen", "remote_id"),
            ("reconciliation_unlinked", "remote_id"),
        ] {
            let sql = format!(
                "DELETE FROM {table} WHERE (run_id, {key}) IN (SELECT s.run_id, s.{key} \
                 FROM {table} s JOIN reconciliation_runs r ON r.id = s.run_id \
                 WHERE r.status <> 'running' LIMIT $1)"
            );
            deleted += dispatch!(self, write pool => {
                sqlx::query(&sql)
                    .bind(i64::from(batch))
                    .execute(pool)
                    .await?
                    .rows_affected()
            });
        }
        Ok(deleted)
    }

    /// Unlinked records of a run with their email's count among them, in
    /// remote-id order after `after`. Counted once per email of the page:
    /// counted per record, a step of records sharing one email (an org's
    /// placeholder address on 200,000 Contacts) read that email's entries
    /// once for each of its records, minutes past the run's lease, and a
    /// second driver took the step over again and again.
    pub async fn unlinked_records(
        &self,
        run_id: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UnlinkedRecord>, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(
                "WITH page AS (SELECT remote_id, email, record, listed_at_ms \
                 FROM reconciliation_unlinked WHERE run_id = $1 \
                 AND (CAST($2 AS TEXT) IS NULL OR remote_id > $2) ORDER BY remote_id LIMIT $3), \
                 counts AS (SELECT d.email, COUNT(*) AS n FROM reconciliation_unlinked d \
                 WHERE d.run_id = $1 AND d.email IN (SELECT email FROM page) GROUP BY d.email) \
                 SELECT p.remote_id, p.email, p.record, p.listed_at_ms, COALESCE(c.n, 0) AS same_email \
                 FROM page p LEFT JOIN counts c ON c.email = p.email ORDER BY p.remote_id",
            )
            .bind(run_id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }))
    }

    /// Links of `connector` to a live remote record that the run did not
    /// see, left unchanged since the run started (a link made meanwhile may
    /// name a record created after the listing passed its place), in
    /// customer order after `after`: `(customer_id, remote_id)`.
    pub async fn unseen_links(
        &self,
        run: &RunRow,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT l.customer_id, l.remote_id FROM sync_links l WHERE l.connector = $1 \
                 AND l.remote_id IS NOT NULL AND NOT l.remote_deleted AND l.updated_at < $2 \
                 AND NOT EXISTS (SELECT 1 FROM reconciliation_seen s WHERE s.run_id = $3 AND s.remote_id = l.remote_id) \
                 AND (CAST($4 AS TEXT) IS NULL OR l.customer_id > $4) ORDER BY l.customer_id LIMIT $5",
            )
            .bind(&run.connector)
            .bind(run.started_at)
            .bind(&run.id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        }))
    }

    /// Orphan findings of run `run_id` whose customer is live: the ones a
    /// delete would act on.
    pub async fn live_orphans(&self, run_id: &str) -> Result<i64, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM reconciliation_mismatches m JOIN customers c \
                 ON c.id = m.customer_id WHERE m.run_id = $1 AND m.kind = 'orphan' \
                 AND c.deleted_at IS NULL",
            )
            .bind(run_id)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Links of `connector` to a live remote record.
    pub async fn live_link_count(&self, connector: &str) -> Result<i64, StoreError> {
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM sync_links WHERE connector = $1 AND remote_id IS NOT NULL \
                 AND NOT remote_deleted",
            )
            .bind(connector)
            .fetch_one(pool)
            .await?
        }))
    }

    /// Live customers created before the run started with no live link to
    /// its connector, no push to it on the way, and no unlinked remote
    /// record of the run with their email, in id order after `after`. A
    /// link whose record was deleted remotely (`unlink`) is live again
    /// when the listing returned the record (an undelete): a recreate would
    /// make a second one.
    pub async fn customers_missing_remotely(
        &self,
        run: &RunRow,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Customer>, StoreError> {
        let rows: Vec<CustomerRow> = dispatch!(self, read pool => {
            sqlx::query_as(concat!(
                "SELECT ", columns!(), " FROM customers c WHERE c.deleted_at IS NULL AND c.created_at < $2 ",
                "AND NOT EXISTS (SELECT 1 FROM sync_links l WHERE l.customer_id = c.id AND l.connector = $1 ",
                "AND ((l.remote_id IS NOT NULL AND (NOT l.remote_deleted OR EXISTS (SELECT 1 ",
                "FROM reconciliation_seen s WHERE s.run_id = $3 AND s.remote_id = l.remote_id))) ",
                "OR l.state IN ('pending', 'retry'))) ",
                "AND NOT EXISTS (SELECT 1 FROM reconciliation_unlinked u WHERE u.run_id = $3 AND u.email = c.email) ",
                "AND (CAST($4 AS TEXT) IS NULL OR c.id > $4) ORDER BY c.id LIMIT $5"
            ))
            .bind(&run.connector)
            .bind(run.started_at)
            .bind(&run.id)
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows.into_iter().map(Customer::from).collect())
    }

    /// A run's findings, in order, filtered by kind and state.
    pub async fn mismatches(
        &self,
        run_id: &str,
        kind: Option<&str>,
        state: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<MismatchRow>, StoreError> {
        let sql = format!(
            "SELECT {MISMATCH_COLUMNS} FROM reconciliation_mismatches WHERE run_id = $1 \
             AND (CAST($2 AS TEXT) IS NULL OR kind = $2) AND (CAST($3 AS TEXT) IS NULL OR state = $3) \
             AND id > COALESCE(CAST($4 AS TEXT), '') ORDER BY id LIMIT $5"
        );
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(run_id)
                .bind(kind)
                .bind(state)
                .bind(after)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        }))
    }

    /// One finding.
    pub async fn mismatch(
        &self,
        run_id: &str,
        id: &str,
    ) -> Result<Option<MismatchRow>, StoreError> {
        let sql = format!(
            "SELECT {MISMATCH_COLUMNS} FROM reconciliation_mismatches WHERE run_id = $1 AND id = $2"
        );
        Ok(dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(run_id).bind(id).fetch_optional(pool).await?
        }))
    }

    /// Records what was done about an open finding: `repaired`, `resolved`
    /// (by a person) or `skipped`; false if it was not open.
    pub async fn settle_mismatch(
        &self,
        id: &str,
        state: &str,
        repair: &str,
    ) -> Result<bool, StoreError> {
        let at = now();
        let updated = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE reconciliation_mismatches SET state = $2, repair = $3, \
                 resolved_at = CASE WHEN $2 = 'resolved' THEN $4 ELSE resolved_at END \
                 WHERE id = $1 AND state = 'open'",
            )
            .bind(id)
            .bind(state)
            .bind(repair)
            .bind(at)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Rewrites what a person's resolution did, once its repair is
    /// scheduled: only while the finding still holds `claim`, the text
    /// [`Self::settle_mismatch`] marked it with.
    pub async fn describe_resolution(
        &self,
        id: &str,
        claim: &str,
        repair: &str,
    ) -> Result<(), StoreError> {
        dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE reconciliation_mismatches SET repair = $3 \
                 WHERE id = $1 AND state = 'resolved' AND repair = $2",
            )
            .bind(id)
            .bind(claim)
            .bind(repair)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Opens again every finding a person's resolution claimed before
    /// `before` whose repair was never scheduled: the process died between
    /// the claim and the schedule ([`scheduling_claim`]). How many.
    pub async fn reopen_stalled_resolutions(
        &self,
        before: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        Ok(dispatch!(self, write pool => {
            sqlx::query(REOPEN_STALLED_SQL)
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Opens a finding again whose resolution (marked `claim`) failed
    /// before its repair was scheduled.
    pub async fn reopen_mismatch(&self, id: &str, claim: &str) -> Result<(), StoreError> {
        dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE reconciliation_mismatches SET state = 'open', repair = NULL, \
                 resolved_at = NULL WHERE id = $1 AND state = 'resolved' AND repair = $2",
            )
            .bind(id)
            .bind(claim)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Records a repair step in one transaction under the run's lease:
    /// each finding in `repaired` is marked `repaired` with what was done,
    /// the run counts those where something was (`true`: a finding closed
    /// with nothing to do is no repair), and its position moves to
    /// `cursor`.
    pub async fn commit_repairs(
        &self,
        run: &RunRow,
        repaired: &[(String, String, bool)],
        cursor: &str,
    ) -> Result<bool, StoreError> {
        let at = now();
        // Closed with nothing to do (`false`): not a repair.
        let acted = repaired.iter().filter(|(_, _, acted)| *acted).count();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE reconciliation_runs SET cursor = $3, repairs = repairs + $4, updated_at = $5 \
                 WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(cursor)
            .bind(i64::try_from(acted).unwrap_or(i64::MAX))
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            for (id, what, _) in repaired {
                sqlx::query(
                    "UPDATE reconciliation_mismatches SET state = 'repaired', repair = $2 \
                     WHERE id = $1 AND state = 'open'",
                )
                .bind(id)
                .bind(what)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }

    /// [`Store::force_push`] for finding `finding` of `run`, in one
    /// transaction with what the finding records (`what`), and only while
    /// `by` still holds it: `None` when it does not. A run's finding is
    /// marked repaired while it is open and the run holds its lease (a run
    /// claimed again after a crash, or by another replica after its lease
    /// ran out, found the finding still open and forced the push again,
    /// under a new key, the whole record over an edit made between). A
    /// person's resolution is described while the finding holds its claim
    /// (a process that died between the push and the description left the
    /// claim, which is opened again once stalled, and resolved again it
    /// forced a second push). `restored`: the record a deleted customer's
    /// finding saw listed (see `FORCE_PUSH_SQL`).
    #[allow(clippy::too_many_arguments)]
    pub async fn force_push_for(
        &self,
        run: &RunRow,
        finding: &str,
        by: ForcedBy<'_>,
        what: &str,
        customer_id: &str,
        version: i64,
        restored: Option<&str>,
    ) -> Result<Option<bool>, StoreError> {
        let at = now();
        let forced = dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let claimed = match by {
                ForcedBy::Run => sqlx::query(
                    "UPDATE reconciliation_mismatches SET state = 'repaired', repair = $2 \
                     WHERE id = $1 AND state = 'open' AND EXISTS (SELECT 1 FROM \
                     reconciliation_runs WHERE id = $3 AND lease_token = $4 AND status = 'running')",
                )
                .bind(finding)
                .bind(what)
                .bind(&run.id)
                .bind(&run.lease_token),
                ForcedBy::Claim(claim) => sqlx::query(
                    "UPDATE reconciliation_mismatches SET repair = $2 \
                     WHERE id = $1 AND state = 'resolved' AND repair = $3",
                )
                .bind(finding)
                .bind(what)
                .bind(claim),
            }
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed != 1 {
                return Ok(None);
            }
            let updated = sqlx::query(super::links::FORCE_PUSH_SQL)
                .bind(customer_id)
                .bind(&run.connector)
                .bind(version)
                .bind(at.timestamp_millis())
                .bind(at)
                .bind(restored)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if updated != 1 {
                tx.rollback().await?;
                return Ok(Some(false));
            }
            tx.commit().await?;
            true
        });
        self.committed_links();
        Ok(Some(forced))
    }

    /// Forces a push of `customer_id`'s current `version` to `connector`
    /// under a new idempotency key (the remote drifted from what ferry
    /// pushed): see `FORCE_PUSH_SQL`.
    pub async fn force_push(
        &self,
        customer_id: &str,
        connector: &str,
        version: i64,
    ) -> Result<bool, StoreError> {
        let at = now();
        let updated = dispatch!(self, write pool => {
            sqlx::query(super::links::FORCE_PUSH_SQL)
                .bind(customer_id)
                .bind(connector)
                .bind(version)
                .bind(at.timestamp_millis())
                .bind(at)
                .bind(None::<&str>)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if updated == 1 {
            self.committed_links();
        }
        Ok(updated == 1)
    }

    /// Schedules a create of `customer_id`'s current `version` in
    /// `connector` under a new idempotency key: the customer has no live
    /// record there (never pushed, or the one its link names is gone, which
    /// the link then forgets). A link another worker holds is left alone,
    /// and so is one that has since got a live record other than `seen`
    /// (the one the finding saw missing; `None` for none), or a create
    /// whose outcome is unknown: recreating then would make a second
    /// remote record for the customer (a push after an edit made since
    /// the listing, a repair scheduled again after a crash).
    pub async fn recreate_remote(
        &self,
        customer_id: &str,
        connector: &str,
        version: i64,
        seen: Option<&str>,
    ) -> Result<bool, StoreError> {
        let at = now();
        let updated = dispatch!(self, write pool => {
            sqlx::query(
                "INSERT INTO sync_links (customer_id, connector, wanted_version, synced_version, state, \
                 next_attempt_at_ms, updated_at) VALUES ($1, $2, $3, 0, 'pending', $4, $5) \
                 ON CONFLICT (customer_id, connector) DO UPDATE SET remote_id = NULL, remote_deleted = FALSE, \
                 snapshot = NULL, pushed_hash = NULL, unsure_base = NULL, pending_version = NULL, pending_record = NULL, \
                 repairs = sync_links.repairs + 1, \
                 synced_version = 0, \
                 wanted_version = CASE WHEN sync_links.wanted_version < $3 THEN $3 ELSE sync_links.wanted_version END, \
                 state = 'pending', attempts = 0, next_attempt_at_ms = $4, updated_at = $5, \
                 lease_until_ms = 0, lease_token = NULL \
                 WHERE sync_links.lease_until_ms < $4 AND sync_links.pending_version IS NULL \
                 AND (sync_links.remote_id IS NULL OR sync_links.remote_deleted \
                      OR sync_links.remote_id = $6)",
            )
            .bind(customer_id)
            .bind(connector)
            .bind(version)
            .bind(at.timestamp_millis())
            .bind(at)
            .bind(seen)
            .execute(pool)
            .await?
            .rows_affected()
        });
        if updated == 1 {
            self.committed_links();
        }
        Ok(updated == 1)
    }

    /// The links of `connector` naming any of `remote_ids`, each with its
    /// customer (deleted ones included).
    pub async fn linked_records(
        &self,
        connector: &str,
        remote_ids: &[String],
    ) -> Result<Vec<(SyncLink, Option<Customer>)>, StoreError> {
        // A page is as long as the connector made it, which may be more
        // than it was asked for: in chunks, under SQLite's 32,766 bound
        // variables.
        let mut links: Vec<SyncLink> = Vec::with_capacity(remote_ids.len());
        for chunk in remote_ids.chunks(IN_LIST_CHUNK) {
            let links_sql = format!(
                "SELECT {} FROM sync_links WHERE connector = $1 AND remote_id IN ({})",
                link_columns!(),
                placeholders(2, chunk.len())
            );
            let rows: Vec<SyncLinkRow> = dispatch!(self, read pool => {
                let mut query = sqlx::query_as(&links_sql).bind(connector);
                for id in chunk {
                    query = query.bind(id);
                }
                query.fetch_all(pool).await?
            });
            links.extend(rows.into_iter().map(SyncLink::from));
        }
        let ids: Vec<&str> = links.iter().map(|l| l.customer_id.as_str()).collect();
        let customers: std::collections::HashMap<String, Customer> = self
            .customers_by_ids(&ids)
            .await?
            .into_iter()
            .map(|c| (c.id.as_str().to_owned(), c))
            .collect();
        Ok(links
            .into_iter()
            .map(|link| {
                let customer = customers.get(&link.customer_id).cloned();
                (link, customer)
            })
            .collect())
    }

    async fn customers_by_ids(&self, ids: &[&str]) -> Result<Vec<Customer>, StoreError> {
        let mut customers = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IN_LIST_CHUNK) {
            let sql = format!(
                "SELECT {} FROM customers c WHERE c.id IN ({})",
                columns!(),
                placeholders(1, chunk.len())
            );
            let rows: Vec<CustomerRow> = dispatch!(self, read pool => {
                let mut query = sqlx::query_as(&sql);
                for id in chunk {
                    query = query.bind(*id);
                }
                query.fetch_all(pool).await?
            });
            customers.extend(rows.into_iter().map(Customer::from));
        }
        Ok(customers)
    }

    /// Live customers with any of `emails` (lower-cased), each with the
    /// remote id of its live link to `connector`, if it has one.
    pub async fn customers_by_emails(
        &self,
        connector: &str,
        emails: &[String],
    ) -> Result<Vec<(Customer, Option<String>)>, StoreError> {
        if emails.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT {} FROM customers c WHERE c.deleted_at IS NULL AND c.email IN ({})",
            columns!(),
            placeholders(1, emails.len())
        );
        let rows: Vec<CustomerRow> = dispatch!(self, read pool => {
            let mut query = sqlx::query_as(&sql);
            for email in emails {
                query = query.bind(email);
            }
            query.fetch_all(pool).await?
        });
        let customers: Vec<Customer> = rows.into_iter().map(Customer::from).collect();
        let ids: Vec<&str> = customers.iter().map(|c| c.id.as_str()).collect();
        let linked: Vec<(String, String)> = if ids.is_empty() {
            Vec::new()
        } else {
            let sql = format!(
                "SELECT customer_id, remote_id FROM sync_links WHERE connector = $1 \
                 AND remote_id IS NOT NULL AND NOT remote_deleted AND customer_id IN ({})",
                placeholders(2, ids.len())
            );
            dispatch!(self, read pool => {
                let mut query = sqlx::query_as(&sql).bind(connector);
                for id in &ids {
                    query = query.bind(*id);
                }
                query.fetch_all(pool).await?
            })
        };
        Ok(customers
            .into_iter()
            .map(|customer| {
                let remote = linked
                    .iter()
                    .find(|(id, _)| id == customer.id.as_str())
                    .map(|(_, remote)| remote.clone());
                (customer, remote)
            })
            .collect())
    }

    /// Records findings and moves the run's position (`cursor`, `phase`)
    /// in one transaction under its lease, so a resumed run neither misses
    /// nor repeats a step's findings; false if the lease was lost.
    pub async fn commit_step(
        &self,
        run: &RunRow,
        mismatches: &[NewMismatch],
        cursor: Option<&str>,
        phase: &str,
    ) -> Result<bool, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE reconciliation_runs SET cursor = $3, phase = $4, updated_at = $5 \
                 WHERE id = $1 AND lease_token = $2 AND status = 'running'",
            )
            .bind(&run.id)
            .bind(&run.lease_token)
            .bind(cursor)
            .bind(phase)
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            insert_mismatches!(tx, &run.id, mismatches, at)?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Pushes due now to `connectors` (the ones that can push: a disabled
    /// or unloaded connector's links wait however many there are, and
    /// would hold a run's back-pressure for as long), for a run's
    /// back-pressure. Not those held by an open conflict: they wait for a
    /// person, and a run would wait with them for good.
    pub async fn push_backlog(&self, connectors: &[String]) -> Result<i64, StoreError> {
        if connectors.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "SELECT COUNT(*) FROM sync_links WHERE state IN ('pending', 'retry') \
             AND next_attempt_at_ms <= $1 AND held_by IS NULL AND connector IN ({})",
            placeholders(2, connectors.len())
        );
        let due = now().timestamp_millis();
        Ok(dispatch!(self, read pool => {
            let mut query = sqlx::query_scalar(&sql).bind(due);
            for connector in connectors {
                query = query.bind(connector);
            }
            query.fetch_one(pool).await?
        }))
    }

    /// Inbox events due now and not yet applied (for a run's
    /// back-pressure; events held by a conflict or deferred for a
    /// connector's load wait however many there are).
    pub async fn inbox_backlog(&self) -> Result<i64, StoreError> {
        let due = now().timestamp_millis();
        Ok(dispatch!(self, read pool => {
            sqlx::query_scalar(
                "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'retry') \
                 AND next_attempt_at_ms <= $1",
            )
            .bind(due)
            .fetch_one(pool)
            .await?
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stalled claims' statement looks for the claims as written.
    #[test]
    fn the_stalled_claims_statement_names_the_claim() {
        assert!(REOPEN_STALLED_SQL.contains(&format!("LIKE '%{SCHEDULING}'")));
    }
}
