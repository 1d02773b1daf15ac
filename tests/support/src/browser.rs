//! A real headless browser for the console's tests: Debian's `chromium`
//! driven over WebDriver by `chromedriver` (both installed by
//! `scripts/setup.sh --test`).
//!
//! The browser's network is fenced: every request for a host other than
//! the loopback goes to a "trap" proxy that refuses it and records what was
//! asked, so a test can assert a page loaded nothing from elsewhere.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
pub use thirtyfour;
use thirtyfour::{ChromiumLikeCapabilities, DesiredCapabilities, WebDriver};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Hosts chromium itself calls, whatever the page.
const BROWSER_SERVICES: &[&str] = &[
    "clients2.google.com",
    "accounts.google.com",
    "update.googleapis.com",
    "content-autofill.googleapis.com",
    "safebrowsing.googleapis.com",
    "optimizationguide-pa.googleapis.com",
    "clientservices.googleapis.com",
    "redirector.gvt1.com",
    "start.duckduckgo.com",
];

/// A chromedriver process, a browser session on it, and the trap proxy.
pub struct Browser {
    pub driver: WebDriver,
    chromedriver: Child,
    trapped: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

fn binary(env: &str, candidates: &[&str]) -> anyhow::Result<String> {
    if let Ok(path) = std::env::var(env) {
        return Ok(path);
    }
    candidates
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map(|p| (*p).to_owned())
        .with_context(|| {
            format!("none of {candidates:?} exists (set {env}); run scripts/setup.sh --test")
        })
}

/// Accepts proxy connections, records the request line (`CONNECT host:443`
/// or `GET http://host/...`) and refuses it.
async fn trap(listener: TcpListener, trapped: Arc<Mutex<Vec<String>>>) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let trapped = Arc::clone(&trapped);
        tokio::spawn(async move {
            let mut buffer = [0u8; 2048];
            let n = socket.read(&mut buffer).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&buffer[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            if !line.is_empty() {
                trapped.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
            let _ = socket
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
        });
    }
}

impl Browser {
    /// Starts chromedriver and a headless chromium at 1280x900 whose
    /// requests to other hosts all end at the trap.
    pub async fn start() -> anyhow::Result<Self> {
        let chromedriver = binary("CHROMEDRIVER", &["/usr/bin/chromedriver"])?;
        let chromium = binary("CHROMIUM", &["/usr/bin/chromium"])?;
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.port()
        };
        // A group of its own, which chromium joins: a test that fails
        // before `quit` leaves no browser behind (see `Drop`).
        let child = Command::new(&chromedriver)
            .process_group(0)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {chromedriver}"))?;
        let status_url = format!("http://127.0.0.1:{port}/status");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while reqwest::get(&status_url).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                bail!("chromedriver did not answer on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let trap_addr: SocketAddr = listener.local_addr()?;
        let trapped = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(trap(listener, Arc::clone(&trapped)));
        let profile = tempfile::tempdir()?;
        let mut caps = DesiredCapabilities::chrome();
        caps.set_binary(&chromium)?;
        for arg in [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-sync",
            "--disable-extensions",
            "--disable-client-side-phishing-detection",
            "--disable-domain-reliability",
            "--no-pings",
            "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,NetworkPrediction",
            &format!("--user-data-dir={}", profile.path().display()),
            // Loopback is always reached directly; everything else goes to the trap.
            &format!("--proxy-server=http://{trap_addr}"),
        ] {
            caps.add_arg(arg)?;
        }
        let driver = WebDriver::new(format!("http://127.0.0.1:{port}"), caps)
            .await
            .context("starting a chromium session")?;
        Ok(Self {
            driver,
            chromedriver: child,
            trapped,
            _profile: profile,
        })
    }

    /// What pages tried to fetch from hosts other than the loopback: the
    /// trapped request lines, less chromium's own service traffic (update
    /// checks, autofill, sign-in, the default search engine's preconnect),
    /// which no page asks for.
    pub fn trapped(&self) -> Vec<String> {
        self.trapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|line| !BROWSER_SERVICES.iter().any(|host| line.contains(host)))
            .cloned()
            .collect()
    }

    /// Ends the session and stops chromedriver.
    pub async fn quit(self) {
        let _ = self.driver.clone().quit().await;
    }
}

impl Drop for Browser {
    /// Kills chromedriver's process group: chromedriver and the chromium
    /// it started, whose session a failed test never ended (killing
    /// chromedriver alone left chromium running).
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.chromedriver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.chromedriver.wait();
    }
}
