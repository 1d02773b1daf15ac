//! The real `ferry` binary as a child process, configured through its
//! environment, for tests that kill it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `ferry serve` child process; SIGKILLed on drop.
pub struct FerryProcess {
    child: Option<Child>,
    env: BTreeMap<String, String>,
    /// Its working directory: not the repository, so nothing it finds
    /// comes from there by accident.
    dir: PathBuf,
    log: PathBuf,
    pub base: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl FerryProcess {
    /// Starts `ferry serve` with `env` (FERRY_* variables) plus a fresh
    /// port, logging into `log_dir`, and waits until it is ready.
    pub async fn start(env: BTreeMap<String, String>, log_dir: &Path) -> Self {
        let mut this = Self {
            child: None,
            env,
            dir: log_dir.to_owned(),
            log: log_dir.join(format!("ferry-{}.log", uuid::Uuid::new_v4().simple())),
            base: String::new(),
        };
        this.restart().await;
        this
    }

    /// Starts the process again (after [`FerryProcess::kill`]) on a new port.
    pub async fn restart(&mut self) {
        let port = free_port();
        self.base = format!("http://127.0.0.1:{port}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("serve")
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info,ferry=debug")
            .envs(&self.env)
            .env("FERRY_LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry");
        self.child = Some(child);
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "ferry exited with {status} at start; log: {}",
                    self.log_text()
                );
            }
            if let Ok(response) = client.get(format!("{}/readyz", self.base)).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("ferry did not become ready; log: {}", self.log_text());
    }

    /// SIGKILL: no graceful anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the process to exit;
    /// returns how long it took, or `None` if it was still running.
    pub async fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let child = self.child.as_mut()?;
        let started = std::time::Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The process log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for FerryProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
