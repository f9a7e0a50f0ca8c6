//! WatchMail across an IMAP server restart. A binary of its own because it stops the dovecot
//! every other mail test shares.

mod support;

use std::time::Duration;

use credbroker::api::proto;
use support::daemon::{Daemon, conn};
use support::mail::{Servers, credentials, mail_connector, next_with_subject, plain, token};
use support::peers::peers;
use support::wait;

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

/// Whether process `pid` still exists (a zombie of another parent counts as gone).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z'))
    })
}

/// Dovecot 2.3 keeps established IMAP sessions running across a restart of its master
/// process; a real restart (or crash, or failover) drops them. So the stopped server's
/// sessions of `user`, the stream's among them, are ended while it is down.
async fn restart_dovecot_ending_the_sessions_of(user: &str) {
    let sessions = imap_sessions(user);
    assert!(!sessions.is_empty(), "the stream has no IMAP session");
    peers().stop_dovecot().await;
    for &pid in &sessions {
        // SAFETY: kill(2) with a PID doveadm just listed and a valid signal number.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let ended = wait::until(Duration::from_secs(10), async || {
        (!sessions.iter().any(|&pid| alive(pid))).then_some(())
    })
    .await;
    assert!(ended.is_some(), "{user}'s IMAP sessions outlived SIGTERM");
    peers().start_dovecot().await;
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
        mail_connector(&mut admin, name, &Servers::implicit_imap_starttls_smtp()).await;
        let resp = admin
            .connect_with_credentials(credentials(name, email, password, &[], false))
            .await
            .unwrap()
            .into_inner();
        assert!(resp.saved, "{:?}", resp.test);
    }
    let mut stream = agent
        .watch_mail(proto::WatchMailRequest {
            connection: conn("Bob", ""),
            ..Default::default()
        })
        .await
        .expect("WatchMail")
        .into_inner();
    let send = |subject: String| {
        let mut agent = agent.clone();
        async move {
            agent
                .send_email(plain(conn("Alice", ""), "bob@x.test", &subject, "ping"))
                .await
                .expect("SendEmail")
        }
    };
    let token = token();
    let before = format!("before restart {token}");
    send(before.clone()).await;
    let first = next_with_subject(&mut stream, &before)
        .await
        .message
        .unwrap();

    restart_dovecot_ending_the_sessions_of("bob@x.test").await;

    let after = format!("after restart {token}");
    send(after.clone()).await;
    let second = next_with_subject(&mut stream, &after)
        .await
        .message
        .unwrap();
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
