//! What happens to webhook deliveries on the way: senders retry (the same
//! delivery twice), deliveries cross (an older state arrives after a newer
//! one), and anyone can post to a public endpoint (a body or signature
//! changed on the way). ferry's host handles the first two with what the
//! connector's events say, and the third with the connector's signature
//! check; [`check_delivery`] checks that your connector gives the host what
//! it needs, for one of your signed deliveries.
//!
//! ```no_run
//! # async fn demo(kit: ferry_sdk::testkit::TestKit, signed: ferry_sdk::WebhookRequest) {
//! use ferry_sdk::testkit::webhooks;
//! let report = webhooks::check_delivery(&kit, signed).await.unwrap();
//! assert_eq!(report.events, 1);
//! # }
//! ```

use super::{CallError, TestKit};
use crate::{ConnectorError, ParsedWebhook, WebhookRequest};

/// What [`check_delivery`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Events the delivery carries.
    pub events: usize,
    /// Their ids, which the host keys its inbox on.
    pub event_ids: Vec<String>,
}

/// Runs `signed` (a correctly signed delivery) and its mishaps through the
/// connector the way ferry's webhook endpoint does, and checks:
///
/// - it verifies and parses, into `customer` events whose records ferry
///   can make a customer of ([`super::check_record`]);
/// - **duplicated**: the same delivery again gives the same event ids, so
///   the host stores it once (an id built from the time of receipt, or a
///   random one, would apply a redelivery twice);
/// - **out of order**: every event says when the change happened
///   (`occurred_at_ms > 0`), so the host can drop an older state that
///   arrives after a newer one;
/// - **tampered**: a body with one byte changed, a signature header with
///   one character changed, and no signature header at all are each
///   refused with `invalid-signature`, so the host stores nothing.
///
/// The signature header is the one whose name has `signature` or `hmac`
/// in it; a remote that signs in another (`X-Gitlab-Token`) is checked
/// with [`check_delivery_signed_by`]. A delivery with no such header is
/// an error that says so.
///
/// Returns what it saw, or what failed, in words.
pub async fn check_delivery(
    kit: &TestKit,
    signed: WebhookRequest,
) -> Result<DeliveryReport, String> {
    let named: Vec<String> = signed
        .headers
        .iter()
        .map(|(name, _)| name.to_ascii_lowercase())
        .filter(|name| name.contains("signature") || name.contains("hmac"))
        .collect();
    if named.is_empty() {
        return Err("no header of the delivery is named like a signature (`signature` or `hmac` in its name): name the header yours is in with `check_delivery_signed_by`".into());
    }
    let named: Vec<&str> = named.iter().map(String::as_str).collect();
    check_delivery_signed_by(kit, signed, &named).await
}

/// [`check_delivery`], with the signature in the headers named `headers`
/// (any case): the first is changed for the forged delivery, and all are
/// left out of the unsigned one.
pub async fn check_delivery_signed_by(
    kit: &TestKit,
    signed: WebhookRequest,
    headers: &[&str],
) -> Result<DeliveryReport, String> {
    let is_signature = |name: &str| {
        headers
            .iter()
            .any(|header| header.eq_ignore_ascii_case(name))
    };
    if !signed.headers.iter().any(|(name, _)| is_signature(name)) {
        return Err(format!(
            "the delivery has none of the signature headers named ({headers:?})"
        ));
    }
    let first = receive(kit, signed.clone(), "the signed delivery").await?;
    if first.events.is_empty() {
        return Err("the signed delivery parsed to no events: use a delivery of an event type the connector handles".into());
    }
    let again = receive(kit, signed.clone(), "the same delivery again").await?;
    let ids = |parsed: &ParsedWebhook| {
        parsed
            .events
            .iter()
            .map(|e| e.id.clone())
            .collect::<Vec<_>>()
    };
    if ids(&first) != ids(&again) {
        return Err(format!(
            "a redelivery gave other event ids ({:?}, then {:?}): the host would apply it twice; build event ids from the remote's own event id",
            ids(&first),
            ids(&again)
        ));
    }
    // A trigger (no record) may leave its time to the host, which dates
    // it on arrival; a record needs the remote's.
    if let Some(event) = first
        .events
        .iter()
        .find(|e| e.occurred_at_ms <= 0 && e.record.is_some())
    {
        return Err(format!(
            "event {} carries a record but no occurred_at_ms: the host cannot tell an older state arriving late from a newer one",
            event.id
        ));
    }

    // ferry syncs customers: another entity's event is skipped, and a
    // customer record ferry cannot make a customer of (no email, a phone
    // or metadata key the catalog refuses) is dead-lettered when applied.
    for event in &first.events {
        if event.entity != "customer" {
            return Err(format!(
                "event {} is of entity `{}`: ferry syncs `customer` only, and skips it",
                event.id, event.entity
            ));
        }
        if let Some(record) = &event.record {
            super::check_record(record)
                .map_err(|problem| format!("event {}: {problem}", event.id))?;
        }
    }

    let mut tampered_body = signed.clone();
    let middle = tampered_body.body.len() / 2;
    match tampered_body.body.get_mut(middle) {
        Some(byte) => *byte ^= 0x01,
        None => tampered_body.body.push(b' '),
    }
    refused(kit, tampered_body, "a body changed on the way").await?;

    if let Some(index) = signed
        .headers
        .iter()
        .position(|(name, _)| is_signature(name))
    {
        let mut forged = signed.clone();
        let value = &mut forged.headers[index].1;
        *value = flip_last_hex(value);
        refused(kit, forged, "a signature header changed on the way").await?;
    }
    let mut unsigned = signed;
    unsigned.headers.retain(|(name, _)| !is_signature(name));
    refused(kit, unsigned, "a delivery without its signature header").await?;

    Ok(DeliveryReport {
        events: first.events.len(),
        event_ids: ids(&first),
    })
}

async fn receive(kit: &TestKit, req: WebhookRequest, what: &str) -> Result<ParsedWebhook, String> {
    kit.receive_webhook(req)
        .await
        .map_err(|e| format!("{what} was not accepted: {e}"))
}

async fn refused(kit: &TestKit, req: WebhookRequest, what: &str) -> Result<(), String> {
    match kit.receive_webhook(req).await {
        Err(CallError::Connector(ConnectorError::InvalidSignature(_))) => Ok(()),
        Err(other) => Err(format!(
            "{what} failed with {other} instead of invalid-signature: the sender would be told to retry"
        )),
        Ok(_) => Err(format!("{what} was accepted: anyone could post changes")),
    }
}

/// Changes the last hexadecimal digit of a signature so it stays well
/// formed but no longer matches.
fn flip_last_hex(value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    if let Some(c) = chars.iter_mut().rev().find(|c| c.is_ascii_hexdigit()) {
        *c = if *c == '0' { '1' } else { '0' };
    } else {
        chars.push('0');
    }
    chars.into_iter().collect()
}
