//! Checking and exporting the log offline (`credbroker audit verify|export`), daemon stopped.
//!
//! The walk starts at the signed prune anchor (or the genesis), checks that every segment and
//! every batch continues the chain exactly where the previous one ended, recomputes every
//! record's hash, and accepts a bad frame only at the very end of the newest segment with
//! nothing but zeros after it (a torn write the daemon cuts on its next start). A damaged
//! batch is named by the records it holds. Checkpoints — the log's own latest, and any given
//! (a witness's file) — must be signed by the store's audit key and lie on the chain: a
//! rollback (the log ends before one) or a rewrite (another hash at its sequence) is named.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use super::checkpoint::{Checkpoint, Kind};
use super::log::{ANCHOR_FILE, CHECKPOINT_FILE, batch_range};
use super::segment::{Next, SegmentReader, list_segments};
use super::{AuditRecord, GENESIS, chain_hash};
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Records checked (those after the prune anchor).
    pub records: u64,
    /// The last record's sequence and hash.
    pub last: u64,
    pub head: String,
    /// Records up to this one were pruned (0: none), the last with this hash.
    pub pruned_through: u64,
    pub pruned_hash: String,
    /// Whether the newest segment ends in a torn, unacknowledged write.
    pub torn_tail: bool,
    /// Checkpoints the chain was checked against.
    pub checkpoints: usize,
}

/// Where the chain breaks, naming the sequence numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("audit record {seq} is missing (the chain jumps from {prev} to {next})")]
    Missing { seq: u64, prev: u64, next: u64 },
    #[error("audit record {seq} was altered: its hash does not follow from record {prev}")]
    Altered { seq: u64, prev: u64 },
    #[error(
        "the batch holding audit records {first}–{last} in {segment} fails authentication: it was altered or damaged (records before {first} are intact)"
    )]
    Damaged {
        first: u64,
        last: u64,
        segment: String,
    },
    #[error("the audit log cannot be read past record {after}: {why}")]
    Unreadable { after: u64, why: String },
    #[error("{what} is not signed by this store's audit key")]
    BadSignature { what: String },
    #[error(
        "the audit log ends at record {last}, but a checkpoint covers record {checkpoint}: records were removed (rolled back)"
    )]
    RolledBack { checkpoint: u64, last: u64 },
    #[error(
        "audit record {seq} differs from the checkpoint's: the log was rewritten after it was checkpointed"
    )]
    Rewritten { seq: u64 },
}

/// Checks the whole log in `dir` and its own latest checkpoint.
pub async fn verify(store: &Store, dir: &Path) -> Result<VerifySummary, VerifyError> {
    verify_against(store, dir, &[]).await
}

/// As [`verify`], also proving the log extends every one of `checkpoints`.
pub async fn verify_against(
    store: &Store,
    dir: &Path,
    checkpoints: &[Checkpoint],
) -> Result<VerifySummary, VerifyError> {
    let key = store
        .vault()
        .audit_public_key()
        .map_err(|e| unreadable(0, e))?;
    let mut wanted: BTreeMap<u64, String> = BTreeMap::new();
    let own = Checkpoint::load(&dir.join(CHECKPOINT_FILE)).map_err(|e| unreadable(0, e))?;
    for (i, cp) in own.iter().chain(checkpoints).enumerate() {
        if cp.kind != Kind::Checkpoint || !cp.signed_by(&key) {
            return Err(VerifyError::BadSignature {
                what: format!("checkpoint {} (record {})", i + 1, cp.seq),
            });
        }
        if wanted
            .insert(cp.seq, cp.hash.clone())
            .is_some_and(|h| h != cp.hash)
        {
            return Err(VerifyError::Rewritten { seq: cp.seq });
        }
    }
    let count = wanted.len();
    let mut summary = walk(store, dir, &key, &mut |record| {
        if wanted.get(&record.seq).is_some_and(|h| *h != record.hash) {
            return Err(VerifyError::Rewritten { seq: record.seq });
        }
        wanted.remove(&record.seq);
        Ok(())
    })?;
    for (seq, hash) in wanted {
        if seq > summary.last {
            return Err(VerifyError::RolledBack {
                checkpoint: seq,
                last: summary.last,
            });
        }
        // Pruned: only the anchor's own record can still be compared.
        if seq == summary.pruned_through && hash != summary.pruned_hash {
            return Err(VerifyError::Rewritten { seq });
        }
    }
    summary.checkpoints = count;
    Ok(summary)
}

fn unreadable(after: u64, why: impl std::fmt::Display) -> VerifyError {
    VerifyError::Unreadable {
        after,
        why: why.to_string(),
    }
}

/// Where the chain starts: the signed prune anchor, or the genesis.
fn start(dir: &Path, key: &str) -> Result<(u64, [u8; 32]), VerifyError> {
    let Some(anchor) = Checkpoint::load(&dir.join(ANCHOR_FILE)).map_err(|e| unreadable(0, e))?
    else {
        return Ok((0, GENESIS));
    };
    if anchor.kind != Kind::Pruned || !anchor.signed_by(key) {
        return Err(VerifyError::BadSignature {
            what: format!("the prune anchor {}", dir.join(ANCHOR_FILE).display()),
        });
    }
    let hash = super::segment::decode_hash(&anchor.hash).map_err(|e| unreadable(anchor.seq, e))?;
    Ok((anchor.seq, hash))
}

type Visit<'a> = dyn FnMut(AuditRecord) -> Result<(), VerifyError> + 'a;

/// Where the walk stands: the last record checked and its hash.
struct Position {
    last: u64,
    prev: [u8; 32],
    records: u64,
}

/// Walks every record after the anchor, checking the chain; `visit` sees each in order.
fn walk(
    store: &Store,
    dir: &Path,
    key: &str,
    visit: &mut Visit<'_>,
) -> Result<VerifySummary, VerifyError> {
    let (pruned_through, prev) = start(dir, key)?;
    let mut at = Position {
        last: pruned_through,
        prev,
        records: 0,
    };
    let segments = match list_segments(dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(unreadable(0, e)),
    };
    // Segments the anchor covers wholly (a prune cut short) are skipped.
    let skip = segments
        .iter()
        .rposition(|(first, _)| *first <= pruned_through + 1)
        .unwrap_or(0);
    let newest = segments.len().saturating_sub(1);
    let mut torn_tail = false;
    for (i, (_, path)) in segments.iter().enumerate().skip(skip) {
        torn_tail = walk_segment(store, path, i == newest, &mut at, visit)?;
    }
    Ok(VerifySummary {
        records: at.records,
        last: at.last,
        head: hex::encode(at.prev),
        pruned_through,
        pruned_hash: hex::encode(prev),
        torn_tail,
        checkpoints: 0,
    })
}

/// Checks one segment from `at`; true if it ends in a torn write (allowed only if `newest`).
fn walk_segment(
    store: &Store,
    path: &Path,
    newest: bool,
    at: &mut Position,
    visit: &mut Visit<'_>,
) -> Result<bool, VerifyError> {
    let mut reader =
        SegmentReader::open(path, store.vault()).map_err(|e| unreadable(at.last, e))?;
    let node = reader.header.node.clone();
    let (first, prev_hash) = (reader.header.first_seq, reader.header.prev_hash.clone());
    check_continues(at, first, &prev_hash)?;
    loop {
        match reader.next(0).map_err(|e| unreadable(at.last, e))? {
            Next::End => return Ok(false),
            Next::Batch { first, body } => {
                check_continues(at, first, &body.prev)?;
                for (j, event) in body.events.into_iter().enumerate() {
                    let seq = first + j as u64;
                    at.prev = chain_hash(&at.prev, seq, &body.time, &node, &event);
                    visit(AuditRecord {
                        seq,
                        time: body.time,
                        node: node.clone(),
                        event,
                        hash: hex::encode(at.prev),
                    })?;
                    (at.last, at.records) = (seq, at.records + 1);
                }
                if body.head != hex::encode(at.prev) {
                    return Err(VerifyError::Altered {
                        seq: at.last,
                        prev: at.last - 1,
                    });
                }
            }
            Next::Bad {
                first,
                count,
                extent,
                ..
            } => {
                if newest && reader.zeros_from(extent).unwrap_or(false) {
                    return Ok(true);
                }
                let (first, last) = batch_range(at.last + 1, first, count);
                return Err(VerifyError::Damaged {
                    first,
                    last,
                    segment: path.display().to_string(),
                });
            }
        }
    }
}

/// A segment or batch must start right after `at`, from its hash.
fn check_continues(at: &Position, first: u64, prev_hash: &str) -> Result<(), VerifyError> {
    if first != at.last + 1 {
        return Err(VerifyError::Missing {
            seq: at.last + 1,
            prev: at.last,
            next: first,
        });
    }
    if prev_hash != hex::encode(at.prev) {
        return Err(VerifyError::Altered {
            seq: first,
            prev: at.last,
        });
    }
    Ok(())
}

/// Writes every record as one JSON line, in sequence order (checking the chain as it goes).
pub async fn export(
    store: &Store,
    dir: &Path,
    out: &mut dyn Write,
) -> Result<u64, Box<dyn std::error::Error>> {
    let key = store.vault().audit_public_key()?;
    let summary = walk(store, dir, &key, &mut |record| {
        serde_json::to_writer(&mut *out, &record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .map_err(|e| unreadable(record.seq, e))
    })?;
    Ok(summary.records)
}
