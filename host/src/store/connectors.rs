//! The connector registry's durable half: each connector's versions (the
//! component bytes, their sha256 and manifest), which version is active and
//! who chose it, whether the connector is enabled, and a revision that every
//! change bumps so other replicas notice (see `crate::registry`).

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use super::{dispatch, now, Store, StoreError};

/// Where a stored version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionSource {
    /// A component bundled with ferry, seeded at start.
    Bundled,
    /// Uploaded through the API.
    Upload,
}

impl VersionSource {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bundled => "bundled",
            Self::Upload => "upload",
        }
    }

    fn parse(value: &str) -> Self {
        match value {
            "bundled" => Self::Bundled,
            _ => Self::Upload,
        }
    }
}

/// Who chose a connector's active version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivatedBy {
    /// ferry's start-up seeding of its bundled connectors; a newer bundle
    /// replaces it.
    Bundle,
    /// An operator, through the API (an upload or an activation); the
    /// bundle never overrides it.
    Api,
}

impl ActivatedBy {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bundle => "bundle",
            Self::Api => "api",
        }
    }

    fn parse(value: &str) -> Self {
        match value {
            "api" => Self::Api,
            _ => Self::Bundle,
        }
    }
}

/// One `connectors` row.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectorRow {
    /// The manifest name.
    pub name: String,
    /// The version calls run on, if any.
    pub active_version: Option<String>,
    /// Who chose it.
    pub activated_by: ActivatedBy,
    /// The operator's switch; `None` follows the file or environment.
    pub enabled: Option<bool>,
    /// Some replica has had it switched on (by the API or by its own file
    /// or environment) since it was uploaded: every replica queues changes
    /// for it.
    pub switched_on: bool,
    /// Deleted: not loaded, not seeded again from the bundle.
    pub deleted_at: Option<DateTime<Utc>>,
    /// Bumped by every change to this connector (versions, activation,
    /// enablement, settings).
    pub revision: i64,
}

#[derive(sqlx::FromRow)]
struct ConnectorDbRow {
    name: String,
    active_version: Option<String>,
    activated_by: String,
    enabled: Option<bool>,
    switched_on: bool,
    deleted_at: Option<DateTime<Utc>>,
    revision: i64,
}

impl From<ConnectorDbRow> for ConnectorRow {
    fn from(row: ConnectorDbRow) -> Self {
        Self {
            name: row.name,
            active_version: row.active_version,
            activated_by: ActivatedBy::parse(&row.activated_by),
            enabled: row.enabled,
            switched_on: row.switched_on,
            deleted_at: row.deleted_at,
            revision: row.revision,
        }
    }
}

/// Links a connector's enable releases per statement.
pub const RESUME_BATCH: i64 = 1000;

const CONNECTOR_COLUMNS: &str =
    "name, active_version, activated_by, enabled, switched_on, deleted_at, revision";

/// A stored version, without its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionMeta {
    /// The connector's name.
    pub name: String,
    /// The manifest's semantic version.
    pub version: String,
    /// Hex sha256 of the component bytes.
    pub sha256: String,
    /// The `ferry:connector` world version it targets.
    pub world: String,
    /// The manifest, as the API shows it.
    pub manifest: serde_json::Value,
    /// Size of the component.
    pub size_bytes: i64,
    /// Bundled or uploaded.
    pub source: VersionSource,
    /// `admin`, `open`, or the bundled file's path.
    pub uploaded_by: String,
    /// When it was stored.
    pub uploaded_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct VersionDbRow {
    name: String,
    version: String,
    sha256: String,
    world: String,
    manifest: Json<serde_json::Value>,
    size_bytes: i64,
    source: String,
    uploaded_by: String,
    uploaded_at: DateTime<Utc>,
}

impl From<VersionDbRow> for VersionMeta {
    fn from(row: VersionDbRow) -> Self {
        Self {
            name: row.name,
            version: row.version,
            sha256: row.sha256,
            world: row.world,
            manifest: row.manifest.0,
            size_bytes: row.size_bytes,
            source: VersionSource::parse(&row.source),
            uploaded_by: row.uploaded_by,
            uploaded_at: row.uploaded_at,
        }
    }
}

const VERSION_COLUMNS: &str =
    "name, version, sha256, world, manifest, size_bytes, source, uploaded_by, uploaded_at";

/// A version to store.
#[derive(Debug, Clone, Copy)]
pub struct NewVersion<'a> {
    /// The manifest name.
    pub name: &'a str,
    /// The manifest version.
    pub version: &'a str,
    /// Hex sha256 of `component`.
    pub sha256: &'a str,
    /// The world version it targets.
    pub world: &'a str,
    /// The manifest.
    pub manifest: &'a serde_json::Value,
    /// The component bytes.
    pub component: &'a [u8],
    /// Bundled or uploaded.
    pub source: VersionSource,
    /// Who stored it.
    pub uploaded_by: &'a str,
}

/// What [`Store::add_connector_version`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum AddedVersion {
    /// Stored (and activated, if asked).
    Added(VersionMeta),
    /// These exact bytes are stored already: nothing changed.
    Exists(VersionMeta),
    /// The connector has this version with other bytes: nothing changed.
    Conflict(VersionMeta),
}

/// What [`Store::seed_connector_version`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seeded {
    /// The bundled version is stored, and active unless an operator chose
    /// another version.
    Stored {
        /// Whether this seeding changed the active version.
        activated: bool,
    },
    /// The connector was deleted through the API: the bundle does not bring
    /// it back.
    Deleted,
    /// An upload of the same version with other bytes exists and wins.
    UploadDiffers,
    /// Not made active: the version does not sync customers, and this
    /// many links through the connector would be stranded (see
    /// [`Store::customer_links`]). Stored, unless it is new bytes under
    /// the active version: those are not stored, the active ones stay.
    HeldBack {
        /// The links counted.
        linked: i64,
    },
}

/// The links a version without the `customer` entity would strand: linked
/// to a live remote record, or with a push to make. `$1` the connector.
const CUSTOMER_LINKS_SQL: &str = "SELECT COUNT(*) FROM sync_links WHERE connector = $1 \
     AND ((remote_id IS NOT NULL AND NOT remote_deleted) OR state IN ('pending', 'retry'))";

/// Inside a dispatched transaction `$tx`: inserts the version `$new`.
macro_rules! insert_version {
    ($tx:ident, $new:expr, $at:expr) => {
        sqlx::query(
            "INSERT INTO connector_versions (name, version, sha256, world, manifest, component, \
             size_bytes, source, uploaded_by, uploaded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind($new.name)
        .bind($new.version)
        .bind($new.sha256)
        .bind($new.world)
        .bind(Json($new.manifest))
        .bind($new.component)
        .bind(i64::try_from($new.component.len()).unwrap_or(i64::MAX))
        .bind($new.source.as_str())
        .bind($new.uploaded_by)
        .bind($at)
        .execute(&mut *$tx)
        .await
    };
}

impl Store {
    /// Every connector row, deleted ones included.
    pub async fn connector_rows(&self) -> Result<Vec<ConnectorRow>, StoreError> {
        let sql = format!("SELECT {CONNECTOR_COLUMNS} FROM connectors ORDER BY name");
        let rows: Vec<ConnectorDbRow> = dispatch!(self, read pool => {
            sqlx::query_as(&sql).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(ConnectorRow::from).collect())
    }

    /// The version the store records as active for connector `name` (the
    /// one every replica runs once loaded), if it has one.
    pub async fn stored_active_version(&self, name: &str) -> Result<Option<String>, StoreError> {
        let active: Option<Option<String>> = dispatch!(self, read pool => {
            sqlx::query_scalar("SELECT active_version FROM connectors WHERE name = $1")
                .bind(name)
                .fetch_optional(pool)
                .await?
        });
        Ok(active.flatten())
    }

    /// Brings back `name`, deleted through the API, as a connector with no
    /// version: the next seed of its bundled component stores and
    /// activates it as bundled. False if it is not deleted.
    pub async fn undelete_connector(&self, name: &str) -> Result<bool, StoreError> {
        let at = now();
        let undeleted = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE connectors SET deleted_at = NULL, revision = revision + 1, updated_at = $2 \
                 WHERE name = $1 AND deleted_at IS NOT NULL",
            )
            .bind(name)
            .bind(at)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(undeleted == 1)
    }

    /// Records that this replica has `name` switched on, so every replica
    /// queues its changes (see [`ConnectorRow::switched_on`]). Bumps the
    /// revision, once, for the others to see it.
    /// Only over `revision`, the row the decision was made on (a
    /// connector deleted and uploaded again since starts unmarked); true
    /// if it was (the revision is then one past it).
    pub async fn mark_switched_on(&self, name: &str, revision: i64) -> Result<bool, StoreError> {
        let at = now();
        let marked = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE connectors SET switched_on = TRUE, revision = revision + 1, updated_at = $2 \
                 WHERE name = $1 AND NOT switched_on AND deleted_at IS NULL AND revision = $3",
            )
            .bind(name)
            .bind(at)
            .bind(revision)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(marked == 1)
    }

    /// The stored versions of `name`, oldest first.
    pub async fn connector_versions(&self, name: &str) -> Result<Vec<VersionMeta>, StoreError> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM connector_versions WHERE name = $1 ORDER BY uploaded_at, version"
        );
        let rows: Vec<VersionDbRow> = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(name).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(VersionMeta::from).collect())
    }

    /// One stored version of `name`.
    pub async fn connector_version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<VersionMeta>, StoreError> {
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM connector_versions WHERE name = $1 AND version = $2"
        );
        let row: Option<VersionDbRow> = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(name).bind(version).fetch_optional(pool).await?
        });
        Ok(row.map(VersionMeta::from))
    }

    /// The stored version with these bytes, if any.
    pub async fn connector_version_by_sha(
        &self,
        sha256: &str,
    ) -> Result<Option<VersionMeta>, StoreError> {
        let sql = format!("SELECT {VERSION_COLUMNS} FROM connector_versions WHERE sha256 = $1");
        let row: Option<VersionDbRow> = dispatch!(self, read pool => {
            sqlx::query_as(&sql).bind(sha256).fetch_optional(pool).await?
        });
        Ok(row.map(VersionMeta::from))
    }

    /// The bytes of one stored version and their sha256.
    pub async fn connector_component(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        let row: Option<(String, Vec<u8>)> = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT sha256, component FROM connector_versions WHERE name = $1 AND version = $2",
            )
            .bind(name)
            .bind(version)
            .fetch_optional(pool)
            .await?
        });
        Ok(row)
    }

    /// Stores an uploaded version and, if `activate`, makes it active, in
    /// one transaction. The same bytes again, or the same version with other
    /// bytes, change nothing. Brings a deleted connector back.
    #[tracing::instrument(skip_all, fields(connector = new.name, version = new.version))]
    pub async fn add_connector_version(
        &self,
        new: &NewVersion<'_>,
        activate: bool,
    ) -> Result<AddedVersion, StoreError> {
        let at = now();
        let by_sha = format!("SELECT {VERSION_COLUMNS} FROM connector_versions WHERE sha256 = $1");
        let by_version = format!(
            "SELECT {VERSION_COLUMNS} FROM connector_versions WHERE name = $1 AND version = $2"
        );
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let same: Option<VersionDbRow> =
                sqlx::query_as(&by_sha).bind(new.sha256).fetch_optional(&mut *tx).await?;
            if let Some(same) = same {
                return Ok(AddedVersion::Exists(same.into()));
            }
            let other: Option<VersionDbRow> = sqlx::query_as(&by_version)
                .bind(new.name)
                .bind(new.version)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(other) = other {
                return Ok(AddedVersion::Conflict(other.into()));
            }
            if let Err(error) = insert_version!(tx, new, at) {
                // Another upload of the same bytes, or of the same version,
                // committed between the reads and the insert (two replicas
                // taking a client's retry): answered as if it came first.
                if matches!(&error, sqlx::Error::Database(db) if db.is_unique_violation()) {
                    drop(tx);
                    let same: Option<VersionDbRow> =
                        sqlx::query_as(&by_sha).bind(new.sha256).fetch_optional(pool).await?;
                    if let Some(same) = same {
                        return Ok(AddedVersion::Exists(same.into()));
                    }
                    let other: Option<VersionDbRow> = sqlx::query_as(&by_version)
                        .bind(new.name)
                        .bind(new.version)
                        .fetch_optional(pool)
                        .await?;
                    if let Some(other) = other {
                        return Ok(AddedVersion::Conflict(other.into()));
                    }
                }
                return Err(error.into());
            }
            sqlx::query(
                "INSERT INTO connectors (name, active_version, activated_by, enabled, deleted_at, revision, updated_at) \
                 VALUES ($1, CASE WHEN $3 THEN $2 END, 'api', NULL, NULL, 1, $4) \
                 ON CONFLICT (name) DO UPDATE SET deleted_at = NULL, \
                 enabled = CASE WHEN connectors.deleted_at IS NULL THEN connectors.enabled END, \
                 switched_on = connectors.switched_on AND connectors.deleted_at IS NULL, \
                 active_version = CASE WHEN $3 THEN $2 ELSE connectors.active_version END, \
                 activated_by = CASE WHEN $3 OR connectors.deleted_at IS NOT NULL THEN 'api' \
                   ELSE connectors.activated_by END, \
                 revision = connectors.revision + 1, updated_at = $4",
            )
            .bind(new.name)
            .bind(new.version)
            .bind(activate)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        });
        Ok(AddedVersion::Added(VersionMeta {
            name: new.name.to_owned(),
            version: new.version.to_owned(),
            sha256: new.sha256.to_owned(),
            world: new.world.to_owned(),
            manifest: new.manifest.clone(),
            size_bytes: i64::try_from(new.component.len()).unwrap_or(i64::MAX),
            source: new.source,
            uploaded_by: new.uploaded_by.to_owned(),
            uploaded_at: at,
        }))
    }

    /// Stores a bundled version found at start and activates it unless an
    /// operator chose the active version through the API. A bundled
    /// version rebuilt with other bytes under the same version number
    /// replaces the stored one (a developer's rebuild); an upload of that
    /// version is never replaced. Safe when replicas seed at once.
    #[tracing::instrument(skip_all, fields(connector = new.name, version = new.version))]
    pub async fn seed_connector_version(
        &self,
        new: &NewVersion<'_>,
        syncs_customers: bool,
    ) -> Result<Seeded, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let stored: Option<(String, String)> = sqlx::query_as(
                "SELECT sha256, source FROM connector_versions WHERE name = $1 AND version = $2",
            )
            .bind(new.name)
            .bind(new.version)
            .fetch_optional(&mut *tx)
            .await?;
            let replaced = match stored {
                None => {
                    if let Err(error) = insert_version!(tx, new, at) {
                        // Another replica seeding the same bundle at once
                        // stored it first: nothing left to store.
                        if matches!(&error, sqlx::Error::Database(db) if db.is_unique_violation()) {
                            return Ok(Seeded::Stored { activated: false });
                        }
                        return Err(error.into());
                    }
                    false
                }
                Some((sha256, _)) if sha256 == new.sha256 => false,
                Some((_, source)) if VersionSource::parse(&source) == VersionSource::Upload => {
                    return Ok(Seeded::UploadDiffers);
                }
                Some(_) => {
                    // New bytes under the active version that no longer sync
                    // customers are what an activation would refuse over
                    // the links they strand: kept out, or every replica
                    // loaded them and skipped those links' pushes.
                    if !syncs_customers {
                        let active: Option<Option<String>> = sqlx::query_scalar(
                            "SELECT active_version FROM connectors WHERE name = $1",
                        )
                        .bind(new.name)
                        .fetch_optional(&mut *tx)
                        .await?;
                        if active.flatten().as_deref() == Some(new.version) {
                            let linked: i64 = sqlx::query_scalar(CUSTOMER_LINKS_SQL)
                                .bind(new.name)
                                .fetch_one(&mut *tx)
                                .await?;
                            if linked > 0 {
                                return Ok(Seeded::HeldBack { linked });
                            }
                        }
                    }
                    sqlx::query(
                        "UPDATE connector_versions SET sha256 = $3, world = $4, manifest = $5, \
                         component = $6, size_bytes = $7, uploaded_by = $8, uploaded_at = $9 \
                         WHERE name = $1 AND version = $2",
                    )
                    .bind(new.name)
                    .bind(new.version)
                    .bind(new.sha256)
                    .bind(new.world)
                    .bind(Json(new.manifest))
                    .bind(new.component)
                    .bind(i64::try_from(new.component.len()).unwrap_or(i64::MAX))
                    .bind(new.uploaded_by)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                    true
                }
            };
            // Deleted through the API? Asked with a write to the row, after
            // the version's (the order an upload takes them in: the other
            // would deadlock with one), not a read: on PostgreSQL it waits
            // for a delete committing meanwhile and sees it, where a read
            // left this seed's version on the deleted connector (listed
            // nowhere, yet an upload of the same bytes answered
            // "unchanged"). The version written above is rolled back.
            let deleted: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(
                "UPDATE connectors SET revision = revision WHERE name = $1 RETURNING deleted_at",
            )
            .bind(new.name)
            .fetch_optional(&mut *tx)
            .await?;
            if matches!(deleted, Some(Some(_))) {
                return Ok(Seeded::Deleted);
            }
            sqlx::query(
                "INSERT INTO connectors (name, active_version, activated_by, enabled, deleted_at, revision, updated_at) \
                 VALUES ($1, NULL, 'bundle', NULL, NULL, 1, $2) ON CONFLICT (name) DO NOTHING",
            )
            .bind(new.name)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            // The bundle moves its own choice forward only: a replica of an
            // older ferry (a rolling deploy, a restart mid-upgrade) must not
            // take every replica back to its older bundled version.
            let current: Option<(Option<String>, String)> = sqlx::query_as(
                "SELECT active_version, activated_by FROM connectors WHERE name = $1",
            )
            .bind(new.name)
            .fetch_optional(&mut *tx)
            .await?;
            // New bytes under the version that is active, whoever chose
            // it: every replica must load them (see below).
            let replaced_active = replaced
                && current.as_ref().and_then(|(active, _)| active.as_deref()) == Some(new.version);
            // No version active: the bundle's to choose only if it chose
            // before (a connector revived by an upload without activating
            // it is the operator's; the bundle made it active again, a
            // deleted bundled connector back on at the next start).
            let take = match &current {
                None => true,
                Some((None, by)) => by == "bundle",
                Some((Some(active), by)) if by == "bundle" => {
                    (active == new.version && replaced) || newer_version(new.version, active)
                }
                Some(_) => false,
            };
            // A version that does not sync customers is not made active
            // over links it would strand, as an upload or activation is not
            // (409 `customers_linked`): their pushes would be skipped as
            // settled.
            let linked: i64 = if take && !syncs_customers {
                sqlx::query_scalar(CUSTOMER_LINKS_SQL)
                    .bind(new.name)
                    .fetch_one(&mut *tx)
                    .await?
            } else {
                0
            };
            let take = take && linked == 0;
            // Only over the choice as read: an operator's activation, or
            // another replica's seeding, that committed since wins.
            let (read_version, read_by) = current.unwrap_or_default();
            let activated = take
                && sqlx::query(
                    "UPDATE connectors SET active_version = $2, activated_by = 'bundle', \
                     revision = revision + 1, updated_at = $3 WHERE name = $1 \
                     AND COALESCE(active_version, '') = $4 AND activated_by = $5",
                )
                .bind(new.name)
                .bind(new.version)
                .bind(at)
                .bind(read_version.unwrap_or_default())
                .bind(read_by)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
            // A rebuild of the version an operator made active (the bundle
            // does not take it over): without a revision of its own, only
            // the replicas that restart loaded the new bytes, and the
            // others ran the old ones until some other change.
            if replaced_active && !activated {
                sqlx::query(
                    "UPDATE connectors SET revision = revision + 1, updated_at = $2 \
                     WHERE name = $1 AND active_version = $3",
                )
                .bind(new.name)
                .bind(at)
                .bind(new.version)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(if linked > 0 {
                Seeded::HeldBack { linked }
            } else {
                Seeded::Stored { activated }
            })
        })
    }

    /// Makes `version` of `name` active (rollback or roll forward); false
    /// if the connector or that version does not exist, or the connector
    /// is past the `expected` revision.
    pub async fn activate_connector_version(
        &self,
        name: &str,
        version: &str,
        expected: Option<i64>,
    ) -> Result<bool, StoreError> {
        let updated = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE connectors SET active_version = $2, activated_by = $3, \
                 revision = revision + 1, updated_at = $4 \
                 WHERE name = $1 AND deleted_at IS NULL AND revision = COALESCE($5, revision) \
                 AND EXISTS (SELECT 1 FROM connector_versions v WHERE v.name = $1 AND v.version = $2)",
            )
            .bind(name)
            .bind(version)
            .bind(ActivatedBy::Api.as_str())
            .bind(now())
            .bind(expected)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Sets the operator's enabled switch; false if no such connector, or
    /// it is past the `expected` revision.
    pub async fn set_connector_enabled(
        &self,
        name: &str,
        enabled: bool,
        expected: Option<i64>,
    ) -> Result<bool, StoreError> {
        let updated = dispatch!(self, write pool => {
            sqlx::query(
                "UPDATE connectors SET enabled = $2, revision = revision + 1, updated_at = $3 \
                 WHERE name = $1 AND deleted_at IS NULL AND revision = COALESCE($4, revision)",
            )
            .bind(name)
            .bind(enabled)
            .bind(now())
            .bind(expected)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(updated == 1)
    }

    /// Deletes a connector: its versions and stored configuration go, its
    /// row stays as a tombstone (so the bundle does not bring it back) and
    /// its links stay for audit. False if no such connector, or it is past
    /// the `expected` revision.
    #[tracing::instrument(skip_all, fields(connector = name))]
    pub async fn delete_connector(
        &self,
        name: &str,
        expected: Option<i64>,
    ) -> Result<bool, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE connectors SET deleted_at = $2, active_version = NULL, enabled = NULL, \
                 switched_on = FALSE, activated_by = 'bundle', revision = revision + 1, updated_at = $2 \
                 WHERE name = $1 AND deleted_at IS NULL AND revision = COALESCE($3, revision)",
            )
            .bind(name)
            .bind(at)
            .bind(expected)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if updated != 1 {
                return Ok(false);
            }
            sqlx::query("DELETE FROM connector_versions WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM connector_configs WHERE connector = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Makes the pushes that waited while `name` was disabled due now, and
    /// the creates a backfill held: those whose wait says so
    /// ([`super::links::PAUSED_WAIT`], [`super::links::BACKFILL_WAIT`],
    /// and [`super::links::PROBING_WAIT`], behind a probe an enable ends),
    /// pending or retrying (a retry meets the switch only once its backoff
    /// is over). Other waits keep their time: a retry's backoff, and the
    /// settle time a version waits after an update that timed out (made
    /// due at once, it could land before the older one). [`RESUME_BATCH`] links per
    /// statement: one statement over a long backlog held SQLite's only
    /// writer (every webhook behind it) for as long as it took.
    pub async fn resume_connector_links(&self, name: &str) -> Result<u64, StoreError> {
        use super::links::{BACKFILL_WAIT, PAUSED_WAIT, PROBING_WAIT};
        self.links_waiting_due(name, [PAUSED_WAIT, BACKFILL_WAIT, PROBING_WAIT])
            .await
    }

    /// Makes the pushes deferred behind a probe of `name`'s breaker due now
    /// ([`super::links::PROBING_WAIT`]): the probe succeeded.
    pub async fn release_probed_links(&self, name: &str) -> Result<u64, StoreError> {
        use super::links::PROBING_WAIT;
        self.links_waiting_due(name, [PROBING_WAIT; 3]).await
    }

    /// Makes `name`'s links that wait for one of `waits` (their last
    /// error) due now, as [`Store::resume_connector_links`] says.
    ///
    /// Only the links that waited when it began, and at most as many: a
    /// link a worker parks again meanwhile (a create a backfill still
    /// holds, a replica whose view lags) waits past the start as well, and
    /// the release went on for as long as workers kept parking them. One
    /// parked again is due later than any that waited (parked after them,
    /// for the same wait), so the latest due time then bounds them.
    async fn links_waiting_due(&self, name: &str, waits: [&str; 3]) -> Result<u64, StoreError> {
        let now_ms = super::now_ms();
        let (waiting, latest): (i64, Option<i64>) = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT COUNT(*), MAX(next_attempt_at_ms) FROM sync_links \
                 WHERE state IN ('pending', 'retry') \
                 AND last_error IN ($3, $4, $5) AND next_attempt_at_ms > $2 AND connector = $1",
            )
            .bind(name)
            .bind(now_ms)
            .bind(waits[0])
            .bind(waits[1])
            .bind(waits[2])
            .fetch_one(pool)
            .await?
        });
        let Some(latest) = latest else {
            return Ok(0);
        };
        let waiting = u64::try_from(waiting).unwrap_or(0);
        let mut resumed = 0;
        loop {
            // `state IN (…)` as well: the due links' partial index, which
            // SQLite uses only for its own condition.
            let step = dispatch!(self, write pool => {
                sqlx::query(
                    "UPDATE sync_links SET next_attempt_at_ms = $2 \
                     WHERE (customer_id, connector) IN (SELECT customer_id, connector \
                       FROM sync_links WHERE state IN ('pending', 'retry') \
                       AND last_error IN ($4, $5, $6) \
                       AND next_attempt_at_ms > $2 AND next_attempt_at_ms <= $7 \
                       AND connector = $1 LIMIT $3)",
                )
                .bind(name)
                .bind(now_ms)
                .bind(RESUME_BATCH)
                .bind(waits[0])
                .bind(waits[1])
                .bind(waits[2])
                .bind(latest)
                .execute(pool)
                .await?
                .rows_affected()
            });
            resumed += step;
            if step < u64::try_from(RESUME_BATCH).unwrap_or(0) || resumed >= waiting {
                return Ok(resumed);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// What deleting `name` would strand: customers linked to its live
    /// records or with a push to make (see [`Store::customer_links`]), and
    /// inbound events stored but not yet applied (the remote had its 2xx
    /// and will not send them again).
    pub async fn connector_in_use(&self, name: &str) -> Result<i64, StoreError> {
        let sql = format!(
            "SELECT ({CUSTOMER_LINKS_SQL}) + (SELECT COUNT(*) FROM inbox \
             WHERE state IN ('pending', 'retry') AND connector = $1)"
        );
        let count = dispatch!(self, read pool => {
            sqlx::query_scalar(&sql).bind(name).fetch_one(pool).await?
        });
        Ok(count)
    }

    /// How many of `name`'s links a version without the `customer` entity
    /// would strand: linked to a live remote record, or with a push to make.
    pub async fn customer_links(&self, name: &str) -> Result<i64, StoreError> {
        let count = dispatch!(self, read pool => {
            sqlx::query_scalar(CUSTOMER_LINKS_SQL)
            .bind(name)
            .fetch_one(pool)
            .await?
        });
        Ok(count)
    }
}

/// Whether version `candidate` comes after `active` in semantic-version
/// precedence, build metadata ignored as SemVer says (`1.0.0+b` is no
/// newer than `1.0.0+a`: two replicas bundling them took each other's
/// place at every start). A manifest's version parses; one stored before
/// that was checked and does not is taken as different, so as a move.
pub(crate) fn newer_version(candidate: &str, active: &str) -> bool {
    match (
        semver::Version::parse(candidate),
        semver::Version::parse(active),
    ) {
        (Ok(candidate), Ok(active)) => candidate.cmp_precedence(&active).is_gt(),
        _ => candidate != active,
    }
}

/// Whether `candidate` goes back from `active` (a rollback): older by
/// semver precedence. A build that differs only in its metadata
/// (`1.4.0+b2` over `1.4.0+b1`) is not one, nor are two versions semver
/// cannot order.
pub(crate) fn is_rollback(candidate: &str, active: &str) -> bool {
    newer_version(active, candidate) && !newer_version(candidate, active)
}

#[cfg(test)]
mod tests {
    use super::{is_rollback, newer_version};

    /// Only a version older by precedence is a rollback: one that differs
    /// only in build metadata was taken for one, and activated without the
    /// check of the settings it needs.
    #[test]
    fn only_an_older_version_is_a_rollback() {
        assert!(is_rollback("1.3.0", "1.4.0"));
        assert!(is_rollback("1.4.0-rc.1", "1.4.0"));
        assert!(!is_rollback("1.4.0+b2", "1.4.0+b1"));
        assert!(!is_rollback("1.4.0", "1.4.0"));
        assert!(!is_rollback("1.5.0", "1.4.0"));
        assert!(!is_rollback("nightly-2", "nightly-1"));
    }

    #[test]
    fn versions_are_ordered_by_precedence() {
        assert!(newer_version("1.1.0", "1.0.9"));
        assert!(newer_version("1.0.0", "1.0.0-rc.1"));
        assert!(!newer_version("1.0.0-rc.1", "1.0.0"));
        assert!(!newer_version("1.0.0+b", "1.0.0+a"));
        assert!(!newer_version("1.0.0+a", "1.0.0+b"));
        assert!(!newer_version("1.0.0", "1.0.0"));
    }
}
