//! The connector contract's versions. Each released WIT folder
//! (`wit/since_vX.Y.Z`) is frozen and has one module here; the host links
//! every one of them into the same linker, so a component built against any
//! supported version loads and runs (Zed's `since_v*` layout).
//!
//! The host's capabilities (`http`, `settings`, ...) implement the newest
//! version, [`latest`]; an older version's module converts to and from it.
//! A new version is a new folder, a new module and a line in
//! [`WorldVersion`]; docs/connector-contract.md says when one is needed.

pub mod since_v0_1_0;
pub mod since_v0_2_0;

pub use since_v0_2_0 as latest;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::Engine;

use crate::state::CallState;

/// The package every connector world lives in.
const PACKAGE: &str = "ferry:connector";

/// A version of the `ferry:connector` world this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorldVersion {
    /// The first release.
    V0_1_0,
    /// 0.1.0 plus host-managed OAuth tokens (`oauth`).
    V0_2_0,
}

impl WorldVersion {
    /// Every version this host links, oldest first.
    pub const SUPPORTED: [WorldVersion; 2] = [WorldVersion::V0_1_0, WorldVersion::V0_2_0];

    /// The newest version: what the SDK builds against.
    pub const LATEST: WorldVersion = WorldVersion::V0_2_0;

    /// The semantic version, e.g. `0.2.0`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_1_0 => "0.1.0",
            Self::V0_2_0 => "0.2.0",
        }
    }

    /// The version `version` names, if this host supports it.
    pub fn parse(version: &str) -> Option<Self> {
        Self::SUPPORTED.into_iter().find(|v| v.as_str() == version)
    }

    /// The exported interface the host calls.
    pub(crate) fn handler(self) -> String {
        format!("{PACKAGE}/handler@{}", self.as_str())
    }
}

impl std::fmt::Display for WorldVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a component's world is not one this host runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorldMismatch {
    /// It exports no `ferry:connector/handler`: not a ferry connector.
    NotAConnector,
    /// It targets a version newer than [`WorldVersion::LATEST`]: built with
    /// a newer SDK than this host knows.
    Newer(String),
    /// It targets a version this host does not link (older than the oldest
    /// supported, or not a release).
    Unsupported(String),
}

impl std::fmt::Display for WorldMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let supported: Vec<&str> = WorldVersion::SUPPORTED.iter().map(|v| v.as_str()).collect();
        let supported = supported.join(", ");
        match self {
            Self::NotAConnector => write!(
                f,
                "the component exports no `{PACKAGE}/handler` interface: it is not a ferry connector"
            ),
            Self::Newer(v) => write!(
                f,
                "the component targets {PACKAGE}@{v}, newer than this ferry supports ({supported}); upgrade ferry or build against an older ferry-sdk"
            ),
            Self::Unsupported(v) => write!(
                f,
                "the component targets {PACKAGE}@{v}, which this ferry does not support ({supported})"
            ),
        }
    }
}

/// The world version `component` targets, read from the version of the
/// `handler` interface it exports. Its imports are checked by the linker.
pub(crate) fn detect(
    component: &Component,
    engine: &Engine,
) -> Result<WorldVersion, WorldMismatch> {
    let ty = component.component_type();
    let prefix = format!("{PACKAGE}/handler@");
    let found = ty.exports(engine).find_map(|(name, item)| {
        let version = name.strip_prefix(&prefix)?;
        matches!(item.ty, ComponentItem::ComponentInstance(_)).then(|| version.to_owned())
    });
    let Some(version) = found else {
        return Err(WorldMismatch::NotAConnector);
    };
    if let Some(known) = WorldVersion::parse(&version) {
        return Ok(known);
    }
    if is_newer(&version, WorldVersion::LATEST.as_str()) {
        Err(WorldMismatch::Newer(version))
    } else {
        Err(WorldMismatch::Unsupported(version))
    }
}

/// Whether `a` sorts after `b` as MAJOR.MINOR.PATCH (pre-release tags are
/// ignored; an unparsable version is not newer).
fn is_newer(a: &str, b: &str) -> bool {
    fn parts(v: &str) -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    }
    match (parts(a), parts(b)) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    }
}

/// Links the imports of every supported version.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    since_v0_1_0::Connector::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)?;
    since_v0_2_0::Connector::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(is_newer("0.10.0", "0.2.0"));
        assert!(is_newer("1.0.0", "0.2.0"));
        assert!(!is_newer("0.1.5", "0.2.0"));
        assert!(!is_newer("garbage", "0.2.0"));
        assert_eq!(WorldVersion::parse("0.1.0"), Some(WorldVersion::V0_1_0));
        assert_eq!(WorldVersion::parse("0.3.0"), None);
        assert_eq!(
            WorldVersion::LATEST,
            *WorldVersion::SUPPORTED.last().unwrap()
        );
    }
}
