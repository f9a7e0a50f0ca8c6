//! A read cache of decrypted registry records (connectors, names, connections and their
//! secrets): the records every ResolveCredential reads, which change rarely. Audit records and
//! OAuth states are never cached.
//!
//! Invariant: the cache never serves a value older than the last committed write to its key.
//! Every write bumps its table's generation before and after it reaches the backend, and drops
//! its keys; a reader caches what it read only if its table's generation did not move while it
//! read. Plaintexts are zeroized when they leave the cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use super::Table;

/// Entries kept at most; past it the cache starts over (simple, and cheap to refill).
const CAPACITY: usize = 16_384;

pub type Plain = Arc<Zeroizing<Vec<u8>>>;

#[derive(Default)]
struct Inner {
    entries: HashMap<Vec<u8>, Plain>,
    generations: [u64; Table::ALL.len()],
}

#[derive(Default)]
pub struct ReadCache {
    inner: Mutex<Inner>,
}

pub(super) fn cached(table: Table) -> bool {
    !matches!(table, Table::Audit | Table::OAuthStates)
}

impl ReadCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8]) -> Option<Plain> {
        self.lock().entries.get(key).cloned()
    }

    /// The table's generation, taken before reading the backend.
    pub fn generation(&self, table: Table) -> u64 {
        self.lock().generations[table as usize]
    }

    /// Keeps what a reader read, unless a write to the table began since `generation`.
    pub fn put(&self, table: Table, generation: u64, key: Vec<u8>, plain: Plain) {
        if !cached(table) {
            return;
        }
        let mut inner = self.lock();
        if inner.generations[table as usize] != generation {
            return;
        }
        if inner.entries.len() >= CAPACITY {
            inner.entries.clear();
        }
        inner.entries.insert(key, plain);
    }

    /// Called before and after a write reaches the backend, with the keys it touches.
    pub fn invalidate<'a>(&self, writes: impl IntoIterator<Item = (Table, &'a [u8])>) {
        let mut inner = self.lock();
        for (table, key) in writes {
            inner.generations[table as usize] += 1;
            inner.entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = ReadCache::default();
        let before = cache.generation(Table::Connections);
        cache.invalidate([(Table::Connections, b"k".as_slice())]);
        cache.put(
            Table::Connections,
            before,
            b"k".to_vec(),
            Arc::new(Zeroizing::new(b"old".to_vec())),
        );
        assert!(cache.get(b"k").is_none());
        let now = cache.generation(Table::Connections);
        cache.put(
            Table::Connections,
            now,
            b"k".to_vec(),
            Arc::new(Zeroizing::new(b"new".to_vec())),
        );
        assert_eq!(cache.get(b"k").unwrap().as_slice(), b"new");
        // Audit records are never kept.
        let audit = cache.generation(Table::Audit);
        cache.put(
            Table::Audit,
            audit,
            b"a".to_vec(),
            Arc::new(Zeroizing::new(b"x".to_vec())),
        );
        assert!(cache.get(b"a").is_none());
    }
}
