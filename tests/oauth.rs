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
use support::daemon::{
    Daemon, assert_refused, audit_records, conn, get_connection, metric, reason, secrets,
};
use support::https::serve_https;
use support::oauth::{
    Browser, RETURN_URL, begin, callback_url, connect, query_param, with_connection, with_connector,
};
use support::peers::{self, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, peers};
use tonic::Code;
use tonic::transport::Channel;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONNECTOR: &str = "Team Mail";

async fn resolve(
    agent: &mut BrokerClient<Channel>,
    user: &str,
) -> Result<proto::ResolveCredentialResponse, tonic::Status> {
    agent
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: conn(CONNECTOR, user),
            min_ttl_seconds: 1,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn connection(admin: &mut AdminClient<Channel>, user: &str) -> proto::Connection {
    get_connection(admin, conn(CONNECTOR, user)).await
}

async fn assert_status(
    admin: &mut AdminClient<Channel>,
    user: &str,
    status: proto::ConnectionStatus,
) {
    assert_eq!(connection(admin, user).await.status, status as i32);
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
    let (daemon, mut admin, mut agent) = with_connector(Daemon::start(), CONNECTOR, &[]).await;

    let err = resolve(&mut agent, "u1").await.unwrap_err();
    assert_eq!(reason(&err).0, "NOT_CONNECTED");

    let before = peers().oauth_stats().await;
    let started = begin(&mut admin, CONNECTOR, "u1", "").await;
    let mut browser = Browser::new(&daemon);
    let at_provider = browser.open(&started.authorization_url).await;
    let url = reqwest::Url::parse(&at_provider).unwrap();
    let query: HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert!(query["code_challenge"].len() >= 43);
    assert_eq!(query["state"], started.state);
    assert!(!at_provider.contains(OAUTH_CLIENT_SECRET));

    let callback = browser.consent(&at_provider, &callback_url(&daemon)).await;
    let code = query_param(&callback, "code");
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
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(&err, Code::InvalidArgument, "STATE_UNKNOWN");
    let unknown = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: "f".repeat(64),
            code: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&unknown).0, "STATE_UNKNOWN");

    // Neither the token, the code nor the client secret is in the logs or the audit trail.
    let audit = audit_records(&mut admin).await;
    let callbacks: Vec<_> = audit
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
    let (daemon, mut admin, mut agent) = with_connector(Daemon::start(), CONNECTOR, &[]).await;
    let started = begin(&mut admin, CONNECTOR, "u2", "").await;
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
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(connected.status, proto::ConnectionStatus::Connected as i32);
    assert_eq!(connected.user_id, "u2");
    assert!(resolve(&mut agent, "u2").await.is_ok());
    // A wrong code for a fresh state is refused by the provider and nothing is connected.
    let started = begin(&mut admin, CONNECTOR, "u3", "").await;
    let err = admin
        .complete_connect(proto::CompleteConnectRequest {
            state: started.state,
            code: "not-a-code".into(),
            ..Default::default()
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
    let (daemon, _, _) = with_connection(Daemon::start(), CONNECTOR, "u1").await;
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
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(
        metric(&metrics, "credbroker_token_refresh_total{outcome=\"ok\"}"),
        1.0
    );
    assert!(
        metric(
            &metrics,
            "credbroker_upstream_duration_seconds_count{kind=\"oauth\"}"
        ) >= 2.0
    );
    assert_eq!(whoami(tokens.iter().next().unwrap()).await.as_u16(), 200);
}

#[tokio::test]
async fn a_rotated_refresh_token_survives_sigkill() {
    let _serial = SERIAL.lock().await;
    let (mut daemon, _, _) = with_connection(Daemon::start(), CONNECTOR, "u1").await;
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
    assert_status(&mut admin, "u1", proto::ConnectionStatus::Connected).await;
}

#[tokio::test]
async fn a_revoked_grant_expires_and_reconnect_restores_it() {
    let _serial = SERIAL.lock().await;
    let (daemon, mut admin, mut agent) = with_connection(Daemon::start(), CONNECTOR, "u1").await;
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
    assert_refused(&err, Code::FailedPrecondition, "EXPIRED");
    let shown = connection(&mut admin, "u1").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Expired as i32);
    assert!(
        shown.last_error.contains("invalid_grant"),
        "{}",
        shown.last_error
    );
    let (_, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "credbroker_token_refresh_total{outcome=\"expired\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&metrics, "credbroker_connections{status=\"expired\"}"),
        1.0
    );
    assert!(!metrics.contains("u1"), "a user id in the metrics");
    // Expired stays expired without asking the provider again.
    assert_eq!(
        reason(&resolve(&mut agent, "u1").await.unwrap_err()).0,
        "EXPIRED"
    );

    let back = connect(&daemon, &mut admin, CONNECTOR, "u1", "").await;
    assert!(back.as_str().contains("status=connected"), "{back}");
    let token = resolve(&mut agent, "u1").await.unwrap();
    assert_eq!(whoami(&token.secret).await.as_u16(), 200);
    assert_status(&mut admin, "u1", proto::ConnectionStatus::Connected).await;
}

#[tokio::test]
async fn disconnect_revokes_at_the_provider_and_erases_the_tokens() {
    let _serial = SERIAL.lock().await;
    let (_daemon, mut admin, mut agent) = with_connection(Daemon::start(), CONNECTOR, "u1").await;
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
    assert_status(&mut admin, "u1", proto::ConnectionStatus::NotConnected).await;
}

#[tokio::test]
async fn client_credentials_tokens_are_cached_until_near_expiry() {
    let _serial = SERIAL.lock().await;
    let client_credentials = [
        ("grant_type", "client_credentials"),
        ("scopes", "mail.read"),
    ];
    let (_daemon, mut admin, mut agent) =
        with_connector(Daemon::start(), CONNECTOR, &client_credentials).await;
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

/// A preset connector's settings: only the identity endpoint (`userinfo_url`) is Google's or
/// Slack's; the rest is the real test server. `cas` trusts both.
fn preset_config(userinfo_url: &str, cas: &str) -> HashMap<String, String> {
    let issuer = peers().oauth_issuer();
    [
        ("client_id", OAUTH_CLIENT_ID.to_string()),
        ("auth_url", format!("{issuer}/auth")),
        ("token_url", format!("{issuer}/token")),
        ("revocation_url", format!("{issuer}/token/revocation")),
        ("userinfo_url", userinfo_url.to_string()),
        ("scopes", "openid email mail.read".into()),
        ("token_auth", "basic".into()),
        ("ca_pem", cas.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Google's and Slack's identity endpoints cannot run here: a fake serves their documented
/// shapes over HTTPS, and the presets' label fields pick the account from them, through the
/// same flow as every other connection (the rest of the flow runs at the real test server).
#[tokio::test]
async fn provider_presets_read_the_account_from_google_and_slack_shapes() {
    let _serial = SERIAL.lock().await;
    let fake_ca = credbroker_devpki::CertAuthority::generate("fake identity CA").unwrap();
    let fake = fake_identity_server(&fake_ca).await;
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let cas = format!("{}\n{}", peers().ca_pem, fake_ca.cert_pem);
    for (provider, path, label) in [
        ("google-mail", "/oauth2/v3/userinfo", "alice@x.test"),
        ("slack", "/api/auth.test", "Acme Corp"),
    ] {
        let config = preset_config(&format!("https://{fake}{path}"), &cas);
        admin
            .create_connector(proto::CreateConnectorRequest {
                name: provider.into(),
                kind: proto::ConnectorKind::Oauth2 as i32,
                mode: proto::ConnectorMode::Personal as i32,
                provider: provider.into(),
                config,
                secrets: secrets(&[("client_secret", OAUTH_CLIENT_SECRET)]),
                ..Default::default()
            })
            .await
            .unwrap();
        let started = begin(&mut admin, provider, "u1", "").await;
        let mut browser = Browser::new(&daemon);
        let at_provider = browser.open(&started.authorization_url).await;
        if provider == "google-mail" {
            // The preset's extra authorization parameters (offline access) are sent.
            assert!(at_provider.contains("access_type=offline"), "{at_provider}");
        }
        let callback = browser.consent(&at_provider, &callback_url(&daemon)).await;
        assert_eq!(browser.get(&callback).await.status().as_u16(), 303);
        let shown = admin
            .get_connection(proto::GetConnectionRequest {
                connection: conn(provider, "u1"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(shown.account_label, label, "{provider}");
        assert_eq!(shown.provider, provider);
        let token = agent
            .resolve_credential(proto::ResolveCredentialRequest {
                connection: conn(provider, "u1"),
                min_ttl_seconds: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(token.account_label, label);
    }
    // An unknown provider is refused by name.
    let err = admin
        .create_connector(proto::CreateConnectorRequest {
            name: "Gitlab".into(),
            kind: proto::ConnectorKind::Oauth2 as i32,
            mode: proto::ConnectorMode::Personal as i32,
            provider: "gitlab".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("provider"), "{}", err.message());
}

/// Serves Google's userinfo and Slack's auth.test documents (their documented shapes) over
/// HTTPS to any bearer token; returns its address.
async fn fake_identity_server(ca: &credbroker_devpki::CertAuthority) -> std::net::SocketAddr {
    use axum::routing::get;
    let bearer = |headers: &axum::http::HeaderMap| {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.len() > "Bearer ".len())
    };
    let app = axum::Router::new()
        .route(
            "/oauth2/v3/userinfo",
            get(move |headers: axum::http::HeaderMap| async move {
                if !bearer(&headers) {
                    return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(serde_json::json!({"error": "invalid_request"})));
                }
                let doc = serde_json::json!({
                    "sub": "110169484474386276334", "name": "Alice", "given_name": "Alice",
                    "picture": "https://lh3.googleusercontent.com/a/x", "email": "alice@x.test",
                    "email_verified": true, "locale": "en", "hd": "x.test"
                });
                (axum::http::StatusCode::OK, axum::Json(doc))
            }),
        )
        .route(
            "/api/auth.test",
            get(move |headers: axum::http::HeaderMap| async move {
                if !bearer(&headers) {
                    return axum::Json(serde_json::json!({"ok": false, "error": "not_authed"}));
                }
                axum::Json(serde_json::json!({
                    "ok": true, "url": "https://acme.slack.com/", "team": "Acme Corp", "user": "alice",
                    "team_id": "T12345", "user_id": "W12345", "bot_id": null, "is_enterprise_install": false
                }))
            }),
        );
    serve_https(ca, app).await
}

/// Where a [`Relay`] sends the connections it accepts.
#[derive(Debug, Clone, Copy)]
enum Route {
    To(std::net::SocketAddr),
    /// Closes each connection at once.
    Refuse,
    /// Accepts and never says anything.
    Hold,
}

/// A TCP relay in front of a token endpoint, so that a test can take the endpoint away (or send
/// it elsewhere) without changing the connector: a changed token_url erases every grant.
struct Relay {
    addr: std::net::SocketAddr,
    route: std::sync::Arc<std::sync::Mutex<Route>>,
}

impl Relay {
    async fn start(route: Route) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let route = std::sync::Arc::new(std::sync::Mutex::new(route));
        let current = route.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let route = *current.lock().unwrap();
                match route {
                    Route::To(to) => {
                        tokio::spawn(async move {
                            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound)
                                    .await;
                            }
                        });
                    }
                    Route::Refuse => drop(inbound),
                    Route::Hold => held.push(inbound),
                }
            }
        });
        Relay { addr, route }
    }

    /// The test server, through the relay.
    async fn to_provider() -> Relay {
        let issuer = reqwest::Url::parse(&peers().oauth_issuer()).unwrap();
        let to = (issuer.host_str().unwrap(), issuer.port().unwrap());
        let to = tokio::net::lookup_host(to).await.unwrap().next().unwrap();
        Relay::start(Route::To(to)).await
    }

    fn token_url(&self) -> String {
        format!("https://{}/token", self.addr)
    }

    fn set(&self, route: Route) {
        *self.route.lock().unwrap() = route;
    }
}

#[tokio::test]
async fn an_unreachable_provider_backs_off_and_serves_the_still_valid_token() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::to_provider().await;
    let token_url = relay.token_url();
    let (daemon, mut admin, mut agent) =
        with_connector(Daemon::start(), CONNECTOR, &[("token_url", &token_url)]).await;
    connect(&daemon, &mut admin, CONNECTOR, "u1", "").await;
    let current = resolve(&mut agent, "u1").await.unwrap().secret;
    // The token endpoint goes away.
    relay.set(Route::Refuse);
    let wants_refresh = |agent: &mut BrokerClient<Channel>| {
        let mut agent = agent.clone();
        async move {
            agent
                .resolve_credential(proto::ResolveCredentialRequest {
                    connection: conn(CONNECTOR, "u1"),
                    min_ttl_seconds: 3600,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    // Past half its lifetime, a caller asking for an hour makes the broker refresh (a minimum
    // lifetime is capped at half the token's). The refresh fails, but the stored token still
    // works: the caller gets it.
    tokio::time::sleep(Duration::from_secs(peers::ACCESS_TTL_SECS / 2 + 1)).await;
    let served = wants_refresh(&mut agent).await.unwrap();
    assert_eq!(served.secret, current);
    let shown = connection(&mut admin, "u1").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Error as i32);
    assert!(!shown.last_error.is_empty());
    // Once it has expired there is nothing valid to serve: UNAVAILABLE, not EXPIRED (the grant
    // may be fine; the provider is down).
    let_tokens_expire().await;
    let err = wants_refresh(&mut agent).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_ne!(
        connection(&mut admin, "u1").await.status,
        proto::ConnectionStatus::Expired as i32
    );
}

#[tokio::test]
async fn a_token_endpoint_that_never_answers_is_unavailable_not_a_hang() {
    let _serial = SERIAL.lock().await;
    let relay = Relay::to_provider().await;
    let token_url = relay.token_url();
    let daemon = Daemon::start_with_config("[limits]\nupstream_timeout_secs = 2\n");
    let (daemon, mut admin, mut agent) =
        with_connector(daemon, CONNECTOR, &[("token_url", &token_url)]).await;
    connect(&daemon, &mut admin, CONNECTOR, "u1", "").await;
    // Accepts TCP, then says nothing, ever.
    relay.set(Route::Hold);
    let_tokens_expire().await;
    // The daemon's own deadline ends the call; the outer one only keeps a bug from hanging CI.
    let answer = tokio::time::timeout(Duration::from_secs(60), resolve(&mut agent, "u1")).await;
    let err = answer.expect("the daemon answered").unwrap_err();
    assert_refused(&err, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
}

/// A token endpoint answering a refresh with an absurd lifetime (and a rotated refresh token):
/// the broker stays up (before, the expiry arithmetic panicked the handler before the rotated
/// refresh token was saved), stores the token with a lifetime capped at a year, and serves the
/// stored token afterwards without asking again.
#[tokio::test]
async fn a_huge_expires_in_is_capped_not_a_panic() {
    use std::sync::{Arc, Mutex};
    let _serial = SERIAL.lock().await;
    let fake_ca = credbroker_devpki::CertAuthority::generate("fake token CA").unwrap();
    let relay = Relay::to_provider().await;
    let token_url = relay.token_url();
    let cas = format!("{}\n{}", peers().ca_pem, fake_ca.cert_pem);
    let config = [("token_url", token_url.as_str()), ("ca_pem", cas.as_str())];
    let (daemon, mut admin, mut agent) = with_connector(Daemon::start(), CONNECTOR, &config).await;
    connect(&daemon, &mut admin, CONNECTOR, "u1", "").await;
    // The fake token endpoint records the refresh tokens it is sent.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let seen = seen.clone();
        axum::Router::new().route(
            "/token",
            axum::routing::post(move |body: String| async move {
                let form = reqwest::Url::parse(&format!("https://x/?{body}")).unwrap();
                let sent = form.query_pairs().find(|(k, _)| k == "refresh_token");
                seen.lock()
                    .unwrap()
                    .push(sent.map(|(_, v)| v.into_owned()).unwrap_or_default());
                axum::Json(serde_json::json!({
                    "access_token": "huge-lifetime-token", "token_type": "Bearer",
                    "expires_in": 9_000_000_000_000u64, "refresh_token": "rotated-refresh-token"
                }))
            }),
        )
    };
    relay.set(Route::To(serve_https(&fake_ca, app).await));
    let_tokens_expire().await;
    let before = std::time::SystemTime::now();
    let token = resolve(&mut agent, "u1").await.unwrap();
    assert_eq!(token.secret, "huge-lifetime-token");
    let expires = token.expires_at.unwrap().seconds;
    let now = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let year = 365 * 86_400;
    assert!(
        (now + year - 120..=now + year + 120).contains(&expires),
        "expires_at {expires}, now {now}"
    );
    // Stored: the next resolves are served from the store, and the broker still answers.
    for _ in 0..3 {
        assert_eq!(
            resolve(&mut agent, "u1").await.unwrap().secret,
            "huge-lifetime-token"
        );
    }
    // One refresh, sent the refresh token the real provider issued at connect.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(!seen[0].is_empty());
    let shown = connection(&mut admin, "u1").await;
    assert_eq!(shown.status, proto::ConnectionStatus::Connected as i32);
    let (status, _) = daemon.http_get("/healthz").await;
    assert_eq!(status, 200);
}
