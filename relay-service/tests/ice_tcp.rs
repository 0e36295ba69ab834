//! Clients behind firewalls that block UDP: the relay's passive ICE-TCP candidate
//! (`--media-tcp-addr`). A str0m client that offers only an active TCP candidate and has no UDP
//! socket at all completes calls through the relay to the echo provider, also when the relay
//! binds the unspecified address or sits behind a port-translating forward (`--public-ip`,
//! `--public-tcp-port`); and connections that never name a call are refused, counted, by the
//! bounds the flags set.

mod common;

use common::{media_flows, metric, Harness};
use echo_model::{ClientConfig, ClientTransport, ConnectedClient, TestClient};
use realtime_relay_proto::v1;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(10);

fn tcp_only() -> ClientConfig {
    ClientConfig {
        transport: ClientTransport::Tcp,
        ..ClientConfig::default()
    }
}

async fn wait_for_metric(h: &Harness, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let text = h.metrics_text().await;
        let got = metric(&text, series);
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call from a TCP-only client: the offer and the answer, then the connected client.
async fn tcp_call(h: &mut Harness) -> (String, ConnectedClient, String) {
    let (client, offer) = TestClient::new(tcp_only()).expect("client");
    let candidates: Vec<&str> = offer
        .lines()
        .filter(|l| l.starts_with("a=candidate"))
        .collect();
    assert!(
        !candidates.is_empty()
            && candidates
                .iter()
                .all(|c| c.contains(" tcp ") && c.contains("tcptype active")),
        "the client offers only an active TCP candidate: {candidates:?}"
    );
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .expect("CreateCall")
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("expected an SDP answer, got {:?}", resp.outcome);
    };
    let connected = client
        .connect(&answer)
        .await
        .expect("the client connects over ICE-TCP");
    (resp.call_id, connected, answer)
}

/// The `ip port` of the answer's passive TCP candidate.
fn passive_candidate(answer: &str) -> SocketAddr {
    let line = answer
        .lines()
        .find(|l| l.starts_with("a=candidate") && l.contains("tcptype passive"))
        .unwrap_or_else(|| panic!("no passive TCP candidate in the answer:\n{answer}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    SocketAddr::new(fields[4].parse().unwrap(), fields[5].parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_udp_completes_a_call_over_ice_tcp_and_hangup_closes_its_connection() {
    let mut h = Harness::start(&["--media-tcp-addr=127.0.0.1:0"]).await;
    let tcp_addr = h.relay.media_tcp_addr.expect("ICE-TCP listening");
    let (call_id, mut client, answer) = tcp_call(&mut h).await;
    assert_eq!(passive_candidate(&answer), tcp_addr);
    assert!(
        answer.contains(&format!("{} typ host", h.relay.media_addr.port())),
        "the UDP candidate stays beside it: {answer}"
    );
    media_flows(&mut client).await;
    assert_eq!(client.tcp_connections(), Some(1));
    let text = h.metrics_text().await;
    assert_eq!(
        metric(&text, "realtime_relay_media_tcp_connections_accepted_total"),
        1.0
    );
    assert_eq!(
        metric(&text, "realtime_relay_media_tcp_connections_active"),
        1.0
    );
    assert!(
        metric(
            &text,
            r#"realtime_relay_rtp_packets_total{direction="client_to_upstream"}"#
        ) >= 10.0
    );

    let info = h
        .grpc
        .hangup_call(v1::HangupCallRequest {
            call_id: call_id.clone(),
            ..Default::default()
        })
        .await
        .expect("hangup")
        .into_inner()
        .call
        .expect("the call");
    assert_eq!(info.end_reason, "hangup");
    assert!(client.wait_closed(T).await, "the client saw the call end");
    wait_for_metric(&h, "realtime_relay_media_tcp_connections_active", 0.0).await;
    let deadline = tokio::time::Instant::now() + T;
    while client.tcp_connections() != Some(0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client's TCP connection is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = h.metrics_text().await;
    let closed = metric(
        &text,
        r#"realtime_relay_media_tcp_connections_closed_total{reason="call_ended"}"#,
    );
    assert_eq!(closed, 1.0, "the relay closed it because the call ended");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_bound_on_the_unspecified_address_takes_tcp_calls_at_its_public_ip() {
    let mut h = Harness::start(&[
        "--media-addr=0.0.0.0:0",
        "--media-tcp-addr=0.0.0.0:0",
        "--public-ip=127.0.0.1",
    ])
    .await;
    assert!(h.relay.media_tcp_addr.unwrap().ip().is_unspecified());
    let (_id, mut client, answer) = tcp_call(&mut h).await;
    assert_eq!(passive_candidate(&answer).ip().to_string(), "127.0.0.1");
    media_flows(&mut client).await;
    client.close().await;
}

/// A port forward in front of the relay's TCP port, as a NodePort is: clients connect to
/// `public`, each connection is spliced to the relay's bound port.
async fn port_forward(public: TcpListener, target: SocketAddr) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut outside, _)) = public.accept().await {
            tokio::spawn(async move {
                let mut inside = TcpStream::connect(target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut outside, &mut inside).await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_behind_a_tcp_port_forward_advertises_its_public_tcp_port() {
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_port = public.local_addr().unwrap().port();
    let mut h = Harness::start(&[
        "--media-tcp-addr=127.0.0.1:0",
        &format!("--public-tcp-port={public_port}"),
    ])
    .await;
    let bound = h.relay.media_tcp_addr.unwrap();
    assert_ne!(bound.port(), public_port);
    let forward = port_forward(public, bound).await;
    let (_id, mut client, answer) = tcp_call(&mut h).await;
    assert_eq!(passive_candidate(&answer).port(), public_port);
    media_flows(&mut client).await;
    client.close().await;
    forward.abort();
}

/// A STUN binding request naming `ufrag`, framed (RFC 4571).
fn framed_binding_request(ufrag: &str) -> Vec<u8> {
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
    m.extend_from_slice(&[7; 12]);
    m.extend_from_slice(&attrs);
    rtc_peer::framing::encode_frame(&m).unwrap()
}

/// Waits until the relay closes `stream` (read returns 0 or an error).
async fn closed_by_relay(stream: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(T, stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the relay did not close the connection: {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_name_no_call_are_refused_and_counted_by_reason() {
    let h = Harness::start(&[
        "--media-tcp-addr=127.0.0.1:0",
        "--media-tcp-handshake-timeout-ms=300",
        "--media-tcp-max-connections-per-ip=3",
        "--media-tcp-max-frame-bytes=1500",
    ])
    .await;
    let addr = h.relay.media_tcp_addr.unwrap();
    let refused = |reason: &str| {
        format!(r#"realtime_relay_media_tcp_connections_refused_total{{reason="{reason}"}}"#)
    };

    // DTLS before any STUN: not a call's first frame.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&rtc_peer::framing::encode_frame(&[0x16, 0xfe, 0xfd, 0, 0]).unwrap())
        .await
        .unwrap();
    closed_by_relay(&mut s).await;
    wait_for_metric(&h, &refused("not_stun"), 1.0).await;

    // A well-formed request for a ufrag no call has.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&framed_binding_request("nobodys"))
        .await
        .unwrap();
    closed_by_relay(&mut s).await;
    wait_for_metric(&h, &refused("unknown_ufrag"), 1.0).await;

    // A length prefix beyond the frame limit.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    closed_by_relay(&mut s).await;
    wait_for_metric(&h, &refused("frame_too_large"), 1.0).await;

    // Silence: closed at the handshake deadline.
    let started = tokio::time::Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    closed_by_relay(&mut s).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    wait_for_metric(&h, &refused("handshake_timeout"), 1.0).await;

    // Three silent connections from one IP are all it may hold; a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(200), fourth.read(&mut [0u8; 8])).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the fourth was not closed at once: {read:?}"
    );
    wait_for_metric(&h, &refused("per_ip_limit"), 1.0).await;
    assert_eq!(
        metric(
            &h.metrics_text().await,
            "realtime_relay_media_tcp_connections_accepted_total"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_media_tcp_addr_the_answer_has_no_tcp_candidate() {
    let mut h = Harness::start(&[]).await;
    assert!(h.relay.media_tcp_addr.is_none());
    let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("expected an SDP answer");
    };
    assert!(!answer.contains("tcptype"), "{answer}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_udp_keeps_using_udp_when_the_relay_also_offers_tcp() {
    let mut h = Harness::start(&["--media-tcp-addr=127.0.0.1:0"]).await;
    let (_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    media_flows(&mut client).await;
    assert_eq!(client.tcp_connections(), None);
    let text = h.metrics_text().await;
    assert_eq!(
        metric(&text, "realtime_relay_media_tcp_connections_accepted_total"),
        0.0,
        "no TCP connection for a UDP client"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_client_without_udp_completes_a_call_over_ice_tcp() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return;
    }
    let mut h = Harness::start(&["--media-addr=[::1]:0", "--media-tcp-addr=[::1]:0"]).await;
    let (client, offer) = TestClient::new(ClientConfig {
        transport: ClientTransport::Tcp,
        bind_ip: std::net::Ipv6Addr::LOCALHOST.into(),
        ..ClientConfig::default()
    })
    .unwrap();
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("expected an SDP answer, got {:?}", resp.outcome);
    };
    assert_eq!(passive_candidate(&answer), h.relay.media_tcp_addr.unwrap());
    let mut client = client
        .connect(&answer)
        .await
        .expect("connects over IPv6 TCP");
    media_flows(&mut client).await;
    assert_eq!(client.tcp_connections(), Some(1));
    client.close().await;
}

/// The hangup lands while the TCP-only client is still sending (audio every 2 ms here; RTCP
/// reports and consent checks in any call): the relay's goodbye must still reach it, and the
/// connection must close because the call ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_client_still_sending_when_the_call_is_hung_up_sees_the_call_end() {
    let mut h = Harness::start(&["--media-tcp-addr=127.0.0.1:0"]).await;
    let (call_id, mut client, _answer) = tcp_call(&mut h).await;
    media_flows(&mut client).await;
    let hangup = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        h.grpc
            .hangup_call(v1::HangupCallRequest {
                call_id: call_id.clone(),
                ..Default::default()
            })
            .await
            .expect("hangup")
    };
    // Sending fails once the client saw the end: that is the point, not an error.
    let (_, sent) = tokio::join!(hangup, client.send_audio(500, Duration::from_millis(2)));
    let _ = sent;
    assert!(client.wait_closed(T).await, "the client saw the call end");
    wait_for_metric(&h, "realtime_relay_media_tcp_connections_active", 0.0).await;
    let text = h.metrics_text().await;
    assert_eq!(
        metric(
            &text,
            r#"realtime_relay_media_tcp_connections_closed_total{reason="call_ended"}"#
        ),
        1.0
    );
    client.close().await;
}
