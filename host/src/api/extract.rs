//! Extractors that turn every malformed request into an [`ApiError`] (never
//! axum's plain-text rejections): JSON bodies, query strings, `If-Match`,
//! `Idempotency-Key`, the request id, and the admin bearer token.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::{ApiError, FieldError};
use crate::app::AppState;

/// Header carrying the request id (correlation id).
pub const REQUEST_ID: &str = "x-request-id";

/// A JSON request body, read whole (within the body limit) but not yet
/// parsed: idempotency fingerprints the exact bytes.
pub struct JsonBody(pub Bytes);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_json(request, state, &["application/json"], "application/json")
            .await
            .map(Self)
    }
}

/// A JSON merge patch (RFC 7396) body: `application/merge-patch+json`, or
/// plain `application/json`. Only a PATCH takes it: a replace sent as a
/// merge patch would clear every field the client left out, as told.
pub struct MergePatchBody(pub Bytes);

impl FromRequest<AppState> for MergePatchBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_json(
            request,
            state,
            &["application/json", "application/merge-patch+json"],
            "application/json or application/merge-patch+json",
        )
        .await
        .map(Self)
    }
}

/// The body of `request`, whose `Content-Type` must be one of `types`
/// (`expected` says which, when it is not).
async fn read_json(
    request: Request,
    state: &AppState,
    types: &[&str],
    expected: &'static str,
) -> Result<Bytes, ApiError> {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| {
            let essence = essence.trim().to_ascii_lowercase();
            types.contains(&essence.as_str())
        });
    if !json {
        return Err(ApiError::UnsupportedMediaType { expected });
    }
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            unreadable_body(
                rejection.status(),
                &rejection,
                rejection.body_text(),
                state,
                ApiError::PayloadTooLarge {
                    limit: state.settings.max_body_bytes,
                },
                ApiError::MalformedJson,
            )
        })
}

/// Why a body could not be read, as every reader answers it: over the
/// limit (`too_large`, `status` 413), stalled past `body_read_timeout`
/// (408), or else `otherwise` with the reader's text.
pub fn unreadable_body<E: std::error::Error + 'static>(
    status: StatusCode,
    error: &E,
    text: String,
    state: &AppState,
    too_large: ApiError,
    otherwise: impl FnOnce(String) -> ApiError,
) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        too_large
    } else {
        body_stalled(error, state).unwrap_or_else(|| otherwise(text))
    }
}

/// `408 request_timeout` if reading a body failed because it stalled for
/// `body_read_timeout` (the client's pace, not its bytes).
pub fn body_stalled(
    error: &(dyn std::error::Error + 'static),
    state: &AppState,
) -> Option<ApiError> {
    caused_by::<tower_http::timeout::TimeoutError>(error).then(|| ApiError::RequestTimeout {
        seconds: state.settings.body_read_timeout.as_secs(),
    })
}

/// Whether `error` or one of its sources is an `E`.
pub fn caused_by<E: std::error::Error + 'static>(
    error: &(dyn std::error::Error + 'static),
) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if current.is::<E>() {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Parses a JSON object, naming the offending field on a data error: syntax
/// errors are `malformed_json` (400), well-formed JSON of the wrong shape is
/// `validation_failed` (422). Every body ferry accepts is an object; serde
/// alone would also accept an array for a struct (positionally), which no
/// client means. Objects are parsed once, straight into `T` (the hot path);
/// anything else is parsed as a plain value only to tell a syntax error from
/// a non-object.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        if !value.is_object() {
            return Err(ApiError::field("body", "must be a JSON object"));
        }
        return from_value(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(shape_error)?;
    // Trailing bytes after the document make it malformed.
    deserializer
        .end()
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    // A key given twice: serde takes the last (a map, a merge patch) or
    // refuses it (a struct's field), where a proxy's rule or an audit log
    // reads the first. `{"email": "a@…", "email": "b@…"}` was 422 for a
    // create and stored `b@…` for a patch. Refused alike, as a query
    // parameter given twice is.
    if let Some(path) = repeated_key(bytes) {
        return Err(ApiError::field(path, "given more than once"));
    }
    Ok(value)
}

/// The first key an object in the JSON document `bytes` holds twice, as a
/// path (`metadata.plan`), if any; `None` for a document that does not
/// parse (its own parse says why).
fn repeated_key(bytes: &[u8]) -> Option<String> {
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let seed = UniqueKeys {
        path: String::new(),
        found: &mut found,
    };
    serde::de::DeserializeSeed::deserialize(seed, &mut deserializer).ok()?;
    found
}

/// Walks a JSON value, noting in `found` the first key an object repeats.
struct UniqueKeys<'a> {
    path: String,
    found: &'a mut Option<String>,
}

impl<'de> serde::de::DeserializeSeed<'de> for UniqueKeys<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let found = self.found;
        while seq
            .next_element_seed(UniqueKeys {
                path: self.path.clone(),
                found: &mut *found,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let found = self.found;
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            if !keys.insert(key) && found.is_none() {
                *found = Some(path.clone());
            }
            map.next_value_seed(UniqueKeys {
                path,
                found: &mut *found,
            })?;
        }
        Ok(())
    }
}

/// Converts a `serde_json::Value` into `T` with the same error mapping as
/// [`parse_json`].
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(shape_error)
}

fn shape_error(error: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => {
            let message = strip_position(&inner.to_string());
            // serde quotes the value it refused (`invalid type: string
            // "sk_live_…"`): under `secrets` that was a secret, sent back
            // to the caller and into any log of the response.
            let message = if path == "secrets" || path.starts_with("secrets.") {
                unquoted(&message)
            } else {
                message
            };
            // Both quote a name the client gave, as long as the body: cut,
            // or a megabyte's key came back three times over.
            let field = shown(&field_name(&path, &message), MAX_SHOWN_FIELD);
            ApiError::Validation(vec![FieldError::new(
                field,
                shown(&message, MAX_SHOWN_MESSAGE),
            )])
        }
        _ => ApiError::MalformedJson(inner.to_string()),
    }
}

/// A shape error's `message` without the value it quotes: what was
/// expected only.
fn unquoted(message: &str) -> String {
    const NOT_SHOWN: &str = "invalid value (not shown: it may be a secret)";
    // The last: a refused secret may hold the words itself.
    match message.rsplit_once(", expected ") {
        Some((_, expected)) => format!("{NOT_SHOWN}, expected {expected}"),
        None => NOT_SHOWN.to_owned(),
    }
}

/// The longest field path a shape error names, in characters.
const MAX_SHOWN_FIELD: usize = 128;

/// The longest shape error message, in characters (the fields it lists
/// as expected fit).
const MAX_SHOWN_MESSAGE: usize = 512;

/// `text` cut to `max` characters, marked `…` where it was cut.
fn shown(text: &str, max: usize) -> String {
    let mut chars = text.chars();
    let mut cut: String = chars.by_ref().take(max).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

/// serde_path_to_error's path already ends in an unknown field's name, but a
/// missing field is only named in the message.
fn field_name(path: &str, message: &str) -> String {
    let base = if path == "." { "" } else { path };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match missing {
        Some(name) if base.is_empty() => name.to_owned(),
        Some(name) => format!("{base}.{name}"),
        None if base.is_empty() => "body".to_owned(),
        None => base.to_owned(),
    }
}

fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message.to_owned(),
    }
}

/// The query string as name/value pairs (percent-decoded), each name
/// once (422 otherwise).
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| ApiError::field("query", e.to_string()))?;
        // Each parameter once: the handlers read its last value, where a
        // proxy's rule or an audit log may read the first
        // (`?force=false&force=true` deleted by force).
        for (i, (name, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(ApiError::field(name.as_str(), "given more than once"));
            }
        }
        Ok(Self(pairs))
    }
}

/// `If-Match`: the versions the client's change is based on, if it sent
/// any. RFC 9110: `*`, or a list of entity tags (in one header or several)
/// of which one must be the current version, compared strongly.
pub struct IfMatch(Option<Vec<i64>>);

impl IfMatch {
    /// No condition.
    pub fn none() -> Self {
        Self(None)
    }

    /// The condition a form carries: the revision its page was drawn at.
    pub fn revision(revision: i64) -> Self {
        Self(Some(vec![revision]))
    }

    /// Whether the client sent a condition (`*` is none).
    pub fn given(&self) -> bool {
        self.0.is_some()
    }

    /// The revision a write must find, if the client named any: one tag is
    /// that revision; a list holding `current` is `current`; any other
    /// list matches nothing (0, never a revision).
    pub fn against(&self, current: i64) -> Option<i64> {
        match self.0.as_deref() {
            None => None,
            Some([one]) => Some(*one),
            Some(tags) if tags.contains(&current) => Some(current),
            Some(_) => Some(0),
        }
    }

    /// The version a write must find, if any. One tag is that version; a
    /// list is resolved against the customer's current version (the write
    /// still checks it atomically, so a change in between is a 412).
    pub async fn expected(
        &self,
        store: &crate::store::Store,
        id: &crate::store::CustomerId,
    ) -> Result<Option<i64>, ApiError> {
        match self.0.as_deref() {
            None => Ok(None),
            Some([version]) => Ok(Some(*version)),
            Some(_) => match store.get_customer(id).await {
                Ok(current) => Ok(self.against(current.version)),
                // No such customer: the write says so.
                Err(crate::store::StoreError::CustomerNotFound) => Ok(Some(0)),
                Err(error) => Err(error.into()),
            },
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let values: Vec<&HeaderValue> = parts.headers.get_all(header::IF_MATCH).iter().collect();
        if values.is_empty() {
            return Ok(Self(None));
        }
        // `*` alone: any current version, no condition. Anywhere else it
        // is no tag ferry issued.
        if let [only] = values.as_slice() {
            if only.to_str().is_ok_and(|v| v.trim() == "*") {
                return Ok(Self(None));
            }
        }
        let mut versions = Vec::new();
        for value in values {
            match value.to_str() {
                Ok(text) => versions.extend(
                    text.split(',')
                        .map(str::trim)
                        .filter(|tag| !tag.is_empty())
                        .map(version_of),
                ),
                // Not text: a tag ferry never issued.
                Err(_) => versions.push(0),
            }
        }
        // A condition sent empty still conditions the write: it matches
        // nothing.
        if versions.is_empty() {
            versions.push(0);
        }
        Ok(Self(Some(versions)))
    }
}

/// The version an entity tag names. A tag we never issued cannot match;
/// version 0 never exists, so the write fails with 412 like any other
/// stale tag. Tags compare byte for byte (strong comparison): `"+2"` or
/// `"02"` is not `"2"`, and a weak tag (`W/"2"`) never matches.
fn version_of(tag: &str) -> i64 {
    tag.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .filter(|t| t.bytes().all(|b| b.is_ascii_digit()) && !t.starts_with('0'))
        .and_then(|t| t.parse::<i64>().ok())
        .filter(|v| *v >= 1)
        .unwrap_or(0)
}

/// `Idempotency-Key`, if the client sent one.
pub struct IdempotencyKey(pub Option<String>);

/// Longest accepted idempotency key (Stripe's limit).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let Some(value) = values.next() else {
            return Ok(Self(None));
        };
        // Two keys (a proxy that added its own): which one the client
        // retries under is unknown, so neither is taken.
        if values.next().is_some() {
            return Err(ApiError::field(
                "Idempotency-Key",
                "sent more than once: send one key",
            ));
        }
        let key = value.to_str().unwrap_or("");
        let printable = key.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || !printable {
            return Err(ApiError::field(
                "Idempotency-Key",
                format!("must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"),
            ));
        }
        Ok(Self(Some(key.to_owned())))
    }
}

/// The request id set by the request-id layer; the correlation id stored on
/// outbox events.
pub struct CorrelationId(pub String);

/// Longest client-supplied request id we keep.
const MAX_REQUEST_ID: usize = 128;

impl<S: Send + Sync> FromRequestParts<S> for CorrelationId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(request_id(&parts.headers)))
    }
}

/// The request id of a request, or a fresh one if missing or unusable.
/// The router replaces an unusable one before anything reads it
/// ([`keep_usable_request_id`]), so every reader of one request sees the
/// same id.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| usable_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// 1 to [`MAX_REQUEST_ID`] characters of `A-Z a-z 0-9 . _ : / + = @ -`:
/// what trace and request ids are made of, and nothing that could end or
/// fake a field of a log line (spaces, quotes, backslashes, newlines).
fn usable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:/+=@-".contains(&b))
}

/// Drops a client's `X-Request-Id` that [`request_id`] would not keep, so
/// that the id made in its place is one, shared by the log span, what the
/// request stores and the answer.
pub fn keep_usable_request_id<B>(mut request: axum::http::Request<B>) -> axum::http::Request<B> {
    let unusable = request
        .headers()
        .get(REQUEST_ID)
        .is_some_and(|v| !v.to_str().is_ok_and(usable_request_id));
    if unusable {
        request.headers_mut().remove(REQUEST_ID);
    }
    request
}

/// Who is calling. Idempotency keys are scoped by principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Principal {
    /// Holder of the admin token.
    Admin,
    /// No token is configured: the open embedded mode (loopback only).
    Open,
}

impl Principal {
    /// The idempotency scope of this principal.
    pub fn scope(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Open => "open",
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = &state.settings.admin_token else {
            return Ok(Self::Open);
        };
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(ApiError::Unauthorized)?;
        if token_matches(expected, given) {
            Ok(Self::Admin)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// Whether `given` is the admin token. Hashing first makes the comparison
/// constant-time in the token length too.
pub fn token_matches(expected: &secrecy::SecretString, given: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.expose_secret().as_bytes());
    given.ct_eq(&expected).into()
}

/// A text parameter as the store can hold it: no NUL (PostgreSQL refuses
/// it in text), at most 256 bytes.
pub fn text_param(field: &str, value: String) -> Result<String, ApiError> {
    if value.contains('\0') || value.len() > 256 {
        return Err(ApiError::field(
            field,
            "must be at most 256 bytes, without NUL",
        ));
    }
    Ok(value)
}

/// Whether `id` looks like an id ferry issues with `prefix`
/// (`prefix` + 32 lowercase hex digits).
pub fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The `limit` query parameter: an integer from 1 to `max`.
pub fn page_limit(value: &str, max: u32) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|l| (1..=max).contains(l))
        .ok_or_else(|| ApiError::field("limit", format!("must be an integer from 1 to {max}")))
}

/// A page fetched with one row more than `limit`: keeps `limit` rows and
/// returns the cursor of the next page (the last kept row's), if any.
pub fn next_cursor<T>(
    data: &mut Vec<T>,
    limit: u32,
    cursor: impl Fn(&T) -> String,
) -> Option<String> {
    let limit = limit as usize;
    if data.len() <= limit {
        return None;
    }
    data.truncate(limit);
    data.last().map(cursor)
}
