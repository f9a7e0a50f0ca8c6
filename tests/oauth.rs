//! OAuth 2 connections against a real authorization server (oidc-provider over HTTPS, started by
//! the harness): the browser flow through the daemon's callback, refresh (once for many callers,
//! rotation surviving SIGKILL), expiry and reconnect, disconnect with revocation, client
//! credentials, and refused states. The server's counters prove what happened at the provider.
//!
//! The tests share the server's counters, so they run one at a time ([`SERIAL`]).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{Daemon, reason};
use support::peers::{self, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, peers};
use tonic::Code;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONNECTOR: &str = "Team Mail";
const RETURN_URL: &str = "https://console.example/settings/integrations";

fn conn(connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: String::new(),
        connector: connector.into(),
        user_id: user.into(),
    })
}

/// A personal OAuth connector pointed at the test server; its identity endpoint is `/me`.
async fn create_connector(admin: &mut AdminClient<Channel>, name: &str, extra: &[(&str, &str)]) {
    let issuer = peers().oauth_issuer();
    let mut config: HashMap<String, String> = [
        ("client_id", OAUTH_CLIENT_ID.to_string()),
        ("auth_url", format!("{issuer}/auth")),
        ("token_url", format!("{issuer}/token")),
        ("revocation_url", format!("{issuer}/token/revocation")),
        ("userinfo_url", format!("{issuer}/me")),
        ("account_label_field", "email".into()),
        ("scopes", "openid email mail.read".into()),
        ("ca_pem", peers().ca_pem.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        config.insert(k.to_string(), v.to_string());
    }
    let mode = if extra
        .iter()
        .any(|(k, v)| *k == "grant_type" && *v == "client_credentials")
    {
        proto::ConnectorMode::Shared
    } else {
        proto::ConnectorMode::Personal
    };
    admin
        .create_connector(proto::CreateConnectorRequest {
            name: name.into(),
            kind: proto::ConnectorKind::Oauth2 as i32,
            mode: mode as i32,
            config,
            secrets: [(
                "client_secret".to_string(),
                proto::SecretValue {
                    value: OAUTH_CLIENT_SECRET.into(),
                },
            )]
            .into(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A browser: follows redirects by hand, keeps cookies, trusts the provider's and the daemon's CAs.
struct Browser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl Browser {
    fn new(daemon: &Daemon) -> Self {
        let cas = format!("{}\n{}", peers().ca_pem, daemon.ca.cert_pem);
        let http = credbroker::tls::http_client(Some(&cas), Duration::from_secs(10)).unwrap();
        Self {
            http,
            cookies: HashMap::new(),
        }
    }

    async fn get(&mut self, url: &str) -> reqwest::Response {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let response = self
            .http
            .get(url)
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        for value in response.headers().get_all("set-cookie") {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            if let Some((k, v)) = pair.split_once('=') {
                self.cookies.insert(k.trim().to_string(), v.to_string());
            }
        }
        response
    }

    /// Follows the provider's redirects until the browser is sent to `stop_at`; returns that URL.
    async fn consent(&mut self, authorization_url: &str, stop_at: &str) -> String {
        let mut url = authorization_url.to_string();
        for _ in 0..10 {
            let response = self.get(&url).await;
            let status = response.status();
            let location = response
                .headers()
                .get("location")
                .map(|l| l.to_str().unwrap().to_string());
            let Some(location) = location else {
                panic!(
                    "the provider stopped at {url} with {status}: {}",
                    response.text().await.unwrap()
                );
            };
            url = reqwest::Url::parse(&url)
                .unwrap()
                .join(&location)
                .unwrap()
                .to_string();
            if url.starts_with(stop_at) {
                return url;
            }
        }
        panic!("too many redirects from the provider");
    }
}

fn callback_url(daemon: &Daemon) -> String {
    format!(
        "https://{}/oauth/callback",
        daemon.http.expect("http listener")
    )
}

async fn begin(admin: &mut AdminClient<Channel>, user: &str) -> proto::BeginConnectResponse {
    admin
        .begin_connect(proto::BeginConnectRequest {
            connection: conn(CONNECTOR, user),
            return_url: RETURN_URL.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Connects `user` through the browser flow and the daemon's callback; returns where the
/// browser ended up.
async fn connect(daemon: &Daemon, admin: &mut AdminClient<Channel>, user: &str) -> reqwest::Url {
    let started = begin(admin, user).await;
    let mut browser = Browser::new(daemon);
    let callback = browser
        .consent(&started.authorization_url, &callback_url(daemon))
        .await;
    let response = browser.get(&callback).await;
    assert_eq!(
        response.status().as_u16(),
        303,
        "{}",
        response.text().await.unwrap()
    );
    let location = response.headers()["location"].to_str().unwrap().to_string();
    reqwest::Url::parse(&location).unwrap()
}

async fn resolve(
    agent: &mut BrokerClient<Channel>,
    user: &str,
) -> Result<proto::ResolveCredentialResponse, tonic::Status> {
    agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn(CONNECTOR, user),
            min_ttl_seconds: 1,
        })
        .await
        .map(|r| r.into_inner())
}

async fn connection(admin: &mut AdminClient<Channel>, user: &str) -> proto::Connection {
    admin
        .get_connection(proto::GetConnectionRequest {
            connection: conn(CONNECTOR, user),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until access tokens issued before now have expired at the server.
async fn let_tokens_expire() {
    tokio::time::sleep(Duration::from_secs(peers::ACCESS_TTL_SECS + 1)).await;
}

/// Asks the provider who a token belongs to: proves it is a real, live token.
async fn whoami(token: &str) -> reqwest::StatusCode {
    let url = format!("{}/me", peers().oauth_issuer());
    peers()
        .http()
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn browser_flow_connects_through_the_callback() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;

    let err = resolve(&mut agent, "u1").await.unwrap_err();
    assert_eq!(reason(&err).0, "NOT_CONNECTED");

    let before = peers().oauth_stats().await;
    let started = begin(&mut admin, "u1").await;
    let url = reqwest::Url::parse(&started.authorization_url).unwrap();
    let query: HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert!(query["code_challenge"].len() >= 43);
    assert_eq!(query["state"], started.state);
    assert!(!started.authorization_url.contains(OAUTH_CLIENT_SECRET));

    let mut browser = Browser::new(&daemon);
    let callback = browser
        .consent(&started.authorization_url, &callback_url(&daemon))
        .await;
    let code = reqwest::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .to_string();
    let response = browser.get(&callback).await;
    assert_eq!(response.status().as_u16(), 303);
    let back = reqwest::Url::parse(response.headers()["location"].to_str().unwrap()).unwrap();
    assert!(back.as_str().starts_with(RETURN_URL), "{back}");
    let outcome: HashMap<_, _> = back.query_pairs().into_owned().collect();
    assert_eq!(outcome["status"], "connected");
    assert_eq!(outcome["connector"], CONNECTOR);
    // The provider checked the PKCE verifier (pkce.required) and issued exactly one code grant.
    assert_eq!(
        peers().oauth_stats().await.authorization_code,
        before.authorization_code + 1
    );

    let shown = connection(&mut admin, "u1").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Connected as i32);
    assert_eq!(shown.account_label, "alice@x.test");
    assert!(shown.connected_at.is_some());

    let token = resolve(&mut agent, "u1").await.unwrap();
    assert_eq!(token.token_type, "Bearer");
    assert_eq!(token.account_label, "alice@x.test");
    assert_eq!(whoami(&token.secret).await.as_u16(), 200);

    // The same callback again: the state was used once and is refused now, and audited.
    let replay = browser.get(&callback).await;
    assert_eq!(replay.status().as_u16(), 400);
    let err = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: started.state.clone(),
            code: code.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err).0, "STATE_UNKNOWN");
    let unknown = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: "f".repeat(64),
            code: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown).0, "STATE_UNKNOWN");

    // Neither the token, the code nor the client secret is in the logs or the audit trail.
    let audit = admin
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let callbacks: Vec<_> = audit
        .records
        .iter()
        .filter(|r| r.operation == "OAuthCallback")
        .collect();
    assert_eq!(callbacks.len(), 2, "{callbacks:?}");
    let trail = format!("{audit:?}{}", daemon.logs());
    for canary in [token.secret.as_str(), code.as_str(), OAUTH_CLIENT_SECRET] {
        assert!(
            !trail.contains(canary),
            "a secret leaked into the logs or audit"
        );
    }
}

#[tokio::test]
async fn complete_connect_serves_platforms_that_host_the_redirect() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    let started = begin(&mut admin, "u2").await;
    let mut browser = Browser::new(&daemon);
    // The platform receives the browser at its own page and hands state and code over.
    let callback = browser
        .consent(&started.authorization_url, &callback_url(&daemon))
        .await;
    let params: HashMap<_, _> = reqwest::Url::parse(&callback)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let connected = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: params["state"].clone(),
            code: params["code"].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(connected.status, proto::ConnectionStatus::Connected as i32);
    assert_eq!(connected.user_id, "u2");
    assert!(resolve(&mut agent, "u2").await.is_ok());
    // A wrong code for a fresh state is refused by the provider and nothing is connected.
    let started = begin(&mut admin, "u3").await;
    let err = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: started.state,
            code: "not-a-code".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err).0, "PROVIDER_REFUSED", "{err:?}");
    assert_eq!(
        reason(&resolve(&mut agent, "u3").await.unwrap_err()).0,
        "NOT_CONNECTED"
    );
}

#[tokio::test]
async fn two_hundred_waiting_callers_cause_one_refresh() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    connect(&daemon, &mut admin, "u1").await;
    let first = resolve(&mut daemon.agent().await, "u1")
        .await
        .unwrap()
        .secret;
    let_tokens_expire().await;

    let before = peers().oauth_stats().await;
    let mut agents = Vec::new();
    for _ in 0..4 {
        agents.push(daemon.agent().await);
    }
    let calls = (0..200).map(|i| {
        let mut agent = agents[i % agents.len()].clone();
        async move { resolve(&mut agent, "u1").await }
    });
    let results = futures::future::join_all(calls).await;
    let tokens: std::collections::HashSet<_> =
        results.into_iter().map(|r| r.unwrap().secret).collect();
    let after = peers().oauth_stats().await;
    assert_eq!(
        after.refresh_token - before.refresh_token,
        1,
        "{before:?} -> {after:?}"
    );
    assert_eq!(tokens.len(), 1, "every caller got the one refreshed token");
    assert!(!tokens.contains(&first));
    assert_eq!(whoami(tokens.iter().next().unwrap()).await.as_u16(), 200);
}

#[tokio::test]
async fn a_rotated_refresh_token_survives_sigkill() {
    let _serial = SERIAL.lock().await;
    let mut daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    connect(&daemon, &mut admin, "u1").await;
    for round in 0..2 {
        let_tokens_expire().await;
        // This resolve refreshes; the server rotates the refresh token and would treat a reuse
        // of the old one as theft (revoking the grant).
        resolve(&mut daemon.agent().await, "u1")
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        daemon.kill();
        daemon.respawn();
    }
    let_tokens_expire().await;
    let token = resolve(&mut daemon.agent().await, "u1").await.unwrap();
    assert_eq!(whoami(&token.secret).await.as_u16(), 200);
    let mut admin = daemon.admin().await;
    assert_eq!(
        connection(&mut admin, "u1").await.status,
        proto::ConnectionStatus::Connected as i32
    );
}

#[tokio::test]
async fn a_revoked_grant_expires_and_reconnect_restores_it() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    connect(&daemon, &mut admin, "u1").await;
    let token = resolve(&mut agent, "u1").await.unwrap().secret;
    // The user revokes the app at the provider.
    let url = format!("{}/__revoke_grant?token={token}", peers().oauth_issuer());
    assert!(
        peers()
            .http()
            .post(url)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let_tokens_expire().await;

    let err = resolve(&mut agent, "u1").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err).0, "EXPIRED");
    let shown = connection(&mut admin, "u1").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Expired as i32);
    assert!(
        shown.last_error.contains("invalid_grant"),
        "{}",
        shown.last_error
    );
    // Expired stays expired without asking the provider again.
    assert_eq!(
        reason(&resolve(&mut agent, "u1").await.unwrap_err()).0,
        "EXPIRED"
    );

    let back = connect(&daemon, &mut admin, "u1").await;
    assert!(back.as_str().contains("status=connected"), "{back}");
    let token = resolve(&mut agent, "u1").await.unwrap();
    assert_eq!(whoami(&token.secret).await.as_u16(), 200);
    assert_eq!(
        connection(&mut admin, "u1").await.status,
        proto::ConnectionStatus::Connected as i32
    );
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_and_erases_the_tokens() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(&mut admin, CONNECTOR, &[]).await;
    connect(&daemon, &mut admin, "u1").await;
    let token = resolve(&mut agent, "u1").await.unwrap().secret;
    let before = peers().oauth_stats().await;
    let done = admin
        .disconnect(proto::DisconnectRequest {
            connection: conn(CONNECTOR, "u1"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.revoked);
    assert_eq!(
        peers().oauth_stats().await.revocation,
        before.revocation + 1
    );
    // Revoking the refresh token revoked the grant: the last access token is dead too.
    assert_eq!(whoami(&token).await.as_u16(), 401);
    assert_eq!(
        reason(&resolve(&mut agent, "u1").await.unwrap_err()).0,
        "NOT_CONNECTED"
    );
    assert_eq!(
        connection(&mut admin, "u1").await.status,
        proto::ConnectionStatus::NotConnected as i32
    );
}

#[tokio::test]
async fn client_credentials_tokens_are_cached_until_near_expiry() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(
        &mut admin,
        CONNECTOR,
        &[
            ("grant_type", "client_credentials"),
            ("scopes", "mail.read"),
        ],
    )
    .await;
    let before = peers().oauth_stats().await;
    let first = resolve(&mut agent, "").await.unwrap();
    let second = resolve(&mut agent, "").await.unwrap();
    assert_eq!(first.secret, second.secret);
    assert_eq!(
        peers().oauth_stats().await.client_credentials,
        before.client_credentials + 1
    );
    let_tokens_expire().await;
    let third = resolve(&mut agent, "").await.unwrap();
    assert_ne!(third.secret, first.secret);
    assert_eq!(
        peers().oauth_stats().await.client_credentials,
        before.client_credentials + 2
    );
    // BeginConnect makes no sense without a person.
    let err = admin
        .begin_connect(proto::BeginConnectRequest {
            connection: conn(CONNECTOR, ""),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}
