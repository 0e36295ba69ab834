//! Helpers shared by the integration tests: post offers over real HTTP, connect clients.

#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::time::Duration;

use echo_model::client::{ClientConfig, ConnectedClient, TestClient};
use echo_model::provider::MockProvider;

pub const KEY: &str = "sk-test-echo";
pub const STEP: Duration = Duration::from_secs(5);

/// Every test body runs under this bound so a hang fails instead of blocking CI.
pub async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test exceeded its 60 s bound");
}

pub struct Answer {
    pub status: u16,
    pub content_type: Option<String>,
    pub location: Option<String>,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    pub fn call_id(&self) -> String {
        let loc = self.location.as_deref().expect("Location header");
        loc.rsplit('/').next().unwrap().to_string()
    }
}

pub async fn post(
    url: &str,
    auth: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Answer {
    let http = reqwest::Client::builder().timeout(STEP).build().unwrap();
    let mut req = http.post(url).body(body);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("HTTP request");
    let h = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let status = resp.status().as_u16();
    let content_type = h("content-type");
    let location = h("location");
    let body = resp.text().await.expect("HTTP body");
    Answer {
        status,
        content_type,
        location,
        body,
    }
}

/// POST an `application/sdp` offer with `?model=` and the test key.
pub async fn post_offer(provider: &MockProvider, sdp: &str, model: &str) -> Answer {
    post(
        &format!("{}/v1/realtime/calls?model={model}", provider.base_url()),
        Some(&format!("Bearer {KEY}")),
        Some("application/sdp"),
        sdp.as_bytes().to_vec(),
    )
    .await
}

pub async fn hangup(provider: &MockProvider, call_id: &str) -> Answer {
    post(
        &format!("{}/v1/realtime/calls/{call_id}/hangup", provider.base_url()),
        Some(&format!("Bearer {KEY}")),
        None,
        Vec::new(),
    )
    .await
}

/// Offer → provider → answer → connected client, plus the call id.
pub async fn connect(provider: &MockProvider, config: ClientConfig) -> (ConnectedClient, String) {
    let (client, offer) = TestClient::new(config).expect("client offer");
    let answer = post_offer(provider, &offer, "gpt-realtime").await;
    assert_eq!(answer.status, 201, "offer refused: {}", answer.body);
    let call_id = answer.call_id();
    let connected = client.connect(&answer.body).await.expect("connect");
    (connected, call_id)
}

pub fn assert_openai_error(answer: &Answer, status: u16, code: &str) {
    assert_eq!(answer.status, status, "body: {}", answer.body);
    assert_eq!(answer.content_type.as_deref(), Some("application/json"));
    let v = answer.json();
    let err = v.get("error").expect("error object");
    for key in ["message", "type", "param", "code"] {
        assert!(err.get(key).is_some(), "error lacks `{key}`: {v}");
    }
    assert_eq!(err["code"], code, "{v}");
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
}

/// A GPT-Live create body (`LiveCreateParams`) with this offer and session.
pub fn live_body(sdp: &str, session: serde_json::Value) -> Vec<u8> {
    serde_json::json!({"session": session, "transport": {"type": "webrtc", "sdp": sdp}})
        .to_string()
        .into_bytes()
}

/// POST a GPT-Live create with the test key.
pub async fn post_live(provider: &MockProvider, body: Vec<u8>) -> Answer {
    post(
        &format!("{}/v1/live/sessions", provider.base_url()),
        Some(&format!("Bearer {KEY}")),
        Some("application/json"),
        body,
    )
    .await
}

pub async fn hangup_live(provider: &MockProvider, session_id: &str) -> Answer {
    post(
        &format!(
            "{}/v1/live/sessions/{session_id}/hangup",
            provider.base_url()
        ),
        Some(&format!("Bearer {KEY}")),
        None,
        Vec::new(),
    )
    .await
}

/// Offer → GPT-Live create → answer → connected client, plus the session id.
pub async fn connect_live(
    provider: &MockProvider,
    session: serde_json::Value,
) -> (ConnectedClient, String) {
    let (client, offer) = TestClient::new(ClientConfig::default()).expect("client offer");
    let answer = post_live(provider, live_body(&offer, session)).await;
    assert_eq!(answer.status, 200, "Live create refused: {}", answer.body);
    let v = answer.json();
    let id = v["session"]["id"].as_str().expect("session.id").to_string();
    let sdp = v["transport"]["sdp"].as_str().expect("transport.sdp");
    let connected = client.connect(sdp).await.expect("connect");
    (connected, id)
}
