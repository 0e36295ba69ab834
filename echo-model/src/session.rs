//! The `session.created` server event, in the GA Realtime shape.

use serde_json::{json, Map, Value};

/// Model reported when the request named none (official SDKs omit `?model=` when an ephemeral
/// token carries the session).
pub(crate) const DEFAULT_MODEL: &str = "gpt-realtime";

/// Build `session.created`. Fields the client sent in its `session` JSON (instructions, voice,
/// …) are reflected back over our defaults, as the real service does; `id`, `object` and
/// `model` are always ours.
pub(crate) fn session_created(model: &str, requested: Option<&Value>) -> Value {
    let mut session = Map::new();
    session.insert("type".into(), json!("realtime"));
    session.insert("object".into(), json!("realtime.session"));
    session.insert("id".into(), json!(crate::ids::session_id()));
    session.insert("model".into(), json!(model));
    session.insert("output_modalities".into(), json!(["audio"]));
    session.insert(
        "instructions".into(),
        json!("You are a local echo model: everything you receive is sent back unchanged."),
    );
    session.insert("tools".into(), json!([]));
    session.insert("tool_choice".into(), json!("auto"));
    session.insert("max_output_tokens".into(), json!("inf"));
    session.insert("tracing".into(), Value::Null);
    session.insert("prompt".into(), Value::Null);
    session.insert("expires_at".into(), json!(expires_at()));
    session.insert(
        "audio".into(),
        json!({
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": null,
                "noise_reduction": null,
                "turn_detection": {"type": "server_vad", "threshold": 0.5,
                                    "prefix_padding_ms": 300, "silence_duration_ms": 200,
                                    "create_response": true, "interrupt_response": true}
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy", "speed": 1.0}
        }),
    );
    if let Some(Value::Object(req)) = requested {
        for (k, v) in req {
            if !matches!(k.as_str(), "id" | "object" | "model" | "expires_at") {
                session.insert(k.clone(), v.clone());
            }
        }
    }
    json!({
        "type": "session.created",
        "event_id": crate::ids::event_id(),
        "session": Value::Object(session),
    })
}

fn expires_at() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Realtime sessions last at most 60 minutes.
    now + 3600
}

/// The GPT-Live model reported when a session names one (it always does: the API requires
/// `session.model`); used only for an empty one.
pub(crate) const DEFAULT_LIVE_MODEL: &str = "gpt-live-1";

/// The resolved GPT-Live session (the `openai` package's `SessionResource`): the server's
/// defaults, with the fields the client sent at create reflected over them (as the real
/// service resolves them); `id`, `model`, `status` and `expires_at` are always ours.
pub(crate) fn live_session(id: &str, model: &str, requested: Option<&Value>) -> Value {
    let mut session = Map::new();
    session.insert("id".into(), json!(id));
    session.insert("model".into(), json!(model));
    session.insert("status".into(), json!("active"));
    session.insert("expires_at".into(), json!(expires_at()));
    session.insert(
        "instructions".into(),
        json!("You are a local echo model: everything you receive is sent back unchanged."),
    );
    session.insert("audio".into(), json!({"output": {"voice": "marin"}}));
    session.insert("delegation".into(), Value::Null);
    session.insert("store".into(), json!(false));
    if let Some(Value::Object(req)) = requested {
        for (k, v) in req {
            if !matches!(k.as_str(), "id" | "model" | "status" | "expires_at") {
                session.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(session)
}

/// `session.started`: the first event of a GPT-Live session on its data channel.
pub(crate) fn session_started(session: &Value) -> Value {
    json!({
        "type": "session.started",
        "event_id": crate::ids::event_id(),
        "session": session,
    })
}

/// `session.usage.updated`: the cumulative audio seconds so far (a total, not an increment).
pub(crate) fn usage_updated(seconds: f64) -> Value {
    json!({
        "type": "session.usage.updated",
        "event_id": crate::ids::event_id(),
        "usage": {"seconds": seconds},
    })
}

/// `session.closed`: why the session ended, its final snapshot and its final cumulative
/// usage. `client_event_id` names the client's `session.close`, when it carried an id.
pub(crate) fn session_closed(
    reason: &str,
    session: &Value,
    seconds: f64,
    client_event_id: Option<&str>,
) -> Value {
    let mut event = json!({
        "type": "session.closed",
        "event_id": crate::ids::event_id(),
        "reason": reason,
        "session": session,
        "usage": {"seconds": seconds},
    });
    if let Some(id) = client_event_id {
        event["client_event_id"] = json!(id);
    }
    event
}

/// The GPT-Live `error` event for a client command the session refuses.
pub(crate) fn live_error(code: &str, message: &str, client_event_id: Option<&str>) -> Value {
    let mut event = json!({
        "type": "error",
        "event_id": crate::ids::event_id(),
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": null,
            "client_event_id": client_event_id,
        },
    });
    if let Some(id) = client_event_id {
        event["client_event_id"] = json!(id);
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_session_reflects_the_clients_fields_but_not_ours() {
        let requested = json!({"model": "x", "id": "mine", "status": "closed",
                               "instructions": "be brief", "store": true});
        let s = live_session("live_1", "gpt-live-1", Some(&requested));
        assert_eq!(s["id"], "live_1");
        assert_eq!(s["model"], "gpt-live-1");
        assert_eq!(s["status"], "active");
        assert_eq!(s["instructions"], "be brief");
        assert_eq!(s["store"], true);
        assert!(s["expires_at"].as_u64().unwrap() > 1_700_000_000);
        let closed = session_closed("close_requested", &s, 1.5, Some("c1"));
        assert_eq!(closed["usage"]["seconds"], 1.5);
        assert_eq!(closed["client_event_id"], "c1");
        assert!(session_closed("expired", &s, 0.0, None)
            .get("client_event_id")
            .is_none());
    }
}
