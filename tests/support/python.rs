//! The Python client (`clients/python`) for the tests: built offline from source with the
//! dependencies of the venv `tests/peers/install.sh` makes (`$PEERS_DEPS/python-client`); a
//! missing venv fails loudly with the command that installs it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs the example `script` of `clients/python/examples` with the client built by
/// [`client_build`], as the daemon's agent (the dev certificates in `daemon_dir`) against
/// `addr`, with `args` after `--addr`; it must succeed; returns its stdout.
pub fn run_example(
    (python, client): (&Path, &Path),
    script: &str,
    addr: &str,
    daemon_dir: &Path,
    args: &[&str],
) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients/python/examples")
        .join(script);
    run(
        Command::new(python)
            .env("PYTHONPATH", client)
            .arg(example)
            .args(["--addr", addr])
            .args(args)
            .arg("--ca")
            .arg(daemon_dir.join("ca.pem"))
            .arg("--cert")
            .arg(daemon_dir.join("agent.pem"))
            .arg("--key")
            .arg(daemon_dir.join("agent.key")),
        &format!("examples/{script}"),
    )
}

/// Runs `cmd`, which must succeed; returns its stdout.
pub fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The venv with the client's dependencies that install.sh makes.
fn deps_venv() -> PathBuf {
    let deps = std::env::var_os("PEERS_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peer-deps"));
    deps.join("python-client")
}

/// The client package built from source (so that its stubs follow the protos) into a folder
/// of its own (`folder`, under the tests' temporary directory: one per test binary), offline;
/// returns the Python to run it with and that folder, for `PYTHONPATH`.
pub fn client_build(folder: &str) -> (PathBuf, PathBuf) {
    let venv = deps_venv();
    let python = venv.join("bin/python");
    let probe = Command::new(&python)
        .args(["-c", "import setuptools, grpc_tools, grpc, google.protobuf"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        _ => panic!(
            "the Python client test needs the venv {} with the client's build and runtime \
             dependencies: run `sudo bash tests/peers/install.sh` (with the same PEERS_DEPS, if \
             you set one); nothing is downloaded while the tests run",
            venv.display()
        ),
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join(folder);
    let _ = std::fs::remove_dir_all(&target);
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args([
                "--no-index",
                "--no-build-isolation",
                "--no-deps",
                "--target",
            ])
            .arg(&target)
            .arg(&package),
        "building clients/python offline",
    );
    (python, target)
}
