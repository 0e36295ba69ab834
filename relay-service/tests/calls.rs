//! Calls through the relay over real UDP on loopback: an echo-model provider upstream,
//! a str0m client downstream, gRPC in between.

mod common;

use common::{client_with_pt, Harness, UPSTREAM_KEY};
use echo_model::{ClientConfig, DcMessage, ProviderConfig};
use realtime_relay_proto::v1;
use std::time::Duration;
use tonic::Code;

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_audio_flow_both_ways_with_payload_types_mapped() {
    let mut h = Harness::start(&[]).await;
    // The client offers Opus as 109; the relay's upstream offer uses str0m's own number.
    let (call_id, mut client) = h
        .call(
            client_with_pt(109),
            "gpt-realtime",
            r#"{"instructions":"hi"}"#,
        )
        .await;
    assert!(call_id.starts_with("rtc_"), "{call_id}");

    // The upstream saw multipart with our session, model set.
    let req = &h.provider.requests()[0];
    assert!(
        req.content_type.starts_with("multipart/form-data"),
        "{}",
        req.content_type
    );
    let session = req.session.as_ref().expect("session part");
    assert_eq!(session["model"], "gpt-realtime");
    assert_eq!(session["instructions"], "hi");
    assert_eq!(
        req.authorization.as_deref(),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    let upstream_offer = &req.sdp;
    assert!(
        !upstream_offer.contains("a=ice-lite"),
        "the upstream leg is full ICE"
    );

    let created = client
        .wait_for_event_type("session.created", T)
        .await
        .expect("session.created");
    assert_eq!(created["session"]["model"], "gpt-realtime");

    client
        .send_text(r#"{"type":"response.create","event_id":"e1"}"#)
        .await
        .unwrap();
    let echo = client
        .wait_for_event_type("response.create", T)
        .await
        .expect("event echo");
    assert_eq!(echo["event_id"], "e1");

    // A large event both ways, intact.
    let big: Vec<u8> = (0..61_440u32).map(|i| (i % 251) as u8).collect();
    client.send_binary(&big).await.unwrap();
    let back = loop {
        match client.recv_message(T).await.expect("big echo") {
            DcMessage::Binary(b) => break b,
            DcMessage::Text(_) => continue,
        }
    };
    assert_eq!(back, big);

    client
        .send_audio(50, Duration::from_millis(20))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while client.audio_stats().packets_received < 45 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = client.audio_stats();
    assert!(stats.packets_received >= 45, "{stats:?}");
    assert_eq!(
        stats.payload_types_received,
        vec![109],
        "mapped back to the client's number"
    );
    let upstream_pt = h.provider.stats();
    assert!(upstream_pt.rtp_packets_received >= 45, "{upstream_pt:?}");

    let info = h
        .wait_for_state(&call_id, v1::CallState::Connected, T)
        .await;
    let up = info.client_to_upstream.unwrap();
    let down = info.upstream_to_client.unwrap();
    assert!(up.rtp_packets >= 45 && down.rtp_packets >= 45, "{info:?}");
    assert!(up.dc_bytes >= big.len() as u64 && down.dc_bytes >= big.len() as u64);
    assert_eq!(info.worker_id, "w1");
    assert!(!info.upstream_call_id.is_empty());
    let text = h.metrics_text().await;
    assert!(text.contains("realtime_relay_calls_active 1"), "{text}");
    assert!(text.contains("realtime_relay_calls_connected 1"), "{text}");
    // The client's binding requests were signed with the relay's password: its address was
    // learned from them, none refused.
    assert_eq!(
        common::metric(&text, "realtime_relay_stun_unauthenticated_total"),
        0.0
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_sdp_goes_upstream_when_no_model_is_known() {
    let mut h = Harness::start(&[]).await;
    let (_id, mut client) = h.call(ClientConfig::default(), "", "").await;
    let req = &h.provider.requests()[0];
    assert_eq!(req.content_type, "application/sdp");
    assert!(req.session.is_none());
    client
        .wait_for_event_type("session.created", T)
        .await
        .unwrap();
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_rejection_comes_back_verbatim_as_data() {
    let body = r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let config = ProviderConfig {
        reject_with: Some((401, "application/json".into(), body.into())),
        ..ProviderConfig::local(Some(UPSTREAM_KEY))
    };
    let mut h = Harness::start_with(config, &[]).await;
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::create_call_response::Outcome::UpstreamRejection(r)) = resp.outcome else {
        panic!("expected a rejection: {:?}", resp.outcome);
    };
    assert_eq!(r.status, 401);
    assert_eq!(r.content_type, "application/json");
    assert_eq!(r.body, body.as_bytes());
    assert_eq!(
        h.relay.relay.registry().live_count(),
        0,
        "nothing kept for a rejected call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_any_upstream_request() {
    let mut h = Harness::start(&[]).await;
    let (_c, good) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let video_only =
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n";
    let truncated = &good[..good.len() / 3];
    let rows: Vec<(String, &str, &str, Code, &str)> = vec![
        (String::new(), "m", "", Code::InvalidArgument, "missing_sdp"),
        (
            "hello".into(),
            "m",
            "",
            Code::InvalidArgument,
            "invalid_sdp",
        ),
        (
            video_only.into(),
            "m",
            "",
            Code::InvalidArgument,
            "invalid_sdp",
        ),
        (
            truncated.into(),
            "m",
            "",
            Code::InvalidArgument,
            "invalid_sdp",
        ),
        (
            good.replace("a=fingerprint", "a=fingerprunt"),
            "m",
            "",
            Code::InvalidArgument,
            "invalid_sdp",
        ),
        (
            "x".repeat(70_000),
            "m",
            "",
            Code::InvalidArgument,
            "invalid_sdp",
        ),
        (
            good.clone(),
            "m",
            "[1,2]",
            Code::InvalidArgument,
            "invalid_session_json",
        ),
        (
            good.clone(),
            "m",
            "{",
            Code::InvalidArgument,
            "invalid_session_json",
        ),
    ];
    for (offer, model, session, code, stable) in rows {
        let err = h
            .grpc
            .create_call(h.request(&offer, model, session))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), code, "{offer:.40?}: {err:?}");
        assert_eq!(
            realtime_relay_proto::split_status_message(err.message()).0,
            Some(stable),
            "{offer:.40?}: {}",
            err.message()
        );
    }
    let mut bad_id = h.request(&good, "m", "");
    bad_id.call_id = "rtc_../../x".into();
    let err = h.grpc.create_call(bad_id).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        h.provider.requests().is_empty(),
        "the upstream heard nothing"
    );
    assert_eq!(h.relay.relay.registry().live_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_off_the_allowlist_are_refused() {
    let mut h = Harness::start(&[]).await;
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    for url in [
        "http://127.0.0.1:1",
        "http://169.254.169.254",
        "file:///etc/passwd",
        "",
    ] {
        let mut req = h.request(&offer, "m", "");
        req.upstream.as_mut().unwrap().base_url = url.into();
        let err = h.grpc.create_call(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{url}");
    }
    assert!(h.provider.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_upstreams_need_the_explicit_flag() {
    let provider = echo_model::MockProvider::start(ProviderConfig::local(Some(UPSTREAM_KEY)))
        .await
        .unwrap();
    let mut args = common::relay_args(&provider.base_url(), &[]);
    args.allow_private_upstreams = false;
    let relay = relay_service::server::start(&args).await.unwrap();
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let req = v1::CreateCallRequest {
        model: "m".into(),
        sdp_offer: offer,
        upstream: Some(v1::Upstream {
            base_url: provider.base_url(),
            authorization: String::new(),
            worker_id: "w".into(),
        }),
        ..Default::default()
    };
    let err = relay.relay.create_call(req).await.unwrap_err();
    assert_eq!(err.code(), "upstream_not_allowed");
    assert!(provider.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hangup_ends_the_call_everywhere_and_frees_it() {
    let mut h = Harness::start(&[]).await;
    let (call_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    client
        .wait_for_event_type("session.created", T)
        .await
        .unwrap();
    assert!(h.provider.wait_for_active_calls(1, T).await);
    let info = h
        .grpc
        .hangup_call(v1::HangupCallRequest {
            call_id: call_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .call
        .unwrap();
    assert_eq!(info.state, v1::CallState::Ended as i32);
    assert_eq!(info.end_reason, "hangup");
    assert_eq!(h.relay.relay.registry().live_count(), 0);
    assert!(client.wait_closed(T).await, "the client learns at once");
    assert!(
        h.provider.wait_for_active_calls(0, T).await,
        "the provider's call ends too"
    );
    // Idempotent for an ended call; NOT_FOUND for a call that never was.
    h.grpc
        .hangup_call(v1::HangupCallRequest {
            call_id,
            ..Default::default()
        })
        .await
        .unwrap();
    let err = h
        .grpc
        .hangup_call(v1::HangupCallRequest {
            call_id: "rtc_nosuchcall".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let text = h.metrics_text().await;
    assert!(
        text.contains(r#"realtime_relay_calls_ended_total{reason="hangup"} 1"#),
        "{text}"
    );
    assert!(text.contains("realtime_relay_calls_active 0"), "{text}");
}

/// Timeouts are proven in virtual time (`src/bridge/tests.rs`); this one checks, over real
/// UDP and the real binary's flags, that a limit reaches the bridge and the call is freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_connects_is_ended_by_the_ice_timeout() {
    let mut h = Harness::start(&["--ice-timeout-secs=1"]).await;
    let (_client, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap()
        .into_inner();
    let info = h
        .wait_for_state(&resp.call_id, v1::CallState::Ended, Duration::from_secs(5))
        .await;
    assert_eq!(info.end_reason, "ice_timeout", "{info:?}");
    assert_eq!(h.relay.relay.registry().live_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrent_call_limit_holds() {
    let mut h = Harness::start(&["--max-calls=1"]).await;
    let (_id, client) = h.call(ClientConfig::default(), "m", "").await;
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let err = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        h.provider.requests().len(),
        1,
        "the refused call never went upstream"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_listing_are_served() {
    let mut h = Harness::start(&[]).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.relay.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: realtime_relay_proto::SERVICE_NAME.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let (_id, client) = h.call(ClientConfig::default(), "m", "").await;
    let list = h
        .grpc
        .list_calls(v1::ListCallsRequest {
            include_ended: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.calls.len(), 1);
    assert_eq!(list.live_calls_by_worker.get("w1"), Some(&1));
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_stun_server_adds_a_reflexive_candidate_upstream() {
    // A loopback STUN responder that reports a NAT mapping on 127.0.0.2.
    let stun = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let stun_addr = stun.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = stun.recv_from(&mut buf).await {
            if n >= 20 {
                let txid: [u8; 12] = buf[8..20].try_into().unwrap();
                let mapped = std::net::SocketAddr::new("127.0.0.2".parse().unwrap(), from.port());
                let _ = stun
                    .send_to(&relay_service::stun::binding_success(&txid, mapped), from)
                    .await;
            }
        }
    });
    let flag = format!("--upstream-stun-server={stun_addr}");
    let mut h = Harness::start(&[&flag]).await;
    let (_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    let offer = &h.provider.requests()[0].sdp;
    assert!(
        offer.contains("127.0.0.2") && offer.contains("typ srflx"),
        "{offer}"
    );
    client
        .wait_for_event_type("session.created", T)
        .await
        .unwrap();
    client.close().await;
}

/// An audio-only client (no data channel): audio is relayed, upstream events are
/// dropped and counted, and the call is not ended by the event buffer cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audio_only_client_gets_audio_and_events_are_dropped_not_queued() {
    use rtc_peer::udp::{self, UdpPeer, MAX_DATAGRAM};
    use std::time::Instant;
    use str0m::media::{Direction, MediaKind};
    use str0m::rtp::RtpWrite;
    use str0m::{Candidate, Event, Rtc};

    let mut h = Harness::start(&["--dc-buffer-bytes=65536"]).await;
    let socket = udp::bind("127.0.0.1".parse().unwrap()).unwrap();
    let local = socket.local_addr().unwrap();
    let mut rtc = Rtc::builder()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .build(Instant::now());
    rtc.add_local_candidate(Candidate::host(local, "udp").unwrap());
    let mut api = rtc.sdp_api();
    let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
    let (offer, pending) = api.apply().unwrap();
    let offer = offer.to_sdp_string();
    assert!(!offer.contains("m=application"));
    let resp = h
        .grpc
        .create_call(h.request(&offer, "m", ""))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("{:?}", resp.outcome)
    };
    rtc.sdp_api()
        .accept_answer(
            pending,
            str0m::change::SdpAnswer::from_sdp_string(&answer).unwrap(),
        )
        .unwrap();
    let mut peer = UdpPeer::new(rtc, socket).unwrap();

    let (mut connected, mut received, mut sent) = (false, 0u32, 0u16);
    let mut next_frame = Instant::now();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let deadline = Instant::now() + T;
    while Instant::now() < deadline && received < 20 {
        let timeout = peer
            .drain(|_, e| match e {
                Event::Connected => connected = true,
                Event::RtpPacket(_) => received += 1,
                _ => {}
            })
            .unwrap();
        let now = Instant::now();
        if connected && now >= next_frame && sent < 200 {
            let rtc = peer.rtc();
            let pt = rtc.codec_config().params()[0].pt();
            let mut direct = rtc.direct_api();
            let stream = direct.stream_tx_by_mid(mid, None).unwrap();
            stream.write_rtp(RtpWrite::new(
                pt,
                (sent as u64).into(),
                sent as u32 * 960,
                now,
                vec![7u8; 120],
            ));
            sent += 1;
            next_frame = now + Duration::from_millis(20);
            peer.handle_timeout(now).unwrap();
            continue;
        }
        let wait = timeout
            .min(next_frame)
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        match tokio::time::timeout(wait, peer.socket.recv_from(&mut buf)).await {
            Ok(Ok((n, source))) => peer.handle_datagram(&buf[..n], source, Instant::now()),
            _ => peer.handle_timeout(Instant::now()).unwrap(),
        }
    }
    assert_eq!(peer.counters.bad_datagrams, 0, "{:?}", peer.counters);
    assert!(
        received >= 20,
        "audio came back to an audio-only client ({received})"
    );
    let info = h
        .wait_for_state(&resp.call_id, v1::CallState::Connected, T)
        .await;
    assert_eq!(info.state, v1::CallState::Connected as i32, "{info:?}");
    assert!(
        info.upstream_to_client.unwrap().dropped >= 1,
        "session.created was dropped: {info:?}"
    );
}

/// A relay that does not meter usage (`--usage-metering false`) refuses a create that carries
/// a budget (it could not enforce it) before the provider hears of it; without a budget the
/// call works and its usage stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_metering_a_budget_is_refused_and_nothing_is_read() {
    let mut h = Harness::start(&["--usage-metering=false"]).await;
    let (_c, offer) = echo_model::TestClient::new(ClientConfig::default()).unwrap();
    let req = v1::CreateCallRequest {
        budget: Some(v1::CallBudget {
            max_tokens: 100,
            max_audio_seconds: 0.0,
        }),
        ..h.request(&offer, "m", "")
    };
    let err = h.relay.relay.create_call(req).await.unwrap_err();
    assert_eq!(err.code(), "budget_unavailable");
    assert!(h.provider.requests().is_empty());

    let (call_id, mut client) = h.call(ClientConfig::default(), "m", "").await;
    client
        .send_text(r#"{"type":"response.create","event_id":"e1"}"#)
        .await
        .unwrap();
    client
        .wait_for_event_type("response.done", T)
        .await
        .unwrap();
    let info = h
        .relay
        .relay
        .get_call(&call_id, relay_service::call_state::Caller::OPERATOR)
        .unwrap();
    assert_eq!(info.usage.unwrap().responses, 0, "not metered");
}
