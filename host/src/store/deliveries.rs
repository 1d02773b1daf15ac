//! The delivery log: every outcome of every push attempt, newest last.

use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use super::{dispatch, Store, StoreError};

/// One row of the delivery log.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct Delivery {
    /// Log id.
    pub id: i64,
    /// The connector.
    pub connector: String,
    /// `outbound` (ferry → remote) or `inbound`.
    pub direction: String,
    /// The local version concerned.
    pub version: i64,
    /// `create`, `update` or `delete`.
    pub operation: Option<String>,
    /// `delivered`, `skipped`, `retry_scheduled` or `dead_lettered`.
    pub outcome: String,
    /// Attempt number.
    pub attempt: i32,
    /// Skip reason or error.
    pub detail: Option<String>,
    /// For `retry_scheduled`: when, unix ms.
    pub next_attempt_at_ms: Option<i64>,
    /// The remote id, if known.
    pub remote_id: Option<String>,
    /// The request id of the change.
    pub correlation_id: Option<String>,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

pub(super) const INSERT_DELIVERY_SQL: &str =
    "INSERT INTO deliveries (customer_id, connector, direction, \
    version, operation, outcome, attempt, detail, next_attempt_at_ms, remote_id, correlation_id, \
    created_at) VALUES ($1, $2, 'outbound', $3, $4, $5, $6, $7, $8, $9, $10, $11)";

impl Store {
    /// The newest `limit` delivery records of a customer, newest first.
    pub async fn deliveries_of(
        &self,
        customer_id: &str,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let rows = dispatch!(self, read pool => {
            sqlx::query_as(
                "SELECT id, connector, direction, version, operation, outcome, attempt, detail, \
                 next_attempt_at_ms, remote_id, correlation_id, created_at FROM deliveries \
                 WHERE customer_id = $1 ORDER BY id DESC LIMIT $2",
            )
            .bind(customer_id)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        Ok(rows)
    }
}
