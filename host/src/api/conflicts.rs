//! `/api/v1/conflicts`: fields a local and a remote edit changed
//! differently. Every conflict is recorded; with the `flag` policy it stays
//! open, holding its (customer, connector) link, until resolved here.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, FieldError, Problem};
use super::extract::{
    is_id, next_cursor, page_limit, parse_json, request_id, text_param, JsonBody, Principal,
    QueryPairs,
};
use crate::app::AppState;
use crate::store::conflicts::{Conflict, ListConflicts, Resolved};
use crate::store::{Customer, CustomerId, StoreError};
use crate::sync::inbound::{fields_for, local_record, FoldError};
use crate::sync::merge::{field_of, set_field};

const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 500;
/// Attempts when the customer keeps changing under a resolution.
const RACE_RETRIES: usize = 3;

/// A page of conflicts.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictList {
    /// Oldest first.
    pub data: Vec<Conflict>,
    /// Pass as `starting_after` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// How to resolve a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Choice {
    /// Keep ferry's values (they are pushed to the remote).
    Local,
    /// Take the remote's values.
    Remote,
    /// Use the values given in `fields`.
    Fields,
}

/// A resolution.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveConflict {
    /// `local`, `remote` or `fields`.
    pub resolution: Choice,
    /// For `fields`: a value (or null) for every conflicting field, by its
    /// dotted name (`name`, `address.city`, `metadata.tier`).
    #[serde(default)]
    pub fields: BTreeMap<String, Option<String>>,
}

/// The resolved conflict and the customer as now written.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConflictResolution {
    /// The conflict, now `resolved`.
    pub conflict: Conflict,
    /// The customer at its new version (pushed to every connector).
    pub customer: Customer,
}

/// List conflicts.
///
/// Query: `state` (`open` or `resolved`; default all), `customer_id`,
/// `connector`, `limit` (1–500), `starting_after`.
#[utoipa::path(
    get, path = "/api/v1/conflicts", tag = "sync",
    params(
        ("state" = Option<String>, Query, description = "open or resolved"),
        ("customer_id" = Option<String>, Query, description = "Only this customer's"),
        ("connector" = Option<String>, Query, description = "Only this connector's"),
        ("starting_after" = Option<String>, Query, description = "Cursor from the previous page"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 500"),
    ),
    responses(
        (status = 200, description = "A page of conflicts", body = ConflictList),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameter", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn list_conflicts(
    State(state): State<AppState>,
    _principal: Principal,
    QueryPairs(pairs): QueryPairs,
) -> Result<Json<ConflictList>, ApiError> {
    let mut request = ListConflicts {
        limit: DEFAULT_LIMIT,
        ..ListConflicts::default()
    };
    for (name, value) in pairs {
        match name.as_str() {
            "state" if value == "open" || value == "resolved" => request.state = Some(value),
            "state" => return Err(ApiError::field("state", "must be open or resolved")),
            "customer_id" => request.customer_id = Some(text_param("customer_id", value)?),
            "connector" => request.connector = Some(text_param("connector", value)?),
            "starting_after" => request.starting_after = Some(text_param("starting_after", value)?),
            "limit" => request.limit = page_limit(&value, MAX_LIMIT)?,
            _ => {}
        }
    }
    let limit = request.limit;
    request.limit += 1;
    let mut data = state.store.conflicts(&request).await?;
    let next_cursor = next_cursor(&mut data, limit, |c| c.id.clone());
    Ok(Json(ConflictList { data, next_cursor }))
}

/// Get one conflict.
#[utoipa::path(
    get, path = "/api/v1/conflicts/{id}", tag = "sync",
    params(("id" = String, Path, description = "Conflict id")),
    responses(
        (status = 200, description = "The conflict", body = Conflict),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such conflict", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn get_conflict(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<Conflict>, ApiError> {
    if !is_id(&id, "cf_") {
        return Err(ApiError::ConflictNotFound);
    }
    let conflict = state
        .store
        .conflict(&id)
        .await?
        .ok_or(ApiError::ConflictNotFound)?;
    Ok(Json(conflict))
}

/// A dotted field (`name`, `address.city`, `metadata.tier`) of
/// `customer`'s canonical record, as the text a resolution's `fields` takes
/// (`None` when empty).
pub(crate) fn current_value(customer: &Customer, field: &str) -> Result<Option<String>, ApiError> {
    let record = local_record(customer)?;
    Ok(match field_of(&record, field) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(text)) => Some(text.clone()),
        Some(other) => Some(other.to_string()),
    })
}

/// The conflict's fields as a person decided them, for the record: every
/// field the resolution wrote takes its choice (`remote` and `fields`
/// write them all; `local` keeps what stands, so a field a policy already
/// decided keeps that label and only the `pending` ones become `local`),
/// and every field the value now written (`value`, null when cleared).
fn decided_fields(
    fields: &serde_json::Value,
    choice: &str,
    record: &serde_json::Value,
) -> serde_json::Value {
    let mut fields = fields.clone();
    for entry in fields.as_array_mut().into_iter().flatten() {
        let Some(field) = entry["field"].as_str().map(str::to_owned) else {
            continue;
        };
        let written = field_of(record, &field);
        if choice != "local" || entry["resolution"] == "pending" {
            entry["resolution"] = choice.into();
        }
        entry["value"] = written.cloned().unwrap_or(serde_json::Value::Null);
    }
    fields
}

/// A conflict field's value as the text `current_value` gives.
fn text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

/// Resolve a conflict.
///
/// `local` keeps ferry's values, `remote` takes the remote's, `fields` takes
/// the given value of every conflicting field. The customer is written at a
/// new version, the conflict is closed, its link is released, and the result
/// is pushed to every connector, the one the conflict came from included.
#[utoipa::path(
    post, path = "/api/v1/conflicts/{id}/resolve", tag = "sync",
    params(("id" = String, Path, description = "Conflict id")),
    request_body = ResolveConflict,
    responses(
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 200, description = "Resolved", body = ConflictResolution),
        (status = 401, description = "Unauthorized", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such conflict (a deleted customer's conflicts are closed with it: 409 `conflict_not_open`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already resolved (`conflict_not_open`), the customer changed under the resolution three times in a row (`conflict_customer_busy`), or ferry changed a conflicting field since the conflict was recorded and the resolution would overwrite it (`conflict_stale`), or the email the resolution writes is another customer's (`email_taken`)", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid resolution", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A remote edit made while the conflict was open waits, and the remote could not be read for it (`remote_unavailable`): nothing was written, resolve again shortly", body = Problem, content_type = "application/problem+json"),
    ),
    security((), ("admin_token" = []))
)]
pub async fn resolve_conflict(
    State(state): State<AppState>,
    _principal: Principal,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<ConflictResolution>, ApiError> {
    let request: ResolveConflict = parse_json(&body)?;
    if !is_id(&id, "cf_") {
        return Err(ApiError::ConflictNotFound);
    }
    let conflict = state
        .store
        .conflict(&id)
        .await?
        .ok_or(ApiError::ConflictNotFound)?;
    if conflict.state != "open" {
        return Err(ApiError::ConflictNotOpen);
    }
    let conflicting: Vec<(String, serde_json::Value)> = conflict
        .fields
        .0
        .as_array()
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| Some((f["field"].as_str()?.to_owned(), f["remote"].clone())))
                .collect()
        })
        .unwrap_or_default();
    // What the customer held for each field once the conflict was
    // recorded: ferry's side, or the remote's where the policy already
    // took it (a duplicate-email conflict keeps the merge's other
    // conflicts, decided, and their remote values were written with it:
    // compared with ferry's side only, they read as edits made since, and
    // every `fields` resolution choosing another value was refused stale).
    let recorded: BTreeMap<String, (Option<String>, Option<Option<String>>)> = conflict
        .fields
        .0
        .as_array()
        .map(|fields| {
            fields
                .iter()
                .filter_map(|f| {
                    let taken = (f["resolution"] == "remote").then(|| text(&f["remote"]));
                    Some((f["field"].as_str()?.to_owned(), (text(&f["local"]), taken)))
                })
                .collect()
        })
        .unwrap_or_default();
    if request.resolution == Choice::Fields {
        let mut errors = Vec::new();
        for name in request.fields.keys() {
            if !conflicting.iter().any(|(f, _)| f == name) {
                errors.push(FieldError::new(
                    format!("fields.{name}"),
                    "not a conflicting field",
                ));
            }
        }
        for (name, _) in &conflicting {
            if !request.fields.contains_key(name) {
                errors.push(FieldError::new(
                    format!("fields.{name}"),
                    "a value (or null) is required",
                ));
            }
        }
        // As every other way in: a blank metadata value is refused (Stripe
        // takes an empty one as removing the key, a sync a blank one for
        // none); `null` removes the key.
        for (name, value) in &request.fields {
            if let (Some(key), Some(value)) = (name.strip_prefix("metadata."), value) {
                if value.trim().is_empty() {
                    errors.push(FieldError::new(
                        format!("fields.{name}"),
                        format!("an empty or blank value for metadata key `{key}`: send null to remove the key"),
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
    } else if !request.fields.is_empty() {
        return Err(ApiError::field("fields", "only with resolution `fields`"));
    }
    let customer_id = CustomerId::parse(&conflict.customer_id).ok_or(ApiError::CustomerNotFound)?;
    let correlation_id = request_id(&headers);
    // Whether waiting remote edits are folded in (see below).
    let mut fold = true;
    for _ in 0..RACE_RETRIES {
        let customer = match state.store.get_customer(&customer_id).await {
            Ok(customer) => customer,
            // Deleted since the conflict was read: the delete closed it.
            Err(StoreError::CustomerNotFound) => return Err(ApiError::ConflictNotOpen),
            Err(error) => return Err(error.into()),
        };
        // A field ferry changed since the conflict was recorded, which
        // the resolution would overwrite with another value: the choice was
        // made on what the conflict showed, not on that edit, so it is
        // refused rather than undo the edit (`local` keeps it, and a
        // resolution that sets the current value is no overwrite).
        let mut stale = Vec::new();
        for (field, remote) in &conflicting {
            let chosen = match request.resolution {
                Choice::Local => continue,
                Choice::Remote => text(remote),
                Choice::Fields => request.fields.get(field).cloned().flatten(),
            };
            // Compared as the merge compared them when it recorded the
            // conflict (trimmed, empty as unset, an email's case), or a
            // stored `"silver "` never matched its recorded `"silver"`.
            let now = current_value(&customer, field)?;
            let (local, taken) = recorded.get(field).cloned().unwrap_or_default();
            let same = |a: &Option<String>, b: &Option<String>| {
                crate::sync::merge::same_text(field, a.as_deref(), b.as_deref())
            };
            let as_recorded =
                same(&now, &local) || taken.as_ref().is_some_and(|taken| same(&now, taken));
            if !as_recorded && !same(&chosen, &now) {
                stale.push(field.clone());
            }
        }
        if !stale.is_empty() {
            return Err(ApiError::ConflictStale(stale.join(", ")));
        }
        let mut record = local_record(&customer)?;
        for (field, remote) in &conflicting {
            match request.resolution {
                Choice::Local => {}
                Choice::Remote => set_field(&mut record, field, remote.clone()),
                Choice::Fields => {
                    let value = request.fields.get(field).cloned().flatten();
                    set_field(
                        &mut record,
                        field,
                        value.map_or(serde_json::Value::Null, Into::into),
                    );
                }
            }
        }
        // What the remote changed while the conflict held the link is part
        // of the result, not pushed over. Unless ferry would refuse it (a
        // phone it cannot read, an email another customer has): then the
        // resolution stands alone, and the waiting edits are applied after
        // it as any other event (dead-lettered with the reason, or through
        // the duplicate-email policy). Folded, they made every resolution
        // fail, and the link stayed held for good.
        let folding = if fold {
            // A `local` resolution sets no field: it keeps what stands.
            let set = request.resolution != Choice::Local;
            match state.sync.fold_waiting(&conflict, &record, set).await {
                Ok(folding) => folding,
                Err(FoldError::Store(error)) => return Err(error.into()),
                Err(FoldError::RemoteUnreadable(why)) => {
                    return Err(ApiError::RemoteUnavailable(why))
                }
            }
        } else {
            None
        };
        let (record, folded) = match folding {
            Some((merged, folded)) if fields_for(&merged, &customer.email).is_ok() => {
                (merged, Some(folded))
            }
            _ => (record, None),
        };
        // The resolved record goes through the API's own validation (the
        // customer's own email kept as stored, as a merge keeps it).
        let fields = fields_for(&record, &customer.email)
            .map_err(|message| ApiError::field("fields", message))?;
        let choice = match request.resolution {
            Choice::Local => "local",
            Choice::Remote => "remote",
            Choice::Fields => "fields",
        };
        let decided = decided_fields(&conflict.fields.0, choice, &record);
        let resolved = state
            .store
            .resolve_conflict(
                &conflict,
                choice,
                &decided,
                &customer_id,
                customer.version,
                &fields,
                Some(&correlation_id),
                folded.as_ref(),
            )
            .await;
        let resolved = match resolved {
            Err(StoreError::EmailTaken) if folded.is_some() => {
                fold = false;
                continue;
            }
            other => other?,
        };
        match resolved {
            Resolved::Done(customer) => {
                let conflict = state
                    .store
                    .conflict(&id)
                    .await?
                    .ok_or(ApiError::ConflictNotFound)?;
                tracing::info!(conflict_id = %id, resolution = choice, "conflict resolved");
                return Ok(Json(ConflictResolution {
                    conflict,
                    customer: *customer,
                }));
            }
            Resolved::NotOpen => return Err(ApiError::ConflictNotOpen),
            Resolved::Raced => continue,
        }
    }
    Err(ApiError::ConflictCustomerBusy)
}

/// Routes under `/api/v1/conflicts`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/conflicts", get(list_conflicts))
        .route("/conflicts/{id}", get(get_conflict))
        .route("/conflicts/{id}/resolve", post(resolve_conflict))
}
