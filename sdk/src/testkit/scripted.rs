//! Scripted HTTP: the component's requests answered by rules a test sets
//! up, and recorded as they went on the wire (after the host's policy
//! allowed them and substituted secrets).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ferry_runtime::{HttpTransport, WireError, WireRequest, WireResponse};

/// One request the component sent, as it went on the wire: after the host
/// policy allowed it and substituted secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Upper-case method, e.g. `POST`.
    pub method: String,
    /// The absolute URL.
    pub url: String,
    /// Headers in the connector's order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
    /// How long the host let it take: the operator's total timeout,
    /// shortened by the connector's own (`Request::timeout_ms`) and by the
    /// call's deadline. A connector that meant seconds and wrote `30` as
    /// milliseconds passes every scripted answer, and times out in ferry.
    pub timeout: Duration,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 text (empty if none).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(self.body.as_deref().unwrap_or_default()).into_owned()
    }

    /// The body decoded as `application/x-www-form-urlencoded` pairs.
    pub fn form(&self) -> Vec<(String, String)> {
        serde_urlencoded::from_bytes(self.body.as_deref().unwrap_or_default()).unwrap_or_default()
    }

    /// The first value of form field `name`.
    pub fn form_value(&self, name: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// The query string decoded as pairs.
    pub fn query(&self) -> Vec<(String, String)> {
        url::Url::parse(&self.url)
            .map(|u| u.query_pairs().into_owned().collect())
            .unwrap_or_default()
    }
}

/// An [`HttpTransport`] answering from a script and recording every request.
///
/// A request is answered by the matching rule (method equal, URL starting
/// with the rule's prefix) with the longest prefix; among equals, the one
/// added last, so a test scripts the same endpoint again to change its
/// answer from there on. Each rule answers its responses in order and
/// repeats the last one until more are added to it. A prefix matches
/// within a path segment (`…/ct_1` answers `…/ct_10`, `?limit=2`
/// answers `?limit=20`): end it with `/`, or give the whole id or query.
/// A request no rule matches fails with a connect error (which the SDK maps
/// to retryable) and is listed by [`ScriptedHttp::unmatched`].
#[derive(Default)]
pub struct ScriptedHttp {
    state: Mutex<ScriptState>,
}

#[derive(Default)]
struct ScriptState {
    rules: Vec<Rule>,
    requests: Vec<RecordedRequest>,
    unmatched: Vec<RecordedRequest>,
}

struct Rule {
    method: String,
    url_prefix: String,
    answers: VecDeque<Answer>,
    /// The one answer left was given (and repeats): an answer added now
    /// replaces it, rather than come after one more of it.
    repeating: bool,
}

#[derive(Clone)]
enum Answer {
    Response(WireResponse),
    Error(WireError),
    /// The response, once this much time has passed.
    Late(Duration, WireResponse),
}

impl ScriptedHttp {
    /// Starts a rule for requests with `method` (case-insensitive) to URLs
    /// starting with `url_prefix`; add answers with the returned handle.
    pub fn on(&self, method: &str, url_prefix: &str) -> RuleHandle<'_> {
        let mut state = self.lock();
        state.rules.push(Rule {
            method: method.to_ascii_uppercase(),
            url_prefix: url_prefix.to_owned(),
            answers: VecDeque::new(),
            repeating: false,
        });
        RuleHandle {
            http: self,
            index: state.rules.len() - 1,
        }
    }

    /// Every request sent so far, in order (matched or not).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// The last request sent, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.lock().requests.last().cloned()
    }

    /// Requests no rule answered.
    pub fn unmatched(&self) -> Vec<RecordedRequest> {
        self.lock().unmatched.clone()
    }

    /// Forgets recorded requests (rules stay).
    pub fn clear_requests(&self) {
        let mut state = self.lock();
        state.requests.clear();
        state.unmatched.clear();
    }

    fn lock(&self) -> MutexGuard<'_, ScriptState> {
        // A panic while holding the lock happens only in a failing test; the
        // script is still usable for its report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn answer(&self, req: WireRequest) -> Result<WireResponse, WireError> {
        self.answer_after(req).1
    }

    /// The answer to `req`, and how long to wait before giving it.
    fn answer_after(&self, req: WireRequest) -> (Duration, Result<WireResponse, WireError>) {
        let recorded = RecordedRequest {
            method: req.method.as_str().to_ascii_uppercase(),
            url: req.url.to_string(),
            headers: req.headers,
            body: req.body,
            timeout: req.timeout,
        };
        let mut state = self.lock();
        state.requests.push(recorded.clone());
        let rule = state
            .rules
            .iter_mut()
            .enumerate()
            .filter(|(_, r)| {
                r.method == recorded.method
                    && recorded.url.starts_with(&r.url_prefix)
                    && !r.answers.is_empty()
            })
            // Longest prefix wins; among equals the last added (which
            // `max_by_key` keeps): the first, it hid every rule a test
            // added later for the same endpoint.
            .max_by_key(|(i, r)| (r.url_prefix.len(), *i))
            .map(|(_, r)| r);
        let answer = match rule {
            Some(rule) if rule.answers.len() > 1 => rule.answers.pop_front(),
            Some(rule) => {
                rule.repeating = true;
                rule.answers.front().cloned()
            }
            None => None,
        };
        let within = |resp: WireResponse| {
            if resp.body.len() > req.max_response_bytes {
                return Err(WireError::TooLarge(format!(
                    "scripted body of {} bytes exceeds the limit of {}",
                    resp.body.len(),
                    req.max_response_bytes
                )));
            }
            Ok(resp)
        };
        match answer {
            Some(Answer::Response(resp)) => (Duration::ZERO, within(resp)),
            // As the real wire: no answer within the request's timeout is
            // a timeout, once that time has passed.
            Some(Answer::Late(after, _)) if after >= req.timeout => (
                req.timeout,
                Err(WireError::Timeout(format!(
                    "no answer within {} ms (scripted after {} ms)",
                    req.timeout.as_millis(),
                    after.as_millis()
                ))),
            ),
            Some(Answer::Late(after, resp)) => (after, within(resp)),
            Some(Answer::Error(err)) => (Duration::ZERO, Err(err)),
            None => {
                let message = format!(
                    "no scripted response for {} {}",
                    recorded.method, recorded.url
                );
                state.unmatched.push(recorded);
                (Duration::ZERO, Err(WireError::Connect(message)))
            }
        }
    }
}

impl HttpTransport for ScriptedHttp {
    fn send(
        &self,
        req: WireRequest,
    ) -> Pin<Box<dyn Future<Output = Result<WireResponse, WireError>> + Send + 'static>> {
        let (wait, result) = self.answer_after(req);
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            result
        })
    }
}

/// A scripted response, its header names lower-cased as the host does.
fn response(status: u16, headers: &[(&str, &str)], body: Vec<u8>) -> WireResponse {
    WireResponse {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
            .collect(),
        body,
    }
}

/// Adds answers to one rule of a [`ScriptedHttp`]; calls chain, and answers
/// are given in order, the last one repeating.
pub struct RuleHandle<'a> {
    http: &'a ScriptedHttp,
    index: usize,
}

impl RuleHandle<'_> {
    /// Answers with `status`, `headers` (names are lower-cased, as the host
    /// does) and `body`.
    pub fn respond(self, status: u16, headers: &[(&str, &str)], body: impl Into<Vec<u8>>) -> Self {
        self.push(Answer::Response(response(status, headers, body.into())))
    }

    /// Answers as [`RuleHandle::respond`] does, `after` this long: a
    /// request whose timeout is shorter (the operator's, the connector's
    /// own `timeout_ms`, what is left of the call) times out as it would
    /// in ferry.
    pub fn respond_after(
        self,
        after: Duration,
        status: u16,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> Self {
        self.push(Answer::Late(after, response(status, headers, body.into())))
    }

    /// Answers with `status` and `body` serialized as JSON.
    pub fn respond_json(self, status: u16, body: &serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.respond(status, &[("content-type", "application/json")], bytes)
    }

    /// Fails at the transport: a connect error, a timeout, a body too large.
    pub fn fail(self, error: WireError) -> Self {
        self.push(Answer::Error(error))
    }

    fn push(self, answer: Answer) -> Self {
        if let Some(rule) = self.http.lock().rules.get_mut(self.index) {
            if std::mem::take(&mut rule.repeating) {
                rule.answers.clear();
            }
            rule.answers.push_back(answer);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(method: ::http::Method, url: &str) -> WireRequest {
        WireRequest {
            method,
            url: url::Url::parse(url).unwrap(),
            headers: vec![("authorization".into(), "Bearer k".into())],
            body: Some(b"a=1&b=x+y".to_vec()),
            timeout: std::time::Duration::from_secs(1),
            max_response_bytes: 1024,
        }
    }

    #[test]
    fn longest_prefix_wins_and_sequences_repeat_their_last_answer() {
        let http = ScriptedHttp::default();
        http.on("post", "https://x.example/v1/")
            .respond(500, &[], "general");
        http.on("POST", "https://x.example/v1/customers")
            .respond(429, &[("Retry-After", "1")], "")
            .respond(200, &[], "ok");
        let status = |url: &str| {
            http.answer(wire(::http::Method::POST, url))
                .map(|r| r.status)
                .unwrap()
        };
        assert_eq!(status("https://x.example/v1/customers"), 429);
        assert_eq!(status("https://x.example/v1/customers"), 200);
        assert_eq!(status("https://x.example/v1/customers"), 200);
        assert_eq!(status("https://x.example/v1/other"), 500);

        let first = http.requests().remove(0);
        assert_eq!(first.method, "POST");
        assert_eq!(first.header("Authorization"), Some("Bearer k"));
        assert_eq!(first.form_value("b").as_deref(), Some("x y"));
    }

    /// A test changes an endpoint's answer by scripting it again, or by
    /// adding to a rule whose last answer repeats: the answer given next
    /// is the new one. The first rule hid every later one, and an answer
    /// added came after one more of the old.
    #[test]
    fn the_endpoint_scripted_last_answers() {
        let http = ScriptedHttp::default();
        let status = |url: &str| {
            http.answer(wire(::http::Method::POST, url))
                .map(|r| r.status)
                .unwrap()
        };
        let url = "https://x.example/v1/customers/ct_1";
        http.on("POST", url).respond(200, &[], "ok");
        assert_eq!(status(url), 200);
        http.on("POST", url).respond(404, &[], "gone");
        assert_eq!(status(url), 404);

        let rule = http.on("POST", url).respond(201, &[], "made");
        assert_eq!(status(url), 201);
        let _ = rule.respond(500, &[], "down");
        assert_eq!(status(url), 500);
        assert_eq!(status(url), 500);
    }

    #[test]
    fn unmatched_requests_fail_and_are_listed() {
        let http = ScriptedHttp::default();
        http.on("GET", "https://x.example/")
            .fail(WireError::Timeout("slow".into()));
        assert_eq!(
            http.answer(wire(::http::Method::GET, "https://x.example/a")),
            Err(WireError::Timeout("slow".into()))
        );
        assert!(matches!(
            http.answer(wire(::http::Method::DELETE, "https://x.example/a")),
            Err(WireError::Connect(_))
        ));
        assert_eq!(http.unmatched().len(), 1);
        assert_eq!(http.requests().len(), 2);
    }

    #[test]
    fn a_late_answer_past_the_requests_timeout_is_a_timeout() {
        let http = ScriptedHttp::default();
        http.on("GET", "https://x.example/").respond_after(
            Duration::from_secs(2),
            200,
            &[],
            "late",
        );
        let (waited, answer) = http.answer_after(wire(::http::Method::GET, "https://x.example/"));
        assert_eq!(waited, Duration::from_secs(1), "the request's own timeout");
        assert!(matches!(answer, Err(WireError::Timeout(_))), "{answer:?}");
        assert_eq!(http.requests()[0].timeout, Duration::from_secs(1));
        http.on("GET", "https://x.example/soon").respond_after(
            Duration::from_millis(10),
            200,
            &[],
            "soon",
        );
        let (waited, answer) =
            http.answer_after(wire(::http::Method::GET, "https://x.example/soon"));
        assert_eq!(waited, Duration::from_millis(10));
        assert_eq!(answer.map(|r| r.status), Ok(200));
    }

    #[test]
    fn oversized_scripted_bodies_are_refused_like_the_real_wire() {
        let http = ScriptedHttp::default();
        http.on("GET", "https://x.example/")
            .respond(200, &[], vec![0u8; 2048]);
        assert!(matches!(
            http.answer(wire(::http::Method::GET, "https://x.example/")),
            Err(WireError::TooLarge(_))
        ));
    }
}
