//! Secret custody, played as an attacker against the real daemon: a policy glob that would
//! match connector ids, a caller probing other workspaces for connector names, a stranger
//! burning someone else's pending OAuth link, a return URL pointing anywhere, and an
//! authorization URL opened in another person's browser.

mod support;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{ADMIN, Daemon, conn, secrets};
use support::oauth::{Browser, RETURN_URL, begin, callback_url, create_connector, query_param};
use tonic::Code;
use tonic::transport::Channel;

/// Only the oidc-provider tests share the provider's counters and accounts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const AGENT: &str = "spiffe://test/agent";

/// ADMIN administers everything; AGENT is granted `grants` (TOML `[[callers.grants]]` bodies);
/// "spiffe://test/stranger" administers workspace "elsewhere" only.
fn policy(grants: &[&str]) -> String {
    let mut p = format!(
        "[[callers]]\nid = \"{ADMIN}\"\nadmin_workspaces = [\"*\"]\n\n\
         [[callers]]\nid = \"spiffe://test/stranger\"\nadmin_workspaces = [\"elsewhere\"]\n\n\
         [[callers]]\nid = \"{AGENT}\"\n"
    );
    for g in grants {
        p.push_str("[[callers.grants]]\n");
        p.push_str(g);
        p.push('\n');
    }
    p
}

async fn api_key(admin: &mut AdminClient<Channel>, workspace: &str, name: &str) -> String {
    admin
        .create_connector(proto::CreateConnectorRequest {
            workspace: workspace.into(),
            name: name.into(),
            kind: proto::ConnectorKind::ApiKey as i32,
            mode: proto::ConnectorMode::Shared as i32,
            secrets: secrets(&[("api_key", "k-secret-canary")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
}

async fn resolve(
    agent: &mut BrokerClient<Channel>,
    workspace: &str,
    connector: &str,
) -> Result<proto::ResolveCredentialResponse, tonic::Status> {
    let mut connection = conn(connector, "").unwrap();
    connection.workspace = workspace.into();
    agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: Some(connection),
            min_ttl_seconds: 0,
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_name_glob_never_matches_a_connector_id() {
    let daemon = Daemon::start_with(
        &policy(&[
            "workspace = \"default\"\nconnectors = [\"C*\"]\noperations = [\"resolve\"]\nusers = [\"*\"]",
        ]),
        "",
    );
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let payroll = api_key(&mut admin, "", "Payroll").await;
    let crm = api_key(&mut admin, "", "CRM").await;

    // Granted by name: the glob matches "CRM", by name or by its id.
    assert_eq!(
        resolve(&mut agent, "", "CRM").await.unwrap().secret,
        "k-secret-canary"
    );
    assert!(resolve(&mut agent, "", &crm).await.is_ok());
    // "C*" matches "cn_…" too, case-insensitively: the attack names Payroll by id.
    let err = resolve(&mut agent, "", &payroll).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = resolve(&mut agent, "", "Payroll").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn an_exact_id_can_still_be_granted() {
    let daemon = Daemon::start_with(&policy(&[]), "");
    let mut admin = daemon.admin().await;
    let payroll = api_key(&mut admin, "", "Payroll").await;
    let other = api_key(&mut admin, "", "Other").await;
    support::daemon::write(
        &daemon.path("policy.toml"),
        &policy(&[&format!(
            "workspace = \"default\"\nconnectors = [\"{payroll}\"]\noperations = [\"resolve\"]"
        )]),
    );
    daemon.hangup();
    let mut agent = daemon.agent().await;
    let reloaded = support::wait::until(std::time::Duration::from_secs(10), async || {
        resolve(&mut agent, "", &payroll).await.ok()
    })
    .await;
    assert!(
        reloaded.is_some(),
        "the policy granting the exact id was not applied"
    );
    // An id grant is reached by the id: by name, nothing the request shows is granted.
    let err = resolve(&mut agent, "", "Payroll").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = resolve(&mut agent, "", &other).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_caller_without_a_grant_learns_nothing_of_what_exists() {
    let daemon = Daemon::start_with(
        &policy(&[
            "workspace = \"default\"\nconnectors = [\"HubSpot*\"]\noperations = [\"resolve\"]\nusers = [\"*\"]",
        ]),
        "",
    );
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    api_key(&mut admin, "hr", "Payroll").await;
    api_key(&mut admin, "", "Secret Sauce").await;
    let probes = [
        ("hr", "Payroll"),
        ("hr", "No Such Thing"),
        ("", "Secret Sauce"),
        ("", "No Such Thing"),
    ];
    for (workspace, name) in probes {
        let err = resolve(&mut agent, workspace, name).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{workspace}/{name}: {err:?}"
        );
        assert!(!err.message().contains("not found"), "{err:?}");
    }
    // Where a grant covers the name, a missing connector is still NOT_FOUND.
    let err = resolve(&mut agent, "", "HubSpot Missing")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn a_stranger_cannot_burn_a_pending_link() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start_with(&policy(&[]), "");
    daemon.issue("spiffe://test/stranger", "stranger");
    let mut admin = daemon.admin().await;
    let mut stranger = AdminClient::new(daemon.channel_as("stranger").await.unwrap());
    create_connector(&mut admin, "Team Mail", &[]).await;
    let started = begin(&mut admin, "Team Mail", "u1", "").await;
    let mut browser = Browser::new(&daemon);
    let callback = browser
        .consent(&started.authorization_url, &callback_url(&daemon))
        .await;
    let code = query_param(&callback, "code");

    let err = stranger
        .complete_connect(proto::CompleteConnectRequest {
            state: started.state.clone(),
            code: "not-a-code".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The rightful platform still completes the link with its state.
    let done = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: started.state.clone(),
            code,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.status, proto::ConnectionStatus::Connected as i32);
}

#[tokio::test]
async fn begin_connect_sends_browsers_back_to_configured_origins_only() {
    let daemon = Daemon::start_with(&policy(&[]), "");
    let mut admin = daemon.admin().await;
    create_connector(&mut admin, "Team Mail", &[]).await;
    let begin_with = |return_url: &str| proto::BeginConnectRequest {
        connection: conn("Team Mail", "u1"),
        return_url: return_url.into(),
        ..Default::default()
    };
    for refused in [
        "https://evil.test/phish",
        "http://console.example/settings",
        "https://console.example.evil.test/",
        "javascript:alert(1)",
    ] {
        let err = admin.begin_connect(begin_with(refused)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{refused}: {err:?}");
        assert!(err.message().contains("return_url"), "{err:?}");
    }
    for allowed in [RETURN_URL, "http://127.0.0.1:9/back", ""] {
        admin.begin_connect(begin_with(allowed)).await.unwrap();
    }
}
