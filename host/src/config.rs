//! Configuration: compiled-in defaults, then an optional TOML file, then
//! `FERRY_`-prefixed environment variables; validated at start. Unknown keys
//! are errors, and secrets never print.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize};

/// `FERRY_` variables that are not settings: the config file path, and
/// what the scripts, the test harness and the benchmarks read (the cache
/// directory, the repository, a prebuilt broker or PostgreSQL, a ferry
/// binary to measure). Any other unknown `FERRY_` variable is an error, so
/// a typo such as `FERRY_ADMN_TOKEN` cannot silently leave the API open;
/// a harness variable left exported (`FERRY_TANSU`, which the suite's own
/// message suggests setting) refused every ferry started in that shell.
const NOT_SETTINGS: &[&str] = &[
    "config",
    "cache_dir",
    "root",
    "bin",
    "env",
    "pg_bin",
    "pg_options",
    "tansu",
    "target_dir_cap_mb",
];

/// Prefixes of `FERRY_` variables that are not settings (the benchmarks'
/// and the soak test's knobs).
const NOT_SETTING_PREFIXES: &[&str] = &["bench_", "soak_"];

/// An optional text where blank means unset.
fn blank_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|v| !v.trim().is_empty()))
}

/// Whether the `FERRY_` variable `key` (prefix stripped) is not a setting.
fn not_a_setting(key: &figment::value::UncasedStr) -> bool {
    let key = key.as_str().to_ascii_lowercase();
    NOT_SETTINGS.contains(&key.as_str()) || NOT_SETTING_PREFIXES.iter().any(|p| key.starts_with(p))
}

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

/// The longest period the configuration takes (every duration setting).
const MOST_PERIOD: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The librdkafka properties `kafka_properties` may set: how to reach and
/// authenticate to the cluster, not how ferry uses it.
pub const KAFKA_PROPERTY_PREFIXES: &[&str] = &[
    "security.protocol",
    "ssl.",
    // A TLS property whose name does not start with `ssl.`.
    "enable.ssl.certificate.verification",
    "sasl.",
    "socket.",
    "reconnect.backoff",
    "client.rack",
    "client.dns.lookup",
    "broker.address.family",
    "connections.max.idle.ms",
];

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
    /// PostgreSQL: longest a statement may run before the server cancels
    /// it (`statement_timeout`); 0 turns it off. Migrations run without.
    #[serde(deserialize_with = "duration")]
    pub database_statement_timeout: Duration,
    /// PostgreSQL: longest a statement waits for a lock (a row another
    /// session holds, an `ALTER` in progress) before it fails
    /// (`lock_timeout`); 0 turns it off. Migrations run without.
    #[serde(deserialize_with = "duration")]
    pub database_lock_timeout: Duration,
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
    /// Folder of the bundled connectors (`*.wasm`), seeded into the
    /// registry at start. Unset: a `connectors/` folder beside the
    /// executable, else `../share/ferry/connectors` relative to it.
    #[serde(default)]
    pub connectors_dir: Option<PathBuf>,
    /// Largest connector component an upload may send, in bytes.
    pub connector_max_bytes: usize,
    /// Hosts connectors may declare and call (`api.stripe.com`,
    /// `*.salesforce.com`); empty allows any. A list or a comma-separated string.
    #[serde(default, deserialize_with = "host_list")]
    pub connector_allowed_hosts: Vec<String>,
    /// Hosts connectors may never declare or call; wins over the allow-list.
    #[serde(default, deserialize_with = "host_list")]
    pub connector_denied_hosts: Vec<String>,
    /// Where compiled connector code is cached across restarts. Unset:
    /// `$XDG_CACHE_HOME/ferry/compiled` or `~/.cache/ferry/compiled`;
    /// `""` turns the disk cache off.
    #[serde(default)]
    pub compile_cache_dir: Option<PathBuf>,
    /// Largest accepted request body in bytes.
    pub max_body_bytes: usize,
    /// Largest webhook body in bytes (checked before the body is read).
    pub webhook_max_body_bytes: usize,
    /// Bytes of webhook bodies held at once across every connection, read
    /// before a connector's signature check says who sent them; a webhook
    /// beyond it is answered 503 before its body is read.
    pub webhook_buffer_bytes: usize,
    /// Connections served at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Longest a client may take to send a request's head.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// Longest a request body may stall between two reads.
    #[serde(deserialize_with = "duration")]
    pub body_read_timeout: Duration,
    /// Longest a request may take, its body and the answer included.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// On SIGTERM, how long requests in flight may finish before their
    /// connections are closed.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Kafka bootstrap servers (`host:port,...`); set, ferry runs the
    /// cluster bus. Unset, the outbox is drained in-process. Blank is
    /// unset: `FERRY_KAFKA_BROKERS=` (compose's `${KAFKA:-}`) switched to
    /// the cluster bus with no broker, and waited for one for good.
    #[serde(default, deserialize_with = "blank_as_none")]
    pub kafka_brokers: Option<String>,
    /// Prefix of the topic names (`{prefix}.changes`, `{prefix}.inbox`).
    pub kafka_topic_prefix: String,
    /// Partitions of topics ferry creates (existing topics are left alone).
    pub kafka_partitions: i32,
    /// Replication factor of topics ferry creates.
    pub kafka_replication_factor: i32,
    /// Consumer group shared by every replica.
    pub kafka_group_id: String,
    /// librdkafka properties for every Kafka client (producer, admin,
    /// consumers): security (`security.protocol`, `ssl.*`, `sasl.*`) and
    /// connection (`socket.*`, `reconnect.backoff*`, …) only, see
    /// [`KAFKA_PROPERTY_PREFIXES`]; ferry's own (idempotence, acks,
    /// offsets) cannot be changed. In the environment `_` stands for `.`:
    /// `FERRY_KAFKA_PROPERTIES__SASL_PASSWORD`. Values never print.
    #[serde(default)]
    pub kafka_properties: BTreeMap<String, SecretString>,
    /// Cluster mode: a change the bus acknowledged but no consumer took
    /// within this long is scheduled from the outbox directly.
    #[serde(deserialize_with = "duration")]
    pub bus_redelivery_after: Duration,
    /// Run the relay and the sync workers in this process (an API-only
    /// replica sets this to false).
    pub workers: bool,
    /// Pushes that may run at once in this process.
    pub sync_concurrency: usize,
    /// Inbox loops applying remote changes in this process: fewer leave
    /// the webhook endpoint more of the machine, more apply faster
    /// (docs/performance.md, rounds 7 and 20). Unset: two on PostgreSQL,
    /// one on SQLite, whose one writer the loops share with the endpoint.
    #[serde(default)]
    pub inbox_loops: Option<usize>,
    /// While webhooks keep arriving, the inbox loops after the first wait
    /// until the oldest event waiting to be applied has waited this long
    /// (a burst is acknowledged first and applied after); with the endpoint
    /// quiet they always apply. Zero (the default): they always apply.
    #[serde(deserialize_with = "duration")]
    pub inbox_catch_up_after: Duration,
    /// Attempts before a retryable failure is dead-lettered.
    pub sync_max_attempts: u32,
    /// First retry delay (the cap of the first jittered delay).
    #[serde(deserialize_with = "duration")]
    pub sync_backoff_base: Duration,
    /// Longest delay between two attempts (a Retry-After may ask for more).
    #[serde(deserialize_with = "duration")]
    pub sync_backoff_max: Duration,
    /// How long a worker owns a (customer, connector) while it pushes; must
    /// exceed `connector_call_timeout`. A crashed worker's claims expire
    /// after it.
    #[serde(deserialize_with = "duration")]
    pub sync_lease: Duration,
    /// Wall-clock limit of one connector call, HTTP included.
    #[serde(deserialize_with = "duration")]
    pub connector_call_timeout: Duration,
    /// Outbound HTTP requests per second per connector (token bucket);
    /// 0 lifts the limit. Stripe allows 100/s in live mode.
    pub connector_requests_per_second: u32,
    /// Connector calls (sandbox instances) one loaded connector version
    /// may run at once in this process, of the pool's 1000: one whose
    /// calls wait cannot hold every slot. Unset: 250, or `sync_concurrency`
    /// when that is more (at most 1000); see
    /// [`Config::connector_max_instances`].
    #[serde(default)]
    pub connector_max_instances: Option<u32>,
    /// Consecutive retryable failures that open a connector's breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker waits before letting one probe through.
    #[serde(deserialize_with = "duration")]
    pub breaker_cooldown: Duration,
    /// What a remote delete does locally: `soft_delete`, `unlink` or `ignore`.
    pub inbound_delete_policy: crate::sync::inbound::DeletePolicy,
    /// Fields changed differently on both sides: `last_writer_wins`,
    /// `prefer_local`, `prefer_remote` or `flag` (a person resolves them).
    pub conflict_policy: crate::sync::merge::ConflictPolicy,
    /// A remote record whose email belongs to another customer: `reject`,
    /// `flag`, `merge` or `auto_rename` (per connector:
    /// `connectors.NAME.duplicate_email`).
    pub duplicate_email_policy: crate::sync::inbound::DuplicateEmail,
    /// Fields a system owns, whose value wins: `{ phone = "salesforce" }`.
    #[serde(default)]
    pub field_owners: crate::sync::merge::FieldOwners,
    /// A reconciliation aborts, repairing nothing, when it would delete or
    /// unlink more than this share of a connector's links.
    pub reconcile_max_delete_share: f64,
    /// Reconciliation runs one process drives at once (a run waiting on a
    /// paused connector gives its place up).
    pub reconcile_max_runs: usize,
    /// Serve `/metrics` and record metrics (`false` records nothing).
    pub metrics: bool,
    /// Export trace spans over OTLP/HTTP to this collector
    /// (`http://otel-collector:4318`); unset, nothing is exported.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Published-and-consumed outbox events, applied or skipped inbox
    /// events and deliveries older than this are deleted (dead letters and
    /// open conflicts stay until resolved). `0` keeps everything.
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// How often retention runs.
    #[serde(deserialize_with = "duration")]
    pub retention_every: Duration,
    /// Rows one retention statement deletes at most.
    pub retention_batch: u32,
    /// How often ferry looks for tables whose statistics are far behind
    /// their contents and analyses them (PostgreSQL; zero turns it off).
    #[serde(deserialize_with = "duration")]
    pub analyze_every: Duration,
    /// Per-connector settings and secrets from the file or environment
    /// (`FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY=sk_test_...`). Settings
    /// stored through the API take precedence.
    #[serde(default, deserialize_with = "connector_names")]
    pub connectors: BTreeMap<String, ConnectorSettingsConfig>,
}

/// The `connectors` table with its names as the registry knows them.
/// Connector names are `[a-z0-9-]+`, and an environment variable's name
/// cannot hold a `-`: `FERRY_CONNECTORS__ACME_CRM__…` configures connector
/// `acme-crm`. Given both ways (the file's `acme-crm`, the environment's
/// `ACME_CRM`), the two are merged, the environment's values winning.
fn connector_names<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, ConnectorSettingsConfig>, D::Error> {
    let given = BTreeMap::<String, ConnectorSettingsConfig>::deserialize(deserializer)?;
    let mut connectors: BTreeMap<String, ConnectorSettingsConfig> = BTreeMap::new();
    // Hyphenated keys (a file's) first, so the environment's are laid over.
    let (hyphenated, underscored): (Vec<_>, Vec<_>) =
        given.into_iter().partition(|(name, _)| !name.contains('_'));
    for (name, config) in hyphenated.into_iter().chain(underscored) {
        let name = name.replace('_', "-");
        match connectors.get_mut(&name) {
            None => {
                connectors.insert(name, config);
            }
            Some(merged) => {
                merged.enabled = config.enabled.or(merged.enabled);
                merged.settings.extend(config.settings);
                merged.secrets.extend(config.secrets);
                merged.duplicate_email = config.duplicate_email.or(merged.duplicate_email);
                merged.reconcile_every = config.reconcile_every.or(merged.reconcile_every);
                merged.reconcile_repair = config.reconcile_repair.or(merged.reconcile_repair);
            }
        }
    }
    Ok(connectors)
}

/// One connector's configuration from the file or environment.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct ConnectorSettingsConfig {
    /// Whether ferry syncs through this connector (default: true once any
    /// setting or secret is given).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Non-secret settings by name.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Secret values by name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretString>,
    /// Overrides `duplicate_email_policy` for this connector.
    #[serde(default)]
    pub duplicate_email: Option<crate::sync::inbound::DuplicateEmail>,
    /// Runs a reconciliation this often (`24h`); unset: only on demand.
    #[serde(default, deserialize_with = "optional_duration")]
    pub reconcile_every: Option<Duration>,
    /// What a scheduled reconciliation repairs: `report` (the default),
    /// `push_local`, `pull_remote` or `merge`.
    #[serde(default)]
    pub reconcile_repair: Option<crate::sync::reconcile::Repair>,
}

impl std::fmt::Debug for ConnectorSettingsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorSettingsConfig")
            .field("enabled", &self.enabled)
            .field("settings", &self.settings)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("duplicate_email", &self.duplicate_email)
            .field("reconcile_every", &self.reconcile_every)
            .field("reconcile_repair", &self.reconcile_repair)
            .finish()
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("database_url", &self.database_url_redacted())
            .field("database_max_connections", &self.database_max_connections)
            .field(
                "database_statement_timeout",
                &self.database_statement_timeout,
            )
            .field("database_lock_timeout", &self.database_lock_timeout)
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
            .field("connector_max_bytes", &self.connector_max_bytes)
            .field("connector_allowed_hosts", &self.connector_allowed_hosts)
            .field("connector_denied_hosts", &self.connector_denied_hosts)
            .field("compile_cache_dir", &self.compile_cache_dir)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("log_format", &self.log_format)
            .field("kafka_brokers", &self.kafka_brokers)
            .field("kafka_topic_prefix", &self.kafka_topic_prefix)
            .field("kafka_partitions", &self.kafka_partitions)
            .field("kafka_replication_factor", &self.kafka_replication_factor)
            .field("kafka_group_id", &self.kafka_group_id)
            .field(
                "kafka_properties",
                &self.kafka_properties.keys().collect::<Vec<_>>(),
            )
            .field("bus_redelivery_after", &self.bus_redelivery_after)
            .field("workers", &self.workers)
            .field("sync_concurrency", &self.sync_concurrency)
            .field("inbox_loops", &self.inbox_loops)
            .field("inbox_catch_up_after", &self.inbox_catch_up_after)
            .field("sync_max_attempts", &self.sync_max_attempts)
            .field("sync_backoff_base", &self.sync_backoff_base)
            .field("sync_backoff_max", &self.sync_backoff_max)
            .field("sync_lease", &self.sync_lease)
            .field("connector_call_timeout", &self.connector_call_timeout)
            .field(
                "connector_requests_per_second",
                &self.connector_requests_per_second,
            )
            .field("connector_max_instances", &self.connector_max_instances())
            .field("breaker_failure_threshold", &self.breaker_failure_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("inbound_delete_policy", &self.inbound_delete_policy)
            .field("conflict_policy", &self.conflict_policy)
            .field("duplicate_email_policy", &self.duplicate_email_policy)
            .field("field_owners", &self.field_owners)
            .field(
                "reconcile_max_delete_share",
                &self.reconcile_max_delete_share,
            )
            .field("reconcile_max_runs", &self.reconcile_max_runs)
            .field("webhook_max_body_bytes", &self.webhook_max_body_bytes)
            .field("webhook_buffer_bytes", &self.webhook_buffer_bytes)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout", &self.header_read_timeout)
            .field("body_read_timeout", &self.body_read_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("metrics", &self.metrics)
            .field(
                "otlp_endpoint",
                &self.otlp_endpoint.as_deref().map(redact_url),
            )
            .field("retention", &self.retention)
            .field("retention_every", &self.retention_every)
            .field("retention_batch", &self.retention_batch)
            .field("analyze_every", &self.analyze_every)
            .field("connectors", &self.connectors)
            .finish()
    }
}

/// The compiled-in defaults, as a figment provider.
#[derive(Serialize)]
struct Defaults {
    listen: &'static str,
    database_url: &'static str,
    database_max_connections: u32,
    database_statement_timeout: &'static str,
    database_lock_timeout: &'static str,
    idempotency_ttl: u64,
    allow_private_hosts: bool,
    connector_max_bytes: usize,
    max_body_bytes: usize,
    log_format: LogFormat,
    kafka_topic_prefix: &'static str,
    kafka_partitions: i32,
    kafka_replication_factor: i32,
    kafka_group_id: &'static str,
    bus_redelivery_after: &'static str,
    workers: bool,
    sync_concurrency: usize,
    inbox_catch_up_after: &'static str,
    sync_max_attempts: u32,
    sync_backoff_base: &'static str,
    sync_backoff_max: &'static str,
    sync_lease: &'static str,
    connector_call_timeout: &'static str,
    connector_requests_per_second: u32,
    breaker_failure_threshold: u32,
    breaker_cooldown: &'static str,
    inbound_delete_policy: &'static str,
    conflict_policy: &'static str,
    duplicate_email_policy: &'static str,
    reconcile_max_delete_share: f64,
    reconcile_max_runs: usize,
    webhook_max_body_bytes: usize,
    webhook_buffer_bytes: usize,
    max_connections: usize,
    header_read_timeout: &'static str,
    body_read_timeout: &'static str,
    request_timeout: &'static str,
    shutdown_grace: &'static str,
    metrics: bool,
    retention: &'static str,
    retention_every: &'static str,
    retention_batch: u32,
    analyze_every: &'static str,
}

const DEFAULTS: Defaults = Defaults {
    listen: "127.0.0.1:8080",
    database_url: "sqlite://ferry.db",
    database_max_connections: 16,
    database_statement_timeout: "60s",
    database_lock_timeout: "10s",
    idempotency_ttl: 24 * 60 * 60,
    allow_private_hosts: false,
    connector_max_bytes: 16 * 1024 * 1024,
    max_body_bytes: 1024 * 1024,
    log_format: LogFormat::Text,
    kafka_topic_prefix: "ferry",
    kafka_partitions: 6,
    kafka_replication_factor: 1,
    kafka_group_id: "ferry",
    bus_redelivery_after: "60s",
    workers: true,
    sync_concurrency: 64,
    inbox_catch_up_after: "0s",
    sync_max_attempts: 10,
    sync_backoff_base: "1s",
    sync_backoff_max: "10m",
    sync_lease: "60s",
    connector_call_timeout: "10s",
    connector_requests_per_second: 100,
    breaker_failure_threshold: 5,
    breaker_cooldown: "30s",
    inbound_delete_policy: "soft_delete",
    conflict_policy: "last_writer_wins",
    duplicate_email_policy: "reject",
    reconcile_max_delete_share: 0.1,
    reconcile_max_runs: 4,
    webhook_max_body_bytes: ferry_runtime::DEFAULT_WEBHOOK_MAX_BODY_BYTES,
    webhook_buffer_bytes: 64 * 1024 * 1024,
    max_connections: 1024,
    header_read_timeout: "10s",
    body_read_timeout: "10s",
    request_timeout: "60s",
    shutdown_grace: "10s",
    metrics: true,
    retention: "7d",
    retention_every: "1m",
    retention_batch: 1000,
    analyze_every: "2s",
};

/// The environment with every value taken as the text it is. figment's
/// own `Env` parses values by their look, so `FERRY_ADMIN_TOKEN=1234…` or
/// an `api_version` of `62.0` would reach string settings as numbers (and
/// `62.0` as `62`). Numbers and booleans are read from their text when the
/// configuration is extracted (`extract_lossy`).
///
/// A blank list, broker list or connector setting or secret is as if
/// unset ([`blank_is_unset`]): the file's value, or the default, stays. A
/// compose file's `FERRY_CONNECTOR_ALLOWED_HOSTS=${HOSTS:-}` replaced the
/// file's allow-list with none, which lets connectors call any host.
/// Any other blank is taken as given, and refused where it must not be
/// (a blank `FERRY_DATABASE_URL`, read as unset, would start a replica on
/// a SQLite file of its own).
struct RawEnv(Env);

/// Whether a blank value of the variable `key` (`__` read as `.`) counts
/// as unset.
fn blank_is_unset(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    matches!(
        key.as_str(),
        "connector_allowed_hosts" | "connector_denied_hosts" | "kafka_brokers"
    ) || key.starts_with("connectors.")
}

impl figment::Provider for RawEnv {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (key, value) in self.0.iter() {
            if value.trim().is_empty() && blank_is_unset(key.as_str()) {
                continue;
            }
            let nested = figment::util::nest(key.as_str(), figment::value::Value::from(value));
            if let Some(nested) = nested.into_dict() {
                merge_dicts(&mut dict, nested);
            }
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// Merges `from` into `into`, nested dictionaries key by key.
fn merge_dicts(into: &mut figment::value::Dict, from: figment::value::Dict) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (
                Some(figment::value::Value::Dict(_, existing)),
                figment::value::Value::Dict(_, more),
            ) => {
                merge_dicts(existing, more);
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

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

impl ConfigError {
    /// figment's error without the values it quotes: a secret set where a
    /// map was expected (`FERRY_CONNECTORS__STRIPE__SECRETS=sk_live_…`,
    /// its name left off) was printed whole in the start's error, and so
    /// in the container's log. The key and what was expected stay.
    fn load(error: figment::Error) -> Self {
        use figment::error::{Actual, Kind};
        let shown = |actual: Actual| {
            Actual::Other(
                match actual {
                    Actual::Str(_) => "a string",
                    Actual::Bytes(_) => "bytes",
                    Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
                    Actual::Float(_) => "a float",
                    Actual::Char(_) => "a character",
                    Actual::Bool(_) => "a boolean",
                    other => return other,
                }
                .to_owned(),
            )
        };
        let mut errors: Vec<figment::Error> = error
            .into_iter()
            .map(|mut error| {
                error.kind = match error.kind {
                    Kind::InvalidType(actual, expected) => {
                        Kind::InvalidType(shown(actual), expected)
                    }
                    Kind::InvalidValue(actual, expected) => {
                        Kind::InvalidValue(shown(actual), expected)
                    }
                    kind => kind,
                };
                error
            })
            .collect();
        // The iterator gives the last error first; chained back in order.
        let oldest = errors.pop().expect("an error is at least one");
        let error = errors.into_iter().rev().fold(oldest, figment::Error::chain);
        Self::Load(Box::new(error))
    }
}

impl Config {
    /// Connector calls one loaded connector version may run at once:
    /// `connector_max_instances`, or unset 250, or `sync_concurrency` when
    /// that is more (a configuration from before the setting starts as it
    /// did), at most the pool's 1000.
    pub fn connector_max_instances(&self) -> u32 {
        let pool = ferry_runtime::RuntimeConfig::default().max_instances;
        self.connector_max_instances.unwrap_or_else(|| {
            u32::try_from(self.sync_concurrency)
                .unwrap_or(u32::MAX)
                .max(250)
                .min(pool)
        })
    }

    /// Loads defaults, then `file` (if given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::figment(file, Env::prefixed("FERRY_"))
            .extract_lossy()
            .map_err(ConfigError::load)
    }

    /// Like [`Config::load`], with `overrides` on top of the compiled-in
    /// defaults (the file and the environment still win): `ferry connector
    /// dev`'s local defaults.
    pub fn load_with(file: Option<&Path>, overrides: impl Serialize) -> Result<Self, ConfigError> {
        let mut figment =
            Figment::from(Serialized::defaults(DEFAULTS)).merge(Serialized::defaults(overrides));
        if let Some(file) = file {
            figment = figment.merge(TomlFile(file.to_owned()));
        }
        figment
            .merge(RawEnv(
                Env::prefixed("FERRY_")
                    .filter(|k| !not_a_setting(k))
                    .split("__"),
            ))
            .extract_lossy()
            .map_err(ConfigError::load)
    }

    /// Defaults, then `file`, then `env` (`FERRY_` variables).
    pub fn figment(file: Option<&Path>, env: Env) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(DEFAULTS));
        if let Some(file) = file {
            figment = figment.merge(TomlFile(file.to_owned()));
        }
        // `__` nests: FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE.
        figment.merge(RawEnv(env.filter(|k| !not_a_setting(k)).split("__")))
    }

    /// The upload rules `ferry connector check` judges by, read as
    /// [`Config::load`] reads them (defaults, `file`, `FERRY_*`) but
    /// without refusing the keys it does not need: an author's shell may
    /// hold variables that are not a whole server's configuration.
    pub fn upload_rules(file: Option<&Path>) -> Result<UploadRules, ConfigError> {
        Self::figment(file, Env::prefixed("FERRY_"))
            .extract_lossy()
            .map_err(ConfigError::load)
    }

    /// Defaults plus `overrides` (used by tests).
    pub fn from_overrides(overrides: impl Serialize) -> Result<Self, ConfigError> {
        Figment::from(Serialized::defaults(DEFAULTS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(ConfigError::load)
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
            // A line break or a space around it (a secret made with
            // `--from-file`, an env file with CRLF), a control character or
            // a non-ASCII one: what a client sends is trimmed, and a header
            // carries none of the others, so nothing ever matched the
            // token, and every request was refused without a word why.
            let token = token.expose_secret();
            if token.trim() != token || !token.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                return Err(ConfigError::Invalid(
                    "admin_token must be printable ASCII without white space around it (check for a trailing newline)".into(),
                ));
            }
        }
        if let Some(key) = &self.master_key {
            if key.expose_secret().len() < crate::secrets::MIN_MASTER_KEY_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "master_key must be at least {} bytes (`openssl rand -hex 32` makes one)",
                    crate::secrets::MIN_MASTER_KEY_BYTES
                )));
            }
        }
        if self.connector_max_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "connector_max_bytes must be at least 1024".into(),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            let scheme_ok = url::Url::parse(endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !scheme_ok {
                return Err(ConfigError::Invalid(format!(
                    "otlp_endpoint must be an http:// or https:// URL, got {}",
                    redact_url(endpoint)
                )));
            }
            // An export that fails is logged with the endpoint's whole URL
            // (the HTTP client's error): credentials in it would go to the
            // logs. Headers carry them (`OTEL_EXPORTER_OTLP_HEADERS`).
            let credentials = url::Url::parse(endpoint)
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some());
            if credentials {
                return Err(ConfigError::Invalid(format!(
                    "otlp_endpoint must not carry credentials ({}): give them as headers, OTEL_EXPORTER_OTLP_HEADERS=authorization=...",
                    redact_url(endpoint)
                )));
            }
        }
        if let Some(key) = self.field_owners.invalid_key() {
            return Err(ConfigError::Invalid(format!(
                "field_owners: `{key}` is not a field (name, email, phone, address[.line1|line2|city|state|postal_code|country], metadata[.KEY])"
            )));
        }
        if let Some((field, owner)) = self.field_owners.invalid_owner() {
            return Err(ConfigError::Invalid(format!(
                "field_owners: `{field}` is owned by `{owner}`, which is neither `ferry` nor a connector's name (lower-case letters, digits and hyphens)"
            )));
        }
        if !(0.0..=1.0).contains(&self.reconcile_max_delete_share) {
            return Err(ConfigError::Invalid(
                "reconcile_max_delete_share must be between 0 and 1".into(),
            ));
        }
        if !(1..=64).contains(&self.reconcile_max_runs) {
            return Err(ConfigError::Invalid(
                "reconcile_max_runs must be between 1 and 64".into(),
            ));
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
        // A push starts only while its lease outlasts a call (the sync
        // engine's `try_push`): a fresh claim must leave room for one.
        if self.sync_lease < self.connector_call_timeout + Duration::from_secs(1) {
            return Err(ConfigError::Invalid(
                "sync_lease must exceed connector_call_timeout by at least 1s".into(),
            ));
        }
        if self.sync_max_attempts == 0 || self.sync_concurrency == 0 || self.inbox_loops == Some(0)
        {
            return Err(ConfigError::Invalid(
                "sync_max_attempts, sync_concurrency and inbox_loops must be at least 1".into(),
            ));
        }
        // An entry that is no host matched nothing: a deny-list of
        // `10.0.0.0/8` looked like it denied a range, and denied nothing.
        for (name, list) in [
            ("connector_allowed_hosts", &self.connector_allowed_hosts),
            ("connector_denied_hosts", &self.connector_denied_hosts),
        ] {
            if let Some(problem) = list
                .iter()
                .find_map(|e| ferry_runtime::list_entry_problem(e))
            {
                return Err(ConfigError::Invalid(format!("{name}: {problem}")));
            }
        }
        // 0 read as "no breaker" opened it at the first retryable failure.
        if self.breaker_failure_threshold == 0 {
            return Err(ConfigError::Invalid(
                "breaker_failure_threshold must be at least 1".into(),
            ));
        }
        // A connector's pushes alone may fill `sync_concurrency` slots;
        // its webhooks need room beside them. Only a value given is
        // refused: unset, it follows `sync_concurrency`.
        let pool = ferry_runtime::RuntimeConfig::default().max_instances;
        if let Some(given) = self.connector_max_instances {
            let least = self.sync_concurrency.min(pool as usize);
            if given == 0 || given > pool || (given as usize) < least {
                return Err(ConfigError::Invalid(format!(
                    "connector_max_instances must be between {least} (sync_concurrency, at most \
                     {pool}) and {pool}"
                )));
            }
        }
        if self.sync_backoff_base.is_zero() || self.sync_backoff_max < self.sync_backoff_base {
            return Err(ConfigError::Invalid(
                "sync_backoff_base must be positive and at most sync_backoff_max".into(),
            ));
        }
        if self.kafka_partitions < 1 || self.kafka_replication_factor < 1 {
            return Err(ConfigError::Invalid(
                "kafka_partitions and kafka_replication_factor must be at least 1".into(),
            ));
        }
        let refused: Vec<String> = self
            .kafka_property_list()
            .into_iter()
            .map(|(name, _)| name)
            .filter(|name| !KAFKA_PROPERTY_PREFIXES.iter().any(|p| name.starts_with(p)))
            .collect();
        if !refused.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "kafka_properties: {} not taken (security and connection properties only: names starting with {}; ferry sets the others itself)",
                refused.join(", "),
                KAFKA_PROPERTY_PREFIXES.join(", ")
            )));
        }
        self.validate_limits()?;
        let kind = crate::store::StoreKind::from_url(self.database_url_exposed())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // A secret in a key the driver does not read: it did nothing, and
        // the driver logged it with its value at start (an `sslpassword`,
        // an encrypted client key's passphrase, which it cannot use, went
        // to the logs). Named without its value. Other keys it ignores
        // (libpq's `channel_binding`, `connect_timeout`) are no secret, and
        // URLs that carry them keep working.
        if kind == crate::store::StoreKind::Postgres {
            if let Ok(url) = url::Url::parse(self.database_url_exposed()) {
                if let Some((key, _)) = url
                    .query_pairs()
                    .find(|(k, _)| secret_key(k) && !POSTGRES_URL_KEYS.contains(&k.as_ref()))
                {
                    return Err(ConfigError::Invalid(format!(
                        "database_url: the query parameter `{key}` names a secret ferry's PostgreSQL driver does not read (it would be ignored, and logged with its value); an encrypted client key is not supported: give `sslkey` a key without a passphrase"
                    )));
                }
            }
        }
        // In cluster mode on PostgreSQL, the replica leading the relay holds
        // a connection of the pool for its lock as long as it leads: with a
        // pool of one, nothing else ever gets a connection.
        // SQLite is one process's file (its lock keeps any other out): an
        // API-only replica of it stores webhooks and writes that nothing
        // would ever sync, while saying it is ready.
        if kind == crate::store::StoreKind::Sqlite && !self.workers {
            return Err(ConfigError::Invalid(
                "workers = false needs PostgreSQL: on SQLite no other process can do the sync work, and nothing would ever sync".into(),
            ));
        }
        let leads_relay = self.workers && self.kafka_brokers.is_some();
        if kind == crate::store::StoreKind::Postgres
            && leads_relay
            && self.database_max_connections < 2
        {
            return Err(ConfigError::Invalid(
                "database_max_connections must be at least 2 with kafka_brokers and workers on PostgreSQL (8 or more is what ferry is measured with)".into(),
            ));
        }
        Ok(())
    }

    /// Values serde takes that would leave ferry running but stuck: a zero
    /// timeout answers every request or call with a timeout, a zero period
    /// spins or stops its loop.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let positive = [
            ("request_timeout", self.request_timeout),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("connector_call_timeout", self.connector_call_timeout),
            ("retention_every", self.retention_every),
            ("bus_redelivery_after", self.bus_redelivery_after),
            // 0 replaced a half-open breaker's probe at every call: every
            // call went out to a remote that was down.
            ("breaker_cooldown", self.breaker_cooldown),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| value.is_zero()) {
            return Err(ConfigError::Invalid(format!("{name} must be positive")));
        }
        // A period past what dates and millisecond clocks hold (a typo of
        // `100000000d`) panicked the task that added it to the clock.
        let periods = [
            ("idempotency_ttl", self.idempotency_ttl),
            ("header_read_timeout", self.header_read_timeout),
            ("body_read_timeout", self.body_read_timeout),
            ("request_timeout", self.request_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("bus_redelivery_after", self.bus_redelivery_after),
            ("inbox_catch_up_after", self.inbox_catch_up_after),
            ("sync_backoff_base", self.sync_backoff_base),
            ("sync_backoff_max", self.sync_backoff_max),
            ("sync_lease", self.sync_lease),
            ("connector_call_timeout", self.connector_call_timeout),
            ("breaker_cooldown", self.breaker_cooldown),
            ("retention", self.retention),
            ("retention_every", self.retention_every),
            ("analyze_every", self.analyze_every),
        ];
        if let Some((name, _)) = periods.iter().find(|(_, value)| *value > MOST_PERIOD) {
            return Err(ConfigError::Invalid(format!(
                "{name} must be at most 100 years"
            )));
        }
        // PostgreSQL takes milliseconds in a 32-bit integer, and refuses
        // every connection given more.
        let server_limits = [
            (
                "database_statement_timeout",
                self.database_statement_timeout,
            ),
            ("database_lock_timeout", self.database_lock_timeout),
        ];
        let most = Duration::from_millis(i32::MAX as u64);
        if let Some((name, _)) = server_limits.iter().find(|(_, value)| *value > most) {
            return Err(ConfigError::Invalid(format!(
                "{name} must be at most 24 days (0 sets none)"
            )));
        }
        if self.webhook_max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "webhook_max_body_bytes must be at least 1024".into(),
            ));
        }
        if self.webhook_buffer_bytes < self.webhook_max_body_bytes {
            return Err(ConfigError::Invalid(
                "webhook_buffer_bytes must be at least webhook_max_body_bytes".into(),
            ));
        }
        if self.max_connections == 0 || self.retention_batch == 0 {
            return Err(ConfigError::Invalid(
                "max_connections and retention_batch must be at least 1".into(),
            ));
        }
        let every = self
            .connectors
            .iter()
            .filter_map(|(name, c)| Some((name.as_str(), c.reconcile_every?)));
        for (name, every) in every {
            if every < Duration::from_secs(60) {
                return Err(ConfigError::Invalid(format!(
                    "reconcile_every ({name}) must be at least 1m: a run lists the whole remote"
                )));
            }
        }
        Ok(())
    }

    /// The compiled-code cache directory in effect (see
    /// [`Config::compile_cache_dir`]).
    pub fn compile_cache(&self) -> Option<PathBuf> {
        match &self.compile_cache_dir {
            Some(dir) if dir.as_os_str().is_empty() => None,
            Some(dir) => Some(dir.clone()),
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|d| d.join("ferry/compiled")),
        }
    }

    /// [`Config::kafka_properties`] under librdkafka's names (`_` read as
    /// `.`, lower case: the environment's form).
    pub fn kafka_property_list(&self) -> Vec<(String, SecretString)> {
        self.kafka_properties
            .iter()
            .map(|(name, value)| (name.to_ascii_lowercase().replace('_', "."), value.clone()))
            .collect()
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

/// Whether a URL's query key names a secret (`password`, libpq's
/// `sslpassword`: the passphrase of an encrypted client key).
fn secret_key(key: &str) -> bool {
    key.to_ascii_lowercase().contains("password")
}

/// The connection parameters sqlx's PostgreSQL driver reads from a URL's
/// query; it ignores any other, and logs it with its value.
const POSTGRES_URL_KEYS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Replaces the password of a URL (and any query value whose key names a
/// password: `password=`, `sslpassword=`).
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have a password.
                let _ = url.set_password(Some("REDACTED"));
            }
            if url.query_pairs().any(|(k, _)| secret_key(&k)) {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if secret_key(&k) {
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
        Err(_) => "[unparsable URL]".to_owned(),
    }
}

/// What an upload is checked against (see [`Config::upload_rules`]).
#[derive(Debug, Clone, Deserialize)]
pub struct UploadRules {
    /// `connector_max_bytes`.
    pub connector_max_bytes: usize,
    /// `connector_allowed_hosts`.
    #[serde(default, deserialize_with = "host_list")]
    pub connector_allowed_hosts: Vec<String>,
    /// `connector_denied_hosts`.
    #[serde(default, deserialize_with = "host_list")]
    pub connector_denied_hosts: Vec<String>,
    /// `allow_private_hosts`.
    pub allow_private_hosts: bool,
}

/// A list of hosts: a TOML array, or one comma-separated string (what an
/// environment variable can hold).
fn host_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Text(String),
    }
    let hosts = match Raw::deserialize(deserializer)? {
        Raw::List(list) => list,
        Raw::Text(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(hosts
        .into_iter()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .collect())
}

/// An optional [`duration`].
fn optional_duration<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    duration(deserializer).map(Some)
}

/// Seconds as a number, or a number with an `ms`, `s`, `m`, `h` or `d` suffix.
fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    let parsed = match Raw::deserialize(deserializer)? {
        Raw::Seconds(s) => Some(Duration::from_secs(s)),
        Raw::Text(text) => parse_duration(&text),
    };
    parsed.ok_or_else(|| {
        serde::de::Error::custom("expected seconds or a number with ms, s, m, h or d")
    })
}

fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(millis).map(Duration::from_millis)
}

/// A configuration file, read as `Toml::file_exact` reads it, whose syntax
/// errors name the line and column but never quote the line: figment's
/// TOML error prints it whole, and a line may be a secret left unquoted
/// (`database_url = postgres://ferry:password@db/ferry`), printed to
/// stderr and the container's log.
struct TomlFile(PathBuf);

impl figment::Provider for TomlFile {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOML file").source(figment::Source::File(self.0.clone()))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let path = self.0.display();
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| figment::Error::from(format!("{path}: {e}")))?;
        if let Err(error) = text.parse::<toml::Table>() {
            let at = error.span().map_or_else(String::new, |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!(" at line {line}, column {column}")
            });
            return Err(figment::Error::from(format!(
                "{path} is not valid TOML{at}: {}",
                error.message()
            )));
        }
        Toml::string(&text).data()
    }
}

#[cfg(test)]
// figment::Jail's closures must return figment's (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units() {
        let secs = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(secs("90"), Some(90_000));
        assert_eq!(secs("250ms"), Some(250));
        assert_eq!(secs("24h"), Some(86_400_000));
        assert_eq!(secs("30m"), Some(1_800_000));
        assert_eq!(secs("2d"), Some(172_800_000));
        assert_eq!(secs("5 parsecs"), None);
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
            assert_eq!(
                (
                    config.database_statement_timeout,
                    config.database_lock_timeout
                ),
                (Duration::from_secs(60), Duration::from_secs(10))
            );
            jail.set_env("FERRY_DATABASE_LOCK_TIMEOUT", "0");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config.database_lock_timeout,
                Duration::ZERO,
                "0 turns it off"
            );
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

            jail.set_env(
                "FERRY_CONNECTORS__STRIPE__SETTINGS__API_BASE",
                "http://127.0.0.1:8420",
            );
            jail.set_env(
                "FERRY_CONNECTORS__STRIPE__SECRETS__API_KEY",
                "sk_test_secret",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let stripe = &config.connectors["stripe"];
            assert_eq!(stripe.settings["api_base"], "http://127.0.0.1:8420");
            assert!(!format!("{config:?}").contains("sk_test_secret"));

            // The harness's and the benchmarks' variables are not settings.
            for (name, value) in [
                ("FERRY_TANSU", "/usr/local/bin/tansu"),
                ("FERRY_PG_BIN", "/usr/lib/postgresql/15/bin"),
                ("FERRY_BIN", "target/release/ferry"),
                ("FERRY_BENCH_SECONDS", "15"),
                ("FERRY_SOAK_RATE", "100"),
            ] {
                jail.set_env(name, value);
            }
            Config::load(None).map_err(|e| e.to_string())?;
            // A blank broker list is none: the embedded bus.
            jail.set_env("FERRY_KAFKA_BROKERS", "");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.kafka_brokers, None);
            // A blank variable is as if unset: the file's value stays. An
            // allow-list emptied so let connectors call any host.
            jail.create_file(
                "lists.toml",
                "connector_allowed_hosts = [\"api.stripe.com\"]\n\
                 kafka_brokers = \"kafka:9092\"\n\
                 [connectors.stripe.secrets]\nwebhook_secret = \"whsec_file\"\n",
            )?;
            jail.set_env("FERRY_CONNECTOR_ALLOWED_HOSTS", " ");
            jail.set_env("FERRY_CONNECTORS__STRIPE__SECRETS__WEBHOOK_SECRET", "");
            let config = Config::load(Some(Path::new("lists.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.connector_allowed_hosts, ["api.stripe.com"]);
            assert_eq!(config.kafka_brokers.as_deref(), Some("kafka:9092"));
            let secret = &config.connectors["stripe"].secrets["webhook_secret"];
            assert_eq!(secret.expose_secret(), "whsec_file");
            // Other blanks are taken as given: a blank database URL, read as
            // unset, would start a replica on a SQLite file of its own.
            jail.set_env("FERRY_DATABASE_URL", "");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.validate().is_err());
            jail.set_env("FERRY_DATABASE_URL", "sqlite://ferry.db");
            jail.set_env("FERRY_COMPILE_CACHE_DIR", "");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.compile_cache_dir, Some(PathBuf::new()));
            jail.set_env("FERRY_ADMIN_TOKEN", "");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.validate().is_err());
            jail.set_env("FERRY_ADMIN_TOKEN", "0123456789abcdef0123");

            jail.set_env("FERRY_ADMN_TOKEN", "typo");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    /// A value of the wrong type is not quoted in the error: a secret set
    /// where a map was expected reached the start's error, and the log.
    #[test]
    fn a_value_of_the_wrong_type_is_not_quoted() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("ferry.toml", "admin_token = 98765432123456789\n")?;
            let refused = |file: Option<&str>, value: &str, key: &str, found: &str| {
                let error = match Config::load(file.map(Path::new)) {
                    Err(ConfigError::Load(error)) => error,
                    other => panic!("{other:?}"),
                };
                let all: Vec<String> = error.into_iter().map(|e| e.to_string()).collect();
                let all = all.join("; ");
                assert!(!all.contains(value), "{all}");
                assert!(
                    all.to_lowercase().contains(key) && all.contains(found),
                    "{all}"
                );
            };
            refused(
                Some("ferry.toml"),
                "98765432123456789",
                "admin_token",
                "an integer",
            );
            jail.set_env("FERRY_CONNECTORS__STRIPE__SECRETS", "sk_live_quoted_0123");
            refused(None, "sk_live_quoted_0123", "secrets", "a string");
            Ok(())
        });
    }

    /// Every `FERRY_` variable the scripts read is a setting or named as not
    /// one: `FERRY_TARGET_DIR_CAP_MB`, which the README offers, refused every
    /// ferry started in a shell that exported it.
    #[test]
    fn every_variable_the_scripts_read_is_a_setting_or_left_alone() {
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
        let mut names = std::collections::BTreeSet::new();
        for entry in std::fs::read_dir(&scripts).expect("the scripts directory") {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
            for (at, _) in text.match_indices("FERRY_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.len() > "FERRY_".len() {
                    names.insert(name);
                }
            }
        }
        assert!(names.contains("FERRY_TARGET_DIR_CAP_MB"), "{names:?}");
        for name in names {
            figment::Jail::expect_with(|jail| {
                jail.clear_env();
                jail.set_env(&name, "1");
                // A setting may refuse "1"; only a name ferry does not know
                // is wrong here.
                if let Err(error) = Config::load(None) {
                    let error = error.to_string();
                    assert!(!error.contains("unknown field"), "{name}: {error}");
                }
                Ok(())
            });
        }
    }

    /// An environment variable cannot name `acme-crm`: `ACME_CRM` does, and
    /// is merged with the file's `acme-crm` table.
    #[test]
    fn a_hyphenated_connector_is_configured_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "ferry.toml",
                "[connectors.acme-crm.settings]\napi_base = \"https://crm.example\"\nregion = \"eu\"\n",
            )?;
            jail.set_env("FERRY_CONNECTORS__ACME_CRM__SECRETS__API_KEY", "k");
            jail.set_env("FERRY_CONNECTORS__ACME_CRM__SETTINGS__REGION", "us");
            let config = Config::load(Some(Path::new("ferry.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.connectors.keys().collect::<Vec<_>>(), ["acme-crm"]);
            let crm = &config.connectors["acme-crm"];
            assert_eq!(crm.settings["api_base"], "https://crm.example");
            assert_eq!(crm.settings["region"], "us", "the environment wins");
            assert_eq!(crm.secrets["api_key"].expose_secret(), "k");
            Ok(())
        });
    }

    #[test]
    fn kafka_properties_take_librdkafka_names_and_only_connection_ones() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "ferry.toml",
                "[kafka_properties]\n\"ssl.ca.location\" = \"/etc/ca.pem\"\n",
            )?;
            jail.set_env("FERRY_KAFKA_PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL");
            jail.set_env(
                "FERRY_KAFKA_PROPERTIES__SASL_PASSWORD",
                "hunter2-not-logged",
            );
            jail.set_env(
                "FERRY_KAFKA_PROPERTIES__ENABLE_SSL_CERTIFICATE_VERIFICATION",
                "false",
            );
            let config = Config::load(Some(Path::new("ferry.toml"))).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            let names: Vec<String> = config
                .kafka_property_list()
                .into_iter()
                .map(|(name, _)| name)
                .collect();
            assert_eq!(
                names,
                [
                    "enable.ssl.certificate.verification",
                    "sasl.password",
                    "security.protocol",
                    "ssl.ca.location"
                ]
            );
            let shown = format!("{config:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            jail.set_env("FERRY_KAFKA_PROPERTIES__ENABLE_IDEMPOTENCE", "false");
            let config = Config::load(Some(Path::new("ferry.toml"))).map_err(|e| e.to_string())?;
            let refused = config
                .validate()
                .expect_err("ferry's own property")
                .to_string();
            assert!(refused.contains("enable.idempotence"), "{refused}");
            Ok(())
        });
    }

    #[test]
    fn string_settings_take_the_raw_text() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_ADMIN_TOKEN", "1234567890123456");
            jail.set_env("FERRY_MASTER_KEY", "0".repeat(64));
            jail.set_env("FERRY_CONNECTORS__STRIPE__SETTINGS__ACCOUNT", "012345");
            jail.set_env(
                "FERRY_CONNECTORS__SALESFORCE__SETTINGS__API_VERSION",
                "62.0",
            );
            jail.set_env("FERRY_CONNECTORS__SALESFORCE__SETTINGS__SANDBOX", "true");
            // Numbers, booleans and durations still read from their text.
            jail.set_env("FERRY_SYNC_CONCURRENCY", "12");
            jail.set_env("FERRY_INBOX_LOOPS", "1");
            jail.set_env("FERRY_INBOX_CATCH_UP_AFTER", "2500ms");
            jail.set_env("FERRY_WORKERS", "false");
            jail.set_env("FERRY_RECONCILE_MAX_DELETE_SHARE", "0.25");
            jail.set_env("FERRY_IDEMPOTENCY_TTL", "3600");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config
                    .admin_token
                    .as_ref()
                    .map(|t| t.expose_secret().to_owned()),
                Some("1234567890123456".to_owned())
            );
            assert_eq!(
                config.master_key.as_ref().map(|k| k.expose_secret().len()),
                Some(64)
            );
            assert_eq!(config.connectors["stripe"].settings["account"], "012345");
            let salesforce = &config.connectors["salesforce"].settings;
            assert_eq!(salesforce["api_version"], "62.0");
            assert_eq!(salesforce["sandbox"], "true");
            assert_eq!(config.sync_concurrency, 12);
            assert_eq!(config.inbox_loops, Some(1));
            assert_eq!(config.inbox_catch_up_after, Duration::from_millis(2_500));
            assert!(!config.workers);
            assert!((config.reconcile_max_delete_share - 0.25).abs() < f64::EPSILON);
            assert_eq!(config.idempotency_ttl, Duration::from_secs(3600));
            jail.set_env("FERRY_SYNC_CONCURRENCY", "many");
            assert!(Config::load(None).is_err());
            jail.set_env("FERRY_SYNC_CONCURRENCY", "12");
            jail.set_env("FERRY_WORKERS", "true");
            jail.set_env("FERRY_INBOX_LOOPS", "0");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.validate().is_err(), "no inbox loop");
            jail.set_env("FERRY_INBOX_LOOPS", "1");
            jail.set_env("FERRY_RECONCILE_MAX_RUNS", "0");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(config.validate().is_err(), "no reconciliation run");
            Ok(())
        });
    }

    /// A file whose line is not valid TOML (a secret left unquoted): the
    /// error says where, and does not quote the line.
    #[test]
    fn a_file_that_is_not_toml_is_refused_without_its_line() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "ferry.toml",
                "listen = \"127.0.0.1:8080\"\ndatabase_url = postgres://ferry:hunter2@db/ferry\n",
            )?;
            let error = Config::load(Some(Path::new("ferry.toml")))
                .expect_err("not TOML")
                .to_string();
            assert!(!error.contains("hunter2"), "{error}");
            assert!(error.contains("line 2"), "{error}");
            Ok(())
        });
    }

    /// A PostgreSQL URL's query key naming a secret the driver does not
    /// read is refused, named without its value (an `sslpassword` was
    /// logged by the driver at start, and by ferry's start line); a
    /// password of any key is redacted; other keys it ignores still start
    /// (a provider's `channel_binding`). An OTLP endpoint with credentials
    /// is refused (a failed export logs its URL).
    #[test]
    fn a_secret_the_database_driver_ignores_is_refused_without_its_value() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env(
                "FERRY_DATABASE_URL",
                "postgres://ferry@db/ferry?sslmode=verify-full&sslkey=k.pem&sslpassword=hunter2",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert!(!format!("{config:?}").contains("hunter2"));
            let error = config.validate().expect_err("ignored key").to_string();
            assert!(error.contains("`sslpassword`"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
            jail.set_env(
                "FERRY_DATABASE_URL",
                "postgres://ferry@db/ferry?sslmode=require&channel_binding=require&options[statement_timeout]=5s",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            jail.set_env("FERRY_OTLP_ENDPOINT", "https://user:hunter2@otel.example");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let error = config.validate().expect_err("credentials").to_string();
            assert!(error.contains("otlp_endpoint"), "{error}");
            assert!(!error.contains("hunter2"), "{error}");
            Ok(())
        });
    }

    /// An admin token with a trailing line break (a secret made with
    /// `--from-file`, a CRLF env file) is refused: nothing could match it.
    #[test]
    fn an_admin_token_no_header_can_carry_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for token in [
                "0123456789abcdef0123\r",
                "0123456789abcdef0123\n",
                " 0123456789abcdef0123",
                "0123456789abcdef\u{e9}0123",
            ] {
                jail.set_env("FERRY_ADMIN_TOKEN", token);
                let config = Config::load(None).map_err(|e| e.to_string())?;
                let error = config.validate().expect_err("refused").to_string();
                assert!(error.contains("printable ASCII"), "{error}");
                assert!(!error.contains("0123456789"), "{error}");
            }
            Ok(())
        });
    }

    /// Field owners from the environment: `__` nests, so an address line's
    /// or a metadata key's owner arrives as a nested map (it was refused).
    #[test]
    fn field_owners_nest_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_FIELD_OWNERS__ADDRESS__CITY", "stripe");
            jail.set_env("FERRY_FIELD_OWNERS__METADATA__TIER", "salesforce");
            jail.set_env("FERRY_FIELD_OWNERS__PHONE", "ferry");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            let owners = &config.field_owners;
            assert_eq!(owners.owner("address.city"), Some("stripe"));
            assert_eq!(owners.owner("address.line1"), None);
            assert_eq!(owners.owner("metadata.tier"), Some("salesforce"));
            assert_eq!(owners.owner("phone"), Some("ferry"));
            Ok(())
        });
    }

    /// An owner that is no system's name is refused: no change's source
    /// ever equalled `Stripe`, and the field was silently ferry's.
    #[test]
    fn a_field_owner_that_is_no_system_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_FIELD_OWNERS__PHONE", "Stripe");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let error = config.validate().expect_err("no such owner").to_string();
            assert!(
                error.contains("`phone`") && error.contains("`Stripe`"),
                "{error}"
            );
            Ok(())
        });
    }

    /// An OTLP endpoint without a scheme is refused as ferry's setting
    /// (before `serve` builds the exporter from it), and the message does
    /// not call it a database URL.
    #[test]
    fn an_otlp_endpoint_without_a_scheme_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_OTLP_ENDPOINT", "otel-collector");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let error = config.validate().expect_err("no scheme").to_string();
            assert!(error.contains("otlp_endpoint"), "{error}");
            assert!(!error.contains("database"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn a_lease_leaves_room_for_a_call() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_CONNECTOR_CALL_TIMEOUT", "10s");
            jail.set_env("FERRY_SYNC_LEASE", "10500ms");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let refused = config
                .validate()
                .expect_err("a lease without room for a call");
            assert!(refused.to_string().contains("sync_lease"), "{refused}");
            jail.set_env("FERRY_SYNC_LEASE", "11s");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            Ok(())
        });
    }

    /// A connector's share of the instance pool follows `sync_concurrency`
    /// when not given: a configuration from before the setting (pushes
    /// above 250) starts as it did.
    #[test]
    fn a_connectors_share_follows_sync_concurrency_unless_given() {
        figment::Jail::expect_with(|jail| {
            for (concurrency, share) in [("64", 250), ("400", 400), ("2000", 1000)] {
                jail.clear_env();
                jail.set_env("FERRY_SYNC_CONCURRENCY", concurrency);
                let config = Config::load(None).map_err(|e| e.to_string())?;
                config.validate().map_err(|e| e.to_string())?;
                assert_eq!(config.connector_max_instances(), share, "{concurrency}");
            }
            jail.set_env("FERRY_CONNECTOR_MAX_INSTANCES", "1000");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            config.validate().map_err(|e| e.to_string())?;
            assert_eq!(config.connector_max_instances(), 1000);
            Ok(())
        });
    }

    /// Values that would start a ferry stuck or spinning are refused, each
    /// by name.
    #[test]
    fn zero_timeouts_and_periods_are_refused() {
        figment::Jail::expect_with(|jail| {
            let refused = [
                ("FERRY_REQUEST_TIMEOUT", "0s", "request_timeout"),
                ("FERRY_HEADER_READ_TIMEOUT", "0s", "header_read_timeout"),
                ("FERRY_BODY_READ_TIMEOUT", "0s", "body_read_timeout"),
                (
                    "FERRY_CONNECTOR_CALL_TIMEOUT",
                    "0s",
                    "connector_call_timeout",
                ),
                ("FERRY_RETENTION_EVERY", "0s", "retention_every"),
                ("FERRY_BUS_REDELIVERY_AFTER", "0s", "bus_redelivery_after"),
                ("FERRY_BREAKER_COOLDOWN", "0s", "breaker_cooldown"),
                (
                    "FERRY_BREAKER_FAILURE_THRESHOLD",
                    "0",
                    "breaker_failure_threshold",
                ),
                (
                    "FERRY_WEBHOOK_MAX_BODY_BYTES",
                    "0",
                    "webhook_max_body_bytes",
                ),
                ("FERRY_MAX_CONNECTIONS", "0", "max_connections"),
                ("FERRY_RETENTION_BATCH", "0", "retention_batch"),
                (
                    "FERRY_CONNECTOR_MAX_INSTANCES",
                    "32",
                    "connector_max_instances",
                ),
                (
                    "FERRY_CONNECTOR_MAX_INSTANCES",
                    "5000",
                    "connector_max_instances",
                ),
                // A key an operator typed, not one generated.
                ("FERRY_MASTER_KEY", "hunter2", "master_key"),
                (
                    "FERRY_BUS_REDELIVERY_AFTER",
                    "100000000d",
                    "bus_redelivery_after",
                ),
                ("FERRY_SYNC_LEASE", "100000000d", "sync_lease"),
                // The default database is SQLite: nothing would sync.
                ("FERRY_WORKERS", "false", "workers"),
                // No host: a range, a port.
                (
                    "FERRY_CONNECTOR_DENIED_HOSTS",
                    "10.0.0.0/8",
                    "connector_denied_hosts",
                ),
                (
                    "FERRY_CONNECTOR_ALLOWED_HOSTS",
                    "api.stripe.com:443",
                    "connector_allowed_hosts",
                ),
                (
                    "FERRY_CONNECTORS__STRIPE__RECONCILE_EVERY",
                    "1s",
                    "reconcile_every",
                ),
            ];
            for (variable, value, name) in refused {
                jail.clear_env();
                jail.set_env(variable, value);
                let config = Config::load(None).map_err(|e| e.to_string())?;
                let error = config.validate().expect_err(variable);
                assert!(error.to_string().contains(name), "{variable}: {error}");
            }
            jail.clear_env();
            jail.set_env("FERRY_DATABASE_URL", "postgres://ferry@127.0.0.1/ferry");
            jail.set_env("FERRY_KAFKA_BROKERS", "127.0.0.1:9092");
            jail.set_env("FERRY_DATABASE_MAX_CONNECTIONS", "1");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let error = config.validate().expect_err("a pool of one");
            assert!(
                error.to_string().contains("database_max_connections"),
                "{error}"
            );
            Ok(())
        });
    }

    #[test]
    fn open_api_only_on_loopback() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("FERRY_LISTEN", "0.0.0.0:8080");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let refused = config.validate().expect_err("refused").to_string();
            assert!(refused.contains("without an admin token"), "{refused}");
            Ok(())
        });
    }
}
