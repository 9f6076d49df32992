//! Compiles the wire contract in `proto/` into Rust with protox, so no system
//! `protoc` is needed to build the root package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/imgfleet/v1/resources.proto",
        "proto/imgfleet/v1/admin.proto",
        "proto/imgfleet/v1/agent.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    // The encoded descriptors (with their imports) for the hub's gRPC server
    // reflection, so grpcurl and other generic clients need no proto files.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("imgfleet_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentService.Connect` would clash with the generated
        // `AgentServiceClient::connect(dst)` constructor; clients are built
        // from a `Channel` with `new` instead.
        .build_transport(false)
        // Small per-RPC buffers: a hub holds one stream per agent (src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        // Messages that carry a registry password get hand-written Debug
        // impls (src/api_debug.rs) that redact it, so `{:?}` of a request
        // can never leak a credential into a log.
        .skip_debug([
            "imgfleet.v1.RegistrySecretSpec",
            "imgfleet.v1.RegistryCredential",
        ])
        .compile_fds(fds)?;
    Ok(())
}
