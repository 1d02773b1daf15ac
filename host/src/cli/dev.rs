//! `ferry connector dev [DIR]`: the author's loop. Builds the connector
//! crate, checks the component, and serves a local ferry (embedded mode,
//! SQLite under `DIR/target/ferry-dev/`, private addresses allowed so the
//! connector can call a local fake, a master key of its own under the same
//! folder so that its secrets can be stored) with it registered next to the
//! bundled connectors, through the same door they use. With `--watch` it rebuilds
//! and reloads the connector when the crate's sources change.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Config;
use crate::registry::bundled::BundledFile;
use crate::registry::Registry;
use crate::store::connectors::Seeded;

/// How `dev` runs.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// The connector crate.
    pub dir: PathBuf,
    /// ferry's configuration file, if any.
    pub config_file: Option<PathBuf>,
    /// Rebuild and reload when the sources change.
    pub watch: bool,
}

/// Builds, checks, registers and serves until `cancel`.
pub async fn run(options: DevOptions, cancel: CancellationToken) -> anyhow::Result<()> {
    let dir = std::path::absolute(&options.dir)
        .with_context(|| format!("resolving {}", options.dir.display()))?;
    // Before the first build, which can take minutes: a file saved while
    // it runs is a change the loop must build.
    let mut built_from = Sources::of(&dir);
    let wasm = loop {
        match build(&dir).await {
            Ok(wasm) => break wasm,
            // Watching, a first build that fails (the loop started mid-edit)
            // waits for the fix, as a later one does; it ended the loop.
            Err(error) if options.watch => {
                eprintln!("not built: {error:#}; building again when a source changes");
                let seen = built_from.after_build(&dir);
                built_from = tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    changed = changed_from(&dir, seen) => changed,
                };
            }
            Err(error) => return Err(error),
        }
    };
    let built_from = built_from.after_build(&dir);
    let state_dir = dir.join("target/ferry-dev");
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    // Defaults for a local loop; the file and FERRY_* variables still win.
    let config = Config::load_with(
        options.config_file.as_deref(),
        json!({
            "database_url": own_database_url(&state_dir),
            "allow_private_hosts": true,
            "master_key": dev_master_key(&state_dir)?,
        }),
    )
    .context("loading configuration")?;
    let _sole = crate::store::lock_sqlite_file(config.database_url_exposed())?;
    // Only on its own database does the loop activate what it built over a
    // version chosen through the API: a shared one (FERRY_DATABASE_URL) keeps
    // its operators' choice.
    let take_over = config.database_url_exposed() == own_database_url(&state_dir);
    let built = Built {
        wasm: &wasm,
        take_over,
    };
    let (app, name) = App::build_serving(config, Some(built)).await?;
    let name = name.context("the built connector was not registered")?;
    let registry = app.state().registry.clone();
    let base = format!("http://{}", app.address());
    let body = registry
        .entry(&name)
        .map(|entry| settings_body(&entry))
        .unwrap_or_default();
    print_next_steps(&name, &base, &wasm, &body);
    let stop = app.cancellation_token();
    let server = tokio::spawn(app.run_until_stopped());
    let watching = options.watch.then(|| {
        tokio::spawn(watch(
            dir.clone(),
            built_from,
            registry,
            take_over,
            stop.clone(),
        ))
    });
    tokio::select! {
        () = cancel.cancelled() => stop.cancel(),
        () = stop.cancelled() => {}
    }
    if let Some(watching) = watching {
        watching.abort();
    }
    server.await.context("the server task failed")?
}

/// A component `ferry connector dev` built, to register as ferry starts.
pub struct Built<'a> {
    /// The component.
    pub wasm: &'a Path,
    /// Make it active even over a version chosen through the API (the
    /// loop's own database only).
    pub take_over: bool,
}

/// The loop's own database, under the crate's `target/ferry-dev/`.
fn own_database_url(state_dir: &Path) -> String {
    format!("sqlite://{}", state_dir.join("ferry.db").display())
}

/// The local loop's master key, so that the connector's secrets can be
/// stored: made once (32 random bytes, hex, owner-only) and kept beside
/// the dev database, whose secrets it opens. Only for this loop: `ferry
/// serve` has no such default.
fn dev_master_key(state_dir: &Path) -> anyhow::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let path = state_dir.join("master.key");
    match std::fs::read_to_string(&path) {
        Ok(key) if !key.trim().is_empty() => return Ok(key.trim().to_owned()),
        Ok(_) => anyhow::bail!("{} is empty: remove it to make a new key", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let key = hex::encode(bytes);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(key.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

async fn build(dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = dir.to_owned();
    eprintln!("building {} for wasm32-wasip2 ...", dir.display());
    tokio::task::spawn_blocking(move || crate::runtime::build::component(&dir, false))
        .await
        .context("the build task failed")?
        .map_err(anyhow::Error::msg)
}

/// Registers the built component as a bundled one (so a rebuild with the
/// same version replaces it), makes it the active version (over a version
/// chosen through the API only if `built.take_over`), and returns its
/// connector name.
pub(crate) async fn register(registry: &Registry, built: &Built<'_>) -> anyhow::Result<String> {
    let wasm = built.wasm;
    let bytes = tokio::fs::read(wasm)
        .await
        .with_context(|| format!("reading {}", wasm.display()))?;
    // As the upload would: a component the platform's ferry refuses with
    // 413 does not serve here either (registered as bundled, it skipped
    // the check, and the loop said nothing).
    let limit = registry.max_component_bytes();
    anyhow::ensure!(
        bytes.len() <= limit,
        "the component is {} bytes, more than an upload takes ({limit}, connector_max_bytes): ferry would answer 413",
        bytes.len()
    );
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let file = [BundledFile {
        path: wasm.to_owned(),
        bytes,
    }];
    let seeded = registry
        .seed_bundled(&file)
        .await
        .context("registering the connector")?;
    match seeded.first() {
        // Deleted through the API (an author resetting the loop's
        // database): the loop's own database takes it back, as bundled,
        // so the next edit under the same version replaces it again (it
        // stopped every later start with a wrong hint).
        Some((name, Seeded::Deleted)) if built.take_over => {
            registry
                .undelete(name)
                .await
                .with_context(|| format!("bringing back `{name}`, deleted through the API"))?;
            registry
                .seed_bundled(&file)
                .await
                .context("registering the connector")?;
        }
        Some((name, Seeded::Deleted)) => anyhow::bail!(
            "`{name}` was deleted through the API in this database, and the bundle does not bring it back: upload it (POST /api/v1/connectors) to serve it again"
        ),
        Some((name, Seeded::UploadDiffers)) => anyhow::bail!(
            "an uploaded `{name}` has this version with other bytes, and wins: bump the version in Cargo.toml"
        ),
        _ => {}
    }
    let entries = registry.entries();
    if let Some(active) = entries
        .iter()
        .find(|e| e.active.as_ref().is_some_and(|a| a.meta.sha256 == sha256))
    {
        return Ok(active.name.clone());
    }
    // Stored but not made active: the seed only moves a connector forward,
    // and never over a version chosen through the API. An author going
    // back (a reverted bump, another branch) or past an activation made
    // against this loop wants what they just built.
    for entry in &entries {
        let versions = registry
            .versions(&entry.name)
            .await
            .with_context(|| format!("reading the versions of `{}`", entry.name))?;
        if let Some(stored) = versions.iter().find(|v| v.sha256 == sha256) {
            if !built.take_over {
                anyhow::bail!(
                    "{} {} is stored but not active: this database is not the loop's own, so the version chosen there stays (activate it with POST /api/v1/connectors/{}/activate)",
                    entry.name,
                    stored.version,
                    entry.name
                );
            }
            registry
                .activate(&entry.name, &stored.version, None)
                .await
                .with_context(|| format!("activating {} {}", entry.name, stored.version))?;
            return Ok(entry.name.clone());
        }
    }
    // The environment names what the build does not declare (a typo in a
    // `FERRY_CONNECTORS__…` variable): `check` reads no environment, and
    // accepted the component it was pointed at.
    let problems = registry.check_environment().await;
    if !problems.is_empty() {
        anyhow::bail!("the component was not registered: {}", problems.join("; "));
    }
    anyhow::bail!(
        "the component was refused (see the log above; `ferry connector check FILE` says why)"
    )
}

/// The body of the `PUT …/settings` the loop prints for `entry` (stored
/// settings replace the environment's whole): every setting in effect
/// with its value, its first host setting pointed at a local port; each
/// secret its manifest declares as `null` where the environment gives it
/// (kept); a required setting or secret without a value as `"..."` to fill
/// in; an optional one without a value left out.
fn settings_body(entry: &crate::registry::Entry) -> String {
    let Some(active) = &entry.active else {
        return String::new();
    };
    let manifest = active.connector.manifest();
    // Settings have no `null` to keep: each one in effect goes with its
    // value (the first host setting pointed at a local port), each
    // required one without a value as "...".
    let in_effect = &entry.effective.config.settings;
    let local = manifest.host_settings.first();
    let settings = manifest
        .settings
        .iter()
        .filter_map(|s| {
            let value = if Some(&s.name) == local {
                "http://127.0.0.1:PORT".to_owned()
            } else if let Some(value) = in_effect.get(&s.name) {
                value.clone()
            } else if s.required && s.default.is_none() {
                "...".to_owned()
            } else {
                return None;
            };
            Some(format!(
                "{}: {}",
                serde_json::json!(s.name),
                serde_json::json!(value)
            ))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let given = &entry.effective.config.secrets;
    let secrets = manifest
        .secrets
        .iter()
        .filter_map(|s| match (given.contains_key(&s.name), s.required) {
            (true, _) => Some(format!("\"{}\": null", s.name)),
            (false, true) => Some(format!("\"{}\": \"...\"", s.name)),
            (false, false) => None,
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("{{\"settings\": {{{settings}}}, \"secrets\": {{{secrets}}}}}")
}

/// What the loop prints once it serves: the calls that configure the
/// connector ([`settings_body`]) and show its state.
fn print_next_steps(name: &str, base: &str, wasm: &Path, body: &str) {
    let env = name.replace('-', "_").to_ascii_uppercase();
    eprintln!(
        "\nferry is serving {base} with connector `{name}` from {wasm}\n\
         \n  configure it   curl -X PUT {base}/api/v1/connectors/{name}/settings -H 'content-type: application/json' \\\n                   -d '{body}'\n                 (a secret's null keeps the value FERRY_CONNECTORS__{env}__SECRETS__… gave; \"...\" is yours to fill in:\n                 stored settings replace the environment's whole)\n  its state      curl {base}/api/v1/connectors/{name}\n  push a change  curl -X POST {base}/api/v1/customers -H 'content-type: application/json' -d '{{\"email\": \"ada@example.com\"}}'\n  its webhooks   POST {base}/webhooks/{name}\n  a sync status  curl {base}/api/v1/customers/CUSTOMER_ID/sync\n\nCtrl-C stops it.\n",
        wasm = wasm.display()
    );
}

/// How long the sources must stay unchanged before a rebuild: an editor
/// saving as one types would otherwise rebuild every second.
const QUIET: Duration = Duration::from_millis(700);

/// Waits until the sources differ from `seen` and have been quiet for
/// [`QUIET`]; what they are then.
async fn changed_from(dir: &Path, seen: Sources) -> Sources {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    loop {
        every.tick().await;
        let now = Sources::of(dir);
        if now != seen && !now.newest.elapsed().is_ok_and(|age| age < QUIET) {
            return now;
        }
    }
}

/// Rebuilds and re-registers when a file [`WATCHED`] (`src/`, `Cargo.toml`…)
/// changes after `seen` (and then stays unchanged for [`QUIET`]).
async fn watch(
    dir: PathBuf,
    mut seen: Sources,
    registry: Registry,
    take_over: bool,
    stop: CancellationToken,
) {
    loop {
        let now = tokio::select! {
            () = stop.cancelled() => return,
            now = changed_from(&dir, seen) => now,
        };
        let built = build(&dir).await;
        seen = now.after_build(&dir);
        match built {
            // The bytes served already: "reloaded" said an edit was live
            // when cargo had rebuilt nothing (a source restored with an
            // older time, which its freshness check does not see).
            Ok(wasm) if served_already(&registry, &wasm).await => eprintln!(
                "unchanged: the build gave the component served already ({}); an edit that \
                 changes no code, or a source restored with an older time, which cargo does \
                 not rebuild (touch it to force one)",
                wasm.display()
            ),
            Ok(wasm) => match register(
                &registry,
                &Built {
                    wasm: &wasm,
                    take_over,
                },
            )
            .await
            {
                Ok(name) => eprintln!("reloaded `{name}` from {}", wasm.display()),
                Err(error) => eprintln!("not reloaded: {error:#}"),
            },
            Err(error) => eprintln!("not rebuilt: {error:#}"),
        }
    }
}

/// Whether `wasm`'s bytes are a connector's active version now.
async fn served_already(registry: &Registry, wasm: &Path) -> bool {
    let Ok(bytes) = tokio::fs::read(wasm).await else {
        return false;
    };
    let sha256 = hex::encode(Sha256::digest(&bytes));
    registry
        .entries()
        .iter()
        .any(|e| e.active.as_ref().is_some_and(|a| a.meta.sha256 == sha256))
}

/// What [`WATCHED`] holds, as far as a rebuild cares: a fingerprint of
/// every file's path, size and time (the lock file's apart: a build
/// writes it), and the newest time of those (the lock file's left out,
/// so the build's write of it is no change). Compared whole, not by the newest
/// time: a file dated in the future (an unpacked archive, a clock set
/// right since) made every later edit look older, and nothing rebuilt
/// until the clock caught up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sources {
    files: u64,
    lock: u64,
    newest: SystemTime,
}

impl Sources {
    fn of(dir: &Path) -> Self {
        use std::hash::{Hash, Hasher};
        fn walk(path: &Path, found: &mut Vec<(PathBuf, u64, SystemTime)>) {
            let Ok(meta) = std::fs::metadata(path) else {
                return;
            };
            if meta.is_dir() {
                for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                    walk(&entry.path(), found);
                }
            } else {
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((path.to_owned(), meta.len(), modified));
            }
        }
        let mut found = Vec::new();
        for watched in WATCHED {
            walk(&dir.join(watched), &mut found);
        }
        found.sort();
        let lock = dir.join("Cargo.lock");
        let (mut files, mut locks) = (
            std::collections::hash_map::DefaultHasher::new(),
            std::collections::hash_map::DefaultHasher::new(),
        );
        let mut newest = SystemTime::UNIX_EPOCH;
        for file in &found {
            if file.0 == lock {
                file.hash(&mut locks);
            } else {
                file.hash(&mut files);
                newest = newest.max(file.2);
            }
        }
        Self {
            files: files.finish(),
            lock: locks.finish(),
            newest,
        }
    }

    /// What a build that started from `self` has seen: the lock file as
    /// the build left it (a new crate's first build, a dependency added
    /// write it: not an edit to rebuild for), the other files as they
    /// were when it started (one saved while it ran is built next).
    fn after_build(self, dir: &Path) -> Self {
        Self {
            lock: Self::of(dir).lock,
            ..self
        }
    }
}

/// What a build of the crate reads besides its dependencies: its sources
/// and manifest, a build script and what it reads (`build/`, `wit/`), the
/// lock file, files a source includes (`assets/`, `fixtures/`). A path
/// dependency elsewhere, or a workspace's lock file above the crate, is
/// not watched (save a file of the crate to rebuild).
const WATCHED: [&str; 8] = [
    "src",
    "Cargo.toml",
    "Cargo.lock",
    "build.rs",
    "build",
    "wit",
    "assets",
    "fixtures",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str, at: SystemTime) {
        std::fs::write(path, text).unwrap();
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(at).unwrap();
    }

    /// A file dated in the future does not hide the edits after it; the
    /// lock file a build writes is not an edit.
    #[test]
    fn an_edit_after_a_file_from_the_future_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let now = SystemTime::now();
        let future = now + Duration::from_secs(3_600);
        write(&dir.path().join("src/lib.rs"), "// lib", now);
        write(
            &dir.path().join("src/unpacked.rs"),
            "// from an archive",
            future,
        );
        let seen = Sources::of(dir.path());
        assert_eq!(Sources::of(dir.path()), seen, "nothing changed");

        write(
            &dir.path().join("Cargo.lock"),
            "# written by the build",
            now,
        );
        let built = seen.after_build(dir.path());
        assert_eq!(Sources::of(dir.path()), built, "the build's lock file");

        write(&dir.path().join("src/lib.rs"), "// lib, edited", now);
        assert_ne!(
            Sources::of(dir.path()),
            built,
            "an edit older than the future file"
        );
    }

    /// A new crate's first build (or one after a dependency was added)
    /// writes the lock file, newer than every source: no edit to rebuild
    /// for (it rebuilt, and said "reloaded", with nothing edited).
    #[test]
    fn the_lock_file_a_build_writes_is_no_edit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let now = SystemTime::now();
        write(&dir.path().join("src/lib.rs"), "// lib", now);
        let seen = Sources::of(dir.path());
        write(
            &dir.path().join("Cargo.lock"),
            "# written by the build",
            now + Duration::from_secs(10),
        );
        assert_eq!(Sources::of(dir.path()), seen.after_build(dir.path()));
    }
}
