//! One call as its shard holds it: the sans-IO [`Bridge`], the upstream leg's socket, the
//! call's inbox, and what the shard's loop needs to know about it between turns.
//!
//! The loop feeds it packets and timeouts, then asks it once per turn ([`ShardCall::service`])
//! to let written media leave and to hand over its transmits: client-leg datagrams go to the
//! shard's batch for the shared port, upstream ones out of the call's own socket at once.

use super::inbox::CallInbox;
use super::timers::Scheduled;
use crate::allowlist::is_public;
use crate::bridge::{Bridge, Leg};
use crate::call_state::EndReason;
use crate::media_socket::{Datagram, ReplySources, RouteGuard};
use crate::media_tcp::TcpRoute;
use crate::metrics::{BacklogCounters, ReasonLabel};
use crate::registry::CallEntry;
use crate::send_batch::Parts;
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use quinn_udp::RecvMeta;
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use str0m::net::{Protocol, Transmit};
use tokio::sync::{mpsc, oneshot};

/// Datagrams of one source (the inbox, the upstream socket) fed per loop turn: a source that
/// is always ready (a flood) starves neither the call's other leg nor the shard's other calls.
pub const BATCH: usize = 32;

/// Datagrams one `recvmmsg` on an upstream socket reads at most: a provider sends a call a
/// packet every 20 ms, so a turn rarely finds more than one.
pub const UPSTREAM_RECV_BATCH: usize = 4;

/// Upstream datagrams kept while the call's socket buffer is full, until it drains: a burst
/// waits instead of being lost; beyond this the newest are dropped, counted.
pub const UPSTREAM_BACKLOG: usize = 256;

/// What a call needs from the relay to run on a shard.
pub struct CallResources {
    pub bridge: Bridge,
    pub entry: Arc<CallEntry>,
    /// The call's registration on the ICE-TCP port, if the relay listens for ICE-TCP. Dropped
    /// when the call ends: the port forgets the call and closes its connections.
    pub client_tcp: Option<TcpRoute>,
    /// Packets that did not arrive on the owning shard's socket: ICE-TCP frames and datagrams
    /// another shard received.
    pub client_rx: mpsc::Receiver<Datagram>,
    /// The inbox `client_rx` is read from: told when the shard drains it.
    pub inbox: CallInbox,
    pub upstream_socket: std::net::UdpSocket,
    /// `--allow-private-upstreams`: otherwise the upstream leg neither hears from nor sends
    /// to a non-public address, so str0m never learns (peer-reflexive) or nominates one.
    pub upstream_allow_private: bool,
    /// `upstream_addresses_refused`, by reason.
    pub upstream_refused: Family<ReasonLabel, Counter>,
    /// Live calls with both legs connected.
    pub connected_gauge: Gauge,
    /// Dropped when the call ends: the shared port forgets the call.
    pub route: RouteGuard,
    /// Told the call's end reason when it ends.
    pub ended: oneshot::Sender<EndReason>,
}

/// A client-leg UDP datagram waiting for the shard's next send batch.
pub struct ClientTransmit {
    pub transmit: Transmit,
    /// The local address to send from (port bound on the unspecified address only).
    pub from: Option<IpAddr>,
}

impl ClientTransmit {
    /// What the port's batch sender needs of it.
    pub fn parts(&self) -> Parts<'_> {
        (
            &self.transmit.contents,
            self.transmit.destination,
            self.from,
        )
    }
}

pub struct ShardCall {
    pub key: u64,
    pub bridge: Bridge,
    pub entry: Arc<CallEntry>,
    client_tcp: Option<TcpRoute>,
    client_rx: mpsc::Receiver<Datagram>,
    inbox: CallInbox,
    pub upstream: mio::net::UdpSocket,
    /// `recvmmsg` on `upstream` (and GRO segments), as on the shared port.
    upstream_state: quinn_udp::UdpSocketState,
    upstream_allow_private: bool,
    upstream_refused: Family<ReasonLabel, Counter>,
    connected_gauge: Gauge,
    _route: RouteGuard,
    ended: Option<oneshot::Sender<EndReason>>,
    /// Upstream datagrams the socket had no room for.
    upstream_backlog: VecDeque<Transmit>,
    /// `upstream` is watched for room (the backlog waits for it).
    watching_room: bool,
    reported_connected: bool,
    /// The protocol of the client leg's latest transmit: once connected, the nominated pair's
    /// (UDP, or ICE-TCP for a client whose network blocks UDP).
    client_proto: Protocol,
    /// Where each client address reached us (port bound on the unspecified address only):
    /// replies leave from there.
    reply_sources: ReplySources,
    ending: bool,
    /// The call's entry in its shard's timer heap.
    pub scheduled: Scheduled,
    /// Fed since the last [`ShardCall::service`].
    pub dirty: bool,
    /// In the shard's list of calls to service this turn.
    pub queued: bool,
    /// In the shard's lists of sources to read again next turn (each call at most once).
    pub again_inbox: bool,
    pub again_upstream: bool,
}

/// What [`ShardCall::service`] found.
pub enum Serviced {
    Running,
    /// The bridge closed both legs and its goodbyes were handed over: the call is over.
    Finished(EndReason),
}

impl ShardCall {
    pub fn new(key: u64, r: CallResources) -> std::io::Result<Self> {
        r.upstream_socket.set_nonblocking(true)?;
        let upstream_state = quinn_udp::UdpSocketState::new((&r.upstream_socket).into())?;
        Ok(ShardCall {
            key,
            bridge: r.bridge,
            entry: r.entry,
            client_tcp: r.client_tcp,
            client_rx: r.client_rx,
            inbox: r.inbox,
            upstream: mio::net::UdpSocket::from_std(r.upstream_socket),
            upstream_state,
            upstream_allow_private: r.upstream_allow_private,
            upstream_refused: r.upstream_refused,
            connected_gauge: r.connected_gauge,
            _route: r.route,
            ended: Some(r.ended),
            upstream_backlog: VecDeque::new(),
            watching_room: false,
            reported_connected: false,
            client_proto: Protocol::Udp,
            reply_sources: ReplySources::default(),
            ending: false,
            scheduled: Scheduled::default(),
            dirty: true,
            queued: false,
            again_inbox: false,
            again_upstream: false,
        })
    }

    /// A client-leg packet: a UDP datagram from the shard's socket or the inbox, or an ICE-TCP
    /// frame.
    pub fn client_packet(
        &mut self,
        now: Instant,
        proto: Protocol,
        source: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
    ) {
        if let Some(local) = local_ip {
            self.reply_sources.learn(source, local);
        }
        self.bridge
            .handle_packet(Leg::Client, now, proto, source, data);
        self.dirty = true;
    }

    /// Feeds up to a batch from the inbox; true if it may hold more.
    pub fn drain_inbox(&mut self) -> bool {
        self.inbox.draining();
        for _ in 0..BATCH {
            match self.client_rx.try_recv() {
                Ok(d) => self.client_packet(d.at, d.proto, d.source, d.local_ip, &d.data),
                Err(_) => return false,
            }
        }
        true
    }

    /// Feeds up to a batch from the upstream socket, read with `recvmmsg` into `bufs`; true if
    /// it may hold more. A read that fills fewer buffers than it offered found the queue
    /// empty: no second call just to hear `EAGAIN`.
    pub fn read_upstream(&mut self, bufs: &mut [Box<[u8]>], metas: &mut [RecvMeta]) -> bool {
        for _ in 0..BATCH.div_ceil(bufs.len().max(1)) {
            let received = {
                let mut slices = bufs.iter_mut();
                let mut iovs: [IoSliceMut<'_>; UPSTREAM_RECV_BATCH] = std::array::from_fn(|_| {
                    IoSliceMut::new(slices.next().expect("one buffer per slot"))
                });
                self.upstream_state
                    .recv((&self.upstream).into(), &mut iovs, metas)
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                // ICMP port unreachable from a vanished provider shows up here; the peer
                // timeout decides when the leg is gone.
                Err(e) => {
                    tracing::trace!(error = %e, "upstream receive error");
                    continue;
                }
            };
            let now = Instant::now();
            for (buf, meta) in bufs.iter().zip(metas.iter()).take(n) {
                if !self.upstream_addr_allowed(meta.addr, "datagram_from_not_public") {
                    continue;
                }
                // One datagram, or several of one flow coalesced by GRO, `stride` apart.
                for data in buf[..meta.len].chunks(meta.stride.max(1)) {
                    self.bridge
                        .handle_datagram(Leg::Upstream, now, meta.addr, data);
                }
                self.dirty = true;
            }
            if n < UPSTREAM_RECV_BATCH {
                return false;
            }
        }
        true
    }

    /// The hangup, drain or limit that cancelled the call's entry.
    pub fn end_requested(&mut self) {
        let reason = self.entry.requested_end().unwrap_or(EndReason::Hangup);
        self.bridge.end(reason);
        self.dirty = true;
    }

    /// Runs str0m's timers and the call's deadlines if they are due.
    pub fn timeout(&mut self, now: Instant) {
        if self.bridge.poll_timeout() <= now {
            self.bridge.handle_timeout(now);
        }
        self.dirty = true;
    }

    /// Lets written media leave and hands the call's transmits over: client-leg UDP into
    /// `client_out`, ICE-TCP onto the client's connection, upstream out of the call's socket.
    /// `scratch` is the shard's reused transmit buffer; `upstream` counts upstream datagrams
    /// that waited for room or were lost to a full backlog.
    pub fn service(
        &mut self,
        now: Instant,
        scratch: &mut Vec<(Leg, Transmit)>,
        client_out: &mut Vec<ClientTransmit>,
        upstream: &BacklogCounters,
    ) -> Serviced {
        self.dirty = false;
        if !self.ending && self.bridge.end_reason().is_some() {
            // The call is ending: what is queued drains, then the bridge closes both legs. An
            // ICE-TCP client may close its connection as soon as it reads the goodbye: mark
            // the call as ending before any goodbye is sent, so that close counts as the
            // call's end.
            self.ending = true;
            if let Some(tcp) = &self.client_tcp {
                tcp.ending();
            }
        }
        self.bridge.send_written(now);
        scratch.extend(self.bridge.take_transmits());
        for (leg, t) in scratch.drain(..) {
            match leg {
                Leg::Client => {
                    self.client_proto = t.proto;
                    match (t.proto, &self.client_tcp) {
                        // Queued on the client's connection; a full queue drops, counted.
                        (Protocol::Tcp, Some(tcp)) => tcp.send(t.destination, &t.contents),
                        (Protocol::Udp, _) => {
                            let from = self.reply_sources.source_for(t.destination);
                            client_out.push(ClientTransmit { transmit: t, from });
                        }
                        _ => {
                            tracing::trace!(proto = %t.proto, "client-leg transmit on no transport")
                        }
                    }
                }
                Leg::Upstream => self.send_upstream(t, upstream),
            }
        }
        if self.bridge.is_finished() {
            return Serviced::Finished(
                self.bridge.end_reason().unwrap_or(EndReason::InternalError),
            );
        }
        if !self.reported_connected && self.bridge.is_connected() {
            self.reported_connected = true;
            self.entry.mark_connected();
            self.connected_gauge.inc();
            tracing::info!(call_id = %self.entry.call_id, client_transport = %self.client_proto, "call connected");
        }
        Serviced::Running
    }

    /// Sends what waited for room in the upstream socket; stops at the first datagram that
    /// still finds none.
    pub fn flush_upstream_backlog(&mut self) {
        while let Some(t) = self.upstream_backlog.front() {
            match self.upstream.send_to(&t.contents, t.destination) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => tracing::trace!(error = %e, "upstream send failed"),
                Ok(_) => {}
            }
            self.upstream_backlog.pop_front();
        }
    }

    /// Watches the upstream socket for room while the backlog waits for it, and only then:
    /// watched all the time, it would wake the shard after every datagram sent.
    pub fn watch_for_room(&mut self, registry: &mio::Registry) {
        let wanted = !self.upstream_backlog.is_empty();
        let token = mio::Token(self.key as usize);
        if let Err(e) = watch_room(
            registry,
            &mut self.upstream,
            token,
            wanted,
            &mut self.watching_room,
        ) {
            tracing::warn!(call_id = %self.entry.call_id, error = %e, "cannot change what the upstream socket is watched for");
        }
    }

    fn send_upstream(&mut self, t: Transmit, counters: &BacklogCounters) {
        if !self.upstream_addr_allowed(t.destination, "datagram_to_not_public") {
            return;
        }
        if self.upstream_backlog.is_empty() {
            match self.upstream.send_to(&t.contents, t.destination) {
                Ok(_) => return,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::trace!(error = %e, "upstream send failed");
                    return;
                }
            }
        }
        counters.keep(&mut self.upstream_backlog, UPSTREAM_BACKLOG, t);
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

    /// Lets the call go and then tells the relay how it ended: its sockets and routes are
    /// closed by the time the relay records the end.
    pub fn finish(mut self, reason: EndReason) {
        if self.reported_connected {
            self.connected_gauge.dec();
        }
        let ended = self.ended.take();
        drop(self);
        if let Some(ended) = ended {
            let _ = ended.send(reason);
        }
    }
}

/// Keeps `source` registered for reading, and for room too exactly while `wanted`: reregisters
/// it when that changes, `watching` remembering what it is registered for. (Re-registering
/// re-checks readiness, so room that came meanwhile still wakes the loop.)
pub fn watch_room(
    registry: &mio::Registry,
    source: &mut impl mio::event::Source,
    token: mio::Token,
    wanted: bool,
    watching: &mut bool,
) -> std::io::Result<()> {
    if wanted == *watching {
        return Ok(());
    }
    let interest = if wanted {
        mio::Interest::READABLE | mio::Interest::WRITABLE
    } else {
        mio::Interest::READABLE
    };
    registry.reregister(source, token, interest)?;
    *watching = wanted;
    Ok(())
}
