//! Retention: keeps the append-only tables bounded. Finished outbox and
//! inbox rows and old deliveries are deleted in small batches, one short
//! statement at a time, so writers never wait behind a long delete. Dead
//! letters, the inbox events they point at and open conflicts are never
//! touched. See docs/operations.md.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::health::Trimmed;
use crate::store::{Store, StoreError};

/// Retention's settings.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Rows older than this go; zero keeps everything.
    pub keep: Duration,
    /// How often a pass runs.
    pub every: Duration,
    /// Rows one statement looks at (and deletes at most); the inbound
    /// deletes kept longer than the rest are passed over, not counted.
    pub batch: u32,
}

/// A pause between two batches, so a long pass yields the writer.
pub(crate) const BETWEEN_BATCHES: Duration = Duration::from_millis(10);

/// Runs a pass every `retention.every` until cancelled.
pub async fn run(store: Store, retention: Retention, cancel: CancellationToken) {
    if retention.keep.is_zero() {
        return;
    }
    crate::metrics::retention_started();
    let mut every = tokio::time::interval(retention.every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        match pass(&store, retention, &cancel).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "retention pass done"),
            Err(error) => tracing::warn!(
                error = format!("{error:#}"),
                "retention pass failed; the next one continues"
            ),
        }
    }
}

/// Runs `step` (one bounded delete) until it deletes nothing or `cancel`,
/// pausing between two; returns the rows deleted.
pub async fn in_batches<F, Fut>(cancel: &CancellationToken, mut step: F) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut deleted = 0;
    loop {
        let now = step().await?;
        deleted += now;
        if now == 0 || cancel.is_cancelled() {
            return Ok(deleted);
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
}

/// One pass over every trimmed table; returns the rows deleted. Counted
/// in `/metrics` either way: a pass failing every time (a lock or
/// statement timeout, a privilege taken away) only warned in the log,
/// and went unseen until the disk filled.
pub async fn pass(
    store: &Store,
    retention: Retention,
    cancel: &CancellationToken,
) -> anyhow::Result<u64> {
    let result = trim_all(store, retention, cancel).await;
    crate::metrics::retention_pass(result.is_ok());
    result
}

async fn trim_all(
    store: &Store,
    retention: Retention,
    cancel: &CancellationToken,
) -> anyhow::Result<u64> {
    let Ok(keep) = chrono::Duration::from_std(retention.keep) else {
        return Ok(0);
    };
    let cutoff = crate::store::now() - keep;
    let mut deleted = 0;
    let mut failed = Vec::new();
    // A table that fails (a lock or statement timeout, a privilege taken
    // from it) leaves the others trimmed: the pass stopped at it, and a
    // failing outbox kept the inbox and the deliveries growing unchecked.
    // The pass still fails, and the log names the table.
    for table in Trimmed::ALL {
        let mut after = 0;
        loop {
            let step = match store.trim(table, after, cutoff, retention.batch).await {
                Ok(step) => step,
                Err(error) => {
                    tracing::warn!(
                        table = table.table(),
                        error = format!("{:#}", anyhow::Error::from(error)),
                        "retention could not trim a table; the others are trimmed"
                    );
                    failed.push(table.table());
                    break;
                }
            };
            deleted += step.deleted;
            crate::metrics::retention_deleted(table.table(), step.deleted);
            match step.next {
                Some(next) if !cancel.is_cancelled() => after = next,
                _ => break,
            }
            tokio::time::sleep(BETWEEN_BATCHES).await;
        }
    }
    if failed.is_empty() {
        Ok(deleted)
    } else {
        anyhow::bail!("could not trim {} (the log says why)", failed.join(", "))
    }
}
