//! The echo model's sideband endpoints over a real WebSocket: a server attached to a Realtime
//! call (`GET /v1/realtime?call_id=…`) or a GPT-Live session (`GET
//! /v1/live/sessions/{id}/attach`) gets the call's server events as they are sent, its
//! `session.update` is applied and answered with `session.updated` on both, its other events
//! act as the client's; the socket closes when the call ends; unknown calls, calls of the
//! other API and bad keys are refused before the upgrade.

mod common;

use common::*;
use echo_model::client::ClientConfig;
use echo_model::provider::{MockProvider, ProviderConfig};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn provider() -> MockProvider {
    MockProvider::start(ProviderConfig::local(Some(KEY)))
        .await
        .expect("provider starts")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn attach(p: &MockProvider, path: &str, key: &str) -> Result<Ws, u16> {
    let mut req = format!("ws://{}{path}", p.local_addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

/// The next text event on the socket of type `kind` (others are skipped).
async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let m = tokio::time::timeout(STEP, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} on the sideband"))
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn a_realtime_sideband_mirrors_the_call_and_applies_session_update() {
    bounded(async {
        let p = provider().await;
        let (mut c, call_id) = connect(&p, ClientConfig::default()).await;
        c.wait_for_event_type("session.created", STEP).await.unwrap();
        // Refusals first: another API's path, an unknown id, a bad key.
        assert_eq!(attach(&p, &format!("/v1/live/sessions/{call_id}/attach"), KEY).await.err(), Some(404));
        assert_eq!(attach(&p, "/v1/realtime?call_id=rtc_nope", KEY).await.err(), Some(404));
        assert_eq!(attach(&p, &format!("/v1/realtime?call_id={call_id}"), "sk-wrong").await.err(), Some(401));

        let mut ws = attach(&p, &format!("/v1/realtime?call_id={call_id}"), KEY)
            .await
            .expect("attached");
        assert_eq!(p.sideband_attaches(), vec![call_id.clone()]);
        // The client's response: the sideband sees its echo and its response.done.
        c.send_text(r#"{"type":"response.create","event_id":"c1"}"#).await.unwrap();
        assert_eq!(next_of(&mut ws, "response.create").await["event_id"], "c1");
        assert!(next_of(&mut ws, "response.done").await["response"]["usage"].is_object());
        // The server updates the session: both see session.updated with the new fields.
        ws.send(Message::Text(
            json!({"type": "session.update", "event_id": "s1", "session": {"instructions": "from the server"}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let on_ws = next_of(&mut ws, "session.updated").await;
        assert_eq!(on_ws["session"]["instructions"], "from the server");
        assert_eq!(on_ws["client_event_id"], "s1");
        let on_dc = c.wait_for_event_type("session.updated", STEP).await.unwrap();
        assert_eq!(on_dc["session"]["instructions"], "from the server");
        // Another event from the server acts as the client's: the client gets its echo.
        ws.send(Message::Text(r#"{"type":"conversation.item.create","event_id":"s2"}"#.into()))
            .await
            .unwrap();
        let echo = c.wait_for_event_type("conversation.item.create", STEP).await.unwrap();
        assert_eq!(echo["event_id"], "s2");
        // The call ends: the socket closes.
        assert_eq!(hangup(&p, &call_id).await.status, 200);
        let closed = tokio::time::timeout(STEP, async {
            loop {
                match ws.next().await {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the sideband outlived the call");
        p.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_live_sideband_gets_the_sessions_events() {
    bounded(async {
        let p = provider().await;
        let (mut c, id) = connect_live(&p, json!({"model": "gpt-live-1"})).await;
        c.wait_for_event_type("session.started", STEP)
            .await
            .unwrap();
        assert_eq!(
            attach(&p, &format!("/v1/realtime?call_id={id}"), KEY)
                .await
                .err(),
            Some(404)
        );
        let mut ws = attach(&p, &format!("/v1/live/sessions/{id}/attach"), KEY)
            .await
            .expect("attached");
        let usage = next_of(&mut ws, "session.usage.updated").await;
        assert!(usage["usage"]["seconds"].as_f64().unwrap() > 0.0);
        assert_eq!(hangup_live(&p, &id).await.status, 200);
        let closed = next_of(&mut ws, "session.closed").await;
        assert_eq!(closed["reason"], "close_requested");
        p.shutdown().await;
    })
    .await;
}
