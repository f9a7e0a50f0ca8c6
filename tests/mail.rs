//! Mail against real servers (DESIGN.md §4): postfix submission (STARTTLS and implicit TLS,
//! SASL through dovecot) delivering into dovecot, read back over IMAP (implicit TLS and
//! STARTTLS), through the real daemon over mTLS. The mailboxes are shared between tests (and
//! test runs), so every test marks its messages with a random subject.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient, broker_client::BrokerClient};
use support::daemon::{
    Daemon, assert_refused, audit_records, conn, get_connection, reason, secrets,
};
use support::mail::{
    DELIVERY, Servers, connected, connected_alice, connected_bob, create_mail_connector,
    credentials, fetch, mail_config, mail_connector, next_with_subject, plain, saved_anyway, token,
    wait_for,
};
use support::peers::peers;
use support::wait;
use tonic::Code;
use tonic::transport::Channel;

fn field(status: &tonic::Status) -> String {
    reason(status).1.get("field").cloned().unwrap_or_default()
}

/// Alice (with an alias) and Bob, each connected over implicit-TLS IMAP and STARTTLS SMTP.
async fn alice_and_bob(admin: &mut AdminClient<Channel>) {
    let servers = Servers::implicit_imap_starttls_smtp();
    let alias = [("aliases", "alice.support@x.test")];
    connected(admin, "Alice", &servers, "alice@x.test", "secret1", &alias).await;
    connected(admin, "Bob", &servers, "bob@x.test", "secret2", &[]).await;
}

/// A message from Alice's alias to Bob, copied to Alice, with a reply-to, text and HTML bodies,
/// two attachments (the second `pdf`) and threading headers.
fn from_the_alias_to_bob(subject: &str, pdf: &[u8]) -> proto::SendEmailRequest {
    proto::SendEmailRequest {
        connection: conn("Alice", ""),
        from: "Alice Support <alice.support@x.test>".into(),
        to: vec!["Bob <bob@x.test>".into()],
        cc: vec!["alice@x.test".into()],
        reply_to: "help@x.test".into(),
        subject: subject.into(),
        text_body: "Bonjour Bob,\nvoici les notes.".into(),
        html_body: "<p>Bonjour <b>Bob</b>, voici les notes.</p>".into(),
        attachments: vec![
            proto::Attachment {
                filename: "notes.txt".into(),
                content_type: "text/plain".into(),
                content: b"line one\nline two\n".to_vec(),
            },
            proto::Attachment {
                filename: "rapport.pdf".into(),
                content_type: "application/pdf".into(),
                content: pdf.to_vec(),
            },
        ],
        in_reply_to: "<thread-parent@x.test>".into(),
        references: vec!["<thread-root@x.test>".into()],
        ..Default::default()
    }
}

/// FetchMail's since_uid, since, unseen_only and mark_seen on Bob's message `uid` (unread).
async fn assert_fetch_filters(agent: &mut BrokerClient<Channel>, uid: u32) {
    let after = fetch(agent, conn("Bob", ""), |r| r.since_uid = uid - 1)
        .await
        .unwrap();
    assert_eq!(after.messages.first().map(|x| x.uid), Some(uid));
    assert!(after.highest_uid >= uid && after.uid_validity > 0);
    let future = fetch(agent, conn("Bob", ""), |r| {
        r.since_uid = uid - 1;
        r.since = Some(prost_types::Timestamp {
            seconds: chrono::Utc::now().timestamp() + 3600,
            nanos: 0,
        });
    })
    .await
    .unwrap();
    assert!(future.messages.is_empty(), "{:?}", future.messages);
    let unseen = fetch(agent, conn("Bob", ""), |r| {
        r.since_uid = uid - 1;
        r.unseen_only = true;
    })
    .await
    .unwrap();
    assert!(unseen.messages.iter().any(|x| x.uid == uid));
    fetch(agent, conn("Bob", ""), |r| {
        r.since_uid = uid - 1;
        r.limit = 1;
        r.mark_seen = true;
    })
    .await
    .unwrap();
    let unseen = fetch(agent, conn("Bob", ""), |r| {
        r.since_uid = uid - 1;
        r.unseen_only = true;
    })
    .await
    .unwrap();
    assert!(!unseen.messages.iter().any(|x| x.uid == uid));
    let seen = fetch(agent, conn("Bob", ""), |r| r.since_uid = uid - 1)
        .await
        .unwrap();
    assert!(seen.messages[0].flags.iter().any(|f| f == "\\Seen"));
}

#[tokio::test]
async fn a_sent_message_is_read_back_with_its_subject_body_attachments_and_threading() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    // Alice sends over STARTTLS (587-style); Bob reads over implicit TLS (993-style).
    alice_and_bob(&mut admin).await;

    let subject = format!("Réunion de suivi {}", token());
    let pdf = vec![0x25u8; 3000];
    let sent = agent
        .send_email(from_the_alias_to_bob(&subject, &pdf))
        .await
        .expect("SendEmail")
        .into_inner();
    assert!(
        sent.message_id.starts_with('<') && sent.message_id.ends_with("@x.test>"),
        "{}",
        sent.message_id
    );
    assert_eq!(sent.accepted, ["bob@x.test", "alice@x.test"]);

    let m = wait_for(&mut agent, conn("Bob", ""), &subject, true).await;
    assert_eq!(m.message_id, sent.message_id);
    assert_eq!(m.from, "Alice Support <alice.support@x.test>");
    assert_eq!(m.to, ["Bob <bob@x.test>"]);
    assert_eq!(m.cc, ["alice@x.test"]);
    assert_eq!(m.reply_to, "help@x.test");
    assert_eq!(m.text_body.trim_end(), "Bonjour Bob,\nvoici les notes.");
    assert_eq!(
        m.html_body.trim_end(),
        "<p>Bonjour <b>Bob</b>, voici les notes.</p>"
    );
    assert_eq!(m.in_reply_to, "<thread-parent@x.test>");
    assert_eq!(
        m.references,
        ["<thread-root@x.test>", "<thread-parent@x.test>"]
    );
    let attachments: Vec<(&str, &str, u64)> = m
        .attachments
        .iter()
        .map(|a| (a.filename.as_str(), a.content_type.as_str(), a.size))
        .collect();
    assert_eq!(
        attachments,
        [
            ("notes.txt", "text/plain", 18),
            ("rapport.pdf", "application/pdf", pdf.len() as u64)
        ]
    );
    assert!(m.date.is_some());
    // Reading did not mark it as read.
    assert!(!m.flags.iter().any(|f| f == "\\Seen"), "{:?}", m.flags);

    assert_fetch_filters(&mut agent, m.uid).await;

    // A reply threads on the message's own Message-ID.
    let reply_subject = format!("Re: {subject}");
    agent
        .send_email(proto::SendEmailRequest {
            in_reply_to: m.message_id.clone(),
            references: m.references.clone(),
            // The alias it came from has no mailbox on the test server: answer the account.
            ..plain(conn("Bob", ""), "alice@x.test", &reply_subject, "Merci !")
        })
        .await
        .expect("reply");
    let reply = wait_for(&mut agent, conn("Alice", ""), &reply_subject, false).await;
    assert_eq!(reply.in_reply_to, sent.message_id);
    assert_eq!(
        reply.references,
        [
            "<thread-root@x.test>",
            "<thread-parent@x.test>",
            sent.message_id.as_str()
        ]
    );
    assert!(reply.html_body.is_empty());
}

#[tokio::test]
async fn implicit_tls_smtp_and_starttls_imap_work_too() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    connected_bob(
        &mut admin,
        "Bob 465",
        &Servers::starttls_imap_implicit_smtp(),
    )
    .await;
    let subject = format!("implicit TLS {}", token());
    let sent = agent
        .send_email(plain(
            conn("Bob 465", ""),
            "bob@x.test",
            &subject,
            "to myself",
        ))
        .await
        .expect("SendEmail over implicit TLS")
        .into_inner();
    let m = wait_for(&mut agent, conn("Bob 465", ""), &subject, false).await;
    assert_eq!(m.message_id, sent.message_id);
    let connection = get_connection(&mut admin, conn("Bob 465", "")).await;
    assert_eq!(connection.status, proto::ConnectionStatus::Connected as i32);
    assert_eq!(connection.account_label, "bob@x.test");
    assert!(
        connection.last_used_at.is_some(),
        "last_used_at not recorded"
    );
    assert_eq!(m.text_body.trim_end(), "to myself");
    // The pooled SMTP connection is reused for a second message.
    let again = format!("implicit TLS again {}", token());
    agent
        .send_email(plain(
            conn("Bob 465", ""),
            "bob@x.test",
            &again,
            "once more",
        ))
        .await
        .expect("second SendEmail");
    wait_for(&mut agent, conn("Bob 465", ""), &again, false).await;
}

#[tokio::test]
async fn a_wrong_password_fails_the_test_with_an_auth_reason_and_nothing_is_saved() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    mail_connector(&mut admin, "Alice", &Servers::implicit_imap_starttls_smtp()).await;
    let canary = format!("canary-{}", token());
    let resp = admin
        .connect_with_credentials(credentials("Alice", "alice@x.test", &canary, &[], false))
        .await
        .expect("ConnectWithCredentials answers with a report")
        .into_inner();
    assert!(!resp.saved);
    let test = resp.test.clone().unwrap();
    assert!(!test.ok);
    for check in &test.checks {
        assert!(!check.ok, "{check:?}");
        assert_eq!(check.stage, "auth", "{check:?}");
        assert!(check.message.contains("refused"), "{check:?}");
    }
    assert_eq!(test.checks.len(), 2);
    let connection = get_connection(&mut admin, conn("Alice", "")).await;
    assert_eq!(
        connection.status,
        proto::ConnectionStatus::NotConnected as i32
    );
    let mut agent = daemon.agent().await;
    let err = agent
        .send_email(plain(conn("Alice", ""), "bob@x.test", "never", ""))
        .await
        .unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "NOT_CONNECTED");

    // TestConnection with candidate credentials says the same, and saves nothing either.
    let tested = admin
        .test_connection(proto::TestConnectionRequest {
            connection: conn("Alice", ""),
            settings: HashMap::from([("email".to_string(), "alice@x.test".to_string())]),
            secrets: secrets(&[("password", &canary)]),
        })
        .await
        .unwrap()
        .into_inner()
        .test
        .unwrap();
    assert!(!tested.ok && tested.checks.iter().all(|c| c.stage == "auth"));
    assert!(!format!("{resp:?}{tested:?}").contains(&canary));
}

#[tokio::test]
async fn a_refused_stored_password_expires_the_connection_and_never_leaks() {
    let (daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    let canary = format!("canary-{}", token());
    // Saved anyway (ERROR), as a console may do; the servers still refuse it.
    let resp = saved_anyway(&mut admin, "Alice", &canary).await;
    assert!(resp.saved);
    assert_eq!(
        resp.connection.as_ref().unwrap().status,
        proto::ConnectionStatus::Error as i32
    );
    let mut responses = format!("{resp:?}");

    let never = format!("never sent {}", token());
    let err = agent
        .send_email(plain(conn("Alice", ""), "bob@x.test", &never, "x"))
        .await
        .unwrap_err();
    assert_refused(&err, Code::FailedPrecondition, "EXPIRED");
    responses += &format!("{err:?}");
    let connection = get_connection(&mut admin, conn("Alice", "")).await;
    assert_eq!(connection.status, proto::ConnectionStatus::Expired as i32);
    assert!(connection.last_error.contains("refused"), "{connection:?}");
    responses += &format!("{connection:?}");
    // Now every mail call says EXPIRED without trying the server again.
    for err in [
        fetch(&mut agent, conn("Alice", ""), |_| {})
            .await
            .unwrap_err(),
        agent
            .watch_mail(proto::WatchMailRequest {
                connection: conn("Alice", ""),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(reason(&err).0, "EXPIRED", "{err:?}");
        responses += &format!("{err:?}");
    }

    // FetchMail on a second connection whose IMAP login is refused also expires it.
    saved_anyway(&mut admin, "Alice IMAP", &canary).await;
    let err = fetch(&mut agent, conn("Alice IMAP", ""), |_| {})
        .await
        .unwrap_err();
    assert_eq!(reason(&err).0, "EXPIRED", "{err:?}");
    assert!(err.message().contains("IMAP"), "{err:?}");
    responses += &format!("{err:?}");

    // So does TestConnection of a stored connection whose password the servers refuse.
    saved_anyway(&mut admin, "Alice test", &canary).await;
    let tested = admin
        .test_connection(proto::TestConnectionRequest {
            connection: conn("Alice test", ""),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(tested.test.as_ref().is_some_and(|t| !t.ok));
    responses += &format!("{tested:?}");
    let connection = get_connection(&mut admin, conn("Alice test", "")).await;
    assert_eq!(connection.status, proto::ConnectionStatus::Expired as i32);

    // The canary is nowhere: not in responses, the audit or the daemon's (debug) log.
    let audit = audit_records(&mut admin).await;
    assert!(audit.iter().any(|r| r.operation == "SendEmail"));
    assert!(!responses.contains(&canary));
    assert!(!format!("{audit:?}").contains(&canary));
    let logs = daemon.logs();
    assert!(logs.contains("SendEmail"), "the log is not the daemon's");
    assert!(!logs.contains(&canary), "the password leaked into the log");
}

/// A host that does not resolve is reported as DNS, and answered UNAVAILABLE.
async fn assert_an_unresolvable_host_is_dns(
    admin: &mut AdminClient<Channel>,
    agent: &mut BrokerClient<Channel>,
) {
    create_mail_connector(
        admin,
        "Nowhere",
        proto::ConnectorMode::Shared,
        HashMap::from([
            ("imap_host".to_string(), "imap.nowhere.invalid".to_string()),
            ("smtp_host".to_string(), "smtp.nowhere.invalid".to_string()),
        ]),
    )
    .await;
    let resp = admin
        .connect_with_credentials(credentials("Nowhere", "alice@x.test", "secret1", &[], true))
        .await
        .unwrap()
        .into_inner();
    let checks = resp.test.unwrap().checks;
    assert_eq!(checks.len(), 2);
    for c in &checks {
        assert_eq!(c.stage, "dns", "{c:?}");
        assert!(c.message.contains("nowhere.invalid"), "{c:?}");
    }
    let err = fetch(agent, conn("Nowhere", ""), |_| {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err).1.get("stage").map(String::as_str), Some("dns"));
}

#[tokio::test]
async fn an_unreachable_server_is_unavailable_within_the_deadline() {
    let daemon = Daemon::start_with_config("[limits]\nupstream_timeout_secs = 2\n");
    let (_daemon, mut admin, mut agent) = daemon.with_clients().await;
    // A closed port (connection refused) and a server that accepts but never answers.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    for (name, port, stage) in [
        ("Closed", closed, "tcp"),
        ("Silent", silent_port, "timeout"),
    ] {
        mail_connector(
            &mut admin,
            name,
            &Servers {
                imap_port: port,
                imap_tls: "implicit",
                smtp_port: port,
                smtp_tls: "starttls",
            },
        )
        .await;
        let resp = tokio::time::timeout(
            Duration::from_secs(30),
            admin.connect_with_credentials(credentials(name, "alice@x.test", "secret1", &[], true)),
        )
        .await
        .expect("the credentials test hung")
        .unwrap()
        .into_inner();
        let test = resp.test.unwrap();
        assert!(!test.ok);
        assert!(
            test.checks.iter().all(|c| c.stage == stage),
            "{name}: {:?}",
            test.checks
        );
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            agent.send_email(plain(conn(name, ""), "bob@x.test", "unreachable", "")),
        )
        .await
        .expect("SendEmail hung")
        .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert_eq!(reason(&err).0, "UPSTREAM_UNAVAILABLE");
        let err = tokio::time::timeout(
            Duration::from_secs(30),
            fetch(&mut agent, conn(name, ""), |_| {}),
        )
        .await
        .expect("FetchMail hung")
        .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert_eq!(reason(&err).1.get("stage").map(String::as_str), Some(stage));
    }
    drop(silent);

    assert_an_unresolvable_host_is_dns(&mut admin, &mut agent).await;
}

#[tokio::test]
async fn a_wrong_tls_mode_or_an_untrusted_certificate_is_reported_as_tls() {
    let daemon = Daemon::start();
    let mut admin = daemon.admin().await;
    // Implicit TLS against the STARTTLS ports.
    let ports = peers().ports();
    mail_connector(
        &mut admin,
        "Wrong mode",
        &Servers {
            imap_port: ports.imap,
            imap_tls: "implicit",
            smtp_port: ports.submission,
            smtp_tls: "implicit",
        },
    )
    .await;
    // The right modes, but without the servers' CA: their certificates are not trusted.
    let mut untrusted = mail_config(&Servers::implicit_imap_starttls_smtp());
    untrusted.remove("ca_pem");
    create_mail_connector(
        &mut admin,
        "Untrusted",
        proto::ConnectorMode::Shared,
        untrusted,
    )
    .await;
    for name in ["Wrong mode", "Untrusted"] {
        let resp = admin
            .connect_with_credentials(credentials(name, "alice@x.test", "secret1", &[], false))
            .await
            .unwrap()
            .into_inner();
        assert!(!resp.saved);
        let checks = resp.test.unwrap().checks;
        assert_eq!(checks.len(), 2);
        for c in &checks {
            assert!(!c.ok && c.stage == "tls", "{name}: {c:?}");
            assert!(c.message.contains("TLS"), "{name}: {c:?}");
        }
    }
}

/// A change that makes a SendEmail request invalid.
type Change = Box<dyn Fn(&mut proto::SendEmailRequest)>;

/// (change, the field the refusal names) of each invalid message.
fn bad_messages() -> Vec<(Change, &'static str)> {
    vec![
        (Box::new(|r| r.to = vec!["not an address".into()]), "to[0]"),
        (
            Box::new(|r| r.to.push("bob@x.test\r\nBcc: eve@evil.test".into())),
            "to[1]",
        ),
        (Box::new(|r| r.cc = vec!["@x.test".into()]), "cc[0]"),
        (Box::new(|r| r.bcc = vec!["eve@".into()]), "bcc[0]"),
        (
            Box::new(|r| r.subject.push_str("\r\nBcc: eve@evil.test")),
            "subject",
        ),
        (Box::new(|r| r.subject.push('\n')), "subject"),
        (
            Box::new(|r| r.reply_to = "x@x.test\nX: y".into()),
            "reply_to",
        ),
        (Box::new(|r| r.from = "mallory@x.test".into()), "from"),
        (Box::new(|r| r.from = "bob@x.test".into()), "from"),
        (Box::new(|r| r.to.clear()), "to"),
        (
            Box::new(|r| r.in_reply_to = "<a@b>\r\nBcc: eve@evil.test".into()),
            "in_reply_to",
        ),
        (
            Box::new(|r| r.references = vec!["not-a-message-id".into()]),
            "references[0]",
        ),
        (
            Box::new(|r| r.text_body = "x".repeat(3 * 1024 * 1024)),
            "text_body",
        ),
        (
            Box::new(|r| {
                r.attachments = vec![proto::Attachment {
                    filename: "big.bin".into(),
                    content_type: "application/octet-stream".into(),
                    content: vec![7; 11 * 1024 * 1024],
                }]
            }),
            "attachments[0].content",
        ),
        (
            Box::new(|r| {
                r.attachments = vec![proto::Attachment {
                    filename: "evil\r\n.txt".into(),
                    content_type: "text/plain".into(),
                    content: b"x".to_vec(),
                }]
            }),
            "attachments[0].filename",
        ),
        (
            Box::new(|r| r.connection.as_mut().unwrap().connector = String::new()),
            "connection.connector",
        ),
    ]
}

/// FetchMail refuses a limit over 200 and a mailbox that smuggles a command (naming the field),
/// and answers NOT_FOUND for a mailbox that does not exist.
async fn assert_bad_fetches_refused(agent: &mut BrokerClient<Channel>) {
    for (limit, ok) in [(0, true), (200, true), (201, false), (100_000, false)] {
        let result = fetch(agent, conn("Bob", ""), |r| {
            r.limit = limit;
            r.since_uid = u32::MAX - 1;
        })
        .await;
        match (ok, result) {
            (true, Ok(_)) => {}
            (false, Err(err)) => {
                assert_eq!(err.code(), Code::InvalidArgument);
                assert_eq!(field(&err), "limit");
            }
            (_, other) => panic!("limit {limit}: {other:?}"),
        }
    }
    let err = fetch(agent, conn("Bob", ""), |r| {
        r.mailbox = "INBOX\r\nA1 DELETE INBOX".into()
    })
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), field(&err)),
        (Code::InvalidArgument, "mailbox".into())
    );
    let err = fetch(agent, conn("Bob", ""), |r| {
        r.mailbox = format!("Nope{}", token())
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_nothing_is_sent() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    alice_and_bob(&mut admin).await;
    let mark = token();
    let base = |i: usize| {
        let subject = format!("bad {mark} {i}");
        plain(
            conn("Alice", ""),
            "bob@x.test",
            &subject,
            "should never arrive",
        )
    };
    let cases = bad_messages();
    for (i, (change, want)) in cases.iter().enumerate() {
        let mut req = base(i);
        change(&mut req);
        let err = agent.send_email(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "case {i}: {err:?}");
        assert_eq!(field(&err), *want, "case {i}: {err:?}");
    }
    assert_bad_fetches_refused(&mut agent).await;
    let err = admin
        .connect_with_credentials(credentials(
            "Bob",
            "bob@x.test",
            "secret2",
            &[("imap_port", "ninety-nine")],
            true,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field(&err)),
        (Code::InvalidArgument, "settings.imap_port".into())
    );

    // A valid message sent last arrives; none of the refused ones did.
    let good = format!("good {mark}");
    agent
        .send_email(plain(conn("Alice", ""), "bob@x.test", &good, "fine"))
        .await
        .expect("a valid message");
    let arrived = wait_for(&mut agent, conn("Bob", ""), &good, false).await;
    // Every message after the 100 before the good one (the refused ones were tried earlier):
    // a fetch returns the oldest `limit` matches, so the window must fit in one page.
    let since = fetch(&mut agent, conn("Bob", ""), |r| {
        r.since_uid = arrived.uid.saturating_sub(100);
        r.limit = 200;
    })
    .await
    .unwrap();
    let bad: Vec<&str> = since
        .messages
        .iter()
        .map(|m| m.subject.as_str())
        .filter(|s| s.contains(&mark) && !s.starts_with("good"))
        .collect();
    assert!(bad.is_empty(), "refused messages were sent: {bad:?}");
}

#[tokio::test]
async fn watch_mail_delivers_a_message_sent_after_the_stream_opened() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    connected_bob(&mut admin, "Bob", &Servers::implicit_imap_starttls_smtp()).await;
    connected_alice(&mut admin, "Alice", &Servers::starttls_imap_implicit_smtp()).await;
    let mut stream = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            include_html: true,
            ..Default::default()
        })
        .await
        .expect("WatchMail")
        .into_inner();
    let subject = format!("watch {}", token());
    agent
        .send_email(proto::SendEmailRequest {
            html_body: "<i>are you watching?</i>".into(),
            ..plain(
                conn("Alice", ""),
                "bob@x.test",
                &subject,
                "are you watching?",
            )
        })
        .await
        .expect("SendEmail");
    let event = next_with_subject(&mut stream, &subject).await;
    let m = event.message.unwrap();
    assert_eq!(m.text_body.trim_end(), "are you watching?");
    assert_eq!(m.html_body.trim_end(), "<i>are you watching?</i>");
    assert!(event.uid_validity > 0);

    // A second stream resuming after an earlier UID gets that message from the mailbox.
    let mut resumed = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            since_uid: m.uid - 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DELIVERY, resumed.message())
        .await
        .expect("no message")
        .unwrap()
        .unwrap();
    assert_eq!(first.message.unwrap().uid, m.uid);
    drop(resumed);

    // Bad requests are refused before any stream opens.
    let err = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            mailbox: "a\nb".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field(&err)),
        (Code::InvalidArgument, "mailbox".into())
    );
}

#[tokio::test]
async fn watch_streams_are_limited_per_caller_and_freed_when_the_client_goes_away() {
    let daemon = Daemon::start_with_config("[limits]\nmax_watch_streams = 1\n");
    let (daemon, mut admin, mut agent) = daemon.with_clients().await;
    connected_bob(&mut admin, "Bob", &Servers::implicit_imap_starttls_smtp()).await;
    let watch = || proto::WatchMailRequest {
        connection: conn("Bob", ""),
        ..Default::default()
    };
    let first = agent.watch_mail(watch()).await.expect("first stream");
    let err = agent.watch_mail(watch()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err).0, "TOO_MANY_STREAMS");

    // The client goes away: the daemon notices, ends the stream and frees its place.
    drop(first);
    let again = wait::until(Duration::from_secs(30), async || {
        match agent.watch_mail(watch()).await {
            Ok(stream) => Some(stream),
            Err(e) if e.code() == Code::ResourceExhausted => None,
            Err(e) => panic!("{e:?}"),
        }
    })
    .await
    .expect("the stream of a client that went away was never ended");
    drop(again);
    let logs = daemon.logs();
    assert!(
        logs.contains("WatchMail stream ended"),
        "no end of stream logged"
    );
}

#[tokio::test]
async fn new_credentials_replace_the_pooled_smtp_connection() {
    let (_daemon, mut admin, mut agent) = Daemon::start().with_clients().await;
    connected_alice(&mut admin, "Alice", &Servers::implicit_imap_starttls_smtp()).await;
    let send = |subject: String| plain(conn("Alice", ""), "bob@x.test", &subject, "pooled");
    // A pooled, authenticated SMTP connection now exists for this connection.
    agent
        .send_email(send(format!("pool {}", token())))
        .await
        .expect("first send");
    // The user changes the stored password (saved anyway though the servers refuse it): the
    // pooled session authenticated with the old one must not be used any more.
    let resp = admin
        .connect_with_credentials(credentials("Alice", "alice@x.test", "not-it", &[], true))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.saved && !resp.test.unwrap().ok);
    let err = agent
        .send_email(send(format!("pool {}", token())))
        .await
        .unwrap_err();
    assert_eq!(reason(&err).0, "EXPIRED", "{err:?}");
    // Reconnecting with the right password works again.
    admin
        .connect_with_credentials(credentials("Alice", "alice@x.test", "secret1", &[], false))
        .await
        .unwrap();
    agent
        .send_email(send(format!("pool {}", token())))
        .await
        .expect("send after reconnecting");
}
