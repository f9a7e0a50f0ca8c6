//! The audit log's unit tests: group commit, reading back, torn tails and rolls cut by a crash,
//! damage named by its records, checkpoints against rollback and rewrite, pruning.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::log::{Appender, CHECKPOINT_FILE};
use super::segment::{HEADER_SPACE, list_segments};
use super::*;
use crate::store::Store;
use crate::vault::{KeySource, generate_key_file};

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        caller: "c".into(),
        operation: format!("op{i}"),
        user_id: format!("user-{i}"),
        // Every other record carries a detail (Broker.Call's), so the chain and its checks
        // cover records with and without one.
        detail: if i % 2 == 1 {
            format!("GET api.test/x{i} -> 200; 0 bytes out, {i} bytes in")
        } else {
            String::new()
        },
        ..Default::default()
    }
}

struct Env {
    _tmp: tempfile::TempDir,
    store: Arc<Store>,
    dir: PathBuf,
}

async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    generate_key_file(&key).unwrap();
    let config = crate::config::StoreConfig::at(tmp.path().join("db"));
    let store = Arc::new(
        Store::create(&config, &KeySource::KeyFile(key))
            .await
            .unwrap(),
    );
    let dir = tmp.path().join("audit");
    Env {
        _tmp: tmp,
        store,
        dir,
    }
}

impl Env {
    fn settings(&self, segment_bytes: u64) -> LogSettings {
        let mut settings = LogSettings::at(self.dir.clone());
        settings.node = Some("n1".into());
        settings.segment_bytes = segment_bytes;
        settings
    }

    fn appender(&self, segment_bytes: u64) -> Appender {
        Appender::open(&self.dir, self.store.vault(), Some("n1"), segment_bytes).unwrap()
    }

    /// `batches` batches of `per` records each, every one acknowledged.
    fn fill(&self, segment_bytes: u64, batches: usize, per: usize) -> Appender {
        let mut log = self.appender(segment_bytes);
        for b in 0..batches {
            let events: Vec<_> = (0..per).map(|i| event(b * per + i)).collect();
            log.append(self.store.vault(), &events).unwrap();
        }
        log
    }

    async fn verify(&self) -> Result<VerifySummary, VerifyError> {
        verify(&self.store, &self.dir).await
    }

    fn segments(&self) -> Vec<(u64, PathBuf)> {
        list_segments(&self.dir).unwrap()
    }

    /// Every segment's bytes, as they are now.
    fn copy_segments(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.segments()
            .into_iter()
            .map(|(_, p)| (p.clone(), std::fs::read(&p).unwrap()))
            .collect()
    }

    /// Replaces the segments with a copy taken earlier (a rollback).
    fn put_back(&self, copy: &[(PathBuf, Vec<u8>)]) {
        for (_, path) in self.segments() {
            std::fs::remove_file(path).unwrap();
        }
        for (path, bytes) in copy {
            std::fs::write(path, bytes).unwrap();
        }
    }
}

/// Offset and length of every frame of the segment at `path`.
fn frames(path: &Path) -> Vec<(u64, u64)> {
    let file = std::fs::File::open(path).unwrap();
    let mut out = Vec::new();
    let mut at = HEADER_SPACE;
    loop {
        let mut len = [0u8; 4];
        if file.read_exact_at(&mut len, at).is_err() {
            return out;
        }
        let len = u32::from_le_bytes(len) as u64;
        if len == 0 {
            return out;
        }
        out.push((at, 16 + len));
        at += 16 + len;
    }
}

fn flip(path: &Path, at: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

fn zero(path: &Path, from: u64, len: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&vec![0u8; len as usize], from).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_records_share_batches_and_read_back_in_order() {
    let env = env().await;
    let log = Arc::new(
        AuditLog::start(env.store.clone(), env.settings(1 << 20))
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.record(event(i)).await.unwrap() })
        })
        .collect();
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
    let (_, path) = &env.segments()[0];
    let batches = frames(path).len();
    assert!(
        batches < 300,
        "300 concurrent records took {batches} batches"
    );

    let seqs_of = |records: Vec<AuditRecord>| records.iter().map(|r| r.seq).collect::<Vec<_>>();
    for after in [0, 1, 17, 150, 298] {
        let page = log.query(after, 5, usize::MAX, |_| true).await.unwrap();
        let want: Vec<u64> = (after + 1..=(after + 5).min(300)).collect();
        assert_eq!(seqs_of(page), want, "after {after}");
    }
    assert!(
        log.query(300, 5, usize::MAX, |_| true)
            .await
            .unwrap()
            .is_empty()
    );
    let even = log
        .query(10, 3, usize::MAX, |r| r.seq % 2 == 0)
        .await
        .unwrap();
    assert_eq!(seqs_of(even), [12, 14, 16]);
    let bounded = log.query(10, 100, 4, |_| true).await.unwrap();
    assert_eq!(
        seqs_of(bounded),
        [11, 12, 13, 14],
        "max_scan bounds the walk"
    );
    let page = log.query(41, 1, usize::MAX, |_| true).await.unwrap();
    assert_eq!(page[0].node, "n1");

    let head = log.head();
    drop(log);
    let summary = env.verify().await.unwrap();
    assert_eq!((summary.records, summary.head), (300, head.hash));
    let mut out = Vec::new();
    assert_eq!(export(&env.store, &env.dir, &mut out).await.unwrap(), 300);
    let exported: Vec<AuditRecord> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported[41].hash, page[0].hash, "export and query agree");
}

#[tokio::test]
async fn segments_roll_at_their_size_and_the_chain_runs_across_them() {
    let env = env().await;
    let log = env.fill(8192, 60, 3);
    assert_eq!(log.tail.seq, 180);
    let segments = env.segments();
    assert!(segments.len() > 3, "{} segments", segments.len());
    for (_, path) in &segments {
        assert_eq!(std::fs::metadata(path).unwrap().len(), 8192, "preallocated");
    }
    drop(log);
    assert_eq!(env.verify().await.unwrap().records, 180);
    let log = env.appender(8192);
    assert_eq!(log.tail.seq, 180, "reopened at the end");
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_no_acknowledged_record_is_lost() {
    let env = env().await;
    let mut log = env.fill(1 << 20, 5, 2);
    let (_, path) = env.segments()[0].clone();
    // A sixth batch whose write was torn: only its first half reached the disk, and its sync
    // never returned, so nobody was answered.
    log.append(env.store.vault(), &[event(90), event(91)])
        .unwrap();
    drop(log);
    let (at, len) = *frames(&path).last().unwrap();
    zero(&path, at + len / 2, len - len / 2);
    let summary = env.verify().await.unwrap();
    assert!(summary.torn_tail);
    assert_eq!(summary.records, 10, "the five acknowledged batches");

    let mut log = env.appender(1 << 20);
    assert_eq!(log.tail.seq, 10);
    assert_eq!(log.append(env.store.vault(), &[event(7)]).unwrap(), 11);
    drop(log);
    let summary = env.verify().await.unwrap();
    assert_eq!((summary.records, summary.torn_tail), (11, false));

    // Torn in its length prefix: the same.
    let mut log = env.appender(1 << 20);
    let end = frames(&path).last().map(|(a, l)| a + l).unwrap();
    log.append(env.store.vault(), &[event(8)]).unwrap();
    drop(log);
    zero(&path, end + 2, 4096);
    assert_eq!(env.appender(1 << 20).tail.seq, 11);
}

#[tokio::test]
async fn a_crash_mid_roll_leaves_a_log_that_opens_where_it_was() {
    let env = env().await;
    let log = env.fill(8192, 30, 3);
    let seq = log.tail.seq;
    drop(log);
    // Cut while claiming the spare (claim.tmp left behind) and while zero-filling the next
    // spare (spare.tmp half written).
    std::fs::write(env.dir.join("claim.tmp"), b"CBAUDIT1 half a header").unwrap();
    std::fs::write(env.dir.join("spare.tmp"), vec![0u8; 100]).unwrap();
    let mut log = env.appender(8192);
    assert_eq!(log.tail.seq, seq);
    assert!(!env.dir.join("claim.tmp").exists());
    // Cut right after a roll named the new segment, before its first batch.
    let before = env.segments().len();
    while env.segments().len() == before {
        log.append(env.store.vault(), &[event(1)]).unwrap();
    }
    let (_, newest) = env.segments().last().unwrap().clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&newest)
        .unwrap();
    file.set_len(8192).unwrap();
    zero(&newest, HEADER_SPACE, 8192 - HEADER_SPACE);
    let rolled_at = env.segments().last().unwrap().0;
    drop(log);
    let log = env.appender(8192);
    assert_eq!(
        log.tail.seq,
        rolled_at - 1,
        "the empty new segment continues the chain"
    );
    drop(log);
    assert_eq!(env.verify().await.unwrap().last, rolled_at - 1);
}

#[tokio::test]
async fn a_damaged_batch_is_named_by_its_first_and_last_record() {
    let env = env().await;
    let log = env.fill(1 << 20, 4, 3);
    drop(log);
    let (_, path) = env.segments()[0].clone();
    let (at, len) = frames(&path)[1];
    flip(&path, at + len - 5);
    let err = env.verify().await.unwrap_err();
    assert!(
        matches!(
            err,
            VerifyError::Damaged {
                first: 4,
                last: 6,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("records 4–6"), "{err}");
    assert!(err.to_string().contains("before 4 are intact"), "{err}");
    // Damage with whole batches after it is not a torn tail: the daemon refuses to start.
    let refused = Appender::open(&env.dir, env.store.vault(), None, 1 << 20);
    let err = refused.err().expect("a damaged log opened");
    assert!(err.to_string().contains("records 4–6"), "{err}");
}

#[tokio::test]
async fn checkpoints_catch_a_rollback_and_a_rewrite() {
    let env = env().await;
    let witness = env.dir.with_file_name("witness.jsonl");
    let mut settings = env.settings(8192);
    settings.witness_file = Some(witness.clone());
    let log = AuditLog::start(env.store.clone(), settings.clone())
        .await
        .unwrap();
    for i in 0..40 {
        log.record(event(i)).await.unwrap();
    }
    // The log as it stood at record 40, kept aside (what a rollback restores).
    let early = env.copy_segments();
    for i in 40..80 {
        log.record(event(i)).await.unwrap();
    }
    let cp = log.checkpoint_now().await.unwrap().unwrap();
    assert_eq!(cp.seq, 80);
    let key = log.public_key().unwrap();
    assert!(cp.signed_by(&key));
    drop(log);
    let held = Checkpoint::parse_lines(&std::fs::read_to_string(&witness).unwrap()).unwrap();
    assert!(held.iter().any(|c| c.seq == 80 && c.signed_by(&key)));
    assert!(
        held.iter().all(|c| c.signed_by(&key)),
        "every witnessed checkpoint verifies"
    );
    assert!(
        verify_against(&env.store, &env.dir, &held)
            .await
            .unwrap()
            .checkpoints
            >= 1
    );

    // Rolled back: the segments as they were at record 40, and the local checkpoint gone
    // with them (whoever rolls back removes it too). The witness's copy catches it.
    let _ = std::fs::remove_file(env.dir.join(CHECKPOINT_FILE));
    env.put_back(&early);
    assert_eq!(
        env.verify().await.unwrap().last,
        40,
        "alone, the chain looks whole"
    );
    let err = verify_against(&env.store, &env.dir, &held)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        VerifyError::RolledBack {
            checkpoint: 80,
            last: 40
        }
    );

    // Rewritten: someone holding the store key re-chains records 41.. with other content.
    let mut log = env.appender(8192);
    for i in 0..40 {
        log.append(env.store.vault(), &[event(1000 + i)]).unwrap();
    }
    drop(log);
    assert_eq!(env.verify().await.unwrap().last, 80);
    let err = verify_against(&env.store, &env.dir, &held)
        .await
        .unwrap_err();
    assert!(matches!(err, VerifyError::Rewritten { .. }), "{err}");

    // A checkpoint signed by another key is refused.
    let mut forged = held[0].clone();
    forged.seq += 1;
    let err = verify_against(&env.store, &env.dir, &[forged])
        .await
        .unwrap_err();
    assert!(matches!(err, VerifyError::BadSignature { .. }), "{err}");
}

#[tokio::test]
async fn the_daemon_refuses_a_log_cut_below_its_checkpoint() {
    let env = env().await;
    let log = AuditLog::start(env.store.clone(), env.settings(1 << 20))
        .await
        .unwrap();
    for i in 0..5 {
        log.record(event(i)).await.unwrap();
    }
    log.checkpoint_now().await.unwrap();
    drop(log);
    let (_, path) = env.segments()[0].clone();
    let (at, len) = *frames(&path).last().unwrap();
    zero(&path, at, len);
    let err = Appender::open(&env.dir, env.store.vault(), None, 1 << 20)
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            AuditError::Lost {
                checkpoint: 5,
                last: 4
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn pruning_exports_whole_segments_and_verify_stays_green() {
    let env = env().await;
    let log = env.fill(8192, 60, 3);
    drop(log);
    let before = env.segments();
    assert!(before.len() > 4);
    let mut settings = env.settings(8192);
    settings.retention = Retention {
        max_age: None,
        max_bytes: Some(3 * 8192),
        archive: env.dir.with_file_name("archive"),
    };
    let latest = Checkpoint::sign(
        env.store.vault(),
        CheckpointKind::Checkpoint,
        "n1",
        180,
        &env.verify().await.unwrap().head,
        Utc::now(),
    )
    .unwrap();
    let pruned = retention::prune(&env.store, &settings, &latest).unwrap();
    assert_eq!(pruned, before.len() - 3);
    assert_eq!(env.segments().len(), 3);
    let summary = env.verify().await.unwrap();
    assert_eq!(summary.last, 180);
    assert_eq!(summary.pruned_through, env.segments()[0].0 - 1);
    assert_eq!(summary.records, 180 - summary.pruned_through);
    // Everything pruned is in the archive, as `audit export` writes it.
    let mut archived = Vec::new();
    for entry in std::fs::read_dir(&settings.retention.archive).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            archived.push(serde_json::from_str::<AuditRecord>(line).unwrap().seq);
        }
    }
    archived.sort();
    assert_eq!(archived, (1..=summary.pruned_through).collect::<Vec<_>>());
    // The log goes on after the anchor, and verify with the old checkpoint still passes.
    let mut log = env.appender(8192);
    assert_eq!(log.append(env.store.vault(), &[event(1)]).unwrap(), 181);
    drop(log);
    verify_against(&env.store, &env.dir, &[latest])
        .await
        .unwrap();
    // An anchor not signed by the store's key is refused.
    let anchor = env.dir.join(super::log::ANCHOR_FILE);
    let text = std::fs::read_to_string(&anchor)
        .unwrap()
        .replace("\"seq\":", "\"seq\":1");
    std::fs::write(&anchor, text).unwrap();
    assert!(matches!(
        env.verify().await.unwrap_err(),
        VerifyError::BadSignature { .. }
    ));
}

#[tokio::test]
async fn an_old_in_store_log_is_refused_until_migrated() {
    use crate::store::{Batch, Table};
    let env = env().await;
    let old = Table::uncached("audit");
    let time = Utc::now() - chrono::Duration::days(3);
    let records: Vec<serde_json::Value> = (1..=3)
        .map(|seq| {
            serde_json::json!({
                "seq": seq, "time": time, "caller": "c", "operation": format!("op{seq}"),
                "workspace": "", "connector": "", "user_id": "", "outcome": "ok",
                "reason": "", "request_id": "", "hash": "00",
            })
        })
        .collect();
    let mut batch = Batch::new();
    batch.put(old, "b/00000000000000000001", &records).put(
        old,
        "head",
        &serde_json::json!({"seq": 3, "hash": "00", "time": time}),
    );
    env.store.commit(batch).await.unwrap();
    let err = AuditLog::start(env.store.clone(), env.settings(1 << 20))
        .await
        .err()
        .expect("an old-format store was served");
    assert!(matches!(err, AuditError::OldFormat { records: 3 }), "{err}");
    assert!(
        err.to_string().contains("credbroker audit migrate"),
        "{err}"
    );

    assert_eq!(migrate(&env.store, &env.dir, Some("n1")).await.unwrap(), 3);
    assert_eq!(
        old_records(&env.store).await.unwrap(),
        0,
        "the old table is gone"
    );
    let log = AuditLog::start(env.store.clone(), env.settings(1 << 20))
        .await
        .unwrap();
    let back = log.query(0, 10, usize::MAX, |_| true).await.unwrap();
    let ops: Vec<&str> = back.iter().map(|r| r.event.operation.as_str()).collect();
    assert_eq!(ops, ["op1", "op2", "op3"]);
    assert!(back.iter().all(|r| r.time == time), "times are kept");
    assert_eq!(log.record(event(4)).await.unwrap(), 4);
}

#[tokio::test]
async fn a_witness_url_that_is_not_https_is_refused_by_name() {
    let env = env().await;
    let mut settings = env.settings(1 << 20);
    settings.witness_url = Some("http://witness.example/checkpoints".into());
    let err = AuditLog::start(env.store.clone(), settings)
        .await
        .err()
        .expect("a plain-HTTP witness was accepted");
    assert!(
        matches!(err, AuditError::Witness(_)) && err.to_string().contains("https://"),
        "{err}"
    );
    assert!(err.to_string().contains("witness.example"), "{err}");
}
