//! GPT-Live sessions over WebRTC: `POST /v1/live/sessions` with JSON
//! `{"session": {"model": …, …}, "transport": {"type": "webrtc", "sdp": "<offer>"}}`, answered
//! `{"session": {"id": "live_…"}, "transport": {"type": "webrtc", "sdp": "<answer>"}}` (the
//! official `openai` package's `LiveCreateParams` and `LiveCreateResponse`).
//!
//! Only what the gateway needs is checked here (the transport, the offer, the model); the rest
//! of the session is the provider's to judge, and goes to it as sent.

use serde_json::{Map, Value};

use crate::error::FilterError;
use crate::reply::HttpReply;

/// The parts of a Live create the gateway uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBody {
    /// The offer (`transport.sdp`).
    pub sdp: String,
    /// The `session` object as the client sent it.
    pub session: Map<String, Value>,
}

fn refused(code: &'static str, message: &'static str, param: &'static str) -> FilterError {
    FilterError::LiveBody {
        code,
        message,
        param,
    }
}

/// Reads a Live create's body: a JSON object with a `session` object and a WebRTC
/// `transport` carrying a non-empty offer. The offer's own checks come after.
pub fn parse(body: &[u8]) -> Result<LiveBody, FilterError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|_| refused("invalid_json", "the request body is not valid JSON", "body"))?;
    let Value::Object(mut top) = value else {
        return Err(refused(
            "invalid_json",
            "the request body must be a JSON object",
            "body",
        ));
    };
    let session = match top.remove("session") {
        Some(Value::Object(s)) => s,
        Some(_) => {
            return Err(refused(
                "invalid_session",
                "session must be an object",
                "session",
            ))
        }
        None => {
            return Err(refused(
                "missing_session",
                "session is required (with at least its model)",
                "session",
            ))
        }
    };
    let transport = match top.remove("transport") {
        Some(Value::Object(t)) => t,
        Some(_) => {
            return Err(refused(
                "invalid_transport",
                "transport must be an object",
                "transport",
            ))
        }
        None => {
            return Err(refused(
                "missing_transport",
                "transport is required: {\"type\": \"webrtc\", \"sdp\": <offer>}",
                "transport",
            ))
        }
    };
    match transport.get("type") {
        Some(Value::String(t)) if t == "webrtc" => {}
        _ => {
            return Err(refused(
                "unsupported_transport",
                "this gateway serves transport.type \"webrtc\" only",
                "transport.type",
            ))
        }
    }
    let sdp = match transport.get("sdp") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        _ => {
            return Err(refused(
                "missing_sdp",
                "transport.sdp must hold the SDP offer",
                "transport.sdp",
            ))
        }
    };
    Ok(LiveBody { sdp, session })
}

/// The `Content-Type` of a Live create: JSON (parameters such as `charset=utf-8` allowed).
pub fn check_content_type(content_type: Option<&str>) -> Result<(), FilterError> {
    let Some(ct) = content_type else {
        return Err(FilterError::MissingContentType);
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(FilterError::UnsupportedContentType)
    }
}

/// The answer to a Live create that the relay set up: `200` JSON with the session id and the
/// SDP answer.
pub fn created_reply(session_id: &str, answer_sdp: &str, request_id: &str) -> HttpReply {
    let body = serde_json::json!({
        "session": { "id": session_id },
        "transport": { "type": "webrtc", "sdp": answer_sdp },
    });
    HttpReply {
        status: 200,
        headers: vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-request-id".to_string(), request_id.to_string()),
            ("cache-control".to_string(), "no-store".to_string()),
        ],
        body: body.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_body_needs_a_session_and_a_webrtc_offer() {
        let ok = br#"{"session": {"model": "gpt-live-1", "instructions": "hi"}, "transport": {"type": "webrtc", "sdp": "v=0\r\n"}}"#;
        let b = parse(ok).unwrap();
        assert_eq!(b.sdp, "v=0\r\n");
        assert_eq!(b.session["model"], "gpt-live-1");
        let rows: &[(&[u8], &str, &str)] = &[
            (b"", "invalid_json", "body"),
            (b"{", "invalid_json", "body"),
            (b"[1]", "invalid_json", "body"),
            (br#""text""#, "invalid_json", "body"),
            (
                br#"{"transport": {"type": "webrtc", "sdp": "v=0"}}"#,
                "missing_session",
                "session",
            ),
            (
                br#"{"session": "gpt-live-1", "transport": {"type": "webrtc", "sdp": "v=0"}}"#,
                "invalid_session",
                "session",
            ),
            (br#"{"session": {}}"#, "missing_transport", "transport"),
            (
                br#"{"session": {}, "transport": "webrtc"}"#,
                "invalid_transport",
                "transport",
            ),
            (
                br#"{"session": {}, "transport": {"sdp": "v=0"}}"#,
                "unsupported_transport",
                "transport.type",
            ),
            (
                br#"{"session": {}, "transport": {"type": "websocket", "sdp": "v=0"}}"#,
                "unsupported_transport",
                "transport.type",
            ),
            (
                br#"{"session": {}, "transport": {"type": "webrtc"}}"#,
                "missing_sdp",
                "transport.sdp",
            ),
            (
                br#"{"session": {}, "transport": {"type": "webrtc", "sdp": "  "}}"#,
                "missing_sdp",
                "transport.sdp",
            ),
            (
                br#"{"session": {}, "transport": {"type": "webrtc", "sdp": 7}}"#,
                "missing_sdp",
                "transport.sdp",
            ),
        ];
        for (body, code, param) in rows {
            let e = parse(body).unwrap_err();
            assert_eq!(
                (e.status(), e.code(), e.param()),
                (400, *code, Some(*param)),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn the_answer_is_openais_live_shape() {
        let r = created_reply("live_0123", "v=0\r\na=x\r\n", "req-1");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["session"]["id"], "live_0123");
        assert_eq!(v["transport"]["type"], "webrtc");
        assert_eq!(v["transport"]["sdp"], "v=0\r\na=x\r\n");
    }

    #[test]
    fn only_json_is_accepted() {
        assert!(check_content_type(Some("application/json")).is_ok());
        assert!(check_content_type(Some("Application/JSON; charset=utf-8")).is_ok());
        assert_eq!(
            check_content_type(None).unwrap_err().code(),
            "invalid_content_type"
        );
        assert_eq!(
            check_content_type(Some("application/sdp"))
                .unwrap_err()
                .status(),
            415
        );
    }
}
