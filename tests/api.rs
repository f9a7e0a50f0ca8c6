//! The gRPC API against the real daemon process over mutual TLS: who gets in, what policy lets
//! them do, what is audited, what is validated, and that no secret leaks or is lost.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient};
use credbroker_devpki::{CertAuthority, ClientName};
use support::daemon::{
    AGENT, Daemon, assert_refused, conn, files_under, new_connector, reason, secrets, write,
};
use support::wait;
use tonic::Code;
use tonic::transport::Channel;

async fn create(
    admin: &mut AdminClient<Channel>,
    workspace: &str,
    name: &str,
    kind: proto::ConnectorKind,
    mode: proto::ConnectorMode,
    slots: &[(&str, &str)],
) -> Result<proto::Connector, tonic::Status> {
    let req = proto::CreateConnectorRequest {
        workspace: workspace.into(),
        secrets: secrets(slots),
        ..new_connector(name, kind, mode)
    };
    admin.create_connector(req).await.map(|r| r.into_inner())
}

async fn audit(admin: &mut AdminClient<Channel>, outcome: &str) -> Vec<proto::AuditRecord> {
    let req = proto::QueryAuditRequest {
        limit: 1000,
        outcome: outcome.into(),
        ..Default::default()
    };
    admin.query_audit(req).await.unwrap().into_inner().records
}

async fn resolve(
    broker: &mut proto::broker_client::BrokerClient<Channel>,
    connector: &str,
    user: &str,
) -> Result<proto::ResolveCredentialResponse, tonic::Status> {
    let req = proto::ResolveCredentialRequest {
        connection: conn(connector, user),
        min_ttl_seconds: 0,
        ..Default::default()
    };
    broker.resolve_credential(req).await.map(|r| r.into_inner())
}

/// ResolveCredential over TLS with no client certificate at all.
async fn resolve_without_a_certificate(
    daemon: &Daemon,
) -> Result<proto::ResolveCredentialResponse, Box<dyn std::error::Error>> {
    let ca = daemon.path("ca.pem");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&ca).unwrap(),
        ))
        .domain_name("127.0.0.1");
    let anonymous = async {
        let channel = Channel::from_shared(daemon.addr())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await?;
        let mut broker = proto::broker_client::BrokerClient::new(channel);
        resolve(&mut broker, "Shared key", "")
            .await
            .map_err(|e| e.into())
    };
    anonymous.await
}

/// Client certificates naming AGENT that must not get in, saved as `foreign` (from another CA)
/// and `expired` (from the right CA, expired).
fn issue_foreign_and_expired(daemon: &Daemon) {
    let other = CertAuthority::generate("other CA").unwrap();
    let name = ClientName {
        uri: Some(AGENT.into()),
        dns: None,
        common_name: "agent".into(),
    };
    let foreign = other.issue_client(&name, time::Duration::days(1)).unwrap();
    write(&daemon.path("foreign.pem"), &foreign.cert_pem);
    write(&daemon.path("foreign.key"), &foreign.key_pem);
    let expired = daemon
        .ca
        .issue_client_at(&name, time::Duration::days(10), time::Duration::days(1))
        .unwrap();
    write(&daemon.path("expired.pem"), &expired.cert_pem);
    write(&daemon.path("expired.key"), &expired.key_pem);
}

/// The refused handshakes of [`strangers_never_get_in_and_every_refusal_is_audited`] are
/// audited, each with its reason: expired, unknown issuer, no certificate.
fn assert_refused_handshakes_audited(denied: &[proto::AuditRecord]) {
    let handshakes: Vec<_> = denied
        .iter()
        .filter(|r| r.operation == "TlsHandshake")
        .collect();
    assert!(
        handshakes.len() >= 3,
        "expected 3 refused handshakes audited, got {denied:#?}"
    );
    assert!(
        handshakes
            .iter()
            .any(|r| r.reason.to_lowercase().contains("expired")),
        "{handshakes:#?}"
    );
    assert!(
        handshakes
            .iter()
            .any(|r| r.reason.contains("UnknownIssuer") || r.reason.contains("unknown issuer")),
        "{handshakes:#?}"
    );
    assert!(
        handshakes
            .iter()
            .any(|r| r.reason.contains("no certificate")
                || r.reason.contains("NoCertificatesPresented")
                || r.reason.contains("no client certificate")),
        "{handshakes:#?}"
    );
}

#[tokio::test]
async fn strangers_never_get_in_and_every_refusal_is_audited() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    create(
        &mut admin,
        "",
        "Shared key",
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Shared,
        &[("api_key", "k-1")],
    )
    .await
    .unwrap();

    // No client certificate at all.
    let result = resolve_without_a_certificate(&daemon).await;
    assert!(result.is_err(), "a client without a certificate was served");

    // A certificate from another CA, and an expired one from the right CA.
    issue_foreign_and_expired(&daemon);
    for who in ["foreign", "expired"] {
        let outcome = match daemon.channel_as(who).await {
            Err(_) => Err(()),
            Ok(channel) => resolve(
                &mut proto::broker_client::BrokerClient::new(channel),
                "Shared key",
                "",
            )
            .await
            .map_err(|_| ()),
        };
        assert!(outcome.is_err(), "{who} certificate was served");
    }

    // A valid certificate whose identity is not in the policy.
    daemon.issue("spiffe://test/stranger", "stranger");
    let mut stranger =
        proto::broker_client::BrokerClient::new(daemon.channel_as("stranger").await.unwrap());
    let err = resolve(&mut stranger, "Shared key", "").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("not in the policy"),
        "{}",
        err.message()
    );
    let mut stranger_admin = AdminClient::new(daemon.channel_as("stranger").await.unwrap());
    let err = stranger_admin
        .list_connectors(proto::ListConnectorsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let denied = audit(&mut admin, "denied").await;
    assert_refused_handshakes_audited(&denied);
    let strangers: Vec<_> = denied
        .iter()
        .filter(|r| r.caller == "spiffe://test/stranger")
        .collect();
    assert_eq!(strangers.len(), 2, "{denied:#?}");
}

/// AGENT may resolve only connectors named hub* in the workspace acme, and only for u1.
const HUB_IN_ACME_FOR_U1: &str = r#"
[[callers]]
id = "spiffe://test/admin"
admin_workspaces = ["*"]
[[callers]]
id = "spiffe://test/agent"
[[callers.grants]]
workspace = "acme"
connectors = ["hub*"]
operations = ["resolve"]
users = ["u1"]
"#;

/// The connection of `user` to `connector` in the workspace `ws`.
fn in_workspace(ws: &str, connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: ws.into(),
        connector: connector.into(),
        user_id: user.into(),
    })
}

/// Personal API-key connectors HubSpot and Slack in acme and HubSpot in other, and HubSpot
/// keys `key-{ws}-{user}` for u1 and u2 in acme and u1 in other.
async fn hubspot_keys_in_two_workspaces(admin: &mut AdminClient<Channel>) {
    let personal = proto::ConnectorMode::Personal;
    for (ws, name) in [("acme", "HubSpot"), ("acme", "Slack"), ("other", "HubSpot")] {
        create(admin, ws, name, proto::ConnectorKind::ApiKey, personal, &[])
            .await
            .unwrap();
    }
    for (ws, user) in [("acme", "u1"), ("acme", "u2"), ("other", "u1")] {
        let req = proto::ConnectWithCredentialsRequest {
            connection: in_workspace(ws, "HubSpot", user),
            secrets: secrets(&[("api_key", &format!("key-{ws}-{user}"))]),
            ..Default::default()
        };
        assert!(
            admin
                .connect_with_credentials(req)
                .await
                .unwrap()
                .into_inner()
                .saved
        );
    }
}

#[tokio::test]
async fn grants_limit_workspace_connector_and_user() {
    let daemon = Daemon::start_with(HUB_IN_ACME_FOR_U1, "");
    let mut admin = daemon.admin().await;
    hubspot_keys_in_two_workspaces(&mut admin).await;
    let mut agent = daemon.agent().await;
    let call = |ws: &str, connector: &str, user: &str| proto::ResolveCredentialRequest {
        connection: in_workspace(ws, connector, user),
        min_ttl_seconds: 0,
        ..Default::default()
    };
    let ok = agent
        .resolve_credential(call("acme", "hubspot", "u1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.secret, "key-acme-u1");
    for (ws, connector, user) in [
        ("other", "HubSpot", "u1"),
        ("acme", "Slack", "u1"),
        ("acme", "HubSpot", "u2"),
    ] {
        let err = agent
            .resolve_credential(call(ws, connector, user))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{ws}/{connector}/{user}: {err:?}"
        );
        assert!(
            !err.message().contains("key-"),
            "a denial leaked a key: {}",
            err.message()
        );
    }
    // The agent has no admin rights.
    let mut agent_admin = AdminClient::new(daemon.channel_as("agent").await.unwrap());
    assert_eq!(
        agent_admin
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let denied = audit(&mut admin, "denied").await;
    let by_agent: Vec<_> = denied.iter().filter(|r| r.caller == AGENT).collect();
    assert_eq!(by_agent.len(), 4, "{denied:#?}");
    assert!(
        by_agent
            .iter()
            .any(|r| r.workspace == "other" && r.user_id == "u1")
    );
    assert!(by_agent.iter().any(|r| r.connector.starts_with("Slack")));
    assert!(by_agent.iter().any(|r| r.user_id == "u2"));
}

/// The canaries of [`canary_secrets_never_leak`].
const SHARED_CANARY: &str = "canary-shared-4f1d9a";
const PERSONAL_CANARY: &str = "canary-personal-77c2e0";
const CLIENT_SECRET_CANARY: &str = "canary-client-secret-b93a";

/// Stores each canary the way an admin would: a shared key, a personal key for alice, an OAuth
/// client secret, and a refused update naming a bad slot. Returns the responses, printed.
async fn store_the_canaries(admin: &mut AdminClient<Channel>) -> String {
    let shared = create(
        admin,
        "",
        "Shared",
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Shared,
        &[("api_key", SHARED_CANARY)],
    )
    .await
    .unwrap();
    let personal = create(
        admin,
        "",
        "Personal",
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Personal,
        &[],
    )
    .await
    .unwrap();
    let oauth = create(
        admin,
        "",
        "OAuth",
        proto::ConnectorKind::Oauth2,
        proto::ConnectorMode::Personal,
        &[("client_secret", CLIENT_SECRET_CANARY)],
    )
    .await
    .unwrap();
    let connected = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Personal", "alice"),
            secrets: secrets(&[("api_key", PERSONAL_CANARY)]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A bad secret slot must not echo the value either.
    let bad = admin
        .update_connector(proto::UpdateConnectorRequest {
            connector: "Shared".into(),
            secrets: secrets(&[("api_kee", SHARED_CANARY)]),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["secrets.api_kee".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    format!("{shared:?}{personal:?}{oauth:?}{connected:?}{bad:?}")
}

/// Every admin view of connectors, connections and the audit trail, printed.
async fn admin_views(admin: &mut AdminClient<Channel>) -> Vec<String> {
    let mut responses = Vec::new();
    responses.push(format!(
        "{:?}",
        admin
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .unwrap()
            .into_inner()
    ));
    for name in ["Shared", "Personal", "OAuth"] {
        let req = proto::GetConnectorRequest {
            workspace: String::new(),
            connector: name.into(),
        };
        let c = admin.get_connector(req).await.unwrap().into_inner();
        assert!(
            !c.secrets_set.is_empty() || name == "Personal",
            "{name} should say its secret is set"
        );
        responses.push(format!("{c:?}"));
    }
    let list = proto::ListConnectionsRequest {
        workspace: String::new(),
        user_id: "alice".into(),
        ..Default::default()
    };
    responses.push(format!(
        "{:?}",
        admin.list_connections(list).await.unwrap().into_inner()
    ));
    responses.push(format!(
        "{:?}",
        admin
            .get_connection(proto::GetConnectionRequest {
                connection: conn("Personal", "alice")
            })
            .await
            .unwrap()
    ));
    responses.push(format!("{:?}", audit(admin, "").await));
    responses
}

#[tokio::test]
async fn canary_secrets_never_leak() {
    let mut daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut responses = vec![store_the_canaries(&mut admin).await];
    responses.extend(admin_views(&mut admin).await);
    for text in &responses {
        for canary in [SHARED_CANARY, PERSONAL_CANARY, CLIENT_SECRET_CANARY] {
            assert!(
                !text.contains(canary),
                "admin response leaked {canary}: {text}"
            );
        }
    }
    // The one response meant to carry a secret carries it, to the agent.
    let mut agent = daemon.agent().await;
    assert_eq!(
        resolve(&mut agent, "Shared", "").await.unwrap().secret,
        SHARED_CANARY
    );
    assert_eq!(
        resolve(&mut agent, "Personal", "alice")
            .await
            .unwrap()
            .secret,
        PERSONAL_CANARY
    );

    daemon.stop();
    let export = daemon.cli(&[
        "audit",
        "export",
        "--config",
        daemon.config().to_str().unwrap(),
    ]);
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let export = String::from_utf8_lossy(&export.stdout).to_string();
    assert!(export.lines().count() >= 10, "{export}");
    let logs = daemon.logs();
    assert!(
        logs.contains("ResolveCredential"),
        "debug logs should show the calls"
    );
    for canary in [SHARED_CANARY, PERSONAL_CANARY, CLIENT_SECRET_CANARY] {
        assert!(!export.contains(canary), "audit export leaked {canary}");
        assert!(!logs.contains(canary), "logs leaked {canary}");
        for file in files_under(&daemon.path("store")) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
                "{} holds {canary} in the clear",
                file.display()
            );
        }
    }
}

/// Asserts that `err`, the answer to `req`, is INVALID_ARGUMENT naming `field` in its ErrorInfo
/// and first in its message.
fn assert_names_the_field(err: &tonic::Status, field: &str, req: &impl std::fmt::Debug) {
    assert_eq!(err.code(), Code::InvalidArgument, "{req:?}: {err:?}");
    let (why, meta) = reason(err);
    assert_eq!(why, "INVALID_ARGUMENT");
    assert_eq!(
        meta.get("field").map(String::as_str),
        Some(field),
        "{req:?}: {}",
        err.message()
    );
    assert!(
        err.message().starts_with(field),
        "message should name {field}: {}",
        err.message()
    );
}

/// CreateConnector requests each wrong in one field, and that field.
fn bad_connectors() -> Vec<(proto::CreateConnectorRequest, &'static str)> {
    use proto::CreateConnectorRequest as Create;
    let ok = |name: &str| {
        let (api, shared) = (proto::ConnectorKind::ApiKey, proto::ConnectorMode::Shared);
        new_connector(name, api, shared)
    };
    let colour = HashMap::from([("colour".to_string(), "blue".to_string())]);
    vec![
        (ok(""), "name"),
        (ok(&"x".repeat(65)), "name"),
        (ok("a\u{7}b"), "name"),
        (
            Create {
                kind: 0,
                ..ok("ok")
            },
            "kind",
        ),
        (
            Create {
                kind: 42,
                ..ok("ok")
            },
            "kind",
        ),
        (
            Create {
                mode: 0,
                ..ok("ok")
            },
            "mode",
        ),
        (
            Create {
                workspace: "Bad WS".into(),
                ..ok("ok")
            },
            "workspace",
        ),
        (
            Create {
                config: colour,
                ..ok("ok")
            },
            "config.colour",
        ),
    ]
}

#[tokio::test]
async fn every_field_is_validated_and_names_itself() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let api = proto::ConnectorKind::ApiKey;
    let shared = proto::ConnectorMode::Shared;
    for (req, field) in bad_connectors() {
        let err = admin.create_connector(req.clone()).await.unwrap_err();
        assert_names_the_field(&err, field, &req);
    }
    assert!(
        admin
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .connectors
            .is_empty(),
        "a bad request wrote something"
    );

    create(&mut admin, "", "HubSpot", api, shared, &[])
        .await
        .unwrap();
    let dup = create(&mut admin, "", "hubspot", api, shared, &[])
        .await
        .unwrap_err();
    assert_eq!(
        dup.code(),
        Code::AlreadyExists,
        "names are unique case-insensitively"
    );
    let missing = admin
        .get_connector(proto::GetConnectorRequest {
            workspace: String::new(),
            connector: "Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let mut agent = daemon.agent().await;
    let err = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn("HubSpot", ""),
            min_ttl_seconds: 99_999,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err).1.get("field").map(String::as_str),
        Some("min_ttl_seconds")
    );
    let err = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: None,
            min_ttl_seconds: 0,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin
        .update_connector(proto::UpdateConnectorRequest {
            connector: "HubSpot".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err).1.get("field").map(String::as_str),
        Some("update_mask")
    );
}

/// The row of each connector for `user` (ListConnections must succeed).
async fn connections_of(admin: &mut AdminClient<Channel>, user: &str) -> Vec<proto::Connection> {
    let req = proto::ListConnectionsRequest {
        workspace: String::new(),
        user_id: user.into(),
        ..Default::default()
    };
    admin
        .list_connections(req)
        .await
        .unwrap()
        .into_inner()
        .connections
}

/// The secret ResolveCredential serves (it must succeed).
async fn secret(
    broker: &mut proto::broker_client::BrokerClient<Channel>,
    connector: &str,
    user: &str,
) -> String {
    resolve(broker, connector, user).await.unwrap().secret
}

#[tokio::test]
async fn connector_lifecycle_and_connection_status() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let personal = create(
        &mut admin,
        "",
        "Intercom",
        proto::ConnectorKind::ApiKey,
        proto::ConnectorMode::Personal,
        &[],
    )
    .await
    .unwrap();
    let err = resolve(&mut agent, "Intercom", "bob").await.unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "NOT_CONNECTED");
    let err = resolve(&mut agent, "Intercom", "").await.unwrap_err();
    assert_eq!(
        reason(&err).1.get("field").map(String::as_str),
        Some("connection.user_id")
    );

    let req = proto::ConnectWithCredentialsRequest {
        connection: conn("Intercom", "bob"),
        settings: HashMap::from([("account_label".to_string(), "Bob's workspace".to_string())]),
        secrets: secrets(&[("api_key", "ic-bob")]),
        ..Default::default()
    };
    admin.connect_with_credentials(req).await.unwrap();
    // Rename keeps the id and the connection.
    let rename = proto::RenameConnectorRequest {
        connector: "Intercom".into(),
        new_name: "Intercom EU".into(),
        ..Default::default()
    };
    let renamed = admin.rename_connector(rename).await.unwrap().into_inner();
    assert_eq!(renamed.id, personal.id);
    assert_eq!(secret(&mut agent, &personal.id, "bob").await, "ic-bob");
    assert_eq!(secret(&mut agent, "intercom eu", "bob").await, "ic-bob");

    let rows = connections_of(&mut admin, "bob").await;
    let row = &rows[0];
    assert_eq!(row.status, proto::ConnectionStatus::Connected as i32);
    assert_eq!(row.account_label, "Bob's workspace");
    assert!(row.connected_at.is_some());
    let rows = connections_of(&mut admin, "carol").await;
    assert_eq!(rows[0].status, proto::ConnectionStatus::NotConnected as i32);

    admin
        .disconnect(proto::DisconnectRequest {
            connection: conn("Intercom EU", "bob"),
        })
        .await
        .unwrap();
    assert_eq!(
        reason(&resolve(&mut agent, "Intercom EU", "bob").await.unwrap_err()).0,
        "NOT_CONNECTED"
    );

    admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Intercom EU", "bob"),
            secrets: secrets(&[("api_key", "ic-bob-2")]),
            ..Default::default()
        })
        .await
        .unwrap();
    let delete = proto::DeleteConnectorRequest {
        workspace: String::new(),
        connector: "Intercom EU".into(),
    };
    let deleted = admin.delete_connector(delete).await.unwrap().into_inner();
    assert_eq!(deleted.connections_removed, 1);
    let gone = resolve(&mut agent, &personal.id, "bob").await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

/// Eight writers creating API-key connectors `r{round}-w{writer}-{i}` (key `key-{name}`) until
/// a write fails; each sends the names the daemon acknowledged on `acked`.
fn spawn_writers(
    admin: &AdminClient<Channel>,
    round: u64,
    acked: tokio::sync::mpsc::UnboundedSender<String>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..8)
        .map(|w| {
            let (mut admin, acked) = (admin.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("r{round}-w{w}-{i}");
                    let req = proto::CreateConnectorRequest {
                        secrets: secrets(&[("api_key", &format!("key-{name}"))]),
                        ..new_connector(
                            &name,
                            proto::ConnectorKind::ApiKey,
                            proto::ConnectorMode::Shared,
                        )
                    };
                    match admin.create_connector(req).await {
                        Ok(_) => acked.send(name).unwrap(),
                        Err(_) => break,
                    }
                }
            })
        })
        .collect()
}

/// The names of the default workspace's connectors.
async fn connector_names(admin: &mut AdminClient<Channel>) -> std::collections::HashSet<String> {
    let req = proto::ListConnectorsRequest::default();
    let listed = admin.list_connectors(req).await.unwrap().into_inner();
    listed.connectors.into_iter().map(|c| c.name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let mut daemon = Daemon::start();
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..5 {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let writers = spawn_writers(&daemon.admin().await, round, tx);
        tokio::time::sleep(std::time::Duration::from_millis(300 + 150 * round)).await;
        daemon.kill();
        for writer in writers {
            writer.await.unwrap();
        }
        while let Some(name) = rx.recv().await {
            acknowledged.push(name);
        }
        daemon.respawn();
        let stored = connector_names(&mut daemon.admin().await).await;
        let lost: Vec<_> = acknowledged
            .iter()
            .filter(|n| !stored.contains(*n))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} acknowledged writes lost: {lost:?}",
            lost.len()
        );
    }
    assert!(
        acknowledged.len() > 100,
        "too few writes to mean anything: {}",
        acknowledged.len()
    );
    let mut agent = daemon.agent().await;
    let last = acknowledged.last().unwrap().clone();
    assert_eq!(
        resolve(&mut agent, &last, "").await.unwrap().secret,
        format!("key-{last}")
    );
    daemon.stop();
    let verify = daemon.cli(&[
        "audit",
        "verify",
        "--config",
        daemon.config().to_str().unwrap(),
    ]);
    assert!(
        verify.status.success(),
        "audit verify after kills: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    println!(
        "{} acknowledged writes survived 5 SIGKILLs",
        acknowledged.len()
    );
}

#[tokio::test]
async fn startup_errors_say_what_is_wrong() {
    let mut daemon = Daemon::start();
    daemon.stop();
    let config = daemon.config();
    let serve = |d: &Daemon| d.cli(&["serve", "--config", config.to_str().unwrap()]);
    // Wrong key file.
    let right = std::fs::read(daemon.path("store.key")).unwrap();
    std::fs::write(daemon.path("store.key"), [7u8; 32]).unwrap();
    let out = serve(&daemon);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not unlock this store (wrong key)"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Malformed and missing key files.
    std::fs::write(daemon.path("store.key"), b"short").unwrap();
    assert!(String::from_utf8_lossy(&serve(&daemon).stderr).contains("must hold exactly 32 bytes"));
    std::fs::remove_file(daemon.path("store.key")).unwrap();
    assert!(String::from_utf8_lossy(&serve(&daemon).stderr).contains("cannot read key file"));
    std::fs::write(daemon.path("store.key"), &right).unwrap();
    // A store from a newer credbroker.
    {
        let config = credbroker::config::StoreConfig::at(daemon.path("store"));
        let backend = credbroker::store::open_backend(&config, credbroker::store::Intent::Existing)
            .await
            .unwrap();
        let raw = backend.meta_get("header").await.unwrap().unwrap();
        let mut header: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        header["format_version"] = 99.into();
        backend
            .meta_put("header", &serde_json::to_vec(&header).unwrap())
            .await
            .unwrap();
        backend.sync().await.unwrap();
    }
    let out = serve(&daemon);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("store format version 99 is newer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // init refuses to overwrite an existing store.
    let out = daemon.cli(&["init", "--config", config.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn wrong_passphrase_is_named_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    write(
        &config,
        "[store]\npath = \"store\"\npassphrase_env = \"CB_TEST_PASSPHRASE\"\n[grpc]\nlisten = \"127.0.0.1:0\"\ncert = \"x\"\nkey = \"x\"\nclient_ca = \"x\"\n[policy]\nfile = \"p\"\n",
    );
    let run = |args: &[&str], phrase: &str| {
        std::process::Command::new(support::daemon::bin())
            .args(args)
            .env("CB_TEST_PASSPHRASE", phrase)
            .output()
            .unwrap()
    };
    let c = config.to_str().unwrap();
    let out = run(&["init", "--config", c], "correct horse battery");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["audit", "verify", "--config", c], "correct horse battery");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["audit", "verify", "--config", c], "wrong horse");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reflection lists the broker's services and health's; health says the broker serves.
async fn assert_reflection_and_health(channel: Channel) {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "credbroker.v1.Broker",
        "credbroker.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&expected), "{names:?}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "credbroker.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn reflection_health_and_policy_reload() {
    let daemon = Daemon::start();
    assert_reflection_and_health(daemon.channel_as("agent").await.unwrap()).await;

    // SIGHUP reloads the policy; a broken file keeps the old one.
    daemon.issue("spiffe://test/newcomer", "newcomer");
    let mut newcomer = AdminClient::new(daemon.channel_as("newcomer").await.unwrap());
    assert_eq!(
        newcomer
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let policy = std::fs::read_to_string(daemon.path("policy.toml")).unwrap();
    write(
        &daemon.path("policy.toml"),
        &format!(
            "{policy}\n[[callers]]\nid = \"spiffe://test/newcomer\"\nadmin_workspaces = [\"default\"]\n"
        ),
    );
    daemon.hangup();
    let allowed = wait::until(Duration::from_secs(5), async || {
        newcomer
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .ok()
    })
    .await;
    assert!(allowed.is_some(), "policy reload did not take effect");
    write(&daemon.path("policy.toml"), "this is [not toml");
    daemon.hangup();
    // The reload of the broken file has been tried (and refused) once the log says so.
    let refused = wait::until(Duration::from_secs(5), async || {
        daemon.logs().contains("policy reload failed").then_some(())
    })
    .await;
    assert!(refused.is_some(), "the broken policy was never reloaded");
    assert!(
        newcomer
            .list_connectors(proto::ListConnectorsRequest::default())
            .await
            .is_ok(),
        "a broken policy replaced the good one"
    );
    assert!(daemon.logs().contains("policy reload failed"));
}

#[tokio::test]
async fn a_caller_over_its_rate_gets_resource_exhausted_and_is_audited() {
    let daemon = Daemon::start_with_config("[limits]\ncaller_rate_per_sec = 1\ncaller_burst = 5\n");
    let mut agent = daemon.agent().await;
    let mut refused = None;
    for _ in 0..20 {
        if let Err(e) = resolve(&mut agent, "nothing-here", "").await
            && e.code() == Code::ResourceExhausted
        {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the sixth call within a second is refused");
    assert!(
        refused.message().contains("requests per second"),
        "{}",
        refused.message()
    );
    // Another caller has its own allowance.
    let mut admin = daemon.admin().await;
    admin
        .list_connectors(proto::ListConnectorsRequest::default())
        .await
        .unwrap();
    // The refusal's audit record is written without delaying the refusal: look a few times.
    let mut denied = Vec::new();
    let found = wait::until(Duration::from_secs(5), async || {
        denied = audit(&mut admin, "denied").await;
        denied
            .iter()
            .any(|r| r.reason.contains("requests per second") && r.caller == AGENT)
            .then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "no audit record of the refusal: {denied:?}"
    );
}

#[tokio::test]
async fn error_replies_carry_the_request_id_of_their_audit_record() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    daemon.issue("spiffe://test/stranger", "stranger");
    let mut stranger = AdminClient::new(daemon.channel_as("stranger").await.unwrap());
    let denied = stranger
        .list_connectors(proto::ListConnectorsRequest::default())
        .await
        .unwrap_err();
    let missing = admin
        .get_connector(proto::GetConnectorRequest {
            connector: "no such connector".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let invalid = daemon
        .agent()
        .await
        .resolve_credential(proto::ResolveCredentialRequest::default())
        .await
        .unwrap_err();
    let records = audit(&mut admin, "").await;
    for (err, code, operation) in [
        (denied, Code::PermissionDenied, "ListConnectors"),
        (missing, Code::NotFound, "GetConnector"),
        (invalid, Code::InvalidArgument, "ResolveCredential"),
    ] {
        assert_eq!(err.code(), code, "{err:?}");
        let id = err.metadata().get("x-request-id").expect("x-request-id");
        let id = id.to_str().unwrap();
        let record = records.iter().find(|r| r.request_id == id);
        let record = record.unwrap_or_else(|| panic!("no audit record has {id}: {records:#?}"));
        assert_eq!(record.operation, operation, "{record:?}");
    }
}
