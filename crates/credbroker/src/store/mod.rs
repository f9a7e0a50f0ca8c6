//! The store owns persistence: typed records, sealed by the vault, kept by a [`Backend`] (the
//! one `[store] backend` names, opened by [`open_backend`]), written in atomic batches that are
//! durable when [`Store::commit`] returns.
//!
//! Invariants:
//! - every value reaching the backend is an envelope sealed for its own record key; only the
//!   header and the vault's counter reservations (nothing secret) are stored in the clear;
//! - a commit returns only after the backend has synced it; concurrent commits share one sync
//!   ([`group_commit`]);
//! - the store is schema-blind: the layers above declare their [`Table`]s;
//! - [`Store::get_pair`] returns two records of one path as of one moment (from the cache only
//!   if they were kept together, else from one backend snapshot).
//!
//! Reads are async because a backend's reads may be network calls. They are plain `async fn`s
//! (not boxed), so a read-cache hit never reaches the backend and allocates no future; only a
//! miss pays for the backend's boxed future.
//!
//! The vault's persistence hooks (a counter reservation every 64 Ki seals, a rotation's
//! keyring write) are synchronous, so they wait for the backend with [`wait_inline`]; so does
//! the group-commit thread, which is not a runtime worker.

mod backend;
mod backup;
mod cache;
mod coord;
mod group_commit;
pub(crate) mod pg_coord;
pub mod postgres_backend;
mod rotation;
mod sled_backend;

pub use backend::{BACKENDS, Backend, Intent, RawEntry, RawOp, open_backend};
pub use backup::{BackupError, Snapshot, restore, write_backup_file};
pub use coord::{Change, Coordinator, JobGuard, Lease, LocalCoordinator, open_coordinator};
pub use postgres_backend::{PgBackend, PgUrl};
pub use rotation::{RewrapState, RewrapStep, change_key};

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::config::StoreConfig;
use crate::vault::{Header, Kek, KeySource, Vault, VaultError};
use group_commit::GroupCommit;

/// A value the store reads through its cache: parsed once, then copied out to readers.
pub trait Record: DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Record for T {}

/// A logical table, declared by the layer that owns its records (the registry, say).
/// A record's full key is `name ‖ 0x00 ‖ path`; the envelope is bound to it. Names are unique
/// across the crate and contain no 0 byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Table {
    name: &'static str,
    cached: bool,
}

impl Table {
    /// A table whose records the read cache keeps parsed: small, read often, changed rarely.
    pub const fn cached(name: &'static str) -> Table {
        Table { name, cached: true }
    }

    /// A table read through to the backend every time (written once, or read once).
    pub const fn uncached(name: &'static str) -> Table {
        Table {
            name,
            cached: false,
        }
    }

    pub const fn name(self) -> &'static str {
        self.name
    }

    pub(crate) const fn is_cached(self) -> bool {
        self.cached
    }

    fn key(self, path: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.name.len() + 1 + path.len());
        key.extend_from_slice(self.name.as_bytes());
        key.push(0);
        key.extend_from_slice(path.as_bytes());
        key
    }

    /// The path of a full record key of this table.
    fn path_of(self, key: &[u8]) -> String {
        String::from_utf8_lossy(&key[self.name.len() + 1..]).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no store at {path}: create one with `credbroker init`")]
    NotInitialized { path: String },
    #[error("a store already exists at {path}; refusing to overwrite it")]
    AlreadyExists { path: String },
    #[error("{path} is not empty")]
    NotEmpty { path: String },
    #[error("the store at {path} is in use by another process")]
    Locked { path: String },
    #[error("[store] backend = {name:?} is not a known store backend (known: {known})", known = BACKENDS.join(", "))]
    UnknownBackend { name: String },
    #[error("storage error: {0}")]
    Backend(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("record {record} does not decode: {why}")]
    Decode { record: String, why: String },
    #[error("the write could not be made durable: {0}")]
    Sync(String),
    #[error("the store at {location} is unavailable: {source}")]
    Unavailable {
        location: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the store at {location} did not answer within {waited_ms} ms")]
    Timeout { location: String, waited_ms: u64 },
    #[error("the store at {location} refused a statement (SQLSTATE {code}): {source}")]
    Database {
        location: String,
        code: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "PostgreSQL at {location} runs with synchronous_commit = {setting}, so an acknowledged write could be lost; set it to on (or set allow_async_commit = true in [store] to accept that)"
    )]
    AsyncCommit { location: String, setting: String },
    #[error(
        "the store at {location} has schema version {found}, newer than this build's {known}: run a newer credbroker"
    )]
    SchemaTooNew {
        location: String,
        found: i32,
        known: i32,
    },
    #[error("[store] {0}")]
    Config(String),
}

impl StoreError {
    /// Whether the store could not be reached in time (a retry later may succeed): the
    /// caller's answer is UNAVAILABLE, not an internal error.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. } | StoreError::Timeout { .. }
        )
    }
}

/// Waits for a backend future on the calling thread, parking it until the future is woken, for
/// the synchronous callers named in the module comment. Unlike an executor's `block_on`, it may
/// nest (a commit seals, and a seal may persist a reservation). A backend
/// whose futures need the runtime's I/O driver must finish them on another thread (as a client
/// library's connection task does), never on this one.
pub(crate) fn wait_inline<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        match future.as_mut().poll(&mut context) {
            std::task::Poll::Ready(output) => return output,
            std::task::Poll::Pending => std::thread::park(),
        }
    }
}

/// Runs a long store operation (a full scan, a snapshot, a rotation) on a blocking thread, so
/// that a backend that works inline does not hold up a runtime worker meanwhile.
pub async fn run_blocking<T: Send + 'static>(
    work: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(work))
        .await
        .map_err(|e| StoreError::Backend(format!("a store task failed: {e}")))
}

/// A batch's sealed ops, and the cached keys it touches.
type Sealed = (Vec<RawOp>, Vec<(Table, Vec<u8>)>);

/// One write of a batch, before sealing: a put (Some) or delete (None).
struct Op {
    table: Table,
    path: String,
    value: Option<Zeroizing<Vec<u8>>>,
}

/// A set of writes that commit together or not at all.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        path: impl Into<String>,
        value: &T,
    ) -> &mut Self {
        let bytes = Zeroizing::new(serde_json::to_vec(value).expect("records serialize"));
        self.ops.push(Op {
            table,
            path: path.into(),
            value: Some(bytes),
        });
        self
    }

    pub fn delete(&mut self, table: Table, path: impl Into<String>) -> &mut Self {
        self.ops.push(Op {
            table,
            path: path.into(),
            value: None,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn append(&mut self, other: Batch) {
        self.ops.extend(other.ops);
    }
}

/// The encrypted, typed store shared by every part of the daemon.
pub struct Store {
    backend: Arc<dyn Backend>,
    vault: Arc<Vault>,
    header: RwLock<Header>,
    /// The unlocked key-encryption key, kept to rewrap the keyring after a rotation.
    kek: Kek,
    commits: GroupCommit,
    /// One rotation (or retirement) at a time.
    rotation: tokio::sync::Mutex<()>,
    /// Wakes the background rewrap after a rotation.
    rewrap_wanted: tokio::sync::Notify,
    /// Held shared by every write (seal + apply), exclusively by a snapshot or a key
    /// rotation: these see no half-applied batch and no envelope sealed under a stale term.
    gate: tokio::sync::RwLock<()>,
    cache: Arc<cache::ReadCache>,
    /// What replicas sharing the store agree through (leases, counters, jobs, changes).
    coord: Arc<dyn Coordinator>,
    /// Set when another replica persisted a keyring: the next write takes it first.
    keyring_moved: Arc<AtomicBool>,
    /// With other replicas: the followers of their writes, table by table.
    remote: Option<Arc<replicas::RemoteWrites>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("store_id", &self.header().store_id)
            .field("vault", &self.vault)
            .finish()
    }
}

const HEADER_KEY: &str = "header";

/// The store's header, as `backend` holds it.
async fn read_header(backend: &dyn Backend) -> Result<Header, StoreError> {
    let raw = backend
        .meta_get(HEADER_KEY)
        .await?
        .ok_or_else(|| StoreError::NotInitialized {
            path: backend.location(),
        })?;
    serde_json::from_slice(&raw)
        .map_err(|e| StoreError::Vault(VaultError::HeaderCorrupt(e.to_string())))
}

/// Writes `header` and syncs it.
async fn write_header(backend: &dyn Backend, header: &Header) -> Result<(), StoreError> {
    backend
        .meta_put(
            HEADER_KEY,
            &serde_json::to_vec(header).expect("header serializes"),
        )
        .await?;
    backend.sync().await
}

impl Store {
    /// Creates a new store where `config` says, refusing if one exists there.
    pub async fn create(config: &StoreConfig, source: &KeySource) -> Result<Store, StoreError> {
        let backend = open_backend(config, Intent::Create).await?;
        if backend.meta_get(HEADER_KEY).await?.is_some() {
            return Err(StoreError::AlreadyExists {
                path: backend.location(),
            });
        }
        let (header, _) = Header::create_with_params(source, crate::vault::ARGON2_PARAMS)?;
        // The header is the last thing written: a store without one is not a store yet.
        write_header(backend.as_ref(), &header).await?;
        // The same handle goes on: reopening would race the engine's release of its lock.
        let coord = open_coordinator(config, backend.clone()).await?;
        Self::unlock(backend, coord, source).await
    }

    /// Opens an existing store, reporting a wrong key, a damaged header or a newer format.
    pub async fn open(config: &StoreConfig, source: &KeySource) -> Result<Store, StoreError> {
        let backend = open_backend(config, Intent::Existing).await?;
        let coord = open_coordinator(config, backend.clone()).await?;
        Self::unlock(backend, coord, source).await
    }

    async fn unlock(
        backend: Arc<dyn Backend>,
        coord: Arc<dyn Coordinator>,
        source: &KeySource,
    ) -> Result<Store, StoreError> {
        let mut header = read_header(backend.as_ref()).await?;
        let (kek, mut keyring) = header.unlock_with_kek(source)?;
        if keyring.ensure_audit_keys() {
            // A keyring from before the audit log had keys of its own: they are made durable
            // before anything is sealed or signed with them.
            header = header.with_keyring_kek(&kek, &keyring);
            write_header(backend.as_ref(), &header).await?;
        }
        let reserved = coord.reserve(keyring.current_term(), 0).await?;
        let sink = coord.clone();
        let vault = Vault::with_ranges(
            keyring,
            reserved,
            Box::new(move |term, count| {
                wait_inline(sink.reserve(term, count)).map_err(|e| e.to_string())
            }),
        );
        let keyring_moved = Arc::new(AtomicBool::new(false));
        let changes = coord.changes();
        // With other replicas, nothing is cached before their changes are followed.
        let cache = Arc::new(cache::ReadCache::new(changes.is_some()));
        let remote = changes.map(|changes| {
            let remote = Arc::new(replicas::RemoteWrites::default());
            tokio::spawn(replicas::follow_changes(
                changes,
                cache.clone(),
                keyring_moved.clone(),
                remote.clone(),
            ));
            remote
        });
        Ok(Store {
            commits: GroupCommit::start(backend.clone()),
            backend,
            vault: Arc::new(vault),
            header: RwLock::new(header),
            kek,
            gate: tokio::sync::RwLock::new(()),
            cache,
            coord,
            keyring_moved,
            remote,
            rotation: tokio::sync::Mutex::new(()),
            rewrap_wanted: tokio::sync::Notify::new(),
        })
    }

    pub fn header(&self) -> Header {
        self.header
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The storage engine (see [`Backend::as_any`] for what only one engine offers).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// A number that changes whenever a write to `table` begins: equal before and after a
    /// computation over the table means no write touched it meanwhile (in this process).
    pub fn generation(&self, table: Table) -> u64 {
        self.cache.generation(table)
    }

    /// Reads and decrypts one record. A cache hit returns without reaching the backend.
    pub async fn get<T: Record>(&self, table: Table, path: &str) -> Result<Option<T>, StoreError> {
        let key = table.key(path);
        if !table.is_cached() {
            return self
                .backend
                .get(&key)
                .await?
                .map(|sealed| self.decode(&key, &sealed))
                .transpose();
        }
        if let Some(value) = self.cache.get::<T>(&key) {
            return Ok(Some(value));
        }
        let generation = self.cache.generation(table);
        match self.backend.get(&key).await? {
            None => Ok(None),
            Some(sealed) => {
                let value: T = self.decode(&key, &sealed)?;
                self.cache.put(cache::Fill {
                    table,
                    generation,
                    key,
                    value: value.clone(),
                });
                Ok(Some(value))
            }
        }
    }

    /// Reads the records of one path in two cached tables as of one moment (a connection and
    /// its secrets): both from the cache if they were kept together, else both from one backend
    /// snapshot. Never one written by a batch joined to the other from before it.
    pub async fn get_pair<A: Record, B: Record>(
        &self,
        tables: (Table, Table),
        path: &str,
    ) -> Result<(Option<A>, Option<B>), StoreError> {
        let keys = [tables.0.key(path), tables.1.key(path)];
        if let Some((a, b)) = self.cache.get_pair::<A, B>(&keys[0], &keys[1]) {
            return Ok((Some(a), Some(b)));
        }
        let generations = (
            self.cache.generation(tables.0),
            self.cache.generation(tables.1),
        );
        let [a, b]: [Option<Vec<u8>>; 2] = self
            .backend
            .get_many(&keys)
            .await?
            .try_into()
            .map_err(|_| StoreError::Backend("get_many answered another count".into()))?;
        let [key_a, key_b] = keys;
        let a: Option<A> = a.map(|sealed| self.decode(&key_a, &sealed)).transpose()?;
        let b: Option<B> = b.map(|sealed| self.decode(&key_b, &sealed)).transpose()?;
        if let (Some(a), Some(b)) = (&a, &b) {
            self.cache.put_pair(
                cache::Fill {
                    table: tables.0,
                    generation: generations.0,
                    key: key_a,
                    value: a.clone(),
                },
                cache::Fill {
                    table: tables.1,
                    generation: generations.1,
                    key: key_b,
                    value: b.clone(),
                },
            );
        }
        Ok((a, b))
    }

    /// Reads up to `limit` records whose path starts with `prefix`, after path `after`.
    pub async fn scan<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let after_key = after.map(|a| table.key(a));
        let rows = self
            .backend
            .scan_prefix(&table.key(prefix), after_key.as_deref(), limit)
            .await?;
        rows.into_iter()
            .map(|(key, sealed)| Ok((table.path_of(&key), self.decode(&key, &sealed)?)))
            .collect()
    }

    /// The record with the greatest path under `prefix`, and not above `at_most` if given.
    pub async fn last<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
        at_most: Option<&str>,
    ) -> Result<Option<(String, T)>, StoreError> {
        let at_most = at_most.map(|path| table.key(path));
        let last = self
            .backend
            .last_with_prefix(&table.key(prefix), at_most.as_deref())
            .await?;
        last.map(|(key, sealed)| Ok((table.path_of(&key), self.decode(&key, &sealed)?)))
            .transpose()
    }

    fn decode<T: DeserializeOwned>(&self, key: &[u8], sealed: &[u8]) -> Result<T, StoreError> {
        match self.vault.open(key, sealed) {
            Ok(plain) => Self::parse(key, &plain),
            // Sealed under a term another replica added: its keyring is in the header.
            Err(VaultError::UnknownTerm { .. }) if self.follow_keyring_now()? => {
                Self::parse(key, &self.vault.open(key, sealed)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn parse<T: DeserializeOwned>(key: &[u8], plain: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(plain).map_err(|e| StoreError::Decode {
            record: String::from_utf8_lossy(key).replace('\0', "/"),
            why: e.to_string(),
        })
    }

    /// Seals and applies `batch` atomically, returning once it is durable.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch).await?;
        self.commits.wait().await?;
        self.rotate_if_worn().await
    }

    /// Rewrites one record with `change` (which returns whether it changed anything), without
    /// a sync of its own: only for hints a crash may lose (a connection's last use), made
    /// durable by the next commit of any writer (the audit log is not one: it lives outside the
    /// store). The write happens only if the record is still what was read: a concurrent
    /// change or delete wins, and the hint is dropped. Returns whether it wrote.
    pub async fn update_unsynced<T: Record + Serialize>(
        &self,
        table: Table,
        path: &str,
        change: impl FnOnce(&mut T) -> bool,
    ) -> Result<bool, StoreError> {
        let _writing = self.gate.read().await;
        let key = table.key(path);
        let Some(sealed) = self.backend.get(&key).await? else {
            return Ok(false);
        };
        let mut value: T = self.decode(&key, &sealed)?;
        if !change(&mut value) {
            return Ok(false);
        }
        let plain = Zeroizing::new(serde_json::to_vec(&value).expect("records serialize"));
        let resealed = self.vault.seal(&key, &plain)?;
        let keys = [(table, key.as_slice())];
        self.cache.invalidate(keys);
        let written = self.backend.replace_if(&key, &sealed, resealed).await;
        self.cache.invalidate(keys);
        written
    }

    async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.take_moved_keyring().await?;
        let _writing = self.gate.read().await;
        let (ops, touched) = self.seal_batch(batch)?;
        let keys = || touched.iter().map(|(t, k)| (*t, k.as_slice()));
        self.cache.invalidate(keys());
        let applied = self.backend.apply(ops).await;
        self.cache.invalidate(keys());
        applied
    }

    /// Seals every op of `batch`; also returns the cached keys it touches.
    fn seal_batch(&self, batch: Batch) -> Result<Sealed, StoreError> {
        let mut ops = Vec::with_capacity(batch.ops.len());
        let mut touched = Vec::new();
        for Op { table, path, value } in batch.ops {
            let key = table.key(&path);
            let sealed = match value {
                Some(plain) => Some(self.vault.seal(&key, &plain)?),
                None => None,
            };
            if table.is_cached() {
                touched.push((table, key.clone()));
            }
            ops.push((key, sealed));
        }
        Ok((ops, touched))
    }

    /// Test and forensics hook: the raw envelope of a record, as the backend holds it.
    pub async fn raw_get(&self, table: Table, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(&table.key(path)).await
    }

    /// Test and forensics hook: writes raw bytes as a record, bypassing the vault.
    pub async fn raw_put(
        &self,
        table: Table,
        path: &str,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let _writing = self.gate.read().await;
        let key = table.key(path);
        self.cache.invalidate([(table, key.as_slice())]);
        self.backend.apply(vec![(key.clone(), bytes)]).await?;
        self.cache.invalidate([(table, key.as_slice())]);
        self.backend.sync().await
    }
}

mod replicas;
#[cfg(any(test, feature = "test-util"))]
#[doc(hidden)]
pub mod tests;
