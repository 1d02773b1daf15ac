//! Built connector components (`make connectors` builds them).

use std::path::PathBuf;

/// Path of the wasm32-wasip2 component built from crate `crate_name`
/// (underscored, e.g. `ferry_test_hostile`).
///
/// # Panics
///
/// If the component has not been built: run `make connectors` first.
pub fn component_path(crate_name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root
        .join("target/wasm32-wasip2/release")
        .join(format!("{crate_name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `make connectors` first (or `cargo build --target wasm32-wasip2 --release -p {}`)",
        path.display(),
        crate_name.replace('_', "-"),
    );
    path
}
