//! Local echo model.
//!
//! Two things live here, both speaking the OpenAI WebRTC wire formats:
//!
//! * [`provider::MockProvider`]: an HTTP + WebRTC peer that behaves like the model provider's
//!   Realtime endpoint `POST /v1/realtime/calls` and its GPT-Live endpoint
//!   `POST /v1/live/sessions`. It answers offers, sends `session.created` (Realtime) or
//!   `session.started` (GPT-Live, then `session.usage.updated` every second and
//!   `session.closed` at the end) when the `oai-events` data channel opens, and echoes every
//!   data-channel message and RTP packet back.
//!   Tests, benchmarks and the product's embedded "local echo model" all use it.
//! * [`client::TestClient`]: a str0m offerer (full ICE, RTP mode, Opus only) that plays the
//!   browser/SDK side in tests and benchmarks.
//!
//! Neither ever contacts a STUN server: both advertise a single host candidate on the IP they
//! were told to bind.

pub mod client;
pub mod provider;
pub mod responses;

mod api_error;
mod ids;
mod peer;
mod session;
pub mod sideband;

pub use client::{
    AudioStats, ClientConfig, ClientTransport, ConnectedClient, DcMessage, RttSummary, TestClient,
};
pub use provider::{Api, MockProvider, ProviderConfig, ProviderStats, RecordedRequest};
