//! The request lifecycle against a fake host: what is dispatched, replied, counted and
//! released for each answer the relay can give.

use std::rc::Rc;

use prost::Message;
use realtime_relay_proto::v1::{
    create_call_response::Outcome, CallInfo, CreateCallRequest, CreateCallResponse,
    HangupCallResponse, ListCallsResponse, UpstreamRejection,
};

use super::*;
use crate::config::tests::{env, sample, SAMPLE};
use crate::fake_host::FakeHost;
use crate::global_limit;
use crate::host::Action;
use crate::load_refresh::LoadRefresh;
use crate::routing::{ejected_until_key, failures_key, outstanding_key};
use crate::sdp::tests::OFFER;

/// With relay replicas, a Live session's id names its replica as a Realtime call's does
/// (`live_<replica>_…`), and its hangup reaches that replica.
#[test]
fn a_live_session_id_names_its_replica_and_its_hangup_goes_there() {
    let config = Rc::new(replicas_config());
    let body = serde_json::json!({
        "session": {"model": "gpt-live-1"},
        "transport": {"type": "webrtc", "sdp": OFFER}
    })
    .to_string();
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/live/sessions"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    let _flow = start(&config, &mut host);
    let d = host.last_dispatch().clone();
    let sent = CreateCallRequest::decode(d.message.as_slice()).unwrap();
    let replica = d.cluster.strip_prefix("relay_").unwrap();
    assert!(
        sent.call_id.starts_with(&format!("live_{replica}_")),
        "{} on {}",
        sent.call_id,
        d.cluster
    );

    let path = "/v1/live/sessions/live_r2_0123456789abcdef0123456789abcdef/hangup";
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", path)], b"");
    assert_eq!(
        Flow::new(Rc::clone(&config)).on_headers(&mut host, true),
        Action::Pause
    );
    let d = host.last_dispatch();
    assert_eq!((d.cluster.as_str(), d.method), ("relay_r2", "HangupCall"));
    // A Live id naming no configured replica is nobody's.
    let path = "/v1/live/sessions/live_r9_0123456789abcdef0123456789abcdef/hangup";
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", path)], b"");
    Flow::new(Rc::clone(&config)).on_headers(&mut host, true);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.last_reply().status, 404);
}

const OK: u32 = 0;
const UNAVAILABLE: u32 = 14;
const RESOURCE_EXHAUSTED: u32 = 8;

fn replicas_config() -> Config {
    let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    v.as_object_mut().unwrap().remove("relay_cluster");
    v["relay_replicas"] = serde_json::json!([
        {"id": "r0", "cluster": "relay_r0"},
        {"id": "r1", "cluster": "relay_r1"},
        {"id": "r2", "cluster": "relay_r2"}
    ]);
    Config::from_json(v.to_string().as_bytes(), &env).unwrap()
}

/// A create of `echo` (worker `echo1`, passthrough key) or, with `route`, of the default
/// model on the named pool/worker; with a client key so every pool's policy is satisfied.
fn create_host(route: Option<&str>) -> FakeHost {
    let path = if route.is_some() {
        "/v1/realtime/calls"
    } else {
        "/v1/realtime/calls?model=echo"
    };
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        ("content-type", "application/sdp"),
        (
            "authorization",
            if route.is_some() {
                "Bearer sk-gw-ops"
            } else {
                "Bearer sk-client-secret"
            },
        ),
        ("x-request-id", "req-1"),
    ];
    if let Some(r) = route {
        headers.push(("x-realtime-route", r));
    }
    FakeHost::request(&headers, OFFER.as_bytes())
}

/// Runs headers and the whole body: the create is dispatched (or answered) after this.
fn start(config: &Rc<Config>, host: &mut FakeHost) -> Flow {
    let mut flow = Flow::new(Rc::clone(config));
    assert_eq!(flow.on_headers(host, false), Action::Pause);
    let size = host.body.len();
    assert_eq!(flow.on_body(host, size, true), Action::Pause);
    flow
}

fn answer_sdp(call_id: &str) -> Vec<u8> {
    CreateCallResponse {
        call_id: call_id.to_string(),
        outcome: Some(Outcome::SdpAnswer("v=0\r\n".into())),
    }
    .encode_to_vec()
}

fn respond(flow: &mut Flow, host: &mut FakeHost, status: u32, message: Option<&str>, body: &[u8]) {
    let token = host.last_dispatch().token;
    let body = (status == OK).then_some(body);
    flow.on_grpc_response(host, token, status, message, body);
}

fn sent_call_id(host: &FakeHost) -> String {
    CreateCallRequest::decode(host.last_dispatch().message.as_slice())
        .unwrap()
        .call_id
}

#[test]
fn a_create_is_dispatched_once_and_answered_201_with_location() {
    let config = Rc::new(sample());
    let mut host = create_host(None);
    let mut flow = start(&config, &mut host);
    assert_eq!(host.dispatched.len(), 1);
    let d = host.last_dispatch().clone();
    assert_eq!((d.cluster.as_str(), d.method), ("relay", "CreateCall"));
    assert_eq!(d.timeout_ms, config.create_timeout_ms);
    let call_id = sent_call_id(&host);
    assert_eq!(
        d.metadata,
        vec![
            ("x-call-id".to_string(), call_id.clone()),
            ("x-request-id".to_string(), "req-1".to_string())
        ]
    );
    assert_eq!(host.stored(&outstanding_key("echo1")), 1);
    host.now_ms += 42;
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&call_id));
    let r = host.last_reply();
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("location"),
        Some(format!("/v1/realtime/calls/{call_id}").as_str())
    );
    assert_eq!(r.header("x-request-id"), Some("req-1"));
    assert_eq!(*flow.state(), State::Done);
    // The call stays counted on its worker while it lives.
    assert_eq!(host.stored(&outstanding_key("echo1")), 1);
    assert_eq!(host.counter(metrics::REQ_CREATED), 1);
    assert_eq!(host.counter(&metrics::setups("echo1", "ok")), 1);
    assert_eq!(
        *host.histograms.borrow(),
        vec![(metrics::SETUP_LATENCY.to_string(), 42)]
    );
    // A late or foreign token changes nothing.
    flow.on_grpc_response(&mut host, 99, OK, None, Some(&[]));
    assert_eq!(host.replies.len(), 1);
}

/// One row per relay answer: the HTTP status and code the client gets, and what happens to
/// the worker (outstanding count, failure run).
#[test]
fn every_relay_answer_has_its_reply_and_verdict() {
    struct Row {
        name: &'static str,
        status: u32,
        message: Option<&'static str>,
        body: Vec<u8>,
        http: u16,
        code: Option<&'static str>,
        outstanding: u64,
        failures: u64,
    }
    let rejection = |status: u32| {
        CreateCallResponse {
            call_id: String::new(),
            outcome: Some(Outcome::UpstreamRejection(UpstreamRejection {
                status,
                content_type: "application/json".into(),
                body: b"{\"error\":{}}".to_vec(),
            })),
        }
        .encode_to_vec()
    };
    #[rustfmt::skip]
    let rows = vec![
        Row { name: "answer", status: OK, message: None, body: answer_sdp(""), http: 201, code: None, outstanding: 1, failures: 0 },
        Row { name: "upstream 401 verbatim", status: OK, message: None, body: rejection(401), http: 401, code: None, outstanding: 0, failures: 0 },
        Row { name: "upstream 503 verbatim", status: OK, message: None, body: rejection(503), http: 503, code: None, outstanding: 0, failures: 1 },
        Row { name: "garbage body", status: OK, message: None, body: vec![0xff, 0xff], http: 502, code: Some("bad_relay_response"), outstanding: 0, failures: 0 },
        Row { name: "client fault", status: 3, message: Some("invalid_sdp:%20no%20media"), body: vec![], http: 400, code: Some("invalid_sdp"), outstanding: 0, failures: 0 },
        Row { name: "refused upstream is no worker fault", status: 3, message: Some("upstream_not_allowed: http://x"), body: vec![], http: 400, code: Some("upstream_not_allowed"), outstanding: 0, failures: 0 },
        Row { name: "upstream unreachable", status: UNAVAILABLE, message: Some("upstream_unreachable: refused"), body: vec![], http: 502, code: Some("upstream_unreachable"), outstanding: 0, failures: 1 },
        Row { name: "upstream timeout", status: 4, message: Some("upstream_timeout: slow"), body: vec![], http: 504, code: Some("upstream_timeout"), outstanding: 0, failures: 1 },
        Row { name: "relay timeout", status: 4, message: None, body: vec![], http: 504, code: Some("relay_timeout"), outstanding: 0, failures: 0 },
        Row { name: "relay unreachable", status: UNAVAILABLE, message: None, body: vec![], http: 503, code: Some("relay_unavailable"), outstanding: 0, failures: 0 },
        Row { name: "relay full", status: RESOURCE_EXHAUSTED, message: Some("too_many_calls: 3"), body: vec![], http: 429, code: Some("too_many_calls"), outstanding: 0, failures: 0 },
        Row { name: "relay internal", status: 13, message: Some("internal_error: boom"), body: vec![], http: 502, code: Some("internal_error"), outstanding: 0, failures: 0 },
    ];
    let config = Rc::new(sample());
    for row in rows {
        let mut host = create_host(None);
        let mut flow = start(&config, &mut host);
        respond(&mut flow, &mut host, row.status, row.message, &row.body);
        assert_eq!(
            host.dispatched.len(),
            1,
            "{}: no retry on one relay",
            row.name
        );
        let r = host.last_reply();
        assert_eq!(r.status, row.http, "{}", row.name);
        assert_eq!(
            host.stored(&outstanding_key("echo1")),
            row.outstanding,
            "{}",
            row.name
        );
        assert_eq!(
            host.stored(&failures_key("echo1")),
            row.failures,
            "{}",
            row.name
        );
        if let Some(code) = row.code {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["error"]["code"], code, "{}", row.name);
            assert_eq!(host.counter(&metrics::error(code)), 1, "{}", row.name);
            assert_eq!(host.counter(metrics::REQ_FAILED), 1, "{}", row.name);
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
        assert_eq!(r.header("x-request-id"), Some("req-1"), "{}", row.name);
        assert_eq!(
            host.count(&metrics::setups("echo1", "failed")),
            row.failures,
            "{}",
            row.name
        );
    }
}

#[test]
fn consecutive_upstream_failures_eject_the_worker_and_success_resets_the_run() {
    let config = Rc::new(sample());
    let fail = |host: &mut FakeHost| {
        let mut flow = start(&config, host);
        respond(
            &mut flow,
            host,
            UNAVAILABLE,
            Some("upstream_unreachable: x"),
            &[],
        );
    };
    let mut host = create_host(Some("c"));
    fail(&mut host);
    fail(&mut host);
    // A success in between clears the run.
    let mut flow = start(&config, &mut host);
    let id = sent_call_id(&host);
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&id));
    assert_eq!(host.stored(&failures_key("c")), 0);
    for _ in 0..config.eject_after_failures {
        fail(&mut host);
    }
    assert_eq!(host.counter(&metrics::ejections("c")), 1);
    assert_eq!(
        host.stored(&ejected_until_key("c")),
        host.now_ms + config.eject_ms
    );
    assert!(host.log_text().contains("worker c ejected"));
    // The only worker of the pool is ejected: the next create is refused without a dispatch.
    let before = host.dispatched.len();
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, false);
    let size = host.body.len();
    flow.on_body(&mut host, size, true);
    assert_eq!(host.dispatched.len(), before);
    assert_eq!(host.last_reply().status, 503);
    // After the ejection it serves again.
    host.now_ms += config.eject_ms + 1;
    let _flow = start(&config, &mut host);
    assert_eq!(host.dispatched.len(), before + 1);
}

#[test]
fn an_unreachable_replica_hands_the_call_to_the_next_under_a_new_id() {
    let config = Rc::new(replicas_config());
    let mut host = create_host(None);
    let mut flow = start(&config, &mut host);
    let first = host.last_dispatch().clone();
    assert_eq!(first.cluster, "relay_r0");
    let first_id = sent_call_id(&host);
    assert!(first_id.starts_with("rtc_r0_"), "{first_id}");
    respond(&mut flow, &mut host, UNAVAILABLE, None, &[]);
    assert!(
        host.replies.is_empty(),
        "no reply while another replica is tried"
    );
    let second = host.last_dispatch().clone();
    assert_eq!(second.cluster, "relay_r1");
    let second_id = sent_call_id(&host);
    // Same random part, new replica, same request (key and offer) otherwise.
    assert_eq!(second_id, first_id.replace("rtc_r0_", "rtc_r1_"));
    let a = CreateCallRequest::decode(first.message.as_slice()).unwrap();
    let b = CreateCallRequest::decode(second.message.as_slice()).unwrap();
    assert_eq!(
        CreateCallRequest {
            call_id: a.call_id.clone(),
            ..b
        },
        a
    );
    assert_eq!(host.counter(&metrics::replica("r0", "failovers")), 1);
    assert_eq!(host.counter(&metrics::replica("r1", "creates")), 1);
    assert!(host.stored(&replica::down_key("r0")) > host.now_ms);
    // One outstanding call on the worker throughout.
    assert_eq!(host.stored(&outstanding_key("echo1")), 1);
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&second_id));
    assert_eq!(host.last_reply().status, 201);
    assert_eq!(
        host.last_reply().header("location"),
        Some(format!("/v1/realtime/calls/{second_id}").as_str())
    );
    // The next call skips the replica marked down.
    let mut host2 = create_host(None);
    host2.store = std::mem::take(&mut host.store);
    let _ = start(&config, &mut host2);
    assert_ne!(host2.last_dispatch().cluster, "relay_r0");
}

#[test]
fn failover_stops_when_every_replica_was_tried_or_the_fault_is_not_the_replicas() {
    let config = Rc::new(replicas_config());
    // Full everywhere: three attempts, then the last answer (429) reaches the client.
    let mut host = create_host(None);
    let mut flow = start(&config, &mut host);
    for _ in 0..3 {
        respond(
            &mut flow,
            &mut host,
            RESOURCE_EXHAUSTED,
            Some("too_many_calls: 9"),
            &[],
        );
    }
    assert_eq!(host.dispatched.len(), 3);
    let clusters: Vec<&str> = host.dispatched.iter().map(|d| d.cluster.as_str()).collect();
    assert_eq!(clusters, ["relay_r0", "relay_r1", "relay_r2"]);
    assert_eq!(host.last_reply().status, 429);
    // A full replica is not marked down.
    assert_eq!(host.stored(&replica::down_key("r0")), 0);
    assert_eq!(host.stored(&outstanding_key("echo1")), 0);
    // Client and upstream faults are final on the first replica.
    for (status, message) in [
        (3, "invalid_sdp: x"),
        (UNAVAILABLE, "upstream_unreachable: y"),
    ] {
        let mut host = create_host(None);
        let mut flow = start(&config, &mut host);
        respond(&mut flow, &mut host, status, Some(message), &[]);
        assert_eq!(host.dispatched.len(), 1, "{message}");
        assert_eq!(host.replies.len(), 1, "{message}");
    }
    // The host refuses the dispatch to the next replica: the client gets the first answer.
    let mut host = create_host(None);
    host.refuse_clusters.insert("relay_r1".into());
    let mut flow = start(&config, &mut host);
    respond(&mut flow, &mut host, UNAVAILABLE, None, &[]);
    assert_eq!(host.replies.len(), 1);
    assert_eq!(host.last_reply().status, 503);
}

#[test]
fn a_client_that_leaves_mid_create_releases_its_worker_and_cancels_the_call() {
    let config = Rc::new(sample());
    let mut host = create_host(None);
    let mut flow = start(&config, &mut host);
    assert_eq!(host.stored(&outstanding_key("echo1")), 1);
    flow.on_done(&mut host);
    assert_eq!(host.cancelled, vec![host.last_dispatch().token]);
    assert_eq!(host.stored(&outstanding_key("echo1")), 0);
    assert_eq!(*flow.state(), State::Done);
    // A late answer sends nothing, and a second on_done releases nothing more.
    let id = sent_call_id(&host);
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&id));
    flow.on_done(&mut host);
    assert!(host.replies.is_empty());
    assert_eq!(host.cancelled.len(), 1);
    // After a reply, on_done has nothing to release.
    let mut host = create_host(None);
    let mut flow = start(&config, &mut host);
    let id = sent_call_id(&host);
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&id));
    flow.on_done(&mut host);
    assert!(host.cancelled.is_empty());
    assert_eq!(host.stored(&outstanding_key("echo1")), 1);
}

#[test]
fn hangup_reaches_the_replica_named_in_the_id_and_releases_the_worker() {
    let config = Rc::new(replicas_config());
    let id = "rtc_r2_0123456789abcdef0123456789abcdef";
    let path = format!("/v1/realtime/calls/{id}/hangup");
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", &path)], b"");
    crate::routing::store_value(&host.store, &outstanding_key("a"), 2);
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, true), Action::Pause);
    let d = host.last_dispatch().clone();
    assert_eq!((d.cluster.as_str(), d.method), ("relay_r2", "HangupCall"));
    assert_eq!(d.timeout_ms, config.hangup_timeout_ms);
    let answer = |ended_now| {
        HangupCallResponse {
            call: Some(CallInfo {
                worker_id: "a".into(),
                ..Default::default()
            }),
            ended_now,
        }
        .encode_to_vec()
    };
    respond(&mut flow, &mut host, OK, None, &answer(true));
    assert_eq!(host.last_reply().status, 200);
    assert_eq!(host.stored(&outstanding_key("a")), 1);
    assert_eq!(host.counter(metrics::REQ_HANGUP), 1);
    // Clients retry hangups: the relay answers OK for the ended call, and the worker is not
    // released again (repeated hangups used to drive its count to 0).
    for _ in 0..3 {
        let mut again = FakeHost::request(&[(":method", "POST"), (":path", &path)], b"");
        crate::routing::store_value(&again.store, &outstanding_key("a"), 1);
        let mut flow = Flow::new(Rc::clone(&config));
        flow.on_headers(&mut again, true);
        respond(&mut flow, &mut again, OK, None, &answer(false));
        assert_eq!(again.last_reply().status, 200);
        assert_eq!(again.stored(&outstanding_key("a")), 1);
    }
    // Not found on the relay: 404 JSON, nothing released.
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", &path)], b"");
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, true);
    respond(&mut flow, &mut host, 5, Some("call_not_found: x"), &[]);
    assert_eq!(host.last_reply().status, 404);
    assert_eq!(host.counter(&metrics::error("call_not_found")), 1);
    // An id naming no configured replica is answered without asking any relay.
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/realtime/calls/rtc_r9_0123456789abcdef/hangup"),
        ],
        b"",
    );
    Flow::new(Rc::clone(&config)).on_headers(&mut host, true);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.last_reply().status, 404);
}

#[test]
fn host_failures_become_json_errors_and_leave_nothing_counted() {
    let config = Rc::new(sample());
    // The relay cluster is unknown to the host.
    let mut host = create_host(None);
    host.refuse_clusters.insert("relay".into());
    let _ = start(&config, &mut host);
    assert_eq!(host.last_reply().status, 503);
    assert_eq!(host.stored(&outstanding_key("echo1")), 0);
    assert!(host
        .log_text()
        .contains("dispatch to cluster 'relay' failed"));
    // No random bytes for the call id.
    let mut host = create_host(None);
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, false);
    host.no_random = true;
    let size = host.body.len();
    flow.on_body(&mut host, size, true);
    assert_eq!(host.last_reply().status, 500);
    assert!(host.dispatched.is_empty());
    // The body cannot be read.
    let mut host = create_host(None);
    host.body_unreadable = true;
    let _ = start(&config, &mut host);
    assert_eq!(host.last_reply().status, 500);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.stored(&outstanding_key("echo1")), 0);
}

#[test]
fn bodies_are_buffered_until_complete_and_capped() {
    let config = Rc::new(sample());
    let mut host = create_host(None);
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
    assert_eq!(flow.on_body(&mut host, 10, false), Action::Pause);
    assert!(host.dispatched.is_empty());
    let size = host.body.len();
    assert_eq!(flow.on_body(&mut host, size, true), Action::Pause);
    assert_eq!(host.dispatched.len(), 1);
    // Over the limit mid-stream: 413 at once.
    let mut host = create_host(None);
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, false);
    assert_eq!(
        flow.on_body(&mut host, config.max_body_bytes + 1, false),
        Action::Pause
    );
    assert_eq!(host.last_reply().status, 413);
    // Later chunks of a refused request stay paused and send nothing more.
    assert_eq!(flow.on_body(&mut host, 1, true), Action::Pause);
    assert_eq!(host.replies.len(), 1);
    // A body ended by trailers.
    let mut host = create_host(None);
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, false);
    let size = host.body.len();
    flow.on_body(&mut host, size, false);
    assert_eq!(flow.on_trailers(&mut host), Action::Pause);
    assert_eq!(host.dispatched.len(), 1);
    // Trailers with an oversized body.
    let mut host = create_host(None);
    host.body = vec![b'v'; config.max_body_bytes + 10];
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, false);
    flow.on_trailers(&mut host);
    assert_eq!(host.last_reply().status, 413);
}

#[test]
fn requests_that_are_not_ours_pass_untouched() {
    let config = Rc::new(sample());
    for (method, path) in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/realtime/callsx"),
    ] {
        let mut host = FakeHost::request(&[(":method", method), (":path", path)], b"{}");
        let mut flow = Flow::new(Rc::clone(&config));
        assert_eq!(
            flow.on_headers(&mut host, false),
            Action::Continue,
            "{path}"
        );
        assert_eq!(flow.on_body(&mut host, 2, true), Action::Continue, "{path}");
        assert_eq!(flow.on_trailers(&mut host), Action::Continue, "{path}");
        flow.on_done(&mut host);
        assert!(
            host.dispatched.is_empty() && host.replies.is_empty(),
            "{path}"
        );
        assert_eq!(host.counter(metrics::REQ_PASSED_THROUGH), 1, "{path}");
    }
}

#[test]
fn keys_never_reach_logs_or_replies() {
    let config = Rc::new(sample());
    // Worker `a` injects KEY_A (sk-aaa); the client's own key is sk-client-secret.
    for (status, message) in [
        (OK, None),
        (3, Some("invalid_sdp: x")),
        (UNAVAILABLE, None),
        (UNAVAILABLE, Some("upstream_unreachable: y")),
        // A message that quotes the caller's own key (a relay error quoting the client's
        // input; the fuzzer found the same through an unknown parameter's name).
        (3, Some("invalid_sdp: the offer names sk-gw-ops")),
    ] {
        let mut host = create_host(Some("canary"));
        let mut flow = start(&config, &mut host);
        let m = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
        assert_eq!(m.upstream.unwrap().authorization, "Bearer sk-aaa");
        let id = sent_call_id(&host);
        respond(&mut flow, &mut host, status, message, &answer_sdp(&id));
        let logs = host.log_text();
        let reply = String::from_utf8_lossy(&host.last_reply().body).into_owned();
        let headers = format!("{:?}", host.last_reply().headers);
        for secret in ["sk-aaa", "sk-client-secret", "sk-gw-ops"] {
            assert!(!logs.contains(secret), "{secret} in logs: {logs}");
            assert!(!reply.contains(secret), "{secret} in reply");
            assert!(!headers.contains(secret), "{secret} in reply headers");
        }
    }
}

#[test]
fn the_load_refresh_sums_live_calls_over_the_relays_that_answer() {
    let config = replicas_config();
    let mut host = FakeHost::default();
    host.now_ms = 100_000;
    let mut refresh = LoadRefresh::default();
    refresh.on_tick(&config, &mut host);
    assert_eq!(host.dispatched.len(), 3);
    assert!(host.dispatched.iter().all(|d| d.method == "ListCalls"));
    assert!(host.dispatched.iter().all(|d| d.metadata.is_empty()));
    // A second tick in the same period (another worker thread) starts nothing.
    refresh.on_tick(&config, &mut host);
    assert_eq!(host.dispatched.len(), 3);
    let live = |pairs: &[(&str, u32)]| {
        ListCallsResponse {
            live_calls_by_worker: pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    crate::routing::store_value(&host.store, &outstanding_key("c"), 7);
    let t: Vec<u32> = host.dispatched.iter().map(|d| d.token).collect();
    refresh.on_grpc_response(&config, &mut host, t[0], OK, Some(&live(&[("a", 2)])));
    refresh.on_grpc_response(&config, &mut host, 999, OK, Some(&live(&[("a", 50)])));
    refresh.on_grpc_response(&config, &mut host, t[1], UNAVAILABLE, None);
    assert_eq!(
        host.stored(&outstanding_key("a")),
        0,
        "not before the round ends"
    );
    refresh.on_grpc_response(
        &config,
        &mut host,
        t[2],
        OK,
        Some(&live(&[("a", 1), ("b", 4)])),
    );
    assert_eq!(host.stored(&outstanding_key("a")), 3);
    assert_eq!(host.stored(&outstanding_key("b")), 4);
    assert_eq!(
        host.stored(&outstanding_key("c")),
        0,
        "a worker no relay lists has none"
    );
    assert_eq!(host.counter(metrics::LOAD_REFRESH), 1);
    // No relay answers: counts stand, the failure is counted.
    host.now_ms += config.load_refresh_ms;
    refresh.on_tick(&config, &mut host);
    let t: Vec<u32> = host.dispatched.iter().skip(3).map(|d| d.token).collect();
    for token in t {
        refresh.on_grpc_response(&config, &mut host, token, UNAVAILABLE, None);
    }
    assert_eq!(host.stored(&outstanding_key("a")), 3);
    assert_eq!(host.counter(metrics::LOAD_REFRESH_FAILED), 1);
}

#[test]
fn with_continue_headers_a_create_lets_headers_go_and_holds_its_body() {
    let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
    v["continue_headers"] = true.into();
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let mut host = create_host(None);
    let mut flow = Flow::new(Rc::clone(&config));
    // The headers continue (Envoy without allow_on_headers_stop_iteration); the body is held.
    assert_eq!(flow.on_headers(&mut host, false), Action::Continue);
    host.headers_gone = true;
    assert_eq!(flow.on_body(&mut host, 10, false), Action::Pause);
    let size = host.body.len();
    assert_eq!(flow.on_body(&mut host, size, true), Action::Pause);
    assert_eq!(host.dispatched.len(), 1);
    let id = sent_call_id(&host);
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&id));
    assert_eq!(host.last_reply().status, 201);
    // Refusals and hangups are answered in the headers callback as before.
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/realtime/calls"),
            ("content-type", "text/plain"),
        ],
        b"x",
    );
    assert_eq!(
        Flow::new(Rc::clone(&config)).on_headers(&mut host, false),
        Action::Pause
    );
    assert_eq!(host.last_reply().status, 415);
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/realtime/calls/rtc_0123456789abcdef/hangup"),
        ],
        b"",
    );
    assert_eq!(
        Flow::new(Rc::clone(&config)).on_headers(&mut host, false),
        Action::Pause
    );
    assert_eq!(host.last_dispatch().method, "HangupCall");
}

/// Who calls decides the pool and the key: a JWT principal from the request's dynamic
/// metadata gets the worker key from a pool that admits JWT callers; an anonymous caller gets
/// 401 there, with nothing dispatched; a routing header counts only from a trusted caller.
#[test]
fn the_caller_is_resolved_before_routing_and_decides_the_key() {
    let config = Rc::new(crate::identity::tests_support::config());
    let jwt_path: Vec<String> = config
        .callers
        .jwt
        .as_ref()
        .unwrap()
        .property_path()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let request = |auth: Option<&str>, route: Option<&str>, jwt: Option<&str>| {
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/v1/realtime/calls"),
            ("content-type", "application/sdp"),
        ];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        if let Some(r) = route {
            headers.push(("x-realtime-route", r));
        }
        let mut host = FakeHost::request(&headers, OFFER.as_bytes());
        if let Some(sub) = jwt {
            host.properties
                .insert(jwt_path.clone(), sub.as_bytes().to_vec());
        }
        host
    };
    let run = |host: &mut FakeHost| {
        let mut flow = Flow::new(Rc::clone(&config));
        if flow.on_headers(host, false) == Action::Pause && host.replies.is_empty() {
            let size = host.body.len();
            flow.on_body(host, size, true);
        }
    };
    // A JWT principal: main admits it (default callers), worker key injected.
    let mut host = request(None, None, Some("alice@example.test"));
    run(&mut host);
    let m = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
    let up = m.upstream.unwrap();
    assert_eq!(
        (
            up.worker_id.as_str(),
            up.authorization.starts_with("Bearer sk-")
        ),
        ("a", true)
    );
    // Anonymous: main's default callers do not admit it; 401 before the body, nothing sent.
    let mut host = request(None, None, None);
    run(&mut host);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.last_reply().status, 401);
    // The untrusted app key's routing header is ignored (and counted); the operator's counts.
    let mut host = request(Some("Bearer sk-gw-app"), Some("canary"), None);
    run(&mut host);
    let m = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
    assert_ne!(m.upstream.unwrap().worker_id, "c");
    assert_eq!(host.counter(metrics::ROUTING_HEADER_IGNORED), 1);
    let mut host = request(Some("Bearer sk-gw-backend"), Some("canary"), None);
    run(&mut host);
    let m = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
    assert_eq!(m.upstream.unwrap().worker_id, "c");
    assert_eq!(host.count(metrics::ROUTING_HEADER_IGNORED), 0);
}

/// A hangup says who asks: the caller's principal, and whether it is an operator; the relay
/// ends only the owner's calls (or any, for an operator). Without credentials it is refused
/// where no pool admits anonymous callers, with nothing sent to the relay.
#[test]
fn a_hangup_carries_the_callers_principal_and_needs_credentials() {
    use realtime_relay_proto::v1::HangupCallRequest;
    let config = Rc::new(crate::identity::tests_support::config());
    let path = "/v1/realtime/calls/rtc_0123456789abcdef0123456789abcdef/hangup";
    let hangup = |auth: Option<&str>| {
        let mut headers = vec![(":method", "POST"), (":path", path)];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let mut host = FakeHost::request(&headers, b"");
        Flow::new(Rc::clone(&config)).on_headers(&mut host, true);
        host
    };
    let sent = |host: &FakeHost| {
        HangupCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap()
    };
    let app = sent(&hangup(Some("Bearer sk-gw-app")));
    let backend = sent(&hangup(Some("Bearer sk-gw-backend")));
    assert!(app.principal.starts_with("p_") && !app.operator);
    assert!(backend.operator);
    assert_ne!(app.principal, backend.principal);
    for m in [&app, &backend] {
        assert!(!m.principal.contains("sk-gw"));
    }
    // No credentials, and this configuration admits no anonymous caller.
    let host = hangup(None);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.last_reply().status, 401);
    // The sample admits anonymous callers: their hangups go out with no principal.
    let sample = Rc::new(sample());
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", path)], b"");
    Flow::new(Rc::clone(&sample)).on_headers(&mut host, true);
    let m = sent(&host);
    assert_eq!((m.principal.as_str(), m.operator), ("", false));
}

/// A call's budget is its pool's, overridden field by field by an operator key's own; an
/// anonymous caller gets the pool's; the relay is told it in `CreateCallRequest.budget`.
#[test]
fn a_calls_budget_is_its_pools_or_its_keys_and_goes_to_the_relay() {
    let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
    v["pools"][0]["budget"] =
        serde_json::json!({"tokens_per_call": 5000, "audio_seconds_per_call": 600});
    v["callers"]["api_keys"][0]["budget"] = serde_json::json!({"tokens_per_call": 100});
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let budget_of = |auth: Option<&str>| {
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/v1/realtime/calls"),
            ("content-type", "application/sdp"),
            ("x-realtime-route", "main"),
        ];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let mut host = FakeHost::request(&headers, OFFER.as_bytes());
        let _flow = start(&config, &mut host);
        let sent = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
        sent.budget.map(|b| (b.max_tokens, b.max_audio_seconds))
    };
    assert_eq!(budget_of(None), Some((5000, 600.0)), "the pool's");
    assert_eq!(
        budget_of(Some("Bearer sk-gw-ops")),
        Some((100, 600.0)),
        "the key's tokens, the pool's seconds"
    );
    // A config with no budget sends none.
    let plain = Rc::new(sample());
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/realtime/calls"),
            ("content-type", "application/sdp"),
        ],
        OFFER.as_bytes(),
    );
    let _flow = start(&plain, &mut host);
    let sent = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
    assert!(sent.budget.is_none());
}

/// Per-caller limits across the VM's shared store: concurrent calls per principal (held
/// from dispatch, released by a failed setup or the owner's hangup) and creations per minute;
/// over either: 429 rate_limit_exceeded with Retry-After, nothing dispatched, nothing held.
#[test]
fn per_caller_limits_hold_calls_and_creations_and_release_them() {
    let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
    v["pools"][0]["limits"] = serde_json::json!({"calls_per_caller": 2, "creates_per_minute": 4});
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let store_host = FakeHost::default();
    let create = |auth: Option<&str>, addr: &str| {
        let mut headers = vec![
            (":method", "POST"),
            (":path", "/v1/realtime/calls"),
            ("content-type", "application/sdp"),
        ];
        if let Some(a) = auth {
            headers.push(("authorization", a));
        }
        let mut host = FakeHost::request(&headers, OFFER.as_bytes());
        host.store = store_host.store.share();
        host.properties.insert(
            vec!["source".to_string(), "address".to_string()],
            addr.as_bytes().to_vec(),
        );
        let mut flow = Flow::new(Rc::clone(&config));
        if flow.on_headers(&mut host, false) == Action::Pause && host.replies.is_empty() {
            let size = host.body.len();
            flow.on_body(&mut host, size, true);
        }
        (flow, host)
    };
    let ops = Some("Bearer sk-gw-ops");
    // Two live calls for the operator key's principal.
    let mut live = Vec::new();
    for _ in 0..2 {
        let (mut flow, mut host) = create(ops, "192.0.2.1:1000");
        let id = sent_call_id(&host);
        respond(&mut flow, &mut host, OK, None, &answer_sdp(&id));
        assert_eq!(host.last_reply().status, 201);
        live.push(id);
    }
    // A third: 429, concurrent calls, nothing dispatched, no worker held.
    let (_f, host) = create(ops, "192.0.2.1:1001");
    assert!(host.dispatched.is_empty());
    let reply = host.last_reply();
    assert_eq!(reply.status, 429);
    let json: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(json["error"]["code"], "rate_limit_exceeded");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("concurrent"));
    assert!(reply.header("retry-after").is_some());
    let outstanding: u64 = ["a", "b"]
        .iter()
        .map(|w| host.stored(&outstanding_key(w)))
        .sum();
    assert_eq!(outstanding, 2, "the refused create holds no worker");
    // The owner hangs one up: room for one more, which fails at the relay (released again).
    let path = format!("/v1/realtime/calls/{}/hangup", live[0]);
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", &path),
            ("authorization", "Bearer sk-gw-ops"),
        ],
        b"",
    );
    host.store = store_host.store.share();
    let mut flow = Flow::new(Rc::clone(&config));
    flow.on_headers(&mut host, true);
    let body = HangupCallResponse {
        // An operator's answer shows the call's owner.
        call: Some(CallInfo {
            worker_id: "a".into(),
            principal: crate::identity::principal_of("api_key", "ops"),
            ..Default::default()
        }),
        ended_now: true,
    }
    .encode_to_vec();
    respond(&mut flow, &mut host, OK, None, &body);
    let (mut flow, mut host) = create(ops, "192.0.2.1:1002");
    respond(
        &mut flow,
        &mut host,
        UNAVAILABLE,
        Some("upstream_unreachable: x"),
        &[],
    );
    assert_eq!(host.last_reply().status, 502);
    // That was the fourth creation this minute: the fifth is refused per minute.
    let (_f, host) = create(ops, "192.0.2.1:1003");
    assert_eq!(host.last_reply().status, 429);
    let json: serde_json::Value = serde_json::from_slice(&host.last_reply().body).unwrap();
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per minute"),
        "{json}"
    );
    // Anonymous callers are counted per address: another address is unaffected.
    for _ in 0..4 {
        let (_f, host) = create(None, "198.51.100.7:2000");
        assert!(!host.dispatched.is_empty());
    }
    let (_f, host) = create(None, "198.51.100.7:2001");
    assert_eq!(host.last_reply().status, 429);
    let (_f, host) = create(None, "198.51.100.8:2000");
    assert_eq!(host.dispatched.len(), 1);
}

/// With a global rate-limit service, a create asks it first (descriptors keyed by the
/// caller's principal): OVER_LIMIT is 429 with the service's Retry-After and nothing held; OK
/// sends the create; a failing service lets it through, or refuses it with deny_on_failure.
#[test]
fn a_global_rate_limit_service_is_asked_before_the_create() {
    use realtime_relay_proto::rls::{
        rate_limit_response::{Code, DescriptorStatus},
        Duration as RlsDuration, RateLimitRequest, RateLimitResponse,
    };
    let config_with = |deny: bool| {
        let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
        v["global_rate_limit"] = serde_json::json!({"cluster": "ratelimit", "domain": "realtime", "deny_on_failure": deny});
        Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap())
    };
    let answer = |code: Code, reset_s: i64| {
        let mut r = RateLimitResponse::default();
        r.set_overall_code(code);
        let mut s = DescriptorStatus::default();
        s.set_code(code);
        s.duration_until_reset = Some(RlsDuration {
            seconds: reset_s,
            nanos: 0,
        });
        r.statuses.push(s);
        r.encode_to_vec()
    };
    let start_create = |config: &Rc<Config>| {
        let mut host = FakeHost::request(
            &[
                (":method", "POST"),
                (":path", "/v1/realtime/calls"),
                ("content-type", "application/sdp"),
                ("authorization", "Bearer sk-gw-ops"),
            ],
            OFFER.as_bytes(),
        );
        let mut flow = Flow::new(Rc::clone(config));
        assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
        let size = host.body.len();
        flow.on_body(&mut host, size, true);
        (flow, host)
    };
    let config = config_with(false);
    // Over the limit.
    let (mut flow, mut host) = start_create(&config);
    let ask = host.last_dispatch().clone();
    assert_eq!(
        (ask.service, ask.method, ask.cluster.as_str()),
        (global_limit::SERVICE_NAME, "ShouldRateLimit", "ratelimit")
    );
    let req = RateLimitRequest::decode(ask.message.as_slice()).unwrap();
    assert_eq!(
        req.descriptors[0].entries[0].value,
        crate::identity::principal_of("api_key", "ops")
    );
    respond(&mut flow, &mut host, OK, None, &answer(Code::OverLimit, 30));
    assert_eq!(host.dispatched.len(), 1, "no create after OVER_LIMIT");
    assert_eq!(host.last_reply().status, 429);
    assert_eq!(host.last_reply().header("retry-after"), Some("30"));
    assert_eq!(
        host.stored(&outstanding_key("a")) + host.stored(&outstanding_key("b")),
        0
    );
    // Within the limit: the create goes out.
    let (mut flow, mut host) = start_create(&config);
    respond(&mut flow, &mut host, OK, None, &answer(Code::Ok, 0));
    assert_eq!(host.last_dispatch().method, "CreateCall");
    // The service fails: through by default, 503 with deny_on_failure.
    let (mut flow, mut host) = start_create(&config);
    respond(&mut flow, &mut host, UNAVAILABLE, None, &[]);
    assert_eq!(host.last_dispatch().method, "CreateCall");
    let denying = config_with(true);
    let (mut flow, mut host) = start_create(&denying);
    respond(&mut flow, &mut host, UNAVAILABLE, None, &[]);
    assert_eq!(host.dispatched.len(), 1);
    assert_eq!(host.last_reply().status, 503);
    // A client that leaves while the service is asked holds nothing.
    let (mut flow, mut host) = start_create(&config);
    flow.on_done(&mut host);
    assert_eq!(host.cancelled.len(), 1);
    assert_eq!(
        host.stored(&outstanding_key("a")) + host.stored(&outstanding_key("b")),
        0
    );
}

/// A GPT-Live session: the create goes to the relay as a Live call with a `live_` id, and the
/// answer is the Live JSON shape with that id; its hangup is under the Live path.
#[test]
fn a_live_session_is_created_answered_in_its_shape_and_hung_up() {
    use realtime_relay_proto::v1::Api;
    let config = Rc::new(sample());
    let body = serde_json::json!({
        "session": {"model": "gpt-live-1", "instructions": "be brief"},
        "transport": {"type": "webrtc", "sdp": OFFER}
    })
    .to_string();
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/live/sessions"),
            ("content-type", "application/json"),
        ],
        body.as_bytes(),
    );
    let mut flow = start(&config, &mut host);
    let sent = CreateCallRequest::decode(host.last_dispatch().message.as_slice()).unwrap();
    assert_eq!(sent.api(), Api::Live);
    assert!(sent.call_id.starts_with("live_"), "{}", sent.call_id);
    assert_eq!(sent.model, "gpt-live-1");
    let session: serde_json::Value = serde_json::from_str(&sent.session_json).unwrap();
    assert_eq!(session["instructions"], "be brief");
    respond(&mut flow, &mut host, OK, None, &answer_sdp(&sent.call_id));
    let reply = host.last_reply();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["session"]["id"], sent.call_id.as_str());
    assert_eq!(
        (
            v["transport"]["type"].as_str(),
            v["transport"]["sdp"].as_str()
        ),
        (Some("webrtc"), Some("v=0\r\n"))
    );

    let path = format!("/v1/live/sessions/{}/hangup", sent.call_id);
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", &path)], b"");
    Flow::new(Rc::clone(&config)).on_headers(&mut host, true);
    assert_eq!(host.last_dispatch().method, "HangupCall");
}

/// A sideband upgrade: held in its headers while the relay is asked (`GetCall` as the caller),
/// then rewritten for the worker (the provider's id, its host, the pool's key, the cluster
/// header) and let go on; a call the relay will not show the caller is a 404 with nothing
/// forwarded; a cluster header from the client is removed on every request.
#[test]
fn a_sideband_upgrade_is_held_looked_up_and_rewritten_for_its_worker() {
    let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
    v["pools"][0]["workers"][0]["cluster"] = serde_json::json!("worker_a");
    let config = Rc::new(Config::from_json(v.to_string().as_bytes(), &env).unwrap());
    let worker = config.pools[0].workers[0].clone();
    let path = "/v1/realtime?call_id=rtc_0123456789abcdef0123456789abcdef";
    let upgrade = |auth: Option<&str>| {
        let mut h = vec![
            (":method", "GET"),
            (":path", path),
            (":authority", "gateway.example"),
            ("upgrade", "websocket"),
            (crate::sideband::CLUSTER_HEADER, "relay"),
        ];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        FakeHost::request(&h, b"")
    };
    let mut host = upgrade(Some("Bearer sk-gw-ops"));
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
    assert!(
        !host.headers.contains_key(crate::sideband::CLUSTER_HEADER),
        "the client's cluster header is gone"
    );
    let d = host.last_dispatch().clone();
    assert_eq!((d.cluster.as_str(), d.method), ("relay", "GetCall"));
    let asked = realtime_relay_proto::v1::GetCallRequest::decode(d.message.as_slice()).unwrap();
    assert!(asked.operator, "the ops key is an operator");
    let info = realtime_relay_proto::v1::CallInfo {
        call_id: "rtc_0123456789abcdef0123456789abcdef".into(),
        worker_id: worker.id.clone(),
        upstream_call_id: "rtc_provider42".into(),
        state: realtime_relay_proto::v1::CallState::Connected as i32,
        ..Default::default()
    };
    respond(&mut flow, &mut host, OK, None, &info.encode_to_vec());
    assert!(host.replies.is_empty(), "{:?}", host.replies);
    assert!(host.resumed);
    let (authority, prefix) = worker
        .base_url
        .split_once("://")
        .map(|(_, r)| r.split_once('/').map_or((r, ""), |(a, p)| (a, p)))
        .unwrap();
    let want_path = if prefix.is_empty() {
        "/v1/realtime?call_id=rtc_provider42".to_string()
    } else {
        format!("/{prefix}/v1/realtime?call_id=rtc_provider42")
    };
    assert_eq!(host.headers[":path"], want_path);
    assert_eq!(host.headers[":authority"], authority);
    assert_eq!(host.headers[crate::sideband::CLUSTER_HEADER], "worker_a");
    assert_eq!(
        host.headers["authorization"],
        worker.key.as_ref().unwrap().bearer(),
        "the pool's key, never the caller's gateway key"
    );
    assert_eq!(host.counter(metrics::REQ_SIDEBAND), 1);

    // Not the caller's call (or no such call): 404, nothing forwarded.
    let mut host = upgrade(None);
    let mut flow = Flow::new(Rc::clone(&config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
    respond(&mut flow, &mut host, 5, Some("call_not_found: x"), &[]);
    assert_eq!(host.last_reply().status, 404);
    assert!(!host.resumed);
    // A Live id on the Realtime sideband is nobody's, without asking the relay.
    let mut host = FakeHost::request(
        &[
            (":method", "GET"),
            (
                ":path",
                "/v1/realtime?call_id=live_0123456789abcdef0123456789abcdef",
            ),
        ],
        b"",
    );
    Flow::new(Rc::clone(&config)).on_headers(&mut host, false);
    assert!(host.dispatched.is_empty());
    assert_eq!(host.last_reply().status, 404);
}
