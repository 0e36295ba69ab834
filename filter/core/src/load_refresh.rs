//! The periodic load refresh: on a tick, one `ListCalls` per relay cluster; when every one
//! has answered (or failed), the workers' outstanding counts become the live-call counts
//! summed over the relays that answered.
//!
//! Every Envoy worker thread ticks; one refresh per period across all of them is claimed
//! with a compare-and-swap on a shared timestamp.

use std::collections::HashMap;

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
    answered: usize,
}

/// The refresh state of one root context.
#[derive(Debug, Default)]
pub struct LoadRefresh {
    round: Option<Round>,
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
            let call = GrpcCall {
                cluster,
                method: relay::METHOD_LIST,
                call_id: "",
                request_id: "",
                message: &message,
                timeout_ms: config.hangup_timeout_ms,
            };
            match host.dispatch_grpc(&call) {
                Ok(token) => round.pending.push(token),
                Err(e) => host.log(
                    LogLevel::Debug,
                    &format!("ListCalls dispatch to '{cluster}' failed: {}", e.0),
                ),
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
        let counts = if status == relay::grpc::OK {
            relay::decode_live_counts(body.unwrap_or(&[]))
        } else {
            None
        };
        match counts {
            Some(c) => {
                round.answered += 1;
                for (w, n) in c {
                    let e = round.live.entry(w).or_insert(0);
                    *e = e.saturating_add(n);
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
            host.increment(metrics::LOAD_REFRESH);
        } else {
            host.increment(metrics::LOAD_REFRESH_FAILED);
        }
    }
}
