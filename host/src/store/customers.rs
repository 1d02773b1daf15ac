//! Customers: the record type, its id, and the writes that commit a customer
//! row together with its outbox event and idempotency record in one
//! transaction.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use utoipa::ToSchema;

use futures::future::BoxFuture;

use super::idempotency::{IdempotencyCompletion, StoredResponse};
use super::outbox::OutboxKind;
use super::{dispatch, now, Backend, Store, StoreError};
use crate::sync::group_commit::{Committer, GroupCommit};

/// A customer id: `cus_` followed by a UUIDv7 in lowercase hex. UUIDv7 starts
/// with a timestamp, so ids sort in creation order and serve as cursors.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, example = "cus_0193f1b2c3d47e8f9a0b1c2d3e4f5a6b")]
pub struct CustomerId(String);

impl CustomerId {
    const PREFIX: &'static str = "cus_";
    /// Characters in an id: the prefix and 32 hex digits.
    pub const LEN: usize = 36;

    /// A new id, ordered by the database's clock ([`super::new_id`]).
    pub fn generate() -> Self {
        Self(super::new_id(Self::PREFIX))
    }

    /// Parses `cus_<32 lowercase hex>`; anything else is not an id.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix(Self::PREFIX)?;
        let valid = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Self(text.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// The catalog's address and validated fields are the runtime's (the
// connector test kit checks records by the same code).
pub use crate::runtime::customer::{Address, CustomerFields};

/// A customer as stored and as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Customer {
    /// Unique id.
    pub id: CustomerId,
    /// Full name or business name.
    pub name: Option<String>,
    /// Email, trimmed and lowercased; unique among live customers.
    pub email: String,
    /// Phone number.
    pub phone: Option<String>,
    /// Postal address.
    pub address: Option<Address>,
    /// Free-form string key/value pairs.
    pub metadata: BTreeMap<String, String>,
    /// Starts at 1 and grows by one with every write; the ETag is this number.
    pub version: i64,
    /// When the customer was created.
    pub created_at: DateTime<Utc>,
    /// When the customer was last written.
    pub updated_at: DateTime<Utc>,
    /// When the customer was deleted; null while live.
    pub deleted_at: Option<DateTime<Utc>>,
}

impl Customer {
    /// The client-controlled fields of this customer.
    pub fn fields(&self) -> CustomerFields {
        CustomerFields {
            name: self.name.clone(),
            email: self.email.clone(),
            phone: self.phone.clone(),
            address: self.address.clone(),
            metadata: self.metadata.clone(),
        }
    }
}

/// A row of `customers`, decoded the same way on both backends.
#[derive(sqlx::FromRow)]
pub(super) struct CustomerRow {
    id: String,
    name: Option<String>,
    email: String,
    phone: Option<String>,
    address: Option<Json<Address>>,
    metadata: Json<BTreeMap<String, String>>,
    version: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
}

impl CustomerRow {
    /// Whether the row is soft-deleted.
    pub(super) fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

impl From<CustomerRow> for Customer {
    fn from(row: CustomerRow) -> Self {
        Self {
            id: CustomerId(row.id),
            name: row.name,
            email: row.email,
            phone: row.phone,
            address: row.address.map(|a| a.0),
            metadata: row.metadata.0,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
            deleted_at: row.deleted_at,
        }
    }
}

/// A customer read beside a row of another table (a claimed link): the
/// columns of [`joined_columns!`], all NULL when there is no customer.
#[derive(sqlx::FromRow)]
pub(super) struct JoinedCustomer {
    c_id: Option<String>,
    c_name: Option<String>,
    c_email: Option<String>,
    c_phone: Option<String>,
    // Read as plain JSON and converted per row: a value the types refuse
    // (written by hand in SQL, or by a newer release rolled back) failed
    // the whole claim's decode after its leases were taken, and every link
    // in it waited, claimed again and again, with no attempt counted.
    c_address: Option<Json<serde_json::Value>>,
    c_metadata: Option<Json<serde_json::Value>>,
    c_version: Option<i64>,
    c_created_at: Option<DateTime<Utc>>,
    c_updated_at: Option<DateTime<Utc>>,
    c_deleted_at: Option<DateTime<Utc>>,
}

impl JoinedCustomer {
    /// The customer, if the join found one and can read it; else `None`,
    /// and the push reads its own customer, failing alone if it cannot.
    pub(super) fn into_customer(self) -> Option<Customer> {
        let id = self.c_id?;
        let readable = |column: &str, error: serde_json::Error| {
            tracing::warn!(customer_id = %id, column, %error,
                "a claimed link's customer cannot be read; its push reads it again");
        };
        let address = match self.c_address {
            Some(Json(value)) => match serde_json::from_value(value) {
                Ok(address) => Some(Json(address)),
                Err(error) => {
                    readable("address", error);
                    return None;
                }
            },
            None => None,
        };
        let metadata = match serde_json::from_value(self.c_metadata?.0) {
            Ok(metadata) => Json(metadata),
            Err(error) => {
                readable("metadata", error);
                return None;
            }
        };
        let row = CustomerRow {
            id,
            name: self.c_name,
            email: self.c_email?,
            phone: self.c_phone,
            address,
            metadata,
            version: self.c_version?,
            created_at: self.c_created_at?,
            updated_at: self.c_updated_at?,
            deleted_at: self.c_deleted_at,
        };
        Some(row.into())
    }
}

/// The columns of [`JoinedCustomer`], from `customers` joined as `c`.
macro_rules! joined_columns {
    () => {
        "c.id AS c_id, c.name AS c_name, c.email AS c_email, c.phone AS c_phone, \
         c.address AS c_address, c.metadata AS c_metadata, c.version AS c_version, \
         c.created_at AS c_created_at, c.updated_at AS c_updated_at, c.deleted_at AS c_deleted_at"
    };
}
pub(super) use joined_columns;

/// A page request for [`Store::list_customers`].
#[derive(Debug, Clone, Default)]
pub struct ListCustomers {
    /// Page size (the caller bounds it).
    pub limit: u32,
    /// Return customers whose id sorts after this one.
    pub starting_after: Option<CustomerId>,
    /// Only the live customer with this (normalised) email.
    pub email: Option<String>,
}

/// One page of customers, in id (= creation) order.
#[derive(Debug, Clone)]
pub struct CustomerPage {
    /// The customers on this page.
    pub data: Vec<Customer>,
    /// Whether more customers follow the last one.
    pub has_more: bool,
}

/// What a write records besides the customer row.
#[derive(Clone, Copy, Default)]
pub struct WriteContext<'a> {
    /// The request id that caused the write; stored on the outbox event.
    pub correlation_id: Option<&'a str>,
    /// The idempotency key to complete in the same transaction.
    pub idempotency: Option<IdempotencyCompletion<'a>>,
}

macro_rules! columns {
    () => {
        "id, name, email, phone, address, metadata, version, created_at, updated_at, deleted_at"
    };
}
pub(super) use columns;

const SELECT_LIVE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM customers WHERE id = $1 AND deleted_at IS NULL"
);

/// [`SELECT_LIVE`] taking the row's lock (PostgreSQL): concurrent writers
/// of one customer queue on it and each reads the one before's result,
/// rather than all reading one version and all but one losing the race.
const SELECT_LIVE_FOR_UPDATE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM customers WHERE id = $1 AND deleted_at IS NULL FOR UPDATE"
);

/// A page of live customers after the cursor `$1` (none: from the start),
/// `$2` unused (the email's own statement binds it), at most `$3`.
pub(super) const LIST_CUSTOMERS_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM customers WHERE deleted_at IS NULL ",
    "AND id > COALESCE(CAST($1 AS TEXT), '') ",
    "AND CAST($2 AS TEXT) IS NULL ",
    "ORDER BY id LIMIT $3"
);

/// How often an update retries after losing a race to a concurrent writer
/// (PostgreSQL only; SQLite writers are serialised, and on PostgreSQL the
/// read takes the row's lock, so a race is left only to a write that does
/// not take it).
const UPDATE_ATTEMPTS: usize = 5;

/// Inside a dispatched transaction `$tx`: writes the outbox event for
/// `$customer` and completes the idempotency record, if any.
macro_rules! finish_write {
    ($tx:ident, $correlation_id:expr, $completion:expr, $customer:expr, $kind:expr) => {{
        let customer: &Customer = $customer;
        let correlation_id: Option<&str> = $correlation_id;
        let completion: Option<&Completion> = $completion;
        sqlx::query(
            "INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, created_at) \
             VALUES ('customer', $1, $2, $3, $4, $5)",
        )
        .bind(customer.id.as_str())
        .bind(customer.version)
        .bind($kind.as_str())
        .bind(correlation_id)
        .bind(customer.updated_at)
        .execute(&mut *$tx)
        .await?;
        if let Some(completion) = completion {
            complete_in!($tx, completion);
        }
    }};
}

/// Inside a dispatched transaction `$tx`: completes a write's idempotency
/// key with the response rendered from what it wrote.
macro_rules! complete_in {
    ($tx:ident, $completion:expr) => {{
        let completion: &Completion = $completion;
        let completed = sqlx::query(super::idempotency::COMPLETE_SQL)
            .bind(&completion.scope)
            .bind(&completion.key)
            .bind(i32::from(completion.response.status))
            .bind(Json(&completion.response.headers))
            .bind(&completion.response.body)
            .bind(&completion.claim)
            .execute(&mut *$tx)
            .await?
            .rows_affected();
        if completed != 1 {
            return Err(StoreError::IdempotencyClaimLost);
        }
    }};
}

/// The idempotency key a write completes, with the response rendered from
/// the record it writes.
pub(crate) struct Completion {
    scope: String,
    key: String,
    claim: String,
    response: StoredResponse,
}

impl WriteContext<'_> {
    fn completion(&self, customer: &Customer) -> Option<Completion> {
        self.idempotency.as_ref().map(|c| Completion {
            scope: c.scope.to_owned(),
            key: c.key.to_owned(),
            claim: c.claim.to_owned(),
            response: (c.render)(customer),
        })
    }
}

/// A create ready to commit, owned so it can wait in a group.
pub(crate) struct NewCustomer {
    customer: Customer,
    correlation_id: Option<String>,
    completion: Option<Completion>,
}

/// Creates from concurrent requests committed together: one transaction
/// for all that queued while the previous group committed. On SQLite that
/// is one fsync (`synchronous=FULL` makes the fsync the cost of a create);
/// on PostgreSQL one statement fed by arrays, so the executor start, the
/// commit record and the round trip are paid once per group instead of once
/// per create (docs/performance.md). A group that fails (an email taken) is
/// committed again one create at a time, so each request gets its own
/// answer.
pub(crate) struct Creates(Backend);

impl Creates {
    /// One committer on either backend: a group is what queued while the
    /// previous one committed. On PostgreSQL a second committer halved the
    /// groups and cost more database CPU per create than it saved in
    /// waiting (8,010 against 7,040 creates/s at 32 clients, and 4,010
    /// against 3,811 at 8; docs/performance.md).
    pub(super) fn start(backend: Backend) -> GroupCommit<Self> {
        GroupCommit::start(Self(backend), 1)
    }
}

impl Committer for Creates {
    const NAME: &'static str = "creates";
    const GATHER: bool = true;
    type Write = NewCustomer;
    type Done = ();

    fn commit<'a>(
        &'a self,
        writes: &'a [NewCustomer],
    ) -> BoxFuture<'a, Result<Vec<()>, StoreError>> {
        Box::pin(async move {
            let written = match &self.0 {
                Backend::Sqlite(pools) => create_each(&pools.writer, writes).await,
                Backend::Postgres(pool) => create_in_one_statement(pool, writes).await,
            };
            match written {
                // Committed again alone after its group failed: the group's
                // commit landed although its answer was lost, and wrote this
                // create whole (customer, event, key) in its transaction.
                Err(StoreError::CustomerIdExists) if writes.len() == 1 => {
                    tracing::warn!(
                        customer_id = writes[0].customer.id.as_str(),
                        "a create's commit landed although its answer was lost"
                    );
                }
                // The same, for a create with an `Idempotency-Key` on
                // PostgreSQL: its statement checks the key before it
                // inserts, and the landed commit completed the key. Only
                // that commit can have written the create's own id.
                Err(StoreError::IdempotencyClaimLost)
                    if writes.len() == 1 && self.exists(&writes[0].customer.id).await? =>
                {
                    tracing::warn!(
                        customer_id = writes[0].customer.id.as_str(),
                        "a create's commit landed although its answer was lost"
                    );
                }
                written => written?,
            }
            Ok(vec![(); writes.len()])
        })
    }
}

impl Creates {
    /// Whether a customer with `id` was written (live or not).
    async fn exists(&self, id: &CustomerId) -> Result<bool, StoreError> {
        let found: Option<i32> = match &self.0 {
            Backend::Sqlite(pools) => {
                sqlx::query_scalar("SELECT 1 FROM customers WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(&pools.writer)
                    .await?
            }
            Backend::Postgres(pool) => {
                sqlx::query_scalar("SELECT 1 FROM customers WHERE id = $1")
                    .bind(id.as_str())
                    .fetch_optional(pool)
                    .await?
            }
        };
        Ok(found.is_some())
    }
}

// SQLite: a group's customers, then their `created` events, as one
// statement each over `json_each` (each statement is a hand-off to the
// writer connection's thread and back). `$1` holds one `[id, name, email,
// phone, address, metadata, version, at, correlation]` array per
// create, in the group's order; the documents as their JSON text.
const CREATE_BATCH_SQLITE: &str = concat!(
    "INSERT INTO customers (",
    columns!(),
    ") SELECT json_extract(c.value, '$[0]'), json_extract(c.value, '$[1]'), ",
    "json_extract(c.value, '$[2]'), json_extract(c.value, '$[3]'), json_extract(c.value, '$[4]'), ",
    "json_extract(c.value, '$[5]'), json_extract(c.value, '$[6]'), json_extract(c.value, '$[7]'), ",
    "json_extract(c.value, '$[7]'), NULL FROM json_each($1) AS c ORDER BY c.key"
);

const CREATED_EVENTS_SQLITE: &str = "INSERT INTO outbox \
     (aggregate, aggregate_id, version, kind, correlation_id, created_at) \
     SELECT 'customer', json_extract(c.value, '$[0]'), json_extract(c.value, '$[6]'), 'created', \
       json_extract(c.value, '$[8]'), json_extract(c.value, '$[7]') \
     FROM json_each($1) AS c ORDER BY c.key";

/// SQLite: the creates as one transaction of two statements for the group
/// (see [`CREATE_BATCH_SQLITE`]) and an idempotency completion per create
/// that has one.
async fn create_each(pool: &sqlx::SqlitePool, writes: &[NewCustomer]) -> Result<(), StoreError> {
    let mut rows = Vec::with_capacity(writes.len());
    for write in writes {
        let customer = &write.customer;
        rows.push(serde_json::json!([
            customer.id.as_str(),
            customer.name,
            customer.email,
            customer.phone,
            customer
                .address
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
            serde_json::to_string(&customer.metadata)?,
            customer.version,
            // A new customer's created_at and updated_at are one instant,
            // written as sqlx writes a timestamp to SQLite.
            customer
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
            write.correlation_id,
        ]));
    }
    let rows = serde_json::to_string(&rows)?;
    let mut tx = pool.begin().await?;
    sqlx::query(CREATE_BATCH_SQLITE)
        .bind(&rows)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::from_customer_write)?;
    sqlx::query(CREATED_EVENTS_SQLITE)
        .bind(&rows)
        .execute(&mut *tx)
        .await?;
    for completion in writes.iter().filter_map(|w| w.completion.as_ref()) {
        complete_in!(tx, completion);
    }
    tx.commit().await?;
    Ok(())
}

/// PostgreSQL: the customer rows, their outbox events and the idempotency
/// completions of a group as ONE statement (data-modifying CTEs over
/// `unnest`), which PostgreSQL runs atomically, in one round trip.
async fn create_in_one_statement(
    pool: &sqlx::PgPool,
    writes: &[NewCustomer],
) -> Result<(), StoreError> {
    let mut ids = Vec::with_capacity(writes.len());
    let mut names = Vec::with_capacity(writes.len());
    let mut emails = Vec::with_capacity(writes.len());
    let mut phones = Vec::with_capacity(writes.len());
    let mut addresses = Vec::with_capacity(writes.len());
    let mut metadata = Vec::with_capacity(writes.len());
    let mut versions = Vec::with_capacity(writes.len());
    let mut created = Vec::with_capacity(writes.len());
    let mut correlation_ids = Vec::with_capacity(writes.len());
    let (mut scopes, mut keys, mut claims, mut statuses, mut headers, mut bodies) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for write in writes {
        let customer = &write.customer;
        ids.push(customer.id.as_str());
        names.push(customer.name.as_deref());
        emails.push(customer.email.as_str());
        phones.push(customer.phone.as_deref());
        addresses.push(customer.address.as_ref().map(Json));
        metadata.push(Json(&customer.metadata));
        versions.push(customer.version);
        // A new customer's created_at and updated_at are one instant.
        created.push(customer.created_at);
        correlation_ids.push(write.correlation_id.as_deref());
        if let Some(completion) = &write.completion {
            scopes.push(completion.scope.as_str());
            keys.push(completion.key.as_str());
            claims.push(completion.claim.as_str());
            statuses.push(i32::from(completion.response.status));
            headers.push(Json(&completion.response.headers));
            bodies.push(completion.response.body.as_slice());
        }
    }
    sqlx::query(concat!(
        "WITH customer AS (INSERT INTO customers (", columns!(), ") ",
        "SELECT u_id, u_name, u_email, u_phone, u_address, u_metadata, u_version, u_at, u_at, NULL ",
        "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::jsonb[], $7::int8[], ",
        "$8::timestamptz[]) AS u(u_id, u_name, u_email, u_phone, u_address, u_metadata, u_version, u_at)), ",
        "event AS (INSERT INTO outbox (aggregate, aggregate_id, version, kind, correlation_id, created_at) ",
        "SELECT 'customer', u_id, u_version, 'created', u_correlation, u_at ",
        "FROM unnest($1::text[], $7::int8[], $9::text[], $8::timestamptz[]) WITH ORDINALITY ",
        "AS u(u_id, u_version, u_correlation, u_at, u_n) ORDER BY u_n), ",
        "idempotency AS (UPDATE idempotency_keys SET state = 'done', response_status = u_status, ",
        "response_headers = u_headers, response_body = u_body ",
        "FROM unnest($10::text[], $11::text[], $12::int4[], $13::jsonb[], $14::bytea[], $15::text[]) ",
        "AS u(u_scope, u_key, u_status, u_headers, u_body, u_claim) WHERE scope = u_scope AND key = u_key ",
        "AND claim = u_claim AND state = 'in_flight' RETURNING 1) ",
        // A key its claim no longer holds: the whole statement fails (see
        // COMPLETE_SQL), and the group is committed one by one.
        "SELECT CASE WHEN (SELECT count(*) FROM idempotency) = cardinality($10::text[]) THEN 1 ",
        "ELSE ferry_refuse('idempotency claim lost') END"
    ))
    .bind(ids)
    .bind(names)
    .bind(emails)
    .bind(phones)
    .bind(addresses)
    .bind(metadata)
    .bind(versions)
    .bind(created)
    .bind(correlation_ids)
    .bind(scopes)
    .bind(keys)
    .bind(statuses)
    .bind(headers)
    .bind(bodies)
    .bind(claims)
    .execute(pool)
    .await
    .map_err(StoreError::from_customer_write)?;
    Ok(())
}

/// What [`Store::renormalise_emails`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Renormalised {
    /// Customers whose email was rewritten in today's form.
    pub changed: u64,
    /// Live customers left as they were because another live customer
    /// holds the email in today's form: (customer id, its email, the form).
    pub kept: Vec<(String, String, String)>,
}

/// The data step that rewrites stored emails in today's form; named anew
/// when the form changes, so a database that took the last one takes this
/// one too (`emails_nfc_idna`, then the final sigma folded to `σ`).
const EMAILS_STEP: &str = "emails_nfc_idna_sigma";

impl Store {
    /// Once per database (the `data_steps` table remembers it): rewrites
    /// the stored emails `normalise` changes (emails an earlier release
    /// stored before they were kept in NFC with an ASCII domain), so that
    /// lookups by today's form find them. Only emails with a byte outside
    /// ASCII can change. A live customer whose email in today's form is
    /// another live customer's keeps its own, and is returned: two
    /// customers of one address, for a person to merge. The version is not
    /// bumped: the address is the same.
    pub async fn renormalise_emails(
        &self,
        normalise: fn(&str) -> String,
    ) -> Result<Renormalised, StoreError> {
        let mut done = Renormalised::default();
        let non_ascii = match &self.backend {
            Backend::Postgres(_) => {
                "SELECT id, email, deleted_at IS NULL FROM customers \
                 WHERE octet_length(email) <> char_length(email) ORDER BY id"
            }
            Backend::Sqlite(_) => {
                "SELECT id, email, deleted_at IS NULL FROM customers \
                 WHERE length(CAST(email AS BLOB)) <> length(email) ORDER BY id"
            }
        };
        dispatch!(self, write pool => {
            let step: Option<(String,)> = sqlx::query_as("SELECT name FROM data_steps WHERE name = $1")
                .bind(EMAILS_STEP)
                .fetch_optional(pool)
                .await?;
            if step.is_some() {
                return Ok(done);
            }
            let rows: Vec<(String, String, bool)> = sqlx::query_as(non_ascii).fetch_all(pool).await?;
            for (id, email, live) in rows {
                let today = normalise(&email);
                if today == email {
                    continue;
                }
                let updated = sqlx::query("UPDATE customers SET email = $1 WHERE id = $2 AND email = $3")
                    .bind(&today)
                    .bind(&id)
                    .bind(&email)
                    .execute(pool)
                    .await;
                match updated {
                    Ok(result) => done.changed += result.rows_affected(),
                    Err(sqlx::Error::Database(db)) if db.is_unique_violation() && live => {
                        done.kept.push((id, email, today));
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            sqlx::query("INSERT INTO data_steps (name, done_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                .bind(EMAILS_STEP)
                .bind(now())
                .execute(pool)
                .await?;
        });
        Ok(done)
    }

    /// Creates a customer (version 1) and its `created` outbox event.
    #[tracing::instrument(skip_all, fields(customer_id, correlation_id = ctx.correlation_id))]
    pub async fn create_customer(
        &self,
        fields: CustomerFields,
        ctx: WriteContext<'_>,
    ) -> Result<Customer, StoreError> {
        let at = now();
        let customer = Customer {
            id: CustomerId::generate(),
            name: fields.name,
            email: fields.email,
            phone: fields.phone,
            address: fields.address,
            metadata: fields.metadata,
            version: 1,
            created_at: at,
            updated_at: at,
            deleted_at: None,
        };
        tracing::Span::current().record("customer_id", customer.id.as_str());
        let write = NewCustomer {
            customer: customer.clone(),
            correlation_id: ctx.correlation_id.map(str::to_owned),
            completion: ctx.completion(&customer),
        };
        self.creates.submit(write).await?;
        self.committed_outbox();
        Ok(customer)
    }

    /// The live customer with this id.
    #[tracing::instrument(skip_all, fields(customer_id = %id))]
    pub async fn get_customer(&self, id: &CustomerId) -> Result<Customer, StoreError> {
        let row: Option<CustomerRow> = dispatch!(self, read pool => {
            sqlx::query_as(SELECT_LIVE).bind(id.as_str()).fetch_optional(pool).await?
        });
        row.map(Customer::from).ok_or(StoreError::CustomerNotFound)
    }

    /// The customer with this id, deleted or not (workers push deletes too).
    #[tracing::instrument(skip_all, fields(customer_id = %id))]
    pub async fn get_customer_any(&self, id: &str) -> Result<Option<Customer>, StoreError> {
        let row: Option<CustomerRow> = dispatch!(self, read pool => {
            sqlx::query_as(concat!("SELECT ", columns!(), " FROM customers WHERE id = $1"))
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(Customer::from))
    }

    /// Several customers by id, deleted ones included (the inbound apply's
    /// read of a claimed batch).
    pub async fn customers_any(&self, ids: &[&str]) -> Result<Vec<Customer>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<CustomerRow> = match &self.backend {
            Backend::Postgres(pool) => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM customers WHERE id = ANY($1)"
                ))
                .bind(ids)
                // Planned for each call (the store module's "Plans kept
                // from an empty table").
                .persistent(false)
                .fetch_all(pool)
                .await?
            }
            // One statement too: each is a hand-off to a reader
            // connection's thread and back (docs/performance.md, round 14).
            Backend::Sqlite(pools) => {
                sqlx::query_as(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM customers WHERE id IN (SELECT value FROM json_each($1))"
                ))
                .bind(serde_json::to_string(ids)?)
                .fetch_all(&pools.reader)
                .await?
            }
        };
        Ok(rows.into_iter().map(Customer::from).collect())
    }

    /// A page of live customers in id order.
    #[tracing::instrument(skip_all, fields(limit = request.limit))]
    pub async fn list_customers(
        &self,
        request: &ListCustomers,
    ) -> Result<CustomerPage, StoreError> {
        let fetch = i64::from(request.limit) + 1;
        // With an email, its own statement: `(? IS NULL OR email = ?)` keeps
        // both planners off the live-email index, and a scan of every
        // customer per inbound record made imports quadratic. The cursor
        // is one range for the same reason (every id sorts after ''):
        // `(? IS NULL OR id > ?)` kept SQLite from seeking the id index,
        // and each page read it from the start (20 ms 290,000 rows in).
        let sql = if request.email.is_some() {
            concat!(
                "SELECT ",
                columns!(),
                " FROM customers WHERE email = CAST($2 AS TEXT) ",
                "AND deleted_at IS NULL ",
                "AND id > COALESCE(CAST($1 AS TEXT), '') ",
                "ORDER BY id LIMIT $3"
            )
        } else {
            LIST_CUSTOMERS_SQL
        };
        let rows: Vec<CustomerRow> = dispatch!(self, read pool => {
            sqlx::query_as(sql)
                .bind(request.starting_after.as_ref().map(CustomerId::as_str))
                .bind(request.email.as_deref())
                .bind(fetch)
                .fetch_all(pool)
                .await?
        });
        let mut data: Vec<Customer> = rows.into_iter().map(Customer::from).collect();
        let has_more = data.len() > request.limit as usize;
        data.truncate(request.limit as usize);
        Ok(CustomerPage { data, has_more })
    }

    /// Replaces a live customer's fields with what `change` computes from the
    /// current record, bumping the version and recording an `updated` event.
    ///
    /// With `expected_version`, a customer at another version fails with
    /// [`StoreError::VersionMismatch`]; without it, a lost race against a
    /// concurrent writer is retried on the fresh record.
    #[tracing::instrument(skip_all, fields(customer_id = %id, correlation_id = ctx.correlation_id))]
    pub async fn update_customer<E, F>(
        &self,
        id: &CustomerId,
        expected_version: Option<i64>,
        ctx: WriteContext<'_>,
        mut change: F,
    ) -> Result<Customer, E>
    where
        E: From<StoreError>,
        F: FnMut(&Customer) -> Result<CustomerFields, E>,
    {
        let select = match self.backend {
            Backend::Postgres(_) => SELECT_LIVE_FOR_UPDATE,
            Backend::Sqlite(_) => SELECT_LIVE,
        };
        for _ in 0..UPDATE_ATTEMPTS {
            let written: Option<Customer> = dispatch!(self, write pool => {
                let mut tx = pool.begin().await.map_err(StoreError::from)?;
                let current: Customer = sqlx::query_as::<_, CustomerRow>(select)
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(StoreError::from)?
                    .map(Customer::from)
                    .ok_or(StoreError::CustomerNotFound)?;
                if let Some(expected) = expected_version {
                    if expected != current.version {
                        return Err(StoreError::VersionMismatch { current: current.version }.into());
                    }
                }
                let fields = change(&current)?;
                let updated = Customer {
                    name: fields.name,
                    email: fields.email,
                    phone: fields.phone,
                    address: fields.address,
                    metadata: fields.metadata,
                    version: current.version + 1,
                    updated_at: now(),
                    ..current
                };
                let done = sqlx::query(
                    "UPDATE customers SET name = $1, email = $2, phone = $3, address = $4, \
                     metadata = $5, version = $6, updated_at = $7 \
                     WHERE id = $8 AND version = $9 AND deleted_at IS NULL",
                )
                .bind(&updated.name)
                .bind(&updated.email)
                .bind(&updated.phone)
                .bind(updated.address.as_ref().map(Json))
                .bind(Json(&updated.metadata))
                .bind(updated.version)
                .bind(updated.updated_at)
                .bind(id.as_str())
                .bind(updated.version - 1)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from_customer_write)?;
                if done.rows_affected() == 1 {
                    let write = async {
                        let completion = ctx.completion(&updated);
                        finish_write!(
                            tx,
                            ctx.correlation_id,
                            completion.as_ref(),
                            &updated,
                            OutboxKind::Updated
                        );
                        tx.commit().await?;
                        Ok::<_, StoreError>(())
                    };
                    write.await?;
                    Some(updated)
                } else {
                    None
                }
            });
            match written {
                Some(customer) => {
                    self.committed_outbox();
                    return Ok(customer);
                }
                // Someone wrote between our read and our update.
                None if expected_version.is_some() => {
                    let current = self.get_customer(id).await?;
                    return Err(StoreError::VersionMismatch {
                        current: current.version,
                    }
                    .into());
                }
                None => continue,
            }
        }
        Err(StoreError::Database(sqlx::Error::Protocol(
            "customer update kept losing races to concurrent writers".into(),
        ))
        .into())
    }

    /// Soft-deletes a live customer (its email becomes free), bumping the
    /// version and recording a `deleted` event. Returns the deleted record.
    #[tracing::instrument(skip_all, fields(customer_id = %id, correlation_id = ctx.correlation_id))]
    pub async fn delete_customer(
        &self,
        id: &CustomerId,
        expected_version: Option<i64>,
        ctx: WriteContext<'_>,
    ) -> Result<Customer, StoreError> {
        let at = now();
        dispatch!(self, write pool => {
            let mut tx = pool.begin().await?;
            // One statement decides: only a live row at the expected version
            // (if any) is deleted, so concurrent deletes cannot both succeed.
            let row: Option<CustomerRow> = sqlx::query_as(concat!(
                "UPDATE customers SET deleted_at = $1, updated_at = $1, version = version + 1 ",
                "WHERE id = $2 AND deleted_at IS NULL AND (CAST($3 AS BIGINT) IS NULL OR version = CAST($3 AS BIGINT)) ",
                "RETURNING ", columns!()
            ))
            .bind(at)
            .bind(id.as_str())
            .bind(expected_version)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                drop(tx);
                // Tell a missing customer from a stale If-Match.
                let current = self.get_customer(id).await?;
                return Err(StoreError::VersionMismatch { current: current.version });
            };
            let deleted = Customer::from(row);
            for sql in [
                super::conflicts::CLOSE_FOR_DELETED_SQL,
                super::conflicts::RELEASE_FOR_DELETED_SQL,
            ] {
                sqlx::query(sql).bind(id.as_str()).bind(at).execute(&mut *tx).await?;
            }
            sqlx::query(super::conflicts::WAKE_FOR_DELETED_SQL)
                .bind(id.as_str())
                .bind(at.timestamp_millis())
                .execute(&mut *tx)
                .await?;
            let completion = ctx.completion(&deleted);
            finish_write!(
                tx,
                ctx.correlation_id,
                completion.as_ref(),
                &deleted,
                OutboxKind::Deleted
            );
            tx.commit().await?;
            self.committed_outbox();
            // Events its conflicts held are due now.
            self.committed_inbox();
            Ok(deleted)
        })
    }
}
