//! Envoy proxy-wasm glue for the realtime gateway. Every decision lives in
//! `realtime-filter-core`: the root context loads the configuration and forwards ticks and
//! `ListCalls` answers to its `LoadRefresh`; each HTTP context forwards its callbacks to a
//! `Flow`. Host calls are all in `host`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

mod host;
mod http;
mod metrics;

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use realtime_filter_core::host::LogLevel as CoreLevel;
use realtime_filter_core::load_refresh::LoadRefresh;
use realtime_filter_core::{relay, routing, Config};

use host::{log, Envoy, ProxyStore};
use metrics::Metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

/// What every HTTP context of one plugin configuration shares.
pub struct Runtime {
    pub config: Rc<Config>,
    pub metrics: Metrics,
}

#[derive(Default)]
struct Root {
    runtime: Option<Rc<Runtime>>,
    refresh: LoadRefresh,
}

/// Why the plugin configuration was refused (Envoy then rejects the filter).
#[derive(Debug)]
enum ConfigureError {
    Empty,
    Invalid(realtime_filter_core::ConfigError),
    Tick(proxy_wasm::types::Status),
}

impl std::fmt::Display for ConfigureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigureError::Empty => {
                f.write_str("plugin configuration is empty (set the Wasm filter's configuration)")
            }
            ConfigureError::Invalid(e) => write!(f, "{e}"),
            ConfigureError::Tick(s) => write!(f, "set_tick_period: {s:?}"),
        }
    }
}

impl Root {
    fn configure(&mut self) -> Result<(), ConfigureError> {
        let text = host::buffer(BufferType::PluginConfiguration, usize::MAX)
            .ok_or(ConfigureError::Empty)?;
        // Keys come from the VM environment (vm_config.environment_variables); never logged.
        let env = |name: &str| std::env::var(name).ok();
        let config = Config::from_json(&text, &env).map_err(ConfigureError::Invalid)?;
        let metrics = Metrics::default();
        for (kind, name) in realtime_filter_core::metrics::definitions(&config) {
            metrics.define(kind, &name);
        }
        routing::create_counters(&ProxyStore { metrics: &metrics }, &config);
        if config.load_refresh_ms > 0 {
            hostcalls::set_tick_period(Duration::from_millis(config.load_refresh_ms))
                .map_err(ConfigureError::Tick)?;
        }
        log(
            CoreLevel::Info,
            &format!("realtime filter configured: {}", config.summary()),
        );
        self.runtime = Some(Rc::new(Runtime {
            config: Rc::new(config),
            metrics,
        }));
        Ok(())
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(rt) = &self.runtime else { return };
        let body = if status_code == relay::grpc::OK {
            Some(host::buffer(BufferType::GrpcReceiveBuffer, response_size).unwrap_or_default())
        } else {
            None
        };
        let mut envoy = Envoy::new(&rt.metrics);
        self.refresh.on_grpc_response(
            &rt.config,
            &mut envoy,
            token_id,
            status_code,
            body.as_deref(),
        );
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.configure() {
            Ok(()) => true,
            Err(e) => {
                log(CoreLevel::Critical, &format!("realtime filter: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(rt) = &self.runtime else { return };
        let mut envoy = Envoy::new(&rt.metrics);
        self.refresh.on_tick(&rt.config, &mut envoy);
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        match &self.runtime {
            Some(rt) => Some(Box::new(http::Http::new(Rc::clone(rt)))),
            // Without a configuration Envoy refuses the filter; should a context still be
            // asked for, it passes everything through.
            None => Some(Box::new(PassThrough)),
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// An HTTP context that leaves every request alone.
struct PassThrough;

impl Context for PassThrough {}
impl HttpContext for PassThrough {}
