//! `crypto.hmac-sha256`: HMAC keyed by a secret the connector names but never
//! reads (webhook signatures). RustCrypto `hmac` + `sha2`.
//!
//! Limit: messages over [`MAX_MESSAGE_BYTES`] are refused.

use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;

use super::state::CallState;
use super::wit::latest::ferry::connector::crypto::Host;

/// Largest message signed; webhook bodies are far smaller.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

impl Host for CallState {
    fn hmac_sha256(&mut self, secret: String, message: Vec<u8>) -> Result<Vec<u8>, String> {
        // Each refusal below is the connector's (or its operator's) mistake,
        // returned as a value so the connector can report it.
        if !self
            .connector
            .manifest
            .secrets
            .iter()
            .any(|s| s.name == secret)
        {
            return Err(format!("secret `{secret}` is not declared in the manifest"));
        }
        let Some(value) = self.secrets().get(&secret) else {
            return Err(format!("secret `{secret}` has no value configured"));
        };
        // An empty key is one anyone knows: every signature made with it
        // would verify (an unset variable read as "", say).
        if value.expose_secret().trim().is_empty() {
            return Err(format!("secret `{secret}` is empty"));
        }
        if message.len() > MAX_MESSAGE_BYTES {
            return Err(format!("message exceeds {MAX_MESSAGE_BYTES} bytes"));
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(value.expose_secret().as_bytes())
            .map_err(|e| format!("cannot key HMAC: {e}"))?;
        mac.update(&message);
        Ok(mac.finalize().into_bytes().to_vec())
    }
}
