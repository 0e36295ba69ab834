//! A host in plain memory for tests of the request lifecycle: it records every gRPC
//! dispatch, reply, metric and log line, and answers with a clock and random bytes the
//! test controls.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

use crate::host::{DispatchFailed, GrpcCall, Host, HttpHost, LogLevel};
use crate::reply::HttpReply;
use crate::routing::{MemoryStore, SharedStore};

/// One dispatched gRPC call, as the relay would receive it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatched {
    pub token: u32,
    pub cluster: String,
    pub service: &'static str,
    pub method: &'static str,
    pub metadata: Vec<(String, String)>,
    pub message: Vec<u8>,
    pub timeout_ms: u64,
}

#[derive(Debug, Default)]
pub struct FakeHost {
    pub headers: HashMap<String, String>,
    /// The headers went on (the filter returned `Continue`): Envoy no longer lets the filter
    /// read them, and proxy-wasm 0.2 panics on the host's answer. Tests set this after such
    /// an `on_headers` so a late read fails them.
    pub headers_gone: bool,
    pub body: Vec<u8>,
    /// `request_body` fails (the host cannot read the buffer).
    pub body_unreadable: bool,
    pub store: MemoryStore,
    pub now_ms: u64,
    /// `random16` fails (no CSPRNG).
    pub no_random: bool,
    random_calls: u8,
    /// Clusters whose dispatch the host refuses.
    pub refuse_clusters: HashSet<String>,
    next_token: u32,
    pub dispatched: Vec<Dispatched>,
    pub cancelled: Vec<u32>,
    pub replies: Vec<HttpReply>,
    counters: RefCell<HashMap<String, u64>>,
    pub histograms: RefCell<Vec<(String, u64)>>,
    pub logs: RefCell<Vec<(LogLevel, String)>>,
    /// Request properties by path (dynamic metadata a JWT filter wrote, say).
    pub properties: HashMap<Vec<String>, Vec<u8>>,
    /// The held request was let go on (`resume_request`).
    pub resumed: bool,
}

impl FakeHost {
    /// A request with these headers (`:method`, `:path`, ...) and body.
    pub fn request(headers: &[(&str, &str)], body: &[u8]) -> FakeHost {
        FakeHost {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            body: body.to_vec(),
            now_ms: 1_000_000,
            ..FakeHost::default()
        }
    }

    /// A counter's value; panics on a name never incremented, so a typo cannot pass as 0.
    pub fn counter(&self, name: &str) -> u64 {
        match self.counters.borrow().get(name) {
            Some(v) => *v,
            None => panic!(
                "counter {name} was never incremented; have: {:?}",
                self.counters.borrow().keys().collect::<Vec<_>>()
            ),
        }
    }

    /// A counter's value, 0 when it was never incremented.
    pub fn count(&self, name: &str) -> u64 {
        self.counters.borrow().get(name).copied().unwrap_or(0)
    }

    pub fn last_reply(&self) -> &HttpReply {
        self.replies.last().expect("no reply was sent")
    }

    pub fn last_dispatch(&self) -> &Dispatched {
        self.dispatched.last().expect("nothing was dispatched")
    }

    /// The name of every counter incremented and histogram recorded.
    pub fn metric_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.counters.borrow().keys().cloned().collect();
        names.extend(self.histograms.borrow().iter().map(|(n, _)| n.clone()));
        names
    }

    /// A counter in the shared store (outstanding calls, failures...), 0 when absent.
    pub fn stored(&self, key: &str) -> u64 {
        crate::routing::load(&self.store, key)
    }

    /// Every log line, one string, for searching.
    pub fn log_text(&self) -> String {
        self.logs
            .borrow()
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Host for FakeHost {
    fn dispatch_grpc(&mut self, call: &GrpcCall<'_>) -> Result<u32, DispatchFailed> {
        if self.refuse_clusters.contains(call.cluster) {
            return Err(DispatchFailed(format!("cluster {} refused", call.cluster)));
        }
        self.next_token += 1;
        self.dispatched.push(Dispatched {
            token: self.next_token,
            cluster: call.cluster.to_string(),
            service: call.service,
            method: call.method,
            metadata: call
                .metadata()
                .into_iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                .collect(),
            message: call.message.to_vec(),
            timeout_ms: call.timeout_ms,
        });
        Ok(self.next_token)
    }

    fn cancel_grpc(&mut self, token: u32) {
        self.cancelled.push(token);
    }

    fn store(&self) -> &dyn SharedStore {
        &self.store
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn random16(&mut self) -> Option<[u8; 16]> {
        if self.no_random {
            return None;
        }
        self.random_calls = self.random_calls.wrapping_add(1);
        Some([self.random_calls; 16])
    }

    fn increment(&self, name: &str) {
        *self
            .counters
            .borrow_mut()
            .entry(name.to_string())
            .or_insert(0) += 1;
    }

    fn record(&self, name: &str, value: u64) {
        self.histograms.borrow_mut().push((name.to_string(), value));
    }

    fn count_error(&self, code: &str) {
        self.increment(&crate::metrics::error(code));
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_string()));
    }
}

impl HttpHost for FakeHost {
    fn request_header(&self, name: &str) -> Option<String> {
        assert!(
            !self.headers_gone,
            "request header {name} read after the headers went on"
        );
        self.headers.get(name).cloned()
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        let key: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        self.properties.get(&key).cloned()
    }

    fn request_body(&self, max: usize) -> Option<Vec<u8>> {
        if self.body_unreadable {
            return None;
        }
        Some(self.body.iter().take(max).copied().collect())
    }

    fn send_reply(&mut self, reply: &HttpReply) {
        self.replies.push(reply.clone());
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        assert!(
            !self.headers_gone,
            "request header {name} set after the headers went on"
        );
        match value {
            Some(v) => self.headers.insert(name.to_string(), v.to_string()),
            None => self.headers.remove(name),
        };
    }

    fn resume_request(&mut self) {
        self.resumed = true;
    }
}
