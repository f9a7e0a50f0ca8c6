//! Intent before action (issue 17, finding 5): an RPC that acts on the world writes a durable
//! intent record before it acts, and does not act if that record cannot be written.
//!
//! The fault is real, not a hook in the daemon: the store lives on a small tmpfs the test
//! mounts (it runs as root) and then fills, so the audit log's next write fails as it would
//! on a full disk. What did or did not happen is checked at the mail server: the message
//! that was refused never reaches Bob's mailbox, while one sent after the disk has room does.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use credbroker::api::proto;
use support::daemon::{Daemon, conn};
use support::mail::{Servers, connected, fetch, token, wait_for};

/// A tmpfs mounted for the test's store, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Writes a file until the file system has no room left; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let bytes = vec![0u8; chunk];
            while file.write_all(&bytes).is_ok() {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn message(subject: &str) -> proto::SendEmailRequest {
    proto::SendEmailRequest {
        connection: conn("Alice", ""),
        to: vec!["bob@x.test".into()],
        subject: subject.into(),
        text_body: "intent before action".into(),
        ..Default::default()
    }
}

/// The SendEmail records of the audit log: (outcome, request id) in order.
async fn send_records(daemon: &Daemon) -> Vec<(String, String)> {
    let mut admin = daemon.admin().await;
    let req = proto::QueryAuditRequest {
        limit: 1000,
        operation: "SendEmail".into(),
        ..Default::default()
    };
    let records = admin.query_audit(req).await.unwrap().into_inner().records;
    records
        .into_iter()
        .map(|r| (r.outcome, r.request_id))
        .collect()
}

#[tokio::test]
async fn a_send_whose_intent_cannot_be_written_sends_nothing() {
    let mount_point = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount(mount_point.path(), "64m");
    let mut daemon = Daemon::start();
    // The store moves onto the tmpfs.
    daemon.stop();
    let store = tmpfs.0.join("store");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(daemon.path("store"))
        .arg(&store)
        .status()
        .unwrap();
    assert!(copied.success());
    let config = std::fs::read_to_string(daemon.config()).unwrap();
    let moved = config.replace("path = \"store\"", &format!("path = {:?}", store));
    assert_ne!(moved, config);
    std::fs::write(daemon.config(), moved).unwrap();
    daemon.respawn();

    let mut admin = daemon.admin().await;
    let mut agent = daemon.agent().await;
    let servers = Servers::implicit_imap_starttls_smtp();
    connected(
        &mut admin,
        "Alice",
        &servers,
        "alice@x.test",
        "secret1",
        &[],
    )
    .await;
    connected(&mut admin, "Bob", &servers, "bob@x.test", "secret2", &[]).await;

    // With room on the disk the message goes, with its intent recorded before its outcome.
    let first = format!("Before the disk filled {}", token());
    let sent = agent.send_email(message(&first)).await;
    let id = sent.expect("SendEmail with room on the disk");
    let id = id.metadata().get("x-request-id").unwrap().to_str().unwrap();
    let id = id.to_string();
    wait_for(&mut agent, conn("Bob", ""), &first, false).await;
    let records = send_records(&daemon).await;
    let mine: Vec<&str> = records
        .iter()
        .filter(|(_, r)| *r == id)
        .map(|(o, _)| o.as_str())
        .collect();
    assert_eq!(mine, ["allowed", "ok"], "{records:?}");
    let bob = fetch(&mut agent, conn("Bob", ""), |_| {}).await.unwrap();
    let mark = bob.highest_uid;

    // The disk fills, and audited calls go on until the store can no longer write (the
    // store's writes land in pages it already holds for a while).
    let filler = tmpfs.fill();
    let mut calls = 0;
    while calls < 20_000 {
        calls += 1;
        let status = admin.get_status(proto::GetStatusRequest {}).await;
        match status {
            Ok(_) => continue,
            Err(e) if e.code() == tonic::Code::Unavailable => break,
            Err(e) => panic!("GetStatus on a full disk: {e:?}"),
        }
    }
    assert!(
        calls < 20_000,
        "the audit log was still written on a full disk"
    );
    // The intent cannot be written, so nothing is sent.
    let refused_subject = format!("While the disk was full {}", token());
    let refused = agent
        .send_email(message(&refused_subject))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    // Room again (a failed write latches the store until the daemon restarts). A message
    // sent now arrives; the refused one, sent before it, never did.
    std::fs::remove_file(filler).unwrap();
    daemon.restart();
    let mut agent = daemon.agent().await;
    let after = format!("After the disk had room {}", token());
    agent
        .send_email(message(&after))
        .await
        .expect("SendEmail after");
    wait_for(&mut agent, conn("Bob", ""), &after, false).await;
    let since = fetch(&mut agent, conn("Bob", ""), |r| {
        (r.since_uid, r.limit) = (mark, 200)
    });
    let inbox = since.await.unwrap();
    let arrived: Vec<&str> = inbox.messages.iter().map(|m| m.subject.as_str()).collect();
    assert!(arrived.contains(&after.as_str()), "{arrived:?}");
    assert!(
        !arrived.contains(&refused_subject.as_str()),
        "the refused message was delivered"
    );
    println!(
        "sent before the fill and after: delivered; the store failed after {calls} more \
         calls; refused while full ({:?}): not delivered",
        refused.code()
    );
}
