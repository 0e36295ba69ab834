//! A [`Shell`] over active ICE-TCP (RFC 6544) connections: the transport of a client behind a
//! firewall that blocks UDP. The peer offers one TCP host candidate with `tcptype active` (on
//! the discard port 9, as browsers do: an active candidate is never connected to) and opens a
//! connection to each remote passive candidate str0m sends a check to. Packets travel in
//! RFC 4571 frames ([`crate::framing`]).
//!
//! Each connection is a task: it connects, writes the frames queued for it and reads frames
//! into one inbound queue, tagged with the remote address; str0m sees them as `Protocol::Tcp`
//! packets from that address to the candidate. Queues are bounded: a frame that finds its
//! queue full is dropped and counted, as a full UDP socket buffer would drop a datagram.

use crate::framing::{encode_frame, FrameDecoder};
use crate::shell::{Drained, Shell};
use crate::udp::IoCounters;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::net::{Protocol, TcpType};
use str0m::{Candidate, Event, Rtc, RtcError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// The port of an active candidate: RFC 6544 §4.5 says active candidates carry port 9.
pub const ACTIVE_CANDIDATE_PORT: u16 = 9;
/// Frames queued per connection (and received frames queued for the peer) before new ones
/// are dropped.
pub const QUEUE_FRAMES: usize = 512;
/// How long connecting to a passive candidate may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The active TCP host candidate on `ip` (port [`ACTIVE_CANDIDATE_PORT`]).
pub fn active_candidate(ip: IpAddr) -> Result<Candidate, str0m::error::IceError> {
    Candidate::builder()
        .tcp()
        .host(SocketAddr::new(ip, ACTIVE_CANDIDATE_PORT))
        .tcptype(TcpType::Active)
        .build()
}

/// One `Rtc` and the TCP connections it talks through.
pub struct TcpPeer {
    pub shell: Shell,
    pub counters: IoCounters,
    links: Links,
    inbound: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
}

/// The connections, by remote address, and what a new one needs.
struct Links {
    bind_ip: IpAddr,
    max_frame: usize,
    conns: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    inbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    open: Arc<AtomicUsize>,
}

impl TcpPeer {
    /// Needs a tokio runtime. Connections leave from `bind_ip`; the shell's local address is
    /// the active candidate's, which is what str0m sees as every packet's destination.
    /// Received frames longer than `max_frame` end their connection.
    pub fn new(rtc: Rtc, bind_ip: IpAddr, max_frame: usize) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        TcpPeer {
            shell: Shell::new(rtc, SocketAddr::new(bind_ip, ACTIVE_CANDIDATE_PORT)),
            counters: IoCounters::default(),
            links: Links {
                bind_ip,
                max_frame,
                conns: HashMap::new(),
                inbound: tx,
                open: Arc::default(),
            },
            inbound: rx,
        }
    }

    pub fn rtc(&mut self) -> &mut Rtc {
        self.shell.rtc_mut()
    }

    /// Connections currently established.
    pub fn open_connections(&self) -> usize {
        self.links.open.load(Ordering::Acquire)
    }

    /// A handle that reads [`TcpPeer::open_connections`] from elsewhere, also after the peer
    /// is dropped (its connections then write what is queued and close).
    pub fn open_connections_handle(&self) -> Arc<AtomicUsize> {
        self.links.open.clone()
    }

    /// The next received frame and the remote address of its connection. Cancel-safe.
    pub async fn recv(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.inbound.recv().await
    }

    /// Drains str0m until its next timeout: transmits are queued on their connection (opened
    /// on first use), events go to `on_event`. Returns the next deadline.
    pub fn drain(
        &mut self,
        mut on_event: impl FnMut(&mut Rtc, Event),
    ) -> Result<Instant, RtcError> {
        let TcpPeer {
            shell,
            counters,
            links,
            ..
        } = self;
        shell.drain(|rtc, d| match d {
            Drained::Transmit(t) => {
                if t.proto != Protocol::Tcp || !links.send(t.destination, &t.contents) {
                    counters.send_errors += 1;
                }
            }
            Drained::Event(e) => on_event(rtc, e),
        })
    }

    /// Feeds one received frame; unusable ones are counted and dropped. Drain afterwards.
    pub fn handle_frame(&mut self, data: &[u8], source: SocketAddr, now: Instant) {
        if let Err(e) = self.shell.handle_packet(Protocol::Tcp, now, source, data) {
            self.counters.bad_datagrams += 1;
            tracing::debug!(error = %e, %source, "TCP frame dropped");
        }
    }

    /// Advances str0m's clock. Drain afterwards.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        self.shell.handle_timeout(now)
    }

    /// A timeout now and a drain: puts just-written RTP on the wire.
    pub fn kick(&mut self, on_event: impl FnMut(&mut Rtc, Event)) -> Result<Instant, RtcError> {
        self.handle_timeout(Instant::now())?;
        self.drain(on_event)
    }

    /// Says goodbye (DTLS close_notify, SCTP shutdown) so the remote notices at once. The
    /// connections write what is queued, then close when the peer is dropped.
    pub fn close_gracefully(&mut self) {
        let TcpPeer {
            shell,
            counters,
            links,
            ..
        } = self;
        shell.close(Instant::now(), |t| {
            if !links.send(t.destination, &t.contents) {
                counters.send_errors += 1;
            }
        });
    }
}

impl Links {
    /// Queues one packet for `to`, connecting first if needed. False if it was dropped.
    fn send(&mut self, to: SocketAddr, packet: &[u8]) -> bool {
        let Some(frame) = encode_frame(packet) else {
            return false;
        };
        let queue = match self.conns.get(&to) {
            Some(q) if !q.is_closed() => q,
            _ => {
                let q = self.connect(to);
                self.conns.entry(to).insert_entry(q).into_mut()
            }
        };
        queue.try_send(frame).is_ok()
    }

    fn connect(&self, to: SocketAddr) -> mpsc::Sender<Vec<u8>> {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let conn = Connection {
            to,
            bind_ip: self.bind_ip,
            max_frame: self.max_frame,
            inbound: self.inbound.clone(),
            open: self.open.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = conn.run(rx).await {
                tracing::debug!(error = %e, %to, "ICE-TCP connection ended");
            }
        });
        tx
    }
}

struct Connection {
    to: SocketAddr,
    bind_ip: IpAddr,
    max_frame: usize,
    inbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    open: Arc<AtomicUsize>,
}

/// Counts an established connection while it lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connection {
    async fn open_stream(&self) -> io::Result<TcpStream> {
        let socket = match self.to {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(self.bind_ip, 0))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(self.to))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        // Small frames (STUN, DTLS records, 20 ms of audio) must not wait for Nagle.
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Writes queued frames and reads frames until the peer drops its queue (then writes what
    /// is left and closes) or the remote closes.
    ///
    /// A write that fails (the remote closed or reset the connection) ends the writing, not the
    /// reading: what the remote sent before it closed, its goodbye (DTLS close_notify) among
    /// it, may still wait in the socket, and is read and delivered until the end of the
    /// stream. The queue is closed, so the next packet for this address opens a new
    /// connection.
    async fn run(self, mut queue: mpsc::Receiver<Vec<u8>>) -> io::Result<()> {
        let stream = self.open_stream().await?;
        self.open.fetch_add(1, Ordering::AcqRel);
        let _open = OpenGuard(self.open.clone());
        let (mut reader, mut writer) = stream.into_split();
        let mut decoder = FrameDecoder::new(self.max_frame);
        let mut buf = vec![0u8; 4096];
        let mut writing = true;
        loop {
            tokio::select! {
                frame = queue.recv(), if writing => match frame {
                    Some(frame) => {
                        if let Err(e) = writer.write_all(&frame).await {
                            tracing::debug!(error = %e, to = %self.to, "ICE-TCP write failed; reading what is left");
                            writing = false;
                            queue.close();
                        }
                    }
                    None => {
                        writer.shutdown().await?;
                        return Ok(());
                    }
                },
                n = reader.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    decoder.extend(buf.get(..n).unwrap_or_default());
                    while let Some(frame) = decoder
                        .next_frame()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                    {
                        // Full: dropped, as the network would (the peer is not reading).
                        let _ = self.inbound.try_send((self.to, frame));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The remote (the relay, when a call ends) sends its goodbye and resets the connection,
    /// as a socket closed with unread data does, while the client has a frame of its own to
    /// write. Whichever the connection task takes first, the goodbye that arrived is
    /// delivered: a write failing on the reset used to end the task with the goodbye unread
    /// (about half the time: `select!` picks at random), so the client never saw the call
    /// end. The current-thread runtime runs the task only when the test awaits, so the
    /// goodbye and the reset are both in the socket before the task looks.
    #[tokio::test]
    async fn a_goodbye_in_the_socket_is_delivered_even_when_a_write_fails_on_the_reset() {
        for round in 0..16 {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let relay = listener.local_addr().unwrap();
            let (tx, mut inbound) = mpsc::channel(QUEUE_FRAMES);
            let mut links = Links {
                bind_ip: relay.ip(),
                max_frame: 1500,
                conns: HashMap::new(),
                inbound: tx,
                open: Arc::default(),
            };
            assert!(links.send(relay, b"stun"));
            let (mut server, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 6];
            server.read_exact(&mut first).await.unwrap();
            assert_eq!(&first[2..], b"stun");

            server
                .write_all(&encode_frame(b"close_notify").unwrap())
                .await
                .unwrap();
            server.set_zero_linger().unwrap();
            drop(server);
            // The client's next transmit (an RTCP report, a consent check) is queued before
            // its connection task has read anything.
            assert!(links.send(relay, b"rtcp"));

            let got = tokio::time::timeout(Duration::from_secs(5), inbound.recv()).await;
            let Ok(Some((from, frame))) = got else {
                panic!("round {round}: the goodbye was lost");
            };
            assert_eq!((from, frame.as_slice()), (relay, &b"close_notify"[..]));
        }
    }
}
