//! Configuration: compiled-in defaults, then an optional TOML file, then
//! `FERRY_`-prefixed environment variables; validated at start. Unknown keys
//! are errors, and secrets never print.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

/// `FERRY_` variables that are not settings: the config file path and the
/// cache directory the scripts use. Any other unknown `FERRY_` variable is
/// an error, so a typo such as `FERRY_ADMN_TOKEN` cannot silently leave the
/// API open.
const NOT_SETTINGS: &[&str] = &["config", "cache_dir"];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// ferry's settings. See docs/configuration.md.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP server binds (`FERRY_LISTEN`).
    pub listen: SocketAddr,
    /// `sqlite://PATH` (embedded) or `postgres://...` (cluster).
    database_url: SecretString,
    /// Connections to PostgreSQL, or SQLite readers.
    pub database_max_connections: u32,
    /// Bearer token for `/api/v1`.
    #[serde(default)]
    pub admin_token: Option<SecretString>,
    /// Key that encrypts connector secrets at rest.
    #[serde(default)]
    pub master_key: Option<SecretString>,
    /// How long idempotency keys are remembered (`86400`, `"24h"`, `"30m"`).
    #[serde(deserialize_with = "duration")]
    pub idempotency_ttl: Duration,
    /// Let connectors call private and loopback addresses (tests only).
    pub allow_private_hosts: bool,
    /// Directory whose `*.wasm` components are loaded at start.
    pub connectors_dir: PathBuf,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// `text` or `json`.
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database_url", &self.database_url_redacted())
            .field("database_max_connections", &self.database_max_connections)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field(
                "master_key",
                &self.master_key.as_ref().map(|_| "[REDACTED]"),
            )
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("allow_private_hosts", &self.allow_private_hosts)
            .field("connectors_dir", &self.connectors_dir)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// The compiled-in defaults, as a figment provider.
#[derive(Serialize)]
struct Defaults {
    listen: &'static str,
    database_url: &'static str,
    database_max_connections: u32,
    idempotency_ttl: u64,
    allow_private_hosts: bool,
    connectors_dir: &'static str,
    max_body_bytes: usize,
    log_format: LogFormat,
}

const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:8080",
    database_url: "sqlite://ferry.db",
    database_max_connections: 16,
    idempotency_ttl: 24 * 60 * 60,
    allow_private_hosts: false,
    connectors_dir: "dist/connectors",
    max_body_bytes: 1024 * 1024,
    log_format: LogFormat::Text,
};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type or name.
    #[error(transparent)]
    Load(#[from] Box<figment::Error>),
    /// The values are individually fine but not together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file, Env::prefixed("FERRY_"))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// Defaults, then `file`, then `env` (`FERRY_` variables).
    pub fn figment(file: Option<&Path>, env: Env) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(DEFAULTS));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment.merge(env.ignore(NOT_SETTINGS))
    }

    /// Defaults plus `overrides` (used by tests).
    pub fn from_overrides(overrides: impl Serialize) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(DEFAULTS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// Checks what serde cannot: an API reachable from other hosts must be
    /// authenticated.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.admin_token.is_none() && !self.listen.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on non-loopback address {} without an admin token; set FERRY_ADMIN_TOKEN",
                self.listen
            )));
        }
        if let Some(token) = &self.admin_token {
            if token.expose_secret().len() < 16 {
                return Err(ConfigError::Invalid(
                    "admin_token must be at least 16 characters".into(),
                ));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.idempotency_ttl < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "idempotency_ttl must be at least 60 seconds".into(),
            ));
        }
        if self.database_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "database_max_connections must be at least 1".into(),
            ));
        }
        crate::store::StoreKind::from_url(self.database_url_exposed())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(())
    }

    /// The database URL, password included: only for connecting.
    pub fn database_url_exposed(&self) -> &str {
        self.database_url.expose_secret()
    }

    /// The database URL with any password replaced, for logs.
    pub fn database_url_redacted(&self) -> String {
        redact_url(self.database_url.expose_secret())
    }
}

/// Replaces the password of a URL (and any `password=` query value).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have a password.
                let _ = url.set_password(Some("REDACTED"));
            }
            if url
                .query_pairs()
                .any(|(k, _)| k.eq_ignore_ascii_case("password"))
            {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k.eq_ignore_ascii_case("password") {
                            "REDACTED".into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "[unparsable database URL]".to_owned(),
    }
}

/// Seconds as a number, or a number with an `s`, `m`, `h` or `d` suffix.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let seconds = match Raw::deserialize(deserializer)? {
        Raw::Seconds(s) => Some(s),
        Raw::Text(text) => parse_seconds(&text),
    };
    seconds
        .map(Duration::from_secs)
        .ok_or_else(|| serde::de::Error::custom("expected seconds or a number with s, m, h or d"))
}

fn parse_seconds(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number.parse().ok()?;
    let factor = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
// figment::Jail's closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units() {
        assert_eq!(parse_seconds("90"), Some(90));
        assert_eq!(parse_seconds("24h"), Some(86_400));
        assert_eq!(parse_seconds("30m"), Some(1_800));
        assert_eq!(parse_seconds("2d"), Some(172_800));
        assert_eq!(parse_seconds("5 parsecs"), None);
    }

    #[test]
    fn passwords_never_print() {
        let redacted = redact_url("postgres://ferry:hunter2@db:5432/ferry");
        assert!(!redacted.contains("hunter2"), "{redacted}");
        assert!(redact_url("postgres://db/ferry?password=hunter2").contains("REDACTED"));
    }

    #[test]
    fn defaults_are_embedded_and_loopback() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.database_url_exposed(), "sqlite://ferry.db");
            assert_eq!(config.idempotency_ttl, Duration::from_secs(86_400));
            config.validate().map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    #[test]
    fn layers_override_in_order_and_unknown_keys_fail() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "ferry.toml",
                "listen = \"127.0.0.1:9000\"\nidempotency_ttl = \"1h\"\n",
            )?;
            jail.set_env("FERRY_IDEMPOTENCY_TTL", "2h");
            jail.set_env("FERRY_ADMIN_TOKEN", "0123456789abcdef0123");
            let config = Config::load(Some(Path::new("ferry.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.port(), 9000);
            assert_eq!(config.idempotency_ttl, Duration::from_secs(7_200));
            assert!(!format!("{config:?}").contains("0123456789abcdef0123"));

            jail.set_env("FERRY_ADMN_TOKEN", "typo");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn open_api_only_on_loopback() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_LISTEN", "0.0.0.0:8080");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.validate().is_err());
            Ok(())
        });
    }
}
