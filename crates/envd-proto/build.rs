//! Generates the prost types and their proto3-JSON serde impls from `proto/`.
//!
//! protox compiles the .proto files in pure Rust (no `protoc` on the machine); prost-build turns
//! the descriptor set into structs; pbjson-build adds the JSON mapping Connect's JSON codec needs.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["process/process.proto", "filesystem/filesystem.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out.join("envd_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;

    prost_build::Config::new()
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .bytes(["."])
        .compile_fds(fds)?;

    let descriptors = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
