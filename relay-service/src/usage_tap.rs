//! Where the bridge hands the provider's events for metering: [`UsageTap::observe`] reads the
//! usage an event carries (`usage::read`), adds it to the call's figures (its registry entry,
//! which watchers and GetCall see) and to the metrics. The bridge calls it after forwarding
//! the event, and only for text messages from the provider that pass the prefilter.

use crate::registry::CallEntry;
use crate::usage::{self, UsageEvent};
use crate::usage_metrics::{CallUsageMetrics, UsageMetrics};
use std::sync::Arc;

pub struct UsageTap {
    entry: Arc<CallEntry>,
    call_metrics: CallUsageMetrics,
    metrics: Arc<UsageMetrics>,
}

impl UsageTap {
    pub fn new(entry: Arc<CallEntry>, metrics: Arc<UsageMetrics>) -> UsageTap {
        let call_metrics = metrics.for_call(&entry.model, &entry.worker_id);
        UsageTap {
            entry,
            call_metrics,
            metrics,
        }
    }

    /// Whether `event` needs [`UsageTap::observe`] (the cheap prefilter).
    pub fn wants(event: &[u8]) -> bool {
        usage::may_carry_usage(event)
    }

    /// Accounts for one text event from the provider.
    pub fn observe(&self, event: &[u8]) {
        let Some(ev) = usage::read(event) else {
            return;
        };
        let delta = self.entry.record_usage(&ev);
        self.call_metrics.add(&delta);
        match &ev {
            UsageEvent::Error { kind, code } => self.metrics.error_event(kind, code),
            UsageEvent::RateLimits(l) => self.metrics.rate_limits(&self.entry.worker_id, l),
            _ => {}
        }
    }
}
