//! The proxy-wasm host behind `realtime_filter_core::host`: every host call of the filter is
//! in this file. Errors from the host are returned or logged, never panicked on.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel as WasmLevel, MapType};
use realtime_filter_core::host::{DispatchFailed, GrpcCall, Host, HttpHost, LogLevel};
use realtime_filter_core::routing::{CasMismatch, SharedStore};
use realtime_filter_core::shared_size::{set_accounted, SHARED_DATA_BYTES, SHARED_DATA_KEYS};
use realtime_filter_core::HttpReply;

use crate::metrics::Metrics;

pub fn log(level: LogLevel, msg: &str) {
    let level = match level {
        LogLevel::Debug => WasmLevel::Debug,
        LogLevel::Info => WasmLevel::Info,
        LogLevel::Warn => WasmLevel::Warn,
        LogLevel::Error => WasmLevel::Error,
        LogLevel::Critical => WasmLevel::Critical,
    };
    let _ = hostcalls::log(level, msg);
}

pub fn buffer(kind: BufferType, max: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, max).ok().flatten()
}

/// proxy-wasm shared data (one store per VM id, shared by Envoy's worker threads). Every
/// write keeps the `realtime_filter.shared_data.{bytes,keys}` gauges true.
pub struct ProxyStore<'a> {
    pub metrics: &'a Metrics,
}

impl SharedStore for ProxyStore<'_> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        let change = set_accounted(&RawStore, key, value, cas)?;
        self.metrics.add(SHARED_DATA_BYTES, change.bytes);
        self.metrics.add(SHARED_DATA_KEYS, change.keys);
        Ok(())
    }
}

/// The host calls themselves, unaccounted.
struct RawStore;

impl SharedStore for RawStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }
}

/// Envoy, as seen from one context of this plugin.
pub struct Envoy<'a> {
    pub metrics: &'a Metrics,
    store: ProxyStore<'a>,
}

impl<'a> Envoy<'a> {
    pub fn new(metrics: &'a Metrics) -> Self {
        Envoy {
            metrics,
            store: ProxyStore { metrics },
        }
    }
}

impl Host for Envoy<'_> {
    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, DispatchFailed> {
        hostcalls::dispatch_grpc_call(
            call.cluster,
            call.service,
            call.method,
            call.metadata(),
            Some(call.message),
            Duration::from_millis(call.timeout_ms),
        )
        .map_err(|e| DispatchFailed(format!("{e:?}")))
    }

    fn cancel_grpc(&mut self, token: u32) {
        let _ = hostcalls::cancel_grpc_call(token);
    }

    fn store(&self) -> &dyn SharedStore {
        &self.store
    }

    /// 0 if the host cannot tell.
    fn now_ms(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// From the host's CSPRNG: on wasm32-wasip1 getrandom uses WASI `random_get`.
    fn random16(&mut self) -> Option<[u8; 16]> {
        let mut b = [0u8; 16];
        getrandom::fill(&mut b).ok().map(|_| b)
    }

    fn increment(&self, name: &str) {
        self.metrics.inc(name);
    }

    fn record(&self, name: &str, value: u64) {
        self.metrics.record(name, value);
    }

    fn count_error(&self, code: &str) {
        self.metrics.error(code);
    }

    fn log(&self, level: LogLevel, message: &str) {
        log(level, message);
    }
}

impl HttpHost for Envoy<'_> {
    fn request_header(&self, name: &str) -> Option<String> {
        hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
            .ok()
            .flatten()
    }

    fn request_body(&self, max: usize) -> Option<Vec<u8>> {
        buffer(BufferType::HttpRequestBody, max)
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        hostcalls::get_property(path.to_vec()).ok().flatten()
    }

    fn send_reply(&mut self, reply: &HttpReply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let body = if reply.body.is_empty() {
            None
        } else {
            Some(reply.body.as_slice())
        };
        if let Err(e) = hostcalls::send_http_response(u32::from(reply.status), headers, body) {
            log(
                LogLevel::Error,
                &format!("send_http_response failed: {e:?}"),
            );
        }
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        if let Err(e) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, value) {
            log(
                LogLevel::Error,
                &format!("setting request header {name} failed: {e:?}"),
            );
        }
    }

    fn resume_request(&mut self) {
        if let Err(e) = hostcalls::resume_http_request() {
            log(
                LogLevel::Error,
                &format!("resume_http_request failed: {e:?}"),
            );
        }
    }
}
