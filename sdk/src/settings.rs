//! Non-secret settings the operator configured for the connector.

use crate::bindings::ferry::connector::settings as raw;
use crate::ConnectorError;

/// The value of setting `name`, or its manifest default, or `None`.
pub fn get(name: &str) -> Option<String> {
    raw::get(name)
}

/// The value of setting `name` (or its default); a missing value is a
/// configuration mistake no retry fixes, hence permanent.
pub fn require(name: &str) -> Result<String, ConnectorError> {
    get(name).ok_or_else(|| ConnectorError::permanent(format!("setting `{name}` is not set")))
}

/// A base-URL setting without surrounding white space or trailing
/// slashes, ready for `format!`. A space an env file left at the end
/// passes ferry's check of the setting (a URL parser strips it), and kept
/// here it went into every request's URL: each one refused as invalid,
/// each change dead-lettered.
pub fn base_url(name: &str, default: &str) -> String {
    get(name)
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
        .trim()
        .trim_end_matches('/')
        .to_owned()
}
