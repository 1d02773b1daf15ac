//! Webhook signatures for tests, computed the way the remotes compute them
//! and accepted by the SDK's [`crate::webhook`] checks:
//!
//! | sender signs | header value | connector checks with |
//! |---|---|---|
//! | HMAC-SHA256 of the body, hex | [`hmac_hex`] (add your prefix, e.g. `sha256=`) | [`webhook::verify_hmac`](crate::webhook::verify_hmac) with [`Encoding::Hex`](crate::webhook::Encoding::Hex) |
//! | the same, base64 | [`hmac_base64`] | [`webhook::verify_hmac`](crate::webhook::verify_hmac) with [`Encoding::Base64`](crate::webhook::Encoding::Base64) |
//! | HMAC-SHA256 of `"{t}.{body}"`, Stripe style | [`timestamped`] (`t=…,v1=…`) | [`webhook::verify_timestamped`](crate::webhook::verify_timestamped), [`webhook::verify_stripe`](crate::webhook::verify_stripe) |
//!
//! ```
//! use ferry_sdk::testkit::{sign, webhook_request};
//!
//! let body = br#"{"id":"evt_1","type":"contact.updated"}"#;
//! let header = sign::timestamped("whsec_test", sign::now_secs(), body);
//! let delivery = webhook_request(&[("Example-Signature", &header)], body.to_vec());
//! assert!(delivery.headers[0].1.starts_with("t="));
//! ```

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256 of `message` keyed by `secret`.
pub fn hmac_sha256(secret: &str, message: &[u8]) -> Vec<u8> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// HMAC-SHA256 of `body`, lower-case hex.
pub fn hmac_hex(secret: &str, body: &[u8]) -> String {
    hex::encode(hmac_sha256(secret, body))
}

/// HMAC-SHA256 of `body`, standard base64 with padding.
pub fn hmac_base64(secret: &str, body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha256(secret, body))
}

/// A Stripe-style timestamped signature header value, `t=<t>,v1=<hex>`: the
/// HMAC of `"{t}.{body}"`.
pub fn timestamped(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    format!(
        "t={timestamp},v1={}",
        hex::encode(hmac_sha256(secret, &signed))
    )
}

/// The current Unix time in seconds, for [`timestamped`].
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{verify_hmac_with, verify_timestamped_with, Encoding};

    #[test]
    fn signatures_pass_the_sdk_checks() {
        let body = b"{\"id\":\"evt_1\"}";
        let mac = |msg: &[u8]| Ok(hmac_sha256("k", msg));
        let header = format!("sha256={}", hmac_hex("k", body));
        assert_eq!(
            verify_hmac_with(Some(&header), "sha256=", Encoding::Hex, body, mac),
            Ok(())
        );
        let header = hmac_base64("k", body);
        assert_eq!(
            verify_hmac_with(Some(&header), "", Encoding::Base64, body, mac),
            Ok(())
        );
        let header = timestamped("k", 1_000, body);
        assert_eq!(
            verify_timestamped_with(Some(&header), body, 300, 1_100, mac),
            Ok(())
        );
        assert!(verify_timestamped_with(Some(&header), b"tampered", 300, 1_100, mac).is_err());
    }

    #[test]
    fn matches_a_published_hmac_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            hmac_hex("Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
