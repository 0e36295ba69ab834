//! The operations kit (deploy/observability/) against a real Prometheus: the local stack as
//! `cargo xtask up` starts it (echo model, relay, Envoy with the filter; ephemeral ports) is
//! scraped with the shipped local scrape configuration and rules, real calls run (a Realtime
//! call with usage and audio, hung up; a GPT-Live session with a provider error event, hung
//! up; a create the filter refuses; one the provider refuses), and then:
//!
//! - every rule Prometheus loaded is healthy;
//! - every query of every dashboard panel, and every recording rule, returns data, and those
//!   that measure what happened (calls, packets, tokens, Live seconds, errors, setups,
//!   latency) return a positive value;
//! - every metric name a panel, a recording rule or an alert reads is one Prometheus holds;
//! - every metric name docs/operations.md and filter/README.md promise is exported.
//!
//! So a metric renamed in code and not in the dashboard, the rules or the docs fails here.
//! `cargo xtask observe` draws the same panels; one frame is drawn here too.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{created, exercise, runtime, T};
use e2e::{http, Paths};
use serde_json::{json, Value};
use xtask::dashboard;
use xtask::doc_metrics;
use xtask::prometheus::{self, Prometheus, ScrapeTargets};
use xtask::stack::{Stack, StackConfig};

const CALLS: &str = "/v1/realtime/calls";
const LIVE: &str = "/v1/live/sessions";
/// Scrape and rule-evaluation interval of the test's Prometheus.
const INTERVAL_SECS: u32 = 1;
/// `$__rate_interval` for the evaluation: long enough to hold all of the test's traffic.
const WINDOW: &str = "5m";

/// Metrics whose queries must show a positive value: the test's traffic made them move.
const MOVED: [&str; 21] = [
    "realtime_relay_calls_created_total",
    "realtime_relay_setup_failures_total",
    "realtime_relay_calls_ended_total",
    "realtime_relay_setup_duration_seconds_bucket",
    "realtime_relay_rtp_packets_total",
    "realtime_relay_rtp_bytes_total",
    "realtime_relay_dc_messages_total",
    "realtime_relay_dc_bytes_total",
    "realtime_relay_usage_tokens_total",
    "realtime_relay_usage_live_audio_seconds_total",
    "realtime_relay_upstream_error_events_total",
    "realtime_relay_rate_limit_remaining",
    "realtime_relay_cpu_cores",
    "process_resident_memory_bytes",
    "process_open_fds",
    "realtime_filter_requests",
    "realtime_filter_errors",
    "realtime_filter_setup_latency_ms_bucket",
    "realtime_filter_worker_setups_ok",
    "realtime_filter_shared_data_bytes",
    "up",
];

/// Names the docs write in backticks that this stack does not export, and why.
const NOT_EXPORTED_HERE: [(&str, &str); 4] = [
    (
        "realtime_relay_pods",
        "an Envoy cluster's name in deploy/replicas/, not a metric",
    ),
    (
        "realtime_filter_replica_<id>_creates",
        "only with `relay_replicas` (envoy/envoy-two-relays.yaml)",
    ),
    (
        "realtime_filter_replica_<id>_failovers",
        "only with `relay_replicas` (envoy/envoy-two-relays.yaml)",
    ),
    (
        "realtime_filter_replica_creates",
        "only with `relay_replicas` (relabelled from the names above)",
    ),
];

fn post(listen: SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> http::Response {
    http::request(listen, "POST", path, headers, body).expect("HTTP to Envoy")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `query` until it has a sample with a positive value, or `timeout`.
fn wait_positive(prom: &Prometheus, query: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let samples = prom.query(query, None).expect("query");
        if samples.iter().any(|s| s.value > 0.0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{query}` never became positive: {samples:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn every_dashboard_query_rule_and_documented_metric_has_data_after_real_calls() {
    let paths = Paths::discover();
    let cfg = StackConfig::ephemeral(&paths, "observability").expect("ports");
    let listen: SocketAddr = format!("{}:{}", cfg.host, cfg.listen_port).parse().unwrap();
    let relay_metrics: SocketAddr = format!("{}:{}", cfg.host, cfg.relay_metrics_port)
        .parse()
        .unwrap();
    let envoy_admin: SocketAddr = format!("{}:{}", cfg.host, cfg.admin_port).parse().unwrap();
    let run_dir = cfg.run_dir.clone();
    let stack = Stack::start(&paths, cfg).expect("the local stack starts");

    let config = prometheus::local_config(
        &paths,
        &ScrapeTargets {
            relay_metrics,
            envoy_admin,
            interval_secs: INTERVAL_SECS,
        },
    )
    .expect("the shipped local scrape config");
    let port = xtask::ports::free_tcp_port().expect("a port for Prometheus");
    let prom = Prometheus::start(
        &config,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &run_dir.join("prometheus"),
    )
    .expect("Prometheus starts");
    prom.wait_targets_up(T).expect("both targets scraped");

    let rt = runtime();
    // A Realtime call: events (a response with usage and rate limits), audio both ways,
    // then a hangup through Envoy.
    let (client, offer) = echo_model::TestClient::new(Default::default()).expect("client");
    let r = post(
        listen,
        &format!("{CALLS}?model=gpt-realtime"),
        &[("content-type", "application/sdp")],
        offer.as_bytes(),
    );
    let call_id = created(&r);
    let call = exercise(&rt, client, &r.text());
    let r = post(listen, &format!("{CALLS}/{call_id}/hangup"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());

    // A GPT-Live session: audio, Live seconds reported, a command the provider refuses
    // (session.start on a WebRTC session: an `error` event), then a hangup.
    let (live_client, live_offer) =
        echo_model::TestClient::new(Default::default()).expect("client");
    let body = json!({"session": {"model": "gpt-live-1"},
                      "transport": {"type": "webrtc", "sdp": live_offer}});
    let r = post(
        listen,
        LIVE,
        &[("content-type", "application/json")],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let created: Value = r.json().expect("JSON");
    let live_id = created["session"]["id"].as_str().expect("id").to_string();
    let answer = created["transport"]["sdp"]
        .as_str()
        .expect("sdp")
        .to_string();
    let live = rt.block_on(async {
        let mut c = live_client.connect(&answer).await.expect("Live connects");
        c.wait_for_event_type("session.started", T)
            .await
            .expect("session.started");
        c.send_audio(60, Duration::from_millis(20))
            .await
            .expect("audio");
        c.send_text(r#"{"type":"session.start","event_id":"obs-1"}"#)
            .await
            .expect("send");
        let error = c
            .wait_for_event_type("error", T)
            .await
            .expect("error event");
        assert_eq!(error["error"]["code"], "session_already_started", "{error}");
        c.wait_for_event_type("session.usage.updated", T)
            .await
            .expect("Live seconds");
        c
    });
    // Prometheus sees the session live on its worker before it ends.
    wait_positive(&prom, "sum(realtime_relay_worker_calls_active)", T);
    wait_positive(&prom, "sum(realtime_relay_calls_connected)", T);
    let r = post(listen, &format!("{LIVE}/{live_id}/hangup"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());

    // Refused by the filter (not an SDP offer), and refused by the provider (the caller's own
    // key, kept by `inject_if_missing`, is not one the echo model knows).
    let r = post(
        listen,
        &format!("{CALLS}?model=gpt-realtime"),
        &[("content-type", "application/sdp")],
        b"not an offer",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let (_c, offer) = echo_model::TestClient::new(Default::default()).expect("client");
    let r = post(
        listen,
        &format!("{CALLS}?model=gpt-realtime"),
        &[
            ("content-type", "application/sdp"),
            ("authorization", "Bearer sk-not-a-key-the-echo-model-knows"),
        ],
        offer.as_bytes(),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    drop((call, live));

    // Envoy flushes histograms every 5 s; Prometheus scrapes every second and evaluates its
    // rules as often. Wait for the last of them to show the traffic.
    for q in [
        "sum(realtime_filter_setup_latency_ms_count)",
        "sum(realtime_relay_calls_ended_total)",
        "sum(realtime_relay_usage_live_audio_seconds_total)",
        "sum(realtime_filter_requests{outcome=\"upstream_rejected\"})",
        "realtime:relay_calls_created:rate5m",
        "realtime:filter_setup_latency_ms:p99_5m",
    ] {
        wait_positive(&prom, q, Duration::from_secs(30));
    }
    // Let every rule be evaluated after the traffic at least once more.
    std::thread::sleep(Duration::from_secs(2 * u64::from(INTERVAL_SECS)));
    let at = now();

    let mut problems = Vec::new();
    for (rule, health, error) in prom.rule_health().expect("rules") {
        if health != "ok" {
            problems.push(format!("rule {rule}: health {health} {error}"));
        }
    }
    let names: BTreeSet<String> = prom.metric_names().expect("names").into_iter().collect();
    let mut read_names = BTreeSet::new();

    let panels = dashboard::panels(&prometheus::dashboard_file(&paths)).expect("dashboard");
    let mut evaluated = 0;
    for panel in &panels {
        for q in &panel.queries {
            let expr = dashboard::expand(&q.expr, WINDOW).expect("expand");
            let samples = prom.query(&expr, Some(at)).expect("query");
            evaluated += 1;
            let read = dashboard::metric_names(&expr);
            read_names.extend(read.iter().cloned());
            if samples.is_empty() {
                problems.push(format!("panel `{}`: `{expr}` is empty", panel.title));
            }
        }
    }
    // What the traffic moved is above zero. (Read raw: a series born at its first event,
    // such as a model's tokens, starts above zero, and `rate()` over it stays 0 until its
    // second change; the panels show it from then on.)
    for name in MOVED {
        let samples = prom
            .query(&format!("sum({name})"), Some(at))
            .expect("query");
        if !samples.iter().any(|s| s.value > 0.0) {
            problems.push(format!("`{name}` did not move with the test's traffic"));
        }
    }
    let dir = prometheus::prometheus_dir(&paths);
    let mut recorded = 0;
    for file in prometheus::RULE_FILES {
        for rule in dashboard::rules(&dir.join(file)).expect("rules") {
            read_names.extend(dashboard::metric_names(&rule.expr));
            if rule.alert {
                continue;
            }
            recorded += 1;
            let samples = prom.query(&rule.name, Some(at)).expect("query");
            if samples.is_empty() {
                problems.push(format!("recording rule {} has no series", rule.name));
            }
        }
    }
    for name in &read_names {
        if !names.contains(name) {
            problems.push(format!(
                "`{name}` is read by the dashboard or the rules but Prometheus has no such metric"
            ));
        }
    }

    // The names the docs promise, against both raw expositions and the relabelled names.
    let mut exported: BTreeSet<String> = names.clone();
    for (addr, path) in [
        (relay_metrics, "/metrics"),
        (envoy_admin, "/stats/prometheus"),
    ] {
        let text = http::get(addr, path).expect("exposition").text();
        exported.extend(doc_metrics::exported(&text));
    }
    let mut documented = 0;
    for doc in ["docs/operations.md", "filter/README.md"] {
        let text = std::fs::read_to_string(paths.root.join(doc)).expect("doc");
        for pattern in doc_metrics::documented(&text) {
            if NOT_EXPORTED_HERE.iter().any(|(p, _)| *p == pattern) {
                continue;
            }
            documented += 1;
            if !exported.iter().any(|n| doc_metrics::matches(&pattern, n)) {
                problems.push(format!("{doc} names `{pattern}`, which nothing exports"));
            }
        }
    }

    // One frame of `cargo xtask observe`, drawn from the same Prometheus.
    let frame = xtask::observe::draw(&prom, &panels, INTERVAL_SECS, 60).expect("a frame");
    assert!(
        frame.iter().any(|l| l.starts_with("Calls live:")) && frame.iter().any(|l| l.contains('█')),
        "{frame:#?}"
    );

    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    eprintln!(
        "{evaluated} panel queries, {recorded} recording rules, {} metric names read, \
         {documented} documented names: all answered",
        read_names.len()
    );
    drop(stack);
}
