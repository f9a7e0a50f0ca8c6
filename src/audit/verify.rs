//! Checking and exporting the chain offline (`credbroker audit verify|export`).

use std::io::Write;

use super::{AuditHead, AuditRecord, GENESIS, HEAD_PATH, chain_hash};
use crate::store::{Store, Table};

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

pub fn verify(store: &Store) -> Result<VerifySummary, VerifyError> {
    let mut prev = GENESIS;
    let mut last = 0u64;
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan::<AuditRecord>(Table::Audit, "r/", after.as_deref(), 1024)
            .map_err(|e| VerifyError::Unreadable {
                after: last,
                why: e.to_string(),
            })?;
        let Some((path, _)) = page.last() else { break };
        after = Some(path.clone());
        for (_, record) in page {
            if record.seq != last + 1 {
                return Err(VerifyError::Missing {
                    seq: last + 1,
                    prev: last,
                    next: record.seq,
                });
            }
            let hash = chain_hash(&prev, record.seq, &record.time, &record.event);
            if hex::encode(hash) != record.hash {
                return Err(VerifyError::Altered {
                    seq: record.seq,
                    prev: last,
                });
            }
            prev = hash;
            last = record.seq;
        }
    }
    let head: Option<AuditHead> =
        store
            .get(Table::Audit, HEAD_PATH)
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
pub fn export(store: &Store, out: &mut dyn Write) -> Result<u64, Box<dyn std::error::Error>> {
    let mut after: Option<String> = None;
    let mut count = 0;
    loop {
        let page = store.scan::<AuditRecord>(Table::Audit, "r/", after.as_deref(), 1024)?;
        let Some((path, _)) = page.last() else { break };
        after = Some(path.clone());
        for (_, record) in page {
            serde_json::to_writer(&mut *out, &record)?;
            out.write_all(b"\n")?;
            count += 1;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::store::Batch;
    use crate::vault::{KeySource, generate_key_file};
    use std::sync::Arc;

    async fn log_with(n: usize) -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        generate_key_file(&key).unwrap();
        let store =
            Arc::new(Store::create(&dir.path().join("db"), &KeySource::KeyFile(key)).unwrap());
        let log = AuditLog::start(store.clone()).unwrap();
        let mut tasks = Vec::new();
        let log = Arc::new(log);
        for i in 0..n {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let event = AuditEvent {
                    caller: "c".into(),
                    operation: format!("op{i}"),
                    ..Default::default()
                };
                log.record(event).await.unwrap()
            }));
        }
        let mut seqs: Vec<u64> = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
        (dir, store)
    }

    #[tokio::test]
    async fn a_clean_chain_verifies() {
        let (_dir, store) = log_with(50).await;
        assert_eq!(verify(&store).unwrap().records, 50);
    }

    #[tokio::test]
    async fn altered_record_is_named() {
        let (_dir, store) = log_with(10).await;
        let mut record: AuditRecord = store.get(Table::Audit, &record_path(4)).unwrap().unwrap();
        record.event.outcome = Some(Outcome::Ok);
        record.event.reason = "rewritten".into();
        let mut batch = Batch::new();
        batch.put(Table::Audit, record_path(4), &record);
        store.commit(batch).await.unwrap();
        assert_eq!(
            verify(&store).unwrap_err(),
            VerifyError::Altered { seq: 4, prev: 3 }
        );
    }

    #[tokio::test]
    async fn deleted_records_are_named() {
        let (_dir, store) = log_with(10).await;
        store.raw_put(Table::Audit, &record_path(6), None).unwrap();
        assert_eq!(
            verify(&store).unwrap_err(),
            VerifyError::Missing {
                seq: 6,
                prev: 5,
                next: 7
            }
        );
        let (_dir, store) = log_with(10).await;
        store.raw_put(Table::Audit, &record_path(10), None).unwrap();
        assert_eq!(
            verify(&store).unwrap_err(),
            VerifyError::HeadMismatch {
                head_seq: 10,
                last: 9
            }
        );
    }

    #[tokio::test]
    async fn flipped_ciphertext_is_unreadable_not_accepted() {
        let (_dir, store) = log_with(5).await;
        let mut raw = store
            .raw_get(Table::Audit, &record_path(2))
            .unwrap()
            .unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        store
            .raw_put(Table::Audit, &record_path(2), Some(raw))
            .unwrap();
        let err = verify(&store).unwrap_err();
        assert!(matches!(err, VerifyError::Unreadable { .. }), "{err}");
        assert!(
            err.to_string().contains("audit/r/00000000000000000002"),
            "{err}"
        );
    }
}
