//! Outbound sync end to end: the real ferry app, the real Stripe connector,
//! a real localstripe (behind a fault-injecting proxy where a test needs
//! faults), on SQLite with the in-process bus and on PostgreSQL with a real
//! Kafka-protocol broker. Set `TEST_LOG=1` to see the app's logs.

mod helpers;

mod cluster;
mod conflicts;
mod connectors;
mod console;
mod crash;
mod fanout;
mod faults;
mod group_commit;
mod hardening;
mod inbound;
mod inbound_policies;
mod operations;
mod outbound;
mod process;
mod reconcile;
mod recorder_remote;
mod salesforce;
mod walk;
