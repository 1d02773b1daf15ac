//! Checks a connector's manifest before the host trusts it: its name becomes
//! a URL path, its hosts drive the HTTP policy, its settings and secrets are
//! what an operator is asked for.

use std::collections::BTreeSet;

use super::policy::DeclaredHost;
use super::wit::latest::Manifest;

/// Longest connector, setting, secret or entity name.
const MAX_NAME_LEN: usize = 64;

/// Most entries of each list a manifest declares (entities, hosts, host
/// settings, settings, secrets).
pub const MAX_MANIFEST_ENTRIES: usize = 256;

/// Longest version: it is part of a primary key (PostgreSQL's B-tree rows
/// stop at about 2.7 KB; a longer one failed the insert with a 500).
const MAX_VERSION_LEN: usize = 128;

/// Longest free text in a manifest (a description, a setting's default).
pub const MAX_MANIFEST_TEXT: usize = 4096;

/// Returns the parsed `hosts`, or every problem found, joined.
///
/// Bounded before anything else: a guest can return a manifest as large
/// as its memory, and checking half a million settings against four
/// million host settings, name by name, held a worker (and every replica's
/// refresh, and every restart) for minutes, after the call's deadline had
/// stopped counting.
pub(crate) fn validate(m: &Manifest) -> Result<Vec<DeclaredHost>, String> {
    let lists = [
        ("entities", m.entities.len()),
        ("hosts", m.hosts.len()),
        ("host_settings", m.host_settings.len()),
        ("settings", m.settings.len()),
        ("secrets", m.secrets.len()),
    ];
    let too_many: Vec<String> = lists
        .iter()
        .filter(|(_, n)| *n > MAX_MANIFEST_ENTRIES)
        .map(|(list, n)| format!("{list} has {n} entries (at most {MAX_MANIFEST_ENTRIES})"))
        .collect();
    if !too_many.is_empty() {
        return Err(too_many.join("; "));
    }
    let mut problems = Vec::new();
    let texts = [
        ("name", m.name.as_str()),
        ("version", &m.version),
        ("description", &m.description),
    ]
    .into_iter()
    .chain(m.entities.iter().map(|e| ("entity", e.as_str())))
    .chain(m.hosts.iter().map(|h| ("host", h.as_str())))
    .chain(m.host_settings.iter().map(|h| ("host setting", h.as_str())))
    .chain(m.settings.iter().flat_map(|s| {
        [
            ("setting", s.name.as_str()),
            ("setting description", &s.description),
        ]
        .into_iter()
        .chain(s.default.iter().map(|d| ("setting default", d.as_str())))
    }))
    .chain(m.secrets.iter().flat_map(|s| {
        [
            ("secret", s.name.as_str()),
            ("secret description", &s.description),
        ]
    }));
    for (what, text) in texts {
        // PostgreSQL stores the manifest as JSONB, which refuses a NUL: the
        // upload failed with a 500.
        if text.len() > MAX_MANIFEST_TEXT {
            problems.push(format!("a {what} is longer than {MAX_MANIFEST_TEXT} bytes"));
        } else if text.contains('\0') {
            problems.push(format!("a {what} holds a NUL character"));
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if m.name == RESERVED_NAME {
        problems.push(format!(
            "name `{RESERVED_NAME}` is reserved: field owners name ferry's own API so"
        ));
    } else if !is_connector_name(&m.name) {
        problems.push(format!(
            "name `{}` must be 1-{MAX_NAME_LEN} characters of [a-z0-9-], not starting or ending with `-`",
            m.name
        ));
    }
    if !is_semver(&m.version) {
        problems.push(format!(
            "version `{}` is not a semantic version (MAJOR.MINOR.PATCH, at most {MAX_VERSION_LEN} bytes)",
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
    let settings: BTreeSet<&str> = m.settings.iter().map(|s| s.name.as_str()).collect();
    let mut host_settings = BTreeSet::new();
    for name in &m.host_settings {
        if !settings.contains(name.as_str()) {
            problems.push(format!("host setting `{name}` is not declared in settings"));
        }
        if !host_settings.insert(name.as_str()) {
            problems.push(format!("host setting `{name}` is declared twice"));
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

/// The name no connector may take: `field_owners` give fields to `ferry`
/// for ferry's own API alone, and a connector of that name would have
/// changed them as their owner.
pub(crate) const RESERVED_NAME: &str = "ferry";

pub(crate) fn is_connector_name(name: &str) -> bool {
    name != RESERVED_NAME
        && !name.is_empty()
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

/// A semantic version the `semver` crate reads (the registry orders
/// versions with it: one it cannot read moved every replica to whichever
/// version a replica bundled), short enough to key a row on PostgreSQL.
fn is_semver(v: &str) -> bool {
    v.len() <= MAX_VERSION_LEN && semver::Version::parse(v).is_ok()
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

    /// A manifest as large as a guest's memory is refused by its size,
    /// before any entry is looked at; NUL and overlong texts are refused
    /// (PostgreSQL's JSONB refused a NUL with a 500).
    #[test]
    fn refuses_a_manifest_too_large_to_check() {
        let mut huge = manifest();
        huge.settings = (0..20_000)
            .map(|i| SettingSpec {
                name: format!("s{i}"),
                description: String::new(),
                default: None,
                required: false,
            })
            .collect();
        huge.host_settings = vec!["s19999".into(); 200_000];
        let refused = validate(&huge).unwrap_err();
        assert!(
            refused.contains("settings has 20000 entries")
                && refused.contains("host_settings has 200000 entries"),
            "{refused}"
        );

        let mut twice = manifest();
        twice.host_settings = vec!["api_base".into(), "api_base".into()];
        assert!(validate(&twice).unwrap_err().contains("declared twice"));

        let mut nul = manifest();
        nul.settings[0].default = Some("https://api.stripe.com\0".into());
        assert!(validate(&nul).unwrap_err().contains("NUL"));
        let mut long = manifest();
        long.description = "x".repeat(MAX_MANIFEST_TEXT + 1);
        assert!(validate(&long).unwrap_err().contains("longer than"));
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

    /// `ferry` names ferry's own API in `field_owners`: a connector of
    /// that name would have changed the fields given to it alone.
    #[test]
    fn the_name_ferry_is_reserved() {
        let mut m = manifest();
        m.name = "ferry".into();
        let err = validate(&m).unwrap_err();
        assert!(err.contains("name `ferry` is reserved"), "{err}");
        assert!(!is_connector_name("ferry"));
        assert!(is_connector_name("ferry-crm"));
    }

    #[test]
    fn semver() {
        for ok in ["0.1.0", "1.2.3-beta.1", "1.0.0+build.5"] {
            assert!(is_semver(ok), "{ok}");
        }
        let long = format!("1.0.0-{}", "a".repeat(200));
        for bad in [
            "1.0",
            "v1.0.0",
            "1.0.x",
            "",
            "1.0.0 ",
            "01.0.0",
            "1.0.0-",
            "1.0.0-a..b",
            "1.0.0-01",
            &long,
        ] {
            assert!(!is_semver(bad), "{bad}");
        }
    }
}
