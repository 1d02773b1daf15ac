//! When to try again: exponential backoff with full jitter, a cap, and the
//! remote's Retry-After honoured.

use std::time::Duration;

use rand::Rng;

/// Longest Retry-After honoured; a remote asking for more is treated as if
/// it asked for this (an operator will see the retries in the log).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a read the remote rate-limited waits: its Retry-After (capped
/// at [`MAX_RETRY_AFTER`]), else a second; a second at least (a remote
/// answering 429 with `Retry-After: 0` again and again had a listing ask
/// it again at once, hundreds of times a second). Pushes wait their own
/// backoff instead (see `outbound`).
pub(crate) fn rate_limited_read_wait(retry_after_ms: Option<u64>) -> Duration {
    retry_after_ms
        .map_or(Duration::from_secs(1), Duration::from_millis)
        .clamp(Duration::from_secs(1), MAX_RETRY_AFTER)
}

/// The retry schedule of failed pushes.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts before a retryable failure is dead-lettered.
    pub max_attempts: u32,
    /// Cap of the first delay.
    pub base: Duration,
    /// Cap of any delay (Retry-After excepted).
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Whether attempt number `attempt` (1-based) was the last allowed.
    pub fn exhausted(&self, attempt: u32) -> bool {
        attempt >= self.max_attempts
    }

    /// The delay after failed attempt `attempt` (1-based): uniform in
    /// `[0, min(max_delay, base * 2^(attempt-1))]` ("full jitter", which
    /// spreads the retries of many records failing together), but never
    /// sooner than `retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = jitter(self.ceiling(attempt));
        match retry_after {
            Some(after) => jittered.max(after.min(MAX_RETRY_AFTER)),
            None => jittered,
        }
    }

    /// How long a connector rests after the `streak`th rate limit in a row
    /// that named no Retry-After: between half and all of the backoff's
    /// ceiling for that many attempts, so it grows with the streak (a
    /// rate limit spends no attempt, and the link's own count stays where
    /// it was: a remote throttling ferry was asked again within a second,
    /// for ever).
    pub fn rate_limit_pause(&self, streak: u32) -> Duration {
        let ceiling = self.ceiling(streak);
        ceiling / 2 + jitter(ceiling / 2)
    }

    /// `min(max_delay, base * 2^(attempt-1))`.
    fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        self.base
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay)
    }
}

/// Uniform in `[0, ceiling]`.
fn jitter(ceiling: Duration) -> Duration {
    Duration::from_millis(
        rand::thread_rng().gen_range(0..=u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        base: Duration::from_secs(1),
        max_delay: Duration::from_secs(60),
    };

    /// A read the remote rate-limited waits a second at least: with
    /// `Retry-After: 0` a listing asked again at once, in a tight loop.
    #[test]
    fn a_rate_limited_read_waits_a_second_at_least() {
        assert_eq!(rate_limited_read_wait(Some(0)), Duration::from_secs(1));
        assert_eq!(rate_limited_read_wait(Some(400)), Duration::from_secs(1));
        assert_eq!(rate_limited_read_wait(None), Duration::from_secs(1));
        assert_eq!(rate_limited_read_wait(Some(5_000)), Duration::from_secs(5));
        assert_eq!(rate_limited_read_wait(Some(u64::MAX)), MAX_RETRY_AFTER);
    }

    #[test]
    fn delays_grow_exponentially_under_the_cap() {
        for _ in 0..200 {
            assert!(POLICY.delay(1, None) <= Duration::from_secs(1));
            assert!(POLICY.delay(3, None) <= Duration::from_secs(4));
            assert!(POLICY.delay(40, None) <= Duration::from_secs(60));
        }
        // Full jitter: not every delay sits at the ceiling.
        let spread: std::collections::BTreeSet<_> =
            (0..50).map(|_| POLICY.delay(6, None)).collect();
        assert!(spread.len() > 10);
    }

    #[test]
    fn retry_after_is_a_floor() {
        for _ in 0..100 {
            assert!(POLICY.delay(1, Some(Duration::from_secs(30))) >= Duration::from_secs(30));
        }
        // Above the cap too: the remote knows best, within a day.
        assert!(POLICY.delay(1, Some(Duration::from_secs(600))) >= Duration::from_secs(600));
        assert_eq!(
            POLICY.delay(1, Some(Duration::from_secs(10 * 86_400))),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn rate_limits_in_a_row_rest_longer() {
        for _ in 0..100 {
            let first = POLICY.rate_limit_pause(1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let fifth = POLICY.rate_limit_pause(5);
            assert!(fifth >= Duration::from_secs(8) && fifth <= Duration::from_secs(16));
            let many = POLICY.rate_limit_pause(40);
            assert!(many >= Duration::from_secs(30) && many <= Duration::from_secs(60));
        }
    }

    #[test]
    fn the_last_attempt_is_the_configured_one() {
        assert!(!POLICY.exhausted(4));
        assert!(POLICY.exhausted(5));
    }
}
