//! Typed errors: constructors for the WIT `connector-error` variant and the
//! mapping from remote HTTP answers and host HTTP failures onto it.

use crate::bindings::ferry::connector::types::{ConnectorError, RateLimit};

/// Why the host could not obtain an HTTP response (the WIT `http-error`).
pub use crate::bindings::ferry::connector::http::HttpError;

impl ConnectorError {
    /// A transient failure: the host retries with backoff.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self::Retryable(message.into())
    }

    /// The remote asked us to slow down; retry no sooner than `retry_after_ms`.
    pub fn rate_limited(retry_after_ms: Option<u64>, message: impl Into<String>) -> Self {
        Self::RateLimited(RateLimit {
            retry_after_ms,
            message: message.into(),
        })
    }

    /// The request can never succeed as it is: the host dead-letters it.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent(message.into())
    }

    /// The remote record does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }

    /// The remote refused the credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::Unauthorized(message.into())
    }

    /// A webhook's signature, timestamp or origin did not verify.
    pub fn invalid_signature(message: impl Into<String>) -> Self {
        Self::InvalidSignature(message.into())
    }

    /// The connector does not implement this operation or entity.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::Unsupported(message.into())
    }

    /// Maps a remote HTTP status onto the error the host's retry policy
    /// expects, or `None` for a 1xx, 2xx or 304 answer.
    ///
    /// 429, a 503 with `Retry-After` (a maintenance window) and a 403 with
    /// `Retry-After` (a limit: GitHub's secondary ones), each whose wait is
    /// still to come → rate-limited (with `Retry-After` in delta-seconds,
    /// if given), other
    /// 5xx and 408 → retryable, 409 (the same idempotency key still
    /// running, as Stripe and the IETF Idempotency-Key draft answer), 423
    /// and 425 → retryable, 401/403 → unauthorized, 404/410 → not-found,
    /// any other 4xx → permanent, and a redirect (3xx but 304) →
    /// permanent: the host never follows one, so the request did not reach
    /// what it was meant for (a wrong base URL, an API that moved).
    /// `detail` (usually the remote's error message, or a redirect's
    /// `Location`) is appended for the operator.
    ///
    /// A 404 is the record's answer only if the remote says so: a 404 for
    /// the route (a base URL with one path segment too many, a typo in a
    /// path) read as `not-found` counts a delete as done and leaves the
    /// record there. A connector whose remote tells the two apart (an
    /// error code in the body) should map the other 404s to `permanent`
    /// itself, as the template does. An API that answers 409 for "already
    /// exists" should map it to `permanent` itself.
    pub fn from_status(status: u16, retry_after: Option<&str>, detail: &str) -> Option<Self> {
        let message = if detail.is_empty() {
            format!("remote answered HTTP {status}")
        } else {
            format!("remote answered HTTP {status}: {detail}")
        };
        let wait = retry_after.and_then(retry_after_ms);
        Some(match status {
            100..=299 | 304 => return None,
            300..=399 => Self::permanent(format!(
                "{message} (a redirect: ferry does not follow them; check the URL)"
            )),
            429 => Self::rate_limited(wait, message),
            // Down for a while, and saying how long: a wait, not attempts
            // spent on a backoff of seconds (which dead-lettered the
            // change within the window).
            503 if wait.is_some() => Self::rate_limited(wait, message),
            // A refusal saying when to come back is a limit, not the
            // credentials (GitHub's secondary rate limits, a CDN's):
            // `unauthorized`, it dead-lettered the change at once, and
            // `oauth::with_token` dropped a good token and called twice.
            403 if wait.is_some() => Self::rate_limited(wait, message),
            401 | 403 => Self::unauthorized(message),
            404 | 410 => Self::not_found(message),
            // A request timeout says nothing about the request itself; a
            // request under the same idempotency key still running (409),
            // a resource locked (423) or a request too early (425) passes.
            // Dead-lettered at once, a 409 ended the very retry the key
            // exists for.
            408 | 409 | 423 | 425 => Self::retryable(message),
            400..=499 => Self::permanent(message),
            _ => Self::retryable(message),
        })
    }

    /// The message carried by any case.
    pub fn message(&self) -> &str {
        match self {
            Self::Retryable(m)
            | Self::Permanent(m)
            | Self::NotFound(m)
            | Self::Unauthorized(m)
            | Self::InvalidSignature(m)
            | Self::Unsupported(m) => m,
            Self::RateLimited(r) => &r.message,
        }
    }
}

/// `Retry-After` as milliseconds to wait: delta-seconds, or an HTTP date
/// (`Wed, 21 Oct 2026 07:28:00 GMT`, a maintenance window's end) less
/// the time now. A date already past, or a value that
/// is neither, yields `None`, which lets the host fall back to its own
/// backoff.
pub(crate) fn retry_after_ms(value: &str) -> Option<u64> {
    parse_retry_after_ms(value, crate::clock::now_ms)
}

/// [`retry_after_ms`] against the clock `now_ms` (asked only for a date).
fn parse_retry_after_ms(value: &str, now_ms: impl FnOnce() -> i64) -> Option<u64> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    // Some APIs send fractional seconds.
    if let Some(ms) = value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| (s * 1000.0).ceil() as u64)
    {
        return Some(ms);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    let at_ms = i64::try_from(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()?;
    u64::try_from(at_ms.saturating_sub(now_ms()))
        .ok()
        .filter(|&ms| ms > 0)
}

impl From<HttpError> for ConnectorError {
    /// Network trouble is transient; a request the host refused or could not
    /// parse will be refused again, so retrying it only delays the dead letter.
    fn from(err: HttpError) -> Self {
        match err {
            HttpError::Connect(m) => Self::retryable(format!("connect failed: {m}")),
            HttpError::Timeout(m) => Self::retryable(format!("timed out: {m}")),
            HttpError::Denied(m) => Self::permanent(format!("host denied the request: {m}")),
            HttpError::InvalidRequest(m) => Self::permanent(format!("invalid request: {m}")),
            HttpError::TooLarge(m) => Self::permanent(format!("response too large: {m}")),
        }
    }
}

impl From<serde_json::Error> for ConnectorError {
    /// Malformed JSON (ours or the remote's) does not fix itself on retry.
    fn from(err: serde_json::Error) -> Self {
        Self::permanent(format!("invalid JSON: {err}"))
    }
}

impl From<serde_urlencoded::ser::Error> for ConnectorError {
    fn from(err: serde_urlencoded::ser::Error) -> Self {
        Self::permanent(format!("cannot form-encode: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off wasm there is no host to ask the time: a date in `Retry-After`
    /// panicked a connector's plain unit test of its error mapping.
    #[test]
    fn a_date_to_retry_after_maps_in_a_native_test() {
        let in_a_minute = httpdate::fmt_http_date(
            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
        );
        let Some(ConnectorError::RateLimited(limit)) =
            ConnectorError::from_status(503, Some(&in_a_minute), "")
        else {
            panic!("a 503 with Retry-After is a rate limit");
        };
        assert!(
            limit
                .retry_after_ms
                .is_some_and(|ms| (50_000..=60_000).contains(&ms)),
            "{limit:?}"
        );
    }

    #[test]
    fn status_mapping_follows_the_contract() {
        assert_eq!(ConnectorError::from_status(200, None, ""), None);
        assert_eq!(
            ConnectorError::from_status(429, Some("3"), "slow down"),
            Some(ConnectorError::rate_limited(
                Some(3000),
                "remote answered HTTP 429: slow down"
            ))
        );
        assert!(matches!(
            ConnectorError::from_status(429, None, ""),
            Some(ConnectorError::RateLimited(RateLimit {
                retry_after_ms: None,
                ..
            }))
        ));
        assert!(matches!(
            ConnectorError::from_status(503, None, ""),
            Some(ConnectorError::Retryable(_))
        ));
        assert!(matches!(
            ConnectorError::from_status(401, None, ""),
            Some(ConnectorError::Unauthorized(_))
        ));
        assert!(matches!(
            ConnectorError::from_status(403, None, ""),
            Some(ConnectorError::Unauthorized(_))
        ));
        assert!(matches!(
            ConnectorError::from_status(404, None, ""),
            Some(ConnectorError::NotFound(_))
        ));
        assert!(matches!(
            ConnectorError::from_status(400, None, ""),
            Some(ConnectorError::Permanent(_))
        ));
        // Down for a while, saying how long: a wait, not attempts.
        assert_eq!(
            ConnectorError::from_status(503, Some("600"), ""),
            Some(ConnectorError::rate_limited(
                Some(600_000),
                "remote answered HTTP 503"
            ))
        );
        // A refusal saying when to come back is a limit; without it, the
        // credentials.
        assert_eq!(
            ConnectorError::from_status(403, Some("60"), ""),
            Some(ConnectorError::rate_limited(
                Some(60_000),
                "remote answered HTTP 403"
            ))
        );
        assert!(matches!(
            ConnectorError::from_status(403, None, ""),
            Some(ConnectorError::Unauthorized(_))
        ));
        // The same idempotency key still running, a lock, too early: they
        // pass (a 409 dead-lettered the retry the key exists for).
        for passing in [409, 423, 425] {
            assert!(
                matches!(
                    ConnectorError::from_status(passing, None, ""),
                    Some(ConnectorError::Retryable(_))
                ),
                "{passing}"
            );
        }
        assert!(matches!(
            ConnectorError::from_status(422, None, ""),
            Some(ConnectorError::Permanent(_))
        ));
        // A redirect is not done: the host does not follow it.
        for redirect in [301, 302, 307, 308] {
            assert!(
                matches!(
                    ConnectorError::from_status(redirect, None, "https://elsewhere/"),
                    Some(ConnectorError::Permanent(m)) if m.contains("redirect") && m.contains("elsewhere")
                ),
                "{redirect}"
            );
        }
        assert_eq!(ConnectorError::from_status(304, None, ""), None);
    }

    #[test]
    fn retry_after_parses_delta_seconds_and_dates() {
        let no_clock = || unreachable!("asked only for a date");
        assert_eq!(parse_retry_after_ms(" 2 ", no_clock), Some(2000));
        assert_eq!(parse_retry_after_ms("0.5", no_clock), Some(500));
        // A maintenance window's end, ten minutes from now: before, it
        // was ignored, and a 503 spent the change's attempts within it.
        let now = 1_792_567_080_000; // 2026-10-21T07:18:00Z
        assert_eq!(
            parse_retry_after_ms("Wed, 21 Oct 2026 07:28:00 GMT", || now),
            Some(600_000)
        );
        // Already past: the host's own backoff.
        assert_eq!(
            parse_retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT", || now),
            None
        );
        assert_eq!(parse_retry_after_ms("-1", || now), None);
        assert_eq!(parse_retry_after_ms("soon", || now), None);
    }

    #[test]
    fn network_errors_are_retryable_and_refusals_permanent() {
        assert!(matches!(
            ConnectorError::from(HttpError::Timeout("x".into())),
            ConnectorError::Retryable(_)
        ));
        assert!(matches!(
            ConnectorError::from(HttpError::Connect("x".into())),
            ConnectorError::Retryable(_)
        ));
        assert!(matches!(
            ConnectorError::from(HttpError::Denied("x".into())),
            ConnectorError::Permanent(_)
        ));
    }
}
