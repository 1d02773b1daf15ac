//! ferry's HTTP API tests, one binary: every test runs against SQLite (a
//! temp file) and PostgreSQL (a throw-away cluster shared by the binary,
//! a fresh database per test). Set `TEST_LOG=1` to see the app's logs.

mod helpers;

mod customers;
mod errors;
mod idempotency;
mod migrations;
mod service;
