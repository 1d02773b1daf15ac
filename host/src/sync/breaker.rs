//! A circuit breaker per connector: after `threshold` consecutive retryable
//! failures the connector's calls stop for `cooldown`, then one probe goes
//! through; its success closes the breaker, its failure opens it again.
//! A rate-limited answer pauses the connector until its Retry-After.
//!
//! Breakers live in each process: replicas learn a remote is down on their
//! own, after at most `threshold` failures each. Work that meets an open
//! breaker is deferred without spending an attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use utoipa::ToSchema;

/// How long calls are deferred while a probe is out: until the probe may
/// be replaced, within these bounds. A success releases them at once
/// ([`Breakers::success`]); deferred a second at a time, a large backlog
/// was written about once a second for the probe's life.
const PROBE_WAIT: Duration = Duration::from_secs(1);
const PROBE_WAIT_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
        failures: u32,
    },
    HalfOpen {
        /// Which pass carries the probe (see [`Pass`]).
        probe: u64,
        probe_started: Instant,
        failures: u32,
        /// Whether a call was deferred behind the probe (its success then
        /// releases them).
        parked: bool,
    },
}

/// What [`Breakers::allow`] hands a call it lets through: whether it
/// carries the half-open breaker's probe, and which. Handed back with
/// [`Breakers::unused`], it releases that probe only: a call let through
/// while the breaker was closed, and handed back after it opened and
/// sent a probe, leaves that probe alone (before, it released it, and a
/// second probe went out while the first was on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    probe: Option<u64>,
}

/// What an open breaker says: try again no sooner than this; and whether
/// it is a half-open breaker's probe the call waits behind (released when
/// the probe succeeds).
#[derive(Debug, Clone, Copy)]
pub struct Deferred(pub Duration, pub bool);

/// A breaker's state, for the API.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BreakerView {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Retryable failures in a row.
    pub consecutive_failures: u32,
    /// While open: milliseconds until a probe is let through.
    pub retry_in_ms: Option<u64>,
}

/// The breakers of every connector in this process.
#[derive(Debug)]
pub struct Breakers {
    threshold: u32,
    cooldown: Duration,
    /// How long a probe that has not reported back is waited for before
    /// another replaces it: the cool-down, or a call's whole time when
    /// that is longer (see [`Breakers::with_calls_of`]).
    probe_life: Duration,
    states: Mutex<HashMap<String, State>>,
    /// Until when a connector is paused because its remote said so (a
    /// rate limit's Retry-After): kept apart from the breaker's state, so
    /// that a call already in flight that succeeds (or fails) does not
    /// cut the pause short.
    paused: Mutex<HashMap<String, Instant>>,
    /// Rate limits in a row per connector (until a call succeeds, or the
    /// remote answers it is up): how long a pause without a Retry-After
    /// lasts.
    limited: Mutex<HashMap<String, u32>>,
    /// The last probe's number.
    probes: std::sync::atomic::AtomicU64,
}

impl Breakers {
    /// Breakers that open after `threshold` failures for `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            probe_life: cooldown,
            states: Mutex::default(),
            paused: Mutex::default(),
            limited: Mutex::default(),
            probes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Breakers whose probe may take a call's whole `call_timeout` before
    /// another replaces it. Replaced after a cool-down shorter than that,
    /// a probe still on the wire (a slow remote, just back) had a second
    /// one sent beside it, and a third, against a remote barely up.
    pub fn with_calls_of(mut self, call_timeout: Duration) -> Self {
        self.probe_life = self.cooldown.max(call_timeout);
        self
    }

    /// How long `connector` stays paused by a remote's Retry-After.
    fn paused_for(&self, connector: &str, now: Instant) -> Option<Duration> {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        match paused.get(connector) {
            Some(until) if *until > now => Some(*until - now),
            Some(_) => {
                paused.remove(connector);
                None
            }
            None => None,
        }
    }

    fn with<R>(&self, connector: &str, f: impl FnOnce(&mut State) -> R) -> R {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = states
            .entry(connector.to_owned())
            .or_insert(State::Closed { failures: 0 });
        f(state)
    }

    /// May `connector` be called now?
    pub fn allow(&self, connector: &str) -> Result<Pass, Deferred> {
        let now = Instant::now();
        if let Some(wait) = self.paused_for(connector, now) {
            return Err(Deferred(wait, false));
        }
        let next = || {
            self.probes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1
        };
        self.with(connector, |state| match *state {
            State::Closed { .. } => Ok(Pass { probe: None }),
            State::Open { until, failures } if now >= until => {
                let probe = next();
                *state = State::HalfOpen {
                    probe,
                    probe_started: now,
                    failures,
                    parked: false,
                };
                Ok(Pass { probe: Some(probe) })
            }
            State::Open { until, .. } => Err(Deferred(until - now, false)),
            // A probe that never reported back (its call was skipped, or
            // its task died) is replaced once its time is up.
            State::HalfOpen {
                probe_started,
                failures,
                parked,
                ..
            } if now.duration_since(probe_started) >= self.probe_life => {
                let probe = next();
                *state = State::HalfOpen {
                    probe,
                    probe_started: now,
                    failures,
                    parked,
                };
                Ok(Pass { probe: Some(probe) })
            }
            State::HalfOpen {
                probe_started,
                ref mut parked,
                ..
            } => {
                *parked = true;
                Err(Deferred(
                    (probe_started + self.probe_life)
                        .saturating_duration_since(now)
                        .clamp(PROBE_WAIT, PROBE_WAIT_MAX),
                    true,
                ))
            }
        })
    }

    /// Whether calls to `connector` go through without waiting (closed).
    pub fn is_closed(&self, connector: &str) -> bool {
        self.paused_for(connector, Instant::now()).is_none()
            && self.with(connector, |state| matches!(state, State::Closed { .. }))
    }

    /// A call [`Breakers::allow`] let through was not made after all (its
    /// lease ran short, its marker could not be written), or ended in an
    /// answer that says nothing about the remote (the guest refused the
    /// operation or the data; a 429 without a Retry-After). A probe it
    /// carried is handed back at once, rather than holding every other
    /// call until the probe's own cool-down; a pass without the probe
    /// changes nothing.
    pub fn unused(&self, connector: &str, pass: Pass) {
        self.with(connector, |state| match (*state, pass.probe) {
            (
                State::HalfOpen {
                    probe,
                    failures,
                    parked,
                    ..
                },
                Some(mine),
            ) if probe == mine => {
                // The next call takes a new probe at once, and the calls
                // parked behind this one stay parked behind it: its
                // success releases them. (Reopened, the breaker forgot
                // them, and each waited out its own deferral.)
                let now = Instant::now();
                *state = match now.checked_sub(self.probe_life) {
                    Some(long_ago) => State::HalfOpen {
                        probe,
                        probe_started: long_ago,
                        failures,
                        parked,
                    },
                    None => State::Open {
                        until: now,
                        failures,
                    },
                };
            }
            _ => {}
        });
    }

    /// The remote answered (successfully, or with an error that says it is up).
    ///
    /// Whether it closed a half-open breaker with calls deferred behind its
    /// probe (they may go now).
    pub fn success(&self, connector: &str) -> bool {
        let closed_now = self.with(connector, |state| {
            let parked = matches!(state, State::HalfOpen { parked: true, .. });
            *state = State::Closed { failures: 0 };
            parked
        });
        self.end_streak(connector);
        closed_now
    }

    /// The remote rate-limited a call: how many times in a row now. Calls
    /// that were out together and come back limited while the connector
    /// rests count once (a burst of 20 was a streak of 20, a pause of
    /// minutes).
    pub fn rate_limited(&self, connector: &str) -> u32 {
        let resting = self.paused_for(connector, Instant::now()).is_some();
        let mut limited = self.limited.lock().unwrap_or_else(|p| p.into_inner());
        let streak = limited.entry(connector.to_owned()).or_insert(0);
        if !resting || *streak == 0 {
            *streak = streak.saturating_add(1);
        }
        *streak
    }

    /// A call the remote answered (not a rate limit, not a failure) ends a
    /// connector's streak of rate limits.
    fn end_streak(&self, connector: &str) {
        let mut limited = self.limited.lock().unwrap_or_else(|p| p.into_inner());
        if !limited.is_empty() {
            limited.remove(connector);
        }
    }

    /// A retryable failure (timeout, 5xx, connection refused). It does not
    /// end a streak of rate limits: an overloaded remote answering some
    /// calls 429 and others 503 kept the shortest pause for ever.
    pub fn failure(&self, connector: &str) {
        let now = Instant::now();
        let (threshold, cooldown) = (self.threshold, self.cooldown);
        self.with(connector, |state| {
            *state = match *state {
                State::Closed { failures } if failures + 1 >= threshold => State::Open {
                    until: now + cooldown,
                    failures: failures + 1,
                },
                State::Closed { failures } => State::Closed {
                    failures: failures + 1,
                },
                State::HalfOpen { failures, .. } | State::Open { failures, .. } => State::Open {
                    until: now + cooldown,
                    failures: failures + 1,
                },
            };
        });
        if let State::Open { .. } = self.with(connector, |s| *s) {
            tracing::warn!(
                connector,
                cooldown_ms = cooldown.as_millis() as u64,
                "circuit breaker open"
            );
        }
    }

    /// The remote asked for a pause (rate limited): stop calling until then,
    /// for at most the longest Retry-After honoured (24 h): a remote (or a
    /// connector's arithmetic) asking for years neither stops the
    /// connector for good nor overflows the clock.
    pub fn pause(&self, connector: &str, pause: Duration) {
        let until = Instant::now() + pause.min(super::retry::MAX_RETRY_AFTER);
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let at = paused.entry(connector.to_owned()).or_insert(until);
        *at = (*at).max(until);
    }

    /// `connector`'s breaker, for the API.
    pub fn view(&self, connector: &str) -> BreakerView {
        let now = Instant::now();
        let paused = self.paused_for(connector, now);
        let view = self.with(connector, |state| match *state {
            State::Closed { failures } => BreakerView {
                state: "closed",
                consecutive_failures: failures,
                retry_in_ms: None,
            },
            State::Open { until, failures } => BreakerView {
                state: if now >= until { "half_open" } else { "open" },
                consecutive_failures: failures,
                retry_in_ms: Some(until.saturating_duration_since(now).as_millis() as u64),
            },
            State::HalfOpen { failures, .. } => BreakerView {
                state: "half_open",
                consecutive_failures: failures,
                retry_in_ms: None,
            },
        });
        match paused {
            // Paused by the remote: open until then, whatever else holds.
            Some(wait) => BreakerView {
                state: "open",
                retry_in_ms: Some(wait.as_millis() as u64).max(view.retry_in_ms),
                ..view
            },
            None => view,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_in_a_row_are_counted_until_the_remote_answers() {
        let breakers = Breakers::new(3, Duration::from_millis(50));
        assert_eq!(breakers.rate_limited("stripe"), 1);
        assert_eq!(breakers.rate_limited("stripe"), 2);
        assert_eq!(breakers.rate_limited("salesforce"), 1);
        breakers.success("stripe");
        assert_eq!(breakers.rate_limited("stripe"), 1);
        assert_eq!(breakers.rate_limited("salesforce"), 2);
        // A 5xx between rate limits does not end the streak.
        breakers.failure("salesforce");
        assert_eq!(breakers.rate_limited("salesforce"), 3);
        // Calls out together, limited while the connector rests: once.
        breakers.pause("stripe", Duration::from_secs(60));
        assert_eq!(breakers.rate_limited("stripe"), 1);
        assert_eq!(breakers.rate_limited("stripe"), 1);
    }

    #[test]
    fn opens_after_threshold_then_lets_one_probe_through() {
        let breakers = Breakers::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            breakers.failure("stripe");
            assert!(breakers.allow("stripe").is_ok());
        }
        breakers.failure("stripe");
        assert!(breakers.allow("stripe").is_err());
        assert_eq!(breakers.view("stripe").state, "open");
        // Other connectors are unaffected.
        assert!(breakers.allow("salesforce").is_ok());

        std::thread::sleep(Duration::from_millis(60));
        assert!(breakers.allow("stripe").is_ok(), "the probe");
        assert!(breakers.allow("stripe").is_err(), "only one probe");
        breakers.failure("stripe");
        assert!(breakers.allow("stripe").is_err(), "a failed probe reopens");

        std::thread::sleep(Duration::from_millis(60));
        assert!(breakers.allow("stripe").is_ok());
        breakers.success("stripe");
        assert!(breakers.allow("stripe").is_ok());
        assert_eq!(breakers.view("stripe").state, "closed");
    }

    #[test]
    fn a_probe_not_used_is_handed_back() {
        let breakers = Breakers::new(1, Duration::from_millis(20));
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(30));
        let probe = breakers.allow("stripe").expect("the probe");
        assert!(breakers.allow("stripe").is_err(), "one probe at a time");
        breakers.unused("stripe", probe);
        let probe = breakers.allow("stripe").expect("the next call probes");
        breakers.unused("stripe", probe);
        let probe = breakers.allow("stripe").expect("and the next");
        breakers.success("stripe");
        breakers.unused("stripe", probe);
        assert_eq!(breakers.view("stripe").state, "closed");
    }

    /// A call let through while the breaker was closed, handed back after
    /// it opened and sent its probe, leaves the probe alone: only one is
    /// out at a time.
    #[test]
    fn a_pass_without_the_probe_does_not_release_it() {
        let breakers = Breakers::new(1, Duration::from_millis(20));
        let early = breakers.allow("stripe").expect("closed");
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(30));
        let probe = breakers.allow("stripe").expect("the probe");
        breakers.unused("stripe", early);
        assert!(
            breakers.allow("stripe").is_err(),
            "a second probe went out while the first was on the wire"
        );
        breakers.unused("stripe", probe);
        assert!(
            breakers.allow("stripe").is_ok(),
            "handed back by its own pass"
        );
    }

    /// Behind a probe, a call waits until the probe may be replaced (1 to
    /// 10 s), not a second at a time; the probe's success says the breaker
    /// closed, so the calls behind it can be released.
    #[test]
    fn calls_behind_a_probe_wait_for_it() {
        let breakers = Breakers::new(1, Duration::from_millis(200));
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(250));
        let _probe = breakers.allow("stripe").expect("the probe");
        let Err(Deferred(wait, behind)) = breakers.allow("stripe") else {
            panic!("behind the probe")
        };
        assert!(behind);
        assert_eq!(wait, PROBE_WAIT, "the probe's time, at least a second");
        let slow = Breakers::new(1, Duration::from_secs(30));
        slow.failure("stripe");
        assert!(!slow.allow("stripe").unwrap_err().1, "open: no probe out");
        assert!(
            breakers.success("stripe"),
            "closed by the probe, a call behind it"
        );
        assert!(!breakers.success("stripe"), "closed already");
        // A probe with no call behind it releases nothing.
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(250));
        let _probe = breakers.allow("stripe").expect("the probe");
        assert!(!breakers.success("stripe"), "nothing was parked");
    }

    /// A probe still on the wire is not replaced after a cool-down shorter
    /// than a call's time: only once the call's time is up (or when it is
    /// handed back).
    #[test]
    fn a_probe_is_waited_for_as_long_as_its_call_may_take() {
        let breakers =
            Breakers::new(1, Duration::from_millis(20)).with_calls_of(Duration::from_millis(300));
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(40));
        let probe = breakers.allow("stripe").expect("the probe");
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            breakers.allow("stripe").unwrap_err().1,
            "past the cool-down, the probe on the wire is waited for"
        );
        breakers.unused("stripe", probe);
        let _next = breakers
            .allow("stripe")
            .expect("handed back: the next, at once");
        std::thread::sleep(Duration::from_millis(350));
        let _replaced = breakers.allow("stripe").expect("its call's time is up");
    }

    /// Calls parked behind a probe that is handed back stay parked behind
    /// the next one: its success releases them.
    #[test]
    fn calls_parked_behind_a_probe_handed_back_are_released_by_the_next() {
        let breakers = Breakers::new(1, Duration::from_millis(200));
        breakers.failure("stripe");
        std::thread::sleep(Duration::from_millis(250));
        let probe = breakers.allow("stripe").expect("the probe");
        assert!(breakers.allow("stripe").unwrap_err().1, "parked behind it");
        breakers.unused("stripe", probe);
        let _next = breakers.allow("stripe").expect("the next probe, at once");
        assert!(breakers.success("stripe"), "the parked call is released");
    }

    #[test]
    fn a_pause_is_capped_at_a_day() {
        let breakers = Breakers::new(5, Duration::from_secs(30));
        breakers.pause("stripe", Duration::from_millis(u64::MAX));
        let Err(Deferred(wait, _)) = breakers.allow("stripe") else {
            panic!("paused")
        };
        assert!(wait <= Duration::from_secs(24 * 60 * 60), "{wait:?}");
    }

    /// A call that was in flight when the remote asked for a pause, and
    /// then succeeded or failed, does not end the pause.
    #[test]
    fn a_pause_outlasts_the_calls_in_flight() {
        let breakers = Breakers::new(5, Duration::from_millis(10));
        breakers.pause("stripe", Duration::from_secs(60));
        breakers.success("stripe");
        assert!(
            breakers.allow("stripe").is_err(),
            "a success does not end it"
        );
        for _ in 0..5 {
            breakers.failure("stripe");
        }
        std::thread::sleep(Duration::from_millis(20));
        let Err(Deferred(wait, _)) = breakers.allow("stripe") else {
            panic!("still paused after the breaker's own cool-down")
        };
        assert!(wait > Duration::from_secs(50), "{wait:?}");
        assert_eq!(breakers.view("stripe").state, "open");
        assert!(!breakers.is_closed("stripe"));
    }

    #[test]
    fn rate_limits_pause_the_connector() {
        let breakers = Breakers::new(5, Duration::from_secs(30));
        breakers.pause("stripe", Duration::from_millis(30));
        let Err(Deferred(wait, _)) = breakers.allow("stripe") else {
            panic!("paused")
        };
        assert!(wait <= Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        assert!(breakers.allow("stripe").is_ok());
    }
}
