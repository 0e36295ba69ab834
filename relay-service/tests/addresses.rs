//! Calls whose client leg is reached at an address the relay did not bind: bound on the
//! unspecified address and advertising one of the host's addresses (a Kubernetes pod on
//! `0.0.0.0` with `--public-ip=$(NODE_IP)`), on IPv6, and behind a NAT that changes the port
//! (`--public-port`, a NodePort). ICE only answers checks addressed to a candidate it
//! advertised, so each of these used to end as `ice_timeout` with the answer already sent.
//!
//! On a host with several addresses, a relay bound on the unspecified address must also reply
//! from the address the client sent to: the test client drops datagrams from any other
//! address, as libwebrtc does ([`ClientConfig::strict_source`], on by default), and the tests
//! below check that it dropped none.

mod common;

use common::{media_flows, Harness};
use echo_model::ClientConfig;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tokio::net::UdpSocket;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_bound_on_the_unspecified_address_connects_calls_at_its_public_ip() {
    let mut h = Harness::start(&["--media-addr=0.0.0.0:0", "--public-ip=127.0.0.1"]).await;
    assert!(h.relay.media_addr.ip().is_unspecified());
    let (_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    media_flows(&mut client).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_bound_on_the_ipv6_unspecified_address_connects_ipv6_clients() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return;
    }
    let mut h = Harness::start(&["--media-addr=[::]:0", "--public-ip=::1"]).await;
    let client_config = ClientConfig {
        bind_ip: IpAddr::V6(Ipv6Addr::LOCALHOST),
        ..ClientConfig::default()
    };
    let (_id, mut client) = h.call(client_config, "m", "").await;
    media_flows(&mut client).await;
    client.close().await;
}

/// A call on a relay bound on `bind` (unspecified) advertising `advertised`, from a strict
/// client on `client_ip`: the advertised address is one of the host's addresses, but not the
/// one the kernel would pick as source towards the client. Before replies left from their
/// request's arrival address, the client dropped every reply and the call never connected.
async fn replies_come_from_the_advertised_address(
    bind: &str,
    advertised: IpAddr,
    client_ip: IpAddr,
) {
    let mut h = Harness::start(&[
        &format!("--media-addr={bind}"),
        &format!("--public-ip={advertised}"),
    ])
    .await;
    assert!(h.relay.media_addr.ip().is_unspecified());
    let config = ClientConfig {
        bind_ip: client_ip,
        strict_source: true,
        ..ClientConfig::default()
    };
    let (_id, mut client) = h.call(config, "m", "").await;
    media_flows(&mut client).await;
    assert_eq!(
        client.foreign_source_drops(),
        0,
        "some replies left from another address than {advertised}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_the_unspecified_address_replies_from_the_address_the_client_sent_to() {
    // 127.0.0.3 is local (127/8 is the loopback net), but towards a client on 127.0.0.1 the
    // kernel picks 127.0.0.1 as source: the shape of a VM with a secondary IP.
    replies_come_from_the_advertised_address(
        "0.0.0.0:0",
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_relay_replies_to_ipv4_clients_from_the_address_they_sent_to() {
    if std::net::UdpSocket::bind("[::]:0").is_err() {
        eprintln!("SKIPPED: this host cannot bind [::]");
        return;
    }
    replies_come_from_the_advertised_address(
        "[::]:0",
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
    )
    .await;
}

/// A global IPv6 address of this host (from `/proc/net/if_inet6`), if it has one: towards
/// `::1` the kernel picks `::1` as source, so advertising this one needs the fix as
/// 127.0.0.3 does on IPv4 (IPv6 has no loopback net with several addresses).
fn a_second_ipv6_address() -> Option<Ipv6Addr> {
    let table = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    table.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // address, ifindex, prefix length, scope (00 = global), flags, interface name
        let (hex, scope) = (fields.first()?, fields.get(3)?);
        let bits = u128::from_str_radix(hex, 16).ok()?;
        let ip = Ipv6Addr::from(bits);
        (*scope == "00" && !ip.is_loopback() && std::net::UdpSocket::bind((ip, 0)).is_ok())
            .then_some(ip)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_relay_on_the_unspecified_address_replies_from_the_address_the_client_sent_to() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return;
    }
    let Some(second) = a_second_ipv6_address() else {
        eprintln!(
            "SKIPPED: this host has no global IPv6 address besides ::1, so there is no second \
             address to advertise (IPv6 has no loopback net); the IPv4 and dual-stack tests \
             cover the mechanism"
        );
        return;
    };
    replies_come_from_the_advertised_address(
        "[::]:0",
        IpAddr::V6(second),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    )
    .await;
}

/// A port-translating NAT in front of the relay's media port, as a NodePort or a firewall's
/// port forward is: clients send to `public`; each client gets its own inside socket towards
/// the relay, and what the relay sends to that socket goes back to the client from `public`.
struct PortNat {
    public: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PortNat {
    async fn start(inside_target: SocketAddr, public: UdpSocket) -> PortNat {
        let public = Arc::new(public);
        let addr = public.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut inside: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
            let mut buf = vec![0u8; 2048];
            // Bounded: a test's call needs far fewer datagrams than this.
            for _ in 0..200_000 {
                let Ok((n, client)) = public.recv_from(&mut buf).await else {
                    return;
                };
                let socket = match inside.get(&client) {
                    Some(s) => s.clone(),
                    None => {
                        let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        let (back, out) = (s.clone(), public.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 2048];
                            while let Ok(n) = back.recv(&mut buf).await {
                                let _ = out.send_to(&buf[..n], client).await;
                            }
                        });
                        s.connect(inside_target).await.unwrap();
                        inside.insert(client, s.clone());
                        s
                    }
                };
                let _ = socket.send(&buf[..n]).await;
            }
        });
        PortNat { public: addr, task }
    }
}

impl Drop for PortNat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_behind_a_port_translating_nat_connects_calls_at_its_public_port() {
    // The public side exists first: its port is what the relay advertises.
    let public = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let public_port = public.local_addr().unwrap().port();
    let mut h = Harness::start(&[&format!("--public-port={public_port}")]).await;
    assert_ne!(h.relay.media_addr.port(), public_port);
    let nat = PortNat::start(h.relay.media_addr, public).await;
    let (_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    media_flows(&mut client).await;
    assert_eq!(nat.public.port(), public_port);
    client.close().await;
}
