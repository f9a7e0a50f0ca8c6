//! WatchMail across an IMAP server restart. A binary of its own because it stops the dovecot
//! every other mail test shares.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto;
use support::daemon::Daemon;
use support::peers::{IMAPS_PORT, SUBMISSION_PORT, peers};

const DELIVERY: Duration = Duration::from_secs(90);

fn conn(connector: &str) -> Option<proto::ConnectionRef> {
    Some(proto::ConnectionRef {
        workspace: String::new(),
        connector: connector.into(),
        user_id: String::new(),
    })
}

async fn next_with_subject(
    stream: &mut tonic::Streaming<proto::MailEvent>,
    subject: &str,
) -> proto::MailMessage {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        let event = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("{subject:?} was not streamed within {DELIVERY:?}"))
            .expect("the stream failed")
            .expect("the stream ended");
        if let Some(m) = event.message.filter(|m| m.subject == subject) {
            return m;
        }
    }
}

/// PIDs of the IMAP processes serving `user`, as the running dovecot lists them.
fn imap_sessions(user: &str) -> Vec<i32> {
    let out = std::process::Command::new("doveadm")
        .arg("-c")
        .arg(peers().dir().join("dovecot/dovecot.conf"))
        .args(["who", "-1", user])
        .output()
        .expect("run doveadm who");
    assert!(out.status.success(), "doveadm who failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 3 && cols[0] == user && cols[1] == "imap")
                .then(|| cols[2].parse().ok())
                .flatten()
        })
        .collect()
}

#[tokio::test]
async fn watch_mail_resumes_after_the_imap_server_restarts() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    for (name, email, password) in [
        ("Bob", "bob@x.test", "secret2"),
        ("Alice", "alice@x.test", "secret1"),
    ] {
        admin
            .create_connector(proto::CreateConnectorRequest {
                name: name.into(),
                kind: proto::ConnectorKind::ImapSmtp as i32,
                mode: proto::ConnectorMode::Shared as i32,
                config: HashMap::from([
                    ("imap_host".to_string(), "127.0.0.1".to_string()),
                    ("imap_port".to_string(), IMAPS_PORT.to_string()),
                    ("smtp_host".to_string(), "127.0.0.1".to_string()),
                    ("smtp_port".to_string(), SUBMISSION_PORT.to_string()),
                    ("smtp_tls".to_string(), "starttls".to_string()),
                    ("ca_pem".to_string(), peers().ca_pem.clone()),
                ]),
                ..Default::default()
            })
            .await
            .unwrap();
        let resp = admin
            .connect_with_credentials(proto::ConnectWithCredentialsRequest {
                connection: conn(name),
                settings: HashMap::from([("email".to_string(), email.to_string())]),
                secrets: HashMap::from([(
                    "password".to_string(),
                    proto::SecretValue {
                        value: password.into(),
                    },
                )]),
                save_on_failure: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(resp.saved, "{:?}", resp.test);
    }
    let mut stream = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob"),
            ..Default::default()
        })
        .await
        .expect("WatchMail")
        .into_inner();
    let send = |subject: String| {
        let mut agent = agent.clone();
        async move {
            agent
                .send_email(proto::SendEmailRequest {
                    connection: conn("Alice"),
                    to: vec!["bob@x.test".into()],
                    subject,
                    text_body: "ping".into(),
                    ..Default::default()
                })
                .await
                .expect("SendEmail")
        }
    };
    let token = format!("{:016x}", rand::random::<u64>());
    let before = format!("before restart {token}");
    send(before.clone()).await;
    let first = next_with_subject(&mut stream, &before).await;

    // Dovecot 2.3 keeps established IMAP sessions running across a restart of its master
    // process; a real restart (or crash, or failover) drops them. So the stopped server's
    // sessions of bob, the stream's among them, are ended while it is down.
    let sessions = imap_sessions("bob@x.test");
    assert!(!sessions.is_empty(), "the stream has no IMAP session");
    peers().stop_dovecot();
    for pid in sessions {
        // SAFETY: kill(2) with a PID doveadm just listed and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    peers().start_dovecot();

    let after = format!("after restart {token}");
    send(after.clone()).await;
    let second = next_with_subject(&mut stream, &after).await;
    assert!(second.uid > first.uid);
    let logs = daemon.logs();
    assert!(
        logs.contains("WatchMail lost the IMAP connection")
            && logs.contains("WatchMail reconnected"),
        "the stream was not re-established: {}",
        logs.lines()
            .filter(|l| l.contains("WatchMail") || l.contains("mail"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
