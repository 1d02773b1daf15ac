//! The sync path's batched store statements, driven at the store: on
//! PostgreSQL a group is written as one statement per table, and it must
//! answer each write exactly as the one-by-one path does (which SQLite
//! runs): the inbound apply's changes, including the changes that raced and
//! a lost lease, and the pushes' link writes; the claim that marks creates
//! and the relay's intake of the outbox queue, one statement each there.

use std::collections::BTreeMap;

use ferry::store::conflicts::{Conflict, ListConflicts};
use ferry::store::inbox::{
    Applied, CustomerWrite, InboundChange, InboxEvent, InboxFinish, LinkRead, NewConflict,
    NewInboxEvent, RemoteChange,
};
use ferry::store::links::LinkWrite;
use ferry::store::reconciliations::ForcedBy;
use ferry::store::{
    customers::WriteContext, Address, ChangeNotice, ClaimedLink, Customer, CustomerFields,
    CustomerId, LinkState, RecordedOutcome, Store, StoreError, StoreOptions, SyncLink,
};
use ferry::sync::outbound::{canonical_record, kept_record};
use ferry_test_support::postgres::PgCluster;
use serde_json::json;

use crate::helpers::email;

async fn store(postgres: bool) -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    (open(&url).await, dir)
}

/// A fresh database: on the shared PostgreSQL cluster, or a SQLite file
/// in `dir`.
async fn database_url(postgres: bool, dir: &std::path::Path) -> String {
    if postgres {
        PgCluster::shared()
            .create_database()
            .await
            .expect("test database")
    } else {
        format!("sqlite://{}", dir.join("ferry.db").display())
    }
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
        link_read: None,
        customer,
        link_customer: link.cloned(),
        unlink_customer: None,
        releases: None,
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

/// Cluster mode's grace: the inbox loop leaves a fresh event to the Kafka
/// consumer for `grace_ms`, but takes at once one that was looked at
/// already (deferred with a reason: a conflict's hold, a connector not
/// loaded), which is not on the bus again. It used to wait the grace too,
/// a minute by default, after every deferral.
async fn a_deferred_event_skips_the_grace(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    // A replica with a bus: its fresh events are the bus's for the grace
    // (one without stores them as no bus will carry them: no grace).
    let options = StoreOptions {
        inbox_bus: true,
        ..StoreOptions::default()
    };
    let store = Store::connect(&url, &options).await.expect("store");
    store.migrate().await.expect("migrations");
    let deferred = claimed(&store, &["cus_deferred".to_owned()]).await;
    let now = chrono::Utc::now().timestamp_millis();
    let finish = InboxFinish::Deferred {
        detail: "waiting: the link is held by open conflict cf_x",
        at_ms: now - 1,
    };
    assert!(store
        .finish_inbox(&deferred[0], finish)
        .await
        .expect("deferred"));
    store
        .store_inbox_many(&[("stripe", &[event("evt_fresh", "cus_fresh")], None)])
        .await
        .expect("stored");

    let until = now + 60_000;
    let taken = store
        .claim_due_inbox("lease-b", until, 100, 60_000, i64::MIN)
        .await
        .expect("claimed");
    let taken: Vec<&str> = taken.iter().map(|e| e.remote_id.as_str()).collect();
    assert_eq!(taken, ["cus_deferred"], "the fresh one waits its grace");
}

#[tokio::test]
async fn postgres_a_deferred_event_skips_the_grace() {
    a_deferred_event_skips_the_grace(true).await;
}

#[tokio::test]
async fn sqlite_a_deferred_event_skips_the_grace() {
    a_deferred_event_skips_the_grace(false).await;
}

/// The link of `remote_id` as a decision reads it.
async fn link_read(store: &Store, remote_id: &str) -> LinkRead {
    let link = store
        .link_by_remote_id("stripe", remote_id)
        .await
        .expect("link read")
        .expect("linked");
    LinkRead::from(&link)
}

/// Two customers, each linked by an applied event (at 1,000 ms) to a
/// remote record of its own (`cus_{tag}_0` and `_1`): the customers, the
/// remote ids and the links as a decision reads them.
async fn two_linked(store: &Store, tag: &str) -> (Vec<Customer>, Vec<String>, Vec<LinkRead>) {
    let mut customers = Vec::new();
    for name in ["First", "Second"] {
        let context = WriteContext {
            correlation_id: None,
            idempotency: None,
        };
        let customer = store
            .create_customer(fields(&email(name), name), context)
            .await
            .expect("customer");
        customers.push(customer);
    }
    let remote: Vec<String> = (0..2).map(|i| format!("cus_{tag}_{i}")).collect();
    let events = claimed(store, &remote).await;
    let linked = store
        .apply_inbound_many(&[
            change(&events[0], CustomerWrite::None, Some(&customers[0].id)),
            change(&events[1], CustomerWrite::None, Some(&customers[1].id)),
        ])
        .await
        .expect("linked");
    assert!(
        linked.iter().all(|r| matches!(r, Ok(Applied::Done(None)))),
        "{linked:?}"
    );
    let mut reads = Vec::new();
    for remote_id in &remote {
        reads.push(link_read(store, remote_id).await);
    }
    (customers, remote, reads)
}

/// Whether no link holds Stripe record `remote_id`.
async fn unlinked(store: &Store, remote_id: &str) -> bool {
    store
        .link_by_remote_id("stripe", remote_id)
        .await
        .expect("link read")
        .is_none()
}

/// Stores a later event (at 2,000 ms) per `(event id, remote id)` and
/// claims every due event.
/// The open dead letters (ten at most: a test's own).
async fn open_letters(store: &Store) -> Vec<ferry::store::DeadLetter> {
    store
        .dead_letters(&ferry::store::ListDeadLetters {
            limit: 10,
            ..ferry::store::ListDeadLetters::default()
        })
        .await
        .expect("letters")
}

async fn claim_later(store: &Store, later: &[(String, &String)]) -> Vec<InboxEvent> {
    claim_dated(store, later, 2_000).await
}

/// Stores and claims events (id, remote id), dated `occurred_at_ms`.
async fn claim_dated(
    store: &Store,
    later: &[(String, &String)],
    occurred_at_ms: i64,
) -> Vec<InboxEvent> {
    let events: Vec<NewInboxEvent> = later
        .iter()
        .map(|(event_id, remote_id)| NewInboxEvent {
            occurred_at_ms,
            ..event(event_id, remote_id)
        })
        .collect();
    store
        .store_inbox_many(&[("stripe", &events, None)])
        .await
        .expect("stored");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_due_inbox("lease-a", until, 100, 0, i64::MIN)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), later.len());
    claimed
}

/// A remote change renaming `customer` to `name`, decided on the link
/// `read`.
fn renamed_from_remote(
    event: &InboxEvent,
    customer: &Customer,
    name: &str,
    read: Option<LinkRead>,
) -> InboundChange {
    let write = CustomerWrite::Update {
        id: customer.id.clone(),
        expected_version: customer.version,
        fields: fields(&customer.email, name),
    };
    InboundChange {
        link_read: read,
        ..change(event, write, Some(&customer.id))
    }
}

/// A change decided on a link that another loop's write has moved on
/// since (an event of the same record applied between the decision's read
/// of the link and its read of the customer) writes nothing and decides
/// again, in a batch and alone; decided again on the link as it is, it
/// applies.
async fn a_change_whose_link_moved_on_decides_again(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, read) = two_linked(&store, &format!("moved_{postgres}")).await;
    let (first, second) = (&customers[0], &customers[1]);
    assert_eq!(
        read[0],
        LinkRead {
            remote_seen_at_ms: 1_000,
            wanted_version: 0,
            held: false,
            remote_deleted: false,
            pushed_at_ms: 0,
        }
    );
    let later: Vec<(String, &String)> = remote
        .iter()
        .map(|r| (format!("evt_later_{r}"), r))
        .collect();
    let events = claim_later(&store, &later).await;
    // Decided on the link before another write moved it on: raced, in a
    // batch (the other change applies) and alone, as is one decided on no
    // link where one is now.
    let stale = LinkRead {
        remote_seen_at_ms: 500,
        ..read[0]
    };
    let results = store
        .apply_inbound_many(&[
            renamed_from_remote(&events[0], first, "Never", Some(stale)),
            renamed_from_remote(&events[1], second, "Second, renamed", Some(read[1])),
        ])
        .await
        .expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    match &results[1] {
        Ok(Applied::Done(Some(customer))) => {
            assert_eq!(customer.name.as_deref(), Some("Second, renamed"));
        }
        other => panic!("the other change: {other:?}"),
    }
    // Decided before the record's delete was applied under `unlink`
    // (which moves nothing else): it wrote the link live again.
    let before_a_delete = LinkRead {
        remote_deleted: !read[0].remote_deleted,
        ..read[0]
    };
    for read in [Some(stale), Some(before_a_delete), None] {
        let results = store
            .apply_inbound_many(&[renamed_from_remote(&events[0], first, "Never", read)])
            .await
            .expect("applied");
        assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    }
    let unchanged = store.get_customer(&first.id).await.expect("first");
    assert_eq!(
        (unchanged.name.as_deref(), unchanged.version),
        (Some("First"), 1)
    );
    assert_eq!(link_read(&store, &remote[0]).await, read[0]);
    let pending = store
        .inbox_of_remote("stripe", &remote[0])
        .await
        .expect("inbox read");
    assert_eq!(pending[0].state.as_str(), "pending", "left to decide again");

    // Decided again on the link as it is: applied.
    let results = store
        .apply_inbound_many(&[renamed_from_remote(
            &events[0],
            first,
            "First, renamed",
            Some(read[0]),
        )])
        .await
        .expect("applied");
    assert!(
        matches!(results[0], Ok(Applied::Done(Some(_)))),
        "{results:?}"
    );
    assert_eq!(link_read(&store, &remote[0]).await.remote_seen_at_ms, 2_000);
}

/// A record linked by email to a customer whose link another record of
/// the connector took since the decision read it free (two records of one
/// email, applied at once) writes nothing and decides again, in a batch
/// and alone; the link stays with the first record. A change that means
/// to replace that record (the duplicate-email policy `merge`) takes it.
async fn a_second_record_does_not_take_a_link_over(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("takeover_{postgres}");
    let (customers, remote, _) = two_linked(&store, &tag).await;
    let first = &customers[0];
    let (second, third) = (format!("cus_{tag}_second"), format!("cus_{tag}_third"));
    let later = [
        (format!("evt_{second}"), &second),
        (format!("evt_{third}"), &third),
    ];
    let events = claim_later(&store, &later).await;
    let of = |remote_id: &str| {
        events
            .iter()
            .find(|e| e.remote_id == remote_id)
            .expect("claimed event")
    };
    let created = CustomerWrite::Create(fields(&email("Third"), "Third"));
    let results = store
        .apply_inbound_many(&[
            change(of(&second), CustomerWrite::None, Some(&first.id)),
            change(of(&third), created, None),
        ])
        .await
        .expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    assert!(
        matches!(results[1], Ok(Applied::Done(Some(_)))),
        "{results:?}"
    );
    let alone = store
        .apply_inbound_many(&[change(of(&second), CustomerWrite::None, Some(&first.id))])
        .await
        .expect("applied");
    assert!(matches!(alone[0], Ok(Applied::Raced)), "{alone:?}");
    let held = store
        .link_by_remote_id("stripe", &remote[0])
        .await
        .expect("link read")
        .expect("the first record keeps its link");
    assert_eq!(held.customer_id, first.id.as_str());
    assert!(unlinked(&store, &second).await);

    // The first record's newest change is dated after the second's: the
    // link moving to the second record does not keep that date (the
    // second's changes dated in between were skipped as stale).
    let newer = claim_dated(&store, &[(format!("evt_{tag}_newer"), &remote[0])], 9_000).await;
    let read_first = link_read(&store, &remote[0]).await;
    let renamed = store
        .apply_inbound_many(&[renamed_from_remote(
            &newer[0],
            first,
            "First, newer",
            Some(read_first),
        )])
        .await
        .expect("applied");
    assert!(
        matches!(renamed[0], Ok(Applied::Done(Some(_)))),
        "{renamed:?}"
    );
    assert_eq!(link_read(&store, &remote[0]).await.remote_seen_at_ms, 9_000);

    // Meant to replace it: taken.
    let merged = InboundChange {
        releases: Some(remote[0].clone()),
        ..change(of(&second), CustomerWrite::None, Some(&first.id))
    };
    let results = store.apply_inbound_many(&[merged]).await.expect("applied");
    assert!(matches!(results[0], Ok(Applied::Done(None))), "{results:?}");
    let moved = store
        .link_by_remote_id("stripe", &second)
        .await
        .expect("link read")
        .expect("relinked");
    assert_eq!(moved.customer_id, first.id.as_str());
    assert_eq!(moved.remote_seen_at_ms, 2_000, "the second record's date");
    assert!(unlinked(&store, &remote[0]).await);
}

#[tokio::test]
async fn postgres_a_second_record_does_not_take_a_link_over() {
    a_second_record_does_not_take_a_link_over(true).await;
}

#[tokio::test]
async fn sqlite_a_second_record_does_not_take_a_link_over() {
    a_second_record_does_not_take_a_link_over(false).await;
}

/// A record linked by email to a customer the change does not write, and
/// deleted since the decision read it live, decides again, in a batch and
/// alone. Linked, the record stayed with the deleted customer (whose
/// delete had found no record to push and settled the link), and every
/// change of it was skipped for good.
async fn a_record_is_not_linked_to_a_customer_deleted_meanwhile(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("deleted_meanwhile_{postgres}");
    let mut customers = Vec::new();
    for name in ["Gone", "Kept"] {
        let address = email(&format!("{tag}-{name}"));
        let customer = store
            .create_customer(fields(&address, name), WriteContext::default())
            .await
            .expect("customer");
        customers.push(customer);
    }
    let (gone, kept) = (&customers[0], &customers[1]);
    let remote: Vec<String> = (0..2).map(|i| format!("cus_{tag}_{i}")).collect();
    let events = claimed(&store, &remote).await;
    store
        .delete_customer(&gone.id, None, WriteContext::default())
        .await
        .expect("deleted");
    let results = store
        .apply_inbound_many(&[
            change(&events[0], CustomerWrite::None, Some(&gone.id)),
            change(&events[1], CustomerWrite::None, Some(&kept.id)),
        ])
        .await
        .expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    assert!(matches!(results[1], Ok(Applied::Done(None))), "{results:?}");
    let alone = store
        .apply_inbound_many(&[change(&events[0], CustomerWrite::None, Some(&gone.id))])
        .await
        .expect("applied");
    assert!(matches!(alone[0], Ok(Applied::Raced)), "{alone:?}");
    assert!(unlinked(&store, &remote[0]).await);
}

/// A clean stop leaves an embedded database whole in its one file: the
/// readers closed last (read-only, they cannot checkpoint) left every
/// commit since the last checkpoint in `ferry.db-wal` only, and a copy of
/// `ferry.db` alone (a backup, a move to a new volume) lost them.
#[tokio::test]
async fn sqlite_a_clean_stop_leaves_the_database_in_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("ferry.db");
    let store = open(&format!("sqlite://{}", file.display())).await;
    let customer = store
        .create_customer(
            fields(&email("stopped"), "Stopped"),
            WriteContext::default(),
        )
        .await
        .expect("customer");
    store.close().await;
    let wal = dir.path().join("ferry.db-wal");
    assert!(
        std::fs::metadata(&wal).map_or(true, |m| m.len() == 0),
        "{} bytes left in the WAL",
        std::fs::metadata(&wal).map_or(0, |m| m.len())
    );
    let copy = dir.path().join("copy.db");
    std::fs::copy(&file, &copy).expect("copied");
    let copied = open(&format!("sqlite://{}", copy.display())).await;
    let read = copied
        .get_customer(&customer.id)
        .await
        .expect("in the copy");
    assert_eq!(read.name.as_deref(), Some("Stopped"));
}

#[tokio::test]
async fn postgres_a_record_is_not_linked_to_a_customer_deleted_meanwhile() {
    a_record_is_not_linked_to_a_customer_deleted_meanwhile(true).await;
}

#[tokio::test]
async fn sqlite_a_record_is_not_linked_to_a_customer_deleted_meanwhile() {
    a_record_is_not_linked_to_a_customer_deleted_meanwhile(false).await;
}

/// Two events of one record in the same remote tick, decided on the same
/// read of the link by two loops: the first only opens a flagged conflict
/// (it writes no customer, and its date is the link's already), so the
/// link moves on in nothing but its hold. The second decides again.
/// Before, it was applied on the held link, replaced its snapshot and
/// took the hold over: the first conflict stayed open holding nothing.
async fn a_change_decided_before_a_hold_decides_again(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, read) = two_linked(&store, &format!("tick_{postgres}")).await;
    let first = &customers[0];
    let same_tick = [
        (format!("evt_tick_a_{postgres}"), &remote[0]),
        (format!("evt_tick_b_{postgres}"), &remote[0]),
    ];
    let events = claim_dated(&store, &same_tick, read[0].remote_seen_at_ms).await;
    let flagged = InboundChange {
        conflict: Some(NewConflict {
            policy: "flag".into(),
            fields: json!([]),
            open: true,
        }),
        link_read: Some(read[0]),
        ..change(&events[0], CustomerWrite::None, Some(&first.id))
    };
    let held = store.apply_inbound_many(&[flagged]).await.expect("applied");
    assert!(matches!(held[0], Ok(Applied::Done(None))), "{held:?}");
    let now = link_read(&store, &remote[0]).await;
    assert_eq!(
        now,
        LinkRead {
            held: true,
            ..read[0]
        }
    );
    let results = store
        .apply_inbound_many(&[renamed_from_remote(
            &events[1],
            first,
            "Over the hold",
            Some(read[0]),
        )])
        .await
        .expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    let unchanged = store.get_customer(&first.id).await.expect("first");
    assert_eq!(unchanged.name.as_deref(), Some("First"));

    // A second record with the customer's email, flagged on the owner's
    // link by a decision that read it free: it would take the first
    // conflict's hold (whose resolution then released the link while this
    // one waited). It decides again instead, and the first hold stays.
    let holder = store.links_of(first.id.as_str()).await.expect("links")[0]
        .held_by
        .clone();
    let other = format!("cus_tick_other_{postgres}");
    let dup = claim_later(&store, &[(format!("evt_dup_{postgres}"), &other)]).await;
    let duplicate = InboundChange {
        conflict: Some(NewConflict {
            policy: "duplicate_email".into(),
            fields: json!([]),
            open: true,
        }),
        link_remote: false,
        ..change(&dup[0], CustomerWrite::None, Some(&first.id))
    };
    let results = store
        .apply_inbound_many(&[duplicate])
        .await
        .expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    let links = store.links_of(first.id.as_str()).await.expect("links");
    assert!(holder.is_some());
    assert_eq!(links[0].held_by, holder, "the first conflict's hold");

    // So does a duplicate merged into the customer (`merge`) by a decision
    // that read the link free: it moved the held link to its own record,
    // and the conflict about the first record held the second.
    let merged = format!("cus_tick_merged_{postgres}");
    let merge = claim_later(&store, &[(format!("evt_merge_{postgres}"), &merged)]).await;
    let relink = InboundChange {
        releases: Some(remote[0].clone()),
        ..change(&merge[0], CustomerWrite::None, Some(&first.id))
    };
    let results = store.apply_inbound_many(&[relink]).await.expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    let links = store.links_of(first.id.as_str()).await.expect("links");
    assert_eq!(
        (links[0].remote_id.as_deref(), &links[0].held_by),
        (Some(remote[0].as_str()), &holder),
        "the held link stays with its record"
    );
}

/// A reconciliation's forced push marks its finding repaired in the same
/// transaction, and only while the run holds its lease: a run claimed
/// again after a crash between the push and the batch's commit (or by
/// another replica once its lease ran out) found the finding still open
/// and forced the push again, under a new key, the whole record.
async fn a_finding_is_forced_once(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let (customers, _, _) = two_linked(&store, &format!("forced_{postgres}")).await;
    let first = &customers[0];
    store
        .start_run("stripe", "reconcile", "push_local", "api")
        .await
        .expect("stored")
        .expect("no run going");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let run = store
        .claim_run("driver-a", until)
        .await
        .expect("claimed")
        .expect("a run");
    let finding = format!("mm_forced_{postgres}");
    let insert = format!(
        "INSERT INTO reconciliation_mismatches (id, run_id, kind, customer_id, fields, state, \
         created_at) VALUES ('{finding}', '{}', 'different', '{}', '[]', 'open', CURRENT_TIMESTAMP)",
        run.id,
        first.id.as_str()
    );
    crate::helpers::execute_raw(&url, &insert, b"").await;
    let repairs = |links: Vec<SyncLink>| links[0].repairs;
    let before = repairs(store.links_of(first.id.as_str()).await.expect("links"));

    // Another driver's token (the lease ran out, the run was claimed
    // again): nothing forced.
    let stale = ferry::store::reconciliations::RunRow {
        lease_token: Some("driver-gone".into()),
        ..run.clone()
    };
    let force = |run, finding, by| {
        let what = "push of version 1 scheduled";
        store.force_push_for(run, finding, by, what, first.id.as_str(), 1, None)
    };
    assert_eq!(
        force(&stale, &finding, ForcedBy::Run).await.expect("ran"),
        None
    );
    assert_eq!(
        force(&run, &finding, ForcedBy::Run).await.expect("ran"),
        Some(true)
    );
    // The run again after a crash: the finding is repaired already.
    assert_eq!(
        force(&run, &finding, ForcedBy::Run).await.expect("ran"),
        None
    );
    let after = repairs(store.links_of(first.id.as_str()).await.expect("links"));
    assert_eq!(after, before + 1, "forced once");
    let open = store
        .mismatches(&run.id, None, Some("open"), None, 10)
        .await
        .expect("findings");
    assert!(open.is_empty(), "{open:?}");

    // A person's resolution: the push and its description go together,
    // while the finding holds the resolution's claim. A process that died
    // between them left the claim, opened again once stalled, and
    // resolved again forced a second push.
    let by_hand = format!("mm_by_hand_{postgres}");
    let insert = insert.replace(&finding, &by_hand);
    crate::helpers::execute_raw(&url, &insert, b"").await;
    let claim = ferry::store::reconciliations::scheduling_claim("push_local");
    assert!(store
        .settle_mismatch(&by_hand, "resolved", &claim)
        .await
        .expect("claimed"));
    let by_claim = || ForcedBy::Claim(&claim);
    assert_eq!(
        force(&run, &by_hand, by_claim()).await.expect("ran"),
        Some(true)
    );
    assert_eq!(force(&run, &by_hand, by_claim()).await.expect("ran"), None);
    let stalled = store
        .reopen_stalled_resolutions(chrono::Utc::now() + chrono::Duration::hours(1))
        .await
        .expect("swept");
    assert_eq!(stalled, 0, "described with its push: not stalled");
    let after_hand = repairs(store.links_of(first.id.as_str()).await.expect("links"));
    assert_eq!(after_hand, before + 2, "forced once more");
}

#[tokio::test]
async fn postgres_a_finding_is_forced_once() {
    a_finding_is_forced_once(true).await;
}

#[tokio::test]
async fn sqlite_a_finding_is_forced_once() {
    a_finding_is_forced_once(false).await;
}

#[tokio::test]
async fn postgres_a_change_decided_before_a_hold_decides_again() {
    a_change_decided_before_a_hold_decides_again(true).await;
}

#[tokio::test]
async fn sqlite_a_change_decided_before_a_hold_decides_again() {
    a_change_decided_before_a_hold_decides_again(false).await;
}

/// A change decided on the link before a push to its record was recorded
/// as delivered writes nothing and decides again: it put back the snapshot
/// from before the push, the base every later change of the record is
/// merged against (a later edit then made a false conflict, or lost the
/// local value under last-writer-wins).
async fn a_change_decided_before_a_push_was_recorded_decides_again(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, _) = two_linked(&store, &format!("pushed_{postgres}")).await;
    let first = &customers[0];
    let keys = store
        .intake_changes(
            &[ChangeNotice {
                customer_id: first.id.as_str().to_owned(),
                version: first.version,
                correlation_id: None,
                outbox_id: None,
                source_connector: None,
            }],
            &["stripe".to_owned()],
        )
        .await
        .expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let link = store
        .claim_links(&keys, &[], "lease-push", until)
        .await
        .expect("claimed")
        .pop()
        .expect("the first customer's link")
        .link;
    let decided_on = link_read(&store, &remote[0]).await;
    let events = claim_later(&store, &[(format!("evt_pushed_{postgres}"), &remote[0])]).await;
    let pushed = LinkWrite::Outcome(RecordedOutcome::Delivered {
        operation: "update",
        version: link.wanted_version,
        remote_id: remote[0].clone(),
        remote_deleted: false,
        pushed_hash: "pushed".to_owned(),
        snapshot: Some(json!({"email": first.email, "name": "Pushed"})),
        snapshot_base: None,
    });
    assert_eq!(
        store
            .write_links(&[(&link, &pushed)])
            .await
            .expect("written"),
        [true]
    );
    for alone in [false, true] {
        let mut changes = vec![renamed_from_remote(
            &events[0],
            first,
            "Never",
            Some(decided_on),
        )];
        if !alone {
            let other = claim_later(
                &store,
                &[(format!("evt_pushed_other_{postgres}"), &remote[1])],
            )
            .await;
            let read = link_read(&store, &remote[1]).await;
            changes.push(renamed_from_remote(
                &other[0],
                &customers[1],
                "Second, renamed",
                Some(read),
            ));
        }
        let results = store.apply_inbound_many(&changes).await.expect("applied");
        assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    }
    let now = store
        .link_by_remote_id("stripe", &remote[0])
        .await
        .expect("link read")
        .expect("linked");
    assert_eq!(
        now.snapshot.as_ref().map(|s| &s["name"]),
        Some(&json!("Pushed"))
    );
}

#[tokio::test]
async fn postgres_a_change_decided_before_a_push_was_recorded_decides_again() {
    a_change_decided_before_a_push_was_recorded_decides_again(true).await;
}

#[tokio::test]
async fn sqlite_a_change_decided_before_a_push_was_recorded_decides_again() {
    a_change_decided_before_a_push_was_recorded_decides_again(false).await;
}

#[tokio::test]
async fn postgres_a_change_whose_link_moved_on_decides_again() {
    a_change_whose_link_moved_on_decides_again(true).await;
}

#[tokio::test]
async fn sqlite_a_change_whose_link_moved_on_decides_again() {
    a_change_whose_link_moved_on_decides_again(false).await;
}

/// A remote delete of a customer whose link an open conflict holds: the
/// delete closes the conflict (`customer_deleted`) and releases the link in
/// its own transaction, so that the delete can be pushed (the API's delete
/// does the same: `conflicts::deleting_a_customer_closes_its_conflicts`).
async fn a_remote_delete_closes_the_customers_conflicts(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, reads) = two_linked(&store, &format!("held_{postgres}")).await;
    let later = [
        (format!("evt_held_{postgres}"), &remote[0]),
        (format!("evt_gone_{postgres}"), &remote[0]),
    ];
    let events = claim_later(&store, &later).await;
    let first = &customers[0];
    let flagged = InboundChange {
        conflict: Some(NewConflict {
            policy: "flag".into(),
            fields: json!([]),
            open: true,
        }),
        link_read: Some(reads[0]),
        ..change(&events[0], CustomerWrite::None, Some(&first.id))
    };
    let held = store.apply_inbound_many(&[flagged]).await.expect("applied");
    assert!(matches!(held[0], Ok(Applied::Done(None))), "{held:?}");
    let held_by = || async {
        store
            .link_by_remote_id("stripe", &remote[0])
            .await
            .expect("link read")
            .expect("linked")
            .held_by
    };
    assert!(held_by().await.is_some());

    let delete = CustomerWrite::Delete {
        id: first.id.clone(),
        expected_version: first.version,
    };
    let deleting = InboundChange {
        link_read: Some(link_read(&store, &remote[0]).await),
        ..change(&events[1], delete, Some(&first.id))
    };
    let deleted = store
        .apply_inbound_many(&[deleting])
        .await
        .expect("applied");
    assert!(
        matches!(deleted[0], Ok(Applied::Done(Some(_)))),
        "{deleted:?}"
    );
    assert_eq!(held_by().await, None);
    let closed: Vec<(String, Option<String>)> = store
        .conflicts(&ListConflicts {
            customer_id: Some(first.id.as_str().to_owned()),
            limit: 10,
            ..ListConflicts::default()
        })
        .await
        .expect("conflicts")
        .into_iter()
        .map(|c| (c.state, c.resolution))
        .collect();
    assert_eq!(
        closed,
        [("resolved".to_owned(), Some("customer_deleted".to_owned()))]
    );
}

#[tokio::test]
async fn postgres_a_remote_delete_closes_the_customers_conflicts() {
    a_remote_delete_closes_the_customers_conflicts(true).await;
}

#[tokio::test]
async fn sqlite_a_remote_delete_closes_the_customers_conflicts() {
    a_remote_delete_closes_the_customers_conflicts(false).await;
}

/// A flagged conflict decided on a customer that a delete removed before
/// the write (the delete's own closing of open conflicts found none yet):
/// decided again, not written. Before, the conflict was opened on the
/// deleted customer and held its link for good: the delete never reached
/// the remote, and the conflict could not be resolved (its customer is
/// gone).
async fn a_conflict_on_a_customer_deleted_meanwhile_decides_again(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, reads) = two_linked(&store, &format!("gone_{postgres}")).await;
    let events = claim_later(&store, &[(format!("evt_gone_held_{postgres}"), &remote[0])]).await;
    let first = &customers[0];
    let ctx = WriteContext {
        correlation_id: None,
        idempotency: None,
    };
    store
        .delete_customer(&first.id, None, ctx)
        .await
        .expect("deleted");
    let flagged = InboundChange {
        conflict: Some(NewConflict {
            policy: "flag".into(),
            fields: json!([]),
            open: true,
        }),
        link_read: Some(reads[0]),
        ..change(&events[0], CustomerWrite::None, Some(&first.id))
    };
    let results = store.apply_inbound_many(&[flagged]).await.expect("applied");
    assert!(matches!(results[0], Ok(Applied::Raced)), "{results:?}");
    let link = store
        .link_by_remote_id("stripe", &remote[0])
        .await
        .expect("link read")
        .expect("linked");
    assert_eq!(link.held_by, None);
    let open = store
        .conflicts(&ListConflicts {
            customer_id: Some(first.id.as_str().to_owned()),
            limit: 10,
            ..ListConflicts::default()
        })
        .await
        .expect("conflicts");
    assert!(open.is_empty(), "{open:?}");
}

#[tokio::test]
async fn postgres_a_conflict_on_a_customer_deleted_meanwhile_decides_again() {
    a_conflict_on_a_customer_deleted_meanwhile_decides_again(true).await;
}

#[tokio::test]
async fn sqlite_a_conflict_on_a_customer_deleted_meanwhile_decides_again() {
    a_conflict_on_a_customer_deleted_meanwhile_decides_again(false).await;
}

/// A remote change the remote does not hold whole once merged (an owned
/// field kept, a conflict resolved for ferry's value, a local change not
/// pushed yet) leaves its customer at a version the remote lacks. The
/// relay's intake leaves the source connector's link to the apply, so the
/// apply's own write must leave it pending: an existing synced link and a
/// link it inserts, in a batch and one at a time. Without it the version
/// was never pushed back (the link stayed synced below its wanted version).
async fn a_result_the_remote_lacks_is_pushed_back(postgres: bool, batched: bool) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("lacks_{postgres}_{batched}");
    let (customers, remote, read) = two_linked(&store, &tag).await;
    let third = store
        .create_customer(fields(&email("third"), "Third"), WriteContext::default())
        .await
        .expect("customer");
    let unlinked = format!("cus_{tag}_new");
    let later = [
        (format!("evt_{tag}_0"), &remote[0]),
        (format!("evt_{tag}_new"), &unlinked),
    ];
    let events = claim_later(&store, &later).await;
    let lacking = |change: InboundChange| InboundChange {
        remote_has_result: false,
        ..change
    };
    let changes = [
        lacking(renamed_from_remote(
            &events[0],
            &customers[0],
            "Kept",
            Some(read[0]),
        )),
        lacking(renamed_from_remote(&events[1], &third, "Kept too", None)),
    ];
    let results = if batched {
        store.apply_inbound_many(&changes).await.expect("applied")
    } else {
        let mut results = Vec::new();
        for change in changes {
            results.extend(store.apply_inbound_many(&[change]).await.expect("applied"));
        }
        results
    };
    let written: Vec<Customer> = results
        .into_iter()
        .map(|result| match result {
            Ok(Applied::Done(Some(customer))) => *customer,
            other => panic!("apply: {other:?}"),
        })
        .collect();
    for customer in &written {
        let link = store
            .links_of(customer.id.as_str())
            .await
            .expect("links")
            .into_iter()
            .find(|l| l.connector == "stripe")
            .expect("the link the apply wrote");
        assert_eq!(
            (link.state, link.wanted_version, link.synced_version),
            (LinkState::Pending, customer.version, 0),
            "{}",
            customer.id.as_str()
        );
    }

    // The intake schedules the other connector (and Stripe for the second
    // linked customer's own create) and leaves these links as the apply
    // wrote them; a push claims them.
    let connectors = ["salesforce".to_owned(), "stripe".to_owned()];
    store.intake_queued(10, &connectors).await.expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let mut claimed: Vec<(String, i64)> = store
        .claim_due_links(None, &connectors, "lease-push", until, 20)
        .await
        .expect("claimed")
        .into_iter()
        .filter(|c| {
            c.link.connector == "stripe"
                && written.iter().any(|w| w.id.as_str() == c.link.customer_id)
        })
        .map(|c| (c.link.customer_id, c.link.wanted_version))
        .collect();
    let mut expected: Vec<(String, i64)> = written
        .iter()
        .map(|c| (c.id.as_str().to_owned(), c.version))
        .collect();
    expected.sort();
    claimed.sort();
    assert_eq!(claimed, expected);
}

#[tokio::test]
async fn postgres_a_result_the_remote_lacks_is_pushed_back_from_a_batch() {
    a_result_the_remote_lacks_is_pushed_back(true, true).await;
}

#[tokio::test]
async fn postgres_a_result_the_remote_lacks_is_pushed_back_alone() {
    a_result_the_remote_lacks_is_pushed_back(true, false).await;
}

#[tokio::test]
async fn sqlite_a_result_the_remote_lacks_is_pushed_back_from_a_batch() {
    a_result_the_remote_lacks_is_pushed_back(false, true).await;
}

#[tokio::test]
async fn sqlite_a_result_the_remote_lacks_is_pushed_back_alone() {
    a_result_the_remote_lacks_is_pushed_back(false, false).await;
}

/// Claims due Stripe links under `lease` (a minute's); the one of customer
/// `id`, which must be among them.
async fn stripe_link_claimed(store: &Store, lease: &str, id: &str) -> SyncLink {
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    store
        .claim_due_links(None, &["stripe".to_owned()], lease, until, 20)
        .await
        .expect("claimed")
        .into_iter()
        .find(|c| c.link.customer_id == id)
        .unwrap_or_else(|| panic!("{id}'s link is due"))
        .link
}

/// A push forced while another push of the link is out (an inbound merge
/// kept a value the remote lacks, a repair) is still to go when that push's
/// result is written: the link stays pending, with no pushed hash and the
/// snapshot the force left; a version raised meanwhile is never lowered.
/// In a batch and alone (a second write of the link in its group). Before,
/// the result marked the link synced with its own hash and snapshot, and
/// the forced push never went.
async fn a_push_forced_meanwhile_still_goes(postgres: bool, batched: bool) {
    forced_meanwhile(postgres, batched, Ended::Delivered).await;
}

/// [`a_push_forced_meanwhile_still_goes`], for a push that found nothing
/// to send (its plan read the link before the force): the skip does not
/// settle the forced push either.
async fn a_skip_does_not_settle_a_push_forced_meanwhile(postgres: bool) {
    forced_meanwhile(postgres, true, Ended::Skipped).await;
}

/// Nor does a dead letter (the push's last attempt failed): the forced
/// push was lost with the link dead, its finding marked repaired.
async fn a_dead_letter_does_not_end_a_push_forced_meanwhile(postgres: bool) {
    forced_meanwhile(postgres, true, Ended::DeadLettered).await;
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ended {
    Delivered,
    Skipped,
    DeadLettered,
}

async fn forced_meanwhile(postgres: bool, batched: bool, ended: Ended) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("forced_{postgres}_{batched}_{ended:?}");
    let (customers, remote, _) = two_linked(&store, &tag).await;
    let customer = &customers[0];
    let id = customer.id.as_str();
    let stripe = ["stripe".to_owned()];
    assert!(store
        .force_push(id, "stripe", customer.version)
        .await
        .expect("forced"));
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let link = stripe_link_claimed(&store, "lease-forced", id).await;
    let before = store.links_of(id).await.expect("links")[0].snapshot.clone();
    // Forced again while the first push is out.
    assert!(store
        .force_push(id, "stripe", customer.version)
        .await
        .expect("forced"));
    let delivered = LinkWrite::Outcome(match ended {
        Ended::Skipped => RecordedOutcome::Skipped {
            version: customer.version,
            reason: "content unchanged since the last push".to_owned(),
            mark_synced: true,
        },
        Ended::DeadLettered => RecordedOutcome::DeadLettered {
            version: customer.version,
            operation: Some("update"),
            attempt: 5,
            error_kind: ferry::store::DeadLetterKind::RetriesExhausted,
            error: "the remote kept failing".to_owned(),
            settle_ms: 0,
        },
        Ended::Delivered => RecordedOutcome::Delivered {
            operation: "update",
            version: customer.version,
            remote_id: remote[0].clone(),
            remote_deleted: false,
            pushed_hash: "hash-of-the-first-push".to_owned(),
            snapshot: Some(json!({"id": remote[0], "name": "as the first push left it"})),
            snapshot_base: None,
        },
    });
    let marker = LinkWrite::CreatePending {
        version: customer.version,
        record: json!({}),
    };
    let writes: Vec<(&SyncLink, &LinkWrite)> = if batched {
        vec![(&link, &delivered)]
    } else {
        // The first write of the link goes in the batch; the result, its
        // second, one by one.
        vec![(&link, &marker), (&link, &delivered)]
    };
    let applied = store.write_links(&writes).await.expect("written");
    assert!(applied.iter().all(|a| *a), "{applied:?}");
    let after = store.links_of(id).await.expect("links").remove(0);
    assert_eq!(
        (after.state, after.pushed_hash.as_deref()),
        (LinkState::Pending, None),
        "{after:?}"
    );
    assert!(after.synced_version < customer.version, "{after:?}");
    assert_eq!(after.snapshot, before, "{after:?}");
    assert_eq!(after.repairs, link.repairs + 1, "{after:?}");
    let again = store
        .claim_due_links(None, &stripe, "lease-again", until, 20)
        .await
        .expect("claimed");
    assert!(
        again.iter().any(|c| c.link.customer_id == id),
        "the forced push is due"
    );
}

/// `customer`'s Stripe link dead after a forced update timed out on its
/// last attempt, waiting a minute for it to settle (it may still land).
async fn dead_after_an_update_timed_out(store: &Store, customer: &Customer) -> SyncLink {
    let id = customer.id.as_str();
    assert!(store
        .force_push(id, "stripe", customer.version)
        .await
        .expect("forced"));
    let link = stripe_link_claimed(store, "lease-settle", id).await;
    let died = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: customer.version,
        operation: Some("update"),
        attempt: 10,
        error_kind: ferry::store::DeadLetterKind::RetriesExhausted,
        error: "timed out".to_owned(),
        settle_ms: 60_000,
    });
    assert_eq!(
        store.write_links(&[(&link, &died)]).await.expect("written"),
        [true]
    );
    let dead = store.links_of(id).await.expect("links").remove(0);
    assert_eq!(dead.state, LinkState::Dead, "{dead:?}");
    dead
}

/// A push forced onto a link whose last update died unanswered (timed out:
/// the request may still land) waits for that update to settle, as a new
/// change or a replay does: sent at once, it could land first, and the late
/// update put the older values back at the remote.
async fn a_forced_push_waits_for_a_dead_update_to_settle(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, _, _) = two_linked(&store, &format!("settle_{postgres}")).await;
    let customer = &customers[0];
    let id = customer.id.as_str();
    let dead = dead_after_an_update_timed_out(&store, customer).await;
    for _ in 0..2 {
        // A repair's forced push, and an inbound merge's push back, alike.
        assert!(store
            .force_push(id, "stripe", customer.version)
            .await
            .expect("forced"));
        let forced = store.links_of(id).await.expect("links").remove(0);
        assert_eq!(forced.state, LinkState::Pending, "{forced:?}");
        assert!(
            forced.next_attempt_at_ms >= dead.next_attempt_at_ms,
            "due before the dead update settles: {forced:?}"
        );
    }
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let due = store
        .claim_due_links(None, &["stripe".to_owned()], "lease-early", until, 20)
        .await
        .expect("claimed");
    assert!(!due.iter().any(|c| c.link.customer_id == id), "{due:?}");
}

/// An inbound merge that keeps a value the remote lacks reopens a dead link
/// to push it back: that push waits for the dead update to settle too. The
/// link's upsert, which runs first, made it due at once.
async fn an_inbound_push_back_waits_for_a_dead_update_to_settle(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, _) = two_linked(&store, &format!("back_{postgres}")).await;
    let customer = &customers[0];
    let id = customer.id.as_str();
    let dead = dead_after_an_update_timed_out(&store, customer).await;
    let events = claim_later(&store, &[(format!("evt_back_{postgres}"), &remote[0])]).await;
    let read = link_read(&store, &remote[0]).await;
    let merged = InboundChange {
        remote_has_result: false,
        push_back: Some(customer.version + 1),
        ..renamed_from_remote(&events[0], customer, "Merged", Some(read))
    };
    let results = store.apply_inbound_many(&[merged]).await.expect("applied");
    assert!(
        matches!(results[0], Ok(Applied::Done(Some(_)))),
        "{results:?}"
    );
    let reopened = store.links_of(id).await.expect("links").remove(0);
    assert_eq!(reopened.state, LinkState::Pending, "{reopened:?}");
    assert!(
        reopened.next_attempt_at_ms >= dead.next_attempt_at_ms,
        "due before the dead update settles: {reopened:?}"
    );
}

#[tokio::test]
async fn postgres_an_inbound_push_back_waits_for_a_dead_update_to_settle() {
    an_inbound_push_back_waits_for_a_dead_update_to_settle(true).await;
}

#[tokio::test]
async fn sqlite_an_inbound_push_back_waits_for_a_dead_update_to_settle() {
    an_inbound_push_back_waits_for_a_dead_update_to_settle(false).await;
}

#[tokio::test]
async fn postgres_a_forced_push_waits_for_a_dead_update_to_settle() {
    a_forced_push_waits_for_a_dead_update_to_settle(true).await;
}

#[tokio::test]
async fn sqlite_a_forced_push_waits_for_a_dead_update_to_settle() {
    a_forced_push_waits_for_a_dead_update_to_settle(false).await;
}

#[tokio::test]
async fn postgres_a_push_forced_meanwhile_still_goes_from_a_batch() {
    a_push_forced_meanwhile_still_goes(true, true).await;
}

#[tokio::test]
async fn postgres_a_push_forced_meanwhile_still_goes_alone() {
    a_push_forced_meanwhile_still_goes(true, false).await;
}

#[tokio::test]
async fn sqlite_a_push_forced_meanwhile_still_goes_from_a_batch() {
    a_push_forced_meanwhile_still_goes(false, true).await;
}

#[tokio::test]
async fn sqlite_a_push_forced_meanwhile_still_goes_alone() {
    a_push_forced_meanwhile_still_goes(false, false).await;
}

#[tokio::test]
async fn postgres_a_skip_does_not_settle_a_push_forced_meanwhile() {
    a_skip_does_not_settle_a_push_forced_meanwhile(true).await;
}

#[tokio::test]
async fn sqlite_a_skip_does_not_settle_a_push_forced_meanwhile() {
    a_skip_does_not_settle_a_push_forced_meanwhile(false).await;
}

/// A reconciliation's recreate takes over a link whose push outlived its
/// lease: the push's late outcome is refused. Before, the token stayed,
/// and a late dead letter ended the recreate (the link dead, its finding
/// marked repaired).
async fn a_late_outcome_does_not_end_a_recreate(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (customers, remote, _) = two_linked(&store, &format!("recreated_{postgres}")).await;
    let customer = &customers[0];
    let id = customer.id.as_str();
    assert!(store
        .force_push(id, "stripe", customer.version)
        .await
        .expect("forced"));
    let until = chrono::Utc::now().timestamp_millis() + 50;
    let link = store
        .claim_due_links(None, &["stripe".to_owned()], "lease-late", until, 20)
        .await
        .expect("claimed")
        .into_iter()
        .find(|c| c.link.customer_id == id)
        .expect("due")
        .link;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(store
        .recreate_remote(id, "stripe", customer.version, Some(&remote[0]))
        .await
        .expect("recreated"));
    let late = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: customer.version,
        operation: Some("update"),
        attempt: 1,
        error_kind: ferry::store::DeadLetterKind::NotFound,
        error: "no such customer".to_owned(),
        settle_ms: 0,
    });
    let applied = store.write_links(&[(&link, &late)]).await.expect("written");
    assert_eq!(applied, [false]);
    let after = store.links_of(id).await.expect("links").remove(0);
    assert_eq!(
        (after.state, after.remote_id.as_deref()),
        (LinkState::Pending, None),
        "{after:?}"
    );
}

#[tokio::test]
async fn postgres_a_late_outcome_does_not_end_a_recreate() {
    a_late_outcome_does_not_end_a_recreate(true).await;
}

#[tokio::test]
async fn sqlite_a_late_outcome_does_not_end_a_recreate() {
    a_late_outcome_does_not_end_a_recreate(false).await;
}

#[tokio::test]
async fn postgres_a_dead_letter_does_not_end_a_push_forced_meanwhile() {
    a_dead_letter_does_not_end_a_push_forced_meanwhile(true).await;
}

#[tokio::test]
async fn sqlite_a_dead_letter_does_not_end_a_push_forced_meanwhile() {
    a_dead_letter_does_not_end_a_push_forced_meanwhile(false).await;
}

/// A message takes off the queue only the outbox row that announced its
/// change: one whose id names another change's row (two deployments
/// sharing a topic and a consumer group, both counting outbox ids from 1;
/// a database restored behind its consumers) left that change with no
/// message and no queue row for the safety net to find.
async fn a_message_consumes_only_the_row_of_its_own_change(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let ours = store
        .create_customer(fields(&email("ours"), "Ours"), WriteContext::default())
        .await
        .expect("created");
    let row: i64 = raw_count(&url, "SELECT MAX(outbox_id) FROM outbox_queue").await;
    let stripe = ["stripe".to_owned()];
    let foreign = |customer_id: &str, version: i64| ChangeNotice {
        customer_id: customer_id.to_owned(),
        version,
        correlation_id: None,
        outbox_id: Some(row),
        source_connector: None,
    };
    for (customer_id, version) in [("cus_of_another_deployment", 1), (ours.id.as_str(), 7)] {
        store
            .intake_changes(&[foreign(customer_id, version)], &stripe)
            .await
            .expect("intake");
        assert_eq!(
            raw_count(&url, "SELECT COUNT(*) FROM outbox_queue").await,
            1,
            "{customer_id} v{version} left our change queued"
        );
    }
    store
        .intake_changes(&[foreign(ours.id.as_str(), ours.version)], &stripe)
        .await
        .expect("intake");
    assert_eq!(
        raw_count(&url, "SELECT COUNT(*) FROM outbox_queue").await,
        0,
        "its own message consumes it"
    );
}

#[tokio::test]
async fn postgres_a_message_consumes_only_the_row_of_its_own_change() {
    a_message_consumes_only_the_row_of_its_own_change(true).await;
}

#[tokio::test]
async fn sqlite_a_message_consumes_only_the_row_of_its_own_change() {
    a_message_consumes_only_the_row_of_its_own_change(false).await;
}

/// A bundled version rebuilt under the same number without the `customer`
/// entity, while it is active and links go through it, is held back as a
/// newer such version is: its bytes replaced the active ones (and every
/// replica loaded them), and those links' pushes were skipped as settled.
async fn a_rebuild_that_drops_customers_keeps_the_active_bytes(postgres: bool) {
    use ferry::store::connectors::{NewVersion, Seeded, VersionSource};
    let (store, _dir) = store(postgres).await;
    let seed = |sha256: &'static str, entities: serde_json::Value| {
        let store = &store;
        async move {
            let manifest =
                serde_json::json!({"name": "bundled", "version": "0.1.0", "entities": entities});
            store
                .seed_connector_version(
                    &NewVersion {
                        name: "bundled",
                        version: "0.1.0",
                        sha256,
                        world: "0.2.0",
                        manifest: &manifest,
                        component: sha256.as_bytes(),
                        source: VersionSource::Bundled,
                        uploaded_by: "test",
                    },
                    entities.as_array().is_some_and(|e| !e.is_empty()),
                )
                .await
                .expect("seeded")
        }
    };
    assert_eq!(
        seed("aaaa", serde_json::json!(["customer"])).await,
        Seeded::Stored { activated: true }
    );
    let customer = store
        .create_customer(
            fields(&email("bundled"), "Bundled"),
            WriteContext::default(),
        )
        .await
        .expect("created");
    store
        .intake_changes(&[notice(&customer)], &["bundled".to_owned()])
        .await
        .expect("queued");
    assert_eq!(
        seed("bbbb", serde_json::json!([])).await,
        Seeded::HeldBack { linked: 1 }
    );
    let kept = store
        .connector_version("bundled", "0.1.0")
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(kept.sha256, "aaaa");
}

#[tokio::test]
async fn postgres_a_rebuild_that_drops_customers_keeps_the_active_bytes() {
    a_rebuild_that_drops_customers_keeps_the_active_bytes(true).await;
}

#[tokio::test]
async fn sqlite_a_rebuild_that_drops_customers_keeps_the_active_bytes() {
    a_rebuild_that_drops_customers_keeps_the_active_bytes(false).await;
}

/// A newer version of a link in backoff starts its own count of attempts
/// (by the relay's intake, on the bus and off the queue alike): it
/// inherited the older one's, and one transient failure of a version the
/// user had just fixed could dead-letter it ("gave up after 10 attempts").
async fn a_newer_version_starts_its_own_attempts(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("attempts_{postgres}");
    let (customers, _, _) = two_linked(&store, &tag).await;
    let stripe = ["stripe".to_owned()];
    let second = rename(&store, &customers[0].id, "Second").await;
    store
        .intake_changes(&[notice(&second)], &stripe)
        .await
        .expect("intake");
    let link = stripe_link_claimed(&store, "lease-attempts", second.id.as_str()).await;
    let failed = |attempt: i32| {
        LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
            version: second.version,
            operation: "update",
            attempt,
            at_ms: 0,
            error: "503".into(),
            pending_version: None,
            answered: false,
        })
    };
    assert_eq!(
        store
            .write_links(&[(&link, &failed(9))])
            .await
            .expect("written"),
        vec![true]
    );
    let attempts = |store: &Store| {
        let id = second.id.as_str().to_owned();
        let store = store.clone();
        async move { store.links_of(&id).await.expect("links")[0].attempts }
    };
    assert_eq!(attempts(&store).await, 9);
    // The same version again (a bus delivering twice) keeps the count.
    store
        .intake_changes(&[notice(&second)], &stripe)
        .await
        .expect("intake");
    assert_eq!(attempts(&store).await, 9);
    // The next attempt goes out; a newer version is taken in meanwhile,
    // and the attempt fails: the newer version's first failure, not the
    // older one's tenth.
    let out = stripe_link_claimed(&store, "lease-attempts-2", second.id.as_str()).await;
    let third = rename(&store, &second.id, "Third").await;
    store
        .intake_changes(&[notice(&third)], &stripe)
        .await
        .expect("intake");
    assert_eq!(attempts(&store).await, 0);
    assert_eq!(
        store
            .write_links(&[(&out, &failed(10))])
            .await
            .expect("written"),
        vec![true]
    );
    assert_eq!(attempts(&store).await, 1);
}

/// A create marked on a link, then held back (a backfill); meanwhile an
/// inbound event links the customer to a live record. The push then finds
/// the version synced and skips: the marker is settled with it, as a
/// delivery settles it. Left, it barred a repair from recreating the
/// record for good and was replayed once that record was deleted.
async fn a_skip_over_a_live_record_settles_a_create_marker(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 1).await;
    let marker = LinkWrite::CreatePending {
        version: links[0].wanted_version,
        record: json!({ "id": links[0].customer_id }),
    };
    let written = store.write_links(&[(&links[0], &marker)]).await;
    assert_eq!(written.expect("written"), [true]);
    let id = CustomerId::parse(&links[0].customer_id).expect("id");
    let remote = format!("cus_marker_{postgres}");
    let events = claimed(&store, std::slice::from_ref(&remote)).await;
    let linked = store
        .apply_inbound_many(&[change(&events[0], CustomerWrite::None, Some(&id))])
        .await
        .expect("linked");
    assert!(matches!(linked[0], Ok(Applied::Done(None))), "{linked:?}");
    let before = store.links_of(id.as_str()).await.expect("links")[0].clone();
    assert_eq!(
        (before.remote_id.as_deref(), before.pending_version),
        (Some(remote.as_str()), Some(links[0].wanted_version)),
        "linked, the marker still there"
    );
    let skipped = LinkWrite::Outcome(RecordedOutcome::Skipped {
        version: links[0].wanted_version,
        reason: "already synced".to_owned(),
        mark_synced: false,
    });
    let written = store.write_links(&[(&links[0], &skipped)]).await;
    assert_eq!(written.expect("written"), [true]);
    let after = store.links_of(id.as_str()).await.expect("links")[0].clone();
    assert_eq!(
        (after.pending_version, after.pending_record.is_some()),
        (None, false),
        "{after:?}"
    );
}

/// A fresh store (and its URL, for raw SQL) holding three customers linked
/// to Stripe records (`cus_{tag}_…`).
async fn three_linked(
    postgres: bool,
    tag: &str,
) -> (Store, String, tempfile::TempDir, Vec<Customer>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let tag = format!("{tag}_{postgres}");
    let (mut customers, _, _) = two_linked(&store, &tag).await;
    let (more, _, _) = two_linked(&store, &format!("{tag}_more")).await;
    customers.push(more[0].clone());
    (store, url, dir, customers)
}

/// A link wanting a version its customer never reached (a change message
/// from before the database was restored or failed over behind it) whose
/// push is refused for good dies at the customer's version. The wanted
/// version read as a newer change: the link was pending again at once,
/// pushed, refused and dead-lettered again, for ever. A version an intake
/// raises while the push is out still leaves the link pending for it.
async fn a_refused_push_under_a_version_never_reached_dies(postgres: bool) {
    let (store, url, _dir, customers) = three_linked(postgres, "never_reached").await;
    let stripe = ["stripe".to_owned()];
    // Refused for good; refused with the wanted version raised meanwhile;
    // retried until the attempts ran out (a kind that keeps a create's
    // marker, and once died at the wanted version the claim saw); a first
    // create retried until they ran out (which died there still: a create
    // kept for replay dies at the wanted version, but only up to the
    // version the customer reached).
    use ferry::store::DeadLetterKind::{Permanent, RetriesExhausted};
    for (customer, raised_meanwhile, error_kind, operation) in [
        (&customers[0], false, Permanent, "update"),
        (&customers[1], true, Permanent, "update"),
        (&customers[2], false, RetriesExhausted, "update"),
        (&customers[2], false, RetriesExhausted, "create"),
    ] {
        let edited = rename(&store, &customer.id, "Edited").await;
        store
            .intake_changes(&[notice(&edited)], &stripe)
            .await
            .expect("intake");
        let ahead = format!(
            "UPDATE sync_links SET wanted_version = {} WHERE customer_id = '{}'",
            edited.version + 5,
            edited.id.as_str()
        );
        crate::helpers::execute_raw(&url, &ahead, &[]).await;
        let id = edited.id.as_str();
        let link = stripe_link_claimed(&store, "lease-never-reached", id).await;
        if raised_meanwhile {
            // Raised while the push is out (an intake's write): the
            // customer itself did not move, so only the claim's wanted
            // version tells it from the one the restore left.
            let sql = format!(
                "UPDATE sync_links SET wanted_version = {} WHERE customer_id = '{id}'",
                edited.version + 6
            );
            crate::helpers::execute_raw(&url, &sql, &[]).await;
        }
        let refused = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
            version: edited.version,
            operation: Some(operation),
            attempt: 1,
            error_kind,
            error: "remote answered 400".to_owned(),
            settle_ms: 0,
        });
        let written = store.write_links(&[(&link, &refused)]).await;
        assert_eq!(written.expect("written"), [true]);
        let after = store.links_of(id).await.expect("links")[0].clone();
        if raised_meanwhile {
            assert_eq!(
                (after.state, after.wanted_version),
                (LinkState::Pending, edited.version + 6),
                "a version raised meanwhile is still to push"
            );
        } else {
            assert_eq!(
                (after.state, after.wanted_version),
                (LinkState::Dead, edited.version),
                "dead at the version that died: {error_kind:?} {operation}"
            );
        }
    }
    // The next edit re-opens the link the create died on.
    let edited = rename(&store, &customers[2].id, "Edited again").await;
    store
        .intake_changes(&[notice(&edited)], &stripe)
        .await
        .expect("intake");
    let after = store.links_of(edited.id.as_str()).await.expect("links")[0].clone();
    assert_eq!(
        (after.state, after.wanted_version),
        (LinkState::Pending, edited.version),
        "the next edit is pushed"
    );
}

/// A push that read the customer past its claim's wanted version (the
/// change not yet taken in by the relay, or taken in while the push was
/// out) failed: that version's first failure, counted from 0, and the
/// wanted version from now on, so the next claim counts on from it (left
/// behind, every claim that read past it counted afresh, and the push
/// never gave up while the relay lagged).
async fn a_push_past_the_wanted_version_counts_for_that_version(postgres: bool) {
    let (store, url, _dir, customers) = three_linked(postgres, "past_wanted").await;
    let stripe = ["stripe".to_owned()];
    let attempts = |id: &str| {
        let id = id.to_owned();
        let store = store.clone();
        async move {
            let link = store.links_of(&id).await.expect("links")[0].clone();
            (link.wanted_version, link.attempts)
        }
    };
    // Meanwhile: nothing; the intake takes the change in (and resets the
    // count); an inbound link write or a forced push raises the wanted
    // version and keeps the count.
    for (customer, meanwhile) in [
        (&customers[0], "nothing"),
        (&customers[1], "intake"),
        (&customers[2], "raised"),
    ] {
        let second = rename(&store, &customer.id, "Second").await;
        store
            .intake_changes(&[notice(&second)], &stripe)
            .await
            .expect("intake");
        let id = second.id.as_str();
        let link = stripe_link_claimed(&store, "lease-past-1", id).await;
        let failed = |version: i64, attempt: i32| {
            LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
                version,
                operation: "update",
                attempt,
                at_ms: 0,
                error: "503".into(),
                pending_version: None,
                answered: false,
            })
        };
        let write = failed(second.version, 9);
        let written = store.write_links(&[(&link, &write)]).await;
        assert_eq!(written.expect("written"), vec![true]);
        assert_eq!(attempts(id).await, (second.version, 9));
        // The claim wants the second version; the push reads the third.
        let out = stripe_link_claimed(&store, "lease-past-2", id).await;
        let third = rename(&store, &second.id, "Third").await;
        if meanwhile == "intake" {
            store
                .intake_changes(&[notice(&third)], &stripe)
                .await
                .expect("intake");
        } else if meanwhile == "raised" {
            let sql = format!(
                "UPDATE sync_links SET wanted_version = {} WHERE customer_id = '{id}'",
                third.version
            );
            crate::helpers::execute_raw(&url, &sql, &[]).await;
        }
        let write = failed(third.version, 1);
        let written = store.write_links(&[(&out, &write)]).await;
        assert_eq!(written.expect("written"), vec![true]);
        assert_eq!(
            attempts(id).await,
            (third.version, 1),
            "meanwhile: {meanwhile}"
        );
        // Its change comes in (again): the count stays.
        store
            .intake_changes(&[notice(&third)], &stripe)
            .await
            .expect("intake");
        assert_eq!(attempts(id).await, (third.version, 1));
    }
}

/// An update whose last attempt timed out may still be at work in the
/// remote: the newer version the dead letter reopens the link for waits
/// the same settle time before it goes (it went at once, and could land
/// before the older one).
async fn a_newer_version_waits_out_a_timed_out_last_attempt(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let tag = format!("settle_{postgres}");
    let (customers, _, _) = two_linked(&store, &tag).await;
    let stripe = ["stripe".to_owned()];
    let second = rename(&store, &customers[0].id, "Second").await;
    store
        .intake_changes(&[notice(&second)], &stripe)
        .await
        .expect("intake");
    // Gives `link` up at `version`, its last attempt timed out: the time
    // before the write.
    let give_up_timed_out = async |link: &SyncLink, version: i64| {
        let gave_up = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
            version,
            operation: Some("update"),
            attempt: 10,
            error_kind: ferry::store::DeadLetterKind::RetriesExhausted,
            error: "gave up after 10 attempts: the call exceeded its deadline".into(),
            settle_ms: 30_000,
        });
        let before = chrono::Utc::now().timestamp_millis();
        assert_eq!(
            store
                .write_links(&[(link, &gave_up)])
                .await
                .expect("written"),
            vec![true]
        );
        before
    };
    let link = stripe_link_claimed(&store, "lease-settle", second.id.as_str()).await;
    let third = rename(&store, &second.id, "Third").await;
    store
        .intake_changes(&[notice(&third)], &stripe)
        .await
        .expect("intake");
    let before = give_up_timed_out(&link, second.version).await;
    let after = store
        .links_of(second.id.as_str())
        .await
        .expect("links")
        .remove(0);
    assert_eq!(after.state, LinkState::Pending, "{after:?}");
    assert_eq!(after.wanted_version, third.version, "{after:?}");
    assert!(after.next_attempt_at_ms >= before + 29_000, "{after:?}");

    // A version taken in after the link died waits it out too.
    let other = rename(&store, &customers[1].id, "Other").await;
    store
        .intake_changes(&[notice(&other)], &stripe)
        .await
        .expect("intake");
    let link = stripe_link_claimed(&store, "lease-settle-2", other.id.as_str()).await;
    let before = give_up_timed_out(&link, other.version).await;
    let later = rename(&store, &other.id, "Later").await;
    store
        .intake_changes(&[notice(&later)], &stripe)
        .await
        .expect("intake");
    let after = store
        .links_of(other.id.as_str())
        .await
        .expect("links")
        .remove(0);
    assert_eq!(
        (after.state, after.wanted_version),
        (LinkState::Pending, later.version),
        "{after:?}"
    );
    assert!(after.next_attempt_at_ms >= before + 29_000, "{after:?}");
}

#[tokio::test]
async fn postgres_a_newer_version_waits_out_a_timed_out_last_attempt() {
    a_newer_version_waits_out_a_timed_out_last_attempt(true).await;
}

#[tokio::test]
async fn sqlite_a_newer_version_waits_out_a_timed_out_last_attempt() {
    a_newer_version_waits_out_a_timed_out_last_attempt(false).await;
}

#[tokio::test]
async fn postgres_a_skip_over_a_live_record_settles_a_create_marker() {
    a_skip_over_a_live_record_settles_a_create_marker(true).await;
}

#[tokio::test]
async fn sqlite_a_skip_over_a_live_record_settles_a_create_marker() {
    a_skip_over_a_live_record_settles_a_create_marker(false).await;
}

#[tokio::test]
async fn postgres_a_refused_push_under_a_version_never_reached_dies() {
    a_refused_push_under_a_version_never_reached_dies(true).await;
}

#[tokio::test]
async fn sqlite_a_refused_push_under_a_version_never_reached_dies() {
    a_refused_push_under_a_version_never_reached_dies(false).await;
}

#[tokio::test]
async fn postgres_a_push_past_the_wanted_version_counts_for_that_version() {
    a_push_past_the_wanted_version_counts_for_that_version(true).await;
}

#[tokio::test]
async fn sqlite_a_push_past_the_wanted_version_counts_for_that_version() {
    a_push_past_the_wanted_version_counts_for_that_version(false).await;
}

#[tokio::test]
async fn postgres_a_newer_version_starts_its_own_attempts() {
    a_newer_version_starts_its_own_attempts(true).await;
}

#[tokio::test]
async fn sqlite_a_newer_version_starts_its_own_attempts() {
    a_newer_version_starts_its_own_attempts(false).await;
}

/// Two groups of the same two records, in opposite orders, written one
/// change at a time (a conflict to record keeps them out of the batch),
/// while a third transaction holds the first group's first customer: the
/// first group waits there holding its first link, the second group writes
/// its first change and reaches the first group's link. Had each change
/// locked its own link as it came, releasing the customer would close a
/// cycle (PostgreSQL aborts one side after `deadlock_timeout`); a group
/// locks all its links first, in key order, so the second waits for the
/// first and every change gets an answer, none an error.
#[tokio::test]
async fn postgres_two_groups_of_shared_records_wait_rather_than_deadlock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let (customers, remote, reads) = two_linked(&store, "shared").await;
    // Two later events of each record, one for each group.
    let later: Vec<(String, &String)> = ["a", "b"]
        .iter()
        .flat_map(|group| remote.iter().map(move |r| (format!("evt_{group}_{r}"), r)))
        .collect();
    let events = claim_later(&store, &later).await;
    let of = |event_id: &str| {
        events
            .iter()
            .find(|e| e.event_id == event_id)
            .expect("claimed event")
    };
    // Kept out of the batch by a conflict to record.
    let one_at_a_time = |event_id: &str, r: usize| InboundChange {
        conflict: Some(NewConflict {
            policy: "last_writer_wins".into(),
            fields: json!([]),
            open: false,
        }),
        ..renamed_from_remote(of(event_id), &customers[r], "renamed", Some(reads[r]))
    };
    let first = vec![
        one_at_a_time("evt_a_cus_shared_0", 0),
        one_at_a_time("evt_a_cus_shared_1", 1),
    ];
    let second = vec![
        one_at_a_time("evt_b_cus_shared_1", 1),
        one_at_a_time("evt_b_cus_shared_0", 0),
    ];

    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let mut holder = raw.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM customers WHERE id = $1 FOR UPDATE")
        .bind(customers[0].id.as_str())
        .execute(&mut *holder)
        .await
        .expect("customer one held");
    let waiting = |n: i64| sessions_waiting_on_locks(&raw, n);
    let first_store = store.clone();
    let first = tokio::spawn(async move { first_store.apply_inbound_many(&first).await });
    waiting(1).await;
    let second_store = store.clone();
    let second = tokio::spawn(async move { second_store.apply_inbound_many(&second).await });
    waiting(2).await;
    holder.rollback().await.expect("customer one released");

    for (group, results) in [("first", first.await), ("second", second.await)] {
        let results = results.expect("joined").expect("group written");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Ok(Applied::Done(_) | Applied::Raced))),
            "{group} group: {results:?}"
        );
    }
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

/// `n` customers, each with a pending link to `stripe`, claimed under
/// `lease-a`.
async fn claimed_links(store: &Store, n: usize) -> Vec<SyncLink> {
    let mut changes = Vec::new();
    for i in 0..n {
        let customer = store
            .create_customer(
                fields(&email(&format!("link{i}")), "Ada"),
                WriteContext::default(),
            )
            .await
            .expect("customer");
        changes.push(ChangeNotice {
            customer_id: customer.id.as_str().to_owned(),
            version: customer.version,
            correlation_id: Some(format!("req_{i}")),
            outbox_id: None,
            source_connector: None,
        });
    }
    let keys = store
        .intake_changes(&changes, &["stripe".to_owned()])
        .await
        .expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    // No connector may push now: the claim marks no create, the writes do.
    let mut links: Vec<SyncLink> = store
        .claim_links(&keys, &[], "lease-a", until)
        .await
        .expect("claimed")
        .into_iter()
        .map(|claimed| claimed.link)
        .collect();
    // In the order the customers were made.
    links.sort_by_key(|link| {
        changes
            .iter()
            .position(|c| c.customer_id == link.customer_id)
    });
    assert_eq!(links.len(), n);
    links
}

/// A claimed link whose customer the claim cannot read (an address with a
/// key ferry does not know, written by hand in SQL) is claimed with the
/// others, without its customer: its push reads it and fails alone. On
/// PostgreSQL, which reads the customers in the claim's statement, the
/// whole claim failed after taking its leases, and every link in it
/// waited, claimed again at each lease's end, with no attempt counted.
async fn an_unreadable_customer_does_not_hold_a_claim(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let mut changes = Vec::new();
    for name in ["Broken", "Healthy"] {
        let customer = store
            .create_customer(fields(&email(name), name), WriteContext::default())
            .await
            .expect("customer");
        changes.push(ChangeNotice {
            customer_id: customer.id.as_str().to_owned(),
            version: customer.version,
            correlation_id: None,
            outbox_id: None,
            source_connector: None,
        });
    }
    let broken = &changes[0].customer_id;
    let address = if postgres {
        "'{\"floor\": \"3\"}'::jsonb"
    } else {
        "'{\"floor\": \"3\"}'"
    };
    let sql = format!("UPDATE customers SET address = {address} WHERE id = '{broken}'");
    crate::helpers::execute_raw(&url, &sql, &[]).await;
    let stripe = ["stripe".to_owned()];
    let keys = store
        .intake_changes(&changes, &stripe)
        .await
        .expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_links(&keys, &stripe, "lease-unreadable", until)
        .await
        .expect("the claim stands");
    assert_eq!(claimed.len(), 2, "{claimed:?}");
    for link in &claimed {
        if &link.link.customer_id == broken {
            assert!(link.customer.is_none(), "{link:?}");
        } else if postgres {
            // SQLite reads the batch's customers in a statement of their
            // own, and when that fails every link goes without.
            assert!(link.customer.is_some(), "{link:?}");
        }
    }
    // The scheduler's claim alike, once the leases are handed back.
    crate::helpers::execute_raw(
        &url,
        "UPDATE sync_links SET lease_token = NULL, lease_until_ms = 0",
        &[],
    )
    .await;
    let due = store
        .claim_due_links(None, &stripe, "lease-due", until, 20)
        .await
        .expect("the claim stands");
    assert_eq!(due.len(), 2, "{due:?}");
}

#[tokio::test]
async fn postgres_an_unreadable_customer_does_not_hold_a_claim() {
    an_unreadable_customer_does_not_hold_a_claim(true).await;
}

#[tokio::test]
async fn sqlite_an_unreadable_customer_does_not_hold_a_claim() {
    an_unreadable_customer_does_not_hold_a_claim(false).await;
}

fn delivered(link: &SyncLink, remote_id: &str) -> LinkWrite {
    LinkWrite::Outcome(RecordedOutcome::Delivered {
        operation: "create",
        version: link.wanted_version,
        remote_id: remote_id.to_owned(),
        remote_deleted: false,
        pushed_hash: "hash".to_owned(),
        snapshot: Some(json!({ "id": remote_id })),
        snapshot_base: None,
    })
}

/// A delivered create of a new record, over a link that held a deleted one
/// last seen at a later date, starts the link's remote date afresh (in a
/// group's batch, the path most outcomes take): it kept the old record's
/// date, and the new record's events dated before it were skipped as stale.
async fn a_new_record_starts_its_links_date_afresh(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let links = claimed_links(&store, 2).await;
    for (i, link) in links.iter().enumerate() {
        let sql = format!(
            "UPDATE sync_links SET remote_id = 'cus_gone_{i}', remote_deleted = TRUE, \
             remote_seen_at_ms = 9000 WHERE customer_id = '{}'",
            link.customer_id
        );
        crate::helpers::execute_raw(&url, &sql, &[]).await;
    }
    let writes = [
        delivered(&links[0], "cus_new_0"),
        delivered(&links[1], "cus_new_1"),
    ];
    let refs: Vec<(&SyncLink, &LinkWrite)> = links.iter().zip(&writes).collect();
    store.write_links(&refs).await.expect("written");
    for (i, link) in links.iter().enumerate() {
        let now = store.links_of(&link.customer_id).await.expect("links")[0].clone();
        assert_eq!(now.remote_id.as_deref(), Some(&*format!("cus_new_{i}")));
        assert_eq!(now.remote_seen_at_ms, 0, "the deleted record's date kept");
    }
}

#[tokio::test]
async fn postgres_a_new_record_starts_its_links_date_afresh() {
    a_new_record_starts_its_links_date_afresh(true).await;
}

#[tokio::test]
async fn sqlite_a_new_record_starts_its_links_date_afresh() {
    a_new_record_starts_its_links_date_afresh(false).await;
}

/// An update that named its changed fields against the snapshot its claim
/// read writes its own snapshot only over that one: an event that wrote
/// the link's snapshot while the push was out (read after the push
/// landed) decides, and the pushed hash is forgotten (the next update is
/// sent whole). Written over it, the snapshot put back a field's older
/// value, and the remote's next edit of that field read as ferry's. A
/// snapshot nothing moved takes the push's, in a batch and one by one.
async fn a_push_keeps_a_snapshot_an_event_wrote_meanwhile(postgres: bool, batched: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let links = claimed_links(&store, 2).await;
    let created: Vec<LinkWrite> = links
        .iter()
        .enumerate()
        .map(|(i, link)| {
            LinkWrite::Outcome(RecordedOutcome::Delivered {
                operation: "create",
                version: link.wanted_version,
                remote_id: format!("cus_{i}"),
                remote_deleted: false,
                pushed_hash: "h1".to_owned(),
                snapshot: Some(json!({"id": format!("cus_{i}"), "name": "Ada",
                    "email": "ada@example.com", "phone": null, "metadata": {"tier": "gold"}})),
                snapshot_base: None,
            })
        })
        .collect();
    let refs: Vec<(&SyncLink, &LinkWrite)> = links.iter().zip(&created).collect();
    assert_eq!(store.write_links(&refs).await.unwrap(), [true, true]);
    for link in &links {
        let id = CustomerId::parse(&link.customer_id).expect("id");
        let renamed = rename(&store, &id, "Ann").await;
        store
            .intake_changes(&[notice(&renamed)], &["stripe".to_owned()])
            .await
            .expect("intake");
    }
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let mut claimed: Vec<SyncLink> = store
        .claim_due_links(None, &["stripe".to_owned()], "lease-b", until, 10)
        .await
        .expect("claimed")
        .into_iter()
        .map(|c| c.link)
        .collect();
    claimed.sort_by_key(|l| l.remote_id.clone());
    assert_eq!(claimed.len(), 2);
    // The first link's event, applied while its push was out.
    let moved = json!({"id": "cus_0", "name": "Ada", "phone": "+4930123"});
    let sql = format!(
        "UPDATE sync_links SET snapshot = '{moved}', pushed_hash = 'remote' \
         WHERE customer_id = '{}'",
        claimed[0].customer_id
    );
    crate::helpers::execute_raw(&url, &sql, &[]).await;
    let pushed: Vec<LinkWrite> = claimed
        .iter()
        .map(|link| {
            LinkWrite::Outcome(RecordedOutcome::Delivered {
                operation: "update",
                version: link.wanted_version,
                remote_id: link.remote_id.clone().unwrap(),
                remote_deleted: false,
                pushed_hash: "h2".to_owned(),
                snapshot: Some(json!({"id": link.remote_id, "name": "Ann"})),
                snapshot_base: link.snapshot.clone(),
            })
        })
        .collect();
    let marker = LinkWrite::CreatePending {
        version: claimed[0].wanted_version,
        record: json!({}),
    };
    let writes: Vec<(&SyncLink, &LinkWrite)> = if batched {
        claimed.iter().zip(&pushed).collect()
    } else {
        // A link's second write in a group goes alone.
        claimed
            .iter()
            .zip(&pushed)
            .flat_map(|(link, push)| [(link, &marker), (link, push)])
            .collect()
    };
    let applied = store.write_links(&writes).await.expect("written");
    assert!(applied.iter().all(|a| *a), "{applied:?}");
    let mut after = Vec::new();
    for link in &claimed {
        after.push(
            store
                .links_of(&link.customer_id)
                .await
                .expect("links")
                .remove(0),
        );
    }
    assert_eq!(
        (after[0].snapshot.as_ref(), after[0].pushed_hash.as_deref()),
        (Some(&moved), None),
        "the event's snapshot stays"
    );
    assert_eq!(
        (after[1].snapshot.as_ref(), after[1].pushed_hash.as_deref()),
        (Some(&json!({"id": "cus_1", "name": "Ann"})), Some("h2")),
        "nothing moved it: the push's"
    );
    for link in &after {
        assert_eq!(link.synced_version, link.wanted_version, "{link:?}");
    }
}

#[tokio::test]
async fn postgres_a_push_keeps_a_snapshot_an_event_wrote_meanwhile() {
    a_push_keeps_a_snapshot_an_event_wrote_meanwhile(true, true).await;
    a_push_keeps_a_snapshot_an_event_wrote_meanwhile(true, false).await;
}

#[tokio::test]
async fn sqlite_a_push_keeps_a_snapshot_an_event_wrote_meanwhile() {
    a_push_keeps_a_snapshot_an_event_wrote_meanwhile(false, true).await;
    a_push_keeps_a_snapshot_an_event_wrote_meanwhile(false, false).await;
}

/// A claim whose outcome was never written (a crash, a lost lease, a store
/// error after the call) may have pushed: the next claim forgets the
/// content pushed before, so a later version equal to it is pushed, not
/// skipped as unchanged while the remote holds the lost push's values. A
/// claim after a written outcome keeps it.
async fn a_claim_after_an_unrecorded_push_forgets_the_pushed_content(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let customer = store
        .create_customer(
            fields(&email("unrecorded"), "Before"),
            WriteContext::default(),
        )
        .await
        .expect("customer");
    let connectors = ["stripe".to_owned()];
    store
        .intake_changes(&[notice(&customer)], &connectors)
        .await
        .expect("intake");
    let claim = |token: &'static str, until: i64| {
        let (store, connectors) = (&store, &connectors);
        async move {
            store
                .claim_due_links(None, connectors, token, until, 10)
                .await
                .expect("claimed")
                .remove(0)
                .link
        }
    };
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let first = claim("lease-1", until).await;
    let write = delivered(&first, "cus_unrecorded");
    assert_eq!(
        store
            .write_links(&[(&first, &write)])
            .await
            .expect("written"),
        [true]
    );

    let renamed = rename(&store, &customer.id, "Changed").await;
    store
        .intake_changes(&[notice(&renamed)], &connectors)
        .await
        .expect("intake");
    // An edit committed and not taken in yet (the relay behind): the
    // claim pushes the customer's version, past the wanted one.
    let renamed = rename(&store, &customer.id, "Changed again").await;
    // Claimed after a written outcome: the pushed content stands. This
    // claim's lease ends with nothing written.
    let soon = chrono::Utc::now().timestamp_millis() + 20;
    let second = claim("lease-2", soon).await;
    assert!(second.wanted_version < renamed.version, "{second:?}");
    assert_eq!(second.pushed_hash.as_deref(), Some("hash"));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let third = claim("lease-3", until).await;
    assert_eq!(third.pushed_hash, None, "{third:?}");
    // The retry of the version the unrecorded claim pushed is planned over
    // the base that claim planned it over: the same request, under the
    // same key (it went whole, under another, and the remote applied
    // both). A later version has no base: the remote may hold either.
    assert_eq!(
        third.delivered_base(renamed.version),
        Some("hash"),
        "{third:?}"
    );
    assert_eq!(third.delivered_base(renamed.version + 1), None, "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_claim_after_an_unrecorded_push_forgets_the_pushed_content() {
    a_claim_after_an_unrecorded_push_forgets_the_pushed_content(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_claim_after_an_unrecorded_push_forgets_the_pushed_content() {
    a_claim_after_an_unrecorded_push_forgets_the_pushed_content(false).await;
}

/// A group of link writes (PostgreSQL writes create markers and deliveries
/// one statement per group, the other outcomes one per link) answers each
/// write as one-by-one writes would: a lost lease is refused and leaves no
/// trace, two writes to one link apply in order.
async fn each_link_write_gets_its_own_answer(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 4).await;
    let mut stolen = links[2].clone();
    stolen.lease_token = Some("lease-b".to_owned());
    let retry = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
        version: links[3].wanted_version,
        operation: "create",
        attempt: 1,
        at_ms: chrono::Utc::now().timestamp_millis() + 30_000,
        error: "remote answered 500".to_owned(),
        pending_version: None,
        answered: false,
    });
    let writes = [
        (
            &links[0],
            LinkWrite::CreatePending {
                version: links[0].wanted_version,
                record: json!({ "id": links[0].customer_id, "name": "zero" }),
            },
        ),
        (&links[1], delivered(&links[1], "cus_one")),
        (&stolen, delivered(&stolen, "cus_stolen")),
        (&links[3], retry),
        // After its marker, in the same group.
        (&links[0], delivered(&links[0], "cus_zero")),
    ];
    let refs: Vec<(&SyncLink, &LinkWrite)> = writes.iter().map(|(l, w)| (*l, w)).collect();
    let answers = store.write_links(&refs).await.expect("group written");
    assert_eq!(answers, [true, true, false, true, true]);

    let link = |i: usize| {
        let store = store.clone();
        let customer_id = links[i].customer_id.clone();
        async move { store.links_of(&customer_id).await.expect("links").remove(0) }
    };
    for (i, remote_id) in [(0, "cus_zero"), (1, "cus_one")] {
        let synced = link(i).await;
        assert_eq!(synced.state, LinkState::Synced, "link {i}");
        assert_eq!(synced.remote_id.as_deref(), Some(remote_id));
        assert_eq!(synced.synced_version, links[i].wanted_version);
        assert_eq!(
            synced.pending_version, None,
            "the delivery clears the marker"
        );
        assert_eq!(synced.pending_record, None, "and the record it kept");
        assert_eq!(synced.lease_token, None);
        assert_eq!(synced.snapshot, Some(json!({ "id": remote_id })));
        let deliveries = store
            .deliveries_of(&links[i].customer_id, 10)
            .await
            .expect("deliveries");
        assert_eq!(deliveries.len(), 1, "link {i}");
        assert_eq!(deliveries[0].outcome, "delivered");
        assert_eq!(deliveries[0].operation.as_deref(), Some("create"));
        assert_eq!(deliveries[0].attempt, 1);
        assert_eq!(deliveries[0].remote_id.as_deref(), Some(remote_id));
        assert_eq!(
            deliveries[0].correlation_id.as_deref(),
            Some(format!("req_{i}").as_str())
        );
    }
    let untouched = link(2).await;
    assert_eq!(untouched.state, LinkState::Pending);
    assert_eq!(untouched.remote_id, None);
    assert_eq!(untouched.lease_token.as_deref(), Some("lease-a"));
    assert!(store
        .deliveries_of(&links[2].customer_id, 10)
        .await
        .expect("deliveries")
        .is_empty());
    let retrying = link(3).await;
    assert_eq!(retrying.state, LinkState::Retry);
    assert_eq!(retrying.last_error.as_deref(), Some("remote answered 500"));

    // Two links given one remote id: the group fails as a whole and
    // nothing of it stays; alone, the second names the cause.
    let fresh = claimed_links(&store, 2).await;
    let writes = [
        (&fresh[0], delivered(&fresh[0], "cus_shared")),
        (&fresh[1], delivered(&fresh[1], "cus_shared")),
    ];
    let refs: Vec<(&SyncLink, &LinkWrite)> = writes.iter().map(|(l, w)| (*l, w)).collect();
    assert!(store.write_links(&refs).await.is_err());
    let first = store
        .links_of(&fresh[0].customer_id)
        .await
        .expect("links")
        .remove(0);
    assert_eq!(
        first.state,
        LinkState::Pending,
        "the failed group left nothing"
    );
    assert_eq!(store.write_links(&refs[..1]).await.expect("alone"), [true]);
    assert!(matches!(
        store.write_links(&refs[1..]).await,
        Err(StoreError::RemoteIdTaken)
    ));
}

#[tokio::test]
async fn postgres_each_link_write_gets_its_own_answer() {
    each_link_write_gets_its_own_answer(true).await;
}

#[tokio::test]
async fn sqlite_each_link_write_gets_its_own_answer() {
    each_link_write_gets_its_own_answer(false).await;
}

/// The scheduler's next wake: the earliest due link not in flight; a
/// push in flight (its lease outlasting its due time) is not waited for.
async fn the_next_due_link_is_one_not_in_flight(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 2).await;
    assert_eq!(
        store.next_due_ms().await.expect("read"),
        None,
        "both in flight"
    );
    let due = chrono::Utc::now().timestamp_millis() + 10_000;
    let retry = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
        version: links[0].wanted_version,
        operation: "create",
        attempt: 1,
        at_ms: due,
        error: "remote answered 500".to_owned(),
        pending_version: None,
        answered: false,
    });
    assert_eq!(
        store
            .write_links(&[(&links[0], &retry)])
            .await
            .expect("written"),
        [true]
    );
    assert_eq!(store.next_due_ms().await.expect("read"), Some(due));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_the_next_due_link_is_one_not_in_flight() {
    the_next_due_link_is_one_not_in_flight(true).await;
}

#[tokio::test]
async fn sqlite_the_next_due_link_is_one_not_in_flight() {
    the_next_due_link_is_one_not_in_flight(false).await;
}

/// A group of link writes of several kinds (a create marker, a delivery)
/// locks its links in key order before writing any, as an intake does: it
/// marked the later link's create first and then waited for the earlier
/// one, which an intake held while it waited for the later (40P01, one
/// side undone after a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_group_of_link_writes_locks_in_key_order() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let links = claimed_links(&store, 2).await;
    let (first, second) = (&links[0], &links[1]);
    assert!(first.customer_id < second.customer_id, "made in key order");
    // Another transaction (an intake) holds the first link.
    let mut other = sqlx::PgConnection::connect(&url).await.expect("postgres");
    sqlx::query("BEGIN").execute(&mut other).await.unwrap();
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut other)
        .await
        .unwrap();
    sqlx::query(
        "SELECT 1 FROM sync_links WHERE customer_id = $1 AND connector = 'stripe' \
         FOR NO KEY UPDATE",
    )
    .bind(&first.customer_id)
    .execute(&mut other)
    .await
    .unwrap();
    let marker = LinkWrite::CreatePending {
        version: second.wanted_version,
        record: json!({"email": "second@example.com"}),
    };
    let delivery = delivered(first, "cus_first");
    let group = {
        let (store, first, second) = (store.clone(), first.clone(), second.clone());
        tokio::spawn(async move {
            store
                .write_links(&[(&first, &delivery), (&second, &marker)])
                .await
        })
    };
    // Until the group waits for the first link's lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
             AND datname = current_database()",
        )
        .fetch_one(&mut other)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the group never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The intake goes on to the second link: the group waits for the
    // first before it touches the second, so nobody waits on anybody else.
    let second_taken = sqlx::query(
        "UPDATE sync_links SET wanted_version = wanted_version \
         WHERE customer_id = $1 AND connector = 'stripe'",
    )
    .bind(&second.customer_id)
    .execute(&mut other)
    .await;
    assert!(second_taken.is_ok(), "{second_taken:?}");
    sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    let written = group.await.unwrap().expect("the group is written");
    assert_eq!(written, [true, true]);
}

/// The bus's notice of `customer`'s current version.
fn notice(customer: &Customer) -> ChangeNotice {
    ChangeNotice {
        customer_id: customer.id.as_str().to_owned(),
        version: customer.version,
        correlation_id: None,
        outbox_id: None,
        source_connector: None,
    }
}

/// `id` with its name changed to `name`.
async fn rename(store: &Store, id: &CustomerId, name: &str) -> Customer {
    store
        .update_customer::<StoreError, _>(id, None, WriteContext::default(), |c| {
            Ok(CustomerFields {
                name: Some(name.to_owned()),
                ..c.fields()
            })
        })
        .await
        .expect("updated")
}

/// The record a push of `customer` sends, as text.
fn record_of(customer: &Customer) -> String {
    canonical_record(&serde_json::to_value(customer).expect("json")).to_string()
}

/// A claim marks the create its push is about to send, for the connectors
/// the claimer says may push now only, and only where a create is what the
/// push will send: no remote record yet, the customer live and newer than
/// the remote's version, no earlier create outstanding. The mark keeps the
/// record the create sends, built in SQL exactly as the push builds it.
/// PostgreSQL's claim also reads each claimed link's customer (SQLite's
/// push reads its own, with no round trip to save).
async fn a_claim_marks_the_create_it_is_about_to_send(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let mut changes = Vec::new();
    let mut customers = Vec::new();
    for name in ["live", "deleted", "linked"] {
        let mut fields = fields(&email(name), name);
        if name == "live" {
            // Every field the record carries, and text that JSON escapes.
            fields.phone = Some("+44 20 7946 0958".to_owned());
            fields.address = Some(Address {
                line1: Some("1 \"Quoted\" Street".to_owned()),
                city: Some("Zürich".to_owned()),
                country: Some("CH".to_owned()),
                ..Address::default()
            });
            fields.metadata = BTreeMap::from([
                ("tier".to_owned(), "gold".to_owned()),
                ("note".to_owned(), "a\\b\n\u{1f600}".to_owned()),
            ]);
        }
        let customer = store
            .create_customer(fields, WriteContext::default())
            .await
            .expect("customer");
        changes.push(notice(&customer));
        customers.push(customer);
    }
    let deleted = store
        .delete_customer(&customers[1].id, None, WriteContext::default())
        .await
        .expect("deleted");
    let connectors = ["stripe".to_owned(), "paused".to_owned()];
    let keys = store
        .intake_changes(&changes, &connectors)
        .await
        .expect("intake");
    // The third customer's stripe link already has its remote record.
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let linked = customers[2].id.as_str();
    let linked_key = keys
        .iter()
        .find(|k| k.customer_id == linked && k.connector == "stripe")
        .expect("key");
    let first = store
        .claim_links(std::slice::from_ref(linked_key), &[], "lease-0", until)
        .await
        .expect("claimed")
        .remove(0)
        .link;
    let write = delivered(&first, "cus_linked");
    assert_eq!(
        store
            .write_links(&[(&first, &write)])
            .await
            .expect("written"),
        [true]
    );
    let updated = rename(&store, &customers[2].id, "renamed").await;
    store
        .intake_changes(&[notice(&updated)], &connectors[..1])
        .await
        .expect("intake");

    let claimed = store
        .claim_links(&keys, &connectors[..1], "lease-a", until)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), 6);
    for ClaimedLink { link, customer } in &claimed {
        let id = link.customer_id.as_str();
        let current = [&customers[0], &deleted, &updated]
            .into_iter()
            .find(|c| c.id.as_str() == id)
            .expect("one of ours");
        let marked = link.connector == "stripe" && id == customers[0].id.as_str();
        assert_eq!(
            link.pending_version,
            marked.then_some(current.version),
            "{} to {}",
            current.name.as_deref().unwrap_or(""),
            link.connector
        );
        assert_eq!(
            link.pending_record
                .as_ref()
                .map(|kept| kept_record(kept).expect("a record")),
            marked.then(|| record_of(current)),
            "the record kept is the one the push sends"
        );
        // Both backends read each claimed link's customer (PostgreSQL in
        // the claim, SQLite in one read after it).
        let customer = customer.as_ref().expect("the claim read the customer");
        assert_eq!(customer.version, current.version);
        assert_eq!(customer.deleted_at, current.deleted_at);
        assert_eq!(customer.email, current.email);
    }

    // The scheduler's claim marks the same way, and keeps a marker it
    // finds: the live customer's create failed and the customer changed
    // since; its retry replays the create it marked, not the new version.
    let live = claimed
        .iter()
        .map(|c| &c.link)
        .find(|l| l.customer_id == customers[0].id.as_str() && l.connector == "stripe")
        .expect("live link");
    let failed = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
        version: live.wanted_version,
        operation: "create",
        attempt: 1,
        at_ms: chrono::Utc::now().timestamp_millis() - 1,
        error: "timed out".to_owned(),
        pending_version: None,
        answered: false,
    });
    assert_eq!(
        store
            .write_links(&[(live, &failed)])
            .await
            .expect("written"),
        [true]
    );
    let changed = rename(&store, &customers[0].id, "changed").await;
    let fresh = store
        .create_customer(fields(&email("fresh"), "fresh"), WriteContext::default())
        .await
        .expect("customer");
    store
        .intake_changes(&[notice(&fresh), notice(&changed)], &connectors[..1])
        .await
        .expect("intake");
    let mut due = store
        .claim_due_links(None, &connectors[..1], "lease-b", until, 10)
        .await
        .expect("claimed");
    due.sort_by_key(|c| c.link.customer_id != fresh.id.as_str());
    let kept: Vec<Option<String>> = due
        .iter()
        .map(|c| {
            c.link
                .pending_record
                .as_ref()
                .map(|kept| kept_record(kept).expect("a record"))
        })
        .collect();
    assert_eq!(
        kept,
        [Some(record_of(&fresh)), Some(record_of(&customers[0]))],
        "the retry keeps the record its create sent, not the renamed one"
    );
    let due: Vec<(&str, Option<i64>, Option<i64>)> = due
        .iter()
        .map(|c| {
            (
                c.link.customer_id.as_str(),
                c.link.pending_version,
                c.customer.as_ref().map(|c| c.version),
            )
        })
        .collect();
    assert_eq!(
        due,
        [
            (fresh.id.as_str(), Some(fresh.version), Some(fresh.version)),
            (
                changed.id.as_str(),
                Some(customers[0].version),
                Some(changed.version)
            ),
        ],
        "the others are leased"
    );
}

#[tokio::test]
async fn postgres_a_claim_marks_the_create_it_is_about_to_send() {
    a_claim_marks_the_create_it_is_about_to_send(true).await;
}

#[tokio::test]
async fn sqlite_a_claim_marks_the_create_it_is_about_to_send() {
    a_claim_marks_the_create_it_is_about_to_send(false).await;
}

/// The in-process bus's round takes the oldest changes off the outbox
/// queue and schedules them, the newest version of each customer winning
/// (PostgreSQL: one statement; SQLite: a read and the intake).
async fn the_relay_takes_the_oldest_changes_and_schedules_the_newest(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let ctx = |id| WriteContext {
        correlation_id: Some(id),
        idempotency: None,
    };
    let ada = store
        .create_customer(fields(&email("ada"), "Ada"), ctx("req_1"))
        .await
        .expect("customer");
    let renamed = store
        .update_customer::<StoreError, _>(&ada.id, None, ctx("req_2"), |c| {
            Ok(CustomerFields {
                name: Some("Ada L.".into()),
                ..c.fields()
            })
        })
        .await
        .expect("updated");
    let grace = store
        .create_customer(fields(&email("grace"), "Grace"), ctx("req_3"))
        .await
        .expect("customer");
    let stripe = ["stripe".to_owned()];

    let first = store.intake_queued(2, &stripe).await.expect("intake");
    assert_eq!((first.taken, first.scheduled), (2, true));
    let links = store.links_of(ada.id.as_str()).await.expect("links");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].wanted_version, renamed.version);
    assert_eq!(links[0].correlation_id.as_deref(), Some("req_2"));
    assert_eq!(links[0].state, LinkState::Pending);

    // No connector takes part: the change only leaves the queue.
    let second = store.intake_queued(10, &[]).await.expect("intake");
    assert_eq!((second.taken, second.scheduled), (1, false));
    assert!(store
        .links_of(grace.id.as_str())
        .await
        .expect("links")
        .is_empty());
    let empty = store.intake_queued(10, &stripe).await.expect("intake");
    assert_eq!((empty.taken, empty.scheduled), (0, false));
    assert!(store
        .unpublished_outbox(10)
        .await
        .expect("queue")
        .is_empty());
}

/// A store with three changes queued: a customer typed in through the API,
/// another created the same way, then renamed by a stripe webhook (applied
/// with its stripe link). Returns the store, its URL, the two customers and
/// the renamed one.
async fn a_webhook_change_queued(
    postgres: bool,
    dir: &std::path::Path,
) -> (Store, String, Customer, Customer, Customer) {
    let url = database_url(postgres, dir).await;
    let store = open(&url).await;
    let typed = store
        .create_customer(fields(&email("typed"), "Typed"), WriteContext::default())
        .await
        .expect("customer");
    let remote = format!("cus_source_{postgres}");
    let events = claimed(&store, std::slice::from_ref(&remote)).await;
    let webhook = store
        .create_customer(
            fields(&email("webhook"), "Webhook"),
            WriteContext::default(),
        )
        .await
        .expect("customer");
    let applied = store
        .apply_inbound_many(&[change(
            &events[0],
            CustomerWrite::Update {
                id: webhook.id.clone(),
                expected_version: webhook.version,
                fields: fields(&webhook.email, "Webhook, renamed"),
            },
            Some(&webhook.id),
        )])
        .await
        .expect("applied");
    let renamed = match &applied[0] {
        Ok(Applied::Done(Some(customer))) => (**customer).clone(),
        other => panic!("apply: {other:?}"),
    };
    (store, url, typed, webhook, renamed)
}

/// `customer`'s stripe link, and on PostgreSQL whether any transaction
/// locked it since it was written: an upsert that changes nothing still
/// locks the row it meets, and logs the lock (docs/performance.md, round
/// 19).
async fn stripe_link(store: &Store, url: &str, customer: &Customer) -> (SyncLink, bool) {
    let link = store
        .links_of(customer.id.as_str())
        .await
        .expect("links")
        .into_iter()
        .find(|l| l.connector == "stripe")
        .expect("the link the apply wrote");
    let mut locked = false;
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("pool");
        let xmax: String = sqlx::query_scalar(
            "SELECT xmax::text FROM sync_links WHERE customer_id = $1 AND connector = 'stripe'",
        )
        .bind(customer.id.as_str())
        .fetch_one(&pool)
        .await
        .expect("link row");
        locked = xmax != "0";
    }
    (link, locked)
}

/// A change a connector's webhook made is already held by that connector's
/// link (the apply wrote it in the same transaction): the intake schedules
/// it for the other connectors and leaves that link alone, on the
/// in-process bus (PostgreSQL: one statement; SQLite: a read and the
/// intake) and on the cluster's (the notices carry their source).
async fn the_intake_leaves_the_source_connectors_link_alone(postgres: bool) {
    let connectors = ["salesforce".to_owned(), "stripe".to_owned()];
    let synced = |link: &SyncLink, renamed: &Customer| {
        assert_eq!(
            (link.state, link.wanted_version, link.synced_version),
            (LinkState::Synced, renamed.version, renamed.version)
        );
    };

    // The in-process bus.
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, url, typed, webhook, renamed) = a_webhook_change_queued(postgres, dir.path()).await;
    let queued = store.unpublished_outbox(10).await.expect("queue");
    let sources: Vec<(&str, i64, Option<&str>)> = queued
        .iter()
        .map(|n| {
            (
                n.customer_id.as_str(),
                n.version,
                n.source_connector.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            (typed.id.as_str(), 1, None),
            (webhook.id.as_str(), 1, None),
            (webhook.id.as_str(), renamed.version, Some("stripe")),
        ]
    );
    let (before, _) = stripe_link(&store, &url, &webhook).await;
    synced(&before, &renamed);
    let intake = store.intake_queued(10, &connectors).await.expect("intake");
    assert_eq!((intake.taken, intake.scheduled), (3, true));
    let (after, locked) = stripe_link(&store, &url, &webhook).await;
    synced(&after, &renamed);
    assert_eq!(after.updated_at, before.updated_at);
    assert!(!locked, "the intake locked the source's link");
    let links = store.links_of(webhook.id.as_str()).await.expect("links");
    let salesforce = links.iter().find(|l| l.connector == "salesforce");
    assert_eq!(
        salesforce.map(|l| (l.state, l.wanted_version)),
        Some((LinkState::Pending, renamed.version))
    );
    assert_eq!(
        store
            .links_of(typed.id.as_str())
            .await
            .expect("links")
            .len(),
        2
    );

    // The cluster's bus: the notices as its messages carry them.
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, url, typed, webhook, renamed) = a_webhook_change_queued(postgres, dir.path()).await;
    let queued = store.unpublished_outbox(10).await.expect("queue");
    let messages: Vec<ChangeNotice> = queued
        .iter()
        .map(|n| serde_json::from_slice(&serde_json::to_vec(n).expect("message")).expect("notice"))
        .collect();
    assert_eq!(messages, queued);
    let keys = store
        .intake_changes(&messages, &connectors)
        .await
        .expect("intake");
    let scheduled: Vec<(&str, &str)> = keys
        .iter()
        .map(|k| (k.customer_id.as_str(), k.connector.as_str()))
        .collect();
    let mut expected = vec![
        (typed.id.as_str(), "salesforce"),
        (typed.id.as_str(), "stripe"),
        (webhook.id.as_str(), "salesforce"),
    ];
    expected.sort();
    assert_eq!(scheduled, expected);
    let (after, locked) = stripe_link(&store, &url, &webhook).await;
    synced(&after, &renamed);
    assert!(!locked, "the intake locked the source's link");
    // A message of an older version names no source: the intake offers
    // the change to every connector, and the link, which holds it, keeps it.
    let old: ChangeNotice = serde_json::from_value(json!({
        "customer_id": webhook.id.as_str(),
        "version": renamed.version,
        "correlation_id": null,
    }))
    .expect("an older message");
    assert_eq!(old.source_connector, None);
    store
        .intake_changes(&[old], &connectors)
        .await
        .expect("intake");
    let (after, _) = stripe_link(&store, &url, &webhook).await;
    synced(&after, &renamed);
}

#[tokio::test]
async fn postgres_the_intake_leaves_the_source_connectors_link_alone() {
    the_intake_leaves_the_source_connectors_link_alone(true).await;
}

#[tokio::test]
async fn sqlite_the_intake_leaves_the_source_connectors_link_alone() {
    the_intake_leaves_the_source_connectors_link_alone(false).await;
}

#[tokio::test]
async fn postgres_the_relay_takes_the_oldest_changes_and_schedules_the_newest() {
    the_relay_takes_the_oldest_changes_and_schedules_the_newest(true).await;
}

#[tokio::test]
async fn sqlite_the_relay_takes_the_oldest_changes_and_schedules_the_newest() {
    the_relay_takes_the_oldest_changes_and_schedules_the_newest(false).await;
}

/// A group of creates whose statement commits but whose answer is lost
/// (the connection drops after the commit) is committed again one create
/// at a time; each create then finds its own row and is answered as
/// written, once: one customer, one `created` event. Before, the id clash
/// was taken for a taken email and the client told 409 `email_taken` about
/// the customer it had just made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_was_lost_is_answered_as_written() {
    use ferry_test_support::pg_proxy::PgProxy;
    let cluster = PgCluster::shared();
    let proxy = PgProxy::start(cluster.port()).await.expect("proxy");
    let url = cluster.create_database().await.expect("test database");
    let store = open(&proxy.url(&url)).await;

    let address = email("lost-answer");
    proxy.lose_next_answer_to("INSERT INTO customers");
    let customer = store
        .create_customer(
            fields(&address, "Lost"),
            WriteContext {
                correlation_id: None,
                idempotency: None,
            },
        )
        .await
        .expect("answered as written");
    assert_eq!(proxy.answers_lost(), 1, "the commit's answer was lost");

    let direct = open(&url).await;
    let stored = direct
        .get_customer(&customer.id)
        .await
        .expect("the customer exists");
    assert_eq!(stored.email, address);
    let events = direct
        .outbox_events(customer.id.as_str())
        .await
        .expect("outbox");
    assert_eq!(events.len(), 1, "{events:?}");

    // The same with an `Idempotency-Key`: PostgreSQL's statement checks the
    // key before it inserts, and finds it completed by the landed commit.
    // (A new store: its connections prepare the statement afresh, so the
    // proxy sees its text.)
    let store = open(&proxy.url(&url)).await;
    use ferry::store::idempotency::{
        ClaimOutcome, IdempotencyCompletion, IdempotencyRecord, StoredResponse,
    };
    let record = IdempotencyRecord {
        scope: "open".into(),
        key: "lost-answer-key".into(),
        fingerprint: "the-create".into(),
        claim: "the-request".into(),
    };
    let claimed = store.claim_idempotency_key(&record, 3_600_000, 60_000);
    assert_eq!(claimed.await.expect("claimed"), ClaimOutcome::Claimed);
    let render = |_: &ferry::store::Customer| StoredResponse {
        status: 201,
        headers: Vec::new(),
        body: b"{}".to_vec(),
    };
    proxy.lose_next_answer_to("INSERT INTO customers");
    let keyed = store
        .create_customer(
            fields(&email("lost-keyed"), "Keyed"),
            WriteContext {
                correlation_id: None,
                idempotency: Some(IdempotencyCompletion {
                    scope: &record.scope,
                    key: &record.key,
                    claim: &record.claim,
                    render: &render,
                }),
            },
        )
        .await
        .expect("answered as written");
    assert_eq!(proxy.answers_lost(), 2);
    direct
        .get_customer(&keyed.id)
        .await
        .expect("the keyed customer exists");
}

/// A push given up while a newer change came in leaves the link open for
/// that change: intake only raised the leased link's wanted version, and a
/// dead link re-opens only above it, so a dead state would strand the
/// newer version. A refusal of credentials on the replay of a create whose
/// first attempt timed out keeps that create to replay: it says nothing
/// about whether the first one was applied.
async fn a_give_up_leaves_a_newer_change_to_push(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 4).await;
    // The pushes sent a create that timed out, and are being retried.
    let marks: Vec<LinkWrite> = links
        .iter()
        .map(|link| LinkWrite::CreatePending {
            version: link.wanted_version,
            record: json!({ "id": link.customer_id }),
        })
        .collect();
    let refs: Vec<(&SyncLink, &LinkWrite)> = links.iter().zip(&marks).collect();
    assert_eq!(
        store.write_links(&refs).await.expect("marks"),
        [true, true, true, true]
    );
    // The first customer is edited while its push is out.
    let id = CustomerId::parse(&links[0].customer_id).expect("id");
    let edited = rename(&store, &id, "Fixed").await;
    store
        .intake_changes(&[notice(&edited)], &["stripe".to_owned()])
        .await
        .expect("intake");

    let give_up = |link: &SyncLink, error_kind| {
        LinkWrite::Outcome(RecordedOutcome::DeadLettered {
            version: link.wanted_version,
            operation: Some("create"),
            attempt: 2,
            error_kind,
            error: "remote answered 401".to_owned(),
            settle_ms: 0,
        })
    };
    // The third push already sent the edit (the claim read the customer
    // after it), and the edit's intake came in during the push: the
    // failure is the newest version's, and the link is dead.
    let third = CustomerId::parse(&links[2].customer_id).expect("id");
    let sent = rename(&store, &third, "Sent").await;
    store
        .intake_changes(&[notice(&sent)], &["stripe".to_owned()])
        .await
        .expect("intake");
    let sent_failed = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: sent.version,
        operation: Some("create"),
        attempt: 2,
        error_kind: ferry::store::DeadLetterKind::Permanent,
        error: "remote answered 400".to_owned(),
        settle_ms: 0,
    });
    // The fourth push also sent an edit the claim read, but the edit's
    // intake comes in only after the push died.
    let fourth = CustomerId::parse(&links[3].customer_id).expect("id");
    let later = rename(&store, &fourth, "Later").await;
    let later_failed = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: later.version,
        operation: Some("create"),
        attempt: 2,
        error_kind: ferry::store::DeadLetterKind::Permanent,
        error: "remote answered 400".to_owned(),
        settle_ms: 0,
    });
    let writes = [
        give_up(&links[0], ferry::store::DeadLetterKind::Permanent),
        give_up(&links[1], ferry::store::DeadLetterKind::Unauthorized),
        sent_failed,
        later_failed,
    ];
    let refs: Vec<(&SyncLink, &LinkWrite)> = links.iter().zip(&writes).collect();
    assert_eq!(
        store.write_links(&refs).await.expect("written"),
        [true, true, true, true]
    );
    store
        .intake_changes(&[notice(&later)], &["stripe".to_owned()])
        .await
        .expect("intake");
    let later_link = store.links_of(&links[3].customer_id).await.expect("links")[0].clone();
    assert_eq!(
        (later_link.state, later_link.wanted_version),
        (LinkState::Dead, later.version),
        "the version that died is not pushed again when its change comes in"
    );
    let sent_link = store.links_of(&links[2].customer_id).await.expect("links")[0].clone();
    assert_eq!(
        sent_link.state,
        LinkState::Dead,
        "the newest version failed"
    );

    let newer = store.links_of(&links[0].customer_id).await.expect("links")[0].clone();
    assert_eq!(newer.state, LinkState::Pending, "v2 still to push");
    assert_eq!(newer.wanted_version, edited.version);
    assert_eq!(newer.attempts, 0);
    assert_eq!(newer.pending_version, None, "a refused create is forgotten");
    let refused = store.links_of(&links[1].customer_id).await.expect("links")[0].clone();
    assert_eq!(refused.state, LinkState::Dead);
    assert_eq!(
        refused.pending_version,
        Some(links[1].wanted_version),
        "the create that timed out is still the one to replay"
    );
    assert!(refused.pending_record.is_some());
}

/// A rate limit spends no attempt, also when a newer version came in while
/// the push was out: it started at attempt 1 (the count the intake reset
/// was taken as spent), one attempt short of its budget. A failure that
/// spends one is the newer version's first.
async fn a_rate_limit_over_a_newer_version_spends_no_attempt(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 2).await;
    for (link, attempt) in [(&links[0], 0), (&links[1], 1)] {
        let id = CustomerId::parse(&link.customer_id).expect("id");
        let newer = rename(&store, &id, "Newer").await;
        store
            .intake_changes(&[notice(&newer)], &["stripe".to_owned()])
            .await
            .expect("intake");
        let failed = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
            version: link.wanted_version,
            operation: "create",
            attempt,
            at_ms: chrono::Utc::now().timestamp_millis() - 1,
            error: "rate limited".to_owned(),
            pending_version: None,
            answered: false,
        });
        assert_eq!(store.write_links(&[(link, &failed)]).await.unwrap(), [true]);
        let after = store.links_of(&link.customer_id).await.expect("links")[0].clone();
        assert_eq!(
            (after.wanted_version, after.attempts),
            (newer.version, attempt),
            "spent: {attempt}"
        );
    }
}

/// The replay of a create whose answer was lost (v1, kept) is refused by
/// the remote after the customer was fixed (v2): v2 was never tried, and
/// stays to push as a fresh create. It used to die with v1.
async fn a_refused_replay_leaves_the_fixed_version_to_push(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let links = claimed_links(&store, 1).await;
    let mark = LinkWrite::CreatePending {
        version: links[0].wanted_version,
        record: json!({ "id": links[0].customer_id }),
    };
    assert_eq!(
        store.write_links(&[(&links[0], &mark)]).await.unwrap(),
        [true]
    );
    let timed_out = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
        version: links[0].wanted_version,
        operation: "create",
        attempt: 1,
        at_ms: chrono::Utc::now().timestamp_millis() - 1,
        error: "timed out".to_owned(),
        pending_version: Some(links[0].wanted_version),
        answered: false,
    });
    assert_eq!(
        store.write_links(&[(&links[0], &timed_out)]).await.unwrap(),
        [true]
    );
    let id = CustomerId::parse(&links[0].customer_id).expect("id");
    let fixed = rename(&store, &id, "Fixed").await;
    store
        .intake_changes(&[notice(&fixed)], &["stripe".to_owned()])
        .await
        .expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_due_links(None, &["stripe".to_owned()], "lease-replay", until, 10)
        .await
        .expect("claimed");
    let link = claimed
        .into_iter()
        .map(|c| c.link)
        .find(|l| l.customer_id == links[0].customer_id)
        .expect("due again");
    assert_eq!(
        (link.wanted_version, link.pending_version),
        (fixed.version, Some(links[0].wanted_version))
    );
    let refused = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: links[0].wanted_version,
        operation: Some("create"),
        attempt: 2,
        error_kind: ferry::store::DeadLetterKind::Permanent,
        error: "remote answered 400".to_owned(),
        settle_ms: 0,
    });
    assert_eq!(
        store.write_links(&[(&link, &refused)]).await.unwrap(),
        [true]
    );
    let after = store.links_of(&links[0].customer_id).await.expect("links")[0].clone();
    assert_eq!(
        (
            after.state,
            after.wanted_version,
            after.attempts,
            after.pending_version
        ),
        (LinkState::Pending, fixed.version, 0, None),
        "the fixed version is still to push, as a fresh create"
    );
}

/// A create marker left on a link whose record an inbound event then
/// linked (the create was held back: a backfill, an open breaker) does
/// not keep the update's retries on one key: after a 5xx the remote may
/// have saved (Stripe does, for a day), the retry, and a replay of the dead
/// letter, go under a fresh key. The marker kept the key, and every retry
/// got the saved 500 back.
async fn a_stale_create_marker_does_not_keep_an_updates_key(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let links = claimed_links(&store, 1).await;
    let link = &links[0];
    let mark = LinkWrite::CreatePending {
        version: link.wanted_version,
        record: json!({ "id": link.customer_id }),
    };
    assert_eq!(store.write_links(&[(link, &mark)]).await.unwrap(), [true]);
    // The inbound event linking the record by its email.
    let sql = format!(
        "UPDATE sync_links SET remote_id = 'cus_linked' WHERE customer_id = '{}'",
        link.customer_id
    );
    crate::helpers::execute_raw(&url, &sql, &[]).await;
    let repairs = |store: &Store| {
        let id = link.customer_id.clone();
        let store = store.clone();
        async move { store.links_of(&id).await.expect("links")[0].repairs }
    };
    let before = repairs(&store).await;
    let failed = LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
        version: link.wanted_version,
        operation: "update",
        attempt: 1,
        at_ms: chrono::Utc::now().timestamp_millis() - 1,
        error: "remote answered 500".to_owned(),
        pending_version: None,
        answered: true,
    });
    assert_eq!(store.write_links(&[(link, &failed)]).await.unwrap(), [true]);
    assert_eq!(
        repairs(&store).await,
        before + 1,
        "a fresh key for the retry"
    );

    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_due_links(None, &["stripe".to_owned()], "lease-again", until, 10)
        .await
        .expect("claimed");
    let again = claimed
        .into_iter()
        .map(|c| c.link)
        .find(|l| l.customer_id == link.customer_id)
        .expect("due again");
    let died = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: again.wanted_version,
        operation: Some("update"),
        attempt: 2,
        error_kind: ferry::store::DeadLetterKind::RetriesExhausted,
        error: "remote answered 500".to_owned(),
        settle_ms: 0,
    });
    assert_eq!(store.write_links(&[(&again, &died)]).await.unwrap(), [true]);
    let replayed = store
        .replay_dead_letters(None, Some("stripe"), Some("outbound"))
        .await
        .expect("replayed");
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    assert_eq!(
        repairs(&store).await,
        before + 2,
        "a fresh key for the replay"
    );
}

#[tokio::test]
async fn postgres_a_stale_create_marker_does_not_keep_an_updates_key() {
    a_stale_create_marker_does_not_keep_an_updates_key(true).await;
}

#[tokio::test]
async fn sqlite_a_stale_create_marker_does_not_keep_an_updates_key() {
    a_stale_create_marker_does_not_keep_an_updates_key(false).await;
}

#[tokio::test]
async fn postgres_a_refused_replay_leaves_the_fixed_version_to_push() {
    a_refused_replay_leaves_the_fixed_version_to_push(true).await;
}

#[tokio::test]
async fn sqlite_a_refused_replay_leaves_the_fixed_version_to_push() {
    a_refused_replay_leaves_the_fixed_version_to_push(false).await;
}

#[tokio::test]
async fn postgres_a_rate_limit_over_a_newer_version_spends_no_attempt() {
    a_rate_limit_over_a_newer_version_spends_no_attempt(true).await;
}

#[tokio::test]
async fn sqlite_a_rate_limit_over_a_newer_version_spends_no_attempt() {
    a_rate_limit_over_a_newer_version_spends_no_attempt(false).await;
}

#[tokio::test]
async fn postgres_a_give_up_leaves_a_newer_change_to_push() {
    a_give_up_leaves_a_newer_change_to_push(true).await;
}

#[tokio::test]
async fn sqlite_a_give_up_leaves_a_newer_change_to_push() {
    a_give_up_leaves_a_newer_change_to_push(false).await;
}

/// Two customers linked (see [`two_linked`], tagged `tag`), and a remote
/// edit of the first one's name flagged as an open conflict that holds its
/// link: the first customer, its remote id, and the conflict.
async fn a_flagged_name(store: &Store, tag: &str) -> (Customer, String, Conflict) {
    let (customers, remote, reads) = two_linked(store, tag).await;
    let events = claim_later(store, &[(format!("evt_flag_{tag}"), &remote[0])]).await;
    let first = customers[0].clone();
    let flagged = InboundChange {
        conflict: Some(NewConflict {
            policy: "flag".into(),
            fields: json!([{"field": "name", "local": "First", "remote": "Other", "base": "First"}]),
            open: true,
        }),
        link_read: Some(reads[0]),
        ..change(&events[0], CustomerWrite::None, Some(&first.id))
    };
    let held = store.apply_inbound_many(&[flagged]).await.expect("applied");
    assert!(matches!(held[0], Ok(Applied::Done(None))), "{held:?}");
    let conflict = store
        .conflicts(&ListConflicts {
            customer_id: Some(first.id.as_str().to_owned()),
            limit: 10,
            ..ListConflicts::default()
        })
        .await
        .expect("conflicts")
        .remove(0);
    (first, remote[0].clone(), conflict)
}

/// Resolves `conflict` keeping `customer` as it is (`local`), with the
/// events `folded` in.
async fn keep_local(
    store: &Store,
    conflict: &Conflict,
    customer: &Customer,
    folded: Option<&ferry::store::conflicts::Folded>,
) -> Result<ferry::store::conflicts::Resolved, StoreError> {
    store
        .resolve_conflict(
            conflict,
            "local",
            &conflict.fields.0,
            &customer.id,
            customer.version,
            &customer.fields(),
            None,
            folded,
        )
        .await
}

/// A conflict's resolution and the customer's delete, at the same moment on
/// PostgreSQL: the resolution waits for the conflict's row (held here by a
/// third transaction) before the delete comes and takes the customer's
/// row and waits for the conflict's too. Had the resolution locked the
/// conflict first and the customer second (the delete's order reversed),
/// releasing the conflict would close a cycle and PostgreSQL would abort
/// one side; both take the customer first, so the delete waits for the
/// resolution and each gets its own answer.
#[tokio::test]
async fn postgres_a_resolution_and_a_delete_wait_rather_than_deadlock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let (first, _, conflict) = a_flagged_name(&store, "resolve_delete").await;

    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let mut holder = raw.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM conflicts WHERE id = $1 FOR UPDATE")
        .bind(&conflict.id)
        .execute(&mut *holder)
        .await
        .expect("conflict held");
    let waiting = |n: i64| sessions_waiting_on_locks(&raw, n);
    let resolving = {
        let (store, conflict, first) = (store.clone(), conflict.clone(), first.clone());
        tokio::spawn(async move { keep_local(&store, &conflict, &first, None).await })
    };
    waiting(1).await;
    let deleting = {
        let (store, id) = (store.clone(), first.id.clone());
        tokio::spawn(async move {
            store
                .delete_customer(&id, None, WriteContext::default())
                .await
        })
    };
    waiting(2).await;
    holder.rollback().await.expect("conflict released");

    let resolved = resolving
        .await
        .expect("joined")
        .expect("resolution answered");
    assert!(
        matches!(resolved, ferry::store::conflicts::Resolved::Done(_)),
        "{resolved:?}"
    );
    let deleted = deleting.await.expect("joined").expect("delete answered");
    assert_eq!(deleted.id, first.id);
    let after = store
        .conflict(&conflict.id)
        .await
        .expect("read")
        .expect("kept");
    assert_eq!(after.resolution.as_deref(), Some("local"));
}

/// An edit that comes while a person resolves the conflict that holds its
/// link, on PostgreSQL: the resolution has closed the conflict and woken
/// what it held (not yet this event), and has not committed when the event
/// is parked behind the conflict. The park waits for the resolution, then
/// sees it closed: the event is due now, not held until its next look (by
/// then the resolution's push may have made its payload look like an echo,
/// and its field was lost).
#[tokio::test]
async fn postgres_an_event_parked_during_a_resolution_is_not_held() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let (_, remote, conflict) = a_flagged_name(&store, "park_resolve").await;
    let conflict = conflict.id;
    let edit = claim_later(&store, &[("evt_edit".to_owned(), &remote)])
        .await
        .remove(0);

    // The resolution, as far as its wake, uncommitted.
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let mut resolution = raw.begin().await.expect("begin");
    sqlx::query("UPDATE conflicts SET state = 'resolved', resolution = 'local' WHERE id = $1")
        .bind(&conflict)
        .execute(&mut *resolution)
        .await
        .expect("closed");
    sqlx::query("UPDATE inbox SET held_by = NULL WHERE held_by = $1")
        .bind(&conflict)
        .execute(&mut *resolution)
        .await
        .expect("woken");
    let parking = {
        let (store, edit, conflict) = (store.clone(), edit.clone(), conflict.clone());
        tokio::spawn(async move {
            let at_ms = chrono::Utc::now().timestamp_millis() + 60_000;
            let finish = InboxFinish::Held {
                conflict: &conflict,
                at_ms,
            };
            store.finish_inbox(&edit, finish).await
        })
    };
    // The park either waits for the resolution or is done before it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&raw)
        .await
        .expect("activity");
        if blocked >= 1 || parking.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the park neither waited nor ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    resolution.commit().await.expect("resolved");
    assert!(parking.await.expect("joined").expect("parked"));
    let (held_by, due): (Option<String>, i64) =
        sqlx::query_as("SELECT held_by, next_attempt_at_ms FROM inbox WHERE seq = $1")
            .bind(edit.seq)
            .fetch_one(&raw)
            .await
            .expect("the edit");
    assert_eq!(held_by, None, "held by a closed conflict");
    assert!(due <= chrono::Utc::now().timestamp_millis(), "not due now");
}

/// A resolution takes in a waiting event a worker holds under a lease
/// (a parked event looked at again): the event ends folded, and the
/// worker's park finds its lease gone. Left out while leased, a record
/// whose events were always under a lease could not be resolved (each
/// attempt raced), and one leased at the wrong moment was applied after
/// the resolution's push, where it looked like its echo.
async fn a_resolution_takes_a_leased_waiting_event(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let (first, remote, conflict) = a_flagged_name(&store, &format!("leased_{postgres}")).await;
    let edit = claim_later(&store, &[(format!("evt_leased_{postgres}"), &remote)])
        .await
        .remove(0);
    let waiting = store
        .inbox_waiting("stripe", &remote, 0)
        .await
        .expect("waiting");
    assert_eq!(
        waiting.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![edit.seq],
        "the leased event waits too"
    );
    let folded = ferry::store::conflicts::Folded {
        snapshot: json!({"email": first.email, "name": "Other"}),
        seen_at_ms: edit.occurred_at_ms,
        seqs: vec![edit.seq],
        overridden: json!([]),
        event_id: edit.event_id.clone(),
    };
    let resolved = keep_local(&store, &conflict, &first, Some(&folded))
        .await
        .expect("resolved");
    assert!(
        matches!(resolved, ferry::store::conflicts::Resolved::Done(_)),
        "{resolved:?}"
    );
    let parked = store
        .finish_inbox(
            &edit,
            InboxFinish::Held {
                conflict: &conflict.id,
                at_ms: chrono::Utc::now().timestamp_millis() + 60_000,
            },
        )
        .await
        .expect("finish");
    assert!(!parked, "the worker's lease was taken over");
    let ended = store
        .inbox_of_remote("stripe", &remote)
        .await
        .expect("inbox")
        .into_iter()
        .find(|e| e.seq == edit.seq)
        .expect("the event");
    assert_eq!(ended.state.as_str(), "skipped", "{ended:?}");
}

#[tokio::test]
async fn postgres_a_resolution_takes_a_leased_waiting_event() {
    a_resolution_takes_a_leased_waiting_event(true).await;
}

#[tokio::test]
async fn sqlite_a_resolution_takes_a_leased_waiting_event() {
    a_resolution_takes_a_leased_waiting_event(false).await;
}

/// A deployment that leaves Kafka while its consumers lag: the outbox rows
/// its relay published but no consumer took stay on the queue, marked
/// published. The in-process bus takes them in all the same (nothing
/// publishes in that mode); before, it skipped them for good.
async fn changes_published_before_leaving_kafka_are_taken_in(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let customer = store
        .create_customer(fields(&email("left-kafka"), "Ada"), WriteContext::default())
        .await
        .expect("customer");
    let queued = store.unpublished_outbox(10).await.expect("queue");
    let ids: Vec<i64> = queued.iter().filter_map(|c| c.outbox_id).collect();
    assert_eq!(ids.len(), 1);
    store.mark_published(&ids).await.expect("published");

    let intake = store
        .intake_queued(10, &["stripe".to_owned()])
        .await
        .expect("intake");
    assert_eq!((intake.taken, intake.scheduled), (1, true));
    let links = store.links_of(customer.id.as_str()).await.expect("links");
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].state, LinkState::Pending);
}

#[tokio::test]
async fn postgres_changes_published_before_leaving_kafka_are_taken_in() {
    changes_published_before_leaving_kafka_are_taken_in(true).await;
}

#[tokio::test]
async fn sqlite_changes_published_before_leaving_kafka_are_taken_in() {
    changes_published_before_leaving_kafka_are_taken_in(false).await;
}

/// A reconciliation driver that lost its run to another (its lease ran out
/// while it waited) cannot end it: its late failure is refused, and the
/// run stays with the driver that holds it.
async fn only_the_lease_holder_ends_a_run(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let started = store
        .start_run("stripe", "reconcile", "report", "api")
        .await
        .expect("started")
        .expect("a run");
    let now = chrono::Utc::now().timestamp_millis();
    let first = store.claim_run("lease-a", now - 1).await.expect("claim");
    let first = first.expect("claimed by a");
    let second = store
        .claim_run("lease-b", now + 60_000)
        .await
        .expect("claim")
        .expect("taken over by b");
    assert_eq!(second.id, started.id);

    let late = store
        .finish_run(&first, "failed", Some("a timed out"))
        .await;
    assert!(!late.expect("answered"), "the old driver's end is refused");
    let run = store.run(&started.id).await.expect("read").expect("run");
    assert_eq!(run.status, "running");
    assert!(store
        .finish_run(&second, "completed", None)
        .await
        .expect("answered"));
    let run = store.run(&started.id).await.expect("read").expect("run");
    assert_eq!(run.status, "completed");
}

#[tokio::test]
async fn postgres_only_the_lease_holder_ends_a_run() {
    only_the_lease_holder_ends_a_run(true).await;
}

#[tokio::test]
async fn sqlite_only_the_lease_holder_ends_a_run() {
    only_the_lease_holder_ends_a_run(false).await;
}

/// An inbound event a dead letter's replay makes due again counts its age
/// from the replay, not from its arrival: a replay of letters days old
/// read as the pipeline days behind, and paged the documented alert while
/// the events applied.
async fn a_replayed_event_ages_from_its_replay(postgres: bool) {
    use ferry::store::DeadLetterKind;
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let (_, remote, _) = two_linked(&store, &format!("aged_{postgres}")).await;
    let event_id = format!("evt_aged_{postgres}");
    let events = claim_later(&store, &[(event_id.clone(), &remote[0])]).await;
    let finish = InboxFinish::Dead {
        error: "the record does not validate",
        kind: DeadLetterKind::Permanent,
    };
    assert!(store.finish_inbox(&events[0], finish).await.expect("dead"));
    let a_day_ago = (chrono::Utc::now() - chrono::Duration::days(1)).to_rfc3339();
    let sql = format!("UPDATE inbox SET received_at = '{a_day_ago}' WHERE event_id = '{event_id}'");
    crate::helpers::execute_raw(&url, &sql, &[]).await;
    let letters = open_letters(&store).await;
    let inbound: Vec<String> = letters
        .into_iter()
        .filter(|l| l.direction == "inbound")
        .map(|l| l.id)
        .collect();
    let replayed = store
        .replay_dead_letters(Some(&inbound), None, None)
        .await
        .expect("replayed");
    assert_eq!(replayed.len(), 1);
    let backlog = store.backlog().await.expect("backlog");
    assert!(
        backlog.inbox_oldest_age < std::time::Duration::from_secs(60),
        "{:?}",
        backlog.inbox_oldest_age
    );
    // Parked at its next try behind a conflict that closed meanwhile
    // (let go at once, due now): still a retry, aged from then, not from
    // its arrival.
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_due_inbox("lease-aged", until, 100, 0, i64::MIN)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), 1);
    let parked = InboxFinish::Held {
        conflict: "cf_closed_meanwhile",
        at_ms: chrono::Utc::now().timestamp_millis() + 60_000,
    };
    assert!(store
        .finish_inbox(&claimed[0], parked)
        .await
        .expect("parked"));
    let backlog = store.backlog().await.expect("backlog");
    assert!(
        backlog.inbox_oldest_age < std::time::Duration::from_secs(60),
        "parked, let go: {:?}",
        backlog.inbox_oldest_age
    );
}

/// A link that died twice (a version refused, then the next one) has two
/// open letters; replaying either re-opens the link, which pushes the
/// customer as it is now, and closes both. The other stayed open: counted
/// among the letters to replay, and its own replay answered `replayed: 1`
/// and did nothing.
async fn a_replay_closes_every_letter_of_the_link_it_reopens(postgres: bool) {
    use ferry::store::DeadLetterKind;
    let (store, _url, _dir, customers) = three_linked(postgres, "replay_both").await;
    let stripe = ["stripe".to_owned()];
    let id = customers[0].id.as_str();
    for name in ["Refused once", "Refused again"] {
        let edited = rename(&store, &customers[0].id, name).await;
        store
            .intake_changes(&[notice(&edited)], &stripe)
            .await
            .expect("intake");
        let link = stripe_link_claimed(&store, "lease-replay-both", id).await;
        let refused = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
            version: edited.version,
            operation: Some("update"),
            attempt: 1,
            error_kind: DeadLetterKind::Permanent,
            error: "remote answered 400".to_owned(),
            settle_ms: 0,
        });
        let written = store.write_links(&[(&link, &refused)]).await;
        assert_eq!(written.expect("written"), [true]);
    }
    let open = || async {
        open_letters(&store)
            .await
            .into_iter()
            .filter(|l| l.customer_id == id)
            .map(|l| l.id)
            .collect::<Vec<_>>()
    };
    let letters = open().await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mut replayed = store
        .replay_dead_letters(Some(&letters[..1]), None, None)
        .await
        .expect("replayed");
    replayed.sort();
    assert_eq!(replayed, letters, "both letters of the link");
    assert_eq!(open().await, Vec::<String>::new());
    let link = store.links_of(id).await.expect("links")[0].clone();
    assert_eq!(link.state, LinkState::Pending);
    let again = store
        .replay_dead_letters(Some(&letters[1..]), None, None)
        .await
        .expect("replayed");
    assert_eq!(again, Vec::<String>::new(), "nothing left to replay");
}

/// Replaying an inbound dead letter re-opens its inbox event and leaves the
/// customer's dead push alone (that letter is still open, its cause maybe
/// not fixed); a connector's replay takes every open letter, in batches.
async fn a_replay_reopens_only_its_own_work(postgres: bool) {
    use ferry::store::DeadLetterKind;
    let (store, _dir) = store(postgres).await;
    let (customers, remote, _reads) = two_linked(&store, &format!("replay_{postgres}")).await;
    let first = &customers[0];
    // An inbound event of the first customer's record is given up...
    let events = claim_later(&store, &[(format!("evt_dead_{postgres}"), &remote[0])]).await;
    let finish = InboxFinish::Dead {
        error: "the record does not validate",
        kind: DeadLetterKind::Permanent,
    };
    assert!(store.finish_inbox(&events[0], finish).await.expect("dead"));
    // ...and so is a push of its next version.
    let renamed = rename(&store, &first.id, "Renamed").await;
    let keys = store
        .intake_changes(&[notice(&renamed)], &["stripe".to_owned()])
        .await
        .expect("intake");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_links(&keys, &[], "lease-dead", until)
        .await
        .expect("claimed");
    let link = &claimed[0].link;
    let give_up = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: link.wanted_version,
        operation: Some("update"),
        attempt: 1,
        error_kind: DeadLetterKind::Permanent,
        error: "remote answered 400".to_owned(),
        settle_ms: 0,
    });
    assert_eq!(
        store
            .write_links(&[(link, &give_up)])
            .await
            .expect("written"),
        [true]
    );
    let letters = open_letters(&store).await;
    let inbound = letters
        .iter()
        .find(|l| l.direction == "inbound")
        .expect("inbound");
    assert_eq!(inbound.customer_id, first.id.as_str());

    let replayed = store
        .replay_dead_letters(Some(std::slice::from_ref(&inbound.id)), None, None)
        .await
        .expect("replayed");
    assert_eq!(replayed.len(), 1);
    let link = store.links_of(first.id.as_str()).await.expect("links")[0].clone();
    assert_eq!(
        link.state,
        LinkState::Dead,
        "the push's letter is not replayed"
    );

    // A connector's replay: the outbound letter and 500 more, two batches.
    let many = claimed_links(&store, 500).await;
    let writes: Vec<LinkWrite> = many
        .iter()
        .map(|link| {
            LinkWrite::Outcome(RecordedOutcome::DeadLettered {
                version: link.wanted_version,
                operation: Some("create"),
                attempt: 1,
                error_kind: DeadLetterKind::Permanent,
                error: "remote answered 400".to_owned(),
                settle_ms: 0,
            })
        })
        .collect();
    let refs: Vec<(&SyncLink, &LinkWrite)> = many.iter().zip(&writes).collect();
    store.write_links(&refs).await.expect("written");
    // The inbound ones only (their cause fixed, not the pushes'): none
    // open, and the pushes' letters stay.
    let inbound_only = store
        .replay_dead_letters(None, Some("stripe"), Some("inbound"))
        .await
        .expect("replayed");
    assert!(inbound_only.is_empty(), "{inbound_only:?}");
    let link = store.links_of(first.id.as_str()).await.expect("links")[0].clone();
    assert_eq!(link.state, LinkState::Dead, "an outbound letter replayed");
    let all = store
        .replay_dead_letters(None, Some("stripe"), Some("outbound"))
        .await
        .expect("replayed");
    assert_eq!(all.len(), 501);
    let link = store.links_of(first.id.as_str()).await.expect("links")[0].clone();
    assert_eq!(link.state, LinkState::Pending);
    let last = store.links_of(&many[499].customer_id).await.expect("links")[0].clone();
    assert_eq!(last.state, LinkState::Pending);
}

#[tokio::test]
async fn postgres_a_replay_closes_every_letter_of_the_link_it_reopens() {
    a_replay_closes_every_letter_of_the_link_it_reopens(true).await;
}

#[tokio::test]
async fn sqlite_a_replay_closes_every_letter_of_the_link_it_reopens() {
    a_replay_closes_every_letter_of_the_link_it_reopens(false).await;
}

#[tokio::test]
async fn postgres_a_replayed_event_ages_from_its_replay() {
    a_replayed_event_ages_from_its_replay(true).await;
}

#[tokio::test]
async fn sqlite_a_replayed_event_ages_from_its_replay() {
    a_replayed_event_ages_from_its_replay(false).await;
}

#[tokio::test]
async fn postgres_a_replay_reopens_only_its_own_work() {
    a_replay_reopens_only_its_own_work(true).await;
}

#[tokio::test]
async fn sqlite_a_replay_reopens_only_its_own_work() {
    a_replay_reopens_only_its_own_work(false).await;
}

/// Two replays of one letter at once (a second click, another operator):
/// on PostgreSQL both read it open, the second waits for the first's row
/// lock. The letter is replayed once, by one of them, and its link
/// re-opened once: the second reopened it again (another push, under
/// another key, of what the first replay's push may have dead-lettered
/// anew) and reported the letter replayed too.
#[tokio::test]
async fn postgres_two_replays_at_once_replay_a_letter_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let link = claimed_links(&store, 1).await.remove(0);
    let give_up = LinkWrite::Outcome(RecordedOutcome::DeadLettered {
        version: link.wanted_version,
        operation: Some("create"),
        attempt: 1,
        error_kind: ferry::store::DeadLetterKind::Permanent,
        error: "remote answered 400".to_owned(),
        settle_ms: 0,
    });
    store
        .write_links(&[(&link, &give_up)])
        .await
        .expect("written");
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let letter: String = sqlx::query_scalar("SELECT id FROM dead_letters")
        .fetch_one(&raw)
        .await
        .expect("the letter");
    let mut holder = raw.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM dead_letters WHERE id = $1 FOR UPDATE")
        .bind(&letter)
        .execute(&mut *holder)
        .await
        .expect("letter held");
    let replay = || {
        let (store, letter) = (store.clone(), letter.clone());
        tokio::spawn(async move {
            store
                .replay_dead_letters(Some(std::slice::from_ref(&letter)), None, None)
                .await
        })
    };
    let (first, second) = (replay(), replay());
    sessions_waiting_on_locks(&raw, 2).await;
    holder.rollback().await.expect("letter released");
    let first = first.await.expect("joined").expect("replayed");
    let second = second.await.expect("joined").expect("replayed");
    assert_eq!(first.len() + second.len(), 1, "{first:?} {second:?}");
    let repairs: i32 = sqlx::query_scalar("SELECT repairs FROM sync_links WHERE customer_id = $1")
        .bind(&link.customer_id)
        .fetch_one(&raw)
        .await
        .expect("the link");
    assert_eq!(repairs, 1, "the link re-opened once");
}

/// A bus consumer's claim of a batch spanning partitions (its seqs out of
/// order) beside the relay marking the same events published, which locks
/// in rising seq order: the claim locked the later event, then waited for
/// the earlier one the mark held while the mark waited for the later one,
/// a deadlock PostgreSQL broke by aborting one side. Claims lock in seq
/// order too.
#[tokio::test]
async fn postgres_a_claim_out_of_seq_order_waits_for_the_relays_mark() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let events = [
        event("evt_order_1", "cus_order_1"),
        event("evt_order_2", "cus_order_2"),
    ];
    store
        .store_inbox_many(&[("stripe", &events, None)])
        .await
        .expect("stored");
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM inbox ORDER BY seq")
        .fetch_all(&raw)
        .await
        .expect("seqs");
    let mut marking = raw.begin().await.expect("begin");
    let mark = "UPDATE inbox SET published_at_ms = 1 WHERE seq = $1";
    sqlx::query(mark)
        .bind(seqs[0])
        .execute(&mut *marking)
        .await
        .expect("first marked");
    let claiming = {
        let (store, batch) = (store.clone(), vec![seqs[1], seqs[0]]);
        let until = chrono::Utc::now().timestamp_millis() + 60_000;
        tokio::spawn(async move { store.claim_inbox_seqs(&batch, "consumer", until).await })
    };
    sessions_waiting_on_locks(&raw, 1).await;
    sqlx::query(mark)
        .bind(seqs[1])
        .execute(&mut *marking)
        .await
        .expect("second marked, not a deadlock");
    marking.commit().await.expect("marks committed");
    let claimed = claiming
        .await
        .expect("joined")
        .expect("claimed, not a deadlock");
    let claimed: Vec<i64> = claimed.iter().map(|e| e.seq).collect();
    assert_eq!(claimed, seqs);
}

/// The same race on the outbox's queue: a consumer's batch spanning
/// partitions names its changes out of id order, and its intake takes
/// their queue rows off while the relay marks them published (in rising id
/// order). The intake locked the later row, waited for the earlier one the
/// mark held, and the mark waited for the later one: a deadlock PostgreSQL
/// broke by aborting one side (the batch rewound, or the relay's round
/// published again). The intake locks in id order too.
#[tokio::test]
async fn postgres_an_intake_out_of_id_order_waits_for_the_relays_mark() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    // A queue of some size, as under load: planned over a handful of rows,
    // the intake's join read the whole queue in its order.
    sqlx::query(
        "INSERT INTO outbox (aggregate, aggregate_id, version, kind, created_at) \
         SELECT 'customer', 'cus_queued_' || g, 1, 'created', now() FROM generate_series(1, 5000) g",
    )
    .execute(&raw)
    .await
    .expect("queued");
    sqlx::query("ANALYZE outbox_queue")
        .execute(&raw)
        .await
        .expect("analyzed");
    let mut notices = Vec::new();
    for n in 0..2 {
        let customer = store
            .create_customer(
                fields(&email(&format!("intake-order-{n}")), "Order"),
                WriteContext::default(),
            )
            .await
            .expect("created");
        let id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE aggregate_id = $1")
            .bind(customer.id.as_str())
            .fetch_one(&raw)
            .await
            .expect("its outbox row");
        notices.push(ChangeNotice {
            outbox_id: Some(id),
            ..notice(&customer)
        });
    }
    let ids: Vec<i64> = notices.iter().filter_map(|n| n.outbox_id).collect();
    let mut marking = raw.begin().await.expect("begin");
    let mark = "UPDATE outbox_queue SET published_at = now() WHERE outbox_id = $1";
    sqlx::query(mark)
        .bind(ids[0])
        .execute(&mut *marking)
        .await
        .expect("first marked");
    let taking = {
        let (store, batch) = (store.clone(), vec![notices[1].clone(), notices[0].clone()]);
        tokio::spawn(async move { store.intake_changes(&batch, &["stripe".to_owned()]).await })
    };
    sessions_waiting_on_locks(&raw, 1).await;
    sqlx::query(mark)
        .bind(ids[1])
        .execute(&mut *marking)
        .await
        .expect("second marked, not a deadlock");
    marking.commit().await.expect("marks committed");
    taking
        .await
        .expect("joined")
        .expect("taken in, not a deadlock");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_queue WHERE outbox_id = ANY($1)")
            .bind(&ids)
            .fetch_one(&raw)
            .await
            .expect("counted");
    assert_eq!(left, 0, "both taken off the queue");
}

/// Replayed dead letters stay as history and may outnumber the open ones
/// by far after an outage: the backlog's count (every few seconds), the
/// default list and a connector's replay read the open ones through
/// `dead_letters_open` instead of every letter (the statements' shapes,
/// planned over 20,000 replayed letters and two open).
#[tokio::test]
async fn postgres_open_dead_letters_are_read_through_their_index() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let _store = open(&url).await;
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    sqlx::query(
        "INSERT INTO dead_letters (id, customer_id, connector, direction, version, error_kind, \
         error, attempts, created_at, replayed_at) \
         SELECT 'dl_' || lpad(g::text, 8, '0'), 'cus_' || g, 'stripe', 'outbound', 1, 'permanent', \
         'remote answered 400', 1, now(), CASE WHEN g > 20000 THEN NULL ELSE now() END \
         FROM generate_series(1, 20002) g",
    )
    .execute(&raw)
    .await
    .expect("letters");
    sqlx::query("ANALYZE dead_letters")
        .execute(&raw)
        .await
        .expect("analysed");
    for statement in [
        "SELECT connector, direction, COUNT(*) FROM dead_letters \
         WHERE replayed_at IS NULL GROUP BY connector, direction",
        "SELECT id FROM dead_letters WHERE (CAST(NULL AS TEXT) IS NULL OR connector = NULL) \
         AND replayed_at IS NULL AND (CAST(NULL AS TEXT) IS NULL OR id > NULL) \
         AND (CAST(NULL AS TEXT) IS NULL OR direction = NULL) ORDER BY id LIMIT 51",
        "SELECT MAX(id) FROM dead_letters WHERE replayed_at IS NULL \
         AND (CAST('stripe' AS TEXT) IS NULL OR connector = 'stripe') \
         AND (CAST(NULL AS TEXT) IS NULL OR direction = NULL)",
    ] {
        let plan: serde_json::Value =
            sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {statement}"))
                .fetch_one(&raw)
                .await
                .expect("plan");
        assert!(
            plan.to_string().contains("dead_letters_open"),
            "{statement}: {plan}"
        );
    }
}

/// Waits until `n` sessions of the database wait on a lock (10 s at most).
async fn sessions_waiting_on_locks(raw: &sqlx::PgPool, n: i64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let blocked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(raw)
        .await
        .expect("activity");
        if blocked >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "never {n} waiting");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A ferry on a fresh PostgreSQL database reached through a [`PgProxy`],
/// with no Stripe (the API's writes are what is looked at).
async fn app_through_proxy() -> (
    ferry_test_support::pg_proxy::PgProxy,
    crate::helpers::SyncApp,
) {
    use crate::helpers::{spawn_sync_app, Backend, Setup};
    let cluster = PgCluster::shared();
    let proxy = ferry_test_support::pg_proxy::PgProxy::start(cluster.port())
        .await
        .expect("proxy");
    let url = cluster.create_database().await.expect("test database");
    let mut setup = Setup::new(Backend::Postgres, "http://127.0.0.1:9");
    setup.database_url = Some(proxy.url(&url));
    (proxy, spawn_sync_app(setup).await)
}

/// An `Idempotency-Key` claim whose answer was lost (the connection dropped
/// after PostgreSQL stored it) is released before the client is answered,
/// so its retry with the same key runs at once. Before, the claim stayed
/// `in_flight` and every retry got 409 `idempotency_key_in_flight` for the
/// whole 60 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_was_lost_is_released() {
    let (proxy, app) = app_through_proxy().await;
    let body = json!({"email": email("lost-claim"), "name": "Lost"});
    let create = || {
        app.client
            .post(format!("{}/api/v1/customers", app.base))
            .header("idempotency-key", "lost-claim")
            .json(&body)
            .send()
    };
    proxy.lose_next_answer_to("INSERT INTO idempotency_keys");
    let first = create().await.expect("answered");
    assert_eq!(proxy.answers_lost(), 1, "the claim's answer was lost");
    assert!(first.status().is_server_error(), "{}", first.status());
    let retry = create().await.expect("answered");
    let status = retry.status().as_u16();
    assert_eq!(status, 201, "{}", retry.text().await.unwrap_or_default());
}

/// A request that failed, and whose key's release failed too (its
/// connection cut: the store busy or away, the moments requests fail), has
/// the release tried again in the background: the client's retry runs
/// within a second or two. Before, every retry got 409
/// `idempotency_key_in_flight` for the rest of the 60 s lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_failed_is_tried_again() {
    let (proxy, app) = app_through_proxy().await;
    let delete = || {
        app.client
            .delete(format!(
                "{}/api/v1/customers/cus_0123456789abcdef0123456789abcdef",
                app.base
            ))
            .header("idempotency-key", "release-again")
            .send()
    };
    // The release's own statement (`… AND claim = $3`) is cut.
    proxy.drop_next("AND claim = $3");
    let first = delete().await.expect("answered");
    assert_eq!(first.status().as_u16(), 404);
    assert_eq!(proxy.connections_cut(), 1, "the release was cut");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let retry = delete().await.expect("answered");
        match retry.status().as_u16() {
            409 => assert!(
                tokio::time::Instant::now() < deadline,
                "the key stayed claimed"
            ),
            status => {
                assert_eq!(status, 404, "{}", retry.text().await.unwrap_or_default());
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// A retry that finds its key's claim abandoned and takes it over does not
/// take a key the first request completes between the retry's read and its
/// takeover: the takeover finds the key done and leaves it, with its stored
/// answer. Before, the takeover's guard (the lock and expiry times, which
/// completing does not change) still matched: the answer was wiped and the
/// write ran a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_leaves_a_key_completed_meanwhile() {
    use ferry::store::idempotency::{ClaimOutcome, IdempotencyRecord};
    use ferry_test_support::pg_proxy::PgProxy;
    let cluster = PgCluster::shared();
    let proxy = PgProxy::start(cluster.port()).await.expect("proxy");
    let url = cluster.create_database().await.expect("test database");
    let store = open(&proxy.url(&url)).await;
    let first = IdempotencyRecord {
        scope: "open".into(),
        key: "taken-over".into(),
        fingerprint: "the-write".into(),
        claim: "first".into(),
    };
    let claimed = store.claim_idempotency_key(&first, 3_600_000, 0).await;
    assert_eq!(claimed.expect("claim"), ClaimOutcome::Claimed);

    // The retry (lease 0: the claim looks abandoned) has read the key, and
    // its takeover is held on the way to the server...
    let hold = proxy.hold_next("UPDATE idempotency_keys SET fingerprint");
    let retry = {
        let store = store.clone();
        let record = IdempotencyRecord {
            claim: "retry".into(),
            ..first.clone()
        };
        tokio::spawn(async move { store.claim_idempotency_key(&record, 3_600_000, 0).await })
    };
    hold.reached().await;
    // ...while the first request's write completes the key.
    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    sqlx::query(
        "UPDATE idempotency_keys SET state = 'done', response_status = 201, \
         response_headers = '[]', response_body = '\\x7b7d' \
         WHERE key = 'taken-over' AND claim = 'first'",
    )
    .execute(&raw)
    .await
    .expect("completed");
    hold.release();
    let outcome = retry.await.expect("task").expect("claim");
    assert_ne!(
        outcome,
        ClaimOutcome::Claimed,
        "the completed key was taken over"
    );
    let (state, claim): (String, String) =
        sqlx::query_as("SELECT state, claim FROM idempotency_keys WHERE key = 'taken-over'")
            .fetch_one(&raw)
            .await
            .expect("key");
    assert_eq!((state.as_str(), claim.as_str()), ("done", "first"));
}

/// Cluster mode's bus claim: a fresh event is taken although the replica
/// that received it stamped it with a clock running 30 s ahead of this
/// one; before, it waited for the inbox loops' grace.
#[tokio::test]
async fn postgres_a_fresh_event_stamped_by_a_clock_ahead_is_claimed_from_the_bus() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    store
        .store_inbox_many(&[("stripe", &[event("evt_ahead", "cus_ahead")], None)])
        .await
        .expect("stored");
    let raw = sqlx::PgPool::connect(&url).await.expect("raw pool");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM inbox")
        .fetch_all(&raw)
        .await
        .expect("seqs");
    assert_eq!(seqs.len(), 1);
    sqlx::query("UPDATE inbox SET next_attempt_at_ms = next_attempt_at_ms + 30000")
        .execute(&raw)
        .await
        .expect("stamped ahead");
    let until = chrono::Utc::now().timestamp_millis() + 60_000;
    let claimed = store
        .claim_inbox_seqs(&seqs, "lease-bus", until)
        .await
        .expect("claimed");
    assert_eq!(claimed.len(), 1, "the announced event is claimed");
}

/// The relay leader's session is watched by TCP keepalives of seconds,
/// so that a leader whose host dies frees the lock for another replica.
#[tokio::test]
async fn postgres_the_relay_leaders_session_is_kept_alive_in_seconds() {
    let (store, _dir) = store(true).await;
    let Some(ferry::store::outbox::RelayLeadership::Postgres(mut session)) =
        store.try_lead_relay().await.expect("lead")
    else {
        panic!("a fresh database has no leader");
    };
    let conn = session.conn().expect("open");
    let idle: String = sqlx::query_scalar("SHOW tcp_keepalives_idle")
        .fetch_one(&mut *conn)
        .await
        .expect("shown");
    assert_eq!(idle, "10");
    let user_timeout: String = sqlx::query_scalar("SHOW tcp_user_timeout")
        .fetch_one(&mut *conn)
        .await
        .expect("shown");
    assert_eq!(user_timeout, "30000");
}

/// A leader that stops without resigning (its relay task cancelled at
/// shutdown) frees the lock at once: its session is closed, not handed
/// back to its pool, where the lock would stay held until the process
/// exits and no other replica could relay meanwhile.
#[tokio::test]
async fn postgres_a_leader_dropped_at_shutdown_frees_the_lock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let (first, second) = (open(&url).await, open(&url).await);
    let leadership = first.try_lead_relay().await.expect("lead");
    assert!(leadership.is_some(), "a fresh database has no leader");
    assert!(
        second.try_lead_relay().await.expect("asked").is_none(),
        "one leader at a time"
    );
    drop(leadership);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let _held = loop {
        if let Some(held) = second.try_lead_relay().await.expect("asked") {
            break held;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lock outlived the dropped leadership"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    // The first store still asks: it stands by now.
    assert!(first.try_lead_relay().await.expect("asked").is_none());
}

/// What a run listed into the scratch tables goes when it ends, a bounded
/// delete at a time, and only an ended run's: a running run keeps its own.
/// Before, one unbounded delete per table held SQLite's only writer.
async fn an_ended_runs_scratch_goes_in_batches(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let now = chrono::Utc::now().timestamp_millis();
    let mut runs = Vec::new();
    for (connector, seen, unlinked) in [("stripe", 3, 2), ("salesforce", 2, 1)] {
        store
            .start_run(connector, "reconcile", "report", "api")
            .await
            .expect("started")
            .expect("a run");
        let run = store
            .claim_run(&format!("lease-{connector}"), now + 60_000)
            .await
            .expect("claim")
            .expect("claimed");
        let findings = ferry::store::reconciliations::PageFindings {
            listed_at_ms: now,
            seen: (0..seen).map(|i| format!("{connector}_seen_{i}")).collect(),
            unlinked: (0..unlinked)
                .map(|i| (format!("{connector}_new_{i}"), None, json!({"id": i})))
                .collect(),
            ..Default::default()
        };
        assert!(store
            .commit_page(&run, &findings, None, "sha256-of-the-code", 5)
            .await
            .expect("page"));
        runs.push(run);
    }
    let (ended, running) = (&runs[0], &runs[1]);
    assert!(store
        .finish_run(ended, "completed", None)
        .await
        .expect("ended"));

    let mut steps = Vec::new();
    loop {
        let deleted = store.clear_ended_scratch(2).await.expect("cleared");
        steps.push(deleted);
        if deleted == 0 {
            break;
        }
    }
    // Two of each table, then the last seen row: the ended run's five.
    assert_eq!(steps, [4, 1, 0]);
    assert!(store
        .unlinked_records(&ended.id, None, 100)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        store
            .unlinked_records(&running.id, None, 100)
            .await
            .expect("read")
            .len(),
        1,
        "the running run keeps its scratch"
    );
}

/// A listing started again (another connector version active) forgets
/// what it found a bounded delete at a time, and only under its lease: a
/// replica whose lease ran out (another took the run) deletes nothing, and
/// a restart left half done is told by its run.
async fn a_restarted_listing_forgets_under_its_lease(postgres: bool) {
    let (store, _dir) = store(postgres).await;
    let now = chrono::Utc::now().timestamp_millis();
    store
        .start_run("stripe", "reconcile", "report", "api")
        .await
        .expect("started")
        .expect("a run");
    let run = store
        .claim_run("lease-now", now + 60_000)
        .await
        .expect("claim")
        .expect("claimed");
    let findings = ferry::store::reconciliations::PageFindings {
        listed_at_ms: now,
        seen: (0..5).map(|i| format!("seen_{i}")).collect(),
        unlinked: (0..3)
            .map(|i| (format!("new_{i}"), None, json!({"id": i})))
            .collect(),
        ..Default::default()
    };
    assert!(store
        .commit_page(&run, &findings, Some("page-2"), "code-1", 8)
        .await
        .expect("page"));
    let mut stale = run.clone();
    stale.lease_token = Some("lease-before".to_owned());
    assert!(!store.begin_listing_restart(&stale).await.expect("asked"));
    assert_eq!(
        store.forget_listing_batch(&stale, 2).await.expect("asked"),
        0
    );
    assert!(!store.end_listing_restart(&stale).await.expect("asked"));
    assert_eq!(
        store
            .unlinked_records(&run.id, None, 100)
            .await
            .expect("read")
            .len(),
        3,
        "a lease that ran out deletes nothing"
    );
    let read = store.run(&run.id).await.expect("read").expect("the run");
    assert_eq!(read.cursor.as_deref(), Some("page-2"));

    assert!(store.begin_listing_restart(&run).await.expect("begun"));
    let half_done = store.run(&run.id).await.expect("read").expect("the run");
    assert!(
        half_done.restart_unfinished(),
        "a holder dying here is followed"
    );
    let mut steps = Vec::new();
    loop {
        let deleted = store.forget_listing_batch(&run, 2).await.expect("forgot");
        steps.push(deleted);
        if deleted == 0 {
            break;
        }
    }
    // Two seen and two unlinked, then two seen and the last unlinked,
    // then the last seen.
    assert_eq!(steps, [4, 3, 1, 0]);
    assert!(store.end_listing_restart(&run).await.expect("ended"));
    assert!(store
        .unlinked_records(&run.id, None, 100)
        .await
        .expect("read")
        .is_empty());
    let read = store.run(&run.id).await.expect("read").expect("the run");
    assert_eq!((&read.cursor, &read.listed_with), (&None, &None));
    assert_eq!((read.pages, read.records), (0, 0));
    assert_eq!(read.counts.0.get("listing_restarted"), Some(&json!(1)));
    assert!(!read.restart_unfinished());
}

#[tokio::test]
async fn postgres_a_restarted_listing_forgets_under_its_lease() {
    a_restarted_listing_forgets_under_its_lease(true).await;
}

#[tokio::test]
async fn sqlite_a_restarted_listing_forgets_under_its_lease() {
    a_restarted_listing_forgets_under_its_lease(false).await;
}

#[tokio::test]
async fn postgres_an_ended_runs_scratch_goes_in_batches() {
    an_ended_runs_scratch_goes_in_batches(true).await;
}

#[tokio::test]
async fn sqlite_an_ended_runs_scratch_goes_in_batches() {
    an_ended_runs_scratch_goes_in_batches(false).await;
}

/// Expired idempotency keys go a bounded delete at a time, those that
/// expired first first; a key still remembered stays.
#[tokio::test]
async fn sqlite_expired_idempotency_keys_go_in_batches() {
    let (store, _dir) = store(false).await;
    for (key, ttl_ms) in [
        ("a", -3_000),
        ("b", -2_000),
        ("c", -1_000),
        ("kept", 3_600_000),
    ] {
        let record = ferry::store::idempotency::IdempotencyRecord {
            scope: "open".into(),
            key: key.into(),
            fingerprint: "f".into(),
            claim: key.into(),
        };
        store
            .claim_idempotency_key(&record, ttl_ms, 60_000)
            .await
            .expect("claimed");
    }
    let mut steps = Vec::new();
    loop {
        let purged = store
            .purge_expired_idempotency_keys(2)
            .await
            .expect("purged");
        steps.push(purged);
        if purged == 0 {
            break;
        }
    }
    assert_eq!(steps, [2, 1, 0]);
}

/// A listed page longer than SQLite binds in one statement (a connector
/// may return more than it was asked for) is read in chunks; before, the
/// run failed with "too many SQL variables".
#[tokio::test]
async fn sqlite_a_page_of_forty_thousand_records_is_read() {
    let (store, _dir) = store(false).await;
    let remote_ids: Vec<String> = (0..40_000).map(|i| format!("rec_{i}")).collect();
    let linked = store
        .linked_records("stripe", &remote_ids)
        .await
        .expect("read in chunks");
    assert!(linked.is_empty());
}

/// Webhook deliveries grouped behind SQLite's one writer while another
/// process holds the database's write lock: the group found the store busy
/// after one timeout, and each of its deliveries then waited out its own
/// timeout, one after the other (256 deliveries, 256 timeouts) before any
/// sender heard back. All are answered busy together now, and once the
/// lock is gone the next delivery is stored.
#[tokio::test]
async fn sqlite_a_locked_writer_answers_a_group_busy_at_once() {
    use ferry::sync::group_commit::GroupCommit;
    use ferry::sync::InboxWrites;
    use sqlx::Connection;

    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(false, dir.path()).await;
    let timeout = std::time::Duration::from_millis(300);
    let options = StoreOptions {
        acquire_timeout: timeout,
        ..StoreOptions::default()
    };
    let store = Store::connect(&url, &options).await.expect("store");
    store.migrate().await.expect("migrations");
    let queue = GroupCommit::start(InboxWrites(store.clone()), 1);
    let delivery = |event: NewInboxEvent| ("stripe".to_owned(), vec![event], None);

    // Another process's write transaction.
    let mut other = sqlx::SqliteConnection::connect(&url)
        .await
        .expect("second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("write lock");
    let started = std::time::Instant::now();
    let answers = futures::future::join_all((0..20).map(|n| {
        queue.submit(delivery(event(
            &format!("evt_busy_{n}"),
            &format!("cus_{n}"),
        )))
    }))
    .await;
    let took = started.elapsed();
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_err_and(StoreError::is_store_busy)),
        "{answers:?}"
    );
    // A first group of one, then the other nineteen: two timeouts, not
    // twenty. (A bound far above two, below twenty, for a loaded machine.)
    assert!(took < timeout * 10, "answered after {took:?}");

    sqlx::query("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("lock released");
    let stored = queue
        .submit(delivery(event("evt_after", "cus_after")))
        .await
        .expect("stored once the lock is gone");
    assert_eq!(stored, 1);
}

/// Enabling a connector releases the pushes that waited for it, a batch
/// per statement (one statement over the whole backlog held SQLite's only
/// writer): every waiting push of that connector, and nothing else.
async fn enabling_releases_a_long_backlog_in_batches(postgres: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(postgres, dir.path()).await;
    let store = open(&url).await;
    let n = usize::try_from(ferry::store::connectors::RESUME_BATCH).unwrap() + 50;
    let mut changes = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
        let created = futures::future::join_all(chunk.iter().map(|i| {
            store.create_customer(
                fields(&email(&format!("paused{i}")), "Ada"),
                WriteContext::default(),
            )
        }))
        .await;
        for customer in created {
            let customer = customer.expect("customer");
            changes.push(ChangeNotice {
                customer_id: customer.id.as_str().to_owned(),
                version: customer.version,
                correlation_id: None,
                outbox_id: None,
                source_connector: None,
            });
        }
    }
    store
        .intake_changes(&changes, &["stripe".to_owned(), "salesforce".to_owned()])
        .await
        .expect("intake");
    // Both connectors' pushes wait a minute, saying why (as a paused push
    // does); a few of Stripe's are retries in backoff, which say another
    // thing.
    let later = chrono::Utc::now().timestamp_millis() + 60_000;
    raw_count(
        &url,
        &format!(
            "UPDATE sync_links SET next_attempt_at_ms = {later}, last_error = '{}'",
            ferry::store::links::PAUSED_WAIT
        ),
    )
    .await;
    raw_count(
        &url,
        "UPDATE sync_links SET state = 'retry', last_error = 'HTTP 503' WHERE connector = 'stripe' \
         AND customer_id IN \
         (SELECT customer_id FROM sync_links WHERE connector = 'stripe' ORDER BY customer_id LIMIT 7)",
    )
    .await;

    let resumed = store
        .resume_connector_links("stripe")
        .await
        .expect("resumed");
    assert_eq!(resumed, u64::try_from(n - 7).unwrap());
    let waiting = |connector: &'static str, state: &'static str| {
        let (url, sql) = (
            url.clone(),
            format!(
                "SELECT COUNT(*) FROM sync_links WHERE connector = '{connector}' \
                 AND state = '{state}' AND next_attempt_at_ms = {later}"
            ),
        );
        async move { raw_count(&url, &sql).await }
    };
    assert_eq!(waiting("stripe", "pending").await, 0, "all released");
    assert_eq!(waiting("stripe", "retry").await, 7, "backoff kept");
    assert_eq!(
        waiting("salesforce", "pending").await,
        i64::try_from(n).unwrap(),
        "another connector's left alone"
    );
}

/// Runs `sql` on its own connection to `url`: a count's answer, or the
/// rows a write touched.
async fn raw_count(url: &str, sql: &str) -> i64 {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.expect("raw pool");
        if sql.starts_with("SELECT") {
            sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        } else {
            let done = sqlx::query(sql).execute(&pool).await.expect("write");
            i64::try_from(done.rows_affected()).unwrap()
        }
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.expect("raw pool");
        if sql.starts_with("SELECT") {
            sqlx::query_scalar(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        } else {
            let done = sqlx::query(sql).execute(&pool).await.expect("write");
            i64::try_from(done.rows_affected()).unwrap()
        }
    }
}

#[tokio::test]
async fn postgres_enabling_releases_a_long_backlog_in_batches() {
    enabling_releases_a_long_backlog_in_batches(true).await;
}

#[tokio::test]
async fn sqlite_enabling_releases_a_long_backlog_in_batches() {
    enabling_releases_a_long_backlog_in_batches(false).await;
}

/// Push outcomes written one by one in a group's transaction locked their
/// links in the order the pushes ended, while the relay's intake locks the
/// same links in customer order: a group ending Y's push before X's, and an
/// intake of changes to X and Y, each held one link the other wanted, and
/// PostgreSQL aborted one after a second (40P01). Both take links in
/// (customer, connector) order now: the second waits for the first.
#[tokio::test]
async fn postgres_link_writes_and_the_intake_lock_links_in_one_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let store = open(&url).await;
    let mut links = claimed_links(&store, 2).await;
    links.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    let (x, y) = (links[0].clone(), links[1].clone());
    let retry = |link: &SyncLink| {
        LinkWrite::Outcome(RecordedOutcome::RetryScheduled {
            version: link.wanted_version,
            operation: "create",
            attempt: 1,
            at_ms: chrono::Utc::now().timestamp_millis() + 60_000,
            error: "timed out".into(),
            pending_version: None,
            answered: false,
        })
    };
    let changes: Vec<ChangeNotice> = [&x, &y]
        .iter()
        .map(|link| ChangeNotice {
            customer_id: link.customer_id.clone(),
            version: link.wanted_version + 1,
            correlation_id: None,
            outbox_id: None,
            source_connector: None,
        })
        .collect();

    let raw = sqlx::PgPool::connect(&url).await.expect("raw connection");
    let mut holder = raw.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM sync_links WHERE customer_id = $1 FOR UPDATE")
        .bind(&x.customer_id)
        .execute(&mut *holder)
        .await
        .expect("X's link held");
    let waiting = |n: i64| sessions_waiting_on_locks(&raw, n);
    // The intake: X first (waits for the holder), then Y.
    let intake_store = store.clone();
    let intake = tokio::spawn(async move {
        intake_store
            .intake_changes(&changes, &["stripe".to_owned()])
            .await
    });
    waiting(1).await;
    // The outcomes, Y's push having ended first.
    let writes_store = store.clone();
    let (y_write, x_write) = (retry(&y), retry(&x));
    let (y2, x2) = (y.clone(), x.clone());
    let writes = tokio::spawn(async move {
        writes_store
            .write_links(&[(&y2, &y_write), (&x2, &x_write)])
            .await
    });
    waiting(2).await;
    holder.rollback().await.expect("X's link released");

    intake
        .await
        .expect("joined")
        .expect("the intake, not a deadlock");
    let held = writes
        .await
        .expect("joined")
        .expect("the outcomes, not a deadlock");
    assert_eq!(held, [true, true], "answers in the order written");
}

/// What PostgreSQL answers a write that met other writers, as the store
/// reads it: a deadlock's victim (two inbound groups reaching one customer
/// through two connectors) is busy and contended, retried without spending
/// an attempt; a lock or statement timeout is busy (503) but may come every
/// time (a session idle in a transaction), so it is not contended.
#[tokio::test]
async fn postgres_a_deadlock_is_contention_and_a_statement_timeout_is_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = database_url(true, dir.path()).await;
    let pool = sqlx::PgPool::connect(&url).await.expect("pool");
    sqlx::query("CREATE TABLE rows_apart (id INT PRIMARY KEY)")
        .execute(&pool)
        .await
        .expect("table");
    sqlx::query("INSERT INTO rows_apart VALUES (1), (2)")
        .execute(&pool)
        .await
        .expect("rows");
    let lock = |id: i32| format!("UPDATE rows_apart SET id = id WHERE id = {id}");
    let (mut a, mut b) = (pool.begin().await.unwrap(), pool.begin().await.unwrap());
    sqlx::query(&lock(1))
        .execute(&mut *a)
        .await
        .expect("a holds 1");
    sqlx::query(&lock(2))
        .execute(&mut *b)
        .await
        .expect("b holds 2");
    let (two, one) = (lock(2), lock(1));
    let (first, second) = tokio::join!(
        sqlx::query(&two).execute(&mut *a),
        sqlx::query(&one).execute(&mut *b),
    );
    let victim = first.err().or(second.err()).expect("one is the victim");
    let victim = StoreError::from(victim);
    assert!(victim.is_busy() && victim.is_contended(), "{victim:?}");

    let mut slow = pool.acquire().await.unwrap();
    sqlx::query("SET statement_timeout = 10")
        .execute(&mut *slow)
        .await
        .unwrap();
    let timed_out = sqlx::query("SELECT pg_sleep(1)")
        .execute(&mut *slow)
        .await
        .expect_err("timed out");
    let timed_out = StoreError::from(timed_out);
    assert!(
        timed_out.is_busy() && !timed_out.is_contended(),
        "{timed_out:?}"
    );

    drop((a, b));
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(&lock(1))
        .execute(&mut *holder)
        .await
        .expect("held");
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query("SET lock_timeout = 10")
        .execute(&mut *slow)
        .await
        .unwrap();
    let waited = sqlx::query(&lock(1))
        .execute(&mut *slow)
        .await
        .expect_err("a lock timeout");
    let waited = StoreError::from(waited);
    assert!(waited.is_busy() && !waited.is_contended(), "{waited:?}");
}
