//! Project commands (`cargo xtask ...`) and the shared start-up path of the local gateway.
//!
//! The binary (`src/main.rs`) is a thin CLI; everything it does lives here so that the
//! end-to-end tests and the benchmarks reuse the same code: [`stack::Stack`] (echo model,
//! relay and Envoy on chosen ports, stopped by PID), the components it is made of
//! ([`launch::Relay`], [`launch::Envoy`]) for other topologies, [`envoy::render`] (fill
//! `${NAME}` placeholders in the configs under `envoy/`), [`ports`], [`process::ChildGuard`],
//! the one loopback HTTP/1.1 client [`http`] and the metric reader [`metrics::value`];
//! [`netns`] puts components on hosts in network namespaces for topology tests.

pub mod bench;
pub mod bench_virtual;
pub mod browser;
pub mod compile;
pub mod dashboard;
pub mod doc_metrics;
pub mod envoy;
pub mod fuzz;
pub mod http;
pub mod istio_checks;
pub mod launch;
pub mod leakcheck;
pub mod manifests;
pub mod media_ports;
pub mod metrics;
pub mod netns;
pub mod observe;
pub mod paths;
pub mod pipeline;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod scaling;
pub mod schemas;
pub mod setup;
pub mod soak;
pub mod stack;
pub mod text_chart;
pub mod ui;
