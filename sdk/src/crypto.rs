//! Cryptography keyed by secrets the connector names but never reads.

use crate::bindings::ferry::connector::crypto as raw;

/// HMAC-SHA256 of `message` keyed by the secret called `secret`, computed by
/// the host. Fails if the manifest does not declare that secret or the
/// operator set no value for it.
pub fn hmac_sha256(secret: &str, message: &[u8]) -> Result<Vec<u8>, String> {
    raw::hmac_sha256(secret, message)
}
