//! Logging into the host's structured log, tagged with the connector's name.
//!
//! Never log secrets or whole records: logs leave the sandbox.

use crate::bindings::ferry::connector::log as raw;

/// Severity of a log line.
pub use raw::Level;

/// Writes one log line at `level`.
pub fn write(level: Level, message: &str) {
    raw::write(level, message);
}

/// Writes a debug line.
pub fn debug(message: &str) {
    write(Level::Debug, message);
}

/// Writes an info line.
pub fn info(message: &str) {
    write(Level::Info, message);
}

/// Writes a warning.
pub fn warn(message: &str) {
    write(Level::Warn, message);
}

/// Writes an error line.
pub fn error(message: &str) {
    write(Level::Error, message);
}
