//! One request's life, as a state machine: headers → body buffered → validated → creating
//! (attempts over relay replicas) or hanging up → done; or, for a client secret, headers →
//! body buffered → minted and answered here → done.
//!
//! The proxy-wasm glue forwards each Envoy callback to one event method here and does what it
//! returns; everything else (reading the request, dispatching gRPC, replying, counting)
//! happens through [`HttpHost`]. So failover, ejection, the worker's verdict, releasing a
//! worker's outstanding count when the client leaves, and every error reply are tested
//! natively against `fake_host`.

use prost::Message as _;
use std::rc::Rc;

use crate::classify::{self, split_path, Route};
use crate::config::Config;
use crate::content_type::BodyKind;
use crate::create::{
    check_content_length, check_create_headers, plan_create, validate_create_body, CreateRequest,
};
use crate::error::FilterError;
use crate::global_limit::{self, GlobalRateLimit};
use crate::host::{Action, GrpcCall, HttpHost, LogLevel};
use crate::identity::{self, Caller};
use crate::relay::{self, Verdict};
use crate::replica::{self, Failover};
use crate::reply::HttpReply;
use crate::{client_secrets, limits, metrics, origin, routing, sideband};

/// What a create's headers said, kept for when its body is complete. Read in the headers
/// callback: once the headers went on (`continue_headers`), Envoy no longer lets the filter
/// read them (proxy-wasm 0.2 then panics on the host's BadArgument).
#[derive(Clone, PartialEq, Eq)]
pub struct PendingCreate {
    pub kind: BodyKind,
    pub query: Option<String>,
    /// The client's `Authorization` header (a credential: never log it).
    pub authorization: Option<String>,
    /// The routing header's value, when the configuration names one and the caller is
    /// trusted to steer.
    pub routing_value: Option<String>,
    pub caller: Caller,
}

impl std::fmt::Debug for PendingCreate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCreate")
            .field("kind", &self.kind)
            .field("query", &self.query)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("routing_value", &self.routing_value)
            .finish()
    }
}

/// A request whose body is being buffered, and what it will be once complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// A call creation.
    Create(PendingCreate),
    /// A client-secret request from a caller allowed to mint.
    Mint { caller: Caller },
}

/// A create whose `CreateCall` is in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creating {
    pub token: u32,
    pub call_id: String,
    pub worker_id: String,
    pub started_ms: u64,
    /// The encoded request, for a failover to another relay replica (it holds the key:
    /// never log it).
    pub message: Vec<u8>,
    /// Relay replicas tried so far (indexes into `Config::replicas`), in order.
    pub tried: Vec<usize>,
    /// The call id's random part, kept when a failover renames the call for another replica.
    pub random: [u8; 16],
    /// The subject whose live-call count this create holds (`crate::limits`), if counted:
    /// released unless the call is set up.
    pub live_subject: Option<String>,
    /// The API the call speaks: its answer's shape.
    pub api: crate::config::ModelApi,
}

/// A create planned and within the local limits, ready to go out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub plan: crate::create::Plan,
    pub live_subject: Option<String>,
    pub random: [u8; 16],
    pub started_ms: u64,
    pub model: String,
    pub principal: String,
}

/// A create waiting for the global rate-limit service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateCheck {
    pub token: u32,
    pub ready: Ready,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not ours: untouched.
    PassThrough,
    /// A create or client-secret request whose body is being buffered.
    Body(Pending),
    /// Asking the global rate-limit service.
    RateChecking(Box<RateCheck>),
    /// `CreateCall` dispatched.
    Creating(Creating),
    /// `HangupCall` dispatched.
    /// `HangupCall` dispatched by a caller with this principal (empty: an operator, or
    /// anonymous).
    HangingUp { token: u32, principal: String },
    /// `GetCall` dispatched for a sideband upgrade held in its headers (`crate::sideband`).
    Attaching(Box<Attaching>),
    /// Replied (or the client left).
    Done,
}

/// A sideband upgrade waiting for the relay's `GetCall`: what its rewrite needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attaching {
    pub token: u32,
    pub kind: realtime_relay_proto::call_id::Kind,
    pub caller: Caller,
    pub authorization: Option<String>,
}

/// The state machine of one HTTP request.
pub struct Flow {
    config: Rc<Config>,
    state: State,
    request_id: String,
    /// The credential of the request's `Authorization` header (after the scheme): every
    /// reply is scrubbed of it ([`HttpReply::redacting`]). Never logged.
    credential: Option<String>,
}

impl Flow {
    pub fn new(config: Rc<Config>) -> Flow {
        Flow {
            config,
            state: State::PassThrough,
            request_id: String::new(),
            credential: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The request headers are here.
    pub fn on_headers(&mut self, host: &mut dyn HttpHost, end_of_stream: bool) -> Action {
        // The header that steers sideband routing is the filter's alone (`crate::sideband`).
        if host.request_header(sideband::CLUSTER_HEADER).is_some() {
            host.set_request_header(sideband::CLUSTER_HEADER, None);
        }
        let method = host.request_header(":method").unwrap_or_default();
        let path = host.request_header(":path").unwrap_or_default();
        let route = classify::classify(&method, &path, classify::Paths::of(&self.config));
        if route == Route::PassThrough {
            host.increment(metrics::REQ_PASSED_THROUGH);
            return Action::Continue;
        }
        self.credential = host.request_header("authorization").map(|a| {
            let a = a.trim();
            a.split_once(' ')
                .map_or(a, |(_, token)| token.trim())
                .to_string()
        });
        let random = host.random16().unwrap_or_default();
        self.request_id =
            classify::request_id(host.request_header("x-request-id").as_deref(), &random);
        // A browser page the gateway does not trust gets nothing from any path of ours, not
        // even a 404: a simple POST needs no preflight, so CORS alone would let it through.
        if let Err(e) = origin::check(
            host.request_header("origin").as_deref(),
            host.request_header(":authority").as_deref(),
            &self.config.browser_origins,
        ) {
            return self.fail(host, &e);
        }
        match route {
            Route::PassThrough => Action::Continue,
            Route::Reject(e) => self.fail(host, &e),
            Route::Hangup { call_id, kind } => self.hangup(host, &call_id, kind),
            Route::Sideband { call_id, kind } => self.attach(host, &call_id, kind),
            Route::Create => {
                // Who calls, before anything else: a bad credential costs no body and no work.
                let caller = match self.caller(host) {
                    Ok(c) => c,
                    Err(e) => return self.fail(host, &e),
                };
                let kind = match check_create_headers(
                    &self.config,
                    host.request_header("content-type").as_deref(),
                    host.request_header("content-length").as_deref(),
                ) {
                    Ok(k) => k,
                    Err(e) => return self.fail(host, &e),
                };
                let pending = PendingCreate {
                    kind,
                    query: split_path(&path).1.map(str::to_string),
                    authorization: host.request_header("authorization"),
                    routing_value: self.routing_value(host, &caller),
                    caller,
                };
                self.await_body(host, Pending::Create(pending), end_of_stream)
            }
            Route::LiveCreate => {
                let caller = match self.caller(host) {
                    Ok(c) => c,
                    Err(e) => return self.fail(host, &e),
                };
                let checked =
                    crate::live::check_content_type(host.request_header("content-type").as_deref())
                        .and_then(|()| {
                            check_content_length(
                                &self.config,
                                host.request_header("content-length").as_deref(),
                            )
                        });
                if let Err(e) = checked {
                    return self.fail(host, &e);
                }
                let pending = PendingCreate {
                    kind: BodyKind::LiveJson,
                    query: None,
                    authorization: host.request_header("authorization"),
                    routing_value: self.routing_value(host, &caller),
                    caller,
                };
                self.await_body(host, Pending::Create(pending), end_of_stream)
            }
            Route::ClientSecret => {
                if self.config.callers.ephemeral.is_none() {
                    return self.fail(host, &FilterError::ClientSecretsNotEnabled);
                }
                // Only a backend's credential mints; a bad one costs no body.
                let caller = match self
                    .caller(host)
                    .and_then(|c| client_secrets::may_mint(&c).map(|()| c))
                {
                    Ok(c) => c,
                    Err(e) => return self.fail(host, &e),
                };
                let checked = client_secrets::check_content_type(
                    host.request_header("content-type").as_deref(),
                )
                .and_then(|()| {
                    check_content_length(
                        &self.config,
                        host.request_header("content-length").as_deref(),
                    )
                });
                if let Err(e) = checked {
                    return self.fail(host, &e);
                }
                self.await_body(host, Pending::Mint { caller }, end_of_stream)
            }
        }
    }

    /// Waits for the body of `pending` (or handles it now, when the request has none).
    fn await_body(
        &mut self,
        host: &mut dyn HttpHost,
        pending: Pending,
        end_of_stream: bool,
    ) -> Action {
        if end_of_stream {
            return self.complete(host, &pending, Vec::new());
        }
        self.state = State::Body(pending);
        if self.config.continue_headers {
            // Headers go on to the router (the route must hold them, never answer);
            // the body is held in on_body, and the reply sent from there.
            Action::Continue
        } else {
            // With allow_on_headers_stop_iteration the body still reaches on_body.
            Action::Pause
        }
    }

    /// The whole body of `pending` is here.
    fn complete(&mut self, host: &mut dyn HttpHost, pending: &Pending, body: Vec<u8>) -> Action {
        match pending {
            Pending::Create(p) => self.create(host, p, body),
            Pending::Mint { caller } => self.mint(host, caller, body),
        }
    }

    /// A chunk of the request body arrived; `body_size` is all buffered so far.
    pub fn on_body(
        &mut self,
        host: &mut dyn HttpHost,
        body_size: usize,
        end_of_stream: bool,
    ) -> Action {
        let pending = match self.take_body() {
            Ok(p) => p,
            Err(action) => return action,
        };
        if body_size > self.config.max_body_bytes {
            return self.fail(
                host,
                &FilterError::BodyTooLarge {
                    limit: self.config.max_body_bytes,
                },
            );
        }
        if !end_of_stream {
            self.state = State::Body(pending);
            return Action::Pause;
        }
        let body = if body_size == 0 {
            Some(Vec::new())
        } else {
            host.request_body(body_size)
        };
        match body {
            Some(b) => self.complete(host, &pending, b),
            None => self.fail(host, &FilterError::Internal),
        }
    }

    /// The body ended with trailers: it is complete now.
    pub fn on_trailers(&mut self, host: &mut dyn HttpHost) -> Action {
        let pending = match self.take_body() {
            Ok(p) => p,
            Err(action) => return action,
        };
        // One byte over the limit is enough to refuse; never read more than that.
        let body = host
            .request_body(self.config.max_body_bytes.saturating_add(1))
            .unwrap_or_default();
        self.complete(host, &pending, body)
    }

    /// The answer to a gRPC call this request dispatched. `message` is the gRPC status
    /// message as the host hands it over (percent-encoded); `body` the response message,
    /// read only when the status is OK.
    pub fn on_grpc_response(
        &mut self,
        host: &mut dyn HttpHost,
        token: u32,
        status: u32,
        message: Option<&str>,
        body: Option<&[u8]>,
    ) {
        let message = message.map(relay::decode_grpc_message);
        match std::mem::replace(&mut self.state, State::Done) {
            State::Creating(mut c) if c.token == token => {
                if self.fail_over(host, &mut c, status, message.as_deref()) {
                    self.state = State::Creating(c);
                } else {
                    self.finish_create(host, &c, status, message.as_deref(), body);
                }
            }
            State::RateChecking(check) if check.token == token => {
                let decision = global_limit::decide(status, body);
                self.after_global(host, decision, check.ready);
            }
            State::HangingUp {
                token: t,
                principal,
            } if t == token => {
                self.finish_hangup(host, &principal, status, message.as_deref(), body);
            }
            State::Attaching(a) if a.token == token => {
                self.finish_attach(host, &a, status, message.as_deref(), body);
            }
            other => self.state = other,
        }
    }

    /// The request is over (Envoy's `on_log`). A client that left while `CreateCall` was in
    /// flight will never get the reply, so the call stops counting against its worker now
    /// (the ListCalls refresh counts it again if the relay set it up anyway).
    pub fn on_done(&mut self, host: &mut dyn HttpHost) {
        if let State::RateChecking(check) = &self.state {
            host.cancel_grpc(check.token);
            self.release_ready(host, &check.ready);
            self.state = State::Done;
            return;
        }
        if let State::Creating(c) = &self.state {
            host.cancel_grpc(c.token);
            routing::release(host.store(), &c.worker_id);
            if let Some(s) = &c.live_subject {
                limits::release_call(host.store(), s);
            }
            self.state = State::Done;
        }
    }

    /// Takes the buffered-body state out of a create or client-secret request. Any other
    /// state answers the body or trailer callback itself: pass-through continues untouched,
    /// and a request whose reply is already on its way stays paused.
    fn take_body(&mut self) -> Result<Pending, Action> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::Body(pending) => Ok(pending),
            other => {
                let action = if other == State::PassThrough {
                    Action::Continue
                } else {
                    Action::Pause
                };
                self.state = other;
                Err(action)
            }
        }
    }

    fn reply(&mut self, host: &mut dyn HttpHost, reply: &HttpReply) -> Action {
        match self.credential.as_deref() {
            Some(secret) => host.send_reply(&reply.clone().redacting(secret)),
            None => host.send_reply(reply),
        }
        self.state = State::Done;
        Action::Pause
    }

    fn fail(&mut self, host: &mut dyn HttpHost, e: &FilterError) -> Action {
        host.increment(metrics::REQ_FAILED);
        host.count_error(e.code());
        host.log(
            LogLevel::Info,
            &format!(
                "request_id={} rejected status={} code={}",
                self.request_id,
                e.status(),
                e.code()
            ),
        );
        let reply = e.to_reply(&self.request_id);
        self.reply(host, &reply)
    }

    /// The pool's per-caller limits (or the caller's own, for an operator key that has them):
    /// one more creation this minute, one more live call. On success, the subject whose live
    /// call is now counted (released if the call is not set up).
    fn check_limits(
        &self,
        host: &mut dyn HttpHost,
        caller: &Caller,
        plan: &crate::create::Plan,
        now_ms: u64,
    ) -> Result<Option<String>, FilterError> {
        let config = &self.config;
        let Some(pool) = plan.choice.pool(config) else {
            return Ok(None);
        };
        let limits = pool.limits.overridden_by(caller.own_limits(config));
        if limits == limits::Limits::default() {
            return Ok(None);
        }
        let principal = caller.principal(config);
        let address = host
            .property(&["source", "address"])
            .and_then(|b| String::from_utf8(b).ok());
        let Some(subject) = limits::subject(&principal, address.as_deref()) else {
            return Ok(None);
        };
        if let Some(n) = limits.creates_per_minute {
            limits::take_create(host.store(), &subject, n, now_ms).map_err(|o| {
                FilterError::RateLimited {
                    what: "call creations per minute",
                    limit: o.limit,
                    retry_after_s: o.retry_after_s,
                }
            })?;
        }
        // Live calls are counted for callers with a principal: the relays report live calls
        // by owner, which corrects the count for calls that end by themselves.
        match limits.calls_per_caller {
            Some(n) if !principal.is_empty() => {
                limits::acquire_call(host.store(), &subject, Some(n)).map_err(|o| {
                    FilterError::RateLimited {
                        what: "concurrent calls",
                        limit: o.limit,
                        retry_after_s: o.retry_after_s,
                    }
                })?;
                Ok(Some(subject))
            }
            _ => Ok(None),
        }
    }

    /// The caller of this request ([`identity::resolve`]).
    fn caller(&self, host: &dyn HttpHost) -> Result<Caller, FilterError> {
        let jwt = self
            .config
            .callers
            .jwt
            .as_ref()
            .and_then(|j| host.property(&j.property_path()))
            .and_then(|b| String::from_utf8(b).ok());
        identity::resolve(
            &self.config,
            host.request_header("authorization").as_deref(),
            jwt.as_deref(),
            host.now_ms() / 1000,
        )
    }

    /// The routing header's value, honoured only from a trusted caller: from anyone else it
    /// could pin any pool or worker, bypassing weights, canary shares and key policies.
    fn routing_value(&self, host: &mut dyn HttpHost, caller: &Caller) -> Option<String> {
        let value = self
            .config
            .routing_header
            .as_deref()
            .and_then(|h| host.request_header(h))?;
        if caller.is_trusted(&self.config) {
            return Some(value);
        }
        host.increment(metrics::ROUTING_HEADER_IGNORED);
        host.log(
            LogLevel::Debug,
            &format!(
                "request_id={} routing header ignored: the caller ({}) is not trusted to steer",
                self.request_id,
                caller.kind()
            ),
        );
        None
    }

    fn relay_unavailable(&self) -> FilterError {
        FilterError::RelayUnavailable {
            retry_after_s: self.config.retry_after_s,
            code: None,
        }
    }

    /// The whole body is here: validate, plan, dispatch.
    fn create(
        &mut self,
        host: &mut dyn HttpHost,
        pending: &PendingCreate,
        body: Vec<u8>,
    ) -> Action {
        let config = Rc::clone(&self.config);
        let query = pending.query.as_deref();
        let key = match &pending.caller {
            Caller::Ephemeral(claims) => Some(claims.as_ref()),
            _ => None,
        };
        let offer = match validate_create_body(&config, &pending.kind, query, &body, key) {
            Ok(o) => o,
            Err(e) => return self.fail(host, &e),
        };
        let Some(random) = host.random16() else {
            host.log(LogLevel::Error, "random_get failed: cannot make a call id");
            return self.fail(host, &FilterError::Internal);
        };
        let now = host.now_ms();
        let request = CreateRequest {
            offer: &offer,
            caller: &pending.caller,
            authorization: pending.authorization.as_deref(),
            routing_value: pending.routing_value.as_deref(),
            call_random: &random,
            request_id: &self.request_id,
        };
        let plan = match plan_create(&config, &request, host.store(), now) {
            Ok(p) => p,
            Err(e) => return self.fail(host, &e),
        };
        let live_subject = match self.check_limits(host, &pending.caller, &plan, now) {
            Ok(s) => s,
            Err(e) => {
                routing::release(host.store(), &plan.worker_id);
                return self.fail(host, &e);
            }
        };
        let ready = Ready {
            plan,
            live_subject,
            random,
            started_ms: now,
            model: offer.model.requested.clone(),
            principal: pending.caller.principal(&config),
        };
        match &config.global_rate_limit {
            Some(global) => self.check_global(host, global, ready),
            None => self.dispatch_ready(host, ready),
        }
    }

    /// Asks the global rate-limit service about `ready`'s caller before its create goes out.
    fn check_global(
        &mut self,
        host: &mut dyn HttpHost,
        global: &GlobalRateLimit,
        ready: Ready,
    ) -> Action {
        let subject = if ready.principal.is_empty() {
            ready.live_subject.clone().unwrap_or_default()
        } else {
            ready.principal.clone()
        };
        if subject.is_empty() {
            return self.dispatch_ready(host, ready);
        }
        let message = global_limit::encode_request(&global.domain, &subject, &ready.model);
        match host.dispatch_grpc(&GrpcCall {
            cluster: &global.cluster,
            service: global_limit::SERVICE_NAME,
            method: global_limit::METHOD,
            call_id: "",
            request_id: &self.request_id,
            message: &message,
            timeout_ms: global.timeout_ms,
            original_dst: "",
        }) {
            Ok(token) => {
                self.state = State::RateChecking(Box::new(RateCheck { token, ready }));
                Action::Pause
            }
            Err(e) => {
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "request_id={} rate-limit service dispatch failed: {}",
                        self.request_id, e.0
                    ),
                );
                self.after_global(host, global_limit::Decision::Failed, ready)
            }
        }
    }

    /// The global rate-limit service's decision for `ready`.
    fn after_global(
        &mut self,
        host: &mut dyn HttpHost,
        decision: global_limit::Decision,
        ready: Ready,
    ) -> Action {
        let deny_on_failure = self
            .config
            .global_rate_limit
            .as_ref()
            .is_some_and(|g| g.deny_on_failure);
        let refused = match decision {
            global_limit::Decision::Allow => None,
            global_limit::Decision::Deny { retry_after_s } => Some(FilterError::RateLimited {
                what: "calls in the fleet's budget",
                limit: 0,
                retry_after_s,
            }),
            global_limit::Decision::Failed if deny_on_failure => {
                Some(FilterError::RelayUnavailable {
                    retry_after_s: self.config.retry_after_s,
                    code: Some("rate_limit_unavailable".to_string()),
                })
            }
            global_limit::Decision::Failed => None,
        };
        match refused {
            None => self.dispatch_ready(host, ready),
            Some(e) => {
                self.release_ready(host, &ready);
                self.fail(host, &e)
            }
        }
    }

    /// A create that will not go out gives back what it holds.
    fn release_ready(&self, host: &mut dyn HttpHost, ready: &Ready) {
        routing::release(host.store(), &ready.plan.worker_id);
        if let Some(s) = &ready.live_subject {
            limits::release_call(host.store(), s);
        }
    }

    /// Dispatches the planned `CreateCall`.
    fn dispatch_ready(&mut self, host: &mut dyn HttpHost, ready: Ready) -> Action {
        let Ready {
            plan,
            live_subject,
            random,
            started_ms: now,
            model,
            ..
        } = ready;
        match self.dispatch_create(
            host,
            &plan.cluster,
            plan.replica,
            &plan.call_id,
            &plan.message,
        ) {
            Ok(token) => {
                host.log(
                    LogLevel::Debug,
                    &format!(
                        "request_id={} call_id={} model={} worker={} CreateCall dispatched to {}",
                        self.request_id, plan.call_id, model, plan.worker_id, plan.cluster
                    ),
                );
                self.state = State::Creating(Creating {
                    token,
                    call_id: plan.call_id,
                    worker_id: plan.worker_id,
                    started_ms: now,
                    message: plan.message,
                    tried: plan.replica.into_iter().collect(),
                    random,
                    live_subject,
                    api: plan.api,
                });
                Action::Pause
            }
            Err(e) => {
                routing::release(host.store(), &plan.worker_id);
                if let Some(s) = &live_subject {
                    limits::release_call(host.store(), s);
                }
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "request_id={} dispatch to cluster '{}' failed: {}",
                        self.request_id, plan.cluster, e.0
                    ),
                );
                let e = self.relay_unavailable();
                self.fail(host, &e)
            }
        }
    }

    /// The whole body of a client-secret request is here: validate, mint, answer. The key
    /// goes into the answer and nowhere else (no log line, no metric).
    fn mint(&mut self, host: &mut dyn HttpHost, caller: &Caller, body: Vec<u8>) -> Action {
        let config = Rc::clone(&self.config);
        if body.len() > config.max_body_bytes {
            return self.fail(
                host,
                &FilterError::BodyTooLarge {
                    limit: config.max_body_bytes,
                },
            );
        }
        let req = match client_secrets::parse(&config, &body) {
            Ok(r) => r,
            Err(e) => return self.fail(host, &e),
        };
        let Some(random) = host.random16() else {
            host.log(LogLevel::Error, "random_get failed: cannot name a session");
            return self.fail(host, &FilterError::Internal);
        };
        let session_id: String = std::iter::once("sess_".to_string())
            .chain(random.iter().map(|b| format!("{b:02x}")))
            .collect();
        let now_s = host.now_ms() / 1000;
        let minted = match client_secrets::mint(&config, caller, &req, now_s, &session_id) {
            Ok(m) => m,
            Err(e) => return self.fail(host, &e),
        };
        host.increment(metrics::REQ_CLIENT_SECRETS);
        host.log(
            LogLevel::Info,
            &format!(
                "request_id={} client secret minted for a {} caller: session={session_id} model={} ttl_s={} expires_at={}",
                self.request_id,
                caller.kind(),
                req.model.as_deref().unwrap_or("-"),
                req.ttl_s,
                minted.expires_at
            ),
        );
        let reply = HttpReply {
            status: 200,
            headers: vec![
                ("content-type".to_string(), "application/json".to_string()),
                ("cache-control".to_string(), "no-store".to_string()),
                ("x-request-id".to_string(), self.request_id.clone()),
            ],
            body: minted.body,
        };
        self.reply(host, &reply)
    }

    /// Dispatches `CreateCall` for `call_id` to `cluster` (replica `replica`, if any).
    fn dispatch_create(
        &self,
        host: &mut dyn HttpHost,
        cluster: &str,
        replica: Option<usize>,
        call_id: &str,
        message: &[u8],
    ) -> Result<u32, crate::host::DispatchFailed> {
        if let Some(r) = replica.and_then(|i| self.config.replicas.get(i)) {
            host.increment(&metrics::replica(&r.id, "creates"));
        }
        host.dispatch_grpc(&GrpcCall {
            cluster,
            service: relay::SERVICE_NAME,
            method: relay::METHOD_CREATE,
            call_id,
            request_id: &self.request_id,
            message,
            timeout_ms: self.config.create_timeout_ms,
            original_dst: "",
        })
    }

    /// A replica that cannot take the call (unreachable, draining, full): the next untried
    /// one gets it, under a call id naming that one. `false` when there is no failover to
    /// make (not a replica fault, no replica left, dispatch refused): `c` is then unchanged.
    fn fail_over(
        &mut self,
        host: &mut dyn HttpHost,
        c: &mut Creating,
        status: u32,
        message: Option<&str>,
    ) -> bool {
        let kind = replica::failover(status, message);
        let Some(from) = c.tried.last().copied() else {
            return false;
        };
        if kind == Failover::No {
            return false;
        }
        let config = Rc::clone(&self.config);
        let now = host.now_ms();
        let from_id = config.replicas.get(from).map_or("", |r| r.id.as_str());
        if kind == Failover::Down {
            replica::mark_down(host.store(), from_id, now);
        }
        host.increment(&metrics::replica(from_id, "failovers"));
        let Some((next, r)) = replica::pick(&config, host.store(), now, &c.tried)
            .and_then(|i| config.replicas.get(i).map(|r| (i, r)))
        else {
            return false;
        };
        let kind = realtime_relay_proto::call_id::split(&c.call_id)
            .map(|(k, _)| k)
            .unwrap_or_default();
        let call_id = realtime_relay_proto::call_id::new_of(kind, &c.random, Some(&r.id));
        let Some(message) = relay::with_call_id(&c.message, &call_id) else {
            return false;
        };
        let Ok(token) = self.dispatch_create(host, &r.cluster, Some(next), &call_id, &message)
        else {
            return false;
        };
        host.log(
            LogLevel::Info,
            &format!(
                "request_id={} relay replica {from_id} answered gRPC status {status}: call_id={call_id} goes to replica {}",
                self.request_id, r.id
            ),
        );
        c.tried.push(next);
        c.token = token;
        c.call_id = call_id;
        c.message = message;
        true
    }

    /// The last attempt answered: reply, apply the verdict on the worker, count.
    fn finish_create(
        &mut self,
        host: &mut dyn HttpHost,
        c: &Creating,
        status: u32,
        message: Option<&str>,
        body: Option<&[u8]>,
    ) {
        let config = Rc::clone(&self.config);
        let r = relay::map_create_response(
            &config,
            status,
            message,
            body,
            &c.call_id,
            &self.request_id,
        );
        self.apply_verdict(host, &c.worker_id, r.verdict, c.started_ms);
        let set_up = r.error_code.is_none() && r.upstream_status.is_none();
        if let (Some(s), false) = (&c.live_subject, set_up) {
            limits::release_call(host.store(), s);
        }
        if r.error_code.as_deref() == Some(relay::UNNAMED_POD_CALL) {
            host.log(
                LogLevel::Error,
                &format!(
                    "request_id={} relay_pods is set but the relay did not name the call under the key in {}: start every relay with --replica-addr and the same RELAY_REPLICA_KEY",
                    self.request_id,
                    config.pods.as_ref().map_or("", |p| p.key_env.as_str())
                ),
            );
        }
        match (&r.error_code, r.upstream_status) {
            (Some(code), _) => {
                host.increment(metrics::REQ_FAILED);
                host.count_error(code);
            }
            (None, Some(_)) => host.increment(metrics::REQ_UPSTREAM_REJECTED),
            (None, None) => host.increment(metrics::REQ_CREATED),
        }
        host.log(
            LogLevel::Info,
            &format!(
                "request_id={} call_id={} worker={} grpc_status={status} status={} code={}",
                self.request_id,
                c.call_id,
                c.worker_id,
                r.reply.status,
                r.error_code.as_deref().unwrap_or("-")
            ),
        );
        // A Live session is answered in its API's shape: JSON with the session id (the id the
        // relay named, from Location) and the SDP answer.
        if set_up && c.api == crate::config::ModelApi::Live {
            let id = r
                .reply
                .header("location")
                .and_then(|l| l.rsplit('/').next())
                .unwrap_or(&c.call_id)
                .to_string();
            let answer = String::from_utf8_lossy(&r.reply.body).into_owned();
            let reply = crate::live::created_reply(&id, &answer, &self.request_id);
            self.reply(host, &reply);
            return;
        }
        self.reply(host, &r.reply);
    }

    /// Only upstream failures count against a worker (and may eject it); success clears
    /// its failure run; a failed setup stops counting as outstanding.
    fn apply_verdict(
        &self,
        host: &mut dyn HttpHost,
        worker_id: &str,
        verdict: Verdict,
        started_ms: u64,
    ) {
        let config = &self.config;
        match verdict {
            Verdict::Success => {
                routing::record_success(host.store(), worker_id);
                host.increment(&metrics::setups(worker_id, "ok"));
                host.record(
                    metrics::SETUP_LATENCY,
                    host.now_ms().saturating_sub(started_ms),
                );
            }
            Verdict::UpstreamFailure => {
                routing::release(host.store(), worker_id);
                host.increment(&metrics::setups(worker_id, "failed"));
                let now = host.now_ms();
                if routing::record_upstream_failure(host.store(), config, worker_id, now) {
                    host.increment(&metrics::ejections(worker_id));
                    host.log(
                        LogLevel::Warn,
                        &format!(
                            "worker {worker_id} ejected for {} ms after upstream failures",
                            config.eject_ms
                        ),
                    );
                }
            }
            Verdict::Neutral => routing::release(host.store(), worker_id),
        }
    }

    fn hangup(
        &mut self,
        host: &mut dyn HttpHost,
        call_id: &str,
        kind: realtime_relay_proto::call_id::Kind,
    ) -> Action {
        if let Err(e) = classify::check_call_id(call_id, kind) {
            return self.fail(host, &e);
        }
        let config = Rc::clone(&self.config);
        // Only a call's owner or an operator ends it; the relay answers anyone else as for
        // an unknown id. Without credentials, only where anonymous callers are admitted.
        let caller = match self.caller(host) {
            Ok(c) => c,
            Err(e) => return self.fail(host, &e),
        };
        if caller == Caller::Anonymous && !config.admits_anonymous() {
            return self.fail(host, &FilterError::MissingApiKey);
        }
        // The relay that holds the call: the pod its id names (verified), the replica its
        // id names, or the one relay cluster.
        let target = match &config.pods {
            Some(pods) => match pods.owner(call_id) {
                Some(addr) => Ok((pods.cluster.as_str(), addr.to_string())),
                None => Err(FilterError::CallNotFound),
            },
            None => replica::cluster_for_call(&config, call_id).map(|c| (c, String::new())),
        };
        let (cluster, original_dst) = match target {
            Ok(t) => t,
            Err(e) => return self.fail(host, &e),
        };
        let message = relay::encode_hangup(
            call_id,
            &caller.principal(&config),
            caller.is_operator(&config),
        );
        let dispatched = host.dispatch_grpc(&GrpcCall {
            cluster,
            service: relay::SERVICE_NAME,
            method: relay::METHOD_HANGUP,
            call_id,
            request_id: &self.request_id,
            message: &message,
            timeout_ms: config.hangup_timeout_ms,
            original_dst: &original_dst,
        });
        match dispatched {
            Ok(token) => {
                self.state = State::HangingUp {
                    token,
                    principal: if caller.is_operator(&config) {
                        String::new()
                    } else {
                        caller.principal(&config)
                    },
                };
                Action::Pause
            }
            Err(_) => {
                let e = self.relay_unavailable();
                self.fail(host, &e)
            }
        }
    }

    /// A sideband upgrade (`crate::sideband`): the caller must own the call (or be an
    /// operator); the relay says so, and where the call runs, in its `GetCall` answer. The
    /// request stays held in its headers until then.
    fn attach(
        &mut self,
        host: &mut dyn HttpHost,
        call_id: &str,
        kind: realtime_relay_proto::call_id::Kind,
    ) -> Action {
        if let Err(e) = classify::check_call_id(call_id, kind) {
            return self.fail(host, &e);
        }
        let config = Rc::clone(&self.config);
        let caller = match self.caller(host) {
            Ok(c) => c,
            Err(e) => return self.fail(host, &e),
        };
        if caller == Caller::Anonymous && !config.admits_anonymous() {
            return self.fail(host, &FilterError::MissingApiKey);
        }
        let target = match &config.pods {
            Some(pods) => match pods.owner(call_id) {
                Some(addr) => Ok((pods.cluster.as_str(), addr.to_string())),
                None => Err(FilterError::CallNotFound),
            },
            None => replica::cluster_for_call(&config, call_id).map(|c| (c, String::new())),
        };
        let (cluster, original_dst) = match target {
            Ok(t) => t,
            Err(e) => return self.fail(host, &e),
        };
        let message = relay::encode_get(
            call_id,
            &caller.principal(&config),
            caller.is_operator(&config),
        );
        let dispatched = host.dispatch_grpc(&GrpcCall {
            cluster,
            service: relay::SERVICE_NAME,
            method: relay::METHOD_GET,
            call_id,
            request_id: &self.request_id,
            message: &message,
            timeout_ms: config.hangup_timeout_ms,
            original_dst: &original_dst,
        });
        match dispatched {
            Ok(token) => {
                self.state = State::Attaching(Box::new(Attaching {
                    token,
                    kind,
                    caller,
                    authorization: host.request_header("authorization"),
                }));
                Action::Pause
            }
            Err(_) => {
                let e = self.relay_unavailable();
                self.fail(host, &e)
            }
        }
    }

    /// The relay's answer for a held sideband upgrade: rewrite it for the worker and let it
    /// go on, or answer it with the error.
    fn finish_attach(
        &mut self,
        host: &mut dyn HttpHost,
        a: &Attaching,
        status: u32,
        message: Option<&str>,
        body: Option<&[u8]>,
    ) {
        let config = Rc::clone(&self.config);
        let planned = match status {
            relay::grpc::OK => {
                match realtime_relay_proto::v1::CallInfo::decode(body.unwrap_or(&[])) {
                    Ok(info) => sideband::plan(
                        &config,
                        &info,
                        a.kind,
                        &a.caller,
                        a.authorization.as_deref(),
                    ),
                    Err(_) => Err(FilterError::RelayError {
                        code: Some("bad_relay_response".into()),
                    }),
                }
            }
            relay::grpc::NOT_FOUND => Err(FilterError::CallNotFound),
            _ => Err(relay::map_grpc_error(&config, status, message).0),
        };
        match planned {
            Ok(r) => {
                host.set_request_header(":path", Some(&r.path));
                host.set_request_header(":authority", Some(&r.authority));
                host.set_request_header("authorization", Some(&r.authorization));
                host.set_request_header(sideband::CLUSTER_HEADER, Some(&r.cluster));
                host.increment(metrics::REQ_SIDEBAND);
                self.state = State::PassThrough;
                host.resume_request();
            }
            Err(e) => {
                self.fail(host, &e);
            }
        }
    }

    fn finish_hangup(
        &mut self,
        host: &mut dyn HttpHost,
        principal: &str,
        status: u32,
        message: Option<&str>,
        body: Option<&[u8]>,
    ) {
        let r = relay::map_hangup_response(&self.config, status, message, body, &self.request_id);
        if let Some(w) = &r.worker_id {
            routing::release(host.store(), w);
            // The owner's live-call count: the caller's own, or the one the relay shows an
            // operator.
            let owner = if principal.is_empty() {
                &r.owner
            } else {
                principal
            };
            if !owner.is_empty() {
                limits::release_call(host.store(), owner);
            }
        }
        match &r.error_code {
            Some(code) => {
                host.increment(metrics::REQ_FAILED);
                host.count_error(code);
            }
            None => host.increment(metrics::REQ_HANGUP),
        }
        self.reply(host, &r.reply);
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_pods;
