//! Relay replicas: which relay a `CreateCall` goes to, and how the hangup of that call finds
//! the same relay again.
//!
//! Measured in Envoy 1.40 (`e2e/tests/scale_out.rs`): a proxy-wasm `dispatch_grpc_call` goes
//! through Envoy's async client straight to the named cluster's load balancer. No route is
//! involved, so no route hash policy applies, and the async client passes no hash key: with
//! two relay endpoints in one cluster, `ROUND_ROBIN` alternates between them per call and
//! `RING_HASH`/`MAGLEV` pick a host at random; a hangup lands on the replica that holds the
//! call only by chance. So each replica is its own cluster (health checks, circuit breakers
//! and outlier detection stay Envoy's), the filter picks the replica for a new call, and the
//! call id names it: `rtc_<replica>_<32 hex>`. A hangup reads the replica from the id.

use realtime_relay_proto::ErrorClass;

use crate::config::Config;
use crate::error::FilterError;
use crate::relay::grpc;
use crate::routing::{add, load, store_value, SharedStore};

/// How long a replica that answered UNAVAILABLE (unreachable or draining) is skipped for new
/// calls, unless every other replica is skipped too. Envoy's health checks decide sooner
/// when the replica's cluster is empty (the dispatch then fails the same way, in microseconds).
pub const REPLICA_DOWN_MS: u64 = 5_000;

pub const RR_KEY: &str = "realtime.v1.replica_rr";

pub fn down_key(replica: &str) -> String {
    format!("realtime.v1.replica_down_until_ms.{replica}")
}

/// The replica (index into `config.replicas`) a call id names, if any.
pub fn replica_of(config: &Config, call_id: &str) -> Option<usize> {
    let id = realtime_relay_proto::call_id::replica_segment(call_id)?;
    config.replicas.iter().position(|r| r.id == id)
}

/// The cluster that holds `call_id`: the one relay cluster, or the replica named in the id.
/// An id naming no configured replica cannot exist: `call_not_found` without asking anyone.
pub fn cluster_for_call<'c>(config: &'c Config, call_id: &str) -> Result<&'c str, FilterError> {
    if config.replicas.is_empty() {
        return Ok(&config.relay_cluster);
    }
    replica_of(config, call_id)
        .and_then(|i| config.replicas.get(i))
        .map(|r| r.cluster.as_str())
        .ok_or(FilterError::CallNotFound)
}

fn is_down(store: &dyn SharedStore, id: &str, now_ms: u64) -> bool {
    load(store, &down_key(id)) > now_ms
}

/// Picks the replica for a new call, round robin across Envoy's worker threads, skipping
/// those in `tried` and, while another is available, those marked down. `None` when there are
/// no replicas or all have been tried.
pub fn pick(
    config: &Config,
    store: &dyn SharedStore,
    now_ms: u64,
    tried: &[usize],
) -> Option<usize> {
    let n = config.replicas.len();
    if n == 0 {
        return None;
    }
    let start = usize::try_from(add(store, RR_KEY, 1).wrapping_sub(1) % n as u64).unwrap_or(0);
    let mut untried = (0..n)
        .map(|k| (start + k) % n)
        .filter(|i| !tried.contains(i));
    let first = untried.clone().next()?;
    Some(
        untried
            .find(|i| {
                config
                    .replicas
                    .get(*i)
                    .is_some_and(|r| !is_down(store, &r.id, now_ms))
            })
            .unwrap_or(first),
    )
}

/// The replica could not take a new call: skip it for a while.
pub fn mark_down(store: &dyn SharedStore, replica: &str, now_ms: u64) {
    store_value(
        store,
        &down_key(replica),
        now_ms.saturating_add(REPLICA_DOWN_MS),
    );
}

/// What a failed `CreateCall` says about the replica that answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    /// Not a replica problem (success, client fault, upstream fault): no other replica.
    No,
    /// Full (RESOURCE_EXHAUSTED): another replica may have room.
    Full,
    /// Unreachable or draining (UNAVAILABLE without an `upstream_*` code): nothing was set
    /// up there; another replica should take the call, and this one is skipped for a while.
    Down,
}

pub fn failover(status: u32, message: Option<&str>) -> Failover {
    let class = realtime_relay_proto::error_code::class_of_message(message.unwrap_or(""));
    match status {
        grpc::UNAVAILABLE if class != Some(ErrorClass::Upstream) => Failover::Down,
        grpc::RESOURCE_EXHAUSTED => Failover::Full,
        _ => Failover::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::MemoryStore;
    use realtime_relay_proto::call_id::new as call_id;

    fn config() -> Config {
        let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
        v.as_object_mut().unwrap().remove("relay_cluster");
        v["relay_replicas"] = serde_json::json!([
            {"id": "r0", "cluster": "relay_r0"},
            {"id": "r1", "cluster": "relay_r1"},
            {"id": "r2", "cluster": "relay_r2"}
        ]);
        Config::from_json(v.to_string().as_bytes(), &crate::config::tests::env).unwrap()
    }

    #[test]
    fn call_ids_name_the_replica_and_hangups_find_it() {
        let c = config();
        let id = call_id(&[0xab; 16], Some("r1"));
        assert_eq!(id.len(), 4 + 3 + 32);
        assert!(id.starts_with("rtc_r1_abab"));
        assert!(crate::classify::is_valid_call_id(&id));
        assert_eq!(cluster_for_call(&c, &id), Ok("relay_r1"));
        // ids naming no replica cannot exist on any
        for bad in [
            "rtc_abababababababababababababababab",
            "rtc_r9_abababababababababababababababab",
            "rtc__abab",
        ] {
            assert_eq!(cluster_for_call(&c, bad), Err(FilterError::CallNotFound));
        }
        // one relay cluster: every id goes there
        let single = crate::config::tests::sample();
        assert_eq!(cluster_for_call(&single, "rtc_r1_x"), Ok("relay"));
        assert_eq!(call_id(&[0; 16], None).len(), 36);
    }

    #[test]
    fn replicas_take_turns_and_down_ones_are_skipped() {
        let c = config();
        let s = MemoryStore::default();
        let got: Vec<usize> = (0..6).map(|_| pick(&c, &s, 0, &[]).unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
        mark_down(&s, "r1", 1_000);
        let got: Vec<usize> = (0..4).map(|_| pick(&c, &s, 2_000, &[]).unwrap()).collect();
        assert!(!got.contains(&1), "{got:?}");
        // after the down time it is back
        let later = 1_000 + REPLICA_DOWN_MS;
        let got: Vec<usize> = (0..3).map(|_| pick(&c, &s, later, &[]).unwrap()).collect();
        assert!(got.contains(&1), "{got:?}");
        // failover: never a tried one; all tried → none; all down → still one
        for _ in 0..3 {
            assert_eq!(pick(&c, &s, 0, &[0, 2]), Some(1));
        }
        assert_eq!(pick(&c, &s, 0, &[0, 1, 2]), None);
        for r in ["r0", "r1", "r2"] {
            mark_down(&s, r, 0);
        }
        assert!(pick(&c, &s, 1, &[]).is_some());
        assert_eq!(pick(&crate::config::tests::sample(), &s, 0, &[]), None);
    }

    #[test]
    fn only_replica_faults_fail_over() {
        assert_eq!(failover(14, None), Failover::Down);
        assert_eq!(failover(14, Some("draining: bye")), Failover::Down);
        assert_eq!(
            failover(
                14,
                Some("upstream connect error or disconnect/reset before headers")
            ),
            Failover::Down
        );
        assert_eq!(failover(14, Some("upstream_unreachable: x")), Failover::No);
        assert_eq!(failover(8, Some("call_limit: 100")), Failover::Full);
        assert_eq!(failover(3, Some("invalid_sdp: x")), Failover::No);
        assert_eq!(failover(4, None), Failover::No);
        assert_eq!(failover(0, None), Failover::No);
    }
}
