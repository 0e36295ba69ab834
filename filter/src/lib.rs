//! Envoy proxy-wasm glue for the realtime gateway. All decisions live in
//! `realtime-filter-core`; this crate reads headers and bodies, dispatches gRPC calls to the
//! relay, and sends replies.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

mod host;
mod http;
mod metrics;

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
    /// Outstanding ListCalls token.
    refresh_token: Option<u32>,
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
            metrics::LOAD_REFRESH,
            metrics::LOAD_REFRESH_FAILED,
        ] {
            metrics.define(MetricType::Counter, name);
        }
        metrics.define(MetricType::Histogram, metrics::SETUP_LATENCY);
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
        log(
            LogLevel::Info,
            &format!(
                "realtime filter configured: relay cluster '{}', {} models, {} pools, {workers} workers ({keyed} with a key from the VM environment)",
                config.relay_cluster,
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
        if self.refresh_token != Some(token_id) {
            return;
        }
        self.refresh_token = None;
        let Some(rt) = &self.runtime else { return };
        let counts = if status_code == relay::grpc::OK {
            host::buffer(BufferType::GrpcReceiveBuffer, response_size)
                .or(Some(Vec::new()))
                .and_then(|b| relay::decode_live_counts(&b))
        } else {
            None
        };
        match counts {
            Some(c) => {
                routing::apply_live_counts(&ProxyStore, &rt.config, &c);
                rt.metrics.inc(metrics::LOAD_REFRESH);
            }
            None => {
                rt.metrics.inc(metrics::LOAD_REFRESH_FAILED);
                log(
                    LogLevel::Debug,
                    &format!("ListCalls load refresh failed with gRPC status {status_code}"),
                );
            }
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
        if self.refresh_token.is_some() {
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
        match hostcalls::dispatch_grpc_call(
            &rt.config.relay_cluster,
            relay::SERVICE_NAME,
            relay::METHOD_LIST,
            Vec::new(),
            Some(&msg),
            Duration::from_millis(rt.config.hangup_timeout_ms),
        ) {
            Ok(token) => self.refresh_token = Some(token),
            Err(e) => {
                rt.metrics.inc(metrics::LOAD_REFRESH_FAILED);
                log(
                    LogLevel::Debug,
                    &format!("ListCalls dispatch failed: {e:?}"),
                );
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(http::Http::new(self.runtime.clone())))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
