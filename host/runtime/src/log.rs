//! `log.write`: a connector's log lines, into the host's `tracing` log under
//! the target `ferry::connector`, tagged with the connector's name.
//!
//! Limits: each line is cut at [`MAX_LINE_BYTES`] and a call writes at most
//! [`MAX_LINES_PER_CALL`] lines (one notice says the rest was dropped), so a
//! chatty or hostile guest cannot flood the log.

use super::state::CallState;
use super::wit::latest::ferry::connector::log::{Host, Level};

/// Longest line kept, in bytes.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Lines kept per call.
pub const MAX_LINES_PER_CALL: u32 = 1000;

impl Host for CallState {
    fn write(&mut self, level: Level, message: String) {
        self.log_lines = self.log_lines.saturating_add(1);
        let connector = &*self.connector.name;
        if self.log_lines > MAX_LINES_PER_CALL {
            if self.log_lines == MAX_LINES_PER_CALL + 1 {
                tracing::warn!(target: "ferry::connector", connector, "log line limit reached; dropping the rest of this call's lines");
            }
            return;
        }
        let mut message = message;
        if message.len() > MAX_LINE_BYTES {
            let mut cut = MAX_LINE_BYTES;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        match level {
            Level::Trace => tracing::trace!(target: "ferry::connector", connector, "{message}"),
            Level::Debug => tracing::debug!(target: "ferry::connector", connector, "{message}"),
            Level::Info => tracing::info!(target: "ferry::connector", connector, "{message}"),
            Level::Warn => tracing::warn!(target: "ferry::connector", connector, "{message}"),
            Level::Error => tracing::error!(target: "ferry::connector", connector, "{message}"),
        }
    }
}
