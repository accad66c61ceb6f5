//! Compiles `proto/agent.proto`, `proto/images.proto` and `proto/containers.proto` into the tonic client and server (needs
//! `protoc`: Debian `protobuf-compiler`, see scripts/deps.sh).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    println!("cargo:rerun-if-changed=proto/images.proto");
    println!("cargo:rerun-if-changed=proto/containers.proto");
    // No `AgentClient::connect`: it would need tonic's client transport in
    // the agent too; clients build a Channel and call `AgentClient::new`.
    tonic_prost_build::configure()
        .build_transport(false)
        .compile_protos(
            &[
                "proto/agent.proto",
                "proto/images.proto",
                "proto/containers.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
