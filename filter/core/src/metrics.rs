//! Filter stats, by name. Names are dotted; Envoy puts them under its Wasm custom-stat
//! namespace in `/stats/prometheus` (without the `envoy_` prefix).

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Histogram,
}

pub const REQ_CREATED: &str = "realtime_filter.requests.created";
pub const REQ_UPSTREAM_REJECTED: &str = "realtime_filter.requests.upstream_rejected";
pub const REQ_FAILED: &str = "realtime_filter.requests.failed";
pub const REQ_HANGUP: &str = "realtime_filter.requests.hangup";
/// Requests on a route where the filter is enabled that it let through untouched. Routes
/// that disable the filter (every non-realtime route in envoy/) never count here: the
/// request does not enter the Wasm VM at all.
pub const REQ_PASSED_THROUGH: &str = "realtime_filter.requests.passed_through";
pub const SETUP_LATENCY: &str = "realtime_filter.setup_latency_ms";
pub const LOAD_REFRESH: &str = "realtime_filter.load_refresh";
pub const LOAD_REFRESH_FAILED: &str = "realtime_filter.load_refresh_failed";
/// Prefix of the per-code error counters (`realtime_filter.errors.<code>`).
pub const ERRORS_PREFIX: &str = "realtime_filter.errors.";
/// Where rare error codes go once many distinct ones exist.
pub const ERRORS_OTHER: &str = "realtime_filter.errors.other";

pub fn error(code: &str) -> String {
    format!("{ERRORS_PREFIX}{code}")
}

pub fn setups(worker: &str, outcome: &str) -> String {
    format!("realtime_filter.worker.{worker}.setups_{outcome}")
}

pub fn ejections(worker: &str) -> String {
    format!("realtime_filter.worker.{worker}.ejections")
}

/// `realtime_filter.replica.<id>.{creates,failovers}`.
pub fn replica(id: &str, what: &str) -> String {
    format!("realtime_filter.replica.{id}.{what}")
}

/// Every stat a configuration uses, to define when it loads (so each appears in
/// `/stats/prometheus` from the start, at zero).
pub fn definitions(config: &Config) -> Vec<(MetricKind, String)> {
    let mut out: Vec<(MetricKind, String)> = [
        REQ_CREATED,
        REQ_UPSTREAM_REJECTED,
        REQ_FAILED,
        REQ_HANGUP,
        REQ_PASSED_THROUGH,
        LOAD_REFRESH,
        LOAD_REFRESH_FAILED,
    ]
    .iter()
    .map(|n| (MetricKind::Counter, (*n).to_string()))
    .collect();
    out.push((MetricKind::Histogram, SETUP_LATENCY.to_string()));
    for r in &config.replicas {
        out.push((MetricKind::Counter, replica(&r.id, "creates")));
        out.push((MetricKind::Counter, replica(&r.id, "failovers")));
    }
    for (_, w) in config.workers() {
        out.push((MetricKind::Counter, setups(&w.id, "ok")));
        out.push((MetricKind::Counter, setups(&w.id, "failed")));
        out.push((MetricKind::Counter, ejections(&w.id)));
    }
    out
}
