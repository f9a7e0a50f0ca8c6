//! Egress and upstream caps against the real daemon: internal destinations (loopback ports,
//! the cloud metadata address, a private address, a name resolving to loopback) are refused
//! before any socket reaches them, with the address and the rule named, and reached once
//! `[egress]` allows them; and a flood of FetchMail streams to a server that never answers is
//! capped per caller, under the descriptor limit of the shipped systemd unit, while other
//! callers keep resolving and the broker serves normally afterwards.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use credbroker::api::proto::{self, admin_client::AdminClient};
use support::daemon::{Daemon, OPEN_POLICY, conn, new_connector, reason, secrets, unit_nofile};
use support::wait;
use tokio::io::AsyncReadExt;
use tonic::Code;
use tonic::transport::Channel;

/// A TCP server that accepts and never says a word, counting what reaches it. While it
/// hangs it holds every connection open until [`Silent::release`]; otherwise it closes each
/// one at once.
#[derive(Clone)]
struct Silent {
    port: u16,
    accepted: Arc<AtomicUsize>,
    hang: Arc<AtomicBool>,
    release: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Silent {
    async fn start() -> Silent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = Silent {
            port: listener.local_addr().unwrap().port(),
            accepted: Arc::default(),
            hang: Arc::new(AtomicBool::new(true)),
            release: Arc::new(tokio::sync::watch::channel(0).0),
        };
        let s = silent.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                s.accepted.fetch_add(1, Ordering::SeqCst);
                if !s.hang.load(Ordering::SeqCst) {
                    continue;
                }
                let mut released = s.release.subscribe();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let drain = async { while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {} };
                    tokio::select! {
                        _ = drain => {}
                        _ = released.changed() => {}
                    }
                });
            }
        });
        silent
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every held connection, and closes later ones at once.
    fn release(&self) {
        self.hang.store(false, Ordering::SeqCst);
        self.release.send_modify(|n| *n += 1);
    }
}

/// Creates a shared connector; it must succeed.
async fn create(
    admin: &mut AdminClient<Channel>,
    name: &str,
    kind: proto::ConnectorKind,
    config: &[(&str, &str)],
    slots: &[(&str, &str)],
) {
    admin
        .create_connector(proto::CreateConnectorRequest {
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets: secrets(slots),
            ..new_connector(name, kind, proto::ConnectorMode::Shared)
        })
        .await
        .unwrap_or_else(|e| panic!("create connector {name}: {e:?}"));
}

/// An imap_smtp connector whose IMAP and SMTP servers are both `host:port`.
async fn mail_connector(admin: &mut AdminClient<Channel>, name: &str, host: &str, port: u16) {
    let port = port.to_string();
    let config = [
        ("imap_host", host),
        ("imap_port", &port),
        ("imap_tls", "implicit"),
        ("smtp_host", host),
        ("smtp_port", &port),
        ("smtp_tls", "implicit"),
    ];
    create(admin, name, proto::ConnectorKind::ImapSmtp, &config, &[]).await;
}

/// Saves a password connection of `connector` whatever its credentials test says; returns
/// the test's checks as (stage, message).
async fn save_mail(admin: &mut AdminClient<Channel>, connector: &str) -> Vec<(String, String)> {
    let resp = admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn(connector, ""),
            settings: HashMap::from([("email".to_string(), "alice@x.test".to_string())]),
            secrets: secrets(&[("password", "secret1")]),
            save_on_failure: true,
        })
        .await
        .expect("ConnectWithCredentials")
        .into_inner();
    assert!(resp.saved, "{connector}: not saved");
    let test = resp.test.expect("a test result");
    test.checks
        .into_iter()
        .map(|c| (c.stage, c.message))
        .collect()
}

async fn fetch(
    agent: &mut proto::broker_client::BrokerClient<Channel>,
    connector: &str,
) -> tonic::Status {
    // A guard against a hang only: the flood test's calls wait for the server to let go.
    tokio::time::timeout(
        Duration::from_secs(290),
        agent.fetch_mail(proto::FetchMailRequest {
            connection: conn(connector, ""),
            limit: 10,
            ..Default::default()
        }),
    )
    .await
    .expect("FetchMail hung")
    .expect_err("FetchMail reached a server that never answers")
}

/// An api_key connector with a stored key and a `test_url` (none if empty).
async fn key_connector(admin: &mut AdminClient<Channel>, name: &str, test_url: &str) {
    let config: &[(&str, &str)] = match test_url {
        "" => &[],
        url => &[("test_url", url)],
    };
    let kind = proto::ConnectorKind::ApiKey;
    create(admin, name, kind, config, &[("api_key", "k-egress")]).await;
}

async fn test_key(admin: &mut AdminClient<Channel>, name: &str) -> (String, String) {
    let test = admin
        .test_connection(proto::TestConnectionRequest {
            connection: conn(name, ""),
            ..Default::default()
        })
        .await
        .expect("TestConnection")
        .into_inner()
        .test
        .unwrap();
    let check = test.checks.into_iter().next().unwrap();
    (check.stage, check.message)
}

async fn list_calendar(
    agent: &mut proto::broker_client::BrokerClient<Channel>,
    name: &str,
) -> tonic::Status {
    let day = 1_767_225_600; // 2026-01-01
    agent
        .list_calendar(proto::ListCalendarRequest {
            connection: conn(name, ""),
            time_min: Some(prost_types::Timestamp {
                seconds: day,
                nanos: 0,
            }),
            time_max: Some(prost_types::Timestamp {
                seconds: day + 86_400,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("ListCalendar reached a server that never answers")
}

async fn caldav_connector(admin: &mut AdminClient<Channel>, name: &str, url: &str) {
    create(
        admin,
        name,
        proto::ConnectorKind::Caldav,
        &[("url", url)],
        &[],
    )
    .await;
    admin
        .connect_with_credentials(proto::ConnectWithCredentialsRequest {
            connection: conn(name, ""),
            settings: HashMap::from([("username".to_string(), "alice".to_string())]),
            secrets: secrets(&[("password", "secret1")]),
            save_on_failure: true,
        })
        .await
        .expect("connect the caldav connector");
}

/// A client-credentials OAuth connector whose token endpoint is `token_url`.
async fn oauth_connector(admin: &mut AdminClient<Channel>, name: &str, token_url: &str) {
    let config = [
        ("client_id", "egress-client"),
        ("auth_url", token_url),
        ("token_url", token_url),
        ("grant_type", "client_credentials"),
        ("scopes", "mail.read"),
    ];
    let kind = proto::ConnectorKind::Oauth2;
    create(admin, name, kind, &config, &[("client_secret", "s-egress")]).await;
}

async fn resolve_token(
    agent: &mut proto::broker_client::BrokerClient<Channel>,
    name: &str,
) -> tonic::Status {
    let req = proto::ResolveCredentialRequest {
        connection: conn(name, ""),
        min_ttl_seconds: 0,
        ..Default::default()
    };
    tokio::time::timeout(Duration::from_secs(60), agent.resolve_credential(req))
        .await
        .expect("ResolveCredential hung")
        .expect_err("a token came from a server that never answers")
}

const LOOPBACK: &str = "built-in deny 127.0.0.0/8 (loopback)";

type Broker = proto::broker_client::BrokerClient<Channel>;

/// A mail connector at `host:port` is refused with `want` in its credentials test, FetchMail
/// and SendEmail.
async fn assert_mail_refused(
    (admin, agent): (&mut AdminClient<Channel>, &mut Broker),
    (name, host, port): (&str, &str, u16),
    want: &str,
) {
    mail_connector(admin, name, host, port).await;
    let checks = save_mail(admin, name).await;
    assert_eq!(checks.len(), 2, "{name}: {checks:?}");
    for (stage, message) in &checks {
        assert_eq!(stage, "config", "{name}: {message}");
        assert!(message.contains(want), "{name}: {message}");
        assert!(
            message.contains("refused by egress rule built-in deny"),
            "{name}: {message}"
        );
    }
    let err = fetch(agent, name).await;
    assert_eq!(err.code(), Code::FailedPrecondition, "{name}: {err:?}");
    assert_eq!(reason(&err).0, "EGRESS_REFUSED", "{name}");
    assert!(err.message().contains(want), "{name}: {}", err.message());
    let err = agent
        .send_email(proto::SendEmailRequest {
            connection: conn(name, ""),
            to: vec!["bob@x.test".into()],
            subject: "egress".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err).0, "EGRESS_REFUSED", "{name}: {err:?}");
}

/// Over HTTPS: an API-key test URL on a loopback literal, a CalDAV server and an OAuth token
/// endpoint named `localhost`.
async fn assert_https_refused(admin: &mut AdminClient<Channel>, agent: &mut Broker, p: u16) {
    key_connector(admin, "Key", &format!("https://127.0.0.1:{p}/check")).await;
    let (stage, message) = test_key(admin, "Key").await;
    assert_eq!(stage, "config", "{message}");
    let want = format!("upstream 127.0.0.1:{p} refused by egress rule {LOOPBACK}");
    assert_eq!(message, want);
    caldav_connector(admin, "Dav", &format!("https://localhost:{p}/dav/")).await;
    oauth_connector(admin, "Machine", &format!("https://localhost:{p}/token")).await;
    for err in [
        list_calendar(agent, "Dav").await,
        resolve_token(agent, "Machine").await,
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(reason(&err).0, "EGRESS_REFUSED");
        let message = err.message();
        assert!(
            message.starts_with("upstream localhost (") && message.contains("(loopback)"),
            "{message}"
        );
    }
}

/// The operations whose egress refusals the audit log holds.
async fn audited_refusals(admin: &mut AdminClient<Channel>) -> Vec<String> {
    let records = admin
        .query_audit(proto::QueryAuditRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    records
        .into_iter()
        .filter(|r| r.reason.contains("refused by egress rule"))
        .map(|r| r.operation)
        .collect()
}

#[tokio::test]
async fn internal_destinations_are_refused_before_any_socket_reaches_them() {
    // The built-in policy only: nothing in [egress].
    let daemon = Daemon::start_with(
        OPEN_POLICY,
        "[egress]\n[limits]\nupstream_timeout_secs = 2\n",
    );
    let silent = Silent::start().await;
    let p = silent.port;
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let metadata = "169.254.169.254:993 refused by egress rule built-in deny 169.254.0.0/16";
    let private = "10.1.2.3:993 refused by egress rule built-in deny 10.0.0.0/8 (private)";
    for (name, host, port, want) in [
        (
            "Loop",
            "127.0.0.1",
            p,
            format!("upstream 127.0.0.1:{p} refused by egress rule {LOOPBACK}"),
        ),
        ("Mapped", "::ffff:127.0.0.1", p, format!("rule {LOOPBACK}")),
        (
            "Metadata",
            "169.254.169.254",
            993,
            format!("upstream {metadata} (link-local)"),
        ),
        ("Private", "10.1.2.3", 993, format!("upstream {private}")),
        ("Local", "localhost", p, "upstream localhost (".to_string()),
    ] {
        assert_mail_refused((&mut admin, &mut agent), (name, host, port), &want).await;
    }
    assert_https_refused(&mut admin, &mut agent, p).await;

    // Nothing reached the loopback server, and the refusals are in the audit log.
    assert_eq!(
        silent.accepted(),
        0,
        "a refused destination was connected to"
    );
    let refused = audited_refusals(&mut admin).await;
    for op in [
        "FetchMail",
        "SendEmail",
        "ListCalendar",
        "ResolveCredential",
    ] {
        assert!(
            refused.iter().any(|r| r == op),
            "no audited egress refusal of {op}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn destinations_are_reached_once_allowed_and_deny_wins() {
    let daemon = Daemon::start_with(
        OPEN_POLICY,
        "[egress]\nallow = [\"127.0.0.0/8\", \"::1/128\", \"169.254.169.254\", \"10.0.0.0/8\"]\n\
         deny = [\"127.0.0.2\"]\n[limits]\nupstream_timeout_secs = 2\n",
    );
    let silent = Silent::start().await;
    let p = silent.port;
    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    for (name, host, port) in [
        ("Loop", "127.0.0.1", p),
        ("Local", "localhost", p),
        ("Metadata", "169.254.169.254", 993),
        ("Private", "10.1.2.3", 993),
    ] {
        mail_connector(&mut admin, name, host, port).await;
        save_mail(&mut admin, name).await;
        let before = silent.accepted();
        let err = fetch(&mut agent, name).await;
        assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
        assert_eq!(reason(&err).0, "UPSTREAM_UNAVAILABLE", "{name}");
        if port == p {
            assert!(
                silent.accepted() > before,
                "{name}: the allowed server was not reached"
            );
        }
    }
    key_connector(&mut admin, "Key", &format!("https://127.0.0.1:{p}/check")).await;
    let before = silent.accepted();
    let (stage, message) = test_key(&mut admin, "Key").await;
    assert_ne!(stage, "config", "{message}");
    assert!(
        silent.accepted() > before,
        "the allowed test URL was not reached"
    );

    oauth_connector(
        &mut admin,
        "Machine",
        &format!("https://localhost:{p}/token"),
    )
    .await;
    let before = silent.accepted();
    let err = resolve_token(&mut agent, "Machine").await;
    assert_ne!(reason(&err).0, "EGRESS_REFUSED", "{err:?}");
    assert!(
        silent.accepted() > before,
        "the allowed token endpoint was not reached"
    );

    mail_connector(&mut admin, "Denied", "127.0.0.2", p).await;
    save_mail(&mut admin, "Denied").await;
    let err = fetch(&mut agent, "Denied").await;
    assert_eq!(reason(&err).0, "EGRESS_REFUSED");
    assert_eq!(
        err.message(),
        format!("upstream 127.0.0.2:{p} refused by egress rule deny 127.0.0.2")
    );
}

/// The running daemon's `RLIMIT_NOFILE` is `n`.
fn assert_descriptor_limit(daemon: &Daemon, n: u64) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(line.contains(&format!(" {n} ")), "{line}");
}

const OTHER: &str = "spiffe://test/other";
const CAP: usize = 100;
const STREAMS: usize = 2000;

/// Counts FetchMail answers by reason as they come.
#[derive(Clone, Default)]
struct Tally(Arc<std::sync::Mutex<HashMap<String, usize>>>);

impl Tally {
    fn get(&self, reason: &str) -> usize {
        self.0.lock().unwrap().get(reason).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.0.lock().unwrap().values().sum()
    }
}

/// `n` FetchMail calls at once on `agent`'s one connection, each answer counted in `tally`.
fn flood(
    agent: &proto::broker_client::BrokerClient<Channel>,
    n: usize,
    tally: &Tally,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (mut agent, tally) = (agent.clone(), tally.clone());
        set.spawn(async move {
            let status = fetch(&mut agent, "Silent").await;
            *tally
                .0
                .lock()
                .unwrap()
                .entry(reason(&status).0)
                .or_default() += 1;
        });
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_fetches_to_a_silent_server_is_capped_and_others_keep_resolving() {
    let policy = format!(
        "{OPEN_POLICY}\n[[callers]]\nid = \"{OTHER}\"\n[[callers.grants]]\nworkspace = \"*\"\n\
         connectors = [\"Key\"]\noperations = [\"resolve\"]\nusers = [\"*\"]\n"
    );
    // The deadline is never reached: the flood's sockets end only when the server lets go.
    let mut daemon = Daemon::start_with(
        &policy,
        &format!(
            "[limits]\nupstream_timeout_secs = 300\nupstream_connections_per_caller = {CAP}\n\
             user_rate_per_sec = 0\n"
        ),
    );
    daemon.limit_descriptors(unit_nofile());
    assert_descriptor_limit(&daemon, unit_nofile());
    daemon.issue(OTHER, "other");
    let silent = Silent::start().await;
    let mut admin = daemon.admin().await;
    mail_connector(&mut admin, "Silent", "127.0.0.1", silent.port).await;
    silent.hang.store(false, Ordering::SeqCst);
    save_mail(&mut admin, "Silent").await;
    silent.hang.store(true, Ordering::SeqCst);
    key_connector(&mut admin, "Key", "").await;
    let agent = daemon.agent().await;
    let mut other =
        proto::broker_client::BrokerClient::new(daemon.channel_as("other").await.unwrap());
    let resolve = proto::ResolveCredentialRequest {
        connection: conn("Key", ""),
        min_ttl_seconds: 0,
        ..Default::default()
    };

    // 2,000 FetchMail calls on the agent's one connection, all at once: the cap's worth hold
    // a socket to the silent server, every other one is refused before opening a socket.
    let before = silent.accepted();
    let tally = Tally::default();
    let flooding = flood(&agent, STREAMS, &tally);
    wait::until(Duration::from_secs(240), async || {
        (tally.get("UPSTREAM_BUSY") == STREAMS - CAP).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("the flood was not capped at {CAP}: {:?}", tally.0));
    assert_eq!(tally.total(), STREAMS - CAP, "{:?}", tally.0);
    assert_eq!(
        silent.accepted() - before,
        CAP,
        "upstream sockets beyond the cap"
    );
    // Meanwhile another caller resolves.
    for _ in 0..50 {
        other.resolve_credential(resolve.clone()).await.unwrap();
    }
    assert_eq!(
        tally.total(),
        STREAMS - CAP,
        "the flood ended before the resolves"
    );

    // The server lets go: the held calls end UNAVAILABLE, and every permit is back, so a burst
    // of exactly the cap all reaches the server; everyone resolves, with no restart.
    silent.release();
    flooding.join_all().await;
    assert_eq!(tally.get("UPSTREAM_UNAVAILABLE"), CAP, "{:?}", tally.0);
    assert_eq!(tally.total(), STREAMS, "{:?}", tally.0);
    eprintln!("flood of {STREAMS}: {:?}", tally.0.lock().unwrap());
    let before = silent.accepted();
    let after = Tally::default();
    flood(&agent, CAP, &after).join_all().await;
    assert_eq!(after.get("UPSTREAM_UNAVAILABLE"), CAP, "{:?}", after.0);
    assert_eq!(silent.accepted() - before, CAP);
    let mut agent = agent.clone();
    agent.resolve_credential(resolve.clone()).await.unwrap();
    other.resolve_credential(resolve).await.unwrap();
}
