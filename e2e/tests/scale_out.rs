//! Scale-out on Envoy: which relay replica a filter's gRPC call reaches, and the design built
//! on the answer (one cluster per replica, the replica named in the call id).

mod common;

use common::*;
use e2e::{start_relay, Envoy, EnvoyOptions, Paths, Relay, RunDir, Vars};

fn two_relays(paths: &Paths, dir: &RunDir, upstream: &str) -> (Relay, Relay) {
    let up = [upstream.to_string()];
    let a = start_relay(paths, dir, "relay-a", &up).expect("relay a");
    let b = start_relay(paths, dir, "relay-b", &up).expect("relay b");
    (a, b)
}

fn created_total(r: &Relay) -> f64 {
    r.metric("realtime_relay_calls_created_total").unwrap()
}

/// `n` creates then their hangups through `envoy`; returns (creates on a, on b, hangups
/// answered 200, hangups answered 404).
fn creates_and_hangups(envoy: &Envoy, a: &Relay, b: &Relay, n: usize) -> (f64, f64, usize, usize) {
    let (a0, b0) = (created_total(a), created_total(b));
    let mut ids = Vec::new();
    for _ in 0..n {
        let (_c, offer) = new_client();
        ids.push(created(&post_sdp(envoy, CALLS, &offer, &[])));
    }
    let (mut ok, mut not_found) = (0, 0);
    // In reverse: with a strict round robin, hangup k of n is then always an odd number of
    // picks after its create, so it cannot meet its replica by parity.
    for id in ids.iter().rev() {
        let r = hangup(envoy, id);
        match r.status {
            200 => ok += 1,
            404 => {
                assert_eq!(r.json().unwrap()["error"]["code"], "call_not_found");
                not_found += 1
            }
            s => panic!("hangup {id}: {s} {}", r.text()),
        }
    }
    (created_total(a) - a0, created_total(b) - b0, ok, not_found)
}

/// The experiment behind DESIGN.md §3: two relay processes as two endpoints of ONE cluster.
/// Measured in Envoy 1.40.0 (2 worker threads): with `ROUND_ROBIN` CreateCalls usually
/// alternate between the endpoints and hangups reach the other replica (404); with
/// `RING_HASH` the async client gives the load balancer no per-call hash key and no route
/// hash policy applies (a filter's gRPC call is not routed), so picks are not tied to the
/// call: usually every call lands on one endpoint, sometimes they split. Which outcome a run
/// gets varies (per-thread balancer state, the worker thread each request lands on), so the
/// test asserts the fact that holds in every run: a cluster that spreads calls sends some
/// hangups to the wrong replica. Neither spreads calls AND keeps a call on its replica:
/// hence one cluster per replica.
#[test]
fn one_relay_cluster_with_two_endpoints_cannot_keep_a_call_on_its_replica() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let paths = Paths::discover();
    let dir = RunDir::new("one-cluster").unwrap();
    let (a, b) = two_relays(&paths, &dir, &p.base_url());
    let endpoint =
        |port: u16| format!("socket_address: {{ address: \"127.0.0.1\", port_value: {port} }}");
    let two_endpoints = format!(
        "{}\n              - endpoint:\n                  address:\n                    {}",
        endpoint(a.grpc.port()),
        endpoint(b.grpc.port())
    );
    for lb in ["ROUND_ROBIN", "RING_HASH"] {
        let opts = EnvoyOptions {
            relay_port: Some(a.grpc.port()),
            plugin_config: Some(single_worker(&p.base_url(), "inject_if_missing")),
            env: vec![("OPENAI_API_KEY".into(), KEY.into())],
            patches: vec![
                (endpoint(a.grpc.port()), two_endpoints.clone()),
                (
                    "lb_policy: ROUND_ROBIN\n      typed_extension_protocol_options".into(),
                    format!("lb_policy: {lb}\n      typed_extension_protocol_options"),
                ),
            ],
            ..Default::default()
        };
        let envoy = opts.start(&paths, &dir).expect("envoy");
        wait_relay_healthy(&envoy, "relay");
        let (on_a, on_b, ok, not_found) = creates_and_hangups(&envoy, &a, &b, 10);
        eprintln!(
            "FACT one relay cluster, {lb}: CreateCall reached relay a {on_a} and relay b {on_b} times of 10; hangups: {ok} found their call, {not_found} reached the other replica (404)"
        );
        assert_eq!(on_a + on_b, 10.0);
        assert_eq!(ok + not_found, 10);
        let spread = on_a > 0.0 && on_b > 0.0;
        if spread {
            // The hangup is a new pick, not tied to the call: some miss their replica.
            assert!(
                not_found > 0,
                "{lb}: calls spread ({on_a}/{on_b}) and every hangup found its call"
            );
        } else {
            // One endpoint took every call: nothing can miss, and nothing scales out.
            assert_eq!(not_found, 0, "{lb}");
        }
    }
}

/// The design: one cluster per replica, the replica named in the call id.
#[test]
fn replicas_named_in_call_ids_share_calls_and_hangups_reach_their_replica() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let paths = Paths::discover();
    let dir = RunDir::new("two-relays").unwrap();
    let (a, b) = two_relays(&paths, &dir, &p.base_url());
    let mut vars = Vars::default();
    vars.set("RELAY2_GRPC_PORT", b.grpc.port().to_string());
    let opts = EnvoyOptions {
        relay_port: Some(a.grpc.port()),
        provider_port: Some(p.local_addr().port()),
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        vars,
        template: Some(paths.root.join("envoy/envoy-two-relays.yaml")),
        ..Default::default()
    };
    let envoy = opts.start(&paths, &dir).expect("envoy");
    wait_relay_healthy(&envoy, "relay_r0");
    wait_relay_healthy(&envoy, "relay_r1");

    // 6 calls, the first two with media: the replicas take turns.
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
    let on = |prefix: &str| ids.iter().filter(|i| i.starts_with(prefix)).count();
    assert_eq!((on("rtc_r0_"), on("rtc_r1_")), (3, 3), "{ids:?}");
    assert_eq!(created_total(&a), 3.0);
    assert_eq!(created_total(&b), 3.0);
    assert_eq!(a.metric("realtime_relay_calls_active").unwrap(), 3.0);
    assert_eq!(b.metric("realtime_relay_calls_active").unwrap(), 3.0);

    // Every hangup reaches the replica named in its id.
    for id in &ids {
        let r = hangup(&envoy, id);
        assert_eq!(r.status, 200, "{id}: {}", r.text());
    }
    assert_eq!(
        a.wait_metric("realtime_relay_calls_active", 0.0, T)
            .unwrap(),
        0.0
    );
    assert_eq!(
        b.wait_metric("realtime_relay_calls_active", 0.0, T)
            .unwrap(),
        0.0
    );
    // An id naming no configured replica cannot exist: 404 without a gRPC call.
    let r = hangup(&envoy, "rtc_r7_00000000000000000000000000000000");
    assert_eq!(r.status, 404);
    let r = hangup(&envoy, "rtc_00000000000000000000000000000000");
    assert_eq!(r.status, 404);
    assert_eq!(
        envoy_stat(&envoy, "realtime_filter_replica_r0_creates"),
        3.0
    );
    assert_eq!(
        envoy_stat(&envoy, "realtime_filter_replica_r1_creates"),
        3.0
    );
    drop(clients);

    // Replica r1 dies: new calls fail over to r0 (no 503), under ids naming r0.
    let b_log = b.log_text();
    drop(b);
    let before = created_total(&a);
    for _ in 0..4 {
        let (_c, offer) = new_client();
        let id = created(&post_sdp(&envoy, CALLS, &offer, &[]));
        assert!(id.starts_with("rtc_r0_"), "{id}");
        assert_eq!(hangup(&envoy, &id).status, 200);
    }
    assert_eq!(created_total(&a) - before, 4.0);
    assert!(envoy_stat(&envoy, "realtime_filter_replica_r1_failovers") >= 1.0);
    for (name, text) in [
        ("envoy", envoy.log_text()),
        ("relay a", a.log_text()),
        ("relay b", b_log),
    ] {
        assert!(!text.contains(KEY), "key in the {name} log");
    }
}
