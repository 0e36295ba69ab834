//! The echo model's answer to a Realtime `response.create`: besides the echo of the event
//! itself, what OpenAI sends for a response, in the `openai` package's shapes:
//! `rate_limits.updated` (at the start of a response), `response.created` (status
//! `in_progress`) and `response.done` (status `completed`) with `response.usage`.
//!
//! The usage is deterministic, derived from the size of the `response.create` event, so tests
//! can assert exact totals ([`usage_for`]): with `u = ceil(len / 4)` bytes-per-token units,
//! input text `u`, input audio `2u`, output text `ceil(len / 8)`, output audio `3 ×` that;
//! from the second response on, the input text is served from the cache (`cached_tokens` =
//! input text, all of it text), as a conversation's repeated prefix is.

use serde_json::{json, Value};

/// Requests per minute the echo model reports in `rate_limits.updated`.
pub const REQUESTS_LIMIT: i64 = 1000;
/// Tokens per minute it reports.
pub const TOKENS_LIMIT: i64 = 200_000;

/// The `response.usage` of the `index`-th response (0-based) of a call, for a
/// `response.create` event of `event_len` bytes.
pub fn usage_for(event_len: usize, index: u64) -> Value {
    let unit = event_len.div_ceil(4) as u64;
    let (input_text, input_audio) = (unit, 2 * unit);
    let output_text = event_len.div_ceil(8) as u64;
    let output_audio = 3 * output_text;
    let cached = if index == 0 { 0 } else { input_text };
    let input = input_text + input_audio;
    let output = output_text + output_audio;
    json!({
        "total_tokens": input + output,
        "input_tokens": input,
        "output_tokens": output,
        "input_token_details": {
            "text_tokens": input_text,
            "audio_tokens": input_audio,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": { "text_tokens": cached, "audio_tokens": 0, "image_tokens": 0 },
        },
        "output_token_details": { "text_tokens": output_text, "audio_tokens": output_audio },
    })
}

/// A call's responses so far.
#[derive(Debug, Default)]
pub struct Responses {
    count: u64,
    tokens_used: i64,
}

impl Responses {
    /// The events that answer `event` (a client text event) if it is a `response.create`:
    /// `rate_limits.updated`, `response.created`, `response.done`. A byte search first, so
    /// other events are not parsed.
    pub fn answer(&mut self, event: &[u8]) -> Option<[Value; 3]> {
        const NEEDLE: &[u8] = b"\"response.create\"";
        if !event.windows(NEEDLE.len()).any(|w| w == NEEDLE) {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        let head: Head = serde_json::from_slice(event).ok()?;
        if head.kind.as_deref() != Some("response.create") {
            return None;
        }
        let index = self.count;
        self.count += 1;
        let usage = usage_for(event.len(), index);
        let rate_limits = json!({
            "type": "rate_limits.updated",
            "event_id": crate::ids::event_id(),
            "rate_limits": [
                { "name": "requests", "limit": REQUESTS_LIMIT,
                  "remaining": REQUESTS_LIMIT - self.count as i64, "reset_seconds": 60.0 },
                { "name": "tokens", "limit": TOKENS_LIMIT,
                  "remaining": (TOKENS_LIMIT - self.tokens_used).max(0), "reset_seconds": 60.0 },
            ],
        });
        self.tokens_used += usage["total_tokens"].as_i64().unwrap_or(0);
        let id = crate::ids::response_id();
        let created = json!({
            "type": "response.created",
            "event_id": crate::ids::event_id(),
            "response": { "object": "realtime.response", "id": id, "status": "in_progress",
                          "output": [], "usage": null },
        });
        let done = json!({
            "type": "response.done",
            "event_id": crate::ids::event_id(),
            "response": { "object": "realtime.response", "id": id, "status": "completed",
                          "output": [], "usage": usage },
        });
        Some([rate_limits, created, done])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_create_is_answered_with_exact_deterministic_usage() {
        let mut r = Responses::default();
        let create = br#"{"type":"response.create","event_id":"e1"}"#; // 41 bytes
        let [limits, created, done] = r.answer(create).unwrap();
        assert_eq!(limits["type"], "rate_limits.updated");
        assert_eq!(limits["rate_limits"][0]["remaining"], REQUESTS_LIMIT - 1);
        assert_eq!(created["response"]["status"], "in_progress");
        assert_eq!(done["type"], "response.done");
        assert_eq!(done["response"]["id"], created["response"]["id"]);
        let u = &done["response"]["usage"];
        // 41 bytes: u = 11; input 11 + 22; output text 6, audio 18.
        assert_eq!(
            (
                u["input_tokens"].as_u64(),
                u["output_tokens"].as_u64(),
                u["total_tokens"].as_u64()
            ),
            (Some(33), Some(24), Some(57))
        );
        assert_eq!(u["input_token_details"]["cached_tokens"], 0);
        let [limits, _, done] = r.answer(create).unwrap();
        assert_eq!(limits["rate_limits"][1]["remaining"], TOKENS_LIMIT - 57);
        assert_eq!(
            done["response"]["usage"]["input_token_details"]["cached_tokens"],
            11
        );
        // Other events, including ones that mention it, are not responses.
        for other in [
            &br#"{"type":"response.cancel"}"#[..],
            br#"{"type":"conversation.item.create","text":"\"response.create\""}"#,
            b"response.create",
        ] {
            assert!(r.answer(other).is_none());
        }
    }
}
