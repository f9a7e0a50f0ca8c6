//! Mail over XOAUTH2 against real servers: an imap_smtp connector whose `oauth_connector` is an
//! OAuth connection at the test authorization server; dovecot (IMAP, and SASL for postfix)
//! checks the access token by introspection at that server (DESIGN.md §4). Nothing here has a
//! password: ConnectWithCredentials tests IMAP and SMTP with the user's current access token.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient};
use support::daemon::Daemon;
use support::peers::{IMAPS_PORT, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, SUBMISSION_PORT, peers};
use tonic::transport::Channel;

const RETURN_URL: &str = "https://console.example/settings/integrations";
const DELIVERY: Duration = Duration::from_secs(60);

fn conn(connector: &str, user: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: String::new(),
        connector: connector.into(),
        user_id: user.into(),
    })
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

async fn create(
    admin: &mut AdminClient<Channel>,
    name: &str,
    kind: proto::ConnectorKind,
    config: &[(&str, String)],
    secrets: &[(&str, &str)],
) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            name: name.into(),
            kind: kind as i32,
            mode: proto::ConnectorMode::Personal as i32,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            secrets: secrets
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        proto::SecretValue {
                            value: v.to_string(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn mail_signs_in_with_xoauth2_using_the_users_oauth_connection() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let issuer = peers().oauth_issuer();
    create(
        &mut admin,
        "Mail OAuth",
        proto::ConnectorKind::Oauth2,
        &[
            ("client_id", OAUTH_CLIENT_ID.to_string()),
            ("auth_url", format!("{issuer}/auth")),
            ("token_url", format!("{issuer}/token")),
            ("revocation_url", format!("{issuer}/token/revocation")),
            ("userinfo_url", format!("{issuer}/me")),
            ("account_label_field", "email".into()),
            ("scopes", "openid email mail.read mail.send".into()),
            ("ca_pem", peers().ca_pem.clone()),
        ],
        &[("client_secret", OAUTH_CLIENT_SECRET)],
    )
    .await;
    create(
        &mut admin,
        "Mail",
        proto::ConnectorKind::ImapSmtp,
        &[
            ("imap_host", "127.0.0.1".into()),
            ("imap_port", IMAPS_PORT.to_string()),
            ("smtp_host", "127.0.0.1".into()),
            ("smtp_port", SUBMISSION_PORT.to_string()),
            ("smtp_tls", "starttls".into()),
            ("ca_pem", peers().ca_pem.clone()),
            ("oauth_connector", "Mail OAuth".into()),
        ],
        &[],
    )
    .await;

    let settings = HashMap::from([("email".to_string(), "alice@x.test".to_string())]);
    // Before alice has connected her OAuth account there is no token to sign in with.
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Mail", "alice"),
            settings: settings.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!resp.saved);
    let test = resp.test.unwrap();
    assert_eq!(test.checks.len(), 1, "{test:?}");
    assert!(
        test.checks[0].message.contains("no access token"),
        "{test:?}"
    );

    // Alice connects her OAuth account through the browser flow.
    let started = admin
        .begin_connect(proto::BeginConnectRequest {
            connection: conn("Mail OAuth", "alice"),
            return_url: RETURN_URL.into(),
            login_hint: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let callback_url = format!("https://{}/oauth/callback", daemon.http.unwrap());
    let mut browser = Browser::new(&daemon);
    let callback = browser
        .consent(&started.authorization_url, &callback_url)
        .await;
    let response = browser.get(&callback).await;
    assert_eq!(response.status().as_u16(), 303);

    // Now the mail connection tests IMAP and SMTP with XOAUTH2, and is saved.
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn("Mail", "alice"),
            settings,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let test = resp.test.unwrap();
    assert!(test.ok, "{test:?}");
    assert!(resp.saved);

    let subject = format!("xoauth2 {:016x}", rand::random::<u64>());
    let sent = agent
        .send_email(proto::SendEmailRequest {
            connection: conn("Mail", "alice"),
            to: vec!["alice@x.test".into()],
            subject: subject.clone(),
            text_body: "signed in with a token".into(),
            ..Default::default()
        })
        .await
        .expect("SendEmail over XOAUTH2")
        .into_inner();
    let deadline = tokio::time::Instant::now() + DELIVERY;
    let message = loop {
        let fetched = agent
            .fetch_mail(proto::FetchMailRequest {
                connection: conn("Mail", "alice"),
                limit: 50,
                ..Default::default()
            })
            .await
            .expect("FetchMail over XOAUTH2")
            .into_inner();
        if let Some(m) = fetched.messages.into_iter().find(|m| m.subject == subject) {
            break m;
        }
        assert!(tokio::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(message.message_id, sent.message_id);
    assert_eq!(message.text_body.trim_end(), "signed in with a token");
    // Nothing about the token reaches the agent or the logs as a password would.
    assert!(!daemon.logs().contains("auth=Bearer"));
}
