//! A str0m test client that plays the browser/SDK side of a Realtime WebRTC call.
//!
//! Full-ICE offerer (never ICE-lite, so it can talk to an ICE-lite answerer), RTP mode, Opus
//! only with a configurable payload type, one SendRecv audio m-line and the `oai-events` data
//! channel, one UDP socket with a host candidate on `bind_ip` (or, with
//! [`ClientTransport::Tcp`], only an active ICE-TCP candidate and no UDP at all, as a client
//! behind a UDP-blocking firewall). After [`TestClient::connect`] a
//! tokio task drives str0m; [`ConnectedClient`] is a cheap handle to it. Hundreds can run at
//! once: each costs one task, one socket and a few small buffers.
//!
//! Audio frames carry a send timestamp so echoes yield round-trip samples:
//! bytes `0..4` = [`FRAME_MAGIC`], `4..12` = send time in µs since [`epoch`] (big endian),
//! `12..20` = frame index, the rest filler.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::format::{Codec, FormatParams};
use str0m::media::{Direction, Frequency, MediaKind, Mid, Pt};
use str0m::rtp::{RtpPacket, RtpWrite};
use str0m::{Candidate, Event, IceConnectionState, Rtc};
use tokio::sync::{mpsc, oneshot};

use crate::peer::{self, DEFAULT_QUEUE_CAP};
use rtc_peer::dc_queue::{DcQueue, FlushStep, Message};
use rtc_peer::tcp::{self, TcpPeer};
use rtc_peer::udp::{self, UdpPeer, MAX_DATAGRAM};
use rtc_peer::EVENTS_CHANNEL;

/// Bytes per audio frame: about a 20 ms Opus frame at voice bitrates.
pub const FRAME_BYTES: usize = 160;
/// RTP clock ticks per 20 ms frame at 48 kHz.
pub const FRAME_TICKS: u32 = 960;
/// Marks frames written by [`ConnectedClient::send_audio`].
pub const FRAME_MAGIC: [u8; 4] = *b"EMTS";
/// Received data-channel messages buffered for `recv_message` before new ones are dropped.
pub const INBOX_CAPACITY: usize = 4096;
/// Round-trip samples kept per client (the summary covers all of them).
pub const MAX_RTT_SAMPLES: usize = 100_000;

/// Process-wide epoch for frame timestamps. All clients in a process share it, so a frame sent
/// by one client and received by another still yields a valid latency.
/// The str0m configuration of a client peer (tests, benchmarks): the process-wide DTLS
/// certificate and crypto provider (cheap `build`, no panic on certificate generation),
/// RTP mode, Opus only at `opus_pt` with str0m's `enable_opus` parameters, no stats events.
pub fn client_rtc_config(opus_pt: Pt) -> anyhow::Result<str0m::RtcConfig> {
    let mut builder = peer::rtc_builder()?
        .set_rtp_mode(true)
        .clear_codecs()
        .set_stats_interval(None);
    builder.codec_config().add_config(
        opus_pt,
        None,
        Codec::Opus,
        Frequency::FORTY_EIGHT_KHZ,
        Some(2),
        FormatParams {
            min_p_time: Some(10),
            use_inband_fec: Some(true),
            ..Default::default()
        },
    );
    Ok(builder)
}

pub fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since [`epoch`].
pub fn micros_since_epoch() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Build one audio frame payload stamped with the current time.
pub fn audio_frame(index: u64) -> Vec<u8> {
    let mut p = vec![0x55u8; FRAME_BYTES];
    p[0..4].copy_from_slice(&FRAME_MAGIC);
    p[4..12].copy_from_slice(&micros_since_epoch().to_be_bytes());
    p[12..20].copy_from_slice(&index.to_be_bytes());
    p
}

/// The send time (µs since [`epoch`]) of a frame built by [`audio_frame`], if it is one.
pub fn frame_send_time(payload: &[u8]) -> Option<u64> {
    if payload.len() < 20 || payload[0..4] != FRAME_MAGIC {
        return None;
    }
    let mut t = [0u8; 8];
    t.copy_from_slice(&payload[4..12]);
    Some(u64::from_be_bytes(t))
}

/// How a client reaches the answerer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientTransport {
    /// One UDP socket and a UDP host candidate.
    #[default]
    Udp,
    /// Only an active ICE-TCP host candidate (RFC 6544): the client connects to the answer's
    /// passive TCP candidates, sends RFC 4571 frames, and uses no UDP at all.
    Tcp,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub bind_ip: IpAddr,
    pub transport: ClientTransport,
    /// Payload type to offer for Opus (111 like browsers; tests use e.g. 109 to force the relay
    /// to map payload types between legs).
    pub opus_pt: u8,
    /// `connect` fails if ICE + DTLS + the `oai-events` channel are not up by then.
    pub connect_timeout: Duration,
    /// Over UDP, drop (and count, [`ConnectedClient::foreign_source_drops`]) datagrams whose
    /// source is not an address this client sent to, as libwebrtc does: a relay whose replies
    /// leave from another of its addresses than the one the client sent to fails here as it
    /// fails for Chrome. On by default; str0m alone does not check.
    pub strict_source: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            transport: ClientTransport::Udp,
            opus_pt: 111,
            connect_timeout: Duration::from_secs(10),
            strict_source: true,
        }
    }
}

/// A data-channel message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DcMessage {
    Text(String),
    Binary(Vec<u8>),
}

/// Round-trip latency of echoed audio frames.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RttSummary {
    pub count: u64,
    pub min: Duration,
    pub max: Duration,
    pub mean: Duration,
    /// Percentiles over the retained samples (the last [`MAX_RTT_SAMPLES`] at most).
    pub p50: Duration,
    pub p95: Duration,
    pub p99: Duration,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct AudioStats {
    pub packets_received: u64,
    pub bytes_received: u64,
    /// Distinct RTP payload types seen on received packets, ascending.
    pub payload_types_received: Vec<u8>,
    pub packets_sent: u64,
    pub bytes_sent: u64,
    /// Frames `send_audio` could not write (no send stream yet).
    pub packets_not_sent: u64,
    pub rtt: RttSummary,
}

#[derive(Default)]
struct AudioAcc {
    packets_received: u64,
    bytes_received: u64,
    pts: BTreeSet<u8>,
    packets_sent: u64,
    bytes_sent: u64,
    packets_not_sent: u64,
    rtt_count: u64,
    rtt_sum_us: u64,
    rtt_min_us: u64,
    rtt_max_us: u64,
    rtt_samples_us: Vec<u64>,
}

struct ClientShared {
    alive: AtomicBool,
    /// Set by `vanish`: the driver must stop without a goodbye, even if it sees the
    /// command channel close before the abort lands.
    vanished: AtomicBool,
    audio: Mutex<AudioAcc>,
    dc_dropped: std::sync::atomic::AtomicU64,
    /// Mirror of the UDP peer's `foreign_source` counter ([`ClientConfig::strict_source`]).
    foreign_source: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The client's transport before it connects: a bound UDP socket, or the IP its ICE-TCP
/// connections leave from.
enum Endpoint {
    Udp(std::net::UdpSocket),
    Tcp(IpAddr),
}

/// A client that has made its offer and awaits the answer.
pub struct TestClient {
    rtc: Rtc,
    endpoint: Endpoint,
    pending: SdpPendingOffer,
    audio_mid: Mid,
    opus_pt: Pt,
    connect_timeout: Duration,
    strict_source: bool,
}

impl TestClient {
    /// Create the client and its SDP offer: one Opus SendRecv audio m-line + `oai-events`.
    pub fn new(config: ClientConfig) -> anyhow::Result<(TestClient, String)> {
        // 64..=95 collide with RTCP packet types in RTP/RTCP demultiplexing (RFC 5761); above
        // 127 does not fit in 7 bits; below 35 are static assignments.
        if !matches!(config.opus_pt, 35..=63 | 96..=127) {
            bail!(
                "opus_pt {} is not a usable dynamic payload type (35..=63 or 96..=127)",
                config.opus_pt
            );
        }
        let opus_pt = Pt::from(config.opus_pt);
        let builder = client_rtc_config(opus_pt)?;
        let mut rtc = builder.build(Instant::now());
        let endpoint = match config.transport {
            ClientTransport::Udp => {
                let socket = udp::bind(config.bind_ip)
                    .with_context(|| format!("binding a UDP socket on {}", config.bind_ip))?;
                let local = socket.local_addr().context("UDP local address")?;
                let candidate = Candidate::host(local, "udp").context("host candidate")?;
                rtc.add_local_candidate(candidate);
                Endpoint::Udp(socket)
            }
            ClientTransport::Tcp => {
                let candidate =
                    tcp::active_candidate(config.bind_ip).context("active TCP candidate")?;
                rtc.add_local_candidate(candidate);
                Endpoint::Tcp(config.bind_ip)
            }
        };

        let mut api = rtc.sdp_api();
        let audio_mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_channel(EVENTS_CHANNEL.to_string());
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| anyhow!("str0m produced no offer"))?;
        let client = TestClient {
            rtc,
            endpoint,
            pending,
            audio_mid,
            opus_pt,
            connect_timeout: config.connect_timeout,
            strict_source: config.strict_source,
        };
        Ok((client, offer.to_sdp_string()))
    }

    /// The UDP address this client sends from (over ICE-TCP: its active candidate's).
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        match &self.endpoint {
            Endpoint::Udp(socket) => Ok(socket.local_addr()?),
            Endpoint::Tcp(ip) => Ok(std::net::SocketAddr::new(*ip, tcp::ACTIVE_CANDIDATE_PORT)),
        }
    }

    /// Accept the answer and drive the connection until DTLS is connected and `oai-events` is
    /// open; fails after `connect_timeout`.
    pub async fn connect(mut self, answer_sdp: &str) -> anyhow::Result<ConnectedClient> {
        let answer = SdpAnswer::from_sdp_string(answer_sdp).context("parsing SDP answer")?;
        self.rtc
            .sdp_api()
            .accept_answer(self.pending, answer)
            .context("accepting SDP answer")?;
        let io = match self.endpoint {
            Endpoint::Udp(socket) => {
                let mut peer =
                    UdpPeer::new(self.rtc, socket).context("registering the UDP socket")?;
                peer.strict_source = self.strict_source;
                Io::Udp(peer)
            }
            Endpoint::Tcp(ip) => Io::Tcp(TcpPeer::new(self.rtc, ip, MAX_DATAGRAM)),
        };

        let shared = Arc::new(ClientShared {
            alive: AtomicBool::new(true),
            vanished: AtomicBool::new(false),
            audio: Mutex::new(AudioAcc::default()),
            dc_dropped: Default::default(),
            foreign_source: Default::default(),
        });
        // Commands are small; the bound gives back-pressure to a sender that outruns the task.
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let tcp_open = match &io {
            Io::Tcp(p) => Some(p.open_connections_handle()),
            Io::Udp(_) => None,
        };
        let driver = Driver {
            io,
            shared: shared.clone(),
            audio_mid: self.audio_mid,
            opus_pt: self.opus_pt,
            events_channel: None,
            connected: false,
            ready: Some(ready_tx),
            queue: peer::dc_queue(DEFAULT_QUEUE_CAP),
            inbox: inbox_tx,
            seq: 0,
            rtp_time: rand::random(),
            frames_sent: 0,
            wrote_rtp: false,
            ended: false,
        };
        let task = tokio::spawn(driver.run(cmd_rx));
        let client = ConnectedClient {
            tcp_open,
            cmd: cmd_tx,
            inbox: inbox_rx,
            shared,
            task: Some(task),
        };
        match tokio::time::timeout(self.connect_timeout, ready_rx).await {
            Ok(Ok(())) => Ok(client),
            Ok(Err(_)) => {
                client.close().await;
                bail!("peer connection ended before it was ready")
            }
            Err(_) => {
                let foreign = client.foreign_source_drops();
                client.close().await;
                bail!(
                    "not connected (ICE+DTLS and oai-events open) within {:?}; {foreign} \
                     datagrams dropped for coming from an address this client never sent to",
                    self.connect_timeout
                )
            }
        }
    }
}

enum Command {
    Dc {
        binary: bool,
        data: Vec<u8>,
        reply: oneshot::Sender<anyhow::Result<()>>,
    },
    AudioFrame,
    Close,
}

/// Handle to a connected client; the peer connection lives in a background task.
pub struct ConnectedClient {
    /// Established ICE-TCP connections ([`ClientTransport::Tcp`] only).
    tcp_open: Option<Arc<std::sync::atomic::AtomicUsize>>,
    cmd: mpsc::Sender<Command>,
    inbox: mpsc::Receiver<DcMessage>,
    shared: Arc<ClientShared>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ConnectedClient {
    pub async fn send_text(&self, text: &str) -> anyhow::Result<()> {
        self.send_dc(false, text.as_bytes().to_vec()).await
    }

    pub async fn send_binary(&self, data: &[u8]) -> anyhow::Result<()> {
        self.send_dc(true, data.to_vec()).await
    }

    /// Hands the message to str0m (or queues it behind earlier ones when the SCTP send buffer
    /// is full). Errors if the connection is gone or the queue cap would be exceeded.
    async fn send_dc(&self, binary: bool, data: Vec<u8>) -> anyhow::Result<()> {
        let (reply, rx) = oneshot::channel();
        self.cmd
            .send(Command::Dc {
                binary,
                data,
                reply,
            })
            .await
            .map_err(|_| anyhow!("peer connection is closed"))?;
        rx.await
            .map_err(|_| anyhow!("peer connection closed before the message was accepted"))?
    }

    /// Next data-channel message, or `None` on timeout or once the connection is gone and all
    /// received messages were read.
    pub async fn recv_message(&mut self, timeout: Duration) -> Option<DcMessage> {
        tokio::time::timeout(timeout, self.inbox.recv())
            .await
            .ok()
            .flatten()
    }

    /// Read messages until a JSON text event with this `type` arrives (others are skipped).
    pub async fn wait_for_event_type(
        &mut self,
        event_type: &str,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_message(left).await {
                Some(DcMessage::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                        let ty = v.get("type").and_then(|t| t.as_str()).unwrap_or("");
                        if ty == event_type {
                            return Ok(v);
                        }
                        seen.push(ty.to_string());
                    }
                }
                Some(DcMessage::Binary(_)) => seen.push("<binary>".into()),
                None => bail!(
                    "no `{event_type}` event within {timeout:?} (saw: {seen:?}, alive: {})",
                    self.is_alive()
                ),
            }
        }
    }

    /// The next JSON text event, whatever its type (binary messages and text that is not
    /// JSON are skipped): for tests of what comes first, such as GPT-Live's
    /// `session.started`.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.recv_message(left).await {
                Some(DcMessage::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) {
                        return Ok(v);
                    }
                }
                Some(DcMessage::Binary(_)) => {}
                None => bail!("no event within {timeout:?} (alive: {})", self.is_alive()),
            }
        }
    }

    /// Send `frames` audio frames, one every `interval` (20 ms frames, RTP time += 960).
    pub async fn send_audio(&self, frames: usize, interval: Duration) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(interval.max(Duration::from_micros(100)));
        // A late tick sends late rather than bursting to catch up, like a real microphone.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..frames {
            tick.tick().await;
            self.cmd
                .send(Command::AudioFrame)
                .await
                .map_err(|_| anyhow!("peer connection is closed"))?;
        }
        Ok(())
    }

    pub fn audio_stats(&self) -> AudioStats {
        let a = lock(&self.shared.audio);
        let mut sorted = a.rtt_samples_us.clone();
        sorted.sort_unstable();
        let pct = |p: f64| -> Duration {
            if sorted.is_empty() {
                return Duration::ZERO;
            }
            let i = ((sorted.len() - 1) as f64 * p).round() as usize;
            Duration::from_micros(sorted[i.min(sorted.len() - 1)])
        };
        let rtt = if a.rtt_count == 0 {
            RttSummary::default()
        } else {
            RttSummary {
                count: a.rtt_count,
                min: Duration::from_micros(a.rtt_min_us),
                max: Duration::from_micros(a.rtt_max_us),
                mean: Duration::from_micros(a.rtt_sum_us / a.rtt_count),
                p50: pct(0.50),
                p95: pct(0.95),
                p99: pct(0.99),
            }
        };
        AudioStats {
            packets_received: a.packets_received,
            bytes_received: a.bytes_received,
            payload_types_received: a.pts.iter().copied().collect(),
            packets_sent: a.packets_sent,
            bytes_sent: a.bytes_sent,
            packets_not_sent: a.packets_not_sent,
            rtt,
        }
    }

    /// Round-trip samples of echoed frames, oldest first (at most [`MAX_RTT_SAMPLES`]).
    pub fn rtt_samples(&self) -> Vec<Duration> {
        lock(&self.shared.audio)
            .rtt_samples_us
            .iter()
            .map(|us| Duration::from_micros(*us))
            .collect()
    }

    /// Data-channel messages dropped because the inbox was full (nobody reading).
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dc_dropped.load(Ordering::Relaxed)
    }

    /// UDP datagrams dropped because their source was not an address this client sent to
    /// ([`ClientConfig::strict_source`]).
    pub fn foreign_source_drops(&self) -> u64 {
        self.shared.foreign_source.load(Ordering::Relaxed)
    }

    /// ICE-TCP connections established now; `None` over UDP.
    pub fn tcp_connections(&self) -> Option<usize> {
        self.tcp_open.as_ref().map(|n| n.load(Ordering::Acquire))
    }

    /// False once the peer connection is gone.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::Acquire)
    }

    /// Wait until the peer connection is gone; returns false on timeout.
    pub async fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.is_alive() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Disappear without a goodbye (no DTLS close_notify), like a crashed or unplugged peer:
    /// stops the task and frees the socket at once. For testing the remote's dead-peer handling.
    pub fn vanish(mut self) {
        self.shared.vanished.store(true, Ordering::Release);
        self.shared.alive.store(false, Ordering::Release);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }

    /// Close the peer connection (DTLS close_notify, so the remote notices) and stop the task.
    pub async fn close(mut self) {
        let _ = self.cmd.send(Command::Close).await;
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                tracing::warn!("test client task did not stop within 2 s");
            }
        }
    }
}

/// The peer and its transport.
enum Io {
    Udp(UdpPeer),
    Tcp(TcpPeer),
}

impl Io {
    fn rtc(&mut self) -> &mut Rtc {
        match self {
            Io::Udp(p) => p.rtc(),
            Io::Tcp(p) => p.rtc(),
        }
    }

    fn is_alive(&self) -> bool {
        match self {
            Io::Udp(p) => p.shell.rtc().is_alive(),
            Io::Tcp(p) => p.shell.rtc().is_alive(),
        }
    }

    fn drain(&mut self, on_event: impl FnMut(&mut Rtc, Event)) -> Result<Instant, str0m::RtcError> {
        match self {
            Io::Udp(p) => p.drain(on_event),
            Io::Tcp(p) => p.drain(on_event),
        }
    }

    fn kick(&mut self, on_event: impl FnMut(&mut Rtc, Event)) -> Result<Instant, str0m::RtcError> {
        match self {
            Io::Udp(p) => p.kick(on_event),
            Io::Tcp(p) => p.kick(on_event),
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), str0m::RtcError> {
        match self {
            Io::Udp(p) => p.handle_timeout(now),
            Io::Tcp(p) => p.handle_timeout(now),
        }
    }

    /// The next packet into `buf`: its length and source. Cancel-safe.
    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, std::net::SocketAddr)> {
        match self {
            Io::Udp(p) => p.socket.recv_from(buf).await,
            Io::Tcp(p) => {
                let (source, frame) = p
                    .recv()
                    .await
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok((n, source))
            }
        }
    }

    fn handle_packet(&mut self, data: &[u8], source: std::net::SocketAddr, now: Instant) {
        match self {
            Io::Udp(p) => p.handle_datagram(data, source, now),
            Io::Tcp(p) => p.handle_frame(data, source, now),
        }
    }

    fn close_gracefully(&mut self) {
        match self {
            Io::Udp(p) => p.close_gracefully(),
            Io::Tcp(p) => p.close_gracefully(),
        }
    }

    fn send_errors(&self) -> u64 {
        match self {
            Io::Udp(p) => p.counters.send_errors,
            Io::Tcp(p) => p.counters.send_errors,
        }
    }
}

struct Driver {
    io: Io,
    shared: Arc<ClientShared>,
    audio_mid: Mid,
    opus_pt: Pt,
    events_channel: Option<ChannelId>,
    connected: bool,
    ready: Option<oneshot::Sender<()>>,
    queue: DcQueue,
    inbox: mpsc::Sender<DcMessage>,
    seq: u64,
    rtp_time: u32,
    frames_sent: u64,
    /// A frame was written; it leaves on the next timeout input (see `UdpPeer::kick`).
    wrote_rtp: bool,
    ended: bool,
}

/// Event handling state borrowed separately from the `UdpPeer` during a drain.
struct EventState<'a> {
    shared: &'a ClientShared,
    events_channel: &'a mut Option<ChannelId>,
    connected: &'a mut bool,
    inbox: &'a mpsc::Sender<DcMessage>,
    ended: &'a mut bool,
}

impl EventState<'_> {
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connected => *self.connected = true,
            Event::ChannelOpen(id, label) if label == EVENTS_CHANNEL => {
                *self.events_channel = Some(id)
            }
            Event::ChannelData(d) => {
                let msg = if d.binary {
                    DcMessage::Binary(d.data)
                } else {
                    match String::from_utf8(d.data) {
                        Ok(s) => DcMessage::Text(s),
                        Err(e) => DcMessage::Binary(e.into_bytes()),
                    }
                };
                if self.inbox.try_send(msg).is_err() {
                    self.shared.dc_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::RtpPacket(p) => self.on_rtp(&p),
            Event::ChannelClose(id) if Some(id) == *self.events_channel => *self.ended = true,
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) | Event::Closed => {
                *self.ended = true
            }
            _ => {}
        }
    }

    fn on_rtp(&mut self, p: &RtpPacket) {
        let now_us = micros_since_epoch();
        let mut a = lock(&self.shared.audio);
        a.packets_received += 1;
        a.bytes_received += p.payload.len() as u64;
        a.pts.insert(*p.header.payload_type);
        if let Some(sent) = frame_send_time(&p.payload) {
            let rtt = now_us.saturating_sub(sent);
            if a.rtt_count == 0 {
                a.rtt_min_us = rtt;
                a.rtt_max_us = rtt;
            }
            a.rtt_count += 1;
            a.rtt_sum_us += rtt;
            a.rtt_min_us = a.rtt_min_us.min(rtt);
            a.rtt_max_us = a.rtt_max_us.max(rtt);
            if a.rtt_samples_us.len() < MAX_RTT_SAMPLES {
                a.rtt_samples_us.push(rtt);
            }
        }
    }
}

impl Driver {
    async fn run(mut self, mut cmds: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let sleep = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(sleep);
        loop {
            let deadline = match self.drive() {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "test client: str0m failed");
                    break;
                }
            };
            if self.ended || !self.io.is_alive() {
                break;
            }
            if self.connected && self.events_channel.is_some() {
                if let Some(ready) = self.ready.take() {
                    let _ = ready.send(());
                }
            }
            let now = Instant::now();
            sleep.as_mut().reset(udp::next_wake(deadline, now));
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Command::Dc { binary, data, reply }) => {
                        let _ = reply.send(self.enqueue(binary, data));
                    }
                    Some(Command::AudioFrame) => self.write_frame(),
                    Some(Command::Close) | None => break,
                },
                r = self.io.recv(&mut buf) => match r {
                    Ok((n, source)) => {
                        self.io.handle_packet(&buf[..n], source, Instant::now());
                        if let Io::Udp(p) = &self.io {
                            let dropped = p.counters.foreign_source;
                            self.shared.foreign_source.store(dropped, Ordering::Relaxed);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "test client: receive error"),
                },
                _ = &mut sleep => {
                    if let Err(e) = self.io.handle_timeout(Instant::now()) {
                        tracing::warn!(error = %e, "test client: str0m timeout handling failed");
                        break;
                    }
                }
            }
        }
        // Mark dead first so callers polling is_alive() see the end promptly.
        self.shared.alive.store(false, Ordering::Release);
        if self.shared.vanished.load(Ordering::Acquire) {
            // Dropping the handle in `vanish` closes the command channel, which can wake
            // this loop before the abort lands: a vanished peer sends nothing more.
            return;
        }
        self.io.close_gracefully();
        if self.io.send_errors() > 0 {
            tracing::debug!(
                send_errors = self.io.send_errors(),
                "test client had send errors"
            );
        }
    }

    /// Drain, then write queued data-channel messages one per mutation, draining after each.
    fn drive(&mut self) -> Result<Instant, str0m::RtcError> {
        let Driver {
            io,
            shared,
            events_channel,
            connected,
            inbox,
            ended,
            queue,
            wrote_rtp,
            ..
        } = self;
        let mut st = EventState {
            shared,
            events_channel,
            connected,
            inbox,
            ended,
        };
        let mut deadline = io.drain(|_, ev| st.on_event(ev))?;
        loop {
            if *wrote_rtp {
                *wrote_rtp = false;
                deadline = io.kick(|_, ev| st.on_event(ev))?;
                continue;
            }
            let Some(channel) = *st.events_channel else {
                return Ok(deadline);
            };
            match queue.flush_one(io.rtc(), channel) {
                FlushStep::Empty | FlushStep::Blocked => return Ok(deadline),
                FlushStep::Written(_) => {}
                FlushStep::Failed => {
                    st.shared.dc_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            deadline = io.drain(|_, ev| st.on_event(ev))?;
        }
    }

    fn enqueue(&mut self, binary: bool, data: Vec<u8>) -> anyhow::Result<()> {
        if self.events_channel.is_none() {
            bail!("oai-events is not open");
        }
        Ok(self.queue.push(Message { binary, data })?)
    }

    fn write_frame(&mut self) {
        let index = self.frames_sent;
        let payload = audio_frame(index);
        let len = payload.len() as u64;
        let mut api = self.io.rtc().direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.audio_mid, None) else {
            lock(&self.shared.audio).packets_not_sent += 1;
            return;
        };
        tx.write_rtp(
            RtpWrite::new(
                self.opus_pt,
                self.seq.into(),
                self.rtp_time,
                Instant::now(),
                payload,
            )
            // The marker starts a talk spurt (RFC 3551), i.e. our first frame.
            .marker(index == 0),
        );
        self.seq += 1;
        self.rtp_time = self.rtp_time.wrapping_add(FRAME_TICKS);
        self.frames_sent += 1;
        self.wrote_rtp = true;
        let mut a = lock(&self.shared.audio);
        a.packets_sent += 1;
        a.bytes_sent += len;
    }
}
