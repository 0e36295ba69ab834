//! Prometheus metrics. Labels are bounded: directions, reason codes and worker ids
//! (from the router's configuration); never call ids, never keys.

use crate::call_state::EndReason;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// `media_shard_wakeups_total{result}`, with its two counters resolved once: a wake-up
/// costs one atomic add, no label lookup.
#[derive(Clone, Debug)]
pub struct WakeupMetrics {
    pub family: Family<ResultLabel, Counter>,
    pub work: Counter,
    pub idle: Counter,
}

impl Default for WakeupMetrics {
    fn default() -> Self {
        let family = Family::<ResultLabel, Counter>::default();
        let work = family
            .get_or_create(&ResultLabel { result: "work" })
            .clone();
        let idle = family
            .get_or_create(&ResultLabel { result: "idle" })
            .clone();
        WakeupMetrics { family, work, idle }
    }
}

/// Pre-resolved counters for one direction, so the per-packet path is one atomic add
/// per counter with no label lookup.
#[derive(Clone, Debug, Default)]
pub struct DirectionMetrics {
    pub rtp_packets: Counter,
    pub rtp_bytes: Counter,
    pub dc_messages: Counter,
    pub dc_bytes: Counter,
    pub dropped: Counter,
}

pub struct Metrics {
    pub registry: Registry,
    pub calls_created: Counter,
    pub setup_failures: Family<ReasonLabel, Counter>,
    pub calls_ended: Family<ReasonLabel, Counter>,
    pub worker_failures: Family<WorkerLabel, Counter>,
    pub calls_active: Gauge,
    pub calls_connected: Gauge,
    pub setup_seconds: Histogram,
    pub buffer_overflows: Counter,
    pub dc_write_errors: Counter,
    pub dc_too_large: Counter,
    pub unmatched_datagrams: Counter,
    /// Binding requests on the shared media port that named a live call's ufrag but whose
    /// MESSAGE-INTEGRITY did not verify with its password: delivered, but no address learned.
    pub stun_unauthenticated: Counter,
    pub queue_full_drops: Counter,
    /// Client datagrams the kernel gave one media shard's socket for a call another shard
    /// owns: handed over through the call's inbox.
    pub cross_shard_datagrams: Counter,
    /// Media shard wake-ups, by whether they found work.
    pub media_wakeups: WakeupMetrics,
    /// Datagrams dropped because a socket's send buffer stayed full past its backlog, by
    /// which socket (`client_port_full`, `upstream_socket_full`).
    pub send_drops: Family<ReasonLabel, Counter>,
    /// Datagrams that found a socket's send buffer full and waited in its backlog for room,
    /// by which socket (`client_port_full`, `upstream_socket_full`).
    pub send_waits: Family<ReasonLabel, Counter>,
    pub call_panics: Counter,
    /// Upstream-leg addresses the private-address policy refused, by where.
    pub upstream_addresses_refused: Family<ReasonLabel, Counter>,
    /// ListCalls answered (gateways' load refresh: each gateway asks every replica).
    pub list_calls: Counter,
    pub client_to_upstream: DirectionMetrics,
    pub upstream_to_client: DirectionMetrics,
    pub media_tcp: TcpMetrics,
    /// What calls used (tokens, Live seconds, provider errors, rate limits).
    pub usage: std::sync::Arc<crate::usage_metrics::UsageMetrics>,
    /// Table sizes and task counts, set at scrape time ([`crate::relay::Relay::state_sizes`]).
    pub state: crate::state_metrics::StateGauges,
    /// CPU, memory and descriptors of the process, set at scrape time.
    pub process: crate::process_metrics::ProcessGauges,
    /// 1 from the start of a drain (SIGTERM) until the process exits.
    pub draining: Gauge,
    /// Unix time the drain began (0 before), and the drain time it was given: a drain still
    /// running well past the sum is stuck (the shipped `RealtimeRelayDrainStuck` alert).
    pub drain_started_at: Gauge,
    pub drain_timeout: Gauge,
    /// Live calls per worker, set at scrape time.
    pub worker_load: WorkerLoad,
}

/// `realtime_relay_worker_calls_active{worker}`: live calls per worker. A worker that had
/// calls stays exported (at 0) once they end, so its line in a dashboard drops to zero
/// instead of vanishing.
#[derive(Default)]
pub struct WorkerLoad {
    active: Family<WorkerLabel, Gauge>,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl WorkerLoad {
    pub fn set(&self, live: &std::collections::HashMap<String, u32>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(live.keys().cloned());
        for worker in seen.iter() {
            let n = live.get(worker).copied().unwrap_or(0);
            self.active
                .get_or_create(&WorkerLabel {
                    worker: worker.clone(),
                })
                .set(i64::from(n));
        }
    }
}

/// The ICE-TCP listener's counters (`media_tcp`).
#[derive(Clone, Debug, Default)]
pub struct TcpMetrics {
    /// Connections routed to a call (their first STUN request named a live call's ufrag).
    pub accepted: Counter,
    /// Connections closed before reaching a call, by [`crate::media_tcp::Refusal::code`].
    pub refused: Family<ReasonLabel, Counter>,
    /// Routed connections that ended, by [`crate::media_tcp::CloseReason::code`].
    pub closed: Family<ReasonLabel, Counter>,
    pub active: Gauge,
    /// Frames not delivered, by reason (`write_queue_full`, `call_queue_full`, …).
    pub frames_dropped: Family<ReasonLabel, Counter>,
}

impl TcpMetrics {
    pub fn refused(&self, reason: &str) {
        inc(&self.refused, reason);
    }

    pub fn closed(&self, reason: &str) {
        inc(&self.closed, reason);
    }

    pub fn dropped(&self, reason: &str) {
        inc(&self.frames_dropped, reason);
    }
}

fn inc_by(family: &Family<ReasonLabel, Counter>, reason: &str, n: u64) {
    family
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc_by(n);
}

fn inc(family: &Family<ReasonLabel, Counter>, reason: &str) {
    family
        .get_or_create(&ReasonLabel {
            reason: reason.to_string(),
        })
        .inc();
}

/// The `reason` labels of `upstream_addresses_refused`: candidates dropped from an upstream
/// answer, and upstream-leg datagrams dropped, because the address is not public.
pub const UPSTREAM_REFUSAL_REASONS: [&str; 4] = [
    "candidate_not_public",
    "candidate_not_ip",
    "datagram_from_not_public",
    "datagram_to_not_public",
];

/// The `reason` labels of `send_waits` and `send_drops`: which socket's send buffer was full.
pub const SEND_BACKLOG_REASONS: [&str; 2] = ["client_port_full", "upstream_socket_full"];

/// What one socket's backlog counts: datagrams that waited in it for room, and datagrams
/// dropped because it was full too.
#[derive(Clone, Debug, Default)]
pub struct BacklogCounters {
    pub waited: Counter,
    pub dropped: Counter,
}

impl BacklogCounters {
    /// The counters of the backlog of the socket `reason` names.
    pub fn of(metrics: &Metrics, reason: &str) -> Self {
        let label = ReasonLabel {
            reason: reason.to_string(),
        };
        BacklogCounters {
            waited: metrics.send_waits.get_or_create(&label).clone(),
            dropped: metrics.send_drops.get_or_create(&label).clone(),
        }
    }

    /// Keeps `item` in `backlog` if it has room below `limit`; counts it either way.
    pub fn keep<T>(&self, backlog: &mut std::collections::VecDeque<T>, limit: usize, item: T) {
        if backlog.len() < limit {
            self.waited.inc();
            backlog.push_back(item);
        } else {
            self.dropped.inc();
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        // The root holds the process's standard names; the relay's own are prefixed.
        let mut root = Registry::default();
        let m = Metrics {
            calls_created: Counter::default(),
            setup_failures: Family::default(),
            calls_ended: Family::default(),
            worker_failures: Family::default(),
            calls_active: Gauge::default(),
            calls_connected: Gauge::default(),
            setup_seconds: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            buffer_overflows: Counter::default(),
            dc_write_errors: Counter::default(),
            dc_too_large: Counter::default(),
            unmatched_datagrams: Counter::default(),
            stun_unauthenticated: Counter::default(),
            queue_full_drops: Counter::default(),
            cross_shard_datagrams: Counter::default(),
            media_wakeups: WakeupMetrics::default(),
            send_drops: Family::default(),
            send_waits: Family::default(),
            call_panics: Counter::default(),
            upstream_addresses_refused: Family::default(),
            list_calls: Counter::default(),
            client_to_upstream: DirectionMetrics::default(),
            upstream_to_client: DirectionMetrics::default(),
            media_tcp: TcpMetrics::default(),
            usage: Default::default(),
            state: Default::default(),
            process: Default::default(),
            draining: Gauge::default(),
            drain_started_at: Gauge::default(),
            drain_timeout: Gauge::default(),
            worker_load: WorkerLoad::default(),
            registry: Registry::default(),
        };
        m.process.register(&mut root);
        let registry = root.sub_registry_with_prefix("realtime_relay");
        m.usage.register(registry);
        m.state.register(registry);
        registry.register(
            "worker_calls_active",
            "Live calls per worker (read at scrape time)",
            m.worker_load.active.clone(),
        );
        registry.register(
            "draining",
            "1 while the relay drains (after SIGTERM: no new calls, live calls finishing)",
            m.draining.clone(),
        );
        registry.register(
            "drain_started_timestamp_seconds",
            "Unix time the current drain began; 0 when not draining",
            m.drain_started_at.clone(),
        );
        registry.register(
            "drain_timeout_seconds",
            "The drain time live calls get (--drain-secs); set when a drain begins",
            m.drain_timeout.clone(),
        );
        registry.register(
            "upstream_addresses_refused",
            "Upstream-leg addresses refused by the private-address policy: candidates dropped from answers (candidate_not_public, candidate_not_ip) and datagrams dropped (datagram_from_not_public, datagram_to_not_public)",
            m.upstream_addresses_refused.clone(),
        );
        registry.register(
            "list_calls",
            "ListCalls requests answered (gateways' load refresh)",
            m.list_calls.clone(),
        );
        registry.register(
            "calls_created",
            "Calls set up successfully",
            m.calls_created.clone(),
        );
        registry.register(
            "setup_failures",
            "Call setups that failed, by error code",
            m.setup_failures.clone(),
        );
        registry.register(
            "calls_ended",
            "Calls ended, by end reason",
            m.calls_ended.clone(),
        );
        registry.register(
            "worker_failures",
            "Upstream failures (setup or mid-call) by worker id",
            m.worker_failures.clone(),
        );
        registry.register(
            "calls_active",
            "Live calls (pending or connected)",
            m.calls_active.clone(),
        );
        registry.register(
            "calls_connected",
            "Calls with both legs connected",
            m.calls_connected.clone(),
        );
        registry.register(
            "setup_duration_seconds",
            "Time from CreateCall to the SDP answer",
            m.setup_seconds.clone(),
        );
        registry.register(
            "dc_buffer_overflows",
            "Calls ended because buffered data-channel bytes exceeded the cap",
            m.buffer_overflows.clone(),
        );
        registry.register(
            "dc_write_errors",
            "Data-channel writes that failed",
            m.dc_write_errors.clone(),
        );
        registry.register(
            "dc_messages_too_large",
            "Data-channel messages not delivered because the receiving peer's max-message-size is smaller (the client gets an error event)",
            m.dc_too_large.clone(),
        );
        registry.register(
            "unmatched_datagrams",
            "Datagrams on the shared media port that no call accepted",
            m.unmatched_datagrams.clone(),
        );
        registry.register(
            "stun_unauthenticated",
            "Binding requests on the shared media port for a live call whose MESSAGE-INTEGRITY did not verify: delivered to the call, no client address learned",
            m.stun_unauthenticated.clone(),
        );
        registry.register(
            "call_queue_full_drops",
            "Datagrams dropped because a call's inbound queue was full",
            m.queue_full_drops.clone(),
        );
        registry.register(
            "cross_shard_datagrams",
            "Client datagrams that arrived on another media shard's socket than their call's and were handed over through the call's inbox",
            m.cross_shard_datagrams.clone(),
        );
        registry.register(
            "media_shard_wakeups",
            "Times a media shard's thread woke, by result: work (a packet, also one handed to another shard's call, a due timer, a command or a backlog to send) or idle (nothing to do: a timer entry that had moved, a spurious wake-up)",
            m.media_wakeups.family.clone(),
        );
        registry.register(
            "send_drops",
            "Datagrams dropped because a socket's send buffer stayed full past its backlog, by socket (client_port_full, upstream_socket_full)",
            m.send_drops.clone(),
        );
        registry.register(
            "send_waits",
            "Datagrams that found a socket's send buffer full and waited in its backlog for room, by socket (client_port_full, upstream_socket_full)",
            m.send_waits.clone(),
        );
        for reason in SEND_BACKLOG_REASONS {
            for family in [&m.send_drops, &m.send_waits] {
                let _ = family.get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                });
            }
        }
        registry.register(
            "call_panics",
            "Call tasks that panicked (the call ended, the relay did not)",
            m.call_panics.clone(),
        );
        // Every setup-failure code the contract defines starts at 0, so the family is in the
        // scrape from the start and `rate()` sees the first failure.
        for code in realtime_relay_proto::ErrorCode::ALL {
            let _ = m.setup_failures.get_or_create(&ReasonLabel {
                reason: code.as_str().to_string(),
            });
        }
        for reason in UPSTREAM_REFUSAL_REASONS {
            let _ = m.upstream_addresses_refused.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            });
        }
        let tcp = &m.media_tcp;
        registry.register(
            "media_tcp_connections_accepted",
            "ICE-TCP connections routed to a call by their first STUN request",
            tcp.accepted.clone(),
        );
        registry.register(
            "media_tcp_connections_refused",
            "ICE-TCP connections closed before reaching a call, by reason",
            tcp.refused.clone(),
        );
        registry.register(
            "media_tcp_connections_closed",
            "ICE-TCP connections of calls that ended, by reason",
            tcp.closed.clone(),
        );
        registry.register(
            "media_tcp_connections_active",
            "ICE-TCP connections routed to a live call",
            tcp.active.clone(),
        );
        registry.register(
            "media_tcp_frames_dropped",
            "ICE-TCP frames not delivered (a full queue, a connection gone), by reason",
            tcp.frames_dropped.clone(),
        );
        // The reasons exist from the start, so a scrape shows them at 0.
        for reason in crate::media_tcp::Refusal::ALL {
            let _ = tcp.refused.get_or_create(&ReasonLabel {
                reason: reason.code().to_string(),
            });
        }
        for reason in crate::media_tcp::CloseReason::ALL {
            let _ = tcp.closed.get_or_create(&ReasonLabel {
                reason: reason.code().to_string(),
            });
        }
        for reason in crate::media_tcp::DROP_REASONS {
            let _ = tcp.frames_dropped.get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            });
        }
        let families = DirectionFamilies::default();
        registry.register(
            "rtp_packets",
            "RTP packets relayed",
            families.rtp_packets.clone(),
        );
        registry.register(
            "rtp_bytes",
            "RTP payload bytes relayed",
            families.rtp_bytes.clone(),
        );
        registry.register(
            "dc_messages",
            "Data-channel messages relayed",
            families.dc_messages.clone(),
        );
        registry.register(
            "dc_bytes",
            "Data-channel bytes relayed",
            families.dc_bytes.clone(),
        );
        registry.register(
            "dropped",
            "Packets or messages that could not be relayed",
            families.dropped.clone(),
        );
        let client_to_upstream = families.resolve("client_to_upstream");
        let upstream_to_client = families.resolve("upstream_to_client");
        Metrics {
            registry: root,
            client_to_upstream,
            upstream_to_client,
            ..m
        }
    }

    /// Marks the start of a drain of `timeout`.
    pub fn drain_started(&self, timeout: std::time::Duration) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.drain_started_at
            .set(i64::try_from(now).unwrap_or(i64::MAX));
        self.drain_timeout
            .set(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX));
        self.draining.set(1);
    }

    pub fn ended(&self, reason: EndReason) {
        self.calls_ended
            .get_or_create(&ReasonLabel {
                reason: reason.code().to_string(),
            })
            .inc();
    }

    /// Counts a call setup that did not produce an answer, by its error code (or
    /// `upstream_status_<n>` for a provider's rejection).
    pub fn setup_failed(&self, reason: &str) {
        self.setup_failures
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Counts a failure the worker is to blame for (at setup or mid-call). Calls
    /// without a worker id (direct use, tests) are not labelled.
    pub fn worker_failed(&self, worker_id: &str) {
        if worker_id.is_empty() {
            return;
        }
        self.worker_failures
            .get_or_create(&WorkerLabel {
                worker: worker_id.to_string(),
            })
            .inc();
    }

    /// Exports a worker that has set a call up in `worker_failures` (at 0 until it fails),
    /// so dashboards list every serving worker and `rate()` sees its first failure.
    pub fn worker_seen(&self, worker_id: &str) {
        if !worker_id.is_empty() {
            let _ = self.worker_failures.get_or_create(&WorkerLabel {
                worker: worker_id.to_string(),
            });
        }
    }

    /// Counts upstream-leg addresses the private-address policy refused; `reason` is one
    /// of a fixed set (see the family's help).
    pub fn upstream_address_refused(&self, reason: &'static str, n: usize) {
        if n > 0 {
            inc_by(&self.upstream_addresses_refused, reason, n as u64);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct DirectionFamilies {
    rtp_packets: Family<DirectionLabel, Counter>,
    rtp_bytes: Family<DirectionLabel, Counter>,
    dc_messages: Family<DirectionLabel, Counter>,
    dc_bytes: Family<DirectionLabel, Counter>,
    dropped: Family<DirectionLabel, Counter>,
}

impl DirectionFamilies {
    /// Counter clones share their atomic with the family's entry.
    fn resolve(&self, direction: &'static str) -> DirectionMetrics {
        let l = DirectionLabel { direction };
        DirectionMetrics {
            rtp_packets: self.rtp_packets.get_or_create(&l).clone(),
            rtp_bytes: self.rtp_bytes.get_or_create(&l).clone(),
            dc_messages: self.dc_messages.get_or_create(&l).clone(),
            dc_bytes: self.dc_bytes.get_or_create(&l).clone(),
            dropped: self.dropped.get_or_create(&l).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_load_follows_live_calls_and_keeps_a_worker_at_zero_after() {
        let m = Metrics::new();
        m.worker_load
            .set(&[("w1".to_string(), 2), ("w2".to_string(), 1)].into());
        m.worker_load.set(&[("w1".to_string(), 1)].into());
        let text = m.encode();
        assert!(
            text.contains(r#"realtime_relay_worker_calls_active{worker="w1"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"realtime_relay_worker_calls_active{worker="w2"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn a_drain_is_exported_with_its_start_and_time() {
        let m = Metrics::new();
        let before = m.encode();
        assert!(before.contains("realtime_relay_draining 0"), "{before}");
        assert!(before.contains("realtime_relay_drain_started_timestamp_seconds 0"));
        m.drain_started(std::time::Duration::from_secs(40));
        let text = m.encode();
        assert!(text.contains("realtime_relay_draining 1"), "{text}");
        assert!(
            text.contains("realtime_relay_drain_timeout_seconds 40"),
            "{text}"
        );
        assert!(!text.contains("realtime_relay_drain_started_timestamp_seconds 0\n"));
        // The process's standard names sit beside the prefixed ones, unprefixed.
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        assert!(!text.contains("realtime_relay_process_"), "{text}");
    }

    #[test]
    fn direction_handles_feed_the_exported_families() {
        let m = Metrics::new();
        m.client_to_upstream.rtp_packets.inc_by(3);
        m.ended(EndReason::Hangup);
        let text = m.encode();
        assert!(
            text.contains(r#"realtime_relay_rtp_packets_total{direction="client_to_upstream"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"realtime_relay_calls_ended_total{reason="hangup"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn worker_failures_are_labelled_by_worker_and_anonymous_calls_are_not_counted() {
        let m = Metrics::new();
        m.worker_failed("w1");
        m.worker_failed("w1");
        m.worker_failed("");
        m.worker_seen("w2");
        m.worker_seen("");
        m.setup_failed("upstream_status_503");
        let text = m.encode();
        assert!(
            text.contains(r#"realtime_relay_worker_failures_total{worker="w1"} 2"#),
            "{text}"
        );
        // A worker that served a call is listed before it ever fails.
        assert!(
            text.contains(r#"realtime_relay_worker_failures_total{worker="w2"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains(r#"worker="""#),
            "no series for an empty worker id: {text}"
        );
        assert!(
            text.contains(r#"realtime_relay_setup_failures_total{reason="upstream_status_503"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn every_contract_failure_code_is_exported_from_the_start() {
        let text = Metrics::new().encode();
        for code in realtime_relay_proto::ErrorCode::ALL {
            let line = format!("realtime_relay_setup_failures_total{{reason=\"{code}\"}} 0");
            assert!(text.contains(&line), "{line} missing: {text}");
        }
    }
}
