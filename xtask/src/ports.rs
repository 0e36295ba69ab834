//! Loopback ports: free ones for runs beside each other, checks that fixed ones are free (with
//! the option that moves them), and whether something listens yet.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Ports handed out for test and demo servers: below Linux's default ephemeral range
/// (32768–60999, `net.ipv4.ip_local_port_range`). A port the kernel hands out by binding port 0
/// lies inside that range, where every outgoing connection also takes its local port: between
/// releasing it and the server binding it, a test's own client connection could take it
/// ("Address already in use", seen in CI). Below the range only other servers compete, and a
/// random pick checked by binding makes a clash between two of ours unlikely.
const SERVER_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A pseudo-random index below `n`, from the clock and a counter (no dependency: a clash is
/// only a retry).
fn pick(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    // SplitMix64 of the clock, the counter and the process id.
    let mut z = t ^ c.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((std::process::id() as u64) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n as u64) as u16
}

/// A free port in [`SERVER_PORTS`] that `bind` accepts on 127.0.0.1; after 200 refused tries,
/// one the kernel hands out.
/// Ports this process has handed out: a port is free again the moment its probe closes, so
/// two picks for one stack could otherwise name the same port (one stack's echo model and
/// relay metrics did, and the relay could not listen).
fn claim(port: u16) -> bool {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if given.contains(&port) {
        return false;
    }
    given.push(port);
    true
}

fn free_port(bind: impl Fn(u16) -> bool, fallback: impl Fn() -> Result<u16>) -> Result<u16> {
    let span = SERVER_PORTS.end - SERVER_PORTS.start;
    for _ in 0..200 {
        let port = SERVER_PORTS.start + pick(span);
        if bind(port) && claim(port) {
            return Ok(port);
        }
    }
    fallback()
}

/// A TCP port on 127.0.0.1 free now (bound, then released), outside the ephemeral range.
pub fn free_tcp_port() -> Result<u16> {
    free_port(
        |p| TcpListener::bind(("127.0.0.1", p)).is_ok(),
        || {
            Ok(TcpListener::bind("127.0.0.1:0")
                .context("binding an ephemeral TCP port on 127.0.0.1")?
                .local_addr()?
                .port())
        },
    )
}

/// A UDP port on 127.0.0.1 free now (bound, then released), outside the ephemeral range.
pub fn free_udp_port() -> Result<u16> {
    free_port(
        |p| UdpSocket::bind(("127.0.0.1", p)).is_ok(),
        || {
            Ok(UdpSocket::bind("127.0.0.1:0")
                .context("binding an ephemeral UDP port on 127.0.0.1")?
                .local_addr()?
                .port())
        },
    )
}

/// A free loopback TCP address.
pub fn free_tcp_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?)))
}

/// A free loopback UDP address.
pub fn free_udp_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)))
}

pub fn sockaddr(host: &str, port: u16) -> Result<SocketAddr> {
    format!("{host}:{port}")
        .parse()
        .map_err(|e| anyhow!("`{host}:{port}` is not an IP address and port: {e}"))
}

/// Whether something accepts TCP connections on `addr` now.
pub fn accepts_tcp(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Fails with a sentence naming the port, its use and the option that moves it.
pub fn check_tcp_free(host: &str, port: u16, what: &str, option: &str) -> Result<()> {
    if let Err(e) = TcpListener::bind(sockaddr(host, port)?) {
        bail!(
            "TCP port {port} on {host} ({what}) is not available: {e}. Stop the program that \
             holds it (`ss -ltnp 'sport = :{port}'` shows it, often an earlier `cargo xtask up`) \
             or choose another port with {option}."
        );
    }
    Ok(())
}

pub fn check_udp_free(host: &str, port: u16, what: &str, option: &str) -> Result<()> {
    if let Err(e) = UdpSocket::bind(sockaddr(host, port)?) {
        bail!(
            "UDP port {port} on {host} ({what}) is not available: {e}. Stop the program that \
             holds it (`ss -lunp 'sport = :{port}'` shows it) or choose another port with {option}."
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_in_use_is_a_sentence_with_the_option_to_change_it() {
        let holder = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = holder.local_addr().unwrap().port();
        let err = check_tcp_free("127.0.0.1", port, "Envoy listener", "--listen-port")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("TCP port {port}")), "{err}");
        assert!(err.contains("--listen-port"), "{err}");
    }

    /// Free ports come from below the ephemeral range, where no outgoing connection can take
    /// them between the check and the server's bind, and differ from one call to the next.
    #[test]
    fn free_ports_are_outside_the_ephemeral_range_and_spread() {
        let ports: std::collections::BTreeSet<u16> =
            (0..50).map(|_| free_tcp_port().unwrap()).collect();
        assert!(ports.len() > 40, "{ports:?}");
        assert!(ports.iter().all(|p| SERVER_PORTS.contains(p)), "{ports:?}");
        let udp = free_udp_port().unwrap();
        assert!(SERVER_PORTS.contains(&udp));
        // A port in use is never handed out.
        let holder = TcpListener::bind(("127.0.0.1", free_tcp_port().unwrap())).unwrap();
        let held = holder.local_addr().unwrap().port();
        assert!((0..200).all(|_| free_tcp_port().unwrap() != held));
    }
}
