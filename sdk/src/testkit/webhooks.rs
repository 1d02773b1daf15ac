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
use crate::{ChangeKind, ConnectorError, ParsedWebhook, WebhookRequest};

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
/// - **out of order**: every event that carries a record says when the
///   change happened, in milliseconds (`occurred_at_ms`; a time in
///   seconds reads as January 1970), so the host can drop an older state
///   that arrives after a newer one;
/// - **tampered**: a body with one byte changed, the signature headers
///   with every signature in them changed (a remote that sends two, or
///   two values in one header while its secret rotates: the connector
///   must check the one it trusts), and no signature header at all are
///   each refused with `invalid-signature`, so the host stores nothing.
///
/// An upsert's record must be one ferry can make a customer of; a
/// delete's record is not read (ferry applies the delete by the remote
/// id), so a delete of a record without an email passes.
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
/// (any case): all are changed for the forged delivery, and left out of
/// the unsigned one.
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
    check_events(&first)?;

    let mut tampered_body = signed.clone();
    let middle = tampered_body.body.len() / 2;
    match tampered_body.body.get_mut(middle) {
        Some(byte) => *byte ^= 0x01,
        None => tampered_body.body.push(b' '),
    }
    refused(kit, tampered_body, "a body changed on the way").await?;

    let mut forged = signed.clone();
    for (name, value) in &mut forged.headers {
        if is_signature(name) {
            *value = forge(value);
        }
    }
    refused(kit, forged, "a signature header changed on the way").await?;
    let mut unsigned = signed;
    unsigned.headers.retain(|(name, _)| !is_signature(name));
    refused(kit, unsigned, "a delivery without its signature header").await?;

    Ok(DeliveryReport {
        events: first.events.len(),
        event_ids: ids(&first),
    })
}

/// Before 2001-09-09 in milliseconds; a time in seconds is far below it.
const EARLIEST_MS: i64 = 1_000_000_000_000;

/// How far ahead of now an event's time may be: ferry's own bound (a
/// remote's clock may run a little fast; later ones are dated on arrival,
/// their order lost). A day let a connector that read a remote's local
/// times as UTC (nine hours ahead in Tokyo) pass here and lose the order
/// of every event in ferry.
const LATEST_AHEAD_MS: i64 = ferry_runtime::FUTURE_SKEW_MS;

/// Milliseconds since the Unix epoch, by this machine's clock.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What ferry needs of each event of a delivery, in words.
fn check_events(parsed: &ParsedWebhook) -> Result<(), String> {
    for event in &parsed.events {
        // ferry syncs customers: another entity's event is skipped.
        if event.entity != "customer" {
            return Err(format!(
                "event {} is of entity `{}`: ferry syncs `customer` only, and skips it",
                event.id, event.entity
            ));
        }
        // A trigger (no record) may leave its time to the host, which
        // dates it on arrival; a record needs the remote's.
        if event.record.is_some() && event.occurred_at_ms <= 0 {
            return Err(format!(
                "event {} carries a record but no occurred_at_ms: the host cannot tell an older state arriving late from a newer one",
                event.id
            ));
        }
        // ferry dates an event no later than five minutes after it
        // arrives: one dated a thousand years ahead (a time in
        // microseconds, or milliseconds multiplied by 1000 again) is
        // dated on arrival, its order with the record's other events lost.
        let latest_ms = now_ms().saturating_add(LATEST_AHEAD_MS);
        if event.occurred_at_ms > latest_ms {
            return Err(format!(
                "event {} says it happened at {} ms, more than five minutes from now: a local time read as UTC, a time in microseconds, or milliseconds multiplied by 1000 again? occurred_at_ms is milliseconds since 1970 (UTC), and ferry dates an event more than five minutes ahead at its arrival plus five minutes, losing its order",
                event.id, event.occurred_at_ms
            ));
        }
        if event.occurred_at_ms > 0 && event.occurred_at_ms < EARLIEST_MS {
            return Err(format!(
                "event {} says it happened at {} ms, before 2001: a time in seconds? occurred_at_ms is milliseconds (× 1000), and an event dated in 1970 is older than every state the host has seen",
                event.id, event.occurred_at_ms
            ));
        }
        // An upsert's record ferry cannot make a customer of (no email, a
        // phone or metadata key the catalog refuses) is dead-lettered when
        // applied; a delete's is not read.
        if let (ChangeKind::Upsert, Some(record)) = (event.kind, &event.record) {
            super::check_record(record)
                .map_err(|problem| format!("event {}: {problem}", event.id))?;
        }
    }
    Ok(())
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

/// A run of hexadecimal digits at least this long is a signature (a
/// SHA-1 is 40, a Unix time in seconds 10).
const SIGNATURE_DIGITS: usize = 16;

/// Changes every signature in a header value (the last digit of each run
/// of [`SIGNATURE_DIGITS`] hexadecimal digits or more: Stripe's
/// `t=…,v1=…,v0=…`, two `v1` while a secret rotates), or the last
/// hexadecimal digit when it holds no such run (a base64 signature), so it
/// stays well formed but no longer matches.
fn forge(value: &str) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    let flip = |c: &mut char| *c = if *c == '0' { '1' } else { '0' };
    let mut run = 0;
    let mut forged = false;
    for i in 0..=chars.len() {
        if chars.get(i).is_some_and(char::is_ascii_hexdigit) {
            run += 1;
            continue;
        }
        if run >= SIGNATURE_DIGITS {
            flip(&mut chars[i - 1]);
            forged = true;
        }
        run = 0;
    }
    if !forged {
        match chars.iter_mut().rev().find(|c| c.is_ascii_hexdigit()) {
            Some(c) => flip(c),
            None => chars.push('0'),
        }
    }
    chars.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Event;

    #[test]
    fn every_signature_of_a_header_is_forged() {
        let (one, two) = ("a".repeat(64), "b".repeat(40));
        let value = format!("t=1700000000,v1={one},v0={two}");
        let forged = forge(&value);
        assert_eq!(
            forged,
            format!("t=1700000000,v1={}0,v0={}0", &one[1..], &two[1..])
        );
        // No run of a signature's length (base64): the last hex digit.
        assert_eq!(forge("c2lnbmF0dXJl"), "c2lnbmF00XJl");
    }

    fn event(kind: ChangeKind, occurred_at_ms: i64, record: Option<&str>) -> ParsedWebhook {
        ParsedWebhook {
            events: vec![Event {
                id: "evt_1".into(),
                entity: "customer".into(),
                kind,
                remote_id: "ct_1".into(),
                occurred_at_ms,
                record: record.map(str::to_owned),
                origin_key: None,
                remote_type: "contact.saved".into(),
            }],
            reply: None,
        }
    }

    #[test]
    fn a_delete_without_an_email_is_a_delete() {
        let deleted = event(
            ChangeKind::Delete,
            1_700_000_000_000,
            Some(r#"{"name":"Ada"}"#),
        );
        assert_eq!(check_events(&deleted), Ok(()));
        let updated = event(
            ChangeKind::Upsert,
            1_700_000_000_000,
            Some(r#"{"name":"Ada"}"#),
        );
        assert!(check_events(&updated).is_err());
    }

    #[test]
    fn a_time_in_seconds_is_refused() {
        let record = Some(r#"{"email":"ada@example.com"}"#);
        let seconds = event(ChangeKind::Upsert, 1_700_000_000, record);
        let problem = check_events(&seconds).expect_err("seconds");
        assert!(problem.contains("milliseconds"), "{problem}");
        assert_eq!(
            check_events(&event(ChangeKind::Upsert, 1_700_000_000_000, record)),
            Ok(())
        );
        // A trigger leaves its time to the host.
        assert_eq!(check_events(&event(ChangeKind::Upsert, 0, None)), Ok(()));
    }

    /// A time multiplied by 1000 once too often (the template's
    /// `created_at * 1000` over an API that gives milliseconds already)
    /// is a thousand years ahead: ferry would date it on arrival.
    #[test]
    fn a_time_far_ahead_is_refused() {
        let record = Some(r#"{"email":"ada@example.com"}"#);
        let micros = event(ChangeKind::Upsert, 1_700_000_000_000_000, record);
        let problem = check_events(&micros).expect_err("a thousand years ahead");
        assert!(
            problem.contains("more than five minutes from now"),
            "{problem}"
        );
        // A remote's local time read as UTC (Tokyo's, nine hours ahead):
        // ferry would date it on arrival too.
        let local_as_utc = now_ms() + 9 * 60 * 60 * 1000;
        let problem = check_events(&event(ChangeKind::Upsert, local_as_utc, record))
            .expect_err("nine hours ahead");
        assert!(problem.contains("a local time read as UTC"), "{problem}");
        // A clock a little fast is fine.
        let in_a_minute = now_ms() + 60 * 1000;
        assert_eq!(
            check_events(&event(ChangeKind::Upsert, in_a_minute, record)),
            Ok(())
        );
    }
}
