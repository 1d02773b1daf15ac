//! What ferry's benchmarks set up the same way: a connectors folder holding
//! the built Stripe component, and the store `FERRY_BENCH_BACKEND` picks.

use std::path::{Path, PathBuf};

/// `dir/connectors` holding the built Stripe connector as `stripe.wasm`
/// (needs `make connectors`).
pub fn stripe_connectors_dir(dir: &Path) -> PathBuf {
    let connectors = dir.join("connectors");
    std::fs::create_dir_all(&connectors).expect("connectors dir");
    std::fs::copy(
        crate::wasm::component_path("ferry_connector_stripe"),
        connectors.join("stripe.wasm"),
    )
    .expect("the Stripe component (make connectors)");
    connectors
}

/// The backend `FERRY_BENCH_BACKEND` names (`postgres`: a fresh database on
/// the shared throw-away cluster; anything else: SQLite in `dir`), and its
/// database URL.
pub async fn database(dir: &Path) -> (&'static str, String) {
    match std::env::var("FERRY_BENCH_BACKEND").as_deref() {
        Ok("postgres") => (
            "postgres",
            crate::postgres::PgCluster::shared()
                .create_database()
                .await
                .expect("database"),
        ),
        _ => (
            "sqlite",
            format!("sqlite://{}", dir.join("ferry.db").display()),
        ),
    }
}
