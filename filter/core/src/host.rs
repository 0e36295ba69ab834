//! What the filter's logic needs from its host, as traits: the proxy-wasm glue implements
//! them over Envoy's host calls, `fake_host` over plain memory for tests.
//!
//! The logic acts only through these methods, so the whole request lifecycle (failover,
//! ejection, the worker's verdict, every error reply) runs natively in table tests.

use realtime_relay_proto::metadata;

use crate::reply::HttpReply;
use crate::routing::SharedStore;

/// What a callback tells Envoy to do with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

/// A gRPC call to a relay cluster. `message` may hold a key: never log it.
#[derive(Debug, Clone, Copy)]
pub struct GrpcCall<'a> {
    pub cluster: &'a str,
    /// The gRPC service (the relay's, or the rate-limit service's).
    pub service: &'static str,
    pub method: &'static str,
    pub call_id: &'a str,
    pub request_id: &'a str,
    pub message: &'a [u8],
    pub timeout_ms: u64,
    /// The one endpoint of an `ORIGINAL_DST` cluster to reach ("ip:port"), sent as
    /// `x-envoy-original-dst-host`; empty for a balanced cluster. Only ever an address
    /// the filter verified (see `crate::pods`): never client input.
    pub original_dst: &'a str,
}

impl GrpcCall<'_> {
    /// The call's gRPC metadata: the contract's `x-call-id` and `x-request-id`, and the
    /// pod to reach, each only when it has a value.
    pub fn metadata(&self) -> Vec<(&'static str, &[u8])> {
        [
            (metadata::CALL_ID, self.call_id),
            (metadata::REQUEST_ID, self.request_id),
            (crate::pods::ORIGINAL_DST_HEADER, self.original_dst),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k, v.as_bytes()))
        .collect()
    }
}

/// The host refused to dispatch a gRPC call (unknown cluster, bad arguments); its words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchFailed(pub String);

/// Services every context has: the root context's periodic work uses these alone.
pub trait Host {
    /// Dispatches a gRPC call; its answer arrives later under the returned token.
    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, DispatchFailed>;
    fn cancel_grpc(&mut self, token: u32);
    /// The store shared by every worker thread of this VM (counters, ejections).
    fn store(&self) -> &dyn SharedStore;
    /// Wall-clock milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// 16 bytes from a CSPRNG, or `None` when the host has none to give.
    fn random16(&mut self) -> Option<[u8; 16]>;
    /// Adds one to the counter `name` (defined at configuration time).
    fn increment(&self, name: &str);
    /// Records `value` in the histogram `name`.
    fn record(&self, name: &str, value: u64);
    /// Counts an error by its stable code (`realtime_filter.errors.<code>`, bounded).
    fn count_error(&self, code: &str);
    fn log(&self, level: LogLevel, message: &str);
}

/// What an HTTP context adds: the request it sits in, and the reply it may send.
pub trait HttpHost: Host {
    /// A request header (`:method`, `:path` and lowercase names).
    fn request_header(&self, name: &str) -> Option<String>;
    /// Up to `max` bytes of the buffered request body; `None` if it cannot be read.
    fn request_body(&self, max: usize) -> Option<Vec<u8>>;
    fn send_reply(&mut self, reply: &HttpReply);
    /// Sets (or with `None` removes) a request header, while the request is held in its
    /// headers callback (Envoy then matches its route again).
    fn set_request_header(&mut self, name: &str, value: Option<&str>);
    /// Lets a request held in its headers callback go on to the router.
    fn resume_request(&mut self);
    /// A property of the request (Envoy's attributes: `metadata`, `filter_metadata`, …), as
    /// the host serializes it (a string's bytes for a string). `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}
