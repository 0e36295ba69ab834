//! Host-free logic of the realtime Envoy filter.
//!
//! Nothing here calls proxy-wasm. A request's life is the state machine in [`flow`]: the
//! `realtime-filter` crate forwards each Envoy callback to it, and it acts only through the
//! [`host::Host`] trait (gRPC dispatch, replies, shared store, clock, random bytes, metrics,
//! logs). The steps it takes: [`classify`] → [`create::check_create_headers`] → body buffered
//! → [`create::validate_create_body`] → [`create::plan_create`] (worker, key, gRPC message) →
//! relay → [`relay::map_create_response`], with failover between relay replicas and the
//! worker's verdict applied on the way back. `POST /v1/realtime/client_secrets` is answered
//! here, with no relay call: [`client_secrets`] mints the gateway's ephemeral keys.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

pub mod budget;
pub mod callers;
pub mod classify;
pub mod client_secrets;
pub mod config;
pub mod content_type;
pub mod create;
pub mod ephemeral;
pub mod error;
pub mod flow;
pub mod global_limit;
pub mod host;
pub mod identity;
pub mod keys;
pub mod limits;
pub mod live;
pub mod load_refresh;
pub mod metrics;
pub mod model;
pub mod multipart;
pub mod origin;
pub mod pods;
pub mod relay;
pub mod replica;
pub mod reply;
pub mod routing;
pub mod sdp;
pub mod shared_size;
pub mod sideband;

pub use classify::{classify, Route};
pub use config::{Config, ConfigError};
pub use content_type::BodyKind;
pub use create::{
    check_create_headers, plan_create, validate_create_body, CreateRequest, Offer, Plan,
};
pub use error::FilterError;
pub use flow::Flow;
pub use host::{Action, Host};
pub use reply::HttpReply;

// A test double: its panics are test failures, so the production lint set does not apply.
#[cfg(any(test, feature = "fuzzing"))]
#[allow(clippy::expect_used, clippy::panic)]
pub mod fake_host;
#[cfg(test)]
mod table;
