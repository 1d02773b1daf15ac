//! Dead letters: changes given up on, in either direction, waiting for a
//! person to replay them (which schedules their link or inbox event again).

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{dispatch, now, stored_names, Backend, Store, StoreError};

/// Why a change was given up (a dead letter's `error_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The remote refused the change, or it will never apply as it is.
    Permanent,
    /// The remote record is gone.
    NotFound,
    /// The connector's credentials were refused.
    Unauthorized,
    /// The connector cannot do this operation.
    Unsupported,
    /// Failed every attempt; a timeout among them may have been applied.
    RetriesExhausted,
    /// The remote record ferry created is linked to another customer.
    RemoteIdTaken,
    /// The remote applied the push, but the connector answered with what
    /// ferry cannot keep (a remote id empty, too long, with a NUL): a
    /// create is kept to replay under its key once the connector is fixed.
    UnusableAnswer,
}

stored_names!(DeadLetterKind {
    Permanent => "permanent",
    NotFound => "not_found",
    Unauthorized => "unauthorized",
    Unsupported => "unsupported",
    RetriesExhausted => "retries_exhausted",
    RemoteIdTaken => "remote_id_taken",
    UnusableAnswer => "unusable_answer",
});

/// A dead letter.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct DeadLetter {
    /// `dl_…`
    pub id: String,
    /// The customer.
    pub customer_id: String,
    /// The connector.
    pub connector: String,
    /// `outbound` or `inbound`.
    pub direction: String,
    /// The local version that failed.
    pub version: i64,
    /// Why it was given up: one of [`DeadLetterKind`]'s names as this
    /// release writes them, kept as text when read, so a letter a later
    /// release wrote (a kind this one does not know, after a rollback) is
    /// still listed and replayed instead of failing the page that holds it.
    #[schema(example = "retries_exhausted")]
    pub error_kind: String,
    /// The last error.
    pub error: String,
    /// Attempts made.
    pub attempts: i32,
    /// The request id of the change.
    pub correlation_id: Option<String>,
    /// When it was dead-lettered.
    pub created_at: DateTime<Utc>,
    /// When it was replayed, or closed with nothing to send (its link
    /// delivered that version or a newer one since; a create whose lost
    /// answer its echo revealed); null while open.
    pub replayed_at: Option<DateTime<Utc>>,
}

/// Dead letters replayed in one transaction.
const REPLAY_BATCH: u32 = 500;

const DEAD_LETTER_COLUMNS: &str = "id, customer_id, connector, direction, version, error_kind, \
     error, attempts, correlation_id, created_at, replayed_at";

/// Filter for [`Store::dead_letters`].
#[derive(Debug, Clone, Default)]
pub struct ListDeadLetters {
    /// Only this connector's.
    pub connector: Option<String>,
    /// Only this direction's (`outbound` or `inbound`).
    pub direction: Option<String>,
    /// Include replayed ones.
    pub include_replayed: bool,
    /// Ids sorting after this one.
    pub starting_after: Option<String>,
    /// Page size.
    pub limit: u32,
}

impl Store {
    /// A page of dead letters, oldest first.
    pub async fn dead_letters(
        &self,
        request: &ListDeadLetters,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        // The open ones only, written out: a statement prepared with
        // `($n OR replayed_at IS NULL)` cannot be planned on the partial
        // index `dead_letters_open`, and read every replayed letter.
        let open_only = if request.include_replayed {
            ""
        } else {
            "AND replayed_at IS NULL "
        };
        let sql = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters \
             WHERE (CAST($1 AS TEXT) IS NULL OR connector = $1) {open_only}\
             AND id > COALESCE(CAST($2 AS TEXT), '') \
             AND (CAST($4 AS TEXT) IS NULL OR direction = $4) ORDER BY id LIMIT $3"
        );
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(&sql)
                .bind(&request.connector)
                .bind(&request.starting_after)
                .bind(i64::from(request.limit))
                .bind(&request.direction)
                .fetch_all(pool)
                .await?
        });
        Ok(rows)
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: &str) -> Result<Option<DeadLetter>, StoreError> {
        let sql = format!("SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = $1");
        let row = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?
        });
        Ok(row)
    }

    /// Replays open dead letters: marks them replayed and schedules their
    /// work again with a fresh attempt budget (an inbound letter's inbox
    /// event, an outbound letter's link). `ids` selects specific ones;
    /// `connector` all of a connector's, [`REPLAY_BATCH`] letters to a
    /// transaction, so a replay after an outage does not hold the writer
    /// (SQLite's one connection, PostgreSQL's row locks) for the whole
    /// backlog; `direction` (with `connector`) only those of one
    /// direction. Returns the replayed letters' ids (not the letters: a
    /// replay after a long outage held every one, error text included).
    #[tracing::instrument(skip_all)]
    pub async fn replay_dead_letters(
        &self,
        ids: Option<&[String]>,
        connector: Option<&str>,
        direction: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        let mut replayed = Vec::new();
        match ids {
            Some(ids) => {
                for chunk in ids.chunks(REPLAY_BATCH as usize) {
                    let sql = format!(
                        "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE replayed_at IS NULL \
                         AND (CAST($1 AS TEXT) IS NULL OR connector = $1) AND id IN ({}) ORDER BY id",
                        super::placeholders(2, chunk.len())
                    );
                    let binds: Vec<Option<&str>> = std::iter::once(connector)
                        .chain(chunk.iter().map(|id| Some(id.as_str())))
                        .collect();
                    let (batch, _) = self.replay_batch(&sql, &binds, true).await?;
                    replayed.extend(batch);
                }
            }
            None => {
                // The letters open now, not those a replayed push that
                // fails again writes while the later batches run (ids grow
                // with time).
                let newest: Option<String> = dispatch!(self, read pool => {
                    sqlx::query_scalar(
                        "SELECT MAX(id) FROM dead_letters WHERE replayed_at IS NULL \
                         AND (CAST($1 AS TEXT) IS NULL OR connector = $1) \
                         AND (CAST($2 AS TEXT) IS NULL OR direction = $2)",
                    )
                    .bind(connector)
                    .bind(direction)
                    .fetch_one(pool)
                    .await?
                });
                let Some(newest) = newest else {
                    return Ok(replayed);
                };
                let sql = format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE replayed_at IS NULL \
                     AND (CAST($1 AS TEXT) IS NULL OR connector = $1) \
                     AND id > COALESCE(CAST($2 AS TEXT), '') AND id <= $3 \
                     AND (CAST($4 AS TEXT) IS NULL OR direction = $4) \
                     ORDER BY id LIMIT {REPLAY_BATCH}"
                );
                let mut after: Option<String> = None;
                loop {
                    let binds = [
                        connector,
                        after.as_deref(),
                        Some(newest.as_str()),
                        direction,
                    ];
                    // Paged by what the batch chose, not by what it took:
                    // letters a replay running at once took first (a
                    // console click) made a short batch, and the rest of
                    // the backlog was left open under a 200.
                    let (batch, chosen) = self.replay_batch(&sql, &binds, false).await?;
                    replayed.extend(batch);
                    let Some(last) = chosen.last() else { break };
                    after = Some(last.clone());
                    if chosen.len() < REPLAY_BATCH as usize {
                        break;
                    }
                }
            }
        }
        Ok(replayed)
    }

    /// One transaction of [`Store::replay_dead_letters`]: the open letters
    /// `select` finds with `binds` as its parameters, in order; the ids of
    /// those it replayed (with, if `with_link_s_others`, the other open
    /// letters of a link it re-opened), and the ids of all it chose (a
    /// replay running at once may have taken some first).
    async fn replay_batch(
        &self,
        select: &str,
        binds: &[Option<&str>],
        with_link_s_others: bool,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let at = now();
        let postgres = matches!(self.backend, Backend::Postgres(_));
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let mut query = sqlx::query_as(select);
            for bind in binds {
                query = query.bind(*bind);
            }
            let mut chosen: Vec<DeadLetter> = query.fetch_all(&mut *tx).await?;
            let chosen_ids: Vec<String> = chosen.iter().map(|l| l.id.clone()).collect();
            // Links locked in the order every other writer takes them
            // (customer, then connector): in the letters' order, a replay
            // and an intake batch over two of its links could deadlock on
            // PostgreSQL.
            chosen.sort_by(|a, b| {
                (&a.customer_id, &a.connector, &a.id).cmp(&(&b.customer_id, &b.connector, &b.id))
            });
            let mut replayed = Vec::with_capacity(chosen.len());
            for letter in chosen {
                // An outbound letter's link before the letter, as every
                // replay takes them: one replay held a letter and waited
                // for its link, another held the link and waited for a
                // letter of it (the link's others, below), and PostgreSQL
                // broke the deadlock by failing one.
                if postgres && letter.direction == "outbound" {
                    sqlx::query(
                        "SELECT 1 FROM sync_links WHERE customer_id = $1 AND connector = $2 FOR UPDATE",
                    )
                    .bind(&letter.customer_id)
                    .bind(&letter.connector)
                    .execute(&mut *tx)
                    .await?;
                }
                // A replay running at once (a second click, another
                // operator) read the same letters and took them first: on
                // PostgreSQL this one waited for its row locks, and finds
                // them replayed. Reopening again would push a second time
                // what the first replay's push just dead-lettered anew.
                let taken = sqlx::query(
                    "UPDATE dead_letters SET replayed_at = $1 WHERE id = $2 AND replayed_at IS NULL",
                )
                .bind(at)
                .bind(&letter.id)
                .execute(&mut *tx)
                .await?;
                if taken.rows_affected() == 0 {
                    continue;
                }
                if letter.direction == "inbound" {
                    // An inbound dead letter re-opens its inbox event, as
                    // a retry due now: the backlog's age counts a retry
                    // from when it is due, and counted from the event's
                    // arrival (pending), a replay of letters days old read
                    // as the pipeline days behind, and paged.
                    sqlx::query(
                        "UPDATE inbox SET state = 'retry', attempts = 0, next_attempt_at_ms = $1 \
                         WHERE state = 'dead' AND seq = (SELECT inbox_seq FROM dead_letters WHERE id = $2)",
                    )
                    .bind(at.timestamp_millis())
                    .bind(&letter.id)
                    .execute(&mut *tx)
                    .await?;
                    replayed.push(letter.id);
                    continue;
                }
                // An outbound one re-opens its link (an inbound letter of
                // the same customer says nothing about its pushes), under a
                // new idempotency key: a remote that saved the failed
                // answer under the old one (Stripe does, for a day) would
                // give it back to the replay. A create whose outcome is
                // unknown keeps its key, or a second record could be made
                // (a link with a live record replays no create, whatever
                // marker it kept: its update takes a fresh key).
                // Not sooner than the link was due: an update that died
                // timing out leaves a call timeout's wait, for its request
                // may still land, after which a newer version goes (a
                // replay at once pushed it first, and the late one left
                // the older values at the remote).
                let reopened = sqlx::query(
                    "UPDATE sync_links SET state = 'pending', attempts = 0, \
                     next_attempt_at_ms = CASE WHEN next_attempt_at_ms > $1 THEN next_attempt_at_ms \
                       ELSE $1 END, \
                     repairs = CASE WHEN pending_version IS NULL \
                       OR (remote_id IS NOT NULL AND NOT remote_deleted) THEN repairs + 1 ELSE repairs END, \
                     updated_at = $2 WHERE customer_id = $3 AND connector = $4 AND state = 'dead'",
                )
                .bind(at.timestamp_millis())
                .bind(at)
                .bind(&letter.customer_id)
                .bind(&letter.connector)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                // The link's other open letters (a push of an older or a
                // newer version that died too) are replayed with it: the
                // link pushes the customer as it is now. Left open, the
                // count of letters to replay kept them, and their own
                // replay later answered `replayed: 1` and did nothing.
                // A letter replayed by its id only: a connector's replay
                // takes all its open letters anyway, and this look (no
                // index leads with the customer) per link made it
                // quadratic in the backlog.
                if reopened == 1 && with_link_s_others {
                    let also: Vec<String> = sqlx::query_scalar(
                        "UPDATE dead_letters SET replayed_at = $1 WHERE customer_id = $2 \
                         AND connector = $3 AND direction = 'outbound' AND replayed_at IS NULL \
                         RETURNING id",
                    )
                    .bind(at)
                    .bind(&letter.customer_id)
                    .bind(&letter.connector)
                    .fetch_all(&mut *tx)
                    .await?;
                    replayed.extend(also);
                }
                replayed.push(letter.id);
            }
            tx.commit().await?;
            if !replayed.is_empty() {
                // Outbound letters are links due again, inbound ones inbox
                // events due again.
                self.committed_links();
                self.committed_inbox();
            }
            Ok((replayed, chosen_ids))
        })
    }

    /// Looks at up to `page` open outbound dead letters after `after` (in
    /// the order of connector and id), and closes those whose link has
    /// since delivered their version or a newer one (an edit re-opened it,
    /// and its push went through): nothing is left to send for them. Open,
    /// they were counted in the backlog, the health page and the alert on
    /// it for a person to replay what had nothing to send.
    ///
    /// Returns how many it closed and where the next page starts (`None`:
    /// this one held the last). The letters are read on the reader side a
    /// page at a time and only those to close are written: one statement
    /// that looked for them read every open letter and its link each time,
    /// on SQLite's one writer, which webhooks and the API queued behind
    /// every ten seconds of an outage's hundreds of thousands of letters.
    pub async fn close_superseded_dead_letters(
        &self,
        after: Option<&LetterKey>,
        page: u32,
    ) -> Result<(u64, Option<LetterKey>), StoreError> {
        let (after_connector, after_id) = after.map_or(("", ""), |k| (&k.0, &k.1));
        let looked: Vec<(String, String, i32)> = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT p.connector, p.id, CASE WHEN l.state = 'synced' \
                 AND l.synced_version >= p.version THEN 1 ELSE 0 END \
                 FROM (SELECT connector, id, customer_id, version FROM dead_letters \
                 WHERE replayed_at IS NULL AND direction = 'outbound' AND (connector, id) > ($1, $2) \
                 ORDER BY connector, id LIMIT $3) AS p \
                 LEFT JOIN sync_links l ON l.customer_id = p.customer_id AND l.connector = p.connector \
                 ORDER BY p.connector, p.id",
            )
            .bind(after_connector)
            .bind(after_id)
            .bind(i64::from(page))
            .fetch_all(pool)
            .await?
        });
        let next = (looked.len() >= usize::try_from(page).unwrap_or(usize::MAX))
            .then(|| looked.last().map(|(c, id, _)| (c.clone(), id.clone())))
            .flatten();
        let done: Vec<String> = looked
            .into_iter()
            .filter(|(_, _, delivered)| *delivered == 1)
            .map(|(_, id, _)| id)
            .collect();
        if done.is_empty() {
            return Ok((0, next));
        }
        // Checked again as it is written: the link is read under the write.
        const DELIVERED: &str = "replayed_at IS NULL AND EXISTS (SELECT 1 FROM sync_links l \
             WHERE l.customer_id = dead_letters.customer_id AND l.connector = dead_letters.connector \
             AND l.state = 'synced' AND l.synced_version >= dead_letters.version)";
        let at = now();
        let closed = match &self.backend {
            Backend::Sqlite(pools) => sqlx::query(&format!(
                "UPDATE dead_letters SET replayed_at = $1 \
                 WHERE id IN (SELECT value FROM json_each($2)) AND {DELIVERED}"
            ))
            .bind(at)
            .bind(serde_json::Value::from(done).to_string())
            .execute(&pools.writer)
            .await?
            .rows_affected(),
            Backend::Postgres(pool) => sqlx::query(&format!(
                "UPDATE dead_letters SET replayed_at = $1 WHERE id = ANY($2) AND {DELIVERED}"
            ))
            .bind(at)
            .bind(&done)
            .execute(pool)
            .await?
            .rows_affected(),
        };
        Ok((closed, next))
    }
}

/// A dead letter's place in [`Store::close_superseded_dead_letters`]'s
/// order: its connector and id.
pub type LetterKey = (String, String);
