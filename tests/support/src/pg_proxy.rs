//! A TCP proxy in front of PostgreSQL that can lose one answer after the
//! server has acted on it: the statement runs and commits, and the client
//! sees its connection drop instead of the result. That is what a network
//! cut, or a server-side timeout between the commit and the reply, does to a
//! client, and what "committed but the answer was lost" tests need.
//!
//! [`PgProxy::lose_next_answer_to`] arms the proxy with a fragment of SQL.
//! The first connection that sends a message containing it (a `Parse` or a
//! simple `Query`, so use it on a statement the connection has not prepared
//! yet) is watched: the server's replies are read message by message, and
//! the first reply cycle holding a `CommandComplete` (`C`) is held back
//! until its `ReadyForQuery` (`Z`), by which point the implicit transaction
//! has committed; then both sockets close. A reply cycle without a
//! `CommandComplete` (a `Describe` while preparing) is passed on.
//!
//! [`PgProxy::drop_next`] cuts the connection that sends the next message
//! containing a fragment of SQL, before the server sees it: the statement
//! never runs, and the client sees its connection drop (a network cut, a
//! proxy restarting).
//!
//! [`PgProxy::hold_next`] holds the next message containing a fragment of
//! SQL before the server sees it, until the test releases it: a statement
//! made to run after something else the test does, at a point the code
//! under test offers no hook for.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The proxy; it stops when dropped.
pub struct PgProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<Option<Vec<u8>>>,
    lost: AtomicUsize,
    hold: Mutex<Option<(Vec<u8>, Hold)>>,
    cut: Mutex<Option<Vec<u8>>>,
    dropped: AtomicUsize,
}

/// A statement held by [`PgProxy::hold_next`].
#[derive(Clone, Default)]
pub struct Hold {
    reached: Arc<Notify>,
    go: Arc<Notify>,
}

impl Hold {
    /// Waits until the statement has reached the proxy (and is held).
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the statement go on to the server.
    pub fn release(&self) {
        self.go.notify_one();
    }
}

impl PgProxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`port`.
    pub async fn start(port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = Arc::clone(&accepting);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await {
                        relay(client, server, shared).await;
                    }
                });
            }
        });
        Ok(Self { addr, shared, task })
    }

    /// `database_url` (a `postgres://user@127.0.0.1:port/name` URL) made to
    /// go through this proxy, without TLS (the proxy reads the messages).
    pub fn url(&self, database_url: &str) -> String {
        let (scheme, rest) = database_url.split_once("://").expect("a URL");
        let (authority, path) = rest.split_once('/').expect("a database name");
        let user = authority
            .rsplit_once('@')
            .map(|(user, _)| format!("{user}@"));
        let separator = if path.contains('?') { '&' } else { '?' };
        format!(
            "{scheme}://{}{}/{path}{separator}sslmode=disable",
            user.unwrap_or_default(),
            self.addr
        )
    }

    /// Loses the answer to the next statement whose text contains
    /// `fragment` (see the module docs).
    pub fn lose_next_answer_to(&self, fragment: &str) {
        *self.shared.armed.lock().expect("armed") = Some(fragment.as_bytes().to_vec());
    }

    /// Holds the next message whose text contains `fragment` before it
    /// reaches the server, until [`Hold::release`] (use it on a statement
    /// the connection has not prepared yet, as for a lost answer).
    pub fn hold_next(&self, fragment: &str) -> Hold {
        let hold = Hold::default();
        *self.shared.hold.lock().expect("hold") =
            Some((fragment.as_bytes().to_vec(), hold.clone()));
        hold
    }

    /// Cuts the connection that sends the next statement whose text
    /// contains `fragment`, before the server sees it (see the module docs).
    pub fn drop_next(&self, fragment: &str) {
        *self.shared.cut.lock().expect("cut") = Some(fragment.as_bytes().to_vec());
    }

    /// How many connections [`PgProxy::drop_next`] cut so far.
    pub fn connections_cut(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// How many answers were lost so far.
    pub fn answers_lost(&self) -> usize {
        self.shared.lost.load(Ordering::SeqCst)
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let watching = AtomicBool::new(false);
    let requests = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            {
                let mut cut = shared.cut.lock().expect("cut");
                if cut
                    .as_deref()
                    .is_some_and(|fragment| contains(chunk, fragment))
                {
                    *cut = None;
                    shared.dropped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            let held = {
                let mut hold = shared.hold.lock().expect("hold");
                let hit = hold
                    .as_ref()
                    .is_some_and(|(fragment, _)| contains(chunk, fragment));
                if hit {
                    hold.take().map(|(_, hold)| hold)
                } else {
                    None
                }
            };
            if let Some(hold) = held {
                hold.reached.notify_one();
                hold.go.notified().await;
            }
            {
                let mut armed = shared.armed.lock().expect("armed");
                let hit = armed
                    .as_deref()
                    .is_some_and(|fragment| contains(chunk, fragment));
                if hit {
                    *armed = None;
                    watching.store(true, Ordering::SeqCst);
                }
            }
            if server_write.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    let replies = async {
        let mut buf = vec![0u8; 64 * 1024];
        // Bytes of the reply cycle being watched, not yet passed on.
        let mut held: Vec<u8> = Vec::new();
        let mut parsed = 0;
        let mut completed = false;
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if !watching.load(Ordering::SeqCst) {
                if client_write.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                continue;
            }
            held.extend_from_slice(&buf[..n]);
            // Whole messages: a type byte, then a length that counts itself.
            while held.len() >= parsed + 5 {
                let kind = held[parsed];
                let length = u32::from_be_bytes(
                    held[parsed + 1..parsed + 5].try_into().expect("four bytes"),
                ) as usize;
                if held.len() < parsed + 1 + length {
                    break;
                }
                parsed += 1 + length;
                match kind {
                    b'C' => completed = true,
                    b'Z' if completed => {
                        shared.lost.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    b'Z' => {
                        if client_write.write_all(&held[..parsed]).await.is_err() {
                            return;
                        }
                        held.drain(..parsed);
                        parsed = 0;
                    }
                    _ => {}
                }
            }
        }
    };
    // Whichever side ends first ends the connection: a lost answer drops
    // the client's socket and the server's.
    tokio::select! {
        () = requests => {}
        () = replies => {}
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
