//! Wall-clock time from the host (the component has no clock of its own that
//! the host controls, and tests pin this one).

use crate::bindings::ferry::connector::clock as raw;

/// Milliseconds since the Unix epoch, from the host.
pub fn now_ms() -> i64 {
    raw::now_ms()
}

/// Seconds since the Unix epoch, from the host.
pub fn now_secs() -> i64 {
    raw::now_ms().div_euclid(1000)
}
