//! Building a connector crate into its component, for the tools around the
//! runtime (the SDK's test kit, `ferry connector dev`): `cargo build
//! --release --target wasm32-wasip2`, then the `.wasm` cargo reports for
//! the crate itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Builds the crate at `manifest_dir` and returns its component's path.
/// Cargo's own output (errors, and progress unless `quiet`) goes to this
/// process's stderr.
pub fn component(manifest_dir: &Path, quiet: bool) -> Result<PathBuf, String> {
    component_in(manifest_dir, quiet, None)
}

/// [`component`], built into `target_dir` when given (else where cargo
/// would put it: `CARGO_TARGET_DIR`, or the crate's workspace's `target`).
pub fn component_in(
    manifest_dir: &Path,
    quiet: bool,
    target_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    let absolute = |path: &Path| std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let manifest_dir = absolute(manifest_dir);
    let manifest = manifest_dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // In the crate's folder, as `cargo build` typed there: cargo reads the
    // crate's `.cargo/config.toml` (flags, `[env]`, registries) from the
    // working folder, and rustup its `rust-toolchain.toml` (when cargo is
    // rustup's proxy, not a toolchain's own cargo named by `CARGO`, as
    // under `cargo test`). Run from elsewhere (`ferry connector dev
    // ../acme`), both were ignored: a build unlike the author's own.
    command.current_dir(&manifest_dir);
    // A relative `CARGO_TARGET_DIR` is the caller's folder's, as typed
    // (cargo would read it against the crate's now).
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        command.env("CARGO_TARGET_DIR", absolute(Path::new(&dir)));
    }
    command.args(["build", "--release", "--target", "wasm32-wasip2"]);
    if quiet {
        command.arg("--quiet");
    }
    if let Some(dir) = target_dir {
        command.arg("--target-dir").arg(absolute(dir));
    }
    let output = command
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build of {} failed (see its output above)",
            manifest.display()
        ));
    }
    let manifest = manifest.canonicalize().unwrap_or(manifest);
    // The package's own cdylib artifact (the last one reported), not one of
    // its dependencies', nor a binary of the crate (`src/bin/tool.rs`: a
    // command component, which ferry refuses as the wrong world).
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact")
        .filter(|msg| {
            msg["manifest_path"]
                .as_str()
                .is_some_and(|p| same_file(Path::new(p), &manifest))
        })
        .filter(|msg| {
            msg["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .find_map(|msg| {
            msg["filenames"].as_array().and_then(|files| {
                files
                    .iter()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".wasm"))
                    .map(PathBuf::from)
            })
        })
        .ok_or_else(|| {
            format!(
                "{} produced no .wasm (is its crate-type cdylib?)",
                manifest.display()
            )
        })
}

/// The target dir a binary cargo built lives in: the nearest folder above
/// it holding the `.rustc_info.json` cargo keeps at a target dir's root
/// (not `CACHEDIR.TAG`, which a `--target` triple's folder holds too:
/// `target/x86_64-unknown-linux-gnu/debug/deps/…`). A target dir inside
/// another (`--target-dir target/other`) is its own.
pub fn target_dir_of(binary: &Path) -> Option<PathBuf> {
    binary
        .ancestors()
        .skip(1)
        .find(|dir| dir.join(".rustc_info.json").is_file())
        .map(Path::to_owned)
}

/// Whether `reported` (cargo's manifest path, which keeps the symlinks of
/// the path it was given) names `canonical`: a crate reached through a
/// symlinked directory (`~/code` linked elsewhere, macOS's `/tmp`) was
/// reported as producing no component.
fn same_file(reported: &Path, canonical: &Path) -> bool {
    reported == canonical || reported.canonicalize().is_ok_and(|p| p == canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_s_target_dir_is_where_cargo_keeps_its_rustc_info() {
        let dir = tempfile::tempdir().expect("dir");
        let cargo_made = |folder: &Path, root: bool| {
            std::fs::create_dir_all(folder.join("debug/deps")).expect("dirs");
            std::fs::write(
                folder.join("CACHEDIR.TAG"),
                "Signature: 8a477f597d28d172789f06886806bc55",
            )
            .expect("tag");
            if root {
                std::fs::write(folder.join(".rustc_info.json"), "{}").expect("info");
            }
        };
        let target = dir.path().join("elsewhere");
        cargo_made(&target, true);
        let binary = |folder: &Path| folder.join("debug/deps/connector-0123");
        assert_eq!(target_dir_of(&binary(&target)), Some(target.clone()));
        // Built for a `--target` triple: cargo tags its folder too.
        let triple = target.join("x86_64-unknown-linux-gnu");
        cargo_made(&triple, false);
        assert_eq!(target_dir_of(&binary(&triple)), Some(target.clone()));
        // A target dir of its own inside another, a hyphen in its name.
        let inner = target.join("llvm-cov-target");
        cargo_made(&inner, true);
        assert_eq!(target_dir_of(&binary(&inner)), Some(inner));
        assert_eq!(target_dir_of(&dir.path().join("bin/tool")), None);
    }

    /// Built as `cargo build` typed in the crate's folder: its
    /// `.cargo/config.toml` counts (here an `[env]` the code reads), and
    /// the component is the library's, not a binary's of the same crate.
    #[test]
    fn a_crate_is_built_in_its_own_folder_and_its_library_is_the_component() {
        let dir = tempfile::tempdir().expect("dir");
        let krate = dir.path().join("acme");
        std::fs::create_dir_all(krate.join(".cargo")).expect("dirs");
        std::fs::create_dir_all(krate.join("src/bin")).expect("dirs");
        std::fs::write(
            krate.join("Cargo.toml"),
            "[package]\nname = \"acme\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [lib]\ncrate-type = [\"cdylib\"]\n\n[workspace]\n",
        )
        .expect("manifest");
        std::fs::write(
            krate.join(".cargo/config.toml"),
            "[env]\nACME_BUILT_IN_ITS_FOLDER = \"yes\"\n",
        )
        .expect("config");
        std::fs::write(
            krate.join("src/lib.rs"),
            "pub const BUILT: &str = env!(\"ACME_BUILT_IN_ITS_FOLDER\");\n",
        )
        .expect("lib");
        std::fs::write(krate.join("src/bin/tool.rs"), "fn main() {}\n").expect("bin");
        // Relative, from another folder (this test's own).
        let relative = pathdiff(&krate);
        let target = dir.path().join("target");
        let built = component_in(&relative, true, Some(&target)).expect("built");
        assert_eq!(
            built.file_name().and_then(|n| n.to_str()),
            Some("acme.wasm")
        );
        assert!(built.is_file(), "{}", built.display());
    }

    /// `path` relative to the working folder, when it can be (`..`s up to
    /// the root); else as it is.
    fn pathdiff(path: &Path) -> PathBuf {
        let here = std::env::current_dir().expect("cwd");
        let ups = here.components().count().saturating_sub(1);
        let mut relative: PathBuf = std::iter::repeat_n("..", ups).collect();
        relative.push(path.strip_prefix("/").unwrap_or(path));
        relative
    }

    #[cfg(unix)]
    #[test]
    fn a_manifest_reached_through_a_symlink_is_the_same_crate() {
        let dir = tempfile::tempdir().expect("dir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("dir");
        std::fs::write(real.join("Cargo.toml"), "").expect("manifest");
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked).expect("symlink");
        let canonical = real.join("Cargo.toml").canonicalize().expect("canonical");
        assert!(same_file(&linked.join("Cargo.toml"), &canonical));
        assert!(same_file(&canonical, &canonical));
        assert!(!same_file(&dir.path().join("other/Cargo.toml"), &canonical));
    }
}
