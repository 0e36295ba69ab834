//! Small wrappers over proxy-wasm host calls that return errors instead of panicking where
//! the SDK allows it.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, LogLevel, MapType};
use realtime_filter_core::routing::{CasMismatch, SharedStore};
use realtime_filter_core::HttpReply;

pub fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

/// Wall-clock milliseconds since the Unix epoch (0 if the host cannot tell).
pub fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// 16 bytes from the host's CSPRNG (WASI `random_get`).
pub fn random16() -> Option<[u8; 16]> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).ok().map(|_| b)
}

pub fn request_header(name: &str) -> Option<String> {
    hostcalls::get_map_value(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

pub fn buffer(kind: BufferType, size: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, size).ok().flatten()
}

pub fn send(reply: &HttpReply) {
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

/// proxy-wasm shared data (one store per VM id, shared by Envoy's worker threads).
pub struct ProxyStore;

impl SharedStore for ProxyStore {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        hostcalls::get_shared_data(key).unwrap_or((None, None))
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), CasMismatch> {
        hostcalls::set_shared_data(key, Some(value), cas).map_err(|_| CasMismatch)
    }
}
