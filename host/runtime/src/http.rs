//! `http.send`: a connector's outbound HTTP, through the policy in
//! [`super::policy`] and then the [`HttpTransport`](super::HttpTransport).
//!
//! Order matters: the rate limit and the host check run first, and a request
//! to an undeclared host is refused before any secret is substituted. Limits:
//! the operator's connect/total timeouts (a connector may only shorten the
//! total), the response size cap, the call's own deadline, and a per-connector
//! token bucket.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::policy::{self, DeclaredHost, HostRules, PolicyError};
use super::state::CallState;
use super::transport::{HttpTransport, WireError, WireRequest, WireResponse};
use super::wit::latest::ferry::connector::http::{Host, HttpError, Method, Request, Response};

impl From<PolicyError> for HttpError {
    fn from(e: PolicyError) -> Self {
        match e {
            PolicyError::Denied(m) => HttpError::Denied(m),
            PolicyError::Invalid(m) => HttpError::InvalidRequest(m),
            PolicyError::Busy(m) => HttpError::Timeout(m),
        }
    }
}

impl From<WireError> for HttpError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Connect(m) | WireError::Interrupted(m) => HttpError::Connect(m),
            WireError::Timeout(m) => HttpError::Timeout(m),
            WireError::TooLarge(m) => HttpError::TooLarge(m),
            WireError::Denied(m) => HttpError::Denied(m),
        }
    }
}

fn method(m: Method) -> http::Method {
    match m {
        Method::Get => http::Method::GET,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Patch => http::Method::PATCH,
        Method::Delete => http::Method::DELETE,
        Method::Head => http::Method::HEAD,
    }
}

impl CallState {
    /// Hosts this call may reach: the manifest's `hosts` plus the host of
    /// each host-setting's value (the operator's or the manifest default).
    fn declared_hosts(&self) -> Vec<DeclaredHost> {
        let manifest = &self.connector.manifest;
        let mut hosts = self.connector.hosts.clone();
        for name in &manifest.host_settings {
            let value = self.config.settings.get(name).cloned().or_else(|| {
                manifest
                    .settings
                    .iter()
                    .find(|s| &s.name == name)
                    .and_then(|s| s.default.clone())
            });
            match value.as_deref().map(DeclaredHost::from_setting_url) {
                Some(Some(host)) => hosts.push(host),
                Some(None) => tracing::warn!(
                    connector = %self.connector.name,
                    setting = %name,
                    "host setting is not an absolute http(s) URL; ignoring it"
                ),
                None => {}
            }
        }
        hosts
    }

    /// Applies the policy and substitutes secrets; nothing here has side effects.
    /// Checks `url` against the declared hosts and the operator's rules.
    pub(crate) fn check_url(&self, url: &str) -> Result<url::Url, PolicyError> {
        let runtime = &self.runtime.config;
        let declared = self.declared_hosts();
        let rules = HostRules {
            declared: &declared,
            operator: policy::OperatorHosts {
                allowed: &runtime.allowed_hosts,
                denied: &runtime.denied_hosts,
                allow_private: runtime.allow_private_hosts,
            },
        };
        policy::check_url(url, &rules)
    }

    /// Time left for a request of this call: the operator's total timeout,
    /// shortened by the connector's wish and the call's deadline.
    pub(crate) fn request_timeout(&self, requested_ms: Option<u32>) -> Duration {
        let total = self.runtime.config.http_total_timeout;
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let requested = requested_ms.map_or(total, |ms| Duration::from_millis(ms.into()));
        requested.min(total).min(remaining)
    }

    fn prepare(&mut self, req: Request) -> Result<WireRequest, HttpError> {
        let runtime = &self.runtime.config;
        // Bounded before anything is read or copied: a guest's request was
        // as large as its memory, copied on the host for each step, and
        // sent at the connector's request rate (ferry an amplifier).
        if req.url.len() > MAX_URL_BYTES {
            return Err(HttpError::InvalidRequest(format!(
                "the URL is longer than {MAX_URL_BYTES} bytes"
            )));
        }
        if req
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BODY_BYTES)
        {
            return Err(HttpError::InvalidRequest(format!(
                "the body is longer than {MAX_REQUEST_BODY_BYTES} bytes"
            )));
        }
        if req.headers.len() > MAX_REQUEST_HEADERS {
            return Err(HttpError::InvalidRequest(format!(
                "{} headers; a request carries at most {MAX_REQUEST_HEADERS}",
                req.headers.len()
            )));
        }
        let raw_header_bytes: usize = req.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
        if raw_header_bytes > MAX_REQUEST_HEADER_BYTES {
            return Err(HttpError::InvalidRequest(format!(
                "the headers hold more than {MAX_REQUEST_HEADER_BYTES} bytes"
            )));
        }
        let url = self.check_url(&req.url)?;

        // Only now, for an allowed host, do secrets enter the request.
        let secret_names: Vec<String> = self
            .connector
            .manifest
            .secrets
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let mut headers = Vec::with_capacity(req.headers.len());
        let mut header_bytes = 0usize;
        for (name, value) in req.headers {
            let parsed = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| HttpError::InvalidRequest(format!("bad header name `{name}`")))?;
            if is_host_owned(&parsed) {
                return Err(HttpError::InvalidRequest(format!(
                    "header `{name}` is set by the host"
                )));
            }
            let value = if policy::has_placeholder(value.as_bytes()) {
                let bytes =
                    // Always replaced: a connector puts no record data in
                    // a header (its credentials go there).
                    policy::substitute_secrets(
                        value.as_bytes(),
                        &secret_names,
                        self.secrets(),
                        &BTreeSet::new(),
                    )?;
                // Secret values are ASCII tokens in practice; anything else
                // cannot go into a header and is refused without echoing it.
                String::from_utf8(bytes).map_err(|_| {
                    HttpError::InvalidRequest(format!("header `{name}`: secret is not valid UTF-8"))
                })?
            } else {
                value
            };
            let value = if policy::has_token_placeholder(value.as_bytes()) {
                let bytes = policy::substitute_tokens(value.as_bytes(), &self.tokens)?;
                String::from_utf8(bytes).map_err(|_| {
                    HttpError::InvalidRequest(format!("header `{name}`: token is not valid UTF-8"))
                })?
            } else {
                value
            };
            // Rejects CR/LF, so a secret cannot smuggle extra headers either.
            if http::HeaderValue::from_str(&value).is_err() {
                return Err(HttpError::InvalidRequest(format!(
                    "header `{name}` has an invalid value"
                )));
            }
            header_bytes += name.len() + value.len();
            if header_bytes > MAX_REQUEST_HEADER_BYTES {
                return Err(HttpError::InvalidRequest(format!(
                    "the headers hold more than {MAX_REQUEST_HEADER_BYTES} bytes"
                )));
            }
            headers.push((name, value));
        }
        let body = match req.body {
            Some(body) if policy::has_placeholder(&body) => {
                match self.data_placeholders.literal() {
                    Some(literal) => Some(policy::substitute_secrets(
                        &body,
                        &secret_names,
                        self.secrets(),
                        literal,
                    )?),
                    None => Some(body),
                }
            }
            other => other,
        };
        if body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BODY_BYTES)
        {
            return Err(HttpError::InvalidRequest(format!(
                "the body is longer than {MAX_REQUEST_BODY_BYTES} bytes, secrets put in"
            )));
        }

        let timeout = self.request_timeout(req.timeout_ms);
        Ok(WireRequest {
            method: method(req.method),
            url,
            headers,
            body,
            timeout,
            max_response_bytes: runtime.max_response_bytes,
        })
    }
}

fn budget_exhausted() -> PolicyError {
    PolicyError::Busy(
        "the connector's outbound request rate limit is exhausted before the call's deadline"
            .into(),
    )
}

impl CallState {
    /// Waits for one request of the connector's budget (the rate limit
    /// paces calls), as long as the call's deadline allows; refuses when
    /// the next slot comes too late, saying how far away it is. A request
    /// leaves with a quarter of the call's time at least: one sent at the
    /// last moment would time out after the remote may have acted on it,
    /// leaving a write in doubt where a refusal leaves none.
    pub(crate) fn wait_for_request_budget(
        &self,
    ) -> impl std::future::Future<Output = Result<(), Duration>> + Send + 'static {
        let connector = self.connector.clone();
        let deadline = self
            .deadline
            .checked_sub(self.runtime.config.call_timeout / 4)
            .unwrap_or(self.deadline);
        async move {
            loop {
                let wait = match connector.bucket.lock() {
                    Ok(mut bucket) => bucket.take(),
                    Err(_) => return Err(Duration::from_secs(1)),
                };
                match wait {
                    Ok(()) => return Ok(()),
                    Err(wait) if std::time::Instant::now() + wait < deadline => {
                        tokio::time::sleep(wait).await;
                    }
                    Err(wait) => return Err(wait),
                }
            }
        }
    }

    /// What [`dispatch`] needs, owned, so no borrow of the (not `Sync`)
    /// call state is held across the request.
    pub(crate) fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            transport: self.runtime.transport.clone(),
            connector: self.connector.name.clone(),
        }
    }

    /// Replaces any secret or token the remote echoed with its placeholder:
    /// every token the connector obtained, not only this call's (one
    /// cached by an earlier call, or replaced by a newer grant while still
    /// valid, came back in clear to a call that never asked for it).
    fn redact(&mut self, data: &mut Vec<u8>) {
        // Built once for the call's responses and headers, again when any
        // call obtained a token since, or this call's tokens changed (they
        // drop it).
        let issued_version = self.connector.tokens.issued_version();
        if self
            .redactor
            .as_ref()
            .is_none_or(|(version, _)| *version != issued_version)
        {
            let issued = self.connector.tokens.issued();
            let redactor = policy::Redactor::default()
                .secrets(self.secrets())
                .tokens(&self.tokens)
                .tokens(issued.iter().map(|(name, value)| (name, value)));
            self.redactor = Some((issued_version, redactor));
        }
        if let Some((_, redactor)) = &self.redactor {
            redactor.redact(data);
        }
    }
}

impl Host for CallState {
    async fn send(&mut self, req: Request) -> Result<Response, HttpError> {
        if let Err(wait) = self.wait_for_request_budget().await {
            // Noted, so a call that fails for it is not blamed on the remote.
            self.throttled = Some(wait);
            return Err(budget_exhausted().into());
        }
        let wire = self.prepare(req)?;
        self.requests_sent += 1;
        // Unsettled until its answer comes (a deadline that drops the call
        // here leaves it so); a timeout, or a connection lost after the
        // request went out, leaves it so for good.
        self.requests_unsettled += 1;
        let response = self.dispatcher().send(wire).await;
        if !matches!(
            response,
            Err(WireError::Timeout(_) | WireError::Interrupted(_))
        ) {
            self.requests_unsettled -= 1;
        }
        let response = response?;
        // A 424 (a dependency failed while the request ran) is saved
        // under its key as a 5xx is (Stripe's): a retry under that key
        // would only get it back.
        if response.status >= 500 || response.status == 424 {
            self.server_errors += 1;
        }
        let mut body = response.body;
        // A remote that echoes a credential must not hand it to the connector.
        self.redact(&mut body);
        // What it answered (a credential it echoed included) is data: sent
        // on, it goes as written.
        self.note_data(&body);
        let mut headers = Vec::with_capacity(response.headers.len());
        for (name, value) in response.headers {
            let mut value = value.into_bytes();
            self.redact(&mut value);
            self.note_data(&value);
            headers.push((
                name.to_ascii_lowercase(),
                String::from_utf8_lossy(&value).into_owned(),
            ));
        }
        Ok(Response {
            status: response.status,
            headers,
            body,
        })
    }
}

/// Sends allowed requests for one connector (see [`CallState::dispatcher`]).
pub(crate) struct Dispatcher {
    transport: Arc<dyn HttpTransport>,
    connector: Arc<str>,
}

impl Dispatcher {
    #[cfg(test)]
    pub(crate) fn new(transport: Arc<dyn HttpTransport>, connector: &str) -> Self {
        Self {
            transport,
            connector: connector.into(),
        }
    }

    /// Sends `wire`, bounded by its timeout, and logs the outcome (never
    /// headers or bodies: they may hold substituted secrets).
    pub(crate) async fn send(self, wire: WireRequest) -> Result<WireResponse, WireError> {
        let (method, host) = (
            wire.method.clone(),
            wire.url.host_str().unwrap_or_default().to_owned(),
        );
        let timeout = wire.timeout;
        let started = Instant::now();
        // The transport should honour `timeout` itself; this bounds one that does not.
        let sent = super::transport::with_owner(self.connector.clone(), self.transport.send(wire));
        let result = match tokio::time::timeout(timeout, sent).await {
            Ok(result) => result,
            Err(_) => Err(WireError::Timeout(format!(
                "no response within {} ms",
                timeout.as_millis()
            ))),
        };
        let connector = &self.connector;
        match &result {
            Ok(r) => {
                tracing::debug!(%connector, %method, %host, status = r.status,
                elapsed_ms = started.elapsed().as_millis() as u64, "outbound request")
            }
            Err(e) => tracing::debug!(%connector, %method, %host, error = %e,
                elapsed_ms = started.elapsed().as_millis() as u64, "outbound request failed"),
        }
        result
    }
}

/// Headers the host's HTTP client owns: `Host` (a guest's own would send a
/// request for another site, secrets and all, through a front end that
/// routes by it to a declared host's address) and the framing of the
/// message.
/// Most headers one request carries. The HTTP client's header map holds
/// at most 24,576 names and panics past that: a guest that sent more
/// stopped ferry (a panicking host call ends the task that called it; the
/// inbox loop's is supervised, and the event fetched again at each start).
const MAX_REQUEST_HEADERS: usize = 100;

/// Most bytes a request's header names and values hold, secrets put in:
/// each value's placeholders are bounded, their sum over many headers was
/// not (copies of a secret outside the guest's memory cap).
const MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;

/// The longest URL a request may have (Salesforce's own limit).
const MAX_URL_BYTES: usize = 16 * 1024;

/// The largest body a request may carry, secrets put in.
const MAX_REQUEST_BODY_BYTES: usize = 8 * 1024 * 1024;

fn is_host_owned(name: &http::HeaderName) -> bool {
    use http::header;
    [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str().starts_with("proxy-")
        || name.as_str() == "keep-alive"
}
