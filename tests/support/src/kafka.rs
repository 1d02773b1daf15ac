//! A real Kafka-protocol broker for tests: tansu (one Rust binary, installed
//! by `scripts/tansu.sh`) on a free 127.0.0.1 port, with its log in a temp
//! directory. By default it stores everything (topics, records, committed
//! consumer-group offsets) in a SQLite file in that directory, so a test can
//! [`Broker::stop`] it and [`Broker::start_again`] on the same port and find
//! its data again; [`Storage::Memory`] starts empty after each restart.
//!
//! The broker runs as a child process, killed on drop; a small shell
//! watchdog also kills it when the test binary exits without dropping it
//! (a broker kept in a `static`). Its log filter is `TANSU_LOG` (default
//! `warn`), not the test's `RUST_LOG`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Kills the broker and removes its directory once the test process is
/// gone. A broker that dies while the test runs (a test's restart kills this
/// watchdog first) keeps its directory.
const WATCHDOG: &str = r#"
while [ -d "/proc/$OWNER" ] && kill -0 "$BROKER" 2>/dev/null; do sleep 0.5; done
if [ ! -d "/proc/$OWNER" ]; then
  kill -9 "$BROKER" 2>/dev/null
  rm -rf "$DIR"
fi
"#;

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A SQLite file in the broker's temp directory (tansu's `libsql`
    /// engine): survives a restart.
    Sqlite,
    /// tansu's in-memory engine: a restart starts from nothing.
    Memory,
}

/// A tansu broker with its own directory and port.
pub struct Broker {
    bin: PathBuf,
    storage: Storage,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    log: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    starts: u32,
}

impl Broker {
    /// Starts a broker with persistent ([`Storage::Sqlite`]) storage and
    /// waits until it answers Kafka requests.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Storage::Sqlite)
    }

    /// Starts a broker with the given storage.
    pub fn start_with(storage: Storage) -> anyhow::Result<Self> {
        let bin = tansu_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("ferry-tansu-")
            .tempdir()
            .context("creating the broker directory")?;
        let port = crate::postgres::free_port()?;
        let log = dir.path().join("tansu.log");
        let mut broker = Self {
            bin,
            storage,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            log,
            child: None,
            watchdog: None,
            starts: 0,
        };
        broker.start_again()?;
        Ok(broker)
    }

    /// `host:port` for the client's `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// The port it listens on (127.0.0.1), the same across restarts.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where the data lives.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// Whether topics, records and offsets survive [`Broker::stop`].
    pub fn persistent(&self) -> bool {
        self.storage == Storage::Sqlite
    }

    /// The broker's log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the broker (SIGKILL: as abrupt as a crash; SQLite's journal
    /// keeps what was committed). Clients see the connection drop and the
    /// port refuse connections until [`Broker::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port with the same storage (a
    /// no-op if it is running) and waits until it answers.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.stop();
        let storage_url = match self.storage {
            // tansu resolves a sqlite URL's host and path against its
            // working directory, which is the broker's own directory.
            Storage::Sqlite => "sqlite://./tansu.db",
            Storage::Memory => "memory://tansu/",
        };
        let listener = format!("tcp://{}", self.addr);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        self.starts += 1;
        writeln!(log, "---- ferry: start #{} ({storage_url})", self.starts)?;
        let mut command = Command::new(&self.bin);
        command
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            .args(["--storage-engine", storage_url])
            .arg("--silent")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // tansu reads its settings from the environment too: keep a
        // developer's shell from changing the broker under test.
        for var in [
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
            "DATA_LAKE",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            command.env_remove(var);
        }
        // A test's RUST_LOG is meant for ferry; tansu at info logs every
        // request. TANSU_LOG sets the broker's own filter.
        let filter = std::env::var("TANSU_LOG").unwrap_or_else(|_| "warn".to_owned());
        command.env("RUST_LOG", filter);
        let child = command
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        let watchdog = Command::new("/bin/sh")
            .args(["-c", WATCHDOG])
            .env("OWNER", std::process::id().to_string())
            .env("BROKER", child.id().to_string())
            .env("DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the broker watchdog")?;
        self.child = Some(child);
        self.watchdog = Some(watchdog);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last_error = String::from("not tried");
        while Instant::now() < deadline {
            if !self.is_running() {
                let log = self.log_tail();
                self.stop();
                // An install from before scripts/tansu.sh asked for libsql.
                let hint = if log.contains("FeatureNotEnabled") {
                    "this tansu lacks a storage feature: run scripts/tansu.sh; "
                } else {
                    ""
                };
                bail!(
                    "tansu exited while starting ({hint}log: {}):\n{log}",
                    self.log.display()
                );
            }
            match api_versions(self.addr) {
                Ok(()) => return Ok(()),
                Err(err) => last_error = format!("{err:#}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = self.log_tail();
        self.stop();
        bail!(
            "tansu did not answer on {} within {limit:?} ({last_error}; log: {}):\n{log}",
            self.addr,
            self.log.display()
        )
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tansu binary: `$FERRY_TANSU`, else the one `scripts/tansu.sh`
/// installs under `${FERRY_CACHE_DIR:-$HOME/.cache/ferry}`, else `tansu` on
/// `PATH`.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FERRY_TANSU") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("FERRY_TANSU={} is not a file", path.display());
    }
    let cache = std::env::var_os("FERRY_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache/ferry")));
    if let Some(cache) = cache {
        let path = cache.join("tools/tansu/bin/tansu");
        if path.is_file() {
            return Ok(path);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let path = dir.join("tansu");
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!("no tansu binary (FERRY_TANSU, the cache or PATH): run scripts/tansu.sh")
}

/// Sends a Kafka `ApiVersions` v0 request and checks the answer: a broker
/// that accepts connections may not serve requests yet.
fn api_versions(addr: SocketAddr) -> anyhow::Result<()> {
    const API_VERSIONS: i16 = 18;
    const CORRELATION: i32 = 0x0fe7_7e57;
    const CLIENT: &[u8] = b"ferry-test";
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    // Request header v1: api key, api version, correlation id, client id
    // (int16 length + bytes); the v0 body is empty.
    let mut frame = Vec::new();
    frame.extend_from_slice(&API_VERSIONS.to_be_bytes());
    frame.extend_from_slice(&0i16.to_be_bytes());
    frame.extend_from_slice(&CORRELATION.to_be_bytes());
    frame.extend_from_slice(&(CLIENT.len() as i16).to_be_bytes());
    frame.extend_from_slice(CLIENT);
    let mut request = (frame.len() as i32).to_be_bytes().to_vec();
    request.extend_from_slice(&frame);
    stream.write_all(&request)?;

    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .context("reading the reply size")?;
    let size = i32::from_be_bytes(size);
    if !(6..=1 << 20).contains(&size) {
        bail!("implausible ApiVersions reply size {size}");
    }
    let mut reply = vec![0u8; size as usize];
    stream.read_exact(&mut reply).context("reading the reply")?;
    let correlation = i32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
    let error_code = i16::from_be_bytes([reply[4], reply[5]]);
    if correlation != CORRELATION {
        bail!("ApiVersions reply has correlation id {correlation}");
    }
    if error_code != 0 {
        bail!("ApiVersions answered error code {error_code}");
    }
    Ok(())
}
