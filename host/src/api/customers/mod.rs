//! `/api/v1/customers`: create, list, fetch, patch, replace and delete
//! customers. Every write commits the customer row, its outbox event and its
//! idempotency record in one transaction.

pub mod sync;
pub mod validate;

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

pub use self::validate::{is_valid_email, normalise_email, validate, validate_keeping_email};
use super::error::{ApiError, FieldError, Problem};
use super::extract::{
    from_value, page_limit, parse_json, CorrelationId, IdempotencyKey, IfMatch, JsonBody,
    MergePatchBody, Principal, QueryPairs,
};
use super::idempotency;
use crate::app::AppState;
use crate::store::customers::WriteContext;
use crate::store::idempotency::IdempotencyCompletion;
use crate::store::{Address, Customer, CustomerId, ListCustomers, StoredResponse};

/// Default page size.
pub const DEFAULT_LIMIT: u32 = 50;
/// Largest page size.
pub const MAX_LIMIT: u32 = 200;

/// A customer as sent to `POST` (create) and `PUT` (replace). Omitted
/// optional fields are empty; unknown fields are rejected, so a typo never
/// silently drops data.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerInput {
    /// Full name or business name.
    #[serde(default)]
    #[schema(max_length = 256, min_length = 1)]
    pub name: Option<String>,
    /// Email; stored trimmed and lowercased, unique among live customers.
    #[schema(max_length = 254, example = "ada@example.com")]
    pub email: String,
    /// Phone number: digits, spaces and `+-()./`, and an extension at the
    /// end (`x12`, `ext. 12`, `#12`).
    #[serde(default)]
    #[schema(max_length = 40, min_length = 1)]
    pub phone: Option<String>,
    /// Postal address.
    #[serde(default)]
    pub address: Option<Address>,
    /// Up to 49 string pairs (ferry keeps one key for itself on the remotes);
    /// keys up to 40 characters, values up to 500.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

/// `input` if the metadata it gives has no empty value (see
/// [`validate::refuse_empty_metadata`]).
fn given(input: CustomerInput) -> Result<CustomerInput, ApiError> {
    validate::refuse_empty_metadata(
        input
            .metadata
            .iter()
            .flatten()
            .map(|(k, v)| (k, v.as_str())),
        "leave the key out",
    )?;
    Ok(input)
}

/// A JSON merge patch (RFC 7396) of a customer: a field left out stays as
/// is, `null` clears it (`email` cannot be cleared), objects (`address`,
/// `metadata`) merge key by key.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomerPatch {
    /// Full name or business name; null clears it.
    #[schema(max_length = 256, min_length = 1)]
    pub name: Option<String>,
    /// Email; it cannot be cleared (null is a 422), only left out.
    #[schema(max_length = 254, example = "ada@example.com", nullable = false)]
    pub email: Option<String>,
    /// Phone number; null clears it.
    #[schema(max_length = 40, min_length = 1)]
    pub phone: Option<String>,
    /// Address lines to change; null clears the address.
    pub address: Option<Address>,
    /// Metadata keys to set; a key set to null is removed.
    pub metadata: Option<BTreeMap<String, Option<String>>>,
}

/// One page of customers.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomerList {
    /// Customers in creation order.
    pub data: Vec<Customer>,
    /// Whether more customers follow.
    pub has_more: bool,
    /// Pass as `starting_after` for the next page; null on the last page.
    pub next_cursor: Option<CustomerId>,
}

/// Query parameters of the customer list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// A customer id: return the customers created after it.
    #[param(pattern = "^cus_[0-9a-f]{32}$")]
    pub starting_after: Option<String>,
    /// Only the customer with this email (compared normalised).
    pub email: Option<String>,
}

/// Create a customer.
///
/// Returns 201 with the customer, its `Location` and its `ETag` (`"1"`).
/// Send an `Idempotency-Key` to make retries safe.
#[utoipa::path(
    post, path = "/api/v1/customers", tag = "customers",
    request_body(content = CustomerInput, content_type = "application/json"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed", pattern = "^[!-~]{1,255}$")),
    responses(
        (status = 201, description = "Created", body = Customer,
            headers(("ETag" = String, description = "Strong entity tag: the version"), ("Location" = String), ("Idempotent-Replayed" = String, description = "`true` on the first answer given again for a repeated `Idempotency-Key`"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Email taken or key in flight", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again (`idempotency_key_in_flight`)"))),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields or key reused", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn create_customer(
    State(state): State<AppState>,
    principal: Principal,
    IdempotencyKey(key): IdempotencyKey,
    CorrelationId(correlation_id): CorrelationId,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let path = "/api/v1/customers";
    let render = |c: &Customer| render(StatusCode::CREATED, c, true);
    let (state, body, correlation_id) = (&state, &body, &correlation_id);
    idempotency::run(
        state,
        principal,
        key,
        &Method::POST,
        path,
        body,
        |record| async move {
            let fields = validate(given(parse_json::<CustomerInput>(body)?)?)?;
            let ctx = context(correlation_id, record.as_ref(), &render);
            let customer = state.store.create_customer(fields, ctx).await?;
            Ok(render(&customer))
        },
    )
    .await
}

/// List customers.
///
/// Pages through live customers in creation order. Pass the `next_cursor`
/// of a page as `starting_after` to get the next one.
#[utoipa::path(
    get, path = "/api/v1/customers", tag = "customers",
    params(ListParams),
    responses(
        (status = 200, description = "A page of customers", body = CustomerList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_customers(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<CustomerList>, ApiError> {
    let mut request = ListCustomers {
        limit: DEFAULT_LIMIT,
        ..ListCustomers::default()
    };
    for (name, value) in pairs {
        match name.as_str() {
            "limit" => request.limit = page_limit(&value, MAX_LIMIT)?,
            "starting_after" => {
                request.starting_after =
                    Some(CustomerId::parse(&value).ok_or_else(|| {
                        ApiError::field("starting_after", "must be a customer id")
                    })?);
            }
            "email" if value.contains('\0') => {
                return Err(ApiError::field("email", "must not contain NUL"));
            }
            "email" => {
                let email = normalise_email(&value);
                // A filter that cannot match says so: most often a `+`
                // sent unencoded, which a query string reads as a space.
                if !is_valid_email(&email) {
                    return Err(ApiError::field(
                        "email",
                        "must be an email address (send `+` as `%2B`)",
                    ));
                }
                request.email = Some(email);
            }
            // Unknown parameters are ignored, as proxies and caches add their own.
            _ => {}
        }
    }
    let page = state.store.list_customers(&request).await?;
    let next_cursor = if page.has_more {
        page.data.last().map(|c| c.id.clone())
    } else {
        None
    };
    Ok(Json(CustomerList {
        data: page.data,
        has_more: page.has_more,
        next_cursor,
    }))
}

/// Fetch a customer.
#[utoipa::path(
    get, path = "/api/v1/customers/{id}", tag = "customers",
    params(("id" = String, Path, description = "Customer id", pattern = "^cus_[0-9a-f]{32}$")),
    responses(
        (status = 200, description = "The customer", body = Customer,
            headers(("ETag" = String, description = "Strong entity tag: the version"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_customer(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = CustomerId::parse(&id).ok_or(ApiError::CustomerNotFound)?;
    let customer = state.store.get_customer(&id).await?;
    Ok(idempotency::into_response(
        render(StatusCode::OK, &customer, false),
        false,
    ))
}

/// Patch a customer (JSON merge patch).
///
/// Fields left out stay as they are; `null` clears a field; `address` and
/// `metadata` merge key by key. Send `If-Match` with the ETag you read to
/// refuse the change if someone else wrote in between (412).
#[utoipa::path(
    patch, path = "/api/v1/customers/{id}", tag = "customers",
    request_body(content((CustomerPatch = "application/json"), (CustomerPatch = "application/merge-patch+json"))),
    params(
        ("id" = String, Path, description = "Customer id", pattern = "^cus_[0-9a-f]{32}$"),
        ("If-Match" = Option<String>, Header, description = "ETag the change is based on, e.g. \"3\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed", pattern = "^[!-~]{1,255}$"),
    ),
    responses(
        (status = 200, description = "The updated customer", body = Customer,
            headers(("ETag" = String, description = "Strong entity tag: the version"), ("Idempotent-Replayed" = String, description = "`true` on the first answer given again for a repeated `Idempotency-Key`"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Email taken or key in flight", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again (`idempotency_key_in_flight`)"))),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The customer's current version"))),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields or key reused", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn patch_customer(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    if_match: IfMatch,
    IdempotencyKey(key): IdempotencyKey,
    CorrelationId(correlation_id): CorrelationId,
    MergePatchBody(body): MergePatchBody,
) -> Result<Response, ApiError> {
    let path = format!("/api/v1/customers/{id}");
    let render = |c: &Customer| render(StatusCode::OK, c, false);
    let (state, body, correlation_id) = (&state, &body, &correlation_id);
    idempotency::run(
        state,
        principal,
        key,
        &Method::PATCH,
        &path,
        body,
        |record| async move {
            let id = CustomerId::parse(&id).ok_or(ApiError::CustomerNotFound)?;
            let expected = if_match.expected(&state.store, &id).await?;
            let patch: serde_json::Value = parse_json(body)?;
            if !patch.is_object() {
                return Err(ApiError::field(
                    "body",
                    "a merge patch must be a JSON object",
                ));
            }
            refused_in_patch(&patch)?;
            if let Some(metadata) = patch.get("metadata").and_then(|m| m.as_object()) {
                validate::refuse_empty_metadata(
                    metadata
                        .iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k, v))),
                    "send null to remove it",
                )?;
            }
            // A wrong type (`{"name": 5}`) is refused before the write
            // holds the customer's row (on SQLite, the only writer).
            from_value::<CustomerPatch>(patch.clone())?;
            let ctx = context(correlation_id, record.as_ref(), &render);
            let customer = state
                .store
                .update_customer(&id, expected, ctx, |current| {
                    let mut merged = serde_json::to_value(input_of(current))
                        .map_err(|e| ApiError::Internal(e.into()))?;
                    merge_patch(&mut merged, &patch);
                    let input = from_value::<CustomerInput>(merged)?;
                    // An email the patch does not name, or names as stored
                    // (a client sending back what it read), stays as
                    // stored, and is not judged again: an older form kept
                    // beside another customer's (see
                    // `Store::renormalise_emails`) made every patch 409,
                    // and one today's rules refuse (an invisible
                    // character) every patch 422 naming a field the
                    // client never changed.
                    let kept = patch
                        .get("email")
                        .is_none_or(|email| email.as_str() == Some(current.email.as_str()));
                    if kept {
                        validate_keeping_email(input, &current.email)
                    } else {
                        validate(input)
                    }
                })
                .await?;
            Ok(render(&customer))
        },
    )
    .await
}

/// Replace a customer.
///
/// Every field is set from the body; optional fields left out are cleared.
#[utoipa::path(
    put, path = "/api/v1/customers/{id}", tag = "customers",
    request_body(content = CustomerInput, content_type = "application/json"),
    params(
        ("id" = String, Path, description = "Customer id", pattern = "^cus_[0-9a-f]{32}$"),
        ("If-Match" = Option<String>, Header, description = "ETag the change is based on, e.g. \"3\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed", pattern = "^[!-~]{1,255}$"),
    ),
    responses(
        (status = 200, description = "The replaced customer", body = Customer,
            headers(("ETag" = String, description = "Strong entity tag: the version"), ("Idempotent-Replayed" = String, description = "`true` on the first answer given again for a repeated `Idempotency-Key`"))),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Email taken or key in flight", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again (`idempotency_key_in_flight`)"))),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The customer's current version"))),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields or key reused", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn replace_customer(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    if_match: IfMatch,
    IdempotencyKey(key): IdempotencyKey,
    CorrelationId(correlation_id): CorrelationId,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let path = format!("/api/v1/customers/{id}");
    let render = |c: &Customer| render(StatusCode::OK, c, false);
    let (state, body, correlation_id) = (&state, &body, &correlation_id);
    idempotency::run(
        state,
        principal,
        key,
        &Method::PUT,
        &path,
        body,
        |record| async move {
            let id = CustomerId::parse(&id).ok_or(ApiError::CustomerNotFound)?;
            let expected = if_match.expected(&state.store, &id).await?;
            let input = given(parse_json::<CustomerInput>(body)?)?;
            // Judged before the write holds the row (every problem named
            // when another field has one); but an email sent as stored (the
            // record read, sent back) is kept, not judged again, as a
            // patch's (an older form beside another customer's made every
            // replace 409, one today's rules refuse 422).
            let whole = validate(input.clone());
            let others = match &whole {
                Ok(fields) => fields.clone(),
                // The email as sent, unjudged: taken only if it is the
                // stored one.
                Err(_) => validate_keeping_email(input.clone(), &input.email)
                    .or_else(|_| validate(input.clone()))?,
            };
            let ctx = context(correlation_id, record.as_ref(), &render);
            let customer = state
                .store
                .update_customer(&id, expected, ctx, |current| {
                    if input.email == current.email {
                        let mut fields = others.clone();
                        fields.email.clone_from(&current.email);
                        Ok(fields)
                    } else {
                        match &whole {
                            Ok(fields) => Ok(fields.clone()),
                            Err(_) => validate(input.clone()),
                        }
                    }
                })
                .await?;
            Ok(render(&customer))
        },
    )
    .await
}

/// Delete a customer.
///
/// A soft delete: the customer disappears from the API and its email becomes
/// free; connectors are told through the outbox. Answers 200 with the
/// deleted record (`deleted_at` set). Deleting again is 404.
#[utoipa::path(
    delete, path = "/api/v1/customers/{id}", tag = "customers",
    params(
        ("id" = String, Path, description = "Customer id", pattern = "^cus_[0-9a-f]{32}$"),
        ("If-Match" = Option<String>, Header, description = "ETag the change is based on, e.g. \"3\"; or a list of them, one of which must be current; or *", pattern = "^(\\*|\"[0-9]+\"( *, *\"[0-9]+\")*)$"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the first response is replayed", pattern = "^[!-~]{1,255}$"),
    ),
    responses(
        (status = 200, description = "The deleted customer", body = Customer,
            headers(("ETag" = String, description = "Strong entity tag: the deleted version"), ("Idempotent-Replayed" = String, description = "`true` on the first answer given again for a repeated `Idempotency-Key`"))),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such customer", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Key in flight", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again (`idempotency_key_in_flight`)"))),
        (status = 412, description = "If-Match is stale", body = Problem, content_type = "application/problem+json",
            headers(("ETag" = String, description = "The customer's current version"))),
        (status = 422, description = "Key reused", body = Problem, content_type = "application/problem+json"),
        (status = 408, description = "The request took longer than `request_timeout` (`request_timeout`): a write still queued was dropped; one whose commit had begun may land (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The store did not answer in time (`store_busy`), or a write found it read-only (`store_read_only`): nothing was written; or the connection to it was lost (`store_unavailable`): a write under way may have landed (send it again with the same `Idempotency-Key`)", body = Problem, content_type = "application/problem+json",
            headers(("Retry-After" = String, description = "Seconds to wait before sending it again"))),
    ),
    security((), ("admin_token" = []))
)]
pub async fn delete_customer(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    if_match: IfMatch,
    IdempotencyKey(key): IdempotencyKey,
    CorrelationId(correlation_id): CorrelationId,
) -> Result<Response, ApiError> {
    let path = format!("/api/v1/customers/{id}");
    let render = |c: &Customer| render(StatusCode::OK, c, false);
    let (state, correlation_id) = (&state, &correlation_id);
    idempotency::run(
        state,
        principal,
        key,
        &Method::DELETE,
        &path,
        b"",
        |record| async move {
            let id = CustomerId::parse(&id).ok_or(ApiError::CustomerNotFound)?;
            let expected = if_match.expected(&state.store, &id).await?;
            let ctx = context(correlation_id, record.as_ref(), &render);
            let customer = state.store.delete_customer(&id, expected, ctx).await?;
            Ok(render(&customer))
        },
    )
    .await
}

fn context<'a>(
    correlation_id: &'a str,
    record: Option<&'a crate::store::IdempotencyRecord>,
    render: &'a (dyn Fn(&Customer) -> StoredResponse + Send + Sync),
) -> WriteContext<'a> {
    WriteContext {
        correlation_id: Some(correlation_id),
        idempotency: record.map(|r| IdempotencyCompletion {
            scope: &r.scope,
            key: &r.key,
            claim: &r.claim,
            render,
        }),
    }
}

/// The response to a customer write or read, as stored for replay.
fn render(status: StatusCode, customer: &Customer, location: bool) -> StoredResponse {
    let mut headers = vec![
        (
            header::CONTENT_TYPE.to_string(),
            "application/json".to_owned(),
        ),
        (
            header::ETAG.to_string(),
            format!("\"{}\"", customer.version),
        ),
    ];
    if location {
        headers.push((
            header::LOCATION.to_string(),
            format!("/api/v1/customers/{}", customer.id),
        ));
    }
    StoredResponse {
        status: status.as_u16(),
        headers,
        // Serialising plain data into a Vec cannot fail.
        body: serde_json::to_vec(customer).unwrap_or_default(),
    }
}

/// The editable fields of a customer in request form (the base of a patch).
fn input_of(customer: &Customer) -> CustomerInput {
    CustomerInput {
        name: customer.name.clone(),
        email: customer.email.clone(),
        phone: customer.phone.clone(),
        address: customer.address.clone(),
        metadata: Some(customer.metadata.clone()),
    }
}

/// The patch's field names that no customer has, refused as the merged
/// record's would be. A `null` under a misspelled name (`{"phnoe": null}`)
/// never reaches the merged record, where unknown fields are refused: it
/// answered 200, cleared nothing, and still made a version every
/// connector was sent. A patch setting more metadata keys than a customer
/// may have is refused here too.
///
/// Unknown names are listed up to [`MAX_UNKNOWN_LISTED`], each cut to
/// [`MAX_UNKNOWN_NAME`] characters, and counted beyond: a body of short
/// unknown keys (a megabyte holds 130,000) answered one error each, named
/// twice, an answer six times the request.
fn refused_in_patch(patch: &serde_json::Value) -> Result<(), ApiError> {
    const FIELDS: [&str; 5] = ["name", "email", "phone", "address", "metadata"];
    const ADDRESS: [&str; 6] = ["line1", "line2", "city", "postal_code", "state", "country"];
    let mut unknown: Vec<String> = Vec::new();
    for (key, value) in patch.as_object().into_iter().flatten() {
        if !FIELDS.contains(&key.as_str()) {
            unknown.push(key.clone());
        } else if key == "address" {
            for line in value.as_object().into_iter().flatten().map(|(k, _)| k) {
                if !ADDRESS.contains(&line.as_str()) {
                    unknown.push(format!("address.{line}"));
                }
            }
        }
    }
    let mut errors: Vec<FieldError> = unknown
        .iter()
        .take(MAX_UNKNOWN_LISTED)
        .map(|name| {
            let shown: String = name.chars().take(MAX_UNKNOWN_NAME).collect();
            FieldError::new(shown.escape_debug().to_string(), "unknown field")
        })
        .collect();
    if unknown.len() > MAX_UNKNOWN_LISTED {
        errors.push(FieldError::new(
            "*",
            format!("{} more unknown fields", unknown.len() - MAX_UNKNOWN_LISTED),
        ));
    }
    // Every key set (not null) is in the merged record, and a patch that
    // replaces every key names each twice at most: one beyond either is
    // refused here, before the merge and its validation hold the
    // customer's row (and on SQLite the only writer) for nothing.
    let metadata = patch["metadata"].as_object();
    let set = metadata.map_or(0, |m| m.values().filter(|v| !v.is_null()).count());
    let named = metadata.map_or(0, serde_json::Map::len);
    if set > validate::MAX_METADATA_KEYS {
        errors.push(FieldError::new(
            "metadata",
            format!("at most {} keys", validate::MAX_METADATA_KEYS),
        ));
    } else if named > 2 * validate::MAX_METADATA_KEYS {
        errors.push(FieldError::new(
            "metadata",
            format!(
                "a patch names at most {} keys (each key removed and another set)",
                2 * validate::MAX_METADATA_KEYS
            ),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Validation(errors))
    }
}

/// How many unknown field names a refused patch lists (see
/// [`refused_in_patch`]).
const MAX_UNKNOWN_LISTED: usize = 10;
/// How much of an unknown field's name it shows.
const MAX_UNKNOWN_NAME: usize = 64;

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(
                    target.entry(key.clone()).or_insert(serde_json::Value::Null),
                    value,
                );
            }
        }
    }
}

/// Routes under `/api/v1/customers`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/customers", get(list_customers).post(create_customer))
        .route(
            "/customers/{id}",
            get(get_customer)
                .patch(patch_customer)
                .put(replace_customer)
                .delete(delete_customer),
        )
        .route("/customers/{id}/sync", get(sync::customer_sync))
}
