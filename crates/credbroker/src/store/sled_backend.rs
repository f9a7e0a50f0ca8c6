//! The sled 0.34 backend: one tree for records, sled's default tree for metadata.
//!
//! Durability: sled 0.34's `flush` writes its log buffer and then, on Linux, only calls
//! `sync_file_range`, which neither flushes the device's write cache nor writes the file's
//! metadata, and it writes large pages to `blobs/` files without syncing them at all (its own
//! `fsync` runs in a background thread every 500 ms). A write it acknowledged would survive
//! the process being killed, not a power loss. So [`SledBackend::sync`] follows sled's flush
//! with an `fdatasync` of the log file and an `fsync` of every new blob file and of their
//! directory, through handles of our own (`fsync` acts on the file, whichever handle asks).
//!
//! sled is synchronous and local: every [`Backend`] method does its work inline and returns a
//! future that is ready at once (no thread hop on the read path). Whether a folder holds a
//! store is decided here alone, from sled's `conf` file ([`check_intent`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use async_trait::async_trait;

use super::{Backend, Intent, RawEntry, RawOp, StoreError};

/// The `[store] backend` value naming this engine (the default).
pub const NAME: &str = "sled";

/// sled's page cache. Its default (1 GiB) fills with audit records, which are written once and
/// rarely read, so a long-running daemon's memory grew by a gigabyte; the records resolve reads
/// are kept decrypted by the store's own read cache instead.
const PAGE_CACHE_BYTES: u64 = 64 * 1024 * 1024;

pub struct SledBackend {
    db: sled::Db,
    path: PathBuf,
    records: sled::Tree,
    /// sled's log file, opened only to sync it.
    log: std::fs::File,
    blobs: PathBuf,
    /// Blob files already synced (those sled removed are dropped at the next sync).
    synced_blobs: Mutex<HashSet<OsString>>,
    /// Set by the first failed sync. Linux reports a failed writeback once and then forgets
    /// it, so a later sync could succeed over lost data: after one failure, none succeeds.
    sync_failed: AtomicBool,
    /// Held exclusively by each batch's apply, shared by each `get_many`: sled makes each get
    /// atomic with a batch but not two, so this is what makes several keys one moment.
    batches: RwLock<()>,
}

const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn backend_error(e: sled::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Refuses a folder that does not suit `intent`, before sled creates anything in it.
fn check_intent(path: &Path, intent: Intent) -> Result<(), StoreError> {
    let shown = || path.display().to_string();
    match intent {
        Intent::Create => Ok(()),
        Intent::Existing if path.join("conf").exists() => Ok(()),
        Intent::Existing => Err(StoreError::NotInitialized { path: shown() }),
        Intent::Empty => match std::fs::read_dir(path).map(|mut entries| entries.next()) {
            Ok(Some(_)) => Err(StoreError::NotEmpty { path: shown() }),
            Ok(None) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Backend(format!("{}: {e}", shown()))),
        },
    }
}

impl SledBackend {
    /// Opens the folder at `path` for `intent`, waiting up to [`LOCK_WAIT`] for a lock that is being released: sled's
    /// flusher thread still holds a just-closed store for a moment.
    pub fn open(path: &Path, intent: Intent) -> Result<Self, StoreError> {
        check_intent(path, intent)?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match Self::try_open(path) {
                Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(PAGE_CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io)
                    if io.kind() == std::io::ErrorKind::WouldBlock
                        || io.to_string().contains("lock") =>
                {
                    StoreError::Locked {
                        path: path.display().to_string(),
                    }
                }
                other => StoreError::Backend(format!("cannot open {}: {other}", path.display())),
            })?;
        let records = db.open_tree("records").map_err(backend_error)?;
        let log = std::fs::File::open(path.join("db"))
            .map_err(|e| StoreError::Backend(format!("cannot open sled's log file: {e}")))?;
        let backend = Self {
            db,
            path: path.to_path_buf(),
            records,
            log,
            blobs: path.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
            sync_failed: AtomicBool::new(false),
            batches: RwLock::new(()),
        };
        // Whatever an earlier process left unsynced is synced before anything is acknowledged,
        // and so are the directory entries of a store just created.
        backend.sync_now()?;
        std::fs::File::open(path)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| StoreError::Sync(e.to_string()))?;
        Ok(backend)
    }

    /// `fsync`s the blob files written since the last call, then their directory.
    fn sync_new_blobs(&self) -> Result<(), SyncFailure> {
        let mut synced = self.synced_blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut present = HashSet::new();
        let mut new = false;
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(SyncFailure::Open(e)),
        };
        for entry in entries {
            let entry = entry.map_err(SyncFailure::Open)?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match std::fs::File::open(entry.path()) {
                    Ok(file) => file.sync_all().map_err(SyncFailure::Data)?,
                    // Removed by sled meanwhile: nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(SyncFailure::Open(e)),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&self.blobs)
                .map_err(SyncFailure::Open)?
                .sync_all()
                .map_err(SyncFailure::Data)?;
        }
        // Only now: a sync cut short leaves its blobs to be synced by the next one.
        *synced = present;
        Ok(())
    }

    /// sled's flush, then the syncs it leaves out (see the module comment).
    fn sync_now(&self) -> Result<(), StoreError> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::Sync(
                "an earlier sync failed, so later writes may not be on disk; restart the daemon"
                    .into(),
            ));
        }
        let synced = self
            .db
            .flush()
            .map(drop)
            .map_err(|e| SyncFailure::Data(std::io::Error::other(e.to_string())))
            .and_then(|()| self.log.sync_data().map_err(SyncFailure::Data))
            .and_then(|()| self.sync_new_blobs());
        synced.map_err(|failure| match failure {
            // Nothing was written back, so no writeback error was reported and forgotten: this
            // sync failed (its writes are not acknowledged) and the next one may succeed.
            SyncFailure::Open(e) => StoreError::Sync(format!(
                "the sync could not start (retried on the next): {e}"
            )),
            SyncFailure::Data(e) => {
                self.sync_failed.store(true, Ordering::Release);
                StoreError::Sync(e.to_string())
            }
        })
    }
}

/// Why a sync failed: the data's writeback failed (fatal: Linux reports that once), or a file
/// or folder could not even be opened or listed (descriptors ran out, say), which loses nothing.
#[derive(Debug)]
enum SyncFailure {
    Data(std::io::Error),
    Open(std::io::Error),
}

#[async_trait]
impl Backend for SledBackend {
    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .records
            .get(key)
            .map_err(backend_error)?
            .map(|v| v.to_vec()))
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let _no_batch = self.batches.read().unwrap_or_else(|p| p.into_inner());
        keys.iter()
            .map(|key| {
                Ok(self
                    .records
                    .get(key)
                    .map_err(backend_error)?
                    .map(|v| v.to_vec()))
            })
            .collect()
    }

    async fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StoreError> {
        let iter = match after {
            Some(after) => {
                let mut start = after.to_vec();
                start.push(0);
                self.records.range(start..)
            }
            None => self.records.range(prefix.to_vec()..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(backend_error)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    async fn last_with_prefix(
        &self,
        prefix: &[u8],
        at_most: Option<&[u8]>,
    ) -> Result<Option<RawEntry>, StoreError> {
        let last = match at_most {
            Some(at_most) => self.records.range(prefix..=at_most).next_back(),
            None => self.records.scan_prefix(prefix).next_back(),
        }
        .transpose()
        .map_err(backend_error)?;
        Ok(last
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    async fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (key, value) in ops {
            match value {
                Some(value) => batch.insert(key, value),
                None => batch.remove(key),
            }
        }
        let _alone = self.batches.write().unwrap_or_else(|p| p.into_inner());
        self.records.apply_batch(batch).map_err(backend_error)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.sync_now()
    }

    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(backend_error)?.map(|v| v.to_vec()))
    }

    async fn meta_scan(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(backend_error)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    async fn replace_if(&self, key: &[u8], old: &[u8], new: Vec<u8>) -> Result<bool, StoreError> {
        Ok(self
            .records
            .compare_and_swap(key, Some(old), Some(new))
            .map_err(backend_error)?
            .is_ok())
    }

    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.db
            .insert(key, value)
            .map(|_| ())
            .map_err(backend_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = "CREDBROKER_TEST_FD_SHORTAGE_DIR";

    /// Runs [`child_under_fd_shortage`] in a child process (descriptors are per process, and
    /// the other tests of this binary must not run short).
    #[test]
    fn a_descriptor_shortage_fails_one_sync_and_never_latches() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::sled_backend::tests::child_under_fd_shortage",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{shown}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            shown.contains("shortage: sync refused, then recovered"),
            "{shown}"
        );
    }

    #[test]
    fn child_under_fd_shortage() {
        let Some(dir) = std::env::var_os(CHILD) else {
            return;
        };
        let backend = SledBackend::open(&Path::new(&dir).join("db"), Intent::Create).unwrap();
        let put = |key: &str, len: usize| {
            let ops = vec![(key.as_bytes().to_vec(), Some(vec![7u8; len]))];
            futures::executor::block_on(backend.apply(ops)).unwrap();
        };
        // A large value (sled writes it as a blob file) and a small one.
        put("big-1", 1 << 20);
        put("small-1", 10);
        futures::executor::block_on(backend.sync()).unwrap();
        // Every descriptor taken, as 1,100 idle TLS connections took them from the daemon.
        // (Under a limit of 512, so that taking them all is quick.)
        let limit = libc::rlimit {
            rlim_cur: 512,
            rlim_max: 512,
        };
        // SAFETY: setrlimit reads a plain struct; this process is the test's child alone.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
        let mut hoard = Vec::new();
        while let Ok(file) = std::fs::File::open("/dev/null") {
            hoard.push(file);
            assert!(hoard.len() <= 512, "no descriptor limit to reach");
        }
        // (A small write: sled itself needs a descriptor to write a blob file.)
        put("small-2", 10);
        let short = futures::executor::block_on(backend.sync());
        assert!(matches!(short, Err(StoreError::Sync(_))), "{short:?}");
        assert!(!backend.sync_failed.load(Ordering::Acquire), "latched");
        drop(hoard);
        // Descriptors back: syncs succeed again, no restart, and the data is all there.
        futures::executor::block_on(backend.sync()).unwrap();
        put("big-2", 1 << 20);
        futures::executor::block_on(backend.sync()).unwrap();
        for key in ["big-1", "big-2", "small-1", "small-2"] {
            let got = futures::executor::block_on(backend.get(key.as_bytes())).unwrap();
            assert!(got.is_some(), "{key}");
        }
        println!("shortage: sync refused, then recovered");
    }
}
