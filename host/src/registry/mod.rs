//! The connector registry: the one owner of loaded connectors. It keeps
//! every version of every connector in the store (bytes, sha256, manifest),
//! which version is active, whether the connector is enabled and how it is
//! configured, and answers the one question the rest of ferry asks: "the
//! ready connector for (name, need), or why not" ([`Registry::ready`]).
//!
//! Changes (an upload, an activation, enable or disable, settings, a delete)
//! are written to the store, which bumps the connector's revision, and
//! applied to this replica at once. Every other replica polls the revisions
//! every [`POLL`] and loads what changed: polling works the same on SQLite
//! and PostgreSQL, needs no connection of its own (a LISTEN connection that
//! drops loses notifications, so it would need polling as a fallback
//! anyway), and costs one primary-key scan of a table with a row per
//! connector. A new version is compiled (or taken from the compiled-code
//! cache) before it replaces the old one; calls already running keep the
//! `Arc` of the version they started on, so nothing fails during a swap.
//!
//! The bundled connectors enter through the same door at start
//! ([`Registry::seed_bundled`]).

pub mod bundled;
mod config;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use self::config::{ConfigSource, EffectiveConfig, SettingsProblem, Switch};
use crate::config::ConnectorSettingsConfig;
use crate::runtime::{Connector, ConnectorConfig, LoadError, Manifest, Runtime};
use crate::secrets::{self, SecretBox};
use crate::store::connector_configs::StoredConnectorConfig;
use crate::store::connectors::{
    is_rollback, AddedVersion, ConnectorRow, NewVersion, Seeded, VersionMeta, VersionSource,
};
use crate::store::{Store, StoreError};
use crate::sync::outbound::ENTITY;

/// How often a replica looks for changes made by another.
pub const POLL: Duration = Duration::from_secs(1);

/// The first wait before a version that failed to load here is tried
/// again; it doubles with each failure, up to [`LOAD_RETRY_MAX`].
const LOAD_RETRY: Duration = Duration::from_secs(2);
const LOAD_RETRY_MAX: Duration = Duration::from_secs(300);

/// What a caller needs a connector for.
#[derive(Debug, Clone, Copy)]
pub enum Need<'a> {
    /// To push or read records of this entity type.
    Entity(&'a str),
    /// To receive webhooks.
    Webhooks,
}

/// A connector ready for a call: the active version and its configuration,
/// as they were when asked. A call holds them to its end, so a version swap
/// or a settings change never reaches into a call already running.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The active version's loaded component.
    pub connector: Arc<Connector>,
    /// What its calls are configured with.
    pub config: Arc<ConnectorConfig>,
}

/// Why a connector is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No connector has this name (never loaded, or deleted).
    #[error("no connector with this name")]
    Unknown,
    /// The connector exists but no version of it is loaded here.
    #[error("no version of the connector is loaded: {0}")]
    NotLoaded(String),
    /// Disabled by the operator: work waits until it is enabled.
    #[error("the connector is disabled")]
    Disabled,
    /// Never switched on (its required settings were never given).
    #[error("the connector is not configured")]
    Unconfigured,
    /// Switched on, but the active version needs settings or secrets the
    /// connector does not have (a new version declared them): work waits,
    /// as for a disabled connector, until they are given.
    #[error("the active version needs {0}")]
    Incomplete(String),
    /// The connector does not handle what was asked (an entity, webhooks).
    #[error("the connector does not handle {0}")]
    Unsupported(String),
}

/// The version of a connector calls run on.
#[derive(Debug, Clone)]
pub struct Active {
    /// The loaded component.
    pub connector: Arc<Connector>,
    /// What the store knows about it.
    pub meta: VersionMeta,
}

/// Everything about one connector, as of the registry's last refresh.
#[derive(Debug)]
pub struct Entry {
    /// The manifest name.
    pub name: String,
    /// The active version, if one is loaded.
    pub active: Option<Active>,
    /// Why the active version is not (or not the stored one) loaded here.
    pub problem: Option<String>,
    /// Switch and configuration.
    pub effective: EffectiveConfig,
    /// What the version the store says is active serves (its stored
    /// manifest, loaded or not); `None` while that could not be read.
    serves: Option<Serves>,
    /// Set while the active version is not the one loaded here: when to
    /// load it again, and how many loads failed in a row.
    retry: Option<(tokio::time::Instant, u32)>,
    /// The required settings and secrets the active version needs and the
    /// configuration lacks (`settings.a, secrets.b`), found at refresh.
    missing: Option<String>,
    /// Some replica has had it switched on: its changes are queued here
    /// too, even where this replica's configuration leaves it off.
    switched_on: bool,
    revision: i64,
}

/// The host settings of `manifest` whose value in effect (given in
/// `settings`, else the manifest's default) the egress policy refuses, each
/// with its value and why.
fn refused_host_settings(
    manifest: &Manifest,
    settings: &BTreeMap<String, String>,
    runtime: &Runtime,
) -> Vec<SettingsProblem> {
    manifest
        .host_settings
        .iter()
        .filter_map(|name| {
            let default = || {
                let setting = manifest.settings.iter().find(|s| &s.name == name)?;
                setting.default.as_ref()
            };
            let value = settings.get(name).or_else(default)?;
            let why = runtime.host_setting_problem(value)?;
            Some(SettingsProblem::new(
                format!("settings.{name}"),
                format!("{value}: {why}"),
            ))
        })
        .collect()
}

impl Entry {
    /// The connector's revision as this replica read it: every change to
    /// it (a version, a switch, settings) moves it. Its `ETag`.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether a write conditioned on `expected` (`If-Match`) may go on
    /// over this view; [`RegistryError::Stale`] names the revision it is at.
    fn fresh(&self, expected: Option<i64>) -> Result<(), RegistryError> {
        match expected {
            Some(expected) if expected != self.revision => Err(RegistryError::Stale(self.revision)),
            _ => Ok(()),
        }
    }

    /// The required settings and secrets of `manifest` that `config` lacks,
    /// and its host settings whose value in effect (given, else the
    /// manifest's default) the egress policy refuses, if any
    /// (`settings.a, secrets.b, settings.api_base (why)`). A value given
    /// through the API is checked when given; one from the environment, or
    /// a default, only here: every push made with it would be refused and
    /// dead-lettered, so the connector's work waits instead.
    fn missing_settings(
        config: &EffectiveConfig,
        manifest: &Manifest,
        runtime: &Runtime,
    ) -> Option<String> {
        let mut missing: Vec<String> = config::missing_required(
            manifest,
            config.config.settings.keys(),
            config.secret_names.iter(),
        )
        .into_iter()
        .map(|p| p.field)
        .collect();
        missing.extend(
            refused_host_settings(manifest, &config.config.settings, runtime)
                .into_iter()
                .map(|p| format!("{} ({})", p.field, p.message)),
        );
        (!missing.is_empty()).then(|| missing.join(", "))
    }

    /// Whether changes are queued for it: switched on here, or on any
    /// replica (its settings may be another replica's environment's).
    pub fn takes_changes(&self) -> bool {
        self.switched_on || self.effective.switch != Switch::Unconfigured
    }

    /// Why the switched-on connector cannot run its active version, if it
    /// cannot: required settings or secrets it lacks.
    pub fn incomplete(&self) -> Option<String> {
        if self.active.is_none() || self.effective.switch != Switch::Enabled {
            return None;
        }
        self.missing
            .clone()
            .map(|missing| NotReady::Incomplete(missing).to_string())
    }

    /// Why this replica cannot run the switched-on connector, if it
    /// cannot: no version loaded, or settings or secrets it lacks.
    pub fn problem_running(&self) -> Option<String> {
        if self.effective.switch != Switch::Enabled {
            return None;
        }
        match &self.active {
            None => Some(
                self.problem
                    .clone()
                    .unwrap_or_else(|| "no version is active".to_owned()),
            ),
            Some(_) => self.incomplete(),
        }
    }

    /// Whether the connector's work runs: switched on, and the active
    /// version has every setting it requires.
    fn runs(&self) -> bool {
        self.effective.switch == Switch::Enabled && self.missing.is_none()
    }

    fn ready(&self, need: Need<'_>) -> Result<Ready, NotReady> {
        let active = self.active.as_ref().ok_or_else(|| {
            NotReady::NotLoaded(
                self.problem
                    .clone()
                    .unwrap_or_else(|| "no version is active".to_owned()),
            )
        })?;
        match self.effective.switch {
            Switch::Enabled => {}
            Switch::Disabled => return Err(NotReady::Disabled),
            Switch::Unconfigured => return Err(NotReady::Unconfigured),
        }
        let manifest = active.connector.manifest();
        if let Some(missing) = &self.missing {
            return Err(NotReady::Incomplete(missing.clone()));
        }
        match need {
            // The version the store says is active handles it, the one
            // loaded here does not (its load of that version failed, or
            // has not happened yet): the work waits for a replica that
            // loaded it. Skipped, a change queued for the active version
            // was settled with nothing pushed.
            Need::Entity(entity)
                if !manifest.entities.iter().any(|e| e == entity)
                    && self
                        .serves
                        .as_ref()
                        .is_some_and(|stored| stored.entities.iter().any(|e| e == entity)) =>
            {
                return Err(NotReady::NotLoaded(format!(
                    "the active version syncs `{entity}`; the version loaded here does not"
                )));
            }
            Need::Entity(entity) if !manifest.entities.iter().any(|e| e == entity) => {
                return Err(NotReady::Unsupported(format!("entity `{entity}`")));
            }
            // As for an entity: a sender told 404 by the replica that
            // could not load the active version drops the delivery, or
            // the endpoint.
            Need::Webhooks
                if !manifest.webhooks && self.serves.as_ref().is_some_and(|s| s.webhooks) =>
            {
                return Err(NotReady::NotLoaded(
                    "the active version takes webhooks; the version loaded here does not"
                        .to_owned(),
                ));
            }
            Need::Webhooks if !manifest.webhooks => {
                return Err(NotReady::Unsupported("webhooks".to_owned()));
            }
            _ => {}
        }
        Ok(Ready {
            connector: active.connector.clone(),
            config: self.effective.config.clone(),
        })
    }
}

/// Why a change to the registry was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No connector has this name.
    #[error("no connector with this name")]
    NotFound,
    /// The connector has no such version.
    #[error("the connector has no version {0}")]
    VersionNotFound(String),
    /// The connector has no loaded version to check settings against.
    #[error("no version of the connector is loaded: {0}")]
    NotLoaded(String),
    /// Customers are linked to it, or changes wait for it (delete
    /// without `force`).
    #[error("{0} customers are linked to this connector's records or have changes waiting for it; pass force=true to delete it anyway (the links are kept, the waiting changes skipped)")]
    Linked(i64),
    /// The version does not sync customers, and customers are linked
    /// through the connector or have changes waiting for it.
    #[error("version {version} does not sync `customer`, and {linked} customers are linked through this connector or have changes waiting for it: making it active would drop their changes. Keep `customer` in the new version, or delete the connector first")]
    DropsCustomers {
        /// The version refused.
        version: String,
        /// How many links it would strand.
        linked: i64,
    },
    /// The version needs settings or secrets the running connector lacks:
    /// made active, the connector would stop.
    #[error("version {version} needs {missing}, which the connector lacks: made active, the running connector would stop (its pushes waiting, its webhooks answered 503). Upload it with ?activate=false, give them with PUT /api/v1/connectors/{name}/settings (a version stored since may declare them), then activate it; or switch the connector off first")]
    NeedsSettings {
        /// The connector.
        name: String,
        /// The version refused.
        version: String,
        /// What it needs (`settings.account, secrets.token`).
        missing: String,
    },
    /// Settings or secrets do not fit the active manifest.
    #[error("the settings do not fit the connector's manifest")]
    Settings(Vec<SettingsProblem>),
    /// Secrets were given but no master key is configured.
    #[error("secrets can only be stored with a master key")]
    MasterKeyRequired,
    /// The component names another connector than the upload said it
    /// would be a version of.
    #[error("the component is the connector `{found}`, not `{expected}`: its manifest names it, and a version of `{found}` would take that connector's settings and secrets")]
    NameMismatch {
        /// The name the upload gave.
        expected: String,
        /// The name the component's manifest gives.
        found: String,
    },
    /// The component is larger than the configured limit.
    #[error("the component exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The component was refused (see the runtime's [`LoadError`]).
    #[error(transparent)]
    Invalid(LoadError),
    /// This version of the connector exists with other bytes.
    #[error("{} {} already exists with other bytes (sha256 {}); give the new build a new version", .0.name, .0.version, .0.sha256)]
    VersionExists(Box<VersionMeta>),
    /// The connector changed under a settings write, again and again
    /// (other replicas writing it at once); nothing was written.
    #[error("the connector changed while its settings were written; send them again")]
    Changed,
    /// The write was made against another revision of the connector than
    /// the current one (`If-Match`): someone changed it since the caller
    /// read it.
    #[error("the connector is at revision {0}, not the one the write was made against")]
    Stale(i64),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How many times a settings write is built again over a connector that
/// changed under it (see [`Registry::put_settings`]).
const SETTINGS_RACES: usize = 5;

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    /// The version, as stored.
    pub version: VersionMeta,
    /// False: the same bytes were stored already and nothing changed.
    pub created: bool,
}

/// What the registry needs besides the store and the runtime.
#[derive(Debug)]
pub struct RegistryOptions {
    /// Settings and secrets from the file and environment, by connector.
    pub environment: BTreeMap<String, ConnectorSettingsConfig>,
    /// Opens and seals stored secrets; `None` without a master key.
    pub secret_box: Option<SecretBox>,
    /// Largest component accepted by an upload.
    pub max_component_bytes: usize,
}

/// A connector's configuration as written through the API.
#[derive(Debug, Default, Clone)]
pub struct NewSettings {
    /// Whether ferry syncs through it; `None` keeps the switch as it is.
    pub enabled: Option<bool>,
    /// Non-secret settings by name.
    pub settings: BTreeMap<String, String>,
    /// Secrets by name; `None` keeps the stored ones, empty removes them.
    /// A name mapped to `None` keeps the value in effect for it.
    pub secrets: Option<BTreeMap<String, Option<SecretString>>>,
}

/// What [`Registry::resolve_active`] found.
struct Resolved {
    active: Option<Active>,
    problem: Option<String>,
    serves: Option<Serves>,
    /// The active version could not be loaded: try again later.
    failed: bool,
}

#[derive(Default)]
struct View {
    entries: BTreeMap<String, Arc<Entry>>,
}

struct Inner {
    store: Store,
    runtime: Arc<Runtime>,
    options: RegistryOptions,
    view: RwLock<Arc<View>>,
    /// One refresh at a time: two would load the same version twice.
    refreshing: tokio::sync::Mutex<()>,
    /// Components this process just loaded for a version about to become
    /// active (an upload, an activation, the bundle), by sha256, so the
    /// refresh that installs it does not load it again.
    staged: Mutex<HashMap<String, Arc<Connector>>>,
    /// Counts refreshes that changed something; workers wait on it.
    changes: watch::Sender<u64>,
    /// Bundled versions not registered because the file or environment
    /// names what no version declares: problems of
    /// [`Registry::check_environment`].
    refused_bundled: Mutex<Vec<String>>,
    /// Connectors whose waiting pushes a task of this process is releasing,
    /// each with whether it was asked again meanwhile (see
    /// [`Registry::release_waiting`]).
    releasing: Mutex<HashMap<String, bool>>,
}

/// The connector registry; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field(
                "connectors",
                &self.view().entries.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// An empty registry over `store`, loading components with `runtime`.
    /// [`Registry::seed_bundled`] and [`Registry::refresh`] fill it.
    pub fn new(store: Store, runtime: Arc<Runtime>, options: RegistryOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                runtime,
                options,
                view: RwLock::new(Arc::default()),
                refreshing: tokio::sync::Mutex::new(()),
                staged: Mutex::new(HashMap::new()),
                changes: watch::channel(0).0,
                refused_bundled: Mutex::default(),
                releasing: Mutex::default(),
            }),
        }
    }

    fn view(&self) -> Arc<View> {
        match self.inner.view.read() {
            Ok(view) => view.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The ready connector for `name` and `need`, or why not. Answers from
    /// memory: no I/O on the hot path.
    pub fn ready(&self, name: &str, need: Need<'_>) -> Result<Ready, NotReady> {
        self.view()
            .entries
            .get(name)
            .ok_or(NotReady::Unknown)?
            .ready(need)
    }

    /// The active version of `name` and its configuration, whether or not
    /// the connector is enabled (to finish work it already accepted); not
    /// while it lacks settings or secrets here (a master key that cannot
    /// open them): a call without its secrets would only fail.
    pub fn loaded(&self, name: &str) -> Result<Ready, NotReady> {
        let entry = self
            .view()
            .entries
            .get(name)
            .cloned()
            .ok_or(NotReady::Unknown)?;
        let active = entry
            .active
            .as_ref()
            .ok_or_else(|| NotReady::NotLoaded("no version is active".to_owned()))?;
        if let Some(missing) = &entry.missing {
            return Err(NotReady::Incomplete(missing.clone()));
        }
        Ok(Ready {
            connector: active.connector.clone(),
            config: entry.effective.config.clone(),
        })
    }

    /// One connector.
    pub fn entry(&self, name: &str) -> Option<Arc<Entry>> {
        self.view().entries.get(name).cloned()
    }

    /// Every connector, in name order.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        self.view().entries.values().cloned().collect()
    }

    /// The connectors a change to `entity` is queued for: switched on
    /// (enabled, or disabled so the change waits), here or on any replica,
    /// and handling it, by the manifest of the version the store says is
    /// active. A version this replica failed to load still takes its
    /// changes: their pushes wait until it loads, here or on another
    /// replica, rather than never being queued. So does a connector whose
    /// manifest could not be read, and one whose settings only another
    /// replica's environment gives (its pushes wait here for that one).
    pub fn participants(&self, entity: &str) -> Vec<String> {
        self.view()
            .entries
            .values()
            .filter(|e| e.takes_changes())
            .filter(|e| {
                e.serves
                    .as_ref()
                    .is_none_or(|serves| serves.entities.iter().any(|x| x == entity))
            })
            .map(|e| e.name.clone())
            .collect()
    }

    /// Changes whenever a refresh changed something (a version, a switch,
    /// settings): workers wait on it to pick up work an enable released.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Opens and seals stored secrets, if a master key is configured.
    pub fn secret_box(&self) -> Option<&SecretBox> {
        self.inner.options.secret_box.as_ref()
    }

    /// `name`'s entry as the store holds it now, for an operator's call:
    /// the view is refreshed first. A replica a poll behind another's
    /// upload (or new version) answered 404 for the new connector, or
    /// checked its settings against the old version's manifest (422 for a
    /// setting the new one declares).
    async fn current_entry(&self, name: &str) -> Result<Arc<Entry>, RegistryError> {
        self.refresh().await?;
        self.entry(name).ok_or(RegistryError::NotFound)
    }

    /// Why a write of `name` conditioned on `expected` changed no row: the
    /// connector moved past that revision since it was checked
    /// ([`RegistryError::Stale`]), or `otherwise`.
    async fn missed(
        &self,
        name: &str,
        expected: Option<i64>,
        otherwise: RegistryError,
    ) -> RegistryError {
        let Some(expected) = expected else {
            return otherwise;
        };
        match self.current_entry(name).await {
            Ok(entry) if entry.revision != expected => RegistryError::Stale(entry.revision),
            Ok(_) => otherwise,
            Err(error) => error,
        }
    }

    /// [`Registry::refresh`] after an operator's change committed: a busy
    /// store is no failure of the change (answered 503 "nothing was
    /// written", a client sent an upload again, or believed a version
    /// still inactive), only a view that catches up at the next poll.
    async fn refresh_after_commit(&self, change: &str) -> bool {
        match self.refresh().await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(
                    change,
                    %error,
                    "committed; this replica's view of its connectors catches up at its next poll"
                );
                false
            }
        }
    }

    /// Re-reads what changed in the store since the last refresh and loads
    /// newly active versions. A version that fails to load leaves the
    /// previous one running and says why in [`Entry::problem`].
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let switched_on = {
            let _one = self.inner.refreshing.lock().await;
            let result = self.refresh_locked().await;
            if let Ok(mut staged) = self.inner.staged.lock() {
                staged.clear();
            }
            result?
        };
        let Some(switched_on) = switched_on else {
            return Ok(());
        };
        // Every replica that sees a connector switched on releases the
        // pushes that waited for it (once the new view is in place, so a
        // released push sees it enabled), and so a push parked by a replica
        // whose view was still stale does not wait out its recheck.
        self.release_waiting(switched_on);
        // The scheduler claims what the new view made due.
        self.inner.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Releases the pushes waiting for each of `names` (see
    /// [`Store::resume_connector_links`]) in a task of its own, one per
    /// connector at a time (asked again meanwhile, it runs once more). Not
    /// awaited: over a long backlog (batches of `RESUME_BATCH`) it held the
    /// refresh it followed, so an enable's answer (past `request_timeout`,
    /// a 408 for a switch made) and this replica's poll, which went on
    /// pushing with a version an operator had just rolled back.
    fn release_waiting(&self, names: Vec<String>) {
        for name in names {
            {
                let mut releasing = self
                    .inner
                    .releasing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if let Some(again) = releasing.get_mut(&name) {
                    *again = true;
                    continue;
                }
                releasing.insert(name.clone(), false);
            }
            let registry = self.clone();
            tokio::spawn(async move {
                loop {
                    match registry.inner.store.resume_connector_links(&name).await {
                        Ok(resumed) => {
                            tracing::info!(connector = %name, resumed, "waiting pushes released");
                        }
                        Err(error) => {
                            tracing::warn!(connector = %name, error = format!("{:#}", anyhow::Error::from(error)), "releasing waiting pushes failed; they retry within a minute");
                        }
                    }
                    // The scheduler claims what the release made due.
                    registry.inner.changes.send_modify(|n| *n += 1);
                    let mut releasing = registry
                        .inner
                        .releasing
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if releasing.get(&name) == Some(&true) {
                        releasing.insert(name.clone(), false);
                        continue;
                    }
                    releasing.remove(&name);
                    break;
                }
            });
        }
    }

    /// Reads the store's connectors into a new view; the names of those
    /// this view switches on (see [`Registry::refresh`]), or `None` when
    /// nothing changed (no view is made, nobody is told).
    async fn refresh_locked(&self) -> Result<Option<Vec<String>>, StoreError> {
        let rows: Vec<ConnectorRow> = self
            .inner
            .store
            .connector_rows()
            .await?
            .into_iter()
            .filter(|r| r.deleted_at.is_none())
            .collect();
        let current = self.view();
        let now = tokio::time::Instant::now();
        // An entry is current when its revision is, no failed load of its
        // active version is due to be tried again, and no record that it
        // is switched on here is still to be written.
        let current_for = |row: &ConnectorRow| {
            current.entries.get(&row.name).filter(|e| {
                e.revision == row.revision
                    && e.retry.is_none_or(|(at, _)| at > now)
                    && (e.switched_on || e.effective.switch == Switch::Unconfigured)
            })
        };
        let unchanged =
            rows.len() == current.entries.len() && rows.iter().all(|r| current_for(r).is_some());
        if unchanged {
            return Ok(None);
        }
        let configs: BTreeMap<String, StoredConnectorConfig> = self
            .inner
            .store
            .connector_configs()
            .await?
            .into_iter()
            .map(|c| (c.connector.clone(), c))
            .collect();
        let mut entries = BTreeMap::new();
        for row in rows {
            if let Some(previous) = current_for(&row) {
                entries.insert(row.name.clone(), previous.clone());
                continue;
            }
            let previous = current.entries.get(&row.name);
            let resolved = self
                .resolve_active(&row, previous.and_then(|p| p.active.as_ref()))
                .await;
            // A load that failed is tried again, later each time: the
            // read of the bytes may have failed for a moment, and no other
            // change to the connector may come to trigger a reload.
            let retry = resolved.failed.then(|| {
                let failures = previous
                    .filter(|p| p.revision == row.revision)
                    .and_then(|p| p.retry)
                    .map_or(0, |(_, n)| n)
                    + 1;
                let wait = LOAD_RETRY
                    .saturating_mul(1 << (failures - 1).min(8))
                    .min(LOAD_RETRY_MAX);
                (now + wait, failures)
            });
            let effective = config::effective(
                &row.name,
                row.enabled,
                row.switched_on,
                configs.get(&row.name),
                self.inner.options.environment.get(&row.name),
                self.inner.options.secret_box.as_ref(),
            );
            // Settings stored through the API replace the environment's
            // whole (secrets too): said once, when it starts to hold, since
            // the `FERRY_CONNECTORS__…` variables then do nothing at all.
            let shadows = effective.source == ConfigSource::Api
                && self
                    .inner
                    .options
                    .environment
                    .get(&row.name)
                    .is_some_and(|env| !env.settings.is_empty() || !env.secrets.is_empty());
            if shadows && previous.is_none_or(|p| p.effective.source != ConfigSource::Api) {
                tracing::warn!(
                    connector = %row.name,
                    "the connector's settings stored through the API replace its FERRY_CONNECTORS__ environment settings and secrets entirely \
                     (a secret given as null in PUT /api/v1/connectors/NAME/settings keeps the environment's value)"
                );
            }
            // Stored secrets this replica cannot open (another master key,
            // or none) are missing here, whatever their names say: run
            // without them, a push is refused as permanent and dead-lettered.
            let missing = resolved.active.as_ref().and_then(|active| {
                let sealed = effective
                    .problem
                    .as_ref()
                    .map(|problem| format!("its stored secrets, unreadable here: {problem}"));
                sealed.or_else(|| {
                    Entry::missing_settings(
                        &effective,
                        active.connector.manifest(),
                        &self.inner.runtime,
                    )
                })
            });
            let mut entry = Entry {
                name: row.name.clone(),
                active: resolved.active,
                problem: resolved.problem,
                effective,
                serves: resolved.serves,
                retry,
                missing,
                switched_on: row.switched_on,
                revision: row.revision,
            };
            // Switched on here and not yet in the store: say so, for every
            // replica to queue its changes (the revision moves, so they
            // read it within a second, and so does this one).
            // The entry holds the revision the mark made: an answer's
            // `ETag` read from it after a first switch was one behind the
            // store's, and a change sent back with it was a 412.
            if !row.switched_on && entry.effective.switch != Switch::Unconfigured {
                match self
                    .inner
                    .store
                    .mark_switched_on(&row.name, row.revision)
                    .await
                {
                    Ok(true) => {
                        entry.switched_on = true;
                        entry.revision = row.revision + 1;
                    }
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(connector = %row.name, error = format!("{:#}", anyhow::Error::from(error)), "could not record the connector as switched on; tried again at the next refresh");
                    }
                }
            }
            entries.insert(row.name, Arc::new(entry));
        }
        for gone in current.entries.keys().filter(|n| !entries.contains_key(*n)) {
            tracing::info!(connector = %gone, "connector removed");
        }
        let view = Arc::new(View { entries });
        match self.inner.view.write() {
            Ok(mut slot) => *slot = view.clone(),
            Err(poisoned) => *poisoned.into_inner() = view.clone(),
        }
        // New here counts as off: pushes another replica queued for a
        // connector this one did not know yet wait for it. So do the
        // settings a new version required, once given.
        let switched_on = view
            .entries
            .iter()
            .filter(|(name, entry)| {
                entry.runs() && current.entries.get(*name).is_none_or(|e| !e.runs())
            })
            .map(|(name, _)| name.clone())
            .collect();
        Ok(Some(switched_on))
    }

    /// The version `row` says is active, loaded; the previous one (and the
    /// reason) if it cannot be.
    async fn resolve_active(&self, row: &ConnectorRow, previous: Option<&Active>) -> Resolved {
        let Some(version) = &row.active_version else {
            return Resolved {
                active: None,
                problem: Some("no version is active".to_owned()),
                serves: Some(Serves::default()),
                failed: false,
            };
        };
        let keep = |reason: String, serves: Option<Serves>| {
            let reason = match previous {
                Some(p) => format!("{reason}; still running {}", p.meta.version),
                None => reason,
            };
            Resolved {
                active: previous.cloned(),
                problem: Some(reason),
                serves: serves.or_else(|| previous.map(|p| Serves::of(&p.meta.manifest))),
                failed: true,
            }
        };
        let meta = match self.inner.store.connector_version(&row.name, version).await {
            Ok(Some(meta)) => meta,
            Ok(None) => return keep(format!("version {version} is not stored"), None),
            Err(error) => return keep(format!("reading version {version} failed: {error}"), None),
        };
        let serves = Some(Serves::of(&meta.manifest));
        if let Some(previous) = previous.filter(|p| p.meta.sha256 == meta.sha256) {
            return Resolved {
                active: Some(Active {
                    connector: previous.connector.clone(),
                    meta,
                }),
                problem: None,
                serves,
                failed: false,
            };
        }
        let staged = self
            .inner
            .staged
            .lock()
            .ok()
            .and_then(|mut s| s.remove(&meta.sha256));
        let connector = match staged {
            Some(connector) => connector,
            None => match self.load_stored(&row.name, version).await {
                Ok(connector) => connector,
                Err(reason) => {
                    tracing::error!(connector = %row.name, version = %version, %reason, "connector version not loaded");
                    return keep(
                        format!("version {version} failed to load: {reason}"),
                        serves,
                    );
                }
            },
        };
        if connector.sha256() != meta.sha256 {
            return keep(
                format!("version {version}'s bytes do not match its sha256"),
                serves,
            );
        }
        if let Err(reason) = same_manifest(connector.manifest(), &meta.manifest) {
            tracing::error!(connector = %row.name, version = %version, %reason, "connector version not loaded");
            return keep(
                format!("version {version} failed to load: {reason}"),
                serves,
            );
        }
        tracing::info!(
            connector = %row.name,
            version = %meta.version,
            world = %connector.world(),
            sha256 = %meta.sha256,
            source = meta.source.as_str(),
            from = %meta.uploaded_by,
            "connector version active"
        );
        Resolved {
            active: Some(Active { connector, meta }),
            problem: None,
            serves,
            failed: false,
        }
    }

    async fn load_stored(&self, name: &str, version: &str) -> Result<Arc<Connector>, String> {
        let (_, bytes) = self
            .inner
            .store
            .connector_component(name, version)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "its bytes are not stored".to_owned())?;
        let connector = self
            .inner
            .runtime
            .load(&bytes)
            .await
            .map_err(|e| e.to_string())?;
        if connector.name() != name || connector.manifest().version != version {
            return Err(format!(
                "the stored component is {} {}",
                connector.name(),
                connector.manifest().version
            ));
        }
        Ok(connector)
    }

    fn stage(&self, connector: &Arc<Connector>) {
        if let Ok(mut staged) = self.inner.staged.lock() {
            staged.insert(connector.sha256().to_owned(), connector.clone());
        }
    }

    /// Refreshes every [`POLL`] until cancelled.
    pub async fn run(self, cancel: CancellationToken) {
        let mut every = tokio::time::interval(POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = every.tick() => {
                    if let Err(error) = self.refresh().await {
                        crate::metrics::background_failed("registry_refresh");
                        tracing::warn!(error = format!("{:#}", anyhow::Error::from(error)), "connector registry refresh failed");
                    }
                }
            }
        }
    }

    /// Enters the bundled components into the store (see
    /// [`Store::seed_connector_version`]) and loads what is active; what
    /// each file that loaded became, by connector name.
    pub async fn seed_bundled(
        &self,
        files: &[bundled::BundledFile],
    ) -> Result<Vec<(String, Seeded)>, StoreError> {
        let mut seeded = Vec::new();
        self.inner
            .refused_bundled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        for file in files {
            let path = file.path.display().to_string();
            let connector = match self.inner.runtime.load(&file.bytes).await {
                Ok(connector) => connector,
                Err(error) => {
                    tracing::error!(path, error = %error, "bundled connector refused");
                    continue;
                }
            };
            let manifest = manifest_json(connector.manifest());
            let world = connector.world().to_string();
            let new = NewVersion {
                name: connector.name(),
                version: &connector.manifest().version,
                sha256: connector.sha256(),
                world: &world,
                manifest: &manifest,
                component: &file.bytes,
                source: VersionSource::Bundled,
                uploaded_by: &path,
            };
            // Checked before the version may become active: a start its
            // environment check then refused had made it active on every
            // replica already (the others' environments may lack what it
            // needs), and a rolled-back deployment left it so.
            let unknown = self.undeclared_in_environment(&connector).await?;
            if !unknown.is_empty() {
                let manifest = connector.manifest();
                let declared: Vec<String> = manifest
                    .settings
                    .iter()
                    .map(|s| format!("settings.{}", s.name))
                    .chain(
                        manifest
                            .secrets
                            .iter()
                            .map(|s| format!("secrets.{}", s.name)),
                    )
                    .collect();
                let mut refused = self
                    .inner
                    .refused_bundled
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tracing::error!(
                    connector = %connector.name(),
                    version = %manifest.version,
                    path,
                    names = ?unknown,
                    "bundled connector version NOT registered: its file or environment configuration names what no version of it declares (a typo?); the active version stays as it is"
                );
                for field in unknown {
                    let (kind, key) = field.split_once('.').unwrap_or(("settings", &field));
                    refused.push(format!(
                        "{}: declared by no version of `{}` (bundled {} from {path} declares: {}); \
                         that version was not registered, and the active one stays as it is",
                        environment_name(connector.name(), kind, key),
                        connector.name(),
                        manifest.version,
                        declared.join(", ")
                    ));
                }
                continue;
            }
            let syncs_customers = connector.manifest().entities.iter().any(|e| e == ENTITY);
            let outcome = self
                .inner
                .store
                .seed_connector_version(&new, syncs_customers)
                .await?;
            seeded.push((connector.name().to_owned(), outcome));
            match outcome {
                Seeded::Stored { .. } => self.stage(&connector),
                Seeded::HeldBack { linked } => tracing::warn!(
                    connector = %connector.name(),
                    version = %connector.manifest().version,
                    path,
                    linked,
                    "bundled connector version NOT made active (stored, unless it is new bytes under the active version: those are not): it does not sync customers, and customers are linked through the connector (their pushes would be skipped)"
                ),
                Seeded::Deleted => tracing::info!(
                    connector = %connector.name(),
                    path,
                    "bundled connector not registered: it was deleted through the API (upload it to bring it back)"
                ),
                Seeded::UploadDiffers => tracing::warn!(
                    connector = %connector.name(),
                    version = %connector.manifest().version,
                    path,
                    "bundled connector not registered: an uploaded component has the same version with other bytes"
                ),
            }
        }
        self.refresh().await?;
        Ok(seeded)
    }

    /// The settings and secrets the file or environment gives `connector`
    /// that neither it nor any stored version of it declares
    /// (`settings.NAME`), as [`Registry::check_environment`] refuses them.
    async fn undeclared_in_environment(
        &self,
        connector: &Connector,
    ) -> Result<Vec<String>, StoreError> {
        let Some(given) = self.inner.options.environment.get(connector.name()) else {
            return Ok(Vec::new());
        };
        let undeclared = config::check_against_manifest(
            connector.manifest(),
            given.settings.keys(),
            given.secrets.keys(),
            false,
        );
        if undeclared.is_empty() {
            return Ok(Vec::new());
        }
        let versions = self
            .inner
            .store
            .connector_versions(connector.name())
            .await?;
        Ok(undeclared
            .into_iter()
            .map(|problem| problem.field)
            .filter(|field| {
                let (kind, key) = field.split_once('.').unwrap_or(("settings", field));
                !versions.iter().any(|v| declares(&v.manifest, kind, key))
            })
            .collect())
    }

    /// Brings back `name`, deleted through the API, for the next seed of
    /// its bundled component to store and activate; false if it is not
    /// deleted.
    pub async fn undelete(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.store.undelete_connector(name).await
    }

    /// The largest component an upload takes (`connector_max_bytes`).
    pub fn max_component_bytes(&self) -> usize {
        self.inner.options.max_component_bytes
    }

    /// Validates and stores an uploaded component, and (if `activate`)
    /// makes it active everywhere. The same bytes again change nothing.
    #[tracing::instrument(skip_all, fields(bytes = bytes.len(), activate))]
    pub async fn upload(
        &self,
        bytes: &[u8],
        activate: bool,
        expected_name: Option<&str>,
        uploaded_by: &str,
    ) -> Result<Uploaded, RegistryError> {
        let limit = self.inner.options.max_component_bytes;
        if bytes.len() > limit {
            return Err(RegistryError::TooLarge { limit });
        }
        let named = |found: &str| match expected_name {
            Some(expected) if expected != found => Err(RegistryError::NameMismatch {
                expected: expected.to_owned(),
                found: found.to_owned(),
            }),
            _ => Ok(()),
        };
        let sha256 = hex::encode(Sha256::digest(bytes));
        if let Some(existing) = self.inner.store.connector_version_by_sha(&sha256).await? {
            named(&existing.name)?;
            return Ok(Uploaded {
                version: existing,
                created: false,
            });
        }
        let connector = self
            .inner
            .runtime
            .load(bytes)
            .await
            .map_err(RegistryError::Invalid)?;
        named(connector.name())?;
        if activate {
            // This one first: it reads the store's view afresh, which the
            // other then judges by.
            self.check_keeps_running(&connector).await?;
            self.check_keeps_customers(&connector).await?;
        }
        let manifest = manifest_json(connector.manifest());
        let world = connector.world().to_string();
        let new = NewVersion {
            name: connector.name(),
            version: &connector.manifest().version,
            sha256: &sha256,
            world: &world,
            manifest: &manifest,
            component: bytes,
            source: VersionSource::Upload,
            uploaded_by,
        };
        self.stage(&connector);
        let uploaded = match self
            .inner
            .store
            .add_connector_version(&new, activate)
            .await?
        {
            AddedVersion::Added(version) => Uploaded {
                version,
                created: true,
            },
            AddedVersion::Exists(version) => Uploaded {
                version,
                created: false,
            },
            AddedVersion::Conflict(existing) => {
                return Err(RegistryError::VersionExists(Box::new(existing)))
            }
        };
        tracing::info!(
            connector = %uploaded.version.name,
            version = %uploaded.version.version,
            sha256 = %uploaded.version.sha256,
            activate,
            uploaded_by,
            "connector uploaded"
        );
        self.refresh_after_commit("upload").await;
        Ok(uploaded)
    }

    /// Refuses to make `connector` active over a version that syncs
    /// customers while customers are linked through it: their pushes would
    /// be skipped as settled, and a rollback would not bring them back.
    async fn check_keeps_customers(&self, connector: &Connector) -> Result<(), RegistryError> {
        let manifest = connector.manifest();
        if manifest.entities.iter().any(|e| e == ENTITY) {
            return Ok(());
        }
        let Some(entry) = self.entry(connector.name()) else {
            return Ok(());
        };
        // A manifest the store could not read is taken to sync customers.
        if entry
            .serves
            .as_ref()
            .is_some_and(|serves| !serves.entities.iter().any(|e| e == ENTITY))
        {
            return Ok(());
        }
        let linked = self.inner.store.customer_links(connector.name()).await?;
        if linked > 0 {
            return Err(RegistryError::DropsCustomers {
                version: manifest.version.clone(),
                linked,
            });
        }
        Ok(())
    }

    /// Refuses to make `connector` active over a running version of it
    /// when it needs settings or secrets the connector lacks (a required
    /// one added or renamed): the connector would stop until someone gave
    /// them. Stored with `activate=false`, its settings can be given first
    /// (a write keeps and takes what any stored version declares). A connector
    /// that does not run (switched off, or lacking settings already) may
    /// take it: nothing stops.
    ///
    /// Any version but an older one (a build that differs only in its
    /// metadata is checked too: taken for a rollback, a CI build needing a
    /// new secret went active and stopped the connector): a rollback (an
    /// emergency's) goes through, with its settings as they were last
    /// given (every write since it ran kept them, and may give them). As the
    /// store has it now: this replica's view may be a poll behind another
    /// replica's settings write. On a replica that does not run it because
    /// other replicas' environments configure it, not its own, the settings
    /// the new version requires and the running one does not declare count
    /// as missing.
    async fn check_keeps_running(&self, connector: &Connector) -> Result<(), RegistryError> {
        let entry = match self.current_entry(connector.name()).await {
            Ok(entry) => entry,
            Err(RegistryError::NotFound) => return Ok(()),
            Err(error) => return Err(error),
        };
        let Some(active) = &entry.active else {
            return Ok(());
        };
        let target = &connector.manifest().version;
        if is_rollback(target, &active.meta.version) {
            return Ok(());
        }
        let missing = if entry.runs() {
            Entry::missing_settings(&entry.effective, connector.manifest(), &self.inner.runtime)
        } else if entry.switched_on
            && entry.effective.switch != Switch::Disabled
            && !matches!(entry.effective.source, ConfigSource::Api)
        {
            // Switched on, and configured by replicas' environments (this
            // one's lacks what the running version needs, or has nothing),
            // which this one cannot read: what the new version requires and
            // the running one does not declare is missing there (an
            // environment refuses a name the running version does not
            // declare). Stored through the API, the configuration is every
            // replica's, and this one's view is theirs.
            let running = active.connector.manifest();
            let missing: Vec<String> = config::missing_required(
                connector.manifest(),
                running.settings.iter().map(|s| &s.name),
                running.secrets.iter().map(|s| &s.name),
            )
            .into_iter()
            .map(|p| p.field)
            .collect();
            (!missing.is_empty()).then(|| missing.join(", "))
        } else {
            None
        };
        match missing {
            Some(missing) => Err(RegistryError::NeedsSettings {
                name: connector.name().to_owned(),
                version: connector.manifest().version.clone(),
                missing,
            }),
            None => Ok(()),
        }
    }

    /// The stored versions of `name`, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionMeta>, RegistryError> {
        self.current_entry(name).await?;
        Ok(self.inner.store.connector_versions(name).await?)
    }

    /// Makes `version` of `name` the active one (rollback or roll
    /// forward), after loading it here to be sure it still loads. With
    /// `expected` (`If-Match`), only over that revision.
    pub async fn activate(
        &self,
        name: &str,
        version: &str,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        self.current_entry(name).await?.fresh(expected)?;
        // No version holds one (manifests refuse it), and PostgreSQL
        // refuses a NUL in a query's text: a 500 for a 404.
        if version.contains('\0') {
            return Err(RegistryError::VersionNotFound(
                version.replace('\0', "\u{fffd}"),
            ));
        }
        let (sha256, bytes) = self
            .inner
            .store
            .connector_component(name, version)
            .await?
            .ok_or_else(|| RegistryError::VersionNotFound(version.to_owned()))?;
        // Loaded again here: it may be refused under today's operator rules.
        let connector = self
            .inner
            .runtime
            .load(&bytes)
            .await
            .map_err(RegistryError::Invalid)?;
        // Bytes damaged in the store: every replica would refuse them at
        // its next poll ("do not match its sha256") and keep the running
        // version, after this one answered 200.
        if connector.sha256() != sha256 {
            return Err(RegistryError::Invalid(LoadError::Compile(format!(
                "version {version}'s stored bytes do not match its sha256 {sha256}"
            ))));
        }
        if let Some(meta) = self.inner.store.connector_version(name, version).await? {
            same_manifest(connector.manifest(), &meta.manifest)
                .map_err(|reason| RegistryError::Invalid(LoadError::InvalidManifest(reason)))?;
        }
        self.check_keeps_customers(&connector).await?;
        self.check_keeps_running(&connector).await?;
        self.stage(&connector);
        if !self
            .inner
            .store
            .activate_connector_version(name, version, expected)
            .await?
        {
            let missing = RegistryError::VersionNotFound(version.to_owned());
            return Err(self.missed(name, expected, missing).await);
        }
        tracing::info!(connector = name, version, "connector version activated");
        self.refresh_after_commit("activation").await;
        Ok(())
    }

    /// Checks the settings and secrets given in the file or environment
    /// against the loaded manifests, as `PUT /settings` does: a name a
    /// connector does not declare (a typo such as `APIBASE`) is returned,
    /// one line per problem. A connector name nobody registered is only
    /// warned about: its component may be uploaded later. So is a name
    /// another stored version of the connector declares: after a rollback
    /// through the API (`activate` of an older version) the variables of
    /// the newer one stay in the deployment, and a restart that refused
    /// them kept every replica down until someone edited it; after a roll
    /// forward to a version that dropped a setting, the same.
    pub async fn check_environment(&self) -> Vec<String> {
        let mut problems = self
            .inner
            .refused_bundled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (name, given) in &self.inner.options.environment {
            let env_name = |kind: &str, key: &str| environment_name(name, kind, key);
            let Some(entry) = self.entry(name) else {
                let known: Vec<String> = self.entries().iter().map(|e| e.name.clone()).collect();
                tracing::warn!(
                    connector = %name,
                    registered = ?known,
                    "CONFIGURATION FOR AN UNKNOWN CONNECTOR: no connector named `{name}` is registered; its settings apply only if one is uploaded under that name. A typo?"
                );
                continue;
            };
            let Some(active) = &entry.active else {
                continue;
            };
            let manifest = active.connector.manifest();
            let found = config::check_against_manifest(
                manifest,
                given.settings.keys(),
                given.secrets.keys(),
                false,
            );
            let versions = if found.is_empty() {
                Vec::new()
            } else {
                // Unread (a store error), every name is checked as before.
                self.inner
                    .store
                    .connector_versions(name)
                    .await
                    .unwrap_or_default()
            };
            for problem in found {
                let (kind, key) = problem
                    .field
                    .split_once('.')
                    .unwrap_or(("settings", &problem.field));
                let declaring: Vec<&str> = versions
                    .iter()
                    .filter(|v| declares(&v.manifest, kind, key))
                    .map(|v| v.version.as_str())
                    .collect();
                if !declaring.is_empty() {
                    tracing::warn!(
                        connector = %name,
                        active = %active.meta.version,
                        declared_by = ?declaring,
                        "{} is not declared by the active version of `{name}`, only by other versions stored (after a rollback, or a version that dropped it): it does nothing until one of those is active",
                        env_name(kind, key)
                    );
                    continue;
                }
                let declared: Vec<&str> = if kind == "secrets" {
                    manifest.secrets.iter().map(|s| s.name.as_str()).collect()
                } else {
                    manifest.settings.iter().map(|s| s.name.as_str()).collect()
                };
                problems.push(format!(
                    "{}: {} (`{name}` declares: {})",
                    env_name(kind, key),
                    problem.message,
                    declared.join(", ")
                ));
            }
        }
        problems
    }

    /// Enables or disables `name`. Enabling needs the active manifest's
    /// required settings and secrets; the refresh that follows releases the
    /// pushes that waited. With `expected` (`If-Match`), only over that
    /// revision.
    pub async fn set_enabled(
        &self,
        name: &str,
        enabled: bool,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        let entry = self.current_entry(name).await?;
        entry.fresh(expected)?;
        // Never switched on, anywhere: it is off already. Paused, it would
        // take changes for a later enable to push as creates, and stay
        // switched on for good.
        if !enabled && !entry.takes_changes() {
            return Ok(());
        }
        if enabled {
            let manifest = active_manifest(&entry)?;
            let problems: Vec<SettingsProblem> = config::missing_required(
                manifest,
                entry.effective.config.settings.keys(),
                entry.effective.secret_names.iter(),
            )
            .into_iter()
            .chain(refused_host_settings(
                manifest,
                &entry.effective.config.settings,
                &self.inner.runtime,
            ))
            .collect();
            if !problems.is_empty() {
                return Err(RegistryError::Settings(problems));
            }
        }
        if !self
            .inner
            .store
            .set_connector_enabled(name, enabled, expected)
            .await?
        {
            return Err(self.missed(name, expected, RegistryError::NotFound).await);
        }
        tracing::info!(connector = name, enabled, "connector switched");
        self.refresh_after_commit("switch").await;
        Ok(())
    }

    /// Writes `name`'s settings, secrets and switch after checking them
    /// against the active manifest.
    ///
    /// The write is built from this replica's view of the connector (a
    /// secret sent as null keeps the one in effect there, as the console
    /// sends every secret already set), and lands only over the revision
    /// that view holds: a change another replica committed since (a key
    /// rotated) is read, and the write built again, instead of being
    /// silently undone by an older copy.
    ///
    /// With `expected` (`If-Match`: the revision the caller read), the
    /// write lands only over that revision, or is [`RegistryError::Stale`]:
    /// a client sending back settings it read earlier undid a change made
    /// since (another operator's rotated key), silently.
    pub async fn put_settings(
        &self,
        name: &str,
        new: NewSettings,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        self.current_entry(name).await?;
        if let Some(expected) = expected {
            if self
                .put_settings_over_view(name, new, Some(expected))
                .await?
            {
                return Ok(());
            }
            let now = self.current_entry(name).await?.revision;
            return Err(RegistryError::Stale(now));
        }
        for _ in 0..SETTINGS_RACES {
            if self.put_settings_over_view(name, new.clone(), None).await? {
                return Ok(());
            }
            self.refresh().await?;
        }
        Err(RegistryError::Changed)
    }

    /// One try of [`Registry::put_settings`]: false if the connector moved
    /// past this replica's view of it.
    async fn put_settings_over_view(
        &self,
        name: &str,
        new: NewSettings,
        expected: Option<i64>,
    ) -> Result<bool, RegistryError> {
        let entry = self.entry(name).ok_or(RegistryError::NotFound)?;
        entry.fresh(expected)?;
        let manifest = active_manifest(&entry)?;
        let blank: Vec<SettingsProblem> = new
            .secrets
            .iter()
            .flatten()
            .filter(|(_, value)| {
                value
                    .as_ref()
                    .is_some_and(|v| v.expose_secret().trim().is_empty())
            })
            .map(|(name, _)| SettingsProblem::new(format!("secrets.{name}"), config::BLANK_SECRET))
            .collect();
        if !blank.is_empty() {
            return Err(RegistryError::Settings(blank));
        }
        let given_names: Vec<String> = new
            .settings
            .keys()
            .map(|k| format!("settings.{k}"))
            .chain(
                new.secrets
                    .iter()
                    .flatten()
                    .map(|(k, _)| format!("secrets.{k}")),
            )
            .collect();
        let mut secrets = new
            .secrets
            .map(|given| keep_secrets_in_effect(&entry, given))
            .transpose()?;
        let previous = self
            .inner
            .store
            .connector_configs()
            .await?
            .into_iter()
            .find(|c| c.connector == name);
        // What the active version does not declare but another stored one
        // does belongs to that one (a rollback or a roll forward through
        // `activate`): a write while this one is active keeps what is
        // stored of it. Dropped, the first save (the console's form names
        // the active version's fields only) lost the other version's
        // settings and sealed secrets, and activated it waited for them:
        // an emergency's rollback answered 200 and stopped the connector.
        // Refused, a write that left `secrets` out, or sent back what GET
        // shows, was a 422. Given, another version's name is taken: its
        // settings can be given before it is activated, a rollback's
        // ahead of an emergency (a setting renamed since is as it was
        // last given, and can be given again while the newer runs).
        let active_version = entry
            .active
            .as_ref()
            .map(|a| a.meta.version.clone())
            .unwrap_or_default();
        let other_versions: Vec<VersionMeta> = self
            .inner
            .store
            .connector_versions(name)
            .await?
            .into_iter()
            .filter(|v| v.version != active_version)
            .collect();
        let declared_elsewhere = |field: &str| {
            let (kind, key) = field.split_once('.').unwrap_or(("settings", field));
            other_versions
                .iter()
                .any(|v| declares(&v.manifest, kind, key))
        };
        let mut settings = new.settings;
        let mut carried: Vec<String> = Vec::new();
        if let Some(previous) = &previous {
            for (key, value) in &previous.settings {
                let field = format!("settings.{key}");
                if !manifest.settings.iter().any(|s| &s.name == key)
                    && !settings.contains_key(key)
                    && declared_elsewhere(&field)
                {
                    settings.insert(key.clone(), value.clone());
                    carried.push(field);
                }
            }
        }
        if let Some(secrets) = &mut secrets {
            for (key, value) in &entry.effective.config.secrets {
                let field = format!("secrets.{key}");
                if !manifest.secrets.iter().any(|s| &s.name == key)
                    && !secrets.contains_key(key)
                    && declared_elsewhere(&field)
                {
                    secrets.insert(key.clone(), value.clone());
                    carried.push(field);
                }
            }
        }
        let secret_names: Vec<String> = match (&secrets, &previous) {
            (Some(secrets), _) => secrets.keys().cloned().collect(),
            (None, Some(previous)) => {
                carried.extend(
                    previous
                        .secret_names
                        .iter()
                        .filter(|k| !manifest.secrets.iter().any(|s| &s.name == *k))
                        .map(|k| format!("secrets.{k}")),
                );
                previous.secret_names.clone()
            }
            (None, None) => Vec::new(),
        };
        // Kept as it is: checked as switched on where any replica has it
        // so (its settings may be another replica's environment's, which
        // the stored configuration will replace), unless paused here.
        let enabled = new.enabled.unwrap_or(match entry.effective.switch {
            Switch::Enabled => true,
            Switch::Disabled => false,
            Switch::Unconfigured => entry.switched_on,
        });
        let problems: Vec<SettingsProblem> =
            config::check_against_manifest(manifest, settings.keys(), secret_names.iter(), enabled)
                .into_iter()
                .filter(|p| {
                    let another_versions =
                        given_names.contains(&p.field) && declared_elsewhere(&p.field);
                    !carried.contains(&p.field) && !another_versions
                })
                .collect();
        if !problems.is_empty() {
            return Err(RegistryError::Settings(problems));
        }
        // The active version's host settings, and those another stored
        // version names that this write gives (a rollback's prepared
        // value): accepted unchecked, the activation that followed left
        // the connector waiting, its pushes held and its webhooks 503.
        let another_versions_host = |name: &str| {
            given_names.contains(&format!("settings.{name}"))
                && other_versions.iter().any(|v| {
                    v.manifest["host_settings"]
                        .as_array()
                        .is_some_and(|names| names.iter().any(|n| n == name))
                })
        };
        let unreachable: Vec<SettingsProblem> = settings
            .iter()
            .filter(|(name, _)| {
                manifest.host_settings.contains(name) || another_versions_host(name)
            })
            .filter_map(|(name, value)| {
                let why = self.inner.runtime.host_setting_problem(value)?;
                Some(SettingsProblem::new(format!("settings.{name}"), why))
            })
            .collect();
        if !unreachable.is_empty() {
            return Err(RegistryError::Settings(unreachable));
        }
        let sealed_secrets = match &secrets {
            Some(secrets) if secrets.is_empty() => None,
            Some(secrets) => Some(
                self.secret_box()
                    .ok_or(RegistryError::MasterKeyRequired)?
                    .seal(name, secrets),
            ),
            // Kept as stored; a blob sealed before blobs named their
            // connector is sealed again, bound, on the way.
            None => previous
                .and_then(|p| p.sealed_secrets)
                .map(|sealed| match self.secret_box() {
                    Some(secret_box) if secrets::is_unbound(&sealed) => secret_box
                        .open(name, &sealed)
                        .map_or(sealed, |opened| secret_box.seal(name, &opened)),
                    _ => sealed,
                }),
        };
        let written = self
            .inner
            .store
            .put_connector_config(
                &StoredConnectorConfig {
                    connector: name.to_owned(),
                    settings,
                    sealed_secrets,
                    secret_names,
                    updated_at: chrono::Utc::now(),
                },
                // As for `disable`: one never switched on stays so.
                new.enabled.filter(|&on| on || entry.takes_changes()),
                Some(entry.revision),
            )
            .await?;
        if written.is_none() {
            return Ok(false);
        }
        tracing::info!(connector = name, enabled, "connector configured");
        // Released once this replica's view has the new settings, so a
        // released push finds them (else they wait for their recheck).
        if self.refresh_after_commit("settings").await && enabled {
            self.release_waiting(vec![name.to_owned()]);
        }
        Ok(true)
    }

    /// Deletes `name`: its versions and stored settings. Refused while
    /// customers are linked to its records or changes wait for it (a
    /// push to make, an inbound event to apply), unless `force`; the links
    /// are kept either way, for audit. With `expected` (`If-Match`), only
    /// over that revision.
    pub async fn delete(
        &self,
        name: &str,
        force: bool,
        expected: Option<i64>,
    ) -> Result<(), RegistryError> {
        self.current_entry(name).await?.fresh(expected)?;
        let linked = self.inner.store.connector_in_use(name).await?;
        if linked > 0 && !force {
            return Err(RegistryError::Linked(linked));
        }
        if !self.inner.store.delete_connector(name, expected).await? {
            return Err(self.missed(name, expected, RegistryError::NotFound).await);
        }
        tracing::info!(connector = name, linked, "connector deleted");
        self.refresh_after_commit("deletion").await;
        Ok(())
    }
}

fn active_manifest(entry: &Entry) -> Result<&Manifest, RegistryError> {
    entry
        .active
        .as_ref()
        .map(|a| a.connector.manifest())
        .ok_or_else(|| {
            RegistryError::NotLoaded(
                entry
                    .problem
                    .clone()
                    .unwrap_or_else(|| "no version is active".to_owned()),
            )
        })
}

/// A manifest as stored and shown: its JSON form.
/// Fills the secrets given as `None` with the values in effect for `entry`
/// (stored or from the environment).
fn keep_secrets_in_effect(
    entry: &Entry,
    given: BTreeMap<String, Option<SecretString>>,
) -> Result<BTreeMap<String, SecretString>, RegistryError> {
    let in_effect = &entry.effective.config.secrets;
    let mut problems = Vec::new();
    let mut secrets = BTreeMap::new();
    for (name, value) in given {
        // Given, without the white space around it (a pasted value's
        // newline, a CRLF file's `\r`): kept, every webhook's signature
        // failed against it, or its header was refused on every push.
        let value = value.map(|v| trimmed_secret(&v));
        match value.or_else(|| in_effect.get(&name).cloned()) {
            Some(value) => {
                secrets.insert(name, value);
            }
            None => problems.push(SettingsProblem::new(
                format!("secrets.{name}"),
                "has no value in effect to keep",
            )),
        }
    }
    if problems.is_empty() {
        Ok(secrets)
    } else {
        Err(RegistryError::Settings(problems))
    }
}

/// `secret` without the white space around it: no API key, token or
/// signing secret has any, and a value pasted or read from a CRLF file
/// often does.
pub(crate) fn trimmed_secret(secret: &SecretString) -> SecretString {
    let value = secret.expose_secret();
    let trimmed = value.trim();
    if trimmed.len() == value.len() {
        secret.clone()
    } else {
        SecretString::from(trimmed.to_owned())
    }
}

/// What a stored manifest says its version serves.
#[derive(Debug, Clone, Default)]
struct Serves {
    /// The entity types it syncs.
    entities: Vec<String>,
    /// Whether it takes webhooks.
    webhooks: bool,
}

impl Serves {
    fn of(manifest: &serde_json::Value) -> Self {
        Self {
            entities: manifest["entities"]
                .as_array()
                .map(|entities| {
                    entities
                        .iter()
                        .filter_map(|e| e.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            webhooks: manifest["webhooks"].as_bool().unwrap_or(false),
        }
    }
}

/// Whether `loaded`, the manifest a component gave when loaded again, is
/// the one stored with its bytes (what the upload showed, and what the
/// operator saw): every field stored holds the same value (a field a later
/// ferry adds is not compared). A guest whose manifest changes by itself
/// would otherwise reach hosts, and name secrets, nobody was shown.
fn same_manifest(loaded: &Manifest, stored: &serde_json::Value) -> Result<(), String> {
    let loaded = manifest_json(loaded);
    let Some(stored) = stored.as_object() else {
        return Ok(());
    };
    let differ: Vec<&str> = stored
        .iter()
        .filter(|(field, value)| loaded.get(field.as_str()) != Some(*value))
        .map(|(field, _)| field.as_str())
        .collect();
    match differ.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "its manifest is not the one stored with it ({} differ)",
            differ.join(", ")
        )),
    }
}

/// How the file or environment names `kind.key` of connector `name`:
/// `FERRY_CONNECTORS__NAME__KIND__KEY (connectors.name.kind.key)`.
fn environment_name(name: &str, kind: &str, key: &str) -> String {
    format!(
        "FERRY_CONNECTORS__{}__{}__{} ({})",
        name.to_ascii_uppercase().replace('-', "_"),
        kind.to_ascii_uppercase(),
        key.to_ascii_uppercase(),
        format_args!("connectors.{name}.{kind}.{key}")
    )
}

/// Whether a stored manifest (as [`manifest_json`] wrote it) declares the
/// setting or secret `key` (`kind` is `settings` or `secrets`).
fn declares(manifest: &serde_json::Value, kind: &str, key: &str) -> bool {
    manifest[kind]
        .as_array()
        .is_some_and(|specs| specs.iter().any(|spec| spec["name"] == key))
}

fn manifest_json(manifest: &Manifest) -> serde_json::Value {
    serde_json::to_value(manifest).unwrap_or(serde_json::Value::Null)
}
