//! Webhook signature checks: Stripe-style timestamped signatures and plain
//! HMAC headers. The HMAC itself is computed by the host with a secret the
//! connector names ([`crate::crypto::hmac_sha256`]); comparisons are
//! constant-time.
//!
//! Every check has a `_with` twin that takes the clock and the MAC as
//! arguments, so it can be unit-tested natively.

use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::http::header;
use crate::ConnectorError;

/// How a signature header encodes the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lower- or upper-case hexadecimal.
    Hex,
    /// Standard base64 with padding.
    Base64,
}

/// Stripe's default tolerance between the signed timestamp and now.
pub const STRIPE_TOLERANCE_SECS: i64 = 300;

/// A parsed `Stripe-Signature`-style header: `t=<unix secs>,v1=<hex>[,v1=<hex>…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimestampedSignature {
    /// The signed timestamp, seconds since the Unix epoch.
    pub timestamp: i64,
    /// Every `v1` signature, decoded. A sender rolling its secret sends more
    /// than one; any match is accepted.
    pub signatures: Vec<Vec<u8>>,
}

impl TimestampedSignature {
    /// Parses the header value; other schemes (`v0=`) are ignored, as Stripe
    /// documents. Undecodable `v1` values are skipped, not fatal, so one bad
    /// entry cannot hide a good one.
    pub fn parse(value: &str) -> Result<Self, ConnectorError> {
        let mut timestamp = None;
        let mut signatures = Vec::new();
        for part in value.split(',') {
            let Some((key, val)) = part.trim().split_once('=') else {
                continue;
            };
            match key.trim() {
                "t" => {
                    let t = val.trim().parse::<i64>().map_err(|_| {
                        ConnectorError::invalid_signature("signature timestamp is not a number")
                    })?;
                    timestamp = Some(t);
                }
                "v1" => {
                    if let Ok(sig) = hex::decode(val.trim()) {
                        signatures.push(sig);
                    }
                }
                _ => {}
            }
        }
        let timestamp = timestamp.ok_or_else(|| {
            ConnectorError::invalid_signature("signature header has no timestamp")
        })?;
        if signatures.is_empty() {
            return Err(ConnectorError::invalid_signature(
                "signature header has no v1 signature",
            ));
        }
        Ok(Self {
            timestamp,
            signatures,
        })
    }
}

/// Verifies a Stripe-style signature found in header `header_name` of
/// `headers`: HMAC-SHA256 over `"{t}.{raw body}"` keyed by the secret called
/// `secret`, `t` within `tolerance_secs` of the host clock.
pub fn verify_timestamped(
    headers: &[(String, String)],
    header_name: &str,
    body: &[u8],
    secret: &str,
    tolerance_secs: i64,
) -> Result<(), ConnectorError> {
    verify_timestamped_with(
        header(headers, header_name),
        body,
        tolerance_secs,
        crate::clock::now_secs(),
        |msg| crate::crypto::hmac_sha256(secret, msg),
    )
}

/// Verifies Stripe's own `Stripe-Signature` header with its default 300 s
/// tolerance, keyed by the secret called `secret`.
pub fn verify_stripe(
    headers: &[(String, String)],
    body: &[u8],
    secret: &str,
) -> Result<(), ConnectorError> {
    verify_timestamped(
        headers,
        "stripe-signature",
        body,
        secret,
        STRIPE_TOLERANCE_SECS,
    )
}

/// [`verify_timestamped`] with the header value, the current time and the MAC
/// function given explicitly.
pub fn verify_timestamped_with(
    header_value: Option<&str>,
    body: &[u8],
    tolerance_secs: i64,
    now_secs: i64,
    mac: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<(), ConnectorError> {
    let value =
        header_value.ok_or_else(|| ConnectorError::invalid_signature("no signature header"))?;
    let parsed = TimestampedSignature::parse(value)?;
    // Reject both old and far-future timestamps: either is a replay window.
    if now_secs.abs_diff(parsed.timestamp) > tolerance_secs.unsigned_abs() {
        return Err(ConnectorError::invalid_signature(format!(
            "signature timestamp is outside the {tolerance_secs} s tolerance"
        )));
    }
    let mut signed = Vec::with_capacity(body.len() + 12);
    signed.extend_from_slice(parsed.timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    let expected = mac(&signed).map_err(secret_unavailable)?;
    // Fold with `|` rather than `any()` so every candidate is compared.
    let matched = parsed
        .signatures
        .iter()
        .fold(subtle::Choice::from(0), |acc, sig| {
            acc | sig.ct_eq(&expected)
        });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ConnectorError::invalid_signature(
            "no signature matches the expected one",
        ))
    }
}

/// Verifies a plain HMAC-SHA256 signature of the raw body in header
/// `header_name`, after stripping `prefix` (e.g. `"sha256="`, or `""`).
pub fn verify_hmac(
    headers: &[(String, String)],
    header_name: &str,
    prefix: &str,
    encoding: Encoding,
    body: &[u8],
    secret: &str,
) -> Result<(), ConnectorError> {
    verify_hmac_with(
        header(headers, header_name),
        prefix,
        encoding,
        body,
        |msg| crate::crypto::hmac_sha256(secret, msg),
    )
}

/// [`verify_hmac`] with the header value and the MAC function given explicitly.
pub fn verify_hmac_with(
    header_value: Option<&str>,
    prefix: &str,
    encoding: Encoding,
    body: &[u8],
    mac: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<(), ConnectorError> {
    let value =
        header_value.ok_or_else(|| ConnectorError::invalid_signature("no signature header"))?;
    let encoded = value
        .trim()
        .strip_prefix(prefix)
        .ok_or_else(|| ConnectorError::invalid_signature("signature has an unexpected prefix"))?;
    let given = match encoding {
        Encoding::Hex => hex::decode(encoded).ok(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok(),
    }
    .ok_or_else(|| ConnectorError::invalid_signature("signature is not validly encoded"))?;
    let expected = mac(body).map_err(secret_unavailable)?;
    if bool::from(given.ct_eq(&expected)) {
        Ok(())
    } else {
        Err(ConnectorError::invalid_signature(
            "signature does not match the body",
        ))
    }
}

/// The host could not compute the MAC: the secret is undeclared or unset.
/// Retrying will not help until an operator sets it, and the delivery must be
/// refused rather than accepted unverified.
fn secret_unavailable(reason: String) -> ConnectorError {
    ConnectorError::invalid_signature(format!("cannot compute the signature: {reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // A stand-in MAC for tests: not HMAC, but deterministic and keyed, which
    // is all the parsing and comparison logic needs.
    fn fake_mac(key: &'static str) -> impl FnOnce(&[u8]) -> Result<Vec<u8>, String> {
        move |msg| {
            let mut out = key.as_bytes().to_vec();
            out.extend_from_slice(msg);
            Ok(out)
        }
    }

    fn header_for(key: &str, t: i64, body: &[u8]) -> String {
        let mut signed = key.as_bytes().to_vec();
        signed.extend_from_slice(format!("{t}.").as_bytes());
        signed.extend_from_slice(body);
        format!("t={t},v1={}", hex::encode(signed))
    }

    #[test]
    fn accepts_a_valid_signature_among_several() {
        let body = br#"{"id":"evt_1"}"#;
        let good = header_for("k", 1000, body);
        let value = format!("{good},v1=00ff,v0=abc");
        assert_eq!(
            verify_timestamped_with(Some(&value), body, 300, 1100, fake_mac("k")),
            Ok(())
        );
        let value = format!("t=1000,v1=beef,{}", &good[7..]);
        assert_eq!(
            verify_timestamped_with(Some(&value), body, 300, 1100, fake_mac("k")),
            Ok(())
        );
    }

    #[test]
    fn refuses_tampered_stale_missing_and_wrong_key() {
        let body = br#"{"id":"evt_1"}"#;
        let value = header_for("k", 1000, body);
        let refused = |r: Result<(), ConnectorError>| {
            assert!(
                matches!(r, Err(ConnectorError::InvalidSignature(_))),
                "{r:?}"
            )
        };
        refused(verify_timestamped_with(
            Some(&value),
            b"{}",
            300,
            1000,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            Some(&value),
            body,
            300,
            1301,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            Some(&value),
            body,
            300,
            699,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            None,
            body,
            300,
            1000,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            Some(&value),
            body,
            300,
            1000,
            fake_mac("other"),
        ));
        refused(verify_timestamped_with(
            Some("v1=00"),
            body,
            300,
            1000,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            Some("t=1000"),
            body,
            300,
            1000,
            fake_mac("k"),
        ));
        refused(verify_timestamped_with(
            Some(&value),
            body,
            300,
            1000,
            |_| Err("no such secret".into()),
        ));
        // A timestamp at the end of the range is refused, not an overflow.
        let extreme = header_for("k", i64::MIN, body);
        refused(verify_timestamped_with(
            Some(&extreme),
            body,
            300,
            1000,
            fake_mac("k"),
        ));
    }

    #[test]
    fn plain_hmac_in_hex_and_base64() {
        let body = b"payload";
        let mac = b"kpayload".to_vec();
        let hex_value = format!("sha256={}", hex::encode(&mac));
        assert_eq!(
            verify_hmac_with(
                Some(&hex_value),
                "sha256=",
                Encoding::Hex,
                body,
                fake_mac("k")
            ),
            Ok(())
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(&mac);
        assert_eq!(
            verify_hmac_with(Some(&b64), "", Encoding::Base64, body, fake_mac("k")),
            Ok(())
        );
        assert!(verify_hmac_with(Some(&b64), "", Encoding::Base64, b"x", fake_mac("k")).is_err());
        assert!(
            verify_hmac_with(Some(&b64), "sha256=", Encoding::Base64, body, fake_mac("k")).is_err()
        );
        assert!(verify_hmac_with(Some("zz"), "", Encoding::Hex, body, fake_mac("k")).is_err());
    }
}
