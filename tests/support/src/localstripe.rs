//! A real `localstripe` (a stateful fake of Stripe's API, from PyPI) for
//! tests: one process per [`LocalStripe`] on a free 127.0.0.1 port, killed
//! on drop, plus the official `stripe` Python library's webhook signing.
//!
//! Python comes from the venv `scripts/python-deps.sh` creates (cached under
//! `${FERRY_CACHE_DIR:-$HOME/.cache/ferry}/venv-*`, one per pinned set).
//!
//! localstripe sends signed webhooks itself: `POST /_config/webhooks/{id}`
//! with `url`, `secret` and optionally `events[]` registers an endpoint, and
//! every later `customer.*` change is POSTed there about one second later,
//! with `Stripe-Signature: t={event.created},v1={hex HMAC-SHA256 of
//! "{t}.{body}"}` (see [`LocalStripe::register_webhook`]).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Runs localstripe's aiohttp app on a socket bound to 127.0.0.1:0 (the
/// stock `localstripe` command binds every interface on a fixed port),
/// prints the port, and turns off its pickling of the store to the shared
/// `/tmp/localstripe.pickle` so parallel instances stay independent. It exits
/// when its parent does, so an instance kept in a `static` cannot outlive
/// the test binary.
const SERVER: &str = r#"
import os, socket, sys, threading, time
import localstripe.resources as resources
resources.Store.dump_to_disk = lambda self: None
from localstripe.server import app
from aiohttp import web

parent = os.getppid()
def watch_parent():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch_parent, daemon=True).start()

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
web.run_app(app, sock=sock, print=None, access_log=None)
"#;

/// A running localstripe.
pub struct LocalStripe {
    child: Child,
    addr: SocketAddr,
}

impl LocalStripe {
    /// Starts a fresh, empty localstripe and waits until it accepts
    /// connections (at most 30 s).
    pub fn start() -> anyhow::Result<Self> {
        let python = venv_python()?;
        let mut child = Command::new(python)
            .arg("-c")
            .arg(SERVER)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .context("spawning localstripe")?;
        let stdout = child.stdout.take().context("localstripe stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading localstripe's port")?;
        let port: u16 = match line.trim().parse() {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("localstripe did not print its port (got {line:?})");
            }
        };
        let this = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        this.wait_ready(Duration::from_secs(30))?;
        Ok(this)
    }

    /// The base URL, e.g. `http://127.0.0.1:41234` (what the Stripe
    /// connector's `api_base` setting takes).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Registers a webhook endpoint: localstripe will POST every matching
    /// event to `url`, signed with `secret`. `events` filters by event type
    /// (`None`: all). Registering the same `id` again replaces it.
    pub async fn register_webhook(
        &self,
        id: &str,
        url: &str,
        secret: &str,
        events: Option<&[&str]>,
    ) -> anyhow::Result<()> {
        let mut form = vec![
            ("url".to_owned(), url.to_owned()),
            ("secret".to_owned(), secret.to_owned()),
        ];
        for (i, event) in events.unwrap_or_default().iter().enumerate() {
            form.push((format!("events[{i}]"), (*event).to_owned()));
        }
        let resp = reqwest::Client::new()
            .post(format!("{}/_config/webhooks/{id}", self.url()))
            .form(&form)
            .send()
            .await
            .context("registering a localstripe webhook")?;
        if !resp.status().is_success() {
            bail!("localstripe refused the webhook: HTTP {}", resp.status());
        }
        Ok(())
    }

    /// Deletes every object localstripe holds.
    pub async fn flush(&self) -> anyhow::Result<()> {
        let resp = reqwest::Client::new()
            .delete(format!("{}/_config/data", self.url()))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("localstripe flush failed: HTTP {}", resp.status());
        }
        Ok(())
    }

    fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        // The socket is bound before the app starts listening, so a
        // successful connect means the app is serving.
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("localstripe did not start listening on {}", self.addr)
    }
}

impl Drop for LocalStripe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The official `stripe` library's `Stripe-Signature` header for `payload`
/// signed with `secret` at `timestamp` (Unix seconds), computed by
/// `stripe.WebhookSignature.generate_signature_header` in Python.
pub fn official_signature_header(
    payload: &str,
    secret: &str,
    timestamp: i64,
) -> anyhow::Result<String> {
    let out = Command::new(venv_python()?)
        .arg("-c")
        .arg(
            "import sys, stripe\n\
             payload = sys.stdin.read()\n\
             print(stripe.WebhookSignature.generate_signature_header(\
             payload, sys.argv[1], int(sys.argv[2])))",
        )
        .arg(secret)
        .arg(timestamp.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(payload.as_bytes())?;
            }
            child.wait_with_output()
        })
        .context("running the stripe library")?;
    if !out.status.success() {
        bail!(
            "stripe library failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Whether the official `stripe` library accepts `header` for `payload` and
/// `secret` (its `WebhookSignature.verify_header`, default 300 s tolerance).
pub fn official_verify(payload: &str, header: &str, secret: &str) -> anyhow::Result<bool> {
    let out = Command::new(venv_python()?)
        .arg("-c")
        .arg(
            "import sys, stripe\n\
             payload = sys.stdin.read()\n\
             try:\n    stripe.WebhookSignature.verify_header(payload, sys.argv[1], sys.argv[2], 300)\n    print('ok')\n\
             except stripe.SignatureVerificationError:\n    print('refused')",
        )
        .arg(header)
        .arg(secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(payload.as_bytes())?;
            }
            child.wait_with_output()
        })
        .context("running the stripe library")?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "ok" => Ok(true),
        "refused" => Ok(false),
        _ => bail!(
            "stripe library failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The venv's python, creating the venv on first use (once per process).
pub fn venv_python() -> anyhow::Result<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| create_venv().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn create_venv() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/python-deps.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    let python = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !python.exists() {
        bail!("{} printed no usable python", script.display());
    }
    Ok(python)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn starts_serves_and_signs() {
        let stripe = LocalStripe::start().unwrap();
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/customers", stripe.url()))
            .bearer_auth("sk_test_ferry")
            .form(&[("name", "Ada")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["id"].as_str().unwrap().starts_with("cus_"));
        stripe
            .register_webhook("t", "http://127.0.0.1:9/hook", "whsec_x", None)
            .await
            .unwrap();

        let header = official_signature_header("{}", "whsec_x", 1_700_000_000).unwrap();
        assert!(header.starts_with("t=1700000000,v1="), "{header}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let fresh = official_signature_header("{}", "whsec_x", now).unwrap();
        assert!(official_verify("{}", &fresh, "whsec_x").unwrap());
        assert!(!official_verify("{}", &fresh, "whsec_y").unwrap());
    }
}
