//! The relay's domain operations: create, hang up, inspect and drain calls. The gRPC
//! service is a thin adapter over these, and tests call them directly too.

use crate::allowlist::{self, Allowlist};
use crate::bridge::{Bridge, BridgeLimits, BridgeTelemetry, LegSetup};
use crate::budget::SetupBudget;
use crate::call_state::{Caller, EndReason};
use crate::config::Limits;
use crate::error::SetupError;
use crate::ids;
use crate::media_socket::ClientPort;
use crate::media_tcp::TcpPort;
use crate::metrics::Metrics;
use crate::peer;
use crate::registry::{CallEntry, NewCall, Registry};
use crate::replica::{Peers, ReplicaIdentity};
use crate::session_ids::SessionIds;
use crate::shard::call::{CallResources, ShardCall};
use crate::shard::{Placement, Shards};
use crate::signaling::{
    ExchangeOutcome, UpstreamCall, UpstreamClient, UpstreamClientError, UpstreamHttp,
};
use crate::state_metrics::StateSizes;
use crate::upstream_body::UpstreamSession;
use crate::usage::Budget;
use crate::usage_tap::UsageTap;
use realtime_relay_proto::call_id::Kind;
use realtime_relay_proto::v1;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::channel::ChannelId;
use str0m::IceCreds;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use url::Url;

/// How long a hangup of a connected GPT-Live session waits for the provider to close it
/// itself (its hangup answered, its `session.closed` delivered to the client) before the relay
/// ends the call anyway. Short of the filter's hangup deadline (3 s by default), which also
/// has to cover the forced end's own close.
pub const LIVE_CLOSE_WAIT: Duration = Duration::from_millis(1_500);

pub struct RelaySettings {
    pub limits: Limits,
    /// Address put in the client-leg candidate.
    pub advertised_media_addr: SocketAddr,
    /// Address put in the client leg's passive ICE-TCP candidate, when the relay listens for
    /// ICE-TCP (`--media-tcp-addr`).
    pub advertised_media_tcp_addr: Option<SocketAddr>,
    /// Local IP for upstream sockets; None: the route's source address.
    pub upstream_media_ip: Option<IpAddr>,
    /// STUN server for the upstream leg's server-reflexive candidate, and how long to
    /// wait for it.
    pub upstream_stun: Option<(SocketAddr, Duration)>,
    /// This relay's name in call ids and the replicas it knows of, when it runs as one of
    /// several (`--replica-addr`).
    pub replica: Option<(ReplicaIdentity, Arc<Peers>)>,
}

pub struct Relay {
    settings: RelaySettings,
    registry: Arc<Registry>,
    client_port: Arc<ClientPort>,
    /// The media threads that run the calls.
    shards: Arc<Shards>,
    tcp_port: Option<Arc<TcpPort>>,
    upstream: UpstreamClient,
    allowlist: Arc<Allowlist>,
    metrics: Arc<Metrics>,
    tasks: tokio_util::task::TaskTracker,
}

/// Why GetCall or HangupCall found nothing to act on.
#[derive(Debug, PartialEq, Eq)]
pub enum LookupError {
    /// No such call, or one the caller may not see: the two are never told apart.
    NotFound,
    /// The caller's principal breaks the grammar (checked before any lookup).
    InvalidPrincipal,
}

/// `caller`, if its principal is well formed.
fn checked(caller: Caller<'_>) -> Result<Caller<'_>, LookupError> {
    if realtime_relay_proto::principal::is_valid(caller.principal) {
        Ok(caller)
    } else {
        Err(LookupError::InvalidPrincipal)
    }
}

impl Relay {
    /// `tcp_port` is the ICE-TCP listener, when `settings` advertise one. `shards` run the
    /// calls, one per socket of `client_port`.
    pub fn new(
        settings: RelaySettings,
        allowlist: Allowlist,
        client_port: Arc<ClientPort>,
        shards: Arc<Shards>,
        tcp_port: Option<Arc<TcpPort>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, UpstreamClientError> {
        let allowlist = Arc::new(allowlist);
        let upstream = UpstreamClient::new(
            allowlist.clone(),
            UpstreamHttp {
                connect_timeout: settings.limits.upstream_connect_timeout,
                exchange_timeout: settings.limits.upstream_timeout,
                max_body_bytes: settings.limits.max_upstream_body_bytes,
                pool_idle_timeout: settings.limits.upstream_pool_idle,
            },
        )?;
        Ok(Relay {
            registry: Arc::new(Registry::new(
                settings.limits.max_calls,
                settings.limits.ended_calls_kept,
            )),
            settings,
            client_port,
            shards,
            tcp_port,
            upstream,
            allowlist,
            metrics,
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sizes of every table the relay keeps and of its task sets, now. Called on the
    /// runtime (it reads the runtime's task count).
    pub fn state_sizes(&self) -> StateSizes {
        let (calls_live, calls_ended_kept) = self.registry.sizes();
        let (udp_routes_by_ufrag, udp_routes_by_addr) = self.client_port.route_count();
        let (tcp_routes_by_ufrag, tcp_routes_by_addr, tcp_connections_open) = match &self.tcp_port {
            Some(tcp) => {
                let (calls, conns) = tcp.route_counts();
                (calls, conns, tcp.open_connections())
            }
            None => (0, 0, 0),
        };
        StateSizes {
            calls_live,
            calls_ended_kept,
            udp_routes_by_ufrag,
            udp_routes_by_addr,
            tcp_routes_by_ufrag,
            tcp_routes_by_addr,
            tcp_connections_open,
            watchers: self.registry.watcher_count(),
            call_tasks: self.tasks.len(),
            runtime_tasks: tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_alive_tasks())
                .unwrap_or(0),
        }
    }

    /// Sets the state gauges from [`Self::state_sizes`] (before each scrape).
    pub fn refresh_state_gauges(&self) {
        self.metrics.state.set(&self.state_sizes());
        self.metrics.process.set(&crate::process_metrics::sample());
        self.metrics
            .worker_load
            .set(&self.registry.live_by_worker());
    }

    /// Sets up a call. Order matters: everything about the client's request is checked
    /// (and the offer accepted) before the upstream hears of it.
    pub async fn create_call(
        &self,
        req: v1::CreateCallRequest,
    ) -> Result<v1::CreateCallResponse, SetupError> {
        self.create_call_within(req, None).await
    }

    /// A setup that answers within the caller's `grpc_timeout` (less a margin), see
    /// [`SetupBudget`].
    pub async fn create_call_within(
        &self,
        req: v1::CreateCallRequest,
        grpc_timeout: Option<Duration>,
    ) -> Result<v1::CreateCallResponse, SetupError> {
        let started = Instant::now();
        let budget = SetupBudget::new(started, grpc_timeout, self.setup_ceiling());
        let call_id = self.call_id_for(&req).map_err(|e| self.failed(e, ""))?;
        let span = tracing::info_span!("call", call_id = %call_id, request_id = %req.request_id);
        let worker_id = req
            .upstream
            .as_ref()
            .map(|u| u.worker_id.clone())
            .unwrap_or_default();
        match self
            .setup(call_id.clone(), req, budget)
            .instrument(span.clone())
            .await
        {
            Ok(resp) => {
                self.metrics
                    .setup_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.worker_seen(&worker_id);
                Ok(resp)
            }
            Err(e) => {
                span.in_scope(|| {
                    if e.is_upstream_fault() {
                        tracing::warn!(code = e.code(), error = %e, "call setup failed upstream");
                    } else {
                        tracing::info!(code = e.code(), error = %e, "call setup refused");
                    }
                });
                Err(self.failed(e, &worker_id))
            }
        }
    }

    /// The id of the call `req` sets up: the caller's, checked against the grammar and the
    /// request's API (`rtc_` for Realtime, `live_` for GPT-Live), or a new one of that API;
    /// named after this replica when it is one.
    fn call_id_for(&self, req: &v1::CreateCallRequest) -> Result<String, SetupError> {
        let kind = request_kind(req)?;
        ids::check_requested(kind, &req.call_id)?;
        match &self.settings.replica {
            Some((me, _)) => me.name_call(&req.call_id, kind),
            None if req.call_id.is_empty() => Ok(ids::new_call_id_of(kind)),
            None => Ok(req.call_id.clone()),
        }
    }

    /// The longest a setup may take without a caller's deadline: resolving and connecting to
    /// the upstream, asking the STUN server, and the exchange.
    fn setup_ceiling(&self) -> Duration {
        let limits = &self.settings.limits;
        let stun = self
            .settings
            .upstream_stun
            .map_or(Duration::ZERO, |(_, wait)| wait);
        limits.upstream_connect_timeout + stun + limits.upstream_timeout
    }

    fn failed(&self, e: SetupError, worker_id: &str) -> SetupError {
        self.metrics.setup_failed(e.code());
        if e.is_upstream_fault() {
            self.metrics.worker_failed(worker_id);
        }
        e
    }

    /// The stages of a call's setup, in the order that keeps the upstream from hearing
    /// of a request we would refuse: check, reserve, accept the client's offer, offer
    /// upstream, then start the bridge.
    async fn setup(
        &self,
        call_id: String,
        req: v1::CreateCallRequest,
        budget: SetupBudget,
    ) -> Result<v1::CreateCallResponse, SetupError> {
        let checked = self.check_request(&req)?;
        // Stage 2: a place in the registry (limits, draining, duplicate ids), freed
        // again if a later stage fails.
        let entry = self.registry.reserve(NewCall {
            call_id: &call_id,
            api: checked.kind,
            model: req.model.trim(),
            upstream_model: checked.upstream_model,
            worker_id: &checked.upstream.worker_id,
            principal: &req.principal,
        })?;
        let reservation = Reservation {
            registry: &self.registry,
            call_id: &call_id,
            armed: true,
        };
        let now = Instant::now();
        let client = self.accept_client(&req.sdp_offer, now)?;
        let upstream = self.open_upstream_leg(&checked.base, now, budget).await?;
        let authorization = Some(checked.upstream.authorization.as_str()).filter(|a| !a.is_empty());
        // Each peer is told the largest message the other end takes (and the relay relays):
        // a peer that honours it never sends what could not be delivered.
        let max_message = self.max_message();
        let offer = peer::with_max_message_size(
            &upstream.leg.offer.to_sdp_string(),
            client.leg.data_channel.relayable(max_message),
        );
        let (answer_sdp, upstream_call_id) = match self
            .negotiate_upstream(&checked, authorization, &offer, budget)
            .await?
        {
            Negotiated::Answer {
                sdp,
                upstream_call_id,
            } => (sdp, upstream_call_id),
            Negotiated::Rejected(rejection) => {
                self.count_rejection(&checked.upstream.worker_id, rejection.status);
                return Ok(v1::CreateCallResponse {
                    call_id: call_id.clone(),
                    outcome: Some(v1::create_call_response::Outcome::UpstreamRejection(
                        rejection,
                    )),
                });
            }
        };
        // The provider chose where the relay sends media: its candidates get the same
        // private-address policy as its URL.
        let filtered = self.allowlist.filter_answer_candidates(&answer_sdp);
        self.count_refused_candidates(filtered.dropped);
        let answer_sdp = filtered.usable()?;
        let upstream = upstream.answered(&answer_sdp, &offer)?;
        let client_answer = peer::with_max_message_size(
            &client.answer_sdp,
            upstream.leg.data_channel.relayable(max_message),
        );
        // A Live client must only ever see the gateway's id, also inside the provider's events.
        let session_ids = match (&upstream_call_id, checked.kind) {
            (Some(id), Kind::Live) => SessionIds::new(id, &call_id),
            _ => None,
        };
        if let Some(id) = upstream_call_id {
            entry.set_upstream_call(Arc::new(UpstreamCall::new(
                checked.kind,
                checked.base.clone(),
                authorization,
                id,
            )));
        }
        let bridge = self
            .bridge(
                client.leg,
                upstream.leg,
                upstream.channel,
                &entry,
                Budget::from_proto(req.budget.as_ref()),
                now,
            )
            .with_api(checked.kind)
            .with_session_ids(session_ids);
        self.registry.announce_created(&entry);
        self.start_call(bridge, &client.ice, entry, upstream.socket);
        reservation.disarm();
        self.metrics.calls_created.inc();
        self.metrics.calls_active.inc();
        tracing::info!(worker = %checked.upstream.worker_id, model = %req.model.trim(), "call set up");
        // Who owns the call, at debug only: a stable hash per caller would let info-level
        // logs be correlated across calls.
        tracing::debug!(principal = %req.principal, "call owner");
        Ok(v1::CreateCallResponse {
            call_id,
            outcome: Some(v1::create_call_response::Outcome::SdpAnswer(client_answer)),
        })
    }

    /// Stage 1: everything about the client's request that needs no network.
    fn check_request<'r>(
        &self,
        req: &'r v1::CreateCallRequest,
    ) -> Result<CheckedRequest<'r>, SetupError> {
        if !realtime_relay_proto::principal::is_valid(&req.principal) {
            return Err(SetupError::InvalidPrincipal);
        }
        let kind = request_kind(req)?;
        peer::precheck_offer(&req.sdp_offer, self.settings.limits.max_offer_bytes)?;
        let upstream_model = if req.upstream_model.trim().is_empty() {
            req.model.trim()
        } else {
            req.upstream_model.trim()
        };
        let session = (!req.session_json.trim().is_empty()).then_some(req.session_json.as_str());
        // The session JSON is checked (and merged with the model) now, once; the body is
        // built from it once our offer exists.
        let session = UpstreamSession::new(kind, session, Some(upstream_model))?;
        let upstream = req.upstream.as_ref().ok_or(SetupError::MissingUpstream)?;
        if upstream.base_url.trim().is_empty() {
            return Err(SetupError::MissingUpstream);
        }
        let base = self.allowlist.check(upstream.base_url.trim())?;
        if !self.settings.limits.usage_metering
            && !Budget::from_proto(req.budget.as_ref()).is_none()
        {
            return Err(SetupError::BudgetUnavailable);
        }
        Ok(CheckedRequest {
            kind,
            upstream_model,
            session,
            upstream,
            base,
        })
    }

    /// Stage 3: accepts the client's offer. A bad offer fails here, before any upstream
    /// work.
    fn accept_client(&self, offer: &str, now: Instant) -> Result<AcceptedClient, SetupError> {
        let (ufrag, pass) = ids::new_ice_credentials();
        let ice = IceCreds { ufrag, pass };
        let client = peer::accept_client_offer(
            offer,
            self.settings.advertised_media_addr,
            self.advertised_tcp(),
            ice.clone(),
            self.max_message(),
            now,
        )?;
        let answer_sdp = client.answer_sdp;
        let data_channel = peer::data_channel_terms(offer, &answer_sdp);
        Ok(AcceptedClient {
            answer_sdp,
            leg: LegSetup {
                rtc: client.rtc,
                // Every datagram on the shared port is addressed, as far as ICE knows, to the
                // one host candidate we advertised: str0m drops STUN whose destination is not
                // a local candidate, and the bound address (0.0.0.0, a pod IP behind a
                // NodePort, a NATed port) is not one.
                local_addr: self.settings.advertised_media_addr,
                // The same for ICE-TCP frames: addressed to the advertised TCP candidate.
                tcp_local_addr: self.advertised_tcp(),
                audio_mid: client.audio_mid,
                data_channel,
            },
            ice,
        })
    }

    /// The largest data-channel message the relay takes from a peer: any message its per-call
    /// buffer (`--dc-buffer-bytes`) can hold.
    fn max_message(&self) -> usize {
        self.settings.limits.dc_buffer_bytes
    }

    /// The passive TCP candidate's address, if the relay listens for ICE-TCP.
    fn advertised_tcp(&self) -> Option<SocketAddr> {
        self.tcp_port
            .as_ref()
            .and(self.settings.advertised_media_tcp_addr)
    }

    /// Stage 4: the upstream leg's own socket, its reflexive address if a STUN server is
    /// configured, and our offer.
    async fn open_upstream_leg(
        &self,
        base: &Url,
        now: Instant,
        budget: SetupBudget,
    ) -> Result<UpstreamSide, SetupError> {
        let socket = self.bind_upstream_socket(base, budget).await?;
        let local = socket
            .local_addr()
            .map_err(|e| SetupError::Internal(format!("upstream socket: {e}")))?;
        let reflexive = match self.settings.upstream_stun {
            Some((server, wait)) => {
                let wait = budget.limit(wait, Instant::now());
                let found = crate::stun::discover_reflexive(&socket, server, wait).await;
                if found.is_none() {
                    tracing::warn!(%server, "no STUN answer; the upstream leg offers its host candidate only");
                }
                found
            }
            None => None,
        };
        let leg = peer::create_upstream_offer(local, reflexive, self.max_message(), now)?;
        Ok(UpstreamSide { socket, local, leg })
    }

    /// Stage 5: the HTTP exchange with the provider: its answer, or its rejection to
    /// pass back verbatim.
    async fn negotiate_upstream(
        &self,
        checked: &CheckedRequest<'_>,
        authorization: Option<&str>,
        offer_sdp: &str,
        budget: SetupBudget,
    ) -> Result<Negotiated, SetupError> {
        let body = checked.session.encode(offer_sdp);
        let timeout = budget.limit(self.settings.limits.upstream_timeout, Instant::now());
        let outcome = self
            .upstream
            .exchange(&checked.base, checked.kind, authorization, body, timeout)
            .await?;
        Ok(match outcome {
            ExchangeOutcome::Answer {
                sdp,
                upstream_call_id,
            } => Negotiated::Answer {
                sdp,
                upstream_call_id,
            },
            ExchangeOutcome::Rejected {
                status,
                content_type,
                body,
            } => {
                tracing::info!(status, "upstream rejected the call");
                Negotiated::Rejected(v1::UpstreamRejection {
                    status: status as u32,
                    content_type,
                    body,
                })
            }
        })
    }

    fn count_refused_candidates(&self, dropped: allowlist::DroppedCandidates) {
        if dropped.not_public + dropped.not_ip > 0 {
            // Counts only: a candidate's address is the provider's, not ours to log.
            tracing::info!(
                not_public = dropped.not_public,
                not_ip = dropped.not_ip,
                "dropped upstream ICE candidates the address policy refuses"
            );
        }
        self.metrics
            .upstream_address_refused("candidate_not_public", dropped.not_public);
        self.metrics
            .upstream_address_refused("candidate_not_ip", dropped.not_ip);
    }

    /// A provider's rejection is a setup failure by its status; a 5xx is the worker's.
    fn count_rejection(&self, worker_id: &str, status: u32) {
        self.metrics
            .setup_failed(&format!("upstream_status_{status}"));
        if status >= 500 {
            self.metrics.worker_failed(worker_id);
        }
    }

    /// Stage 6a: the sans-IO bridge over both legs, reporting into the call's counters
    /// and the process metrics.
    fn bridge(
        &self,
        client: LegSetup,
        upstream: LegSetup,
        upstream_channel: ChannelId,
        entry: &Arc<CallEntry>,
        budget: Budget,
        now: Instant,
    ) -> Bridge {
        let limits = &self.settings.limits;
        let mut telemetry = BridgeTelemetry::from_metrics(&self.metrics, entry.counters.clone());
        if limits.usage_metering {
            telemetry = telemetry.with_usage(UsageTap::new(
                entry.clone(),
                self.metrics.usage.clone(),
                budget,
            ));
        }
        Bridge::new(
            client,
            upstream,
            upstream_channel,
            BridgeLimits {
                dc_buffer_bytes: limits.dc_buffer_bytes,
                ice_timeout: limits.ice_timeout,
                peer_timeout: limits.peer_timeout,
                idle_timeout: limits.idle_timeout,
                max_duration: limits.max_call_duration,
            },
            telemetry,
            now,
        )
    }

    /// Stage 6b: routes the client's ufrag to the call and hands the call to a media shard.
    fn start_call(
        &self,
        bridge: Bridge,
        ice: &IceCreds,
        entry: Arc<CallEntry>,
        upstream_socket: UdpSocket,
    ) {
        let at = self.shards.place();
        let (tx, rx) = mpsc::channel(self.settings.limits.call_queue_datagrams);
        let inbox = self.shards.inbox(at, tx);
        let tcp_route = self
            .tcp_port
            .as_ref()
            .map(|port| port.register(&ice.ufrag, &ice.pass, inbox.clone()));
        let route = self
            .client_port
            .register(&ice.ufrag, &ice.pass, inbox.clone());
        let (ended, ended_rx) = oneshot::channel();
        let call = upstream_socket.into_std().and_then(|upstream_socket| {
            ShardCall::new(
                at.key,
                CallResources {
                    bridge,
                    entry: entry.clone(),
                    client_tcp: tcp_route,
                    client_rx: rx,
                    inbox,
                    upstream_socket,
                    upstream_allow_private: self.allowlist.allow_private(),
                    upstream_refused: self.metrics.upstream_addresses_refused.clone(),
                    connected_gauge: self.metrics.calls_connected.clone(),
                    route,
                    ended,
                },
            )
        });
        match call {
            Ok(call) => self.shards.run(at, call),
            // Cannot happen with a socket tokio made; the call ends at once if it does.
            Err(e) => {
                tracing::error!(error = %e, "cannot hand the upstream socket to a media shard")
            }
        }
        self.await_end(entry, at, ended_rx);
    }

    /// Binds the upstream leg's socket on the configured IP, or on the address the
    /// kernel would use to reach the upstream host (no packet is sent to find it).
    /// The host name is resolved within the connect timeout and what is left of the budget: a
    /// resolver that never answers must not hold the setup past the caller's deadline.
    async fn bind_upstream_socket(
        &self,
        base: &Url,
        budget: SetupBudget,
    ) -> Result<UdpSocket, SetupError> {
        let ip = match self.settings.upstream_media_ip {
            Some(ip) => ip,
            None => {
                let wait = self.settings.limits.upstream_connect_timeout;
                let resolving = allowlist::resolve_allowed(&self.allowlist, base);
                let target =
                    match tokio::time::timeout(budget.limit(wait, Instant::now()), resolving).await
                    {
                        Ok(resolved) => resolved?,
                        Err(_) if budget.remaining(Instant::now()).is_zero() => {
                            return Err(SetupError::UpstreamTimeout)
                        }
                        Err(_) => {
                            return Err(SetupError::UpstreamUnreachable(format!(
                                "resolving the upstream host took longer than {} ms",
                                wait.as_millis()
                            )))
                        }
                    };
                let probe = UdpSocket::bind(SocketAddr::new(unspecified_like(target.ip()), 0))
                    .await
                    .map_err(|e| SetupError::Internal(format!("upstream socket: {e}")))?;
                probe.connect(target).await.map_err(|e| {
                    SetupError::UpstreamUnreachable(format!("no route to the upstream: {e}"))
                })?;
                probe
                    .local_addr()
                    .map_err(|e| SetupError::Internal(format!("upstream socket: {e}")))?
                    .ip()
            }
        };
        UdpSocket::bind(SocketAddr::new(ip, 0)).await.map_err(|e| {
            SetupError::Internal(format!("cannot bind an upstream media socket on {ip}: {e}"))
        })
    }

    /// Waits for the call's end on its shard, asking the shard to end it when its entry is
    /// cancelled (hangup, drain, budget), then records the end and tells the provider.
    fn await_end(
        &self,
        entry: Arc<CallEntry>,
        at: Placement,
        mut ended: oneshot::Receiver<EndReason>,
    ) {
        let registry = self.registry.clone();
        let metrics = self.metrics.clone();
        let upstream = self.upstream.clone();
        let shards = self.shards.clone();
        let call_id = entry.call_id.clone();
        let span = tracing::info_span!("call", call_id = %call_id);
        let tasks = self.tasks.clone();
        self.tasks.spawn(
            async move {
                let reason = tokio::select! {
                    reason = &mut ended => reason,
                    _ = entry.cancel.cancelled() => {
                        shards.end(at);
                        ended.await
                    }
                };
                // No reason: the shard dropped the call without one (it could not start it).
                let reason = reason.unwrap_or(EndReason::InternalError);
                // The provider closing a call the relay asked it to end (a GPT-Live hangup)
                // is that end, not the provider's doing.
                let reason = match (reason, entry.requested_end()) {
                    (EndReason::UpstreamClosed | EndReason::SessionClosed, Some(asked)) => asked,
                    _ => reason,
                };
                if let Some(info) = registry.finish(&call_id, reason) {
                    crate::usage_record::log(&info);
                }
                metrics.calls_active.dec();
                metrics.ended(reason);
                if reason.is_worker_failure() {
                    metrics.worker_failed(&entry.worker_id);
                }
                tracing::info!(reason = reason.code(), "call ended");
                // Tell the provider when the end was ours, so it frees its side now (unless
                // it was told already: a GPT-Live hangup asks it first).
                if !reason.ended_by_provider() {
                    if let Some(call) = entry.upstream_call().filter(|c| c.claim_hangup()) {
                        let call = call.clone();
                        tasks.spawn(async move { upstream.hangup(&call).await });
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Ends a call; the flag says whether this hangup ended it (false: it had ended, or another
    /// request was ending it). Callers that count calls release them only once.
    ///
    /// Only for a `caller` that may act on the call ([`Caller::may_act_on`]): to anyone else
    /// the call is [`LookupError::NotFound`], as an unknown id, and it goes on untouched.
    pub async fn hangup(
        &self,
        call_id: &str,
        caller: Caller<'_>,
    ) -> Result<(v1::CallInfo, bool), LookupError> {
        let caller = checked(caller)?;
        if let Some(entry) = self.registry.live(call_id) {
            if !caller.may_act_on(&entry.principal) {
                refused(call_id, caller);
                return Err(LookupError::NotFound);
            }
            let live_first = match entry.upstream_call() {
                Some(upstream) if upstream.kind == Kind::Live && entry.is_connected() => {
                    let upstream = upstream.clone();
                    Some(self.close_live_session(&entry, &upstream).await)
                }
                _ => None,
            };
            return self
                .registry
                .end_and_wait(&entry, EndReason::Hangup, Duration::from_secs(5))
                .await
                .map(|(info, first)| (caller.shown(info), live_first.unwrap_or(first)))
                .ok_or(LookupError::NotFound);
        }
        // Ending an ended call is not an error: hangups are retried by clients.
        self.visible(call_id, caller).map(|info| (info, false))
    }

    /// Hangs up a connected GPT-Live session the way the Live API ends one, so that its client
    /// gets `session.closed` (reason and final usage) on the data channel: the relay asks the
    /// provider to hang up (`POST {base}/v1/live/sessions/{id}/hangup`) while the bridge still
    /// runs; the provider sends `session.closed` and closes; the bridge delivers the event and
    /// ends the call (recorded as `hangup`: the relay asked for it). At most
    /// [`LIVE_CLOSE_WAIT`]; the caller then ends whatever is left. Returns whether this request
    /// was the first to end the call.
    async fn close_live_session(&self, entry: &CallEntry, upstream: &UpstreamCall) -> bool {
        let first = entry.announce_end(EndReason::Hangup);
        // If whoever asked goes away meanwhile (its gRPC call cancelled, so this future is
        // dropped), the call must still end, not stay announced and running.
        let _ended_if_abandoned = EndOnDrop(entry);
        let deadline = Instant::now() + LIVE_CLOSE_WAIT;
        if upstream.claim_hangup() {
            let asked = tokio::time::timeout(LIVE_CLOSE_WAIT, self.upstream.hangup(upstream)).await;
            if asked.is_err() {
                tracing::info!(call_id = %entry.call_id, "the provider did not answer the Live hangup in time");
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if !entry.wait_ended(left).await {
            tracing::info!(call_id = %entry.call_id, "the provider did not close the Live session in time; ending it");
        }
        first
    }

    /// Runs a setup detached from the request that asked for it, tracked like call tasks (a
    /// drain waits for it).
    pub fn spawn_setup(&self, setup: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(setup);
    }

    /// Ends a call whose SDP answer nobody will receive (see [`EndReason::Abandoned`]).
    pub async fn abandon(&self, call_id: &str) {
        tracing::info!(
            call_id,
            "the caller left before the answer; ending the call"
        );
        if let Some(entry) = self.registry.live(call_id) {
            let _ = self
                .registry
                .end_and_wait(&entry, EndReason::Abandoned, Duration::from_secs(5))
                .await;
        }
    }

    /// One call, live or recently ended, as `caller` may see it: NOT_FOUND, as an unknown id,
    /// for a call it may not act on ([`Caller::may_act_on`]).
    pub fn get_call(&self, call_id: &str, caller: Caller<'_>) -> Result<v1::CallInfo, LookupError> {
        self.visible(call_id, checked(caller)?)
    }

    /// The call's info as `caller` is shown it, if it may act on the call.
    fn visible(&self, call_id: &str, caller: Caller<'_>) -> Result<v1::CallInfo, LookupError> {
        let info = self.registry.get(call_id).ok_or(LookupError::NotFound)?;
        if !caller.may_act_on(&info.principal) {
            refused(call_id, caller);
            return Err(LookupError::NotFound);
        }
        Ok(caller.shown(info))
    }

    pub fn list_calls(&self, include_ended: bool) -> v1::ListCallsResponse {
        self.metrics.list_calls.inc();
        let mut list = self.registry.list(include_ended);
        if let Some((me, peers)) = &self.settings.replica {
            list.replica_addr = me.addr().to_string();
            list.replicas = peers.snapshot();
        }
        list
    }

    /// Refuses new calls, lets live ones run until `deadline`, then ends the rest and
    /// waits (bounded) for their tasks to finish.
    pub async fn drain(&self, deadline: Duration) {
        self.registry.start_draining();
        self.metrics.drain_started(deadline);
        let live = self.registry.live_count();
        tracing::info!(live, deadline_secs = deadline.as_secs(), "draining");
        let until = Instant::now() + deadline;
        while self.registry.live_count() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.registry.end_all(EndReason::Drain);
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        // Every call has ended (and was published): watch streams may end.
        self.registry.watchers_done().cancel();
    }
}

/// Notes a GetCall or HangupCall refused because the call is someone else's (the caller got
/// NOT_FOUND). At debug level: the principal is a stable per-caller hash.
fn refused(call_id: &str, caller: Caller<'_>) {
    tracing::debug!(
        call_id,
        principal = caller.principal,
        "not the call's owner; answered as an unknown call"
    );
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    }
}

/// Ends its call as `hangup` when dropped: the Live close that holds it was either finished
/// (the caller then ends the call anyway, so this changes nothing) or abandoned.
struct EndOnDrop<'a>(&'a CallEntry);

impl Drop for EndOnDrop<'_> {
    fn drop(&mut self) {
        self.0.request_end(EndReason::Hangup);
    }
}

/// The API a request speaks; an `api` value the contract does not define is the caller's
/// fault.
fn request_kind(req: &v1::CreateCallRequest) -> Result<Kind, SetupError> {
    realtime_relay_proto::api_kind(req.api).ok_or(SetupError::UnsupportedApi(req.api))
}

/// A CreateCall request that passed every check needing no network.
struct CheckedRequest<'r> {
    /// The API it speaks, and so the upstream's path and body.
    kind: Kind,
    upstream_model: &'r str,
    /// The session for the upstream: the client's, with the upstream model set.
    session: UpstreamSession,
    upstream: &'r v1::Upstream,
    /// The upstream's base URL, on the allowlist.
    base: Url,
}

/// The client leg, accepted, with what the client gets back and what routes its
/// datagrams to the call.
struct AcceptedClient {
    leg: LegSetup,
    answer_sdp: String,
    /// The client leg's local ICE credentials, which we chose.
    ice: IceCreds,
}

/// The upstream leg before the provider answered.
struct UpstreamSide {
    socket: UdpSocket,
    local: SocketAddr,
    leg: peer::UpstreamLeg,
}

impl UpstreamSide {
    /// Applies the provider's answer: the leg is ready for the bridge.
    /// `offer_sdp` is the offer as sent (with its advertised message size).
    fn answered(self, answer_sdp: &str, offer_sdp: &str) -> Result<AnsweredUpstream, SetupError> {
        let mut rtc = self.leg.rtc;
        peer::accept_upstream_answer(&mut rtc, self.leg.pending, answer_sdp)?;
        Ok(AnsweredUpstream {
            leg: LegSetup {
                rtc,
                local_addr: self.local,
                tcp_local_addr: None,
                audio_mid: Some(self.leg.audio_mid),
                data_channel: peer::data_channel_terms(answer_sdp, offer_sdp),
            },
            channel: self.leg.channel,
            socket: self.socket,
        })
    }
}

struct AnsweredUpstream {
    leg: LegSetup,
    /// The `oai-events` channel our offer created.
    channel: ChannelId,
    socket: UdpSocket,
}

enum Negotiated {
    Answer {
        sdp: String,
        upstream_call_id: Option<String>,
    },
    /// The provider refused the call; the client gets its reply verbatim.
    Rejected(v1::UpstreamRejection),
}

/// Frees a registry reservation if setup fails after it.
struct Reservation<'a> {
    registry: &'a Registry,
    call_id: &'a str,
    armed: bool,
}

impl Reservation<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.registry.release(self.call_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider's answer as str0m writes it, advertising `candidate` as its only one.
    fn answer_from(offer: &str, candidate: SocketAddr) -> String {
        let mut rtc = rtc_peer::crypto::rtc_config()
            .unwrap()
            .build(Instant::now());
        rtc.add_local_candidate(str0m::Candidate::host(candidate, "udp").unwrap());
        let offer = str0m::change::SdpOffer::from_sdp_string(offer).unwrap();
        rtc.sdp_api().accept_offer(offer).unwrap().to_sdp_string()
    }

    /// The stages between the provider's answer and str0m: without private upstreams an
    /// answer whose only candidate is private is refused as the worker's fault (the filter
    /// answers 502 and counts it), and str0m never sees it; with them it is accepted.
    #[tokio::test]
    async fn a_private_only_upstream_answer_is_refused_unless_private_upstreams_are_allowed() {
        for (candidate, private_allowed, refused) in [
            ("10.0.0.7:40000", false, true),
            ("127.0.0.1:40000", false, true),
            ("[fd00::7]:40000", false, true),
            ("[64:ff9b::a00:7]:40000", false, true),
            ("10.0.0.7:40000", true, false),
            ("127.0.0.1:40000", true, false),
            ("162.159.140.245:3478", false, false),
        ] {
            let allowlist =
                Allowlist::new(&["https://api.openai.com".to_string()], private_allowed).unwrap();
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let local = socket.local_addr().unwrap();
            let leg =
                peer::create_upstream_offer(local, None, 1024 * 1024, Instant::now()).unwrap();
            let offer = leg.offer.to_sdp_string();
            let answer = answer_from(&offer, candidate.parse().unwrap());
            let side = UpstreamSide { socket, local, leg };
            let got = allowlist
                .filter_answer_candidates(&answer)
                .usable()
                .and_then(|sdp| side.answered(&sdp, &offer).map(|_| ()));
            match got {
                Ok(()) => assert!(!refused, "{candidate} private={private_allowed}"),
                Err(e) => {
                    assert!(refused, "{candidate} private={private_allowed}: {e}");
                    assert_eq!(e.code(), "upstream_candidates_not_allowed");
                    let status = tonic::Status::from(e);
                    assert_eq!(status.code(), tonic::Code::Internal);
                    assert_eq!(
                        realtime_relay_proto::error_code::class_of_message(status.message()),
                        Some(realtime_relay_proto::ErrorClass::Upstream)
                    );
                    assert!(!status
                        .message()
                        .contains(candidate.split(':').next().unwrap()));
                }
            }
        }
    }
}
