//! Real peers for ferry's integration tests, started by the tests themselves.
pub mod fake_example;
pub mod fake_remote;
pub mod fake_salesforce;
pub mod fault_proxy;
pub mod kafka;
pub mod localstripe;
pub mod postgres;
pub mod wasm;
