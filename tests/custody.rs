//! Secret custody, played as an attacker against the real daemon: a policy glob that would
//! match connector ids, a caller probing other workspaces for connector names, a stranger
//! burning someone else's pending OAuth link, a return URL pointing anywhere, and an
//! authorization URL opened in another person's browser; and an admin moving where stored
//! secrets go — mail servers, token and revocation endpoints, test URLs, CAs, the connector a
//! mail connector signs in through — against capturing servers under the attacker's own CA
//! ([`Capture`]), which must receive no secret byte.

mod support;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{ADMIN, Daemon, conn, new_connector, secrets};
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
            secrets: secrets(&[("api_key", "k-secret-canary")]),
            ..new_connector(
                name,
                proto::ConnectorKind::ApiKey,
                proto::ConnectorMode::Shared,
            )
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
            ..Default::default()
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

// ---- Finding 1: a stored secret goes only where it was given for ------------------------------

/// What a capturing server speaks: just enough for a client to send its credentials.
#[derive(Clone, Copy)]
enum Speaks {
    Imap,
    Smtp,
    Http,
}

/// A server under the attacker's own CA (not the daemon's, not the peers') that records every
/// byte a client sends it once TLS is up, and answers just enough of IMAP, SMTP or HTTP that a
/// client would go on to authenticate.
struct Capture {
    addr: std::net::SocketAddr,
    /// The attacker's CA, as an admin would paste it into `ca_pem`.
    ca_pem: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Capture {
    async fn start(speaks: Speaks) -> Capture {
        let ca = credbroker_devpki::CertAuthority::generate("attacker CA").unwrap();
        let acceptor = support::daemon::tls_acceptor(&ca);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::<std::sync::Mutex<Vec<u8>>>::default();
        let sink = received.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, sink) = (acceptor.clone(), sink.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = converse(speaks, tls, &sink).await;
                    }
                });
            }
        });
        Capture {
            addr,
            ca_pem: ca.cert_pem,
            received,
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Everything received, with every word that is base64 (SASL, HTTP Basic) decoded too.
    fn text(&self) -> String {
        use base64::Engine as _;
        let raw = String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned();
        let mut text = raw.clone();
        for word in raw.split(|c: char| c.is_whitespace() || c == '"') {
            if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(word) {
                text.push('\n');
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        text
    }

    /// Whether `canary` reached this server, as sent or base64-encoded.
    fn got(&self, canary: &str) -> bool {
        self.text().contains(canary)
    }
}

/// One client's conversation with a [`Capture`]: greets, records each line (or request), and
/// answers so that the client goes on; authentication always fails.
async fn converse(
    speaks: Speaks,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    sink: &std::sync::Mutex<Vec<u8>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut io = BufReader::new(tls);
    match speaks {
        Speaks::Imap => {
            io.write_all(b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR] ready\r\n")
                .await?
        }
        Speaks::Smtp => io.write_all(b"220 capture ESMTP\r\n").await?,
        Speaks::Http => {}
    }
    let mut sasl_tag: Option<String> = None;
    loop {
        let mut line = String::new();
        if io.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        sink.lock().unwrap().extend_from_slice(line.as_bytes());
        let reply = match speaks {
            Speaks::Imap => imap_reply(&line, &mut sasl_tag),
            Speaks::Smtp => smtp_reply(&line),
            Speaks::Http => http_reply(&mut io, sink).await?,
        };
        io.write_all(reply.as_bytes()).await?;
        io.flush().await?;
        if matches!(speaks, Speaks::Http) || reply.starts_with("221") {
            return Ok(());
        }
    }
}

/// What the capture answers an IMAP command line (or a SASL response, after `+`).
fn imap_reply(line: &str, sasl_tag: &mut Option<String>) -> String {
    let upper = line.to_ascii_uppercase();
    let tag = line.split_whitespace().next().unwrap_or("*").to_string();
    if let Some(tag) = sasl_tag.take() {
        return format!("{tag} NO [AUTHENTICATIONFAILED] no\r\n");
    }
    if upper.contains("AUTHENTICATE") && line.split_whitespace().count() == 3 {
        *sasl_tag = Some(tag);
        "+ \r\n".into()
    } else if upper.contains("AUTHENTICATE") || upper.contains("LOGIN") {
        format!("{tag} NO [AUTHENTICATIONFAILED] no\r\n")
    } else if upper.contains("CAPABILITY") {
        format!("* CAPABILITY IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SASL-IR\r\n{tag} OK done\r\n")
    } else if upper.contains("LOGOUT") {
        format!("* BYE\r\n{tag} OK bye\r\n")
    } else {
        format!("{tag} OK done\r\n")
    }
}

/// What the capture answers an SMTP command line.
fn smtp_reply(line: &str) -> String {
    let upper = line.to_ascii_uppercase();
    if upper.starts_with("EHLO") || upper.starts_with("HELO") {
        "250-capture\r\n250-AUTH PLAIN LOGIN XOAUTH2\r\n250 OK\r\n".into()
    } else if upper.starts_with("AUTH LOGIN") {
        "334 VXNlcm5hbWU6\r\n".into()
    } else if upper.starts_with("QUIT") {
        "221 bye\r\n".into()
    } else {
        "535 5.7.8 no\r\n".into()
    }
}

/// Reads the rest of an HTTP request (headers and body) into `sink`; the answer refuses it.
async fn http_reply(
    io: &mut tokio::io::BufReader<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    sink: &std::sync::Mutex<Vec<u8>>,
) -> std::io::Result<String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut length = 0;
    loop {
        let mut header = String::new();
        if io.read_line(&mut header).await? == 0 || header.trim().is_empty() {
            break;
        }
        sink.lock().unwrap().extend_from_slice(header.as_bytes());
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    io.read_exact(&mut body).await?;
    sink.lock().unwrap().extend_from_slice(&body);
    let answer = r#"{"error":"invalid_grant"}"#;
    Ok(format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
        answer.len()
    ))
}

/// An IMAP and an SMTP capture.
async fn mail_captures() -> (Capture, Capture) {
    (
        Capture::start(Speaks::Imap).await,
        Capture::start(Speaks::Smtp).await,
    )
}

/// Mail settings that send IMAP and SMTP to two captures over implicit TLS, trusting their CA.
fn captured_mail(imap: &Capture, smtp: &Capture) -> Vec<(&'static str, String)> {
    vec![
        ("imap_host", "127.0.0.1".into()),
        ("imap_port", imap.port()),
        ("imap_tls", "implicit".into()),
        ("smtp_host", "127.0.0.1".into()),
        ("smtp_port", smtp.port()),
        ("smtp_tls", "implicit".into()),
        ("ca_pem", format!("{}\n{}", imap.ca_pem, smtp.ca_pem)),
    ]
}

fn map(pairs: &[(&str, String)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn mask(paths: &[(&str, String)], prefix: &str) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|(k, _)| format!("{prefix}{k}")).collect(),
    })
}

/// An admin's UpdateConnector of config keys only (no secret carried along).
async fn update_config(
    admin: &mut AdminClient<Channel>,
    connector: &str,
    config: &[(&str, String)],
) -> Result<proto::Connector, tonic::Status> {
    admin
        .update_connector(proto::UpdateConnectorRequest {
            connector: connector.into(),
            config: map(config),
            update_mask: mask(config, "config."),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn connection_of(
    admin: &mut AdminClient<Channel>,
    connector: &str,
    user: &str,
) -> proto::Connection {
    admin
        .get_connection(proto::GetConnectionRequest {
            connection: conn(connector, user),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A personal OAuth connector at the test server, and `user`'s connection through the browser.
async fn oauth_connection(
    daemon: &Daemon,
    admin: &mut AdminClient<Channel>,
    name: &str,
    user: &str,
) {
    let scopes = [("scopes", "openid email mail.read mail.send")];
    create_connector(admin, name, &scopes).await;
    support::oauth::connect(daemon, admin, name, user, user).await;
}

/// The audit records of one operation.
async fn audit_of(admin: &mut AdminClient<Channel>, operation: &str) -> Vec<proto::AuditRecord> {
    let query = proto::QueryAuditRequest {
        operation: operation.into(),
        limit: 100,
        ..Default::default()
    };
    admin.query_audit(query).await.unwrap().into_inner().records
}

/// TestConnection, then ConnectWithCredentials (saving even what fails its test), of `user`'s
/// connection to "Mail" with these settings and no secret.
async fn test_then_connect(
    admin: &mut AdminClient<Channel>,
    user: &str,
    settings: &[(&str, String)],
) -> (
    Result<tonic::Response<proto::TestConnectionResponse>, tonic::Status>,
    Result<tonic::Response<proto::ConnectWithCredentialsResponse>, tonic::Status>,
) {
    let tested = admin
        .test_connection(proto::TestConnectionRequest {
            connection: conn("Mail", user),
            settings: map(settings),
            ..Default::default()
        })
        .await;
    let connected = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Mail", user),
            settings: map(settings),
            save_on_failure: true,
            ..Default::default()
        })
        .await;
    (tested, connected)
}

/// "Mail OAuth" at the test server, "Mail" at the mail peers signing in through it, and
/// alice's OAuth connection, made after both (so her token may go to Mail's servers).
async fn alice_over_oauth(daemon: &Daemon, admin: &mut AdminClient<Channel>) {
    let scopes = [("scopes", "openid email mail.read mail.send")];
    create_connector(admin, "Mail OAuth", &scopes).await;
    let mut config =
        support::mail::mail_config(&support::mail::Servers::implicit_imap_starttls_smtp());
    config.insert("oauth_connector".into(), "Mail OAuth".into());
    support::mail::create_mail_connector(admin, "Mail", proto::ConnectorMode::Personal, config)
        .await;
    support::oauth::connect(daemon, admin, "Mail OAuth", "alice", "alice").await;
}

/// The access token alice's "Mail OAuth" connection holds now.
async fn alices_token(daemon: &Daemon) -> String {
    let resolved = daemon
        .agent()
        .await
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn("Mail OAuth", "alice"),
            min_ttl_seconds: 0,
            ..Default::default()
        })
        .await;
    resolved.unwrap().into_inner().secret
}

#[tokio::test]
async fn a_users_oauth_token_never_goes_to_mail_servers_an_admin_names() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    alice_over_oauth(&daemon, &mut admin).await;
    let token = alices_token(&daemon).await;
    // Her mail connection works: the token goes to the servers the connector names.
    let email = [("email", "alice@x.test".to_string())];
    let (_, connected) = test_then_connect(&mut admin, "alice", &email).await;
    assert!(connected.unwrap().into_inner().test.unwrap().ok);
    let (imap, smtp) = mail_captures().await;
    let mut candidate = captured_mail(&imap, &smtp);
    candidate.push(("email", "alice@x.test".into()));

    // 1. The request's own settings name the attacker's servers and CA.
    let (tested, connected) = test_then_connect(&mut admin, "alice", &candidate).await;
    // 2. The connector is pointed at them, then alice's connection is tested and made again.
    let moved = update_config(&mut admin, "Mail", &captured_mail(&imap, &smtp)).await;
    let expired = connection_of(&mut admin, "Mail", "alice").await;
    let (_, reconnected) = test_then_connect(&mut admin, "alice", &email).await;

    for capture in [&imap, &smtp] {
        assert!(!capture.got(&token), "alice's token reached the attacker");
        assert!(
            !capture.got("auth=Bearer"),
            "a bearer token reached the attacker"
        );
    }
    // What stopped each step, in words an admin can act on.
    let refused = tested.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert_eq!(
        support::daemon::reason(&refused).1["field"],
        "settings.imap_host"
    );
    assert_eq!(connected.unwrap_err().code(), Code::InvalidArgument);
    moved.expect("an admin may still move the connector");
    assert_eq!(expired.expired_reason, "destination_changed", "{expired:?}");
    let test = reconnected.unwrap().into_inner().test.unwrap();
    assert!(!test.ok, "{test:?}");
    assert!(
        test.checks[0].message.contains("destination_changed"),
        "alice's grant predates the servers: {test:?}"
    );
    let audit = audit_of(&mut admin, "ConnectWithCredentials").await;
    assert!(
        audit
            .iter()
            .all(|r| r.connector.contains("Mail OAuth (cn_")),
        "the audit names the OAuth connector too: {audit:?}"
    );
}

#[tokio::test]
async fn a_moved_token_endpoint_gets_neither_the_client_secret_nor_a_users_grant() {
    use support::peers::{ACCESS_TTL_SECS, OAUTH_CLIENT_SECRET};
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    oauth_connection(&daemon, &mut admin, "Idp", "alice").await;
    oauth_connection(&daemon, &mut admin, "Idp2", "bob").await;
    let evil = Capture::start(Speaks::Http).await;
    let url = |path: &str| format!("https://{}/{path}", evil.addr);

    // The token endpoint moves: the next refresh would carry the client secret and alice's grant.
    update_config(
        &mut admin,
        "Idp",
        &[("token_url", url("token")), ("ca_pem", evil.ca_pem.clone())],
    )
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(ACCESS_TTL_SECS + 1)).await;
    let refreshed = agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn("Idp", "alice"),
            min_ttl_seconds: 0,
            ..Default::default()
        })
        .await;
    // The revocation endpoint moves: Disconnect would send it bob's token.
    update_config(
        &mut admin,
        "Idp2",
        &[
            ("revocation_url", url("revoke")),
            ("ca_pem", evil.ca_pem.clone()),
        ],
    )
    .await
    .unwrap();
    let _ = admin
        .disconnect(proto::DisconnectRequest {
            connection: conn("Idp2", "bob"),
        })
        .await;

    assert!(!evil.got(OAUTH_CLIENT_SECRET), "{}", evil.text());
    assert!(
        !evil.got("token="),
        "a grant or token was sent: {}",
        evil.text()
    );
    let err = refreshed.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(support::daemon::reason(&err).0, "EXPIRED");
    assert_eq!(
        support::daemon::reason(&err).1["expired"],
        "destination_changed"
    );
    let shown = connection_of(&mut admin, "Idp", "alice").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Expired as i32);
    assert_eq!(shown.expired_reason, "destination_changed");
    let idp = admin
        .get_connector(proto::GetConnectorRequest {
            connector: "Idp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        idp.secrets_set.is_empty(),
        "the client secret was erased: {idp:?}"
    );
}

#[tokio::test]
async fn a_stored_api_key_is_tested_only_where_it_was_saved_for() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let evil = Capture::start(Speaks::Http).await;
    admin
        .create_connector(proto::CreateConnectorRequest {
            secrets: secrets(&[("api_key", "k-shared-canary")]),
            ..new_connector(
                "CRM",
                proto::ConnectorKind::ApiKey,
                proto::ConnectorMode::Shared,
            )
        })
        .await
        .unwrap();
    admin
        .create_connector(new_connector(
            "Own CRM",
            proto::ConnectorKind::ApiKey,
            proto::ConnectorMode::Personal,
        ))
        .await
        .unwrap();
    let saved = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Own CRM", "u1"),
            secrets: secrets(&[("api_key", "k-personal-canary")]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(saved.saved, "{saved:?}");
    let moved = [
        ("test_url", format!("https://{}/whoami", evil.addr)),
        ("header_name", "X-Captured".to_string()),
        ("ca_pem", evil.ca_pem.clone()),
    ];
    let mut shown = Vec::new();
    for (connector, user) in [("CRM", ""), ("Own CRM", "u1")] {
        update_config(&mut admin, connector, &moved).await.unwrap();
        let _ = admin
            .test_connection(proto::TestConnectionRequest {
                connection: conn(connector, user),
                ..Default::default()
            })
            .await;
        shown.push(connection_of(&mut admin, connector, user).await);
    }
    assert!(!evil.got("k-shared-canary"), "{}", evil.text());
    assert!(!evil.got("k-personal-canary"), "{}", evil.text());
    // Each move is audited: what changed, what was erased, how many connections expired.
    let audit = audit_of(&mut admin, "DestinationChanged").await;
    let reasons: Vec<&str> = audit.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("test_url") && reasons[0].contains("[api_key]"));
    assert!(reasons[1].contains("1 connections expired"), "{reasons:?}");
    assert!(!format!("{audit:?}").contains("canary"));
    for connection in shown {
        assert_eq!(
            connection.status,
            proto::ConnectionStatus::Expired as i32,
            "{connection:?}"
        );
        assert_eq!(connection.expired_reason, "destination_changed");
    }
}

#[tokio::test]
async fn a_connectors_ca_is_not_trusted_for_a_users_own_mail_servers() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let (imap, smtp) = mail_captures().await;
    // The admin's CA; the user names their own servers (which the admin intercepts).
    let config = [("ca_pem", format!("{}\n{}", imap.ca_pem, smtp.ca_pem))];
    support::mail::create_mail_connector(
        &mut admin,
        "Corp Mail",
        proto::ConnectorMode::Personal,
        map(&config),
    )
    .await;
    let mut own: Vec<_> = captured_mail(&imap, &smtp)
        .into_iter()
        .filter(|(k, _)| *k != "ca_pem")
        .collect();
    own.push(("email", "u1@x.test".into()));
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Corp Mail", "u1"),
            settings: map(&own),
            secrets: secrets(&[("password", "pw-own-canary")]),
            save_on_failure: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!imap.got("pw-own-canary"), "{}", imap.text());
    assert!(!smtp.got("pw-own-canary"), "{}", smtp.text());
    let test = resp.test.unwrap();
    assert!(
        test.checks.iter().all(|c| c.stage == "tls"),
        "the servers' certificates are not trusted: {test:?}"
    );
}

/// CreateConnector of a personal imap_smtp connector "Mail" with this config.
async fn create_personal_mail(
    admin: &mut AdminClient<Channel>,
    config: &[(&str, String)],
) -> Result<tonic::Response<proto::Connector>, tonic::Status> {
    admin
        .create_connector(proto::CreateConnectorRequest {
            config: map(config),
            ..new_connector(
                "Mail",
                proto::ConnectorKind::ImapSmtp,
                proto::ConnectorMode::Personal,
            )
        })
        .await
}

#[tokio::test]
async fn oauth_connector_names_an_oauth_connector_only() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    api_key(&mut admin, "", "Key").await;
    let (imap, smtp) = mail_captures().await;
    let mut config = captured_mail(&imap, &smtp);
    config.push(("oauth_connector", "Key".into()));
    let created = create_personal_mail(&mut admin, &config).await;
    let email = [("email", "u1@x.test".to_string())];
    let _ = test_then_connect(&mut admin, "u1", &email).await;
    assert!(!imap.got("k-secret-canary"), "{}", imap.text());
    assert!(!smtp.got("k-secret-canary"), "{}", smtp.text());
    let err = created.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        support::daemon::reason(&err).1["field"],
        "config.oauth_connector"
    );
    // Naming an OAuth connector (by name: it is kept by id, so a rename cannot redirect it)
    // is audited with both connectors.
    create_connector(&mut admin, "Mail OAuth", &[]).await;
    config.retain(|(k, _)| *k != "oauth_connector");
    config.push(("oauth_connector", "Mail OAuth".into()));
    let created = create_personal_mail(&mut admin, &config)
        .await
        .unwrap()
        .into_inner();
    assert!(
        created.config["oauth_connector"].starts_with("cn_"),
        "{created:?}"
    );
    let audit = audit_of(&mut admin, "CreateConnector").await;
    assert!(
        audit
            .last()
            .unwrap()
            .connector
            .contains("via Mail OAuth (cn_"),
        "{audit:?}"
    );
    // Naming the same connector again moves nothing; naming another moves the destination.
    let again = [("oauth_connector", "Mail OAuth".to_string())];
    update_config(&mut admin, "Mail", &again).await.unwrap();
    assert!(audit_of(&mut admin, "DestinationChanged").await.is_empty());
    create_connector(&mut admin, "Other OAuth", &[]).await;
    let other = [("oauth_connector", "Other OAuth".to_string())];
    update_config(&mut admin, "Mail", &other).await.unwrap();
    let moves = audit_of(&mut admin, "DestinationChanged").await;
    assert!(moves[0].reason.contains("oauth_connector"), "{moves:?}");
}

#[tokio::test]
async fn signing_in_through_an_oauth_connector_needs_a_grant_on_it_too() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start_with(
        &policy(&[
            "workspace = \"default\"\nconnectors = [\"Mail\"]\noperations = [\"fetch_mail\"]\nusers = [\"*\"]",
        ]),
        "",
    );
    let mut admin = daemon.admin().await;
    alice_over_oauth(&daemon, &mut admin).await;
    let email = [("email", "alice@x.test".to_string())];
    let (_, connected) = test_then_connect(&mut admin, "alice", &email).await;
    let connected = connected.unwrap().into_inner();
    assert!(
        connected.test.unwrap().ok,
        "alice's mail signs in with her token"
    );

    // The agent may read "Mail", not "Mail OAuth": it gets nothing through it either.
    let mut agent = daemon.agent().await;
    let err = support::mail::fetch(&mut agent, conn("Mail", "alice"), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("Mail OAuth"), "{err:?}");
    let audit = audit_of(&mut admin, "FetchMail").await;
    assert_eq!(audit.len(), 1);
    assert!(
        audit[0].connector.contains("via Mail OAuth (cn_"),
        "{audit:?}"
    );
}
