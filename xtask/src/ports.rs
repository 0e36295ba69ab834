//! Loopback ports: free ones for runs beside each other, checks that fixed ones are free (with
//! the option that moves them), and whether something listens yet.

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// A TCP port on 127.0.0.1 the kernel just handed out (bound, then released).
pub fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("binding an ephemeral TCP port on 127.0.0.1")?
        .local_addr()?
        .port())
}

/// A UDP port on 127.0.0.1 the kernel just handed out (bound, then released).
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")
        .context("binding an ephemeral UDP port on 127.0.0.1")?
        .local_addr()?
        .port())
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
}
