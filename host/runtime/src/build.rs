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
    let manifest = manifest_dir.join("Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--release", "--target", "wasm32-wasip2"]);
    if quiet {
        command.arg("--quiet");
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
                .is_some_and(|p| Path::new(p) == manifest)
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
