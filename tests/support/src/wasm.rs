//! Built connector components (`make connectors` builds them).

use std::path::PathBuf;

/// Path of the wasm32-wasip2 component built from crate `crate_name`
/// (underscored, e.g. `ferry_test_hostile`).
///
/// # Panics
///
/// If the component has not been built: run `make connectors` first.
pub fn component_path(crate_name: &str) -> PathBuf {
    let path = release_component(crate_name);
    assert!(
        path.exists(),
        "{} is missing: run `make connectors` first (or `cargo build --target wasm32-wasip2 --release -p {}`)",
        path.display(),
        crate_name.replace('_', "-"),
    );
    path
}

/// Where `cargo build --target wasm32-wasip2 --release` puts the component of
/// `crate_name`, whether or not it exists yet.
pub fn release_component(crate_name: &str) -> PathBuf {
    // Cargo passes its CARGO_TARGET_DIR on to the tests it runs (CI keeps the
    // build outside the clone); otherwise it is the workspace's `target/`.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target
        .join("wasm32-wasip2/release")
        .join(format!("{crate_name}.wasm"))
}

/// Path of a variant of a test guest that `make connectors` builds with a
/// cargo feature and copies aside as `{crate_name}-{variant}.wasm` (e.g.
/// the recorder's `version-2`).
///
/// # Panics
///
/// If it has not been built: run `make connectors` first.
pub fn variant_path(crate_name: &str, variant: &str) -> PathBuf {
    let path = release_component(&format!("{crate_name}-{variant}"));
    assert!(
        path.exists(),
        "{} is missing: run `make connectors` first",
        path.display(),
    );
    path
}
