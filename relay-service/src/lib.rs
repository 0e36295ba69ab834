//! Relay service: gRPC call setup and a str0m WebRTC bridge for the OpenAI Realtime API.
//!
//! Pure logic (`pt_map`, `stun`, `upstream_body`, `allowlist`, `ids`,
//! `error`) is tested without sockets; `bridge` is sans-IO over str0m; `shard` (the media
//! threads), `media_socket` and `media_tcp` own the sockets and timers; `relay` holds the domain operations that
//! `grpc` adapts and `server` wires into a process.

pub mod allowlist;
pub mod bridge;
pub mod budget;
pub mod call_state;
pub mod config;
pub mod error;
pub mod gateway_event;
pub mod grpc;
pub mod ids;
pub mod media_socket;
pub mod media_tcp;
pub mod metrics;
pub mod peer;
pub mod process_metrics;
pub mod pt_map;
pub mod registry;
pub mod relay;
pub mod replica;
pub mod send_batch;
pub mod server;
pub mod session_ids;
pub mod shard;
pub mod signaling;
pub mod state_metrics;
pub mod stun;
pub mod upstream_body;
pub mod usage;
pub mod usage_metrics;
pub mod usage_record;
pub mod usage_tap;
