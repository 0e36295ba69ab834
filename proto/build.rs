//! Compiles `proto/relay.proto` with protox (pure Rust), so no system `protoc` is needed.
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
    Ok(())
}
