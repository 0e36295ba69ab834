//! How other threads reach a shard: its command queue (a call to start, a call to end) and
//! each call's inbox of packets that did not arrive on the shard's own socket (ICE-TCP frames,
//! and UDP datagrams the kernel gave another shard's socket).
//!
//! Both wake the shard's event loop through one `mio::Waker` (an eventfd write), coalesced: a
//! burst of pushes between two loop turns costs one wake-up.

use crate::media_socket::Datagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// Work for a shard from outside it.
pub enum Command<C> {
    /// A call set up and routed: the shard owns it from now on.
    Start(Box<C>),
    /// End a call (hangup, drain, budget) with the reason its entry holds.
    End(u64),
    /// A call's inbox has packets.
    Ready(u64),
    /// The relay is gone: drop every call and stop.
    Stop,
}

/// A shard's command queue and its waker.
pub struct ShardQueue<C> {
    commands: Mutex<Vec<Command<C>>>,
    /// Set by the first push after the loop took the queue: later pushes skip the eventfd.
    woken: AtomicBool,
    waker: mio::Waker,
}

impl<C> ShardQueue<C> {
    pub fn new(waker: mio::Waker) -> Self {
        ShardQueue {
            commands: Mutex::new(Vec::new()),
            woken: AtomicBool::new(false),
            waker,
        }
    }

    pub fn push(&self, command: Command<C>) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(command);
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                tracing::error!(error = %e, "cannot wake a media shard");
            }
        }
    }

    /// Moves every queued command into `into` (the loop's reused buffer). Clears the wake flag
    /// first, so a push racing with this wakes the loop again.
    pub fn take(&self, into: &mut Vec<Command<C>>) {
        self.woken.store(false, Ordering::Release);
        let mut queued = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        into.append(&mut queued);
    }
}

/// Tells a shard that one of its calls has packets waiting.
pub trait Notify: Send + Sync {
    fn ready(&self, key: u64);
}

impl<C: Send> Notify for ShardQueue<C> {
    fn ready(&self, key: u64) {
        self.push(Command::Ready(key));
    }
}

/// Where packets for one call go when they do not arrive on its shard's own socket: a bounded
/// queue (`--call-queue-datagrams`) the shard drains when told.
#[derive(Clone)]
pub struct CallInbox {
    tx: mpsc::Sender<Datagram>,
    owner: Option<Owner>,
}

#[derive(Clone)]
struct Owner {
    shard: usize,
    key: u64,
    notify: Arc<dyn Notify>,
    /// Set when the shard has been told the inbox has packets and has not drained it since:
    /// a flood costs one `Ready` per drain, not one per packet.
    told: Arc<AtomicBool>,
}

/// Why a packet was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum InboxError {
    /// The call's queue is full: the packet is dropped (counted by the caller).
    Full,
    /// The call has ended.
    Closed,
}

impl From<mpsc::Sender<Datagram>> for CallInbox {
    fn from(tx: mpsc::Sender<Datagram>) -> Self {
        CallInbox::detached(tx)
    }
}

impl CallInbox {
    /// The inbox of call `key`, owned by shard `shard`, which `notify` wakes.
    pub fn on_shard(
        tx: mpsc::Sender<Datagram>,
        shard: usize,
        key: u64,
        notify: Arc<dyn Notify>,
    ) -> Self {
        CallInbox {
            tx,
            owner: Some(Owner {
                shard,
                key,
                notify,
                told: Arc::new(AtomicBool::new(false)),
            }),
        }
    }

    /// An inbox read directly from its queue, by no shard (tests of the ports' routing).
    pub fn detached(tx: mpsc::Sender<Datagram>) -> Self {
        CallInbox { tx, owner: None }
    }

    /// The shard that owns the call and the call's key there.
    pub fn owner(&self) -> Option<(usize, u64)> {
        self.owner.as_ref().map(|o| (o.shard, o.key))
    }

    pub fn try_send(&self, d: Datagram) -> Result<(), InboxError> {
        self.tx.try_send(d).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => InboxError::Full,
            mpsc::error::TrySendError::Closed(_) => InboxError::Closed,
        })?;
        if let Some(o) = &self.owner {
            if !o.told.swap(true, Ordering::AcqRel) {
                o.notify.ready(o.key);
            }
        }
        Ok(())
    }

    /// The shard is about to drain the inbox: the next packet tells it again.
    pub fn draining(&self) {
        if let Some(o) = &self.owner {
            o.told.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use str0m::net::Protocol;

    fn datagram() -> Datagram {
        Datagram {
            at: Instant::now(),
            proto: Protocol::Udp,
            source: "127.0.0.1:9".parse().unwrap(),
            local_ip: None,
            data: vec![1, 2, 3],
        }
    }

    #[test]
    fn pushes_between_two_takes_wake_the_loop_once() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(7)).unwrap();
        let queue: Arc<ShardQueue<()>> = Arc::new(ShardQueue::new(waker));
        let (tx, mut rx) = mpsc::channel(2);
        let inbox = CallInbox::on_shard(tx, 3, 42, queue.clone());
        assert_eq!(inbox.owner(), Some((3, 42)));
        inbox.try_send(datagram()).unwrap();
        inbox.try_send(datagram()).unwrap();
        assert_eq!(inbox.try_send(datagram()), Err(InboxError::Full));

        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(events.iter().count(), 1);
        let mut taken = Vec::new();
        queue.take(&mut taken);
        let keys: Vec<u64> = taken
            .iter()
            .map(|c| match c {
                Command::Ready(k) => *k,
                _ => panic!("only Ready was pushed"),
            })
            .collect();
        // Told once, until the shard drains.
        assert_eq!(keys, vec![42]);
        inbox.draining();
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok());

        // After a take and a drain, the next push tells and wakes the loop again.
        inbox.try_send(datagram()).unwrap();
        queue.take(&mut taken);
        assert_eq!(taken.len(), 2, "a second Ready");
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(events.iter().count(), 1);
        drop(rx);
        assert_eq!(inbox.try_send(datagram()), Err(InboxError::Closed));
    }
}
