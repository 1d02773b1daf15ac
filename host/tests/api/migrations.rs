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

fn before_the_queue(mut migrator: sqlx::migrate::Migrator) -> sqlx::migrate::Migrator {
    let older: Vec<_> = migrator
        .migrations
        .iter()
        .filter(|m| m.version < OUTBOX_QUEUE)
        .cloned()
        .collect();
    assert!(
        older.len() < migrator.migrations.len(),
        "the migration exists"
    );
    migrator.migrations = older.into();
    migrator
}

/// Migrates `$pool` to just before the queue, writes the old rows at
/// `$at` and closes it (a macro: `sqlx::migrate!` wants its path literal).
macro_rules! an_older_database {
    ($pool:expr, $migrations:literal, $at:expr) => {{
        let pool = $pool;
        before_the_queue(sqlx::migrate!($migrations))
            .run(&pool)
            .await
            .unwrap();
        sqlx::query(OLD_OUTBOX_ROWS)
            .bind($at)
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }};
}

async fn an_outbox_waiting_at_upgrade_is_still_relayed(backend: Backend) {
    let dir = tempfile::tempdir().expect("temp dir");
    let at = Utc::now() - Duration::minutes(5);
    let url = match backend {
        Backend::Sqlite => {
            let url = format!("sqlite://{}", dir.path().join("ferry.db").display());
            let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(&url)
                .unwrap()
                .create_if_missing(true);
            let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
            an_older_database!(pool, "../migrations/sqlite", at);
            url
        }
        Backend::Postgres => {
            let url = PgCluster::shared().create_database().await.unwrap();
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            an_older_database!(pool, "../migrations/postgres", at);
            url
        }
    };

    let store = Store::connect(&url, &Default::default()).await.unwrap();
    store.migrate().await.unwrap();

    let unpublished = store.unpublished_outbox(10).await.unwrap();
    let customers: Vec<&str> = unpublished.iter().map(|c| c.customer_id.as_str()).collect();
    assert_eq!(customers, ["cus_waiting"], "{unpublished:?}");
    assert_eq!(unpublished[0].correlation_id.as_deref(), Some("req-1"));
    assert_eq!(unpublished[0].version, 1);

    let unconsumed = store.unconsumed_outbox(Utc::now(), 10).await.unwrap();
    let customers: Vec<&str> = unconsumed.iter().map(|c| c.customer_id.as_str()).collect();
    assert_eq!(customers, ["cus_published"], "{unconsumed:?}");

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

on_both_backends!(an_outbox_waiting_at_upgrade_is_still_relayed);
