//! `oauth`: OAuth 2.0 client-credentials tokens that the host obtains, caches
//! per connector and substitutes for `{{token:NAME}}` in header values.
//!
//! The token request goes through the same egress policy as `http.send`
//! (declared hosts only, the connector's request budget, the call's
//! deadline), with the client id and secret taken from the connector's
//! secrets host-side. The token itself never enters the component: a call
//! that obtained token `NAME` may use its placeholder, and any echo of it in
//! a response is redacted.
//!
//! One [`TokenCache`] lives with each loaded connector, so every call of the
//! connector shares its tokens. A cached token is reused until it expires
//! (`expires_in`, less a margin), the grant's secrets change, or the
//! connector reports it refused with `invalidate`. Concurrent calls wait on
//! one token request instead of each sending their own, and a refused
//! request's error is the answer of every call for a few seconds (the
//! endpoint's `Retry-After` when it sets one): each call waiting behind a
//! failing request sent its own, a backlog as many as the request budget
//! allowed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::http::Dispatcher;
use super::policy::{self, PolicyError};
use super::state::CallState;
use super::transport::{WireError, WireRequest};
use super::wit::latest::ferry::connector::oauth::{ClientCredentials, Host, TokenInfo};
use super::wit::latest::{ConnectorError, RateLimit};

/// A token is treated as expired this long before the server says it is, so
/// a request started just before the expiry does not carry a dead token.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// The longest a token is kept, whatever its `expires_in` says.
const MAX_TOKEN_TTL_SECS: u64 = 24 * 60 * 60;

/// Token response fields that are credentials and stay in the host.
const SECRET_FIELDS: &[&str] = &["access_token", "refresh_token", "id_token"];

/// The tokens of one loaded connector, by name.
#[derive(Default)]
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
    generations: AtomicU64,
    /// The newest token values obtained, by name, oldest first (at most
    /// [`MAX_ISSUED`]): what every call's responses are scrubbed of.
    issued: Mutex<Vec<(String, SecretString)>>,
    /// Counts the changes to `issued`: a call's redactor made before one is
    /// made again.
    issued_version: AtomicU64,
}

/// The longest token answer read, in bytes. Real ones are a few hundred
/// bytes to a few KiB (a JWT with its claims); an endpoint of the
/// connector's choosing that answered megabytes had the host keep them,
/// scrub them string by string and put them into every request header
/// naming the token, outside the guest's memory cap and its deadline.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 * 1024;

/// The longest access token taken, in bytes.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// How many token values the cache keeps for redaction: two for each name
/// it can hold (a replaced token may still be valid at the remote).
const MAX_ISSUED: usize = 2 * MAX_TOKENS;

/// How many named tokens one loaded connector may keep. The cache lives as
/// long as the connector, across calls: without a bound a guest naming a
/// new token on every call made the host keep each name for ever.
const MAX_TOKENS: usize = 16;

/// The longest token name, in bytes.
const MAX_TOKEN_NAME: usize = 64;

impl TokenCache {
    /// `name`'s slot, made if new and the cache has room.
    fn slot(&self, name: &str) -> Result<Arc<tokio::sync::Mutex<Slot>>, ConnectorError> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(name) {
            return Ok(slot.clone());
        }
        if slots.len() >= MAX_TOKENS {
            return Err(ConnectorError::Permanent(format!(
                "a connector keeps at most {MAX_TOKENS} named tokens; `{name}` would be one more"
            )));
        }
        Ok(slots.entry(name.to_owned()).or_default().clone())
    }

    /// `name`'s slot, if it has one (nothing is made to invalidate).
    fn existing(&self, name: &str) -> Option<Arc<tokio::sync::Mutex<Slot>>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(name).cloned()
    }

    /// Notes a token obtained under `name`, to scrub it from responses:
    /// the newest two of each name (a name refreshed again and again does
    /// not push the others' out).
    fn remember(&self, name: &str, value: &SecretString) {
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        if issued.iter().filter(|(n, _)| n == name).count() >= 2 {
            if let Some(oldest) = issued.iter().position(|(n, _)| n == name) {
                issued.remove(oldest);
            }
        }
        if issued.len() >= MAX_ISSUED {
            issued.remove(0);
        }
        issued.push((name.to_owned(), value.clone()));
        self.issued_version.fetch_add(1, Ordering::Release);
    }

    /// Rises whenever [`TokenCache::issued`] changes.
    pub(crate) fn issued_version(&self) -> u64 {
        self.issued_version.load(Ordering::Acquire)
    }

    /// The token values obtained, by name: see [`TokenCache::remember`].
    pub(crate) fn issued(&self) -> Vec<(String, SecretString)> {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// One named token: the one obtained, or why the last request for it
/// failed.
#[derive(Default)]
struct Slot {
    token: Option<Cached>,
    failed: Option<Failed>,
}

/// A refused token request, answered again until `until`.
struct Failed {
    error: ConnectorError,
    /// The grant it was refused for: a rotated secret asks again at once.
    grant: [u8; 32],
    until: Instant,
}

/// How long a refused token request's error stands, unless the endpoint
/// says (`Retry-After`, up to [`MAX_FAILED_HOLD`]).
const FAILED_HOLD: Duration = Duration::from_secs(5);
/// The longest a refused token request's error stands.
const MAX_FAILED_HOLD: Duration = Duration::from_secs(60);

impl Failed {
    /// The error again, a rate limit's wait counted from now.
    fn answer(&self) -> ConnectorError {
        match &self.error {
            ConnectorError::RateLimited(RateLimit {
                retry_after_ms: Some(_),
                message,
            }) => ConnectorError::RateLimited(RateLimit {
                retry_after_ms: Some(
                    u64::try_from(
                        self.until
                            .saturating_duration_since(Instant::now())
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                ),
                message: message.clone(),
            }),
            other => other.clone(),
        }
    }

    fn new(error: &ConnectorError, grant: [u8; 32]) -> Self {
        let hold = match error {
            ConnectorError::RateLimited(RateLimit {
                retry_after_ms: Some(ms),
                ..
            }) => Duration::from_millis(*ms).min(MAX_FAILED_HOLD),
            _ => FAILED_HOLD,
        };
        Self {
            error: error.clone(),
            grant,
            until: Instant::now() + hold,
        }
    }
}

struct Cached {
    value: SecretString,
    generation: u64,
    /// Non-secret response fields, as JSON object text.
    fields: String,
    expires_at: Option<(Instant, i64)>,
    /// How long before `expires_at` it is taken for expired:
    /// [`EXPIRY_MARGIN`], or half the token's life when that is shorter (a
    /// token of 30 s or less was never fresh, and fetched on every call).
    margin: Duration,
    /// Hash of the grant and its secret values: a rotated secret or another
    /// endpoint means another token.
    grant: [u8; 32],
}

impl Cached {
    fn is_fresh(&self, grant: &[u8; 32]) -> bool {
        &self.grant == grant
            && self
                .expires_at
                .is_none_or(|(at, _)| Instant::now() + self.margin < at)
    }

    fn info(&self) -> TokenInfo {
        TokenInfo {
            generation: self.generation,
            fields: self.fields.clone(),
            expires_at_ms: self.expires_at.map(|(_, ms)| ms),
        }
    }
}

impl CallState {
    /// The value of a secret the manifest declares, for a host-side request.
    fn grant_secret(&self, name: &str) -> Result<&SecretString, ConnectorError> {
        if !self
            .connector
            .manifest
            .secrets
            .iter()
            .any(|s| s.name == name)
        {
            return Err(ConnectorError::Permanent(format!(
                "secret `{name}` is not declared in the manifest"
            )));
        }
        self.secrets().get(name).ok_or_else(|| {
            ConnectorError::Unauthorized(format!("secret `{name}` has no value configured"))
        })
    }

    /// The token request for `grant`, allowed by the egress policy, with
    /// the client's credentials filled in host-side.
    fn token_request(&self, grant: &ClientCredentials) -> Result<WireRequest, ConnectorError> {
        let url = self.check_url(&grant.token_url).map_err(|e| {
            let (PolicyError::Denied(m) | PolicyError::Invalid(m) | PolicyError::Busy(m)) = e;
            ConnectorError::Permanent(format!("token endpoint refused: {m}"))
        })?;
        let client_id = self.grant_secret(&grant.client_id_secret)?;
        let client_secret = self.grant_secret(&grant.client_secret_secret)?;
        let mut form = vec![
            ("grant_type", "client_credentials"),
            ("client_id", client_id.expose_secret()),
            ("client_secret", client_secret.expose_secret()),
        ];
        if let Some(scope) = &grant.scope {
            form.push(("scope", scope));
        }
        let body = serde_urlencoded::to_string(&form)
            .map_err(|e| ConnectorError::Permanent(format!("token request: {e}")))?;
        Ok(WireRequest {
            method: http::Method::POST,
            url,
            headers: vec![
                (
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
                ("accept".into(), "application/json".into()),
            ],
            body: Some(body.into_bytes()),
            timeout: self.request_timeout(None),
            max_response_bytes: MAX_TOKEN_RESPONSE_BYTES
                .min(self.runtime.config.max_response_bytes),
        })
    }
}

/// Sends a token request and reads the answer.
async fn request_token(
    wire: WireRequest,
    dispatcher: Dispatcher,
    name: &str,
    secrets: &BTreeMap<String, SecretString>,
    generation: u64,
    fingerprint: [u8; 32],
) -> Result<Cached, TokenFailure> {
    // Not the endpoint's answer: a timeout may be this call's deadline
    // (what an earlier request left of it), which another call has whole.
    let response = dispatcher.send(wire).await.map_err(|e| match e {
        // An answer, and the one the endpoint will give again: held as a
        // refusal is.
        WireError::TooLarge(_) => TokenFailure::Refused(ConnectorError::Permanent(format!(
            "token endpoint answered more than {MAX_TOKEN_RESPONSE_BYTES} bytes"
        ))),
        WireError::Denied(m) => {
            TokenFailure::Unanswered(ConnectorError::Permanent(format!("token endpoint: {m}")))
        }
        other => TokenFailure::Unanswered(ConnectorError::Retryable(format!(
            "token endpoint: {other}"
        ))),
    })?;
    if !(200..300).contains(&response.status) {
        let mut body = response.body;
        policy::redact_secrets(&mut body, secrets);
        let error = token_error(response.status, &body, &response.headers);
        return Err(TokenFailure::Refused(redacted(error, secrets)));
    }
    parse_token(
        &response.body,
        &Issued { name, secrets },
        generation,
        fingerprint,
    )
    .map_err(TokenFailure::Refused)
}

/// Why no token was obtained.
enum TokenFailure {
    /// The endpoint answered with a refusal, or with no token: the answer
    /// every call for the same grant gets for a while ([`Failed`]).
    Refused(ConnectorError),
    /// It did not answer (a timeout, a connection refused): this call's.
    Unanswered(ConnectorError),
}

/// `error` with the secrets redacted from its message as decoded: the
/// body's redaction matches the bytes as sent, and an endpoint that
/// escapes characters in JSON (`\u00e4` for `ä`, as Python does) echoed
/// a client secret the raw match missed, into the guest's error, dead
/// letters and logs.
fn redacted(error: ConnectorError, secrets: &BTreeMap<String, SecretString>) -> ConnectorError {
    super::with_text(error, |message| {
        let mut bytes = message.into_bytes();
        policy::redact_secrets(&mut bytes, secrets);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Maps a refused token request onto the connector's error cases.
fn token_error(status: u16, body: &[u8], headers: &[(String, String)]) -> ConnectorError {
    let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
    let text = |k: &str| {
        parsed
            .as_ref()
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (code, description) = (text("error"), text("error_description"));
    // Cut: a refusal is held and handed to every call for a while.
    let message = crate::cut(
        format!("token endpoint answered HTTP {status}: {code} {description}"),
        crate::MAX_ERROR_BYTES,
    );
    match (status, code.as_str()) {
        (429, _) => ConnectorError::RateLimited(RateLimit {
            retry_after_ms: headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .map(|s| s.saturating_mul(1000)),
            message,
        }),
        (500.., _) | (408, _) => ConnectorError::Retryable(message),
        (_, "invalid_client" | "invalid_grant" | "unauthorized_client" | "access_denied")
        | (401 | 403, _) => ConnectorError::Unauthorized(message),
        _ => ConnectorError::Permanent(message),
    }
}

/// What a token answer is read against: the token's name and the
/// connector's secret values, which the fields handed to the guest must not
/// carry.
struct Issued<'a> {
    name: &'a str,
    secrets: &'a BTreeMap<String, SecretString>,
}

fn parse_token(
    body: &[u8],
    issued: &Issued<'_>,
    generation: u64,
    grant: [u8; 32],
) -> Result<Cached, ConnectorError> {
    // Where, not what: serde's message quotes the value it met (a bare
    // string answer, an echoed client secret in it).
    let mut fields: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        ConnectorError::Permanent(format!(
            "token response is not a JSON object (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let value = match fields.get("access_token") {
        Some(Value::String(token)) if token.len() > MAX_TOKEN_BYTES => {
            return Err(ConnectorError::Permanent(format!(
                "token response's access_token is longer than {MAX_TOKEN_BYTES} bytes"
            )))
        }
        Some(Value::String(token)) if !token.is_empty() => SecretString::from(token.clone()),
        _ => {
            return Err(ConnectorError::Permanent(
                "token response has no access_token".into(),
            ))
        }
    };
    for name in SECRET_FIELDS {
        fields.remove(*name);
    }
    // The remote's number, trusted only up to a day: a token that lives
    // longer, or one sent without an expiry (Salesforce's), is fetched
    // again daily, and an absurd one (2^64 seconds) cannot overflow the
    // clock.
    let secs = fields
        .get("expires_in")
        .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
        .unwrap_or(MAX_TOKEN_TTL_SECS);
    let ttl = Duration::from_secs(secs.min(MAX_TOKEN_TTL_SECS));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2))
        .unwrap_or(0);
    let wall = now_ms + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
    let expires_at = Some((Instant::now() + ttl, wall));
    // What is left goes to the guest: an endpoint that echoes the client's
    // credentials (or the token under another name) must not hand them over.
    let token = BTreeMap::from([(issued.name.to_owned(), value.clone())]);
    // Made once for every string of the answer.
    let redactor = policy::Redactor::default()
        .secrets(issued.secrets)
        .tokens(&token);
    let scrub = |text: &mut String| {
        let mut bytes = std::mem::take(text).into_bytes();
        redactor.redact(&mut bytes);
        *text = String::from_utf8_lossy(&bytes).into_owned();
    };
    let fields = scrubbed(Value::Object(fields), &scrub);
    Ok(Cached {
        value,
        generation,
        fields: fields.to_string(),
        expires_at,
        margin: EXPIRY_MARGIN.min(ttl / 2),
        grant,
    })
}

/// `value` with every string in it, object keys included, passed through
/// `scrub`.
fn scrubbed(value: Value, scrub: &impl Fn(&mut String)) -> Value {
    match value {
        Value::String(mut text) => {
            scrub(&mut text);
            Value::String(text)
        }
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| scrubbed(v, scrub)).collect())
        }
        Value::Object(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(mut key, v)| {
                    scrub(&mut key);
                    (key, scrubbed(v, scrub))
                })
                .collect(),
        ),
        other => other,
    }
}

fn check_name(name: &str) -> Result<(), ConnectorError> {
    if name.len() <= MAX_TOKEN_NAME && policy::is_placeholder_name(name.as_bytes()) {
        Ok(())
    } else {
        Err(ConnectorError::Permanent(format!(
            "token name `{}` must match [a-z0-9_]+ and be at most {MAX_TOKEN_NAME} bytes",
            name.chars().take(MAX_TOKEN_NAME).collect::<String>()
        )))
    }
}

impl Host for CallState {
    async fn client_credentials_token(
        &mut self,
        name: String,
        grant: ClientCredentials,
    ) -> Result<TokenInfo, ConnectorError> {
        check_name(&name)?;
        let fingerprint = {
            let mut hash = Sha256::new();
            for part in [
                grant.token_url.as_str(),
                self.grant_secret(&grant.client_id_secret)?.expose_secret(),
                self.grant_secret(&grant.client_secret_secret)?
                    .expose_secret(),
                grant.scope.as_deref().unwrap_or_default(),
            ] {
                hash.update((part.len() as u64).to_le_bytes());
                hash.update(part.as_bytes());
            }
            <[u8; 32]>::from(hash.finalize())
        };
        let slot = self.connector.tokens.slot(&name)?;
        // Holding the slot while the request runs makes concurrent calls wait
        // for this token instead of each asking for their own.
        let mut cached = slot.lock().await;
        if let Some(token) = cached.token.as_ref().filter(|t| t.is_fresh(&fingerprint)) {
            self.tokens.insert(name, token.value.clone());
            self.redactor = None;
            return Ok(token.info());
        }
        if let Some(failed) = cached
            .failed
            .as_ref()
            .filter(|f| f.grant == fingerprint && Instant::now() < f.until)
        {
            return Err(failed.answer());
        }
        let generation = self.connector.tokens.next_generation();
        let wire = self.token_request(&grant)?;
        // Paced like every request of the connector: waited for, and a
        // refusal is ferry's own pacing, not the remote's limit (a 429
        // would pause every push of the connector).
        if let Err(wait) = self.wait_for_request_budget().await {
            self.throttled = Some(wait);
            return Err(ConnectorError::Retryable(
                "ferry's request rate for this connector is used up; the token request waits"
                    .into(),
            ));
        }
        let secrets = self.secrets().clone();
        let requested = request_token(
            wire,
            self.dispatcher(),
            &name,
            &secrets,
            generation,
            fingerprint,
        )
        .await;
        let token = match requested {
            Ok(token) => token,
            Err(TokenFailure::Refused(error)) => {
                cached.failed = Some(Failed::new(&error, fingerprint));
                return Err(error);
            }
            Err(TokenFailure::Unanswered(error)) => return Err(error),
        };
        tracing::info!(connector = %self.connector.name, token = %name, generation,
            "obtained an OAuth token");
        let info = token.info();
        self.connector.tokens.remember(&name, &token.value);
        self.tokens.insert(name, token.value.clone());
        self.redactor = None;
        cached.token = Some(token);
        cached.failed = None;
        Ok(info)
    }

    async fn invalidate(&mut self, name: String, generation: u64) {
        if let Some(slot) = self.connector.tokens.existing(&name) {
            let mut cached = slot.lock().await;
            if cached
                .token
                .as_ref()
                .is_some_and(|t| t.generation == generation)
            {
                tracing::info!(connector = %self.connector.name, token = %name, generation,
                    "OAuth token refused by the remote; dropping it");
                cached.token = None;
            }
        }
        self.tokens.remove(&name);
        self.redactor = None;
    }
}

/// The call-local view: token name -> value, for placeholder substitution.
pub(crate) type CallTokens = BTreeMap<String, SecretString>;

#[cfg(test)]
mod tests {
    use super::*;

    fn issued() -> Issued<'static> {
        static NONE: BTreeMap<String, SecretString> = BTreeMap::new();
        Issued {
            name: "api",
            secrets: &NONE,
        }
    }

    #[test]
    fn token_response_keeps_its_value_in_the_host() {
        let body =
            br#"{"access_token":"00Dx!AQ.secret","instance_url":"https://acme.my.salesforce.com",
            "token_type":"Bearer","issued_at":"1700000000000","refresh_token":"r","id_token":"i"}"#;
        let cached = parse_token(body, &issued(), 7, [0; 32]).unwrap();
        assert_eq!(cached.value.expose_secret(), "00Dx!AQ.secret");
        let info = cached.info();
        assert_eq!(info.generation, 7);
        // No expires_in (Salesforce's): kept for a day at most, or until
        // invalidated.
        assert_within_a_day(info.expires_at_ms);
        let fields: Map<String, Value> = serde_json::from_str(&info.fields).unwrap();
        assert_eq!(fields["instance_url"], "https://acme.my.salesforce.com");
        for secret in SECRET_FIELDS {
            assert!(!fields.contains_key(*secret), "{secret} leaked");
        }
        assert!(cached.is_fresh(&[0; 32]));
        assert!(!cached.is_fresh(&[1; 32]), "another grant is another token");
    }

    /// An endpoint that echoes the client's credentials, or the token under
    /// another field's name, handed them to the guest with the fields.
    #[test]
    fn echoed_credentials_are_not_handed_to_the_guest() {
        let secrets = BTreeMap::from([
            ("client_id".to_owned(), SecretString::from("3MVG9client")),
            (
                "client_secret".to_owned(),
                SecretString::from("s3cr3t\"quoted"),
            ),
        ]);
        let body = br#"{"access_token":"00Dx!AQ.token","client_id":"3MVG9client",
            "echo":{"form":["s3cr3t\"quoted"],"3MVG9client":"key"},
            "signature":"Bearer 00Dx!AQ.token","instance_url":"https://acme.my.salesforce.com"}"#;
        let issued = Issued {
            name: "sf",
            secrets: &secrets,
        };
        let cached = parse_token(body, &issued, 1, [0; 32]).unwrap();
        let info = cached.info();
        for leaked in ["3MVG9client", "s3cr3t", "00Dx!AQ"] {
            assert!(!info.fields.contains(leaked), "{leaked}: {}", info.fields);
        }
        let fields: Value = serde_json::from_str(&info.fields).unwrap();
        assert_eq!(fields["client_id"], "{{secret:client_id}}");
        assert_eq!(fields["echo"]["form"][0], "{{secret:client_secret}}");
        assert_eq!(fields["echo"]["{{secret:client_id}}"], "key");
        assert_eq!(fields["signature"], "Bearer {{token:sf}}");
        assert_eq!(fields["instance_url"], "https://acme.my.salesforce.com");
        assert_eq!(cached.value.expose_secret(), "00Dx!AQ.token");
    }

    /// A guest naming a new token on every call (or invalidating names it
    /// never used) made the host keep each name for the connector's life.
    #[test]
    fn a_connector_keeps_a_bounded_set_of_token_names() {
        let cache = TokenCache::default();
        for i in 0..MAX_TOKENS {
            assert!(cache.slot(&format!("t{i}")).is_ok());
        }
        assert!(cache.slot("t0").is_ok(), "a known name");
        assert!(matches!(
            cache.slot("one_more"),
            Err(ConnectorError::Permanent(_))
        ));
        assert!(cache.existing("never_used").is_none());
        let slots = cache.slots.lock().unwrap().len();
        assert_eq!(slots, MAX_TOKENS, "invalidating makes no slot");
        assert!(check_name(&"a".repeat(MAX_TOKEN_NAME)).is_ok());
        assert!(check_name(&"a".repeat(MAX_TOKEN_NAME + 1)).is_err());
    }

    /// A token answer that is not an object is refused without quoting it:
    /// serde's message carried a bare string's text (an echoed client
    /// secret) into the guest's error, logs and dead letters.
    #[test]
    fn a_token_answer_that_is_no_object_is_not_quoted() {
        let Err(error) = parse_token(br#""cs_echoed_client_secret""#, &issued(), 1, [0; 32]) else {
            panic!("a bare string is no token answer");
        };
        assert!(!format!("{error:?}").contains("cs_echoed"), "{error:?}");
    }

    /// Every token the connector obtained is kept for redaction, the
    /// newest two per name, whichever call obtained them: one name
    /// refreshed again and again keeps the others'.
    #[test]
    fn the_cache_keeps_the_tokens_to_scrub() {
        let cache = TokenCache::default();
        cache.remember("other", &SecretString::from("other-token"));
        for n in 0..(MAX_ISSUED + 3) {
            cache.remember("api", &SecretString::from(format!("token-{n:04}")));
        }
        let issued = cache.issued();
        assert_eq!(issued.len(), 3);
        let mut body = b"echo token-0034, token-0033, token-0032 and other-token".to_vec();
        policy::Redactor::default()
            .tokens(issued.iter().map(|(n, v)| (n, v)))
            .redact(&mut body);
        assert_eq!(
            body,
            b"echo {{token:api}}, {{token:api}}, token-0032 and {{token:other}}"
        );
    }

    /// A token is taken for expired 30 s before its end, or half its life
    /// before when that is shorter: a token of 30 s or less was never
    /// fresh, and every call asked for another.
    #[test]
    fn expiry_counts_with_a_margin() {
        let short = parse_token(
            br#"{"access_token":"t","expires_in":10}"#,
            &issued(),
            1,
            [0; 32],
        )
        .unwrap();
        assert!(short.is_fresh(&[0; 32]), "for half its life");
        let spent = parse_token(
            br#"{"access_token":"t","expires_in":0}"#,
            &issued(),
            1,
            [0; 32],
        )
        .unwrap();
        assert!(!spent.is_fresh(&[0; 32]));
        let later = parse_token(
            br#"{"access_token":"t","expires_in":"3600"}"#,
            &issued(),
            1,
            [0; 32],
        )
        .unwrap();
        assert!(later.is_fresh(&[0; 32]));
        assert!(later.info().expires_at_ms.is_some());
    }

    #[test]
    fn an_endless_expiry_is_capped_at_a_day() {
        let endless = parse_token(
            br#"{"access_token":"t","expires_in":18446744073709551615}"#,
            &issued(),
            1,
            [0; 32],
        )
        .unwrap();
        assert!(endless.is_fresh(&[0; 32]));
        assert_within_a_day(endless.info().expires_at_ms);
    }

    /// A token's expiry is set, later than now and a day away at most.
    fn assert_within_a_day(expires_at_ms: Option<i64>) {
        let day_ms = i64::try_from(MAX_TOKEN_TTL_SECS * 1000).unwrap();
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap();
        let at = expires_at_ms.expect("an expiry, a day at most");
        assert!(at > now_ms && at <= now_ms + day_ms, "{at}");
    }

    #[test]
    fn a_refusal_echoing_an_escaped_secret_does_not_carry_it() {
        let secrets = BTreeMap::from([(
            "client_secret".to_owned(),
            SecretString::from("p\u{e4}ssw\u{f6}rd-123".to_owned()),
        )]);
        // Python's encoder writes what is not ASCII as `\uXXXX`.
        let mut body =
            br#"{"error":"invalid_client","error_description":"bad secret p\u00e4ssw\u00f6rd-123"}"#
                .to_vec();
        policy::redact_secrets(&mut body, &secrets);
        let error = redacted(token_error(401, &body, &[]), &secrets);
        let ConnectorError::Unauthorized(message) = error else {
            panic!("{error:?}");
        };
        assert!(!message.contains("p\u{e4}ssw\u{f6}rd-123"), "{message}");
        assert!(message.contains("{{secret:client_secret}}"), "{message}");
    }

    /// An endpoint of the connector's choosing answering a token of
    /// megabytes had the host keep it, scrub it and put it into every
    /// header naming it: refused, and held as a refusal is.
    #[test]
    fn an_oversized_token_is_refused() {
        let body = format!(
            r#"{{"access_token":"{}","token_type":"Bearer"}}"#,
            "t".repeat(MAX_TOKEN_BYTES + 1)
        );
        let refused = parse_token(body.as_bytes(), &issued(), 1, [0; 32]);
        assert!(
            matches!(&refused, Err(ConnectorError::Permanent(m)) if m.contains("longer than")),
            "{:?}",
            refused.err()
        );
        let body = format!(
            r#"{{"access_token":"{}","token_type":"Bearer"}}"#,
            "t".repeat(MAX_TOKEN_BYTES)
        );
        assert!(parse_token(body.as_bytes(), &issued(), 1, [0; 32]).is_ok());
        // A refusal's description is cut: it is handed to every call
        // while it is held.
        let long = format!(
            r#"{{"error":"invalid_client","error_description":"{}"}}"#,
            "d".repeat(100_000)
        );
        let refused = token_error(401, long.as_bytes(), &[]);
        let ConnectorError::Unauthorized(message) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            message.len() <= crate::MAX_ERROR_BYTES + 4,
            "{}",
            message.len()
        );
    }

    /// The token request reads at most [`MAX_TOKEN_RESPONSE_BYTES`], and an
    /// answer past it is a refusal (held), not a passing failure every
    /// call asks again after.
    #[tokio::test]
    async fn an_oversized_token_answer_is_a_refusal() {
        struct Huge;
        impl crate::transport::HttpTransport for Huge {
            fn send(
                &self,
                req: crate::transport::WireRequest,
            ) -> futures::future::BoxFuture<
                'static,
                Result<crate::transport::WireResponse, WireError>,
            > {
                Box::pin(async move {
                    // As the real transport does, past the request's limit.
                    assert!(req.max_response_bytes <= MAX_TOKEN_RESPONSE_BYTES);
                    Err(WireError::TooLarge(format!(
                        "more than {}",
                        req.max_response_bytes
                    )))
                })
            }
        }
        let wire = crate::transport::WireRequest {
            method: http::Method::POST,
            url: url::Url::parse("https://login.example.com/token").unwrap(),
            headers: Vec::new(),
            body: None,
            timeout: Duration::from_secs(1),
            max_response_bytes: MAX_TOKEN_RESPONSE_BYTES,
        };
        let dispatcher = Dispatcher::new(Arc::new(Huge), "c");
        let failure = request_token(wire, dispatcher, "api", &BTreeMap::new(), 1, [0; 32]).await;
        assert!(
            matches!(
                &failure,
                Err(TokenFailure::Refused(ConnectorError::Permanent(m))) if m.contains("more than")
            ),
            "refused and held"
        );
    }

    #[test]
    fn refusals_map_onto_connector_errors() {
        let refused = token_error(
            400,
            br#"{"error":"invalid_client","error_description":"bad"}"#,
            &[],
        );
        assert!(
            matches!(refused, ConnectorError::Unauthorized(_)),
            "{refused:?}"
        );
        let grant = token_error(400, br#"{"error":"unsupported_grant_type"}"#, &[]);
        assert!(matches!(grant, ConnectorError::Permanent(_)), "{grant:?}");
        let limited = token_error(429, b"", &[("Retry-After".into(), "3".into())]);
        assert!(
            matches!(&limited, ConnectorError::RateLimited(r) if r.retry_after_ms == Some(3000)),
            "{limited:?}"
        );
        assert!(matches!(
            token_error(503, b"<html>", &[]),
            ConnectorError::Retryable(_)
        ));
        assert!(matches!(
            parse_token(b"{}", &issued(), 1, [0; 32]),
            Err(ConnectorError::Permanent(_))
        ));
    }
}
