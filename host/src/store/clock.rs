//! The clock leases and due times are read by. On PostgreSQL, replicas on
//! several machines compare one replica's lease end with another's "now":
//! with their clocks apart by more than a push's margin, a replica took a
//! link whose push was still in flight elsewhere (two pushes of one link
//! at once, the older one possibly landing last). Each process follows the
//! database's clock instead: [`follow`] reads it, and [`super::now_ms`]
//! adds the offset, as does [`super::now`]. SQLite has one process: a
//! process on SQLite alone keeps an offset of 0 (in a test binary that
//! also runs PostgreSQL, the offset is that database's: the same clock).

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Backend, Store, StoreError};

/// How often the offset is read again (clocks drift, NTP steps them).
const EVERY: Duration = Duration::from_secs(60);

/// An offset past which the log says this machine's clock is off.
const WORTH_A_WARNING_MS: i64 = 1_000;

/// A change of the offset within a reading's own error (half a round
/// trip, and the millisecond both clocks round to): the offset stays as it
/// was, so the processes of one machine (and test binaries running both
/// backends) keep their own clock exactly, and an offset near a bound
/// does not step back and forth every minute (a backward step dated a
/// trigger before the one ahead of it). Leases' margins (500 ms at least)
/// are far away.
const NEGLIGIBLE_MS: i64 = 50;

/// The database's clock minus this process's, in milliseconds.
static OFFSET_MS: AtomicI64 = AtomicI64::new(0);

/// What [`super::now_ms`] adds to this process's clock.
pub(super) fn offset_ms() -> i64 {
    OFFSET_MS.load(Ordering::Relaxed)
}

/// The offset from one reading: the database said `database_ms` between
/// `before_ms` and `after_ms` by this process's clock, taken as said
/// halfway.
fn offset_from(before_ms: i64, database_ms: i64, after_ms: i64) -> i64 {
    database_ms - (before_ms + (after_ms - before_ms) / 2)
}

impl Store {
    /// Reads the database's clock and follows it from now on (PostgreSQL);
    /// the offset in milliseconds.
    pub async fn follow_database_clock(&self) -> Result<i64, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(0);
        };
        let mut connection = pool.acquire().await?;
        let local = || chrono::Utc::now().timestamp_millis();
        let before = local();
        let database: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint")
                .fetch_one(&mut *connection)
                .await?;
        let offset = offset_from(before, database, local());
        let offset = if (offset - offset_ms()).abs() < NEGLIGIBLE_MS {
            offset_ms()
        } else {
            offset
        };
        OFFSET_MS.store(offset, Ordering::Relaxed);
        Ok(offset)
    }
}

/// Reads the database's clock every [`EVERY`] until `cancel` (PostgreSQL;
/// the first reading is the caller's, before any lease is taken).
pub async fn follow(store: Store, cancel: CancellationToken) {
    if !matches!(store.backend, Backend::Postgres(_)) {
        return;
    }
    let mut warned = offset_ms().abs() > WORTH_A_WARNING_MS;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
        match store.follow_database_clock().await {
            Ok(offset) => warn_if_off(offset, &mut warned),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "reading the database's clock failed; the last offset stands"
            ),
        }
    }
}

/// Says once (and again after it came right) that this machine's clock is
/// off the database's by more than [`WORTH_A_WARNING_MS`].
pub fn warn_if_off(offset_ms: i64, warned: &mut bool) {
    let off = offset_ms.abs() > WORTH_A_WARNING_MS;
    if off && !*warned {
        tracing::warn!(
            offset_ms,
            "this machine's clock is apart from the database's; leases and due times follow the database's (check NTP)"
        );
    }
    *warned = off;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_is_taken_as_made_halfway_through_its_round_trip() {
        assert_eq!(offset_from(1_000, 1_010, 1_020), 0);
        assert_eq!(offset_from(1_000, 6_000, 1_010), 4_995);
        assert_eq!(offset_from(1_000, 500, 1_000), -500);
    }
}
