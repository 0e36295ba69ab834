//! The mock model provider: the Realtime API's `POST /v1/realtime/calls` and GPT-Live's
//! `POST /v1/live/sessions`, each with one str0m peer per call that echoes.
//!
//! HTTP side (axum): authenticate, record, parse, validate the offer with str0m *before*
//! allocating anything, then answer. Realtime: `application/sdp` or `multipart/form-data`,
//! answered `201` with the SDP answer and `Location: /v1/realtime/calls/rtc_…`. GPT-Live:
//! JSON `{session: {model, …}, transport: {type: "webrtc", sdp}}` (the `openai` package's
//! `LiveCreateParams`), answered `200` with `{session: {id: "live_…"}, transport: {type:
//! "webrtc", sdp}}` (`LiveCreateResponse`). Hangups: `POST /v1/realtime/calls/{id}/hangup`
//! and `POST /v1/live/sessions/{id}/hangup`, each for its own API's calls.
//!
//! Media side: each call owns a UDP socket on `media_ip:0` and a tokio task running the str0m
//! loop (ICE-lite answerer, RTP mode, Opus only). The task echoes every data-channel message
//! (same kind, same bytes) and every RTP packet (on its own send stream, with the payload type
//! it negotiated for the packet's codec). A Realtime call sends `session.created` when the
//! `oai-events` channel opens. A GPT-Live session sends `session.started` then, and
//! `session.usage.updated` (cumulative seconds) every [`CallLimits::usage_interval`]; it takes
//! `session.close` (not echoed) and refuses `session.start` (WebRTC creation started the
//! session already) with an `error` event. It ends on hangup, peer close/disconnect, no
//! connection within [`CallLimits::connect_timeout`], or no datagram from the peer for
//! [`CallLimits::idle_timeout`]; a GPT-Live session first sends `session.closed` where its peer
//! can still get it: reason `close_requested` on the client's `session.close` and on a hangup
//! (the package: "for an application close or hangup request"), `connection_lost` on the idle
//! timeout or an ICE disconnect (best effort: the peer may be gone). `remote_hangup` (the peer
//! closed) and `expired` are never sent: the peer that closed cannot read it, and the echo model
//! enforces no session duration.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::Rng;
use serde_json::Value;
use str0m::change::SdpOffer;
use str0m::channel::ChannelId;
use str0m::media::{MediaKind, Mid, Pt};
use str0m::rtp::{RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Rtc};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api_error::ApiError;
use crate::peer::{self, DEFAULT_QUEUE_CAP};
use crate::session::{
    live_error, live_session, session_closed, session_created, session_started, usage_updated,
    DEFAULT_LIVE_MODEL, DEFAULT_MODEL,
};
use rtc_peer::dc_queue::{DcQueue, FlushStep, Message};
use rtc_peer::multipart::{self, Limits, MultipartError};
use rtc_peer::udp::{self, UdpPeer, MAX_DATAGRAM};
use rtc_peer::EVENTS_CHANNEL;

/// Largest request body accepted. An SDP offer is a few KiB; multipart adds a session JSON.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Multipart bodies are taken as leniently as a web server would: bare LF line ends, parts
/// bounded only by the body limit.
const FORM_LIMITS: Limits = Limits {
    max_parts: 16,
    max_part_headers: 64,
    max_sdp_bytes: MAX_BODY_BYTES,
    max_session_bytes: MAX_BODY_BYTES,
    max_other_part_bytes: MAX_BODY_BYTES,
    bare_lf: true,
};

#[derive(Clone)]
pub struct ProviderConfig {
    /// Where the HTTP API listens (`127.0.0.1:0` in tests).
    pub http_addr: SocketAddr,
    /// IP to bind per-call UDP sockets on and to advertise in the host candidate.
    pub media_ip: IpAddr,
    /// `Some(k)`: require `Authorization: Bearer k`. `None`: require any non-empty bearer token.
    pub api_key: Option<String>,
    /// Test knob: answer every offer with `(status, content type, body)` instead.
    pub reject_with: Option<(u16, String, String)>,
}

/// Debug without the API key, so configs can be logged.
impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("http_addr", &self.http_addr)
            .field("media_ip", &self.media_ip)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("reject_with", &self.reject_with)
            .finish()
    }
}

impl ProviderConfig {
    /// Loopback HTTP on an ephemeral port, loopback media.
    pub fn local(api_key: Option<&str>) -> Self {
        ProviderConfig {
            http_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            media_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            api_key: api_key.map(str::to_string),
            reject_with: None,
        }
    }
}

/// Per-call limits. Kept out of [`ProviderConfig`] so that struct stays as others construct it.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// A call that has not completed ICE + DTLS by then is ended.
    pub connect_timeout: Duration,
    /// A call that has received no datagram at all (not even ICE consent checks) for this long
    /// is ended: the peer is gone without saying so.
    pub idle_timeout: Duration,
    /// Bytes of echoes waiting for SCTP send-buffer room; exceeding it ends the call, because
    /// silently dropping events would corrupt the event stream.
    pub dc_queue_cap: usize,
    /// At most this many live calls; further offers get 503.
    pub max_calls: usize,
    /// Test knob: the IP the answer's host candidate advertises (with the call socket's port)
    /// instead of the bound `media_ip`, to show a relay an answer pointing its media
    /// elsewhere. Media only flows when it is an address that reaches the socket.
    pub advertised_ip: Option<IpAddr>,
    /// GPT-Live: how often a session reports its cumulative usage (`session.usage.updated`).
    pub usage_interval: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            connect_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            dc_queue_cap: DEFAULT_QUEUE_CAP,
            max_calls: 10_000,
            advertised_ip: None,
            usage_interval: Duration::from_secs(1),
        }
    }
}

/// How long a GPT-Live session that is closing waits for its peer to acknowledge
/// `session.closed` before it closes anyway.
const LIVE_CLOSE_LINGER: Duration = Duration::from_secs(1);
/// The same when the peer seems gone (idle timeout, ICE disconnect): a short best effort.
const LIVE_LOST_LINGER: Duration = Duration::from_millis(250);

/// Which API a call was created through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/realtime/calls`
    Realtime,
    /// `POST /v1/live/sessions`
    Live,
}

/// One create (`POST /v1/realtime/calls` or `POST /v1/live/sessions`) as received (recorded
/// before authentication and validation).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The path it was posted to.
    pub path: String,
    pub content_type: String,
    pub query_model: Option<String>,
    /// Realtime: the multipart `session` part. GPT-Live: the body's `session` object.
    pub session: Option<Value>,
    pub authorization: Option<String>,
    /// The offer (GPT-Live: `transport.sdp`); the raw body when it could not be read.
    pub sdp: String,
    /// GPT-Live: the whole JSON body, when it was JSON.
    pub json: Option<Value>,
}

/// Totals across all calls since start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProviderStats {
    pub calls_created: u64,
    pub rtp_packets_received: u64,
    pub rtp_bytes_received: u64,
    pub rtp_packets_echoed: u64,
    pub rtp_bytes_echoed: u64,
    /// RTP packets that could not be echoed (no send stream, unknown payload type).
    pub rtp_packets_dropped: u64,
    pub dc_messages_received: u64,
    pub dc_bytes_received: u64,
    /// Data-channel messages handed to SCTP (echoes and `session.created`).
    pub dc_messages_sent: u64,
    pub dc_bytes_sent: u64,
    /// Data-channel messages that could not be sent (write error, channel gone, queue cap).
    pub dc_messages_dropped: u64,
    /// UDP datagrams the socket refused to send.
    pub udp_send_errors: u64,
}

#[derive(Default)]
struct Counters {
    calls_created: AtomicU64,
    rtp_packets_received: AtomicU64,
    rtp_bytes_received: AtomicU64,
    rtp_packets_echoed: AtomicU64,
    rtp_bytes_echoed: AtomicU64,
    rtp_packets_dropped: AtomicU64,
    dc_messages_received: AtomicU64,
    dc_bytes_received: AtomicU64,
    dc_messages_sent: AtomicU64,
    dc_bytes_sent: AtomicU64,
    dc_messages_dropped: AtomicU64,
    udp_send_errors: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> ProviderStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProviderStats {
            calls_created: g(&self.calls_created),
            rtp_packets_received: g(&self.rtp_packets_received),
            rtp_bytes_received: g(&self.rtp_bytes_received),
            rtp_packets_echoed: g(&self.rtp_packets_echoed),
            rtp_bytes_echoed: g(&self.rtp_bytes_echoed),
            rtp_packets_dropped: g(&self.rtp_packets_dropped),
            dc_messages_received: g(&self.dc_messages_received),
            dc_bytes_received: g(&self.dc_bytes_received),
            dc_messages_sent: g(&self.dc_messages_sent),
            dc_bytes_sent: g(&self.dc_bytes_sent),
            dc_messages_dropped: g(&self.dc_messages_dropped),
            udp_send_errors: g(&self.udp_send_errors),
        }
    }
}

struct CallEntry {
    api: Api,
    /// Where attached sideband sockets get the call's events and send theirs.
    taps: crate::sideband::Taps,
    cancel: CancellationToken,
    /// GPT-Live: a hangup asks the session to close (it sends `session.closed` first).
    close: CancellationToken,
    /// Becomes `true` when the call's task has finished and freed its socket.
    done: watch::Receiver<bool>,
}

struct Shared {
    api_key: Option<String>,
    media_ip: IpAddr,
    reject_with: Option<(u16, String, String)>,
    limits: CallLimits,
    requests: Mutex<Vec<RecordedRequest>>,
    hangups: Mutex<Vec<String>>,
    /// Ids of calls a sideband attached to, in order.
    attaches: Mutex<Vec<String>>,
    calls: Mutex<HashMap<String, CallEntry>>,
    tasks: Mutex<JoinSet<()>>,
    counters: Counters,
    /// Parent of every call's cancel token; cancelled on shutdown.
    shutdown: CancellationToken,
}

/// Locks a mutex, recovering the data if a panicking call task poisoned it: the data is plain
/// bookkeeping that stays consistent between statements.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct MockProvider {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl MockProvider {
    pub async fn start(config: ProviderConfig) -> anyhow::Result<MockProvider> {
        Self::start_with_limits(config, CallLimits::default()).await
    }

    pub async fn start_with_limits(
        config: ProviderConfig,
        limits: CallLimits,
    ) -> anyhow::Result<MockProvider> {
        // Fail at start, not on the first call, if str0m cannot get crypto.
        peer::rtc_builder().context("initialising str0m crypto")?;

        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .with_context(|| format!("binding HTTP on {}", config.http_addr))?;
        let local_addr = listener.local_addr().context("HTTP local address")?;
        let shared = Arc::new(Shared {
            api_key: config.api_key,
            media_ip: config.media_ip,
            reject_with: config.reject_with,
            limits,
            requests: Mutex::new(Vec::new()),
            hangups: Mutex::new(Vec::new()),
            attaches: Mutex::new(Vec::new()),
            calls: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            counters: Counters::default(),
            shutdown: CancellationToken::new(),
        });
        let app = router(shared.clone());
        let stop = shared.shutdown.clone();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "echo model HTTP server failed");
            }
        });
        tracing::info!(http = %local_addr, media_ip = %config.media_ip, "echo model listening");
        Ok(MockProvider {
            shared,
            local_addr,
            server: Some(server),
        })
    }

    /// `http://IP:PORT` of the HTTP API.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every create (`POST /v1/realtime/calls`, `POST /v1/live/sessions`) received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Live peer connections (calls whose task has not finished).
    pub fn active_calls(&self) -> usize {
        lock(&self.shared.calls).len()
    }

    /// Ids of calls hung up via `POST /v1/realtime/calls/{id}/hangup` (`rtc_…`) or
    /// `POST /v1/live/sessions/{id}/hangup` (`live_…`), in order.
    pub fn hangups(&self) -> Vec<String> {
        lock(&self.shared.hangups).clone()
    }

    /// Ids of calls a sideband socket attached to (`GET /v1/realtime?call_id=…`,
    /// `GET /v1/live/sessions/{id}/attach`), in order.
    pub fn sideband_attaches(&self) -> Vec<String> {
        lock(&self.shared.attaches).clone()
    }

    pub fn stats(&self) -> ProviderStats {
        self.shared.counters.snapshot()
    }

    /// Wait until `active_calls() == n` or the timeout passes; returns whether it happened.
    pub async fn wait_for_active_calls(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.active_calls() == n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stop the HTTP server and every call, and wait until their sockets are freed.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(server) = self.server.take() {
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "HTTP server task ended abnormally");
            }
        }
        let mut tasks = std::mem::take(&mut *lock(&self.shared.tasks));
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("call tasks did not stop within 5 s; aborting them");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

impl Drop for MockProvider {
    /// Dropping without `shutdown` still stops the server and calls (asynchronously).
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/realtime/calls", post(create_call))
        .route("/v1/realtime/calls/{call_id}/hangup", post(hangup))
        .route("/v1/live/sessions", post(create_live_session))
        .route("/v1/live/sessions/{session_id}/hangup", post(hangup_live))
        .route("/v1/realtime", get(attach_realtime))
        .route("/v1/live/sessions/{session_id}/attach", get(attach_live))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn check_auth(shared: &Shared, authorization: Option<&str>) -> Result<(), ApiError> {
    let token = authorization
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
        .ok_or(ApiError::InvalidApiKey)?;
    match &shared.api_key {
        Some(k) if k != token => Err(ApiError::InvalidApiKey),
        _ => Ok(()),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let query = query?;
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(
        &format!("/?{query}").parse().ok()?,
    )
    .ok()
    .and_then(|q| q.0.get(name).cloned())
}

/// What the request body carried, before SDP validation.
struct ParsedBody {
    sdp: Result<String, ApiError>,
    session: Option<Value>,
}

fn parse_body(content_type: &str, body: &[u8]) -> Result<ParsedBody, ApiError> {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/sdp" => Ok(ParsedBody {
            sdp: sdp_text(body),
            session: None,
        }),
        "multipart/form-data" => {
            let form = multipart::boundary(content_type)
                .and_then(|b| multipart::parse(body, &b, &FORM_LIMITS))
                .map_err(malformed)?;
            let sdp = form
                .sdp
                .map(|p| sdp_text(p.data))
                .unwrap_or(Err(ApiError::MissingSdp));
            let session = match form.session {
                Some(p) => Some(
                    serde_json::from_slice::<Value>(p.data)
                        .map_err(|e| ApiError::InvalidSessionJson(e.to_string()))?,
                ),
                None => None,
            };
            if let Some(s) = &session {
                if !s.is_object() {
                    return Err(ApiError::InvalidSessionJson("not a JSON object".into()));
                }
            }
            Ok(ParsedBody { sdp, session })
        }
        _ => Err(ApiError::InvalidContentType),
    }
}

fn malformed(e: MultipartError) -> ApiError {
    ApiError::MalformedMultipart(match e {
        MultipartError::Malformed(why) => why.reason().to_string(),
        other => other.to_string(),
    })
}

fn sdp_text(bytes: &[u8]) -> Result<String, ApiError> {
    let s = std::str::from_utf8(bytes)
        .map_err(|_| ApiError::InvalidSdp("not UTF-8".into()))?
        .to_string();
    if s.trim().is_empty() {
        return Err(ApiError::MissingSdp);
    }
    Ok(s)
}

async fn create_call(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
    let authorization = header_str(&headers, header::AUTHORIZATION);
    let query_model = query_param(query.as_deref(), "model");
    let parsed = parse_body(&content_type, &body);

    let (sdp_for_record, session_for_record) = match &parsed {
        Ok(p) => (p.sdp.clone().unwrap_or_default(), p.session.clone()),
        Err(_) => (String::from_utf8_lossy(&body).into_owned(), None),
    };
    lock(&shared.requests).push(RecordedRequest {
        path: "/v1/realtime/calls".into(),
        content_type: content_type.clone(),
        query_model: query_model.clone(),
        session: session_for_record,
        authorization: authorization.clone(),
        sdp: sdp_for_record,
        json: None,
    });

    if let Err(e) = check_auth(&shared, authorization.as_deref()) {
        tracing::info!(code = e.code(), "offer refused: authentication");
        return e.into_response();
    }
    if let Some((status, ct, body)) = &shared.reject_with {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, [(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response();
    }
    let ParsedBody { sdp, session } = match parsed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let sdp = match sdp {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let model = session
        .as_ref()
        .and_then(|s| s.get("model"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or(query_model)
        .unwrap_or_else(|| DEFAULT_MODEL.to_string());

    match start_call(&shared, &sdp, model, session, Api::Realtime) {
        Ok((call_id, answer)) => (
            StatusCode::CREATED,
            [
                (header::CONTENT_TYPE, "application/sdp".to_string()),
                (header::LOCATION, format!("/v1/realtime/calls/{call_id}")),
            ],
            answer,
        )
            .into_response(),
        Err(CallStartError::Api(e)) => {
            tracing::info!(code = e.code(), "offer refused");
            e.into_response()
        }
        Err(CallStartError::Busy) => busy(),
    }
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"error": {"message": "Too many concurrent calls.",
            "type": "server_error", "param": null, "code": "too_many_calls"}})
        .to_string(),
    )
        .into_response()
}

/// A GPT-Live create body, checked as the Live API checks it.
struct LiveBody {
    model: String,
    session: Value,
    sdp: String,
}

/// Checks a GPT-Live create body (`LiveCreateParams`): JSON, `session` an object with a
/// non-empty string `model`, `transport.type` `"webrtc"` and a `transport.sdp` string. The
/// offer itself is checked afterwards, as for Realtime.
fn parse_live_body(content_type: &str, body: &[u8]) -> Result<LiveBody, ApiError> {
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" {
        return Err(ApiError::InvalidJsonContentType);
    }
    let json: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(mut json) = json else {
        return Err(ApiError::InvalidJson(
            "the body is not a JSON object".into(),
        ));
    };
    let invalid = |param, why: &str| ApiError::InvalidValue {
        param,
        why: why.to_string(),
    };
    let session = json
        .remove("session")
        .ok_or(ApiError::MissingParameter("session"))?;
    if !session.is_object() {
        return Err(invalid("session", "expected an object"));
    }
    let model = match session.get("model") {
        None | Some(Value::Null) => return Err(ApiError::MissingParameter("session.model")),
        Some(Value::String(m)) if m.trim().is_empty() => {
            return Err(ApiError::MissingParameter("session.model"))
        }
        Some(Value::String(m)) => m.trim().to_string(),
        Some(_) => return Err(invalid("session.model", "expected a string")),
    };
    let transport = json
        .remove("transport")
        .ok_or(ApiError::MissingParameter("transport"))?;
    let Value::Object(transport) = transport else {
        return Err(invalid("transport", "expected an object"));
    };
    match transport.get("type") {
        None | Some(Value::Null) => return Err(ApiError::MissingParameter("transport.type")),
        Some(Value::String(t)) if t == "webrtc" => {}
        Some(_) => return Err(invalid("transport.type", "expected 'webrtc'")),
    }
    let sdp = match transport.get("sdp") {
        None | Some(Value::Null) => return Err(ApiError::MissingParameter("transport.sdp")),
        Some(Value::String(sdp)) if sdp.trim().is_empty() => return Err(ApiError::MissingSdp),
        Some(Value::String(sdp)) => sdp.clone(),
        Some(_) => return Err(invalid("transport.sdp", "expected a string")),
    };
    Ok(LiveBody {
        model,
        session,
        sdp,
    })
}

/// `POST /v1/live/sessions`: a GPT-Live WebRTC session.
async fn create_live_session(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let content_type = header_str(&headers, header::CONTENT_TYPE).unwrap_or_default();
    let authorization = header_str(&headers, header::AUTHORIZATION);
    let json = serde_json::from_slice::<Value>(&body).ok();
    let transport_sdp = json
        .as_ref()
        .and_then(|j| j.pointer("/transport/sdp"))
        .and_then(Value::as_str)
        .map(str::to_string);
    lock(&shared.requests).push(RecordedRequest {
        path: "/v1/live/sessions".into(),
        content_type: content_type.clone(),
        query_model: None,
        session: json.as_ref().and_then(|j| j.get("session")).cloned(),
        authorization: authorization.clone(),
        sdp: transport_sdp.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
        json,
    });

    if let Err(e) = check_auth(&shared, authorization.as_deref()) {
        tracing::info!(code = e.code(), "Live session refused: authentication");
        return e.into_response();
    }
    if let Some((status, ct, body)) = &shared.reject_with {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, [(header::CONTENT_TYPE, ct.clone())], body.clone()).into_response();
    }
    let LiveBody {
        model,
        session,
        sdp,
    } = match parse_live_body(&content_type, &body) {
        Ok(b) => b,
        Err(e) => {
            tracing::info!(code = e.code(), "Live session refused");
            return e.into_response();
        }
    };
    let model = if model.is_empty() {
        DEFAULT_LIVE_MODEL.to_string()
    } else {
        model
    };
    match start_call(&shared, &sdp, model, Some(session), Api::Live) {
        Ok((session_id, answer)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({
                "session": {"id": session_id},
                "transport": {"type": "webrtc", "sdp": answer},
            })
            .to_string(),
        )
            .into_response(),
        Err(CallStartError::Api(e)) => {
            tracing::info!(code = e.code(), "Live session refused");
            e.into_response()
        }
        Err(CallStartError::Busy) => busy(),
    }
}

enum CallStartError {
    Api(ApiError),
    Busy,
}

impl From<ApiError> for CallStartError {
    fn from(e: ApiError) -> Self {
        CallStartError::Api(e)
    }
}

/// Validate the offer, then (only then) bind a socket, build the `Rtc`, answer and spawn.
fn start_call(
    shared: &Arc<Shared>,
    sdp: &str,
    model: String,
    session: Option<Value>,
    api: Api,
) -> Result<(String, String), CallStartError> {
    if !sdp.trim_start().starts_with("v=0") {
        return Err(ApiError::InvalidSdp("must start with v=0".into()).into());
    }
    let offer = SdpOffer::from_sdp_string(sdp).map_err(|e| ApiError::InvalidSdp(e.to_string()))?;
    if lock(&shared.calls).len() >= shared.limits.max_calls {
        return Err(CallStartError::Busy);
    }

    let socket = udp::bind(shared.media_ip).map_err(|e| ApiError::Internal(e.to_string()))?;
    let local = socket
        .local_addr()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut rtc = peer::rtc_builder()
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .set_ice_lite(true)
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .build(Instant::now());
    let advertised = match shared.limits.advertised_ip {
        Some(ip) => SocketAddr::new(ip, local.port()),
        None => local,
    };
    let candidate =
        Candidate::host(advertised, "udp").map_err(|e| ApiError::Internal(e.to_string()))?;
    rtc.add_local_candidate(candidate);
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| ApiError::InvalidSdp(e.to_string()))?;

    let udp = UdpPeer::new(rtc, socket).map_err(|e| ApiError::Internal(e.to_string()))?;
    let call_id = match api {
        Api::Realtime => crate::ids::call_id(),
        Api::Live => crate::ids::live_session_id(),
    };
    let cancel = shared.shutdown.child_token();
    let close = CancellationToken::new();
    let (done_tx, done_rx) = watch::channel(false);
    let (inbound_tx, inbound_rx) = tokio::sync::mpsc::channel(crate::sideband::INBOUND_QUEUE);
    let taps = crate::sideband::Taps {
        mirror: tokio::sync::broadcast::channel(crate::sideband::OUTBOUND_BUFFER).0,
        inbound: inbound_tx,
    };
    lock(&shared.calls).insert(
        call_id.clone(),
        CallEntry {
            api,
            taps: taps.clone(),
            cancel: cancel.clone(),
            close: close.clone(),
            done: done_rx,
        },
    );
    add(&shared.counters.calls_created, 1);
    tracing::info!(call_id = %call_id, model = %model, media = %local, ?api, "call created");

    let call = Call::new(
        call_id.clone(),
        model,
        session,
        shared.clone(),
        udp,
        api,
        taps.mirror,
    );
    let task_shared = shared.clone();
    let mut tasks = lock(&shared.tasks);
    // Reap finished tasks so the set does not grow with every call ever made.
    while tasks.try_join_next().is_some() {}
    tasks.spawn(async move {
        // The guard unregisters the call even if the task panics, so a panic in one call
        // frees its slot and cannot affect others.
        let _guard = CallGuard {
            shared: task_shared,
            call_id: call.call_id.clone(),
            done: done_tx,
        };
        call.run(cancel, close, inbound_rx).await;
    });
    Ok((call_id, answer.to_sdp_string()))
}

struct CallGuard {
    shared: Arc<Shared>,
    call_id: String,
    done: watch::Sender<bool>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        lock(&self.shared.calls).remove(&self.call_id);
        let _ = self.done.send(true);
    }
}

/// `POST /v1/realtime/calls/{id}/hangup`
async fn hangup(
    State(shared): State<Arc<Shared>>,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    hang_up(&shared, Api::Realtime, call_id, &headers).await
}

/// `POST /v1/live/sessions/{id}/hangup`: the session sends `session.closed` (reason
/// `close_requested`) to its peer, waits (briefly) for it to be acknowledged, then closes.
async fn hangup_live(
    State(shared): State<Arc<Shared>>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    hang_up(&shared, Api::Live, session_id, &headers).await
}

/// `GET /v1/realtime?call_id=rtc_…` (WebSocket): the Realtime sideband of a call.
async fn attach_realtime(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    let Some(call_id) = query_param(query.as_deref(), "call_id") else {
        // The Realtime WebSocket without a call (a new conversation) is not served here.
        return ApiError::CallNotFound.into_response();
    };
    attach(&shared, Api::Realtime, call_id, &headers, ws)
}

/// `GET /v1/live/sessions/{id}/attach` (WebSocket): the GPT-Live sideband of a session.
async fn attach_live(
    State(shared): State<Arc<Shared>>,
    Path(session_id): Path<String>,
    headers: HeaderMap,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    attach(&shared, Api::Live, session_id, &headers, ws)
}

fn attach(
    shared: &Shared,
    api: Api,
    call_id: String,
    headers: &HeaderMap,
    ws: axum::extract::WebSocketUpgrade,
) -> Response {
    if let Err(e) = check_auth(
        shared,
        header_str(headers, header::AUTHORIZATION).as_deref(),
    ) {
        return e.into_response();
    }
    // Each API's sideband finds only its own calls.
    let taps = lock(&shared.calls)
        .get(&call_id)
        .filter(|e| e.api == api)
        .map(|e| e.taps.clone());
    let Some(taps) = taps else {
        return ApiError::CallNotFound.into_response();
    };
    lock(&shared.attaches).push(call_id.clone());
    tracing::info!(call_id = %call_id, ?api, "sideband attached");
    let (events, inbound) = (taps.mirror.subscribe(), taps.inbound);
    ws.on_upgrade(move |socket| crate::sideband::pump(socket, events, inbound, call_id))
}

async fn hang_up(shared: &Shared, api: Api, call_id: String, headers: &HeaderMap) -> Response {
    let authorization = header_str(headers, header::AUTHORIZATION);
    if let Err(e) = check_auth(shared, authorization.as_deref()) {
        return e.into_response();
    }
    // Each API's hangup finds only its own calls.
    let entry = lock(&shared.calls)
        .get(&call_id)
        .filter(|e| e.api == api)
        .map(|e| (e.cancel.clone(), e.close.clone(), e.done.clone()));
    let Some((cancel, close, mut done)) = entry else {
        return ApiError::CallNotFound.into_response();
    };
    lock(&shared.hangups).push(call_id.clone());
    if api == Api::Live {
        // Politely first: the session says goodbye.
        close.cancel();
        let wait = LIVE_CLOSE_LINGER + Duration::from_millis(500);
        if tokio::time::timeout(wait, done.wait_for(|d| *d))
            .await
            .is_ok()
        {
            tracing::info!(call_id = %call_id, "Live session hung up");
            return StatusCode::OK.into_response();
        }
    }
    cancel.cancel();
    // Answer once the call is really gone, so callers can rely on active_calls() right away.
    if tokio::time::timeout(Duration::from_secs(2), done.wait_for(|d| *d))
        .await
        .is_err()
    {
        tracing::warn!(call_id = %call_id, "call did not stop within 2 s of hangup");
    }
    tracing::info!(call_id = %call_id, "call hung up");
    StatusCode::OK.into_response()
}

/// Why a call ended (for logs).
#[derive(Debug, Clone, Copy)]
enum EndReason {
    HungUp,
    /// GPT-Live: the client's `session.close`.
    SessionClosed,
    PeerClosed,
    IceDisconnected,
    ConnectTimeout,
    IdleTimeout,
    QueueOverflow,
    RtcError,
}

struct Call {
    call_id: String,
    model: String,
    session: Option<Value>,
    shared: Arc<Shared>,
    udp: UdpPeer,
    state: CallState,
}

/// A GPT-Live session's own state on top of the echo.
#[derive(Default)]
struct LiveState {
    /// The resolved session, once `session.started` is queued.
    resolved: Option<Value>,
    /// When `session.started` was queued: usage counts from there.
    started_at: Option<Instant>,
    /// When the next `session.usage.updated` is due.
    next_usage: Option<Instant>,
    /// Asked to close (by the client, a hangup, a lost peer), `session.closed` not queued yet.
    close_asked: Option<CloseAsk>,
    /// `session.closed` is queued: the call ends once the peer acknowledged it, or then.
    closing: Option<(EndReason, Instant)>,
    /// Client events refused with an `error` event: their `event_id`s.
    refused: Vec<Option<String>>,
}

struct CloseAsk {
    /// `session.closed`'s reason.
    reason: &'static str,
    client_event_id: Option<String>,
    /// How long to wait for the peer's acknowledgement.
    linger: Duration,
    /// What the call's end is logged as.
    end: EndReason,
}

impl LiveState {
    fn usage_seconds(&self, now: Instant) -> f64 {
        let secs = self
            .started_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        // Milliseconds: a stable, readable total.
        (secs * 1000.0).round() / 1000.0
    }

    /// Whether the session can still say goodbye: it started, and is not saying it already.
    fn can_close(&self) -> bool {
        self.started_at.is_some() && self.close_asked.is_none() && self.closing.is_none()
    }

    /// The earliest of the session's own timers.
    fn next_timer(&self) -> Option<Instant> {
        match self.closing {
            Some((_, until)) => Some(until),
            None => self.next_usage,
        }
    }
}

/// A GPT-Live client command the session acts on instead of echoing.
enum LiveCommand {
    Close(Option<String>),
    /// `session.start`: only a primary WebSocket sends it; WebRTC creation started the session.
    Start(Option<String>),
}

/// What a GPT-Live session makes of a client text event: only `session.close` and
/// `session.start` are commands (a byte search first, so other events are not parsed).
fn live_command(data: &[u8]) -> Option<LiveCommand> {
    if !data.windows(b"session.".len()).any(|w| w == b"session.") {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: Option<String>,
        event_id: Option<String>,
    }
    let head: Head = serde_json::from_slice(data).ok()?;
    match head.kind.as_deref() {
        Some("session.close") => Some(LiveCommand::Close(head.event_id)),
        Some("session.start") => Some(LiveCommand::Start(head.event_id)),
        _ => None,
    }
}

/// The echo logic, separate from the socket so the event callback can borrow it while the
/// driver borrows the `Rtc`.
struct CallState {
    api: Api,
    /// GPT-Live only.
    live: LiveState,
    /// Realtime only: responses answered (`response.create` → `response.done` with usage).
    responses: crate::responses::Responses,
    audio_mid: Option<Mid>,
    events_channel: Option<ChannelId>,
    connected: bool,
    queue: DcQueue,
    next_seq: u64,
    ts_offset: u32,
    pending_session_created: bool,
    /// RTP was written during the last drain; it leaves on the next timeout input.
    wrote_rtp: bool,
    ended: Option<EndReason>,
    /// Every text event the call sends is mirrored here for attached sideband sockets.
    mirror: tokio::sync::broadcast::Sender<String>,
}

impl Call {
    fn new(
        call_id: String,
        model: String,
        session: Option<Value>,
        shared: Arc<Shared>,
        udp: UdpPeer,
        api: Api,
        mirror: tokio::sync::broadcast::Sender<String>,
    ) -> Self {
        let mut rng = rand::rng();
        let queue = peer::dc_queue(shared.limits.dc_queue_cap);
        Call {
            call_id,
            model,
            session,
            shared,
            udp,
            state: CallState {
                api,
                live: LiveState::default(),
                responses: Default::default(),
                audio_mid: None,
                events_channel: None,
                connected: false,
                queue,
                // Random start like a real sender, below 2^16 so the SRTP rollover counter
                // starts at 0 (a non-zero ROC would need out-of-band signalling).
                next_seq: rng.random_range(0..32_768),
                ts_offset: rng.random(),
                pending_session_created: false,
                wrote_rtp: false,
                ended: None,
                mirror,
            },
        }
    }

    async fn run(
        mut self,
        cancel: CancellationToken,
        close: CancellationToken,
        mut sideband: tokio::sync::mpsc::Receiver<String>,
    ) {
        let started = Instant::now();
        let mut last_rx = started;
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);

        let reason = loop {
            let deadline = match self.drive() {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(call_id = %self.call_id, error = %e, "str0m failed");
                    break EndReason::RtcError;
                }
            };
            if let Some(r) = self.state.ended {
                // A GPT-Live session whose peer may still listen says goodbye first.
                if matches!(r, EndReason::IceDisconnected) && self.state.live.can_close() {
                    self.state.ended = None;
                    self.state
                        .ask_close("connection_lost", None, LIVE_LOST_LINGER, r);
                    continue;
                }
                break r;
            }
            if !self.udp.shell.rtc().is_alive() {
                break EndReason::PeerClosed;
            }
            let now = Instant::now();
            if let Some((end, until)) = self.state.live.closing {
                if now >= until || self.state.goodbye_delivered(self.udp.rtc()) {
                    break end;
                }
            }
            if !self.state.connected && now >= started + self.shared.limits.connect_timeout {
                break EndReason::ConnectTimeout;
            }
            if now >= last_rx + self.shared.limits.idle_timeout && self.state.live.closing.is_none()
            {
                if self.state.live.can_close() {
                    self.state.ask_close(
                        "connection_lost",
                        None,
                        LIVE_LOST_LINGER,
                        EndReason::IdleTimeout,
                    );
                    continue;
                }
                break EndReason::IdleTimeout;
            }
            let deadline = match self.state.live.next_timer() {
                Some(t) => deadline.min(t),
                None => deadline,
            };
            sleep.as_mut().reset(udp::next_wake(deadline, now));

            let live = self.state.api == Api::Live;
            tokio::select! {
                _ = cancel.cancelled() => break EndReason::HungUp,
                // A GPT-Live hangup: `session.closed` first, where the session has started.
                _ = close.cancelled(), if live && self.state.live.close_asked.is_none()
                    && self.state.live.closing.is_none() => {
                    if !self.state.live.can_close() {
                        break EndReason::HungUp;
                    }
                    self.state.ask_close("close_requested", None, LIVE_CLOSE_LINGER, EndReason::HungUp);
                }
                Some(text) = sideband.recv() => self.on_sideband_event(text),
                r = self.udp.socket.recv_from(&mut buf) => match r {
                    Ok((n, source)) => {
                        last_rx = Instant::now();
                        self.udp.handle_datagram(&buf[..n], source, last_rx);
                    }
                    Err(e) => {
                        // ICMP-induced errors (peer port closed) surface here on Linux; the
                        // peer is gone or going, and the idle/ICE checks will end the call.
                        tracing::debug!(call_id = %self.call_id, error = %e, "UDP receive error");
                    }
                },
                _ = &mut sleep => {
                    if let Err(e) = self.udp.handle_timeout(Instant::now()) {
                        tracing::warn!(call_id = %self.call_id, error = %e, "str0m timeout handling failed");
                        break EndReason::RtcError;
                    }
                }
            }
        };

        self.udp.close_gracefully();
        add(
            &self.shared.counters.udp_send_errors,
            self.udp.counters.send_errors,
        );
        tracing::info!(
            call_id = %self.call_id,
            reason = ?reason,
            duration_ms = started.elapsed().as_millis() as u64,
            bad_datagrams = self.udp.counters.bad_datagrams,
            udp_send_errors = self.udp.counters.send_errors,
            "call ended"
        );
    }

    /// A text event from an attached sideband server: `session.update` is applied and answered
    /// with `session.updated`; anything else is handled as the call's client would have sent
    /// it on the data channel.
    fn on_sideband_event(&mut self, text: String) {
        let ctx = EventCtx {
            counters: &self.shared.counters,
            call_id: &self.call_id,
        };
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            kind: Option<String>,
            event_id: Option<String>,
            session: Option<serde_json::Map<String, Value>>,
        }
        let head: Option<Head> = serde_json::from_str(&text).ok();
        match head {
            Some(Head {
                kind: Some(kind),
                event_id,
                session,
            }) if kind == "session.update" => {
                let mut merged = match self.session.take() {
                    Some(Value::Object(m)) => m,
                    _ => serde_json::Map::new(),
                };
                merged.extend(session.unwrap_or_default());
                let resolved = match self.state.api {
                    Api::Realtime => {
                        session_created(&self.model, Some(&Value::Object(merged.clone())))
                            ["session"]
                            .clone()
                    }
                    Api::Live => live_session(
                        &self.call_id,
                        &self.model,
                        Some(&Value::Object(merged.clone())),
                    ),
                };
                self.session = Some(Value::Object(merged));
                let mut event = serde_json::json!({
                    "type": "session.updated",
                    "event_id": crate::ids::event_id(),
                    "session": resolved,
                });
                if let Some(id) = event_id {
                    event["client_event_id"] = Value::String(id);
                }
                self.state.enqueue_event(&event, &ctx);
            }
            _ => self.state.client_text(text.into_bytes(), &ctx),
        }
    }

    /// Drain str0m, react to events, then hand queued data-channel messages to str0m one at a
    /// time, draining after each (every write is a mutation). Returns the next str0m deadline.
    fn drive(&mut self) -> Result<Instant, str0m::RtcError> {
        let Call {
            udp,
            state,
            shared,
            model,
            session,
            call_id,
            ..
        } = self;
        let ctx = EventCtx {
            counters: &shared.counters,
            call_id,
        };
        let mut deadline = udp.drain(|rtc, ev| state.on_event(rtc, ev, &ctx))?;
        loop {
            if state.wrote_rtp {
                state.wrote_rtp = false;
                deadline = udp.kick(|rtc, ev| state.on_event(rtc, ev, &ctx))?;
                continue;
            }
            if state.pending_session_created {
                state.pending_session_created = false;
                let event = match state.api {
                    Api::Realtime => session_created(model, session.as_ref()),
                    Api::Live => {
                        let resolved = live_session(call_id, model, session.as_ref());
                        let event = session_started(&resolved);
                        let now = Instant::now();
                        state.live.resolved = Some(resolved);
                        state.live.started_at = Some(now);
                        state.live.next_usage = Some(now + shared.limits.usage_interval);
                        event
                    }
                };
                let message = Message {
                    binary: false,
                    data: event.to_string().into_bytes(),
                };
                state.enqueue(message, &ctx);
            }
            if state.api == Api::Live {
                state.live_events(shared.limits.usage_interval, &ctx);
            }
            let Some(channel) = state.events_channel else {
                return Ok(deadline);
            };
            match state.queue.flush_one(udp.rtc(), channel) {
                FlushStep::Empty | FlushStep::Blocked => return Ok(deadline),
                FlushStep::Written(n) => {
                    add(&ctx.counters.dc_messages_sent, 1);
                    add(&ctx.counters.dc_bytes_sent, n as u64);
                }
                FlushStep::Failed => add(&ctx.counters.dc_messages_dropped, 1),
            }
            deadline = udp.drain(|rtc, ev| state.on_event(rtc, ev, &ctx))?;
        }
    }
}

struct EventCtx<'a> {
    counters: &'a Counters,
    call_id: &'a str,
}

impl CallState {
    /// GPT-Live: asks the session to close with `reason` (`session.closed` is queued on the
    /// next drive).
    fn ask_close(
        &mut self,
        reason: &'static str,
        client_event_id: Option<String>,
        linger: Duration,
        end: EndReason,
    ) {
        if self.live.closing.is_none() {
            self.live.close_asked.get_or_insert(CloseAsk {
                reason,
                client_event_id,
                linger,
                end,
            });
        }
    }

    /// GPT-Live: queues what the session has to say now: `error` events for refused
    /// commands, `session.closed` when asked to close, `session.usage.updated` when due.
    fn live_events(&mut self, usage_interval: Duration, ctx: &EventCtx<'_>) {
        let now = Instant::now();
        for id in std::mem::take(&mut self.live.refused) {
            let event = live_error(
                "session_already_started",
                "WebRTC session creation already started this session; session.start is \
                 for primary WebSocket connections only.",
                id.as_deref(),
            );
            self.enqueue_event(&event, ctx);
        }
        if let Some(ask) = self.live.close_asked.take() {
            let seconds = self.live.usage_seconds(now);
            let session = self.live.resolved.clone().unwrap_or(Value::Null);
            let event = session_closed(
                ask.reason,
                &session,
                seconds,
                ask.client_event_id.as_deref(),
            );
            self.enqueue_event(&event, ctx);
            self.live.next_usage = None;
            self.live.closing = Some((ask.end, now + ask.linger));
            tracing::info!(call_id = %ctx.call_id, reason = ask.reason, seconds, "Live session closing");
            return;
        }
        if let Some(due) = self.live.next_usage.filter(|due| *due <= now) {
            let event = usage_updated(self.live.usage_seconds(now));
            self.enqueue_event(&event, ctx);
            // The next report is one interval after this one was due, but never in the past
            // (a stalled loop does not burst reports).
            self.live.next_usage = Some((due + usage_interval).max(now));
        }
    }

    fn enqueue_event(&mut self, event: &Value, ctx: &EventCtx<'_>) {
        let message = Message {
            binary: false,
            data: event.to_string().into_bytes(),
        };
        self.enqueue(message, ctx);
    }

    /// GPT-Live, closing: whether `session.closed` (and all before it) left the queue and the
    /// peer acknowledged every byte.
    fn goodbye_delivered(&self, rtc: &mut Rtc) -> bool {
        let Some(channel) = self.events_channel else {
            return true;
        };
        self.queue.is_empty()
            && rtc
                .channel(channel)
                .is_none_or(|mut ch| ch.buffered_amount() == 0)
    }

    fn on_event(&mut self, rtc: &mut Rtc, ev: Event, ctx: &EventCtx<'_>) {
        match ev {
            Event::MediaAdded(m) if m.kind == MediaKind::Audio => {
                self.audio_mid.get_or_insert(m.mid);
            }
            Event::Connected => {
                self.connected = true;
                tracing::debug!(call_id = %ctx.call_id, "DTLS connected");
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.ended.get_or_insert(EndReason::IceDisconnected);
            }
            Event::ChannelOpen(id, label) => {
                tracing::debug!(call_id = %ctx.call_id, label = %label, "data channel open");
                if label == EVENTS_CHANNEL && self.events_channel.is_none() {
                    self.events_channel = Some(id);
                    // Sent after the drain (enqueue needs the model/session, owned by Call).
                    self.pending_session_created = true;
                }
            }
            Event::ChannelData(d) => {
                add(&ctx.counters.dc_messages_received, 1);
                add(&ctx.counters.dc_bytes_received, d.data.len() as u64);
                let message = Message {
                    binary: d.binary,
                    data: d.data,
                };
                if Some(d.id) == self.events_channel {
                    self.client_message(message, ctx);
                } else {
                    // The Realtime API speaks only on oai-events; anything else is echoed
                    // if the send buffer has room at once, and counted as dropped if not.
                    let written = rtc.channel(d.id).is_some_and(|mut ch| {
                        matches!(ch.write(message.binary, &message.data), Ok(true))
                    });
                    if written {
                        add(&ctx.counters.dc_messages_sent, 1);
                        add(&ctx.counters.dc_bytes_sent, message.data.len() as u64);
                    } else {
                        add(&ctx.counters.dc_messages_dropped, 1);
                    }
                }
            }
            Event::ChannelClose(id) if Some(id) == self.events_channel => {
                self.ended.get_or_insert(EndReason::PeerClosed);
            }
            Event::Closed => {
                self.ended.get_or_insert(EndReason::PeerClosed);
            }
            Event::RtpPacket(p) => self.echo_rtp(rtc, p, ctx),
            _ => {}
        }
    }

    /// A text event from the call's client (or from an attached sideband server).
    fn client_text(&mut self, data: Vec<u8>, ctx: &EventCtx<'_>) {
        self.client_message(
            Message {
                binary: false,
                data,
            },
            ctx,
        );
    }

    /// A message from the call's client on `oai-events`: GPT-Live commands are acted on,
    /// anything else is echoed, and a Realtime `response.create` is answered.
    fn client_message(&mut self, message: Message, ctx: &EventCtx<'_>) {
        if self.api == Api::Live {
            if self.live.close_asked.is_some() || self.live.closing.is_some() {
                // The session is over: nothing more is echoed.
                return;
            }
            match (message.binary, live_command(&message.data)) {
                (false, Some(LiveCommand::Close(id))) => {
                    self.ask_close(
                        "close_requested",
                        id,
                        LIVE_CLOSE_LINGER,
                        EndReason::SessionClosed,
                    );
                    return;
                }
                (false, Some(LiveCommand::Start(id))) => {
                    self.live.refused.push(id);
                    return;
                }
                _ => {}
            }
        }
        // A Realtime response.create: after its echo, the response's own events (rate
        // limits, created, done with usage), as OpenAI sends them.
        let answer = match (self.api, message.binary) {
            (Api::Realtime, false) => self.responses.answer(&message.data),
            _ => None,
        };
        // Written by `Call::drive` after this drain, one message per mutation.
        self.enqueue(message, ctx);
        for event in answer.into_iter().flatten() {
            self.enqueue_event(&event, ctx);
        }
    }

    fn enqueue(&mut self, message: Message, ctx: &EventCtx<'_>) {
        if !message.binary && self.mirror.receiver_count() > 0 {
            let _ = self
                .mirror
                .send(String::from_utf8_lossy(&message.data).into_owned());
        }
        if let Err(e) = self.queue.push(message) {
            add(&ctx.counters.dc_messages_dropped, 1);
            tracing::warn!(call_id = %ctx.call_id, error = %e, "ending call: data-channel echo cannot be queued");
            self.ended.get_or_insert(EndReason::QueueOverflow);
        }
    }

    /// Echo one RTP packet on our own send stream. The payload type is the one *we* negotiated
    /// for the packet's codec (found via the codec config), not the raw incoming number.
    fn echo_rtp(&mut self, rtc: &mut Rtc, p: Box<RtpPacket>, ctx: &EventCtx<'_>) {
        let len = p.payload.len() as u64;
        add(&ctx.counters.rtp_packets_received, 1);
        add(&ctx.counters.rtp_bytes_received, len);

        let in_pt = p.header.payload_type;
        let codec = rtc
            .codec_config()
            .find(|params| params.pt() == in_pt)
            .map(|params| params.spec().codec);
        let out_pt: Option<Pt> = codec.and_then(|c| {
            rtc.codec_config()
                .find(|params| params.spec().codec == c)
                .map(|params| params.pt())
        });
        let (Some(mid), Some(pt)) = (self.audio_mid, out_pt) else {
            add(&ctx.counters.rtp_packets_dropped, 1);
            return;
        };
        let mut api = rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            // The client offered recvonly/sendonly such that we do not send.
            add(&ctx.counters.rtp_packets_dropped, 1);
            return;
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let time = p.header.timestamp.wrapping_add(self.ts_offset);
        tx.write_rtp(
            RtpWrite::new(pt, seq.into(), time, p.timestamp, p.payload).marker(p.header.marker),
        );
        self.wrote_rtp = true;
        add(&ctx.counters.rtp_packets_echoed, 1);
        add(&ctx.counters.rtp_bytes_echoed, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(api_key: Option<&str>) -> Shared {
        Shared {
            api_key: api_key.map(str::to_string),
            media_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            reject_with: None,
            limits: CallLimits::default(),
            requests: Mutex::new(Vec::new()),
            hangups: Mutex::new(Vec::new()),
            attaches: Mutex::new(Vec::new()),
            calls: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            counters: Counters::default(),
            shutdown: CancellationToken::new(),
        }
    }

    #[test]
    fn auth_table() {
        let rows: &[(Option<&str>, Option<&str>, bool)] = &[
            (Some("k"), Some("Bearer k"), true),
            (Some("k"), Some("bearer k"), true),
            (Some("k"), Some("Bearer x"), false),
            (Some("k"), None, false),
            (Some("k"), Some("k"), false),
            (None, Some("Bearer anything"), true),
            (None, Some("Bearer "), false),
            (None, Some("Basic abc"), false),
            (None, None, false),
        ];
        for (key, header, ok) in rows {
            let got = check_auth(&shared(*key), *header).is_ok();
            assert_eq!(got, *ok, "key {key:?} header {header:?}");
        }
    }

    #[test]
    fn body_forms_table() {
        let mp_ct = multipart::content_type("B");
        let (bad_json_ct, no_sdp_ct) = (mp_ct.clone(), mp_ct.clone());
        let mp_body = multipart::build(
            "B",
            &[
                ("sdp", Some("application/sdp"), b"v=0\r\n"),
                ("session", Some("application/json"), br#"{"model":"m"}"#),
            ],
        );
        let bad_json_body = multipart::build(
            "B",
            &[
                ("sdp", Some("application/sdp"), b"v=0\r\n"),
                ("session", Some("application/json"), b"{nope"),
            ],
        );
        let no_sdp_body = multipart::build("B", &[("session", Some("application/json"), b"{}")]);
        let rows: Vec<(&str, &[u8], Result<(), &str>)> = vec![
            ("application/sdp", b"v=0\r\n", Ok(())),
            ("application/sdp; charset=utf-8", b"v=0\r\n", Ok(())),
            (&mp_ct, &mp_body, Ok(())),
            ("text/plain", b"v=0", Err("invalid_content_type")),
            ("", b"v=0", Err("invalid_content_type")),
            ("multipart/form-data", b"x", Err("malformed_multipart")),
            (&bad_json_ct, &bad_json_body, Err("invalid_session_json")),
            (&no_sdp_ct, &no_sdp_body, Err("missing_sdp")),
            ("application/sdp", b"", Err("missing_sdp")),
            ("application/sdp", b"\xff\xfe", Err("invalid_sdp")),
        ];
        for (ct, body, want) in rows {
            let got = parse_body(ct, body).and_then(|p| p.sdp.map(|_| ()));
            assert_eq!(got.map_err(|e| e.code()), want, "content type {ct:?}");
        }
    }

    /// One row per GPT-Live create body: what the Live API makes of it (the model, or the
    /// error code and parameter).
    #[test]
    fn live_body_table() {
        let ok = r#"{"session":{"model":" gpt-live-1 ","instructions":"hi"},"transport":{"type":"webrtc","sdp":"v=0\r\n"}}"#;
        // (content type, body, the model or (code, parameter at fault))
        type Row<'a> = (
            &'a str,
            &'a str,
            Result<&'a str, (&'a str, Option<&'a str>)>,
        );
        let rows: &[Row] = &[
            ("application/json", ok, Ok("gpt-live-1")),
            ("application/json; charset=utf-8", ok, Ok("gpt-live-1")),
            ("application/sdp", ok, Err(("invalid_content_type", None))),
            ("", ok, Err(("invalid_content_type", None))),
            ("application/json", "{", Err(("invalid_json", None))),
            ("application/json", "[1]", Err(("invalid_json", None))),
            (
                "application/json",
                r#"{"transport":{"type":"webrtc","sdp":"v=0"}}"#,
                Err(("missing_required_parameter", Some("session"))),
            ),
            (
                "application/json",
                r#"{"session":"gpt-live-1","transport":{"type":"webrtc","sdp":"v=0"}}"#,
                Err(("invalid_value", Some("session"))),
            ),
            (
                "application/json",
                r#"{"session":{},"transport":{"type":"webrtc","sdp":"v=0"}}"#,
                Err(("missing_required_parameter", Some("session.model"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":" "},"transport":{"type":"webrtc","sdp":"v=0"}}"#,
                Err(("missing_required_parameter", Some("session.model"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":1},"transport":{"type":"webrtc","sdp":"v=0"}}"#,
                Err(("invalid_value", Some("session.model"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"}}"#,
                Err(("missing_required_parameter", Some("transport"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"},"transport":{"sdp":"v=0"}}"#,
                Err(("missing_required_parameter", Some("transport.type"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"},"transport":{"type":"websocket","sdp":"v=0"}}"#,
                Err(("invalid_value", Some("transport.type"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"},"transport":{"type":"webrtc"}}"#,
                Err(("missing_required_parameter", Some("transport.sdp"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"},"transport":{"type":"webrtc","sdp":7}}"#,
                Err(("invalid_value", Some("transport.sdp"))),
            ),
            (
                "application/json",
                r#"{"session":{"model":"m"},"transport":{"type":"webrtc","sdp":""}}"#,
                Err(("missing_sdp", None)),
            ),
        ];
        for (ct, body, want) in rows {
            let got = parse_live_body(ct, body.as_bytes());
            match (got, want) {
                (Ok(b), Ok(model)) => assert_eq!(b.model, *model, "{body}"),
                (Err(e), Err((code, param))) => {
                    assert_eq!(
                        (e.code(), e.body()["error"]["param"].as_str()),
                        (*code, *param),
                        "{ct} {body}"
                    );
                    assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
                }
                (Ok(_), Err(_)) => panic!("accepted: {ct} {body}"),
                (Err(e), Ok(_)) => panic!("refused ({}): {ct} {body}", e.code()),
            }
        }
    }

    #[test]
    fn only_session_close_and_start_are_live_commands() {
        assert!(matches!(
            live_command(br#"{"type":"session.close","event_id":"c1"}"#),
            Some(LiveCommand::Close(Some(id))) if id == "c1"
        ));
        assert!(matches!(
            live_command(br#"{"type":"session.start","session":{}}"#),
            Some(LiveCommand::Start(None))
        ));
        for other in [
            &br#"{"type":"session.update","session":{}}"#[..],
            br#"{"type":"response.create","text":"session.close"}"#,
            b"session.close",
            b"",
        ] {
            assert!(
                live_command(other).is_none(),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn query_model_is_decoded() {
        assert_eq!(
            query_param(Some("model=gpt-realtime%2Dmini&x=1"), "model").as_deref(),
            Some("gpt-realtime-mini")
        );
        assert_eq!(query_param(Some("x=1"), "model"), None);
        assert_eq!(query_param(None, "model"), None);
    }
}
