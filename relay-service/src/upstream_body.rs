//! The body of the upstream SDP exchange.
//!
//! When a model is known, the upstream gets `multipart/form-data` with an `sdp` part
//! and a `session` JSON part whose `model` is the upstream model name (the client's
//! session JSON merged, model rewritten). The published Realtime spec carries the model
//! in the session, not in a query parameter. With no model and no session, the offer
//! goes as plain `application/sdp` (the model then comes from the key or a later
//! `session.update`).

use crate::error::SetupError;
use rand::RngCore;
use rtc_peer::multipart;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBody {
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// Builds the session JSON for upstream: the client's object (if any) with `model`
/// set to `upstream_model` (if any). A session we create ourselves also gets
/// `"type":"realtime"`, which the GA API requires.
pub fn session_for_upstream(
    client_session: Option<&str>,
    upstream_model: Option<&str>,
) -> Result<Option<Map<String, Value>>, SetupError> {
    let mut session = match client_session.map(str::trim).filter(|s| !s.is_empty()) {
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(_) => {
                return Err(SetupError::InvalidSessionJson(
                    "the session must be a JSON object".into(),
                ))
            }
            Err(e) => {
                return Err(SetupError::InvalidSessionJson(format!(
                    "the session is not valid JSON (line {}, column {})",
                    e.line(),
                    e.column()
                )))
            }
        },
        None => None,
    };
    if let Some(model) = upstream_model.map(str::trim).filter(|m| !m.is_empty()) {
        let map = session.get_or_insert_with(|| {
            let mut m = Map::new();
            m.insert("type".into(), Value::String("realtime".into()));
            m
        });
        map.insert("model".into(), Value::String(model.to_string()));
    }
    Ok(session)
}

/// [`session_for_upstream`], then [`encode`].
pub fn build(
    sdp: &str,
    client_session: Option<&str>,
    upstream_model: Option<&str>,
) -> Result<UpstreamBody, SetupError> {
    let session = session_for_upstream(client_session, upstream_model)?;
    Ok(encode(sdp, session.as_ref()))
}

/// The body for an offer and an already checked session: multipart with both, or the raw
/// SDP when there is no session.
pub fn encode(sdp: &str, session: Option<&Map<String, Value>>) -> UpstreamBody {
    let Some(session) = session else {
        return UpstreamBody {
            content_type: "application/sdp".into(),
            bytes: sdp.as_bytes().to_vec(),
        };
    };
    let session_json = serde_json::to_string(session).unwrap_or_else(|_| "{}".into());
    let boundary = new_boundary();
    let bytes = multipart::build(
        &boundary,
        &[
            ("sdp", Some("application/sdp"), sdp.as_bytes()),
            ("session", Some("application/json"), session_json.as_bytes()),
        ],
    );
    UpstreamBody {
        content_type: multipart::content_type(&boundary),
        bytes,
    }
}

/// A boundary that cannot occur in the parts: random, and SDP/JSON never contain "--rtcgw".
fn new_boundary() -> String {
    let mut b = [0u8; 12];
    rand::rng().fill_bytes(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("rtcgw{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_sdp_when_no_model_and_no_session() {
        let body = build("v=0\r\n", None, None).unwrap();
        assert_eq!(body.content_type, "application/sdp");
        assert_eq!(body.bytes, b"v=0\r\n");
    }

    #[test]
    fn multipart_with_rewritten_model_keeps_the_clients_session() {
        let body = build(
            "v=0\r\n",
            Some(r#"{"model":" alias ","instructions":"be brief"}"#),
            Some("gpt-realtime"),
        )
        .unwrap();
        let boundary = body
            .content_type
            .strip_prefix("multipart/form-data; boundary=")
            .unwrap();
        let text = String::from_utf8(body.bytes).unwrap();
        assert!(text.starts_with(&format!("--{boundary}\r\n")));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert!(text.contains("name=\"sdp\"\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n\r\n"));
        let json_start = text.find('{').unwrap();
        let json_end = text.rfind('}').unwrap();
        let session: Value = serde_json::from_str(&text[json_start..=json_end]).unwrap();
        assert_eq!(session["model"], "gpt-realtime");
        assert_eq!(session["instructions"], "be brief");
        assert!(
            session.get("type").is_none(),
            "the client's session is not extended"
        );
    }

    #[test]
    fn model_only_creates_a_realtime_session() {
        let s = session_for_upstream(None, Some("m")).unwrap().unwrap();
        assert_eq!(
            Value::Object(s),
            serde_json::json!({"type":"realtime","model":"m"})
        );
    }

    #[test]
    fn session_that_is_not_an_object_is_a_client_fault() {
        for bad in ["[1]", "\"x\"", "{", "nul"] {
            let e = build("v=0\r\n", Some(bad), Some("m")).unwrap_err();
            assert_eq!(e.code(), "invalid_session_json", "{bad}");
        }
    }
}
