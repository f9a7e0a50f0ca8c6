//! Retention: whole segments, oldest first, leave the log once older than `retain_days` (by
//! when the next segment began) or while the log is larger than `retain_bytes`. Each is first
//! exported as JSON lines (as `audit export` writes them) into the archive folder, then a
//! signed anchor — "records up to N were pruned; N's hash is H" — replaces `anchor.json`, and
//! only then is the segment removed. Verification starts from the anchor.
//!
//! Invariants: the newest segment is never pruned; a segment is removed only after its export
//! and the anchor covering it are durable; a crash in between leaves a segment the anchor
//! already covers, which readers skip and the next pass removes.

use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;

use super::checkpoint::{Checkpoint, Kind};
use super::log::{ANCHOR_FILE, read_records};
use super::segment::{SegmentHeader, list_segments, sync_dir};
use super::{AuditError, LogSettings};
use crate::store::Store;

/// `[audit] retain_days`, `retain_bytes` and `archive`, resolved.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
    pub archive: PathBuf,
}

fn header_of(path: &Path) -> Result<SegmentHeader, AuditError> {
    let file = std::fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
    SegmentHeader::read(&file)
        .map_err(|why| AuditError::Damaged(format!("{}: {why}", path.display())))
}

/// Prunes what the retention settings allow; returns how many segments left.
pub(crate) fn prune(
    store: &Store,
    settings: &LogSettings,
    latest: &Checkpoint,
) -> Result<usize, AuditError> {
    let retention = &settings.retention;
    if retention.max_age.is_none() && retention.max_bytes.is_none() {
        return Ok(0);
    }
    let dir = &settings.dir;
    let segments = list_segments(dir).map_err(|e| AuditError::io(dir, e))?;
    let sizes: Vec<u64> = segments
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .collect();
    let mut total: u64 = sizes.iter().sum();
    let mut pruned = 0;
    for (i, window) in segments.windows(2).enumerate() {
        let ((first, path), (_, next_path)) = (&window[0], &window[1]);
        let next = header_of(next_path)?;
        let old = retention
            .max_age
            .is_some_and(|age| (Utc::now() - next.created).to_std().unwrap_or_default() > age);
        let big = retention.max_bytes.is_some_and(|max| total > max);
        if !(old || big) || next.first_seq > latest.seq + 1 {
            break;
        }
        prune_one(store, settings, *first, path, &next, &latest.node)?;
        total -= sizes[i];
        pruned += 1;
    }
    Ok(pruned)
}

/// Exports, anchors and removes the segment at `path` (records `first..next.first_seq`).
fn prune_one(
    store: &Store,
    settings: &LogSettings,
    first: u64,
    path: &Path,
    next: &SegmentHeader,
    node: &str,
) -> Result<(), AuditError> {
    let last = next.first_seq - 1;
    let archive = &settings.retention.archive;
    std::fs::create_dir_all(archive).map_err(|e| AuditError::io(archive, e))?;
    let out_path = archive.join(format!("{first:020}-{last:020}.jsonl"));
    let tmp = out_path.with_extension("tmp");
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| AuditError::io(&tmp, e))?);
    let (mut written, mut last_hash, mut failed) = (0u64, String::new(), None);
    read_records(&settings.dir, store.vault(), first, last, |record| {
        last_hash = record.hash.clone();
        written += 1;
        match serde_json::to_writer(&mut out, &record)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
        {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => {
                failed = Some(e);
                ControlFlow::Break(())
            }
        }
    })?;
    if let Some(e) = failed {
        return Err(AuditError::io(&tmp, e));
    }
    if written != last + 1 - first || last_hash != next.prev_hash {
        return Err(AuditError::Damaged(format!(
            "{} does not end where {} begins; not pruned (see `credbroker audit verify`)",
            path.display(),
            super::segment::segment_name(next.first_seq)
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| AuditError::io(&tmp, e.into_error()))?;
    file.sync_all()
        .and_then(|()| std::fs::rename(&tmp, &out_path))
        .and_then(|()| sync_dir(archive))
        .map_err(|e| AuditError::io(&out_path, e))?;
    let anchor = Checkpoint::sign(
        store.vault(),
        Kind::Pruned,
        node,
        last,
        &last_hash,
        Utc::now(),
    )?;
    anchor.store(&settings.dir.join(ANCHOR_FILE))?;
    std::fs::remove_file(path)
        .and_then(|()| sync_dir(&settings.dir))
        .map_err(|e| AuditError::io(path, e))?;
    tracing::info!(first, last, archive = %out_path.display(), "audit log: segment exported and pruned");
    Ok(())
}
