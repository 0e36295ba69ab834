//! A socket whose send buffer is full: the relay keeps what it cannot send in the socket's
//! backlog, watches the socket for room and sends the backlog when room comes, and drops
//! (counted) only past the backlog.
//!
//! Loopback never fills a UDP send buffer (the kernel frees each datagram as it is sent), so
//! the test runs in a user + network namespace (`unshare -rn`) whose loopback has an HTB
//! qdisc: traffic to the provider's address (127.0.0.2) and to the client's (127.0.0.3) passes
//! through a token bucket each. Throttled to 8 bit/s, a bucket holds every datagram sent that
//! way, and the sending socket's buffer fills as it would behind a congested interface; opened
//! again, what the bucket held leaves, then what waited in the relay's backlog.

mod common;

use common::{events_flow, media_flows, metric, run_in_network_namespace, Harness, UPSTREAM_KEY};
use echo_model::{ClientConfig, ConnectedClient, ProviderConfig};
use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::process::Command;
use std::time::Duration;

/// The provider (HTTP and media) and the client live on their own loopback addresses, so a
/// filter on the destination address throttles one direction of one leg.
const PROVIDER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// The HTB classes holding each throttled direction's token bucket.
const TO_PROVIDER: &str = "1:20";
const TO_CLIENT: &str = "1:30";

/// Set in the namespace the outer test starts; the inner test refuses to run without it.
const INSIDE: &str = "RTGW_SEND_BACKLOG_INSIDE_NETNS";
const INNER: &str = "a_full_send_buffer_waits_in_the_backlog_and_drops_only_past_it";

const WAIT: Duration = Duration::from_secs(15);

/// Runs [`a_full_send_buffer_waits_in_the_backlog_and_drops_only_past_it`] in a new user and
/// network namespace. Skips (with a visible SKIP line) where unprivileged namespaces or the
/// qdiscs are unavailable, unless `RTGW_REQUIRE_NETNS=1` (CI).
#[test]
fn a_full_send_buffer_is_survived_in_a_network_namespace() {
    run_in_network_namespace(
        INNER,
        INSIDE,
        "`unshare -rn` with tc (htb, tbf, u32)",
        "ip link set lo up && tc qdisc add dev lo root handle 1: htb && \
         tc class add dev lo parent 1: classid 1:20 htb rate 10gbit && \
         tc qdisc add dev lo parent 1:20 handle 20: tbf rate 8bit burst 4kb limit 10mb && \
         tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip dst 127.0.0.2/32 \
         flowid 1:20",
        "ip link set lo up",
    );
}

/// Runs `tc` with `args`; fails the test with its error output if it fails.
fn tc(args: &str) {
    let out = Command::new("tc")
        .args(args.split_whitespace())
        .output()
        .expect("tc runs");
    assert!(
        out.status.success(),
        "tc {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loopback's qdisc: everything at line rate, except traffic to the provider's and to the
/// client's address, each through its own token bucket (open at first).
fn install_qdiscs() {
    tc("qdisc add dev lo root handle 1: htb default 10");
    for class in ["1:10", TO_PROVIDER, TO_CLIENT] {
        tc(&format!(
            "class add dev lo parent 1: classid {class} htb rate 10gbit"
        ));
    }
    for (class, ip) in [(TO_PROVIDER, PROVIDER_IP), (TO_CLIENT, CLIENT_IP)] {
        let handle = class.trim_start_matches("1:");
        tc(&format!(
            "qdisc add dev lo parent {class} handle {handle}: tbf rate 10gbit burst 64kb limit 10mb"
        ));
        tc(&format!(
            "filter add dev lo parent 1: protocol ip prio 1 u32 match ip dst {ip}/32 flowid {class}"
        ));
    }
}

/// Throttles the datagrams to `ip` (in HTB class `class`) to 8 bit/s: the bucket's first 4 KiB
/// leave, then it holds everything.
fn stall(class: &str) {
    let handle = class.trim_start_matches("1:");
    tc(&format!(
        "qdisc change dev lo parent {class} handle {handle}: tbf rate 8bit burst 4kb limit 10mb"
    ));
}

/// Opens the bucket again at 1 Mbit/s with a 4 KiB burst (about 550 of these datagrams a
/// second, 18 at once: what the bucket held must not arrive faster than the receiving peer
/// reads, or its socket buffer, some 180 datagrams, overflows). The bucket's timer was set
/// for the throttled rate, so one datagram through it (to the discard port) makes it look
/// again.
fn release(class: &str, ip: Ipv4Addr) {
    let handle = class.trim_start_matches("1:");
    tc(&format!(
        "qdisc change dev lo parent {class} handle {handle}: tbf rate 1mbit burst 4kb limit 10mb"
    ));
    let kick = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    kick.send_to(b"kick", (ip, 9)).unwrap();
}

/// `send_waits` and `send_drops` of one socket, and the shard wake-ups that found nothing.
#[derive(Debug, Clone, Copy)]
struct Counts {
    waits: f64,
    drops: f64,
    idle: f64,
}

async fn counts(h: &Harness, socket: &str) -> Counts {
    let text = h.metrics_text().await;
    let series = |name: &str| format!("{name}{{reason=\"{socket}\"}}");
    Counts {
        waits: metric(&text, &series("realtime_relay_send_waits_total")),
        drops: metric(&text, &series("realtime_relay_send_drops_total")),
        idle: metric(
            &text,
            "realtime_relay_media_shard_wakeups_total{result=\"idle\"}",
        ),
    }
}

/// The namespace's UDP counters (`RcvbufErrors`: a receiving peer read too slowly).
fn udp_counters() -> String {
    std::fs::read_to_string("/proc/net/snmp")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `f` every 20 ms until it is true; fails with `what` after [`WAIT`].
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `frames` audio frames, one a millisecond (50 times a call's rate: a burst).
async fn burst(client: &ConnectedClient, frames: usize) {
    client
        .send_audio(frames, Duration::from_millis(1))
        .await
        .expect("the client sends");
    assert_eq!(client.audio_stats().packets_not_sent, 0);
}

/// Waits until the provider's count of received RTP has not moved for half a second.
async fn provider_settles(h: &Harness) -> u64 {
    let mut last = h.provider.stats().rtp_packets_received;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = h.provider.stats().rtp_packets_received;
        if now == last {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the provider still receives"
        );
        last = now;
    }
}

/// The relay's sockets behind a stalled path, one leg at a time: a burst the send buffer and
/// the backlog can hold arrives whole once the path opens; one beyond them loses only what
/// the backlog dropped, counted; the shard does not spin while it waits for room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs inside a network namespace, started by a_full_send_buffer_is_survived_in_a_network_namespace"]
async fn a_full_send_buffer_waits_in_the_backlog_and_drops_only_past_it() {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "run by the outer test"
    );
    install_qdiscs();
    let provider = ProviderConfig {
        http_addr: (PROVIDER_IP, 0).into(),
        media_ip: IpAddr::V4(PROVIDER_IP),
        ..ProviderConfig::local(Some(UPSTREAM_KEY))
    };
    // The port asks for 208 KiB of buffer (the kernel doubles it), whatever this host's
    // `net.core.wmem_max` would grant the default 4 MiB.
    let mut h = Harness::start_with(provider, &["--media-socket-buffer-bytes=212992"]).await;
    let config = ClientConfig {
        bind_ip: IpAddr::V4(CLIENT_IP),
        ..ClientConfig::default()
    };
    let (_call_id, mut client) = h.call(config, "gpt-realtime", "").await;
    media_flows(&mut client).await;
    // Everything of the warm-up has come back.
    let sent = client.audio_stats().packets_sent;
    until("the warm-up's audio comes back", || {
        client.audio_stats().packets_received == sent
    })
    .await;

    // 1. The upstream socket: 360 frames while the path to the provider holds everything.
    // Its send buffer (the namespace's default, 208 KiB, about 180 SRTP datagrams as the
    // kernel counts them) and the bucket's first 4 KiB take some 180; the rest wait in the
    // call's backlog (256).
    let before = counts(&h, "upstream_socket_full").await;
    let received = provider_settles(&h).await;
    stall(TO_PROVIDER);
    burst(&client, 360).await;
    let stalled = counts(&h, "upstream_socket_full").await;
    assert!(
        stalled.waits > before.waits,
        "the upstream socket's buffer filled and datagrams waited: {stalled:?}"
    );
    assert_eq!(stalled.drops, before.drops, "the backlog held the rest");
    assert!(
        h.provider.stats().rtp_packets_received < received + 100,
        "the path was stalled"
    );
    assert!(
        stalled.idle - before.idle < 50.0,
        "the shard does not spin while it waits for room: {before:?} → {stalled:?}"
    );
    release(TO_PROVIDER, PROVIDER_IP);
    let arrived = provider_settles(&h).await - received;
    assert_eq!(
        arrived,
        360,
        "every frame reaches the provider: {:?}; the namespace's UDP counters:\n{}",
        counts(&h, "upstream_socket_full").await,
        udp_counters()
    );
    let sent = client.audio_stats().packets_sent;
    until("every frame comes back", || {
        client.audio_stats().packets_received == sent
    })
    .await;
    assert_eq!(
        counts(&h, "upstream_socket_full").await.drops,
        before.drops,
        "nothing dropped"
    );

    // 2. The same path with a burst beyond buffer and backlog: only what the backlog could
    // not take is lost, and every loss is counted.
    let before = counts(&h, "upstream_socket_full").await;
    let received = provider_settles(&h).await;
    stall(TO_PROVIDER);
    burst(&client, 1_500).await;
    release(TO_PROVIDER, PROVIDER_IP);
    let arrived = provider_settles(&h).await - received;
    let after = counts(&h, "upstream_socket_full").await;
    let dropped = (after.drops - before.drops) as u64;
    assert!(dropped > 0, "a burst beyond the backlog drops: {after:?}");
    assert!(
        arrived < 1_500 && arrived + dropped >= 1_500,
        "every frame either arrived or was counted as dropped (arrived {arrived}, dropped \
         {dropped}; drops may also be RTCP or STUN)"
    );

    // 3. The shared port: 800 frames echoed back while the path to the client holds
    // everything. The port's send buffer (416 KiB) takes some 380 of them; the rest wait in
    // the shard's backlog (4,096).
    let sent = client.audio_stats().packets_sent;
    until("the last burst's audio is back", || {
        client.audio_stats().packets_received >= sent - dropped
    })
    .await;
    let before = counts(&h, "client_port_full").await;
    let echoed = client.audio_stats().packets_received;
    let provider_echoed = h.provider.stats().rtp_packets_echoed;
    stall(TO_CLIENT);
    burst(&client, 800).await;
    until("the provider echoed the burst", || {
        h.provider.stats().rtp_packets_echoed == provider_echoed + 800
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalled = counts(&h, "client_port_full").await;
    assert!(
        stalled.waits > before.waits,
        "the port's buffer filled and datagrams waited: {stalled:?}; the client received {} \
         of {echoed} + 800; {}",
        client.audio_stats().packets_received,
        udp_counters()
    );
    assert!(
        client.audio_stats().packets_received < echoed + 100,
        "the path was stalled"
    );
    release(TO_CLIENT, CLIENT_IP);
    until("every echoed frame reaches the client", || {
        client.audio_stats().packets_received == echoed + 800
    })
    .await;
    assert_eq!(
        counts(&h, "client_port_full").await.drops,
        before.drops,
        "nothing dropped"
    );
    // The call survived both stalls.
    events_flow(&mut client, "after").await;
}
