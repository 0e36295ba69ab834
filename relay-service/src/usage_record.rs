//! The `call.usage` record: one structured log event at the end of every call, for billing
//! and audit pipelines that read logs (`--log-format json` makes each a JSON object). It
//! names the caller by a hash of its principal, never the principal itself (an API key
//! name, a JWT subject…): records can be correlated per caller without exposing who.

use realtime_relay_proto::v1;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The tracing target of the record (filter on it: `RUST_LOG=call.usage=info`).
pub const TARGET: &str = "call.usage";

/// The first 16 hex digits of SHA-256 of the principal; `None` for a call without one.
pub fn principal_hash(principal: &str) -> Option<String> {
    if principal.is_empty() {
        return None;
    }
    let digest = Sha256::digest(principal.as_bytes());
    Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Logs the record of an ended call: one event on target [`TARGET`] whose fields are the
/// record's (flat, so `--log-format json` gives one JSON object per call with these keys;
/// token counts as `tokens_<kind>`, Live seconds as `audio_seconds`).
pub fn log(info: &v1::CallInfo) {
    let r = record(info);
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
    let n = |v: &Value| v.as_i64();
    let t = &r["tokens"];
    tracing::info!(
        target: "call.usage",
        call_id = %s("call_id"),
        api = %s("api"),
        principal_hash = r["principal_hash"].as_str(),
        model = %s("model"),
        upstream_model = %s("upstream_model"),
        worker = %s("worker"),
        created_at_ms = n(&r["created_at_ms"]),
        connected_at_ms = n(&r["connected_at_ms"]),
        ended_at_ms = n(&r["ended_at_ms"]),
        end_reason = %s("end_reason"),
        partial = r["partial"].as_bool(),
        error_events = n(&r["error_events"]),
        responses = n(&r["responses"]),
        tokens_total = n(&t["total"]),
        tokens_input = n(&t["input"]),
        tokens_output = n(&t["output"]),
        tokens_input_text = n(&t["input_text"]),
        tokens_input_audio = n(&t["input_audio"]),
        tokens_input_image = n(&t["input_image"]),
        tokens_input_cached = n(&t["input_cached"]),
        tokens_output_text = n(&t["output_text"]),
        tokens_output_audio = n(&t["output_audio"]),
        audio_seconds = r["audio_seconds"].as_f64(),
        "call usage"
    );
}

/// The record of an ended call.
pub fn record(info: &v1::CallInfo) -> Value {
    let live = info.api == v1::Api::Live as i32;
    let u = info.usage.clone().unwrap_or_default();
    let t = u.tokens.unwrap_or_default();
    let ms = |v: i64| (v > 0).then_some(v);
    let mut r = json!({
        "call_id": info.call_id,
        "api": if live { "live" } else { "realtime" },
        "principal_hash": principal_hash(&info.principal),
        "model": info.model,
        "upstream_model": info.upstream_model,
        "worker": info.worker_id,
        "created_at_ms": ms(info.created_at_ms),
        "connected_at_ms": ms(info.connected_at_ms),
        "ended_at_ms": ms(info.ended_at_ms),
        "end_reason": info.end_reason,
        "partial": u.partial,
        "error_events": u.error_events,
    });
    if live {
        r["audio_seconds"] = json!(u.audio_seconds);
    } else {
        r["responses"] = json!(u.responses);
        r["tokens"] = json!({
            "total": t.total_tokens,
            "input": t.input_tokens,
            "output": t.output_tokens,
            "input_text": t.input_text_tokens,
            "input_audio": t.input_audio_tokens,
            "input_image": t.input_image_tokens,
            "input_cached": t.input_cached_tokens,
            "output_text": t.output_text_tokens,
            "output_audio": t.output_audio_tokens,
        });
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_names_the_caller_by_hash_and_carries_the_api_figures() {
        let info = v1::CallInfo {
            call_id: "rtc_0123456789abcdef0123456789abcdef".into(),
            model: "gpt-realtime".into(),
            worker_id: "w1".into(),
            principal: "key:backend".into(),
            created_at_ms: 1000,
            connected_at_ms: 1100,
            ended_at_ms: 5000,
            end_reason: "hangup".into(),
            usage: Some(v1::CallUsage {
                tokens: Some(v1::TokenUsage {
                    total_tokens: 30,
                    input_tokens: 10,
                    output_tokens: 20,
                    ..Default::default()
                }),
                responses: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = record(&info);
        assert_eq!(r["api"], "realtime");
        assert_eq!(r["tokens"]["total"], 30);
        assert_eq!(r["responses"], 2);
        assert_eq!(r["end_reason"], "hangup");
        let hash = r["principal_hash"].as_str().unwrap();
        assert_eq!(hash.len(), 16);
        assert!(!r.to_string().contains("backend"), "{r}");
        assert!(r.get("audio_seconds").is_none());

        let live = v1::CallInfo {
            api: v1::Api::Live as i32,
            usage: Some(v1::CallUsage {
                audio_seconds: 12.5,
                partial: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = record(&live);
        assert_eq!(
            (r["api"].as_str(), r["audio_seconds"].as_f64()),
            (Some("live"), Some(12.5))
        );
        assert_eq!(r["partial"], true);
        assert!(r["principal_hash"].is_null() && r["connected_at_ms"].is_null());
        assert!(r.get("tokens").is_none());
    }
}
