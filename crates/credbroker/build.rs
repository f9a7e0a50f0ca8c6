//! Compiles the gRPC contract in the repository's `proto/` with a vendored protoc, so no system
//! protoc is needed. The benchmark's Echo service is not part of it (the CLI compiles that).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single-threaded, so nothing reads the environment concurrently.
    // tonic-prost-build finds protoc only through $PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("credbroker_descriptor.bin"))
        // Secret-carrying messages get a hand-written, redacted Debug (src/api/redact.rs).
        .skip_debug([
            ".credbroker.v1.SecretValue",
            ".credbroker.v1.ResolveCredentialResponse",
        ])
        .compile_protos(
            &[
                "../../proto/credbroker/v1/common.proto",
                "../../proto/credbroker/v1/broker.proto",
                "../../proto/credbroker/v1/admin.proto",
            ],
            &["../../proto"],
        )?;
    println!("cargo:rerun-if-changed=../../proto");
    Ok(())
}
