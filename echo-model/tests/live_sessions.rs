//! The echo model's GPT-Live endpoint (`POST /v1/live/sessions`) and a session on it, with
//! the test client over real loopback UDP. The wire reference is the `openai` package
//! (`LiveCreateParams`, `LiveCreateResponse`, `SessionStartedEvent`,
//! `SessionUsageUpdatedEvent`, `SessionClosedEvent`).

mod common;

use std::time::Duration;

use common::*;
use echo_model::client::{ClientConfig, TestClient};
use echo_model::provider::{MockProvider, ProviderConfig};
use serde_json::json;

async fn provider() -> MockProvider {
    MockProvider::start(ProviderConfig::local(Some(KEY)))
        .await
        .expect("provider starts")
}

#[tokio::test]
async fn a_live_create_is_answered_with_json_and_the_session_starts_first() {
    bounded(async {
        let p = provider().await;
        let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
        let answer = post_live(
            &p,
            live_body(
                &offer,
                json!({"model": "gpt-live-1", "instructions": "be brief"}),
            ),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.content_type.as_deref(), Some("application/json"));
        assert!(answer.location.is_none());
        let v = answer.json();
        let id = v["session"]["id"].as_str().unwrap().to_string();
        assert!(id.starts_with("live_") && id.len() == 37, "{id}");
        assert_eq!(v["transport"]["type"], "webrtc");
        let sdp = v["transport"]["sdp"].as_str().unwrap();
        assert!(sdp.starts_with("v=0") && sdp.contains("a=ice-lite"));

        let req = &p.requests()[0];
        assert_eq!(req.path, "/v1/live/sessions");
        assert_eq!(req.content_type, "application/json");
        assert_eq!(req.sdp, offer);
        assert_eq!(req.session.as_ref().unwrap()["model"], "gpt-live-1");
        assert_eq!(req.json.as_ref().unwrap()["transport"]["type"], "webrtc");

        let mut c = client.connect(sdp).await.expect("connects");
        let first = c.next_event(STEP).await.unwrap();
        assert_eq!(first["type"], "session.started", "{first}");
        assert!(first["event_id"].as_str().unwrap().starts_with("event_"));
        let session = &first["session"];
        assert_eq!(session["id"], id.as_str());
        assert_eq!(session["model"], "gpt-live-1");
        assert_eq!(session["status"], "active");
        assert_eq!(session["instructions"], "be brief");
        assert!(session["expires_at"].as_u64().is_some());

        // Events and audio are echoed as on a Realtime call.
        c.send_text(r#"{"type":"response.create","event_id":"e1"}"#)
            .await
            .unwrap();
        let echo = c
            .wait_for_event_type("response.create", STEP)
            .await
            .unwrap();
        assert_eq!(echo["event_id"], "e1");
        c.send_audio(10, Duration::from_millis(20)).await.unwrap();
        let deadline = tokio::time::Instant::now() + STEP;
        while c.audio_stats().packets_received < 8 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                c.audio_stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.close().await;
        p.shutdown().await;
    })
    .await;
}

/// `session.usage.updated` every second with the cumulative seconds (a total that grows),
/// then the client's `session.close` earns `session.closed` (`close_requested`, its event
/// id, the final session and usage) and the session ends; `session.close` is not echoed.
#[tokio::test]
async fn usage_is_cumulative_and_session_close_ends_with_session_closed() {
    bounded(async {
        let p = provider().await;
        let (mut c, id) = connect_live(&p, json!({"model": "gpt-live-1"})).await;
        c.wait_for_event_type("session.started", STEP)
            .await
            .unwrap();
        let mut totals = Vec::new();
        while totals.len() < 3 {
            let u = c
                .wait_for_event_type("session.usage.updated", STEP)
                .await
                .unwrap();
            assert!(u.get("context_window").is_none(), "no context limit known");
            totals.push(u["usage"]["seconds"].as_f64().unwrap());
        }
        assert!(
            totals.windows(2).all(|w| w[1] > w[0]),
            "cumulative: {totals:?}"
        );
        assert!(
            (totals[2] - totals[0] - 2.0).abs() < 0.5,
            "about one second apart: {totals:?}"
        );

        c.send_text(r#"{"type":"session.close","event_id":"close_1"}"#)
            .await
            .unwrap();
        let closed = loop {
            let ev = c.next_event(STEP).await.unwrap();
            assert_ne!(ev["type"], "session.close", "a command is not echoed");
            if ev["type"] == "session.closed" {
                break ev;
            }
        };
        assert_eq!(closed["reason"], "close_requested");
        assert_eq!(closed["client_event_id"], "close_1");
        assert_eq!(closed["session"]["id"], id.as_str());
        assert_eq!(closed["session"]["status"], "active");
        let final_seconds = closed["usage"]["seconds"].as_f64().unwrap();
        assert!(
            final_seconds >= totals[2],
            "{final_seconds} after {totals:?}"
        );
        assert!(c.wait_closed(STEP).await, "the session ends");
        assert!(p.wait_for_active_calls(0, STEP).await);
        p.shutdown().await;
    })
    .await;
}

/// A hangup (`POST /v1/live/sessions/{id}/hangup`) closes the session politely: the peer
/// gets `session.closed` with `close_requested` (the package: "for an application close or
/// hangup request") before the connection ends, and the hangup answers once it has. Each
/// API's hangup finds only its own calls.
#[tokio::test]
async fn a_live_hangup_sends_session_closed_then_ends_the_session() {
    bounded(async {
        let p = provider().await;
        let (mut c, id) = connect_live(&p, json!({"model": "gpt-live-1"})).await;
        c.wait_for_event_type("session.started", STEP)
            .await
            .unwrap();
        // The Realtime hangup does not know a Live session.
        assert_openai_error(&hangup(&p, &id).await, 404, "call_not_found");
        assert_eq!(p.active_calls(), 1);

        let answer = hangup_live(&p, &id).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(p.active_calls(), 0, "gone when the hangup answers");
        assert_eq!(p.hangups(), vec![id.clone()]);
        let closed = c.wait_for_event_type("session.closed", STEP).await.unwrap();
        assert_eq!(closed["reason"], "close_requested");
        assert!(closed.get("client_event_id").is_none());
        assert!(closed["usage"]["seconds"].as_f64().is_some());
        assert!(c.wait_closed(STEP).await);
        assert_openai_error(&hangup_live(&p, &id).await, 404, "call_not_found");

        // Nor does the Live hangup know a Realtime call.
        let (rt, rtc_id) = connect(&p, ClientConfig::default()).await;
        assert_openai_error(&hangup_live(&p, &rtc_id).await, 404, "call_not_found");
        assert_eq!(p.active_calls(), 1);
        rt.close().await;
        p.shutdown().await;
    })
    .await;
}

/// WebRTC creation starts the session: a `session.start` on its data channel is refused
/// with an `error` event naming it, and the session goes on.
#[tokio::test]
async fn session_start_on_a_webrtc_session_is_refused_with_an_error_event() {
    bounded(async {
        let p = provider().await;
        let (mut c, _) = connect_live(&p, json!({"model": "gpt-live-1"})).await;
        c.wait_for_event_type("session.started", STEP)
            .await
            .unwrap();
        c.send_text(r#"{"type":"session.start","event_id":"s1","session":{"model":"gpt-live-1"}}"#)
            .await
            .unwrap();
        let e = c.wait_for_event_type("error", STEP).await.unwrap();
        assert_eq!(e["client_event_id"], "s1");
        assert_eq!(e["error"]["client_event_id"], "s1");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        for key in ["code", "message", "param"] {
            assert!(e["error"].get(key).is_some(), "{key}: {e}");
        }
        c.send_text(r#"{"type":"response.create","event_id":"e2"}"#)
            .await
            .unwrap();
        c.wait_for_event_type("response.create", STEP)
            .await
            .unwrap();
        c.close().await;
        p.shutdown().await;
    })
    .await;
}

/// The Live endpoint checks like the Live API: the key as its Realtime endpoint does, then
/// the JSON body (one row per case: status, code and the parameter at fault), and the offer;
/// nothing is allocated for a refused create.
#[tokio::test]
async fn live_creates_are_validated_like_the_live_api() {
    bounded(async {
        let p = provider().await;
        let (_c, offer) = TestClient::new(ClientConfig::default()).unwrap();
        let good = live_body(&offer, json!({"model": "gpt-live-1"}));
        let url = format!("{}/v1/live/sessions", p.base_url());
        let bearer = format!("Bearer {KEY}");
        let json_ct = Some("application/json");
        // (authorization, content type, body, status, code, parameter at fault)
        type Row<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Vec<u8>,
            u16,
            &'a str,
            Option<&'a str>,
        );
        let rows: Vec<Row> = vec![
            (None, json_ct, good.clone(), 401, "invalid_api_key", None),
            (
                Some("Bearer wrong"),
                json_ct,
                good.clone(),
                401,
                "invalid_api_key",
                None,
            ),
            (
                Some(&bearer),
                Some("application/sdp"),
                good.clone(),
                400,
                "invalid_content_type",
                None,
            ),
            (
                Some(&bearer),
                json_ct,
                b"{".to_vec(),
                400,
                "invalid_json",
                None,
            ),
            (
                Some(&bearer),
                json_ct,
                live_body(&offer, json!({})),
                400,
                "missing_required_parameter",
                Some("session.model"),
            ),
            (
                Some(&bearer),
                json_ct,
                json!({"session": {"model": "m"}, "transport": {"type": "sip", "sdp": offer}})
                    .to_string()
                    .into_bytes(),
                400,
                "invalid_value",
                Some("transport.type"),
            ),
            (
                Some(&bearer),
                json_ct,
                json!({"session": {"model": "m"}, "transport": {"type": "webrtc"}})
                    .to_string()
                    .into_bytes(),
                400,
                "missing_required_parameter",
                Some("transport.sdp"),
            ),
            (
                Some(&bearer),
                json_ct,
                live_body("hello", json!({"model": "m"})),
                400,
                "invalid_sdp",
                None,
            ),
        ];
        for (auth, ct, body, status, code, param) in rows {
            let answer = post(&url, auth, ct, body).await;
            assert_openai_error(&answer, status, code);
            assert_eq!(
                answer.json()["error"]["param"].as_str(),
                param,
                "{code}: {}",
                answer.body
            );
        }
        assert_eq!(p.active_calls(), 0);
        assert_eq!(p.stats().calls_created, 0);
        // Any non-empty bearer token without a configured key, as for Realtime.
        let open = MockProvider::start(ProviderConfig::local(None))
            .await
            .unwrap();
        let (_c, offer) = TestClient::new(ClientConfig::default()).unwrap();
        let answer = post(
            &format!("{}/v1/live/sessions", open.base_url()),
            Some("Bearer anything"),
            json_ct,
            live_body(&offer, json!({"model": "gpt-live-1"})),
        )
        .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        open.shutdown().await;
        p.shutdown().await;
    })
    .await;
}
