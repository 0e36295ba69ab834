//! A lean str0m client for load: one tokio task per peer, no command channel, frames
//! written straight into its `Rtc` on a 20 ms cadence (phases staggered across peers),
//! received datagrams read in batches. It does what a browser's WebRTC stack must do for
//! the relay to do its full work (ICE, DTLS, SRTP, SCTP), and skips what does not change the
//! relay's work (no Opus encoding: payloads are 160 bytes with a send timestamp; no stats).
//! All clients share one DTLS certificate and crypto provider, so building one is cheap.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use echo_model::client::{audio_frame, frame_send_time, micros_since_epoch, FRAME_TICKS};
use rtc_peer::udp::{self, UdpPeer, MAX_DATAGRAM};
use rtc_peer::EVENTS_CHANNEL;
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Rtc};

pub const FRAME_INTERVAL: Duration = Duration::from_millis(20);
/// One data-channel event per second per call.
const FRAMES_PER_EVENT: u64 = 50;
const OPUS_PT: u8 = 111;

/// Counters shared by every peer of one load level.
#[derive(Default)]
pub struct Load {
    pub sending: AtomicBool,
    pub measuring: AtomicBool,
    pub stop: AtomicBool,
    pub ready: AtomicUsize,
    pub dead: AtomicUsize,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_received: AtomicU64,
    pub send_errors: AtomicU64,
    /// Peers send `response.create` (which the echo provider answers with a priced
    /// `response.done`, so the relay meters usage) instead of `bench.ping`.
    pub priced_events: AtomicBool,
    /// On stop, vanish: drop the socket without closing (no DTLS close_notify, no SCTP
    /// abort), as a client whose network or process died would.
    pub vanish: AtomicBool,
    /// Some peer got through DTLS (str0m's `Connected`), and opened `oai-events`: how far a
    /// call that never became ready got.
    pub connected: AtomicBool,
    pub channel_open: AtomicBool,
    /// The last ICE state a peer reported (`ice_state_name`), 0 before any.
    pub ice_state: std::sync::atomic::AtomicU8,
    /// A peer is ready once DTLS connects, not at the provider's `session.created` (a server
    /// that is not a model provider, such as Janus's echo test).
    pub ready_on_connected: AtomicBool,
}

/// The name of a [`Load::ice_state`] value.
pub fn ice_state_name(v: u8) -> &'static str {
    match v {
        1 => "new",
        2 => "checking",
        3 => "connected",
        4 => "completed",
        5 => "disconnected",
        _ => "none",
    }
}

fn ice_state_code(s: str0m::IceConnectionState) -> u8 {
    use str0m::IceConnectionState as S;
    match s {
        S::New => 1,
        S::Checking => 2,
        S::Connected => 3,
        S::Completed => 4,
        S::Disconnected => 5,
    }
}

/// A peer that has made its offer.
pub struct Offer {
    rtc: Rtc,
    socket: std::net::UdpSocket,
    pending: SdpPendingOffer,
    mid: Mid,
    pub sdp: String,
}

impl Offer {
    pub fn new() -> Result<Offer> {
        let socket = udp::bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).context("binding a UDP socket")?;
        Offer::on_socket(socket)
    }

    /// An offer whose socket is already bound (for instance inside a network namespace: the
    /// socket keeps it wherever the peer runs).
    pub fn on_socket(socket: std::net::UdpSocket) -> Result<Offer> {
        let local = socket.local_addr()?;
        let cfg = echo_model::client::client_rtc_config(Pt::from(OPUS_PT))?;
        let mut rtc = cfg.build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_channel(EVENTS_CHANNEL.to_string());
        let (offer, pending) = api.apply().ok_or_else(|| anyhow!("no offer"))?;
        Ok(Offer {
            rtc,
            socket,
            pending,
            mid,
            sdp: offer.to_sdp_string(),
        })
    }

    /// Accepts the answer and starts the peer's task. The task counts itself in
    /// `load.ready` once `session.created` arrives over `oai-events`.
    pub fn start(
        mut self,
        answer: &str,
        load: Arc<Load>,
        phase: Duration,
    ) -> Result<tokio::task::JoinHandle<Vec<u32>>> {
        let answer = SdpAnswer::from_sdp_string(answer).context("parsing the answer")?;
        self.rtc
            .sdp_api()
            .accept_answer(self.pending, answer)
            .context("accepting the answer")?;
        let peer = Peer {
            udp: UdpPeer::new(self.rtc, self.socket)?,
            mid: self.mid,
            state: PeerState {
                load,
                channel: None,
                ready: false,
                samples: Vec::new(),
            },
            frame: 0,
            rtp_time: rand::random(),
        };
        Ok(tokio::spawn(peer.run(phase)))
    }
}

struct Peer {
    udp: UdpPeer,
    mid: Mid,
    state: PeerState,
    frame: u64,
    rtp_time: u32,
}

/// What events update, borrowed apart from the `UdpPeer` during a drain.
struct PeerState {
    load: Arc<Load>,
    channel: Option<ChannelId>,
    ready: bool,
    /// Round trips (µs) of frames received while measuring.
    samples: Vec<u32>,
}

impl Peer {
    async fn run(mut self, phase: Duration) -> Vec<u32> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut next_frame: Option<Instant> = None;
        while let Some(deadline) = self.drain() {
            if self.state.load.stop.load(Relaxed) || !self.udp.shell.rtc().is_alive() {
                break;
            }
            let now = Instant::now();
            let sending = self.state.ready && self.state.load.sending.load(Relaxed);
            if sending && next_frame.is_none() {
                next_frame = Some(now + phase);
            } else if !sending {
                next_frame = None;
            }
            let mut wake = deadline.min(now + Duration::from_millis(200));
            if let Some(f) = next_frame {
                wake = wake.min(f);
            }
            tokio::select! {
                r = self.udp.socket.readable() => {
                    if r.is_err() { continue; }
                    // Batch: everything that is already queued on the socket.
                    for _ in 0..64 {
                        match self.udp.socket.try_recv_from(&mut buf) {
                            Ok((n, source)) => {
                                self.udp.handle_datagram(&buf[..n], source, Instant::now());
                                if self.drain().is_none() { break; }
                            }
                            Err(_) => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    if let Some(f) = next_frame {
                        if now >= f {
                            self.write_frame(now);
                            // Keep the cadence; skip frames we are late for, like a microphone.
                            let mut n = f + FRAME_INTERVAL;
                            while n <= now { n += FRAME_INTERVAL; }
                            next_frame = Some(n);
                        }
                    }
                    if self.udp.handle_timeout(now).is_err() {
                        break;
                    }
                }
            }
        }
        let load = &self.state.load;
        if self.state.ready {
            load.ready.fetch_sub(1, Relaxed);
        }
        load.dead.fetch_add(1, Relaxed);
        if !load.vanish.load(Relaxed) {
            self.udp.close_gracefully();
        }
        self.state.samples
    }

    fn write_frame(&mut self, now: Instant) {
        let payload = audio_frame(self.frame);
        let mut api = self.udp.rtc().direct_api();
        let Some(tx) = api.stream_tx_by_mid(self.mid, None) else {
            return;
        };
        tx.write_rtp(
            RtpWrite::new(
                Pt::from(OPUS_PT),
                self.frame.into(),
                self.rtp_time,
                now,
                payload,
            )
            .marker(self.frame == 0),
        );
        self.rtp_time = self.rtp_time.wrapping_add(FRAME_TICKS);
        self.state.load.frames_sent.fetch_add(1, Relaxed);
        if self.drain().is_none() {
            return;
        }
        if self.frame % FRAMES_PER_EVENT == FRAMES_PER_EVENT - 1 {
            if let Some(id) = self.state.channel {
                let kind = if self.state.load.priced_events.load(Relaxed) {
                    "response.create"
                } else {
                    "bench.ping"
                };
                let msg = format!("{{\"type\":\"{kind}\",\"i\":{}}}", self.frame);
                if let Some(mut ch) = self.udp.rtc().channel(id) {
                    if ch.write(false, msg.as_bytes()).unwrap_or(false) {
                        self.state.load.events_sent.fetch_add(1, Relaxed);
                    }
                }
                let _ = self.drain();
            }
        }
        self.frame += 1;
    }

    /// Drains str0m until its next timeout; `None` if the peer connection failed.
    fn drain(&mut self) -> Option<Instant> {
        let state = &mut self.state;
        let next = self.udp.drain(|_, e| state.on_event(e));
        // Reported live, while the level runs.
        let errors = std::mem::take(&mut self.udp.counters.send_errors);
        if errors > 0 {
            self.state.load.send_errors.fetch_add(errors, Relaxed);
        }
        next.ok()
    }
}

impl PeerState {
    fn on_event(&mut self, e: Event) {
        match e {
            Event::Connected => {
                self.load.connected.store(true, Relaxed);
                if !self.ready && self.load.ready_on_connected.load(Relaxed) {
                    self.ready = true;
                    self.load.ready.fetch_add(1, Relaxed);
                }
            }
            Event::IceConnectionStateChange(state) => {
                self.load.ice_state.store(ice_state_code(state), Relaxed)
            }
            Event::ChannelOpen(id, label) if label == EVENTS_CHANNEL => {
                self.channel = Some(id);
                self.load.channel_open.store(true, Relaxed);
            }
            Event::ChannelData(d) => {
                if !self.ready {
                    if d.data.windows(15).any(|w| w == b"session.created") {
                        self.ready = true;
                        self.load.ready.fetch_add(1, Relaxed);
                    }
                } else {
                    self.load.events_received.fetch_add(1, Relaxed);
                }
            }
            Event::RtpPacket(p) => {
                self.load.frames_received.fetch_add(1, Relaxed);
                if self.load.measuring.load(Relaxed) {
                    if let Some(sent) = frame_send_time(&p.payload) {
                        let rtt = micros_since_epoch().saturating_sub(sent);
                        self.samples.push(rtt.min(u32::MAX as u64) as u32);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One load peer against the in-process echo model: it becomes ready on
    /// `session.created`, its frames and pings come back, and it stops when told.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_peer_gets_its_frames_and_events_echoed() {
        let provider = echo_model::MockProvider::start(echo_model::ProviderConfig::local(None))
            .await
            .unwrap();
        let offer = Offer::new().unwrap();
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/realtime/calls", provider.base_url()))
            .header("authorization", "Bearer k")
            .header("content-type", "application/sdp")
            .body(offer.sdp.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        let answer = resp.text().await.unwrap();
        let load = Arc::new(Load::default());
        let task = offer.start(&answer, load.clone(), Duration::ZERO).unwrap();

        until("ready", || load.ready.load(Relaxed) == 1).await;
        load.measuring.store(true, Relaxed);
        load.sending.store(true, Relaxed);
        until("a ping echoed", || load.events_received.load(Relaxed) >= 1).await;
        assert!(load.frames_received.load(Relaxed) >= 40);
        // No assertion on `send_errors`: a send the loopback socket buffer cannot take at
        // once (EWOULDBLOCK, seen about once in ten runs on a busy 2-core machine) is dropped
        // and counted, as the network would; the bench reports it as a figure.
        load.stop.store(true, Relaxed);
        let samples = task.await.unwrap();
        assert!(!samples.is_empty());
        assert_eq!(load.dead.load(Relaxed), 1);
        assert_eq!(load.ready.load(Relaxed), 0);
        provider.shutdown().await;
    }
}
