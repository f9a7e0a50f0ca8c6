//! Mail against the peers (dovecot and postfix, [`super::peers`]): imap_smtp connectors pointed
//! at them, connections made with an account's password, and messages read back. The mailboxes
//! are shared between tests (and test runs), so a test marks its messages with [`token`] and
//! looks only for its own subjects.

#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use tonic::transport::Channel;

use super::daemon::{conn, new_connector, secrets};
use super::peers::peers;
use super::wait;

/// The longest a test waits for a message: postfix delivering it into dovecot, and a watch
/// stream reconnecting after the IMAP server restarted.
pub const DELIVERY: Duration = Duration::from_secs(90);

/// A random mark for subjects.
pub fn token() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Where and how a connector reaches IMAP and SMTP.
pub struct Servers {
    pub imap_port: u16,
    pub imap_tls: &'static str,
    pub smtp_port: u16,
    pub smtp_tls: &'static str,
}

impl Servers {
    /// IMAP over implicit TLS (993-style), SMTP submission with STARTTLS (587-style).
    pub fn implicit_imap_starttls_smtp() -> Servers {
        let ports = peers().ports();
        Servers {
            imap_port: ports.imaps,
            imap_tls: "implicit",
            smtp_port: ports.submission,
            smtp_tls: "starttls",
        }
    }

    /// IMAP with STARTTLS (143-style), SMTP over implicit TLS (465-style).
    pub fn starttls_imap_implicit_smtp() -> Servers {
        let ports = peers().ports();
        Servers {
            imap_port: ports.imap,
            imap_tls: "starttls",
            smtp_port: ports.smtps,
            smtp_tls: "implicit",
        }
    }
}

/// The settings of an imap_smtp connector pointing at `s` on loopback, trusting the peers' CA.
pub fn mail_config(s: &Servers) -> HashMap<String, String> {
    HashMap::from([
        ("imap_host".to_string(), "127.0.0.1".to_string()),
        ("imap_port".to_string(), s.imap_port.to_string()),
        ("imap_tls".to_string(), s.imap_tls.to_string()),
        ("smtp_host".to_string(), "localhost".to_string()),
        ("smtp_port".to_string(), s.smtp_port.to_string()),
        ("smtp_tls".to_string(), s.smtp_tls.to_string()),
        ("ca_pem".to_string(), peers().ca_pem.clone()),
    ])
}

/// Creates an imap_smtp connector with these settings; it must succeed.
pub async fn create_mail_connector(
    admin: &mut AdminClient<Channel>,
    name: &str,
    mode: proto::ConnectorMode,
    config: HashMap<String, String>,
) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            config,
            ..new_connector(name, proto::ConnectorKind::ImapSmtp, mode)
        })
        .await
        .expect("create the mail connector");
}

/// A shared imap_smtp connector pointing at the peers, trusting their CA.
pub async fn mail_connector(admin: &mut AdminClient<Channel>, name: &str, s: &Servers) {
    create_mail_connector(admin, name, proto::ConnectorMode::Shared, mail_config(s)).await;
}

/// ConnectWithCredentials of a shared connector with an account's address and password, and
/// `extra` settings.
pub fn credentials(
    connector: &str,
    email: &str,
    password: &str,
    extra: &[(&str, &str)],
    save_on_failure: bool,
) -> proto::ConnectWithCredentialsRequest {
    let mut settings = HashMap::from([("email".to_string(), email.to_string())]);
    for (k, v) in extra {
        settings.insert(k.to_string(), v.to_string());
    }
    proto::ConnectWithCredentialsRequest {
        connection: conn(connector, ""),
        settings,
        secrets: secrets(&[("password", password)]),
        save_on_failure,
    }
}

/// Creates a connector and connects it with the given account; the test must pass.
pub async fn connected(
    admin: &mut AdminClient<Channel>,
    name: &str,
    s: &Servers,
    email: &str,
    password: &str,
    extra: &[(&str, &str)],
) {
    mail_connector(admin, name, s).await;
    let resp = admin
        .connect_with_credentials(credentials(name, email, password, extra, false))
        .await
        .expect("ConnectWithCredentials")
        .into_inner();
    let test = resp.test.expect("a test result");
    assert!(test.ok, "the credentials test failed: {:?}", test.checks);
    assert!(resp.saved);
    assert_eq!(
        test.checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["imap", "smtp"]
    );
    assert_eq!(test.account_label, email);
}

/// Bob's account (bob@x.test) connected as the shared connector `name` at `s` ([`connected`]).
pub async fn connected_bob(admin: &mut AdminClient<Channel>, name: &str, s: &Servers) {
    connected(admin, name, s, "bob@x.test", "secret2", &[]).await;
}

/// Alice's account (alice@x.test) connected as the shared connector `name` at `s`
/// ([`connected`]).
pub async fn connected_alice(admin: &mut AdminClient<Channel>, name: &str, s: &Servers) {
    connected(admin, name, s, "alice@x.test", "secret1", &[]).await;
}

/// Creates a shared connector `name` at the peers (implicit-TLS IMAP, STARTTLS SMTP) and saves
/// `password` for alice@x.test whatever the servers answer (`save_on_failure`).
pub async fn saved_anyway(
    admin: &mut AdminClient<Channel>,
    name: &str,
    password: &str,
) -> proto::ConnectWithCredentialsResponse {
    mail_connector(admin, name, &Servers::implicit_imap_starttls_smtp()).await;
    admin
        .connect_with_credentials(credentials(name, "alice@x.test", password, &[], true))
        .await
        .expect("ConnectWithCredentials saving anyway")
        .into_inner()
}

/// A plain-text message from `connection` to one recipient.
pub fn plain(
    connection: Option<proto::ConnectionRef>,
    to: &str,
    subject: &str,
    text: &str,
) -> proto::SendEmailRequest {
    proto::SendEmailRequest {
        connection,
        to: vec![to.into()],
        subject: subject.into(),
        text_body: text.into(),
        ..Default::default()
    }
}

/// FetchMail of `connection` (at most 100 messages), changed by `change`.
pub async fn fetch(
    broker: &mut BrokerClient<Channel>,
    connection: Option<proto::ConnectionRef>,
    change: impl FnOnce(&mut proto::FetchMailRequest),
) -> Result<proto::FetchMailResponse, tonic::Status> {
    let mut req = proto::FetchMailRequest {
        connection,
        limit: 100,
        ..Default::default()
    };
    change(&mut req);
    broker.fetch_mail(req).await.map(|r| r.into_inner())
}

/// Waits until a message with `subject` is in the connection's INBOX.
pub async fn wait_for(
    broker: &mut BrokerClient<Channel>,
    connection: Option<proto::ConnectionRef>,
    subject: &str,
    include_html: bool,
) -> proto::MailMessage {
    wait::until(DELIVERY, async || {
        let resp = fetch(broker, connection.clone(), |r| {
            r.include_html = include_html
        })
        .await
        .expect("FetchMail");
        resp.messages.into_iter().find(|m| m.subject == subject)
    })
    .await
    .unwrap_or_else(|| panic!("{subject:?} was not delivered within {DELIVERY:?}"))
}

/// Reads the stream until a message with `subject` arrives (other tests share the mailbox).
pub async fn next_with_subject(
    stream: &mut tonic::Streaming<proto::MailEvent>,
    subject: &str,
) -> proto::MailEvent {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{subject:?} was not streamed within {DELIVERY:?}"))
            .expect("the stream failed")
            .expect("the stream ended");
        if event.message.as_ref().is_some_and(|m| m.subject == subject) {
            return event;
        }
    }
}
