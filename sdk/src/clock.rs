//! Wall-clock time from the host: the component has no clock of its own.
//! The host's is the system clock, in tests too (the kit does not pin it):
//! a webhook fixture with a signed timestamp is checked against now, so
//! tests sign their deliveries as they send them (`testkit::sign`).
//!
//! Compiled for the machine itself (a connector's plain unit tests of its
//! helpers), there is no host to ask: the machine's clock answers, so a
//! helper that reads the time (`ConnectorError::from_status` with an
//! HTTP-date `Retry-After`) works there too instead of panicking.

/// Milliseconds since the Unix epoch, from the host.
pub fn now_ms() -> i64 {
    #[cfg(target_arch = "wasm32")]
    {
        crate::bindings::ferry::connector::clock::now_ms()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Seconds since the Unix epoch, from the host.
pub fn now_secs() -> i64 {
    now_ms().div_euclid(1000)
}
