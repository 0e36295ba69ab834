//! One request's life: headers → body buffered → validated → relay called → replied.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel};
use realtime_filter_core::classify::{self, split_path};
use realtime_filter_core::relay::{self, Verdict};
use realtime_filter_core::replica::{self, Failover};
use realtime_filter_core::{
    check_create_headers, plan_create, routing, validate_create_body, BodyKind, FilterError,
    HttpReply, Route,
};

use crate::host::{self, log, now_ms, ProxyStore};
use crate::metrics;
use crate::Runtime;

enum State {
    /// Not ours (or no configuration): untouched.
    PassThrough,
    /// A create request whose body is being buffered.
    Body {
        kind: BodyKind,
        query: Option<String>,
    },
    /// CreateCall dispatched.
    Creating {
        token: u32,
        call_id: String,
        worker_id: String,
        started_ms: u64,
        /// For a failover to another relay replica: the encoded request (holds the key:
        /// never log it), the replicas tried so far, the call id's random part.
        message: Vec<u8>,
        tried: Vec<usize>,
        random: [u8; 16],
    },
    /// HangupCall dispatched.
    HangingUp { token: u32 },
    /// Replied.
    Done,
}

/// Dispatches `CreateCall` for `call_id` to `cluster` (replica `replica`, if any).
fn dispatch_create(
    rt: &Runtime,
    cluster: &str,
    replica: Option<usize>,
    call_id: &str,
    request_id: &str,
    message: &[u8],
) -> Result<u32, proxy_wasm::types::Status> {
    if let Some(r) = replica.and_then(|i| rt.config.replicas.get(i)) {
        rt.metrics.inc(&metrics::replica(&r.id, "creates"));
    }
    hostcalls::dispatch_grpc_call(
        cluster,
        relay::SERVICE_NAME,
        relay::METHOD_CREATE,
        relay::metadata(call_id, request_id),
        Some(message),
        Duration::from_millis(rt.config.create_timeout_ms),
    )
}

pub struct Http {
    rt: Option<Rc<Runtime>>,
    state: State,
    request_id: String,
}

impl Http {
    pub fn new(rt: Option<Rc<Runtime>>) -> Self {
        Http {
            rt,
            state: State::PassThrough,
            request_id: String::new(),
        }
    }

    fn reply(&mut self, reply: &HttpReply) -> Action {
        host::send(reply);
        self.state = State::Done;
        Action::Pause
    }

    fn fail(&mut self, e: &FilterError) -> Action {
        if let Some(rt) = &self.rt {
            rt.metrics.inc(metrics::REQ_FAILED);
            rt.metrics.error(e.code());
        }
        log(
            LogLevel::Info,
            &format!(
                "request_id={} rejected status={} code={}",
                self.request_id,
                e.status(),
                e.code()
            ),
        );
        let reply = e.to_reply(&self.request_id);
        self.reply(&reply)
    }

    /// The whole body is here: validate, plan, dispatch.
    fn create(
        &mut self,
        rt: &Rc<Runtime>,
        kind: &BodyKind,
        query: Option<&str>,
        size: usize,
    ) -> Action {
        let body = if size == 0 {
            Vec::new()
        } else {
            match host::buffer(BufferType::HttpRequestBody, size) {
                Some(b) => b,
                None => return self.fail(&FilterError::Internal),
            }
        };
        let cfg = &rt.config;
        let offer = match validate_create_body(cfg, kind, query, &body) {
            Ok(o) => o,
            Err(e) => return self.fail(&e),
        };
        let Some(random) = host::random16() else {
            log(LogLevel::Error, "random_get failed: cannot make a call id");
            return self.fail(&FilterError::Internal);
        };
        let auth = host::request_header("authorization");
        let route = cfg.routing_header.as_deref().and_then(host::request_header);
        let now = now_ms();
        let plan = match plan_create(
            cfg,
            &offer,
            auth.as_deref(),
            route.as_deref(),
            &ProxyStore,
            now,
            &random,
            &self.request_id,
        ) {
            Ok(p) => p,
            Err(e) => return self.fail(&e),
        };
        match dispatch_create(
            rt,
            &plan.cluster,
            plan.replica,
            &plan.call_id,
            &self.request_id,
            &plan.message,
        ) {
            Ok(token) => {
                log(
                    LogLevel::Debug,
                    &format!(
                        "request_id={} call_id={} model={} worker={} CreateCall dispatched to {}",
                        self.request_id,
                        plan.call_id,
                        offer.model.requested,
                        plan.worker_id,
                        plan.cluster
                    ),
                );
                self.state = State::Creating {
                    token,
                    call_id: plan.call_id,
                    worker_id: plan.worker_id,
                    started_ms: now,
                    message: plan.message,
                    tried: plan.replica.into_iter().collect(),
                    random,
                };
                Action::Pause
            }
            Err(e) => {
                routing::release(&ProxyStore, &plan.worker_id);
                log(
                    LogLevel::Warn,
                    &format!(
                        "request_id={} dispatch to cluster '{}' failed: {e:?}",
                        self.request_id, plan.cluster
                    ),
                );
                self.fail(&FilterError::RelayUnavailable {
                    retry_after_s: cfg.retry_after_s,
                    code: None,
                })
            }
        }
    }

    fn hangup(&mut self, rt: &Rc<Runtime>, call_id: &str) -> Action {
        if let Err(e) = classify::check_call_id(call_id) {
            return self.fail(&e);
        }
        let cfg = &rt.config;
        // With replicas the id names the one that holds the call.
        let cluster = match replica::cluster_for_call(cfg, call_id) {
            Ok(c) => c,
            Err(e) => return self.fail(&e),
        };
        let msg = relay::encode_hangup(call_id);
        match hostcalls::dispatch_grpc_call(
            cluster,
            relay::SERVICE_NAME,
            relay::METHOD_HANGUP,
            relay::metadata(call_id, &self.request_id),
            Some(&msg),
            Duration::from_millis(cfg.hangup_timeout_ms),
        ) {
            Ok(token) => {
                self.state = State::HangingUp { token };
                Action::Pause
            }
            Err(_) => self.fail(&FilterError::RelayUnavailable {
                retry_after_s: cfg.retry_after_s,
                code: None,
            }),
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, response_size: usize) {
        let Some(rt) = self.rt.clone() else { return };
        let cfg = &rt.config;
        // Status and size first; only read the body of a successful call.
        let message = hostcalls::get_grpc_status()
            .ok()
            .and_then(|(_, m)| m)
            .map(|m| relay::decode_grpc_message(&m));
        let body = if status_code == relay::grpc::OK && response_size > 0 {
            host::buffer(BufferType::GrpcReceiveBuffer, response_size)
        } else {
            None
        };
        match std::mem::replace(&mut self.state, State::Done) {
            State::Creating {
                token,
                call_id,
                worker_id,
                started_ms,
                message: request,
                mut tried,
                random,
            } if token == token_id => {
                // A replica that cannot take the call (unreachable, draining, full): the next
                // one gets it, under a call id naming that one.
                let fo = replica::failover(status_code, message.as_deref());
                let last = tried.last().copied();
                if let (Some(from), true) = (last, fo != Failover::No) {
                    let now = now_ms();
                    let from_id = cfg.replicas.get(from).map_or("", |r| r.id.as_str());
                    if fo == Failover::Down {
                        replica::mark_down(&ProxyStore, from_id, now);
                    }
                    rt.metrics.inc(&metrics::replica(from_id, "failovers"));
                    if let Some(next) = replica::pick(cfg, &ProxyStore, now, &tried) {
                        if let Some(r) = cfg.replicas.get(next) {
                            let new_id = replica::call_id(&random, Some(&r.id));
                            let dispatched = relay::with_call_id(&request, &new_id)
                                .ok_or(proxy_wasm::types::Status::InternalFailure)
                                .and_then(|m| {
                                    dispatch_create(
                                        &rt,
                                        &r.cluster,
                                        Some(next),
                                        &new_id,
                                        &self.request_id,
                                        &m,
                                    )
                                    .map(|t| (t, m))
                                });
                            if let Ok((t, m)) = dispatched {
                                log(
                                    LogLevel::Info,
                                    &format!(
                                        "request_id={} relay replica {from_id} answered gRPC status {status_code}: call_id={new_id} goes to replica {}",
                                        self.request_id, r.id
                                    ),
                                );
                                tried.push(next);
                                self.state = State::Creating {
                                    token: t,
                                    call_id: new_id,
                                    worker_id,
                                    started_ms,
                                    message: m,
                                    tried,
                                    random,
                                };
                                return;
                            }
                        }
                    }
                }
                let r = relay::map_create_response(
                    cfg,
                    status_code,
                    message.as_deref(),
                    body.as_deref(),
                    &call_id,
                    &self.request_id,
                );
                let store = ProxyStore;
                match r.verdict {
                    Verdict::Success => {
                        routing::record_success(&store, &worker_id);
                        rt.metrics.inc(&metrics::setups(&worker_id, "ok"));
                        rt.metrics
                            .record(metrics::SETUP_LATENCY, now_ms().saturating_sub(started_ms));
                    }
                    Verdict::UpstreamFailure => {
                        routing::release(&store, &worker_id);
                        rt.metrics.inc(&metrics::setups(&worker_id, "failed"));
                        if routing::record_upstream_failure(&store, cfg, &worker_id, now_ms()) {
                            rt.metrics.inc(&metrics::ejections(&worker_id));
                            log(
                                LogLevel::Warn,
                                &format!(
                                    "worker {worker_id} ejected for {} ms after upstream failures",
                                    cfg.eject_ms
                                ),
                            );
                        }
                    }
                    Verdict::Neutral => routing::release(&store, &worker_id),
                }
                match (&r.error_code, r.upstream_status) {
                    (Some(code), _) => {
                        rt.metrics.inc(metrics::REQ_FAILED);
                        rt.metrics.error(code);
                    }
                    (None, Some(_)) => rt.metrics.inc(metrics::REQ_UPSTREAM_REJECTED),
                    (None, None) => rt.metrics.inc(metrics::REQ_CREATED),
                }
                log(
                    LogLevel::Info,
                    &format!(
                        "request_id={} call_id={call_id} worker={worker_id} grpc_status={status_code} status={} code={}",
                        self.request_id,
                        r.reply.status,
                        r.error_code.as_deref().unwrap_or("-")
                    ),
                );
                host::send(&r.reply);
            }
            State::HangingUp { token } if token == token_id => {
                let r = relay::map_hangup_response(
                    cfg,
                    status_code,
                    message.as_deref(),
                    body.as_deref(),
                    &self.request_id,
                );
                if let Some(w) = &r.worker_id {
                    routing::release(&ProxyStore, w);
                }
                match &r.error_code {
                    Some(code) => {
                        rt.metrics.inc(metrics::REQ_FAILED);
                        rt.metrics.error(code);
                    }
                    None => rt.metrics.inc(metrics::REQ_HANGUP),
                }
                host::send(&r.reply);
            }
            other => self.state = other,
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(rt) = self.rt.clone() else {
            return Action::Continue;
        };
        let method = host::request_header(":method").unwrap_or_default();
        let path = host::request_header(":path").unwrap_or_default();
        let route = realtime_filter_core::classify(&method, &path, &rt.config.calls_path);
        if route == Route::PassThrough {
            rt.metrics.inc(metrics::REQ_PASSED_THROUGH);
            return Action::Continue;
        }
        let random = host::random16().unwrap_or_default();
        self.request_id =
            classify::request_id(host::request_header("x-request-id").as_deref(), &random);
        match route {
            Route::PassThrough => Action::Continue,
            Route::Reject(e) => self.fail(&e),
            Route::Hangup { call_id } => self.hangup(&rt, &call_id),
            Route::Create => {
                let kind = match check_create_headers(
                    &rt.config,
                    host::request_header("content-type").as_deref(),
                    host::request_header("content-length").as_deref(),
                ) {
                    Ok(k) => k,
                    Err(e) => return self.fail(&e),
                };
                let query = split_path(&path).1.map(str::to_string);
                if end_of_stream {
                    return self.create(&rt, &kind, query.as_deref(), 0);
                }
                self.state = State::Body { kind, query };
                // Needs allow_on_headers_stop_iteration in the PluginConfig so the body still
                // reaches on_http_request_body.
                Action::Pause
            }
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(rt) = self.rt.clone() else {
            return Action::Continue;
        };
        let (kind, query) = match self.take_body() {
            Ok(body) => body,
            Err(action) => return action,
        };
        if body_size > rt.config.max_body_bytes {
            return self.fail(&FilterError::BodyTooLarge {
                limit: rt.config.max_body_bytes,
            });
        }
        if !end_of_stream {
            self.state = State::Body { kind, query };
            return Action::Pause;
        }
        self.create(&rt, &kind, query.as_deref(), body_size)
    }

    fn on_log(&mut self) {
        // The client went away while CreateCall was in flight: the reply will never be sent,
        // so this request stops counting against the worker now (the ListCalls refresh counts
        // the call again if the relay set it up anyway).
        if let State::Creating {
            token, worker_id, ..
        } = &self.state
        {
            let _ = hostcalls::cancel_grpc_call(*token);
            routing::release(&ProxyStore, worker_id);
            self.state = State::Done;
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(rt) = self.rt.clone() else {
            return Action::Continue;
        };
        let (kind, query) = match self.take_body() {
            Ok(body) => body,
            Err(action) => return action,
        };
        // The body ended with trailers: it is complete now.
        let size = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, usize::MAX)
            .ok()
            .flatten()
            .map_or(0, |b| b.len());
        self.create(&rt, &kind, query.as_deref(), size)
    }
}

impl Http {
    /// Takes the buffered-body state out of a create request. Any other state answers
    /// the body or trailer callback itself: pass-through continues untouched, and a
    /// request whose reply is already on its way stays paused.
    fn take_body(&mut self) -> Result<(BodyKind, Option<String>), Action> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Body { kind, query } => Ok((kind, query)),
            other => {
                let action = if matches!(other, State::PassThrough) {
                    Action::Continue
                } else {
                    Action::Pause
                };
                self.state = other;
                Err(action)
            }
        }
    }
}
