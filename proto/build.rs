//! Compiles `proto/relay.proto` (and `proto/envoy_rls.proto`) with protox (pure Rust), so no system `protoc` is needed.
//! Services are generated only with the `grpc` feature; the message types never need tonic.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/relay.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let grpc = env::var_os("CARGO_FEATURE_GRPC").is_some();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    std::fs::write(
        out.join("relay_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(grpc)
        .compile_fds(descriptors)?;
    // Envoy's global rate-limit service, for the filter's client and the tests' fake service;
    // kept out of the relay's descriptor set (its reflection lists the relay's API only).
    let rls = "proto/envoy_rls.proto";
    println!("cargo:rerun-if-changed={rls}");
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        .build_transport(grpc)
        .compile_fds(protox::compile([rls], ["proto"])?)?;
    Ok(())
}
