//! `ferry connector new NAME`: a standalone connector crate, outside any
//! workspace, from the template in `sdk/template/` (an Example CRM
//! connector with its tests and a recorded session). The sources are the
//! template's own, which ferry's workspace builds and tests, so what is
//! scaffolded compiles and passes as generated.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The SDK version the scaffold depends on.
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

const LIB_RS: &str = include_str!("../../../sdk/template/src/lib.rs");
const TESTS_RS: &str = include_str!("../../../sdk/template/tests/connector.rs");
const SESSION_JSON: &str = include_str!("../../../sdk/template/tests/fixtures/session.json");
const README_MD: &str = include_str!("../../../sdk/template/README.md");
/// The one line of the template that names the connector.
const NAME_LINE: &str = "pub const NAME: &str = \"example\";";

/// The connectors ferry ships. A connector is its name: an upload under
/// one of these becomes that connector's next version, active on every
/// replica, with its stored settings and secrets (Stripe's API key sent
/// by the template's code to wherever `api_base` points).
pub(crate) const SHIPPED: [&str; 2] = ["stripe", "salesforce"];

/// What to scaffold.
#[derive(Debug, Clone)]
pub struct NewConnector {
    /// The connector's name (`[a-z0-9-]`).
    pub name: String,
    /// Where to create the crate; default `./ferry-connector-NAME`.
    pub dir: Option<PathBuf>,
    /// A checkout's `sdk/` to build against until ferry-sdk is published.
    pub sdk_path: Option<PathBuf>,
    /// Where `ferry-runtime` is, for the test kit; default
    /// `SDK/../host/runtime` (a checkout's layout).
    pub runtime_path: Option<PathBuf>,
}

/// The `sdk/` of the checkout this ferry was built from, if it is still
/// there: what a scaffold builds against when no `--sdk-path` is given,
/// until ferry-sdk is published.
pub fn checkout_sdk() -> Option<PathBuf> {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    sdk.join("Cargo.toml")
        .is_file()
        .then(|| sdk.canonicalize().ok())
        .flatten()
}

/// Writes the crate and returns its directory.
pub fn scaffold(new: &NewConnector) -> anyhow::Result<PathBuf> {
    let name = new.name.as_str();
    if !crate::runtime::valid_connector_name(name) {
        bail!(
            "`{name}` is not a connector name: use 1-64 characters of a-z, 0-9 and `-`, not starting or ending with `-`, and not `ferry` (field owners name ferry's own API so)"
        );
    }
    // Valid in a manifest, but its settings could not be given in the
    // environment: FERRY_CONNECTORS__ACME__CRM__… splits at `__`.
    if name.contains("--") {
        bail!(
            "`{name}` has `--`, which FERRY_CONNECTORS__{}__… cannot name: use single hyphens",
            name.replace('-', "_").to_ascii_uppercase()
        );
    }
    if SHIPPED.contains(&name) {
        bail!(
            "`{name}` is a connector ferry ships: an upload of yours would become its next version, with its settings and secrets; choose another name (to change `{name}` itself, start from its source in ferry's connectors/{name})"
        );
    }
    let crate_name = format!("ferry-connector-{name}");
    let dir = new
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&crate_name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!("{} exists and is not empty", dir.display());
    }
    let patch = match &new.sdk_path {
        Some(sdk) => {
            let sdk = absolute(sdk)?;
            let runtime = match &new.runtime_path {
                Some(runtime) => absolute(runtime)?,
                None => sdk.join("../host/runtime"),
            };
            for (what, path) in [("the SDK", &sdk), ("ferry-runtime", &runtime)] {
                if !path.join("Cargo.toml").is_file() {
                    bail!("{what} is not at {} (no Cargo.toml)", path.display());
                }
            }
            format!(
                "[patch.crates-io]\nferry-sdk = {{ path = {} }}\nferry-runtime = {{ path = {} }}\n",
                toml_string(&sdk),
                toml_string(&runtime)
            )
        }
        None => "# [patch.crates-io]\n# ferry-sdk = { path = \"../ferry/sdk\" }\n# ferry-runtime = { path = \"../ferry/host/runtime\" }\n".to_owned(),
    };
    let lib = LIB_RS.replacen(NAME_LINE, &format!("pub const NAME: &str = \"{name}\";"), 1);
    if lib == LIB_RS && name != "example" {
        bail!("the template no longer has the line `{NAME_LINE}`");
    }
    let readme = README_MD
        .replace("{{name}}", name)
        .replace("{{NAME}}", &name.replace('-', "_").to_ascii_uppercase())
        .replace("{{crate_ident}}", &name.replace('-', "_"));
    let files: [(&str, String); 6] = [
        ("Cargo.toml", cargo_toml(&crate_name, &patch)),
        ("src/lib.rs", lib),
        ("tests/connector.rs", TESTS_RS.to_owned()),
        ("tests/fixtures/session.json", SESSION_JSON.to_owned()),
        ("README.md", readme),
        (".gitignore", "/target\n".to_owned()),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// A TOML basic string.
fn toml_string(path: &Path) -> String {
    let text = path.display().to_string();
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn cargo_toml(crate_name: &str, patch: &str) -> String {
    format!(
        r#"[package]
name = "{crate_name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]          # a WebAssembly component

[dependencies]
ferry-sdk = "{SDK_VERSION}"
serde = {{ version = "1", features = ["derive"] }}
serde_json = "1"

[dev-dependencies]
# Runs the built component in ferry's sandbox from `cargo test`; builds
# ferry's connector runtime, not the server.
ferry-sdk = {{ version = "{SDK_VERSION}", features = ["testkit"] }}
tokio = {{ version = "1", features = ["macros", "rt-multi-thread"] }}

[features]
# `cargo test --features record -- --ignored record_a_session` records the
# session against a live API (it needs the test kit's HTTP client).
record = ["ferry-sdk/testkit-record"]

# A crate of its own, even when created inside another workspace.
[workspace]

[profile.release]
# Small components.
codegen-units = 1
lto = "thin"

[profile.dev]
debug = 1
[profile.dev.package."*"]
# The test kit compiles your component with Cranelift: optimised, that
# takes a fraction of the time (and the result is cached under target/).
opt-level = 1
debug = 0

# Until ferry-sdk is on crates.io, build against a checkout of ferry
# (`ferry connector new --sdk-path ../ferry/sdk` fills this in).
{patch}"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_names_itself_in_one_line() {
        assert_eq!(LIB_RS.matches(NAME_LINE).count(), 1);
        let dir = tempfile::tempdir().unwrap();
        let out = scaffold(&NewConnector {
            name: "acme-crm".into(),
            dir: Some(dir.path().join("c")),
            sdk_path: None,
            runtime_path: None,
        })
        .unwrap();
        let lib = std::fs::read_to_string(out.join("src/lib.rs")).unwrap();
        assert!(lib.contains("pub const NAME: &str = \"acme-crm\";"));
        let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(readme.contains("FERRY_CONNECTORS__ACME_CRM__SECRETS__API_KEY"));
        assert!(readme.contains("ferry_connector_acme_crm.wasm"));
        assert!(!readme.contains("{{"), "every placeholder filled");
        let toml = std::fs::read_to_string(out.join("Cargo.toml")).unwrap();
        assert!(toml.contains("name = \"ferry-connector-acme-crm\""));
        assert!(scaffold(&NewConnector {
            name: "acme--crm".into(),
            dir: Some(dir.path().join("e")),
            sdk_path: None,
            runtime_path: None,
        })
        .is_err());
        assert!(scaffold(&NewConnector {
            name: "Bad Name".into(),
            dir: Some(dir.path().join("d")),
            sdk_path: None,
            runtime_path: None,
        })
        .is_err());
        let shipped = scaffold(&NewConnector {
            name: "stripe".into(),
            dir: Some(dir.path().join("s")),
            sdk_path: None,
            runtime_path: None,
        })
        .expect_err("a shipped connector's name");
        assert!(shipped.to_string().contains("ferry ships"), "{shipped}");
        assert!(
            scaffold(&NewConnector {
                name: "again".into(),
                dir: Some(out),
                sdk_path: None,
                runtime_path: None,
            })
            .is_err(),
            "a non-empty directory is left alone"
        );
    }

    #[test]
    fn a_build_from_a_checkout_finds_its_sdk() {
        let sdk = checkout_sdk().expect("this test runs in the checkout");
        assert!(sdk.ends_with("sdk"), "{}", sdk.display());
        assert!(sdk.join("src/lib.rs").is_file());
    }
}
