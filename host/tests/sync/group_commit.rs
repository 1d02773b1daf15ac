//! The inbound apply's group commit, driven at the store: on PostgreSQL a
//! group is written as one statement per table, and it must answer each
//! change exactly as the one-savepoint-per-change path does (which SQLite
//! runs), including the changes that raced and a lost lease.

use std::collections::BTreeMap;

use ferry::store::inbox::{
    Applied, CustomerWrite, InboundChange, InboxEvent, NewInboxEvent, RemoteChange,
};
use ferry::store::{
    customers::WriteContext, CustomerFields, CustomerId, Store, StoreError, StoreOptions,
};
use ferry_test_support::postgres::PgCluster;
use serde_json::json;

use crate::helpers::email;

async fn store(postgres: bool) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = if postgres {
        PgCluster::shared()
            .create_database()
            .await
            .expect("test database")
    } else {
        format!("sqlite://{}", dir.path().join("ferry.db").display())
    };
    (open(&url).await, dir)
}

/// The store at `url`, migrated.
async fn open(url: &str) -> Store {
    let store = Store::connect(url, &StoreOptions::default())
        .await
        .expect("store");
    store.migrate().await.expect("migrations");
    store
}

fn fields(email: &str, name: &str) -> CustomerFields {
    CustomerFields {
        name: Some(name.to_owned()),
        email: email.to_owned(),
        phone: None,
        address: None,
        metadata: BTreeMap::new(),
    }
}

/// A `customer.updated` event of `remote_id`.
fn event(event_id: &str, remote_id: &str) -> NewInboxEvent {
    NewInboxEvent {
        event_id: event_id.into(),
        entity: "customer".into(),
        kind: RemoteChange::Upsert,
        remote_id: remote_id.into(),
        occurred_at_ms: 1_000,
        record: Some(json!({ "email": "ignored@example.com" })),
        origin_key: None,
        remote_type: "customer.updated".into(),
        policy: None,
    }
}

/// Stores one `customer.updated` event per remote id and claims them all.
async fn claimed(store: &Store, remote_ids: &[String]) -> Vec<InboxEvent> {
    let events: Vec<NewInboxEvent> = remote_ids
        .iter()
        .map(|remote_id| event(&format!("evt_{remote_id}"), remote_id))
        .collect();
    store
        .store_inbox_many(&[("stripe", &events, Some("req_group"))])
        .await
        .expect("events stored");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_due_inbox("lease-a", until, 100, 0, i64::MIN)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), remote_ids.len());
    claimed
}

fn change(event: &InboxEvent, customer: CustomerWrite, link: Option<&CustomerId>) -> InboundChange {
    InboundChange {
        event: event.clone(),
        customer,
        link_customer: link.cloned(),
        unlink_customer: None,
        link_remote: true,
        snapshot: Some(json!({ "name": "from the remote" })),
        remote_has_result: true,
        push_back: None,
        detail: Some("applied by the group".into()),
        conflict: None,
    }
}

async fn each_change_gets_its_own_answer(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let ctx = || WriteContext {
        correlation_id: None,
        idempotency: None,
    };
    let owner = store
        .create_customer(fields(&email("owner"), "Owner"), ctx())
        .await
        .expect("owner");
    let other = store
        .create_customer(fields(&email("other"), "Other"), ctx())
        .await
        .expect("other");
    let third = store
        .create_customer(fields(&email("third"), "Third"), ctx())
        .await
        .expect("third");
    let remote: Vec<String> = (0..5)
        .map(|i| format!("cus_group_{i}_{postgres}"))
        .collect();
    let events = claimed(&store, &remote).await;
    let new_email = email("new");
    let changes = vec![
        // A new customer.
        change(
            &events[0],
            CustomerWrite::Create(fields(&new_email, "New")),
            None,
        ),
        // A new customer whose email a live customer has: decides again.
        change(
            &events[1],
            CustomerWrite::Create(fields(&owner.email, "Dup")),
            None,
        ),
        // An update at the current version.
        change(
            &events[2],
            CustomerWrite::Update {
                id: owner.id.clone(),
                expected_version: 1,
                fields: fields(&owner.email, "Owner, renamed"),
            },
            Some(&owner.id),
        ),
        // An update decided on an old version: raced.
        change(
            &events[3],
            CustomerWrite::Update {
                id: other.id.clone(),
                expected_version: 7,
                fields: fields(&other.email, "Never"),
            },
            Some(&other.id),
        ),
        // Nothing to write but the link (the remote equals the customer).
        change(&events[4], CustomerWrite::None, Some(&third.id)),
    ];
    let results = store.apply_inbound_many(&changes).await.expect("applied");
    assert_eq!(results.len(), 5);
    let created = match &results[0] {
        Ok(Applied::Done(Some(customer))) => customer.clone(),
        other => panic!("create: {other:?}"),
    };
    assert_eq!(
        (created.email.as_str(), created.version),
        (new_email.as_str(), 1)
    );
    assert!(
        matches!(results[1], Ok(Applied::Raced) | Err(StoreError::EmailTaken)),
        "taken email: {:?}",
        results[1]
    );
    match &results[2] {
        Ok(Applied::Done(Some(customer))) => {
            assert_eq!(
                (customer.name.as_deref(), customer.version),
                (Some("Owner, renamed"), 2)
            );
        }
        other => panic!("update: {other:?}"),
    }
    assert!(matches!(results[3], Ok(Applied::Raced)), "{:?}", results[3]);
    assert!(
        matches!(results[4], Ok(Applied::Done(None))),
        "{:?}",
        results[4]
    );

    // What was written: links, inbox rows and outbox events of the three
    // that applied, nothing of the two that must decide again.
    let link = store
        .link_by_remote_id("stripe", &remote[0])
        .await
        .expect("link read")
        .expect("the new customer is linked");
    assert_eq!(
        (link.customer_id.as_str(), link.synced_version),
        (created.id.as_str(), 1)
    );
    assert_eq!(link.snapshot, Some(json!({ "name": "from the remote" })));
    for (i, linked) in [
        (1, None),
        (2, Some(&owner.id)),
        (3, None),
        (4, Some(&third.id)),
    ] {
        let link = store
            .link_by_remote_id("stripe", &remote[i])
            .await
            .expect("link read");
        assert_eq!(
            link.map(|l| l.customer_id),
            linked.map(|c| c.as_str().to_owned()),
            "link of change {i}"
        );
    }
    let states: Vec<(String, Option<String>)> = {
        let mut rows = Vec::new();
        for remote_id in &remote {
            let event = store
                .inbox_of_remote("stripe", remote_id)
                .await
                .expect("inbox read")
                .pop()
                .expect("event");
            rows.push((event.state.as_str().to_owned(), event.customer_id));
        }
        rows
    };
    assert_eq!(
        states,
        vec![
            ("applied".into(), Some(created.id.as_str().to_owned())),
            ("pending".into(), None),
            ("applied".into(), Some(owner.id.as_str().to_owned())),
            ("pending".into(), None),
            ("applied".into(), Some(third.id.as_str().to_owned())),
        ]
    );
    let history = store
        .outbox_events(created.id.as_str())
        .await
        .expect("outbox");
    assert_eq!(history.len(), 1, "one created event for the new customer");
    let history = store
        .outbox_events(owner.id.as_str())
        .await
        .expect("outbox");
    assert_eq!(
        history.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2],
        "the API's create, then the remote's update"
    );
    assert!(store.get_customer(&other.id).await.expect("other").version == 1);

    // A lost lease: nothing of the group is lost, the one whose lease
    // another worker holds is answered so, the other applies.
    let remote: Vec<String> = (0..2)
        .map(|i| format!("cus_lease_{i}_{postgres}"))
        .collect();
    let events = claimed(&store, &remote).await;
    let mut stolen = events[1].clone();
    stolen.lease_token = Some("lease-b".into());
    let changes = vec![
        change(
            &events[0],
            CustomerWrite::Create(fields(&email("kept"), "Kept")),
            None,
        ),
        change(
            &stolen,
            CustomerWrite::Create(fields(&email("stolen"), "Stolen")),
            None,
        ),
    ];
    let results = store.apply_inbound_many(&changes).await.expect("applied");
    assert!(
        matches!(results[0], Ok(Applied::Done(Some(_)))),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Ok(Applied::LeaseLost)),
        "{:?}",
        results[1]
    );
    let stolen_link = store
        .link_by_remote_id("stripe", &remote[1])
        .await
        .expect("link read");
    assert!(stolen_link.is_none(), "nothing written for the lost lease");
}

#[tokio::test]
async fn postgres_each_change_gets_its_own_answer() {
    each_change_gets_its_own_answer(true).await;
}

#[tokio::test]
async fn sqlite_each_change_gets_its_own_answer() {
    each_change_gets_its_own_answer(false).await;
}

/// The ingest's insert on PostgreSQL stores each event once: twice in one
/// group, or stored by another writer while the insert runs (here a
/// transaction still open when the insert starts, which the insert waits
/// for), it is counted for the delivery that stored it first and the rest
/// of the group is stored all the same.
#[tokio::test]
async fn postgres_an_event_stored_meanwhile_is_stored_once() {
    let url = PgCluster::shared()
        .create_database()
        .await
        .expect("test database");
    let store = open(&url).await;

    // The same event twice in one group: stored once, counted once.
    let twice = [event("evt_twice", "cus_twice")];
    let stored = store
        .store_inbox_many(&[("stripe", &twice, None), ("stripe", &twice, None)])
        .await
        .expect("stored");
    assert_eq!(stored, [1, 0]);

    // Another writer holds `evt_race`, not yet committed.
    let raw = sqlx::PgPool::connect(&url).await.expect("raw pool");
    let mut other = raw.begin().await.expect("transaction");
    sqlx::query(
        "INSERT INTO inbox (connector, event_id, entity, kind, remote_id, occurred_at_ms, \
         remote_type, state, next_attempt_at_ms, received_at, published_at_ms) \
         VALUES ('stripe', 'evt_race', 'customer', 'upsert', 'cus_race', 1, \
         'customer.updated', 'pending', 0, now(), 0)",
    )
    .execute(&mut *other)
    .await
    .expect("held insert");
    let ingest = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .store_inbox_many(&[(
                    "stripe",
                    &[
                        event("evt_race", "cus_race"),
                        event("evt_fresh", "cus_fresh"),
                    ],
                    None,
                )])
                .await
        }
    });
    // The insert waits on the held row's unique key until it commits.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !ingest.is_finished(),
        "the insert waits for the other writer"
    );
    other.commit().await.expect("commit");
    let stored = ingest.await.expect("task").expect("stored");
    assert_eq!(stored, [1], "only evt_fresh is new");

    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_id, COUNT(*) FROM inbox GROUP BY event_id ORDER BY event_id")
            .fetch_all(&raw)
            .await
            .expect("rows");
    assert_eq!(
        rows,
        [
            ("evt_fresh".to_owned(), 1),
            ("evt_race".to_owned(), 1),
            ("evt_twice".to_owned(), 1)
        ]
    );
}
