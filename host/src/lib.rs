//! ferry: keeps a customer catalog in two-way sync with external systems.
//!
//! The host owns storage, the outbox, retries, idempotency and conflict
//! handling; everything specific to a remote system lives in a connector, a
//! WebAssembly component run by [`runtime`].

pub mod api;
pub mod app;
pub mod bus;
pub mod cli;
pub mod config;
pub mod console;
pub mod metrics;
pub mod registry;
pub mod retention;
pub mod secrets;
pub mod store;
pub mod sync;
pub mod telemetry;

/// The connector runtime, a crate of its own (`ferry-runtime`) so that a
/// connector author's tests never build the server.
pub use ferry_runtime as runtime;
