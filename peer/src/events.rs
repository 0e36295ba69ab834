//! The Realtime API's data channel.

/// Label of the data channel that carries Realtime events (JSON text messages) both ways.
/// The client opens it; the relay forwards only it; the echo model answers on it.
pub const EVENTS_CHANNEL: &str = "oai-events";
