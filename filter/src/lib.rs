//! Envoy proxy-wasm glue for the realtime gateway. All decisions live in
//! `realtime-filter-core`; this crate reads headers and bodies, dispatches gRPC calls to the
//! relay, and sends replies.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

mod host;
mod http;
mod metrics;

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MetricType};
use realtime_filter_core::{relay, routing, Config};

use host::{log, now_ms, ProxyStore};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// What every HTTP context of one plugin configuration shares.
pub struct Runtime {
    pub config: Config,
    pub metrics: Metrics,
}

#[derive(Default)]
struct Root {
    runtime: Option<Rc<Runtime>>,
    /// The ListCalls round in flight (one call per relay cluster).
    refresh: Option<Refresh>,
}

/// One ListCalls round: live calls per worker summed over the relays that answered.
#[derive(Default)]
struct Refresh {
    pending: Vec<u32>,
    live: HashMap<String, u32>,
    answered: usize,
}

const REFRESH_KEY: &str = "realtime.v1.load_refresh_at_ms";

impl Root {
    fn configure(&mut self) -> Result<(), String> {
        let text = host::buffer(BufferType::PluginConfiguration, usize::MAX)
            .ok_or("plugin configuration is empty (set the Wasm filter's configuration)")?;
        // Keys come from the VM environment (vm_config.environment_variables); never logged.
        let env = |name: &str| std::env::var(name).ok();
        let config = Config::from_json(&text, &env).map_err(|e| e.to_string())?;
        let metrics = Metrics::default();
        for name in [
            metrics::REQ_CREATED,
            metrics::REQ_UPSTREAM_REJECTED,
            metrics::REQ_FAILED,
            metrics::REQ_HANGUP,
            metrics::REQ_PASSED_THROUGH,
            metrics::LOAD_REFRESH,
            metrics::LOAD_REFRESH_FAILED,
        ] {
            metrics.define(MetricType::Counter, name);
        }
        metrics.define(MetricType::Histogram, metrics::SETUP_LATENCY);
        for r in &config.replicas {
            metrics.define(MetricType::Counter, &metrics::replica(&r.id, "creates"));
            metrics.define(MetricType::Counter, &metrics::replica(&r.id, "failovers"));
        }
        let store = ProxyStore;
        for (_, w) in config.workers() {
            metrics.define(MetricType::Counter, &metrics::setups(&w.id, "ok"));
            metrics.define(MetricType::Counter, &metrics::setups(&w.id, "failed"));
            metrics.define(MetricType::Counter, &metrics::ejections(&w.id));
            // Create the counter keys so later CAS updates never race on creation.
            let key = routing::outstanding_key(&w.id);
            if store.get_value(&key).0.is_none() {
                routing::store_value(&store, &key, 0);
            }
        }
        if config.load_refresh_ms > 0 {
            hostcalls::set_tick_period(Duration::from_millis(config.load_refresh_ms))
                .map_err(|e| format!("set_tick_period: {e:?}"))?;
        }
        let workers = config.workers().count();
        let keyed = config.workers().filter(|(_, w)| w.key.is_some()).count();
        let relay = if config.replicas.is_empty() {
            format!("relay cluster '{}'", config.relay_cluster)
        } else {
            let names: Vec<String> = config
                .replicas
                .iter()
                .map(|r| format!("{}={}", r.id, r.cluster))
                .collect();
            format!("relay replicas [{}]", names.join(", "))
        };
        log(
            LogLevel::Info,
            &format!(
                "realtime filter configured: {relay}, {} models, {} pools, {workers} workers ({keyed} with a key from the VM environment)",
                config.models.len(),
                config.pools.len()
            ),
        );
        self.runtime = Some(Rc::new(Runtime { config, metrics }));
        Ok(())
    }
}

trait GetValue {
    fn get_value(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>);
}

impl GetValue for ProxyStore {
    fn get_value(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        routing::SharedStore::get(self, key)
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(refresh) = &mut self.refresh else {
            return;
        };
        let Some(pos) = refresh.pending.iter().position(|t| *t == token_id) else {
            return;
        };
        refresh.pending.swap_remove(pos);
        let counts = if status_code == relay::grpc::OK {
            host::buffer(BufferType::GrpcReceiveBuffer, response_size)
                .or(Some(Vec::new()))
                .and_then(|b| relay::decode_live_counts(&b))
        } else {
            None
        };
        match counts {
            Some(c) => {
                refresh.answered += 1;
                for (w, n) in c {
                    let e = refresh.live.entry(w).or_insert(0);
                    *e = e.saturating_add(n);
                }
            }
            None => log(
                LogLevel::Debug,
                &format!("ListCalls load refresh failed with gRPC status {status_code}"),
            ),
        }
        if !refresh.pending.is_empty() {
            return;
        }
        let Some(done) = self.refresh.take() else {
            return;
        };
        let Some(rt) = &self.runtime else { return };
        // A relay that did not answer holds no calls we can count; the others' counts stand.
        if done.answered > 0 {
            routing::apply_live_counts(&ProxyStore, &rt.config, &done.live);
            rt.metrics.inc(metrics::LOAD_REFRESH);
        } else {
            rt.metrics.inc(metrics::LOAD_REFRESH_FAILED);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.configure() {
            Ok(()) => true,
            Err(e) => {
                log(LogLevel::Critical, &format!("realtime filter: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(rt) = &self.runtime else { return };
        if self.refresh.is_some() {
            return;
        }
        // One refresh per period across all worker threads: claim the period with CAS.
        let store = ProxyStore;
        let now = now_ms();
        let (value, cas) = store.get_value(REFRESH_KEY);
        let last = value
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        if now.saturating_sub(last) < rt.config.load_refresh_ms.saturating_mul(9) / 10 {
            return;
        }
        if routing::SharedStore::set(&store, REFRESH_KEY, &now.to_le_bytes(), cas).is_err() {
            return;
        }
        let msg = relay::encode_list();
        let clusters: Vec<&str> = if rt.config.replicas.is_empty() {
            vec![rt.config.relay_cluster.as_str()]
        } else {
            rt.config
                .replicas
                .iter()
                .map(|r| r.cluster.as_str())
                .collect()
        };
        let mut refresh = Refresh::default();
        for cluster in clusters {
            match hostcalls::dispatch_grpc_call(
                cluster,
                relay::SERVICE_NAME,
                relay::METHOD_LIST,
                Vec::new(),
                Some(&msg),
                Duration::from_millis(rt.config.hangup_timeout_ms),
            ) {
                Ok(token) => refresh.pending.push(token),
                Err(e) => log(
                    LogLevel::Debug,
                    &format!("ListCalls dispatch to '{cluster}' failed: {e:?}"),
                ),
            }
        }
        if refresh.pending.is_empty() {
            rt.metrics.inc(metrics::LOAD_REFRESH_FAILED);
        } else {
            self.refresh = Some(refresh);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(http::Http::new(self.runtime.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
