//! `clock.now-ms`: the host's wall clock.

use super::state::CallState;
use super::wit::latest::ferry::connector::clock::Host;

impl Host for CallState {
    fn now_ms(&mut self) -> i64 {
        // A clock before 1970 is the host's problem, not the guest's: answer 0.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}
