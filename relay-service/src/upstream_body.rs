//! The body of the upstream SDP exchange, by API.
//!
//! Realtime (`/v1/realtime/calls`): when a model is known, the upstream gets
//! `multipart/form-data` with an `sdp` part and a `session` JSON part whose `model` is the
//! upstream model name (the client's session JSON merged, model rewritten). The published
//! Realtime spec carries the model in the session, not in a query parameter. With no model
//! and no session, the offer goes as plain `application/sdp` (the model then comes from the
//! key or a later `session.update`).
//!
//! GPT-Live (`/v1/live/sessions`): always `application/json`,
//! `{"session": <the client's session, model rewritten>, "transport": {"type": "webrtc",
//! "sdp": <offer>}}` (the `openai` package's `LiveCreateParams`). The Live API requires
//! `session.model` for every transport, so a Live request with no model anywhere is the
//! client's fault (`missing_model`) before the upstream hears of it.

use crate::error::SetupError;
use rand::RngCore;
use realtime_relay_proto::call_id::Kind;
use rtc_peer::multipart;
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamBody {
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// The session the upstream gets, checked and merged once, before our offer exists.
#[derive(Debug, Clone, PartialEq)]
pub enum UpstreamSession {
    /// Realtime: the session part of a multipart body, or none (raw SDP).
    Realtime(Option<Map<String, Value>>),
    /// GPT-Live: the `session` object of the JSON body (it always has a `model`).
    Live(Map<String, Value>),
}

impl UpstreamSession {
    /// The client's session (empty or absent: none) checked and merged with the upstream
    /// model for a call of `kind`.
    pub fn new(
        kind: Kind,
        client_session: Option<&str>,
        upstream_model: Option<&str>,
    ) -> Result<Self, SetupError> {
        Ok(match kind {
            Kind::Realtime => {
                UpstreamSession::Realtime(session_for_upstream(client_session, upstream_model)?)
            }
            Kind::Live => {
                UpstreamSession::Live(live_session_for_upstream(client_session, upstream_model)?)
            }
        })
    }

    /// The exchange's body with our `sdp` offer.
    pub fn encode(&self, sdp: &str) -> UpstreamBody {
        match self {
            UpstreamSession::Realtime(session) => encode(sdp, session.as_ref()),
            UpstreamSession::Live(session) => encode_live(sdp, session),
        }
    }
}

/// The client's session JSON as an object; empty or absent: none.
fn client_object(client_session: Option<&str>) -> Result<Option<Map<String, Value>>, SetupError> {
    Ok(
        match client_session.map(str::trim).filter(|s| !s.is_empty()) {
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
        },
    )
}

/// Builds the session JSON for upstream: the client's object (if any) with `model`
/// set to `upstream_model` (if any). A session we create ourselves also gets
/// `"type":"realtime"`, which the GA API requires.
pub fn session_for_upstream(
    client_session: Option<&str>,
    upstream_model: Option<&str>,
) -> Result<Option<Map<String, Value>>, SetupError> {
    let mut session = client_object(client_session)?;
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

/// The `session` of a GPT-Live create: the client's object (`{}` when it sent none) with
/// `model` set to `upstream_model`. Nothing is added: a Live session has no `type`. Without
/// an upstream model the client's own non-empty `model` stands; with neither, the Live API
/// would refuse the request, so the relay does (`missing_model`), before the upstream hears
/// of it.
pub fn live_session_for_upstream(
    client_session: Option<&str>,
    upstream_model: Option<&str>,
) -> Result<Map<String, Value>, SetupError> {
    let mut session = client_object(client_session)?.unwrap_or_default();
    match upstream_model.map(str::trim).filter(|m| !m.is_empty()) {
        Some(model) => {
            session.insert("model".into(), Value::String(model.to_string()));
        }
        None => {
            let named = session
                .get("model")
                .and_then(Value::as_str)
                .is_some_and(|m| !m.trim().is_empty());
            if !named {
                return Err(SetupError::MissingModel);
            }
        }
    }
    Ok(session)
}

/// The JSON body of a GPT-Live create (`LiveCreateParams`): the session and our offer as a
/// WebRTC transport.
pub fn encode_live(sdp: &str, session: &Map<String, Value>) -> UpstreamBody {
    let body = json!({
        "session": session,
        "transport": {"type": "webrtc", "sdp": sdp},
    });
    UpstreamBody {
        content_type: "application/json".into(),
        bytes: body.to_string().into_bytes(),
    }
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
            let e = UpstreamSession::new(Kind::Live, Some(bad), Some("m")).unwrap_err();
            assert_eq!(e.code(), "invalid_session_json", "live {bad}");
        }
    }

    /// One row per case: the client's session, the upstream model, and the `session` the
    /// GPT-Live upstream gets (or the error code).
    #[test]
    fn live_sessions_table() {
        type Row<'a> = (Option<&'a str>, Option<&'a str>, Result<Value, &'a str>);
        let rows: &[Row] = &[
            (None, Some("gpt-live-1"), Ok(json!({"model": "gpt-live-1"}))),
            (
                Some(""),
                Some("gpt-live-1"),
                Ok(json!({"model": "gpt-live-1"})),
            ),
            (
                Some("  "),
                Some(" gpt-live-1 "),
                Ok(json!({"model": "gpt-live-1"})),
            ),
            (
                Some("{}"),
                Some("gpt-live-1"),
                Ok(json!({"model": "gpt-live-1"})),
            ),
            (
                Some(
                    r#"{"model":"alias","instructions":"be brief","audio":{"output":{"voice":"marin"}}}"#,
                ),
                Some("gpt-live-1"),
                Ok(json!({"model": "gpt-live-1", "instructions": "be brief",
                          "audio": {"output": {"voice": "marin"}}})),
            ),
            // No `type` is added, and one the client sent is kept as it sent it.
            (
                Some(r#"{"type":"realtime"}"#),
                Some("m"),
                Ok(json!({"type": "realtime", "model": "m"})),
            ),
            // Without an upstream model the client's own stands.
            (
                Some(r#"{"model":"gpt-live-1"}"#),
                None,
                Ok(json!({"model": "gpt-live-1"})),
            ),
            (
                Some(r#"{"model":"gpt-live-1"}"#),
                Some(" "),
                Ok(json!({"model": "gpt-live-1"})),
            ),
            (None, None, Err("missing_model")),
            (Some("{}"), Some(""), Err("missing_model")),
            (Some(r#"{"model":" "}"#), None, Err("missing_model")),
            (Some(r#"{"model":7}"#), None, Err("missing_model")),
            (Some("[]"), Some("m"), Err("invalid_session_json")),
            (Some("{"), Some("m"), Err("invalid_session_json")),
        ];
        for (client, model, want) in rows {
            let got = live_session_for_upstream(*client, *model)
                .map(Value::Object)
                .map_err(|e| e.code());
            assert_eq!(got.as_ref(), want.as_ref(), "{client:?} {model:?}");
        }
    }

    #[test]
    fn a_live_body_is_json_with_the_session_and_a_webrtc_transport() {
        let session = UpstreamSession::new(
            Kind::Live,
            Some(r#"{"model":"alias","instructions":"hi"}"#),
            Some("gpt-live-1"),
        )
        .unwrap();
        let offer = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\n";
        let body = session.encode(offer);
        assert_eq!(body.content_type, "application/json");
        let v: Value = serde_json::from_slice(&body.bytes).unwrap();
        assert_eq!(
            v,
            json!({
                "session": {"model": "gpt-live-1", "instructions": "hi"},
                "transport": {"type": "webrtc", "sdp": offer},
            })
        );
    }

    #[test]
    fn realtime_sessions_keep_their_bodies() {
        let none = UpstreamSession::new(Kind::Realtime, None, None).unwrap();
        assert_eq!(none, UpstreamSession::Realtime(None));
        assert_eq!(none.encode("v=0\r\n").content_type, "application/sdp");
        let with_model = UpstreamSession::new(Kind::Realtime, None, Some("m")).unwrap();
        assert!(with_model
            .encode("v=0\r\n")
            .content_type
            .starts_with("multipart/form-data; boundary="));
    }
}
