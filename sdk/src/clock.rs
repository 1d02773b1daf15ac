//! Wall-clock time from the host: the component has no clock of its own.
//! The host's is the system clock, in tests too (the kit does not pin it):
//! a webhook fixture with a signed timestamp is checked against now, so
//! tests sign their deliveries as they send them (`testkit::sign`).

use crate::bindings::ferry::connector::clock as raw;

/// Milliseconds since the Unix epoch, from the host.
pub fn now_ms() -> i64 {
    raw::now_ms()
}

/// Seconds since the Unix epoch, from the host.
pub fn now_secs() -> i64 {
    raw::now_ms().div_euclid(1000)
}
