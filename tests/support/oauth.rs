//! An OAuth connection made the way a person makes one: a connector pointed at the test
//! authorization server, and a browser that follows the provider's redirects to the daemon's
//! callback.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use tonic::transport::Channel;

use super::daemon::{Daemon, conn, new_connector, secrets};
use super::peers::{OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, peers};

pub const RETURN_URL: &str = "https://console.example/settings/integrations";

/// A personal OAuth connector pointed at the test server; its identity endpoint is `/me`. `extra`
/// adds or replaces settings (a client_credentials `grant_type` makes it shared).
pub async fn create_connector(
    admin: &mut AdminClient<Channel>,
    name: &str,
    extra: &[(&str, &str)],
) {
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
            config,
            secrets: secrets(&[("client_secret", OAUTH_CLIENT_SECRET)]),
            ..new_connector(name, proto::ConnectorKind::Oauth2, mode)
        })
        .await
        .unwrap();
}

/// A browser: follows redirects by hand, keeps a cookie jar (by name; like a browser's, it sends
/// a host's cookies to each of its ports, so the provider and the daemon on 127.0.0.1 share it),
/// trusts the provider's and the daemon's CAs. Two `Browser`s share nothing.
pub struct Browser {
    http: reqwest::Client,
    cookies: HashMap<String, String>,
}

impl Browser {
    pub fn new(daemon: &Daemon) -> Self {
        let cas = format!("{}\n{}", peers().ca_pem, daemon.ca.cert_pem);
        let http = credbroker::tls::http_client(Some(&cas), Duration::from_secs(10)).unwrap();
        Self {
            http,
            cookies: HashMap::new(),
        }
    }

    pub async fn get(&mut self, url: &str) -> reqwest::Response {
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

    /// Opens BeginConnect's link (the daemon's start link, which binds this browser with a
    /// cookie); returns the provider's authorization URL it sends the browser to.
    pub async fn open(&mut self, authorization_url: &str) -> String {
        let response = self.get(authorization_url).await;
        let status = response.status().as_u16();
        let location = response
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_string());
        let Some(location) = location.filter(|_| status == 303) else {
            panic!(
                "the start link answered {status}: {}",
                response.text().await.unwrap()
            );
        };
        location
    }

    /// Follows the provider's redirects until the browser is sent to `stop_at`; returns that URL.
    pub async fn consent(&mut self, authorization_url: &str, stop_at: &str) -> String {
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

/// The value of query parameter `name` in `url` (the test fails if it is absent).
pub fn query_param(url: &str, name: &str) -> String {
    reqwest::Url::parse(url)
        .expect("a URL")
        .query_pairs()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in the URL"))
        .1
        .into_owned()
}

pub fn callback_url(daemon: &Daemon) -> String {
    format!(
        "https://{}/oauth/callback",
        daemon.http.expect("http listener")
    )
}

/// BeginConnect for `user`; the test server signs in the account `login_hint` names (alice
/// when it is empty).
pub async fn begin(
    admin: &mut AdminClient<Channel>,
    connector: &str,
    user: &str,
    login_hint: &str,
) -> proto::BeginConnectResponse {
    admin
        .begin_connect(proto::BeginConnectRequest {
            connection: conn(connector, user),
            return_url: RETURN_URL.into(),
            login_hint: login_hint.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// Connects `user` through the browser flow and the daemon's callback, signed in as the account
/// `login_hint` names (see [`begin`]); returns where the browser ended up.
pub async fn connect(
    daemon: &Daemon,
    admin: &mut AdminClient<Channel>,
    connector: &str,
    user: &str,
    login_hint: &str,
) -> reqwest::Url {
    let started = begin(admin, connector, user, login_hint).await;
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

/// `daemon` and its clients ([`Daemon::with_clients`]) with an OAuth connector `connector` at the
/// test server ([`create_connector`], `extra` settings).
pub async fn with_connector(
    daemon: Daemon,
    connector: &str,
    extra: &[(&str, &str)],
) -> (Daemon, AdminClient<Channel>, BrokerClient<Channel>) {
    let (daemon, mut admin, agent) = daemon.with_clients().await;
    create_connector(&mut admin, connector, extra).await;
    (daemon, admin, agent)
}

/// As [`with_connector`], with `user` connected through the browser flow as alice ([`connect`]).
pub async fn with_connection(
    daemon: Daemon,
    connector: &str,
    user: &str,
) -> (Daemon, AdminClient<Channel>, BrokerClient<Channel>) {
    let (daemon, mut admin, agent) = with_connector(daemon, connector, &[]).await;
    connect(&daemon, &mut admin, connector, user, "").await;
    (daemon, admin, agent)
}
