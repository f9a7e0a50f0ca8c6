//! The audit log against the real daemon and CLI: a damaged batch named by its records,
//! checkpoints a witness holds and the public key `credbroker status` prints, a rollback
//! caught by `audit verify --checkpoint`, and pruning that keeps `audit verify` green.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use credbroker::api::proto;
use credbroker::audit::Checkpoint;
use support::daemon::{Daemon, new_connector};
use support::https::serve_https;
use support::wait;

/// Where a segment's first frame starts, and a frame's clear prefix (see audit/segment.rs).
const HEADER_SPACE: u64 = 4096;
const FRAME_HEAD: u64 = 16;

fn segments(daemon: &Daemon) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(daemon.path("store/audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

/// (offset, length, first seq, count) of every frame of a segment.
fn frames(path: &Path) -> Vec<(u64, u64, u64, u32)> {
    let file = std::fs::File::open(path).unwrap();
    let (mut out, mut at) = (Vec::new(), HEADER_SPACE);
    loop {
        let mut head = [0u8; FRAME_HEAD as usize];
        if file.read_exact_at(&mut head, at).is_err() || head[..4] == [0; 4] {
            return out;
        }
        let len = FRAME_HEAD + u32::from_le_bytes(head[..4].try_into().unwrap()) as u64;
        let first = u64::from_le_bytes(head[4..12].try_into().unwrap());
        let count = u32::from_le_bytes(head[12..].try_into().unwrap());
        out.push((at, len, first, count));
        at += len;
    }
}

fn write_at(path: &Path, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

fn cli(daemon: &Daemon, args: &[&str]) -> (bool, String, String) {
    let out = daemon.cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn verify(daemon: &Daemon, extra: &[&str]) -> (bool, String, String) {
    let config = daemon.config();
    let mut args = vec!["audit", "verify", "--config", config.to_str().unwrap()];
    args.extend(extra);
    cli(daemon, &args)
}

fn admin_cli(daemon: &Daemon, args: &[&str]) -> String {
    let mut all = daemon.admin_args();
    all.extend(args.iter().map(|a| a.to_string()));
    let argv: Vec<&str> = all.iter().map(String::as_str).collect();
    let (ok, out, err) = tokio::task::block_in_place(|| cli(daemon, &argv));
    assert!(ok, "credbroker {args:?} failed:\n{out}{err}");
    out
}

/// The audit checkpoint key `credbroker status` prints.
fn status_key(daemon: &Daemon) -> String {
    let status = admin_cli(daemon, &["status"]);
    status
        .lines()
        .find_map(|l| l.strip_prefix("audit checkpoint key (Ed25519): "))
        .unwrap_or_else(|| panic!("status prints no audit key:\n{status}"))
        .trim()
        .to_string()
}

async fn connectors(daemon: &Daemon, prefix: &str, n: usize) {
    let mut admin = daemon.admin().await;
    for i in 0..n {
        let req = new_connector(
            &format!("{prefix}{i}"),
            proto::ConnectorKind::ApiKey,
            proto::ConnectorMode::Shared,
        );
        admin.create_connector(req).await.unwrap();
    }
}

#[tokio::test]
async fn verify_names_a_damaged_batch_by_its_first_and_last_record() {
    let mut daemon = Daemon::start();
    connectors(&daemon, "c", 6).await;
    daemon.stop();
    let (ok, out, err) = verify(&daemon, &[]);
    assert!(ok, "{out}{err}");
    // One byte of the third batch's ciphertext flipped.
    let segment = &segments(&daemon)[0];
    let (at, len, first, count) = frames(segment)[2];
    let last = first + u64::from(count) - 1;
    let file = std::fs::File::open(segment).unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at + len - 3).unwrap();
    write_at(segment, at + len - 3, &[byte[0] ^ 1]);
    let (ok, _, err) = verify(&daemon, &[]);
    assert!(!ok);
    assert!(
        err.contains(&format!("records {first}–{last}"))
            && err.contains(&format!("records before {first} are intact")),
        "{err}"
    );
    // Export stops there too, and says where.
    let (ok, _, err) = cli(
        &daemon,
        &[
            "audit",
            "export",
            "--config",
            daemon.config().to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains(&format!("{first}–{last}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_holds_checkpoints_that_catch_a_rollback() {
    let mut daemon = Daemon::start_with_config(
        "[audit]\nwitness_file = \"witness.jsonl\"\ncheckpoint_records = 4\ncheckpoint_secs = 1\n",
    );
    connectors(&daemon, "early", 10).await;
    let key = status_key(&daemon);
    let witness = daemon.path("witness.jsonl");
    let held = wait::until(Duration::from_secs(20), async || {
        let text = std::fs::read_to_string(&witness).ok()?;
        let cps = Checkpoint::parse_lines(&text).ok()?;
        cps.iter().any(|c| c.seq >= 10).then_some(cps)
    })
    .await
    .expect("the witness received no checkpoint of the first ten records");
    assert!(held.iter().all(|c| c.signed_by(&key)), "{held:?}");
    let printed = admin_cli(&daemon, &["audit", "checkpoint"]);
    let printed = Checkpoint::parse_lines(&printed).unwrap();
    assert!(printed[0].signed_by(&key) && printed[0].seq >= 10);
    let keep = daemon.path("held.json");
    std::fs::write(&keep, printed[0].to_line()).unwrap();
    // The log as it stood then, kept aside (what a rollback restores).
    let early: Vec<(PathBuf, Vec<u8>)> = segments(&daemon)
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    connectors(&daemon, "late", 10).await;
    daemon.stop();
    let keep_arg = keep.to_str().unwrap();
    let (ok, out, err) = verify(&daemon, &["--checkpoint", "witness.jsonl"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = verify(&daemon, &["--checkpoint", keep_arg]);
    assert!(ok, "{out}{err}");

    // Roll back: the earlier segments, and the log's own checkpoint removed with them.
    std::fs::remove_file(daemon.path("store/audit/checkpoint.json")).unwrap();
    for path in segments(&daemon) {
        std::fs::remove_file(path).unwrap();
    }
    for (path, bytes) in &early {
        std::fs::write(path, bytes).unwrap();
    }
    let (ok, out, err) = verify(&daemon, &[]);
    assert!(ok, "alone, the rolled-back log looks whole: {out}{err}");
    let (ok, _, err) = verify(&daemon, &["--checkpoint", "witness.jsonl"]);
    assert!(!ok && err.contains("rolled back"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_url_receives_checkpoints_that_verify_with_the_status_key() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    // The witness: an HTTPS receiver standing for another host, with a CA of its own. It
    // refuses the first POST, so a delivery proves the sink retried.
    let ca = credbroker_devpki::CertAuthority::generate("witness CA").unwrap();
    let received: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused = Arc::new(AtomicBool::new(false));
    let app = axum::Router::new().route(
        "/checkpoints",
        axum::routing::post({
            let (received, refused) = (received.clone(), refused.clone());
            async move |body: String| {
                if !refused.swap(true, Ordering::SeqCst) {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                received.lock().unwrap().push(body);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let addr = serve_https(&ca, app).await;
    let held_dir = tempfile::tempdir().unwrap();
    let ca_file = held_dir.path().join("witness-ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let mut daemon = Daemon::start_with_config(&format!(
        "[audit]\nwitness_url = \"https://{addr}/checkpoints\"\nwitness_ca_file = \"{}\"\n\
         checkpoint_records = 4\ncheckpoint_secs = 1\nsegment_bytes = 262144\n",
        ca_file.display()
    ));
    connectors(&daemon, "w", 10).await;
    let key = status_key(&daemon);
    let held = wait::until(Duration::from_secs(20), async || {
        let text = received.lock().unwrap().join("\n");
        let cps = Checkpoint::parse_lines(&text).ok()?;
        cps.iter().any(|c| c.seq >= 10).then_some(cps)
    })
    .await
    .expect("the witness URL received no checkpoint of the first ten records");
    assert!(
        refused.load(Ordering::SeqCst),
        "the first POST was not refused"
    );
    assert!(held.iter().all(|c| c.signed_by(&key)), "{held:?}");
    // What the witness holds, the log still extends.
    let file = held_dir.path().join("held.jsonl");
    std::fs::write(&file, received.lock().unwrap().join("\n")).unwrap();
    daemon.stop();
    let (ok, out, err) = verify(&daemon, &["--checkpoint", file.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruned_segments_are_archived_and_verify_stays_green() {
    let mut daemon = Daemon::start_with_config(
        "[audit]\nsegment_bytes = 8192\nretain_bytes = 16384\ncheckpoint_records = 5\ncheckpoint_secs = 1\n",
    );
    connectors(&daemon, "c", 80).await;
    let archive = daemon.path("store/audit-archive");
    let archived = wait::until(Duration::from_secs(20), async || {
        let n = std::fs::read_dir(&archive).ok()?.count();
        (n >= 2).then_some(n)
    })
    .await
    .expect("nothing was pruned");
    daemon.stop();
    let (ok, out, err) = verify(&daemon, &[]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("prune anchor"), "{out}");
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(&archive).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        seqs.extend(text.lines().map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        }));
    }
    seqs.sort();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "{archived} files"
    );
    // The daemon goes on from the anchor.
    daemon.respawn();
    connectors(&daemon, "after", 3).await;
    daemon.stop();
    let (ok, out, err) = verify(&daemon, &[]);
    assert!(ok, "{out}{err}");
}
