//! The production transport (feature `network`): reqwest with rustls, and
//! a resolver that refuses names resolving to private addresses. Builds
//! without it (the SDK's test kit) bring their own [`HttpTransport`].

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::policy::is_forbidden_ip;
use super::transport::{HttpTransport, WireError, WireRequest, WireResponse};

/// The production transport: reqwest with rustls, no redirects, no proxy,
/// a connect timeout, and a resolver that drops private addresses unless the
/// operator allows them.
#[derive(Clone)]
pub struct ReqwestTransport {
    client: reqwest::Client,
}

impl ReqwestTransport {
    /// A client with the given connect timeout; `allow_private_hosts` decides
    /// whether names may resolve to loopback/private/link-local addresses.
    pub fn new(connect_timeout: Duration, allow_private_hosts: bool) -> Result<Self, WireError> {
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(FilteringResolver {
                allow_private_hosts,
            }))
            .build()
            .map_err(|e| WireError::Connect(format!("building the HTTP client: {e}")))?;
        Ok(Self { client })
    }
}

impl HttpTransport for ReqwestTransport {
    fn send(&self, req: WireRequest) -> BoxFuture<'static, Result<WireResponse, WireError>> {
        let client = self.client.clone();
        async move {
            let timeout = req.timeout;
            let limit = req.max_response_bytes;
            let mut builder = client.request(req.method, req.url).timeout(timeout);
            for (name, value) in req.headers {
                builder = builder.header(name, value);
            }
            if let Some(body) = req.body {
                builder = builder.body(body);
            }
            // reqwest's per-request timeout covers the body read as well.
            let mut response = builder.send().await.map_err(map_reqwest_error)?;
            let status = response.status().as_u16();
            let headers = response
                .headers()
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            if response
                .content_length()
                .is_some_and(|len| len > limit as u64)
            {
                return Err(too_large(limit));
            }
            // Stream and stop at the limit instead of buffering a hostile body.
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(map_reqwest_error)? {
                if body.len() + chunk.len() > limit {
                    return Err(too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(WireResponse {
                status,
                headers,
                body,
            })
        }
        .boxed()
    }
}

fn too_large(limit: usize) -> WireError {
    WireError::TooLarge(format!("response body exceeds {limit} bytes"))
}

fn map_reqwest_error(e: reqwest::Error) -> WireError {
    // The resolver's refusal travels inside reqwest's connect error.
    let mut source: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(denied) = err.downcast_ref::<PrivateAddress>() {
            return WireError::Denied(denied.to_string());
        }
        source = err.source();
    }
    if e.is_timeout() {
        return WireError::Timeout(e.to_string());
    }
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        msg.push_str(": ");
        msg.push_str(&err.to_string());
        source = err.source();
    }
    // Before the request went out (no connection, a request that could
    // not be built), or after (a reset mid-request, an answer cut short):
    // only the first says the remote never saw it.
    if e.is_connect() || e.is_builder() {
        WireError::Connect(msg)
    } else {
        WireError::Interrupted(msg)
    }
}

/// The resolver refused a name because every address it had was private.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves only to private, loopback or link-local addresses")]
struct PrivateAddress(String);

/// Resolves with the system resolver, then drops forbidden addresses, so a
/// declared name pointing at 127.0.0.1 or 169.254.169.254 cannot reach it.
struct FilteringResolver {
    allow_private_hosts: bool,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private_hosts;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> Box<dyn StdError + Send + Sync> { Box::new(e) })?
                .collect();
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| allow_private || !is_forbidden_ip(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(PrivateAddress(host)) as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(url: &str) -> WireRequest {
        WireRequest {
            method: http::Method::GET,
            url: url::Url::parse(url).unwrap(),
            headers: vec![],
            body: None,
            timeout: Duration::from_secs(2),
            max_response_bytes: 1024,
        }
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let transport = ReqwestTransport::new(Duration::from_secs(1), false).unwrap();
        // The policy refuses `localhost` by name too; this checks the second
        // line of defence, the resolver, on its own.
        let err = transport
            .send(request(&format!("http://localhost:{port}/")))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WireError::Denied(m) if m.contains("private")),
            "{err:?}"
        );
        let accepted = tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
        assert!(accepted.is_err(), "no connection may be made");
    }

    #[tokio::test]
    async fn oversized_bodies_are_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            // No content-length: the limit must be enforced while streaming.
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await;
            let _ = socket.write_all(&[b'x'; 4096]).await;
        });
        let transport = ReqwestTransport::new(Duration::from_secs(1), true).unwrap();
        let err = transport
            .send(request(&format!("http://localhost:{port}/")))
            .await
            .unwrap_err();
        assert!(matches!(err, WireError::TooLarge(_)), "{err:?}");
    }
}
