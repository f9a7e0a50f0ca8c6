//! Compiles the benchmark's do-nothing Echo service (`proto/credbroker/v1/bench.proto`), which
//! only `credbroker bench` serves and calls: the daemon library does not carry it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: the build script is single-threaded, so nothing reads the environment concurrently.
    // tonic-prost-build finds protoc only through $PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&["proto/credbroker/v1/bench.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/credbroker/v1/bench.proto");
    Ok(())
}
