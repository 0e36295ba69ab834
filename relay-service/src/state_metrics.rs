//! Gauges of the relay's own bookkeeping: how many entries each table holds and how many
//! tasks run. Read at scrape time, so they cost nothing between scrapes. They are what a
//! churn soak (`cargo xtask soak`) watches: every one must come back to its baseline once
//! the calls are gone, or something is leaking.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

/// Sizes of the relay's tables and task sets at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSizes {
    /// Calls in the registry (pending or connected).
    pub calls_live: usize,
    /// Ended calls kept for GetCall (a bounded ring).
    pub calls_ended_kept: usize,
    /// Shared UDP media port: calls routed by ICE username fragment.
    pub udp_routes_by_ufrag: usize,
    /// Shared UDP media port: client addresses learned.
    pub udp_routes_by_addr: usize,
    /// ICE-TCP listener: calls routed by username fragment (0 without ICE-TCP).
    pub tcp_routes_by_ufrag: usize,
    /// ICE-TCP listener: connections routed to a call.
    pub tcp_routes_by_addr: usize,
    /// ICE-TCP connections open, routed or not.
    pub tcp_connections_open: usize,
    /// WatchCalls streams open.
    pub watchers: usize,
    /// Call tasks running (one per call, tracked until it has cleaned up).
    pub call_tasks: usize,
    /// Every task alive on the relay's tokio runtime (calls, receivers, servers, streams).
    pub runtime_tasks: usize,
}

impl StateSizes {
    /// (label, value) of every table; the task counts are separate gauges.
    pub fn tables(&self) -> [(&'static str, usize); 8] {
        [
            ("calls_live", self.calls_live),
            ("calls_ended_kept", self.calls_ended_kept),
            ("udp_routes_by_ufrag", self.udp_routes_by_ufrag),
            ("udp_routes_by_addr", self.udp_routes_by_addr),
            ("tcp_routes_by_ufrag", self.tcp_routes_by_ufrag),
            ("tcp_routes_by_addr", self.tcp_routes_by_addr),
            ("tcp_connections_open", self.tcp_connections_open),
            ("watchers", self.watchers),
        ]
    }
}

#[derive(Default)]
pub struct StateGauges {
    entries: Family<TableLabel, Gauge>,
    call_tasks: Gauge,
    runtime_tasks: Gauge,
}

impl StateGauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "state_entries",
            "Entries in the relay's tables, by table (read at scrape time)",
            self.entries.clone(),
        );
        registry.register(
            "call_tasks",
            "Call tasks running (read at scrape time)",
            self.call_tasks.clone(),
        );
        registry.register(
            "runtime_tasks_alive",
            "Tasks alive on the relay's tokio runtime (read at scrape time)",
            self.runtime_tasks.clone(),
        );
    }

    pub fn set(&self, sizes: &StateSizes) {
        for (table, n) in sizes.tables() {
            self.entries
                .get_or_create(&TableLabel { table })
                .set(gauge_value(n));
        }
        self.call_tasks.set(gauge_value(sizes.call_tasks));
        self.runtime_tasks.set(gauge_value(sizes.runtime_tasks));
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_and_task_count_is_exported_under_its_name() {
        let gauges = StateGauges::default();
        let mut registry = Registry::with_prefix("realtime_relay");
        gauges.register(&mut registry);
        gauges.set(&StateSizes {
            calls_live: 3,
            calls_ended_kept: 7,
            udp_routes_by_ufrag: 3,
            udp_routes_by_addr: 2,
            watchers: 1,
            call_tasks: 3,
            runtime_tasks: 42,
            ..Default::default()
        });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "realtime_relay_state_entries{table=\"calls_live\"} 3",
            "realtime_relay_state_entries{table=\"calls_ended_kept\"} 7",
            "realtime_relay_state_entries{table=\"udp_routes_by_addr\"} 2",
            "realtime_relay_state_entries{table=\"tcp_connections_open\"} 0",
            "realtime_relay_state_entries{table=\"watchers\"} 1",
            "realtime_relay_call_tasks 3",
            "realtime_relay_runtime_tasks_alive 42",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
