//! A ferry connector for the Example CRM API: ferry's customers become
//! Example CRM contacts, and Example CRM's signed webhooks bring contact
//! changes back. The API it is written against is documented in README.md.
//!
//! `ferry connector new` generates this crate; make it yours by pointing
//! the URLs, the field mapping in [`contact_body`] and [`to_customer`], and
//! the webhook check at your own API. The tests in `tests/` run the built
//! component in ferry's real sandbox against scripted and recorded HTTP.

use ferry_sdk::http::{path_segment, Request, Response};
use ferry_sdk::{
    settings, webhook, ChangeKind, ChangedFields, Connector, ConnectorError, Customer, Event,
    Manifest, Operation, Page, ParsedWebhook, PushRequest, PushResult, RemoteRecord,
    WebhookRequest,
};
use serde::{Deserialize, Serialize};

/// The connector's name: its settings are `FERRY_CONNECTORS__<NAME>__…` and
/// its webhook endpoint is `POST /webhooks/<name>`.
pub const NAME: &str = "example";

/// The entity type this connector syncs.
const ENTITY: &str = "customer";
/// The real API; the `api_base` setting points the connector elsewhere (a
/// sandbox, or a local fake in tests).
const DEFAULT_API_BASE: &str = "https://api.example-crm.com";
/// The API's page size limit.
const MAX_PAGE: u32 = 100;
/// How far a webhook's signed timestamp may be from now, in seconds.
const WEBHOOK_TOLERANCE_SECS: i64 = 300;

struct Example;

impl Connector for Example {
    fn manifest() -> Manifest {
        Manifest::builder(NAME, env!("CARGO_PKG_VERSION"))
            .description("Example CRM contacts: push, fetch, list and signed contact.* webhooks")
            .entity(ENTITY)
            .host("api.example-crm.com")
            .base_url_setting(
                "api_base",
                "Base URL of the Example CRM API",
                DEFAULT_API_BASE,
            )
            .secret("api_key", "Example CRM API key", true)
            .secret(
                "webhook_secret",
                "Signing secret of the Example CRM webhook endpoint",
                false,
            )
            .webhooks()
            .build()
    }

    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        ferry_sdk::ensure_entity(&req.entity, ENTITY, NAME)?;
        let customer = Customer::from_json(&req.record)?;
        let contact: Contact = match req.operation {
            // The push's idempotency key makes a retried create safe: the
            // API answers the first create again instead of a second one.
            Operation::Create => send(
                Request::post(format!("{}/v1/contacts", api_base()))
                    .header("idempotency-key", &req.idempotency_key)
                    .json(&contact_body(
                        &customer,
                        &req.local_id,
                        &ChangedFields::default(),
                    ))?,
            )?
            .json()?,
            // Only what ferry changed since the last sync: a field someone
            // just edited in the CRM is not written over.
            Operation::Update => {
                let id = req.linked_remote_id("Example CRM")?;
                let changed = Customer::changed_fields(&req.record);
                send(Request::patch(contact_url(id)).json(&contact_body(
                    &customer,
                    &req.local_id,
                    &changed,
                ))?)?
                .json()?
            }
            Operation::Delete => {
                let id = req.linked_remote_id("Example CRM")?;
                send(Request::delete(contact_url(id)))?;
                return Ok(PushResult::new(id));
            }
        };
        let id = contact.id.clone();
        // What the remote now holds, so ferry can tell its echo from a change.
        Ok(PushResult::new(id).with_record(to_customer(contact).to_json()))
    }

    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, NAME)?;
        let contact: Contact = send(Request::get(contact_url(&remote_id)))?.json()?;
        Ok(remote_record(contact))
    }

    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, NAME)?;
        let limit = limit.clamp(1, MAX_PAGE).to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(after) = cursor.as_deref() {
            query.push(("starting_after", after));
        }
        let req = Request::get(format!("{}/v1/contacts", api_base())).query(&query)?;
        let list: ContactList = send(req)?.json()?;
        let next_cursor = match (list.has_more, list.data.last()) {
            (true, Some(last)) => Some(last.id.clone()),
            // "More" with nothing to continue from: ending here would tell
            // ferry the listing is complete, and a reconciliation would take
            // every record after it for missing (a backfill would create
            // them again). Ask again later instead.
            (true, None) => {
                return Err(ConnectorError::retryable(
                    "the API answered an empty page with has_more",
                ))
            }
            (false, _) => None,
        };
        Ok(Page::new(
            list.data.into_iter().map(remote_record).collect(),
            next_cursor,
        ))
    }

    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        // `Example-Signature: t=<unix secs>,v1=<hex HMAC-SHA256 of "t.body">`,
        // keyed by the secret called `webhook_secret`. The host computes the
        // HMAC; the secret never enters this component.
        webhook::verify_timestamped(
            &req.headers,
            "example-signature",
            &req.body,
            "webhook_secret",
            WEBHOOK_TOLERANCE_SECS,
        )
    }

    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        let event: WebhookEvent = serde_json::from_slice(&req.body)?;
        let kind = match event.kind.as_str() {
            "contact.created" | "contact.updated" => ChangeKind::Upsert,
            "contact.deleted" => ChangeKind::Delete,
            // Other event types are acknowledged and ignored, never an error
            // (their `data` is not a contact: it is read only after this).
            _ => return Ok(ParsedWebhook::ignored()),
        };
        let contact: Contact = serde_json::from_value(event.data)?;
        let remote_id = contact.id.clone();
        // The event's own time lets ferry drop a delivery that arrives after
        // a newer one; its id lets ferry store a redelivery only once.
        let occurred_at_ms = event.created_at.saturating_mul(1000);
        let record = Some(to_customer(contact).to_json());
        let base = match kind {
            ChangeKind::Upsert => {
                Event::upsert(event.id, ENTITY, remote_id, occurred_at_ms, record)
            }
            ChangeKind::Delete => Event {
                record,
                ..Event::delete(event.id, ENTITY, remote_id, occurred_at_ms)
            },
        };
        Ok(ParsedWebhook::events(vec![
            base.with_remote_type(event.kind)
        ]))
    }
}

ferry_sdk::export_connector!(Example);

/// A contact as the Example CRM API sends it.
#[derive(Debug, Deserialize)]
struct Contact {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
}

/// What a create or update sends: each field left out when not to be
/// written, `null` to clear it.
#[derive(Debug, Serialize)]
struct ContactBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<Option<&'a str>>,
    /// ferry's id of the customer, so the contact can be traced back.
    external_id: &'a str,
}

#[derive(Debug, Deserialize)]
struct ContactList {
    data: Vec<Contact>,
    #[serde(default)]
    has_more: bool,
}

/// A webhook delivery: `{"id", "type", "created_at", "data": {…}}`, whose
/// `data` is a contact for the `contact.*` types.
#[derive(Debug, Deserialize)]
struct WebhookEvent {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created_at: i64,
    // Read only for the `contact.*` types: a delivery of another type may
    // have none, and is answered 200 all the same.
    #[serde(default)]
    data: serde_json::Value,
}

/// ferry's canonical customer as the API's contact body.
/// The fields `changed` names (every one for a create).
fn contact_body<'a>(
    customer: &'a Customer,
    local_id: &'a str,
    changed: &ChangedFields,
) -> ContactBody<'a> {
    let field =
        |name: &str, value: &'a Option<String>| changed.field(name).then_some(value.as_deref());
    ContactBody {
        name: field("name", &customer.name),
        email: field("email", &customer.email),
        phone: field("phone", &customer.phone),
        external_id: local_id,
    }
}

/// A contact as ferry's canonical customer. Fields the API does not have
/// (address, metadata) stay unset: ferry leaves them alone.
fn to_customer(contact: Contact) -> Customer {
    let non_empty = |v: Option<String>| v.filter(|s| !s.is_empty());
    Customer {
        id: Some(contact.id),
        name: non_empty(contact.name),
        email: non_empty(contact.email),
        phone: non_empty(contact.phone),
        ..Customer::default()
    }
}

fn remote_record(contact: Contact) -> RemoteRecord {
    let id = contact.id.clone();
    RemoteRecord::new(id, to_customer(contact).to_json())
}

fn api_base() -> String {
    settings::base_url("api_base", DEFAULT_API_BASE)
}

fn contact_url(id: &str) -> String {
    format!("{}/v1/contacts/{}", api_base(), path_segment(id))
}

/// Sends with the API key as a bearer token (the host puts the secret in;
/// the component only names it) and maps a non-2xx answer onto the typed
/// error ferry's retries key off: 429 rate-limited (honouring Retry-After),
/// 5xx retryable, 401/403 unauthorized, a 404 the API calls `not_found`
/// not-found, other 4xx permanent.
///
/// Any other 404 answered the route, not the record (an `api_base` with a
/// path segment too many, a proxy's page): read as not-found, ferry counts
/// a delete as done and leaves the contact there. It is `permanent`.
fn send(req: Request) -> Result<Response, ConnectorError> {
    let resp = req.bearer_secret("api_key").send()?;
    if resp.status == 404 && !api_says_not_found(&resp) {
        return Err(ConnectorError::permanent(format!(
            "remote answered HTTP 404 without the API's `not_found` error (is `api_base` right?): {}",
            api_error_message(&resp)
        )));
    }
    resp.error_for_status_with(api_error_message)
}

/// Whether the answer is the API's `{"error": {"code": "not_found"}}`.
fn api_says_not_found(resp: &Response) -> bool {
    serde_json::from_slice::<serde_json::Value>(&resp.body)
        .is_ok_and(|body| body["error"]["code"] == "not_found")
}

/// The API's `{"error": {"code", "message"}}`, for the operator.
fn api_error_message(resp: &Response) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    match serde_json::from_slice::<Body>(&resp.body) {
        Ok(Body { error }) => format!("{}: {}", error.code, error.message),
        Err(_) => resp.text().chars().take(300).collect(),
    }
}
