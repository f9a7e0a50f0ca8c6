//! Backups: a consistent snapshot of the raw store (header, metadata, every envelope still
//! sealed) in a self-checking file, and the restore of such a file into an empty folder.
//!
//! File format (all lengths u32 big-endian):
//!
//! ```text
//! "credbroker-backup/1\n"
//! frame*   where frame = tag (1 byte) | key length | key | value length | value
//!          tag 'M' = metadata entry (the header is the one under "header"), 'R' = record
//! 'E' frame with key "sha256" and value = SHA-256 of every byte before this frame
//! ```
//!
//! Nothing is decrypted to make or check a backup: it is exactly as confidential as the store,
//! and opens only with the store's key.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{HEADER_KEY, Intent, RawEntry, Store, StoreError, open_backend};
use crate::config::StoreConfig;
use crate::vault::{Header, KeySource, VaultError};

const MAGIC: &[u8] = b"credbroker-backup/1\n";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a credbroker backup (bad magic)")]
    NotABackup,
    #[error("the backup is truncated or damaged: {0}")]
    Damaged(&'static str),
    #[error("the backup's checksum does not match: the file was altered or truncated")]
    Checksum,
    #[error("the backup holds no store header")]
    NoHeader,
    #[error(
        "{path} is not empty; restore only into a new, empty folder (a live or existing store is never overwritten)"
    )]
    TargetNotEmpty { path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Everything a store holds, as raw bytes, taken at one instant between commits.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// Metadata entries (header, counter reservations, rewrap progress).
    pub meta: Vec<(String, Vec<u8>)>,
    /// Records: full key and envelope.
    pub records: Vec<RawEntry>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("meta", &self.meta.len())
            .field("records", &self.records.len())
            .finish()
    }
}

fn frame(out: &mut Vec<u8>, tag: u8, key: &[u8], value: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

impl Snapshot {
    pub fn header(&self) -> Result<Header, BackupError> {
        let (_, raw) = self
            .meta
            .iter()
            .find(|(k, _)| k == HEADER_KEY)
            .ok_or(BackupError::NoHeader)?;
        serde_json::from_slice(raw).map_err(|e| VaultError::HeaderCorrupt(e.to_string()).into())
    }

    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self
            .records
            .iter()
            .map(|(k, v)| k.len() + v.len() + 9)
            .sum();
        let mut out = Vec::with_capacity(MAGIC.len() + size + 4096);
        out.extend_from_slice(MAGIC);
        for (k, v) in &self.meta {
            frame(&mut out, b'M', k.as_bytes(), v);
        }
        for (k, v) in &self.records {
            frame(&mut out, b'R', k, v);
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        frame(&mut out, b'E', b"sha256", &sum);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, BackupError> {
        if !bytes.starts_with(MAGIC) {
            return Err(BackupError::NotABackup);
        }
        let mut pos = MAGIC.len();
        let mut snapshot = Snapshot::default();
        loop {
            let start = pos;
            let tag = *bytes.get(pos).ok_or(BackupError::Damaged("no end frame"))?;
            pos += 1;
            let take = |pos: &mut usize| -> Result<&[u8], BackupError> {
                let len_bytes = bytes
                    .get(*pos..*pos + 4)
                    .ok_or(BackupError::Damaged("frame cut short"))?;
                let len = u32::from_be_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
                *pos += 4;
                let field = bytes
                    .get(*pos..*pos + len)
                    .ok_or(BackupError::Damaged("frame cut short"))?;
                *pos += len;
                Ok(field)
            };
            let key = take(&mut pos)?;
            let value = take(&mut pos)?;
            match tag {
                b'M' => snapshot.meta.push((
                    String::from_utf8(key.to_vec())
                        .map_err(|_| BackupError::Damaged("metadata key is not UTF-8"))?,
                    value.to_vec(),
                )),
                b'R' => snapshot.records.push((key.to_vec(), value.to_vec())),
                b'E' => {
                    let sum: [u8; 32] = Sha256::digest(&bytes[..start]).into();
                    if key != b"sha256" || value != sum {
                        return Err(BackupError::Checksum);
                    }
                    if pos != bytes.len() {
                        return Err(BackupError::Damaged("bytes after the end frame"));
                    }
                    return Ok(snapshot);
                }
                _ => return Err(BackupError::Damaged("unknown frame")),
            }
        }
    }
}

impl Snapshot {
    /// Reads and checks a backup file.
    pub fn read_file(path: &Path) -> Result<Snapshot, BackupError> {
        let bytes = std::fs::read(path).map_err(|source| BackupError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Snapshot::decode(&bytes)
    }
}

/// Writes backup bytes to a new file at `out`, durably: into `{out}.partial` (owner-only, as
/// confidential as the store), synced, renamed, and the folder synced. An existing `out` is
/// never overwritten; on any failure the partial file is removed.
pub fn write_backup_file(out: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| BackupError::Io {
        path: out.display().to_string(),
        source,
    };
    if out.exists() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "exists; refusing to overwrite it",
        )));
    }
    let partial = out.with_extension("partial");
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&partial, out)?;
        let folder = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(folder)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written.map_err(io)
}

impl Store {
    /// A consistent copy of everything: commits are held off (not failed) while it is read.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let _quiet = self.gate.write().await;
        Ok(Snapshot {
            meta: self.backend.meta_scan().await?,
            records: self.backend.scan_prefix(b"", None, usize::MAX).await?,
        })
    }
}

/// Writes `snapshot` as a new store where `config` says, which must hold nothing yet (for sled:
/// a folder that does not exist or is empty), after checking that `source` unlocks its header.
/// The header is written last: an interrupted restore leaves no store that opens.
pub async fn restore(
    config: &StoreConfig,
    snapshot: &Snapshot,
    source: &KeySource,
) -> Result<(), BackupError> {
    let header = snapshot.header()?;
    header.unlock(source)?;
    let backend = match open_backend(config, Intent::Empty).await {
        Err(StoreError::NotEmpty { path }) => return Err(BackupError::TargetNotEmpty { path }),
        other => other?,
    };
    for (key, value) in snapshot.meta.iter().filter(|(k, _)| k != HEADER_KEY) {
        backend.meta_put(key, value).await?;
    }
    for chunk in snapshot.records.chunks(1024) {
        let ops = chunk
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone())))
            .collect();
        backend.apply(ops).await?;
    }
    backend.sync().await?;
    let (_, raw_header) = snapshot
        .meta
        .iter()
        .find(|(k, _)| k == HEADER_KEY)
        .ok_or(BackupError::NoHeader)?;
    backend.meta_put(HEADER_KEY, raw_header).await?;
    backend.sync().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            meta: vec![
                ("header".into(), b"{}".to_vec()),
                ("reserved/1".into(), vec![0; 8]),
            ],
            records: vec![
                (b"audit\0head".to_vec(), vec![1, 2, 3]),
                (b"x\0y".to_vec(), vec![]),
            ],
        }
    }

    #[test]
    fn round_trip_and_every_alteration_is_caught() {
        let bytes = sample().encode();
        let back = Snapshot::decode(&bytes).unwrap();
        assert_eq!(back.meta, sample().meta);
        assert_eq!(back.records, sample().records);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(Snapshot::decode(&bad).is_err(), "flip at {i} accepted");
        }
        for len in 0..bytes.len() {
            assert!(
                Snapshot::decode(&bytes[..len]).is_err(),
                "cut at {len} accepted"
            );
        }
    }
}
