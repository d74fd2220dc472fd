//! Generates the gRPC code from proto/ with protox (pure Rust: no protoc on any machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "trellis/v1/policy.proto",
        "trellis/v1/config.proto",
        "trellis/v1/policy_service.proto",
        "trellis/v1/identity.proto",
        "trellis/v1/discovery.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
