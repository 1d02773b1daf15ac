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
    let manifest = manifest_dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release", "--target", "wasm32-wasip2"]);
    if quiet {
        command.arg("--quiet");
    }
    if let Some(dir) = target_dir {
        command.arg("--target-dir").arg(dir);
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
    // its dependencies'.
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
