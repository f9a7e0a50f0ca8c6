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
//!
//! Invariant: records read as a pair ([`ReadCache::get_pair`]: a connection and its secrets)
//! are served from the cache only as they were read together, from one backend snapshot. Each
//! key alone may lag another replica's write until its notification arrives, and the two keys'
//! notifications may arrive apart: a pair taken key by key could join a new connection to old
//! secrets (an expired token served as fresh).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Table;

/// Entries kept at most; past it the cache starts over (simple, and cheap to refill).
const CAPACITY: usize = 16_384;

/// A parsed record, of whatever type its reader asked for.
type Value = Arc<dyn Any + Send + Sync>;

struct Entry {
    value: Value,
    /// Shared by the two entries of a pair filled together; 0 for an entry filled alone.
    pair: u64,
}

/// What a reader read from the backend, to keep if no write began since `generation`.
pub struct Fill<T> {
    pub table: Table,
    pub generation: u64,
    pub key: Vec<u8>,
    pub value: T,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Vec<u8>, Entry>,
    /// The last pair id handed out.
    pairs: u64,
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
        self.lock()
            .entries
            .get(key)?
            .value
            .downcast_ref::<T>()
            .cloned()
    }

    /// Copies of a pair's values, only if they were kept together ([`ReadCache::put_pair`]).
    pub fn get_pair<A: Clone + 'static, B: Clone + 'static>(
        &self,
        a: &[u8],
        b: &[u8],
    ) -> Option<(A, B)> {
        let inner = self.lock();
        let (a, b) = (inner.entries.get(a)?, inner.entries.get(b)?);
        if a.pair == 0 || a.pair != b.pair {
            return None;
        }
        let a = a.value.downcast_ref::<A>()?.clone();
        Some((a, b.value.downcast_ref::<B>()?.clone()))
    }

    /// The table's generation, taken before reading the backend.
    pub fn generation(&self, table: Table) -> u64 {
        self.lock().generation(table)
    }

    /// Keeps what a reader read, unless a write to its table began since it started.
    pub fn put<T: Send + Sync + 'static>(&self, fill: Fill<T>) {
        let mut inner = self.lock();
        if inner.keeps(&fill) {
            inner.insert(fill, 0);
        }
    }

    /// Keeps two records read from one backend snapshot as a pair, or neither.
    pub fn put_pair<A: Send + Sync + 'static, B: Send + Sync + 'static>(
        &self,
        a: Fill<A>,
        b: Fill<B>,
    ) {
        let mut inner = self.lock();
        if inner.keeps(&a) && inner.keeps(&b) {
            inner.pairs += 1;
            let pair = inner.pairs;
            inner.insert(a, pair);
            inner.insert(b, pair);
        }
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

    fn keeps<T>(&self, fill: &Fill<T>) -> bool {
        fill.table.is_cached() && !self.suspended && self.generation(fill.table) == fill.generation
    }

    fn insert<T: Send + Sync + 'static>(&mut self, fill: Fill<T>, pair: u64) {
        if self.entries.len() >= CAPACITY {
            self.entries.clear();
        }
        let value = Arc::new(fill.value);
        self.entries.insert(fill.key, Entry { value, pair });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTIONS: Table = Table::cached("connections");
    const SECRETS: Table = Table::cached("secrets");
    const AUDIT: Table = Table::uncached("audit");

    fn put(cache: &ReadCache, table: Table, generation: u64, key: &[u8], value: &str) {
        cache.put(fill(table, generation, key, value));
    }

    fn fill(table: Table, generation: u64, key: &[u8], value: &str) -> Fill<String> {
        Fill {
            table,
            generation,
            key: key.to_vec(),
            value: value.to_string(),
        }
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_kept() {
        let cache = ReadCache::default();
        let before = cache.generation(CONNECTIONS);
        cache.invalidate([(CONNECTIONS, b"k".as_slice())]);
        put(&cache, CONNECTIONS, before, b"k", "old");
        assert!(cache.get::<String>(b"k").is_none());
        let now = cache.generation(CONNECTIONS);
        put(&cache, CONNECTIONS, now, b"k", "new");
        assert_eq!(cache.get::<String>(b"k").as_deref(), Some("new"));
        assert!(cache.get::<u32>(b"k").is_none(), "another type is a miss");
        // Audit records are never kept.
        let audit = cache.generation(AUDIT);
        put(&cache, AUDIT, audit, b"a", "x");
        assert!(cache.get::<String>(b"a").is_none());
    }

    #[test]
    fn another_replicas_write_drops_the_key_and_a_lost_feed_keeps_nothing() {
        let cache = ReadCache::default();
        let now = cache.generation(CONNECTIONS);
        put(&cache, CONNECTIONS, now, b"k", "v");
        // A read that began before the remote write is not kept.
        let before = cache.generation(CONNECTIONS);
        cache.invalidate_remote(&[b"k".to_vec()]);
        assert!(cache.get::<String>(b"k").is_none());
        put(&cache, CONNECTIONS, before, b"k", "old");
        assert!(cache.get::<String>(b"k").is_none());
        cache.suspend();
        let during = cache.generation(CONNECTIONS);
        put(&cache, CONNECTIONS, during, b"k", "v");
        assert!(
            cache.get::<String>(b"k").is_none(),
            "nothing kept while suspended"
        );
        cache.resume();
        put(&cache, CONNECTIONS, during, b"k", "v");
        assert!(
            cache.get::<String>(b"k").is_none(),
            "a read from before the resume"
        );
        let after = cache.generation(CONNECTIONS);
        put(&cache, CONNECTIONS, after, b"k", "v");
        assert_eq!(cache.get::<String>(b"k").as_deref(), Some("v"));
    }

    /// The defect of issue 19 in miniature: another replica refreshed a token, writing the
    /// connection (new expiry) and its secrets (new token) in one batch; the notification of the
    /// connection's key arrives, the secrets' has not yet. Read key by key, a reader would join
    /// the connection it rereads to the old token still cached; read as a pair, it misses.
    #[test]
    fn a_pair_is_served_only_as_it_was_read_together() {
        let cache = ReadCache::default();
        let (c, s) = (cache.generation(CONNECTIONS), cache.generation(SECRETS));
        cache.put_pair(
            fill(CONNECTIONS, c, b"c", "expires 10:00"),
            fill(SECRETS, s, b"s", "token 1"),
        );
        let pair = cache.get_pair::<String, String>(b"c", b"s");
        assert_eq!(pair, Some(("expires 10:00".into(), "token 1".into())));

        cache.invalidate_remote(&[b"c".to_vec()]);
        let now = cache.generation(CONNECTIONS);
        put(&cache, CONNECTIONS, now, b"c", "expires 11:00");
        assert_eq!(
            cache.get::<String>(b"s").as_deref(),
            Some("token 1"),
            "the old token"
        );
        assert_eq!(cache.get_pair::<String, String>(b"c", b"s"), None);

        // Filled again from one snapshot, the pair is served; a write to either breaks it.
        let (c, s) = (cache.generation(CONNECTIONS), cache.generation(SECRETS));
        cache.put_pair(
            fill(CONNECTIONS, c, b"c", "expires 11:00"),
            fill(SECRETS, s, b"s", "token 2"),
        );
        let pair = cache.get_pair::<String, String>(b"c", b"s");
        assert_eq!(pair, Some(("expires 11:00".into(), "token 2".into())));
        let stale = cache.generation(SECRETS);
        cache.invalidate([(SECRETS, b"s".as_slice())]);
        assert_eq!(cache.get_pair::<String, String>(b"c", b"s"), None);
        // A pair whose read raced a write to either table is not kept.
        cache.put_pair(
            fill(
                CONNECTIONS,
                cache.generation(CONNECTIONS),
                b"c",
                "expires 11:00",
            ),
            fill(SECRETS, stale, b"s", "token 2"),
        );
        assert_eq!(cache.get_pair::<String, String>(b"c", b"s"), None);
        assert!(cache.get::<String>(b"s").is_none(), "neither half kept");
    }
}
