//! Console sessions: sign-in with the admin token sets a signed, HttpOnly,
//! SameSite=Lax cookie; every form that changes something carries a CSRF
//! token bound to the session. Lax, not Strict: a link from an alert or a
//! chat opens the page it names, signed in (Strict sent no cookie with a
//! navigation from another site, and every such link asked for the token
//! again); a cross-site post still carries no cookie, and no GET changes
//! anything.
//!
//! Sessions are stateless: `{id}.{expires}.{mac}`, the MAC an HMAC-SHA256
//! under a key derived (PBKDF2-HMAC-SHA256, [`KDF_ROUNDS`] rounds) from the
//! admin token, so they survive a restart, work on every replica, and all
//! end when the token is rotated. The rounds are there because a cookie is
//! a test of the token: whoever holds one can try guesses of it offline,
//! each costing that many HMACs.
//! With no admin token (open mode, loopback only) the key is random per
//! process. The CSRF token is an HMAC of the session id under the same key.
//! Signing out ends the session everywhere, not only in the browser: its
//! id is stored until it would have expired, and a cookie kept (copied,
//! stolen) no longer verifies.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use hmac::{Hmac, Mac};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::api::extract::Principal;
use crate::app::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "ferry_console";
/// How long a session lasts.
const LIFETIME_SECONDS: i64 = 12 * 60 * 60;
/// Binds the derived key to this use (the salt of the derivation).
const KDF_SALT: &[u8] = b"ferry console sessions v2";
/// PBKDF2 rounds from the admin token to the session key: about 50 ms
/// once per process here, and as much per guess to whoever holds a cookie.
const KDF_ROUNDS: u32 = 100_000;

/// The key sessions and CSRF tokens are signed with.
pub struct SessionKey([u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey([REDACTED])")
    }
}

/// The session key of `token`, derived once per process (an `App` is
/// built more than once in tests, and in `ferry connector dev`).
fn derived(token: &[u8]) -> [u8; 32] {
    static DERIVED: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<[u8; 32], [u8; 32]>>,
    > = std::sync::LazyLock::new(Default::default);
    let id: [u8; 32] = Sha256::digest(token).into();
    let mut known = DERIVED.lock().unwrap_or_else(|p| p.into_inner());
    *known.entry(id).or_insert_with(|| {
        let mut key = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(token, KDF_SALT, KDF_ROUNDS, &mut key);
        key
    })
}

impl SessionKey {
    /// Derived from the admin token, or random when there is none.
    pub fn new(admin_token: Option<&SecretString>) -> Self {
        let mut key = [0u8; 32];
        match admin_token {
            Some(token) => key = derived(token.expose_secret().as_bytes()),
            None => rand::thread_rng().fill_bytes(&mut key),
        }
        Self(key)
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        for part in parts {
            mac.update(part);
            mac.update(b"\n");
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// A new session's cookie value.
    fn issue(&self, now: i64) -> String {
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let id = hex::encode(id);
        let expires = (now + LIFETIME_SECONDS).to_string();
        let mac = self.mac(&[b"session", id.as_bytes(), expires.as_bytes()]);
        format!("{id}.{expires}.{mac}")
    }

    /// The session id and expiry (unix seconds) of a valid, unexpired
    /// cookie value.
    fn verify(&self, value: &str, now: i64) -> Option<(String, i64)> {
        let mut parts = value.split('.');
        let (id, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let expected = self.mac(&[b"session", id.as_bytes(), expires.as_bytes()]);
        let valid: bool = expected.as_bytes().ct_eq(mac.as_bytes()).into();
        let expires = expires.parse::<i64>().ok()?;
        (valid && expires > now).then(|| (id.to_owned(), expires))
    }

    fn csrf(&self, session_id: &str) -> String {
        self.mac(&[b"csrf", session_id.as_bytes()])
    }
}

/// A signed-in operator.
pub struct Session {
    /// The session's id, and when it expires (unix seconds).
    id: String,
    expires: i64,
    /// The token every form must carry back.
    pub csrf: String,
    /// Who the API handlers see.
    pub principal: Principal,
}

impl Session {
    fn check_csrf(&self, given: Option<&str>) -> bool {
        given.is_some_and(|given| bool::from(given.as_bytes().ct_eq(self.csrf.as_bytes())))
    }

    /// The tag a notice carries in the query string of a redirect to this
    /// session: an HMAC of it under the session's CSRF token, so only a
    /// change this session made shows one, not a link someone sent.
    pub(super) fn notice_tag(&self, notice: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.csrf.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(b"notice\n");
        mac.update(notice.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The query string's `notice`, if its `tag` is this session's.
    pub(super) fn notice<'a>(&self, pairs: &'a [(String, String)]) -> Option<&'a str> {
        let param = |name: &str| pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let notice = param("notice")?;
        let tag = param("tag")?;
        let expected = self.notice_tag(notice);
        bool::from(tag.as_bytes().ct_eq(expected.as_bytes()))
            .then_some(notice.trim())
            .filter(|n| !n.is_empty())
    }
}

fn principal(state: &AppState) -> Principal {
    if state.settings.admin_token.is_some() {
        Principal::Admin
    } else {
        Principal::Open
    }
}

fn cookie_value(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Where sign-in returns to: a console path only (never another host).
pub fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(next)
            if in_console(next)
                // Printable ASCII only: a control character would make
                // the redirect's Location header unsendable (a 500).
                && next.bytes().all(|b| (0x21..=0x7e).contains(&b))
                && !next.contains("//")
                && !next.contains('\\')
                && !next.starts_with("/console/sign-") =>
        {
            next
        }
        _ => "/console",
    }
}

/// Whether `next`'s path is `/console` or under it, once a browser has
/// resolved its dot segments: `/console/../metrics` (or `%2e%2e`) leads
/// out of it.
fn in_console(next: &str) -> bool {
    let path = next.split(['?', '#']).next().unwrap_or_default();
    let dots = |segment: &str| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    };
    (path == "/console" || path.starts_with("/console/")) && !path.split('/').any(dots)
}

impl FromRequestParts<AppState> for Session {
    /// No valid session: to the sign-in page, then back here.
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let now = chrono::Utc::now().timestamp();
        let key = &state.settings.console_key;
        let verified = cookie_value(parts).and_then(|value| key.verify(value, now));
        let live = match verified {
            Some((id, expires)) => match state.store.session_signed_out(&id).await {
                Ok(false) => Some((id, expires)),
                Ok(true) => None,
                Err(error) => {
                    return Err(store_failed(
                        error,
                        "The store did not answer",
                        "ferry could not check this session. Try again in a moment.",
                    ))
                }
            },
            None => None,
        };
        match live {
            Some((id, expires)) => Ok(Self {
                csrf: key.csrf(&id),
                id,
                expires,
                principal: principal(state),
            }),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/console", |p| p.as_str());
                let next = if parts.method == axum::http::Method::GET {
                    safe_next(Some(next))
                } else {
                    "/console"
                };
                let location = format!(
                    "/console/sign-in?{}",
                    serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
                );
                Err(Redirect::to(&location).into_response())
            }
        }
    }
}

/// A form post from a signed-in operator that carried the session's CSRF
/// token: its fields, in order.
pub struct CsrfForm {
    pub session: Session,
    pub fields: Vec<(String, String)>,
}

impl CsrfForm {
    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Refuses a post whose CSRF token is missing or wrong (403).
pub fn csrf_refused() -> Response {
    super::render_problem(
        None,
        StatusCode::FORBIDDEN,
        "csrf_failed",
        "The form was refused",
        "It did not carry this session's CSRF token. Reload the page and try again.",
    )
}

impl FromRequest<AppState> for CsrfForm {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let session = Session::from_request_parts(&mut parts, state).await?;
        let form = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        if !form {
            return Err(csrf_refused());
        }
        let request = Request::from_parts(parts, body);
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                let error = crate::api::extract::unreadable_body(
                    rejection.status(),
                    &rejection,
                    rejection.body_text(),
                    state,
                    ApiError::PayloadTooLarge {
                        limit: state.settings.max_body_bytes,
                    },
                    |text| ApiError::field("body", text),
                );
                super::problem(&session, error)
            })?;
        let fields: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&bytes).map_err(|_| csrf_refused())?;
        let given = fields
            .iter()
            .find(|(n, _)| n == "csrf")
            .map(|(_, v)| v.as_str());
        if !session.check_csrf(given) {
            return Err(csrf_refused());
        }
        Ok(Self { session, fields })
    }
}

/// Whether a multipart form's CSRF field is the session's (uploads).
pub fn multipart_csrf_ok(session: &Session, given: Option<&str>) -> bool {
    session.check_csrf(given)
}

/// Starts a session: the `Set-Cookie` header value. Signed in over
/// HTTPS (as a proxy in front says: `X-Forwarded-Proto` or `Forwarded`),
/// the cookie is `Secure`, so the browser never sends it over plain HTTP
/// (a typed `http://` address to a proxy that also listens on port 80).
pub fn start(state: &AppState, headers: &axum::http::HeaderMap) -> HeaderValue {
    let value = state
        .settings
        .console_key
        .issue(chrono::Utc::now().timestamp());
    cookie(&value, LIFETIME_SECONDS, over_https(headers))
}

/// Whether the proxy in front says the request came over HTTPS (ferry
/// itself serves plain HTTP). A client could claim it falsely only to make
/// its own cookie stricter.
fn over_https(headers: &axum::http::HeaderMap) -> bool {
    let forwarded_proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
    // RFC 7239: the first element is the proxy nearest the client.
    let forwarded = headers
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .into_iter()
        .flat_map(|first| first.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .any(|(key, value)| {
            key.trim().eq_ignore_ascii_case("proto")
                && value.trim().trim_matches('"').eq_ignore_ascii_case("https")
        });
    forwarded_proto || forwarded
}

/// Ends `session` everywhere (its cookie no longer verifies, wherever a
/// copy is kept); returns the `Set-Cookie` header value that clears it in
/// this browser.
pub async fn end(state: &AppState, session: &Session) -> Result<HeaderValue, Response> {
    if let Err(error) = state
        .store
        .sign_out_session(&session.id, session.expires)
        .await
    {
        return Err(store_failed(
            error,
            "Not signed out",
            "ferry could not record the sign-out, and the session stays valid. Try again in a moment.",
        ));
    }
    Ok(cookie("", 0, false))
}

/// The page for a session read or write the store failed: 503
/// `store_busy` or 500 `internal`, as the API answers it; the cause is
/// logged.
fn store_failed(error: crate::store::StoreError, title: &str, detail: &str) -> Response {
    let error = crate::api::error::ApiError::from(error);
    if let crate::api::error::ApiError::Internal(cause) = &error {
        tracing::warn!(error = format!("{cause:#}"), "{title}");
    }
    super::render_problem(None, error.status(), error.code(), title, detail)
}

fn cookie(value: &str, max_age: i64, secure: bool) -> HeaderValue {
    // Path=/console: the cookie never travels with API or webhook calls.
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("ferry_console=; Path=/console; Max-Age=0"))
}

/// Whether `given` is the admin token (constant time); true in open mode.
pub fn token_accepted(state: &AppState, given: &str) -> bool {
    match &state.settings.admin_token {
        None => true,
        Some(expected) => crate::api::extract::token_matches(expected, given),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_verify_until_they_expire_and_only_under_their_key() {
        let key = SessionKey::new(Some(&SecretString::from("token-a")));
        let value = key.issue(1_000);
        let (id, _) = key.verify(&value, 1_001).expect("valid");
        assert_eq!(
            key.verify(&value, 1_000 + LIFETIME_SECONDS),
            None,
            "expired"
        );
        let other = SessionKey::new(Some(&SecretString::from("token-b")));
        assert_eq!(other.verify(&value, 1_001), None, "another token's key");
        let forged = value.replace(&id, &"0".repeat(32));
        assert_eq!(key.verify(&forged, 1_001), None, "another id, same mac");
        assert_ne!(key.csrf(&id), other.csrf(&id));
    }

    /// A cookie is a test of the admin token; each guess must cost the
    /// derivation's rounds, not one HMAC.
    #[test]
    fn the_session_key_is_stretched_from_the_token() {
        const { assert!(KDF_ROUNDS >= 100_000) };
        let key = SessionKey::new(Some(&SecretString::from("a-weak-token-1234")));
        let mut stretched = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"a-weak-token-1234", KDF_SALT, KDF_ROUNDS, &mut stretched);
        assert_eq!(key.0, stretched);
        let mut once = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(b"a-weak-token-1234", KDF_SALT, 1, &mut once);
        assert_ne!(key.0, once);
    }

    #[test]
    fn next_stays_in_the_console() {
        for good in [
            "/console",
            "/console/conflicts?state=open",
            "/console?q=a/../b",
            "/console/customers/cus_1..2",
        ] {
            assert_eq!(safe_next(Some(good)), good);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/api/v1/customers",
            "/console//evil",
            "/console/sign-in",
            "/console\n",
            "/console/conflicts\r\nset-cookie: x=1",
            "/console/\u{7f}",
            "/console/caf\u{e9}",
            "/console/../metrics",
            "/console/%2e%2E/api/v1/customers",
            "/console/./../api",
            "/consoles",
        ] {
            assert_eq!(safe_next(Some(bad)), "/console", "{bad}");
        }
    }
}
