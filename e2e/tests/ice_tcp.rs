//! A client whose network blocks UDP, through the real Envoy + Wasm filter + the real
//! `realtime-relay` binary started with `--media-tcp-addr`: the str0m test client offers only an
//! active ICE-TCP candidate and has no UDP socket; the answer Envoy returns carries the relay's
//! passive TCP candidate, and the call runs over one TCP connection (RFC 4571 frames) until the
//! hangup through Envoy closes it.

mod common;

use common::*;
use echo_model::{ClientConfig, ClientTransport, TestClient};
use std::time::Duration;

#[test]
fn a_client_without_udp_completes_a_call_through_envoy_over_ice_tcp() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let tcp = e2e::free_tcp_addr().expect("a free TCP port");
    let g = gateway_with_relay_args(
        "ice-tcp",
        &[p.base_url()],
        single_worker(&p.base_url(), "inject_if_missing"),
        Vec::new(),
        &[format!("--media-tcp-addr={tcp}")],
    );
    let (client, offer) = TestClient::new(ClientConfig {
        transport: ClientTransport::Tcp,
        ..ClientConfig::default()
    })
    .expect("test client");
    assert!(
        offer
            .lines()
            .filter(|l| l.starts_with("a=candidate"))
            .all(|l| l.contains(" tcp ") && l.contains("tcptype active")),
        "TCP only: {offer}"
    );

    let r = post_sdp(
        &g.envoy,
        "/v1/realtime/calls?model=gpt-realtime",
        &offer,
        &[],
    );
    let id = created(&r);
    let answer = r.text();
    let passive = format!("{} {} typ host tcptype passive", tcp.ip(), tcp.port());
    assert!(answer.contains(&passive), "{passive} in: {answer}");

    let connected = exercise(&rt, client, &answer);
    assert_eq!(connected.tcp_connections(), Some(1));
    let metric = |name: &str| g.relay.metric(name).expect(name);
    assert_eq!(
        metric("realtime_relay_media_tcp_connections_accepted_total"),
        1.0
    );
    assert_eq!(metric("realtime_relay_media_tcp_connections_active"), 1.0);

    assert_eq!(hangup(&g.envoy, &id).status, 200);
    rt.block_on(async {
        assert!(connected.wait_closed(T).await, "the client saw the hangup");
        let deadline = tokio::time::Instant::now() + T;
        while connected.tcp_connections() != Some(0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the TCP connection stayed open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let active = g
        .relay
        .wait_metric("realtime_relay_media_tcp_connections_active", 0.0, T)
        .expect("metric");
    assert_eq!(active, 0.0, "the relay closed the connection");
    assert_eq!(metric("realtime_relay_calls_active"), 0.0);
    rt.block_on(connected.close());
    assert_no_key_in_logs(&g, &[KEY]);
}
