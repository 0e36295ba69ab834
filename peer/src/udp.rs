//! A [`Shell`] over one tokio UDP socket: what the echo model, its test client and the load
//! generator run per peer. The relay's bridge drives its two legs itself and shares only
//! [`send_or_wait`] and [`MAX_DATAGRAM`].

use crate::shell::{Drained, Shell};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use str0m::{Event, Rtc, RtcError};
use tokio::net::UdpSocket;

/// Largest UDP datagram we read. WebRTC stays well under the path MTU (~1200 bytes of
/// payload); 2 KiB leaves margin for peers that ignore MTU hints without wasting memory across
/// hundreds of peers.
pub const MAX_DATAGRAM: usize = 2048;

/// Upper bound on how long a peer sleeps without feeding str0m a timeout. str0m returns a
/// "distant future" instant when nothing is scheduled; clamping keeps our own deadlines
/// (connect, idle) checked and avoids handing huge durations to the tokio timer.
pub const MAX_SLEEP: Duration = Duration::from_millis(500);

/// When to wake next: str0m's deadline, at most [`MAX_SLEEP`] from now.
pub fn next_wake(deadline: Instant, now: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(deadline.min(now + MAX_SLEEP))
}

/// Binds a non-blocking std UDP socket on an ephemeral port (usable before a tokio runtime
/// exists, e.g. to put its address in an offer).
pub fn bind(ip: IpAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Sends one datagram; when the socket buffer is full, waits for room up to `wait` (`None`:
/// as long as it takes) rather than drop it, since DTLS handshakes must not lose messages.
///
/// The first attempt is a plain non-blocking send, returned as `Sent` or an error; only a
/// full buffer gives `Full`, whose future waits. A per-packet caller thus pays for the
/// waiting future (a timer, a readiness registration) only when it needs it:
/// `if let Send::Full(wait) = send_or_wait(..) { wait.await }`.
#[inline]
pub fn send_or_wait<'a>(
    socket: &'a UdpSocket,
    data: &'a [u8],
    to: SocketAddr,
    wait: Option<Duration>,
) -> Send<impl std::future::Future<Output = io::Result<()>> + 'a> {
    match socket.try_send_to(data, to) {
        Ok(_) => Send::Sent,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            Send::Full(send_when_writable(socket, data, to, wait))
        }
        Err(e) => Send::Failed(e),
    }
}

/// The outcome of a first, non-blocking send.
pub enum Send<F> {
    Sent,
    Failed(io::Error),
    /// The socket buffer is full: this future sends once there is room (or gives up).
    Full(F),
}

async fn send_when_writable(
    socket: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    wait: Option<Duration>,
) -> io::Result<()> {
    let send = socket.send_to(data, to);
    match wait {
        None => send.await.map(drop),
        Some(wait) => match tokio::time::timeout(wait, send).await {
            Ok(sent) => sent.map(drop),
            Err(_) => Err(io::ErrorKind::TimedOut.into()),
        },
    }
}

/// I/O trouble that must not be silently ignored.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounters {
    /// Datagrams str0m wanted to send that the socket refused (buffer full, unreachable).
    pub send_errors: u64,
    /// Received datagrams that were not STUN/DTLS/RTP/RTCP, or that str0m rejected.
    pub bad_datagrams: u64,
    /// With [`UdpPeer::strict_source`]: received datagrams dropped because they came from an
    /// address this peer never sent to (a reply that left the remote from the wrong address).
    pub foreign_source: u64,
}

/// The most remote addresses a strict peer remembers having sent to. A client sends to the
/// answer's few candidates; the bound keeps a misbehaving remote from growing the list.
const MAX_SENT_TO: usize = 16;

/// One `Rtc` and the socket it talks through.
pub struct UdpPeer {
    pub shell: Shell,
    pub socket: UdpSocket,
    pub counters: IoCounters,
    /// Accept datagrams only from addresses this peer has sent to, as libwebrtc (Chrome)
    /// does: a reply must come from the address its request went to (RFC 8445 §7.2.5.2.1).
    /// For an offerer talking to an ICE-lite answerer, which never sends first. Off by default.
    pub strict_source: bool,
    /// Remote addresses sent to (kept only when `strict_source`).
    sent_to: Vec<SocketAddr>,
}

impl UdpPeer {
    /// Needs a tokio runtime. The socket's address is what str0m sees as destination.
    pub fn new(rtc: Rtc, socket: std::net::UdpSocket) -> io::Result<Self> {
        let local_addr = socket.local_addr()?;
        Ok(UdpPeer {
            shell: Shell::new(rtc, local_addr),
            socket: UdpSocket::from_std(socket)?,
            counters: IoCounters::default(),
            strict_source: false,
            sent_to: Vec::new(),
        })
    }

    pub fn rtc(&mut self) -> &mut Rtc {
        self.shell.rtc_mut()
    }

    /// Drains str0m until its next timeout: transmits leave at once, events go to `on_event`
    /// (which may mutate the `Rtc`). Returns the next deadline.
    pub fn drain(
        &mut self,
        mut on_event: impl FnMut(&mut Rtc, Event),
    ) -> Result<Instant, RtcError> {
        let UdpPeer {
            shell,
            socket,
            counters,
            strict_source,
            sent_to,
        } = self;
        shell.drain(|rtc, d| match d {
            Drained::Transmit(t) => {
                if *strict_source
                    && sent_to.len() < MAX_SENT_TO
                    && !sent_to.contains(&t.destination)
                {
                    sent_to.push(t.destination);
                }
                // Never wait: a full socket buffer drops the datagram, as the network would.
                // Counted instead of stalling every other peer on this thread.
                if let Err(e) = socket.try_send_to(&t.contents, t.destination) {
                    counters.send_errors += 1;
                    tracing::debug!(error = %e, destination = %t.destination, "UDP send failed");
                }
            }
            Drained::Event(e) => on_event(rtc, e),
        })
    }

    /// Feeds one received datagram; unusable ones are counted and dropped. Drain afterwards.
    pub fn handle_datagram(&mut self, data: &[u8], source: SocketAddr, now: Instant) {
        if self.strict_source && !self.sent_to.contains(&source) {
            self.counters.foreign_source += 1;
            tracing::debug!(%source, "datagram from an address never sent to dropped");
            return;
        }
        if let Err(e) = self.shell.handle_datagram(now, source, data) {
            self.counters.bad_datagrams += 1;
            tracing::debug!(error = %e, %source, "datagram dropped");
        }
    }

    /// Advances str0m's clock. Drain afterwards.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        self.shell.handle_timeout(now)
    }

    /// A timeout now and a drain: puts just-written RTP on the wire (see [`Shell::kick`]).
    pub fn kick(&mut self, on_event: impl FnMut(&mut Rtc, Event)) -> Result<Instant, RtcError> {
        self.handle_timeout(Instant::now())?;
        self.drain(on_event)
    }

    /// Says goodbye (DTLS close_notify, SCTP shutdown) so the remote notices at once.
    pub fn close_gracefully(&mut self) {
        let UdpPeer {
            shell,
            socket,
            counters,
            ..
        } = self;
        shell.close(Instant::now(), |t| {
            if socket.try_send_to(&t.contents, t.destination).is_err() {
                counters.send_errors += 1;
            }
        });
    }
}
