//! Events the relay itself writes on a client's `oai-events` channel, in the provider's
//! own shape, so a client learns what happened to its call from the stream it already reads.
//!
//! The shape is the server `error` event of the call's API (the `openai` package's types):
//! Realtime's `RealtimeErrorEvent`, `{"type":"error","event_id","error":{"type","code",
//! "message","param","event_id"}}`, where `error.event_id` names the client event that caused
//! it; GPT-Live's `ErrorEvent`, `{"type":"error","event_id","client_event_id","error":{"type",
//! "code","message","param","client_event_id"}}`, where both `client_event_id`s name it. Null
//! when there was no such event or it carried no id.

use realtime_relay_proto::call_id::Kind;
use serde::Deserialize;
use serde_json::{json, Value};

/// An `error` event in `api`'s shape, caused by the client event `caused_by` if any.
fn error_event(
    api: Kind,
    seq: u64,
    error_type: &str,
    code: &str,
    message: String,
    caused_by: Option<&str>,
) -> Vec<u8> {
    let event_id = format!("event_relay_{seq}");
    let event: Value = match api {
        Kind::Realtime => json!({
            "type": "error",
            "event_id": event_id,
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": null,
                "event_id": caused_by,
            },
        }),
        Kind::Live => json!({
            "type": "error",
            "event_id": event_id,
            "client_event_id": caused_by,
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": null,
                "client_event_id": caused_by,
            },
        }),
    };
    event.to_string().into_bytes()
}

/// The stable code of an event that did not fit the receiving peer's `max-message-size`.
pub const EVENT_TOO_LARGE: &str = "event_too_large";

/// The stable code of the event sent when a call reached its budget.
pub const BUDGET_EXCEEDED: &str = "budget_exceeded";

/// The `error` event telling the client its call reached its budget (`what`: how) and ends.
pub fn budget_exceeded(api: Kind, what: &str, seq: u64) -> Vec<u8> {
    error_event(
        api,
        seq,
        "invalid_request_error",
        BUDGET_EXCEEDED,
        format!("{what} The call is ending."),
        None,
    )
}

/// The event the relay sends the provider to stop spending on a call over its budget: the
/// Realtime client event `response.cancel` (cancels the response in progress, if any), the
/// GPT-Live client event `session.close` (the session ends with `session.closed`).
pub fn stop_for_budget(api: Kind, seq: u64) -> Vec<u8> {
    let kind = match api {
        Kind::Realtime => "response.cancel",
        Kind::Live => "session.close",
    };
    json!({ "type": kind, "event_id": format!("event_relay_{seq}") })
        .to_string()
        .into_bytes()
}

/// The stable code of the event sent when the provider's side went silent mid-call.
pub const UPSTREAM_GONE: &str = "upstream_gone";

/// The `error` event telling the client that the model's connection stopped: nothing arrived
/// from the provider for `silent_secs`, so the call ends (`server_error`, as OpenAI reports
/// its own failures).
pub fn upstream_gone(api: Kind, silent_secs: u64, seq: u64) -> Vec<u8> {
    error_event(
        api,
        seq,
        "server_error",
        UPSTREAM_GONE,
        format!(
            "The model's connection stopped: nothing arrived from it for {silent_secs} s. \
             The call is ending."
        ),
        None,
    )
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
pub fn event_too_large(api: Kind, sender: Sender, data: &[u8], max: usize, seq: u64) -> Vec<u8> {
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
    error_event(
        api,
        seq,
        "invalid_request_error",
        EVENT_TOO_LARGE,
        message,
        caused_by,
    )
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
        let e = parse(&event_too_large(
            Kind::Realtime,
            Sender::Client,
            sent,
            10,
            3,
        ));
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
        let e = parse(&upstream_gone(Kind::Realtime, 15, 2));
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
        let e = parse(&event_too_large(
            Kind::Realtime,
            Sender::Model,
            sent,
            65_536,
            0,
        ));
        assert!(e["error"]["event_id"].is_null());
        assert!(e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("response.done"));
        let e = parse(&event_too_large(
            Kind::Realtime,
            Sender::Client,
            &[0xff; 100],
            10,
            1,
        ));
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
        let e = parse(&event_too_large(
            Kind::Realtime,
            Sender::Client,
            long.as_bytes(),
            10,
            1,
        ));
        assert_eq!(e["error"]["event_id"].as_str().unwrap().len(), 64);
        assert!(e["error"]["message"].as_str().unwrap().len() < 300);
    }

    /// A GPT-Live client gets the error in Live's shape: the causing event's id under
    /// `client_event_id`, at the top and in `error`, as the package's `ErrorEvent` reads it.
    #[test]
    fn a_live_client_gets_the_error_in_lives_shape() {
        let sent = br#"{"type":"response.create","event_id":"evt_7"}"#;
        let e = parse(&event_too_large(Kind::Live, Sender::Client, sent, 10, 1));
        assert_eq!(e["type"], "error");
        assert_eq!(e["event_id"], "event_relay_1");
        assert_eq!(e["client_event_id"], "evt_7");
        let error = &e["error"];
        assert_eq!(error["client_event_id"], "evt_7");
        assert_eq!(error["code"], EVENT_TOO_LARGE);
        assert!(error.get("event_id").is_none(), "{e}");
        for key in ["type", "code", "message", "param"] {
            assert!(error.get(key).is_some(), "{key}");
        }
        let gone = parse(&upstream_gone(Kind::Live, 15, 2));
        assert_eq!(gone["error"]["code"], UPSTREAM_GONE);
        assert!(gone["client_event_id"].is_null() && gone["error"]["client_event_id"].is_null());
    }
}
