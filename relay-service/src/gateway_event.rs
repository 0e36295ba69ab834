//! Events the relay itself writes on a client's `oai-events` channel, in the provider's
//! own shape, so a client learns what happened to its call from the stream it already reads.
//!
//! The shape is the Realtime API's server `error` event (the `openai` package's
//! `RealtimeErrorEvent`): `{"type":"error","event_id","error":{"type","code","message",
//! "param","event_id"}}`. `error.event_id` names the client event that caused it, when there
//! was one and it carried an id.

use serde::Deserialize;
use serde_json::json;

/// The stable code of an event that did not fit the receiving peer's `max-message-size`.
pub const EVENT_TOO_LARGE: &str = "event_too_large";

/// The stable code of the event sent when the provider's side went silent mid-call.
pub const UPSTREAM_GONE: &str = "upstream_gone";

/// The `error` event telling the client that the model's connection stopped: nothing arrived
/// from the provider for `silent_secs`, so the call ends (`server_error`, as OpenAI reports
/// its own failures).
pub fn upstream_gone(silent_secs: u64, seq: u64) -> Vec<u8> {
    json!({
        "type": "error",
        "event_id": format!("event_relay_{seq}"),
        "error": {
            "type": "server_error",
            "code": UPSTREAM_GONE,
            "message": format!(
                "The model's connection stopped: nothing arrived from it for {silent_secs} s. \
                 The call is ending."
            ),
            "param": null,
            "event_id": null,
        },
    })
    .to_string()
    .into_bytes()
}

/// What the relay reads of an event it could not deliver: its `type` and `event_id`. Only on
/// this rare path is a message parsed at all.
#[derive(Debug, Default, Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: Option<String>,
    event_id: Option<String>,
}

fn head(data: &[u8]) -> EventHead {
    serde_json::from_slice(data).unwrap_or_default()
}

/// The GPT-Live server event that ends a session: its reason and final usage.
pub const SESSION_CLOSED: &str = "session.closed";

/// Whether a message from the provider of a GPT-Live session is its `session.closed` event.
/// A byte search first, so only that rare event is parsed.
pub fn is_session_closed(data: &[u8]) -> bool {
    let needle = SESSION_CLOSED.as_bytes();
    data.windows(needle.len()).any(|w| w == needle)
        && head(data).kind.as_deref() == Some(SESSION_CLOSED)
}

/// Which peer sent an event the relay could not deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Model,
}

/// The `error` event telling the client that an event of `len` bytes from `sender` was not
/// delivered because the receiving peer takes at most `max` bytes per message. `seq` makes
/// the relay's event ids unique within the call.
pub fn event_too_large(sender: Sender, data: &[u8], max: usize, seq: u64) -> Vec<u8> {
    let head = head(data);
    let len = data.len();
    let what = match head.kind.as_deref() {
        Some(kind) => format!("{} event", short(kind)),
        None => "event".to_string(),
    };
    let (message, caused_by) = match sender {
        Sender::Client => (
            format!(
                "The {what} is {len} bytes; the model's connection takes data-channel \
                 messages of at most {max} bytes (its max-message-size). It was not delivered."
            ),
            head.event_id.as_deref().map(short),
        ),
        Sender::Model => (
            format!(
                "The model sent a {what} of {len} bytes; this connection takes data-channel \
                 messages of at most {max} bytes (its max-message-size). It was dropped."
            ),
            None,
        ),
    };
    let event = json!({
        "type": "error",
        "event_id": format!("event_relay_{seq}"),
        "error": {
            "type": "invalid_request_error",
            "code": EVENT_TOO_LARGE,
            "message": message,
            "param": null,
            "event_id": caused_by,
        },
    });
    event.to_string().into_bytes()
}

/// A peer's string, bounded: an event type or id is short, anything longer is not echoed in
/// full.
fn short(s: &str) -> &str {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s;
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn parse(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn a_client_event_that_does_not_fit_is_reported_with_its_id() {
        let sent = br#"{"type":"conversation.item.create","event_id":"evt_42","item":{}}"#;
        let e = parse(&event_too_large(Sender::Client, sent, 10, 3));
        assert_eq!(e["type"], "error");
        assert_eq!(e["event_id"], "event_relay_3");
        let error = &e["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], EVENT_TOO_LARGE);
        assert_eq!(error["event_id"], "evt_42");
        assert!(error["param"].is_null());
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains("conversation.item.create")
                && message.contains(&format!("{} bytes", sent.len()))
                && message.contains("at most 10 bytes"),
            "{message}"
        );
        // All four keys of an OpenAI error object, always.
        for key in ["type", "code", "message", "param", "event_id"] {
            assert!(error.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn only_a_session_closed_event_is_one() {
        for (data, want) in [
            (
                &br#"{"type":"session.closed","reason":"close_requested","usage":{"seconds":3.5}}"#
                    [..],
                true,
            ),
            (br#"{"event_id":"e1","type":"session.closed"}"#, true),
            (
                br#"{"type":"session.usage.updated","usage":{"seconds":1}}"#,
                false,
            ),
            (
                br#"{"type":"conversation.item","text":"session.closed"}"#,
                false,
            ),
            (br#"{"type":"session.closed""#, false),
            (b"session.closed", false),
            (b"", false),
        ] {
            assert_eq!(
                is_session_closed(data),
                want,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn the_provider_going_silent_is_a_server_error_with_a_stable_code() {
        let e = parse(&upstream_gone(15, 2));
        assert_eq!(
            (e["type"].as_str(), e["event_id"].as_str()),
            (Some("error"), Some("event_relay_2"))
        );
        let error = &e["error"];
        assert_eq!(error["type"], "server_error");
        assert_eq!(error["code"], UPSTREAM_GONE);
        assert!(error["message"].as_str().unwrap().contains("15 s"));
        assert!(error["param"].is_null() && error["event_id"].is_null());
    }

    #[test]
    fn a_model_event_or_anything_unreadable_is_reported_without_a_cause_id() {
        let sent = br#"{"type":"response.done","event_id":"event_9"}"#;
        let e = parse(&event_too_large(Sender::Model, sent, 65_536, 0));
        assert!(e["error"]["event_id"].is_null());
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("response.done"));
        let e = parse(&event_too_large(Sender::Client, &[0xff; 100], 10, 1));
        assert!(e["error"]["event_id"].is_null());
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("The event is 100 bytes"));
        let long = format!(
            r#"{{"type":"{}","event_id":"{}"}}"#,
            "t".repeat(500),
            "i".repeat(500)
        );
        let e = parse(&event_too_large(Sender::Client, long.as_bytes(), 10, 1));
        assert_eq!(e["error"]["event_id"].as_str().unwrap().len(), 64);
        assert!(e["error"]["message"].as_str().unwrap().len() < 300);
    }
}
