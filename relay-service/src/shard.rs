//! The media shards: a fixed set of threads, each owning the calls placed on it and every
//! socket those calls use, so a packet is read, bridged and sent by one thread with no hop.
//!
//! Each shard owns one `SO_REUSEPORT` socket of the shared client port, the upstream socket of
//! each of its calls, and one timer heap for all its calls. One `epoll` wait serves them all;
//! the port is read with `recvmmsg` in batches, and each call runs str0m's timers only when
//! due. A call is placed on the least loaded shard at setup. Its client's datagrams reach it
//! directly when the kernel hashes the client's address to the shard's own socket, else (with
//! several shards) through the call's bounded inbox, counted as `cross_shard_datagrams`.
//!
//! The sans-IO parts are apart: [`timers`] and [`inbox`] are tested alone, the call's state
//! ([`call`]) wraps the sans-IO `Bridge`, and [`event_loop`] is the only code that waits.

pub mod call;
pub mod event_loop;
pub mod inbox;
pub mod timers;

use crate::media_socket::{ClientPort, Datagram};
use crate::metrics::Metrics;
use call::ShardCall;
use inbox::{CallInbox, Command, ShardQueue};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use tokio::sync::mpsc;

/// Where a new call runs: its shard and its key there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub shard: usize,
    pub key: u64,
}

struct Handle {
    queue: Arc<ShardQueue<ShardCall>>,
    /// Calls the shard holds (placed and not yet ended).
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

/// The running shards. Dropping this stops them: every call still held is dropped.
pub struct Shards {
    handles: Vec<Handle>,
    next_key: AtomicU64,
    /// Where the search for the least loaded shard starts: ties go round.
    next_start: AtomicUsize,
}

impl Shards {
    /// Starts one shard per socket of `port`.
    pub fn start(port: Arc<ClientPort>, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        for (index, socket) in port.sockets().iter().enumerate() {
            let load = Arc::new(AtomicUsize::new(0));
            let shard = event_loop::EventLoop::new(
                index,
                socket.clone(),
                port.clone(),
                metrics.clone(),
                load.clone(),
            )?;
            let queue = shard.queue();
            let thread = std::thread::Builder::new()
                .name(format!("media-shard-{index}"))
                .spawn(move || shard.run())?;
            handles.push(Handle {
                queue,
                load,
                thread: Some(thread),
            });
        }
        Ok(Shards {
            handles,
            next_key: AtomicU64::new(1),
            next_start: AtomicUsize::new(0),
        })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Calls each shard holds now.
    pub fn loads(&self) -> Vec<usize> {
        self.handles
            .iter()
            .map(|h| h.load.load(Ordering::Relaxed))
            .collect()
    }

    /// Chooses the shard for a new call: the least loaded.
    pub fn place(&self) -> Placement {
        let n = self.handles.len();
        let start = self.next_start.fetch_add(1, Ordering::Relaxed) % n;
        let shard = (0..n)
            .map(|i| (start + i) % n)
            .min_by_key(|&i| self.handles[i].load.load(Ordering::Relaxed))
            .unwrap_or(0);
        Placement {
            shard,
            key: self.next_key.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The inbox of the call placed at `at`, over the queue `tx` feeds.
    pub fn inbox(&self, at: Placement, tx: mpsc::Sender<Datagram>) -> CallInbox {
        let queue = self.handles[at.shard].queue.clone();
        CallInbox::on_shard(tx, at.shard, at.key, queue)
    }

    /// Hands a call to its shard, which runs it from now on. A shard whose thread has stopped
    /// (a bug outside any call, logged where it happened) would never start the call: it ends
    /// at once as `internal_error` instead of holding its place for good.
    pub fn run(&self, at: Placement, call: ShardCall) {
        let handle = &self.handles[at.shard];
        if handle.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            tracing::error!(
                shard = at.shard,
                "media shard is not running; the call ends"
            );
            call.finish(crate::call_state::EndReason::InternalError);
            return;
        }
        handle.load.fetch_add(1, Ordering::Relaxed);
        handle.queue.push(Command::Start(Box::new(call)));
    }

    /// Asks the call placed at `at` to end, with the reason its entry holds.
    pub fn end(&self, at: Placement) {
        self.handles[at.shard].queue.push(Command::End(at.key));
    }
}

#[cfg(test)]
impl Shards {
    /// Stops one shard's thread and waits until it has stopped (tests of a dead shard).
    fn stop_one(&self, shard: usize) {
        self.handles[shard].queue.push(Command::Stop);
        let thread = self.handles[shard].thread.as_ref().expect("running");
        while !thread.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for h in &self.handles {
            h.queue.push(Command::Stop);
        }
        for h in &mut self.handles {
            if let Some(thread) = h.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests;
