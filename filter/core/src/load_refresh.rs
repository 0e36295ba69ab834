//! The periodic load refresh: on a tick, one `ListCalls` per relay cluster; when every one
//! has answered (or failed), the workers' outstanding counts become the live-call counts
//! summed over the relays that answered. With relay pods (`relay_pods`), the first answer
//! (from any pod, through `relay_cluster`) lists every pod, and each other pod is then asked
//! through the pods cluster, so the sum covers pods that no configuration names.
//!
//! Every Envoy worker thread ticks; one refresh per period across all of them is claimed
//! with a compare-and-swap on a shared timestamp.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::Config;
use crate::host::{GrpcCall, Host, LogLevel};
use crate::{metrics, relay, routing};

/// Shared-store key of the last refresh's start (ms since the epoch, little endian).
pub const REFRESH_KEY: &str = "realtime.v1.load_refresh_at_ms";

/// One `ListCalls` round in flight.
#[derive(Debug, Default)]
struct Round {
    pending: Vec<u32>,
    live: HashMap<String, u32>,
    live_principals: HashMap<String, u32>,
    answered: usize,
    /// With relay pods: whether the other pods have been asked (once per round).
    fanned_out: bool,
}

/// The refresh state of one root context.
#[derive(Debug, Default)]
pub struct LoadRefresh {
    round: Option<Round>,
    /// A relay without a pod name was reported once (the setting stays wrong until a
    /// restart; once per VM is enough).
    warned_unnamed: bool,
}

impl LoadRefresh {
    /// A tick: starts a round unless one is in flight or another thread started one within
    /// this period.
    pub fn on_tick(&mut self, config: &Config, host: &mut dyn Host) {
        if self.round.is_some() || config.load_refresh_ms == 0 {
            return;
        }
        let now = host.now_ms();
        let (value, cas) = host.store().get(REFRESH_KEY);
        let last = value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        if now.saturating_sub(last) < config.load_refresh_ms.saturating_mul(9) / 10 {
            return;
        }
        if host
            .store()
            .set(REFRESH_KEY, &now.to_le_bytes(), cas)
            .is_err()
        {
            return;
        }
        let message = relay::encode_list();
        let clusters: Vec<&str> = if config.replicas.is_empty() {
            vec![config.relay_cluster.as_str()]
        } else {
            config.replicas.iter().map(|r| r.cluster.as_str()).collect()
        };
        let mut round = Round::default();
        for cluster in clusters {
            if let Some(token) = dispatch_list(config, host, cluster, "", &message) {
                round.pending.push(token);
            }
        }
        if round.pending.is_empty() {
            host.increment(metrics::LOAD_REFRESH_FAILED);
        } else {
            self.round = Some(round);
        }
    }

    /// A gRPC answer reached the root context; ignored unless it belongs to the round.
    pub fn on_grpc_response(
        &mut self,
        config: &Config,
        host: &mut dyn Host,
        token: u32,
        status: u32,
        body: Option<&[u8]>,
    ) {
        let Some(round) = &mut self.round else {
            return;
        };
        let Some(pos) = round.pending.iter().position(|t| *t == token) else {
            return;
        };
        round.pending.swap_remove(pos);
        let listed = if status == relay::grpc::OK {
            relay::decode_list(body.unwrap_or(&[]))
        } else {
            None
        };
        match listed {
            Some(l) => {
                round.answered += 1;
                for (w, n) in &l.live {
                    let e = round.live.entry(w.clone()).or_insert(0);
                    *e = e.saturating_add(*n);
                }
                for (p, n) in &l.live_principals {
                    let e = round.live_principals.entry(p.clone()).or_insert(0);
                    *e = e.saturating_add(*n);
                }
                if config.pods.is_some() && !round.fanned_out {
                    round.fanned_out = true;
                    if l.replica_addr.is_empty() {
                        if !self.warned_unnamed {
                            self.warned_unnamed = true;
                            host.log(
                                LogLevel::Warn,
                                "relay_pods is set but the relay's ListCalls names no replica: start relays with --replica-addr and --peers, or load counts cover one pod only",
                            );
                        }
                    } else {
                        ask_other_pods(config, host, round, &l);
                    }
                }
            }
            None => host.log(
                LogLevel::Debug,
                &format!("ListCalls load refresh failed with gRPC status {status}"),
            ),
        }
        if !round.pending.is_empty() {
            return;
        }
        let Some(done) = self.round.take() else {
            return;
        };
        // A relay that did not answer holds no calls we can count; the others' counts stand.
        if done.answered > 0 {
            routing::apply_live_counts(host.store(), config, &done.live);
            crate::limits::apply_live_principals(host.store(), &done.live_principals);
            host.increment(metrics::LOAD_REFRESH);
        } else {
            host.increment(metrics::LOAD_REFRESH_FAILED);
        }
    }
}

/// One `ListCalls`, to `cluster` (and the pod `original_dst`, if any); its token.
fn dispatch_list(
    config: &Config,
    host: &mut dyn Host,
    cluster: &str,
    original_dst: &str,
    message: &[u8],
) -> Option<u32> {
    let call = GrpcCall {
        cluster,
        service: relay::SERVICE_NAME,
        method: relay::METHOD_LIST,
        call_id: "",
        request_id: "",
        message,
        timeout_ms: config.hangup_timeout_ms,
        original_dst,
    };
    match host.dispatch_grpc(&call) {
        Ok(token) => Some(token),
        Err(e) => {
            host.log(
                LogLevel::Debug,
                &format!(
                    "ListCalls dispatch to '{cluster}' {original_dst} failed: {}",
                    e.0
                ),
            );
            None
        }
    }
}

/// Asks every pod the first answer lists, but the one that gave it, through the pods
/// cluster. Entries that are not socket addresses are skipped (a relay's list, but an
/// address is all the pods cluster may be given).
fn ask_other_pods(config: &Config, host: &mut dyn Host, round: &mut Round, first: &relay::Listed) {
    let Some(pods) = &config.pods else {
        return;
    };
    let answered: Option<SocketAddr> = first.replica_addr.parse().ok();
    let message = relay::encode_list();
    let others = first
        .replicas
        .iter()
        .filter_map(|r| r.parse::<SocketAddr>().ok())
        .filter(|a| Some(*a) != answered)
        .take(crate::pods::MAX_PODS);
    for addr in others {
        if let Some(token) = dispatch_list(config, host, &pods.cluster, &addr.to_string(), &message)
        {
            round.pending.push(token);
        }
    }
}
