//! The store: ferry's durable state (customers, the outbox, idempotency keys)
//! on SQLite (embedded mode) or PostgreSQL (cluster mode).
//!
//! One [`Store`] enum dispatches to the pool of the configured backend. Each
//! query is written once and compiled for both backends by [`dispatch!`]: the
//! SQL is portable (`$n` placeholders work in both), and the few columns whose
//! types differ (JSON, timestamps) round-trip through the same Rust types. We
//! chose this over `sqlx::Any` because `Any` cannot carry JSON, timestamps or
//! blobs the way we need, and over generic functions because their trait
//! bounds are longer than the queries.
//!
//! SQLite runs with one writer connection and a pool of readers: SQLite
//! admits one writer at a time anyway, and queueing writers in-process avoids
//! `SQLITE_BUSY` on lock upgrades. `synchronous=FULL` makes every commit
//! durable before the API answers (WAL with NORMAL can lose the last commits
//! on power loss, which would contradict "nothing is lost").
//!
//! # Plans kept from an empty table
//!
//! sqlx prepares each statement once per connection, and PostgreSQL then
//! keeps a generic plan, made with the statistics of the moment, until the
//! table is next analysed. On a new database those say "empty", and the
//! plan kept is a sequential scan, which stays one while the table grows:
//! under the side-by-side load the relay's read of the queue scanned the
//! whole outbox on every round, and the apply's batch reads scanned every
//! customer and link (`auto_explain`, docs/performance.md, round 9). The
//! batch reads that look rows up by key (the relay's read, a claimed batch's
//! customers and links) are therefore planned for each call on PostgreSQL
//! (`persistent(false)`), with the table as it is. The inbox claim keeps its
//! plan: planned with its actual parameters it read every due row. What
//! cures the cause, statistics that say "empty" while the table fills, is
//! [`statistics`]: it analyses a table that outgrew them, and the plans
//! kept are then made again.

pub mod clock;
pub mod conflicts;
pub mod connector_configs;
pub mod connectors;
pub mod customers;
pub mod dead_letters;
pub mod deliveries;
pub mod health;
pub mod idempotency;
mod inbound_batch;
pub mod inbox;
pub mod links;
pub mod outbox;
pub mod reconciliations;
mod sign_outs;
pub mod statistics;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use customers::{Address, Customer, CustomerFields, CustomerId, CustomerPage, ListCustomers};
pub use dead_letters::{DeadLetter, DeadLetterKind, ListDeadLetters};
pub use deliveries::Delivery;
pub use idempotency::{ClaimOutcome, IdempotencyRecord, StoredResponse};
pub use links::{ChangeNotice, ClaimedLink, LinkKey, LinkState, RecordedOutcome, SyncLink};
pub use outbox::{OutboxEvent, OutboxKind};

/// Which database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Embedded mode: a local SQLite file.
    Sqlite,
    /// Cluster mode: a PostgreSQL server shared by every replica.
    Postgres,
}

impl StoreKind {
    /// The kind a database URL selects: `postgres://` / `postgresql://` or SQLite.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    /// `sqlite` or `postgres`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Connection tuning for [`Store::connect`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Maximum connections (PostgreSQL pool; SQLite readers).
    pub max_connections: u32,
    /// How long to wait for a connection or a SQLite lock before failing.
    pub acquire_timeout: Duration,
    /// PostgreSQL's `statement_timeout` on every pooled connection (zero:
    /// none).
    pub statement_timeout: Duration,
    /// PostgreSQL's `lock_timeout` on every pooled connection (zero: none).
    pub lock_timeout: Duration,
    /// Whether a bus (Kafka) publishes inbox events. Without one they are
    /// stored as handed over to no bus (`published_at_ms` =
    /// [`inbox::NO_BUS`]): the inbox loops apply them at once, whatever
    /// grace a replica with a bus keeps for the bus (an API-only replica
    /// left without the broker's address, beside workers with one), the
    /// `inbox_unpublished` index stays empty, and a broker configured
    /// later is not sent the history.
    pub inbox_bus: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
            lock_timeout: Duration::from_secs(10),
            inbox_bus: false,
        }
    }
}

/// Errors from the store. Business outcomes (not found, conflicts) are
/// variants so callers can map them without parsing database errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is neither `sqlite:` nor `postgres://`.
    #[error("unsupported database URL: use sqlite://PATH or postgres://...")]
    UnsupportedUrl,
    /// No live customer has this id.
    #[error("customer not found")]
    CustomerNotFound,
    /// Another live customer already has this email.
    #[error("email already belongs to another customer")]
    EmailTaken,
    /// The caller's expected version is not the current one.
    #[error("version mismatch: current version is {current}")]
    VersionMismatch {
        /// The customer's current version.
        current: i64,
    },
    /// The remote record is already linked to another customer.
    #[error("the remote record is already linked to another customer")]
    RemoteIdTaken,
    /// A new customer's id is taken. Ids are drawn at random for each
    /// create, so only the same create committed before can hold it: a
    /// commit that landed although its answer was lost.
    #[error("a customer with this id exists already")]
    CustomerIdExists,
    /// The write's idempotency key is no longer held by its request (it
    /// was released or taken over meanwhile): nothing was written.
    #[error("the idempotency key is no longer held by this request")]
    IdempotencyClaimLost,
    /// A migration failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// A stored JSON document could not be encoded or decoded.
    #[error("stored JSON is invalid")]
    Json(#[from] serde_json::Error),
    /// The database answers but takes no writes: a standby (after a
    /// failover that left ferry on the old primary's replica) or a
    /// database set read-only (`default_transaction_read_only`).
    #[error("the database takes no writes (a standby, or set read-only)")]
    ReadOnly,
}

/// The message PostgreSQL's `ferry_refuse` raises when a create's
/// idempotency key is no longer held by its request (the group create's
/// statement in customers.rs spells it out).
const IDEMPOTENCY_CLAIM_LOST: &str = "idempotency claim lost";

impl StoreError {
    /// Whether the store was too busy to answer in time, and the same
    /// request is worth sending again: no pooled connection came free, a
    /// lock was held past `lock_timeout` (PostgreSQL 55P03) or SQLite's
    /// busy timeout, a statement ran past `statement_timeout` (57014), or
    /// PostgreSQL rolled the transaction back as a deadlock's victim
    /// (40P01; two inbound groups reaching one customer through two
    /// connectors lock it in their events' order) or for serialization
    /// (40001). Nothing was written.
    pub fn is_busy(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::PoolTimedOut) => true,
            Self::Database(sqlx::Error::Database(db)) => {
                match db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    // SQLITE_BUSY or SQLITE_LOCKED, extended codes included.
                    Some(sqlite) => sqlx::error::DatabaseError::code(sqlite)
                        .and_then(|code| code.parse::<i32>().ok())
                        .is_some_and(|code| matches!(code & 0xff, 5 | 6)),
                    None => matches!(
                        db.code().as_deref(),
                        Some("55P03" | "57014" | "40P01" | "40001")
                    ),
                }
            }
            _ => false,
        }
    }

    /// Whether the connection to the database was lost, or none could be
    /// made: an I/O error on the socket, or PostgreSQL shutting down or
    /// starting (57P01-57P03), or a connection failure of class 08 (not
    /// 08P01, a protocol violation: a statement's binds not matching its
    /// placeholders, ferry's own bug, is no passing failure). A write
    /// under way may have landed or not.
    pub fn lost_connection(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Io(_)) => true,
            Self::Database(sqlx::Error::Database(db))
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_none() =>
            {
                matches!(
                    db.code().as_deref(),
                    Some(
                        "57P01"
                            | "57P02"
                            | "57P03"
                            | "08000"
                            | "08001"
                            | "08003"
                            | "08004"
                            | "08006"
                            | "08007"
                    )
                )
            }
            _ => false,
        }
    }

    /// Whether the store takes no writes: PostgreSQL in a read-only
    /// transaction (25006: a standby after a failover,
    /// `default_transaction_read_only`), SQLite's database read-only
    /// (SQLITE_READONLY) or its disk full (SQLITE_FULL), or the probe's
    /// [`Self::ReadOnly`]. Nothing was written; the same write may succeed
    /// once the store takes writes again.
    pub fn takes_no_writes(&self) -> bool {
        match self {
            Self::ReadOnly => true,
            Self::Database(sqlx::Error::Database(db)) => {
                match db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    Some(sqlite) => sqlx::error::DatabaseError::code(sqlite)
                        .and_then(|code| code.parse::<i32>().ok())
                        .is_some_and(|code| matches!(code & 0xff, 8 | 13)),
                    None => db.code().as_deref() == Some("25006"),
                }
            }
            _ => false,
        }
    }

    /// What a background write met that a later try may not: contention
    /// ([`Self::is_contended`]) or a store that takes no writes now
    /// ([`Self::takes_no_writes`]). A sync loop waits on it rather than
    /// spend an attempt: a failover's minutes dead-lettered healthy changes.
    pub fn passes(&self) -> bool {
        self.is_contended() || self.takes_no_writes()
    }

    /// [`Self::is_busy`] in a way that ends by itself: a deadlock's victim
    /// or a serialization failure (the other side went on), no pooled
    /// connection, SQLite's writer busy. Not a lock or statement timeout,
    /// which the same write may meet every time (a session left idle in a
    /// transaction holding the row, a statement too slow for its limit).
    pub fn is_contended(&self) -> bool {
        let timed_out = matches!(
            self,
            Self::Database(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("55P03" | "57014"))
        );
        self.is_busy() && !timed_out
    }

    /// Whether the whole store is busy, not one row: no connection came
    /// within the pool's timeout, or SQLite's one writer stayed locked past
    /// its busy timeout. (A PostgreSQL lock or statement timeout is one
    /// row's or one statement's.)
    pub fn is_store_busy(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::PoolTimedOut) => true,
            Self::Database(sqlx::Error::Database(db)) => db
                .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                .is_some_and(|_| self.is_busy()),
            _ => false,
        }
    }

    /// Maps a unique violation to [`StoreError::CustomerIdExists`] when it
    /// is the customers' key, and to [`StoreError::EmailTaken`] otherwise
    /// (the only other one a customer write can hit is the live-email
    /// index).
    fn from_customer_write(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db)
                if db.is_unique_violation()
                    && (db.constraint() == Some("customers_pkey")
                        || db.message().contains("customers.id")) =>
            {
                Self::CustomerIdExists
            }
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::EmailTaken,
            sqlx::Error::Database(db) if db.message().contains(IDEMPOTENCY_CLAIM_LOST) => {
                Self::IdempotencyClaimLost
            }
            _ => Self::Database(error),
        }
    }
}

/// SQLite pools: one writer, several readers (see the module docs).
#[derive(Debug, Clone)]
pub struct SqlitePools {
    writer: SqlitePool,
    reader: SqlitePool,
}

/// ferry's store on either backend, and the signals it raises after it
/// commits work for a background loop. Cheap to clone (pools and signals
/// are shared).
#[derive(Debug, Clone)]
pub struct Store {
    backend: Backend,
    commits: std::sync::Arc<Commits>,
    /// The queue that group-commits customer creates.
    creates: std::sync::Arc<crate::sync::group_commit::GroupCommit<customers::Creates>>,
    /// See [`StoreOptions::inbox_bus`].
    inbox_bus: bool,
    /// PostgreSQL: one connection of its own for [`Store::ping`], made when
    /// first asked for. On the shared pool, a pool busy under load (every
    /// connection taken for longer than the probe's 2 s) made every
    /// replica of the database unready at once, and a slow service an
    /// outage of the API and the webhooks.
    probe: Option<PgPool>,
}

/// The database behind a [`Store`].
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    /// Embedded mode.
    Sqlite(SqlitePools),
    /// Cluster mode.
    Postgres(PgPool),
}

/// Raised by the store once it has committed work for a background loop,
/// so that no caller (an API handler, the inbox loop, a reconciliation) has
/// to remember to wake it. Each is a `Notify`: a signal raised while nobody
/// waits is kept for the next wait.
#[derive(Debug, Default)]
pub struct Commits {
    /// Outbox rows were committed: the relay has events to move.
    pub outbox: tokio::sync::Notify,
    /// Inbox events were committed or scheduled again: the inbox loop has
    /// work.
    pub inbox: tokio::sync::Notify,
    /// Links were scheduled again (replays, repairs): the link workers
    /// have work.
    pub links: tokio::sync::Notify,
    /// A reconciliation run was started: the reconciler has work.
    pub runs: tokio::sync::Notify,
    /// New webhook events were stored: the Kafka relay has events to
    /// publish.
    pub inbox_stored: tokio::sync::Notify,
    /// When webhook events were last stored (unix ms): the inbox loops
    /// after the first hold back while the endpoint is busy.
    inbox_stored_at_ms: std::sync::atomic::AtomicI64,
}

/// Runs `$body` with `$pool` bound to the writer pool of whichever backend
/// `$store` is; the body is type-checked once per backend.
macro_rules! dispatch {
    ($store:expr, write $pool:ident => $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite(pools) => {
                let $pool = &pools.writer;
                $body
            }
            $crate::store::Backend::Postgres(pool) => {
                let $pool = pool;
                $body
            }
        }
    };
    ($store:expr, read $pool:ident => $body:expr) => {
        match &$store.backend {
            $crate::store::Backend::Sqlite(pools) => {
                let $pool = &pools.reader;
                $body
            }
            $crate::store::Backend::Postgres(pool) => {
                let $pool = pool;
                $body
            }
        }
    };
}
pub(crate) use dispatch;

/// Implements `as_str` (the name stored in a TEXT column) and
/// `TryFrom<String>` (reading it back: `#[sqlx(try_from = "String")]`) for
/// a fieldless enum, so a state is a type everywhere but in the SQL.
macro_rules! stored_names {
    ($name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $name {
            /// The stored name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                match text.as_str() {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(concat!("not a ", stringify!($name), ": {:?}"), other)),
                }
            }
        }
    };
}
pub(crate) use stored_names;

/// Holds a SQLite database for this process: an exclusive lock on
/// `PATH.lock` beside the file, kept until the returned file is dropped
/// (or the process ends, however it ends). The embedded mode's guarantees
/// (one writer, one relay, serialised claims) hold for one process per
/// file; a second one, such as a restart that overlaps the old process, is
/// refused at start instead of answering writes with `database is locked`.
/// `None` for PostgreSQL and in-memory databases.
pub fn lock_sqlite_file(url: &str) -> anyhow::Result<Option<std::fs::File>> {
    use anyhow::Context;

    if StoreKind::from_url(url)? != StoreKind::Sqlite {
        return Ok(None);
    }
    let options = SqliteConnectOptions::from_str(url)?;
    let path = options.get_filename();
    // sqlx names `sqlite::memory:` `file:sqlx-in-memory-N`; `mode=memory`
    // keeps the file name given. Neither touches the disk.
    let in_memory = path.to_string_lossy().starts_with("file:sqlx-in-memory-")
        || url
            .split_once('?')
            .is_some_and(|(_, query)| query.split('&').any(|p| p == "mode=memory"));
    if path.as_os_str().is_empty() || in_memory {
        return Ok(None);
    }
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = std::path::PathBuf::from(lock_path);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another ferry process is serving {} (it holds {}): one process per SQLite file; \
             run several replicas on PostgreSQL",
            path.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("locking {}", lock_path.display()))
        }
    }
}

/// Milliseconds since the Unix epoch, by the database's clock on
/// PostgreSQL (leases and due times are compared across replicas:
/// [`clock`]).
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + clock::offset_ms()
}

/// A new id: `prefix` and a UUIDv7 (hex) dated [`now_ms`], the database's
/// clock as this process follows it. Lists page by id (`starting_after`):
/// dated by a replica's own clock, running 30 s slow, its customers landed
/// 30 s behind cursors already handed out, and a client paging through
/// never saw them. Within one process ids still only grow.
pub(crate) fn new_id(prefix: &str) -> String {
    static CONTEXT: std::sync::Mutex<uuid::ContextV7> =
        std::sync::Mutex::new(uuid::ContextV7::new());
    id_at(&CONTEXT, prefix, now_ms())
}

fn id_at(context: &std::sync::Mutex<uuid::ContextV7>, prefix: &str, ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    let context = context
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let nanos = u32::try_from(ms % 1_000 * 1_000_000).unwrap_or(0);
    let at = uuid::Timestamp::from_unix(&*context, ms / 1_000, nanos);
    format!("{prefix}{}", uuid::Uuid::new_v7(at).simple())
}

/// Longest error text stored on a link, a delivery, a dead letter or an
/// inbox event, in bytes: a remote's error body can be arbitrarily large.
pub const MAX_ERROR_BYTES: usize = 4096;

/// `text` cut to [`MAX_ERROR_BYTES`] at a character boundary, any NUL in
/// it replaced (PostgreSQL refuses NUL in text, and the write recording
/// the error would fail: see `ferry_runtime`'s errors, cleaned likewise).
pub(crate) fn capped(text: &str) -> std::borrow::Cow<'_, str> {
    let mut cut = text.len().min(MAX_ERROR_BYTES);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let text = &text[..cut];
    if text.contains('\0') {
        std::borrow::Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

/// What SQLite's WAL file is cut back to once a checkpoint has emptied it.
pub const SQLITE_WAL_LIMIT_BYTES: u64 = 64 * 1024 * 1024;

impl Store {
    /// Connects to the database `url` names, creating a SQLite file if missing.
    #[tracing::instrument(skip_all, fields(kind))]
    pub async fn connect(url: &str, options: &StoreOptions) -> Result<Self, StoreError> {
        let kind = StoreKind::from_url(url)?;
        tracing::Span::current().record("kind", kind.as_str());
        match kind {
            StoreKind::Sqlite => {
                let connect = SqliteConnectOptions::from_str(url)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // Once a checkpoint has emptied the WAL, it is cut back
                    // to this size: after a burst (an import, a backfill)
                    // it kept its peak size on disk for good.
                    .pragma("journal_size_limit", SQLITE_WAL_LIMIT_BYTES.to_string())
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(options.acquire_timeout);
                let writer = SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect.clone())
                    .await?;
                let reader = SqlitePoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect.read_only(true))
                    .await?;
                Ok(Self::new(
                    Backend::Sqlite(SqlitePools { writer, reader }),
                    options,
                ))
            }
            StoreKind::Postgres => {
                // Set at connection start (the startup packet): a statement
                // that hangs on a lock another session holds, or runs away,
                // fails and is retried instead of holding a pooled
                // connection, and the work behind it, for good.
                // Zero sets none: the server's, or the URL's `options`, apply.
                let timeouts = [
                    ("statement_timeout", options.statement_timeout),
                    ("lock_timeout", options.lock_timeout),
                ]
                .into_iter()
                .filter(|(_, limit)| !limit.is_zero())
                .map(|(name, limit)| (name, limit.as_millis().max(1).to_string()));
                let connect = PgConnectOptions::from_str(url)?.options(timeouts);
                let probe = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(options.acquire_timeout)
                    .idle_timeout(Duration::from_secs(300))
                    .max_lifetime(Duration::from_secs(1800))
                    .connect_lazy_with(connect.clone());
                let pool = PgPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    // No ping before every acquire: it doubles the round
                    // trips of a create. A connection that died while idle
                    // fails one query; idle and lifetime limits recycle them.
                    .test_before_acquire(false)
                    .idle_timeout(Duration::from_secs(300))
                    .max_lifetime(Duration::from_secs(1800))
                    .connect_with(connect)
                    .await?;
                let mut store = Self::new(Backend::Postgres(pool), options);
                store.probe = Some(probe);
                Ok(store)
            }
        }
    }

    fn new(backend: Backend, options: &StoreOptions) -> Self {
        Self {
            creates: std::sync::Arc::new(customers::Creates::start(backend.clone())),
            backend,
            commits: std::sync::Arc::default(),
            inbox_bus: options.inbox_bus,
            probe: None,
        }
    }

    /// Which backend this store runs on.
    pub fn kind(&self) -> StoreKind {
        match self.backend {
            Backend::Sqlite(_) => StoreKind::Sqlite,
            Backend::Postgres(_) => StoreKind::Postgres,
        }
    }

    /// The signals raised after commits (the loops wait on them).
    pub fn commits(&self) -> &std::sync::Arc<Commits> {
        &self.commits
    }

    /// Outbox rows were committed.
    pub(crate) fn committed_outbox(&self) {
        self.commits.outbox.notify_one();
    }

    /// Inbox events were committed or scheduled again.
    pub(crate) fn committed_inbox(&self) {
        self.commits.inbox.notify_one();
    }

    /// New webhook events were stored: the endpoint is busy.
    pub(crate) fn stored_inbox(&self) {
        self.commits
            .inbox_stored_at_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.commits.inbox_stored.notify_one();
    }

    /// When webhook events were last stored in this process (unix ms; 0
    /// if never).
    pub fn inbox_stored_at_ms(&self) -> i64 {
        self.commits
            .inbox_stored_at_ms
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Links were scheduled again.
    pub(crate) fn committed_links(&self) {
        self.commits.links.notify_one();
    }

    /// Applies the backend's migrations (embedded in the binary).
    #[tracing::instrument(skip_all)]
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pools) => {
                sqlx::migrate!("../migrations/sqlite")
                    .run(&pools.writer)
                    .await?
            }
            Backend::Postgres(pool) => {
                // Without the pool's timeouts: a migration may rewrite a
                // large table, and waits for another replica's migration
                // (sqlx's advisory lock). The connection leaves the pool
                // and is closed after, never returned with them off.
                let mut conn = pool.acquire().await?.detach();
                sqlx::query("SET statement_timeout = 0")
                    .execute(&mut conn)
                    .await?;
                sqlx::query("SET lock_timeout = 0")
                    .execute(&mut conn)
                    .await?;
                // A migration's lock on a table another session holds (a
                // dump, a transaction left open) is asked for with a short
                // `lock_timeout` of its own (`SET LOCAL` in the migration)
                // and asked again after a pause: waiting without limit, it
                // queued every other replica's reads and writes of the
                // table behind it, and each failed at its own timeout.
                let mut pause = std::time::Duration::from_secs(1);
                let ran = loop {
                    let ran = sqlx::migrate!("../migrations/postgres")
                        .run(&mut conn)
                        .await;
                    match &ran {
                        Err(
                            sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db))
                            | sqlx::migrate::MigrateError::ExecuteMigration(
                                sqlx::Error::Database(db),
                                _,
                            ),
                            // A deadlock too: a migration that builds an index and
                            // then drops another waits for a running replica's
                            // transaction that waits for the build.
                        ) if matches!(db.code().as_deref(), Some("55P03" | "40P01")) => {
                            tracing::warn!(
                                wait_s = pause.as_secs(),
                                "a migration waits for a table another session holds (a dump, an open transaction)"
                            );
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(std::time::Duration::from_secs(10));
                        }
                        _ => break ran,
                    }
                };
                // Closed whatever the migrations did: it is not the pool's.
                let _ = sqlx::Connection::close(conn).await;
                ran?
            }
        }
        Ok(())
    }

    /// Checks that the database answers, and on PostgreSQL that it takes
    /// writes (for `/readyz`): a replica that can read but not write would
    /// otherwise stay in the load balancer, answering every write 5xx. On
    /// PostgreSQL through a connection of its own, not the busy pool's.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(pools) => {
                sqlx::query("SELECT 1").execute(&pools.reader).await?;
            }
            Backend::Postgres(pool) => {
                let pool = self.probe.as_ref().unwrap_or(pool);
                // `on` on a hot standby as well as under the setting.
                let read_only: String =
                    sqlx::query_scalar("SELECT current_setting('transaction_read_only')")
                        .fetch_one(pool)
                        .await?;
                if read_only == "on" {
                    return Err(StoreError::ReadOnly);
                }
            }
        }
        Ok(())
    }

    /// Closes every pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        if let Some(probe) = &self.probe {
            probe.close().await;
        }
        match &self.backend {
            Backend::Sqlite(pools) => {
                // The readers first: the last connection to close moves
                // the WAL into the database file, and a read-only one
                // cannot. Closed last, a reader left every commit since the
                // last checkpoint in `ferry.db-wal` only, and a copy of
                // `ferry.db` alone (a backup, a move) lost them.
                pools.reader.close().await;
                if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&pools.writer)
                    .await
                {
                    tracing::warn!(%error, "checkpointing the SQLite WAL at shutdown failed");
                }
                pools.writer.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }
}

/// Timestamps are kept at microsecond precision: PostgreSQL stores no more,
/// and both backends must return the same values. By the database's clock
/// on PostgreSQL, as [`now_ms`]: due times written from one are compared
/// with the other, and with other replicas' ([`clock`]).
pub(crate) fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::{DurationRound, TimeDelta};
    let now = chrono::Utc::now() + TimeDelta::milliseconds(clock::offset_ms());
    now.duration_trunc(TimeDelta::microseconds(1))
        .unwrap_or(now)
}

/// `$first, $first+1, ...`: `n` numbered placeholders.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub use crate::runtime::{unkeyable, unstorable};

/// Replaces NUL characters in a record's strings (and keys) with U+FFFD:
/// PostgreSQL cannot store them, and a record a connector returns must be
/// stored to be applied, compared or dead-lettered with its reason like any
/// other (the catalog's validation then refuses control characters where
/// the API does).
pub fn replace_nul(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) if text.contains('\0') => {
            *text = text.replace('\0', "\u{fffd}");
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(replace_nul),
        serde_json::Value::Object(map) if map.keys().any(|k| k.contains('\0')) => {
            let entries = std::mem::take(map);
            for (key, mut item) in entries {
                replace_nul(&mut item);
                map.insert(key.replace('\0', "\u{fffd}"), item);
            }
        }
        serde_json::Value::Object(map) => map.values_mut().for_each(replace_nul),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id carries the time it is given (the database's clock, by
    /// [`new_id`]), not this machine's, and ids made in one millisecond
    /// still grow.
    #[test]
    fn ids_are_dated_by_the_clock_they_are_given() {
        let an_hour_ahead = chrono::Utc::now().timestamp_millis() + 3_600_000;
        // A context of its own: the process's would keep the hour ahead
        // for every later id of this test binary.
        let context = std::sync::Mutex::new(uuid::ContextV7::new());
        let ids: Vec<String> = (0..100)
            .map(|_| id_at(&context, "cus_", an_hour_ahead))
            .collect();
        for id in &ids {
            let uuid = uuid::Uuid::parse_str(id.strip_prefix("cus_").unwrap()).unwrap();
            let (seconds, nanos) = uuid.get_timestamp().unwrap().to_unix();
            let ms = i64::try_from(seconds).unwrap() * 1_000 + i64::from(nanos / 1_000_000);
            assert_eq!(ms, an_hour_ahead, "{id}");
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    /// A database keeps the checksum of every migration it applied, and
    /// refuses to start once a migration's text differs ("previously
    /// applied but has been modified"), comments included. Rounds 37–43
    /// edited four committed migrations, which stopped every database
    /// made before. `migrations/checksums.txt` holds what each committed
    /// migration must stay: a change goes in a new migration, whose line
    /// is added there.
    #[test]
    fn committed_migrations_are_never_edited() {
        let frozen = include_str!("../../../migrations/checksums.txt");
        let frozen: std::collections::BTreeMap<(&str, i64), &str> = frozen
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split_whitespace();
                let (backend, version, sum) = (parts.next(), parts.next(), parts.next());
                let version = version.and_then(|v| v.parse().ok());
                match (backend, version, sum) {
                    (Some(b), Some(v), Some(s)) => ((b, v), s),
                    _ => panic!("migrations/checksums.txt: not `backend version sha384`: {l}"),
                }
            })
            .collect();
        let mut seen = 0;
        for (backend, migrator) in [
            ("sqlite", sqlx::migrate!("../migrations/sqlite")),
            ("postgres", sqlx::migrate!("../migrations/postgres")),
        ] {
            for migration in migrator.iter() {
                let sum = hex::encode(&migration.checksum);
                let line = format!("{backend} {} {sum}", migration.version);
                match frozen.get(&(backend, migration.version)) {
                    Some(want) => assert_eq!(
                        *want, sum,
                        "{backend} migration {} ({}) was edited after it was committed: \
                         databases that applied it refuse to start. Put the change in a new \
                         migration, and restore this one.",
                        migration.version, migration.description
                    ),
                    None => panic!(
                        "{backend} migration {} is not in migrations/checksums.txt: once it is \
                         committed, add `{line}` there",
                        migration.version
                    ),
                }
                seen += 1;
            }
        }
        assert_eq!(
            seen,
            frozen.len(),
            "checksums.txt names a migration that is gone"
        );
    }

    /// An in-memory database left a `file:sqlx-in-memory-0.lock` in the
    /// working directory, and refused a second in-memory ferry started
    /// there, though the two share nothing.
    #[test]
    fn in_memory_databases_take_no_lock() {
        for url in ["sqlite::memory:", "sqlite://ferry.db?mode=memory"] {
            assert!(lock_sqlite_file(url).unwrap().is_none(), "{url}");
        }
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let held = lock_sqlite_file(&url).unwrap();
        assert!(held.is_some());
        assert!(lock_sqlite_file(&url).is_err(), "one process per file");
        assert!(lock_sqlite_file("postgres://ferry@localhost/ferry")
            .unwrap()
            .is_none());
    }

    /// Every SQLite connection cuts the WAL back to its limit after a
    /// checkpoint (SQLite's default keeps it at its peak size).
    #[tokio::test]
    async fn every_connection_limits_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        let Backend::Sqlite(pools) = &store.backend else {
            unreachable!()
        };
        for pool in [&pools.writer, &pools.reader] {
            let limit: i64 = sqlx::query_scalar("PRAGMA journal_size_limit")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(limit as u64, SQLITE_WAL_LIMIT_BYTES);
        }
    }

    /// A migrated in-memory SQLite store.
    async fn migrated_in_memory() -> Store {
        let store = Store::connect("sqlite::memory:", &StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// A page of customers after a cursor seeks the id index: with
    /// `(? IS NULL OR id > ?)` SQLite scanned it from the start on every
    /// page, and reading the catalogue page by page grew with its square.
    #[tokio::test]
    async fn a_page_after_a_cursor_seeks_the_index() {
        let store = migrated_in_memory().await;
        let Backend::Sqlite(pools) = &store.backend else {
            unreachable!()
        };
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!(
            "EXPLAIN QUERY PLAN {}",
            customers::LIST_CUSTOMERS_SQL
        ))
        .bind("cus_0123")
        .bind(None::<String>)
        .bind(10_i64)
        .fetch_all(&pools.writer)
        .await
        .unwrap();
        let plan: Vec<&str> = plan
            .iter()
            .map(|(_, _, _, detail)| detail.as_str())
            .collect();
        assert!(
            plan.iter()
                .any(|d| d.starts_with("SEARCH") && d.contains("id>")),
            "{plan:?}"
        );
        // The links' listing likewise.
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&format!(
            "EXPLAIN QUERY PLAN {}",
            health::list_links_sql(false)
        ))
        .bind(None::<String>)
        .bind(None::<String>)
        .bind("cus_0123")
        .bind("stripe")
        .bind(10_i64)
        .fetch_all(&pools.writer)
        .await
        .unwrap();
        let plan: Vec<&str> = plan.iter().map(|(_, _, _, d)| d.as_str()).collect();
        assert!(plan.iter().any(|d| d.starts_with("SEARCH")), "{plan:?}");
    }

    /// The dead inbox events and dead links are listed from their own
    /// indexes: without them a listing read every event or link in its
    /// order to find the few that died.
    #[tokio::test]
    async fn dead_listings_read_their_indexes() {
        let (inbox, links) = (health::list_inbox_sql(true), health::list_links_sql(true));
        let store = migrated_in_memory().await;
        let Backend::Sqlite(pools) = &store.backend else {
            unreachable!()
        };
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {inbox}"))
                .bind(None::<String>)
                .bind("dead")
                .bind(0_i64)
                .bind(10_i64)
                .fetch_all(&pools.writer)
                .await
                .unwrap();
        assert!(
            plan.iter().any(|(_, _, _, d)| d.contains("inbox_dead")),
            "{plan:?}"
        );
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {links}"))
                .bind(None::<String>)
                .bind("dead")
                .bind(None::<String>)
                .bind("")
                .bind(10_i64)
                .fetch_all(&pools.writer)
                .await
                .unwrap();
        assert!(
            plan.iter()
                .any(|(_, _, _, d)| d.contains("sync_links_dead")),
            "{plan:?}"
        );

        // PostgreSQL plans each listing with its filters' values (an
        // unnamed statement), which leaves `state = 'dead'` to match the
        // index. Sequential scans are off: these tables are empty.
        let cluster = ferry_test_support::postgres::PgCluster::shared();
        let url = cluster.create_database().await.unwrap();
        let store = Store::connect(&url, &StoreOptions::default())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let Backend::Postgres(pool) = &store.backend else {
            unreachable!()
        };
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await
            .unwrap();
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {inbox}"))
            .bind(None::<String>)
            .bind("dead")
            .bind(0_i64)
            .bind(10_i64)
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(plan.to_string().contains("inbox_dead"), "{plan}");
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {links}"))
            .bind(None::<String>)
            .bind("dead")
            .bind(None::<String>)
            .bind("")
            .bind(10_i64)
            .persistent(false)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert!(plan.to_string().contains("sync_links_dead"), "{plan}");
    }
}
