//! Free space on the store's disk, watched so that an operator hears of a filling disk before
//! the audit log can no longer be written (then every call fails closed).
//!
//! Invariants: the free byte count is refreshed every [`CHECK_EVERY`] by one background task and
//! read lock-free by `/metrics`; crossing below the watermark logs one warning (and one when
//! space is back), not one per check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const CHECK_EVERY: Duration = Duration::from_secs(30);

/// Bytes available to the daemon on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: statvfs(3) with a NUL-terminated path and a pointer to writable memory of the
    // right type; the struct is read only after it reported success.
    let status = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if status != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it filled the struct.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// The last free-space reading of the store's disk.
#[derive(Debug, Default)]
pub struct DiskWatch {
    free: AtomicU64,
}

impl DiskWatch {
    /// Starts watching `path`; warns when less than `watermark` bytes are free.
    pub fn start(path: PathBuf, watermark: u64) -> Arc<Self> {
        let watch = Arc::new(Self::default());
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            let mut low = false;
            let mut tick = tokio::time::interval(CHECK_EVERY);
            loop {
                tick.tick().await;
                let Some(watch) = weak.upgrade() else {
                    return;
                };
                let free = match free_bytes(&path) {
                    Ok(free) => free,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read free disk space");
                        continue;
                    }
                };
                watch.free.store(free, Ordering::Relaxed);
                if (free < watermark) != low {
                    low = free < watermark;
                    if low {
                        tracing::warn!(free, watermark, path = %path.display(), "the store's disk is nearly full: once the audit log cannot be written, every call is refused");
                    } else {
                        tracing::info!(free, path = %path.display(), "the store's disk has space again");
                    }
                }
            }
        });
        watch
    }

    /// Free bytes at the last check (0 before the first).
    pub fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_space_is_read_and_a_bad_path_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(super::free_bytes(dir.path()).unwrap() > 0);
        assert!(super::free_bytes(&dir.path().join("missing")).is_err());
    }
}
