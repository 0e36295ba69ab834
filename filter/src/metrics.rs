//! Envoy's side of the filter stats: metric ids by name (names are in
//! `realtime_filter_core::metrics`).

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use realtime_filter_core::metrics::{ErrorCounters, MetricKind};

#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, u32>>,
    codes: RefCell<ErrorCounters>,
}

fn metric_type(kind: MetricKind) -> MetricType {
    match kind {
        MetricKind::Counter => MetricType::Counter,
        MetricKind::Gauge => MetricType::Gauge,
        MetricKind::Histogram => MetricType::Histogram,
    }
}

impl Metrics {
    fn id(&self, kind: MetricKind, name: &str) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(metric_type(kind), name).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    pub fn define(&self, kind: MetricKind, name: &str) {
        let _ = self.id(kind, name);
    }

    pub fn inc(&self, name: &str) {
        if let Some(id) = self.id(MetricKind::Counter, name) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// Moves a gauge by `delta` (Envoy adds or subtracts).
    pub fn add(&self, name: &str, delta: i64) {
        if delta == 0 {
            return;
        }
        if let Some(id) = self.id(MetricKind::Gauge, name) {
            let _ = hostcalls::increment_metric(id, delta);
        }
    }

    pub fn record(&self, name: &str, value: u64) {
        if let Some(id) = self.id(MetricKind::Histogram, name) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// `realtime_filter.errors.<code>`, folding codes beyond the cap into `other`.
    pub fn error(&self, code: &str) {
        let name = self.codes.borrow_mut().name_for(code);
        self.inc(&name);
    }
}
