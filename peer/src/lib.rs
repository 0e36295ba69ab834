//! The WebRTC peer plumbing shared by the relay, the echo model and the load generator.
//!
//! * [`events`]: the Realtime API's data-channel label.
//! * [`multipart`]: `multipart/form-data` bodies with `sdp` and `session` parts, built and
//!   parsed under byte limits (also used by the Envoy filter, so it builds for
//!   wasm32-wasip1 without the `shell` feature), and [`header_params`], the `; key=value`
//!   parameter lists of its headers.
//! * `crypto` (feature `shell`): one crypto provider and DTLS certificate per process.
//! * `shell` (feature `shell`): a sans-IO driver of one str0m `Rtc`, and `udp`, a thin tokio
//!   UDP wrapper around it.
//! * [`framing`]: RFC 4571 frames, how ICE-TCP carries packets over a stream (sans-IO).
//! * `tcp` (feature `shell`): an active ICE-TCP transport for a shell, for clients without UDP.
//! * `dc_queue` (feature `shell`): data-channel messages waiting for room, capped in bytes.
//!
//! A panic here would take down a call task, or the Wasm VM in the filter: no unwrap, expect,
//! panic or indexing outside tests.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

pub mod events;
pub mod framing;
pub mod header_params;
pub mod multipart;

#[cfg(feature = "shell")]
pub mod crypto;
#[cfg(feature = "shell")]
pub mod dc_queue;
#[cfg(feature = "shell")]
pub mod dtls_config;
#[cfg(feature = "shell")]
pub mod shell;
#[cfg(feature = "shell")]
pub mod tcp;
#[cfg(feature = "shell")]
pub mod udp;

pub use events::EVENTS_CHANNEL;
