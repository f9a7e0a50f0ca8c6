//! One segment file of the audit log: its layout, its preallocation, and reading its batches.
//!
//! ```text
//! [0, 4096)   header: "CBAUDIT1" | u32 LE length | JSON SegmentHeader | zeros
//! then        frame*: u32 LE sealed length | u64 LE first seq | u32 LE count | sealed batch
//! then        zeros to the segment's preallocated size
//! ```
//!
//! The sealed batch is a vault [`crate::vault::SegmentSealer`] envelope of a JSON
//! [`BatchBody`], bound to (node, first seq, count): a frame moved, re-numbered or cut opens
//! no more. Invariants: a segment is zero-filled and synced before it gets its name, so a
//! batch's `fdatasync` carries no metadata and every byte after the last whole frame is zero
//! unless a write was torn; the header never changes once named.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::AuditEvent;
use crate::vault::{SegmentSealer, Vault, VaultError};

const MAGIC: &[u8; 8] = b"CBAUDIT1";
/// Where the first frame starts: the header's room.
pub(crate) const HEADER_SPACE: u64 = 4096;
/// A frame's clear prefix: length, first seq, count.
pub(crate) const FRAME_HEAD: u64 = 16;
/// Segment files end in this; their stem is the first sequence, 20 digits.
const EXT: &str = "seg";

/// What a segment's header says (in the clear; the chain and the sealing check it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub node: String,
    pub first_seq: u64,
    /// Hex chain hash of the record before `first_seq` (the previous segment's last).
    pub prev_hash: String,
    /// Hex of the random salt the segment's sealing key is derived with.
    pub salt: String,
    pub created: DateTime<Utc>,
}

/// A batch as sealed: records `first..first+events.len()`, all stamped `time`, the chain hash
/// before the first (so a reader can start at any batch) and after the last (a check, as the
/// chain is recomputed from the events).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BatchBody {
    pub time: DateTime<Utc>,
    pub prev: String,
    pub events: Vec<AuditEvent>,
    pub head: String,
}

pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.{EXT}")
}

/// Every segment in `dir`, by first sequence, oldest first.
pub(crate) fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(EXT) {
            continue;
        }
        if let Some(first) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
        {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The associated data binding a batch to its place.
fn aad(node: &str, first: u64, count: u32) -> Vec<u8> {
    format!("credbroker/audit/{node}/{first}/{count}").into_bytes()
}

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("segment header serializes");
        let mut out = Vec::with_capacity(12 + json.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        assert!(out.len() as u64 <= HEADER_SPACE, "segment header too long");
        out
    }

    pub fn read(file: &File) -> Result<Self, String> {
        let mut head = [0u8; 12];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| format!("no header: {e}"))?;
        if &head[..8] != MAGIC {
            return Err("not an audit segment (bad magic)".into());
        }
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as u64;
        if 12 + len > HEADER_SPACE {
            return Err("header length out of range".into());
        }
        let mut json = vec![0u8; len as usize];
        file.read_exact_at(&mut json, 12)
            .map_err(|e| format!("header cut short: {e}"))?;
        serde_json::from_slice(&json).map_err(|e| format!("header does not decode: {e}"))
    }

    pub fn prev(&self) -> Result<[u8; 32], String> {
        decode_hash(&self.prev_hash)
    }

    pub fn sealer(&self, vault: &Vault) -> Result<SegmentSealer, VaultError> {
        let mut salt = [0u8; 32];
        hex::decode_to_slice(&self.salt, &mut salt).map_err(|_| {
            VaultError::HeaderCorrupt(format!("segment {} has a bad salt", self.first_seq))
        })?;
        vault.audit_sealer(&salt)
    }
}

pub(crate) fn decode_hash(hex_hash: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut out).map_err(|_| format!("bad hash {hex_hash:?}"))?;
    Ok(out)
}

/// A batch's plaintext, built once: each record is serialised once, in its canonical form, and
/// those bytes are both hashed into the chain and kept in the batch (a [`BatchBody`] whose
/// events carry their `seq`, `time` and `node` beside the event's fields, which a reader
/// ignores and recomputes).
pub(crate) struct Plain {
    bytes: zeroize::Zeroizing<Vec<u8>>,
    /// The chain hash after the batch's last record.
    pub head: [u8; 32],
    pub count: u32,
}

/// Builds the plaintext of the batch holding `events` as records from `first`, after `prev`.
pub(crate) fn encode_body(
    time: &DateTime<Utc>,
    prev: &[u8; 32],
    node: &str,
    first: u64,
    events: &[AuditEvent],
) -> Plain {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(160 + 320 * events.len()));
    out.extend_from_slice(b"{\"time\":");
    serde_json::to_writer(&mut *out, time).expect("a time serializes");
    out.extend_from_slice(b",\"prev\":\"");
    out.extend_from_slice(hex::encode(prev).as_bytes());
    out.extend_from_slice(b"\",\"events\":[");
    let mut head = *prev;
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let start = out.len();
        super::write_canonical(&mut out, first + i as u64, time, node, event);
        head = super::chain_step(&head, &out[start..]);
    }
    out.extend_from_slice(b"],\"head\":\"");
    out.extend_from_slice(hex::encode(head).as_bytes());
    out.extend_from_slice(b"\"}");
    Plain {
        bytes: out,
        head,
        count: events.len() as u32,
    }
}

/// The bytes of one frame sealing `plain`, records from `first`.
pub(crate) fn encode_frame(
    sealer: &SegmentSealer,
    node: &str,
    first: u64,
    plain: &Plain,
) -> Result<Vec<u8>, VaultError> {
    let sealed = sealer.seal(&aad(node, first, plain.count), &plain.bytes)?;
    let mut out = Vec::with_capacity(FRAME_HEAD as usize + sealed.len());
    out.extend_from_slice(&(sealed.len() as u32).to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&plain.count.to_le_bytes());
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// What the reader found at its position.
#[derive(Debug)]
pub(crate) enum Next {
    /// A whole batch that opened: records `first..first + count`.
    Batch { first: u64, body: BatchBody },
    /// Zeros: the end of what was written.
    End,
    /// A frame that is cut short or does not open; `extent` is where it would end (clamped to
    /// the file). Torn if only zeros follow it, else damage.
    Bad {
        offset: u64,
        first: u64,
        count: u32,
        extent: u64,
    },
}

/// Reads one segment's frames in order.
pub(crate) struct SegmentReader {
    file: File,
    pub header: SegmentHeader,
    sealer: SegmentSealer,
    pub offset: u64,
    pub len: u64,
}

impl SegmentReader {
    pub fn open(path: &Path, vault: &Vault) -> Result<Self, String> {
        let file = File::open(path).map_err(|e| e.to_string())?;
        let header = SegmentHeader::read(&file)?;
        let sealer = header.sealer(vault).map_err(|e| e.to_string())?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        Ok(Self {
            file,
            header,
            sealer,
            offset: HEADER_SPACE,
            len,
        })
    }

    /// The next frame; frames wholly below `from_seq` are skipped without being opened.
    pub fn next(&mut self, from_seq: u64) -> io::Result<Next> {
        loop {
            let offset = self.offset;
            if offset + FRAME_HEAD > self.len {
                return Ok(Next::End);
            }
            let mut head = [0u8; FRAME_HEAD as usize];
            self.file.read_exact_at(&mut head, offset)?;
            if head.iter().all(|b| *b == 0) {
                return Ok(Next::End);
            }
            let sealed_len = u32::from_le_bytes(head[..4].try_into().expect("4")) as u64;
            let first = u64::from_le_bytes(head[4..12].try_into().expect("8"));
            let count = u32::from_le_bytes(head[12..].try_into().expect("4"));
            let end = offset + FRAME_HEAD + sealed_len;
            let bad = Next::Bad {
                offset,
                first,
                count,
                extent: end.min(self.len),
            };
            if end > self.len || count == 0 {
                return Ok(bad);
            }
            if first + u64::from(count) <= from_seq {
                self.offset = end;
                continue;
            }
            let mut sealed = vec![0u8; sealed_len as usize];
            self.file.read_exact_at(&mut sealed, offset + FRAME_HEAD)?;
            let Some(plain) = self
                .sealer
                .open(&aad(&self.header.node, first, count), &sealed)
            else {
                return Ok(bad);
            };
            let Ok(body) = serde_json::from_slice::<BatchBody>(&plain) else {
                return Ok(bad);
            };
            if body.events.len() != count as usize {
                return Ok(bad);
            }
            self.offset = end;
            return Ok(Next::Batch { first, body });
        }
    }

    /// Whether every byte from `from` to the end of the file is zero (nothing was written
    /// there: a bad frame before it is a torn write, not damage).
    pub fn zeros_from(&self, from: u64) -> io::Result<bool> {
        zeros_from(&self.file, from, self.len)
    }
}

fn zeros_from(file: &File, mut from: u64, len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; 1 << 20];
    while from < len {
        let n = ((len - from) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], from)?;
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
        from += n as u64;
    }
    Ok(true)
}

/// Creates `path` as `size` bytes of zeros, allocated and synced, so that writes into it later
/// change no metadata. Blocks are reserved with `fallocate` first (a full disk fails here, not
/// on a batch), then written: extents fallocate leaves "unwritten" would each cost a metadata
/// update on first write. With `pace`, each MiB is synced on its own and followed by that
/// pause, so the zeros reach the disk in small pieces a batch's sync need not queue behind
/// (the spare, made while the log is in use); without, they are written at once.
pub(crate) fn preallocate(path: &Path, size: u64, pace: Option<Duration>) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    match rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, size) {
        Ok(()) | Err(rustix::io::Errno::OPNOTSUPP) => {}
        Err(e) => return Err(e.into()),
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < size {
        let n = ((size - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
        if let Some(pause) = pace {
            file.sync_data()?;
            std::thread::sleep(pause);
        }
    }
    file.sync_all()
}

/// `fsync`s a folder, so that names created or removed in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
