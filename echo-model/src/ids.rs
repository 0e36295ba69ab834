//! Identifiers in the shapes OpenAI uses (`rtc_…`, `live_…`, `sess_…`, `event_…`).

use rand::Rng;

fn hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

/// Call id for the `Location` header. One widely used client requires the `rtc_` prefix.
pub(crate) fn call_id() -> String {
    format!("rtc_{}", hex(16))
}

/// GPT-Live session id (the `session.id` of the create answer). Clients keep it unchanged,
/// prefix included.
pub(crate) fn live_session_id() -> String {
    format!("live_{}", hex(16))
}

pub(crate) fn session_id() -> String {
    format!("sess_{}", hex(12))
}

/// A Realtime response id (`resp_…`).
pub(crate) fn response_id() -> String {
    format!("resp_{}", hex(12))
}

pub(crate) fn event_id() -> String {
    format!("event_{}", hex(12))
}
