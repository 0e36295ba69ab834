//! The request lifecycle with relay pods (`relay_pods`): calls named by the pod that holds
//! them, hangups steered to that pod, forged names refused, load counted over every pod.

use std::net::SocketAddr;
use std::rc::Rc;

use prost::Message;
use realtime_relay_proto::call_id;
use realtime_relay_proto::replica_token::ReplicaKey;
use realtime_relay_proto::v1::{
    create_call_response::Outcome, CreateCallRequest, CreateCallResponse, ListCallsResponse,
};

use super::*;
use crate::config::tests::{env, pods_sample, REPLICA_SECRET};
use crate::fake_host::FakeHost;
use crate::host::Action;
use crate::load_refresh::LoadRefresh;
use crate::pods::ORIGINAL_DST_HEADER;
use crate::routing::outstanding_key;
use crate::sdp::tests::OFFER;

const OK: u32 = 0;
const UNAVAILABLE: u32 = 14;

fn pods_config() -> Rc<Config> {
    Rc::new(Config::from_json(pods_sample().to_string().as_bytes(), &env).unwrap())
}

/// The id a relay at `addr` gives the call the filter asked for as `plain`.
fn named_by(addr: &str, secret: &[u8], plain: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    let token = ReplicaKey::new(secret).unwrap().mint(addr);
    call_id::with_replica(plain, &token).unwrap()
}

fn create(config: &Rc<Config>) -> (Flow, FakeHost) {
    let mut host = FakeHost::request(
        &[
            (":method", "POST"),
            (":path", "/v1/realtime/calls?model=echo"),
            ("content-type", "application/sdp"),
            ("authorization", "Bearer sk-client-secret"),
        ],
        OFFER.as_bytes(),
    );
    let mut flow = Flow::new(Rc::clone(config));
    assert_eq!(flow.on_headers(&mut host, false), Action::Pause);
    let size = host.body.len();
    assert_eq!(flow.on_body(&mut host, size, true), Action::Pause);
    (flow, host)
}

fn answer(flow: &mut Flow, host: &mut FakeHost, call_id: &str) {
    let body = CreateCallResponse {
        call_id: call_id.to_string(),
        outcome: Some(Outcome::SdpAnswer("v=0\r\n".into())),
    }
    .encode_to_vec();
    let token = host.last_dispatch().token;
    flow.on_grpc_response(host, token, OK, None, Some(&body));
}

fn hangup(config: &Rc<Config>, id: &str) -> FakeHost {
    let path = format!("/v1/realtime/calls/{id}/hangup");
    let mut host = FakeHost::request(&[(":method", "POST"), (":path", &path)], b"");
    assert_eq!(
        Flow::new(Rc::clone(config)).on_headers(&mut host, true),
        Action::Pause
    );
    host
}

#[test]
fn a_call_is_named_by_its_pod_and_its_hangup_goes_to_that_pod_only() {
    let config = pods_config();
    let (mut flow, mut host) = create(&config);
    let d = host.last_dispatch().clone();
    // Creates go to the Service's cluster, balanced by Envoy: no pod is chosen here.
    assert_eq!((d.cluster.as_str(), d.method), ("relay", "CreateCall"));
    assert!(d.metadata.iter().all(|(k, _)| k != ORIGINAL_DST_HEADER));
    let sent = CreateCallRequest::decode(d.message.as_slice())
        .unwrap()
        .call_id;
    assert!(call_id::plain_random_part(&sent).is_some(), "{sent}");
    let named = named_by("10.244.1.7:50051", REPLICA_SECRET.as_bytes(), &sent);
    answer(&mut flow, &mut host, &named);
    let reply = host.last_reply();
    assert_eq!(reply.status, 201);
    let location = reply
        .headers
        .iter()
        .find(|(k, _)| k == "location")
        .map(|(_, v)| v.clone())
        .unwrap();
    assert_eq!(location, format!("/v1/realtime/calls/{named}"));

    let host = hangup(&config, &named);
    let d = host.last_dispatch();
    assert_eq!((d.cluster.as_str(), d.method), ("relay_pods", "HangupCall"));
    assert!(
        d.metadata.contains(&(
            ORIGINAL_DST_HEADER.to_string(),
            "10.244.1.7:50051".to_string()
        )),
        "{:?}",
        d.metadata
    );
    // IPv6 pods are written the way Envoy parses them.
    let v6 = named_by("[fd00::7]:50051", REPLICA_SECRET.as_bytes(), &sent);
    let host = hangup(&config, &v6);
    assert!(host.last_dispatch().metadata.contains(&(
        ORIGINAL_DST_HEADER.to_string(),
        "[fd00::7]:50051".to_string()
    )));
}

#[test]
fn ids_whose_pod_name_does_not_verify_are_not_found_and_nothing_is_dispatched() {
    let config = pods_config();
    let plain = call_id::new(&[0x5a; 16], None);
    let other_key = named_by("10.0.0.1:50051", &[b'x'; 32], &plain);
    let valid = named_by("10.0.0.1:50051", REPLICA_SECRET.as_bytes(), &plain);
    // A client rewriting the address in a valid token, keeping the tag.
    let (token, random) = valid
        .strip_prefix("rtc_")
        .unwrap()
        .rsplit_once('_')
        .unwrap();
    let mut bytes = token.as_bytes().to_vec();
    bytes[2] = if bytes[2] == b'A' { b'B' } else { b'A' };
    let rewritten = format!("rtc_{}_{random}", String::from_utf8(bytes).unwrap());
    for id in [
        plain.as_str(),
        other_key.as_str(),
        rewritten.as_str(),
        "rtc_r1_0123456789abcdef0123456789abcdef",
        "rtc_MTI3LjAuMC4xOjgw_0123456789abcdef0123456789abcdef",
    ] {
        let host = hangup(&config, id);
        assert!(host.dispatched.is_empty(), "{id}");
        assert_eq!(host.last_reply().status, 404, "{id}");
        let body = String::from_utf8_lossy(&host.last_reply().body).into_owned();
        assert!(body.contains("call_not_found"), "{id}: {body}");
    }
}

#[test]
fn a_relay_that_does_not_name_its_calls_is_refused_loudly() {
    let config = pods_config();
    for returned in ["", "plain", "other-key", "other-random"] {
        let (mut flow, mut host) = create(&config);
        let sent = CreateCallRequest::decode(host.last_dispatch().message.as_slice())
            .unwrap()
            .call_id;
        let id = match returned {
            "" => String::new(),
            "plain" => sent.clone(),
            "other-key" => named_by("10.0.0.1:50051", &[b'x'; 32], &sent),
            _ => named_by(
                "10.0.0.1:50051",
                REPLICA_SECRET.as_bytes(),
                &call_id::new(&[1; 16], None),
            ),
        };
        answer(&mut flow, &mut host, &id);
        assert_eq!(host.last_reply().status, 502, "{returned}");
        assert_eq!(host.counter(&metrics::error(relay::UNNAMED_POD_CALL)), 1);
        assert_eq!(host.stored(&outstanding_key("echo1")), 0, "{returned}");
        let logs = host.log_text();
        assert!(logs.contains("--replica-addr"), "{logs}");
        assert!(!logs.contains(REPLICA_SECRET), "{logs}");
    }
}

#[test]
fn the_load_refresh_asks_every_pod_the_first_answer_lists() {
    let config = pods_config();
    let mut host = FakeHost::default();
    host.now_ms = 100_000;
    let mut refresh = LoadRefresh::default();
    refresh.on_tick(&config, &mut host);
    assert_eq!(host.dispatched.len(), 1);
    assert_eq!(host.dispatched[0].cluster, "relay");
    let listed = |own: &str, replicas: &[&str], live: &[(&str, u32)]| {
        ListCallsResponse {
            live_calls_by_worker: live.iter().map(|(k, v)| ((*k).to_string(), *v)).collect(),
            replica_addr: own.to_string(),
            replicas: replicas.iter().map(|r| (*r).to_string()).collect(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let pods = [
        "10.0.0.1:50051",
        "10.0.0.2:50051",
        "10.0.0.3:50051",
        "not-an-address",
    ];
    let first = host.dispatched[0].token;
    refresh.on_grpc_response(
        &config,
        &mut host,
        first,
        OK,
        Some(&listed("10.0.0.2:50051", &pods, &[("a", 1)])),
    );
    // The two other pods, each through the pods cluster at its own address.
    let asked: Vec<(String, String)> = host.dispatched[1..]
        .iter()
        .map(|d| {
            let dst = d
                .metadata
                .iter()
                .find(|(k, _)| k == ORIGINAL_DST_HEADER)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (d.cluster.clone(), dst)
        })
        .collect();
    assert_eq!(
        asked,
        vec![
            ("relay_pods".to_string(), "10.0.0.1:50051".to_string()),
            ("relay_pods".to_string(), "10.0.0.3:50051".to_string()),
        ]
    );
    assert_eq!(
        host.stored(&outstanding_key("a")),
        0,
        "not before every pod answered"
    );
    let t: Vec<u32> = host.dispatched[1..].iter().map(|d| d.token).collect();
    // The pods' own lists do not start another fan-out.
    refresh.on_grpc_response(
        &config,
        &mut host,
        t[0],
        OK,
        Some(&listed("10.0.0.1:50051", &pods, &[("a", 2), ("b", 5)])),
    );
    refresh.on_grpc_response(&config, &mut host, t[1], UNAVAILABLE, None);
    assert_eq!(host.dispatched.len(), 3);
    assert_eq!(host.stored(&outstanding_key("a")), 3);
    assert_eq!(host.stored(&outstanding_key("b")), 5);
    assert_eq!(host.counter(metrics::LOAD_REFRESH), 1);

    // A relay without a pod name: its counts stand, one warning per VM.
    host.now_ms += config.load_refresh_ms;
    for _ in 0..2 {
        refresh.on_tick(&config, &mut host);
        let token = host.last_dispatch().token;
        refresh.on_grpc_response(
            &config,
            &mut host,
            token,
            OK,
            Some(&listed("", &[], &[("a", 4)])),
        );
        host.now_ms += config.load_refresh_ms;
    }
    assert_eq!(host.stored(&outstanding_key("a")), 4);
    assert_eq!(host.log_text().matches("names no replica").count(), 1);
}
