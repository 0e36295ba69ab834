//! The one UDP port shared by the client legs of all calls.
//!
//! The port is one `SO_REUSEPORT` socket per media shard ([`crate::shard`]); each shard reads
//! its socket in batches and asks this table which call a datagram is for. A datagram for a
//! call the shard owns is fed to it directly; one for another shard's call goes through that
//! call's bounded inbox. A datagram is routed by source address; a STUN binding request
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
//! [`ReplySources`]), and sends with `sendmmsg` and that address as source of each datagram. A port bound on one
//! address already sends from it and names no source.

use crate::metrics::Metrics;
use crate::send_batch::{BatchSender, Parts};
use crate::shard::inbox::{CallInbox, InboxError};
use crate::stun;
use quinn_udp::{RecvMeta, UdpSocketState};
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use str0m::net::Protocol;

/// A client may reach us from a few addresses during ICE (host, srflx, IPv4/IPv6).
/// Beyond this, even signed STUN from more addresses teaches nothing: the tables stay small
/// whatever a call's own client does.
const MAX_ADDRS_PER_CALL: usize = 8;

/// An address another call owns moves to a call whose signed binding request comes from it
/// once the owner has heard nothing from it this long. A live client is never this quiet:
/// audio flows every 20 ms (400 ms with DTX) and ICE checks keep coming. Taking a live call's
/// address would need a client of another call that can spoof source addresses.
pub const TAKEOVER_SILENCE: Duration = Duration::from_secs(2);

/// Receive buffer for one datagram of the port: `quinn-udp` turns on UDP GRO, which may
/// coalesce several datagrams of one flow into one read of up to 64 KiB.
pub const GRO_BUFFER: usize = 64 * 1024;

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

impl Datagram {
    /// A UDP datagram from the shared port, copied out of the receive buffer.
    pub fn udp(at: Instant, source: SocketAddr, local_ip: Option<IpAddr>, data: &[u8]) -> Self {
        Datagram {
            at,
            proto: Protocol::Udp,
            source,
            local_ip,
            data: data.to_vec(),
        }
    }
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

/// One `SO_REUSEPORT` socket of the port, read and written by one media shard
/// ([`crate::shard`]) with batched `recvmmsg` (through `quinn-udp`, which also reads each
/// datagram's arrival address and coalesced GRO segments).
pub struct PortSocket {
    pub socket: std::net::UdpSocket,
    pub state: UdpSocketState,
    /// Bound on the unspecified address: each datagram's arrival address matters, and replies
    /// name their source address.
    pub pktinfo: bool,
}

impl PortSocket {
    /// Reads up to `bufs.len()` datagrams (one `recvmmsg`); `WouldBlock` when none is queued.
    pub fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> std::io::Result<usize> {
        self.state.recv((&self.socket).into(), bufs, meta)
    }

    /// Sends `items` from the front in `sendmmsg` batches until all are gone or the socket's
    /// buffer is full; returns how many left the front (sent, or refused by the kernel and
    /// dropped). Each item's source address is used only on a port bound on the unspecified
    /// address (`pktinfo`); elsewhere the socket's own address already is the right one.
    pub fn send_batch<T>(
        &self,
        sender: &mut BatchSender,
        items: &[T],
        parts: impl Fn(&T) -> Parts<'_>,
    ) -> usize {
        let pktinfo = self.pktinfo;
        sender.send_until_full(self.socket.as_raw_fd(), items, |item| {
            let (data, to, from) = parts(item);
            (data, to, from.filter(|_| pktinfo))
        })
    }
}

/// A call's routing entry: where packets for it go.
#[derive(Clone)]
struct Route {
    key: u64,
    inbox: CallInbox,
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
    sockets: Vec<Arc<PortSocket>>,
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

/// What each socket of the media port asks for as receive and as send buffer by default.
pub const PORT_BUFFER_BYTES: usize = 4 * 1024 * 1024;

impl ClientPort {
    /// Binds `shards` sockets on `addr` with SO_REUSEPORT (the kernel spreads
    /// clients across them by 4-tuple hash). On the unspecified address, each also reports
    /// the arrival address of what it receives and takes a source address for what it sends.
    pub fn bind(addr: SocketAddr, shards: usize) -> std::io::Result<Self> {
        Self::bind_with_buffers(addr, shards, PORT_BUFFER_BYTES)
    }

    /// [`ClientPort::bind`], each socket asking for `buffer_bytes` of receive and of send
    /// buffer (the kernel may grant less: what it granted is logged).
    pub fn bind_with_buffers(
        addr: SocketAddr,
        shards: usize,
        buffer_bytes: usize,
    ) -> std::io::Result<Self> {
        let shards = shards.max(1);
        let mut sockets = Vec::with_capacity(shards);
        let mut local_addr = addr;
        for _ in 0..shards {
            let domain = socket2::Domain::for_address(local_addr);
            let s =
                socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
            s.set_reuse_port(shards > 1)?;
            // Absorb bursts from many calls between two reads, and while the network is
            // slower than the relay.
            let _ = s.set_recv_buffer_size(buffer_bytes);
            let _ = s.set_send_buffer_size(buffer_bytes);
            if sockets.is_empty() {
                tracing::info!(
                    asked = buffer_bytes,
                    receive = s.recv_buffer_size().unwrap_or(0),
                    send = s.send_buffer_size().unwrap_or(0),
                    "media port socket buffers (the kernel grants at most twice net.core.rmem_max / wmem_max)"
                );
            }
            s.set_nonblocking(true)?;
            s.bind(&local_addr.into())?;
            let socket: std::net::UdpSocket = s.into();
            // With port 0, every shard binds the port the first one got.
            local_addr = socket.local_addr()?;
            let state = UdpSocketState::new((&socket).into())?;
            sockets.push(Arc::new(PortSocket {
                socket,
                state,
                pktinfo: local_addr.ip().is_unspecified(),
            }));
        }
        Ok(ClientPort {
            sockets,
            routes: Arc::new(RwLock::new(Routes::default())),
            local_addr,
            next_key: std::sync::atomic::AtomicU64::new(1),
            epoch: Instant::now(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The port's sockets, one per media shard.
    pub fn sockets(&self) -> &[Arc<PortSocket>] {
        &self.sockets
    }

    /// Routes datagrams that carry `ufrag` (and then their source addresses) to `inbox`.
    /// `pass` is the call's local ICE password (we chose it with the ufrag).
    pub fn register(&self, ufrag: &str, pass: &str, inbox: impl Into<CallInbox>) -> RouteGuard {
        let key = self
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let registered = Registered {
            route: Route {
                key,
                inbox: inbox.into(),
            },
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

    /// Delivers a datagram through its call's inbox (tests of the routing; the shards deliver
    /// their own calls' datagrams directly, [`ClientPort::route`]).
    pub fn dispatch(
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
        let Some(inbox) = self.route(source, data, metrics, now, CallInbox::clone) else {
            metrics.unmatched_datagrams.inc();
            return;
        };
        if inbox.try_send(Datagram::udp(now, source, local_ip, data)) == Err(InboxError::Full) {
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
    ///
    /// `with` reads the call's inbox under the routing table's lock: a shard learns which
    /// call owns the datagram without cloning anything.
    pub fn route<R>(
        &self,
        source: SocketAddr,
        data: &[u8],
        metrics: &Metrics,
        now: Instant,
        with: impl FnOnce(&CallInbox) -> R,
    ) -> Option<R> {
        let now_ms = self.millis(now);
        let silence_ms = u64::try_from(TAKEOVER_SILENCE.as_millis()).unwrap_or(u64::MAX);
        let ufrag = stun::local_ufrag(data);
        {
            let r = self.routes.read().unwrap_or_else(|p| p.into_inner());
            let Some(u) = ufrag else {
                return r.by_addr.get(&source).map(|e| {
                    if !dtls_before_keys(data) {
                        e.last_seen_ms.store(now_ms, Relaxed);
                    }
                    with(&e.route.inbox)
                });
            };
            let call = r.by_ufrag.get(u)?;
            let owner = r.by_addr.get(&source);
            if let Some(e) = owner.filter(|e| e.route.key == call.route.key) {
                e.last_seen_ms.store(now_ms, Relaxed);
                return Some(with(&call.route.inbox));
            }
            // Delivered either way: the call's str0m checks the request and answers only a
            // genuine one. But knowing a ufrag (sent in the clear) is not knowing the password.
            if !stun::signed_with(data, &call.pass) {
                metrics.stun_unauthenticated.inc();
                return Some(with(&call.route.inbox));
            }
            if let Some(e) = owner {
                if now_ms.saturating_sub(e.last_seen_ms.load(Relaxed)) < silence_ms {
                    tracing::debug!(%source, "signed binding request from another live call's address; not re-routed");
                    return Some(with(&call.route.inbox));
                }
            }
        }
        // A signed binding request from an address no call has, or one whose call has gone
        // quiet: learn it. The table may have changed between the locks: look again.
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let route = r.by_ufrag.get(ufrag?)?.route.clone();
        let previous = match r.by_addr.get(&source) {
            None => None,
            Some(e) if e.route.key == route.key => return Some(with(&route.inbox)),
            Some(e) if now_ms.saturating_sub(e.last_seen_ms.load(Relaxed)) < silence_ms => {
                return Some(with(&route.inbox))
            }
            Some(e) => Some(e.route.key),
        };
        if r.addrs_of.get(&route.key).map_or(0, Vec::len) >= MAX_ADDRS_PER_CALL {
            return Some(with(&route.inbox));
        }
        if let Some(old) = previous {
            if let Some(addrs) = r.addrs_of.get_mut(&old) {
                addrs.retain(|a| *a != source);
            }
            tracing::info!(%source, "a client address moved to a new call (its previous call had gone quiet)");
        }
        r.addrs_of.entry(route.key).or_default().push(source);
        let delivered = with(&route.inbox);
        r.by_addr.insert(
            source,
            AddrRoute {
                route,
                last_seen_ms: AtomicU64::new(now_ms),
            },
        );
        Some(delivered)
    }
}

/// A DTLS record sent before any keys (epoch 0, RFC 6347 §4.1): a first handshake flight
/// (`ClientHello` and what follows it unencrypted) or a plaintext alert. Such a record does
/// not show that the call owning its source address still hears from its client. When a
/// client vanishes and the OS gives its port to a new client, the new client's `ClientHello`
/// retransmits reached the old call by address and kept it "live", so the new call's signed
/// binding requests could not take the address for many seconds and its DTLS never
/// connected in time (the soak found it: 1 call in about 650). An owner's own client sends
/// keyed records (epoch ≥ 1), RTP and signed binding requests, all of which still count; a
/// stranger cannot keep an address by sending epoch-0 records either. Only the legacy record
/// header (content types 20–25) carries the epoch there; DTLS 1.3's unified header (32–63)
/// is always keyed.
fn dtls_before_keys(data: &[u8]) -> bool {
    data.len() >= 13 && (20..=25).contains(&data[0]) && data[3] == 0 && data[4] == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

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

    /// A port with two calls on it: A (`ufragA`, `passA`) and B (`ufragB`, `passB`), each
    /// with an inbox of 16.
    struct TwoCalls {
        port: ClientPort,
        metrics: Metrics,
        rx_a: mpsc::Receiver<Datagram>,
        rx_b: mpsc::Receiver<Datagram>,
        guard_a: RouteGuard,
        guard_b: RouteGuard,
    }

    fn two_calls() -> TwoCalls {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let (tx_a, rx_a) = mpsc::channel(16);
        let (tx_b, rx_b) = mpsc::channel(16);
        let guard_a = port.register("ufragA", "passA", tx_a);
        let guard_b = port.register("ufragB", "passB", tx_b);
        TwoCalls {
            port,
            metrics: Metrics::new(),
            rx_a,
            rx_b,
            guard_a,
            guard_b,
        }
    }

    #[tokio::test]
    async fn routes_by_ufrag_then_by_learned_address_and_forgets_on_drop() {
        let TwoCalls {
            port,
            metrics,
            mut rx_a,
            mut rx_b,
            guard_a,
            guard_b: _guard_b,
        } = two_calls();
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
        let TwoCalls {
            port,
            metrics,
            mut rx_a,
            mut rx_b,
            guard_a,
            guard_b: _guard_b,
        } = two_calls();
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
        let TwoCalls {
            port,
            metrics,
            mut rx_a,
            mut rx_b,
            guard_a: _guard_a,
            guard_b,
        } = two_calls();
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

    /// A DTLS 1.2 record header with `epoch` and a few bytes of body.
    fn dtls_record(epoch: u16) -> Vec<u8> {
        let mut r = vec![22, 0xfe, 0xfd];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 1, 0, 3, 1, 2, 3]);
        r
    }

    /// The soak's case: A's client vanished, a new client got its port and is calling B. Its
    /// ClientHello retransmits still reach A by address, but they do not keep the address A's:
    /// B's next signed request 2 s after A last heard its own client takes it.
    #[tokio::test]
    async fn a_new_clients_first_dtls_flight_does_not_keep_a_vanished_calls_address() {
        let TwoCalls {
            port,
            metrics,
            mut rx_a,
            mut rx_b,
            guard_a: _guard_a,
            guard_b: _guard_b,
        } = two_calls();
        let shared = addr(5003);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        port.dispatch_at(
            shared,
            None,
            &binding_request("ufragA", "passA"),
            &metrics,
            at(0),
        );
        // A's client is keyed: its records count as hearing from it.
        port.dispatch_at(shared, None, &dtls_record(1), &metrics, at(100));
        assert!(rx_a.try_recv().is_ok() && rx_a.try_recv().is_ok());

        let b_request = binding_request("ufragB", "passB");
        port.dispatch_at(shared, None, &b_request, &metrics, at(500));
        assert!(rx_b.try_recv().is_ok(), "the request itself reaches B");
        for ms in [600, 1_600, 2_000] {
            port.dispatch_at(shared, None, &dtls_record(0), &metrics, at(ms));
            assert_eq!(
                rx_a.try_recv().unwrap().data,
                dtls_record(0),
                "still A's at {ms} ms"
            );
        }
        // 2 s after A's own last record: B's signed request takes the address, and B gets
        // the next hello.
        port.dispatch_at(shared, None, &b_request, &metrics, at(2_100));
        assert!(rx_b.try_recv().is_ok());
        port.dispatch_at(shared, None, &dtls_record(0), &metrics, at(2_200));
        assert_eq!(rx_b.try_recv().unwrap().data, dtls_record(0));
        assert!(rx_a.try_recv().is_err());

        // A keyed record, by contrast, keeps an address its owner's: B's client now sends
        // keyed records, and A's late signed request does not take the address back.
        port.dispatch_at(shared, None, &dtls_record(1), &metrics, at(3_000));
        assert!(rx_b.try_recv().is_ok());
        port.dispatch_at(
            shared,
            None,
            &binding_request("ufragA", "passA"),
            &metrics,
            at(4_900),
        );
        assert!(rx_a.try_recv().is_ok(), "the request itself reaches A");
        port.dispatch_at(shared, None, &dtls_record(1), &metrics, at(4_950));
        assert_eq!(rx_b.try_recv().unwrap().data, dtls_record(1));
    }

    #[test]
    fn only_legacy_dtls_records_in_epoch_zero_are_before_keys() {
        assert!(dtls_before_keys(&dtls_record(0)));
        assert!(!dtls_before_keys(&dtls_record(1)));
        // DTLS 1.3's unified header, RTP, STUN, and a truncated header.
        let mut unified = dtls_record(0);
        unified[0] = 0x2c;
        assert!(!dtls_before_keys(&unified));
        assert!(!dtls_before_keys(&[
            0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
        ]));
        assert!(!dtls_before_keys(&binding_request("u", "p")));
        assert!(!dtls_before_keys(&dtls_record(0)[..12]));
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
    #[test]
    fn a_port_on_the_unspecified_address_learns_arrival_addresses_and_replies_from_them() {
        let port = ClientPort::bind("0.0.0.0:0".parse().unwrap(), 3).unwrap();
        assert!(port.sockets().iter().all(|s| s.pktinfo));
        let advertised = SocketAddr::new([127, 0, 0, 3].into(), port.local_addr().port());
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"hello", advertised).unwrap();
        // The kernel hashes the client to one of the shards' sockets: look at each.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (socket, meta) = loop {
            assert!(
                Instant::now() < deadline,
                "no shard socket received the datagram"
            );
            let got = port.sockets().iter().find_map(|s| {
                let mut buf = [0u8; GRO_BUFFER];
                let mut meta = [RecvMeta::default()];
                let n = s.recv(&mut [IoSliceMut::new(&mut buf)], &mut meta).ok()?;
                (n == 1).then(|| (s.clone(), meta[0]))
            });
            match got {
                Some(found) => break found,
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert_eq!(meta.addr, client.local_addr().unwrap());
        assert_eq!(meta.dst_ip, Some(advertised.ip()));

        let mut buf = [0u8; 64];
        let send = |data: &[u8], from: Option<IpAddr>| {
            let one = [(data, meta.addr, from)];
            socket.send_batch(&mut BatchSender::default(), &one, |&(d, to, from)| {
                (d, to, from)
            })
        };
        assert_eq!(send(b"reply", meta.dst_ip), 1);
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"reply"[..], advertised));
        // Without a source the kernel picks one: the defect this port avoids.
        assert_eq!(send(b"plain", None), 1);
        let (_, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!(from.ip(), IpAddr::from([127, 0, 0, 1]));
    }

    #[test]
    fn shards_share_one_port() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(port.local_addr().port(), 0);
        assert_eq!(port.sockets().len(), 3);
        assert!(port.sockets().iter().all(|s| !s.pktinfo));
    }
}
