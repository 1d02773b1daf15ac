//! A throw-away PostgreSQL cluster for tests: `initdb` in a temp dir, a free
//! loopback port, `fsync` on (tests must exercise the durable path), and a
//! fresh database per test.
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the cluster
//! runs as the `postgres` user (`runuser -u postgres --`) in a directory that
//! user owns. A small shell watchdog stops the server when the process that
//! started it exits, so a cluster kept in a `static` (which Rust never drops)
//! does not outlive the test binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Where the Debian packages put the server binaries.
const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// Stops the server once the owning process is gone, then removes the data.
const WATCHDOG: &str = r#"
"$BIN/postgres" -D "$DATA" -p "$PORT" -k "$SOCKETS" \
    -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400 \
    -c shared_buffers=128MB -c log_min_messages=warning $EXTRA 2>"$ROOT/postgres.log" &
pg=$!
while kill -0 "$pg" 2>/dev/null && [ ! -e "$DATA/postmaster.pid" ]; do sleep 0.1; done
# Exited before it ran (its port taken in between, say): its log goes to
# the test's stderr before the directory goes, and the start is retried.
if ! kill -0 "$pg" 2>/dev/null; then
    echo "postgres on port $PORT exited at start:" >&2
    cat "$ROOT/postgres.log" >&2
    rm -rf "$ROOT" 2>/dev/null
    exit 1
fi
# Runs while the owner lives and the server runs, or is paused (see
# `PgCluster::pause`): a resumed server is a new process, so its pid file
# is what is watched.
while [ -d "/proc/$OWNER" ] && { [ -e "$ROOT/paused" ] || [ -e "$DATA/postmaster.pid" ]; }; do sleep 0.5; done
# Immediate shutdown: the data is thrown away, a checkpoint would only cost time.
"$BIN/pg_ctl" stop -D "$DATA" -m immediate -w >/dev/null 2>&1
wait "$pg" 2>/dev/null
rm -rf "$ROOT" 2>/dev/null
"#;

/// A running cluster.
pub struct PgCluster {
    root: PathBuf,
    port: u16,
    bin: PathBuf,
    watchdog: Option<Child>,
    as_postgres: bool,
}

/// The cluster shared by every test of one test binary.
static SHARED: OnceLock<PgCluster> = OnceLock::new();

impl PgCluster {
    /// The binary's shared cluster, started on first use.
    ///
    /// # Panics
    /// If PostgreSQL cannot start: a test without its database cannot run.
    pub fn shared() -> &'static PgCluster {
        SHARED.get_or_init(|| Self::start().expect("starting the throw-away PostgreSQL cluster"))
    }

    /// Starts a new cluster (blocking; takes about a second). A server
    /// that exits at start (its port, free when picked, taken before it
    /// bound: parallel tests pick ports too) is started again on another,
    /// twice at most.
    pub fn start() -> anyhow::Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            match free_port().and_then(Self::start_on) {
                Err(error) if tries < 3 => {
                    eprintln!("starting the throw-away PostgreSQL again: {error:#}");
                }
                started => return started,
            }
        }
    }

    fn start_on(port: u16) -> anyhow::Result<Self> {
        let bin = std::env::var_os("FERRY_PG_BIN")
            .map_or_else(|| PathBuf::from(DEFAULT_BIN_DIR), PathBuf::from);
        let as_postgres = running_as_root();
        // Not a `TempDir`: the watchdog removes it, possibly after we exit.
        let root = tempfile::Builder::new()
            .prefix("ferry-pg-")
            .tempdir()
            .context("creating the cluster directory")?
            .keep();
        if as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(&root))?;
        }
        let data = root.join("data");
        let mut initdb = command(as_postgres, &bin.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb).context("initdb")?;

        let mut shell = command(as_postgres, Path::new("/bin/sh"));
        shell
            .args(["-c", WATCHDOG])
            .env("BIN", &bin)
            .env("DATA", &data)
            .env("PORT", port.to_string())
            .env("SOCKETS", &root)
            .env("ROOT", &root)
            .env("OWNER", std::process::id().to_string())
            // Extra server options for benchmarks, e.g.
            // `-c shared_preload_libraries=pg_stat_statements`.
            .env(
                "EXTRA",
                std::env::var("FERRY_PG_OPTIONS").unwrap_or_default(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let watchdog = shell.spawn().context("starting postgres")?;
        let mut cluster = Self {
            root,
            port,
            bin,
            watchdog: Some(watchdog),
            as_postgres,
        };
        let started = Instant::now();
        loop {
            // The watchdog ends this early only when the server never ran.
            if let Some(watchdog) = &mut cluster.watchdog {
                if let Some(status) = watchdog.try_wait().context("watching postgres")? {
                    cluster.watchdog = None;
                    bail!(
                        "postgres exited at start on port {} ({status}; its log is on stderr)",
                        cluster.port
                    );
                }
            }
            match cluster.wait_ready(Duration::from_millis(500)) {
                Ok(()) => return Ok(cluster),
                Err(error) if started.elapsed() > Duration::from_secs(60) => return Err(error),
                Err(_) => {}
            }
        }
    }

    fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-q",
                ])
                .status()
                .context("running pg_isready")?;
            if ready.success() {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "postgres did not become ready on port {} within {timeout:?}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` (superuser `postgres`, trust auth).
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let name = format!("test_{}", uuid_like());
        let status = tokio::process::Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args([
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                &format!("CREATE DATABASE {name}"),
            ])
            .stdout(Stdio::null())
            .status()
            .await
            .context("running psql")?;
        if !status.success() {
            bail!("CREATE DATABASE {name} failed");
        }
        Ok(self.url(&name))
    }

    /// Stops the server (fast shutdown) and keeps its data, so
    /// [`PgCluster::resume`] can start it again: an outage, for tests.
    pub fn pause(&self) -> anyhow::Result<()> {
        std::fs::write(self.root.join("paused"), b"").context("marking the cluster paused")?;
        if self.as_postgres {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(self.root.join("paused")))?;
        }
        let mut stop = command(self.as_postgres, &self.bin.join("pg_ctl"));
        stop.arg("stop")
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "fast", "-w"]);
        run(&mut stop).context("pg_ctl stop")
    }

    /// Starts a paused server again on the same port.
    pub fn resume(&self) -> anyhow::Result<()> {
        let mut start = command(self.as_postgres, &self.bin.join("pg_ctl"));
        start
            .arg("start")
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.root.join("postgres-resumed.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=400",
                self.port,
                self.root.display()
            ))
            .arg("-w")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Not `run`: the server it leaves behind must not hold a pipe open.
        let started = start.status().context("running pg_ctl start")?;
        if !started.success() {
            bail!("pg_ctl start failed: {started}");
        }
        let _ = std::fs::remove_file(self.root.join("paused"));
        self.wait_ready(Duration::from_secs(60))
    }

    /// The directory holding the cluster.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut stop = command(self.as_postgres, &self.bin.join("pg_ctl"));
        stop.arg("stop")
            .arg("-D")
            .arg(self.root.join("data"))
            .args(["-m", "immediate", "-w"]);
        let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn command(as_postgres: bool, program: &Path) -> Command {
    if as_postgres {
        // Where Debian keeps it (util-linux), else on PATH: setup takes
        // /sbin/runuser as there, and a root whose PATH lacks /sbin (cron,
        // a minimal runner) failed every PostgreSQL test with ENOENT.
        let runuser = ["/usr/sbin/runuser", "/sbin/runuser"]
            .into_iter()
            .find(|p| Path::new(p).is_file())
            .unwrap_or("runuser");
        let mut command = Command::new(runuser);
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A free loopback port (the OS picks; another process may take it before
/// postgres binds: [`PgCluster::start`] then starts again on another).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    /// A server whose port is taken exits at start: that is known at once,
    /// with its log on stderr, not after a minute of "not ready" with the
    /// log deleted.
    #[test]
    fn a_taken_port_fails_the_start_at_once() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let port = taken.local_addr().expect("its address").port();
        let error = super::PgCluster::start_on(port)
            .err()
            .expect("the port is taken");
        assert!(error.to_string().contains("exited at start"), "{error:#}");
    }
}
