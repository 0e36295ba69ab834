//! Filter stats in Envoy's own stats (`/stats/prometheus`). Names are dotted; Envoy puts them
//! under its Wasm custom-stat namespace.

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Most distinct error-code counters (codes from the relay are open-ended).
const MAX_CODES: usize = 64;

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, u32>>,
}

impl Metrics {
    fn id(&self, kind: MetricType, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    pub fn define(&self, kind: MetricType, name: &str) {
        let _ = self.id(kind, name);
    }

    pub fn inc(&self, name: &str) {
        if let Some(id) = self.id(MetricType::Counter, name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    pub fn record(&self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricType::Histogram, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// `realtime_filter.errors.<code>`, folding rare codes into `other` once many exist.
    pub fn error(&self, code: &str) {
        let name = format!("realtime_filter.errors.{code}");
        let known = self.ids.borrow().contains_key(&name);
        if known || self.ids.borrow().len() < MAX_CODES + 32 {
            self.inc(&name);
        } else {
            self.inc("realtime_filter.errors.other");
        }
    }
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
