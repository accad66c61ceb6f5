//! Compiles `proto/agent.proto` and `proto/images.proto` into the tonic client and server (needs
//! `protoc`: Debian `protobuf-compiler`, see scripts/deps.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=proto/images.proto");
    // No `AgentClient::connect`: it would need tonic's client transport in
    // the agent too; clients build a Channel and call `AgentClient::new`.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(&["proto/agent.proto", "proto/images.proto"], &["proto"])?;
    Ok(())
}
