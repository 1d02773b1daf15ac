//! `ferry connector check FILE`: what ferry sees in a component, and
//! whether an upload would be accepted, by the same checks an upload runs
//! (the runtime's load, the size limit, the operator's host rules given as
//! options).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::runtime::{Runtime, RuntimeConfig};

/// The operator rules to check against (an upload's are the server's
/// configuration).
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Largest component accepted.
    pub max_bytes: usize,
    /// `connector_allowed_hosts`.
    pub allowed_hosts: Vec<String>,
    /// `connector_denied_hosts`.
    pub denied_hosts: Vec<String>,
    /// `allow_private_hosts`.
    pub allow_private_hosts: bool,
}

/// What `check` found. Serialized as the `--json` output.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The file checked.
    pub file: PathBuf,
    /// Its size.
    pub size_bytes: usize,
    /// Hex sha256 of its bytes.
    pub sha256: Option<String>,
    /// The `ferry:connector` version it targets.
    pub world: Option<String>,
    /// How long compiling (and checking) it took here, with a cold cache.
    pub compile_ms: Option<u64>,
    /// What it imports.
    pub imports: Vec<String>,
    /// Its manifest, when it could be read.
    pub manifest: Option<serde_json::Value>,
    /// Whether an upload under these rules would be accepted.
    pub accepted: bool,
    /// Why not, one entry per reason, each with the upload's problem code.
    pub refusals: Vec<Refusal>,
    /// What an upload would do that its operator may not expect (it is
    /// accepted all the same).
    pub warnings: Vec<String>,
}

/// One reason an upload would be refused.
#[derive(Debug, Serialize)]
pub struct Refusal {
    /// The code the upload API answers.
    pub code: &'static str,
    /// What is wrong.
    pub detail: String,
}

/// Checks `file` under `options`. A list entry that is no host (`10.0.0.0/8`,
/// a port, a URL, `*`) is an error, as it refuses `ferry serve`'s start:
/// taken, it matched nothing, and a deny-list the operator thought applied
/// was not.
pub async fn check(file: &Path, options: &CheckOptions) -> anyhow::Result<Report> {
    // Blank entries (`--allowed-hosts api.x.com,`) are none, as `ferry
    // serve` reads its lists.
    let listed = |list: &[String]| -> Vec<String> {
        list.iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let options = &CheckOptions {
        allowed_hosts: listed(&options.allowed_hosts),
        denied_hosts: listed(&options.denied_hosts),
        ..options.clone()
    };
    for (name, list) in [
        ("connector_allowed_hosts", &options.allowed_hosts),
        ("connector_denied_hosts", &options.denied_hosts),
    ] {
        if let Some(problem) = list
            .iter()
            .find_map(|e| crate::runtime::list_entry_problem(e))
        {
            anyhow::bail!("{name}: {problem}");
        }
    }
    let bytes = tokio::fs::read(file)
        .await
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    // Two runtimes over one throw-away compile cache: one without operator
    // rules reads everything there is to show, one with them gives the
    // verdict (and finds the code compiled).
    let cache = tempfile::tempdir().context("a temporary compile cache")?;
    let sandbox = |rules: bool| {
        Runtime::new(RuntimeConfig {
            allowed_hosts: if rules {
                options.allowed_hosts.clone()
            } else {
                Vec::new()
            },
            denied_hosts: if rules {
                options.denied_hosts.clone()
            } else {
                Vec::new()
            },
            allow_private_hosts: !rules || options.allow_private_hosts,
            max_instances: 4,
            cache_dir: Some(cache.path().to_owned()),
            ..RuntimeConfig::default()
        })
    };
    let (open, strict) = (sandbox(false)?, sandbox(true)?);
    let mut report = Report {
        file: file.to_owned(),
        size_bytes: bytes.len(),
        sha256: None,
        world: None,
        compile_ms: None,
        imports: Vec::new(),
        manifest: None,
        accepted: true,
        refusals: Vec::new(),
        warnings: Vec::new(),
    };
    if bytes.len() > options.max_bytes {
        report.refusals.push(Refusal {
            code: "component_too_large",
            detail: format!(
                "{} bytes, more than the limit of {} (connector_max_bytes)",
                bytes.len(),
                options.max_bytes
            ),
        });
    }
    let started = Instant::now();
    if let Ok(connector) = open.load(&bytes).await {
        report.compile_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
        report.sha256 = Some(connector.sha256().to_owned());
        report.world = Some(connector.world().to_string());
        report.manifest = serde_json::to_value(connector.manifest()).ok();
        // A connector is its name: uploaded, this one would be the shipped
        // connector's next version, with its stored settings and secrets
        // (a third party's code given Stripe's API key, sent to the hosts
        // it declares).
        let name = connector.manifest().name.as_str();
        if super::new::SHIPPED.contains(&name) {
            report.warnings.push(format!(
                "named `{name}`, a connector ferry ships: uploaded, it becomes that \
                 connector's next version and is handed its settings and secrets"
            ));
        }
    }
    if let Err(error) = strict.load(&bytes).await {
        report.refusals.push(Refusal {
            code: error.code(),
            detail: error.to_string(),
        });
    }
    // Imports need only a compiled component, so a refused one lists them too.
    report.imports = open.imports(&bytes).await.unwrap_or_default();
    report.accepted = report.refusals.is_empty();
    Ok(report)
}

impl Report {
    /// The report for a person.
    pub fn human(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let manifest = self.manifest.as_ref();
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(|v| v.as_str()).unwrap_or_default().to_owned()
        };
        let list = |key: &str| -> Vec<String> {
            manifest
                .and_then(|m| m[key].as_array())
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or_default().to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        match manifest {
            Some(m) => {
                let _ = writeln!(
                    out,
                    "{} {}: {}",
                    text(m.get("name")),
                    text(m.get("version")),
                    text(m.get("description"))
                );
            }
            None => {
                let _ = writeln!(out, "{}", self.file.display());
            }
        }
        let mut row = |label: &str, value: String| {
            let _ = writeln!(out, "  {label:<11} {value}");
        };
        row(
            "file",
            format!(
                "{} ({:.1} KiB{})",
                self.file.display(),
                self.size_bytes as f64 / 1024.0,
                self.sha256
                    .as_deref()
                    .map(|s| format!(", sha256 {}", &s[..16]))
                    .unwrap_or_default()
            ),
        );
        if let Some(world) = &self.world {
            row("world", format!("ferry:connector@{world}"));
        }
        if let Some(ms) = self.compile_ms {
            row("compiled", format!("in {ms} ms (cold cache)"));
        }
        if let Some(m) = manifest {
            row("entities", list("entities").join(", "));
            let mut hosts = list("hosts");
            hosts.extend(
                list("host_settings")
                    .into_iter()
                    .map(|s| format!("the host of setting `{s}`")),
            );
            row("hosts", hosts.join(", "));
            let specs = |key: &str| -> String {
                m[key]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| {
                                let mut text = text(s.get("name"));
                                if s["required"] == true {
                                    text.push_str(" (required)");
                                }
                                if let Some(default) = s.get("default").and_then(|d| d.as_str()) {
                                    text.push_str(&format!(" (default {default})"));
                                }
                                text
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            row("settings", specs("settings"));
            row("secrets", specs("secrets"));
            row(
                "webhooks",
                if m["webhooks"] == true { "yes" } else { "no" }.to_owned(),
            );
        }
        if !self.imports.is_empty() {
            let ferry: Vec<&str> = self
                .imports
                .iter()
                .filter(|i| i.starts_with("ferry:"))
                .map(String::as_str)
                .collect();
            let wasi = self.imports.len() - ferry.len();
            row(
                "imports",
                format!(
                    "{} (and {wasi} WASI interfaces, which grant nothing)",
                    ferry.join(", ")
                ),
            );
        }
        for warning in &self.warnings {
            row("WARNING", warning.clone());
        }
        if self.accepted {
            row("upload", "would be accepted".to_owned());
        } else {
            row("upload", "would be REFUSED:".to_owned());
            for refusal in &self.refusals {
                let _ = writeln!(out, "    - {}: {}", refusal.code, refusal.detail);
            }
        }
        printable(&out)
    }
}

/// `text` with every control character but the line breaks written as an
/// escape: the description, setting names and defaults are the component's
/// own text, and an escape sequence in them could clear the terminal or
/// rewrite the lines above, the "would be REFUSED" among them, for the
/// operator vetting a third party's component.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => c.to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_list_entry_that_is_no_host_is_an_error() {
        for (allowed, denied) in [
            (vec![], vec!["10.0.0.0/8"]),
            (vec!["api.acme.example:443"], vec![]),
        ] {
            let options = CheckOptions {
                max_bytes: 1 << 20,
                allowed_hosts: allowed.into_iter().map(str::to_owned).collect(),
                denied_hosts: denied.into_iter().map(str::to_owned).collect(),
                allow_private_hosts: false,
            };
            let error = check(Path::new("not-read.wasm"), &options)
                .await
                .expect_err("refused")
                .to_string();
            assert!(error.starts_with("connector_"), "{error}");
            assert!(
                !error.contains("not-read.wasm"),
                "refused before reading: {error}"
            );
        }
        // A blank entry is none, as `ferry serve` reads it: the file is
        // read (and is missing) past the lists' check.
        let options = CheckOptions {
            max_bytes: 1 << 20,
            allowed_hosts: vec!["api.acme.example".to_owned(), String::new()],
            denied_hosts: vec![" ".to_owned()],
            allow_private_hosts: false,
        };
        let error = check(Path::new("not-read.wasm"), &options)
            .await
            .expect_err("the file is missing")
            .to_string();
        assert!(error.contains("not-read.wasm"), "{error}");
    }

    #[test]
    fn a_components_text_cannot_drive_the_terminal() {
        let report = Report {
            file: PathBuf::from("c.wasm"),
            size_bytes: 1,
            sha256: None,
            world: None,
            compile_ms: None,
            imports: Vec::new(),
            manifest: Some(serde_json::json!({"name": "evil", "version": "1.0.0",
                "description": "fine\u{1b}[2J\u{1b}[1A\rwould be accepted"})),
            accepted: false,
            refusals: vec![Refusal {
                code: "component_refused",
                detail: "no".to_owned(),
            }],
            warnings: Vec::new(),
        };
        let human = report.human();
        assert!(
            !human.contains('\u{1b}') && !human.contains('\r'),
            "{human}"
        );
        assert!(human.contains("\\u{1b}[2J"), "{human}");
        assert!(human.contains("would be REFUSED"), "{human}");
    }
}
