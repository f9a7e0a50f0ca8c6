//! A read cache of decrypted, parsed records of the tables declared [`Table::cached`] (the
//! registry's connectors, names, connections and their secrets: the records every
//! ResolveCredential reads, which change rarely). Tables declared [`Table::uncached`] (audit
//! records, OAuth states) are never kept. Values are kept parsed because parsing them (JSON, dates)
//! cost more than decrypting them; secrets among them are [`crate::model::Secret`]s, wiped when
//! the last copy is dropped.
//!
//! Invariant: the cache never serves a value older than the last committed write to its key
//! that this process made or was told of. Every write bumps its table's generation before and
//! after it reaches the backend, and drops its keys; a reader caches what it read only if its
//! table's generation did not move while it read. Another replica's write, reported by the
//! coordinator, drops its key and bumps an epoch every generation includes; while changes may
//! be missed ([`ReadCache::suspend`]) nothing is served or kept.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Table;

/// Entries kept at most; past it the cache starts over (simple, and cheap to refill).
const CAPACITY: usize = 16_384;

/// A parsed record, of whatever type its reader asked for.
type Value = Arc<dyn Any + Send + Sync>;

#[derive(Default)]
struct Inner {
    entries: HashMap<Vec<u8>, Value>,
    /// Per table name: bumped by every write to the table.
    generations: HashMap<&'static str, u64>,
    /// Bumped by every change reported from another replica: part of every generation.
    epoch: u64,
    /// Set while another replica's changes may go unreported: every read goes to the backend.
    suspended: bool,
}

#[derive(Default)]
pub struct ReadCache {
    inner: Mutex<Inner>,
}

impl ReadCache {
    /// An empty cache; `suspended`: keeping nothing until [`ReadCache::resume`].
    pub fn new(suspended: bool) -> Self {
        let cache = Self::default();
        cache.lock().suspended = suspended;
        cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the cached value, if one is cached as a `T` (a reader asking for another
    /// type reads the backend instead).
    pub fn get<T: Clone + 'static>(&self, key: &[u8]) -> Option<T> {
        self.lock().entries.get(key)?.downcast_ref::<T>().cloned()
    }

    /// The table's generation, taken before reading the backend.
    pub fn generation(&self, table: Table) -> u64 {
        self.lock().generation(table)
    }

    /// Keeps what a reader read, unless a write to the table began since `generation`.
    pub fn put<T: Send + Sync + 'static>(
        &self,
        table: Table,
        generation: u64,
        key: Vec<u8>,
        value: T,
    ) {
        if !table.is_cached() {
            return;
        }
        let mut inner = self.lock();
        if inner.suspended || inner.generation(table) != generation {
            return;
        }
        if inner.entries.len() >= CAPACITY {
            inner.entries.clear();
        }
        inner.entries.insert(key, Arc::new(value));
    }

    /// Called before and after a write reaches the backend, with the keys it touches.
    pub fn invalidate<'a>(&self, writes: impl IntoIterator<Item = (Table, &'a [u8])>) {
        let mut inner = self.lock();
        for (table, key) in writes {
            *inner.generations.entry(table.name()).or_insert(0) += 1;
            inner.entries.remove(key);
        }
    }

    /// Drops full record keys another replica wrote.
    pub fn invalidate_remote(&self, keys: &[Vec<u8>]) {
        let mut inner = self.lock();
        inner.epoch += 1;
        for key in keys {
            inner.entries.remove(key);
        }
    }

    /// Drops everything and keeps nothing until [`ReadCache::resume`]: changes elsewhere may be
    /// going unreported.
    pub fn suspend(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.suspended = true;
        inner.entries.clear();
    }

    /// Caches again from an empty start, once changes are reported again.
    pub fn resume(&self) {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.suspended = false;
        inner.entries.clear();
    }
}

impl Inner {
    fn generation(&self, table: Table) -> u64 {
        let own = self.generations.get(table.name()).copied().unwrap_or(0);
        own.wrapping_add(self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTIONS: Table = Table::cached("connections");
    const AUDIT: Table = Table::uncached("audit");

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = ReadCache::default();
        let before = cache.generation(CONNECTIONS);
        cache.invalidate([(CONNECTIONS, b"k".as_slice())]);
        cache.put(CONNECTIONS, before, b"k".to_vec(), "old".to_string());
        assert!(cache.get::<String>(b"k").is_none());
        let now = cache.generation(CONNECTIONS);
        cache.put(CONNECTIONS, now, b"k".to_vec(), "new".to_string());
        assert_eq!(cache.get::<String>(b"k").as_deref(), Some("new"));
        assert!(cache.get::<u32>(b"k").is_none(), "another type is a miss");
        // Audit records are never kept.
        let audit = cache.generation(AUDIT);
        cache.put(AUDIT, audit, b"a".to_vec(), "x".to_string());
        assert!(cache.get::<String>(b"a").is_none());
    }

    #[test]
    fn another_replicas_write_drops_the_key_and_a_lost_feed_keeps_nothing() {
        let cache = ReadCache::default();
        let now = cache.generation(CONNECTIONS);
        cache.put(CONNECTIONS, now, b"k".to_vec(), "v".to_string());
        // A read that began before the remote write is not kept.
        let before = cache.generation(CONNECTIONS);
        cache.invalidate_remote(&[b"k".to_vec()]);
        assert!(cache.get::<String>(b"k").is_none());
        cache.put(CONNECTIONS, before, b"k".to_vec(), "old".to_string());
        assert!(cache.get::<String>(b"k").is_none());
        cache.suspend();
        let during = cache.generation(CONNECTIONS);
        cache.put(CONNECTIONS, during, b"k".to_vec(), "v".to_string());
        assert!(
            cache.get::<String>(b"k").is_none(),
            "nothing kept while suspended"
        );
        cache.resume();
        cache.put(CONNECTIONS, during, b"k".to_vec(), "v".to_string());
        assert!(
            cache.get::<String>(b"k").is_none(),
            "a read from before the resume"
        );
        let after = cache.generation(CONNECTIONS);
        cache.put(CONNECTIONS, after, b"k".to_vec(), "v".to_string());
        assert_eq!(cache.get::<String>(b"k").as_deref(), Some("v"));
    }
}
