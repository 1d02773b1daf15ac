//! The console's forms. Each turns its fields into the request body the
//! `/api/v1` handler takes and calls that handler: the same validation, the
//! same writes, the same wake-ups, the same errors.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use minijinja::context;
use serde_json::{json, Value};

use super::session::{self, CsrfForm, Session};
use super::{done, problem, render};
use crate::api::connectors::WasmBody;
use crate::api::error::ApiError;
use crate::api::extract::{IfMatch, JsonBody, QueryPairs};
use crate::api::{conflicts, connectors, dead_letters, reconciliations};
use crate::app::AppState;
use crate::store::conflicts::Conflict;

fn body(value: &Value) -> JsonBody {
    JsonBody(Bytes::from(value.to_string()))
}

/// The console page of what an API call created (its `Location` under
/// `/api/v1`), or `fallback`.
fn console_page_of(response: &Response, fallback: &str) -> String {
    response
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|l| l.strip_prefix("/api/v1"))
        .map_or_else(|| fallback.to_owned(), |l| format!("/console{l}"))
}

/// The most a sign-in form may send: a token and a console path, not the
/// 1 MiB other routes take (read before anyone is known, on every stream
/// of every connection).
pub const SIGN_IN_MAX_BYTES: usize = 8 * 1024;

/// `POST /console/sign-in`: `token` (unless open), `next`.
pub async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let error = crate::api::extract::unreadable_body(
                rejection.status(),
                &rejection,
                rejection.body_text(),
                &state,
                ApiError::PayloadTooLarge {
                    limit: SIGN_IN_MAX_BYTES,
                },
                |text| ApiError::field("body", text),
            );
            let problem = error.problem();
            return render(
                None,
                error.status(),
                "problem.html",
                minijinja::Value::from_serialize(&problem),
            );
        }
    };
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let next = session::safe_next(field("next")).to_owned();
    if !session::token_accepted(&state, field("token").unwrap_or("").trim()) {
        tracing::warn!("console sign-in refused: not the admin token");
        return render(
            None,
            StatusCode::UNAUTHORIZED,
            "sign_in.html",
            context! { next, open => false, error => "That is not the admin token." },
        );
    }
    let mut response = Redirect::to(&next).into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, session::start(&state, &headers));
    response
}

/// `POST /console/sign-out`: the session ends everywhere.
pub async fn sign_out(State(state): State<AppState>, form: CsrfForm) -> Response {
    let cleared = match session::end(&state, &form.session).await {
        Ok(cleared) => cleared,
        Err(refused) => return refused,
    };
    let mut response = Redirect::to("/console/sign-in").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cleared);
    response
}

/// `POST /console/conflicts/{id}/resolve`: `resolution` (`local`, `remote`
/// or `fields`); for `fields`, `pick.FIELD` (`local`, `remote` or `value`)
/// and `value.FIELD` per conflicting field. A remote pick takes the value
/// the conflict recorded (what the page showed), read here: the page's
/// copy (`remote.FIELD`) comes back as the browser encodes it, with every
/// line break made CRLF, and a value with a line break was written, and
/// pushed over the remote's, changed. A local pick keeps ferry's value as
/// the page showed it, read here (`local.FIELD` is the page's copy): the
/// page carries the customer's version (`local_version`), and a local pick
/// or "Keep all of ferry's" sent after the customer was written again is
/// not resolved; the page is shown again with the new values. (A write in
/// the instant after this read changes the current value from the one
/// sent, which the API refuses as `conflict_stale`; "Keep all" keeps what
/// stands then.)
pub async fn resolve_conflict(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    form: CsrfForm,
) -> Response {
    let resolution = form.get("resolution").unwrap_or("fields");
    let drawn = form
        .get("local_version")
        .and_then(|v| v.parse::<i64>().ok());
    let moved = |customer: Option<&crate::store::Customer>| matches!((customer, drawn), (Some(c), Some(drawn)) if c.version != drawn);
    let changed_since = || {
        done(
            &form.session,
            &format!("/console/conflicts/{id}"),
            "The customer changed since this page was drawn: here are ferry's values now. \
             Nothing was resolved.",
        )
    };
    // A double click's second post, or another operator's: the resolution
    // wrote the customer, so the page's version is behind it, but the page
    // must say the conflict was resolved, not that nothing was.
    let not_open = || {
        done(
            &form.session,
            &format!("/console/conflicts/{id}"),
            "This conflict is no longer open: this click changed nothing.",
        )
    };
    let closed = |conflict: Option<&Conflict>| conflict.is_some_and(|c| c.state != "open");
    if resolution == "local" {
        match customer_of(&state, &id).await {
            Ok((conflict, _)) if closed(conflict.as_ref()) => return not_open(),
            Ok((_, current)) if moved(current.as_ref()) => return changed_since(),
            Ok(_) => {}
            Err(error) => return problem(&form.session, error),
        }
    }
    let mut request = json!({ "resolution": resolution });
    if resolution == "fields" {
        let (recorded, current) = match picked_sides(&state, &id, &form).await {
            Ok(sides) => sides,
            Err(error) => return problem(&form.session, error),
        };
        // The same read as the values a local pick takes.
        if closed(recorded.as_ref()) {
            return not_open();
        }
        if moved(current.as_ref()) {
            return changed_since();
        }
        let mut fields = BTreeMap::new();
        for (name, pick) in form
            .fields
            .iter()
            .filter_map(|(n, v)| Some((n.strip_prefix("pick.")?, v)))
        {
            let remote = recorded.as_ref().and_then(|c| {
                c.fields
                    .0
                    .as_array()?
                    .iter()
                    .find(|f| f["field"] == *name)
                    .map(|f| f["remote"].as_str().map(str::to_owned))
            });
            let value = match (pick.as_str(), &current, remote) {
                ("local", Some(customer), _) => match conflicts::current_value(customer, name) {
                    Ok(value) => value,
                    Err(error) => return problem(&form.session, error),
                },
                ("remote", _, Some(remote)) => remote,
                ("local" | "remote" | "value", _, _) => form
                    .get(&format!("{pick}.{name}"))
                    // An empty or blank value clears the field (null):
                    // kept, a blank metadata value was stored, which every
                    // other way in refuses.
                    .filter(|v| !v.trim().is_empty())
                    .map(str::to_owned),
                _ => continue,
            };
            // Blank, whichever side it came from (a value an older release
            // stored): none, which the resolution takes (a blank metadata
            // value it refuses).
            let value = value.filter(|v| !v.trim().is_empty());
            fields.insert(name.to_owned(), value);
        }
        request["fields"] = json!(fields);
    }
    match conflicts::resolve_conflict(
        State(state),
        form.session.principal,
        Path(id.clone()),
        // The request's own id, so the resolution's log lines and push
        // carry it as they do through the API.
        headers,
        body(&request),
    )
    .await
    {
        Ok(_) => done(
            &form.session,
            &format!("/console/conflicts/{id}"),
            "Conflict resolved; the merged record is being pushed.",
        ),
        // The same, resolved between the read above and this write: the
        // page says how it was resolved, not an error over a resolution made.
        Err(ApiError::ConflictNotOpen) => not_open(),
        Err(error) => problem(&form.session, error),
    }
}

/// Conflict `id` as recorded, when a pick needs it, and its customer as
/// it is now, when a local pick does; `None` when nothing is picked so or
/// the conflict is not found (the API then answers for it).
async fn picked_sides(
    state: &AppState,
    id: &str,
    form: &CsrfForm,
) -> Result<(Option<Conflict>, Option<crate::store::Customer>), ApiError> {
    let picks = |side: &str| {
        form.fields
            .iter()
            .any(|(name, pick)| name.starts_with("pick.") && pick == side)
    };
    let (local, remote) = (picks("local"), picks("remote"));
    match (local, remote) {
        (false, false) => Ok((None, None)),
        (false, true) => Ok((conflict_of(state, id).await?, None)),
        (true, _) => customer_of(state, id).await,
    }
}

/// Conflict `id` as recorded; `None` when there is none (the API then
/// answers for it).
async fn conflict_of(state: &AppState, id: &str) -> Result<Option<Conflict>, ApiError> {
    if !crate::api::extract::is_id(id, "cf_") {
        return Ok(None);
    }
    Ok(state.store.conflict(id).await?)
}

/// Conflict `id` as recorded and its customer as it is now (`None` when
/// either is not there).
async fn customer_of(
    state: &AppState,
    id: &str,
) -> Result<(Option<Conflict>, Option<crate::store::Customer>), ApiError> {
    let Some(conflict) = conflict_of(state, id).await? else {
        return Ok((None, None));
    };
    let Some(customer_id) = crate::store::CustomerId::parse(&conflict.customer_id) else {
        return Ok((Some(conflict), None));
    };
    match state.store.get_customer(&customer_id).await {
        Ok(customer) => Ok((Some(conflict), Some(customer))),
        Err(crate::store::StoreError::CustomerNotFound) => Ok((Some(conflict), None)),
        Err(error) => Err(error.into()),
    }
}

/// The page a form came from (its `back` field: the list as filtered and
/// paged), when it is `page` or one of its views; else `page`.
fn back<'a>(form: &'a CsrfForm, page: &'a str) -> &'a str {
    form.get("back")
        .filter(|back| session::safe_next(Some(back)) == *back)
        .filter(|back| *back == page || back.strip_prefix(page).is_some_and(|q| q.starts_with('?')))
        .unwrap_or(page)
}

/// `POST /console/dead-letters/{id}/replay`.
pub async fn replay_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
    form: CsrfForm,
) -> Response {
    match dead_letters::replay_dead_letter(State(state), form.session.principal, Path(id)).await {
        Ok(axum::Json(result)) => done(
            &form.session,
            back(&form, "/console/dead-letters"),
            &format!("Replayed {} dead letter(s).", result.replayed),
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// `POST /console/dead-letters/replay`: `connector`, and `direction` when
/// the list was filtered to one.
pub async fn replay_dead_letters(State(state): State<AppState>, form: CsrfForm) -> Response {
    let mut request = json!({ "connector": form.get("connector").unwrap_or("") });
    if let Some(direction) = form.get("direction").filter(|d| !d.is_empty()) {
        request["direction"] = json!(direction);
    }
    match dead_letters::replay_dead_letters(State(state), form.session.principal, body(&request))
        .await
    {
        Ok(axum::Json(result)) => done(
            &form.session,
            back(&form, "/console/dead-letters"),
            &format!("Replayed {} dead letter(s).", result.replayed),
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// Why an upload's body could not be read, as the API's upload says it:
/// over the limit, stalled past `body_read_timeout`, or malformed.
fn upload_failed(state: &AppState, error: &MultipartError) -> ApiError {
    crate::api::extract::unreadable_body(
        error.status(),
        error,
        error.body_text(),
        state,
        ApiError::ComponentTooLarge {
            limit: state.settings.max_component_bytes,
        },
        |text| ApiError::field("component", text),
    )
}

/// `POST /console/connectors` (multipart): `csrf`, `component` (the
/// `.wasm`), `activate` (checkbox).
pub async fn upload_connector(
    State(state): State<AppState>,
    session: Session,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    // Not a multipart form: refused as a form without its token is (a
    // page, as `CsrfForm` refuses another content type).
    let Ok(mut multipart) = multipart else {
        return session::csrf_refused();
    };
    let (mut csrf, mut component, mut activate, mut expected) = (None, None, false, None);
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or("").to_owned();
                let bytes = match field.bytes().await {
                    Ok(bytes) => bytes,
                    Err(error) => return problem(&session, upload_failed(&state, &error)),
                };
                match name.as_str() {
                    "csrf" => csrf = Some(String::from_utf8_lossy(&bytes).into_owned()),
                    "component" => component = Some(bytes),
                    "activate" => activate = true,
                    "name" => {
                        let name = String::from_utf8_lossy(&bytes).trim().to_owned();
                        expected = Some(name).filter(|n| !n.is_empty());
                    }
                    _ => {}
                }
            }
            Ok(None) => break,
            Err(error) => return problem(&session, upload_failed(&state, &error)),
        }
    }
    if !session::multipart_csrf_ok(&session, csrf.as_deref()) {
        return session::csrf_refused();
    }
    let Some(component) = component.filter(|c| !c.is_empty()) else {
        return problem(
            &session,
            ApiError::field("component", "choose a .wasm file"),
        );
    };
    let mut query = vec![("activate".to_owned(), activate.to_string())];
    if let Some(name) = expected {
        query.push(("name".to_owned(), name));
    }
    let query = QueryPairs(query);
    match connectors::upload_connector(State(state), session.principal, query, WasmBody(component))
        .await
    {
        Ok(response) => {
            let location = console_page_of(&response, "/console/connectors");
            let notice = if response.status() == StatusCode::CREATED {
                "Version uploaded."
            } else {
                "These bytes were already stored; nothing changed."
            };
            done(&session, &location, notice)
        }
        Err(error) => problem(&session, error),
    }
}

/// `POST /console/connectors/{name}/activate`: `version`.
pub async fn activate(
    State(state): State<AppState>,
    Path(name): Path<String>,
    form: CsrfForm,
) -> Response {
    let request = json!({ "version": form.get("version").unwrap_or("") });
    match connectors::activate(
        State(state),
        form.session.principal,
        Path(name.clone()),
        IfMatch::none(),
        body(&request),
    )
    .await
    {
        Ok((_, axum::Json(summary))) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            &format!(
                "Version {} is active.",
                summary.active_version.unwrap_or_default()
            ),
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// The switch's condition: the revision its page was drawn at
/// (`revision`). A stale page's post (another operator's switch since, a
/// double click whose first post is done) changes nothing: enabled again
/// with its box ticked, it started a second backfill of the whole remote
/// catalog once the first had completed.
fn drawn_at(form: &CsrfForm) -> IfMatch {
    form.get("revision")
        .and_then(|revision| revision.parse().ok())
        .map_or_else(IfMatch::none, IfMatch::revision)
}

/// The notice of a switch posted from a page drawn before a change.
const CHANGED_SINCE: &str = "The connector changed since this page was drawn (switched or \
    configured elsewhere): here it is as it is now. This click changed nothing.";

/// `POST /console/connectors/{name}/enable`: `backfill` (checkbox) and
/// `revision` (see [`drawn_at`]).
pub async fn enable(
    State(state): State<AppState>,
    Path(name): Path<String>,
    form: CsrfForm,
) -> Response {
    let backfill = form.get("backfill").is_some();
    let query = QueryPairs(vec![("backfill".to_owned(), backfill.to_string())]);
    match connectors::enable(
        State(state),
        form.session.principal,
        Path(name.clone()),
        query,
        drawn_at(&form),
    )
    .await
    {
        Ok(_) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            "Enabled.",
        ),
        // Refused before the switch: a double click's second post finds
        // the first one's backfill going.
        Err(ApiError::ReconciliationRunning(run)) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            &format!("A run of {name} is going ({run}): this click changed nothing."),
        ),
        Err(ApiError::PreconditionFailed { .. }) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            CHANGED_SINCE,
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// `POST /console/connectors/{name}/disable`: `revision` (see [`drawn_at`]).
pub async fn disable(
    State(state): State<AppState>,
    Path(name): Path<String>,
    form: CsrfForm,
) -> Response {
    match connectors::disable(
        State(state),
        form.session.principal,
        Path(name.clone()),
        drawn_at(&form),
    )
    .await
    {
        Ok(_) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            "Disabled.",
        ),
        Err(ApiError::PreconditionFailed { .. }) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            CHANGED_SINCE,
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// `POST /console/connectors/{name}/settings`: `version_was` (the active
/// version the page drew the form for), `enabled` (checkbox) and
/// `enabled_was` (how the page drew it),
/// `setting.NAME` per setting and `setting_was.NAME` (how the page drew
/// it), `secret.NAME` per declared secret (empty: keep the value in
/// effect), `clear.NAME` (checkbox: remove it).
pub async fn put_settings(
    State(state): State<AppState>,
    Path(name): Path<String>,
    form: CsrfForm,
) -> Response {
    // A setting the operator left as drawn keeps the value in effect now:
    // the save replaces the whole set, and sent as drawn it undid a change
    // made since the page was drawn (another operator's, the API's). Now,
    // as the store has it: this replica's view may be a poll (a second)
    // behind another's save, whose new secret the save then dropped.
    if let Err(error) = state.registry.refresh().await {
        return problem(&form.session, error.into());
    }
    // A form drawn for another version than the one active now (activated
    // or rolled back since): it lacks the fields only the active one
    // declares, and the save replaces the whole set, so their values (a
    // sealed secret's too) were dropped. Drawn again, nothing saved. The
    // store's active version, as the page drew it: a replica that could
    // not load it runs another, and refused every form drawn elsewhere.
    let active = match state.store.stored_active_version(&name).await {
        Ok(active) => active,
        Err(error) => return problem(&form.session, error.into()),
    };
    if form
        .get("version_was")
        .is_some_and(|drawn| Some(drawn) != active.as_deref())
    {
        return done(
            &form.session,
            &format!("/console/connectors/{name}"),
            "Another version is active since this page was drawn: here is its form. \
             Nothing was saved.",
        );
    }
    let in_effect = state
        .registry
        .entry(&name)
        .map(|e| e.effective.config.settings.clone())
        .unwrap_or_default();
    let mut settings = BTreeMap::new();
    let mut secrets = serde_json::Map::new();
    for (field, value) in &form.fields {
        if let Some(setting) = field.strip_prefix("setting.") {
            // Browsers strip line breaks from an input's value, and send
            // the hidden copy's as CRLF: a value drawn with them (a
            // pretty-printed JSON setting) was taken for an edit.
            let unbroken = |text: &str| -> String {
                text.trim()
                    .chars()
                    .filter(|c| !matches!(c, '\r' | '\n'))
                    .collect()
            };
            let drawn = form.get(&format!("setting_was.{setting}"));
            let value = if drawn.is_some_and(|drawn| unbroken(drawn) == unbroken(value)) {
                in_effect.get(setting).map_or("", String::as_str)
            } else {
                value.trim()
            };
            if !value.is_empty() {
                settings.insert(setting.to_owned(), value.to_owned());
            }
        } else if let Some(secret) = field.strip_prefix("secret.") {
            if form.get(&format!("clear.{secret}")).is_some() {
                continue;
            }
            // Only secrets that have a value now are kept; an empty field of
            // one without a value leaves it unset.
            let has_value = state
                .registry
                .entry(&name)
                .is_some_and(|e| e.effective.secret_names.iter().any(|s| s == secret));
            if !value.is_empty() {
                secrets.insert(secret.to_owned(), json!(value));
            } else if has_value {
                secrets.insert(secret.to_owned(), Value::Null);
            }
        }
    }
    // The switch as the page drew it: unless the operator ticked or
    // unticked the box, the switch stays as it is (`null`): someone may
    // have disabled the connector since the page was drawn, and one never
    // switched on stays so (sent as off, it was paused, and took changes
    // for a later enable to push as creates).
    let ticked = form.get("enabled").is_some();
    let enabled = match form.get("enabled_was") {
        Some(drawn) if (drawn == "true") == ticked => None,
        _ => Some(ticked),
    };
    let request = json!({
        "enabled": enabled,
        "settings": settings,
        "secrets": secrets,
    });
    match connectors::put_settings(
        State(state),
        form.session.principal,
        Path(name.clone()),
        // The console keeps what it did not draw as in effect now (above),
        // field by field: no condition on the whole.
        IfMatch::none(),
        body(&request),
    )
    .await
    {
        Ok(_) => done(
            &form.session,
            &format!("/console/connectors/{name}"),
            "Settings saved.",
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// `POST /console/reconciliations`: `connector`, `mode`, `repair`.
pub async fn start_reconciliation(State(state): State<AppState>, form: CsrfForm) -> Response {
    let mut request = json!({ "connector": form.get("connector").unwrap_or("") });
    for name in ["mode", "repair"] {
        if let Some(value) = form.get(name).filter(|v| !v.is_empty()) {
            request[name] = json!(value);
        }
    }
    match reconciliations::start_reconciliation(
        State(state),
        form.session.principal,
        body(&request),
    )
    .await
    {
        Ok(response) => {
            let location = console_page_of(&response, "/console/reconciliations");
            done(&form.session, &location, "Run started.")
        }
        Err(ApiError::ReconciliationRunning(run)) => done(
            &form.session,
            &format!("/console/reconciliations/{run}"),
            "A run of this connector is already going (this one): no other was started.",
        ),
        Err(error) => problem(&form.session, error),
    }
}

/// `POST /console/reconciliations/{id}/mismatches/{mismatch_id}/resolve`:
/// `action`.
pub async fn resolve_mismatch(
    State(state): State<AppState>,
    Path((id, mismatch_id)): Path<(String, String)>,
    form: CsrfForm,
) -> Response {
    let request = json!({ "action": form.get("action").unwrap_or("") });
    let page = format!("/console/reconciliations/{id}");
    let back_to = back(&form, &page).to_owned();
    match reconciliations::resolve_mismatch(
        State(state),
        form.session.principal,
        Path((id.clone(), mismatch_id)),
        body(&request),
    )
    .await
    {
        Ok(_) => done(&form.session, &back_to, "Finding resolved."),
        Err(ApiError::MismatchNotOpen) => done(
            &form.session,
            &back_to,
            "This finding is no longer open: this click changed nothing.",
        ),
        Err(error) => problem(&form.session, error),
    }
}
