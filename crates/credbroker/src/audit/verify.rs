//! Checking and exporting the chain offline (`credbroker audit verify|export`).

use std::io::Write;

use std::ops::ControlFlow;

use super::TABLE;
use super::{AuditHead, GENESIS, HEAD_PATH, chain_hash, for_each_record};
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: u64,
    pub head: String,
}

/// Where the chain breaks, naming the sequence number.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("audit record {seq} is missing (the chain jumps from {prev} to {next})")]
    Missing { seq: u64, prev: u64, next: u64 },
    #[error("audit record {seq} was altered: its hash does not follow from record {prev}")]
    Altered { seq: u64, prev: u64 },
    #[error("the audit log cannot be read past record {after}: {why}")]
    Unreadable { after: u64, why: String },
    #[error(
        "the audit head says record {head_seq} is last, but the log ends at {last}: records were removed or added"
    )]
    HeadMismatch { head_seq: u64, last: u64 },
}

pub async fn verify(store: &Store) -> Result<VerifySummary, VerifyError> {
    let mut prev = GENESIS;
    let mut last = 0u64;
    let mut broken = None;
    for_each_record(store, 1, |record| {
        if record.seq != last + 1 {
            broken = Some(VerifyError::Missing {
                seq: last + 1,
                prev: last,
                next: record.seq,
            });
            return ControlFlow::Break(());
        }
        let hash = chain_hash(&prev, record.seq, &record.time, &record.event);
        if hex::encode(hash) != record.hash {
            broken = Some(VerifyError::Altered {
                seq: record.seq,
                prev: last,
            });
            return ControlFlow::Break(());
        }
        prev = hash;
        last = record.seq;
        ControlFlow::Continue(())
    })
    .await
    .map_err(|e| VerifyError::Unreadable {
        after: last,
        why: e.to_string(),
    })?;
    if let Some(broken) = broken {
        return Err(broken);
    }
    let head: Option<AuditHead> =
        store
            .get(TABLE, HEAD_PATH)
            .await
            .map_err(|e| VerifyError::Unreadable {
                after: last,
                why: e.to_string(),
            })?;
    let head_seq = head.as_ref().map_or(0, |h| h.seq);
    if head_seq != last || head.is_some_and(|h| h.hash != hex::encode(prev)) {
        return Err(VerifyError::HeadMismatch { head_seq, last });
    }
    Ok(VerifySummary {
        records: last,
        head: hex::encode(prev),
    })
}

/// Writes every record as one JSON line, in sequence order.
pub async fn export(store: &Store, out: &mut dyn Write) -> Result<u64, Box<dyn std::error::Error>> {
    let mut count = 0;
    let mut failed = None;
    for_each_record(store, 1, |record| {
        let written = serde_json::to_writer(&mut *out, &record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        match written {
            Ok(()) => {
                count += 1;
                ControlFlow::Continue(())
            }
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })
    .await?;
    match failed {
        Some(e) => Err(e.into()),
        None => Ok(count),
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::store::Batch;
    use crate::vault::{KeySource, generate_key_file};
    use std::sync::Arc;

    fn event(i: usize) -> AuditEvent {
        AuditEvent {
            caller: "c".into(),
            operation: format!("op{i}"),
            ..Default::default()
        }
    }

    async fn new_log() -> (tempfile::TempDir, Arc<Store>, Arc<AuditLog>) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        generate_key_file(&key).unwrap();
        let config = crate::config::StoreConfig::at(dir.path().join("db"));
        let store = Arc::new(
            Store::create(&config, &KeySource::KeyFile(key))
                .await
                .unwrap(),
        );
        let log = Arc::new(AuditLog::start(store.clone()).await.unwrap());
        (dir, store, log)
    }

    /// `n` records, one commit each: batch `b/{seq}` holds record `seq` alone.
    async fn log_with(n: usize) -> (tempfile::TempDir, Arc<Store>) {
        let (dir, store, log) = new_log().await;
        for i in 1..=n {
            assert_eq!(log.record(event(i)).await.unwrap(), i as u64);
        }
        (dir, store)
    }

    /// The batch holding `seq`, as stored.
    async fn batch_of(store: &Store, seq: u64) -> (String, Vec<AuditRecord>) {
        store
            .last(TABLE, BATCH_PREFIX, Some(&batch_path(seq)))
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn concurrent_records_chain_in_batches_and_query_across_them() {
        let (_dir, store, log) = new_log().await;
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
        assert_eq!(verify(&store).await.unwrap().records, 300);
        let batches: Vec<(String, Vec<AuditRecord>)> = store
            .scan(TABLE, BATCH_PREFIX, None, usize::MAX)
            .await
            .unwrap();
        assert!(
            batches.len() < 300,
            "300 concurrent records took {} values",
            batches.len()
        );
        assert!(
            batches
                .iter()
                .all(|(_, records)| records.len() <= RECORDS_PER_VALUE)
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
    }

    #[tokio::test]
    async fn altered_record_is_named() {
        let (_dir, store) = log_with(10).await;
        let (path, mut records) = batch_of(&store, 4).await;
        records[0].event.outcome = Some(Outcome::Ok);
        records[0].event.reason = "rewritten".into();
        let mut batch = Batch::new();
        batch.put(TABLE, path, &records);
        store.commit(batch).await.unwrap();
        assert_eq!(
            verify(&store).await.unwrap_err(),
            VerifyError::Altered { seq: 4, prev: 3 }
        );
    }

    #[tokio::test]
    async fn deleted_records_are_named() {
        let (_dir, store) = log_with(10).await;
        store.raw_put(TABLE, &batch_path(6), None).await.unwrap();
        assert_eq!(
            verify(&store).await.unwrap_err(),
            VerifyError::Missing {
                seq: 6,
                prev: 5,
                next: 7
            }
        );
        let (_dir, store) = log_with(10).await;
        store.raw_put(TABLE, &batch_path(10), None).await.unwrap();
        assert_eq!(
            verify(&store).await.unwrap_err(),
            VerifyError::HeadMismatch {
                head_seq: 10,
                last: 9
            }
        );
    }

    #[tokio::test]
    async fn a_record_removed_from_inside_a_batch_is_named() {
        let (_dir, store) = log_with(3).await;
        // One batch holding records 1, 2 and 3, then record 2 taken out of it.
        let mut records: Vec<AuditRecord> = Vec::new();
        for seq in 1..=3 {
            records.extend(batch_of(&store, seq).await.1);
        }
        let mut batch = Batch::new();
        batch
            .delete(TABLE, batch_path(2))
            .delete(TABLE, batch_path(3))
            .put(TABLE, batch_path(1), &records);
        store.commit(batch).await.unwrap();
        assert_eq!(verify(&store).await.unwrap().records, 3);
        let without_2 = vec![records[0].clone(), records[2].clone()];
        let mut batch = Batch::new();
        batch.put(TABLE, batch_path(1), &without_2);
        store.commit(batch).await.unwrap();
        assert_eq!(
            verify(&store).await.unwrap_err(),
            VerifyError::Missing {
                seq: 2,
                prev: 1,
                next: 3
            }
        );
    }

    #[tokio::test]
    async fn flipped_ciphertext_is_unreadable_not_accepted() {
        let (_dir, store) = log_with(5).await;
        let mut raw = store.raw_get(TABLE, &batch_path(2)).await.unwrap().unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        store
            .raw_put(TABLE, &batch_path(2), Some(raw))
            .await
            .unwrap();
        let err = verify(&store).await.unwrap_err();
        assert!(matches!(err, VerifyError::Unreadable { .. }), "{err}");
        assert!(
            err.to_string().contains("audit/b/00000000000000000002"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn export_writes_every_record_in_order() {
        let (_dir, store) = log_with(7).await;
        let mut out = Vec::new();
        assert_eq!(export(&store, &mut out).await.unwrap(), 7);
        let seqs: Vec<u64> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<AuditRecord>(line).unwrap().seq)
            .collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    }
}
