//! Filter stats, by name. Names are dotted; Envoy puts them under its Wasm custom-stat
//! namespace in `/stats/prometheus` (without the `envoy_` prefix).

use crate::config::Config;
use std::collections::HashSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

pub const REQ_CREATED: &str = "realtime_filter.requests.created";
pub const REQ_UPSTREAM_REJECTED: &str = "realtime_filter.requests.upstream_rejected";
pub const REQ_FAILED: &str = "realtime_filter.requests.failed";
pub const REQ_HANGUP: &str = "realtime_filter.requests.hangup";
/// Client secrets (ephemeral keys) minted (`POST /v1/realtime/client_secrets`).
pub const REQ_CLIENT_SECRETS: &str = "realtime_filter.requests.client_secrets";
/// Sideband upgrades let go on to their worker (`crate::sideband`).
pub const REQ_SIDEBAND: &str = "realtime_filter.requests.sideband";
/// Requests on a route where the filter is enabled that it let through untouched. Routes
/// that disable the filter (every non-realtime route in envoy/) never count here: the
/// request does not enter the Wasm VM at all.
pub const REQ_PASSED_THROUGH: &str = "realtime_filter.requests.passed_through";
pub const SETUP_LATENCY: &str = "realtime_filter.setup_latency_ms";
/// Routing headers from callers not trusted to steer, ignored.
pub const ROUTING_HEADER_IGNORED: &str = "realtime_filter.requests.routing_header_ignored";
pub const LOAD_REFRESH: &str = "realtime_filter.load_refresh";
pub const LOAD_REFRESH_FAILED: &str = "realtime_filter.load_refresh_failed";
/// Prefix of the per-code error counters (`realtime_filter.errors.<code>`).
pub const ERRORS_PREFIX: &str = "realtime_filter.errors.";
/// Where rare error codes go once many distinct ones exist.
pub const ERRORS_OTHER: &str = "realtime_filter.errors.other";

pub fn error(code: &str) -> String {
    format!("{ERRORS_PREFIX}{code}")
}

/// Most distinct error-code counters per VM: codes from the relay are open-ended.
pub const MAX_ERROR_CODES: usize = 64;

/// Which counter an error code goes to: its own, for the first [`MAX_ERROR_CODES`] distinct
/// codes, then `other`. Counted apart from every other stat: with many workers or replicas
/// (three stats each) a shared cap used to fold every new code into `other`.
#[derive(Debug, Default)]
pub struct ErrorCounters {
    seen: HashSet<String>,
}

impl ErrorCounters {
    /// The counter name for `code`.
    pub fn name_for(&mut self, code: &str) -> String {
        if self.seen.contains(code) {
            return error(code);
        }
        if self.seen.len() < MAX_ERROR_CODES {
            self.seen.insert(code.to_string());
            return error(code);
        }
        ERRORS_OTHER.to_string()
    }
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
        REQ_CLIENT_SECRETS,
        REQ_SIDEBAND,
        REQ_PASSED_THROUGH,
        ROUTING_HEADER_IGNORED,
        LOAD_REFRESH,
        LOAD_REFRESH_FAILED,
    ]
    .iter()
    .map(|n| (MetricKind::Counter, (*n).to_string()))
    .collect();
    out.push((MetricKind::Histogram, SETUP_LATENCY.to_string()));
    for gauge in [
        crate::shared_size::SHARED_DATA_BYTES,
        crate::shared_size::SHARED_DATA_KEYS,
    ] {
        out.push((MetricKind::Gauge, gauge.to_string()));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_keep_their_own_counter_up_to_the_cap_whatever_else_is_defined() {
        // A configuration with many workers defines hundreds of other stats; they do not
        // count against the codes.
        let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
        let workers: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({"id": format!("w{i}"), "base_url": "https://api.example.com", "key_env": "KEY_A"}))
            .collect();
        v["pools"][0]["workers"] = serde_json::Value::Array(workers);
        let config =
            Config::from_json(v.to_string().as_bytes(), &crate::config::tests::env).unwrap();
        assert!(definitions(&config).len() > 300);

        let mut codes = ErrorCounters::default();
        for i in 0..MAX_ERROR_CODES {
            let code = format!("code_{i}");
            assert_eq!(codes.name_for(&code), error(&code));
        }
        assert_eq!(codes.name_for("one_too_many"), ERRORS_OTHER);
        // A code seen before keeps its counter.
        assert_eq!(codes.name_for("code_3"), error("code_3"));
    }
}
