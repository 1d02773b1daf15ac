//! Connector secrets at rest: sealed with XChaCha20-Poly1305 under a key
//! derived (HKDF-SHA256) from the operator's `FERRY_MASTER_KEY`.
//!
//! A sealed blob is `version (1 byte) || nonce (24 bytes) || ciphertext`.
//! The random 192-bit nonce makes reuse negligible without any counter to
//! keep; the version byte leaves room for key rotation.
//!
//! Version 2 binds a blob to its connector: the connector's name is the
//! cipher's associated data, so a blob copied into another connector's row
//! (one whose declared hosts are someone else's) does not open there.
//! Version 1 (before the binding) still opens, and is sealed again as
//! version 2 when the connector's secrets are next written.

use std::collections::BTreeMap;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// Unbound: sealed before blobs named their connector. Opened, never written.
const VERSION_UNBOUND: u8 = 1;
/// Bound to the connector's name.
const VERSION: u8 = 2;
const NONCE_LEN: usize = 24;
/// The shortest master key accepted, in bytes.
pub const MIN_MASTER_KEY_BYTES: usize = 16;
/// Binds derived keys to this use, so the master key can serve others.
const KDF_INFO: &[u8] = b"ferry connector secrets v1";

/// Why secrets could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// No master key is configured, so secrets cannot be stored.
    #[error("no master key is configured (set FERRY_MASTER_KEY)")]
    NoMasterKey,
    /// The blob was not sealed by this key (or was tampered with).
    #[error("sealed secrets cannot be opened with this master key")]
    Undecryptable,
}

/// Seals and opens connector secrets.
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox([REDACTED])")
    }
}

impl SecretBox {
    /// A box keyed by `master_key` (the configuration refuses one shorter
    /// than [`MIN_MASTER_KEY_BYTES`]; 32 random bytes of entropy is what an
    /// operator should provide).
    pub fn new(master_key: &SecretString) -> Self {
        let hkdf = Hkdf::<Sha256>::new(Some(b"ferry"), master_key.expose_secret().as_bytes());
        let mut key = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's output limit.
        hkdf.expand(KDF_INFO, &mut key)
            .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 length"));
        Self {
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }

    /// Seals `connector`'s `secrets` (a JSON object inside).
    pub fn seal(&self, connector: &str, secrets: &BTreeMap<String, SecretString>) -> Vec<u8> {
        let clear: BTreeMap<&str, &str> = secrets
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose_secret()))
            .collect();
        let plaintext = zeroizing_json(&clear);
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: &bound_to(connector),
                },
            )
            .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 encryption cannot fail"));
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        sealed
    }

    /// Opens a blob [`SecretBox::seal`] sealed for `connector` under the
    /// same key.
    pub fn open(
        &self,
        connector: &str,
        sealed: &[u8],
    ) -> Result<BTreeMap<String, SecretString>, SecretsError> {
        if sealed.len() < 1 + NONCE_LEN {
            return Err(SecretsError::Undecryptable);
        }
        let aad = match sealed[0] {
            VERSION => bound_to(connector),
            VERSION_UNBOUND => Vec::new(),
            _ => return Err(SecretsError::Undecryptable),
        };
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        let plaintext = self
            .cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &sealed[1 + NONCE_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| SecretsError::Undecryptable)?;
        let clear: BTreeMap<String, String> =
            serde_json::from_slice(&plaintext).map_err(|_| SecretsError::Undecryptable)?;
        Ok(clear
            .into_iter()
            .map(|(k, v)| (k, SecretString::from(v)))
            .collect())
    }
}

/// Whether `sealed` predates the binding to its connector.
pub fn is_unbound(sealed: &[u8]) -> bool {
    sealed.first() == Some(&VERSION_UNBOUND)
}

/// The associated data of `connector`'s blob.
fn bound_to(connector: &str) -> Vec<u8> {
    [
        b"ferry connector secrets of ".as_slice(),
        connector.as_bytes(),
    ]
    .concat()
}

fn zeroizing_json(clear: &BTreeMap<&str, &str>) -> Vec<u8> {
    // Serialising a map of strings cannot fail.
    serde_json::to_vec(clear).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets() -> BTreeMap<String, SecretString> {
        BTreeMap::from([("api_key".to_owned(), SecretString::from("sk_test_123"))])
    }

    #[test]
    fn sealed_secrets_open_with_the_same_key_only() {
        let key = SecretBox::new(&SecretString::from("correct horse battery staple"));
        let sealed = key.seal("stripe", &secrets());
        assert!(!String::from_utf8_lossy(&sealed).contains("sk_test_123"));
        let opened = key.open("stripe", &sealed).expect("opens");
        assert_eq!(opened["api_key"].expose_secret(), "sk_test_123");

        let other = SecretBox::new(&SecretString::from("another key"));
        assert!(matches!(
            other.open("stripe", &sealed),
            Err(SecretsError::Undecryptable)
        ));
    }

    /// A blob copied into another connector's row opened there: that
    /// connector's hosts would have been sent the first one's keys.
    #[test]
    fn sealed_secrets_open_for_their_connector_only() {
        let key = SecretBox::new(&SecretString::from("correct horse battery staple"));
        let sealed = key.seal("stripe", &secrets());
        assert!(!is_unbound(&sealed));
        for other in ["acme_crm", "strip", "stripe ", ""] {
            assert!(
                matches!(key.open(other, &sealed), Err(SecretsError::Undecryptable)),
                "opened as {other:?}"
            );
        }
    }

    /// A blob sealed before the binding (version 1) still opens.
    #[test]
    fn unbound_blobs_still_open() {
        let key = SecretBox::new(&SecretString::from("correct horse battery staple"));
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = key
            .cipher
            .encrypt(&nonce, br#"{"api_key":"sk_test_123"}"#.as_slice())
            .unwrap();
        let sealed = [[VERSION_UNBOUND].as_slice(), &nonce, &ciphertext].concat();
        assert!(is_unbound(&sealed));
        let opened = key.open("anything", &sealed).expect("opens");
        assert_eq!(opened["api_key"].expose_secret(), "sk_test_123");
    }

    #[test]
    fn tampering_is_detected() {
        let key = SecretBox::new(&SecretString::from("k"));
        let mut sealed = key.seal("stripe", &secrets());
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert!(key.open("stripe", &sealed).is_err());
        assert!(key.open("stripe", &[1, 2, 3]).is_err());
        let mut downgraded = key.seal("stripe", &secrets());
        downgraded[0] = VERSION_UNBOUND;
        assert!(key.open("stripe", &downgraded).is_err(), "no downgrade");
    }

    #[test]
    fn nonces_differ() {
        let key = SecretBox::new(&SecretString::from("k"));
        assert_ne!(
            key.seal("stripe", &secrets()),
            key.seal("stripe", &secrets())
        );
    }
}
