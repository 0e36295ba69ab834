//! A lean str0m client for load: one tokio task per peer, no command channel, frames
//! written straight into its `Rtc` on a 20 ms cadence (phases staggered across peers),
//! received datagrams read in batches. It does what a browser's WebRTC stack must do for
//! the relay to do its full work (ICE, DTLS, SRTP, SCTP), and skips what does not change the
//! relay's work (no Opus encoding: payloads are 160 bytes with a send timestamp; no stats).
//! All clients share one DTLS certificate and crypto provider, so building one is cheap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use echo_model::client::{audio_frame, frame_send_time, micros_since_epoch, FRAME_TICKS};
use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::channel::ChannelId;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::RtpWrite;
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::net::UdpSocket;

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
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a UDP socket")?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;
        let cfg = echo_model::client::client_rtc_config(Pt::from(OPUS_PT))?;
        let mut rtc = cfg.build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, "udp")?);
        let mut api = rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_channel("oai-events".to_string());
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
        let local = self.socket.local_addr()?;
        let socket = UdpSocket::from_std(self.socket)?;
        let peer = Peer {
            rtc: self.rtc,
            socket,
            local,
            mid: self.mid,
            load,
            channel: None,
            ready: false,
            samples: Vec::new(),
            frame: 0,
            rtp_time: rand::random(),
        };
        Ok(tokio::spawn(peer.run(phase)))
    }
}

struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    mid: Mid,
    load: Arc<Load>,
    channel: Option<ChannelId>,
    ready: bool,
    /// Round trips (µs) of frames received while measuring.
    samples: Vec<u32>,
    frame: u64,
    rtp_time: u32,
}

impl Peer {
    async fn run(mut self, phase: Duration) -> Vec<u32> {
        let mut buf = vec![0u8; 2048];
        let mut next_frame: Option<Instant> = None;
        while let Some(deadline) = self.drain() {
            if self.load.stop.load(Relaxed) || !self.rtc.is_alive() {
                break;
            }
            let now = Instant::now();
            let sending = self.ready && self.load.sending.load(Relaxed);
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
                r = self.socket.readable() => {
                    if r.is_err() { continue; }
                    // Batch: everything that is already queued on the socket.
                    for _ in 0..64 {
                        match self.socket.try_recv_from(&mut buf) {
                            Ok((n, source)) => {
                                let Ok(contents) = buf[..n].try_into() else { continue };
                                let input = Input::Receive(Instant::now(), Receive {
                                    proto: Protocol::Udp,
                                    source,
                                    destination: self.local,
                                    contents,
                                });
                                let _ = self.rtc.handle_input(input);
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
                    if self.rtc.handle_input(Input::Timeout(now)).is_err() {
                        break;
                    }
                }
            }
        }
        if self.ready {
            self.load.ready.fetch_sub(1, Relaxed);
        }
        self.load.dead.fetch_add(1, Relaxed);
        let _ = self.rtc.close();
        let _ = self.drain();
        let _ = self.rtc.handle_input(Input::Timeout(Instant::now()));
        let _ = self.drain();
        self.samples
    }

    fn write_frame(&mut self, now: Instant) {
        let payload = audio_frame(self.frame);
        let mut api = self.rtc.direct_api();
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
        self.load.frames_sent.fetch_add(1, Relaxed);
        if self.drain().is_none() {
            return;
        }
        if self.frame % FRAMES_PER_EVENT == FRAMES_PER_EVENT - 1 {
            if let Some(id) = self.channel {
                let msg = format!("{{\"type\":\"bench.ping\",\"i\":{}}}", self.frame);
                if let Some(mut ch) = self.rtc.channel(id) {
                    if ch.write(false, msg.as_bytes()).unwrap_or(false) {
                        self.load.events_sent.fetch_add(1, Relaxed);
                    }
                }
                let _ = self.drain();
            }
        }
        self.frame += 1;
    }

    /// Drains str0m until its next timeout; `None` if the peer connection failed.
    fn drain(&mut self) -> Option<Instant> {
        loop {
            match self.rtc.poll_output() {
                Ok(Output::Timeout(t)) => return Some(t),
                Ok(Output::Transmit(t)) => {
                    if self.socket.try_send_to(&t.contents, t.destination).is_err() {
                        self.load.send_errors.fetch_add(1, Relaxed);
                    }
                }
                Ok(Output::Event(e)) => self.on_event(e),
                Err(_) => return None,
            }
        }
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::ChannelOpen(id, label) if label == "oai-events" => self.channel = Some(id),
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
