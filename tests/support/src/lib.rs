//! Real peers for ferry's integration tests, started by the tests themselves.
pub mod localstripe;
pub mod postgres;
pub mod wasm;
