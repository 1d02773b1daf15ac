//! Metrics in Prometheus text format at `/metrics`, through the `metrics`
//! facade and its Prometheus exporter.
//!
//! Counters and histograms are recorded where things happen and live in
//! memory; backlog gauges (which need the store) are refreshed by
//! [`run_gauges`] every few seconds, so a scrape never queries anything.
//! The names and labels are listed in docs/operations.md.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::store::Store;
use crate::sync::SyncEngine;

/// Histogram buckets for durations, in seconds: 0.5 ms to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Histogram buckets for group commit sizes: 1 to `group_commit::BATCH`.
const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How often the backlog gauges are refreshed.
pub const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// The process's recorder, installed once (every `App` in a process shares
/// it: tests run several).
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder and
/// returns the handle that renders it. `None` if another recorder was
/// installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("ferry_group_commit_size".into()),
                    GROUP_BUCKETS,
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// Help texts for the series (`# HELP` lines).
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "ferry_http_requests_total",
        "HTTP requests answered, by method, route template and status"
    );
    describe_histogram!(
        "ferry_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency, by method, route template and status"
    );
    describe_counter!(
        "ferry_sync_deliveries_total",
        "Sync attempts by connector, direction (outbound, inbound) and outcome"
    );
    describe_counter!(
        "ferry_bus_redelivered_total",
        "Cluster mode: changes the bus did not deliver within bus_redelivery_after, scheduled from the outbox"
    );
    describe_counter!(
        "ferry_sync_retries_total",
        "Attempts that failed and were scheduled again"
    );
    describe_counter!("ferry_dead_letters_total", "Dead letters written");
    describe_counter!(
        "ferry_webhook_verifications_total",
        "Webhook deliveries by connector and verification result"
    );
    describe_histogram!(
        "ferry_group_commit_size",
        Unit::Count,
        "Writes committed together, by kind of write (creates, link_writes, inbox_writes, inbound_applies)"
    );
    describe_counter!(
        "ferry_group_commit_failures_total",
        "Groups whose one transaction failed and whose writes were committed one by one, by kind of write"
    );
    describe_histogram!(
        "ferry_connector_call_duration_seconds",
        Unit::Seconds,
        "Sandboxed connector calls, by connector and function"
    );
    describe_counter!(
        "ferry_connector_traps_total",
        "Connector calls the sandbox stopped on a trap or a resource limit"
    );
    describe_counter!(
        "ferry_connector_timeouts_total",
        "Connector calls stopped at their deadline"
    );
    describe_gauge!(
        "ferry_outbox_unpublished",
        "Outbox events not yet published"
    );
    describe_gauge!(
        "ferry_outbox_oldest_unpublished_age_seconds",
        Unit::Seconds,
        "Age of the oldest unpublished outbox event (0 when none)"
    );
    describe_gauge!(
        "ferry_inbox_unapplied",
        "Inbox events pending or retrying, by connector"
    );
    describe_gauge!(
        "ferry_inbox_oldest_unapplied_age_seconds",
        Unit::Seconds,
        "Age of the oldest pending or retrying inbox event not held by an open conflict (0 when none)"
    );
    describe_gauge!(
        "ferry_inbox_held",
        "Inbox events waiting for a person to resolve the open conflict holding their link, by connector"
    );
    describe_gauge!(
        "ferry_inbox_loops_holding_back",
        "Inbox loops after the first waiting while the webhook endpoint is busy"
    );
    describe_gauge!(
        "ferry_sync_links",
        "Outbound links waiting to be pushed or retrying, by connector and state"
    );
    describe_gauge!(
        "ferry_dead_letters_unreplayed",
        "Dead letters not replayed, by connector and direction"
    );
    describe_gauge!("ferry_conflicts_open", "Open conflicts, by connector");
    describe_gauge!(
        "ferry_breaker_state",
        "Circuit breaker per connector: 0 closed, 1 half open, 2 open"
    );
    describe_counter!(
        "ferry_kafka_producer_errors_total",
        "Kafka publishes that failed"
    );
    describe_counter!(
        "ferry_kafka_consumer_restarts_total",
        "Kafka consumers made again after a fatal error, by topic"
    );
    describe_gauge!(
        "ferry_kafka_consumer_lag_messages",
        "Messages between this consumer's position and the partition's end"
    );
    describe_counter!(
        "ferry_retention_deleted_total",
        "Rows retention deleted, by table"
    );
    describe_counter!(
        "ferry_retention_failures_total",
        "Retention passes that failed (the next one continues)"
    );
    describe_counter!(
        "ferry_background_failures_total",
        "Background passes that failed, by task (the next one tries again; the log says why)"
    );
    // At 0 from the start, as the retention's (see `retention_started`).
    for task in BACKGROUND_TASKS {
        counter!("ferry_background_failures_total", "task" => task).increment(0);
    }
    describe_gauge!(
        "ferry_retention_last_success_timestamp_seconds",
        Unit::Seconds,
        "When a retention pass last finished (Unix time); alert when it falls behind"
    );
    describe_gauge!(
        "ferry_backlog_refreshed_timestamp_seconds",
        Unit::Seconds,
        "When the backlog gauges were last read from the store (Unix time); they keep their last values while the store fails"
    );
}

/// Now, in Unix seconds, for the timestamp gauges.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The background tasks whose failed passes
/// `ferry_background_failures_total` counts: the purge of expired
/// idempotency keys, the purge of the console's expired sign-outs, the
/// registry's poll of the store (failing, this replica follows no
/// connector change another replica makes), and the closing of dead
/// letters whose links delivered since.
pub const BACKGROUND_TASKS: [&str; 4] = [
    "idempotency_purge",
    "sign_out_purge",
    "registry_refresh",
    "dead_letter_close",
];

/// A pass of the background `task` (one of [`BACKGROUND_TASKS`]) failed.
pub fn background_failed(task: &'static str) {
    counter!("ferry_background_failures_total", "task" => task).increment(1);
}

/// Retention deleted `rows` of `table`.
pub fn retention_deleted(table: &'static str, rows: u64) {
    counter!("ferry_retention_deleted_total", "table" => table).increment(rows);
}

/// Retention starts: its success gauge reads the start until a pass ends,
/// so a retention that fails from the start still falls behind (absent,
/// `time() - gauge` never alerted).
pub fn retention_started() {
    gauge!("ferry_retention_last_success_timestamp_seconds").set(unix_now());
    // At 0 from the start: a counter's series that first appears at 1 is
    // no increase to Prometheus (`increase()` sees one sample), and the
    // alert on it missed the first failure.
    counter!("ferry_retention_failures_total").increment(0);
}

/// A retention pass finished (`ok`) or failed.
pub fn retention_pass(ok: bool) {
    if ok {
        gauge!("ferry_retention_last_success_timestamp_seconds").set(unix_now());
    } else {
        counter!("ferry_retention_failures_total").increment(1);
    }
}

/// Axum middleware: counts and times every routed request by its route
/// template (never the raw path, which would let clients mint series).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    counter!("ferry_http_requests_total", &labels).increment(1);
    histogram!("ferry_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// One sync attempt's outcome.
pub fn delivery(connector: &str, direction: &'static str, outcome: &'static str) {
    counter!("ferry_sync_deliveries_total",
        "connector" => connector.to_owned(), "direction" => direction, "outcome" => outcome)
    .increment(1);
    match outcome {
        "retry_scheduled" => counter!("ferry_sync_retries_total",
            "connector" => connector.to_owned(), "direction" => direction)
        .increment(1),
        "dead_lettered" => counter!("ferry_dead_letters_total",
            "connector" => connector.to_owned(), "direction" => direction)
        .increment(1),
        _ => {}
    }
}

/// One webhook delivery's verification: `verified` (and its events
/// stored), `invalid_signature`, `invalid` (refused after verification),
/// `failed` (the connector broke, or cannot run on this replica) or
/// `unstored` (verified, and refused by
/// a busy or read-only store: the sender retries), `busy`, `refused`
/// (turned away before verification: too large, stalled) or `dropped`
/// (the request ended before its answer: past `request_timeout`, or the
/// sender gone).
pub fn webhook_verification(connector: &str, result: &'static str) {
    counter!("ferry_webhook_verifications_total",
        "connector" => connector.to_owned(), "result" => result)
    .increment(1);
}

/// The Kafka bus started, consuming `topics`: its failure counters at 0
/// (see [`retention_started`]).
pub fn kafka_started(topics: &[&str]) {
    counter!("ferry_kafka_producer_errors_total").increment(0);
    for topic in topics {
        counter!("ferry_kafka_consumer_restarts_total", "topic" => (*topic).to_owned())
            .increment(0);
    }
}

/// A Kafka publish failed.
pub fn kafka_producer_error() {
    counter!("ferry_kafka_producer_errors_total").increment(1);
}

/// A Kafka consumer of `topic` stopped on a fatal error and is made again.
pub fn kafka_consumer_restart(topic: &str) {
    counter!("ferry_kafka_consumer_restarts_total", "topic" => topic.to_owned()).increment(1);
}

/// Kafka consumer lag of one partition, from librdkafka's statistics.
pub fn kafka_consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!("ferry_kafka_consumer_lag_messages",
        "topic" => topic.to_owned(), "partition" => partition.to_string())
    .set(lag as f64);
}

/// Refreshes the backlog gauges every [`GAUGE_INTERVAL`] until cancelled,
/// and lets the exporter drain its histogram buffers.
pub async fn run_gauges(
    handle: PrometheusHandle,
    store: Store,
    registry: Registry,
    sync: SyncEngine,
    cancel: CancellationToken,
) {
    // From the start, not from the first success: a store that fails from
    // the start left the gauge absent, and `time() - gauge` never alerted.
    gauge!("ferry_backlog_refreshed_timestamp_seconds").set(unix_now());
    let mut every = tokio::time::interval(GAUGE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = Vec::new();
    let mut breakers: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {}
        }
        handle.run_upkeep();
        match store.backlog().await {
            Ok(backlog) => {
                set_backlog(&backlog, &mut previous);
                gauge!("ferry_backlog_refreshed_timestamp_seconds").set(unix_now());
            }
            Err(error) => tracing::warn!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "refreshing the backlog gauges failed"
            ),
        }
        let names: Vec<String> = registry.entries().iter().map(|e| e.name.clone()).collect();
        for name in &names {
            // Each connector's failure counters at 0 from the start (see
            // `retention_started`): the documented alert,
            // `increase(ferry_dead_letters_total[1h]) > 0`, missed a
            // replica's first dead letter, which is the usual one.
            for direction in ["outbound", "inbound"] {
                let labels = [
                    ("connector", name.clone()),
                    ("direction", direction.to_owned()),
                ];
                counter!("ferry_dead_letters_total", &labels).increment(0);
                counter!("ferry_sync_retries_total", &labels).increment(0);
            }
            let view = sync.breakers().view(name);
            let state = match view.state {
                "open" => 2.0,
                "half_open" => 1.0,
                _ => 0.0,
            };
            gauge!("ferry_breaker_state", "connector" => name.clone()).set(state);
        }
        // A connector deleted since reads closed, not the state it had.
        for gone in breakers.iter().filter(|n| !names.contains(n)) {
            gauge!("ferry_breaker_state", "connector" => gone.clone()).set(0.0);
        }
        breakers = names;
    }
}

/// A labelled gauge value.
type Series = (&'static str, Vec<(&'static str, String)>);

/// Sets the backlog gauges, and zeroes the labelled ones that dropped out
/// of the counts since the last refresh (a drained connector reads 0, not
/// its last backlog).
fn set_backlog(backlog: &crate::store::health::Backlog, previous: &mut Vec<Series>) {
    gauge!("ferry_outbox_unpublished").set(backlog.outbox_unpublished as f64);
    gauge!("ferry_outbox_oldest_unpublished_age_seconds")
        .set(backlog.outbox_oldest_age.as_secs_f64());
    gauge!("ferry_inbox_oldest_unapplied_age_seconds").set(backlog.inbox_oldest_age.as_secs_f64());
    let mut now: Vec<(Series, i64)> = Vec::new();
    for (connector, count) in &backlog.inbox_unapplied {
        now.push((
            (
                "ferry_inbox_unapplied",
                vec![("connector", connector.clone())],
            ),
            *count,
        ));
    }
    for (connector, count) in backlog.inbox_held.iter().filter(|(_, n)| **n > 0) {
        now.push((
            ("ferry_inbox_held", vec![("connector", connector.clone())]),
            *count,
        ));
    }
    for ((connector, state), count) in &backlog.links {
        now.push((
            (
                "ferry_sync_links",
                vec![("connector", connector.clone()), ("state", state.clone())],
            ),
            *count,
        ));
    }
    for ((connector, direction), count) in &backlog.dead_letters {
        now.push((
            (
                "ferry_dead_letters_unreplayed",
                vec![
                    ("connector", connector.clone()),
                    ("direction", direction.clone()),
                ],
            ),
            *count,
        ));
    }
    for (connector, count) in &backlog.conflicts_open {
        now.push((
            (
                "ferry_conflicts_open",
                vec![("connector", connector.clone())],
            ),
            *count,
        ));
    }
    for gone in previous.iter() {
        if !now.iter().any(|(series, _)| series == gone) {
            gauge!(gone.0, &gone.1).set(0.0);
        }
    }
    for ((name, labels), count) in &now {
        gauge!(*name, labels).set(*count as f64);
    }
    *previous = now.into_iter().map(|(series, _)| series).collect();
}
