//! Statistics kept up with a table that fills fast (PostgreSQL only).
//!
//! PostgreSQL plans from the statistics `ANALYZE` gathers. Autovacuum
//! gathers them at most once a minute, and only once a tenth of a table has
//! changed; a table that fills from empty in seconds (a new install, an
//! import, a backfill, a burst of webhooks) is planned meanwhile as if it
//! held a handful of rows, and cached plans keep that view. Under the
//! outbound benchmark the scheduler's claim of 16 due links sorted the whole
//! backlog on every call (6 ms a call instead of 0.7; docs/performance.md,
//! round 10). Every `analyze_every` (2 s) [`run`] analyses each of ferry's
//! tables that has more than doubled its rows since its last analyse, so a
//! growing table's statistics are never off by more than a factor of two;
//! an analyse invalidates the cached plans, which are then made again.
//! Growth, not changes: the inbox is written three times per event and a
//! link once per push, so counting changes analysed a table of steady size
//! every few seconds under load (466 ms of a core each for a 34 MB inbox;
//! docs/performance.md, round 12). A table of steady size is left to
//! autovacuum, and so is one whose statistics were taken at
//! [`SETTLED_ROWS`] rows or more: the planner scales a table's row count by
//! its current size (pages times the rows per page it last saw), so a big
//! table's plans keep their shape as it grows, and its next analyse reads a
//! full sample (half a second of a core for the inbox above).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Store, StoreError};

/// Growth below which a table is left to autovacuum: a small table's plans
/// are cheap whatever they are.
const MIN_GROWTH: i64 = 1000;

/// Rows at which a table's statistics are representative: past them, its
/// analyses are autovacuum's.
pub const SETTLED_ROWS: i64 = 10_000;

impl Store {
    /// Analyses each table of ferry's schema that grew by more than
    /// `min_growth` rows, and to more than twice what it held at its last
    /// analyse, since then, unless that analyse counted [`SETTLED_ROWS`]
    /// or more. Returns the tables analysed; on SQLite, none.
    pub async fn analyze_grown_tables(&self, min_growth: i64) -> Result<Vec<String>, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(Vec::new());
        };
        // `reltuples` is what the last analyse (or vacuum) counted, -1 if
        // none ever did; `n_live_tup` follows inserts and deletes since.
        let grown: Vec<String> = sqlx::query_scalar(
            "SELECT quote_ident(s.relname) FROM pg_stat_user_tables s \
             JOIN pg_class c ON c.oid = s.relid \
             WHERE s.schemaname = current_schema() \
               AND s.n_live_tup - GREATEST(c.reltuples, 0) >= $1 \
               AND s.n_live_tup > 2 * GREATEST(c.reltuples, 0) \
               AND c.reltuples < $2 \
             ORDER BY s.relname",
        )
        .bind(min_growth)
        .bind(SETTLED_ROWS as f32)
        .fetch_all(pool)
        .await?;
        for table in &grown {
            // SKIP_LOCKED: autovacuum, or another replica, is at it already.
            sqlx::raw_sql(&format!("ANALYZE (SKIP_LOCKED) {table}"))
                .execute(pool)
                .await?;
        }
        Ok(grown)
    }
}

/// Looks every `every` until cancelled; zero, or SQLite, does nothing.
pub async fn run(store: Store, every: Duration, cancel: CancellationToken) {
    if every.is_zero() || store.kind() != super::StoreKind::Postgres {
        return;
    }
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match store.analyze_grown_tables(MIN_GROWTH).await {
            Ok(tables) if tables.is_empty() => {}
            Ok(tables) => tracing::debug!(?tables, "statistics brought up to date"),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "analysing grown tables failed; autovacuum still will"
            ),
        }
    }
}
