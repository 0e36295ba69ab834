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
