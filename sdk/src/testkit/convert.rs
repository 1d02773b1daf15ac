//! The SDK's types and the runtime's are generated from the same WIT by two
//! generators (wit-bindgen in the guest, wasmtime's bindgen in the host), so
//! they have the same fields but are different Rust types. The kit speaks
//! the SDK's; these convert at its edge.

use ferry_runtime as rt;

use crate::{
    ChangeKind, ConnectorError, Event, Manifest, Operation, Page, ParsedWebhook, PushRequest,
    PushResult, RateLimit, RemoteRecord, SecretSpec, SettingSpec, WebhookReply, WebhookRequest,
};

use super::CallError;

pub(super) fn webhook_request(req: WebhookRequest) -> rt::WebhookRequest {
    rt::WebhookRequest {
        headers: req.headers,
        body: req.body,
    }
}

pub(super) fn push_request(req: PushRequest) -> rt::PushRequest {
    rt::PushRequest {
        entity: req.entity,
        operation: match req.operation {
            Operation::Create => rt::Operation::Create,
            Operation::Update => rt::Operation::Update,
            Operation::Delete => rt::Operation::Delete,
        },
        local_id: req.local_id,
        remote_id: req.remote_id,
        version: req.version,
        idempotency_key: req.idempotency_key,
        record: req.record,
    }
}

pub(super) fn push_result(res: rt::PushResult) -> PushResult {
    PushResult {
        remote_id: res.remote_id,
        record: res.record,
    }
}

pub(super) fn remote_record(rec: rt::RemoteRecord) -> RemoteRecord {
    RemoteRecord {
        remote_id: rec.remote_id,
        record: rec.record,
        updated_at_ms: rec.updated_at_ms,
    }
}

pub(super) fn page(page: rt::Page) -> Page {
    Page {
        records: page.records.into_iter().map(remote_record).collect(),
        next_cursor: page.next_cursor,
    }
}

pub(super) fn parsed_webhook(parsed: rt::ParsedWebhook) -> ParsedWebhook {
    ParsedWebhook {
        events: parsed
            .events
            .into_iter()
            .map(|e| Event {
                id: e.id,
                entity: e.entity,
                kind: match e.kind {
                    rt::ChangeKind::Upsert => ChangeKind::Upsert,
                    rt::ChangeKind::Delete => ChangeKind::Delete,
                },
                remote_id: e.remote_id,
                occurred_at_ms: e.occurred_at_ms,
                record: e.record,
                origin_key: e.origin_key,
                remote_type: e.remote_type,
            })
            .collect(),
        reply: parsed.reply.map(|r| WebhookReply {
            content_type: r.content_type,
            body: r.body,
        }),
    }
}

pub(super) fn manifest(m: &rt::Manifest) -> Manifest {
    Manifest {
        name: m.name.clone(),
        version: m.version.clone(),
        description: m.description.clone(),
        entities: m.entities.clone(),
        hosts: m.hosts.clone(),
        host_settings: m.host_settings.clone(),
        settings: m
            .settings
            .iter()
            .map(|s| SettingSpec {
                name: s.name.clone(),
                description: s.description.clone(),
                default: s.default.clone(),
                required: s.required,
            })
            .collect(),
        secrets: m
            .secrets
            .iter()
            .map(|s| SecretSpec {
                name: s.name.clone(),
                description: s.description.clone(),
                required: s.required,
            })
            .collect(),
        webhooks: m.webhooks,
    }
}

pub(super) fn call_error(e: rt::CallError) -> CallError {
    match e {
        // Whether the remote answered with a 5xx decides only ferry's
        // choice of key for the retry: the connector answered `retryable`.
        rt::CallError::Connector(e) | rt::CallError::ServerFailed(e) => {
            CallError::Connector(connector_error(e))
        }
        rt::CallError::DeadlineExceeded => CallError::DeadlineExceeded,
        rt::CallError::ResourceExhausted(m) => CallError::ResourceExhausted(m),
        rt::CallError::Trap(m) => CallError::Trap(m),
        rt::CallError::Instantiate(m) => CallError::Instantiate(m),
        // The sandbox's pacing refused a request and the guest gave up on
        // it as transient: what the connector answered, as it answered it.
        e @ rt::CallError::Throttled { .. } => {
            CallError::Connector(ConnectorError::Retryable(e.to_string()))
        }
    }
}

fn connector_error(e: rt::ConnectorError) -> ConnectorError {
    match e {
        rt::ConnectorError::Retryable(m) => ConnectorError::Retryable(m),
        rt::ConnectorError::RateLimited(r) => ConnectorError::RateLimited(RateLimit {
            retry_after_ms: r.retry_after_ms,
            message: r.message,
        }),
        rt::ConnectorError::Permanent(m) => ConnectorError::Permanent(m),
        rt::ConnectorError::NotFound(m) => ConnectorError::NotFound(m),
        rt::ConnectorError::Unauthorized(m) => ConnectorError::Unauthorized(m),
        rt::ConnectorError::InvalidSignature(m) => ConnectorError::InvalidSignature(m),
        rt::ConnectorError::Unsupported(m) => ConnectorError::Unsupported(m),
    }
}
