//! Intent before action (issue 17, finding 5): an RPC that acts on the world writes a durable
//! intent record before it acts, and does not act if that record cannot be written.
//!
//! The fault is real, not a hook in the daemon: the store lives on a small tmpfs the test
//! mounts (it runs as root) and then fills, so the audit log's next write fails as it would
//! on a full disk. What did or did not happen is checked at the mail server: the message
//! that was refused never reaches Bob's mailbox, while one sent after the disk has room does;
//! the refresh that was refused never reaches the OAuth provider (its counters say so).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use credbroker::api::proto;
use support::daemon::{Daemon, conn};
use support::mail::{Servers, connected, fetch, token, wait_for};
use support::oauth::{connect, create_connector};
use support::peers::{self, peers};

/// A tmpfs mounted for the test's store, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        use std::os::unix::fs::MetadataExt;
        let at = tempfile::tempdir().unwrap();
        // Owned by whoever runs the test, so the daemon it starts can write there.
        let owner = at.path().metadata().unwrap();
        let options = format!("size={size},uid={},gid={}", owner.uid(), owner.gid());
        let out = privileged("mount")
            .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
            .arg(at.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a tmpfs: run it as root or with passwordless sudo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes a file until the file system has no room left; returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
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
        let _ = privileged("umount").arg("-l").arg(self.path()).status();
    }
}

/// `program` as root: directly when the test runs as root, else through `sudo -n`, as `.ci/run`
/// does for its installs.
fn privileged(program: &str) -> Command {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", program]);
        sudo
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

/// The outcomes of the audit records of `operation` the call `request_id` wrote, in order.
async fn outcomes(daemon: &Daemon, operation: &str, request_id: &str) -> Vec<String> {
    let mut admin = daemon.admin().await;
    let req = proto::QueryAuditRequest {
        limit: 1000,
        operation: operation.into(),
        ..Default::default()
    };
    let records = admin.query_audit(req).await.unwrap().into_inner().records;
    records
        .into_iter()
        .filter(|r| r.request_id == request_id)
        .map(|r| r.outcome)
        .collect()
}

/// A daemon whose store lives on a 64 MiB tmpfs of its own. Bind the pair in this order, so
/// the daemon stops before the tmpfs is unmounted.
fn daemon_on_tmpfs() -> (Tmpfs, Daemon) {
    let tmpfs = Tmpfs::mount("64m");
    // Small audit segments: the log writes into space it reserved ahead, so a full disk shows
    // once the current segment and its spare are used up and the next cannot be made.
    let mut daemon = Daemon::start_with_config("[audit]\nsegment_bytes = 65536\n");
    daemon.stop();
    let store = tmpfs.path().join("store");
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
    (tmpfs, daemon)
}

/// Fills the store's disk, then makes audited calls until the audit log can no longer be
/// written (the store's writes land in pages it already holds for a while). Returns the
/// filler (remove it to make room again) and how many calls it took.
async fn fail_the_store(tmpfs: &Tmpfs, daemon: &Daemon) -> (PathBuf, usize) {
    let filler = tmpfs.fill();
    let mut admin = daemon.admin().await;
    for calls in 1..=20_000 {
        match admin.get_status(proto::GetStatusRequest {}).await {
            Ok(_) => continue,
            Err(e) if e.code() == tonic::Code::Unavailable => return (filler, calls),
            Err(e) => panic!("GetStatus on a full disk: {e:?}"),
        }
    }
    panic!("the audit log was still written on a full disk after 20,000 calls");
}

#[tokio::test]
async fn a_send_whose_intent_cannot_be_written_sends_nothing() {
    let (tmpfs, mut daemon) = daemon_on_tmpfs();
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
    assert_eq!(outcomes(&daemon, "SendEmail", &id).await, ["allowed", "ok"]);
    let bob = fetch(&mut agent, conn("Bob", ""), |_| {}).await.unwrap();
    let mark = bob.highest_uid;

    // The disk fills: the intent cannot be written, so nothing is sent.
    let (filler, calls) = fail_the_store(&tmpfs, &daemon).await;
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

#[tokio::test]
async fn a_token_refresh_whose_intent_cannot_be_written_never_reaches_the_provider() {
    let (tmpfs, mut daemon) = daemon_on_tmpfs();
    let mut admin = daemon.admin().await;
    create_connector(&mut admin, "Team Mail", &[]).await;
    connect(&daemon, &mut admin, "Team Mail", "u1", "").await;
    let resolve = async |daemon: &Daemon| {
        let req = proto::ResolveCredentialRequest {
            connection: conn("Team Mail", "u1"),
            min_ttl_seconds: 1,
            ..Default::default()
        };
        daemon.agent().await.resolve_credential(req).await
    };
    resolve(&daemon)
        .await
        .expect("a resolve of the fresh token");

    // The token expires, the disk fills: the refresh is not attempted, so the provider never
    // rotates the refresh token the broker could no longer save.
    tokio::time::sleep(Duration::from_secs(peers::ACCESS_TTL_SECS + 1)).await;
    let (filler, _) = fail_the_store(&tmpfs, &daemon).await;
    let before = peers().oauth_stats().await;
    let refused = resolve(&daemon).await.unwrap_err();
    let after = peers().oauth_stats().await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(
        after.refresh_token, before.refresh_token,
        "a refresh reached the provider with no intent record"
    );

    // Room again: the refresh happens, with its intent recorded before it.
    std::fs::remove_file(filler).unwrap();
    daemon.restart();
    let served = resolve(&daemon)
        .await
        .expect("a resolve after the disk had room");
    let id = served
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    let recorded = outcomes(&daemon, "ResolveCredential", id).await;
    assert_eq!(recorded, ["allowed", "ok"]);
    assert_eq!(
        peers().oauth_stats().await.refresh_token,
        after.refresh_token + 1
    );
}
