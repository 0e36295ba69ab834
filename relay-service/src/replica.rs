//! This relay as one of several replicas (pods that come and go): the name it writes
//! into the ids of its calls, and the other replicas it knows of.
//!
//! Gateways send a call's hangup to the address named in its id
//! ([`realtime_relay_proto::replica_token`]), and sum the load of every replica this
//! relay lists in `ListCallsResponse.replicas`. The list comes from names that resolve to
//! all replicas (a Kubernetes headless Service), resolved again every few seconds so that
//! `kubectl scale` needs no configuration change anywhere.

use crate::error::SetupError;
use crate::ids;
use realtime_relay_proto::call_id::{self, Kind};
use realtime_relay_proto::replica_token::ReplicaKey;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most replica addresses kept and reported: far above any real relay fleet behind one
/// gateway, and it bounds the gateway's fan-out.
pub const MAX_REPLICAS: usize = 64;

/// How long one name's resolution may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The name this relay writes into call ids.
#[derive(Clone, Debug)]
pub struct ReplicaIdentity {
    addr: SocketAddr,
    token: String,
}

impl ReplicaIdentity {
    pub fn new(addr: SocketAddr, key: &ReplicaKey) -> Self {
        ReplicaIdentity {
            addr,
            token: key.mint(addr),
        }
    }

    /// The address gateways reach this relay's gRPC at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The id of a call of `kind` set up here: `rtc_<token>_<32 hex>` (or `live_…`), from
    /// the caller's plain id (`rtc_<32 hex>`, `live_<32 hex>`) or, when it sent none, a new
    /// one of `kind`. Any other caller-chosen id is refused: it could not carry this
    /// replica's name and the gateway would lose the call. (The caller's id was checked
    /// against `kind` first: [`ids::check_requested`].)
    pub fn name_call(&self, requested: &str, kind: Kind) -> Result<String, SetupError> {
        let plain = if requested.is_empty() {
            ids::new_call_id_of(kind)
        } else {
            requested.to_owned()
        };
        call_id::with_replica(&plain, &self.token).ok_or(SetupError::InvalidCallId)
    }
}

/// The replicas this relay knows of, itself included.
pub struct Peers {
    own: SocketAddr,
    /// Last successful resolution of each name: a name that fails to resolve keeps what
    /// it resolved to before, so one DNS hiccup does not hide replicas.
    by_name: Mutex<BTreeMap<String, Vec<SocketAddr>>>,
}

impl Peers {
    pub fn new(own: SocketAddr) -> Self {
        Peers {
            own,
            by_name: Mutex::new(BTreeMap::new()),
        }
    }

    /// Every known replica as "ip:port", sorted, this relay first, at most [`MAX_REPLICAS`].
    pub fn snapshot(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        if let Ok(by_name) = self.by_name.lock() {
            for addr in by_name.values().flatten() {
                if *addr != self.own {
                    set.insert(*addr);
                }
            }
        }
        std::iter::once(self.own)
            .chain(set)
            .take(MAX_REPLICAS)
            .map(|a| a.to_string())
            .collect()
    }

    /// Records one resolution of `name`; returns whether the set of replicas changed.
    pub fn record(&self, name: &str, mut addrs: Vec<SocketAddr>) -> bool {
        addrs.sort();
        addrs.dedup();
        addrs.truncate(MAX_REPLICAS);
        let Ok(mut by_name) = self.by_name.lock() else {
            return false;
        };
        by_name.insert(name.to_owned(), addrs.clone()) != Some(addrs)
    }

    /// Resolves every name now, then again every `interval`, for as long as the returned
    /// task runs.
    pub fn spawn_refresh(
        self: Arc<Self>,
        names: Vec<String>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                for name in &names {
                    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(name)).await
                    {
                        Ok(Ok(addrs)) => {
                            if self.record(name, addrs.collect()) {
                                tracing::info!(peers = ?self.snapshot(), name, "replica set changed");
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(name, error = %e, "cannot resolve --peers name; keeping what it resolved to before")
                        }
                        Err(_) => tracing::warn!(
                            name,
                            "resolving --peers name timed out; keeping what it resolved to before"
                        ),
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ReplicaKey {
        ReplicaKey::new(&[b'k'; 32]).unwrap()
    }

    #[test]
    fn calls_are_named_after_the_replica() {
        let addr: SocketAddr = "10.0.0.5:50051".parse().unwrap();
        let me = ReplicaIdentity::new(addr, &key());
        let id = me
            .name_call("rtc_0123456789abcdef0123456789abcdef", Kind::Realtime)
            .unwrap();
        assert!(call_id::is_valid(&id), "{id}");
        assert!(id.ends_with("_0123456789abcdef0123456789abcdef"));
        let token = call_id::replica_segment(&id).unwrap();
        assert_eq!(key().open(token), Some(addr));
        let fresh = me.name_call("", Kind::Realtime).unwrap();
        assert_eq!(
            key().open(call_id::replica_segment(&fresh).unwrap()),
            Some(addr)
        );
        // A GPT-Live call keeps its prefix: its client gets its session id back unchanged.
        let live = me.name_call("", Kind::Live).unwrap();
        assert!(
            live.starts_with("live_") && call_id::is_valid(&live),
            "{live}"
        );
        assert_eq!(
            key().open(call_id::replica_segment(&live).unwrap()),
            Some(addr)
        );
        let named = me
            .name_call("live_0123456789abcdef0123456789abcdef", Kind::Live)
            .unwrap();
        assert!(named.starts_with("live_") && named.ends_with("_0123456789abcdef0123456789abcdef"));
        for refused in [
            "rtc_custom-id-1",
            "rtc_r1_0123456789abcdef0123456789abcdef",
            &id,
        ] {
            assert!(
                matches!(
                    me.name_call(refused, Kind::Realtime),
                    Err(SetupError::InvalidCallId)
                ),
                "{refused}"
            );
        }
    }

    #[test]
    fn peers_list_self_first_and_survive_a_failed_name() {
        let own: SocketAddr = "10.0.0.5:50051".parse().unwrap();
        let peers = Peers::new(own);
        assert_eq!(peers.snapshot(), vec!["10.0.0.5:50051"]);
        let b: SocketAddr = "10.0.0.9:50051".parse().unwrap();
        let a: SocketAddr = "10.0.0.2:50051".parse().unwrap();
        assert!(peers.record("relay-pods:50051", vec![b, own, a, b]));
        assert!(!peers.record("relay-pods:50051", vec![a, b, own]));
        assert_eq!(
            peers.snapshot(),
            vec!["10.0.0.5:50051", "10.0.0.2:50051", "10.0.0.9:50051"]
        );
        let many = (0..200u16)
            .map(|p| SocketAddr::from(([10, 1, 0, 1], 1000 + p)))
            .collect();
        peers.record("big:1", many);
        assert_eq!(peers.snapshot().len(), MAX_REPLICAS);
    }
}
