//! The audit log's files: opening them (cutting a torn tail), appending a batch (one `write`,
//! one `fdatasync`), rolling segments, and reading records back.
//!
//! Invariants:
//! - only the group commit's writer thread appends, at the end of the newest segment; a batch is acknowledged
//!   only after its `fdatasync` returned, and a failed write or sync poisons the log (a later
//!   sync could not prove the lost bytes reached the disk); a roll that fails (no room for the
//!   next segment) writes nothing, fails its batch, and is tried again by the next one;
//! - on open, a bad frame at the end of the newest segment followed only by zeros is a torn
//!   write (never acknowledged: its sync never returned) and is zeroed; a bad frame with data
//!   after it is damage, and the log refuses to open; a recovered head below the latest local
//!   checkpoint means acknowledged records are gone, and the log refuses to open;
//! - a segment gets its name only once zero-filled, headed and synced (`claim.tmp` →
//!   `{first seq}.seg`), so a crash mid-roll leaves either no new segment or a whole empty one.

use std::fs::File;
use std::ops::ControlFlow;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::checkpoint::Checkpoint;
use super::segment::{
    HEADER_SPACE, Next, SegmentHeader, SegmentReader, decode_hash, encode_body, encode_frame,
    list_segments, preallocate, segment_name, sync_dir,
};
use super::{AuditError, AuditEvent, AuditHead, AuditRecord, GENESIS, chain_hash};
use crate::vault::{SegmentSealer, Vault};

/// A zero-filled segment made ahead of the next roll.
pub(crate) const SPARE: &str = "spare.zero";
/// The pause after each MiB of the spare reaches the disk (see [`preallocate`]).
const SPARE_PACE: std::time::Duration = std::time::Duration::from_millis(2);
/// A segment being headed and named (removed on open if a crash left it).
const CLAIM: &str = "claim.tmp";
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint.json";
pub(crate) const ANCHOR_FILE: &str = "anchor.json";

/// The chain's end as the writer knows it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tail {
    pub seq: u64,
    pub hash: [u8; 32],
    pub time: Option<DateTime<Utc>>,
}

impl Tail {
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: hex::encode(self.hash),
            time: self.time,
        }
    }
}

/// The newest segment, open for appending.
struct Active {
    path: PathBuf,
    file: File,
    sealer: SegmentSealer,
    offset: u64,
}

/// The writer's side of the log.
pub(crate) struct Appender {
    dir: PathBuf,
    pub node: String,
    segment_bytes: u64,
    active: Active,
    pub tail: Tail,
    poisoned: Option<String>,
    /// Set when an append rolled to a new segment (the spare is used up); the writer resets it.
    pub rolled: bool,
}

/// The hostname, for a log created without `[audit] node`.
fn default_node() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// Folds `events` (records from `tail.seq + 1`, stamped `time`) into the chain.
fn extend(tail: &Tail, time: DateTime<Utc>, node: &str, events: &[AuditEvent]) -> Tail {
    let mut hash = tail.hash;
    for (i, event) in events.iter().enumerate() {
        hash = chain_hash(&hash, tail.seq + 1 + i as u64, &time, node, event);
    }
    Tail {
        seq: tail.seq + events.len() as u64,
        hash,
        time: Some(time),
    }
}

impl Appender {
    /// Opens (or creates) the log in `dir`, recovering its tail.
    pub fn open(
        dir: &Path,
        vault: &Vault,
        node: Option<&str>,
        segment_bytes: u64,
    ) -> Result<Appender, AuditError> {
        std::fs::create_dir_all(dir).map_err(|e| AuditError::io(dir, e))?;
        for tmp in [CLAIM, "spare.tmp", "checkpoint.tmp", "anchor.tmp"] {
            let _ = std::fs::remove_file(dir.join(tmp));
        }
        let segments = list_segments(dir).map_err(|e| AuditError::io(dir, e))?;
        let segment_bytes = segment_bytes.max(2 * HEADER_SPACE);
        let Some((_, last)) = segments.last() else {
            return Self::create(dir, vault, node, segment_bytes);
        };
        let mut reader = SegmentReader::open(last, vault)
            .map_err(|why| AuditError::Damaged(format!("{}: {why}", last.display())))?;
        let header = reader.header.clone();
        if let Some(want) = node.filter(|n| *n != header.node) {
            return Err(AuditError::Damaged(format!(
                "[audit] node = {want:?}, but the log in {} is node {:?}'s",
                dir.display(),
                header.node
            )));
        }
        let tail = recover_tail(&mut reader, last)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(last)
            .map_err(|e| AuditError::io(last, e))?;
        let appender = Appender {
            dir: dir.to_path_buf(),
            node: header.node.clone(),
            segment_bytes,
            active: Active {
                path: last.clone(),
                file,
                sealer: header.sealer(vault).map_err(AuditError::Keys)?,
                offset: reader.offset,
            },
            tail,
            poisoned: None,
            rolled: false,
        };
        appender.check_against_checkpoint(vault)?;
        Ok(appender)
    }

    /// A new log: its first segment continues from the prune anchor, if any.
    fn create(
        dir: &Path,
        vault: &Vault,
        node: Option<&str>,
        segment_bytes: u64,
    ) -> Result<Appender, AuditError> {
        let anchor = Checkpoint::load(&dir.join(ANCHOR_FILE))?;
        let tail = match &anchor {
            Some(a) => Tail {
                seq: a.seq,
                hash: decode_hash(&a.hash).map_err(AuditError::Damaged)?,
                time: Some(a.time),
            },
            None => Tail {
                seq: 0,
                hash: GENESIS,
                time: None,
            },
        };
        let node = node
            .map(str::to_string)
            .or(anchor.map(|a| a.node))
            .unwrap_or_else(default_node);
        let active = new_segment(dir, vault, &node, &tail, segment_bytes)?;
        Ok(Appender {
            dir: dir.to_path_buf(),
            node,
            segment_bytes,
            active,
            tail,
            poisoned: None,
            rolled: true,
        })
    }

    fn check_against_checkpoint(&self, vault: &Vault) -> Result<(), AuditError> {
        let Some(cp) = Checkpoint::load(&self.dir.join(CHECKPOINT_FILE))? else {
            return Ok(());
        };
        let key = vault.audit_public_key().map_err(AuditError::Keys)?;
        if !cp.signed_by(&key) || cp.node != self.node {
            return Err(AuditError::Damaged(format!(
                "{} is not signed by this store's audit key for node {:?}",
                self.dir.join(CHECKPOINT_FILE).display(),
                self.node
            )));
        }
        if cp.seq > self.tail.seq {
            return Err(AuditError::Lost {
                checkpoint: cp.seq,
                last: self.tail.seq,
            });
        }
        Ok(())
    }

    /// Appends one batch durably; the sequence of its first record and the new head.
    pub fn append(&mut self, vault: &Vault, events: &[AuditEvent]) -> Result<u64, AuditError> {
        if let Some(why) = &self.poisoned {
            return Err(AuditError::Write(why.clone()));
        }
        self.append_at(vault, events, Utc::now())
    }

    /// As [`Appender::append`], stamped `time` (a migration keeps the records' times).
    pub fn append_at(
        &mut self,
        vault: &Vault,
        events: &[AuditEvent],
        time: DateTime<Utc>,
    ) -> Result<u64, AuditError> {
        let first = self.tail.seq + 1;
        let plain = encode_body(&time, &self.tail.hash, &self.node, first, events);
        let next = Tail {
            seq: self.tail.seq + events.len() as u64,
            hash: plain.head,
            time: Some(time),
        };
        let mut frame = encode_frame(&self.active.sealer, &self.node, first, &plain)
            .map_err(AuditError::Keys)?;
        let full = self.active.offset + frame.len() as u64 > self.segment_bytes;
        if full && self.active.offset > HEADER_SPACE {
            self.active =
                new_segment(&self.dir, vault, &self.node, &self.tail, self.segment_bytes)?;
            self.rolled = true;
            frame = encode_frame(&self.active.sealer, &self.node, first, &plain)
                .map_err(AuditError::Keys)?;
        }
        let active = &self.active;
        // A failed roll above wrote nothing and is tried again by the next batch; a failed
        // write or sync here may have lost bytes a later sync would seem to cover: poisoned.
        let written = active
            .file
            .write_all_at(&frame, active.offset)
            .and_then(|()| active.file.sync_data());
        if let Err(e) = written {
            self.poisoned = Some(format!(
                "an earlier write to {} failed ({e}); restart the daemon",
                active.path.display()
            ));
            return Err(AuditError::io(&active.path, e));
        }
        self.active.offset += frame.len() as u64;
        self.tail = next;
        Ok(first)
    }

    /// Makes the next spare segment unless one is ready (run off the writer's path).
    pub fn prepare_spare(dir: &Path, segment_bytes: u64) -> Result<(), AuditError> {
        let spare = dir.join(SPARE);
        if spare.exists() {
            return Ok(());
        }
        let tmp = dir.join("spare.tmp");
        let _ = std::fs::remove_file(&tmp);
        preallocate(&tmp, segment_bytes.max(2 * HEADER_SPACE), Some(SPARE_PACE))
            .and_then(|()| std::fs::rename(&tmp, &spare))
            .and_then(|()| sync_dir(dir))
            .map_err(|e| AuditError::io(&spare, e))
    }
}

/// Reads the newest segment to its end; cuts a torn last frame back to zeros.
fn recover_tail(reader: &mut SegmentReader, path: &Path) -> Result<Tail, AuditError> {
    let header = reader.header.clone();
    let mut tail = Tail {
        seq: header.first_seq - 1,
        hash: header.prev().map_err(AuditError::Damaged)?,
        time: None,
    };
    loop {
        match reader.next(0).map_err(|e| AuditError::io(path, e))? {
            Next::End => return Ok(tail),
            Next::Batch { first, body, .. } => {
                let next = extend(&tail, body.time, &header.node, &body.events);
                if first != tail.seq + 1 || hex::encode(next.hash) != body.head {
                    return Err(damaged(path, tail.seq + 1, first, body.events.len() as u32));
                }
                tail = next;
            }
            Next::Bad {
                offset,
                first,
                count,
                extent,
            } => {
                if !reader
                    .zeros_from(extent)
                    .map_err(|e| AuditError::io(path, e))?
                {
                    return Err(damaged(path, tail.seq + 1, first, count));
                }
                cut(path, offset, extent)?;
                tracing::warn!(
                    segment = %path.display(),
                    after = tail.seq,
                    bytes = extent - offset,
                    "audit log: a torn, unacknowledged batch at the end was cut"
                );
                reader.offset = offset;
                return Ok(tail);
            }
        }
    }
}

fn damaged(path: &Path, expected: u64, first: u64, count: u32) -> AuditError {
    let (from, to) = batch_range(expected, first, count);
    AuditError::Damaged(format!(
        "{}: the batch holding records {from}–{to} is damaged; see `credbroker audit verify`",
        path.display()
    ))
}

/// The records a bad frame holds, by what its clear prefix says if that fits the chain.
pub(crate) fn batch_range(expected: u64, first: u64, count: u32) -> (u64, u64) {
    if first == expected && count > 0 {
        (first, first + u64::from(count) - 1)
    } else {
        (expected, expected)
    }
}

/// Zeroes `[from, to)` of the segment at `path`, durably.
fn cut(path: &Path, from: u64, to: u64) -> Result<(), AuditError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| AuditError::io(path, e))?;
    file.write_all_at(&vec![0u8; (to - from) as usize], from)
        .and_then(|()| file.sync_data())
        .map_err(|e| AuditError::io(path, e))
}

/// Heads and names a new segment continuing from `tail`: the spare if one is ready, else one
/// made now.
fn new_segment(
    dir: &Path,
    vault: &Vault,
    node: &str,
    tail: &Tail,
    segment_bytes: u64,
) -> Result<Active, AuditError> {
    let claim = dir.join(CLAIM);
    // Left by a roll that failed (a full disk): it is made again.
    let _ = std::fs::remove_file(&claim);
    match std::fs::rename(dir.join(SPARE), &claim) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            preallocate(&claim, segment_bytes, None).map_err(|e| AuditError::io(&claim, e))?
        }
        Err(e) => return Err(AuditError::io(&claim, e)),
    }
    let header = SegmentHeader {
        node: node.to_string(),
        first_seq: tail.seq + 1,
        prev_hash: hex::encode(tail.hash),
        salt: hex::encode(crate::vault::random_bytes::<32>()),
        created: Utc::now(),
    };
    let path = dir.join(segment_name(header.first_seq));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&claim)
        .map_err(|e| AuditError::io(&claim, e))?;
    file.write_all_at(&header.encode(), 0)
        .and_then(|()| file.sync_data())
        .and_then(|()| std::fs::rename(&claim, &path))
        .and_then(|()| sync_dir(dir))
        .map_err(|e| AuditError::io(&path, e))?;
    Ok(Active {
        path,
        file,
        sealer: header.sealer(vault).map_err(AuditError::Keys)?,
        offset: HEADER_SPACE,
    })
}

/// Calls `visit` on every record from `from_seq` to `upto_seq`, in order, until it breaks.
/// Batches wholly before `from_seq` are skipped unopened.
pub(crate) fn read_records(
    dir: &Path,
    vault: &Vault,
    from_seq: u64,
    upto_seq: u64,
    mut visit: impl FnMut(AuditRecord) -> ControlFlow<()>,
) -> Result<(), AuditError> {
    let segments = list_segments(dir).map_err(|e| AuditError::io(dir, e))?;
    let start = segments
        .iter()
        .rposition(|(first, _)| *first <= from_seq)
        .unwrap_or(0);
    for (_, path) in &segments[start..] {
        let mut reader = SegmentReader::open(path, vault)
            .map_err(|why| AuditError::Damaged(format!("{}: {why}", path.display())))?;
        let node = reader.header.node.clone();
        loop {
            match reader.next(from_seq).map_err(|e| AuditError::io(path, e))? {
                Next::End => break,
                Next::Bad { first, count, .. } => {
                    if first > upto_seq {
                        return Ok(());
                    }
                    return Err(damaged(path, first, first, count));
                }
                Next::Batch { first, body, .. } => {
                    let mut hash = decode_hash(&body.prev).map_err(AuditError::Damaged)?;
                    for (i, event) in body.events.into_iter().enumerate() {
                        let seq = first + i as u64;
                        if seq > upto_seq {
                            return Ok(());
                        }
                        hash = chain_hash(&hash, seq, &body.time, &node, &event);
                        if seq < from_seq {
                            continue;
                        }
                        let record = AuditRecord {
                            seq,
                            time: body.time,
                            node: node.clone(),
                            event,
                            hash: hex::encode(hash),
                        };
                        if visit(record).is_break() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
