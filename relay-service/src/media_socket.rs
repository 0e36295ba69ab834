//! The one UDP port shared by the client legs of all calls.
//!
//! Receive tasks (one per `SO_REUSEPORT` shard) read datagrams and hand each to its
//! call's task through a bounded queue, so the DTLS/SRTP work of different calls runs
//! on different cores. A datagram is routed by source address; a STUN binding request
//! is routed by the ufrag in its USERNAME (we chose each call's ufrag). Lookups are hash-map
//! hits, never a scan over calls. Datagrams no call accepts are dropped and counted.
//!
//! A binding request teaches the table the client's address only if its MESSAGE-INTEGRITY
//! verifies with the call's local ICE password ([`stun::signed_with`]); the ufrag alone
//! travels in the clear. So a stranger who knows or guesses a ufrag reaches the call's str0m
//! (which checks and ignores the request) but neither fills the call's few address slots
//! ([`MAX_ADDRS_PER_CALL`]) nor steers anyone's media. An address belongs to the call that
//! learned it while that call hears from it: a signed request for another call from it is
//! delivered, not re-routed. Once the owner has heard nothing from the address for
//! [`TAKEOVER_SILENCE`], a signed request for another call moves the address to that call:
//! the owner's client is gone (the relay ends its call at `--peer-timeout-secs`) and the
//! address now belongs to someone else, a port the client's host reused or a NAT mapping
//! given to a new client. Without that, the new call's DTLS and media would go to the old
//! call until it timed out, and the new call would never connect (the churn soak found it:
//! about 1 call in 3,000). Refused learns are counted (`stun_unauthenticated`).
//!
//! Bound on the unspecified address (`0.0.0.0`, `[::]`) on a host with several addresses,
//! a plain `sendto` leaves from the kernel's preferred source for the route, which need not be
//! the address the client sent to; ICE requires the reply to come from there (RFC 8445
//! §7.2.5.2.1) and libwebrtc drops datagrams from any other address. So such a port reads with
//! `recvmsg` and `IP_PKTINFO`/`IPV6_RECVPKTINFO` (via `quinn-udp`), hands each datagram's
//! arrival address to its call ([`Datagram::local_ip`], remembered per client address in
//! [`ReplySources`]), and sends with `sendmsg` and that address as source. A port bound on one
//! address already sends from it and keeps plain `recvfrom`/`sendto`.

use crate::metrics::Metrics;
use crate::stun;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use rtc_peer::udp::{send_or_wait, Send, MAX_DATAGRAM};
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use str0m::net::Protocol;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A client may reach us from a few addresses during ICE (host, srflx, IPv4/IPv6).
/// Beyond this, even signed STUN from more addresses teaches nothing: the tables stay small
/// whatever a call's own client does.
const MAX_ADDRS_PER_CALL: usize = 8;

/// An address another call owns moves to a call whose signed binding request comes from it
/// once the owner has heard nothing from it this long. A live client is never this quiet:
/// audio flows every 20 ms (400 ms with DTX) and ICE checks keep coming. Taking a live call's
/// address would need a client of another call that can spoof source addresses.
pub const TAKEOVER_SILENCE: Duration = Duration::from_secs(2);

/// How long a send on either leg of a call (this port, or the call's upstream socket) waits
/// for socket buffer room before the datagram is dropped: enough to ride out a burst, never
/// long enough to stall the call's driver (its timers, the other leg) behind one socket.
pub const SEND_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Receive buffer of a port that reads with `recvmsg`: `quinn-udp` turns on UDP GRO, which
/// may coalesce several datagrams of one flow into one read of up to 64 KiB.
const GRO_BUFFER: usize = 64 * 1024;

/// A packet for one call's client leg: a UDP datagram, or an ICE-TCP frame
/// ([`crate::media_tcp`]).
#[derive(Debug)]
pub struct Datagram {
    pub at: Instant,
    pub proto: Protocol,
    pub source: SocketAddr,
    /// The local address the datagram arrived at, when the port is bound on the unspecified
    /// address (else `None`: the bound address is the only one). Replies leave from it.
    pub local_ip: Option<IpAddr>,
    pub data: Vec<u8>,
}

/// The local address each client address of one call reached us at, so replies to it leave
/// from there ([`ClientPort::send_to`]). Bounded like the port's address table.
#[derive(Debug, Default)]
pub struct ReplySources {
    by_remote: Vec<(SocketAddr, IpAddr)>,
}

impl ReplySources {
    /// Remembers where `remote`'s latest datagram arrived. A few entries: a linear scan.
    pub fn learn(&mut self, remote: SocketAddr, local: IpAddr) {
        if let Some(entry) = self.by_remote.iter_mut().find(|(r, _)| *r == remote) {
            entry.1 = local;
            return;
        }
        if self.by_remote.len() == MAX_ADDRS_PER_CALL {
            self.by_remote.remove(0);
        }
        self.by_remote.push((remote, local));
    }

    /// The source for a datagram to `remote`: where `remote` reached us, else where the call's
    /// latest new client address did (`None` until a datagram arrived: the kernel chooses).
    pub fn source_for(&self, remote: SocketAddr) -> Option<IpAddr> {
        self.by_remote
            .iter()
            .find(|(r, _)| *r == remote)
            .or(self.by_remote.last())
            .map(|(_, local)| *local)
    }
}

/// One `SO_REUSEPORT` socket of the port.
struct Shard {
    socket: UdpSocket,
    /// Set when bound on the unspecified address: read and write with `recvmsg`/`sendmsg`
    /// and packet info.
    pktinfo: Option<UdpSocketState>,
}

#[derive(Clone)]
struct Route {
    key: u64,
    tx: mpsc::Sender<Datagram>,
}

/// A call as its ufrag finds it: where its datagrams go, and the local ICE password its
/// client signs binding requests with.
struct Registered {
    route: Route,
    pass: String,
}

/// A client address a call learned, and when a datagram from it last reached the call
/// (milliseconds since the port's epoch; stored under the read lock).
struct AddrRoute {
    route: Route,
    last_seen_ms: AtomicU64,
}

#[derive(Default)]
struct Routes {
    by_ufrag: HashMap<String, Registered>,
    by_addr: HashMap<SocketAddr, AddrRoute>,
    addrs_of: HashMap<u64, Vec<SocketAddr>>,
}

pub struct ClientPort {
    shards: Vec<Arc<Shard>>,
    routes: Arc<RwLock<Routes>>,
    local_addr: SocketAddr,
    next_key: std::sync::atomic::AtomicU64,
    /// Zero of the routes' `last_seen_ms` clock.
    epoch: Instant,
}

/// Removes a call's routes when dropped (call ended, panicked or setup failed).
pub struct RouteGuard {
    key: u64,
    ufrag: String,
    routes: Arc<RwLock<Routes>>,
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        r.by_ufrag.remove(&self.ufrag);
        for a in r.addrs_of.remove(&self.key).unwrap_or_default() {
            if r.by_addr.get(&a).is_some_and(|e| e.route.key == self.key) {
                r.by_addr.remove(&a);
            }
        }
    }
}

impl ClientPort {
    /// Binds `shards` sockets on `addr` with SO_REUSEPORT (the kernel spreads
    /// clients across them by 4-tuple hash). On the unspecified address, each also reports
    /// the arrival address of what it receives and takes a source address for what it sends.
    pub fn bind(addr: SocketAddr, shards: usize) -> std::io::Result<Self> {
        let shards = shards.max(1);
        let mut sockets = Vec::with_capacity(shards);
        let mut local_addr = addr;
        for _ in 0..shards {
            let domain = socket2::Domain::for_address(local_addr);
            let s =
                socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
            s.set_reuse_port(shards > 1)?;
            // Absorb bursts from many calls between two reads.
            let _ = s.set_recv_buffer_size(4 * 1024 * 1024);
            let _ = s.set_send_buffer_size(4 * 1024 * 1024);
            s.set_nonblocking(true)?;
            s.bind(&local_addr.into())?;
            let std_sock: std::net::UdpSocket = s.into();
            let sock = UdpSocket::from_std(std_sock)?;
            // With port 0, every shard binds the port the first one got.
            local_addr = sock.local_addr()?;
            let pktinfo = if local_addr.ip().is_unspecified() {
                Some(UdpSocketState::new((&sock).into())?)
            } else {
                None
            };
            sockets.push(Arc::new(Shard {
                socket: sock,
                pktinfo,
            }));
        }
        Ok(ClientPort {
            shards: sockets,
            routes: Arc::new(RwLock::new(Routes::default())),
            local_addr,
            next_key: std::sync::atomic::AtomicU64::new(1),
            epoch: Instant::now(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Routes datagrams that carry `ufrag` (and then their source addresses) to `tx`. `pass`
    /// is the call's local ICE password (we chose it with the ufrag).
    pub fn register(&self, ufrag: &str, pass: &str, tx: mpsc::Sender<Datagram>) -> RouteGuard {
        let key = self
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let registered = Registered {
            route: Route { key, tx },
            pass: pass.to_string(),
        };
        r.by_ufrag.insert(ufrag.to_string(), registered);
        RouteGuard {
            key,
            ufrag: ufrag.to_string(),
            routes: self.routes.clone(),
        }
    }

    pub fn route_count(&self) -> (usize, usize) {
        let r = self.routes.read().unwrap_or_else(|p| p.into_inner());
        (r.by_ufrag.len(), r.by_addr.len())
    }

    /// Sends from the shared port, from local address `from` when the port is bound on the
    /// unspecified address (see [`ReplySources`]; ignored otherwise). UDP sends rarely
    /// block; when the socket buffer is full we wait for room up to [`SEND_WAIT`] rather
    /// than drop at once (a lost DTLS flight costs a retransmission timeout), then drop it:
    /// the caller is a call's driver, whose timers and upstream leg must not wait behind a
    /// port shared by every call.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr, from: Option<IpAddr>) {
        let shard = &self.shards[0];
        let failed = match &shard.pktinfo {
            None => match send_or_wait(&shard.socket, data, to, Some(SEND_WAIT)) {
                Send::Sent => return,
                Send::Failed(e) => e,
                Send::Full(wait) => match wait.await {
                    Ok(()) => return,
                    Err(e) => e,
                },
            },
            Some(state) => {
                let transmit = Transmit {
                    destination: to,
                    ecn: None,
                    contents: data,
                    segment_size: None,
                    src_ip: from,
                };
                let sock = &shard.socket;
                let send = || state.try_send(sock.into(), &transmit);
                match sock.try_io(Interest::WRITABLE, send) {
                    Ok(()) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let wait = sock.async_io(Interest::WRITABLE, send);
                        match tokio::time::timeout(SEND_WAIT, wait).await {
                            Ok(Ok(())) => return,
                            Ok(Err(e)) => e,
                            Err(_) => std::io::ErrorKind::TimedOut.into(),
                        }
                    }
                    Err(e) => e,
                }
            }
        };
        tracing::debug!(error = %failed, %to, ?from, "client-leg send failed, datagram dropped");
    }

    /// Starts one receive task per shard.
    pub fn spawn_receivers(self: &Arc<Self>, metrics: Arc<Metrics>) {
        for shard in &self.shards {
            let shard = shard.clone();
            let port = self.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match &shard.pktinfo {
                    None => port.receive(&shard.socket, &metrics).await,
                    Some(state) => {
                        port.receive_with_pktinfo(&shard.socket, state, &metrics)
                            .await
                    }
                }
            });
        }
    }

    /// A shard bound on one address: `recvfrom`.
    async fn receive(&self, sock: &UdpSocket, metrics: &Metrics) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match sock.recv_from(&mut buf).await {
                Ok((n, source)) => self.dispatch(source, None, &buf[..n], metrics),
                // ICMP-induced errors (port unreachable) surface here on Linux; they are
                // not fatal for the socket.
                Err(e) => tracing::trace!(error = %e, "media port receive error"),
            }
        }
    }

    /// A shard bound on the unspecified address: `recvmsg` with the arrival address.
    async fn receive_with_pktinfo(
        &self,
        sock: &UdpSocket,
        state: &UdpSocketState,
        metrics: &Metrics,
    ) {
        let mut buf = vec![0u8; GRO_BUFFER];
        loop {
            let received = sock
                .async_io(Interest::READABLE, || {
                    let mut meta = [RecvMeta::default()];
                    state.recv(sock.into(), &mut [IoSliceMut::new(&mut buf)], &mut meta)?;
                    Ok(meta[0])
                })
                .await;
            match received {
                Ok(meta) => {
                    // One datagram, or several of one flow coalesced by GRO, `stride` apart.
                    for data in buf[..meta.len].chunks(meta.stride.max(1)) {
                        self.dispatch(meta.addr, meta.dst_ip, data, metrics);
                    }
                }
                Err(e) => tracing::trace!(error = %e, "media port receive error"),
            }
        }
    }

    fn dispatch(
        &self,
        source: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
        metrics: &Metrics,
    ) {
        self.dispatch_at(source, local_ip, data, metrics, Instant::now());
    }

    /// [`Self::dispatch`] at `now` (tests move the clock).
    fn dispatch_at(
        &self,
        source: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
        metrics: &Metrics,
        now: Instant,
    ) {
        let route = self.lookup(source, data, metrics, now);
        let Some(route) = route else {
            metrics.unmatched_datagrams.inc();
            return;
        };
        let d = Datagram {
            at: now,
            proto: Protocol::Udp,
            source,
            local_ip,
            data: data.to_vec(),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = route.tx.try_send(d) {
            metrics.queue_full_drops.inc();
        }
    }

    fn millis(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// The call a datagram is for: by source address, or for a binding request by the ufrag
    /// it names. A binding request from an address not yet the call's teaches the address
    /// only if it is signed with the call's password, and takes an address another call
    /// learned only once that call has heard nothing from it for [`TAKEOVER_SILENCE`].
    fn lookup(
        &self,
        source: SocketAddr,
        data: &[u8],
        metrics: &Metrics,
        now: Instant,
    ) -> Option<Route> {
        let now_ms = self.millis(now);
        let silence_ms = u64::try_from(TAKEOVER_SILENCE.as_millis()).unwrap_or(u64::MAX);
        let ufrag = stun::local_ufrag(data);
        {
            let r = self.routes.read().unwrap_or_else(|p| p.into_inner());
            let Some(u) = ufrag else {
                return r.by_addr.get(&source).map(|e| {
                    e.last_seen_ms.store(now_ms, Relaxed);
                    e.route.clone()
                });
            };
            let call = r.by_ufrag.get(u)?;
            let owner = r.by_addr.get(&source);
            if let Some(e) = owner.filter(|e| e.route.key == call.route.key) {
                e.last_seen_ms.store(now_ms, Relaxed);
                return Some(call.route.clone());
            }
            // Delivered either way: the call's str0m checks the request and answers only a
            // genuine one. But knowing a ufrag (sent in the clear) is not knowing the password.
            if !stun::signed_with(data, &call.pass) {
                metrics.stun_unauthenticated.inc();
                return Some(call.route.clone());
            }
            if let Some(e) = owner {
                if now_ms.saturating_sub(e.last_seen_ms.load(Relaxed)) < silence_ms {
                    tracing::debug!(%source, "signed binding request from another live call's address; not re-routed");
                    return Some(call.route.clone());
                }
            }
        }
        // A signed binding request from an address no call has, or one whose call has gone
        // quiet: learn it. The table may have changed between the locks: look again.
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let route = r.by_ufrag.get(ufrag?)?.route.clone();
        let previous = match r.by_addr.get(&source) {
            None => None,
            Some(e) if e.route.key == route.key => return Some(route),
            Some(e) if now_ms.saturating_sub(e.last_seen_ms.load(Relaxed)) < silence_ms => {
                return Some(route)
            }
            Some(e) => Some(e.route.key),
        };
        if r.addrs_of.get(&route.key).map_or(0, Vec::len) >= MAX_ADDRS_PER_CALL {
            return Some(route);
        }
        if let Some(old) = previous {
            if let Some(addrs) = r.addrs_of.get_mut(&old) {
                addrs.retain(|a| *a != source);
            }
            tracing::info!(%source, "a client address moved to a new call (its previous call had gone quiet)");
        }
        r.addrs_of.entry(route.key).or_default().push(source);
        r.by_addr.insert(
            source,
            AddrRoute {
                route: route.clone(),
                last_seen_ms: AtomicU64::new(now_ms),
            },
        );
        Some(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binding request as a client's ICE agent sends it to call `ufrag`, its
    /// MESSAGE-INTEGRITY keyed with `pass` (the call's password, or a stranger's guess).
    fn binding_request(ufrag: &str, pass: &str) -> Vec<u8> {
        use str0m::ice::{StunMessage, TransId};
        let hmac = str0m::crypto::from_feature_flags().sha1_hmac_provider;
        let username = format!("{ufrag}:remote");
        let request =
            StunMessage::binding_request(&username, TransId::new(), true, 7, 1 << 24, false);
        let mut buf = vec![0u8; 512];
        let n = request
            .to_bytes(Some(pass.as_bytes()), &mut buf, |k, p| hmac.sha1_hmac(k, p))
            .unwrap();
        buf.truncate(n);
        buf
    }

    /// A binding request with USERNAME only: no MESSAGE-INTEGRITY at all.
    fn unsigned_binding_request(ufrag: &str) -> Vec<u8> {
        let username = format!("{ufrag}:remote");
        let mut attrs = vec![0x00, 0x06];
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[1; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::new([127, 0, 0, 1].into(), port)
    }

    #[tokio::test]
    async fn routes_by_ufrag_then_by_learned_address_and_forgets_on_drop() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        let guard_a = port.register("ufragA", "passA", tx_a);
        let _guard_b = port.register("ufragB", "passB", tx_b);
        let client_a: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let client_b: SocketAddr = "127.0.0.1:5002".parse().unwrap();

        // RTP before any STUN from that address: nobody's.
        port.dispatch(client_a, None, &[0x80, 1, 2, 3], &metrics);
        assert_eq!(metrics.unmatched_datagrams.get(), 1);

        port.dispatch(
            client_a,
            None,
            &binding_request("ufragA", "passA"),
            &metrics,
        );
        port.dispatch(
            client_b,
            None,
            &binding_request("ufragB", "passB"),
            &metrics,
        );
        port.dispatch(client_a, None, &[0x80, 9], &metrics);
        assert!(rx_a.try_recv().unwrap().data.starts_with(&[0x00, 0x01]));
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 9]);
        assert_eq!(rx_b.try_recv().unwrap().source, client_b);
        assert!(rx_b.try_recv().is_err());

        drop(guard_a);
        assert_eq!(port.route_count(), (1, 1));
        port.dispatch(client_a, None, &[0x80, 9], &metrics);
        assert_eq!(metrics.unmatched_datagrams.get(), 2);
    }

    /// Whoever knows a ufrag may reach its call (str0m checks the request and answers only a
    /// genuine one), but only a request signed with the call's password teaches the port an
    /// address: one row per request, from its own address.
    #[tokio::test]
    async fn a_binding_request_teaches_its_address_only_when_signed_with_the_calls_password() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(8);
        let _g = port.register("u1", "p1-call-password", tx);
        let (tx_other, _rx_other) = mpsc::channel(8);
        let _other = port.register("u2", "p2-other-password", tx_other);
        let rows: [(&str, Vec<u8>, bool); 5] = [
            (
                "no MESSAGE-INTEGRITY",
                unsigned_binding_request("u1"),
                false,
            ),
            ("a guessed password", binding_request("u1", "guess"), false),
            (
                "another call's password",
                binding_request("u1", "p2-other-password"),
                false,
            ),
            ("an empty password", binding_request("u1", ""), false),
            (
                "the call's password",
                binding_request("u1", "p1-call-password"),
                true,
            ),
        ];
        for (i, (what, request, learned)) in rows.into_iter().enumerate() {
            let source = addr(7000 + i as u16);
            let unmatched = metrics.unmatched_datagrams.get();
            port.dispatch(source, None, &request, &metrics);
            let delivered = rx.try_recv().expect(what);
            assert_eq!(
                (delivered.source, delivered.data),
                (source, request),
                "{what}"
            );
            // What a learned address would route: RTP from the same source.
            port.dispatch(source, None, &[0x80, 1, 2, 3], &metrics);
            match learned {
                true => assert_eq!(rx.try_recv().expect(what).data, vec![0x80, 1, 2, 3]),
                false => {
                    assert!(rx.try_recv().is_err(), "{what}: RTP from it was routed");
                    assert_eq!(metrics.unmatched_datagrams.get(), unmatched + 1, "{what}");
                }
            }
        }
        assert_eq!(port.route_count(), (2, 1));
        assert_eq!(metrics.stun_unauthenticated.get(), 4);
    }

    #[tokio::test]
    async fn a_stranger_with_the_ufrag_cannot_fill_a_calls_address_table() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx, mut rx) = mpsc::channel(1024);
        let _g = port.register("u1", "p1", tx);
        for p in 0..100u16 {
            let request = match p % 2 {
                0 => unsigned_binding_request("u1"),
                _ => binding_request("u1", "guess"),
            };
            port.dispatch(addr(6000 + p), None, &request, &metrics);
        }
        assert_eq!(port.route_count(), (1, 0));
        assert_eq!(metrics.stun_unauthenticated.get(), 100);
        while rx.try_recv().is_ok() {}
        // The genuine client is still learned, and its media routed.
        let client = addr(5000);
        port.dispatch(client, None, &binding_request("u1", "p1"), &metrics);
        port.dispatch(client, None, &[0x80, 9], &metrics);
        assert_eq!(port.route_count(), (1, 1));
        assert!(rx.try_recv().is_ok());
        assert_eq!(rx.try_recv().unwrap().data, vec![0x80, 9]);
    }

    #[tokio::test]
    async fn signed_requests_still_teach_at_most_the_per_call_cap() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx, _rx) = mpsc::channel(1024);
        let _g = port.register("u1", "p1", tx);
        for p in 0..100u16 {
            port.dispatch(addr(6000 + p), None, &binding_request("u1", "p1"), &metrics);
        }
        assert_eq!(port.route_count(), (1, MAX_ADDRS_PER_CALL));
    }

    /// Call B's client (who knows B's password) sends from an address call A learned, e.g.
    /// by spoofing it: B's str0m gets the request, but A keeps the address until A ends.
    #[tokio::test]
    async fn another_calls_signed_request_does_not_take_a_live_calls_address() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        let guard_a = port.register("ufragA", "passA", tx_a);
        let _guard_b = port.register("ufragB", "passB", tx_b);
        let shared = addr(5001);
        port.dispatch(shared, None, &binding_request("ufragA", "passA"), &metrics);
        assert!(rx_a.try_recv().is_ok());

        let b_request = binding_request("ufragB", "passB");
        port.dispatch(shared, None, &b_request, &metrics);
        assert_eq!(rx_b.try_recv().unwrap().data, b_request, "delivered to B");
        port.dispatch(shared, None, &[0x80, 7], &metrics);
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 7], "A keeps it");
        assert!(rx_b.try_recv().is_err());
        assert_eq!(port.route_count(), (2, 1));

        // Once A has ended, the address is free for B.
        drop(guard_a);
        port.dispatch(shared, None, &b_request, &metrics);
        port.dispatch(shared, None, &[0x80, 8], &metrics);
        assert!(rx_b.try_recv().is_ok());
        assert_eq!(rx_b.try_recv().unwrap().data, vec![0x80, 8]);
        assert_eq!(port.route_count(), (1, 1));
    }

    /// The owner of an address went quiet (its client vanished; the relay has not timed its
    /// call out yet) and a new call's client now sends from the same address, a port its
    /// host reused: after [`TAKEOVER_SILENCE`] the new call's signed request takes the
    /// address, so its DTLS and media reach it.
    #[tokio::test]
    async fn a_quiet_calls_address_moves_to_the_call_that_now_signs_from_it() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        let _guard_a = port.register("ufragA", "passA", tx_a);
        let guard_b = port.register("ufragB", "passB", tx_b);
        let shared = addr(5002);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        port.dispatch_at(
            shared,
            None,
            &binding_request("ufragA", "passA"),
            &metrics,
            at(0),
        );
        port.dispatch_at(shared, None, &[0x80, 1], &metrics, at(1000));
        assert_eq!(
            rx_a.try_recv().unwrap().data.len(),
            binding_request("ufragA", "passA").len()
        );
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 1]);

        // A heard from the address 1.9 s ago: still A's.
        let b_request = binding_request("ufragB", "passB");
        port.dispatch_at(shared, None, &b_request, &metrics, at(2900));
        assert!(rx_b.try_recv().is_ok(), "the request itself reaches B");
        port.dispatch_at(shared, None, &[0x80, 2], &metrics, at(2950));
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 2]);

        // An unsigned request never moves it, however quiet A is.
        port.dispatch_at(
            shared,
            None,
            &binding_request("ufragB", "guess"),
            &metrics,
            at(9000),
        );
        assert!(rx_b.try_recv().is_ok());
        port.dispatch_at(shared, None, &[0x80, 3], &metrics, at(9001));
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 3]);

        // 2 s of quiet, then B's signed request: the address is B's.
        port.dispatch_at(shared, None, &b_request, &metrics, at(11_001));
        assert!(rx_b.try_recv().is_ok());
        port.dispatch_at(shared, None, &[0x80, 4], &metrics, at(11_002));
        assert_eq!(rx_b.try_recv().unwrap().data, vec![0x80, 4]);
        assert!(rx_a.try_recv().is_err());
        assert_eq!(port.route_count(), (2, 1));

        // B ends: the address is forgotten (A no longer lists it).
        drop(guard_b);
        assert_eq!(port.route_count(), (1, 0));
        port.dispatch_at(shared, None, &[0x80, 5], &metrics, at(11_003));
        assert!(rx_a.try_recv().is_err());
    }

    #[test]
    fn reply_sources_remember_the_arrival_address_per_client_address_bounded() {
        let mut r = ReplySources::default();
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:5000".parse().unwrap();
        let (x, y): (IpAddr, IpAddr) = (
            "198.51.100.1".parse().unwrap(),
            "198.51.100.2".parse().unwrap(),
        );
        assert_eq!(r.source_for(a), None);
        r.learn(a, x);
        r.learn(b, y);
        assert_eq!((r.source_for(a), r.source_for(b)), (Some(x), Some(y)));
        r.learn(a, y);
        assert_eq!(r.source_for(a), Some(y));
        // An address never heard from gets the latest new address's arrival address.
        assert_eq!(r.source_for("192.0.2.9:1".parse().unwrap()), Some(y));
        for p in 0..100u16 {
            r.learn(SocketAddr::new(a.ip(), 6000 + p), x);
        }
        assert_eq!(r.by_remote.len(), MAX_ADDRS_PER_CALL);
    }

    /// 127.0.0.3 is a local address (127/8), but towards 127.0.0.1 the kernel picks 127.0.0.1
    /// as source: the two-address host in miniature.
    #[tokio::test]
    async fn a_port_on_the_unspecified_address_learns_arrival_addresses_and_replies_from_them() {
        let port = Arc::new(ClientPort::bind("0.0.0.0:0".parse().unwrap(), 3).unwrap());
        assert!(port.shards.iter().all(|s| s.pktinfo.is_some()));
        let (tx, mut rx) = mpsc::channel(8);
        let _g = port.register("u1", "p1", tx);
        port.spawn_receivers(Arc::new(Metrics::new()));
        let advertised = SocketAddr::new([127, 0, 0, 3].into(), port.local_addr().port());
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(&binding_request("u1", "p1"), advertised)
            .await
            .unwrap();
        let d = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d.source, client.local_addr().unwrap());
        assert_eq!(d.local_ip, Some(advertised.ip()));

        let mut buf = [0u8; 64];
        port.send_to(b"reply", d.source, d.local_ip).await;
        let (n, from) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"reply"[..], advertised));
        // Without a source the kernel picks one: the defect this port avoids.
        port.send_to(b"plain", d.source, None).await;
        let (_, from) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 1]));
    }

    /// What a full send buffer looks like to tokio: the socket said EAGAIN and no room has
    /// freed since (no EPOLLOUT edge), so tokio believes it is not writable. On loopback the
    /// kernel never really fills a UDP send buffer, so the test clears tokio's writable
    /// readiness the way a real EAGAIN does. The send must give up, not wait for an edge
    /// that may never come while the call's timers and other leg wait behind it.
    #[tokio::test]
    async fn a_send_the_socket_cannot_take_is_dropped_after_the_bound() {
        for bound_on in ["127.0.0.1:0", "0.0.0.0:0"] {
            let port = ClientPort::bind(bound_on.parse().unwrap(), 1).unwrap();
            let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let to = client.local_addr().unwrap();
            let socket = &port.shards[0].socket;
            // The edge of the registration first (writable), then the EAGAIN that clears it.
            socket.writable().await.unwrap();
            let full = socket.try_io(Interest::WRITABLE, || {
                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
            });
            assert_eq!(full.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);

            let started = Instant::now();
            let sent = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                port.send_to(b"dropped", to, None),
            )
            .await;
            let took = started.elapsed();
            assert!(
                sent.is_ok(),
                "{bound_on}: the send still waits after {took:?}"
            );
            assert!(
                took >= SEND_WAIT && took < std::time::Duration::from_secs(1),
                "{bound_on}: gave up after {took:?}"
            );
            let mut buf = [0u8; 16];
            let got = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                client.recv_from(&mut buf),
            )
            .await;
            assert!(got.is_err(), "{bound_on}: the datagram was sent after all");
        }
    }

    #[tokio::test]
    async fn shards_share_one_port() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(port.local_addr().port(), 0);
        assert_eq!(port.shards.len(), 3);
        assert!(port.shards.iter().all(|s| s.pktinfo.is_none()));
    }
}
