//! Project commands (`cargo xtask ...`) and the shared start-up path of the local gateway.
//!
//! The binary (`src/main.rs`) is a thin CLI; everything it does lives here so that the
//! end-to-end tests and the benchmarks can reuse the same code, in particular
//! [`stack::Stack`] (start echo model, relay and Envoy on chosen ports; stop them by PID) and
//! [`envoy::render`] (fill `${NAME}` placeholders in the configs under `envoy/`).

pub mod bench;
pub mod browser;
pub mod compile;
pub mod envoy;
pub mod manifests;
pub mod paths;
pub mod pipeline;
pub mod process;
pub mod setup;
pub mod stack;
pub mod ui;
