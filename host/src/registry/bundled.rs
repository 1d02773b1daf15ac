//! The connectors shipped with ferry: where the binary finds them, whatever
//! the working directory.
//!
//! `make connectors` (and the image build) put the components in a
//! `connectors/` folder beside the `ferry` executable; an installation may
//! put them in `../share/ferry/connectors` relative to it instead.
//! `FERRY_CONNECTORS_DIR` names another folder. They only seed the registry:
//! each enters through the same door as an upload (see
//! [`super::Registry::seed_bundled`]).

use std::path::{Path, PathBuf};

/// A component file found in the bundled folder.
pub struct BundledFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// The folder bundled connectors come from: `configured` if given, else the
/// first of `<exe dir>/connectors` and `<exe dir>/../share/ferry/connectors`
/// that exists. `Err` lists where it looked.
pub fn locate(configured: Option<&Path>) -> Result<PathBuf, Vec<PathBuf>> {
    if let Some(dir) = configured {
        return if dir.is_dir() {
            Ok(dir.to_owned())
        } else {
            Err(vec![dir.to_owned()])
        };
    }
    let candidates = match std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned))
    {
        Some(dir) => vec![
            dir.join("connectors"),
            dir.join("../share/ferry/connectors"),
        ],
        None => Vec::new(),
    };
    candidates
        .iter()
        .find(|dir| dir.is_dir())
        .cloned()
        .ok_or(candidates)
}

/// Every `*.wasm` in `dir`, in name order. Unreadable files are logged and
/// skipped: ferry is useful without them.
pub async fn read(dir: &Path) -> Vec<BundledFile> {
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "bundled connectors not readable");
            return Vec::new();
        }
    };
    let mut paths = Vec::new();
    loop {
        match entries.next_entry().await {
            Ok(Some(entry)) => {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "wasm") {
                    paths.push(path);
                }
            }
            Ok(None) => break,
            Err(error) => {
                tracing::error!(dir = %dir.display(), %error, "could not list the bundled connectors");
                break;
            }
        }
    }
    paths.sort();
    let mut files = Vec::with_capacity(paths.len());
    for path in paths {
        match tokio::fs::read(&path).await {
            Ok(bytes) => files.push(BundledFile { path, bytes }),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "bundled connector not readable");
            }
        }
    }
    files
}
