//! Outbound HTTP through the host: a request builder, JSON and form bodies,
//! and the mapping of remote answers onto [`ConnectorError`].
//!
//! The host only reaches hosts the manifest declares and substitutes
//! `{{secret:NAME}}` placeholders (see [`secret`]) in header values and the
//! body, so credentials never enter the component.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bindings::ferry::connector::http as raw;
use crate::errors::HttpError;
use crate::ConnectorError;

/// HTTP method.
pub use raw::Method;

/// The placeholder the host replaces with the value of secret `name`.
///
/// ```
/// assert_eq!(ferry_sdk::http::secret("api_key"), "{{secret:api_key}}");
/// ```
pub fn secret(name: &str) -> String {
    format!("{{{{secret:{name}}}}}")
}

/// An outgoing request under construction.
#[derive(Debug, Clone)]
#[must_use = "a request does nothing until it is sent"]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    timeout_ms: Option<u32>,
}

impl Request {
    /// A request with `method` to the absolute `url`.
    pub fn new(method: Method, url: impl Into<String>) -> Self {
        Self {
            method,
            url: url.into(),
            headers: Vec::new(),
            body: None,
            timeout_ms: None,
        }
    }

    /// A `GET` request.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new(Method::Get, url)
    }

    /// A `POST` request.
    pub fn post(url: impl Into<String>) -> Self {
        Self::new(Method::Post, url)
    }

    /// A `PUT` request.
    pub fn put(url: impl Into<String>) -> Self {
        Self::new(Method::Put, url)
    }

    /// A `PATCH` request.
    pub fn patch(url: impl Into<String>) -> Self {
        Self::new(Method::Patch, url)
    }

    /// A `DELETE` request.
    pub fn delete(url: impl Into<String>) -> Self {
        Self::new(Method::Delete, url)
    }

    /// Adds a header (repeatable), but for `content-type`, which a
    /// request has once: given again, it replaces the one set before (a
    /// [`Request::json`] body sent as `application/merge-patch+json`).
    ///
    /// Header values are the connector's own: the host replaces every
    /// `{{secret:NAME}}` and `{{token:NAME}}` in them, including one that
    /// came from data. Never copy a record's or a remote's value into a
    /// header: a customer whose reference reads `{{secret:api_key}}` would
    /// send the key to the remote. Bodies are guarded (placeholders the
    /// call's data holds go as written); headers are not, so that a
    /// customer named after a secret cannot break the call's own
    /// `Authorization`.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        let name = name.into();
        if name.eq_ignore_ascii_case("content-type") {
            self.headers
                .retain(|(set, _)| !set.eq_ignore_ascii_case("content-type"));
        }
        self.headers.push((name, value.into()));
        self
    }

    /// Sets `content-type` unless the connector set its own: two went on
    /// the wire (`application/vnd.api+json` and the body's), which an API
    /// answers with a 415 or a 400, every change dead-lettered, while a
    /// test reading the first saw the connector's.
    fn content_type_unless_set(self, value: &str) -> Self {
        if header(&self.headers, "content-type").is_some() {
            self
        } else {
            self.header("content-type", value)
        }
    }

    /// `Authorization: Bearer {{secret:NAME}}`: the host puts the token in.
    pub fn bearer_secret(self, secret_name: &str) -> Self {
        let value = format!("Bearer {}", secret(secret_name));
        self.header("authorization", value)
    }

    /// `Authorization: Basic {{secret:NAME}}`, for HTTP Basic auth
    /// (Zendesk, Twilio, Jira): the secret's value is the base64 of
    /// `user:password`, as the header carries it. The host puts secrets
    /// into headers and bodies as they are; encoded inside the guest, the
    /// placeholder itself would be encoded and never replaced (a 401 on
    /// every call). The same holds for a query string or a form body
    /// ([`Request::query`], [`Request::form`] percent-encode `{{`): a
    /// secret goes in a header, or in a body built with [`Request::body`].
    ///
    /// ```
    /// use ferry_sdk::http::Request;
    /// let req = Request::get("https://acme.zendesk.com/api/v2/users").basic_secret("credentials");
    /// # let _ = req;
    /// ```
    pub fn basic_secret(self, secret_name: &str) -> Self {
        let value = format!("Basic {}", secret(secret_name));
        self.header("authorization", value)
    }

    /// `Authorization: Bearer {{token:NAME}}` for a token the host holds
    /// (see [`crate::oauth`]).
    pub fn bearer_token(self, token: &crate::oauth::Token) -> Self {
        self.header("authorization", token.bearer())
    }

    /// Adds query parameters, URL-encoded, to the URL.
    pub fn query<T: Serialize + ?Sized>(mut self, params: &T) -> Result<Self, ConnectorError> {
        let encoded = serde_urlencoded::to_string(params)?;
        if !encoded.is_empty() {
            let sep = if self.url.contains('?') { '&' } else { '?' };
            self.url.push(sep);
            self.url.push_str(&encoded);
        }
        Ok(self)
    }

    /// A JSON body with `content-type: application/json`, unless the
    /// request has a `content-type` of its own (`application/merge-patch+json`).
    pub fn json<T: Serialize + ?Sized>(self, body: &T) -> Result<Self, ConnectorError> {
        let bytes = serde_json::to_vec(body)?;
        Ok(self.content_type_unless_set("application/json").body(bytes))
    }

    /// A form body (`application/x-www-form-urlencoded`, unless the request
    /// has a `content-type` of its own) from `body`, which
    /// serializes to a flat sequence of pairs (a struct, a map or a
    /// `Vec<(K, V)>`). For nested keys such as Stripe's `metadata[k]`, build
    /// the pairs yourself.
    pub fn form<T: Serialize + ?Sized>(self, body: &T) -> Result<Self, ConnectorError> {
        let encoded = serde_urlencoded::to_string(body)?;
        Ok(self
            .content_type_unless_set("application/x-www-form-urlencoded")
            .body(encoded.into_bytes()))
    }

    /// A raw body; set `content-type` yourself.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Total time allowed for this request; the host caps it with its own.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// The request's method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The request's URL, with any query added.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The request's body, if any.
    pub fn body_bytes(&self) -> Option<&[u8]> {
        self.body.as_deref()
    }

    /// Sends the request; a host-side failure keeps its [`HttpError`] case.
    pub fn send_raw(self) -> Result<Response, HttpError> {
        let req = raw::Request {
            method: self.method,
            url: self.url,
            headers: self.headers,
            body: self.body,
            timeout_ms: self.timeout_ms,
        };
        raw::send(&req).map(Response::from)
    }

    /// Sends the request. Network failures and timeouts become
    /// [`ConnectorError::Retryable`]; requests the host refuses become
    /// [`ConnectorError::Permanent`]. Any status is returned as a
    /// [`Response`]: call [`Response::error_for_status`] to map 4xx/5xx.
    pub fn send(self) -> Result<Response, ConnectorError> {
        self.send_raw().map_err(ConnectorError::from)
    }
}

/// A remote's answer, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers with lower-cased names.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl From<raw::Response> for Response {
    fn from(r: raw::Response) -> Self {
        Self {
            status: r.status,
            headers: r.headers,
            body: r.body,
        }
    }
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// `Retry-After` as milliseconds to wait, read as
    /// [`ConnectorError::from_status`](crate::ConnectorError::from_status)
    /// reads it: delta-seconds or an HTTP date (a maintenance window's
    /// end); `None` without one, or for a date already past.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.header("retry-after")
            .and_then(crate::errors::retry_after_ms)
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Parses the body as JSON; a body that does not parse is permanent.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ConnectorError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            ConnectorError::permanent(format!(
                "remote answered HTTP {} with a body that is not the expected JSON: {e}",
                self.status
            ))
        })
    }

    /// `Ok(self)` for 1xx, 2xx and 304; otherwise the error
    /// [`ConnectorError::from_status`] maps the status to, with the start of
    /// the body (for a redirect, its `Location`) as detail.
    pub fn error_for_status(self) -> Result<Self, ConnectorError> {
        self.error_for_status_with(|r| truncate(&r.text(), 500))
    }

    /// Like [`Response::error_for_status`], with the detail extracted by
    /// `detail` (for example the remote's `error.message` field).
    pub fn error_for_status_with(
        self,
        detail: impl FnOnce(&Self) -> String,
    ) -> Result<Self, ConnectorError> {
        if (100..300).contains(&self.status) || self.status == 304 {
            return Ok(self);
        }
        let detail = match self.header("location") {
            Some(location) if (300..400).contains(&self.status) => format!("to {location}"),
            _ => detail(&self),
        };
        match ConnectorError::from_status(self.status, self.header("retry-after"), &detail) {
            Some(err) => Err(err),
            None => Ok(self),
        }
    }
}

/// Percent-encodes an id for use as one URL path segment, so an id from a
/// webhook or an operator can never change the path it is put in. An id
/// of `.` or `..` cannot be one segment: URL parsers resolve it as a path
/// step, `%2E%2E` too, and the host refuses a request whose path holds
/// one (`invalid-request`). An empty id stays empty, and `…/contacts/{}`
/// then names the collection: ferry never hands a connector an empty
/// remote id, but check one your code takes from a payload.
///
/// ```
/// use ferry_sdk::http::path_segment;
/// assert_eq!(path_segment("cus_AZ09"), "cus_AZ09");
/// assert_eq!(path_segment("../x?y"), "..%2Fx%3Fy");
/// assert_eq!(path_segment(".."), "%2E%2E");
/// ```
pub fn path_segment(id: &str) -> String {
    // `.` and `..` would be resolved away as path steps.
    if id.bytes().all(|b| b == b'.') {
        return id.replace('.', "%2E");
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first value of header `name` in `headers` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((idx, _)) => format!("{}…", &s[..idx]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_and_query_are_url_encoded() {
        let req = Request::post("https://x.example/v1/c")
            .query(&[("limit", "2"), ("starting_after", "cus_1")])
            .unwrap()
            .form(&[("name", "Ada Lovelace"), ("metadata[ferry_id]", "a&b")])
            .unwrap();
        assert_eq!(
            req.url(),
            "https://x.example/v1/c?limit=2&starting_after=cus_1"
        );
        assert_eq!(
            req.body_bytes().unwrap(),
            b"name=Ada+Lovelace&metadata%5Bferry_id%5D=a%26b"
        );
    }

    /// One `content-type`, whichever comes first: the connector's own
    /// kept by a JSON body, or the body's replaced by the connector's.
    #[test]
    fn a_request_has_one_content_type() {
        let content_types = |req: &Request| -> Vec<String> {
            req.headers
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case("content-type"))
                .map(|(_, value)| value.clone())
                .collect()
        };
        let before = Request::patch("https://x.example/v1/c/1")
            .header("Content-Type", "application/merge-patch+json")
            .json(&serde_json::json!({"name": "Ada"}))
            .unwrap();
        assert_eq!(content_types(&before), ["application/merge-patch+json"]);
        let after = Request::post("https://x.example/v1/c")
            .json(&serde_json::json!({"name": "Ada"}))
            .unwrap()
            .header("content-type", "application/vnd.api+json");
        assert_eq!(content_types(&after), ["application/vnd.api+json"]);
        let plain = Request::post("https://x.example/v1/c")
            .form(&[("name", "Ada")])
            .unwrap();
        assert_eq!(content_types(&plain), ["application/x-www-form-urlencoded"]);
    }

    /// The placeholder goes into the header as it is, for the host to put
    /// the secret in (encoded in the guest, it never would be).
    #[test]
    fn basic_auth_names_the_secret_in_a_header() {
        let req = Request::get("https://acme.example.com/api").basic_secret("credentials");
        assert_eq!(
            req.headers,
            [(
                "authorization".to_owned(),
                "Basic {{secret:credentials}}".to_owned()
            )]
        );
    }

    #[test]
    fn error_for_status_uses_retry_after() {
        let resp = Response {
            status: 429,
            headers: vec![("retry-after".into(), "7".into())],
            body: b"{}".to_vec(),
        };
        match resp.error_for_status() {
            Err(ConnectorError::RateLimited(r)) => assert_eq!(r.retry_after_ms, Some(7000)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_details_are_truncated() {
        let resp = Response {
            status: 400,
            headers: vec![],
            body: vec![b'x'; 2000],
        };
        let err = resp.error_for_status().unwrap_err();
        assert!(err.message().len() < 600);
    }
}
