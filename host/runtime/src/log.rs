//! `log.write`: a connector's log lines, into the host's `tracing` log under
//! the target `ferry::connector`, tagged with the connector's name.
//!
//! A line's control characters (line breaks, escapes) are escaped, so a
//! guest cannot forge log lines or the host's fields in them.
//!
//! Limits: each line is cut at [`MAX_LINE_BYTES`] and a call writes at most
//! [`MAX_LINES_PER_CALL`] lines, counting its writes to stdout and stderr
//! (one notice says the rest was dropped), so a chatty or hostile guest
//! cannot flood the log.

use std::sync::atomic::{AtomicU32, Ordering};

use super::state::CallState;
use super::wit::latest::ferry::connector::log::{Host, Level};

/// Longest line kept, in bytes.
pub const MAX_LINE_BYTES: usize = 8 * 1024;
/// Lines kept per call.
pub const MAX_LINES_PER_CALL: u32 = 1000;

/// Counts one line against the call's budget of `lines`: whether it may be
/// logged. The first line over says, once, that the rest is dropped.
pub(crate) fn take_line(lines: &AtomicU32, connector: &str) -> bool {
    let taken = lines
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_add(1))
        })
        .unwrap_or(u32::MAX)
        .saturating_add(1);
    if taken == MAX_LINES_PER_CALL + 1 {
        tracing::warn!(target: "ferry::connector", connector, "log line limit reached; dropping the rest of this call's lines");
    }
    taken <= MAX_LINES_PER_CALL
}

impl Host for CallState {
    fn write(&mut self, level: Level, message: String) {
        let connector = &*self.connector.name;
        if !take_line(&self.log_lines, connector) {
            return;
        }
        let message = one_line(cut(message, MAX_LINE_BYTES));
        match level {
            Level::Trace => tracing::trace!(target: "ferry::connector", connector, "{message}"),
            Level::Debug => tracing::debug!(target: "ferry::connector", connector, "{message}"),
            Level::Info => tracing::info!(target: "ferry::connector", connector, "{message}"),
            Level::Warn => tracing::warn!(target: "ferry::connector", connector, "{message}"),
            Level::Error => tracing::error!(target: "ferry::connector", connector, "{message}"),
        }
    }
}

/// `message` cut to at most `max` bytes, at a character's boundary, and
/// marked `…` where it was cut.
pub fn cut(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut at = max;
        while !message.is_char_boundary(at) {
            at -= 1;
        }
        message.truncate(at);
        message.push('…');
    }
    message
}

/// A guest's text as one field's value: line breaks and other control
/// characters are escaped, so it can never start a log line of its own or
/// pose as the host's fields (the JSON output escapes them anyway).
pub(crate) fn one_line(message: String) -> String {
    if !message.chars().any(char::is_control) {
        return message;
    }
    let mut line = String::with_capacity(message.len() + 8);
    for c in message.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_guest_cannot_start_a_line_of_its_own() {
        let forged = "ok\n2026-11-30T00:00:00Z  INFO ferry: correlation_id=forged\r\x1b[2K";
        let line = one_line(forged.to_owned());
        assert!(
            !line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'),
            "{line}"
        );
        assert!(line.starts_with("ok\\n2026"), "{line}");
        assert_eq!(one_line("plain text".into()), "plain text");
    }
}
