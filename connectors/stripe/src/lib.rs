//! The Stripe connector: syncs ferry customers with Stripe customers through
//! Stripe's REST API (form-encoded writes, cursor-paged lists) and turns
//! Stripe's signed `customer.*` webhooks into ferry events.

mod convert;

use ferry_sdk::http::{Request, Response};
use ferry_sdk::{
    settings, webhook, Connector, ConnectorError, Customer, Event, Manifest, Operation, Page,
    ParsedWebhook, PushRequest, PushResult, RemoteRecord, WebhookRequest,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::convert::{customer_form, from_stripe, StripeCustomer, Update};

const ENTITY: &str = "customer";
const DEFAULT_API_BASE: &str = "https://api.stripe.com";
/// Stripe caps `limit` at 100.
const MAX_PAGE: u32 = 100;

struct Stripe;

impl Connector for Stripe {
    fn manifest() -> Manifest {
        Manifest::builder("stripe", env!("CARGO_PKG_VERSION"))
            .description("Stripe customers: push, fetch, list and customer.* webhooks")
            .entity(ENTITY)
            .host("api.stripe.com")
            .base_url_setting(
                "api_base",
                "Base URL of the Stripe API (point it at a test double such as localstripe)",
                DEFAULT_API_BASE,
            )
            .secret(
                "api_key",
                "Stripe secret key (sk_live_… or sk_test_…)",
                true,
            )
            .secret(
                "webhook_secret",
                "Signing secret of the webhook endpoint (whsec_…)",
                false,
            )
            .webhooks()
            .build()
    }

    fn verify_webhook(req: WebhookRequest) -> Result<(), ConnectorError> {
        webhook::verify_stripe(&req.headers, &req.body, "webhook_secret")
    }

    fn parse_webhook(req: WebhookRequest) -> Result<ParsedWebhook, ConnectorError> {
        parse_event(&req.body)
    }

    fn push(req: PushRequest) -> Result<PushResult, ConnectorError> {
        ferry_sdk::ensure_entity(&req.entity, ENTITY, "stripe")?;
        let customer = Customer::from_json(&req.record)?;
        let update = matches!(req.operation, Operation::Update).then(|| Update::of(&req.record));
        // Only when the phone is sent: an update that leaves it alone (a
        // name change of a customer whose phone Stripe never took) goes
        // through, and only the phone stays behind.
        let sends_phone = match (&req.operation, &update) {
            (Operation::Create, _) => true,
            (Operation::Update, Some(update)) => update.changed.field("phone"),
            _ => false,
        };
        if sends_phone {
            check_phone(&customer)?;
        }
        let response = match req.operation {
            Operation::Create => {
                let form = customer_form(&customer, &req.local_id, None);
                post(
                    format!("{}/v1/customers", api_base()),
                    &form,
                    &req.idempotency_key,
                )?
            }
            Operation::Update => {
                let id = req.linked_remote_id("Stripe")?;
                // Only the fields ferry changed; Stripe merges metadata: a
                // key ferry removed is unset by posting it empty, or it
                // stayed there for good.
                let form = customer_form(&customer, &req.local_id, update.as_ref());
                post(customer_url(id), &form, &req.idempotency_key)?
            }
            Operation::Delete => {
                let id = req.linked_remote_id("Stripe")?;
                let resp = checked(call(Request::delete(customer_url(id)))?)?;
                // The answer is `{id, object, deleted: true}`: nothing to return.
                drop(resp);
                return Ok(PushResult::new(id));
            }
        };
        let stripe: StripeCustomer = response.json()?;
        let id = stripe.id.clone();
        Ok(PushResult::new(id).with_record(from_stripe(stripe).to_json()))
    }

    fn fetch(entity: String, remote_id: String) -> Result<RemoteRecord, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, "stripe")?;
        let resp = checked(call(Request::get(customer_url(&remote_id)))?)?;
        let stripe: StripeCustomer = resp.json()?;
        // Stripe answers a retrieve of a deleted customer with 200 and a stub.
        if stripe.deleted {
            return Err(ConnectorError::not_found(format!(
                "customer {remote_id} is deleted"
            )));
        }
        Ok(remote_record(stripe))
    }

    fn list(entity: String, cursor: Option<String>, limit: u32) -> Result<Page, ConnectorError> {
        ferry_sdk::ensure_entity(&entity, ENTITY, "stripe")?;
        let limit = limit.clamp(1, MAX_PAGE).to_string();
        let mut query = vec![("limit", limit.as_str())];
        if let Some(after) = cursor.as_deref() {
            query.push(("starting_after", after));
        }
        let req = Request::get(format!("{}/v1/customers", api_base())).query(&query)?;
        let list: StripeList = checked(call(req)?)?.json()?;
        let next_cursor = match (list.has_more, list.data.last()) {
            (false, _) => None,
            (true, Some(last)) => Some(last.id.clone()),
            // More to come and nothing to start after: ended here, the
            // listing would count every record after as missing, and a
            // backfill would create them again.
            (true, None) => {
                return Err(ConnectorError::retryable(
                    "Stripe answered an empty page with has_more; listing it again",
                ))
            }
        };
        let records = list.data.into_iter().map(remote_record).collect();
        Ok(Page::new(records, next_cursor))
    }
}

ferry_sdk::export_connector!(Stripe);

#[derive(Deserialize)]
struct StripeList {
    data: Vec<StripeCustomer>,
    #[serde(default)]
    has_more: bool,
}

/// The parts of a Stripe event ferry reads. `data.object` and `request` are
/// kept as raw JSON (borrowed from the body, no allocation) and parsed only
/// when the event is one ferry handles: building a `serde_json::Value` tree
/// of the object first cost more than the rest of the parse.
#[derive(Deserialize)]
struct StripeEvent<'a> {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    #[serde(borrow)]
    data: StripeEventData<'a>,
    #[serde(default, borrow)]
    request: Option<&'a RawValue>,
    /// Set on a Connect endpoint's events of a connected account: another
    /// Stripe account's customers, signed with the same secret.
    #[serde(default)]
    account: Option<String>,
}

#[derive(Deserialize)]
struct StripeEventData<'a> {
    #[serde(borrow)]
    object: &'a RawValue,
}

/// `request` is an object since API version 2017-05-25 and a bare request id
/// (or null) before; only the object form carries the idempotency key.
#[derive(Deserialize)]
struct EventRequest {
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// A thin event (an event destination set to Stripe's thin payload style):
/// `"object": "v2.core.event"`, the changed object named in
/// `related_object`, no snapshot, `created` an RFC 3339 string.
#[derive(Deserialize)]
struct ThinEvent {
    id: String,
    object: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    related_object: Option<RelatedObject>,
    /// Set for an event of another account (a connected one).
    #[serde(default)]
    context: Option<String>,
    /// What caused it: an API request carries its idempotency key, which
    /// tells ferry's own pushes (their echoes) and a create whose answer
    /// was lost (adopted by its key), as a snapshot event's `request` does.
    #[serde(default)]
    reason: Option<ThinReason>,
}

#[derive(Deserialize)]
struct RelatedObject {
    id: String,
}

#[derive(Deserialize)]
struct ThinReason {
    #[serde(default)]
    request: Option<EventRequest>,
}

/// A thin event's webhook, or `None` if `body` is not one. Customer
/// events become thin ferry events: the host fetches the customer (so the
/// event carries no date of its own and is dated on arrival; a thin
/// upsert is never stale). Other types (the destination's ping among
/// them) and another account's events are acknowledged and ignored.
fn parse_thin_event(body: &[u8]) -> Result<Option<ParsedWebhook>, ConnectorError> {
    let Ok(event) = serde_json::from_slice::<ThinEvent>(body) else {
        return Ok(None);
    };
    if event.object != "v2.core.event" {
        return Ok(None);
    }
    if event.context.is_some() {
        return Ok(Some(ParsedWebhook::ignored()));
    }
    let kind = match event.kind.as_str() {
        "v1.customer.created" | "v1.customer.updated" => ferry_sdk::ChangeKind::Upsert,
        "v1.customer.deleted" => ferry_sdk::ChangeKind::Delete,
        _ => return Ok(Some(ParsedWebhook::ignored())),
    };
    let Some(related) = event.related_object else {
        return Err(ConnectorError::permanent(format!(
            "thin event {} ({}) names no related object",
            event.id, event.kind
        )));
    };
    let base = match kind {
        ferry_sdk::ChangeKind::Upsert => Event::upsert(event.id, ENTITY, related.id, 0, None),
        ferry_sdk::ChangeKind::Delete => Event::delete(event.id, ENTITY, related.id, 0),
    };
    let origin_key = event
        .reason
        .and_then(|r| r.request)
        .and_then(|r| r.idempotency_key);
    Ok(Some(ParsedWebhook::events(vec![base
        .with_remote_type(event.kind)
        .with_origin_key(origin_key)])))
}

fn parse_event(body: &[u8]) -> Result<ParsedWebhook, ConnectorError> {
    // A snapshot event first (what a classic webhook endpoint sends, and
    // the hot path); a thin one only when the body is not that.
    let event: StripeEvent<'_> = match serde_json::from_slice(body) {
        Ok(event) => event,
        Err(error) => return parse_thin_event(body)?.ok_or_else(|| error.into()),
    };
    // A connected account's customer is not this account's: matched by
    // email, it would overwrite a customer of ferry's with a stranger's.
    if event.account.is_some() {
        return Ok(ParsedWebhook::ignored());
    }
    let kind = match event.kind.as_str() {
        "customer.created" | "customer.updated" => ferry_sdk::ChangeKind::Upsert,
        "customer.deleted" => ferry_sdk::ChangeKind::Delete,
        _ => return Ok(ParsedWebhook::ignored()),
    };
    let stripe: StripeCustomer = serde_json::from_str(event.data.object.get())?;
    let remote_id = stripe.id.clone();
    let occurred_at_ms = event.created.saturating_mul(1000);
    let snapshot = from_stripe(stripe).to_json();
    let origin_key = match event.request.map(RawValue::get) {
        Some(raw) if raw.starts_with('{') => {
            serde_json::from_str::<EventRequest>(raw)?.idempotency_key
        }
        _ => None,
    };
    let base = match kind {
        ferry_sdk::ChangeKind::Upsert => {
            Event::upsert(event.id, ENTITY, remote_id, occurred_at_ms, Some(snapshot))
        }
        // The last state travels with a deletion too, for the audit trail.
        ferry_sdk::ChangeKind::Delete => Event {
            record: Some(snapshot),
            ..Event::delete(event.id, ENTITY, remote_id, occurred_at_ms)
        },
    };
    Ok(ParsedWebhook::events(vec![base
        .with_remote_type(event.kind)
        .with_origin_key(origin_key)]))
}

/// Longest phone Stripe stores, in characters.
const MAX_PHONE: usize = 20;

/// Refuses, before any call, a phone Stripe would refuse: ferry accepts up
/// to 40 characters (Salesforce's limit), Stripe 20, and its refusal names
/// neither the field's limit nor the value's length.
fn check_phone(customer: &Customer) -> Result<(), ConnectorError> {
    let length = customer.phone.as_deref().map_or(0, |p| p.chars().count());
    if length > MAX_PHONE {
        return Err(ConnectorError::permanent(format!(
            "Stripe stores phones of at most {MAX_PHONE} characters; this customer's has {length}: \
             shorten it in ferry, and the push goes again"
        )));
    }
    Ok(())
}

fn remote_record(stripe: StripeCustomer) -> RemoteRecord {
    let id = stripe.id.clone();
    RemoteRecord::new(id, from_stripe(stripe).to_json())
}

fn api_base() -> String {
    settings::base_url("api_base", DEFAULT_API_BASE)
}

fn customer_url(id: &str) -> String {
    format!(
        "{}/v1/customers/{}",
        api_base(),
        ferry_sdk::http::path_segment(id)
    )
}

/// POSTs a form with the push's idempotency key, so Stripe replays the first
/// answer when a retry follows a timeout instead of writing twice.
fn post(
    url: String,
    form: &[(String, String)],
    idempotency_key: &str,
) -> Result<Response, ConnectorError> {
    let req = Request::post(url)
        .header("idempotency-key", idempotency_key)
        .form(form)?;
    checked(call(req)?)
}

fn call(req: Request) -> Result<Response, ConnectorError> {
    req.bearer_secret("api_key")
        .header("stripe-version", STRIPE_VERSION)
        .send()
}

/// The API version the conversions were written against, pinned so an
/// account's default version cannot change the shapes under us.
const STRIPE_VERSION: &str = "2024-06-20";

/// Maps a non-2xx answer onto a typed error with Stripe's own message, and
/// honours `Stripe-Should-Retry` when Stripe says more than the status does:
/// `false` on a 5xx means Stripe stored that answer for the request's
/// idempotency key, so every retry with the key would get it again: it
/// stays retryable, as every 5xx, for the host retries an update or a
/// delete after one under a fresh key, and a create (whose customer may
/// have been made) under its own until its attempts run out, its create
/// kept (refused for good, it was forgotten, and its replay a fresh
/// create: a second customer if the first was made).
/// A 409 is another request with the same idempotency key still in
/// progress (a replay racing the request it replays): retried when the
/// answer says nothing (localstripe says nothing), not when Stripe says
/// `false` (a conflict no retry resolves). A 424 is a dependency
/// outside Stripe that failed: retried unless Stripe says otherwise.
fn checked(resp: Response) -> Result<Response, ConnectorError> {
    let server_error = resp.status >= 500;
    let should_retry = resp.header("stripe-should-retry").map(str::to_owned);
    // "External dependency failed": a failure outside Stripe, transient by
    // nature, unless Stripe says not to retry.
    let dependency = resp.status == 424;
    // A 429 `lock_timeout` is one object busy (another request on the
    // same customer), not the account's rate: retried alone, without
    // pausing every push to Stripe for the pause a rate limit takes.
    let locked = resp.status == 429 && error_code(&resp).as_deref() == Some("lock_timeout");
    // A 404 that is not Stripe's error answer (a proxy's or a gateway's
    // page before an `api_base` that names it) says nothing of the record.
    let stripes = resp.status != 404 || stripe_error(&resp);
    resp.error_for_status_with(stripe_error_message)
        .map_err(|err| match (err, should_retry.as_deref()) {
            (ConnectorError::Permanent(m), Some("true")) => ConnectorError::retryable(m),
            (ConnectorError::Permanent(m), Some("false")) => ConnectorError::permanent(m),
            (ConnectorError::Permanent(m), None) if dependency => ConnectorError::retryable(m),
            // A 409 (the SDK's retryable: the same key still in progress)
            // Stripe says no retry resolves.
            (ConnectorError::Retryable(m), Some("false")) if !server_error => {
                ConnectorError::permanent(m)
            }
            // A 404 for the request, not the record: a path Stripe does not
            // know (an `api_base` ending in `/v1` made `/v1/v1/…`), or a key
            // of the other mode. Read as "gone", every delete counted as
            // done and marked its link deleted, and creates were
            // dead-lettered as "not found".
            (ConnectorError::NotFound(m), _) if misaddressed(&m) => ConnectorError::permanent(m),
            (ConnectorError::NotFound(m), _) if !stripes => ConnectorError::permanent(format!(
                "a 404 that is not Stripe's error answer (is `api_base` right?): {m}"
            )),
            (ConnectorError::RateLimited(r), _) if locked => ConnectorError::retryable(r.message),
            (err, _) => err,
        })
}

/// Whether the answer is Stripe's error shape (`{"error": {"type": …}}`).
fn stripe_error(resp: &Response) -> bool {
    serde_json::from_slice::<serde_json::Value>(&resp.body)
        .is_ok_and(|body| body["error"]["type"].is_string())
}

/// The `error.code` of a Stripe error answer, if it has one.
fn error_code(resp: &Response) -> Option<String> {
    #[derive(Deserialize)]
    struct Body {
        error: Code,
    }
    #[derive(Deserialize)]
    struct Code {
        #[serde(default)]
        code: Option<String>,
    }
    serde_json::from_slice::<Body>(&resp.body).ok()?.error.code
}

/// Whether a 404's message (as [`stripe_error_message`] made it) says the
/// request was wrong rather than the record gone.
fn misaddressed(message: &str) -> bool {
    message.contains("Unrecognized request URL") || message.contains("a similar object exists in")
}

fn stripe_error_message(resp: &Response) -> String {
    #[derive(Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(Deserialize)]
    struct Detail {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
    }
    match serde_json::from_slice::<Body>(&resp.body) {
        Ok(Body { error }) => match (error.kind, error.message) {
            (Some(kind), Some(message)) => format!("{kind}: {message}"),
            (None, Some(message)) => message,
            (Some(kind), None) => kind,
            (None, None) => String::new(),
        },
        Err(_) => resp.text().chars().take(300).collect(),
    }
}
