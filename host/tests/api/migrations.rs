//! Upgrades: what a database holds when a newer ferry starts on it keeps
//! its meaning.

use chrono::{Duration, Utc};
use ferry::store::Store;
use ferry_test_support::postgres::PgCluster;

use crate::helpers::{on_both_backends, Backend};

/// The migration that made the outbox insert-only (an `outbox_queue` of
/// what is still to move, instead of marks on the outbox rows).
const OUTBOX_QUEUE: i64 = 20261201000010;

/// The rows an older ferry left: a change not yet relayed, one published
/// to Kafka but not consumed, one consumed.
const OLD_OUTBOX_ROWS: &str =
    "INSERT INTO outbox (aggregate, aggregate_id, version, kind, payload, \
     correlation_id, created_at, published_at, consumed_at) VALUES \
     ('customer', 'cus_waiting', 1, 'created', '{}', 'req-1', $1, NULL, NULL), \
     ('customer', 'cus_published', 1, 'created', '{}', 'req-2', $1, $1, NULL), \
     ('customer', 'cus_consumed', 1, 'created', '{}', 'req-3', $1, $1, $1)";

/// The migration that moved a pending create's record from the outbox
/// (whose rows carried every change's payload) onto its link.
const PENDING_RECORDS: i64 = 20261203000011;

/// What an older ferry left mid-create: the create of version 2 timed out
/// and the customer has moved on to version 3 since; another link has no
/// create outstanding.
const OLD_PENDING_CREATE: [&str; 2] = [
    "INSERT INTO outbox (aggregate, aggregate_id, version, kind, payload, correlation_id, \
     created_at) VALUES \
     ('customer', 'cus_pending', 1, 'created', '{\"id\":\"cus_pending\",\"name\":\"one\"}', NULL, $1), \
     ('customer', 'cus_pending', 2, 'updated', '{\"id\":\"cus_pending\",\"name\":\"two\"}', NULL, $1), \
     ('customer', 'cus_pending', 3, 'updated', '{\"id\":\"cus_pending\",\"name\":\"three\"}', NULL, $1)",
    "INSERT INTO sync_links (customer_id, connector, wanted_version, pending_version, state, \
     next_attempt_at_ms, updated_at) VALUES \
     ('cus_pending', 'stripe', 3, 2, 'retry', 0, $1), \
     ('cus_pending', 'salesforce', 3, NULL, 'pending', 0, $1)",
];

/// The migration that added the data steps ferry runs in Rust at start
/// (the first: stored emails in today's form).
const DATA_STEPS: i64 = 20261204000016;

/// Customers an older ferry stored with emails it kept as typed (trimmed
/// and lowercased only): `é` decomposed, a Unicode domain; two live ones
/// that are one address (the second already in today's form); a deleted
/// one; an ASCII one.
const OLD_EMAILS: &str =
    "INSERT INTO customers (id, email, version, created_at, updated_at, deleted_at) VALUES \
     ('cus_00000000000000000000000000000001', 'rene\u{301}@example.com', 1, $1, $1, NULL), \
     ('cus_00000000000000000000000000000002', 'ada@b\u{fc}cher.de', 1, $1, $1, NULL), \
     ('cus_00000000000000000000000000000003', 'zoe@b\u{fc}cher.de', 1, $1, $1, NULL), \
     ('cus_00000000000000000000000000000004', 'zoe@xn--bcher-kva.de', 1, $1, $1, NULL), \
     ('cus_00000000000000000000000000000005', 'zoe@b\u{fc}cher.de ', 2, $1, $1, $1), \
     ('cus_00000000000000000000000000000006', 'plain@example.com', 1, $1, $1, NULL)";

/// The migration after the data steps' table.
const AFTER_DATA_STEPS: i64 = 20261204000017;

/// A database that took the first emails rewrite, holding a final sigma
/// (an address typed `ας@`, or `ΑΣ@` lowercased as a word).
const OLD_SIGMA: [&str; 2] = [
    "INSERT INTO customers (id, email, version, created_at, updated_at, deleted_at) VALUES \
     ('cus_00000000000000000000000000000007', 'ας@example.gr', 1, $1, $1, NULL)",
    "INSERT INTO data_steps (name, done_at) VALUES ('emails_nfc_idna', $1)",
];

fn before(version: i64, mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    let older: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|m| m.version < version)
        .cloned()
        .collect();
    assert!(
        older.len() < migrator.migrations.len(),
        "the migration exists"
    );
    migrator.migrations = older.into();
    migrator
}

/// Migrates `$pool` to just before `$version`, writes the `$rows` at `$at`
/// and closes it (a macro: `sqlx::migrate!` wants its path literal).
macro_rules! an_older_database {
    ($pool:expr, $migrations:literal, $version:expr, $rows:expr, $at:expr) => {{
        let pool = $pool;
        before($version, sqlx::migrate!($migrations))
            .run(&pool)
            .await
            .unwrap();
        for rows in $rows {
            sqlx::query(rows).bind($at).execute(&pool).await.unwrap();
        }
        pool.close().await;
    }};
}

/// A store on a database an older ferry left: migrated to just before
/// `version`, holding `rows` (each statement's `$1` is `at`), then
/// migrated by this one.
async fn upgraded(
    backend: Backend,
    dir: &tempfile::TempDir,
    version: i64,
    rows: &[&str],
    at: chrono::DateTime<Utc>,
) -> Store {
    let url = match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
            let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
                .unwrap()
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            an_older_database!(pool, "../migrations/sqlite", version, rows, at);
            url
        }
        Backend::Postgres => {
            let url = PgCluster::shared().create_database().await.unwrap();
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            an_older_database!(pool, "../migrations/postgres", version, rows, at);
            url
        }
    };
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn an_outbox_waiting_at_upgrade_is_still_relayed(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = Utc::now() - Duration::minutes(5);
    let store = upgraded(backend, &dir, OUTBOX_QUEUE, &[OLD_OUTBOX_ROWS], at).await;

    let unpublished = store.unpublished_outbox(10).await.unwrap();
    let customers: Vec<&str> = unpublished.iter().map(|c| c.customer_id.as_str()).collect();
    assert_eq!(customers, ["cus_waiting"], "{unpublished:?}");
    assert_eq!(unpublished[0].correlation_id.as_deref(), Some("req-1"));
    assert_eq!(unpublished[0].version, 1);
    // The backlog's view: one change not published, five minutes old
    // (read from the oldest queued row alone).
    let backlog = store.backlog().await.unwrap();
    assert_eq!(backlog.outbox_unpublished, 1, "{backlog:?}");
    let age = backlog.outbox_oldest_age.as_secs();
    assert!((299..400).contains(&age), "{backlog:?}");

    // The redelivery net's view: both rows still queued, the one published
    // and not consumed, and the one never published (the relay could not
    // reach the bus), each written five minutes ago.
    let unconsumed = store.unconsumed_outbox(Utc::now(), 10).await.unwrap();
    let customers: Vec<&str> = unconsumed.iter().map(|c| c.customer_id.as_str()).collect();
    assert_eq!(
        customers,
        ["cus_waiting", "cus_published"],
        "{unconsumed:?}"
    );
    let recent = Utc::now() - Duration::minutes(10);
    assert!(store
        .unconsumed_outbox(recent, 10)
        .await
        .unwrap()
        .is_empty());

    for (customer, queued) in [
        ("cus_waiting", true),
        ("cus_published", true),
        ("cus_consumed", false),
    ] {
        let events = store.outbox_events(customer).await.unwrap();
        assert_eq!(events.len(), 1, "{customer}");
        assert_eq!(events[0].queued, queued, "{customer}");
    }
    store.close().await;
}

/// A create whose outcome was unknown when ferry was upgraded still replays
/// the record it sent: the upgrade copies it from the outbox onto the link
/// before the outbox stops carrying payloads.
async fn a_create_pending_at_upgrade_keeps_its_record(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = Utc::now() - Duration::minutes(5);
    let store = upgraded(backend, &dir, PENDING_RECORDS, &OLD_PENDING_CREATE, at).await;

    let mut links = store.links_of("cus_pending").await.unwrap();
    links.sort_by(|a, b| a.connector.cmp(&b.connector));
    let kept: Vec<(&str, Option<i64>, Option<&serde_json::Value>)> = links
        .iter()
        .map(|l| {
            (
                l.connector.as_str(),
                l.pending_version,
                l.pending_record.as_ref(),
            )
        })
        .collect();
    let two = serde_json::json!({ "id": "cus_pending", "name": "two" });
    assert_eq!(
        kept,
        [("salesforce", None, None), ("stripe", Some(2), Some(&two))]
    );
    let events = store.outbox_events("cus_pending").await.unwrap();
    assert_eq!(events.len(), 3, "the events stay, without their payloads");
    store.close().await;
}

/// Emails an older ferry stored as typed are rewritten in today's form at
/// the first start (lookups by today's form find them), once; a live
/// customer whose address another live one holds keeps its own and is
/// reported.
async fn emails_stored_at_upgrade_are_written_in_todays_form(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = Utc::now() - Duration::minutes(5);
    let store = upgraded(backend, &dir, DATA_STEPS, &[OLD_EMAILS], at).await;
    let normalise = ferry::api::customers::normalise_email;

    let done = store.renormalise_emails(normalise).await.unwrap();
    assert_eq!(done.changed, 3, "{done:?}");
    assert_eq!(
        done.kept,
        [(
            "cus_00000000000000000000000000000003".to_owned(),
            "zoe@b\u{fc}cher.de".to_owned(),
            "zoe@xn--bcher-kva.de".to_owned()
        )]
    );
    for (id, email) in [
        (
            "cus_00000000000000000000000000000001",
            "ren\u{e9}@example.com",
        ),
        (
            "cus_00000000000000000000000000000002",
            "ada@xn--bcher-kva.de",
        ),
        ("cus_00000000000000000000000000000003", "zoe@b\u{fc}cher.de"),
        (
            "cus_00000000000000000000000000000004",
            "zoe@xn--bcher-kva.de",
        ),
        ("cus_00000000000000000000000000000006", "plain@example.com"),
    ] {
        let id = ferry::store::CustomerId::parse(id).unwrap_or_else(|| panic!("{id}"));
        let customer = store.get_customer(&id).await.unwrap();
        assert_eq!(customer.email, email);
        assert_eq!(customer.version, 1, "the address is the same");
    }
    let found = store
        .list_customers(&ferry::store::ListCustomers {
            limit: 10,
            starting_after: None,
            email: Some(normalise("ADA@B\u{dc}CHER.DE")),
        })
        .await
        .unwrap();
    assert_eq!(found.data.len(), 1, "found by today's form");

    // Once: a second start does nothing.
    assert_eq!(
        store.renormalise_emails(normalise).await.unwrap(),
        Default::default()
    );
    store.close().await;
}

/// A final sigma an earlier release stored is folded at the next start,
/// though that database took the first rewrite already: the step is named
/// anew when the form changes.
async fn a_final_sigma_stored_before_is_folded_at_the_next_start(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = Utc::now() - Duration::minutes(5);
    let store = upgraded(backend, &dir, AFTER_DATA_STEPS, &OLD_SIGMA, at).await;
    let done = store
        .renormalise_emails(ferry::api::customers::normalise_email)
        .await
        .unwrap();
    assert_eq!(done.changed, 1, "{done:?}");
    let id = ferry::store::CustomerId::parse("cus_00000000000000000000000000000007").unwrap();
    let customer = store.get_customer(&id).await.unwrap();
    assert_eq!(customer.email, "ασ@example.gr");
    store.close().await;
}

on_both_backends!(
    an_outbox_waiting_at_upgrade_is_still_relayed,
    a_create_pending_at_upgrade_keeps_its_record,
    emails_stored_at_upgrade_are_written_in_todays_form,
    a_final_sigma_stored_before_is_folded_at_the_next_start
);

/// The migration that remembers the record a duplicate-email merge let go
/// (a column on `sync_links`, a table every replica reads and writes).
const MERGE_RELEASED: i64 = 20261206000025;

/// A migration that needs a table another session holds (a dump, a
/// transaction left open) waits a second at a time and asks again, instead
/// of queueing without limit: queued, its `ALTER` held every other session's
/// reads and writes of the table behind it, and each failed at its own
/// timeout, on every replica still serving.
#[tokio::test]
async fn postgres_a_migration_does_not_queue_the_table_behind_it() {
    use sqlx::Connection;
    let url = PgCluster::shared().create_database().await.unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    before(MERGE_RELEASED, sqlx::migrate!("../migrations/postgres"))
        .run(&pool)
        .await
        .unwrap();
    pool.close().await;
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM sync_links LIMIT 1")
        .execute(&mut holder)
        .await
        .unwrap();
    let store = Store::connect(&url, &Default::default()).await.unwrap();
    let column = "SELECT column_name::text FROM information_schema.columns \
                  WHERE table_name = 'sync_links' AND column_name = 'released_remote_id'";
    let meanwhile = async {
        tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
        // Another replica's read of the table, with a client's patience.
        let mut reader = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::query("SET statement_timeout = '3s'")
            .execute(&mut reader)
            .await
            .unwrap();
        let read: Result<(i64,), _> = sqlx::query_as("SELECT count(*) FROM sync_links")
            .fetch_one(&mut reader)
            .await;
        let added: Option<(String,)> = sqlx::query_as(column)
            .fetch_optional(&mut reader)
            .await
            .unwrap();
        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        (read, added)
    };
    let (migrated, (read, added)) = tokio::join!(store.migrate(), meanwhile);
    assert!(read.is_ok(), "{read:?}");
    assert!(added.is_none(), "the migration waited for the table");
    migrated.expect("migrated once the table is free");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let added: Option<(String,)> = sqlx::query_as(column).fetch_optional(&pool).await.unwrap();
    assert!(added.is_some());
    pool.close().await;
    store.close().await;
}

/// Every PostgreSQL migration from [`MERGE_RELEASED`] on asks for its
/// locks with a `lock_timeout` of its own (see
/// [`postgres_a_migration_does_not_queue_the_table_behind_it`]); the
/// released ones before it keep their text (sqlx checks each one's
/// checksum).
#[test]
fn later_migrations_wait_for_a_table_a_second_at_a_time() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/postgres");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: i64 = name.split('_').next().unwrap().parse().unwrap();
        if version < MERGE_RELEASED {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("SET LOCAL lock_timeout"),
            "{name} sets no lock_timeout of its own"
        );
    }
}
