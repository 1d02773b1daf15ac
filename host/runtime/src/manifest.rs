//! Checks a connector's manifest before the host trusts it: its name becomes
//! a URL path, its hosts drive the HTTP policy, its settings and secrets are
//! what an operator is asked for.

use std::collections::BTreeSet;

use super::policy::DeclaredHost;
use super::wit::latest::Manifest;

/// Longest connector, setting, secret or entity name.
const MAX_NAME_LEN: usize = 64;

/// Returns the parsed `hosts`, or every problem found, joined.
pub(crate) fn validate(m: &Manifest) -> Result<Vec<DeclaredHost>, String> {
    let mut problems = Vec::new();
    if !is_connector_name(&m.name) {
        problems.push(format!(
            "name `{}` must be 1-{MAX_NAME_LEN} characters of [a-z0-9-], not starting or ending with `-`",
            m.name
        ));
    }
    if !is_semver(&m.version) {
        problems.push(format!(
            "version `{}` is not a semantic version (MAJOR.MINOR.PATCH)",
            m.version
        ));
    }
    if m.entities.is_empty() {
        problems.push("entities is empty: a connector handles at least one entity type".to_owned());
    }
    check_names(
        "entity",
        m.entities.iter().map(String::as_str),
        &mut problems,
    );
    check_names(
        "setting",
        m.settings.iter().map(|s| s.name.as_str()),
        &mut problems,
    );
    check_names(
        "secret",
        m.secrets.iter().map(|s| s.name.as_str()),
        &mut problems,
    );
    for name in &m.host_settings {
        if !m.settings.iter().any(|s| &s.name == name) {
            problems.push(format!("host setting `{name}` is not declared in settings"));
        }
    }
    let mut hosts = Vec::new();
    for entry in &m.hosts {
        match DeclaredHost::from_manifest_entry(entry) {
            Ok(host) => hosts.push(host),
            Err(e) => problems.push(format!("hosts: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(hosts)
    } else {
        Err(problems.join("; "))
    }
}

pub(crate) fn is_connector_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `snake_case`: lower-case letters, digits and `_`, starting with a letter.
fn is_snake_case(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

fn check_names<'a>(kind: &str, names: impl Iterator<Item = &'a str>, problems: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for name in names {
        if !is_snake_case(name) {
            problems.push(format!("{kind} name `{name}` must be snake_case"));
        }
        if !seen.insert(name) {
            problems.push(format!("{kind} `{name}` is declared twice"));
        }
    }
}

fn is_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()))
        && v[core.len()..]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-+.".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wit::latest::{SecretSpec, SettingSpec};

    fn manifest() -> Manifest {
        Manifest {
            name: "stripe".into(),
            version: "0.1.0".into(),
            description: "Stripe".into(),
            entities: vec!["customer".into()],
            hosts: vec!["api.stripe.com".into()],
            host_settings: vec!["api_base".into()],
            settings: vec![SettingSpec {
                name: "api_base".into(),
                description: "base URL".into(),
                default: Some("https://api.stripe.com".into()),
                required: false,
            }],
            secrets: vec![SecretSpec {
                name: "api_key".into(),
                description: "key".into(),
                required: true,
            }],
            webhooks: true,
        }
    }

    #[test]
    fn accepts_a_good_manifest() {
        let hosts = validate(&manifest()).unwrap();
        assert_eq!(
            hosts,
            vec![DeclaredHost {
                host: "api.stripe.com".into(),
                port: None
            }]
        );
    }

    #[test]
    fn reports_every_problem() {
        let mut m = manifest();
        m.name = "Stripe Connector".into();
        m.version = "1.0".into();
        m.host_settings.push("missing".into());
        m.hosts.push("https://x.com/".into());
        m.secrets.push(m.secrets[0].clone());
        let err = validate(&m).unwrap_err();
        for needle in [
            "name `Stripe Connector`",
            "version `1.0`",
            "host setting `missing`",
            "hosts:",
            "declared twice",
        ] {
            assert!(err.contains(needle), "{needle} missing from {err}");
        }
    }

    #[test]
    fn semver() {
        for ok in ["0.1.0", "1.2.3-beta.1", "1.0.0+build.5"] {
            assert!(is_semver(ok), "{ok}");
        }
        for bad in ["1.0", "v1.0.0", "1.0.x", "", "1.0.0 "] {
            assert!(!is_semver(bad), "{bad}");
        }
    }
}
