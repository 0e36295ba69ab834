//! One call in virtual time: a client peer (an offerer like a browser: Opus and the
//! `oai-events` channel), a provider peer (an answerer like OpenAI) and the [`Bridge`]
//! between them, joined by an in-memory network and driven by a clock the test owns.
//!
//! Modelled on str0m's `tests/common.rs` `progress()`: each step finds whichever comes
//! first (a peer's str0m timeout, the bridge's `poll_timeout`, a datagram arriving, a
//! peer's next audio frame), moves the clock there and runs it. Nothing sleeps, so a
//! 15 s timeout is proven in milliseconds of real time and at an exact instant.
//!
//! The legs are built the way the relay builds them (`peer::accept_client_offer`,
//! `peer::create_upstream_offer`, `peer::accept_upstream_answer`), and the bridge is
//! driven the way a media shard drives it: every input is followed by `send_written`
//! and `take_transmits`; once `end_reason` is set the driver closes both legs, sends
//! the goodbyes and stops.

use super::{Bridge, BridgeLimits, BridgeTelemetry, LegSetup};
use crate::call_state::{CallCounters, EndReason};
use crate::metrics::Metrics;
use crate::peer;
use crate::peer::{DataChannelTerms, UpstreamLeg};
use rtc_peer::shell::{self, Drained};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, IceConnectionState, IceCreds, Input, Rtc, RtcConfig};

/// The client's socket.
pub const CLIENT: SocketAddr = addr([10, 0, 0, 1], 50_000);
/// The relay's shared client-leg port (advertised and bound on the same address).
pub const RELAY_CLIENT_LEG: SocketAddr = addr([10, 0, 0, 2], 3_478);
/// The relay's upstream-leg socket.
pub const RELAY_UPSTREAM_LEG: SocketAddr = addr([10, 0, 0, 3], 40_000);
/// The provider's media address.
pub const PROVIDER: SocketAddr = addr([10, 0, 0, 4], 50_001);

/// One audio frame every 20 ms, as Opus does.
pub const FRAME: Duration = Duration::from_millis(20);

const fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]),
        port,
    ))
}

/// How a virtual call is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub limits: BridgeLimits,
    /// The payload type the client offers Opus with (browsers: 111).
    pub client_opus_pt: u8,
    /// Whether the client offers the `oai-events` channel (an `m=application` section).
    pub client_data_channel: bool,
    /// One-way delay of every link unless [`Network::set_latency`] says otherwise.
    pub latency: Duration,
    /// How many data-channel bytes each test peer's str0m may hold unacknowledged.
    /// Browsers queue megabytes; str0m's default is 128 KiB.
    pub peer_sctp_buffer: usize,
    /// The largest data-channel message each peer takes (its `a=max-message-size`; str0m's
    /// default and Chromium's: 256 KiB).
    pub client_max_message: usize,
    pub provider_max_message: usize,
    /// The client offers its `m=application` section with port 0 (rejected).
    pub client_rejects_data_channel: bool,
    /// A peer that ignores the size the relay advertises to it and sends larger messages
    /// (it is shown 16 MiB).
    pub ignores_max_message: Option<Side>,
    /// The API the call speaks.
    pub api: realtime_relay_proto::call_id::Kind,
    /// Meter the provider's events against this budget (none: not metered).
    pub budget: Option<crate::usage::Budget>,
}

impl Default for Options {
    /// The relay's default limits (see `config.rs`).
    fn default() -> Self {
        Options {
            limits: BridgeLimits {
                dc_buffer_bytes: 1024 * 1024,
                ice_timeout: Duration::from_secs(15),
                peer_timeout: Duration::from_secs(15),
                idle_timeout: Duration::from_secs(120),
                max_duration: Duration::from_secs(3_600),
            },
            client_opus_pt: 111,
            client_data_channel: true,
            latency: Duration::from_millis(10),
            peer_sctp_buffer: 1024 * 1024,
            client_max_message: 256 * 1024,
            provider_max_message: 256 * 1024,
            client_rejects_data_channel: false,
            ignores_max_message: None,
            api: realtime_relay_proto::call_id::Kind::Realtime,
            budget: None,
        }
    }
}

/// What a test peer saw, in the order it saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    Connected,
    IceDisconnected,
    ChannelOpen,
    Message {
        binary: bool,
        data: Vec<u8>,
    },
    Rtp {
        pt: u8,
        payload: Vec<u8>,
    },
    ChannelClosed,
    /// The peer connection ended (DTLS closed) or failed.
    Closed,
}

/// A data-channel message a test peer sends when its channel has room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub binary: bool,
    pub data: Vec<u8>,
}

/// One of the two outer peers.
pub struct TestPeer {
    pub rtc: Rtc,
    pub addr: SocketAddr,
    pub audio_mid: Mid,
    pub channel: Option<ChannelId>,
    pub events: Vec<(Instant, PeerEvent)>,
    next_timeout: Instant,
    /// Messages waiting for room in the peer's SCTP send buffer, like a browser's
    /// `RTCDataChannel` queue.
    outbox: VecDeque<Outgoing>,
    /// Audio frames still to send, and when the next one is due.
    audio: Option<(u32, Instant)>,
    /// Payload lengths the frames cycle through (`sized_frame`); empty: 120-byte frames
    /// that start with the sequence number.
    frame_sizes: Vec<usize>,
    seq: u64,
    failed: bool,
}

impl TestPeer {
    fn new(rtc: Rtc, addr: SocketAddr, audio_mid: Mid, now: Instant) -> Self {
        TestPeer {
            rtc,
            addr,
            audio_mid,
            channel: None,
            events: Vec::new(),
            next_timeout: now,
            outbox: VecDeque::new(),
            audio: None,
            frame_sizes: Vec::new(),
            seq: 0,
            failed: false,
        }
    }

    /// When the peer first saw `event`.
    pub fn first(&self, event: &PeerEvent) -> Option<Instant> {
        self.events
            .iter()
            .find(|(_, e)| e == event)
            .map(|(t, _)| *t)
    }

    pub fn saw(&self, event: &PeerEvent) -> bool {
        self.first(event).is_some()
    }

    pub fn messages(&self) -> Vec<Vec<u8>> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                PeerEvent::Message { data, .. } => Some(data.clone()),
                _ => None,
            })
            .collect()
    }

    /// Payload types of the RTP packets received, in arrival order.
    pub fn rtp_payload_types(&self) -> Vec<u8> {
        self.events
            .iter()
            .filter_map(|(_, e)| match e {
                PeerEvent::Rtp { pt, .. } => Some(*pt),
                _ => None,
            })
            .collect()
    }

    /// Whether the peer learnt that the call is over.
    pub fn saw_end(&self) -> bool {
        self.saw(&PeerEvent::ChannelClosed) || self.saw(&PeerEvent::Closed)
    }

    /// The Opus payload type this peer's remote accepted, i.e. the number it sends.
    fn opus_pt(&self) -> Pt {
        self.rtc
            .media(self.audio_mid)
            .and_then(|m| m.remote_pts().first().copied())
            .expect("negotiated Opus")
    }

    fn wake_at(&self) -> Instant {
        let audio = self.audio.map(|(_, at)| at);
        audio.map_or(self.next_timeout, |a| a.min(self.next_timeout))
    }
}

/// Which side of the call a test acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Provider,
}

/// Datagrams in flight between the four addresses.
pub struct Network {
    latency: Duration,
    /// One-way delay of links touching an address, overriding `latency`.
    per_addr: HashMap<SocketAddr, Duration>,
    /// Addresses that neither send nor receive: a peer that vanished.
    down: HashSet<SocketAddr>,
    /// Ordered by arrival time; ties keep sending order.
    in_flight: VecDeque<InFlight>,
    pub dropped: u64,
    /// When each address sent a STUN binding request (ICE checks, consent freshness).
    pub binding_requests: HashMap<SocketAddr, Vec<Instant>>,
}

struct InFlight {
    at: Instant,
    source: SocketAddr,
    destination: SocketAddr,
    data: Vec<u8>,
}

impl Network {
    fn new(latency: Duration) -> Self {
        Network {
            latency,
            per_addr: HashMap::new(),
            down: HashSet::new(),
            in_flight: VecDeque::new(),
            dropped: 0,
            binding_requests: HashMap::new(),
        }
    }

    /// The one-way delay of every link touching `addr` from now on.
    pub fn set_latency(&mut self, addr: SocketAddr, latency: Duration) {
        self.per_addr.insert(addr, latency);
    }

    /// `addr` vanishes: nothing it sends leaves, nothing reaches it (in flight or not).
    pub fn take_down(&mut self, addr: SocketAddr) {
        self.down.insert(addr);
    }

    /// `addr` is reachable again (an outage ends).
    pub fn bring_up(&mut self, addr: SocketAddr) {
        self.down.remove(&addr);
    }

    fn send(&mut self, now: Instant, source: SocketAddr, destination: SocketAddr, data: &[u8]) {
        if self.down.contains(&source) || self.down.contains(&destination) {
            self.dropped += 1;
            return;
        }
        // A STUN message type of 0x0001 (RFC 5389): a binding request.
        if data.starts_with(&[0x00, 0x01]) {
            self.binding_requests.entry(source).or_default().push(now);
        }
        let delay = |a: &SocketAddr| self.per_addr.get(a).copied().unwrap_or(self.latency);
        let at = now + delay(&source).max(delay(&destination));
        let index = self.in_flight.partition_point(|d| d.at <= at);
        self.in_flight.insert(
            index,
            InFlight {
                at,
                source,
                destination,
                data: data.to_vec(),
            },
        );
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.front().map(|d| d.at)
    }
}

/// The relay's side as its driver sees it.
pub struct RelaySide {
    pub bridge: Bridge,
    /// Once the driver stopped (the bridge finished: queued events delivered, both legs
    /// closed): when the call ended (its end reason was set) and why.
    pub stopped: Option<(Instant, EndReason)>,
    /// When the driver stopped: the end plus the delivery of what was queued.
    pub finished_at: Option<Instant>,
    /// When the bridge first had an end reason.
    ended_at: Option<Instant>,
    /// When each leg last got a datagram.
    pub last_datagram: HashMap<super::Leg, Instant>,
    /// The most bytes ever waiting in the bridge's outbox towards each leg.
    pub max_outbox_bytes: HashMap<super::Leg, usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Client,
    Provider,
    Relay,
    Datagram,
}

pub struct VirtualCall {
    pub start: Instant,
    pub now: Instant,
    pub client: TestPeer,
    pub provider: TestPeer,
    pub relay: RelaySide,
    pub net: Network,
    pub metrics: Metrics,
    pub counters: Arc<CallCounters>,
    /// The relay's answer, held until [`VirtualCall::answer_client`]: the client's
    /// signalling is as slow as the test wants.
    client_answer: Option<(SdpPendingOffer, String)>,
    /// The largest message each peer was told the relay takes (its answer's or offer's
    /// `a=max-message-size`).
    pub client_was_told: Option<usize>,
    pub provider_was_told: Option<usize>,
    /// Steps taken without the clock moving, to catch a driver that would spin.
    steps_at_now: u32,
    /// Real time spent in the relay's work and in the two peers' (the cost measurement).
    pub cost: Cost,
}

/// Real (wall-clock) time spent by each party of a virtual call: what the relay's bridge and
/// its two str0m legs cost per packet without any I/O, next to what str0m alone costs in the
/// test peers. The relay's work is in [`VirtualCall::relay_datagram`] and
/// [`VirtualCall::relay_timeout`] (never inlined, so `callgrind --toggle-collect` can count
/// exactly their instructions).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub relay: Duration,
    pub peers: Duration,
    /// The relay's negotiation before any datagram: both legs built, both SDPs parsed and
    /// written, the bridge made ([`relay_accepts_client`], [`relay_accepts_provider`] and
    /// `Bridge::new`).
    pub relay_setup: Duration,
}

/// What the relay's first step of a setup leaves: the client's leg and answer, and the
/// upstream leg with the offer the provider is sent.
struct ClientAccepted {
    client_leg: peer::ClientLeg,
    client_terms: DataChannelTerms,
    up: UpstreamLeg,
    relay_offer: String,
}

/// The relay's first step of a setup, as `Relay::setup` takes it: the client's offer
/// accepted and the upstream offer made. Never inlined: the setup measurement counts its
/// instructions under callgrind.
#[inline(never)]
fn relay_accepts_client(offer: &str, max_message: usize, now: Instant) -> ClientAccepted {
    let (ufrag, pass) = crate::ids::new_ice_credentials();
    let client_leg = peer::accept_client_offer(
        offer,
        RELAY_CLIENT_LEG,
        None,
        IceCreds { ufrag, pass },
        max_message,
        now,
    )
    .expect("the relay accepts the client's offer");
    let client_terms = peer::data_channel_terms(offer, &client_leg.answer_sdp);
    let up = peer::create_upstream_offer(RELAY_UPSTREAM_LEG, None, max_message, now)
        .expect("the relay makes its upstream offer");
    let relay_offer = peer::with_max_message_size(
        &up.offer.to_sdp_string(),
        client_terms.relayable(max_message),
    );
    ClientAccepted {
        client_leg,
        client_terms,
        up,
        relay_offer,
    }
}

/// The relay's second step: the provider's answer accepted, and the client's answer told
/// the largest message the provider takes. Returns the upstream data-channel terms and the
/// client's answer. Never inlined, as [`relay_accepts_client`].
#[inline(never)]
fn relay_accepts_provider(
    rtc: &mut Rtc,
    pending: SdpPendingOffer,
    provider_answer: &str,
    relay_offer: &str,
    client_answer: &str,
    max_message: usize,
) -> (DataChannelTerms, String) {
    peer::accept_upstream_answer(rtc, pending, provider_answer)
        .expect("the relay accepts the provider's answer");
    let upstream_terms = peer::data_channel_terms(provider_answer, relay_offer);
    let client_answer =
        peer::with_max_message_size(client_answer, upstream_terms.relayable(max_message));
    (upstream_terms, client_answer)
}

impl VirtualCall {
    /// Sets the call up as `Relay::setup` does, up to the point where the client has
    /// the answer: the client does not have it yet.
    pub fn new(options: Options) -> Self {
        let start = Instant::now();
        let now = start;

        // The client's offer, as a browser makes it.
        let mut client_rtc = peer_config(
            options.client_opus_pt,
            options.peer_sctp_buffer,
            options.client_max_message,
        )
        .build(now);
        client_rtc.add_local_candidate(Candidate::host(CLIENT, "udp").expect("candidate"));
        let mut api = client_rtc.sdp_api();
        let client_mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        if options.client_data_channel {
            api.add_channel(super::EVENTS_CHANNEL.to_string());
        }
        let (offer, client_pending) = api.apply().expect("client offer");
        let mut offer = offer.to_sdp_string();
        if options.client_rejects_data_channel {
            offer = offer.replace("m=application 9 ", "m=application 0 ");
        }
        let shown = |side: Side, sdp: String| match options.ignores_max_message {
            Some(s) if s == side => peer::with_max_message_size(&sdp, 16 << 20),
            _ => sdp,
        };
        let max_message = options.limits.dc_buffer_bytes;

        // The relay: client leg, upstream offer, the provider's answer, the bridge.
        let t = std::time::Instant::now();
        let ClientAccepted {
            client_leg,
            client_terms,
            mut up,
            relay_offer,
        } = relay_accepts_client(&offer, max_message, now);
        let mut relay_setup = t.elapsed();
        let mut provider_rtc =
            peer_config(111, options.peer_sctp_buffer, options.provider_max_message).build(now);
        provider_rtc.add_local_candidate(Candidate::host(PROVIDER, "udp").expect("candidate"));
        let provider_sees = shown(Side::Provider, relay_offer.clone());
        let provider_was_told = peer::data_channel_terms(&provider_sees, "").peer_max_message;
        let upstream_offer = SdpOffer::from_sdp_string(&provider_sees).expect("sdp");
        let provider_answer = provider_rtc
            .sdp_api()
            .accept_offer(upstream_offer)
            .expect("the provider accepts the relay's offer")
            .to_sdp_string();
        let t = std::time::Instant::now();
        let (upstream_terms, client_answer) = relay_accepts_provider(
            &mut up.rtc,
            up.pending,
            &provider_answer,
            &relay_offer,
            &client_leg.answer_sdp,
            max_message,
        );
        relay_setup += t.elapsed();
        let client_answer = shown(Side::Client, client_answer);

        let metrics = Metrics::new();
        let counters = Arc::new(CallCounters::default());
        let mut telemetry = BridgeTelemetry::from_metrics(&metrics, counters.clone());
        if let Some(budget) = options.budget {
            let registry = crate::registry::Registry::new(1, 1);
            let entry = registry
                .reserve(crate::registry::NewCall {
                    call_id: "rtc_virtual0",
                    api: options.api,
                    model: "m",
                    upstream_model: "m",
                    worker_id: "w",
                    principal: "",
                })
                .expect("a registry entry");
            telemetry = telemetry.with_usage(crate::usage_tap::UsageTap::new(
                entry,
                metrics.usage.clone(),
                budget,
            ));
        }
        let t = std::time::Instant::now();
        let bridge = Bridge::new(
            LegSetup {
                rtc: client_leg.rtc,
                local_addr: RELAY_CLIENT_LEG,
                tcp_local_addr: None,
                audio_mid: client_leg.audio_mid,
                data_channel: client_terms,
            },
            LegSetup {
                rtc: up.rtc,
                local_addr: RELAY_UPSTREAM_LEG,
                tcp_local_addr: None,
                audio_mid: Some(up.audio_mid),
                data_channel: upstream_terms,
            },
            up.channel,
            options.limits,
            telemetry,
            now,
        )
        .with_api(options.api);
        relay_setup += t.elapsed();
        let mut call = VirtualCall {
            start,
            now,
            client: TestPeer::new(client_rtc, CLIENT, client_mid, now),
            provider: TestPeer::new(provider_rtc, PROVIDER, up.audio_mid, now),
            relay: RelaySide {
                bridge,
                stopped: None,
                finished_at: None,
                ended_at: None,
                last_datagram: HashMap::new(),
                max_outbox_bytes: HashMap::new(),
            },
            net: Network::new(options.latency),
            metrics,
            counters,
            client_was_told: peer::data_channel_terms(&client_answer, "").peer_max_message,
            provider_was_told,
            client_answer: Some((client_pending, client_answer)),
            steps_at_now: 0,
            cost: Cost {
                relay_setup,
                ..Cost::default()
            },
        };
        // Both peers and the bridge were mutated by the negotiation.
        call.drain(Side::Client);
        call.drain(Side::Provider);
        call.after_relay_input();
        call
    }

    /// A call whose client has the answer.
    pub fn start(options: Options) -> Self {
        let mut call = Self::new(options);
        call.answer_client();
        call
    }

    /// A call with both `oai-events` channels open end to end (the relay's included).
    pub fn connected(options: Options) -> Self {
        let mut call = Self::start(options);
        let limit = call.now + Duration::from_secs(10);
        call.run_while(limit, |c| {
            !(c.client.channel.is_some()
                && c.provider.channel.is_some()
                && c.relay.bridge.is_connected()
                && c.relay.bridge.client.channel.is_some()
                && c.relay.bridge.upstream.channel.is_some())
        });
        assert!(
            call.relay.bridge.is_connected() && call.client.channel.is_some(),
            "the call did not connect within 10 s of virtual time"
        );
        call
    }

    /// The client receives the relay's SDP answer now.
    pub fn answer_client(&mut self) {
        let (pending, sdp) = self.client_answer.take().expect("answered once");
        let answer = SdpAnswer::from_sdp_string(&sdp).expect("the relay's answer parses");
        self.client
            .rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .expect("the client accepts the relay's answer");
        self.drain(Side::Client);
    }

    pub fn peer(&mut self, side: Side) -> &mut TestPeer {
        match side {
            Side::Client => &mut self.client,
            Side::Provider => &mut self.provider,
        }
    }

    /// Virtual time since the call was set up.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// `side` sends `frames` Opus frames, one per [`FRAME`], starting now.
    pub fn send_audio(&mut self, side: Side, frames: u32) {
        let now = self.now;
        self.peer(side).audio = (frames > 0).then_some((frames, now));
    }

    /// From now on `side`'s frames are `sized_frame(seq, len)`, `len` cycling through `sizes`.
    pub fn use_frame_sizes(&mut self, side: Side, sizes: &[usize]) {
        self.peer(side).frame_sizes = sizes.to_vec();
    }

    /// `side` sends these data-channel messages as fast as its channel takes them.
    pub fn send_messages(&mut self, side: Side, messages: impl IntoIterator<Item = Outgoing>) {
        self.peer(side).outbox.extend(messages);
        self.flush_outbox(side);
    }

    pub fn send_text(&mut self, side: Side, text: &str) {
        self.send_messages(
            side,
            [Outgoing {
                binary: false,
                data: text.as_bytes().to_vec(),
            }],
        );
    }

    /// `side` hangs up: its str0m closes (DTLS close_notify, SCTP abort).
    pub fn close(&mut self, side: Side) {
        self.peer(side).rtc.close().expect("close");
        self.drain(side);
    }

    /// Runs every event up to and including `until`, then sets the clock there.
    pub fn run_until(&mut self, until: Instant) {
        self.run_while(until, |_| true);
        self.now = self.now.max(until);
    }

    pub fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        self.run_until(until);
    }

    /// Runs while `keep_going` holds and events remain before `limit`.
    pub fn run_while(&mut self, limit: Instant, mut keep_going: impl FnMut(&Self) -> bool) {
        while keep_going(self) {
            let (at, wake) = self.next_wake();
            if at > limit {
                break;
            }
            self.step(at, wake);
        }
    }

    /// Runs until the relay's driver stops; panics if it has not by `limit` from now.
    pub fn run_until_stopped(&mut self, limit: Duration) -> (Instant, EndReason) {
        let limit = self.now + limit;
        self.run_while(limit, |c| c.relay.stopped.is_none());
        self.relay
            .stopped
            .unwrap_or_else(|| panic!("the call did not end by {:?}", limit - self.start))
    }

    fn next_wake(&self) -> (Instant, Wake) {
        let mut next = (self.client.wake_at(), Wake::Client);
        let provider = self.provider.wake_at();
        if provider < next.0 {
            next = (provider, Wake::Provider);
        }
        if self.relay.stopped.is_none() {
            let relay = self.relay.bridge.poll_timeout();
            if relay < next.0 {
                next = (relay, Wake::Relay);
            }
        }
        if let Some(at) = self.net.next_arrival() {
            if at < next.0 {
                next = (at, Wake::Datagram);
            }
        }
        // Nothing happens in the past: a deadline already due runs now.
        (next.0.max(self.now), next.1)
    }

    fn step(&mut self, at: Instant, wake: Wake) {
        if at == self.now {
            self.steps_at_now += 1;
            assert!(
                self.steps_at_now < 100_000,
                "no progress at {:?}: {wake:?} keeps asking to run now",
                self.now - self.start
            );
        } else {
            self.steps_at_now = 0;
        }
        self.now = at;
        match wake {
            Wake::Client => self.timed_peer_wake(Side::Client),
            Wake::Provider => self.timed_peer_wake(Side::Provider),
            Wake::Relay => {
                let t = std::time::Instant::now();
                self.relay_timeout(at);
                self.cost.relay += t.elapsed();
            }
            Wake::Datagram => self.deliver(),
        }
    }

    fn timed_peer_wake(&mut self, side: Side) {
        let t = std::time::Instant::now();
        self.peer_wake(side);
        self.cost.peers += t.elapsed();
    }

    /// The relay's work on a timeout: what a media shard does when the bridge's deadline
    /// comes.
    #[inline(never)]
    fn relay_timeout(&mut self, at: Instant) {
        self.relay.bridge.handle_timeout(at);
        self.after_relay_input();
    }

    /// The relay's work on one datagram: what a media shard does for one received datagram.
    #[inline(never)]
    fn relay_datagram(&mut self, leg: super::Leg, source: SocketAddr, data: &[u8]) {
        let now = self.now;
        self.relay.last_datagram.insert(leg, now);
        self.relay.bridge.handle_datagram(leg, now, source, data);
        self.after_relay_input();
    }

    fn deliver(&mut self) {
        let Some(d) = self.net.in_flight.pop_front() else {
            return;
        };
        if self.net.down.contains(&d.destination) {
            self.net.dropped += 1;
            return;
        }
        let side = match d.destination {
            CLIENT => Side::Client,
            PROVIDER => Side::Provider,
            RELAY_CLIENT_LEG | RELAY_UPSTREAM_LEG => {
                if self.relay.stopped.is_some() {
                    // The driver is gone and its sockets closed.
                    self.net.dropped += 1;
                    return;
                }
                let leg = if d.destination == RELAY_CLIENT_LEG {
                    super::Leg::Client
                } else {
                    super::Leg::Upstream
                };
                let t = std::time::Instant::now();
                self.relay_datagram(leg, d.source, &d.data);
                self.cost.relay += t.elapsed();
                return;
            }
            _ => {
                self.net.dropped += 1;
                return;
            }
        };
        let t = std::time::Instant::now();
        self.peer_receive(side, &d);
        self.cost.peers += t.elapsed();
    }

    fn peer_receive(&mut self, side: Side, d: &InFlight) {
        let now = self.now;
        let peer = self.peer(side);
        if peer.failed {
            return;
        }
        let Some(input) = shell::receive(now, d.source, d.destination, &d.data) else {
            return;
        };
        if peer.rtc.handle_input(input).is_err() {
            peer.failed = true;
        }
        self.drain(side);
        self.flush_outbox(side);
    }

    /// What a media shard does after each batch of input: let written RTP leave, send
    /// every transmit, and stop once the bridge has an end reason.
    fn after_relay_input(&mut self) {
        if self.relay.stopped.is_some() {
            return;
        }
        let now = self.now;
        self.relay.bridge.send_written(now);
        self.send_relay_transmits();
        for leg in [super::Leg::Client, super::Leg::Upstream] {
            let bytes = self.relay.bridge.leg(leg).outbox.bytes();
            let max = self.relay.max_outbox_bytes.entry(leg).or_default();
            *max = (*max).max(bytes);
        }
        if self.relay.bridge.end_reason().is_some() && self.relay.ended_at.is_none() {
            self.relay.ended_at = Some(now);
        }
        if self.relay.bridge.is_finished() {
            let reason = self
                .relay
                .bridge
                .end_reason()
                .expect("a finished call has a reason");
            let ended_at = self.relay.ended_at.unwrap_or(now);
            self.relay.stopped = Some((ended_at, reason));
            self.relay.finished_at = Some(now);
        }
    }

    fn send_relay_transmits(&mut self) {
        let now = self.now;
        let out: Vec<_> = self.relay.bridge.take_transmits().collect();
        for (leg, t) in out {
            let source = self.relay.bridge.local_addr(leg);
            self.net.send(now, source, t.destination, &t.contents);
        }
    }

    fn peer_wake(&mut self, side: Side) {
        let now = self.now;
        let peer = self.peer(side);
        if let Some((left, due)) = peer.audio {
            if due <= now {
                write_frame(peer, now);
                peer.audio = (left > 1).then_some((left - 1, due + FRAME));
            }
        }
        if !peer.failed && peer.rtc.handle_input(Input::Timeout(now)).is_err() {
            peer.failed = true;
        }
        self.drain(side);
        self.flush_outbox(side);
    }

    /// Polls a peer until its next timeout: transmits go on the network, events are
    /// recorded.
    fn drain(&mut self, side: Side) {
        let now = self.now;
        let (peer, net) = match side {
            Side::Client => (&mut self.client, &mut self.net),
            Side::Provider => (&mut self.provider, &mut self.net),
        };
        if peer.failed {
            peer.next_timeout = now + Duration::from_secs(3_600);
            return;
        }
        let addr = peer.addr;
        let mut events = Vec::new();
        let drained = shell::drain(&mut peer.rtc, |_, out| match out {
            Drained::Transmit(t) => net.send(now, addr, t.destination, &t.contents),
            Drained::Event(e) => events.push(e),
        });
        for e in events {
            record(peer, now, e);
        }
        match drained {
            // str0m may ask to be woken now again when it has nothing to do; like str0m's
            // own harness, move on a little.
            Ok(t) if t <= now => peer.next_timeout = now + Duration::from_millis(1),
            Ok(t) => peer.next_timeout = t,
            Err(_) => {
                peer.failed = true;
                peer.events.push((now, PeerEvent::Closed));
                peer.next_timeout = now + Duration::from_secs(3_600);
            }
        }
    }

    fn flush_outbox(&mut self, side: Side) {
        let peer = self.peer(side);
        let Some(id) = peer.channel else {
            return;
        };
        while let Some(m) = peer.outbox.front() {
            let Some(mut channel) = peer.rtc.channel(id) else {
                return;
            };
            match channel.write(m.binary, &m.data) {
                Ok(true) => {
                    peer.outbox.pop_front();
                }
                Ok(false) => break,
                Err(e) => panic!("{side:?} cannot write on its channel: {e}"),
            }
        }
        self.drain(side);
    }
}

fn record(peer: &mut TestPeer, now: Instant, event: Event) {
    let seen = match event {
        Event::Connected => PeerEvent::Connected,
        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
            PeerEvent::IceDisconnected
        }
        Event::ChannelOpen(id, label) if label == super::EVENTS_CHANNEL => {
            peer.channel = Some(id);
            PeerEvent::ChannelOpen
        }
        Event::ChannelData(d) => PeerEvent::Message {
            binary: d.binary,
            data: d.data,
        },
        Event::RtpPacket(p) => PeerEvent::Rtp {
            pt: *p.header.payload_type,
            payload: p.payload.to_vec(),
        },
        Event::ChannelClose(id) if peer.channel == Some(id) => PeerEvent::ChannelClosed,
        Event::Closed => PeerEvent::Closed,
        _ => return,
    };
    peer.events.push((now, seen));
}

/// One Opus frame on the peer's audio stream; its payload names the sender's sequence.
fn write_frame(peer: &mut TestPeer, now: Instant) {
    if peer.failed {
        return;
    }
    let pt = peer.opus_pt();
    let seq = peer.seq;
    peer.seq += 1;
    let mid = peer.audio_mid;
    let mut api = peer.rtc.direct_api();
    let Some(stream) = api.stream_tx_by_mid(mid, None) else {
        return;
    };
    let payload = if peer.frame_sizes.is_empty() {
        let mut payload = vec![0xAB; 120];
        payload[..8].copy_from_slice(&seq.to_be_bytes());
        payload
    } else {
        sized_frame(seq, peer.frame_sizes[seq as usize % peer.frame_sizes.len()])
    };
    stream.write_rtp(RtpWrite::new(
        pt,
        seq.into(),
        (seq * 960) as u32,
        now,
        payload,
    ));
}

/// Frame `seq` of a peer that cycles through frame sizes: `len` bytes, each a function of
/// `seq` and its position, so a byte lost, added or taken from another frame shows.
pub fn sized_frame(seq: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ 0x5A)
        .collect()
}

/// A browser-like peer configuration (echo-model's test client: Opus at `opus_pt`
/// with a browser's format parameters, RTP mode, the shared DTLS certificate). The
/// provider uses it too: as the answerer it takes the relay's payload types anyway.
fn peer_config(opus_pt: u8, sctp_buffer: usize, max_message: usize) -> RtcConfig {
    echo_model::client::client_rtc_config(Pt::from(opus_pt))
        .expect("a test peer configuration")
        .set_sctp_max_buffered_amount(sctp_buffer)
        .set_sctp_max_message_size(max_message as u32)
}
