//! The Python client (`clients/python`) built from source and run against the real daemon: it
//! resolves a credential as the agent and lists connections as the admin.
//!
//! Fetches nothing: the client's build and runtime dependencies (setuptools, grpcio-tools,
//! grpcio, protobuf) come from the venv `tests/peers/install.sh` makes under the peers'
//! dependencies (`$PEERS_DEPS/python-client`, default `target/peer-deps/python-client`), and pip
//! builds the package offline with them. When that venv is missing or incomplete the test fails
//! with the command that installs it: it is never skipped.

mod support;

use std::process::Command;

use credbroker::api::proto;
use support::daemon::{Daemon, secrets};
use support::python::{client_build, run};

const KEY: &str = "canary-python-key-2c9e";

const SCRIPT: &str = r#"
import json, sys
import grpc
import credbroker
from credbroker.v1 import admin_pb2, broker_pb2, common_pb2

addr, d = sys.argv[1], sys.argv[2]
ca = f"{d}/ca.pem"
with credbroker.connect(addr, ca=ca, cert=f"{d}/agent.pem", key=f"{d}/agent.key") as cb:
    cred = cb.broker.ResolveCredential(broker_pb2.ResolveCredentialRequest(
        connection=common_pb2.ConnectionRef(connector="Weather")))
    print(json.dumps({"resolved": cred.secret, "kind": common_pb2.ConnectorKind.Name(cred.kind)}))
    try:
        cb.broker.ResolveCredential(broker_pb2.ResolveCredentialRequest(
            connection=common_pb2.ConnectionRef(connector="Nope")))
    except grpc.RpcError as e:
        print(json.dumps({"missing": e.code().name}))
with credbroker.connect(addr, ca=ca, cert=f"{d}/admin.pem", key=f"{d}/admin.key") as cb:
    resp = cb.admin.ListConnections(admin_pb2.ListConnectionsRequest(user_id="alice"))
    print(json.dumps({"connections": sorted(
        [c.connector_name, common_pb2.ConnectionStatus.Name(c.status)] for c in resp.connections)}))
# A CA that did not sign the broker's certificate: the handshake must fail.
try:
    credbroker.connect(addr, ca=f"{d}/other-ca.pem", cert=f"{d}/agent.pem", key=f"{d}/agent.key", timeout=3)
    print(json.dumps({"wrong_ca": "connected"}))
except grpc.FutureTimeoutError:
    print(json.dumps({"wrong_ca": "refused"}))
"#;

#[tokio::test]
async fn python_client_resolves_and_lists_connections() {
    let (python, client) = client_build("python-client");
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    for (name, mode, slots) in [
        (
            "Weather",
            proto::ConnectorMode::Shared,
            vec![("api_key", KEY)],
        ),
        ("Personal", proto::ConnectorMode::Personal, vec![]),
    ] {
        admin
            .create_connector(proto::CreateConnectorRequest {
                name: name.into(),
                kind: proto::ConnectorKind::ApiKey as i32,
                mode: mode as i32,
                secrets: secrets(&slots),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let other = credbroker_devpki::CertAuthority::generate("not the broker's CA").unwrap();
    support::daemon::write(&daemon.path("other-ca.pem"), &other.cert_pem);
    support::daemon::write(&daemon.path("client.py"), SCRIPT);

    let out = run(
        Command::new(&python)
            .env("PYTHONPATH", &client)
            .arg(daemon.path("client.py"))
            .arg(daemon.grpc.to_string())
            .arg(daemon.dir.path()),
        "the Python client script",
    );
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0]["resolved"], KEY);
    assert_eq!(lines[0]["kind"], "API_KEY");
    assert_eq!(lines[1]["missing"], "NOT_FOUND");
    assert_eq!(
        lines[2]["connections"],
        serde_json::json!([["Personal", "NOT_CONNECTED"], ["Weather", "CONNECTED"]])
    );
    assert_eq!(lines[3]["wrong_ca"], "refused");

    // The example agent script, as documented.
    let out = support::python::run_example(
        (&python, &client),
        "agent.py",
        &daemon.grpc.to_string(),
        daemon.dir.path(),
        &["--connector", "Weather"],
    );
    assert!(
        out.contains(&format!("got credential kind=API_KEY length={}", KEY.len())),
        "{out}"
    );
    assert!(!out.contains(KEY), "the example prints the secret: {out}");
}
