//! The one UDP port shared by the client legs of all calls.
//!
//! Receive tasks (one per `SO_REUSEPORT` shard) read datagrams and hand each to its
//! call's task through a bounded queue, so the DTLS/SRTP work of different calls runs
//! on different cores. A datagram is routed by source address; a STUN binding request
//! is routed by the ufrag in its USERNAME (we chose each call's ufrag), and teaches the
//! table the client's address. Lookups are hash-map hits, never a scan over calls.
//! Datagrams no call accepts are dropped and counted.

use crate::metrics::Metrics;
use crate::stun;
use rtc_peer::udp::{send_or_wait, Send, MAX_DATAGRAM};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;
use str0m::net::Protocol;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A client may reach us from a few addresses during ICE (host, srflx, IPv4/IPv6).
/// Beyond this, STUN from more addresses is ignored: a stranger who learned a ufrag
/// must not be able to grow our tables.
const MAX_ADDRS_PER_CALL: usize = 8;

/// A packet for one call's client leg: a UDP datagram, or an ICE-TCP frame
/// ([`crate::media_tcp`]).
#[derive(Debug)]
pub struct Datagram {
    pub at: Instant,
    pub proto: Protocol,
    pub source: SocketAddr,
    pub data: Vec<u8>,
}

#[derive(Clone)]
struct Route {
    key: u64,
    tx: mpsc::Sender<Datagram>,
}

#[derive(Default)]
struct Routes {
    by_ufrag: HashMap<String, Route>,
    by_addr: HashMap<SocketAddr, Route>,
    addrs_of: HashMap<u64, Vec<SocketAddr>>,
}

pub struct ClientPort {
    sockets: Vec<Arc<UdpSocket>>,
    routes: Arc<RwLock<Routes>>,
    local_addr: SocketAddr,
    next_key: std::sync::atomic::AtomicU64,
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
            if r.by_addr.get(&a).is_some_and(|route| route.key == self.key) {
                r.by_addr.remove(&a);
            }
        }
    }
}

impl ClientPort {
    /// Binds `shards` sockets on `addr` with SO_REUSEPORT (the kernel spreads
    /// clients across them by 4-tuple hash).
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
            sockets.push(Arc::new(sock));
        }
        Ok(ClientPort {
            sockets,
            routes: Arc::new(RwLock::new(Routes::default())),
            local_addr,
            next_key: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Routes datagrams that carry `ufrag` (and then their source addresses) to `tx`.
    pub fn register(&self, ufrag: &str, tx: mpsc::Sender<Datagram>) -> RouteGuard {
        let key = self
            .next_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        r.by_ufrag.insert(ufrag.to_string(), Route { key, tx });
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

    /// Sends from the shared port. UDP sends rarely block; when the socket buffer is
    /// full we wait rather than drop, since DTLS handshakes must not lose messages.
    pub async fn send_to(&self, data: &[u8], to: SocketAddr) {
        let failed = match send_or_wait(&self.sockets[0], data, to, None) {
            Send::Sent => return,
            Send::Failed(e) => e,
            Send::Full(wait) => match wait.await {
                Ok(()) => return,
                Err(e) => e,
            },
        };
        tracing::debug!(error = %failed, %to, "client-leg send failed");
    }

    /// Starts one receive task per shard.
    pub fn spawn_receivers(self: &Arc<Self>, metrics: Arc<Metrics>) {
        for sock in &self.sockets {
            let sock = sock.clone();
            let port = self.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                loop {
                    match sock.recv_from(&mut buf).await {
                        Ok((n, source)) => port.dispatch(source, &buf[..n], &metrics),
                        Err(e) => {
                            // ICMP-induced errors (port unreachable) surface here on
                            // Linux; they are not fatal for the socket.
                            tracing::trace!(error = %e, "media port receive error");
                        }
                    }
                }
            });
        }
    }

    fn dispatch(&self, source: SocketAddr, data: &[u8], metrics: &Metrics) {
        let route = self.lookup(source, data);
        let Some(route) = route else {
            metrics.unmatched_datagrams.inc();
            return;
        };
        let d = Datagram {
            at: Instant::now(),
            proto: Protocol::Udp,
            source,
            data: data.to_vec(),
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = route.tx.try_send(d) {
            metrics.queue_full_drops.inc();
        }
    }

    fn lookup(&self, source: SocketAddr, data: &[u8]) -> Option<Route> {
        let ufrag = stun::local_ufrag(data);
        {
            let r = self.routes.read().unwrap_or_else(|p| p.into_inner());
            match ufrag {
                None => return r.by_addr.get(&source).cloned(),
                Some(u) => {
                    let route = r.by_ufrag.get(u)?;
                    if r.by_addr.get(&source).is_some_and(|a| a.key == route.key) {
                        return Some(route.clone());
                    }
                }
            }
        }
        // A binding request from an address we have not seen for this call: learn it.
        let mut r = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let route = r.by_ufrag.get(ufrag?)?.clone();
        let known = r.addrs_of.entry(route.key).or_default();
        if known.len() < MAX_ADDRS_PER_CALL && !known.contains(&source) {
            known.push(source);
            r.by_addr.insert(source, route.clone());
        }
        Some(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(ufrag: &str) -> Vec<u8> {
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

    #[tokio::test]
    async fn routes_by_ufrag_then_by_learned_address_and_forgets_on_drop() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx_a, mut rx_a) = mpsc::channel(8);
        let (tx_b, mut rx_b) = mpsc::channel(8);
        let guard_a = port.register("ufragA", tx_a);
        let _guard_b = port.register("ufragB", tx_b);
        let client_a: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        let client_b: SocketAddr = "127.0.0.1:5002".parse().unwrap();

        // RTP before any STUN from that address: nobody's.
        port.dispatch(client_a, &[0x80, 1, 2, 3], &metrics);
        assert_eq!(metrics.unmatched_datagrams.get(), 1);

        port.dispatch(client_a, &binding_request("ufragA"), &metrics);
        port.dispatch(client_b, &binding_request("ufragB"), &metrics);
        port.dispatch(client_a, &[0x80, 9], &metrics);
        assert!(rx_a.try_recv().unwrap().data.starts_with(&[0x00, 0x01]));
        assert_eq!(rx_a.try_recv().unwrap().data, vec![0x80, 9]);
        assert_eq!(rx_b.try_recv().unwrap().source, client_b);
        assert!(rx_b.try_recv().is_err());

        drop(guard_a);
        assert_eq!(port.route_count(), (1, 1));
        port.dispatch(client_a, &[0x80, 9], &metrics);
        assert_eq!(metrics.unmatched_datagrams.get(), 2);
    }

    #[tokio::test]
    async fn a_stranger_cannot_grow_a_calls_address_table() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let metrics = Metrics::new();
        let (tx, _rx) = mpsc::channel(1024);
        let _g = port.register("u1", tx);
        for p in 0..100u16 {
            let src = SocketAddr::new("127.0.0.1".parse().unwrap(), 6000 + p);
            port.dispatch(src, &binding_request("u1"), &metrics);
        }
        assert_eq!(port.route_count(), (1, MAX_ADDRS_PER_CALL));
    }

    #[tokio::test]
    async fn shards_share_one_port() {
        let port = ClientPort::bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(port.local_addr().port(), 0);
        assert_eq!(port.sockets.len(), 3);
    }
}
