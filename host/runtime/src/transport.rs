//! The wire under a connector's `http.send`: what leaves the host after the
//! policy in [`super::policy`] allowed a request and substituted its secrets.
//!
//! [`HttpTransport`] is the seam: the runtime's default is
//! `ReqwestTransport` (module `network`, feature `network`: a real client
//! that also refuses names resolving to private addresses); the SDK's test
//! kit implements scripted and replaying ones.

use std::time::Duration;

use futures::future::BoxFuture;

/// A request as it goes on the wire: allowed by the policy, secrets already
/// substituted. Never log it: its headers and body may hold secret values.
#[derive(Clone)]
pub struct WireRequest {
    /// The method.
    pub method: http::Method,
    /// The absolute URL (its host was checked against the policy).
    pub url: url::Url,
    /// Headers as (name, value), in the connector's order.
    pub headers: Vec<(String, String)>,
    /// The body, if any.
    pub body: Option<Vec<u8>>,
    /// Total time allowed for the exchange (connect, send, read the body).
    pub timeout: Duration,
    /// Stop reading and fail with [`WireError::TooLarge`] past this many body bytes.
    pub max_response_bytes: usize,
}

impl std::fmt::Debug for WireRequest {
    // Headers and body may carry substituted secrets: show their shape only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireRequest")
            .field("method", &self.method)
            .field("url", &self.url.as_str())
            .field(
                "headers",
                &self.headers.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("body_len", &self.body.as_ref().map(Vec::len))
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The remote's answer, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireResponse {
    /// HTTP status code.
    pub status: u16,
    /// Headers as (lower-cased name, value).
    pub headers: Vec<(String, String)>,
    /// The whole body, at most `max_response_bytes`.
    pub body: Vec<u8>,
}

/// Why the wire produced no response. Each case becomes the `http-error`
/// case of the same name for the connector (`Interrupted` its `connect`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// DNS, TCP, TLS or protocol failure before the request went out.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed after the request was sent (reset, closed
    /// before the answer was whole): the remote may have applied it, and
    /// the call's outcome is unknown, as after a timeout.
    #[error("interrupted: {0}")]
    Interrupted(String),
    /// The connect or total timeout passed.
    #[error("timeout: {0}")]
    Timeout(String),
    /// The body exceeded `max_response_bytes`.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The transport refused, e.g. the name resolved to a private address.
    #[error("denied: {0}")]
    Denied(String),
}

/// Sends requests the runtime's policy has allowed. Implementations must
/// honour `timeout` and `max_response_bytes` and must not follow redirects
/// (a redirect would bypass the host policy).
pub trait HttpTransport: Send + Sync + 'static {
    /// Send one request.
    fn send(&self, req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>>;
}

tokio::task_local! {
    /// The connector whose request is being sent (set around it by
    /// [`with_owner`]): whose share of the name lookups it takes.
    static OWNER: std::sync::Arc<str>;
}

/// Runs `request` as `connector`'s: the names the transport resolves for
/// it count against that connector's share of the lookups. A transport
/// resolves as the request is first polled, within this scope.
pub(crate) async fn with_owner<T>(
    connector: std::sync::Arc<str>,
    request: impl std::future::Future<Output = T>,
) -> T {
    OWNER.scope(connector, request).await
}

/// The connector whose request is being sent: `""` outside any (none is,
/// in ferry), which then shares one share.
#[cfg_attr(not(feature = "network"), allow(dead_code))]
pub(crate) fn request_owner() -> std::sync::Arc<str> {
    OWNER
        .try_with(std::sync::Arc::clone)
        .unwrap_or_else(|_| std::sync::Arc::from(""))
}
