//! `POST /webhooks/{connector}`: one public endpoint per connector.
//!
//! The connector verifies and parses the delivery in the sandbox; the
//! events are stored in the inbox (once per remote event id) and only then
//! does the sender get its 2xx, or the reply the connector asked for (e.g.
//! Salesforce's SOAP Ack). Nothing is stored for a bad signature. A
//! connector that traps or times out answers 503, so the sender retries. No
//! admin token: the signature is the authentication.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, Problem};
use super::extract::request_id;
use crate::app::AppState;
use crate::registry::{Need, NotReady};
use crate::runtime::{CallError, ChangeKind, ConnectorError, WebhookRequest};
use crate::store::inbox::{NewInboxEvent, RemoteChange};

/// What ferry answers a delivery with when the connector asks for no
/// particular body.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookReceipt {
    /// Events in the delivery.
    pub events: usize,
    /// Events stored now (the others were delivered before).
    pub stored: usize,
}

/// Receive a webhook.
///
/// The connector verifies the signature and parses the events; they are
/// stored durably before the answer. A redelivery is acknowledged and not
/// applied twice. Bad or missing signature: 400 `invalid_signature`.
#[utoipa::path(
    post, path = "/webhooks/{connector}", tag = "webhooks",
    params(("connector" = String, Path, description = "Connector name")),
    request_body(content = String, description = "The remote's delivery, byte for byte"),
    responses(
        (status = 200, description = "Stored (or the connector's own reply body)", body = WebhookReceipt),
        (status = 400, description = "Signature or payload refused", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Unknown or disabled connector", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The connector failed (`connector_failed`), every instance of it was busy (`runtime_busy`), or ferry holds as many webhook bodies as it may (`webhooks_busy`); retry", body = Problem, content_type = "application/problem+json"),
    ),
)]
pub async fn receive(
    State(state): State<AppState>,
    Path(name): Path<String>,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    // Unknown, disabled, unconfigured or without webhooks: all look the
    // same from outside, and are answered before a byte of the body is read.
    // A switched-on connector whose version this replica could not load
    // (yet), or which lacks what its active version needs here (a new
    // version's setting, secrets this replica's master key cannot open), is
    // a passing failure: the sender retries (a 404 invites it to drop the
    // delivery, or the endpoint).
    let ready = state
        .registry
        .ready(&name, Need::Webhooks)
        .map_err(|not_ready| match not_ready {
            NotReady::NotLoaded(why) | NotReady::Incomplete(why) if switched_on(&state, &name) => {
                // Counted: hours of refused deliveries were on no metric
                // but the HTTP status's.
                crate::metrics::webhook_verification(&name, "failed");
                tracing::debug!(connector = %name, why, "webhook refused: the connector cannot run here");
                ApiError::ConnectorFailed
            }
            _ => ApiError::ConnectorNotFound,
        })?;
    // One result per delivery to a switched-on connector, also for one
    // whose request ends before its answer (past `request_timeout`, or
    // the sender gone): those were on no metric but the HTTP status's.
    let mut counted = Counted {
        connector: &name,
        result: None,
    };
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    // Held until the answer: the body, its copy in the sandbox and the
    // events it parses to are this request's while it is verified and
    // stored.
    // A delivery turned away before it is verified (too large, stalled,
    // the webhook buffer full) is counted too: hours of them were on no
    // metric but the HTTP status's.
    let (body, _held) = read_body(&state, &headers, body)
        .await
        .inspect_err(|error| {
            let result = match error {
                ApiError::WebhooksBusy => "busy",
                _ => "refused",
            };
            counted.result = Some(result);
        })?;
    let body_len = body.len();
    let request = WebhookRequest {
        headers: headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        // Moved, not copied, when the buffer is this request's alone.
        body: Vec::from(body),
    };
    let parsed = match ready
        .connector
        .receive_webhook(&ready.config, request)
        .await
    {
        // Counted `verified` once its events are taken, below: a delivery
        // the connector then botches counts `failed` only.
        Ok(parsed) => parsed,
        Err(CallError::Connector(ConnectorError::InvalidSignature(message))) => {
            counted.result = Some("invalid_signature");
            tracing::info!(connector = %name, reason = ?message, "webhook refused: signature");
            return Err(ApiError::InvalidSignature(message));
        }
        Err(CallError::Connector(
            ConnectorError::Permanent(message) | ConnectorError::Unsupported(message),
        )) => {
            // Signed by the remote, so a change ferry does not take in
            // (an API version the connector does not read, say): the
            // sender keeps it and retries (Stripe for 3 days, Salesforce
            // for 24 hours), and an operator must hear of it in time.
            counted.result = Some("invalid");
            tracing::warn!(
                connector = %name,
                reason = %message,
                bytes = body_len,
                "verified webhook refused: the connector cannot parse it; the sender will retry"
            );
            return Err(ApiError::InvalidWebhook(message));
        }
        // Every instance of the connector busy (slow pushes, a burst), or
        // ferry's own pacing held the call back: ferry is saturated, the
        // connector is not broken. The sender retries, paced.
        Err(error @ CallError::Throttled { .. }) => {
            counted.result = Some("busy");
            tracing::debug!(connector = %name, %error, "webhook not processed: ferry is busy; the sender will retry");
            return Err(ApiError::RuntimeBusy);
        }
        // The connector broke (trap, deadline, a retryable error of its
        // own): the sender must retry, and the host stays up.
        Err(error) => {
            counted.result = Some("failed");
            tracing::warn!(connector = %name, %error, "webhook not processed; the sender will retry");
            return Err(ApiError::ConnectorFailed);
        }
    };
    // An event ferry cannot key (its id deduplicates deliveries, its remote
    // id finds the link), a record that is not JSON, one id given to two
    // different events (the store would keep the first and drop the other
    // while the sender hears 200), or a reply too large to send back: the
    // connector is broken, and the sender
    // keeps the events until it is fixed (a 4xx would make many senders
    // drop them for good). The same event twice is stored once.
    let checked = match crate::runtime::reply_problem(parsed.reply.as_ref())
        .map_or_else(|| crate::runtime::checked_delivery(&parsed.events), Err)
    {
        Ok(checked) => checked,
        Err(problem) => {
            counted.result = Some("failed");
            tracing::warn!(connector = %name, %problem, "the connector produced events ferry cannot store; the sender will retry");
            return Err(ApiError::ConnectorFailed);
        }
    };
    // Every event the delivery carried, as the receipt says; an event
    // repeated in it is stored once.
    let count = parsed.events.len();
    let mut events: Vec<NewInboxEvent> = Vec::with_capacity(count);
    for (event, checked) in parsed.events.into_iter().zip(checked) {
        if checked.repeat {
            continue;
        }
        let mut record = checked.record;
        if let Some(value) = &mut record {
            crate::store::replace_nul(value);
        }
        events.push(NewInboxEvent {
            event_id: event.id,
            entity: without_nul(event.entity),
            kind: kind_of(event.kind),
            remote_id: event.remote_id,
            occurred_at_ms: dated(event.occurred_at_ms),
            record,
            // Compared with ferry's own short keys only: a longer one (a
            // client's, up to 255 characters at Stripe) is nobody's echo.
            origin_key: event
                .origin_key
                .filter(|key| key.len() <= crate::runtime::MAX_ID_BYTES)
                .map(without_nul),
            remote_type: without_nul(crate::runtime::cut(
                event.remote_type,
                crate::runtime::MAX_ID_BYTES,
            )),
            policy: None,
        });
    }
    let correlation_id = request_id(&headers);
    // Counted once taken: a delivery the store refused (busy, read-only)
    // is sent again, and each try counted `verified`.
    let stored = match state
        .sync
        .store_webhook(&name, events, Some(correlation_id))
        .await
    {
        Ok(stored) => stored,
        Err(error) => {
            counted.result = Some("unstored");
            return Err(error.into());
        }
    };
    counted.result = Some("verified");
    tracing::info!(connector = %name, events = count, stored, "webhook received");
    Ok(match parsed.reply {
        Some(reply) => {
            let mut response = (StatusCode::OK, reply.body).into_response();
            if let Ok(value) = HeaderValue::from_str(&reply.content_type) {
                response.headers_mut().insert(header::CONTENT_TYPE, value);
            }
            response
        }
        None => Json(WebhookReceipt {
            events: count,
            stored,
        })
        .into_response(),
    })
}

/// A delivery's verification result, counted once when the handler ends:
/// the result it named, or `dropped` when it ended before naming one (its
/// request past `request_timeout`, or the sender gone: the future is
/// dropped mid-way).
struct Counted<'a> {
    connector: &'a str,
    result: Option<&'static str>,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        crate::metrics::webhook_verification(self.connector, self.result.unwrap_or("dropped"));
    }
}

fn kind_of(kind: ChangeKind) -> RemoteChange {
    match kind {
        ChangeKind::Upsert => RemoteChange::Upsert,
        ChangeKind::Delete => RemoteChange::Delete,
    }
}

/// Takes `kib` more of the webhook buffer (`webhook_buffer_bytes`) for a
/// body being read, before anyone is known to have sent it (the signature
/// is checked after): every connection's webhooks at their limit were
/// gigabytes. Taken as bytes arrive, not as lengths are declared (a
/// declaration costs nothing to send), and a request takes 1 KiB before
/// its first byte (16 streams on each of `max_connections` connections
/// take 16 MiB). None left: 503 `webhooks_busy` with `Retry-After`;
/// senders retry.
fn take_buffer(
    state: &AppState,
    held: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    kib: usize,
) -> Result<(), ApiError> {
    if kib == 0 {
        return Ok(());
    }
    let more = u32::try_from(kib)
        .ok()
        .and_then(|kib| {
            state
                .settings
                .webhook_buffer
                .clone()
                .try_acquire_many_owned(kib)
                .ok()
        })
        .ok_or_else(|| {
            tracing::warn!(
                kib,
                "webhook refused: the webhook buffer (webhook_buffer_bytes) is full"
            );
            ApiError::WebhooksBusy
        })?;
    match held {
        Some(held) => held.merge(more),
        None => *held = Some(more),
    }
    Ok(())
}

/// Reads a webhook body: refused at once when its declared length is over
/// the limit, and cut off when it grows past it or stalls; with the share
/// of the webhook buffer it holds ([`take_buffer`]).
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    let limit = state.settings.webhook_max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let mut held = None;
    take_buffer(state, &mut held, 1)?;
    let mut taken_kib = 1;
    // Each frame is copied into one buffer and dropped: a frame is a slice
    // of the connection's read buffer, and keeping a slow client's many
    // small frames would pin a read buffer each (about 1 MiB for a 200 KiB
    // body sent 1 KiB at a time). Sized by the declared length up to what
    // the first KiB covers: a declaration alone reserves nothing.
    let mut buffer =
        bytes::BytesMut::with_capacity(declared.map_or(1024, |length| length as usize).min(1024));
    let mut frames = body.into_data_stream();
    while let Some(frame) = futures::StreamExt::next(&mut frames).await {
        let frame = frame.map_err(|error| {
            super::extract::body_stalled(&error, state).unwrap_or_else(|| {
                ApiError::InvalidWebhook(format!("the body could not be read: {error}"))
            })
        })?;
        let length = buffer.len() + frame.len();
        if length > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        let needed = length.div_ceil(1024).max(1);
        take_buffer(state, &mut held, needed.saturating_sub(taken_kib))?;
        taken_kib = taken_kib.max(needed);
        buffer.extend_from_slice(&frame);
    }
    Ok((buffer.freeze(), held))
}

/// `text` with its NULs (which PostgreSQL cannot store) replaced by U+FFFD;
/// as it is, without a copy, when it has none.
fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

/// Routes under `/webhooks`.
pub fn router() -> Router<AppState> {
    Router::new().route("/webhooks/{connector}", post(receive))
}

/// How far ahead of ferry's clock an event's own time may be: the
/// remote's clock may run ahead of this replica's, and clamping a true
/// time would reorder the record's events. A date beyond it holds the
/// record's later events (as stale) for this long at most.
const FUTURE_SKEW_MS: i64 = crate::runtime::FUTURE_SKEW_MS;

/// Whether connector `name` is enabled here (whatever its load state):
/// one disabled or never configured is a 404 to a sender, loaded or not.
fn switched_on(state: &AppState, name: &str) -> bool {
    state
        .registry
        .entry(name)
        .is_some_and(|entry| entry.effective.switch == crate::registry::Switch::Enabled)
}

/// An event's time, no later than now plus [`FUTURE_SKEW_MS`]. A record's
/// newest applied change decides which later events are stale, so one
/// event dated in the future (a remote's broken clock, or a sender whose
/// messages carry their own time, like Salesforce's Outbound Messages)
/// would freeze the record's inbound sync until that date. An event
/// without a time (zero or less: a connector that had none to give) is
/// dated on arrival; at zero it was stale behind every dated one.
fn dated(occurred_at_ms: i64) -> i64 {
    // The database's clock on PostgreSQL: the same on every replica.
    let now = crate::store::now_ms();
    if occurred_at_ms <= 0 {
        return now;
    }
    occurred_at_ms.min(now + FUTURE_SKEW_MS)
}
