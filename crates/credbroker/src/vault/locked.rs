//! Key bytes kept in a memory page of their own, locked in RAM (`mlock`) where the system
//! allows it, so the kernel never writes them to swap; wiped and unlocked on drop.
//!
//! Invariant: each [`LockedKey`] owns its page alone (the allocation is page-sized and
//! page-aligned), so unlocking one key on drop never unlocks another's page.

use std::sync::Once;

use zeroize::Zeroize;

/// The page size this layout assumes; where the system's differs, keys are not locked (a
/// larger page could be shared with other data, and unlocking it would unlock that too).
const PAGE: usize = 4096;

/// A page holding one key; its size is rounded up to its alignment: one whole page.
#[repr(C, align(4096))]
struct Page([u8; 32]);

const _: () = assert!(std::mem::size_of::<Page>() == PAGE);

/// 32 bytes of key material, locked in memory where allowed, wiped on drop, never printed.
pub struct LockedKey {
    page: Box<Page>,
    locked: bool,
}

impl LockedKey {
    /// Copies `bytes` into a fresh locked page; the caller wipes its own copy.
    pub fn new(bytes: &[u8; 32]) -> Self {
        let mut page = Box::new(Page([0; 32]));
        page.0.copy_from_slice(bytes);
        let locked = lock(&page);
        Self { page, locked }
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.page.0
    }
}

impl Clone for LockedKey {
    fn clone(&self) -> Self {
        Self::new(&self.page.0)
    }
}

impl Drop for LockedKey {
    fn drop(&mut self) {
        self.page.0.zeroize();
        if self.locked {
            // SAFETY: munlock takes an address range and touches no memory; the range is this
            // key's own page, still allocated (the Box is freed after this returns).
            unsafe {
                libc::munlock(std::ptr::from_ref::<Page>(&self.page).cast(), PAGE);
            }
        }
    }
}

impl std::fmt::Debug for LockedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LockedKey(<redacted>)")
    }
}

/// Locks `page` in RAM; warns once (and goes on) when the system refuses, e.g. past
/// `RLIMIT_MEMLOCK` without CAP_IPC_LOCK.
fn lock(page: &Page) -> bool {
    // SAFETY: sysconf reads a system constant.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_size != PAGE as libc::c_long {
        warn_once(&format!("the page size is {page_size}, not {PAGE}"));
        return false;
    }
    // SAFETY: mlock takes an address range and touches no memory; the range is exactly the
    // page `page` occupies, which the caller's Box keeps allocated until the key is dropped.
    let status = unsafe { libc::mlock(std::ptr::from_ref(page).cast(), PAGE) };
    if status != 0 {
        warn_once(&std::io::Error::last_os_error().to_string());
    }
    status == 0
}

fn warn_once(why: &str) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            why,
            "key material cannot be locked in memory and could reach swap (raise LimitMEMLOCK)"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kilobytes the kernel reports as locked for this process.
    fn locked_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Whether this process may lock many pages (`Max locked memory` ≥ 1 MiB, 256 keys).
    fn may_lock() -> bool {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        soft == "unlimited" || soft.parse::<u64>().unwrap() >= 1024 * 1024
    }

    #[test]
    fn a_key_is_locked_where_allowed() {
        let key = LockedKey::new(&[7; 32]);
        assert_eq!(key.locked, may_lock(), "mlock refused within the limit");
        assert_eq!(key.bytes(), &[7; 32]);
        assert_eq!(
            std::ptr::from_ref(key.page.as_ref()) as usize % PAGE,
            0,
            "the key's page is its own"
        );
        let copy = key.clone();
        assert_eq!(copy.bytes(), key.bytes());
        assert_eq!(copy.locked, key.locked);
        if key.locked {
            assert!(
                locked_kib() >= 8,
                "two locked keys, {} KiB locked",
                locked_kib()
            );
        }
        assert_eq!(format!("{key:?}"), "LockedKey(<redacted>)");
    }
}
