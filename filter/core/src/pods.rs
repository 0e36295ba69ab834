//! Relay pods: relay replicas that come and go (`kubectl scale`, an autoscaler) with no
//! per-replica configuration in the gateway.
//!
//! Creates go to the relay Service's cluster (`relay_cluster`), which Envoy fills from
//! Kubernetes and balances. Each relay names itself in the ids of the calls it sets up
//! (`rtc_<token>_<32 hex>`, [`realtime_relay_proto::replica_token`]): its pod address and an
//! HMAC tag under a key the relays and the gateway share. A hangup reads the address from
//! the id, checks the tag, and goes to the pods cluster (`relay_pods.cluster`, an
//! `ORIGINAL_DST` cluster with `use_http_header`) with [`ORIGINAL_DST_HEADER`] as gRPC
//! initial metadata, which Envoy's async gRPC client sends as a request header that the
//! cluster's load balancer reads (measured in `e2e/tests/relay_pods.rs`).
//!
//! The address is client input until the tag verifies: an id whose tag does not verify is
//! a call that cannot exist (`call_not_found`, nothing dispatched), or a forged id would make
//! Envoy connect wherever a client chose.

use std::net::SocketAddr;

use realtime_relay_proto::call_id;
use realtime_relay_proto::replica_token::ReplicaKey;

/// The header Envoy's `ORIGINAL_DST` load balancer reads when `use_http_header` is set.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

/// Most relay pods one load refresh asks (the relay reports at most as many).
pub const MAX_PODS: usize = 64;

/// The validated `relay_pods` setting.
#[derive(Debug, Clone)]
pub struct Pods {
    /// The `ORIGINAL_DST` cluster that reaches any pod by address.
    pub cluster: String,
    /// The environment variable the key came from (for diagnostics; never the key).
    pub key_env: String,
    key: ReplicaKey,
}

impl Pods {
    pub fn new(cluster: String, key_env: String, key: ReplicaKey) -> Self {
        Pods {
            cluster,
            key_env,
            key,
        }
    }

    /// The pod that holds `call_id`, when the id names one under our key.
    pub fn owner(&self, call_id: &str) -> Option<SocketAddr> {
        self.key.open(call_id::replica_segment(call_id)?)
    }

    /// Whether `named` (the id a relay returned for a new call) names a pod under our key
    /// and keeps the random part of `sent` (the id the filter asked for): anything else
    /// would be a call whose hangup cannot find it.
    pub fn accepts(&self, named: &str, sent: &str) -> bool {
        let same_random = match (
            call_id::random_part(named),
            call_id::plain_random_part(sent),
        ) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        };
        same_random && self.owner(named).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(secret: &[u8]) -> Pods {
        Pods::new(
            "relay_pods".into(),
            "K".into(),
            ReplicaKey::new(secret).unwrap(),
        )
    }

    #[test]
    fn owner_is_the_address_in_a_verified_token_only() {
        let p = pods(&[b'7'; 32]);
        let addr: SocketAddr = "10.1.2.3:50051".parse().unwrap();
        let token = ReplicaKey::new(&[b'7'; 32]).unwrap().mint(addr);
        let plain = call_id::new(&[0xab; 16], None);
        let named = call_id::with_replica(&plain, &token).unwrap();
        assert_eq!(p.owner(&named), Some(addr));
        assert!(p.accepts(&named, &plain));
        // Another random part, a plain id, another key's token: not ours.
        assert!(!p.accepts(&named, &call_id::new(&[0xcd; 16], None)));
        assert_eq!(p.owner(&plain), None);
        assert!(!p.accepts(&plain, &plain));
        let other = pods(&[b'8'; 32]);
        assert_eq!(other.owner(&named), None);
        // A forged token naming a chosen address, tag guessed: refused.
        let forged_token = {
            let mut t = token.clone();
            let last = t.pop().unwrap();
            t.push(if last == 'A' { 'B' } else { 'A' });
            t
        };
        let forged = call_id::with_replica(&plain, &forged_token).unwrap();
        assert_eq!(p.owner(&forged), None);
    }

    #[test]
    fn ipv6_pods_are_named_too() {
        let p = pods(&[b'9'; 40]);
        let addr: SocketAddr = "[fd00::1:2]:50051".parse().unwrap();
        let token = ReplicaKey::new(&[b'9'; 40]).unwrap().mint(addr);
        let named = call_id::with_replica(&call_id::new(&[1; 16], None), &token).unwrap();
        assert_eq!(p.owner(&named), Some(addr));
        assert!(crate::classify::is_valid_call_id(&named));
    }
}
