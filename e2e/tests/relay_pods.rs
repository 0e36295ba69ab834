//! Relay pods in real Envoy: replicas that scale with no gateway configuration per replica.
//!
//! `envoy/envoy-relay-pods.yaml` in front of three relays on three addresses (127.0.0.2-4:
//! pods): one `relay` cluster listing them all with gRPC health checks (the Kubernetes
//! Service: Envoy learns its endpoints), and one `ORIGINAL_DST` cluster `relay_pods` with
//! `use_http_header`. Each relay names itself in
//! its call ids (`--replica-addr`, HMAC under RELAY_REPLICA_KEY); the filter sends a hangup
//! to the pod its id names with `x-envoy-original-dst-host` as gRPC initial metadata.
//!
//! The measurement this rests on (docs/architecture.md): Envoy's async gRPC client sends a
//! Wasm `dispatch_grpc_call`'s initial metadata as request headers, and the `ORIGINAL_DST`
//! load balancer with `use_http_header` reads them, so each hangup reaches the pod named
//! in its id, pods that appear later included, and nothing else.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use common::*;
use e2e::{http, start_relay_with, Envoy, EnvoyOptions, Paths, Relay, RunDir, Vars};
use realtime_relay_proto::call_id;
use realtime_relay_proto::replica_token::ReplicaKey;
use serde_json::json;

/// The relays' and the gateway's shared secret in this test.
const REPLICA_KEY: &str = "e2e-relay-pods-shared-secret-5f0c2b9d41a7";

/// A free TCP port on `ip`.
fn free_port_on(ip: Ipv4Addr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on a loopback address")
}

struct Pod {
    relay: Relay,
    addr: SocketAddr,
}

fn start_pod(
    paths: &Paths,
    dir: &RunDir,
    name: &str,
    addr: SocketAddr,
    peers: &str,
    upstream: &str,
) -> Pod {
    let relay = start_relay_with(paths, dir, name, &[upstream.to_string()], |spec| {
        spec.grpc = addr;
        spec.args.extend([
            "--replica-addr".to_string(),
            addr.to_string(),
            "--peers".to_string(),
            peers.to_string(),
            "--peers-refresh-secs=1".to_string(),
        ]);
        spec.env
            .push(("RELAY_REPLICA_KEY".into(), REPLICA_KEY.into()));
    })
    .expect("relay pod starts");
    Pod { relay, addr }
}

/// The pod a call id names (the token verified as the filter does).
fn owner(id: &str) -> SocketAddr {
    let key = ReplicaKey::new(REPLICA_KEY.as_bytes()).unwrap();
    let token = call_id::replica_segment(id).unwrap_or_else(|| panic!("{id} names no pod"));
    key.open(token)
        .unwrap_or_else(|| panic!("{id}: token does not verify"))
}

/// Envoy's counter `name` from admin `/stats` (0 when Envoy has not made it yet).
fn admin_counter(envoy: &Envoy, name: &str) -> u64 {
    let text = http::get(envoy.admin(), "/stats")
        .map(|r| r.text())
        .unwrap_or_default();
    let prefix = format!("{name}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the `relay` cluster's endpoint `addr` is healthy.
fn wait_endpoint_healthy(envoy: &Envoy, addr: SocketAddr) {
    let deadline = Instant::now() + T;
    let line = format!("relay::{addr}::health_flags::healthy");
    loop {
        let text = http::get(envoy.admin(), "/clusters")
            .map(|r| r.text())
            .unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never healthy in cluster relay"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn created_total(p: &Pod) -> f64 {
    p.relay
        .metric("realtime_relay_calls_created_total")
        .unwrap()
}

/// `n` creates; returns their ids.
fn create_calls(envoy: &Envoy, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let (_c, offer) = new_client();
            created(&post_sdp(envoy, CALLS, &offer, &[]))
        })
        .collect()
}

#[test]
fn pods_that_appear_get_calls_and_every_hangup_reaches_the_pod_named_in_its_id() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let paths = Paths::discover();
    let dir = RunDir::new("relay-pods").unwrap();
    let ips = [
        Ipv4Addr::new(127, 0, 0, 2),
        Ipv4Addr::new(127, 0, 0, 3),
        Ipv4Addr::new(127, 0, 0, 4),
    ];
    let addrs: Vec<SocketAddr> = ips
        .iter()
        .map(|ip| SocketAddr::new(IpAddr::V4(*ip), free_port_on(*ip)))
        .collect();
    // What a headless Service resolves to: every pod, the one not started yet included.
    let peers = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let a = start_pod(&paths, &dir, "pod-a", addrs[0], &peers, &p.base_url());
    let b = start_pod(&paths, &dir, "pod-b", addrs[1], &peers, &p.base_url());

    let endpoint = |addr: SocketAddr| {
        format!(
            "              - endpoint:\n                  address:\n                    socket_address: {{ address: \"{}\", port_value: {} }}",
            addr.ip(),
            addr.port()
        )
    };
    let rendered_endpoint = format!(
        "              - endpoint:\n                  address:\n                    socket_address: {{ address: \"{}\", port_value: {} }}",
        addrs[0].ip(),
        addrs[0].port()
    );
    let all_endpoints = addrs
        .iter()
        .map(|a| endpoint(*a))
        .collect::<Vec<_>>()
        .join("\n");
    let mut vars = Vars::default();
    vars.set("RELAY_GRPC_HOST", addrs[0].ip().to_string());
    let config = plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": "inject_if_missing", "workers": [
            { "id": "worker-1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }
        ]}]),
        json!({
            "relay_pods": { "cluster": "relay_pods", "key_env": "RELAY_REPLICA_KEY" },
            "load_refresh_ms": 500,
        }),
    );
    // The shipped example, with three addresses where a headless Service name would resolve
    // to three pods.
    let opts = EnvoyOptions {
        relay_port: Some(addrs[0].port()),
        provider_port: Some(p.local_addr().port()),
        plugin_config: Some(config),
        env: vec![
            ("OPENAI_API_KEY".into(), KEY.into()),
            ("RELAY_REPLICA_KEY".into(), REPLICA_KEY.into()),
        ],
        vars,
        template: Some(paths.root.join("envoy/envoy-relay-pods.yaml")),
        patches: vec![(rendered_endpoint, all_endpoints)],
    };
    let envoy = opts.start(&paths, &dir).expect("envoy");
    wait_endpoint_healthy(&envoy, a.addr);
    wait_endpoint_healthy(&envoy, b.addr);

    // Calls spread over the two pods; each id names (and authenticates) the pod that holds it.
    let mut ids = Vec::new();
    let mut clients = Vec::new();
    for i in 0..6 {
        let (c, offer) = new_client();
        let r = post_sdp(&envoy, CALLS, &offer, &[]);
        ids.push(created(&r));
        if i < 2 {
            clients.push(exercise(&rt, c, &r.text()));
        }
    }
    let on = |addr: SocketAddr, ids: &[String]| ids.iter().filter(|i| owner(i) == addr).count();
    let (on_a, on_b) = (on(a.addr, &ids), on(b.addr, &ids));
    assert_eq!(on_a + on_b, 6, "{ids:?}");
    assert!(on_a > 0 && on_b > 0, "calls did not spread: {on_a}/{on_b}");
    assert_eq!(created_total(&a), on_a as f64);
    assert_eq!(created_total(&b), on_b as f64);

    let pods_rq = |e: &Envoy| admin_counter(e, "cluster.relay_pods.upstream_rq_total");
    let before = pods_rq(&envoy);
    for id in &ids {
        let r = hangup(&envoy, id);
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }
    for pod in [&a, &b] {
        pod.relay
            .wait_metric("realtime_relay_calls_active", 0.0, T)
            .unwrap();
        let hung_up = pod
            .relay
            .metric(r#"realtime_relay_calls_ended_total{reason="hangup"}"#)
            .unwrap();
        assert_eq!(
            hung_up,
            on(pod.addr, &ids) as f64,
            "hangups at {}",
            pod.addr
        );
    }
    let through_pods = pods_rq(&envoy) - before;
    eprintln!(
        "FACT ORIGINAL_DST + use_http_header: {} hangups, each answered 200 by the pod named in its id ({on_a} on {}, {on_b} on {}); relay_pods cluster requests during them: {through_pods} (the load refresh's ListCalls share the cluster)",
        ids.len(),
        a.addr,
        b.addr
    );
    assert!(through_pods >= ids.len() as u64);
    drop(clients);

    // Forged ids: another pod's address under a guessed tag, a foreign key's token, a token
    // naming Envoy's own admin port. None is dispatched: 404 and no request on relay_pods.
    let plain = call_id::new(&[0x42; 16], None);
    let foreign = ReplicaKey::new(&[b'f'; 32]).unwrap();
    let admin_token = foreign.mint(envoy.admin());
    let valid_token = call_id::replica_segment(&ids[0]).unwrap().to_string();
    let mut tampered = valid_token.clone().into_bytes();
    tampered[1] = if tampered[1] == b'A' { b'B' } else { b'A' };
    let forged = [
        call_id::with_replica(&plain, &admin_token).unwrap(),
        call_id::with_replica(&plain, &foreign.mint(addrs[2])).unwrap(),
        call_id::with_replica(&plain, &String::from_utf8(tampered).unwrap()).unwrap(),
        plain.clone(),
    ];
    let before = admin_counter(&envoy, "cluster.relay_pods.upstream_cx_total");
    for id in &forged {
        let r = hangup(&envoy, id);
        assert_eq!(r.status, 404, "{id}: {}", r.text());
        assert_eq!(r.json().unwrap()["error"]["code"], "call_not_found");
    }
    // No new connection anywhere: the refresh reuses its pods' connections.
    assert_eq!(
        admin_counter(&envoy, "cluster.relay_pods.upstream_cx_total"),
        before
    );

    // A pod that appears later (kubectl scale): Envoy's health check admits it, it gets
    // creates, its calls' hangups reach it; nothing in the gateway's configuration changed.
    let c = start_pod(&paths, &dir, "pod-c", addrs[2], &peers, &p.base_url());
    wait_endpoint_healthy(&envoy, c.addr);
    // Envoy hands health changes to its workers' load balancers after the cluster's
    // update_merge_window (1 s by default): calls reach the new pod from then on.
    let deadline = Instant::now() + T;
    let mut before_first = 0;
    loop {
        let id = create_calls(&envoy, 1).remove(0);
        let reached_c = owner(&id) == c.addr;
        assert_eq!(hangup(&envoy, &id).status, 200, "{id}");
        if reached_c {
            break;
        }
        before_first += 1;
        assert!(Instant::now() < deadline, "the new pod never got a call");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("FACT a pod that turned healthy got its first call after {before_first} calls to the others");
    let later = create_calls(&envoy, 9);
    let on_c = on(c.addr, &later);
    let clusters = http::get(envoy.admin(), "/clusters")
        .map(|r| r.text())
        .unwrap_or_default();
    let relay_lines: Vec<&str> = clusters
        .lines()
        .filter(|l| l.starts_with("relay::"))
        .collect();
    assert!(
        on_c > 0,
        "the new pod got no calls: {later:?} {relay_lines:#?}"
    );
    assert_eq!(created_total(&c), on_c as f64 + 1.0);
    for id in &later {
        assert_eq!(hangup(&envoy, id).status, 200, "{id}");
    }
    c.relay
        .wait_metric("realtime_relay_calls_active", 0.0, T)
        .unwrap();

    // The load refresh covers every pod: each keeps being asked.
    for pod in [&a, &b, &c] {
        let now = pod.relay.metric("realtime_relay_list_calls_total").unwrap();
        let later = pod
            .relay
            .wait_metric("realtime_relay_list_calls_total", now + 2.0, T)
            .unwrap();
        assert!(
            later >= now + 2.0,
            "{} not asked by the load refresh",
            pod.addr
        );
    }
    assert!(envoy_stat(&envoy, "realtime_filter_load_refresh") >= 1.0);

    for (name, text) in [
        ("envoy", envoy.log_text()),
        ("pod a", a.relay.log_text()),
        ("pod b", b.relay.log_text()),
        ("pod c", c.relay.log_text()),
    ] {
        assert!(!text.contains(KEY), "provider key in the {name} log");
        assert!(!text.contains(REPLICA_KEY), "replica key in the {name} log");
    }
}
