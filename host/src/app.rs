//! Start-up: builds the store, the connector runtime and the HTTP API from a
//! [`Config`], binds the listener, and runs every task under one
//! cancellation token until it is cancelled.

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::registry::{bundled, Registry, RegistryOptions};
use crate::runtime::{Runtime, RuntimeConfig};
use crate::secrets::SecretBox;
use crate::store::{Store, StoreKind, StoreOptions};
use crate::sync::inbound::InboxLoop;
use crate::sync::retry::RetryPolicy;
use crate::sync::{SyncEngine, SyncOptions};

/// How often expired idempotency keys are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(300);

/// Settings the API reads on every request.
#[derive(Debug)]
pub struct ApiSettings {
    /// Bearer token for `/api/v1`; `None` runs the API open (loopback only).
    pub admin_token: Option<SecretString>,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Largest accepted connector component (uploads).
    pub max_component_bytes: usize,
    /// Largest webhook body.
    pub webhook_max_body_bytes: usize,
    /// Webhook bodies held at once, in KiB permits (`webhook_buffer_bytes`):
    /// a webhook takes 1 KiB before its body and more as its bytes arrive,
    /// until it is answered.
    pub webhook_buffer: Arc<tokio::sync::Semaphore>,
    /// Longest a request body may stall.
    pub body_read_timeout: Duration,
    /// Longest a whole request may take.
    pub request_timeout: Duration,
    /// Signs the console's session cookies and CSRF tokens.
    pub console_key: crate::console::SessionKey,
}

/// Limits on connections, for slow and hostile clients.
#[derive(Debug, Clone, Copy)]
struct ServeLimits {
    max_connections: usize,
    header_read_timeout: Duration,
    /// How long a client may leave an answer unread (no byte taken) before
    /// its connection is closed: a stall in either direction is bounded.
    body_read_timeout: Duration,
    /// How long an idle connection's answers still being sent may take
    /// before it is closed anyway.
    request_timeout: Duration,
    shutdown_grace: Duration,
}

/// State shared by the API handlers and the background tasks.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// The connectors: versions, the active one, switches and settings.
    pub registry: Registry,
    /// Per-request settings.
    pub settings: Arc<ApiSettings>,
    /// The outbound sync engine.
    pub sync: SyncEngine,
    /// Renders `/metrics`; `None` when metrics are off.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Cluster mode: a Kafka client `/readyz` asks for the cluster's metadata.
    pub bus_probe: Option<Arc<crate::bus::kafka::KafkaProducer>>,
    /// Cluster mode with workers: why the bus's topics are not there yet
    /// (so its relay and consumers have not started); `None` once they are.
    pub bus_topics: crate::bus::TopicsState,
    /// `/readyz`'s last probe of the store and the bus, shared (see
    /// [`crate::api::health::Probes`]).
    pub probes: Arc<crate::api::health::Probes>,
}

/// A built, bound, not yet running ferry.
pub struct App {
    listener: TcpListener,
    address: SocketAddr,
    state: AppState,
    cancel: CancellationToken,
    workers: bool,
    kafka: Option<crate::bus::kafka::KafkaSettings>,
    kafka_topic_prefix: String,
    redelivery_after: Duration,
    reconcile: crate::sync::reconcile::ReconcileOptions,
    retention: crate::retention::Retention,
    /// How often grown tables are analysed (`store::statistics`).
    analyze_every: Duration,
    limits: ServeLimits,
}

impl App {
    /// Validates `config`, connects and migrates the store, loads the
    /// connectors and binds the listen address (port 0 picks a free port).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Ok(Self::build_serving(config, None).await?.0)
    }

    /// [`App::build`], also registering the component built at `built`
    /// (`ferry connector dev`) and making it active before the
    /// configuration is checked against the connectors' manifests, so the
    /// settings given for it are checked against what was just built: its
    /// connector name.
    pub async fn build_serving(
        config: Config,
        built: Option<crate::cli::dev::Built<'_>>,
    ) -> anyhow::Result<(Self, Option<String>)> {
        config.validate()?;
        let kind = StoreKind::from_url(config.database_url_exposed())?;
        let mode = match kind {
            StoreKind::Sqlite => "embedded",
            StoreKind::Postgres => "cluster",
        };
        let options = StoreOptions {
            max_connections: config.database_max_connections,
            statement_timeout: config.database_statement_timeout,
            lock_timeout: config.database_lock_timeout,
            inbox_bus: config.kafka_brokers.is_some(),
            ..StoreOptions::default()
        };
        let store = Store::connect(config.database_url_exposed(), &options)
            .await
            .with_context(|| format!("connecting to {}", config.database_url_redacted()))?;
        store.migrate().await.context("running migrations")?;
        // Before anything is written with a time: replicas compare leases,
        // due times and dates by the database's clock.
        match store.follow_database_clock().await {
            Ok(offset) => crate::store::clock::warn_if_off(offset, &mut false),
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "reading the database's clock failed; this machine's is used until it is read"
            ),
        }
        let emails = store
            .renormalise_emails(crate::api::customers::normalise_email)
            .await
            .context("rewriting stored emails in today's form")?;
        if emails.changed > 0 {
            tracing::info!(
                changed = emails.changed,
                "stored emails rewritten in today's form (NFC, ASCII domain)"
            );
        }
        for (customer, email, today) in &emails.kept {
            tracing::warn!(
                customer,
                email,
                today,
                "TWO CUSTOMERS OF ONE ADDRESS: this customer's email, written as ferry writes emails today, is another live customer's; it is left as it was for a person to merge"
            );
        }

        let runtime_config = RuntimeConfig {
            allow_private_hosts: config.allow_private_hosts,
            allowed_hosts: config.connector_allowed_hosts.clone(),
            denied_hosts: config.connector_denied_hosts.clone(),
            call_timeout: config.connector_call_timeout,
            http_requests_per_second: config.connector_requests_per_second,
            max_instances_per_connector: config.connector_max_instances(),
            cache_dir: usable_compile_cache(config.compile_cache(), &config.compile_cache_dir),
            ..RuntimeConfig::default()
        };
        let runtime =
            Arc::new(Runtime::new(runtime_config).context("starting the connector runtime")?);
        let registry = Registry::new(
            store.clone(),
            runtime,
            RegistryOptions {
                environment: config.connectors.clone(),
                secret_box: config.master_key.as_ref().map(SecretBox::new),
                max_component_bytes: config.connector_max_bytes,
            },
        );
        match bundled::locate(config.connectors_dir.as_deref()) {
            Ok(dir) => {
                tracing::info!(dir = %dir.display(), "registering the bundled connectors");
                let files = bundled::read(&dir).await;
                // Each file's outcome is logged as it is seeded.
                registry
                    .seed_bundled(&files)
                    .await
                    .context("registering the bundled connectors")?;
            }
            Err(looked_in) => {
                tracing::warn!(
                    looked_in = ?looked_in,
                    "no bundled connectors found; connectors can still be uploaded (POST /api/v1/connectors)"
                );
                registry
                    .refresh()
                    .await
                    .context("reading the connector registry")?;
            }
        }
        let built = match built {
            Some(built) => Some(crate::cli::dev::register(&registry, &built).await?),
            None => None,
        };
        for entry in registry.entries() {
            match &entry.active {
                Some(active) => tracing::info!(
                    connector = %entry.name,
                    version = %active.meta.version,
                    source = active.meta.source.as_str(),
                    from = %active.meta.uploaded_by,
                    switch = ?entry.effective.switch,
                    "connector ready"
                ),
                None => tracing::warn!(
                    connector = %entry.name,
                    problem = entry.problem.as_deref().unwrap_or("no version is active"),
                    "connector not loaded"
                ),
            }
        }

        let problems = registry.check_environment().await;
        if !problems.is_empty() {
            anyhow::bail!(
                "connector configuration names what the connector does not declare:\n  {}",
                problems.join("\n  ")
            );
        }

        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let address = listener.local_addr().context("reading the bound address")?;
        tracing::info!(
            mode,
            database = kind.as_str(),
            database_url = %config.database_url_redacted(),
            listen = %address,
            "ferry started"
        );
        if config.admin_token.is_none() {
            tracing::warn!(
                listen = %address,
                "NO ADMIN TOKEN: the API is UNAUTHENTICATED; anyone who can reach this loopback address can read and change every customer. Set FERRY_ADMIN_TOKEN."
            );
        }
        // The inbox remembers which events it has seen for this long: a
        // remote's redelivery after it (Stripe retries for three days) is
        // stored again, and an event that found no link applied again.
        if !config.retention.is_zero() && config.retention < SHORTEST_SAFE_RETENTION {
            tracing::warn!(
                retention_seconds = config.retention.as_secs(),
                "retention is shorter than Stripe's three days of webhook retries: an event delivered again after it is stored and may be applied again; keep it at 3d or more"
            );
        }
        // Part of the key, and so of every secret sealed under it: not
        // trimmed (that would make them unreadable), but said, before a
        // fixed env file changes the key.
        if config.master_key.as_ref().is_some_and(|key| {
            let key = key.expose_secret();
            key.trim() != key
        }) {
            tracing::warn!(
                "master_key starts or ends with white space (a trailing newline?): it is part of the key that seals stored secrets, so keep it exactly so, or re-enter the secrets after changing it"
            );
        }

        let sync = SyncEngine::new(
            store.clone(),
            registry.clone(),
            SyncOptions {
                policy: RetryPolicy {
                    max_attempts: config.sync_max_attempts,
                    base: config.sync_backoff_base,
                    max_delay: config.sync_backoff_max,
                },
                lease: config.sync_lease,
                call_timeout: config.connector_call_timeout,
                concurrency: config.sync_concurrency,
                breaker_failure_threshold: config.breaker_failure_threshold,
                breaker_cooldown: config.breaker_cooldown,
                inbound: crate::sync::inbound::InboundPolicies {
                    delete: config.inbound_delete_policy,
                    conflict: config.conflict_policy,
                    field_owners: config.field_owners.clone(),
                    duplicate_email: config.duplicate_email_policy,
                    duplicate_email_by_connector: config
                        .connectors
                        .iter()
                        .filter_map(|(name, c)| c.duplicate_email.map(|d| (name.clone(), d)))
                        .collect(),
                },
                // Cluster mode: fresh inbox events go through Kafka; the
                // inbox loop takes what the bus did not deliver in time.
                inbox_grace: if config.kafka_brokers.is_some() {
                    config.bus_redelivery_after
                } else {
                    Duration::ZERO
                },
                inbox_loops: config.inbox_loops,
                inbox_catch_up_after: config.inbox_catch_up_after,
            },
        );
        let kafka = config
            .kafka_brokers
            .as_ref()
            .map(|brokers| crate::bus::kafka::KafkaSettings {
                brokers: brokers.clone(),
                group_id: config.kafka_group_id.clone(),
                client_id: format!("ferry-{}", address.port()),
                partitions: config.kafka_partitions,
                replication_factor: config.kafka_replication_factor,
                // A batch's pushes end within their lease; a call started
                // just before may run its whole timeout.
                batch_handling: config.sync_lease + config.connector_call_timeout,
                properties: crate::bus::kafka::KafkaProperties(config.kafka_property_list()),
            });
        tracing::info!(
            bus = if kafka.is_some() {
                "kafka"
            } else {
                "outbox (in-process)"
            },
            workers = config.workers,
            "sync configured"
        );
        let metrics = if config.metrics {
            let handle = crate::metrics::install();
            if handle.is_none() {
                tracing::warn!("another metrics recorder is installed; /metrics is off");
            }
            handle
        } else {
            None
        };
        // Readiness asks the broker only where the broker is used: an
        // API-only replica (workers off) serves without it, and went out
        // of the load balancer with every other when Kafka restarted.
        let bus_probe = match &kafka {
            Some(settings) if config.workers => Some(Arc::new(
                crate::bus::kafka::KafkaProducer::for_probe(
                    settings,
                    crate::bus::changes_topic(&config.kafka_topic_prefix),
                )
                .context("creating the Kafka readiness client")?,
            )),
            _ => None,
        };
        let bus_topics = crate::bus::TopicsState::default();
        if kafka.is_some() && config.workers {
            bus_topics.waiting("the bus's topics are not created yet");
        }
        let state = AppState {
            metrics,
            bus_probe,
            bus_topics,
            probes: Arc::default(),
            store,
            registry,
            settings: Arc::new(ApiSettings {
                console_key: crate::console::SessionKey::new(config.admin_token.as_ref()),
                admin_token: config.admin_token.clone(),
                idempotency_ttl: config.idempotency_ttl,
                max_body_bytes: config.max_body_bytes,
                max_component_bytes: config.connector_max_bytes,
                webhook_max_body_bytes: config.webhook_max_body_bytes,
                webhook_buffer: Arc::new(tokio::sync::Semaphore::new(
                    config
                        .webhook_buffer_bytes
                        .div_ceil(1024)
                        .min(tokio::sync::Semaphore::MAX_PERMITS),
                )),
                body_read_timeout: config.body_read_timeout,
                request_timeout: config.request_timeout,
            }),
            sync,
        };
        let app = Self {
            listener,
            address,
            state,
            cancel: CancellationToken::new(),
            workers: config.workers,
            kafka,
            kafka_topic_prefix: config.kafka_topic_prefix.clone(),
            redelivery_after: config.bus_redelivery_after,
            limits: ServeLimits {
                max_connections: config.max_connections.max(1),
                header_read_timeout: config.header_read_timeout,
                body_read_timeout: config.body_read_timeout,
                request_timeout: config.request_timeout,
                shutdown_grace: config.shutdown_grace,
            },
            retention: crate::retention::Retention {
                keep: config.retention,
                every: config.retention_every,
                batch: config.retention_batch.max(1),
            },
            analyze_every: config.analyze_every,
            reconcile: crate::sync::reconcile::ReconcileOptions {
                max_delete_share: config.reconcile_max_delete_share,
                max_runs: config.reconcile_max_runs,
                schedules: config
                    .connectors
                    .iter()
                    .filter_map(|(name, c)| {
                        Some(crate::sync::reconcile::Schedule {
                            connector: name.clone(),
                            every: c.reconcile_every?,
                            repair: c.reconcile_repair.unwrap_or_default(),
                        })
                    })
                    .collect(),
            },
        };
        Ok((app, built))
    }

    /// The bound address.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The shared state (tests use its store).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Cancelling this token stops the app gracefully.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Serves until the cancellation token is cancelled, then lets in-flight
    /// requests finish and stops the background tasks.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let tasks = Supervised::new(self.cancel.clone());
        tasks.spawn(
            "clock",
            crate::store::clock::follow(self.state.store.clone(), self.cancel.clone()),
        );
        tasks.spawn(
            "idempotency purge",
            purge_idempotency_keys(
                self.state.store.clone(),
                self.retention.batch,
                self.cancel.clone(),
            ),
        );
        // Every replica, workers or not, follows the registry: an API-only
        // replica serves webhooks with the active version too.
        tasks.spawn(
            "registry",
            self.state.registry.clone().run(self.cancel.clone()),
        );
        if let Some(handle) = &self.state.metrics {
            tasks.spawn(
                "metrics",
                crate::metrics::run_gauges(
                    handle.clone(),
                    self.state.store.clone(),
                    self.state.registry.clone(),
                    self.state.sync.clone(),
                    self.cancel.clone(),
                ),
            );
        }
        if self.workers {
            tasks.spawn(
                "retention",
                crate::retention::run(
                    self.state.store.clone(),
                    self.retention,
                    self.cancel.clone(),
                ),
            );
            tasks.spawn(
                "dead letters",
                close_superseded_dead_letters(
                    self.state.store.clone(),
                    self.retention.batch,
                    self.cancel.clone(),
                ),
            );
            tasks.spawn(
                "statistics",
                crate::store::statistics::run(
                    self.state.store.clone(),
                    self.analyze_every,
                    self.cancel.clone(),
                ),
            );
            if let Err(error) = self.spawn_sync(&tasks).await {
                // The tasks already started end with it: left running
                // without a server, `ferry connector dev` sat there syncing
                // until a person pressed Ctrl-C.
                self.cancel.cancel();
                tasks.tracker.close();
                tasks.tracker.wait().await;
                self.state.store.close().await;
                return Err(error);
            }
        }
        tasks.tracker.close();

        let router = crate::api::router(self.state.clone());
        serve(self.listener, router, self.limits, self.cancel.clone()).await;
        // Whatever ended the server ends the background tasks too, within
        // a bound: a Kafka consumer's close waits for its group's
        // coordinator for ever when the broker is gone, and a stop on
        // SIGTERM then never ended (what was acknowledged is stored; what
        // was not started is picked up by the next process).
        self.cancel.cancel();
        if tokio::time::timeout(TASKS_STOP_WITHIN, tasks.tracker.wait())
            .await
            .is_err()
        {
            anyhow::bail!(
                "ferry stopped without its background tasks: they were still stopping after {} s (a Kafka consumer closing against a broker that is gone?)",
                TASKS_STOP_WITHIN.as_secs()
            );
        }
        self.state.store.close().await;
        if let Some(task) = tasks.failed.get() {
            anyhow::bail!("ferry stopped: its background task `{task}` panicked");
        }
        tracing::info!("ferry stopped");
        Ok(())
    }
}

impl App {
    /// Starts the relay, the bus consumer and the sync scheduler.
    async fn spawn_sync(&self, tasks: &Supervised) -> anyhow::Result<()> {
        let state = &self.state;
        tasks.spawn(
            "scheduler",
            state.sync.clone().run_scheduler(self.cancel.clone()),
        );
        for n in 0..state.sync.inbox_loops() {
            let role = if n == 0 {
                InboxLoop::First
            } else {
                InboxLoop::CatchUp
            };
            tasks.spawn(
                "inbox",
                state.sync.clone().run_inbox(role, self.cancel.clone()),
            );
        }
        tasks.spawn(
            "reconciler",
            state
                .sync
                .clone()
                .run_reconciler(self.reconcile.clone(), self.cancel.clone()),
        );
        match &self.kafka {
            None => {
                tasks.spawn(
                    "relay",
                    crate::bus::run_embedded_relay(
                        state.store.clone(),
                        state.sync.clone(),
                        self.cancel.clone(),
                    ),
                );
            }
            Some(kafka) => {
                crate::bus::start_kafka(
                    tasks,
                    kafka,
                    &self.kafka_topic_prefix,
                    crate::bus::KafkaParts {
                        store: &state.store,
                        sync: &state.sync,
                        topics: &state.bus_topics,
                    },
                    self.redelivery_after,
                    self.cancel.clone(),
                )
                .await
                .context("starting the Kafka bus")?;
            }
        }
        Ok(())
    }
}

/// The background tasks. One that panics stops the process (logged, the
/// app cancelled, [`App::run_until_stopped`] an error for the supervisor
/// to restart it) rather than leave it running without that task: with an
/// inbox loop gone, webhooks went on being acknowledged and were never
/// applied.
#[derive(Clone)]
pub struct Supervised {
    tracker: TaskTracker,
    cancel: CancellationToken,
    failed: Arc<OnceLock<&'static str>>,
}

impl Supervised {
    fn new(cancel: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            cancel,
            failed: Arc::default(),
        }
    }

    /// Runs `task` (called `name` in the log) until it ends.
    pub fn spawn(&self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let (cancel, failed) = (self.cancel.clone(), self.failed.clone());
        self.tracker.spawn(async move {
            if let Err(panic) = futures::FutureExt::catch_unwind(AssertUnwindSafe(task)).await {
                tracing::error!(
                    task = name,
                    panic = panic_text(&*panic),
                    "a background task panicked; ferry stops"
                );
                let _ = failed.set(name);
                cancel.cancel();
            }
        });
    }
}

/// The compiled-code cache to use: `dir`, unless it is the default (none
/// was configured) and cannot be made: then none, with a warning. A
/// container whose home is not writable (an arbitrary uid with `HOME=/`, a
/// read-only root file system) did not start at all for a cache that only
/// saves compile time. One configured must work.
fn usable_compile_cache(dir: Option<PathBuf>, configured: &Option<PathBuf>) -> Option<PathBuf> {
    let dir = dir?;
    if configured.is_some() {
        return Some(dir);
    }
    match std::fs::create_dir_all(&dir) {
        Ok(()) => Some(dir),
        Err(error) => {
            tracing::warn!(
                dir = %dir.display(),
                %error,
                "the default compiled-code cache cannot be made; connectors are compiled at each start (set compile_cache_dir)"
            );
            None
        }
    }
}

/// What a caught panic said (its `&str` or `String` payload).
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|m| (*m).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

/// Purges expired idempotency keys now and then; expired keys are also
/// ignored (and overwritten) when claimed, so this only bounds table size.
/// The console's sign-outs of sessions expired since go with them.
async fn purge_idempotency_keys(store: Store, batch: u32, cancel: CancellationToken) {
    let mut every = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => match crate::retention::in_batches(&cancel, || {
                store.purge_expired_idempotency_keys(batch)
            })
            .await
            {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "expired idempotency keys purged"),
                Err(error) => {
                    crate::metrics::background_failed("idempotency_purge");
                    tracing::warn!(error = format!("{:#}", anyhow::Error::from(error)), "purging idempotency keys failed");
                }
            },
        }
        // The console's sign-outs of expired sessions: a few rows a day.
        if let Err(error) = store.purge_expired_sign_outs().await {
            crate::metrics::background_failed("sign_out_purge");
            tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "purging console sign-outs failed"
            );
        }
    }
}

/// How long the background tasks may take to stop once the server has:
/// a push or an inbound event already begun ends within its connector
/// call's timeout (10 s by default).
const TASKS_STOP_WITHIN: Duration = Duration::from_secs(60);

/// The shortest retention that remembers an event through a remote's
/// redeliveries (Stripe's: three days).
const SHORTEST_SAFE_RETENTION: Duration = Duration::from_secs(3 * 24 * 3600);

/// How often open outbound dead letters whose link delivered since are
/// closed (see [`Store::close_superseded_dead_letters`]).
const SUPERSEDED_LETTERS_EVERY: Duration = Duration::from_secs(10);

/// How many open letters one round looks at, at most: one page of
/// `batch` after another from where the last round stopped, so an
/// outage's backlog is gone through over rounds.
const SUPERSEDED_LETTERS_PAGES: u32 = 10;

async fn close_superseded_dead_letters(store: Store, batch: u32, cancel: CancellationToken) {
    let mut every = tokio::time::interval(SUPERSEDED_LETTERS_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut after = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        let mut round = async || -> Result<u64, crate::store::StoreError> {
            let mut closed = 0;
            for _ in 0..SUPERSEDED_LETTERS_PAGES {
                let (now, next) = store
                    .close_superseded_dead_letters(after.as_ref(), batch)
                    .await?;
                closed += now;
                after = next;
                if after.is_none() || cancel.is_cancelled() {
                    break;
                }
                tokio::time::sleep(crate::retention::BETWEEN_BATCHES).await;
            }
            Ok(closed)
        };
        match round().await {
            Ok(0) => {}
            Ok(closed) => {
                tracing::info!(closed, "dead letters closed: their links delivered since")
            }
            Err(error) => {
                crate::metrics::background_failed("dead_letter_close");
                tracing::warn!(
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "closing dead letters whose links delivered since failed"
                );
            }
        }
    }
}

/// Requests one HTTP/2 connection may have in flight at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits, for at most `limit`, until the client has sent enough to tell
/// HTTP/2's preface from an HTTP/1 request. hyper-util reads the version
/// with no timer of its own (the head's timer starts after it), so a client
/// that sends nothing, or part of the preface, would hold its connection
/// slot for ever. False if it said too little in time or went away.
async fn spoke_in_time(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        let mut pause = Duration::from_millis(5);
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == buf.len() || buf[..n] != H2_PREFACE[..n] => return true,
                // Part of the preface: `peek` answers at once with what is
                // there, so give the rest a moment, longer each time (a
                // client holding one byte back kept this loop waking every
                // 5 ms until the timeout: on every slot, 200k wakeups a
                // second).
                Ok(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
            }
        }
    };
    tokio::time::timeout(limit, sniff).await.unwrap_or(false)
}

/// Requests on one connection: how many are in flight, and how many began.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    begun: AtomicU64,
}

/// One request of a connection's [`Activity`], in flight until dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.begun.fetch_add(1, Ordering::Relaxed);
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    /// Returns once no request has been in flight, nor begun, for `limit`
    /// (measured in steps of `limit`: within twice it). HTTP/2 has no idle
    /// timeout of its own: a client answering pings held its connection
    /// slot with no stream open, for ever.
    async fn idle_for(&self, limit: Duration) {
        let mut seen = self.begun.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(limit).await;
            let begun = self.begun.load(Ordering::Relaxed);
            if begun == seen && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = begun;
        }
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until `cancel`: at most
/// `max_connections` at once (the rest wait in the kernel's backlog), each
/// given `header_read_timeout` to send a request's head, closed once it has
/// had nothing in flight for as long, and when it leaves an answer unread
/// (takes no byte of it) for `body_read_timeout`. On cancellation,
/// connections finish their requests in flight for up to `shutdown_grace`
/// and are then closed, so a slow client cannot hold the process up.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: ServeLimits,
    cancel: CancellationToken,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;

    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    let force = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let service = {
            let (router, activity) = (router.clone(), activity.clone());
            TowerToHyperService::new(tower::service_fn(
                move |request: axum::http::Request<hyper::body::Incoming>| {
                    let in_flight = InFlight::begin(&activity);
                    let call = tower::ServiceExt::oneshot(router.clone(), request);
                    async move {
                        let response = call.await;
                        drop(in_flight);
                        response
                    }
                },
            ))
        };
        let (cancel, force) = (cancel.clone(), force.clone());
        connections.spawn(async move {
            let _permit = permit;
            // Shutting down, a connection that has not sent a request has
            // nothing in flight to finish: it held the shutdown until its
            // head's timeout, past the grace.
            let spoke = tokio::select! {
                spoke = spoke_in_time(&stream, limits.header_read_timeout) => spoke,
                () = cancel.cancelled() => false,
            };
            if !spoke {
                return;
            }
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            // A connection's streams share its slot: hyper's default of
            // 200 would let one slot hold 200 webhook bodies in flight;
            // a dead peer's connection is found by its unanswered pings.
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
                .keep_alive_interval(Some(limits.header_read_timeout))
                .keep_alive_timeout(limits.header_read_timeout);
            // A client that stops reading an answer (4.8 MB of `/docs`
            // asked with `Connection: close`, say) left hyper flushing it
            // with no timer: its slot was held for ever.
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(limits.body_read_timeout));
            let io = TokioIo::new(Box::pin(stream));
            let connection = builder.serve_connection_with_upgrades(io, service);
            let mut connection = std::pin::pin!(connection);
            let idled = tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(error = %error, "connection ended with an error");
                    }
                    return;
                }
                () = cancel.cancelled() => false,
                () = activity.idle_for(limits.header_read_timeout) => true,
            };
            connection.as_mut().graceful_shutdown();
            // Closed for idling, what is left is answers still being sent:
            // they get the time a request gets. An HTTP/2 stream whose
            // client never opens its window stalls no write (the write
            // timeout never starts), and held the slot for ever.
            let drained = async {
                if idled {
                    tokio::time::sleep(limits.request_timeout).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = connection.as_mut() => {}
                () = force.cancelled() => {}
                () = drained => {}
            }
        });
    }
    // Closed before the grace: a connection the kernel took into the
    // backlog meanwhile (a load balancer that has not seen the replica
    // leave) was held until the grace ended, then reset, a 502 for a
    // webhook or a create; refused, a proxy tries another replica.
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.shutdown_grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            grace_ms = limits.shutdown_grace.as_millis() as u64,
            "connections still open after the shutdown grace; closing them"
        );
        force.cancel();
        connections.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A background task that panics cancels the app and is named for
    /// `run_until_stopped` to report; the others are stopped with it.
    #[tokio::test]
    async fn a_panicking_task_stops_the_app() {
        let cancel = CancellationToken::new();
        let tasks = Supervised::new(cancel.clone());
        let steady = cancel.clone();
        tasks.spawn("steady", async move { steady.cancelled().await });
        tasks.spawn("broken", async { panic!("broken on purpose") });
        tokio::time::timeout(Duration::from_secs(5), cancel.cancelled())
            .await
            .expect("the app was cancelled");
        tasks.tracker.close();
        tasks.tracker.wait().await;
        assert_eq!(tasks.failed.get(), Some(&"broken"));
    }

    /// The default cache that cannot be made (a home that is not
    /// writable) is none, and ferry starts; one configured is kept, for
    /// the runtime to refuse.
    #[test]
    fn a_default_compile_cache_that_cannot_be_made_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let unmakeable = file.join("ferry/compiled");
        assert_eq!(usable_compile_cache(Some(unmakeable.clone()), &None), None);
        assert_eq!(
            usable_compile_cache(Some(unmakeable.clone()), &Some(unmakeable.clone())),
            Some(unmakeable)
        );
        let makeable = dir.path().join("cache/ferry/compiled");
        assert_eq!(
            usable_compile_cache(Some(makeable.clone()), &None),
            Some(makeable.clone())
        );
        assert!(makeable.is_dir());
    }
}
