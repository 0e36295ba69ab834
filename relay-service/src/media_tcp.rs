//! The ICE-TCP port (RFC 6544) shared by the client legs of all calls: the passive TCP
//! candidate clients behind UDP-blocking firewalls connect to (off unless `--media-tcp-addr`).
//!
//! A connection carries RFC 4571 frames (`rtc_peer::framing`). It belongs to no call until its
//! first frame, which must be a STUN binding request whose USERNAME starts with a live call's
//! ufrag (read as on the UDP port, [`crate::stun::local_ufrag`]) and is signed with that call's
//! ICE password ([`crate::stun::signed_with`]): a stranger who learned a ufrag cannot take the
//! call's few connection places. From then on its frames go to that call's queue as
//! `Protocol::Tcp` packets from the connection's remote address, and the call's transmits to
//! that address are written back on it.
//!
//! Bounds: connections in total and per source IP ([`Admission`]), a deadline for the first
//! frame and an idle timeout ([`ConnTimer`]), a largest frame, a few connections per call, and
//! a bounded write queue per connection: frames for a client that does not read are dropped
//! and counted, never buffered without limit. A connection is closed when its call ends: the
//! goodbye, a FIN, then what the client still sends is read and discarded until its FIN (at
//! most [`FLUSH_ON_CLOSE`]), so the close is never a reset that could cost it the goodbye.
//! The decisions ([`Admission`], [`ConnTimer`], [`Routes`]) are sans-IO and tested in
//! virtual time; the tasks around them only read, write and sleep.

use crate::media_socket::Datagram;
use crate::metrics::TcpMetrics;
use crate::shard::inbox::{CallInbox, InboxError};
use crate::stun;
use rtc_peer::framing::{encode_frame, FrameDecoder, FrameError};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use str0m::net::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// As on the UDP port: a client needs one connection, maybe a few while ICE settles. More
/// for one ufrag are refused, so a stranger who learned a ufrag cannot grow our tables.
pub const MAX_CONNECTIONS_PER_CALL: usize = 8;

/// How long a closing connection may take to write what its call queued last (DTLS
/// close_notify, SCTP abort) before it is closed anyway.
const FLUSH_ON_CLOSE: Duration = Duration::from_secs(1);

/// Bytes read from a socket at once.
const READ_CHUNK: usize = 4096;

/// Frame drop reasons, exported from the start.
pub const DROP_REASONS: [&str; 3] = ["write_queue_full", "call_queue_full", "no_connection"];

/// The ICE-TCP listener's limits (flags `--media-tcp-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// The first frame (a STUN binding request) must arrive within this.
    pub handshake_timeout: Duration,
    /// A routed connection that receives nothing for this long is closed.
    pub idle_timeout: Duration,
    pub max_frame_bytes: usize,
    pub write_queue_frames: usize,
}

/// Why a connection never reached a call. The codes are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    TotalLimit,
    PerIpLimit,
    HandshakeTimeout,
    /// The first frame was not a STUN message with a USERNAME.
    NotStun,
    /// The first frame named a ufrag no live call has.
    UnknownUfrag,
    /// The first frame named a live call's ufrag but was not signed with its password.
    Unauthenticated,
    CallLimit,
    FrameTooLarge,
    /// The client closed (or the socket failed) before its first frame.
    Closed,
}

impl Refusal {
    pub const ALL: [Refusal; 9] = [
        Refusal::TotalLimit,
        Refusal::PerIpLimit,
        Refusal::HandshakeTimeout,
        Refusal::NotStun,
        Refusal::UnknownUfrag,
        Refusal::Unauthenticated,
        Refusal::CallLimit,
        Refusal::FrameTooLarge,
        Refusal::Closed,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Refusal::TotalLimit => "total_limit",
            Refusal::PerIpLimit => "per_ip_limit",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::NotStun => "not_stun",
            Refusal::UnknownUfrag => "unknown_ufrag",
            Refusal::Unauthenticated => "unauthenticated",
            Refusal::CallLimit => "call_limit",
            Refusal::FrameTooLarge => "frame_too_large",
            Refusal::Closed => "closed",
        }
    }
}

/// Why a routed connection ended. The codes are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    CallEnded,
    IdleTimeout,
    /// The client closed the connection, or it failed.
    PeerClosed,
    FrameTooLarge,
}

impl CloseReason {
    /// Every reason, so each is exported at 0 from the start.
    pub const ALL: [CloseReason; 4] = [
        CloseReason::CallEnded,
        CloseReason::IdleTimeout,
        CloseReason::PeerClosed,
        CloseReason::FrameTooLarge,
    ];

    pub fn code(self) -> &'static str {
        match self {
            CloseReason::CallEnded => "call_ended",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::FrameTooLarge => "frame_too_large",
        }
    }
}

/// Connection counts, in total and per source IP.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Admission {
            max_total,
            max_per_ip,
            total: 0,
            per_ip: HashMap::new(),
        }
    }

    /// Counts a new connection from `ip`, or refuses it. Every admitted connection is
    /// [`Admission::release`]d once.
    pub fn admit(&mut self, ip: IpAddr) -> Result<(), Refusal> {
        if self.total >= self.max_total {
            return Err(Refusal::TotalLimit);
        }
        let n = self.per_ip.entry(ip).or_default();
        if *n >= self.max_per_ip {
            return Err(Refusal::PerIpLimit);
        }
        *n += 1;
        self.total += 1;
        Ok(())
    }

    pub fn release(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            self.total -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Source IPs with at least one connection (the map never holds more).
    pub fn ips(&self) -> usize {
        self.per_ip.len()
    }
}

/// When a connection must be closed: the handshake deadline until it is routed, then the
/// idle timeout from its last received frame.
#[derive(Debug, Clone, Copy)]
pub struct ConnTimer {
    handshake_until: Instant,
    idle: Duration,
    last_receive: Option<Instant>,
}

impl ConnTimer {
    pub fn new(accepted: Instant, limits: &TcpLimits) -> Self {
        ConnTimer {
            handshake_until: accepted + limits.handshake_timeout,
            idle: limits.idle_timeout,
            last_receive: None,
        }
    }

    /// The connection was routed, or received a frame, at `now`.
    pub fn received(&mut self, now: Instant) {
        self.last_receive = Some(self.last_receive.map_or(now, |t| t.max(now)));
    }

    pub fn deadline(&self) -> Instant {
        match self.last_receive {
            None => self.handshake_until,
            Some(t) => t + self.idle,
        }
    }

    /// What ends the connection at `now`, if its deadline passed.
    pub fn expired(&self, now: Instant) -> Option<Result<Refusal, CloseReason>> {
        if now < self.deadline() {
            return None;
        }
        Some(match self.last_receive {
            None => Ok(Refusal::HandshakeTimeout),
            Some(_) => Err(CloseReason::IdleTimeout),
        })
    }
}

/// A call's place in the table: where its frames go, and its connections.
struct CallRoute {
    key: u64,
    /// The call's local ICE password: a connection's first request must be signed with it.
    pass: String,
    tx: CallInbox,
    conns: Vec<SocketAddr>,
    /// Cancelled when the call ends: its connections close.
    ended: CancellationToken,
    /// Cancelled when the call starts to end, before its goodbye is queued: a client that
    /// closes its connection from then on (in answer to the goodbye) closes it because the
    /// call ended.
    ending: CancellationToken,
}

struct ConnRoute {
    key: u64,
    writer: mpsc::Sender<Vec<u8>>,
}

/// The routing table: calls by ufrag, connections by remote address.
#[derive(Default)]
pub struct Routes {
    by_ufrag: HashMap<String, CallRoute>,
    by_addr: HashMap<SocketAddr, ConnRoute>,
}

/// What a connection learns when its first frame routes it to a call.
pub struct Attached {
    pub key: u64,
    pub ufrag: String,
    pub tx: CallInbox,
    pub ended: CancellationToken,
    pub ending: CancellationToken,
}

impl Routes {
    fn register(&mut self, key: u64, ufrag: &str, pass: &str, tx: CallInbox) {
        self.by_ufrag.insert(
            ufrag.to_string(),
            CallRoute {
                key,
                pass: pass.to_string(),
                tx,
                conns: Vec::new(),
                ended: CancellationToken::new(),
                ending: CancellationToken::new(),
            },
        );
    }

    /// Routes a new connection from `source` by its first frame.
    pub fn attach(
        &mut self,
        first_frame: &[u8],
        source: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    ) -> Result<Attached, Refusal> {
        let ufrag = stun::local_ufrag(first_frame).ok_or(Refusal::NotStun)?;
        let call = self.by_ufrag.get_mut(ufrag).ok_or(Refusal::UnknownUfrag)?;
        if !stun::signed_with(first_frame, &call.pass) {
            return Err(Refusal::Unauthenticated);
        }
        if call.conns.len() >= MAX_CONNECTIONS_PER_CALL {
            return Err(Refusal::CallLimit);
        }
        call.conns.push(source);
        let key = call.key;
        self.by_addr.insert(source, ConnRoute { key, writer });
        Ok(Attached {
            key,
            ufrag: ufrag.to_string(),
            tx: call.tx.clone(),
            ended: call.ended.clone(),
            ending: call.ending.clone(),
        })
    }

    /// Forgets a connection of call `key` (ufrag `ufrag`) that ended.
    fn detach(&mut self, key: u64, ufrag: &str, source: SocketAddr) {
        if self.by_addr.get(&source).is_some_and(|c| c.key == key) {
            self.by_addr.remove(&source);
        }
        if let Some(call) = self.by_ufrag.get_mut(ufrag).filter(|c| c.key == key) {
            call.conns.retain(|a| *a != source);
        }
    }

    /// Forgets a call that ended and closes its connections.
    fn unregister(&mut self, key: u64, ufrag: &str) {
        if self.by_ufrag.get(ufrag).is_some_and(|c| c.key == key) {
            if let Some(call) = self.by_ufrag.remove(ufrag) {
                call.ending.cancel();
                call.ended.cancel();
                for a in call.conns {
                    if self.by_addr.get(&a).is_some_and(|c| c.key == key) {
                        self.by_addr.remove(&a);
                    }
                }
            }
        }
    }

    /// Call `key` (ufrag `ufrag`) starts to end.
    fn ending(&self, key: u64, ufrag: &str) {
        if let Some(call) = self.by_ufrag.get(ufrag).filter(|c| c.key == key) {
            call.ending.cancel();
        }
    }

    /// Queues a packet of call `key` for its connection to `to`.
    fn send(&self, key: u64, to: SocketAddr, packet: &[u8]) -> Result<(), &'static str> {
        let conn = self
            .by_addr
            .get(&to)
            .filter(|c| c.key == key)
            .ok_or("no_connection")?;
        let frame = encode_frame(packet).ok_or("no_connection")?;
        conn.writer.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => "write_queue_full",
            mpsc::error::TrySendError::Closed(_) => "no_connection",
        })
    }

    /// (calls, connections) in the table.
    pub fn counts(&self) -> (usize, usize) {
        (self.by_ufrag.len(), self.by_addr.len())
    }
}

struct Shared {
    routes: RwLock<Routes>,
    admission: Mutex<Admission>,
    limits: TcpLimits,
    metrics: TcpMetrics,
    next_key: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// The listening ICE-TCP port.
pub struct TcpPort {
    listener: Mutex<Option<std::net::TcpListener>>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
}

/// A call's registration on the TCP port. Dropping it (the call ended, panicked, or its
/// setup failed) forgets the call and closes its connections.
pub struct TcpRoute {
    key: u64,
    ufrag: String,
    shared: Arc<Shared>,
}

impl TcpRoute {
    /// The call starts to end; call this before queuing its goodbye (DTLS close_notify).
    /// A client that closes its connection after this, as it does when it reads the goodbye,
    /// is counted as closed because the call ended: the client may well close before the
    /// route is dropped.
    pub fn ending(&self) {
        self.shared.routes().ending(self.key, &self.ufrag);
    }

    /// Queues one of this call's packets for its connection to `to`; a full queue or a
    /// connection that is gone drops it, counted.
    pub fn send(&self, to: SocketAddr, packet: &[u8]) {
        if let Err(reason) = self.shared.routes().send(self.key, to, packet) {
            self.shared.metrics.dropped(reason);
            tracing::trace!(%to, reason, "ICE-TCP frame dropped");
        }
    }
}

impl Drop for TcpRoute {
    fn drop(&mut self) {
        self.shared.routes_mut().unregister(self.key, &self.ufrag);
    }
}

impl TcpPort {
    /// Binds the listener (no task yet: [`TcpPort::spawn_accept`]).
    pub fn bind(addr: SocketAddr, limits: TcpLimits, metrics: TcpMetrics) -> std::io::Result<Self> {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        // A restarted relay rebinds at once despite connections in TIME_WAIT. Like the UDP
        // port, `[::]` keeps the system's dual-stack default.
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        let listener: std::net::TcpListener = s.into();
        let local_addr = listener.local_addr()?;
        Ok(TcpPort {
            listener: Mutex::new(Some(listener)),
            local_addr,
            shared: Arc::new(Shared {
                routes: RwLock::new(Routes::default()),
                admission: Mutex::new(Admission::new(
                    limits.max_connections,
                    limits.max_connections_per_ip,
                )),
                limits,
                metrics,
                next_key: AtomicU64::new(1),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Routes connections whose first STUN request carries `ufrag`, signed with `pass` (the
    /// call's local ICE password), to `inbox`.
    pub fn register(&self, ufrag: &str, pass: &str, inbox: impl Into<CallInbox>) -> TcpRoute {
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        self.shared
            .routes_mut()
            .register(key, ufrag, pass, inbox.into());
        TcpRoute {
            key,
            ufrag: ufrag.to_string(),
            shared: self.shared.clone(),
        }
    }

    /// (calls, connections) routed now.
    pub fn route_counts(&self) -> (usize, usize) {
        self.shared.routes().counts()
    }

    /// Connections open now, routed or not.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.admission).total()
    }

    /// Starts the accept loop (once; needs a tokio runtime).
    pub fn spawn_accept(&self) -> std::io::Result<()> {
        let Some(listener) = lock(&self.listener).take() else {
            return Ok(());
        };
        let listener = TcpListener::from_std(listener)?;
        let shared = self.shared.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => accept(&shared, stream, peer),
                    Err(e) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        tracing::warn!(error = %e, "ICE-TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(())
    }
}

/// Admits a connection (or closes it at once) and spawns its task.
fn accept(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    if let Err(refusal) = lock(&shared.admission).admit(peer.ip()) {
        shared.metrics.refused(refusal.code());
        tracing::debug!(%peer, reason = refusal.code(), "ICE-TCP connection refused");
        return;
    }
    let permit = Permit {
        shared: shared.clone(),
        ip: peer.ip(),
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _permit = permit;
        serve(&shared, stream, peer).await;
    });
}

/// Releases a connection's place in [`Admission`].
struct Permit {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        lock(&self.shared.admission).release(self.ip);
    }
}

/// Forgets a routed connection when its task ends.
struct Detach<'a> {
    shared: &'a Shared,
    key: u64,
    ufrag: String,
    peer: SocketAddr,
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        self.shared
            .routes_mut()
            .detach(self.key, &self.ufrag, self.peer);
        self.shared.metrics.active.dec();
    }
}

enum ReadError {
    Closed,
    TooLarge(FrameError),
}

/// Reads until `decoder` has a whole frame.
async fn read_frame(
    reader: &mut OwnedReadHalf,
    decoder: &mut FrameDecoder,
    buf: &mut [u8],
) -> Result<Vec<u8>, ReadError> {
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(ReadError::TooLarge(e)),
        }
        match reader.read(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(n) => decoder.extend(buf.get(..n).unwrap_or_default()),
        }
    }
}

async fn serve(shared: &Shared, stream: TcpStream, peer: SocketAddr) {
    let limits = shared.limits;
    let mut timer = ConnTimer::new(Instant::now(), &limits);
    // Small frames (STUN, DTLS records, 20 ms of audio) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let mut decoder = FrameDecoder::new(limits.max_frame_bytes);
    let mut buf = vec![0u8; READ_CHUNK];

    let refuse = |refusal: Refusal| {
        shared.metrics.refused(refusal.code());
        tracing::debug!(%peer, reason = refusal.code(), "ICE-TCP connection refused");
    };
    let first = tokio::time::timeout_at(
        timer.deadline().into(),
        read_frame(&mut reader, &mut decoder, &mut buf),
    )
    .await;
    let first = match first {
        Err(_) => return refuse(Refusal::HandshakeTimeout),
        Ok(Err(ReadError::Closed)) => return refuse(Refusal::Closed),
        Ok(Err(ReadError::TooLarge(_))) => return refuse(Refusal::FrameTooLarge),
        Ok(Ok(frame)) => frame,
    };
    let (write_tx, write_rx) = mpsc::channel(limits.write_queue_frames);
    let attached = shared.routes_mut().attach(&first, peer, write_tx);
    let attached = match attached {
        Ok(a) => a,
        Err(refusal) => return refuse(refusal),
    };
    shared.metrics.accepted.inc();
    shared.metrics.active.inc();
    let _detach = Detach {
        shared,
        key: attached.key,
        ufrag: attached.ufrag.clone(),
        peer,
    };
    tracing::debug!(%peer, "ICE-TCP connection routed to its call");
    let now = Instant::now();
    timer.received(now);
    deliver(shared, &attached.tx, peer, first, now);

    let closing = CancellationToken::new();
    let writing = tokio::spawn(write_frames(writer, write_rx, closing.clone()));
    let reason = loop {
        let read = read_frame(&mut reader, &mut decoder, &mut buf);
        tokio::select! {
            _ = attached.ended.cancelled() => break CloseReason::CallEnded,
            _ = tokio::time::sleep_until(timer.deadline().into()) => {
                if let Some(Err(reason)) = timer.expired(Instant::now()) {
                    break reason;
                }
            }
            frame = read => match frame {
                Ok(frame) => {
                    let now = Instant::now();
                    timer.received(now);
                    deliver(shared, &attached.tx, peer, frame, now);
                }
                // In answer to the call's goodbye, or on its own while the call ends.
                Err(ReadError::Closed) if attached.ending.is_cancelled() => {
                    break CloseReason::CallEnded
                }
                Err(ReadError::Closed) => break CloseReason::PeerClosed,
                Err(ReadError::TooLarge(e)) => {
                    tracing::debug!(%peer, error = %e, "ICE-TCP frame too large");
                    break CloseReason::FrameTooLarge;
                }
            },
        }
    };
    closing.cancel();
    let _ = writing.await;
    if reason == CloseReason::CallEnded {
        linger(&mut reader, &mut buf).await;
    }
    shared.metrics.closed(reason.code());
    tracing::debug!(%peer, reason = reason.code(), "ICE-TCP connection closed");
}

/// After the goodbye and our FIN: reads (and discards) what the client still sends until it
/// closes its side too, for at most [`FLUSH_ON_CLOSE`]. Closing a socket with unread data
/// sends a reset, not a FIN, and a reset may cost the client the goodbye it has not read yet
/// (a stack may discard its receive buffer; a client that writes first sees the error first).
async fn linger(reader: &mut OwnedReadHalf, buf: &mut [u8]) {
    let _ = tokio::time::timeout(FLUSH_ON_CLOSE, async {
        while let Ok(n) = reader.read(buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// Hands a frame to its call's queue as a TCP packet from `peer` (the bridge gives it to
/// str0m as addressed to the advertised TCP candidate).
fn deliver(shared: &Shared, tx: &CallInbox, peer: SocketAddr, data: Vec<u8>, at: Instant) {
    let d = Datagram {
        at,
        proto: Protocol::Tcp,
        source: peer,
        local_ip: None,
        data,
    };
    if tx.try_send(d) == Err(InboxError::Full) {
        shared.metrics.dropped("call_queue_full");
    }
}

/// Writes queued frames until `closing`; then what is still queued (the call's goodbye:
/// DTLS close_notify, SCTP abort), for at most [`FLUSH_ON_CLOSE`], and closes the write side.
/// A client that does not read holds a write up only that long.
async fn write_frames(
    mut writer: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Vec<u8>>,
    closing: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            biased;
            frame = queue.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = closing.cancelled() => break,
        };
        let write = writer.write_all(&frame);
        tokio::pin!(write);
        let written = tokio::select! {
            r = &mut write => r.is_ok(),
            // Closing began during the write: finish it, briefly.
            _ = closing.cancelled() => matches!(
                tokio::time::timeout(FLUSH_ON_CLOSE, &mut write).await,
                Ok(Ok(()))
            ),
        };
        if !written {
            return;
        }
    }
    let _ = tokio::time::timeout(FLUSH_ON_CLOSE, async {
        while let Ok(frame) = queue.try_recv() {
            if writer.write_all(&frame).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> TcpLimits {
        TcpLimits {
            max_connections: 4,
            max_connections_per_ip: 2,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            max_frame_bytes: 2048,
            write_queue_frames: 2,
        }
    }

    /// The ICE password the tests give the call with `ufrag`.
    fn pass_of(ufrag: &str) -> String {
        format!("pass-of-{ufrag}-0123456789")
    }

    /// A binding request for call `ufrag` as its client sends it: signed with the call's
    /// password.
    pub(crate) fn binding_request(ufrag: &str) -> Vec<u8> {
        signed_request(ufrag, &pass_of(ufrag))
    }

    fn signed_request(ufrag: &str, pass: &str) -> Vec<u8> {
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

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn admission_bounds_connections_per_ip_and_in_total() {
        let l = limits();
        let mut a = Admission::new(l.max_connections, l.max_connections_per_ip);
        let (x, y, z) = (
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            "192.0.2.3".parse().unwrap(),
        );
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Ok(()));
        assert_eq!(a.admit(x), Err(Refusal::PerIpLimit));
        assert_eq!(a.admit(y), Ok(()));
        assert_eq!(a.admit(y), Ok(()));
        assert_eq!(a.admit(z), Err(Refusal::TotalLimit));
        a.release(x);
        assert_eq!(a.admit(z), Ok(()));
        for ip in [x, y, y, z] {
            a.release(ip);
        }
        assert_eq!((a.total(), a.ips()), (0, 0), "nothing left behind");
        // A release for an IP never admitted changes nothing.
        a.release(x);
        assert_eq!(a.total(), 0);
    }

    #[test]
    fn the_handshake_deadline_then_the_idle_timeout_close_a_connection_in_virtual_time() {
        let t0 = Instant::now();
        let l = limits();
        let mut timer = ConnTimer::new(t0, &l);
        assert_eq!(timer.deadline(), t0 + l.handshake_timeout);
        assert_eq!(timer.expired(t0 + Duration::from_millis(4_999)), None);
        assert_eq!(
            timer.expired(t0 + l.handshake_timeout),
            Some(Ok(Refusal::HandshakeTimeout))
        );
        // Routed at 1 s: the idle timeout counts from the last frame.
        timer.received(t0 + Duration::from_secs(1));
        assert_eq!(timer.expired(t0 + Duration::from_secs(6)), None);
        timer.received(t0 + Duration::from_secs(20));
        // A frame stamped earlier (a batch read out of order) does not move it back.
        timer.received(t0 + Duration::from_secs(10));
        assert_eq!(timer.deadline(), t0 + Duration::from_secs(50));
        assert_eq!(timer.expired(t0 + Duration::from_secs(49)), None);
        assert_eq!(
            timer.expired(t0 + Duration::from_secs(50)),
            Some(Err(CloseReason::IdleTimeout))
        );
    }

    #[test]
    fn a_connection_is_routed_by_the_ufrag_of_its_first_stun_request() {
        let mut routes = Routes::default();
        let (tx_a, _rx_a) = mpsc::channel(4);
        let (tx_b, _rx_b) = mpsc::channel(4);
        routes.register(1, "ufragA", &pass_of("ufragA"), tx_a.into());
        routes.register(2, "ufragB", &pass_of("ufragB"), tx_b.into());
        let (w, _wr) = mpsc::channel(4);
        let refused = |routes: &mut Routes, frame: &[u8]| {
            routes
                .attach(frame, addr("192.0.2.9:1000"), w.clone())
                .err()
        };
        assert_eq!(
            refused(&mut routes, &[0x16, 0xfe, 0xfd]),
            Some(Refusal::NotStun)
        );
        assert_eq!(
            refused(&mut routes, &binding_request("nobody")),
            Some(Refusal::UnknownUfrag)
        );
        // A live call's ufrag, but not its password (a stranger who learned the ufrag): the
        // call's connection places stay free.
        for _ in 0..MAX_CONNECTIONS_PER_CALL + 1 {
            assert_eq!(
                refused(&mut routes, &signed_request("ufragB", "a-guessed-password")),
                Some(Refusal::Unauthenticated)
            );
        }
        assert_eq!(routes.counts(), (2, 0));
        let a = routes
            .attach(
                &binding_request("ufragB"),
                addr("192.0.2.9:1001"),
                w.clone(),
            )
            .unwrap();
        assert_eq!(a.key, 2);
        assert_eq!(routes.counts(), (2, 1));
    }

    #[test]
    fn a_call_takes_a_bounded_number_of_connections() {
        let mut routes = Routes::default();
        let (tx, _rx) = mpsc::channel(4);
        routes.register(7, "u", &pass_of("u"), tx.into());
        let (w, _wr) = mpsc::channel(4);
        for port in 0..MAX_CONNECTIONS_PER_CALL as u16 {
            let source = SocketAddr::new("192.0.2.1".parse().unwrap(), 2000 + port);
            assert!(routes
                .attach(&binding_request("u"), source, w.clone())
                .is_ok());
        }
        assert_eq!(
            routes
                .attach(&binding_request("u"), addr("192.0.2.1:3000"), w.clone())
                .err(),
            Some(Refusal::CallLimit)
        );
        // One that ends frees its place.
        routes.detach(7, "u", addr("192.0.2.1:2000"));
        assert!(routes
            .attach(&binding_request("u"), addr("192.0.2.1:3000"), w)
            .is_ok());
    }

    /// Real loopback sockets: a routed client that never reads costs at most its write queue
    /// (the rest is dropped and counted), and ending the call closes its connection.
    #[tokio::test]
    async fn a_client_that_does_not_read_gets_frames_dropped_and_the_call_end_closes_it() {
        let Routed {
            metrics,
            port,
            route,
            mut client,
            first,
            _rx,
        } = routed("slowcall").await;
        assert_eq!(first.proto, Protocol::Tcp);
        assert_eq!(first.source, client.local_addr().unwrap());
        assert_eq!(metrics.accepted.get(), 1);
        // Far more than the socket buffers and the 2-frame queue hold; the client reads nothing.
        let packet = vec![0x80u8; 1200];
        for _ in 0..20_000 {
            route.send(first.source, &packet);
            tokio::task::yield_now().await;
        }
        let dropped = metrics
            .frames_dropped
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: "write_queue_full".into(),
            })
            .get();
        assert!(dropped > 10_000, "dropped {dropped}");
        assert_eq!(port.route_counts(), (1, 1));

        drop(route);
        // The client drains what reached its socket, then sees the close.
        let mut buf = vec![0u8; 64 * 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match client.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection outlived its call");
        let deadline = Instant::now() + Duration::from_secs(5);
        while port.open_connections() > 0 || metrics.active.get() > 0 {
            assert!(Instant::now() < deadline, "the connection was not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(port.route_counts(), (0, 0));
        assert_eq!(closed_count(&metrics, "call_ended"), 1);
    }

    /// A listener on loopback with one call registered under `ufrag`, and a client whose
    /// connection is routed to it (its first frame, a binding request, has reached the call).
    struct Routed {
        metrics: TcpMetrics,
        port: TcpPort,
        route: TcpRoute,
        client: TcpStream,
        first: Datagram,
        _rx: mpsc::Receiver<Datagram>,
    }

    async fn routed(ufrag: &str) -> Routed {
        let metrics = TcpMetrics::default();
        let port = TcpPort::bind(addr("127.0.0.1:0"), limits(), metrics.clone()).unwrap();
        port.spawn_accept().unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let route = port.register(ufrag, &pass_of(ufrag), tx);
        let mut client = TcpStream::connect(port.local_addr()).await.unwrap();
        client
            .write_all(&encode_frame(&binding_request(ufrag)).unwrap())
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        Routed {
            metrics,
            port,
            route,
            client,
            first,
            _rx: rx,
        }
    }

    /// Waits (bounded) until no connection is counted active.
    async fn wait_released(metrics: &TcpMetrics) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while metrics.active.get() > 0 {
            assert!(Instant::now() < deadline, "the connection was not released");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn closed_count(metrics: &TcpMetrics, reason: &str) -> u64 {
        metrics
            .closed
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: reason.into(),
            })
            .get()
    }

    /// The order that made `ice_tcp`'s hangup test flaky, made deterministic: the call queues
    /// its goodbye, the client reads it and closes its connection at once, and the relay sees
    /// that close before the call's route is dropped. The connection still closed because the
    /// call ended, not because the client went away.
    #[tokio::test]
    async fn a_client_that_closes_in_answer_to_the_goodbye_counts_as_closed_by_the_call_end() {
        let Routed {
            metrics,
            port,
            route,
            mut client,
            first,
            _rx,
        } = routed("byecall").await;
        // What the call driver does when the call ends: mark it ending, queue the goodbye.
        route.ending();
        route.send(first.source, b"close_notify");
        let mut frame = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut frame))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&frame[2..], b"close_notify");
        // The client answers the goodbye by closing, while the route still lives.
        drop(client);
        wait_released(&metrics).await;
        assert_eq!(port.route_counts(), (1, 0), "the call is still registered");
        assert_eq!(closed_count(&metrics, "peer_closed"), 0);
        assert_eq!(closed_count(&metrics, "call_ended"), 1);
        drop(route);
        assert_eq!(port.route_counts(), (0, 0));
    }

    /// The call ends while the client is still sending (an RTCP report, a consent check): the
    /// relay reads and discards that until the client closes its side, so its connection ends
    /// with FINs both ways. Closing with the client's frames unread would answer them with a
    /// reset, which can cost the client the goodbye it has not read yet.
    #[tokio::test]
    async fn a_call_end_closes_the_connection_without_a_reset_while_the_client_still_sends() {
        let Routed {
            metrics,
            port: _port,
            route,
            mut client,
            first,
            _rx,
        } = routed("rstcall").await;
        route.ending();
        route.send(first.source, b"close_notify");
        drop(route);
        let mut frame = [0u8; 14];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut frame))
            .await
            .unwrap()
            .unwrap();
        let mut rest = [0u8; 64];
        let eof = tokio::time::timeout(Duration::from_secs(5), client.read(&mut rest))
            .await
            .unwrap();
        assert_eq!(eof.unwrap(), 0, "the goodbye, then the relay's FIN");
        // The client has not read the goodbye yet (as far as the relay knows) and sends on.
        let rtcp = encode_frame(&[0x80; 100]).unwrap();
        for i in 0..4 {
            client
                .write_all(&rtcp)
                .await
                .unwrap_or_else(|e| panic!("write {i} after the relay's FIN: {e}"));
            tokio::task::yield_now().await;
        }
        client.shutdown().await.unwrap();
        wait_released(&metrics).await;
        assert_eq!(closed_count(&metrics, "call_ended"), 1);
    }

    /// Without the goodbye, a client that closes is the one that went away.
    #[tokio::test]
    async fn a_client_that_closes_during_the_call_counts_as_peer_closed() {
        let Routed {
            metrics,
            port: _port,
            route,
            client,
            first: _first,
            _rx,
        } = routed("livecall").await;
        drop(client);
        wait_released(&metrics).await;
        assert_eq!(closed_count(&metrics, "peer_closed"), 1);
        assert_eq!(closed_count(&metrics, "call_ended"), 0);
        drop(route);
    }

    #[test]
    fn transmits_reach_only_the_calls_own_connections_and_a_full_queue_drops() {
        let mut routes = Routes::default();
        let (tx, _rx) = mpsc::channel(4);
        routes.register(1, "u1", &pass_of("u1"), tx.clone().into());
        routes.register(2, "u2", &pass_of("u2"), tx.into());
        let (w, mut wr) = mpsc::channel(2);
        let client = addr("192.0.2.5:4000");
        routes.attach(&binding_request("u1"), client, w).unwrap();
        assert_eq!(
            routes.send(2, client, b"x"),
            Err("no_connection"),
            "not call 2's"
        );
        assert_eq!(routes.send(1, client, b"abc"), Ok(()));
        assert_eq!(routes.send(1, client, b"d"), Ok(()));
        assert_eq!(routes.send(1, client, b"e"), Err("write_queue_full"));
        assert_eq!(wr.try_recv().unwrap(), vec![0, 3, b'a', b'b', b'c']);
        // The call ends: its connections are forgotten and told to close.
        let ended = routes.by_ufrag.get("u1").unwrap().ended.clone();
        routes.unregister(1, "u1");
        assert!(ended.is_cancelled());
        assert_eq!(routes.counts(), (1, 0));
        assert_eq!(routes.send(1, client, b"f"), Err("no_connection"));
        // A stale guard (same ufrag, other key) removes nothing.
        routes.unregister(1, "u2");
        assert_eq!(routes.counts(), (1, 0));
    }
}
