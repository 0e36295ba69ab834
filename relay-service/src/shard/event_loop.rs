//! One shard's thread: waits on every socket of its calls and on its timer heap at once, and
//! per wake-up does what the packets need and nothing more.
//!
//! A turn: read what is ready (the port in `recvmmsg` batches, each ready upstream socket, the
//! inboxes the queue names), run the timers that are due, then service each call that was fed
//! (one str0m send pass per written leg, its transmits handed out), and send the port's batch.
//! Every source is read a bounded amount per turn; one that may hold more is read again next
//! turn without waiting, so a flood on one socket starves neither the other sockets nor the
//! timers. A panic in one call ends that call (`internal_error`, counted), not the shard.

use super::call::{watch_room, ClientTransmit, Serviced, ShardCall, UPSTREAM_RECV_BATCH};
use super::inbox::{Command, ShardQueue};
use super::timers::Timers;
use crate::bridge::Leg;
use crate::call_state::EndReason;
use crate::media_socket::{ClientPort, Datagram, PortSocket, GRO_BUFFER};
use crate::metrics::{BacklogCounters, Metrics};
use crate::send_batch::BatchSender;
use mio::{Events, Interest, Poll, Token};
use quinn_udp::RecvMeta;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use str0m::net::{Protocol, Transmit};

const WAKER: Token = Token(usize::MAX);
const PORT: Token = Token(usize::MAX - 1);

/// Datagrams read from the port per `recvmmsg`.
const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;

/// `recvmmsg` batches read from the port per turn before the other sources get theirs.
const PORT_ROUNDS: usize = 4;

/// Client-leg datagrams kept while the port's send buffer is full (4 MiB already absorbs
/// bursts); beyond this the newest are dropped, counted.
const CLIENT_BACKLOG: usize = 4_096;

/// Sources that may still hold data after their bounded read: read again next turn.
#[derive(Default)]
struct Again {
    port: bool,
    upstream: Vec<u64>,
    inbox: Vec<u64>,
}

impl Again {
    fn any(&self) -> bool {
        self.port || !self.upstream.is_empty() || !self.inbox.is_empty()
    }
}

/// What a call's handling borrows from the shard besides the call.
struct Io {
    timers: Timers,
    /// `recvmmsg` buffers for upstream sockets (64 KiB each: GRO may coalesce).
    upstream_bufs: Vec<Box<[u8]>>,
    upstream_meta: Vec<RecvMeta>,
    /// The bridge's transmits, moved out during a service.
    scratch: Vec<(Leg, Transmit)>,
    /// Client-leg datagrams of this turn, sent after every call was serviced.
    client_out: Vec<ClientTransmit>,
    /// Upstream datagrams that waited for room, or were dropped past a backlog.
    upstream_backlog: BacklogCounters,
    /// To watch an upstream socket for room only while its call has a backlog.
    registry: mio::Registry,
}

/// Who a datagram on the port is for.
enum Owner {
    /// A call of this shard.
    Here(u64),
    /// A call this shard does not hold (another shard's, or one not started yet): its inbox.
    Inbox(super::inbox::CallInbox),
}

pub struct EventLoop {
    index: usize,
    poll: Poll,
    queue: Arc<ShardQueue<ShardCall>>,
    socket: Arc<PortSocket>,
    port: Arc<ClientPort>,
    metrics: Arc<Metrics>,
    load: Arc<AtomicUsize>,
    /// Boxed: a call (two `Rtc`s inline) is 22 KiB, so the map's spare slots and its
    /// rehashes would otherwise cost that much per slot. Keyed by the relay's own sequential
    /// call keys, never by anything a peer chooses, so a one-multiply hash serves: SipHash's
    /// flood resistance cost ~140 instructions per lookup, two or three lookups per packet.
    calls: FxHashMap<u64, Box<ShardCall>>,
    io: Io,
    /// Calls fed this turn, to service.
    fed: Vec<u64>,
    again: Again,
    recv_bufs: Vec<Box<[u8]>>,
    recv_meta: Vec<RecvMeta>,
    client_backlog: VecDeque<ClientTransmit>,
    sender: BatchSender,
    client_backlog_counters: BacklogCounters,
    commands: Vec<Command<ShardCall>>,
    stopping: bool,
    /// The port is watched for room (a client backlog waits for it).
    watching_port_room: bool,
    wakeups: crate::metrics::WakeupMetrics,
    /// A datagram was read from the port this turn (whether or not a call here took it).
    read_this_turn: bool,
}

impl EventLoop {
    pub fn new(
        index: usize,
        socket: Arc<PortSocket>,
        port: Arc<ClientPort>,
        metrics: Arc<Metrics>,
        load: Arc<AtomicUsize>,
    ) -> std::io::Result<Self> {
        let poll = Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKER)?;
        // Readable only: a socket watched for room wakes the loop after every datagram it
        // sends (the kernel signals room each time one leaves its buffer), a second wake-up
        // per packet for nothing. Room is watched only while a backlog waits for it.
        poll.registry().register(
            &mut mio::unix::SourceFd(&socket.socket.as_raw_fd()),
            PORT,
            Interest::READABLE,
        )?;
        let registry = poll.registry().try_clone()?;
        Ok(EventLoop {
            index,
            poll,
            queue: Arc::new(ShardQueue::new(waker)),
            socket,
            port,
            load,
            calls: FxHashMap::default(),
            io: Io {
                timers: Timers::default(),
                upstream_bufs: (0..UPSTREAM_RECV_BATCH)
                    .map(|_| vec![0u8; GRO_BUFFER].into_boxed_slice())
                    .collect(),
                upstream_meta: vec![RecvMeta::default(); UPSTREAM_RECV_BATCH],
                scratch: Vec::with_capacity(64),
                client_out: Vec::with_capacity(256),
                upstream_backlog: BacklogCounters::of(&metrics, "upstream_socket_full"),
                registry,
            },
            watching_port_room: false,
            wakeups: metrics.media_wakeups.clone(),
            read_this_turn: false,
            client_backlog_counters: BacklogCounters::of(&metrics, "client_port_full"),
            metrics,
            fed: Vec::with_capacity(256),
            again: Again::default(),
            recv_bufs: (0..RECV_BATCH)
                .map(|_| vec![0u8; GRO_BUFFER].into_boxed_slice())
                .collect(),
            recv_meta: vec![RecvMeta::default(); RECV_BATCH],
            client_backlog: VecDeque::new(),
            sender: BatchSender::default(),
            commands: Vec::new(),
            stopping: false,
        })
    }

    pub fn queue(&self) -> Arc<ShardQueue<ShardCall>> {
        self.queue.clone()
    }

    pub fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut ready: Vec<(Token, bool, bool)> = Vec::with_capacity(1024);
        while !self.stopping {
            let timeout = if self.again.any() || !self.fed.is_empty() {
                Some(Duration::ZERO)
            } else {
                self.io
                    .timers
                    .next()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(shard = self.index, error = %e, "media shard cannot wait; it stops");
                    break;
                }
            }
            ready.extend(
                events
                    .iter()
                    .map(|e| (e.token(), e.is_readable(), e.is_writable())),
            );
            self.read_again();
            for (token, readable, writable) in ready.drain(..) {
                match token {
                    WAKER => self.take_commands(),
                    PORT => {
                        if writable {
                            self.flush_client();
                        }
                        if readable {
                            self.read_port();
                        }
                    }
                    Token(key) => {
                        let key = key as u64;
                        if writable {
                            self.with_call(key, |c, io| {
                                c.flush_upstream_backlog();
                                c.watch_for_room(&io.registry);
                            });
                        }
                        if readable {
                            self.read_upstream(key);
                        }
                    }
                }
            }
            self.fire_timers(Instant::now());
            // Datagrams handed to another shard's call, or to none, were work too.
            let read = std::mem::take(&mut self.read_this_turn);
            if self.fed.is_empty() && self.client_backlog.is_empty() && !read {
                self.wakeups.idle.inc();
            } else {
                self.wakeups.work.inc();
            }
            self.service_fed(Instant::now());
            self.flush_client();
        }
        for (_, call) in self.calls.drain() {
            call.finish(EndReason::Drain);
        }
    }

    /// Reads what last turn left in sources that may hold more.
    fn read_again(&mut self) {
        let again = std::mem::take(&mut self.again);
        if again.port {
            self.read_port();
        }
        for key in again.upstream {
            self.with_call(key, |c, _| c.again_upstream = false);
            self.read_upstream(key);
        }
        for key in again.inbox {
            self.with_call(key, |c, _| c.again_inbox = false);
            self.drain_inbox(key);
        }
    }

    fn take_commands(&mut self) {
        let mut commands = std::mem::take(&mut self.commands);
        self.queue.take(&mut commands);
        for command in commands.drain(..) {
            match command {
                Command::Start(call) => self.start(call),
                Command::End(key) => {
                    self.with_call(key, |c, _| c.end_requested());
                }
                Command::Ready(key) => self.drain_inbox(key),
                Command::Stop => self.stopping = true,
            }
        }
        self.commands = commands;
    }

    fn start(&mut self, mut call: Box<ShardCall>) {
        let key = call.key;
        let registered = self.poll.registry().register(
            &mut call.upstream,
            Token(key as usize),
            Interest::READABLE,
        );
        if let Err(e) = registered {
            tracing::error!(call_id = %call.entry.call_id, error = %e, "cannot watch the upstream socket");
            self.load.fetch_sub(1, Ordering::Relaxed);
            call.finish(EndReason::InternalError);
            return;
        }
        call.queued = true;
        self.fed.push(key);
        self.calls.insert(key, call);
        // Packets that reached the inbox before the call was here.
        self.drain_inbox(key);
    }

    /// Feeds a batch from a call's inbox; one that may hold more is read again next turn.
    fn drain_inbox(&mut self, key: u64) {
        let more = self.with_call(key, |c, _| {
            let more = c.drain_inbox() && !c.again_inbox;
            c.again_inbox |= more;
            more
        });
        if more == Some(true) {
            self.again.inbox.push(key);
        }
    }

    /// Feeds a batch from a call's upstream socket; one that may hold more is read again next
    /// turn.
    fn read_upstream(&mut self, key: u64) {
        let more = self.with_call(key, |c, io| {
            let more =
                c.read_upstream(&mut io.upstream_bufs, &mut io.upstream_meta) && !c.again_upstream;
            c.again_upstream |= more;
            more
        });
        if more == Some(true) {
            self.again.upstream.push(key);
        }
    }

    /// Reads the port: up to [`PORT_ROUNDS`] batches.
    fn read_port(&mut self) {
        let mut bufs = std::mem::take(&mut self.recv_bufs);
        let mut metas = std::mem::take(&mut self.recv_meta);
        let mut more = true;
        for _ in 0..PORT_ROUNDS {
            let received = {
                let mut slices = bufs.iter_mut();
                let mut iovs: [IoSliceMut<'_>; RECV_BATCH] = std::array::from_fn(|_| {
                    IoSliceMut::new(slices.next().expect("one buffer per slot"))
                });
                self.socket.recv(&mut iovs, &mut metas)
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                // ICMP-induced errors (port unreachable) surface here on Linux; they are not
                // fatal for the socket.
                Err(e) => {
                    tracing::trace!(error = %e, "media port receive error");
                    continue;
                }
            };
            let now = Instant::now();
            self.read_this_turn |= n > 0;
            // Fewer than offered: the queue was empty (no second read just for `EAGAIN`).
            let drained = n < RECV_BATCH;
            for (buf, meta) in bufs.iter().zip(&metas).take(n) {
                let local_ip = meta.dst_ip.filter(|_| self.socket.pktinfo);
                // One datagram, or several of one flow coalesced by GRO, `stride` apart.
                for data in buf[..meta.len].chunks(meta.stride.max(1)) {
                    self.client_datagram(now, meta.addr, local_ip, data);
                }
            }
            if drained {
                more = false;
                break;
            }
        }
        self.recv_bufs = bufs;
        self.recv_meta = metas;
        self.again.port |= more;
    }

    fn client_datagram(
        &mut self,
        now: Instant,
        source: SocketAddr,
        local_ip: Option<IpAddr>,
        data: &[u8],
    ) {
        let here = self.index;
        let calls = &self.calls;
        let owner = self.port.route(source, data, &self.metrics, now, |inbox| {
            match inbox.owner() {
                Some((shard, key)) if shard == here && calls.contains_key(&key) => Owner::Here(key),
                _ => Owner::Inbox(inbox.clone()),
            }
        });
        match owner {
            None => {
                self.metrics.unmatched_datagrams.inc();
            }
            Some(Owner::Here(key)) => {
                self.with_call(key, |c, _| {
                    c.client_packet(now, Protocol::Udp, source, local_ip, data)
                });
            }
            Some(Owner::Inbox(inbox)) => {
                let elsewhere = inbox.owner().is_some_and(|(shard, _)| shard != here);
                match inbox.try_send(Datagram::udp(now, source, local_ip, data)) {
                    Ok(()) if elsewhere => {
                        self.metrics.cross_shard_datagrams.inc();
                    }
                    Ok(()) => {}
                    Err(super::inbox::InboxError::Full) => {
                        self.metrics.queue_full_drops.inc();
                    }
                    Err(super::inbox::InboxError::Closed) => {}
                }
            }
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some((key, at)) = self.io.timers.pop_due(now) {
            self.with_call(key, |c, _| {
                if Timers::fired(at, &mut c.scheduled) {
                    c.timeout(now);
                }
            });
        }
    }

    /// Services every call fed this turn, and schedules its next timeout.
    fn service_fed(&mut self, now: Instant) {
        let mut fed = std::mem::take(&mut self.fed);
        for key in fed.drain(..) {
            let serviced = self.with_call(key, |c, io| {
                c.queued = false;
                let serviced = c.service(
                    now,
                    &mut io.scratch,
                    &mut io.client_out,
                    &io.upstream_backlog,
                );
                if let Serviced::Running = serviced {
                    c.watch_for_room(&io.registry);
                    io.timers
                        .schedule(c.key, c.bridge.poll_timeout(), &mut c.scheduled);
                }
                serviced
            });
            if let Some(Serviced::Finished(reason)) = serviced {
                self.remove(key, reason);
            }
        }
        // A service may feed nothing new; what it fed is serviced next turn.
        std::mem::swap(&mut self.fed, &mut fed);
        self.fed.append(&mut fed);
    }

    /// Runs `f` on call `key`, if the shard holds it. A panic ends that call only. A call that
    /// `f` fed is queued for this turn's service.
    fn with_call<R>(
        &mut self,
        key: u64,
        f: impl FnOnce(&mut ShardCall, &mut Io) -> R,
    ) -> Option<R> {
        let call = self.calls.get_mut(&key)?;
        let io = &mut self.io;
        match catch_unwind(AssertUnwindSafe(|| f(call, io))) {
            Ok(r) => {
                if call.dirty && !call.queued {
                    call.queued = true;
                    self.fed.push(key);
                }
                Some(r)
            }
            Err(_) => {
                self.metrics.call_panics.inc();
                tracing::error!(call_id = %call.entry.call_id, "call panicked; the call is ended");
                self.io.scratch.clear();
                self.remove(key, EndReason::InternalError);
                None
            }
        }
    }

    /// Lets a call go: its sockets and routes close as it drops.
    fn remove(&mut self, key: u64, reason: EndReason) {
        if let Some(mut call) = self.calls.remove(&key) {
            let _ = self.poll.registry().deregister(&mut call.upstream);
            self.load.fetch_sub(1, Ordering::Relaxed);
            call.finish(reason);
        }
    }

    /// Sends this turn's client-leg datagrams, after what waited for room, in `sendmmsg`
    /// batches; what finds the socket's buffer full waits in the backlog (bounded, the newest
    /// dropped and counted beyond it).
    fn flush_client(&mut self) {
        let waiting = self.client_backlog.make_contiguous();
        let gone = self
            .socket
            .send_batch(&mut self.sender, waiting, ClientTransmit::parts);
        self.client_backlog.drain(..gone);
        let mut out = std::mem::take(&mut self.io.client_out);
        let gone = if self.client_backlog.is_empty() {
            self.socket
                .send_batch(&mut self.sender, &out, ClientTransmit::parts)
        } else {
            0
        };
        for t in out.drain(..).skip(gone) {
            self.client_backlog_counters
                .keep(&mut self.client_backlog, CLIENT_BACKLOG, t);
        }
        self.io.client_out = out;
        self.watch_port_room();
    }

    /// Watches the port for room while a backlog waits for it, and only then.
    fn watch_port_room(&mut self) {
        let fd = self.socket.socket.as_raw_fd();
        if let Err(e) = watch_room(
            self.poll.registry(),
            &mut mio::unix::SourceFd(&fd),
            PORT,
            !self.client_backlog.is_empty(),
            &mut self.watching_port_room,
        ) {
            tracing::warn!(shard = self.index, error = %e, "cannot change what the media port is watched for");
        }
    }
}
