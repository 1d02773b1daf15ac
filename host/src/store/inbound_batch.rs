//! The inbound pipeline's group commits as one statement per table instead
//! of one (or a savepoint and four or five) per event: a group of webhook
//! deliveries stored in one `INSERT`, and a group of applied changes written
//! in five statements. PostgreSQL takes the rows as arrays (`unnest`),
//! SQLite as one JSON array of rows (`json_each`).
//!
//! Each statement is a round trip on PostgreSQL and a hand-off to the
//! connection's thread on SQLite, and those, not the work, bounded both
//! pipelines (docs/performance.md). A group of the common changes (a
//! create, an update or nothing, with the link and the inbox row, and no
//! conflict, push-back, relink or takeover) is written in five statements whatever
//! its size. A change that raced (its customer moved on, or its email was
//! taken meanwhile) is left out of the later statements and gets its own
//! answer, as the savepoint path gives it. Anything else the batch cannot
//! answer alone (a constraint that fails, a lost lease, two changes meeting
//! in one row) rolls the batch back, and
//! [`Store::apply_inbound_many`](super::Store::apply_inbound_many) writes
//! it again one savepoint per change, which gives each its precise answer.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::customers::{columns, CustomerRow};
use super::inbox::{
    group_records, link_upsert_on_conflict, Applied, CustomerWrite, InboundChange, LinkRead,
    NewInboxEvent, RemoteChange, GROUP_LINKS_SQLITE,
};
use super::{Backend, Customer, CustomerId, Store, StoreError};

/// Stores the events of several webhook deliveries in one statement (the
/// ingest's group commit, on either backend); returns, per delivery, how many were new. An
/// event id seen before (a redelivery, or the same event twice in the
/// group) inserts nothing and counts for nobody after its first delivery.
#[tracing::instrument(skip_all, fields(deliveries = deliveries.len()))]
pub(super) async fn store_inbox(
    store: &Store,
    deliveries: &[(&str, &[NewInboxEvent], Option<&str>)],
    at: DateTime<Utc>,
) -> Result<Vec<usize>, StoreError> {
    let mut columns = EventColumns::default();
    let mut owner: HashMap<(&str, &str), usize> = HashMap::new();
    for (delivery, (connector, events, correlation_id)) in deliveries.iter().enumerate() {
        for event in *events {
            owner
                .entry((connector, event.event_id.as_str()))
                .or_insert(delivery);
            columns.push(connector, event, *correlation_id)?;
        }
    }
    let mut stored = vec![0; deliveries.len()];
    if columns.event_ids.is_empty() {
        return Ok(stored);
    }
    // Without a bus there is nothing to publish: stored as handed over to
    // none, which no inbox loop's grace waits for.
    let handed_over = (!store.inbox_bus).then_some(super::inbox::NO_BUS);
    let new: Vec<(String, String)> = match &store.backend {
        Backend::Postgres(pool) => {
            sqlx::query_as(
                "INSERT INTO inbox (connector, event_id, entity, kind, remote_id, occurred_at_ms, record, \
                 origin_key, remote_type, state, next_attempt_at_ms, correlation_id, received_at, policy, \
                 published_at_ms) \
                 SELECT u_connector, u_event, u_entity, u_kind, u_remote, u_occurred, u_record::jsonb, u_origin, \
                 u_type, 'pending', $11, u_correlation, $12, u_policy, $14 \
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::text[], \
                 $8::text[], $9::text[], $10::text[], $13::text[]) WITH ORDINALITY \
                 AS u(u_connector, u_event, u_entity, u_kind, u_remote, u_occurred, u_record, u_origin, u_type, \
                 u_correlation, u_policy, u_n) ORDER BY u_n \
                 ON CONFLICT (connector, event_id) DO NOTHING RETURNING connector, event_id",
            )
            .bind(columns.connectors)
            .bind(columns.event_ids)
            .bind(columns.entities)
            .bind(columns.kinds)
            .bind(columns.remote_ids)
            .bind(columns.occurred_at_ms)
            .bind(columns.records)
            .bind(columns.origin_keys)
            .bind(columns.remote_types)
            .bind(columns.correlation_ids)
            .bind(at.timestamp_millis())
            .bind(at)
            .bind(columns.policies)
            .bind(handed_over)
            .fetch_all(pool)
            .await?
        }
        Backend::Sqlite(pools) => {
            let rows = json_rows(vec![
                json_column(columns.connectors),
                json_column(columns.event_ids),
                json_column(columns.entities),
                json_column(columns.kinds),
                json_column(columns.remote_ids),
                json_column(columns.occurred_at_ms),
                json_column(columns.records),
                json_column(columns.origin_keys),
                json_column(columns.remote_types),
                json_column(columns.correlation_ids),
                json_column(columns.policies),
            ]);
            // `WHERE true` tells SQLite's parser the ON CONFLICT is the
            // insert's, not a join's.
            sqlx::query_as(
                "INSERT INTO inbox (connector, event_id, entity, kind, remote_id, occurred_at_ms, record, \
                 origin_key, remote_type, state, next_attempt_at_ms, correlation_id, received_at, policy, \
                 published_at_ms) \
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
                 value ->> 6, value ->> 7, value ->> 8, 'pending', $2, value ->> 9, $3, value ->> 10, $4 \
                 FROM json_each($1) WHERE true ORDER BY key \
                 ON CONFLICT (connector, event_id) DO NOTHING RETURNING connector, event_id",
            )
            .bind(rows)
            .bind(at.timestamp_millis())
            .bind(at)
            .bind(handed_over)
            .fetch_all(&pools.writer)
            .await?
        }
    };
    for (connector, event_id) in &new {
        if let Some(&delivery) = owner.get(&(connector.as_str(), event_id.as_str())) {
            stored[delivery] += 1;
        }
    }
    Ok(stored)
}

/// Inbox events, one array per column.
#[derive(Default)]
struct EventColumns {
    connectors: Vec<String>,
    event_ids: Vec<String>,
    entities: Vec<String>,
    kinds: Vec<&'static str>,
    remote_ids: Vec<String>,
    occurred_at_ms: Vec<i64>,
    records: Vec<Option<String>>,
    origin_keys: Vec<Option<String>>,
    remote_types: Vec<String>,
    correlation_ids: Vec<Option<String>>,
    policies: Vec<Option<String>>,
}

impl EventColumns {
    fn push(
        &mut self,
        connector: &str,
        event: &NewInboxEvent,
        correlation_id: Option<&str>,
    ) -> Result<(), StoreError> {
        self.connectors.push(connector.to_owned());
        self.event_ids.push(event.event_id.clone());
        self.entities.push(event.entity.clone());
        self.kinds.push(event.kind.as_str());
        self.remote_ids.push(event.remote_id.clone());
        self.occurred_at_ms.push(event.occurred_at_ms);
        self.records.push(
            event
                .record
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
        );
        self.origin_keys.push(event.origin_key.clone());
        self.remote_types.push(event.remote_type.clone());
        self.correlation_ids.push(correlation_id.map(str::to_owned));
        self.policies.push(event.policy.clone());
        Ok(())
    }
}

/// Whether a change is one the batch writes (the others need statements of
/// their own: relinks, push-backs, conflicts and deletes are rare).
fn batchable(change: &InboundChange) -> bool {
    change.unlink_customer.is_none()
        && change.releases.is_none()
        && change.push_back.is_none()
        && change.conflict.is_none()
        && !matches!(change.customer, CustomerWrite::Delete { .. })
}

/// Applies `changes` in one transaction of five statements, or returns
/// `None` (nothing written) when the savepoint path must do it.
#[tracing::instrument(skip_all, fields(changes = changes.len()))]
pub(super) async fn apply(
    store: &Store,
    changes: &[InboundChange],
    at: DateTime<Utc>,
) -> Option<Vec<Result<Applied, StoreError>>> {
    if changes.len() < 2 || !changes.iter().all(batchable) {
        return None;
    }
    match write(store, changes, at).await {
        Ok(results) => results,
        Err(error) => {
            tracing::debug!(%error, "batched inbound apply fell back to one change at a time");
            None
        }
    }
}

async fn write(
    store: &Store,
    changes: &[InboundChange],
    at: DateTime<Utc>,
) -> Result<Option<Vec<Result<Applied, StoreError>>>, sqlx::Error> {
    // The customer each change writes: a new id for a create.
    let ids: Vec<Option<CustomerId>> = changes
        .iter()
        .map(|change| match &change.customer {
            CustomerWrite::Create(_) => Some(CustomerId::generate()),
            CustomerWrite::Update { id, .. } => Some(id.clone()),
            CustomerWrite::None | CustomerWrite::Delete { .. } => None,
        })
        .collect();
    // Two changes of one customer, of one link or of one remote record in
    // a batch would meet in one row, which a single statement cannot
    // order: one at a time.
    let mut rows = HashSet::new();
    let mut links = HashSet::new();
    let mut records = HashSet::new();
    for (change, id) in changes.iter().zip(&ids) {
        let event = &change.event;
        if !records.insert((event.connector.as_str(), event.remote_id.as_str())) {
            return Ok(None);
        }
        if let Some(id) = id {
            if !rows.insert(id.as_str()) {
                return Ok(None);
            }
        }
        let link = id.as_ref().or(change.link_customer.as_ref());
        if let Some(link) = link.filter(|_| change.link_remote) {
            if !links.insert((link.as_str(), change.event.connector.as_str())) {
                return Ok(None);
            }
        }
    }

    let mut tx = Tx::begin(store).await?;
    let mut written: Vec<Option<(Customer, &'static str)>> = vec![None; changes.len()];
    let mut raced = vec![false; changes.len()];
    let index: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.as_ref().map(|id| (id.as_str(), i)))
        .collect();

    // A change whose remote record's link moved on since its decision read
    // it (another loop applied an event of the same record) writes nothing
    // and decides again. The links stay locked on PostgreSQL until the
    // commit.
    let links_now = tx.links_read(changes).await?;
    for ((race, change), now) in raced.iter_mut().zip(changes).zip(links_now) {
        *race = now != change.link_read;
    }
    // A record linked to a customer the change does not write must find it
    // live (see `links_to_a_customer_unwritten`); held until the commit on
    // PostgreSQL.
    let unwritten: Vec<usize> = (0..changes.len())
        .filter(|&i| !raced[i] && super::inbox::links_to_a_customer_unwritten(&changes[i]))
        .collect();
    if !unwritten.is_empty() {
        let ids: Vec<&str> = unwritten
            .iter()
            .filter_map(|&i| changes[i].link_customer.as_ref().map(CustomerId::as_str))
            .collect();
        let live = tx.live_customers(&ids).await?;
        for &i in &unwritten {
            let id = changes[i].link_customer.as_ref().map(CustomerId::as_str);
            raced[i] = !id.is_some_and(|id| live.contains(id));
        }
    }

    let creates: Vec<usize> = (0..changes.len())
        .filter(|&i| !raced[i] && matches!(changes[i].customer, CustomerWrite::Create(_)))
        .collect();
    if !creates.is_empty() {
        let mut columns = Columns::default();
        for &i in &creates {
            if let CustomerWrite::Create(fields) = &changes[i].customer {
                columns.push(ids[i].as_ref().map(|id| id.as_str()), fields, 0);
            }
        }
        // A taken email (a live customer has it, or another create of this
        // batch) inserts nothing: that change decides again.
        let created = tx.create_customers(columns, at).await?;
        record(created, "created", &index, &mut written);
        for &i in &creates {
            raced[i] = written[i].is_none();
        }
    }

    let updates: Vec<usize> = (0..changes.len())
        .filter(|&i| !raced[i] && matches!(changes[i].customer, CustomerWrite::Update { .. }))
        .collect();
    if !updates.is_empty() {
        let mut columns = Columns::default();
        for &i in &updates {
            if let CustomerWrite::Update {
                id,
                expected_version,
                fields,
            } = &changes[i].customer
            {
                columns.push(Some(id.as_str()), fields, *expected_version);
            }
        }
        // A customer that moved on since the decision is not updated: that
        // change decides again.
        let updated = tx.update_customers(columns, at).await?;
        if updated.iter().any(|row| row.is_deleted()) {
            return Ok(None);
        }
        record(updated, "updated", &index, &mut written);
        for &i in &updates {
            raced[i] = written[i].is_none();
        }
    }

    // The outbox events of what was written, in the batch's order.
    let mut outbox = OutboxColumns::default();
    for (change, written) in changes.iter().zip(&written) {
        if let Some((customer, kind)) = written {
            outbox.push(customer, kind, change);
        }
    }
    if !outbox.ids.is_empty() {
        tx.insert_outbox(outbox, at).await?;
    }

    // The links, then the inbox rows, of the changes that did not race.
    let mut link = LinkColumns::default();
    let mut inbox = InboxColumns::default();
    for (i, change) in changes.iter().enumerate() {
        if raced[i] {
            continue;
        }
        let customer = written[i].as_ref().map(|(c, _)| c);
        let link_customer = customer
            .map(|c| c.id.clone())
            .or_else(|| change.link_customer.clone());
        if let Some(link_customer) = link_customer.as_ref().filter(|_| change.link_remote) {
            link.push(link_customer, customer.map(|c| c.version), change)?;
        }
        inbox.push(link_customer.as_ref(), change);
    }
    if !link.customers.is_empty() {
        let expected = link.customers.len() as u64;
        if tx.upsert_links(link, at).await? != expected {
            // A customer's link holds another live record of the
            // connector now (two records of one email, applied at once):
            // the savepoint path tells which change decides again.
            return Ok(None);
        }
    }
    if !inbox.seqs.is_empty() {
        let expected = inbox.seqs.len();
        if tx.finish_inbox(inbox).await? != expected {
            // Another worker holds one of them now: the savepoint path
            // tells which.
            return Ok(None);
        }
    }
    tx.commit().await?;

    Ok(Some(
        written
            .into_iter()
            .zip(raced)
            .map(|(written, raced)| {
                Ok(if raced {
                    Applied::Raced
                } else {
                    Applied::Done(written.map(|(customer, _)| Box::new(customer)))
                })
            })
            .collect(),
    ))
}

/// The batch's transaction on either backend: the same five statements,
/// fed by arrays (`unnest`) on PostgreSQL and by one JSON array of rows
/// (`json_each`) on SQLite, where each statement is a hand-off to the
/// connection's thread rather than a round trip.
enum Tx<'c> {
    Postgres(sqlx::Transaction<'c, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'c, sqlx::Sqlite>),
}

/// One JSON array of rows for SQLite's `json_each`, a row an array of the
/// columns' values in order (read back with `value ->> n`).
fn json_rows(columns: Vec<Vec<serde_json::Value>>) -> String {
    let rows = columns.first().map_or(0, Vec::len);
    let mut out: Vec<Vec<serde_json::Value>> = (0..rows).map(|_| Vec::new()).collect();
    for column in columns {
        for (row, value) in out.iter_mut().zip(column) {
            row.push(value);
        }
    }
    serde_json::Value::from(
        out.into_iter()
            .map(serde_json::Value::from)
            .collect::<Vec<_>>(),
    )
    .to_string()
}

fn json_column<T: Into<serde_json::Value>>(values: Vec<T>) -> Vec<serde_json::Value> {
    values.into_iter().map(Into::into).collect()
}

impl<'c> Tx<'c> {
    async fn begin(store: &'c Store) -> Result<Self, sqlx::Error> {
        Ok(match &store.backend {
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // Every statement below finds its rows by key. With a few
                // dozen keys and a table of a few thousand rows the planner
                // prefers a sequential scan filtered by `= ANY(keys)` (4.2
                // ms for 60 of 5,000 customers, against 0.3 ms by the
                // index; docs/performance.md): not here.
                sqlx::query("SET LOCAL enable_seqscan = off")
                    .execute(&mut *tx)
                    .await?;
                Self::Postgres(tx)
            }
            Backend::Sqlite(pools) => Self::Sqlite(pools.writer.begin().await?),
        })
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => tx.commit().await,
            Self::Sqlite(tx) => tx.commit().await,
        }
    }

    async fn create_customers(
        &mut self,
        columns: Columns,
        at: DateTime<Utc>,
    ) -> Result<Vec<CustomerRow>, sqlx::Error> {
        match self {
            Self::Postgres(tx) => {
                sqlx::query_as(concat!(
                    "INSERT INTO customers (", columns!(), ") ",
                    "SELECT u_id, u_name, u_email, u_phone, u_address::jsonb, u_metadata::jsonb, 1, $7, $7, NULL ",
                    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) ",
                    "AS u(u_id, u_name, u_email, u_phone, u_address, u_metadata) ",
                    "ON CONFLICT DO NOTHING RETURNING ", columns!()
                ))
                .bind(columns.ids)
                .bind(columns.names)
                .bind(columns.emails)
                .bind(columns.phones)
                .bind(columns.addresses)
                .bind(columns.metadata)
                .bind(at)
                .fetch_all(&mut **tx)
                .await
            }
            Self::Sqlite(tx) => {
                // `WHERE true` tells SQLite's parser the ON CONFLICT is the
                // insert's, not a join's.
                sqlx::query_as(concat!(
                    "INSERT INTO customers (", columns!(), ") ",
                    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, ",
                    "1, $2, $2, NULL FROM json_each($1) WHERE true ",
                    "ON CONFLICT DO NOTHING RETURNING ", columns!()
                ))
                .bind(columns.json_rows())
                .bind(at)
                .fetch_all(&mut **tx)
                .await
            }
        }
    }

    /// Of `ids`, the customers not deleted (share-locked on PostgreSQL).
    async fn live_customers(&mut self, ids: &[&str]) -> Result<HashSet<String>, sqlx::Error> {
        let rows: Vec<(String,)> = match self {
            Self::Postgres(tx) => {
                sqlx::query_as(
                    "SELECT id FROM customers WHERE id = ANY($1) AND deleted_at IS NULL \
                     ORDER BY id FOR SHARE",
                )
                .bind(ids)
                .persistent(false)
                .fetch_all(&mut **tx)
                .await?
            }
            Self::Sqlite(tx) => {
                let ids = serde_json::to_string(ids).map_err(|e| sqlx::Error::Encode(e.into()))?;
                sqlx::query_as(
                    "SELECT id FROM customers WHERE id IN (SELECT value FROM json_each($1)) \
                     AND deleted_at IS NULL",
                )
                .bind(ids)
                .fetch_all(&mut **tx)
                .await?
            }
        };
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The link of each change's remote record as [`LinkRead`] compares
    /// it, in the changes' order; locked on PostgreSQL, in key order, as
    /// `inbox::GROUP_LINKS_POSTGRES` does for the savepoint path, after
    /// the records no link held (`inbox::LOCK_UNLINKED_POSTGRES`). Here the keys
    /// go as two arrays (`unnest`): measured 0.32 ms a call for ≈ 33 rows
    /// against 0.46–0.48 ms for the JSON array that statement takes
    /// (`scripts/bench-wal.sh`, round 20), on the path most groups take.
    async fn links_read(
        &mut self,
        changes: &[InboundChange],
    ) -> Result<Vec<Option<LinkRead>>, sqlx::Error> {
        let rows: Vec<(String, String, i64, i64, bool, bool, i64)> = match self {
            Self::Postgres(tx) => {
                let unlinked = super::inbox::unlinked_records(changes)
                    .map_err(|e| sqlx::Error::Encode(e.into()))?;
                if let Some(unlinked) = unlinked {
                    sqlx::query(super::inbox::LOCK_UNLINKED_POSTGRES)
                        .bind(unlinked)
                        .execute(&mut **tx)
                        .await?;
                }
                let (connectors, remote_ids): (Vec<&str>, Vec<&str>) = changes
                    .iter()
                    .map(|c| (c.event.connector.as_str(), c.event.remote_id.as_str()))
                    .unzip();
                sqlx::query_as(
                    "SELECT connector, remote_id, remote_seen_at_ms, wanted_version, \
                     held_by IS NOT NULL, remote_deleted, pushed_at_ms FROM sync_links \
                     WHERE (connector, remote_id) IN (SELECT * FROM unnest($1::text[], $2::text[])) \
                     ORDER BY customer_id COLLATE \"C\", connector COLLATE \"C\" FOR NO KEY UPDATE",
                )
                .bind(connectors)
                .bind(remote_ids)
                // Planned for each call (the store module's "Plans kept
                // from an empty table").
                .persistent(false)
                .fetch_all(&mut **tx)
                .await?
            }
            Self::Sqlite(tx) => {
                let records = group_records(changes).map_err(|e| sqlx::Error::Encode(e.into()))?;
                sqlx::query_as(GROUP_LINKS_SQLITE)
                    .bind(records)
                    .fetch_all(&mut **tx)
                    .await?
            }
        };
        let mut links: HashMap<(String, String), LinkRead> = rows
            .into_iter()
            .map(
                |(
                    connector,
                    remote_id,
                    remote_seen_at_ms,
                    wanted_version,
                    held,
                    remote_deleted,
                    pushed_at_ms,
                )| {
                    let read = LinkRead {
                        remote_seen_at_ms,
                        wanted_version,
                        held,
                        remote_deleted,
                        pushed_at_ms,
                    };
                    ((connector, remote_id), read)
                },
            )
            .collect();
        Ok(changes
            .iter()
            .map(|c| links.remove(&(c.event.connector.clone(), c.event.remote_id.clone())))
            .collect())
    }

    async fn update_customers(
        &mut self,
        columns: Columns,
        at: DateTime<Utc>,
    ) -> Result<Vec<CustomerRow>, sqlx::Error> {
        match self {
            Self::Postgres(tx) => {
                sqlx::query_as(concat!(
                    "UPDATE customers SET name = u_name, email = u_email, phone = u_phone, ",
                    "address = u_address::jsonb, metadata = u_metadata::jsonb, version = version + 1, updated_at = $8 ",
                    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[]) ",
                    "AS u(u_id, u_name, u_email, u_phone, u_address, u_metadata, u_expected) ",
                    // By the primary key only: `id = ANY` for the lookup,
                    // and no `deleted_at IS NULL`, which let the planner
                    // (statistics taken while the table was empty, as on a
                    // first backfill) scan the whole partial email index of
                    // live customers: 8 ms for 64 rows of 5,000. A deleted
                    // customer cannot match anyway (a delete bumps the
                    // version the decision expects); one that did would be
                    // returned with `deleted_at` set and send the batch back.
                    "WHERE id = ANY($1::text[]) AND id = u_id AND version = u_expected ",
                    "RETURNING ", columns!()
                ))
                .bind(columns.ids)
                .bind(columns.names)
                .bind(columns.emails)
                .bind(columns.phones)
                .bind(columns.addresses)
                .bind(columns.metadata)
                .bind(columns.expected)
                .bind(at)
                .fetch_all(&mut **tx)
                .await
            }
            Self::Sqlite(tx) => {
                sqlx::query_as(concat!(
                    "UPDATE customers SET name = u_name, email = u_email, phone = u_phone, ",
                    "address = u_address, metadata = u_metadata, version = version + 1, updated_at = $2 ",
                    "FROM (SELECT value ->> 0 AS u_id, value ->> 1 AS u_name, value ->> 2 AS u_email, ",
                    "value ->> 3 AS u_phone, value ->> 4 AS u_address, value ->> 5 AS u_metadata, ",
                    "value ->> 6 AS u_expected FROM json_each($1)) ",
                    "WHERE id = u_id AND version = u_expected RETURNING ", columns!()
                ))
                .bind(columns.json_rows())
                .bind(at)
                .fetch_all(&mut **tx)
                .await
            }
        }
    }

    /// The outbox rows, all written at the batch's time `at` (the
    /// customers' `updated_at`).
    async fn insert_outbox(
        &mut self,
        outbox: OutboxColumns,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        match self {
            Self::Postgres(tx) => {
                sqlx::query(
                    "INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, \
                     created_at, source_connector) \
                     SELECT 'customer', u_id, u_version, u_kind, u_correlation, $5, u_connector \
                     FROM unnest($1::text[], $2::int8[], $3::text[], $4::text[], $6::text[]) \
                     WITH ORDINALITY AS u(u_id, u_version, u_kind, u_correlation, u_connector, u_n) \
                     ORDER BY u_n",
                )
                .bind(outbox.ids)
                .bind(outbox.versions)
                .bind(outbox.kinds)
                .bind(outbox.correlation_ids)
                .bind(at)
                .bind(outbox.connectors)
                .execute(&mut **tx)
                .await?;
            }
            Self::Sqlite(tx) => {
                let rows = json_rows(vec![
                    json_column(outbox.ids),
                    json_column(outbox.versions),
                    json_column(outbox.kinds),
                    json_column(outbox.correlation_ids),
                    json_column(outbox.connectors),
                ]);
                sqlx::query(
                    "INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, \
                     created_at, source_connector) \
                     SELECT 'customer', value ->> 0, value ->> 1, value ->> 2, value ->> 3, $2, \
                     value ->> 4 FROM json_each($1) ORDER BY key",
                )
                .bind(rows)
                .bind(at)
                .execute(&mut **tx)
                .await?;
            }
        }
        Ok(())
    }

    /// Inserts or updates the links; how many were written (a link that
    /// holds another live record is left alone, see
    /// [`link_upsert_on_conflict`]).
    async fn upsert_links(
        &mut self,
        link: LinkColumns,
        at: DateTime<Utc>,
    ) -> Result<u64, sqlx::Error> {
        let written = match self {
            Self::Postgres(tx) => {
                sqlx::query(concat!(
                    "INSERT INTO sync_links (customer_id, connector, remote_id, remote_deleted, wanted_version, ",
                    "synced_version, snapshot, state, next_attempt_at_ms, remote_seen_at_ms, correlation_id, updated_at, ",
                    "pushed_hash) ",
                    "SELECT u_customer, u_connector, u_remote, u_deleted, u_version, u_synced, u_snapshot::jsonb, ",
                    "CASE WHEN u_synced < u_version THEN 'pending' ELSE 'synced' END, $9, u_seen, u_correlation, $10, ",
                    "CASE WHEN u_snapshot IS NULL THEN NULL ELSE 'remote' END ",
                    "FROM unnest($1::text[], $2::text[], $3::text[], $4::bool[], $5::int8[], $6::int8[], $7::text[], ",
                    "$8::int8[], $11::text[]) ",
                    "AS u(u_customer, u_connector, u_remote, u_deleted, u_version, u_synced, u_snapshot, u_seen, u_correlation) ",
                    link_upsert_on_conflict!()
                ))
                .bind(link.customers)
                .bind(link.connectors)
                .bind(link.remote_ids)
                .bind(link.remote_deleted)
                .bind(link.versions)
                .bind(link.synced)
                .bind(link.snapshots)
                .bind(link.seen_at_ms)
                .bind(at.timestamp_millis())
                .bind(at)
                .bind(link.correlation_ids)
                .execute(&mut **tx)
                .await?
                .rows_affected()
            }
            Self::Sqlite(tx) => {
                let rows = json_rows(vec![
                    json_column(link.customers),
                    json_column(link.connectors),
                    json_column(link.remote_ids),
                    json_column(link.remote_deleted),
                    json_column(link.versions),
                    json_column(link.synced),
                    json_column(link.snapshots),
                    json_column(link.seen_at_ms),
                    json_column(link.correlation_ids),
                ]);
                sqlx::query(concat!(
                    "INSERT INTO sync_links (customer_id, connector, remote_id, remote_deleted, wanted_version, ",
                    "synced_version, snapshot, state, next_attempt_at_ms, remote_seen_at_ms, correlation_id, updated_at, ",
                    "pushed_hash) ",
                    "SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, ",
                    "CASE WHEN value ->> 5 < value ->> 4 THEN 'pending' ELSE 'synced' END, ",
                    "$2, value ->> 7, value ->> 8, $3, ",
                    "CASE WHEN value ->> 6 IS NULL THEN NULL ELSE 'remote' END FROM json_each($1) WHERE true ",
                    link_upsert_on_conflict!()
                ))
                .bind(rows)
                .bind(at.timestamp_millis())
                .bind(at)
                .execute(&mut **tx)
                .await?
                .rows_affected()
            }
        };
        Ok(written)
    }

    /// Marks the inbox rows applied; how many were still held by the batch's
    /// leases.
    async fn finish_inbox(&mut self, inbox: InboxColumns) -> Result<usize, sqlx::Error> {
        let finished: Vec<i64> = match self {
            Self::Postgres(tx) => {
                sqlx::query_scalar(
                    "UPDATE inbox SET state = 'applied', detail = u_detail, customer_id = u_customer, \
                     lease_until_ms = 0, lease_token = NULL \
                     FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[]) \
                     AS u(u_seq, u_token, u_detail, u_customer) \
                     WHERE seq = ANY($1::int8[]) AND seq = u_seq AND lease_token = u_token RETURNING seq",
                )
                .bind(&inbox.seqs)
                .bind(inbox.tokens)
                .bind(inbox.details)
                .bind(inbox.customers)
                .fetch_all(&mut **tx)
                .await?
            }
            Self::Sqlite(tx) => {
                let rows = json_rows(vec![
                    json_column(inbox.seqs),
                    json_column(inbox.tokens),
                    json_column(inbox.details),
                    json_column(inbox.customers),
                ]);
                sqlx::query_scalar(
                    "UPDATE inbox SET state = 'applied', detail = u_detail, customer_id = u_customer, \
                     lease_until_ms = 0, lease_token = NULL \
                     FROM (SELECT value ->> 0 AS u_seq, value ->> 1 AS u_token, value ->> 2 AS u_detail, \
                     value ->> 3 AS u_customer FROM json_each($1)) \
                     WHERE seq = u_seq AND lease_token = u_token RETURNING seq",
                )
                .bind(rows)
                .fetch_all(&mut **tx)
                .await?
            }
        };
        Ok(finished.len())
    }
}

/// Puts each returned row at its change's place.
fn record(
    rows: Vec<CustomerRow>,
    kind: &'static str,
    index: &HashMap<&str, usize>,
    written: &mut [Option<(Customer, &'static str)>],
) {
    for row in rows {
        let customer = Customer::from(row);
        if let Some(&i) = index.get(customer.id.as_str()) {
            written[i] = Some((customer, kind));
        }
    }
}

/// A customer write's values, one array per column (JSON as text).
#[derive(Default)]
struct Columns {
    ids: Vec<Option<String>>,
    names: Vec<Option<String>>,
    emails: Vec<String>,
    phones: Vec<Option<String>>,
    addresses: Vec<Option<String>>,
    metadata: Vec<String>,
    /// The version an update expects (unused by a create).
    expected: Vec<i64>,
}

impl Columns {
    fn json_rows(self) -> String {
        json_rows(vec![
            json_column(self.ids),
            json_column(self.names),
            json_column(self.emails),
            json_column(self.phones),
            json_column(self.addresses),
            json_column(self.metadata),
            json_column(self.expected),
        ])
    }

    fn push(&mut self, id: Option<&str>, fields: &super::CustomerFields, expected: i64) {
        self.expected.push(expected);
        self.ids.push(id.map(str::to_owned));
        self.names.push(fields.name.clone());
        self.emails.push(fields.email.clone());
        self.phones.push(fields.phone.clone());
        self.addresses.push(
            fields
                .address
                .as_ref()
                .map(|a| serde_json::to_string(a).unwrap_or_default()),
        );
        self.metadata
            .push(serde_json::to_string(&fields.metadata).unwrap_or_else(|_| "{}".into()));
    }
}

#[derive(Default)]
struct OutboxColumns {
    ids: Vec<String>,
    versions: Vec<i64>,
    kinds: Vec<&'static str>,
    correlation_ids: Vec<Option<String>>,
    connectors: Vec<String>,
}

impl OutboxColumns {
    fn push(&mut self, customer: &Customer, kind: &'static str, change: &InboundChange) {
        self.ids.push(customer.id.as_str().to_owned());
        self.versions.push(customer.version);
        self.kinds.push(kind);
        self.correlation_ids
            .push(change.event.correlation_id.clone());
        self.connectors.push(change.event.connector.clone());
    }
}

#[derive(Default)]
struct LinkColumns {
    customers: Vec<String>,
    connectors: Vec<String>,
    remote_ids: Vec<String>,
    remote_deleted: Vec<bool>,
    versions: Vec<i64>,
    synced: Vec<i64>,
    snapshots: Vec<Option<String>>,
    seen_at_ms: Vec<i64>,
    correlation_ids: Vec<Option<String>>,
}

impl LinkColumns {
    fn push(
        &mut self,
        customer: &CustomerId,
        version: Option<i64>,
        change: &InboundChange,
    ) -> Result<(), sqlx::Error> {
        let event = &change.event;
        let version = version.unwrap_or(0);
        self.customers.push(customer.as_str().to_owned());
        self.connectors.push(event.connector.clone());
        self.remote_ids.push(event.remote_id.clone());
        self.remote_deleted.push(event.kind == RemoteChange::Delete);
        self.versions.push(version);
        // As in the savepoint path: synced at the new version when the
        // remote already holds the result.
        self.synced
            .push(if change.remote_has_result { version } else { 0 });
        self.snapshots.push(
            change
                .snapshot
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| sqlx::Error::Encode(e.into()))?,
        );
        self.seen_at_ms.push(event.occurred_at_ms);
        self.correlation_ids.push(event.correlation_id.clone());
        Ok(())
    }
}

#[derive(Default)]
struct InboxColumns {
    seqs: Vec<i64>,
    tokens: Vec<Option<String>>,
    details: Vec<Option<String>>,
    customers: Vec<Option<String>>,
}

impl InboxColumns {
    fn push(&mut self, customer: Option<&CustomerId>, change: &InboundChange) {
        self.seqs.push(change.event.seq);
        self.tokens.push(change.event.lease_token.clone());
        self.details.push(change.detail.clone());
        self.customers.push(customer.map(|c| c.as_str().to_owned()));
    }
}
