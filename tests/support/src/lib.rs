//! Real peers for ferry's integration tests, started by the tests themselves.
pub mod bench;
pub mod browser;
pub mod fake_example;
pub mod fake_remote;
pub mod fake_salesforce;
pub mod fault_proxy;
pub mod kafka;
pub mod localstripe;
pub mod pg_proxy;
pub mod postgres;
pub mod wasm;

/// Resident set size of this process, in MiB (0 where `/proc` is missing):
/// the benchmarks' memory figures.
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
