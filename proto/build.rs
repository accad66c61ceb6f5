//! Compiles `proto/agent.proto` into the tonic client and server (needs
//! `protoc`: Debian `protobuf-compiler`, see scripts/deps.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    tonic_prost_build::configure().compile_protos(&["proto/agent.proto"], &["proto"])?;
    Ok(())
}
