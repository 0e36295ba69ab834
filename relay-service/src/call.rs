//! The driver of one call: owns the upstream socket, the queue from the shared client
//! port and the timer, and runs the sans-IO [`Bridge`] until the call ends.

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

/// How many queued datagrams to feed before looking at timers and transmits again:
/// batching cuts wake-ups under load without starving the timer.
const BATCH: usize = 32;

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
        let reason = loop {
            if let Some(proto) = self.send(&mut out, &reply_sources).await {
                client_proto = proto;
            }
            if let Some(reason) = self.bridge.end_reason() {
                break reason;
            }
            if !reported_connected && self.bridge.is_connected() {
                reported_connected = true;
                self.entry.mark_connected();
                self.connected_gauge.inc();
                tracing::info!(call_id = %self.entry.call_id, client_transport = %client_proto, "call connected");
            }
            let deadline = self.bridge.poll_timeout();
            tokio::select! {
                biased;
                _ = self.entry.cancel.cancelled() => {
                    let reason = self.entry.requested_end().unwrap_or(EndReason::Hangup);
                    self.bridge.end(reason);
                }
                d = self.client_rx.recv() => {
                    let Some(d) = d else {
                        self.bridge.end(EndReason::InternalError);
                        continue;
                    };
                    self.client_packet(d, &mut reply_sources);
                    for _ in 1..BATCH {
                        match self.client_rx.try_recv() {
                            Ok(d) => self.client_packet(d, &mut reply_sources),
                            Err(_) => break,
                        }
                    }
                }
                r = self.upstream_socket.recv_from(&mut buf) => {
                    match r {
                        Ok((n, source)) => {
                            self.upstream_packet(source, &buf[..n]);
                            for _ in 1..BATCH {
                                match self.upstream_socket.try_recv_from(&mut buf) {
                                    Ok((n, source)) => self.upstream_packet(source, &buf[..n]),
                                    Err(_) => break,
                                }
                            }
                        }
                        // ICMP port unreachable from a vanished provider shows up here;
                        // the peer timeout decides when the leg is gone.
                        Err(e) => tracing::trace!(error = %e, "upstream receive error"),
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    self.bridge.handle_timeout(Instant::now());
                }
            }
        };
        // Say goodbye on both legs (DTLS close_notify, SCTP abort) so peers learn at
        // once instead of after their own timeouts. An ICE-TCP client may close its
        // connection as soon as it reads the goodbye, before the route is dropped: mark the
        // call as ending first, so that close counts as the call's end.
        if let Some(tcp) = &self.client_tcp {
            tcp.ending();
        }
        self.bridge.close();
        self.send(&mut out, &reply_sources).await;
        if reported_connected {
            self.connected_gauge.dec();
        }
        reason
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
