//! Where the bridge hands the provider's events for metering: [`UsageTap::observe`] reads the
//! usage an event carries (`usage::read`), adds it to the call's figures (its registry entry,
//! which watchers and GetCall see) and to the metrics. The bridge calls it after forwarding
//! the event, and only for text messages from the provider that pass the prefilter.

use crate::registry::CallEntry;
use crate::usage::{self, Budget, UsageEvent};
use crate::usage_metrics::{CallUsageMetrics, UsageMetrics};
use std::sync::Arc;

pub struct UsageTap {
    entry: Arc<CallEntry>,
    call_metrics: CallUsageMetrics,
    metrics: Arc<UsageMetrics>,
    budget: Budget,
}

impl UsageTap {
    pub fn new(entry: Arc<CallEntry>, metrics: Arc<UsageMetrics>, budget: Budget) -> UsageTap {
        let call_metrics = metrics.for_call(&entry.model, &entry.worker_id);
        UsageTap {
            entry,
            call_metrics,
            metrics,
            budget,
        }
    }

    /// Whether `event` needs [`UsageTap::observe`] (the cheap prefilter).
    pub fn wants(event: &[u8]) -> bool {
        usage::may_carry_usage(event)
    }

    /// Accounts for one text event from the provider; what of the call's budget its usage
    /// has reached, if it has (the bridge then ends the call: `Bridge::budget_reached`).
    pub fn observe(&self, event: &[u8]) -> Option<String> {
        let ev = usage::read(event)?;
        let (delta, reached) = self.entry.record_usage(&ev, &self.budget);
        self.call_metrics.add(&delta);
        match &ev {
            UsageEvent::Error { kind, code } => self.metrics.error_event(kind, code),
            UsageEvent::RateLimits(l) => self.metrics.rate_limits(&self.entry.worker_id, l),
            _ => {}
        }
        reached
    }
}
