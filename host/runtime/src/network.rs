//! The production transport (feature `network`): reqwest with rustls, and
//! a resolver that refuses names resolving to private addresses. Builds
//! without it (the SDK's test kit) bring their own [`HttpTransport`].

use std::collections::HashMap;
use std::error::Error as StdError;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
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
                lookups: Lookups::new(MAX_LOOKUPS, MAX_LOOKUPS_PER_NAME, MAX_LOOKUPS_PER_CONNECTOR),
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

/// How many name lookups run at once, in all, of one name, and for one
/// connector. The system resolver holds a thread of tokio's blocking pool
/// until it answers or gives up (10 to 30 s for a name whose servers never
/// answer), and a request that times out does not end it: unbounded, a
/// connector whose remote's DNS hung took the pool's 512 threads, and
/// every other connector's lookups, the components' compiles and Kafka's
/// commits queued behind it. Bounded by name alone, a connector declaring
/// eight names under a domain whose servers never answer took every
/// overall permit, and every other connector's new connections failed at
/// their connect timeout, their remotes taken for down. Past any bound a
/// lookup waits (holding no thread), within its request's connect timeout.
const MAX_LOOKUPS: usize = 64;
const MAX_LOOKUPS_PER_NAME: usize = 8;
const MAX_LOOKUPS_PER_CONNECTOR: usize = 8;

type Shares = Arc<Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>>;

/// Semaphores by key (a name, a connector), made on first use and
/// forgotten once nobody holds or waits for them.
#[derive(Clone)]
struct Shared {
    by_key: Shares,
    per_key: usize,
}

impl Shared {
    fn new(per_key: usize) -> Self {
        Self {
            by_key: Shares::default(),
            per_key,
        }
    }

    /// `key`'s semaphore, made if new.
    fn of(&self, key: &str) -> Arc<tokio::sync::Semaphore> {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        // A wait given up may have dropped its key's last clone after its
        // `Held` looked: keys nobody holds are forgotten here too.
        by_key.retain(|_, share| Arc::strong_count(share) > 1);
        let per_key = self.per_key;
        Arc::clone(
            by_key
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(per_key))),
        )
    }

    /// Forgets `key` if nobody holds or waits for it (a waiter took its
    /// clone under this lock).
    fn release(&self, key: &str) {
        let mut by_key = self.by_key.lock().unwrap_or_else(|e| e.into_inner());
        if by_key
            .get(key)
            .is_some_and(|share| Arc::strong_count(share) == 1)
        {
            by_key.remove(key);
        }
    }
}

/// The lookups in flight: permits of the overall bound, each name's and
/// each connector's.
#[derive(Clone)]
struct Lookups {
    all: Arc<tokio::sync::Semaphore>,
    names: Shared,
    owners: Shared,
}

/// One lookup's permits, held by the thread that resolves until the
/// resolver answers (or by the wait for them, until its request gives
/// up). Dropped, a name or connector nobody else holds or waits for is
/// forgotten.
struct Held {
    permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    names: Shared,
    owners: Shared,
    name: String,
    owner: Arc<str>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.permits.clear();
        self.names.release(&self.name);
        self.owners.release(&self.owner);
    }
}

impl Lookups {
    fn new(all: usize, per_name: usize, per_owner: usize) -> Self {
        Self {
            all: Arc::new(tokio::sync::Semaphore::new(all)),
            names: Shared::new(per_name),
            owners: Shared::new(per_owner),
        }
    }

    /// Runs `lookup` of `name` for `owner` on the blocking pool, within
    /// the bounds.
    async fn run<T: Send + 'static>(
        &self,
        owner: Arc<str>,
        name: String,
        lookup: impl FnOnce(&str) -> std::io::Result<T> + Send + 'static,
    ) -> std::io::Result<T> {
        let name_share = self.names.of(&name);
        let owner_share = self.owners.of(&owner);
        let mut held = Held {
            permits: Vec::with_capacity(3),
            names: self.names.clone(),
            owners: self.owners.clone(),
            name,
            owner,
        };
        // The connector's share first, then the name's: a connector whose
        // lookups hang waits on its own, holding no permit of a name it
        // shares with others (taken first, its waits held `api.stripe.com`'s
        // share from every connector that resolves it); a name whose
        // lookups hang cannot queue more than its share for the overall
        // bound.
        for share in [owner_share, name_share, Arc::clone(&self.all)] {
            let permit = share.acquire_owned().await.map_err(std::io::Error::other)?;
            held.permits.push(permit);
        }
        tokio::task::spawn_blocking(move || {
            let held = held;
            lookup(&held.name)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// Resolves with the system resolver, then drops forbidden addresses, so a
/// declared name pointing at 127.0.0.1 or 169.254.169.254 cannot reach it.
struct FilteringResolver {
    allow_private_hosts: bool,
    lookups: Lookups,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private_hosts;
        let host = name.as_str().to_owned();
        let lookups = self.lookups.clone();
        let owner = super::transport::request_owner();
        #[cfg(test)]
        tests::OWNERS_SEEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((host.clone(), owner.clone()));
        Box::pin(async move {
            let lookup = |host: &str| {
                (host, 0)
                    .to_socket_addrs()
                    .map(Iterator::collect::<Vec<SocketAddr>>)
            };
            let addrs = lookups
                .run(owner, host.clone(), lookup)
                .await
                .map_err(|e| -> Box<dyn StdError + Send + Sync> { Box::new(e) })?;
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

    fn owner() -> Arc<str> {
        Arc::from("c")
    }

    /// The connector each name the resolver was asked for was resolved for.
    pub(super) static OWNERS_SEEN: Mutex<Vec<(String, Arc<str>)>> = Mutex::new(Vec::new());

    /// reqwest resolves a request's name as the request is first polled,
    /// within the connector's scope: the lookup counts against its share.
    #[tokio::test]
    async fn a_lookup_counts_against_the_connector_that_asked() {
        let transport = ReqwestTransport::new(Duration::from_secs(1), false).unwrap();
        let sent = crate::transport::with_owner(
            Arc::from("asking-connector"),
            transport.send(request("http://owner-check.localhost:9/")),
        );
        let _ = sent.await;
        let seen = OWNERS_SEEN.lock().unwrap().clone();
        assert!(
            seen.iter()
                .any(|(host, owner)| host == "owner-check.localhost"
                    && &**owner == "asking-connector"),
            "{seen:?}"
        );
    }

    /// A connector whose names all hang (several names under a domain
    /// whose servers never answer) holds its own share of the lookups and
    /// no more: its next lookup waits, whatever the name, while another
    /// connector's resolve.
    #[tokio::test]
    async fn hanging_lookups_hold_their_connectors_share_and_no_more() {
        let lookups = Lookups::new(4, 2, 2);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let mut hanging = Vec::new();
        for name in ["a.evil.example", "b.evil.example"] {
            let (lookups, released) = (lookups.clone(), Arc::clone(&released));
            hanging.push(tokio::spawn(async move {
                lookups
                    .run(Arc::from("evil"), name.to_owned(), move |_| {
                        released.lock().unwrap().recv().ok();
                        Ok(())
                    })
                    .await
            }));
        }
        while lookups.all.available_permits() != 2 {
            tokio::task::yield_now().await;
        }
        let waited = tokio::time::timeout(
            Duration::from_millis(50),
            lookups.run(Arc::from("evil"), "c.evil.example".to_owned(), |_| Ok(())),
        );
        assert!(waited.await.is_err(), "the connector's share is taken");
        assert_eq!(lookups.all.available_permits(), 2, "and no overall permit");
        // Its further lookups of a name another connector resolves too wait
        // on its own share, holding none of the name's.
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let lookups = lookups.clone();
            waiting.push(tokio::spawn(async move {
                lookups
                    .run(Arc::from("evil"), "api.shared.example".to_owned(), |_| {
                        Ok(())
                    })
                    .await
            }));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let shared = lookups.run(Arc::from("good"), "api.shared.example".to_owned(), |name| {
            Ok(name.to_owned())
        });
        let shared = tokio::time::timeout(Duration::from_secs(5), shared).await;
        assert_eq!(
            shared.expect("the shared name's share is free").unwrap(),
            "api.shared.example"
        );
        let other = lookups.run(Arc::from("good"), "api.example".to_owned(), |name| {
            Ok(name.to_owned())
        });
        assert_eq!(other.await.unwrap(), "api.example");
        for _ in 0..2 {
            release.send(()).unwrap();
        }
        for lookup in hanging.into_iter().chain(waiting) {
            lookup.await.unwrap().unwrap();
        }
        let after = lookups.run(Arc::from("evil"), "c.evil.example".to_owned(), |_| Ok(()));
        after.await.expect("its share is back");
        assert!(lookups.owners.by_key.lock().unwrap().is_empty());
        assert_eq!(lookups.all.available_permits(), 4);
    }

    /// Lookups that never answer hold a name's share of threads and no
    /// more: the next of that name waits (holding no thread), another name
    /// still resolves, and a wait given up or a lookup answered gives its
    /// share back.
    #[tokio::test]
    async fn hanging_lookups_hold_their_names_share_and_no_more() {
        let lookups = Lookups::new(3, 2, 3);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Arc::new(Mutex::new(released));
        let hang = |released: Arc<Mutex<std::sync::mpsc::Receiver<()>>>| {
            move |_: &str| {
                released.lock().unwrap().recv().ok();
                Ok(())
            }
        };
        let mut hanging = Vec::new();
        for _ in 0..2 {
            let lookups = lookups.clone();
            let lookup = hang(Arc::clone(&released));
            hanging.push(tokio::spawn(async move {
                lookups
                    .run(owner(), "hang.example".to_owned(), lookup)
                    .await
            }));
        }
        while lookups.all.available_permits() != 1 {
            tokio::task::yield_now().await;
        }
        // The name's share is taken: the next of it waits, and no thread
        // (no overall permit) goes to it.
        let waited = tokio::time::timeout(
            Duration::from_millis(50),
            lookups.run(owner(), "hang.example".to_owned(), |_| Ok(())),
        );
        assert!(waited.await.is_err(), "the name's share is taken");
        assert_eq!(lookups.all.available_permits(), 1);
        // The third permit: another name resolves.
        let other = lookups.run(owner(), "other.example".to_owned(), |name| {
            Ok(name.to_owned())
        });
        assert_eq!(other.await.unwrap(), "other.example");
        // Every permit held: a wait given up gives its name back.
        let third = hang(Arc::clone(&released));
        let blocking = {
            let lookups = lookups.clone();
            tokio::spawn(async move {
                lookups
                    .run(owner(), "third.example".to_owned(), third)
                    .await
            })
        };
        while lookups.all.available_permits() != 0 {
            tokio::task::yield_now().await;
        }
        let waited = tokio::time::timeout(
            Duration::from_millis(20),
            lookups.run(owner(), "late.example".to_owned(), |_| Ok(())),
        );
        assert!(waited.await.is_err(), "no permit is free");
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        for lookup in hanging {
            lookup.await.unwrap().unwrap();
        }
        blocking.await.unwrap().unwrap();
        let after = lookups.run(owner(), "hang.example".to_owned(), |_| Ok(()));
        after.await.expect("its share is back");
        assert!(
            lookups.names.by_key.lock().unwrap().is_empty(),
            "names nobody holds are forgotten"
        );
        assert_eq!(lookups.all.available_permits(), 3);
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
