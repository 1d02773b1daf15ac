//! Console sessions signed out before they expire. A session is a signed
//! cookie that every replica can verify on its own; a sign-out is a row
//! here, read with each console request, until the session would have
//! expired anyway.

use chrono::Utc;

use super::{dispatch, Store, StoreError};

impl Store {
    /// Remembers that session `id`, valid until `expires_at` (unix
    /// seconds), was signed out. Signing out twice is one row.
    pub async fn sign_out_session(&self, id: &str, expires_at: i64) -> Result<(), StoreError> {
        dispatch!(self, write pool => {
            sqlx::query(
                "INSERT INTO console_sign_outs (session_id, expires_at) VALUES ($1, $2) \
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .bind(id)
            .bind(expires_at)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Whether session `id` was signed out.
    pub async fn session_signed_out(&self, id: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = dispatch!(self, read pool => {
            sqlx::query_scalar("SELECT expires_at FROM console_sign_outs WHERE session_id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?
        });
        Ok(found.is_some())
    }

    /// Forgets the sign-outs of sessions that have expired since (their
    /// cookies no longer verify), an hour after, for replicas whose clocks
    /// run behind; returns how many.
    pub async fn purge_expired_sign_outs(&self) -> Result<u64, StoreError> {
        let now = Utc::now().timestamp() - 60 * 60;
        let done = dispatch!(self, write pool => {
            sqlx::query("DELETE FROM console_sign_outs WHERE expires_at <= $1")
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }
}
