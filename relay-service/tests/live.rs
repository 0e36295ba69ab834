//! GPT-Live calls through the relay over real UDP on loopback: the echo model's
//! `POST /v1/live/sessions` upstream, a str0m client downstream, gRPC in between.

mod common;

use common::{Harness, UPSTREAM_KEY};
use echo_model::{ClientConfig, ConnectedClient, ProviderConfig, TestClient};
use realtime_relay_proto::v1;
use std::time::Duration;
use tonic::Code;

const T: Duration = Duration::from_secs(10);

/// A GPT-Live CreateCall as the filter sends it: the client's session object, the model as
/// the client named it and as it goes upstream.
fn live_request(h: &Harness, offer: &str, session: &str) -> v1::CreateCallRequest {
    v1::CreateCallRequest {
        model: "my-live-alias".into(),
        upstream_model: "gpt-live-1".into(),
        api: v1::Api::Live as i32,
        ..h.request(offer, "my-live-alias", session)
    }
}

/// CreateCall for a Live call, then connect the client.
async fn live_call(h: &mut Harness, session: &str) -> (String, String, ConnectedClient) {
    let (client, offer) = TestClient::new(ClientConfig::default()).expect("client");
    let resp = h
        .grpc
        .create_call(live_request(h, &offer, session))
        .await
        .expect("CreateCall succeeds")
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("expected an SDP answer, got {:?}", resp.outcome);
    };
    let connected = client
        .connect(&answer)
        .await
        .expect("client connects through the relay");
    (resp.call_id, offer, connected)
}

async fn audio_comes_back(client: &ConnectedClient, at_least: u64) {
    client
        .send_audio(25, Duration::from_millis(20))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while client.audio_stats().packets_received < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "audio did not come back: {:?}",
            client.audio_stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(h: &mut Harness, call_id: &str) -> v1::CallInfo {
    h.grpc
        .get_call(v1::GetCallRequest {
            call_id: call_id.into(),
            operator: true,
            ..Default::default()
        })
        .await
        .expect("GetCall")
        .into_inner()
}

/// The whole life of a GPT-Live call: a `live_` id; the provider got the Live JSON body (the
/// client's session with the model rewritten, a webrtc transport carrying the relay's own
/// offer); `session.started` comes first; events and audio flow both ways; usage arrives as
/// growing totals; HangupCall makes the relay POST the Live hangup to the provider, and the
/// client receives the provider's `session.closed` before its connection closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_call_runs_from_create_to_session_closed_on_hangup() {
    let mut h = Harness::start(&[]).await;
    let (call_id, client_offer, mut client) = live_call(
        &mut h,
        r#"{"model":"my-live-alias","instructions":"be brief"}"#,
    )
    .await;
    assert!(
        call_id.starts_with("live_") && realtime_relay_proto::call_id::is_valid(&call_id),
        "{call_id}"
    );

    let reqs = h.provider.requests();
    assert_eq!(reqs.len(), 1);
    let req = &reqs[0];
    assert_eq!(req.path, "/v1/live/sessions");
    assert_eq!(req.content_type, "application/json");
    assert_eq!(
        req.authorization.as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    let body = req.json.as_ref().expect("a JSON body");
    assert_eq!(
        body["session"],
        serde_json::json!({"model": "gpt-live-1", "instructions": "be brief"}),
        "the client's session, model rewritten"
    );
    assert_eq!(body["transport"]["type"], "webrtc");
    let upstream_offer = body["transport"]["sdp"].as_str().unwrap();
    assert!(upstream_offer.starts_with("v=0"));
    assert_ne!(upstream_offer, client_offer, "the relay's own offer");
    assert!(
        !upstream_offer.contains("a=ice-lite"),
        "the upstream leg is full ICE"
    );

    let first = client.next_event(T).await.expect("a first event");
    assert_eq!(first["type"], "session.started", "{first}");
    assert_eq!(first["session"]["model"], "gpt-live-1");
    // The client sees the session by the gateway's id only, even in the provider's events;
    // the provider's own id is kept for its hangup.
    assert_eq!(
        first["session"]["id"],
        call_id.as_str(),
        "the client sees the gateway's id: {first}"
    );
    let info = h
        .wait_for_state(&call_id, v1::CallState::Connected, T)
        .await;
    let upstream_id = info.upstream_call_id.clone();
    assert!(
        upstream_id.starts_with("live_") && upstream_id != call_id,
        "the provider's session id is the call's upstream id: {upstream_id}"
    );

    client
        .send_text(r#"{"type":"response.create","event_id":"e1"}"#)
        .await
        .unwrap();
    let echo = client
        .wait_for_event_type("response.create", T)
        .await
        .expect("the event comes back");
    assert_eq!(echo["event_id"], "e1");
    audio_comes_back(&client, 20).await;
    assert!(h.provider.stats().rtp_packets_received >= 20);

    let mut totals = Vec::new();
    while totals.len() < 2 {
        let u = client
            .wait_for_event_type("session.usage.updated", T)
            .await
            .expect("usage");
        totals.push(u["usage"]["seconds"].as_f64().unwrap());
    }
    assert!(totals[1] > totals[0], "cumulative totals: {totals:?}");

    let asked = std::time::Instant::now();
    let ended = h
        .grpc
        .hangup_call(v1::HangupCallRequest {
            call_id: call_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The provider closes at once, so the hangup never waits out its bound (it did, 6.5 s,
    // when the call ended before the relay started waiting for it).
    assert!(
        asked.elapsed() < relay_service::relay::LIVE_CLOSE_WAIT,
        "the hangup took {:?}",
        asked.elapsed()
    );
    assert!(ended.ended_now);
    let info = ended.call.unwrap();
    assert_eq!(info.state, v1::CallState::Ended as i32);
    assert_eq!(info.end_reason, "hangup");
    assert_eq!(h.provider.hangups(), vec![upstream_id.clone()]);
    let closed = client
        .wait_for_event_type("session.closed", T)
        .await
        .expect("the provider's session.closed reaches the client");
    assert_eq!(closed["reason"], "close_requested");
    assert_eq!(
        closed["session"]["id"],
        call_id.as_str(),
        "the gateway's id"
    );
    assert!(closed["usage"]["seconds"].as_f64().unwrap() >= totals[1]);
    assert!(client.wait_closed(T).await, "then the connection closes");
    assert!(h.provider.wait_for_active_calls(0, T).await);
    assert_eq!(h.relay.relay.registry().live_count(), 0);

    // Retried hangups are answered, and the provider is asked once.
    let again = h
        .grpc
        .hangup_call(v1::HangupCallRequest {
            call_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.ended_now);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.provider.hangups().len(), 1);
    let text = h.metrics_text().await;
    assert!(
        text.contains(r#"realtime_relay_calls_ended_total{reason="hangup"} 1"#),
        "{text}"
    );
    // The worker is listed (it served the call) with no failure against it.
    assert_eq!(
        common::metric(
            &text,
            r#"realtime_relay_worker_failures_total{worker="w1"}"#
        ),
        0.0,
        "{text}"
    );
}

/// The client ends the session itself (`session.close`): the provider answers
/// `session.closed` and closes, the client gets the event, and the call ends as
/// `session_closed`: the Live API's own end, neither a worker failure nor a reason to send
/// the provider a hangup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_session_close_ends_the_call_as_session_closed_not_as_a_worker_failure() {
    let mut h = Harness::start(&[]).await;
    let (call_id, _, mut client) = live_call(&mut h, "").await;
    client
        .wait_for_event_type("session.started", T)
        .await
        .unwrap();
    client
        .send_text(r#"{"type":"session.close","event_id":"bye"}"#)
        .await
        .unwrap();
    let closed = client
        .wait_for_event_type("session.closed", T)
        .await
        .unwrap();
    assert_eq!(closed["reason"], "close_requested");
    assert_eq!(closed["client_event_id"], "bye");
    assert!(client.wait_closed(T).await);
    let info = h.wait_for_state(&call_id, v1::CallState::Ended, T).await;
    assert_eq!(info.end_reason, "session_closed");
    // The provider got `{"model": <upstream model>}` for a client that sent no session.
    assert_eq!(
        h.provider.requests()[0].session,
        Some(serde_json::json!({"model": "gpt-live-1"}))
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        h.provider.hangups().is_empty(),
        "{:?}",
        h.provider.hangups()
    );
    let text = h.metrics_text().await;
    assert!(
        text.contains(r#"realtime_relay_calls_ended_total{reason="session_closed"} 1"#),
        "{text}"
    );
    // The worker is listed (it served the call) with no failure against it.
    assert_eq!(
        common::metric(
            &text,
            r#"realtime_relay_worker_failures_total{worker="w1"}"#
        ),
        0.0,
        "{text}"
    );
}

/// One relay carries a Realtime call and a GPT-Live call at once, each with its own id
/// prefix, upstream path, first event, echoes and audio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_and_a_live_call_run_side_by_side_on_one_relay() {
    let mut h = Harness::start(&[]).await;
    let (rtc_id, mut realtime) = h
        .call(
            ClientConfig::default(),
            "gpt-realtime",
            r#"{"instructions":"hi"}"#,
        )
        .await;
    let (live_id, _, mut live) = live_call(&mut h, r#"{"instructions":"hi"}"#).await;
    assert!(rtc_id.starts_with("rtc_"), "{rtc_id}");
    assert!(live_id.starts_with("live_"), "{live_id}");
    let paths: Vec<String> = h.provider.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v1/realtime/calls", "/v1/live/sessions"]);

    let first = realtime.next_event(T).await.unwrap();
    assert_eq!(first["type"], "session.created");
    let first = live.next_event(T).await.unwrap();
    assert_eq!(first["type"], "session.started");
    for (client, tag) in [(&mut realtime, "rt"), (&mut live, "live")] {
        client
            .send_text(&format!(
                r#"{{"type":"response.create","event_id":"{tag}"}}"#
            ))
            .await
            .unwrap();
        let echo = client
            .wait_for_event_type("response.create", T)
            .await
            .unwrap();
        assert_eq!(echo["event_id"], tag, "each call gets its own echo");
    }
    let (a, b) = tokio::join!(audio_comes_back(&realtime, 20), audio_comes_back(&live, 20));
    let _ = (a, b);
    assert_eq!(h.relay.relay.registry().live_count(), 2);
    for id in [&rtc_id, &live_id] {
        assert_eq!(
            get(&mut h, id).await.state,
            v1::CallState::Connected as i32,
            "{id}"
        );
    }
    live.close().await;
    realtime.close().await;
}

/// The provider's refusal of a Live create reaches the caller as it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rejection_of_a_live_create_comes_back_verbatim() {
    let body = r#"{"error":{"message":"Missing required parameter: 'session.model'.","type":"invalid_request_error","param":"session.model","code":"missing_required_parameter"}}"#;
    let config = ProviderConfig {
        reject_with: Some((400, "application/json".into(), body.into())),
        ..ProviderConfig::local(Some(UPSTREAM_KEY))
    };
    let mut h = Harness::start_with(config, &[]).await;
    let (_c, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let resp = h
        .grpc
        .create_call(live_request(&h, &offer, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.call_id.starts_with("live_"), "{}", resp.call_id);
    let Some(v1::create_call_response::Outcome::UpstreamRejection(r)) = resp.outcome else {
        panic!("expected a rejection: {:?}", resp.outcome);
    };
    assert_eq!(r.status, 400);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.body, body.as_bytes());
    assert_eq!(h.provider.requests()[0].path, "/v1/live/sessions");
    assert_eq!(h.relay.relay.registry().live_count(), 0);
}

/// A 2xx Live answer that is not `{session: {id}, transport: {type: webrtc, sdp}}` is the
/// worker's fault (`upstream_invalid_answer`), and nothing of the call is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_live_answers_are_refused_as_the_workers_fault() {
    for (status, body) in [
        (200, "v=0\r\n".to_string()),
        (200, "{".to_string()),
        (
            201,
            r#"{"session":{"id":"live_1"},"transport":{"type":"webrtc"}}"#.to_string(),
        ),
        (
            200,
            r#"{"transport":{"type":"webrtc","sdp":"v=0\r\n"}}"#.to_string(),
        ),
        (
            200,
            r#"{"session":{"id":"../x"},"transport":{"type":"webrtc","sdp":"v=0\r\n"}}"#
                .to_string(),
        ),
    ] {
        let config = ProviderConfig {
            reject_with: Some((status, "application/json".into(), body.clone())),
            ..ProviderConfig::local(Some(UPSTREAM_KEY))
        };
        let mut h = Harness::start_with(config, &[]).await;
        let (_c, offer) = TestClient::new(ClientConfig::default()).unwrap();
        let err = h
            .grpc
            .create_call(live_request(&h, &offer, ""))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Internal, "{body}: {err:?}");
        assert_eq!(
            realtime_relay_proto::split_status_message(err.message()).0,
            Some("upstream_invalid_answer"),
            "{body}: {}",
            err.message()
        );
        assert_eq!(h.relay.relay.registry().live_count(), 0);
        let reqs = h.provider.requests();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].path, "/v1/live/sessions", "read as a Live answer");
        let text = h.metrics_text().await;
        assert_eq!(
            common::metric(
                &text,
                r#"realtime_relay_worker_failures_total{worker="w1"}"#
            ),
            1.0,
            "{body}"
        );
    }
}

/// A call's id names its API: a Live create with an `rtc_` id, a Realtime one with a `live_`
/// id, an unknown API, or a Live create with no model anywhere are client faults, refused
/// before the upstream hears of the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_call_id_must_name_the_calls_api() {
    let mut h = Harness::start(&[]).await;
    let (_c, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let (live_base, realtime_base) = (
        live_request(&h, &offer, ""),
        h.request(&offer, "gpt-realtime", ""),
    );
    let live = |call_id: &str| v1::CreateCallRequest {
        call_id: call_id.into(),
        ..live_base.clone()
    };
    let realtime = |call_id: &str| v1::CreateCallRequest {
        call_id: call_id.into(),
        ..realtime_base.clone()
    };
    let rows = [
        (
            live("rtc_0123456789abcdef0123456789abcdef"),
            "call_id_api_mismatch",
        ),
        (
            realtime("live_0123456789abcdef0123456789abcdef"),
            "call_id_api_mismatch",
        ),
        (live("live_../x"), "invalid_call_id"),
        (
            v1::CreateCallRequest { api: 7, ..live("") },
            "unsupported_api",
        ),
        (
            v1::CreateCallRequest {
                model: String::new(),
                upstream_model: String::new(),
                ..live("")
            },
            "missing_model",
        ),
    ];
    for (req, code) in rows {
        let asked = format!("api {} id {:?}", req.api, req.call_id);
        let err = h.grpc.create_call(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{asked}: {err:?}");
        assert_eq!(
            realtime_relay_proto::split_status_message(err.message()).0,
            Some(code),
            "{asked}: {}",
            err.message()
        );
    }
    assert!(
        h.provider.requests().is_empty(),
        "the upstream heard nothing"
    );
    // A caller-chosen live_ id is kept as given.
    let id = "live_0123456789abcdef0123456789abcdef";
    let resp = h.grpc.create_call(live(id)).await.unwrap().into_inner();
    assert_eq!(resp.call_id, id);
}
