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
//! tables that changed more since its last analyse than it then held, so a
//! growing table's statistics are never off by more than a factor of two;
//! an analyse invalidates the cached plans, which are then made again. A
//! table of steady size gets there after as many changes as it has rows,
//! later than autovacuum's tenth, so in steady state this does nothing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Store, StoreError};

/// Changes below which a table is left to autovacuum: a small table's plans
/// are cheap whatever they are.
const MIN_CHANGES: i64 = 1000;

impl Store {
    /// Analyses each table of ferry's schema that changed more than
    /// `min_changes` rows, and more than it held at its last analyse, since
    /// then. Returns the tables analysed; on SQLite, none.
    pub async fn analyze_grown_tables(&self, min_changes: i64) -> Result<Vec<String>, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(Vec::new());
        };
        let grown: Vec<String> = sqlx::query_scalar(
            "SELECT quote_ident(s.relname) FROM pg_stat_user_tables s \
             JOIN pg_class c ON c.oid = s.relid \
             WHERE s.schemaname = current_schema() AND s.n_mod_since_analyze >= $1 \
               AND s.n_mod_since_analyze > GREATEST(c.reltuples, 0) \
             ORDER BY s.relname",
        )
        .bind(min_changes)
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
        match store.analyze_grown_tables(MIN_CHANGES).await {
            Ok(tables) if tables.is_empty() => {}
            Ok(tables) => tracing::debug!(?tables, "statistics brought up to date"),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "analysing grown tables failed; autovacuum still will"
            ),
        }
    }
}
