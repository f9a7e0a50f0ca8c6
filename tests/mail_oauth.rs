//! Mail over XOAUTH2 against real servers: an imap_smtp connector whose `oauth_connector` is an
//! OAuth connection at the test authorization server; dovecot (IMAP, and SASL for postfix)
//! checks the access token by introspection at that server (DESIGN.md §4). Nothing here has a
//! password: ConnectWithCredentials tests IMAP and SMTP with the user's current access token.

mod support;

use std::collections::HashMap;

use credbroker::api::proto;
use support::daemon::{Daemon, conn};
use support::mail::{Servers, create_mail_connector, mail_config, token, wait_for};
use support::oauth::{connect, create_connector};

#[tokio::test]
async fn mail_signs_in_with_xoauth2_using_the_users_oauth_connection() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    create_connector(
        &mut admin,
        "Mail OAuth",
        &[("scopes", "openid email mail.read mail.send")],
    )
    .await;
    let mut config = mail_config(&Servers::implicit_imap_starttls_smtp());
    config.insert("oauth_connector".into(), "Mail OAuth".into());
    create_mail_connector(&mut admin, "Mail", proto::ConnectorMode::Personal, config).await;

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
    connect(&daemon, &mut admin, "Mail OAuth", "alice", "alice").await;

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

    let subject = format!("xoauth2 {}", token());
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
    let message = wait_for(&mut agent, conn("Mail", "alice"), &subject, false).await;
    assert_eq!(message.message_id, sent.message_id);
    assert_eq!(message.text_body.trim_end(), "signed in with a token");
    // Nothing about the token reaches the agent or the logs as a password would.
    assert!(!daemon.logs().contains("auth=Bearer"));
}
