//! Record and replay: run the connector against a real endpoint once
//! ([`Http::Record`](super::Http::Record)), save the exchanges, and replay
//! them offline in `cargo test` ([`Http::Replay`](super::Http::Replay)).
//!
//! A saved [`Tape`] holds no secret: every secret value the kit was given is
//! replaced by its `{{secret:NAME}}` placeholder, and every OAuth token the
//! recorded session obtained (`access_token`, `refresh_token` and
//! `id_token` in a JSON answer) by `{{token}}`, wherever it appears: URLs,
//! headers and bodies, both ways, as is, form- or percent-encoded (a token
//! request's client secret) and JSON-escaped. A tape that would still hold
//! one is not written. Replay matches a request to the first
//! unused exchange with the same method, URL and body (after the same
//! scrubbing; a JSON body in any key order), so a replayed run may use
//! different secret values than the recording, and a connector that now
//! sends another body is told so.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
#[cfg(feature = "testkit-record")]
use ferry_runtime::ReqwestTransport;
use ferry_runtime::{HttpTransport, WireError, WireRequest, WireResponse};
use serde::{Deserialize, Serialize};

use super::TestKitError;

/// The file format of a recording (JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tape {
    /// Format version, 1.
    pub version: u32,
    /// The exchanges, in the order they happened.
    pub exchanges: Vec<Exchange>,
}

/// One request and its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Exchange {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The absolute URL.
    pub url: String,
    /// Request headers.
    pub request_headers: Vec<(String, String)>,
    /// Request body (text, or `base64:` followed by base64).
    pub request_body: Option<String>,
    /// Response status, or none if the transport failed.
    pub status: Option<u16>,
    /// Response headers.
    pub response_headers: Vec<(String, String)>,
    /// Response body (text, or `base64:` followed by base64).
    pub response_body: String,
    /// The transport's error instead of a response (`connect: …`).
    pub error: Option<String>,
}

impl Tape {
    /// Reads a tape file.
    pub fn load(path: &Path) -> Result<Self, TestKitError> {
        let text = std::fs::read_to_string(path).map_err(|source| TestKitError::Io {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text)
            .map_err(|e| TestKitError::Tape(format!("{}: {e}", path.display())))
    }
}

fn body_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.starts_with("base64:") => text.to_owned(),
        _ => format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

fn body_bytes(text: &str) -> Vec<u8> {
    match text.strip_prefix("base64:") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_default(),
        None => text.as_bytes().to_vec(),
    }
}

/// Replaces every value in `values` (longest first) by its placeholder.
fn scrub(text: &str, values: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (value, placeholder) in values {
        if !value.is_empty() {
            out = out.replace(value.as_str(), placeholder);
        }
    }
    out
}

/// A recorded body (text, or `base64:` for bytes that are not UTF-8) with
/// every value replaced: a binary body is scrubbed as bytes, then encoded
/// again.
fn scrub_body(text: &str, values: &[(String, String)]) -> String {
    if !text.starts_with("base64:") {
        return scrub(text, values);
    }
    let mut bytes = body_bytes(text);
    for (value, placeholder) in values {
        bytes = replace_bytes(&bytes, value.as_bytes(), placeholder.as_bytes());
    }
    body_text(&bytes)
}

fn replace_bytes(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut rest = haystack;
    while let Some(at) = rest.windows(needle.len()).position(|w| w == needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Whether `tape` still holds one of `values`, in its text or inside a
/// binary body.
fn still_holds(tape: &Tape, text: &str, values: &[(String, String)]) -> bool {
    let bodies: Vec<Vec<u8>> = tape
        .exchanges
        .iter()
        .flat_map(|e| [e.request_body.as_deref(), Some(e.response_body.as_str())])
        .flatten()
        .filter(|b| b.starts_with("base64:"))
        .map(body_bytes)
        .collect();
    values.iter().any(|(value, _)| {
        !value.is_empty()
            && (text.contains(value.as_str())
                || bodies
                    .iter()
                    .any(|b| b.windows(value.len()).any(|w| w == value.as_bytes())))
    })
}

/// `recorded` with every form of every secret value and token replaced by
/// its placeholder; also the (value, placeholder) pairs it used.
fn scrubbed(recorded: &[Exchange], secrets: &[(String, String)]) -> (Tape, Vec<(String, String)>) {
    let mut values: Vec<(String, String)> = Vec::new();
    for (name, value) in secrets {
        for form in encodings(value) {
            values.push((form, format!("{{{{secret:{name}}}}}")));
        }
    }
    for exchange in recorded {
        for token in tokens_in(&body_bytes(&exchange.response_body)) {
            for form in encodings(&token) {
                values.push((form, "{{token}}".to_owned()));
            }
        }
    }
    // A longer value may contain a shorter one: replace it first.
    values.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
    values.dedup();
    let scrub_pairs = |pairs: &[(String, String)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.clone(), scrub(v, &values)))
            .collect()
    };
    let exchanges = recorded
        .iter()
        .map(|e| Exchange {
            method: e.method.clone(),
            url: scrub(&e.url, &values),
            request_headers: scrub_pairs(&e.request_headers),
            request_body: e.request_body.as_deref().map(|b| scrub_body(b, &values)),
            status: e.status,
            response_headers: scrub_pairs(&e.response_headers),
            response_body: scrub_body(&e.response_body, &values),
            error: e.error.as_deref().map(|m| scrub(m, &values)),
        })
        .collect();
    let tape = Tape {
        version: 1,
        exchanges,
    };
    (tape, values)
}

/// The forms a value takes on the wire and in the tape: as is, form- and
/// percent-encoded (a token request's body sends the client secret
/// form-encoded: `~` becomes `%7E`, `+` `%2B`), JSON-escaped, and in
/// base64.
fn encodings(value: &str) -> Vec<String> {
    // The forms ferry redacts a secret in (percent and form encoding, the
    // JSON escapes of PHP, Python, Go and .NET, base64): a token a .NET
    // server wrote as `ab\u002Bcd` stayed in the tape.
    let mut forms: Vec<String> = ferry_runtime::encoded_forms(value.as_bytes())
        .into_iter()
        .filter_map(|form| String::from_utf8(form).ok())
        .collect();
    if let Ok(form) = serde_urlencoded::to_string([("v", value)]) {
        forms.push(form["v=".len()..].to_owned());
        // The same with spaces as `%20` (a URL's query or path).
        forms.push(form["v=".len()..].replace('+', "%20"));
    }
    forms.retain(|form| !form.is_empty());
    forms.sort();
    forms.dedup();
    forms
}

/// Token fields of an OAuth token answer; their values are scrubbed
/// everywhere.
const TOKEN_FIELDS: [&str; 3] = ["access_token", "refresh_token", "id_token"];

fn tokens_in(body: &[u8]) -> Vec<String> {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) else {
        return Vec::new();
    };
    TOKEN_FIELDS
        .iter()
        .filter_map(|f| map.get(*f).and_then(|v| v.as_str()).map(str::to_owned))
        .collect()
}

enum Mode {
    // Only built with the `testkit-record` feature.
    #[cfg_attr(not(feature = "testkit-record"), allow(dead_code))]
    Record {
        path: PathBuf,
        real: Arc<dyn HttpTransport>,
        recorded: Arc<Mutex<Vec<Exchange>>>,
    },
    Replay {
        exchanges: Vec<Exchange>,
        used: Mutex<Vec<bool>>,
    },
}

/// The transport of a recording or replaying kit.
pub(super) struct TapeTransport {
    mode: Mode,
}

impl TapeTransport {
    #[cfg(feature = "testkit-record")]
    pub(super) fn record(path: PathBuf, connect_timeout: Duration) -> Result<Self, TestKitError> {
        let real: Arc<dyn HttpTransport> = Arc::new(
            ReqwestTransport::new(connect_timeout, true)
                .map_err(|e| TestKitError::Runtime(e.to_string()))?,
        );
        Ok(Self {
            mode: Mode::Record {
                path,
                real,
                recorded: Arc::default(),
            },
        })
    }

    #[cfg(not(feature = "testkit-record"))]
    pub(super) fn record(_: PathBuf, _: Duration) -> Result<Self, TestKitError> {
        Err(TestKitError::Tape(
            "recording needs ferry-sdk's `testkit-record` feature (it adds an HTTP client)".into(),
        ))
    }

    pub(super) fn replay(path: &Path) -> Result<Self, TestKitError> {
        let tape = Tape::load(path)?;
        let used = Mutex::new(vec![false; tape.exchanges.len()]);
        Ok(Self {
            mode: Mode::Replay {
                exchanges: tape.exchanges,
                used,
            },
        })
    }

    /// The recorded exchanges a replay has not used yet (`METHOD URL`), in
    /// the recording's order; none when recording.
    pub(super) fn unreplayed(&self) -> Vec<String> {
        let Mode::Replay { exchanges, used } = &self.mode else {
            return Vec::new();
        };
        let used = used.lock().unwrap_or_else(|e| e.into_inner());
        exchanges
            .iter()
            .zip(used.iter())
            .filter(|(_, used)| !**used)
            .map(|(e, _)| format!("{} {}", e.method, e.url))
            .collect()
    }

    /// Writes the recording, scrubbed of `secrets` ((name, value): every
    /// value a secret had while recording) and of every token.
    pub(super) fn save(&self, secrets: &[(String, String)]) -> Result<PathBuf, TestKitError> {
        let Mode::Record { path, recorded, .. } = &self.mode else {
            return Err(TestKitError::Tape(
                "this kit replays; it records nothing".into(),
            ));
        };
        let recorded = recorded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (tape, values) = scrubbed(&recorded, secrets);
        let text =
            serde_json::to_string_pretty(&tape).map_err(|e| TestKitError::Tape(e.to_string()))?;
        // The tape is meant to be committed: one that still holds a secret
        // in any form is not written.
        if still_holds(&tape, &text, &values) {
            return Err(TestKitError::Tape(
                "a secret or token is still in the recording after scrubbing; nothing was saved"
                    .into(),
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TestKitError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        std::fs::write(path, text + "\n").map_err(|source| TestKitError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path.clone())
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<WireResponse, WireError>> + Send + 'static>>;

impl HttpTransport for TapeTransport {
    fn send(&self, req: WireRequest) -> Answer {
        match &self.mode {
            Mode::Record { real, recorded, .. } => {
                let method = req.method.as_str().to_owned();
                let url = req.url.to_string();
                let request_headers = req.headers.clone();
                let request_body = req.body.as_deref().map(body_text);
                let answer = real.send(req);
                let recorded = Arc::clone(recorded);
                Box::pin(async move {
                    let result = answer.await;
                    let exchange = match &result {
                        Ok(resp) => Exchange {
                            method,
                            url,
                            request_headers,
                            request_body,
                            status: Some(resp.status),
                            response_headers: resp.headers.clone(),
                            response_body: body_text(&resp.body),
                            error: None,
                        },
                        Err(error) => Exchange {
                            method,
                            url,
                            request_headers,
                            request_body,
                            status: None,
                            response_headers: Vec::new(),
                            response_body: String::new(),
                            error: Some(error.to_string()),
                        },
                    };
                    recorded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(exchange);
                    result
                })
            }
            Mode::Replay { exchanges, used } => {
                let result = replay(exchanges, used, &req);
                Box::pin(async move { result })
            }
        }
    }
}

fn replay(
    exchanges: &[Exchange],
    used: &Mutex<Vec<bool>>,
    req: &WireRequest,
) -> Result<WireResponse, WireError> {
    let method = req.method.as_str();
    let url = req.url.as_str();
    let body = req.body.as_deref().map(body_text);
    let mut used = used.lock().unwrap_or_else(|e| e.into_inner());
    let same_call = |i: usize, e: &Exchange| {
        !used[i] && e.method.eq_ignore_ascii_case(method) && scrubbed_match(&e.url, url)
    };
    let found = exchanges.iter().enumerate().position(|(i, e)| {
        same_call(i, e) && bodies_match(e.request_body.as_deref(), body.as_deref())
    });
    let Some(index) = found else {
        // The same call with another body: the connector now sends
        // something the recorded API never answered (a changed mapping).
        let sent_before = exchanges
            .iter()
            .enumerate()
            .find(|(i, e)| same_call(*i, e))
            .map(|(_, e)| e.request_body.as_deref().unwrap_or(""));
        return Err(WireError::Connect(match sent_before {
            // What differs, not the live body: it may hold a secret the
            // recording has as a placeholder.
            Some(recorded) => format!(
                "the recording's {method} {url} was sent another body ({}): record it again",
                body_difference(recorded, body.as_deref().unwrap_or(""))
            ),
            None => {
                format!("the recording has no unused exchange for {method} {url}: record it again")
            }
        }));
    };
    used[index] = true;
    let exchange = &exchanges[index];
    match (exchange.status, &exchange.error) {
        (Some(status), _) => Ok(WireResponse {
            status,
            headers: exchange.response_headers.clone(),
            body: body_bytes(&exchange.response_body),
        }),
        (None, Some(error)) => Err(recorded_error(error)),
        (None, None) => Err(WireError::Connect("recorded without an answer".into())),
    }
}

/// The failure a recording holds, as it was (its text is the error's
/// `Display`): a timeout replayed as a refused connection was a plain
/// transient error to ferry instead of an unknown outcome, and an answer
/// too large (permanent) a retryable one.
fn recorded_error(text: &str) -> WireError {
    let (kind, rest) = text.split_once(": ").unwrap_or(("", text));
    let rest = rest.to_owned();
    match kind {
        "connect" => WireError::Connect(rest),
        "interrupted" => WireError::Interrupted(rest),
        "timeout" => WireError::Timeout(rest),
        "too large" => WireError::TooLarge(rest),
        "denied" => WireError::Denied(rest),
        _ => WireError::Connect(text.to_owned()),
    }
}

/// A recorded URL or body (scrubbed: `{{secret:NAME}}` stands for any
/// value) against a live one, as text.
fn scrubbed_match(recorded: &str, live: &str) -> bool {
    let pieces = literal_pieces(recorded);
    let [first, middle @ .., last] = pieces.as_slice() else {
        return recorded == live;
    };
    if live.len() < first.len() + last.len() || !live.starts_with(first) || !live.ends_with(last) {
        return false;
    }
    let mut rest = &live[first.len()..live.len() - last.len()];
    for piece in middle {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// A recorded request body (scrubbed) against a live one: the same text
/// but for placeholders, or the same JSON however its keys are ordered or
/// spaced.
fn bodies_match(recorded: Option<&str>, live: Option<&str>) -> bool {
    let (recorded, live) = (recorded.unwrap_or(""), live.unwrap_or(""));
    if scrubbed_match(recorded, live) {
        return true;
    }
    match (
        serde_json::from_str::<serde_json::Value>(recorded),
        serde_json::from_str::<serde_json::Value>(live),
    ) {
        (Ok(recorded), Ok(live)) => recorded == live,
        _ => false,
    }
}

/// How a live body differs from a recorded one, without its values: the
/// JSON fields that differ, or the sizes.
fn body_difference(recorded: &str, live: &str) -> String {
    let parse =
        |text: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text);
    if let (Ok(recorded), Ok(live)) = (parse(recorded), parse(live)) {
        let mut fields: Vec<&str> = recorded
            .keys()
            .chain(live.keys())
            .filter(|key| match (recorded.get(*key), live.get(*key)) {
                (Some(serde_json::Value::String(r)), Some(serde_json::Value::String(l))) => {
                    !scrubbed_match(r, l)
                }
                (r, l) => r != l,
            })
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        fields.dedup();
        return format!("fields {}", fields.join(", "));
    }
    format!("{} bytes recorded, {} now", recorded.len(), live.len())
}

/// The text between `{{…}}` placeholders.
fn literal_pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        pieces.push(&rest[..start]);
        rest = &rest[start + end + 2..];
    }
    pieces.push(rest);
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(method: &str, url: &str, body: Option<&str>) -> Exchange {
        Exchange {
            method: method.to_owned(),
            url: url.to_owned(),
            request_headers: Vec::new(),
            request_body: body.map(str::to_owned),
            status: Some(200),
            response_headers: Vec::new(),
            response_body: "{}".to_owned(),
            error: None,
        }
    }

    fn request(method: &str, url: &str, body: Option<&str>) -> WireRequest {
        WireRequest {
            method: method.parse().unwrap(),
            url: url.parse().unwrap(),
            headers: Vec::new(),
            body: body.map(|b| b.as_bytes().to_vec()),
            timeout: Duration::from_secs(1),
            max_response_bytes: 1 << 20,
        }
    }

    #[test]
    fn a_recorded_failure_replays_as_the_same_kind() {
        for error in [
            WireError::Connect("refused".into()),
            WireError::Interrupted("reset".into()),
            WireError::Timeout("after 30000 ms".into()),
            WireError::TooLarge("over 4 MiB".into()),
            WireError::Denied("a private address".into()),
        ] {
            let failed = Exchange {
                status: None,
                error: Some(error.to_string()),
                ..exchange("GET", "https://api.example.com/a", None)
            };
            let used = Mutex::new(vec![false]);
            let replayed = replay(
                &[failed],
                &used,
                &request("GET", "https://api.example.com/a", None),
            );
            assert_eq!(replayed.map(|r| r.status), Err(error));
        }
    }

    #[test]
    fn a_replayed_request_must_send_the_recorded_body() {
        let exchanges = [
            exchange(
                "POST",
                "https://a.example/v1/c",
                Some(r#"{"name":"Ada","key":"{{secret:api_key}}"}"#),
            ),
            exchange("GET", "https://a.example/v1/c/1", None),
        ];
        let used = Mutex::new(vec![false; exchanges.len()]);
        // Another body: refused, naming both.
        let changed = request(
            "POST",
            "https://a.example/v1/c",
            Some(r#"{"name":"Grace","key":"k"}"#),
        );
        let Err(WireError::Connect(message)) = replay(&exchanges, &used, &changed) else {
            panic!("replayed another body");
        };
        assert!(message.contains("another body (fields name)"), "{message}");
        assert!(!message.contains("Grace"), "no live value: {message}");
        // A secret's placeholder matches as text only: the same JSON in
        // another key order is not answered; in the recorded order it is.
        let same = request(
            "POST",
            "https://a.example/v1/c",
            Some(r#"{"key":"k2","name":"Ada"}"#),
        );
        assert!(
            replay(&exchanges, &used, &same).is_err(),
            "placeholders match as text only"
        );
        let same = request(
            "POST",
            "https://a.example/v1/c",
            Some(r#"{"name":"Ada","key":"k2"}"#),
        );
        assert!(replay(&exchanges, &used, &same).is_ok());
        assert!(replay(
            &exchanges,
            &used,
            &request("GET", "https://a.example/v1/c/1", None)
        )
        .is_ok());
        let reordered = [exchange(
            "PUT",
            "https://a.example/v1/c/1",
            Some(r#"{"a":1,"b":[2,3]}"#),
        )];
        let used = Mutex::new(vec![false]);
        let put = request(
            "PUT",
            "https://a.example/v1/c/1",
            Some(r#"{ "b": [2, 3], "a": 1 }"#),
        );
        assert!(replay(&reordered, &used, &put).is_ok());
    }

    #[test]
    fn scrubbed_text_matches_any_value_in_place_of_a_secret() {
        assert!(scrubbed_match(
            "https://a.example/v1/x",
            "https://a.example/v1/x"
        ));
        assert!(!scrubbed_match(
            "https://a.example/v1/x",
            "https://a.example/v1/y"
        ));
        let recorded = "https://a.example/v1/x?key={{secret:api_key}}&n=1";
        assert!(scrubbed_match(
            recorded,
            "https://a.example/v1/x?key=abc&n=1"
        ));
        assert!(!scrubbed_match(
            recorded,
            "https://a.example/v1/x?key=abc&n=2"
        ));
    }

    #[test]
    fn secrets_and_tokens_are_scrubbed_longest_first() {
        let values = vec![
            ("sk_live_long".to_owned(), "{{secret:b}}".to_owned()),
            ("sk_live".to_owned(), "{{secret:a}}".to_owned()),
        ];
        assert_eq!(
            scrub("Bearer sk_live_long / sk_live", &values),
            "Bearer {{secret:b}} / {{secret:a}}"
        );
        assert_eq!(
            tokens_in(br#"{"access_token":"t0k","token_type":"bearer"}"#),
            ["t0k"]
        );
        assert_eq!(body_bytes(&body_text(&[0xff, 0x00])), vec![0xff, 0x00]);
    }

    /// A client secret sent form-encoded in a token request (`~` as `%7E`,
    /// `+` as `%2B`, `/` as `%2F`, `=` as `%3D`) is scrubbed in that form
    /// too; before, the tape kept it, in a file meant to be committed.
    #[test]
    fn an_encoded_secret_is_scrubbed() {
        let secret = "a~b+c/d=e f\"g";
        let body = serde_urlencoded::to_string([
            ("grant_type", "client_credentials"),
            ("client_secret", secret),
        ])
        .unwrap();
        let json = serde_json::json!({"echo": secret}).to_string();
        let recorded = vec![Exchange {
            method: "POST".into(),
            url: "https://login.example/token".into(),
            request_headers: Vec::new(),
            request_body: Some(body),
            status: Some(200),
            response_headers: Vec::new(),
            response_body: json,
            error: None,
        }];
        let secrets = [("client_secret".to_owned(), secret.to_owned())];
        let (tape, values) = scrubbed(&recorded, &secrets);
        let text = serde_json::to_string(&tape).unwrap();
        for (form, _) in &values {
            assert!(!text.contains(form.as_str()), "{form} left in {text}");
        }
        assert!(!text.contains("%7E") && !text.contains("b%2Bc"), "{text}");
        assert!(
            tape.exchanges[0]
                .request_body
                .as_deref()
                .is_some_and(|b| b.contains("client_secret={{secret:client_secret}}")),
            "{text}"
        );
    }

    /// A token a server sends with `/` escaped (`ab\/cd`, PHP's default),
    /// and a secret inside a body that is not UTF-8, stayed in the tape, and
    /// the guard before writing looked for neither.
    #[test]
    fn escaped_tokens_and_binary_bodies_are_scrubbed() {
        let secrets = [("api_key".to_owned(), "sk_live_0123".to_owned())];
        let mut binary = vec![0xff, 0x00];
        binary.extend_from_slice(b"key=sk_live_0123");
        let recorded = vec![
            Exchange {
                method: "POST".into(),
                url: "https://login.example/token".into(),
                request_headers: Vec::new(),
                request_body: None,
                status: Some(200),
                response_headers: Vec::new(),
                response_body: r#"{"access_token":"ab\/cd_tok3n"}"#.into(),
                error: None,
            },
            Exchange {
                method: "POST".into(),
                url: "https://api.example/upload".into(),
                request_headers: Vec::new(),
                request_body: Some(body_text(&binary)),
                status: Some(200),
                response_headers: Vec::new(),
                response_body: body_text(&binary),
                error: None,
            },
        ];
        let (tape, values) = scrubbed(&recorded, &secrets);
        let text = serde_json::to_string(&tape).unwrap();
        assert!(!still_holds(&tape, &text, &values), "{text}");
        assert!(
            tape.exchanges[0].response_body.contains("{{token}}"),
            "{text}"
        );
        let sent = body_bytes(tape.exchanges[1].request_body.as_deref().unwrap());
        assert!(
            sent.windows(18).any(|w| w == b"{{secret:api_key}}"),
            "{sent:?}"
        );
        // The guard sees inside binary bodies.
        let (raw, _) = scrubbed(&recorded, &[]);
        assert!(still_holds(&raw, "", &values));
    }

    /// A token a .NET server wrote with `+` escaped (`ab\u002Bcd`), and a
    /// secret's value before a test set it again, stayed in the tape; the
    /// guard before writing looked for neither.
    #[test]
    fn dotnet_escaped_tokens_and_earlier_secret_values_are_scrubbed() {
        let recorded = vec![
            Exchange {
                method: "POST".into(),
                url: "https://login.example/token".into(),
                request_headers: Vec::new(),
                request_body: Some("client_secret=first-value".into()),
                status: Some(200),
                response_headers: Vec::new(),
                response_body: r#"{"access_token":"ab\u002Bcd_tok3n"}"#.into(),
                error: None,
            },
            Exchange {
                method: "GET".into(),
                url: "https://api.example/contacts".into(),
                request_headers: Vec::new(),
                request_body: None,
                status: Some(200),
                response_headers: Vec::new(),
                response_body: r#"{"echo":"ab+cd_tok3n second-value"}"#.into(),
                error: None,
            },
        ];
        let secrets = [
            ("client_secret".to_owned(), "second-value".to_owned()),
            ("client_secret".to_owned(), "first-value".to_owned()),
        ];
        let (tape, values) = scrubbed(&recorded, &secrets);
        let text = serde_json::to_string(&tape).unwrap();
        for leaked in ["first-value", "second-value", "u002Bcd", "ab+cd"] {
            assert!(!text.contains(leaked), "{leaked} in {text}");
        }
        assert!(!still_holds(&tape, &text, &values), "{text}");
    }
}
