//! The driver of one call: owns the upstream socket, the queue from the shared client
//! port and the timer, and runs the sans-IO [`Bridge`] until the call ends.
//!
//! Every wake-up, whatever caused it, feeds a batch from each inbound source and then runs
//! the timers that are due, so a leg that is always ready (a client flooding at line rate)
//! starves neither the other leg nor the call's deadlines.

use crate::allowlist::is_public;
use crate::bridge::{Bridge, Leg};
use crate::call_state::EndReason;
use crate::media_socket::{ClientPort, Datagram, ReplySources, RouteGuard, SEND_WAIT};
use crate::media_tcp::TcpRoute;
use crate::metrics::ReasonLabel;
use crate::registry::CallEntry;
use prometheus_client::metrics::{counter::Counter, family::Family};
use rtc_peer::udp::{send_or_wait, Send, MAX_DATAGRAM};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use str0m::net::{Protocol, Transmit};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// How many datagrams of each source (client queue, upstream socket) to feed per wake-up
/// before looking at timers and transmits again: batching cuts wake-ups under load.
const BATCH: usize = 32;

/// What ended the driver's wait.
enum Woke {
    Cancelled,
    Client(Option<Datagram>),
    Upstream(std::io::Result<(usize, SocketAddr)>),
    Timer,
}

pub struct CallDriver {
    pub bridge: Bridge,
    pub entry: Arc<CallEntry>,
    pub client_port: Arc<ClientPort>,
    /// The call's registration on the ICE-TCP port, if the relay listens for ICE-TCP. Dropped
    /// when the driver ends: the port forgets the call and closes its connections.
    pub client_tcp: Option<TcpRoute>,
    pub client_rx: mpsc::Receiver<Datagram>,
    pub upstream_socket: UdpSocket,
    /// `--allow-private-upstreams`: otherwise the upstream leg neither hears from nor sends
    /// to a non-public address, so str0m never learns (peer-reflexive) or nominates one.
    pub upstream_allow_private: bool,
    /// `upstream_addresses_refused`, by reason.
    pub upstream_refused: Family<ReasonLabel, Counter>,
    /// Live calls with both legs connected.
    pub connected_gauge: prometheus_client::metrics::gauge::Gauge,
    /// Dropped when the driver ends: the shared port forgets the call.
    pub _route: RouteGuard,
}

impl CallDriver {
    pub async fn run(mut self) -> EndReason {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut out: Vec<(Leg, Transmit)> = Vec::with_capacity(64);
        let mut reported_connected = false;
        // The protocol of the client leg's latest transmit: once connected, the nominated
        // pair's (UDP, or ICE-TCP for a client whose network blocks UDP).
        let mut client_proto = Protocol::Udp;
        // Where each client address reached us (port bound on the unspecified address only):
        // replies leave from there.
        let mut reply_sources = ReplySources::default();
        let mut ending = false;
        let reason = loop {
            if !ending && self.bridge.end_reason().is_some() {
                // The call is ending: what is queued drains, then the bridge closes both legs.
                // An ICE-TCP client may close its connection as soon as it reads the goodbye:
                // mark the call as ending before any goodbye is sent, so that close counts as
                // the call's end.
                ending = true;
                if let Some(tcp) = &self.client_tcp {
                    tcp.ending();
                }
            }
            if let Some(proto) = self.send(&mut out, &reply_sources).await {
                client_proto = proto;
            }
            if self.bridge.is_finished() {
                break self.bridge.end_reason().unwrap_or(EndReason::InternalError);
            }
            if !reported_connected && self.bridge.is_connected() {
                reported_connected = true;
                self.entry.mark_connected();
                self.connected_gauge.inc();
                tracing::info!(call_id = %self.entry.call_id, client_transport = %client_proto, "call connected");
            }
            let deadline = self.bridge.poll_timeout();
            let woke = tokio::select! {
                biased;
                // Once ending, a cancellation has nothing left to do (and would fire forever).
                _ = self.entry.cancel.cancelled(), if !ending => Woke::Cancelled,
                d = self.client_rx.recv() => Woke::Client(d),
                r = self.upstream_socket.recv_from(&mut buf) => Woke::Upstream(r),
                _ = tokio::time::sleep_until(deadline.into()) => Woke::Timer,
            };
            match woke {
                Woke::Cancelled => {
                    let reason = self.entry.requested_end().unwrap_or(EndReason::Hangup);
                    self.bridge.end(reason);
                    continue;
                }
                Woke::Client(None) => {
                    self.bridge.end(EndReason::InternalError);
                    continue;
                }
                Woke::Client(Some(d)) => self.client_packet(d, &mut reply_sources),
                Woke::Upstream(Ok((n, source))) => self.upstream_packet(source, &buf[..n]),
                // ICMP port unreachable from a vanished provider shows up here;
                // the peer timeout decides when the leg is gone.
                Woke::Upstream(Err(e)) => tracing::trace!(error = %e, "upstream receive error"),
                Woke::Timer => {}
            }
            // Whatever woke us, both sources get a batch: the select alone hands every
            // wake-up to the first ready branch, so a source that is always ready (a client
            // flooding the shared port at line rate) would starve the other...
            self.client_batch(&mut reply_sources);
            self.upstream_batch(&mut buf);
            // ...and the timer, whose branch never wins while data is always ready: str0m's
            // timers and the call's deadlines (maximum duration, peer timeouts) are checked
            // after every batch.
            let now = Instant::now();
            if self.bridge.poll_timeout() <= now {
                self.bridge.handle_timeout(now);
            }
        };
        // The bridge said goodbye on both legs (DTLS close_notify, SCTP abort) and the loop
        // sent it, so peers learn at once instead of after their own timeouts.
        if reported_connected {
            self.connected_gauge.dec();
        }
        reason
    }

    /// Feeds what the client queue holds now, up to a batch.
    fn client_batch(&mut self, reply_sources: &mut ReplySources) {
        for _ in 0..BATCH {
            match self.client_rx.try_recv() {
                Ok(d) => self.client_packet(d, reply_sources),
                Err(_) => break,
            }
        }
    }

    /// Feeds what the upstream socket holds now, up to a batch.
    fn upstream_batch(&mut self, buf: &mut [u8]) {
        for _ in 0..BATCH {
            match self.upstream_socket.try_recv_from(buf) {
                Ok((n, source)) => self.upstream_packet(source, &buf[..n]),
                Err(_) => break,
            }
        }
    }

    /// Whether the upstream leg may exchange datagrams with `addr`; counts a refusal.
    fn upstream_addr_allowed(&self, addr: SocketAddr, refusal: &'static str) -> bool {
        if self.upstream_allow_private || is_public(addr.ip()) {
            return true;
        }
        self.upstream_refused
            .get_or_create(&ReasonLabel {
                reason: refusal.to_string(),
            })
            .inc();
        false
    }

    fn upstream_packet(&mut self, source: SocketAddr, data: &[u8]) {
        if self.upstream_addr_allowed(source, "datagram_from_not_public") {
            self.bridge
                .handle_datagram(Leg::Upstream, Instant::now(), source, data);
        }
    }

    fn client_packet(&mut self, d: Datagram, reply_sources: &mut ReplySources) {
        if let Some(local) = d.local_ip {
            reply_sources.learn(d.source, local);
        }
        self.bridge
            .handle_packet(Leg::Client, d.at, d.proto, d.source, &d.data);
    }

    /// Sends what the bridge has to send; returns the protocol of the last client-leg transmit.
    async fn send(
        &mut self,
        out: &mut Vec<(Leg, Transmit)>,
        reply_sources: &ReplySources,
    ) -> Option<Protocol> {
        self.bridge.send_written(Instant::now());
        out.extend(self.bridge.take_transmits());
        let mut client_proto = None;
        for (leg, t) in out.drain(..) {
            if leg == Leg::Client {
                client_proto = Some(t.proto);
            }
            match leg {
                Leg::Client => match (t.proto, &self.client_tcp) {
                    // Queued on the client's connection; a full queue drops, counted.
                    (Protocol::Tcp, Some(tcp)) => tcp.send(t.destination, &t.contents),
                    (Protocol::Udp, _) => {
                        let from = reply_sources.source_for(t.destination);
                        self.client_port
                            .send_to(&t.contents, t.destination, from)
                            .await
                    }
                    _ => tracing::trace!(proto = %t.proto, "client-leg transmit on no transport"),
                },
                // A full upstream socket buffer waits briefly, never long enough to stall the call.
                Leg::Upstream => {
                    if !self.upstream_addr_allowed(t.destination, "datagram_to_not_public") {
                        continue;
                    }
                    let wait = Some(SEND_WAIT);
                    let failed =
                        match send_or_wait(&self.upstream_socket, &t.contents, t.destination, wait)
                        {
                            Send::Sent => None,
                            Send::Failed(e) => Some(e),
                            Send::Full(wait) => wait.await.err(),
                        };
                    if let Some(e) = failed {
                        tracing::trace!(error = %e, "upstream send failed");
                    }
                }
            }
        }
        client_proto
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{BridgeLimits, BridgeTelemetry, LegSetup};
    use crate::metrics::Metrics;
    use crate::peer;
    use crate::registry::{NewCall, Registry};
    use rtc_peer::udp::{next_wake, UdpPeer};
    use std::time::Duration;
    use str0m::media::{Direction, MediaKind};
    use str0m::{Candidate, Event, IceCreds, Rtc};

    const LOOPBACK: [u8; 4] = [127, 0, 0, 1];

    /// A call as the relay sets it up, over real loopback sockets: the client leg accepts an
    /// offer from a str0m client that never sends a packet (the flood below stands in for
    /// it), and the upstream leg is answered by `provider`, a real str0m peer on its own
    /// socket. Returns the driver and the sender of its client queue.
    fn call_with_provider(
        limits: BridgeLimits,
        provider: &mut Rtc,
        provider_addr: SocketAddr,
        queue: usize,
    ) -> (CallDriver, mpsc::Sender<Datagram>, Instant) {
        let now = Instant::now();
        let port = Arc::new(ClientPort::bind(SocketAddr::from((LOOPBACK, 0)), 1).unwrap());
        let mut client = rtc_peer::crypto::rtc_config().unwrap().build(now);
        let mut api = client.sdp_api();
        api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        api.add_channel(rtc_peer::EVENTS_CHANNEL.to_string());
        let (offer, _pending) = api.apply().unwrap();
        let ice = IceCreds {
            ufrag: "floodufrag".into(),
            pass: "floodpass-0123456789abcdef".into(),
        };
        let offer = offer.to_sdp_string();
        let client_leg = peer::accept_client_offer(
            &offer,
            port.local_addr(),
            None,
            ice.clone(),
            limits.dc_buffer_bytes,
            now,
        )
        .unwrap();
        let client_terms = peer::data_channel_terms(&offer, &client_leg.answer.to_sdp_string());

        let upstream_socket = std::net::UdpSocket::bind(SocketAddr::from((LOOPBACK, 0))).unwrap();
        upstream_socket.set_nonblocking(true).unwrap();
        let upstream_local = upstream_socket.local_addr().unwrap();
        let mut upstream =
            peer::create_upstream_offer(upstream_local, None, limits.dc_buffer_bytes, now).unwrap();
        provider.add_local_candidate(Candidate::host(provider_addr, "udp").unwrap());
        let upstream_offer = upstream.offer.to_sdp_string();
        let answer = provider
            .sdp_api()
            .accept_offer(upstream.offer)
            .unwrap()
            .to_sdp_string();
        peer::accept_upstream_answer(&mut upstream.rtc, upstream.pending, &answer).unwrap();
        let upstream_terms = peer::data_channel_terms(&answer, &upstream_offer);

        let metrics = Metrics::new();
        let registry = Registry::new(1, 1);
        let entry = registry
            .reserve(NewCall {
                call_id: "rtc_flood",
                api: realtime_relay_proto::call_id::Kind::Realtime,
                model: "m",
                upstream_model: "m",
                worker_id: "w",
                principal: "",
            })
            .unwrap();
        let bridge = Bridge::new(
            LegSetup {
                rtc: client_leg.rtc,
                local_addr: port.local_addr(),
                tcp_local_addr: None,
                audio_mid: client_leg.audio_mid,
                data_channel: client_terms,
            },
            LegSetup {
                rtc: upstream.rtc,
                local_addr: upstream_local,
                tcp_local_addr: None,
                audio_mid: Some(upstream.audio_mid),
                data_channel: upstream_terms,
            },
            upstream.channel,
            limits,
            BridgeTelemetry::from_metrics(&metrics, entry.counters.clone()),
            now,
        );
        let (tx, rx) = mpsc::channel(queue);
        let route = port.register(&ice.ufrag, &ice.pass, tx.clone());
        let driver = CallDriver {
            bridge,
            entry,
            client_port: port,
            client_tcp: None,
            client_rx: rx,
            upstream_socket: UdpSocket::from_std(upstream_socket).unwrap(),
            // The provider is on loopback.
            upstream_allow_private: true,
            upstream_refused: Family::default(),
            connected_gauge: Default::default(),
            _route: route,
        };
        (driver, tx, now)
    }

    /// Drives `peer` until `until`; returns when it saw the relay's `oai-events` channel
    /// open, which needs ICE, DTLS and SCTP with the relay's upstream leg: datagrams the
    /// relay received on its upstream socket and answered.
    /// Serves the provider's side until `until` (it keeps acknowledging, so a call that ends
    /// delivers what it queued without waiting out the grace period); returns when its
    /// `oai-events` channel opened.
    async fn provider_until(mut peer: UdpPeer, until: Instant) -> Option<Instant> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut open_at = None;
        while Instant::now() < until {
            let mut opened = false;
            let Ok(deadline) = peer.drain(|_, e| opened |= matches!(e, Event::ChannelOpen(..)))
            else {
                return open_at;
            };
            if opened && open_at.is_none() {
                open_at = Some(Instant::now());
            }
            let wake = next_wake(deadline.min(until), Instant::now());
            tokio::select! {
                r = peer.socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        peer.handle_datagram(&buf[..n], from, Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if peer.handle_timeout(Instant::now()).is_err() {
                        return open_at;
                    }
                }
            }
        }
        open_at
    }

    /// A client that keeps the call's queue full (a flood at line rate: every datagram the
    /// driver takes is replaced at once) must not starve the rest of the call. Before, the
    /// driver's `biased` select took the client queue whenever it was ready: the upstream
    /// socket was never read and the timer never fired, so the provider never connected and
    /// the call outlived its maximum duration for as long as the flood went on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flooding_client_starves_neither_the_upstream_leg_nor_the_call_deadlines() {
        const MAX_DURATION: Duration = Duration::from_millis(2_000);
        const LATE: Duration = Duration::from_millis(500);
        // Larger than the default (512), so that the driver cannot empty it while the OS
        // pauses the flooding thread for a few milliseconds: the client is always ready.
        const QUEUE: usize = 16_384;
        let limits = BridgeLimits {
            dc_buffer_bytes: 1024 * 1024,
            // The client never connects; only the maximum duration may end this call.
            ice_timeout: Duration::from_secs(60),
            peer_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_duration: MAX_DURATION,
        };
        let provider_socket = rtc_peer::udp::bind(LOOPBACK.into()).unwrap();
        let provider_addr = provider_socket.local_addr().unwrap();
        let mut provider = rtc_peer::crypto::rtc_config()
            .unwrap()
            .build(Instant::now());
        let (driver, tx, created) = call_with_provider(limits, &mut provider, provider_addr, QUEUE);
        let deadline = created + MAX_DURATION;
        // Every task stops by itself: the flood a few seconds after the deadline (or when
        // the driver is gone), the provider at the deadline.
        let flood_until = deadline + Duration::from_secs(3);
        let flooder: SocketAddr = (LOOPBACK, 50_000).into();
        let queue = tx.clone();
        let flood = tokio::spawn(async move {
            let (mut sent, mut full) = (0u64, 0u64);
            let mut rtp = vec![0u8; 172];
            rtp[0] = 0x80;
            rtp[1] = 111;
            while Instant::now() < flood_until {
                rtp[2..4].copy_from_slice(&(sent as u16).to_be_bytes());
                let d = Datagram {
                    at: Instant::now(),
                    proto: Protocol::Udp,
                    source: flooder,
                    local_ip: None,
                    data: rtp.clone(),
                };
                match tx.try_send(d) {
                    Ok(()) => sent += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        full += 1;
                        tokio::task::yield_now().await;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            (sent, full)
        });
        // The queue is full before the driver starts, and stays so.
        while queue.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        drop(queue);
        let provider = UdpPeer::new(provider, provider_socket).unwrap();
        let serve_until = deadline + crate::bridge::CLOSE_GRACE + Duration::from_secs(1);
        let provider = tokio::spawn(provider_until(provider, serve_until));

        let ended = tokio::time::timeout(Duration::from_secs(10), driver.run()).await;
        let ended_after = created.elapsed();
        let (sent, full) = flood.await.unwrap();
        let channel_open = provider.await.unwrap();

        assert!(full > 0, "the flood never filled the queue ({sent} sent)");
        assert_eq!(ended.ok(), Some(EndReason::MaxDuration));
        assert!(
            ended_after >= MAX_DURATION && ended_after < MAX_DURATION + LATE,
            "the call ended {ended_after:?} after it started, its maximum is {MAX_DURATION:?} \
             ({sent} flood datagrams, the queue full {full} times)"
        );
        let channel_open = channel_open.expect("the provider never connected during the flood");
        assert!(channel_open < deadline);
    }

    /// The private-address policy holds for datagrams, not only for the candidates of an
    /// answer: a provider whose media comes from (or must go to) a private address, here
    /// loopback, is neither heard nor answered without `--allow-private-upstreams`, and every
    /// refusal is counted by direction. With the flag the same provider connects.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upstream_datagrams_from_and_to_private_addresses_are_dropped_and_counted() {
        const RUN: Duration = Duration::from_millis(1_500);
        for allow_private in [false, true] {
            let limits = BridgeLimits {
                dc_buffer_bytes: 1024 * 1024,
                ice_timeout: Duration::from_secs(60),
                peer_timeout: Duration::from_secs(60),
                idle_timeout: Duration::from_secs(60),
                max_duration: RUN,
            };
            let provider_socket = rtc_peer::udp::bind(LOOPBACK.into()).unwrap();
            let provider_addr = provider_socket.local_addr().unwrap();
            let mut provider = rtc_peer::crypto::rtc_config()
                .unwrap()
                .build(Instant::now());
            let (mut driver, _tx, created) =
                call_with_provider(limits, &mut provider, provider_addr, 64);
            driver.upstream_allow_private = allow_private;
            let refused = driver.upstream_refused.clone();
            let provider = UdpPeer::new(provider, provider_socket).unwrap();
            let serve_until = created + RUN + crate::bridge::CLOSE_GRACE;
            let provider = tokio::spawn(provider_until(provider, serve_until));
            let ended = tokio::time::timeout(Duration::from_secs(10), driver.run()).await;
            assert_eq!(ended.ok(), Some(EndReason::MaxDuration));
            let channel_open = provider.await.unwrap();
            let count = |reason: &str| {
                refused
                    .get_or_create(&ReasonLabel {
                        reason: reason.to_string(),
                    })
                    .get()
            };
            let (from, to) = (
                count("datagram_from_not_public"),
                count("datagram_to_not_public"),
            );
            if allow_private {
                assert!(channel_open.is_some(), "allowed: the provider connects");
                assert_eq!((from, to), (0, 0));
            } else {
                assert!(
                    channel_open.is_none(),
                    "the relay talked to a private address"
                );
                assert!(to > 0, "the relay's own checks to the provider are refused");
                assert!(from > 0, "the provider's checks are refused: {from}");
            }
        }
    }
}
