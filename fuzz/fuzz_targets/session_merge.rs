//! The session JSON a client sends with its offer, merged with the model the gateway chose,
//! and the upstream body built from both (the relay's `upstream_body`).
//!
//! Input: byte 0 picks the API (even: Realtime, odd: GPT-Live); the rest is the upstream
//! model, a NUL, the client's session, a NUL, the SDP (missing pieces: none). Properties:
//! only a non-empty session can be refused, and only as invalid JSON; a merged session has
//! the gateway's model when it chose one (Realtime sessions the gateway makes also get
//! `"type":"realtime"`); a GPT-Live session always has a model; the body parses back to
//! exactly the session and the SDP (multipart for Realtime, JSON for GPT-Live).
#![no_main]

use libfuzzer_sys::fuzz_target;
use realtime_relay_proto::call_id::Kind;
use relay_service::error::SetupError;
use relay_service::upstream_body::UpstreamSession;
use rtc_peer::multipart;
use serde_json::{Map, Value};

fn split3(data: &[u8]) -> (&[u8], Option<&[u8]>, &[u8]) {
    let mut parts = data.splitn(3, |b| *b == 0);
    let model = parts.next().unwrap_or(&[]);
    let session = parts.next();
    let sdp = parts.next().unwrap_or(&[]);
    (model, session, sdp)
}

fn check_body(session: &UpstreamSession, sdp: &str) {
    let body = session.encode(sdp);
    match session {
        UpstreamSession::Realtime(None) => {
            assert_eq!(body.content_type, "application/sdp");
            assert_eq!(body.bytes, sdp.as_bytes());
        }
        UpstreamSession::Realtime(Some(map)) => {
            let boundary = multipart::boundary(&body.content_type).expect("our boundary");
            let limits = multipart::Limits::new(usize::MAX, usize::MAX);
            let form = multipart::parse(&body.bytes, &boundary, &limits).expect("our body parses");
            assert_eq!(form.sdp.expect("an sdp part").data, sdp.as_bytes());
            let sent: Map<String, Value> =
                serde_json::from_slice(form.session.expect("a session part").data).unwrap();
            assert_eq!(&sent, map);
        }
        UpstreamSession::Live(map) => {
            assert_eq!(body.content_type, "application/json");
            let sent: Value = serde_json::from_slice(&body.bytes).unwrap();
            assert_eq!(sent["session"].as_object(), Some(map));
            assert_eq!(sent["transport"]["type"], "webrtc");
            assert_eq!(sent["transport"]["sdp"].as_str(), Some(sdp));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((api, rest)) = data.split_first() else {
        return;
    };
    let kind = if api % 2 == 0 { Kind::Realtime } else { Kind::Live };
    let (model, session, sdp) = split3(rest);
    let (Ok(model), Ok(sdp)) = (std::str::from_utf8(model), std::str::from_utf8(sdp)) else {
        return;
    };
    let session = match session.map(std::str::from_utf8) {
        Some(Ok(s)) => Some(s),
        Some(Err(_)) => return,
        None => None,
    };
    let chosen = Some(model.trim()).filter(|m| !m.is_empty());
    let client_gave = session.is_some_and(|s| !s.trim().is_empty());
    let merged = match UpstreamSession::new(kind, session, Some(model)) {
        Ok(m) => m,
        Err(SetupError::InvalidSessionJson(message)) => {
            assert!(client_gave);
            assert!(
                message == "the session must be a JSON object"
                    || message.starts_with("the session is not valid JSON (line "),
                "{message:?}"
            );
            return;
        }
        Err(SetupError::MissingModel) => {
            assert_eq!(kind, Kind::Live);
            assert!(chosen.is_none());
            return;
        }
        Err(other) => panic!("unexpected error {other:?}"),
    };
    match &merged {
        UpstreamSession::Realtime(None) => {
            assert!(!client_gave && chosen.is_none());
        }
        UpstreamSession::Realtime(Some(map)) => {
            if let Some(m) = chosen {
                assert_eq!(map.get("model").and_then(Value::as_str), Some(m));
                if !client_gave {
                    assert_eq!(map.get("type").and_then(Value::as_str), Some("realtime"));
                }
            }
        }
        UpstreamSession::Live(map) => {
            let m = map.get("model").and_then(Value::as_str).unwrap_or_default();
            assert!(!m.trim().is_empty());
            if let Some(c) = chosen {
                assert_eq!(m, c);
            }
        }
    }
    check_body(&merged, sdp);
});
