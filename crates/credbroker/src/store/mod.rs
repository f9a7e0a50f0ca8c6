//! The store owns persistence: typed records, sealed by the vault, kept by a [`Backend`] (sled
//! today), written in atomic batches that are durable when [`Store::commit`] returns.
//!
//! Invariants:
//! - every value reaching the backend is an envelope sealed for its own record key; only the
//!   header and the vault's counter reservations (nothing secret) are stored in the clear;
//! - a commit returns only after the backend has synced it; concurrent commits share one sync
//!   ([`group_commit`]).

mod backup;
mod cache;
mod group_commit;
mod rotation;
mod sled_backend;

pub use backup::{BackupError, Snapshot, restore, write_backup_file};
pub use rotation::{RewrapState, RewrapStep, change_key};
pub use sled_backend::SledBackend;

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::vault::{Header, Kek, KeySource, Vault, VaultError};
use group_commit::GroupCommit;

/// A value the store reads through its cache: parsed once, then copied out to readers.
pub trait Record: DeserializeOwned + Clone + Send + Sync + 'static {}

impl<T: DeserializeOwned + Clone + Send + Sync + 'static> Record for T {}

/// The logical tables. A record's full key is `table ‖ 0x00 ‖ path`; the envelope is bound to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `{workspace}/{connector_id}` → Connector
    Connectors,
    /// `{workspace}/{lowercased name}` → connector id
    ConnectorNames,
    /// `{connector_id}` → ConnectorSecrets
    ConnectorSecrets,
    /// `{connector_id}/{user_id}` → Connection (user_id empty for shared)
    Connections,
    /// `{connector_id}/{user_id}` → ConnectionSecrets
    ConnectionSecrets,
    /// `{state}` → pending OAuth authorization
    OAuthStates,
    /// `{seq:020}` → audit record
    Audit,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::Connectors,
        Table::ConnectorNames,
        Table::ConnectorSecrets,
        Table::Connections,
        Table::ConnectionSecrets,
        Table::OAuthStates,
        Table::Audit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Connectors => "connectors",
            Table::ConnectorNames => "connector_names",
            Table::ConnectorSecrets => "connector_secrets",
            Table::Connections => "connections",
            Table::ConnectionSecrets => "connection_secrets",
            Table::OAuthStates => "oauth_states",
            Table::Audit => "audit",
        }
    }

    fn key(self, path: &str) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.name().len() + 1 + path.len());
        key.extend_from_slice(self.name().as_bytes());
        key.push(0);
        key.extend_from_slice(path.as_bytes());
        key
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no store at {path}: create one with `credbroker init`")]
    NotInitialized { path: String },
    #[error("a store already exists at {path}; refusing to overwrite it")]
    AlreadyExists { path: String },
    #[error("the store at {path} is in use by another process")]
    Locked { path: String },
    #[error("storage error: {0}")]
    Backend(String),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("record {record} does not decode: {why}")]
    Decode { record: String, why: String },
    #[error("the write could not be made durable: {0}")]
    Sync(String),
}

/// What a storage engine must offer. Small on purpose, so that another backend (PostgreSQL)
/// can replace sled without touching any caller. Values here are opaque bytes (envelopes).
/// A raw entry: full record key and envelope bytes.
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// A raw write: a put (Some) or delete (None) of a full record key.
pub type RawOp = (Vec<u8>, Option<Vec<u8>>);

pub trait Backend: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries whose key starts with `prefix` and sorts after `after`, in key order.
    fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StoreError>;
    /// The entry with the greatest key under `prefix`, and not above `at_most` if given.
    fn last_with_prefix(
        &self,
        prefix: &[u8],
        at_most: Option<&[u8]>,
    ) -> Result<Option<RawEntry>, StoreError>;
    /// Applies every put (Some) and delete (None) atomically; not yet durable.
    fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError>;
    /// Blocks until everything applied so far is on disk.
    fn sync(&self) -> Result<(), StoreError>;
    /// Unencrypted metadata: the header and counter reservations.
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Every metadata entry, in key order.
    fn meta_scan(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Replaces the value of `key` only if it still is `old`; false if it changed (or is gone).
    fn replace_if(&self, key: &[u8], old: &[u8], new: Vec<u8>) -> Result<bool, StoreError>;
}

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
    rotation: std::sync::Mutex<()>,
    /// Wakes the background rewrap after a rotation.
    rewrap_wanted: tokio::sync::Notify,
    /// Held shared by every write (seal + apply), exclusively by a snapshot or a key
    /// rotation: these see no half-applied batch and no envelope sealed under a stale term.
    gate: RwLock<()>,
    cache: cache::ReadCache,
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

fn reservation_key(term: u32) -> String {
    format!("reserved/{term}")
}

/// The store's header, as the backend at `path` holds it.
fn read_header(backend: &dyn Backend, path: &Path) -> Result<Header, StoreError> {
    let raw = backend
        .meta_get(HEADER_KEY)?
        .ok_or_else(|| StoreError::NotInitialized {
            path: path.display().to_string(),
        })?;
    serde_json::from_slice(&raw)
        .map_err(|e| StoreError::Vault(VaultError::HeaderCorrupt(e.to_string())))
}

impl Store {
    /// Creates a new store at `path`, refusing if one exists there.
    pub fn create(path: &Path, source: &KeySource) -> Result<Store, StoreError> {
        Self::create_with(path, source, crate::vault::ARGON2_PARAMS)
    }

    /// As [`Store::create`] with explicit argon2id parameters.
    pub fn create_with(
        path: &Path,
        source: &KeySource,
        argon2: (u32, u32, u32),
    ) -> Result<Store, StoreError> {
        let backend = Arc::new(SledBackend::open(path)?);
        if backend.meta_get(HEADER_KEY)?.is_some() {
            return Err(StoreError::AlreadyExists {
                path: path.display().to_string(),
            });
        }
        let (header, _) = Header::create_with_params(source, argon2)?;
        // The header is the last thing written: a store without one is not a store yet.
        backend.meta_put(
            HEADER_KEY,
            &serde_json::to_vec(&header).expect("header serializes"),
        )?;
        backend.sync()?;
        // The same handle goes on: reopening would race sled's release of its file lock.
        Self::open_backend(backend, source, path)
    }

    /// Opens an existing store, reporting a wrong key, a damaged header or a newer format.
    pub fn open(path: &Path, source: &KeySource) -> Result<Store, StoreError> {
        if !path.join("conf").exists() {
            return Err(StoreError::NotInitialized {
                path: path.display().to_string(),
            });
        }
        let backend = Arc::new(SledBackend::open(path)?);
        Self::open_backend(backend, source, path)
    }

    fn open_backend(
        backend: Arc<SledBackend>,
        source: &KeySource,
        path: &Path,
    ) -> Result<Store, StoreError> {
        let header = read_header(backend.as_ref(), path)?;
        let (kek, keyring) = header.unlock_with_kek(source)?;
        let term = keyring.current_term();
        let reserved = backend
            .meta_get(&reservation_key(term))?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let sink_backend = backend.clone();
        let vault = Vault::new(
            keyring,
            reserved,
            Box::new(move |term, n| {
                sink_backend
                    .meta_put(&reservation_key(term), &n.to_be_bytes())
                    .and_then(|()| sink_backend.sync())
                    .map_err(|e| e.to_string())
            }),
        );
        let backend: Arc<dyn Backend> = backend;
        Ok(Store {
            commits: GroupCommit::start(backend.clone()),
            backend,
            vault: Arc::new(vault),
            header: RwLock::new(header),
            kek,
            gate: RwLock::new(()),
            cache: cache::ReadCache::default(),
            rotation: std::sync::Mutex::new(()),
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

    /// Reads and decrypts one record.
    pub fn get<T: Record>(&self, table: Table, path: &str) -> Result<Option<T>, StoreError> {
        let key = table.key(path);
        if !cache::cached(table) {
            return self
                .backend
                .get(&key)?
                .map(|sealed| self.decode(&key, &sealed))
                .transpose();
        }
        if let Some(value) = self.cache.get::<T>(&key) {
            return Ok(Some(value));
        }
        let generation = self.cache.generation(table);
        match self.backend.get(&key)? {
            None => Ok(None),
            Some(sealed) => {
                let value: T = self.decode(&key, &sealed)?;
                self.cache.put(table, generation, key, value.clone());
                Ok(Some(value))
            }
        }
    }

    /// Reads up to `limit` records whose path starts with `prefix`, after path `after`.
    pub fn scan<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let after_key = after.map(|a| table.key(a));
        let rows = self
            .backend
            .scan_prefix(&table.key(prefix), after_key.as_deref(), limit)?;
        rows.into_iter()
            .map(|(key, sealed)| {
                let value = self.decode(&key, &sealed)?;
                let path = String::from_utf8_lossy(&key[table.name().len() + 1..]).into_owned();
                Ok((path, value))
            })
            .collect()
    }

    /// The record with the greatest path under `prefix`, and not above `at_most` if given (the
    /// audit batch holding a sequence number, say).
    pub fn last<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
        at_most: Option<&str>,
    ) -> Result<Option<(String, T)>, StoreError> {
        let at_most = at_most.map(|path| table.key(path));
        match self
            .backend
            .last_with_prefix(&table.key(prefix), at_most.as_deref())?
        {
            None => Ok(None),
            Some((key, sealed)) => {
                let value = self.decode(&key, &sealed)?;
                Ok(Some((
                    String::from_utf8_lossy(&key[table.name().len() + 1..]).into_owned(),
                    value,
                )))
            }
        }
    }

    fn decode<T: DeserializeOwned>(&self, key: &[u8], sealed: &[u8]) -> Result<T, StoreError> {
        Self::parse(key, &self.vault.open(key, sealed)?)
    }

    fn parse<T: DeserializeOwned>(key: &[u8], plain: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(plain).map_err(|e| StoreError::Decode {
            record: String::from_utf8_lossy(key).replace('\0', "/"),
            why: e.to_string(),
        })
    }

    /// Seals and applies `batch` atomically, returning once it is on disk.
    pub async fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.commits.wait().await?;
        self.rotate_if_worn()
    }

    /// Applies and syncs `batch` on the calling thread, without the group-commit thread: for a
    /// writer that batches on its own and waits for nothing else (the audit writer).
    pub fn commit_here(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        let started = std::time::Instant::now();
        self.backend.sync()?;
        crate::metrics::store_sync(1, started.elapsed());
        self.rotate_if_worn()
    }

    /// Rewrites one record with `change` (which returns whether it changed anything), without
    /// a sync of its own: only for hints a crash may lose (a connection's last use), made
    /// durable by the next commit of any writer — on a serving daemon, the same call's audit
    /// record. The write happens only if the record is still what was read: a concurrent
    /// change or delete wins, and the hint is dropped. Returns whether it wrote.
    pub fn update_unsynced<T: Record + Serialize>(
        &self,
        table: Table,
        path: &str,
        change: impl FnOnce(&mut T) -> bool,
    ) -> Result<bool, StoreError> {
        let _writing = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let key = table.key(path);
        let Some(sealed) = self.backend.get(&key)? else {
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
        let written = self.backend.replace_if(&key, &sealed, resealed);
        self.cache.invalidate(keys);
        written
    }

    /// [`Store::commit`] for callers outside the async runtime (the CLI).
    pub fn commit_blocking(&self, batch: Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.commits.wait_blocking()?;
        self.rotate_if_worn()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let _writing = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let mut ops = Vec::with_capacity(batch.ops.len());
        let mut tables = Vec::with_capacity(batch.ops.len());
        for Op { table, path, value } in batch.ops {
            let key = table.key(&path);
            let sealed = match value {
                Some(plain) => Some(self.vault.seal(&key, &plain)?),
                None => None,
            };
            ops.push((key, sealed));
            tables.push(table);
        }
        let touched: Vec<(Table, Vec<u8>)> = tables
            .into_iter()
            .zip(&ops)
            .filter(|(table, _)| cache::cached(*table))
            .map(|(table, (key, _))| (table, key.clone()))
            .collect();
        let keys = || touched.iter().map(|(t, k)| (*t, k.as_slice()));
        self.cache.invalidate(keys());
        let applied = self.backend.apply(ops);
        self.cache.invalidate(keys());
        applied
    }

    /// Test and forensics hook: the raw envelope of a record, as the backend holds it.
    pub fn raw_get(&self, table: Table, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(&table.key(path))
    }

    /// Test and forensics hook: writes raw bytes as a record, bypassing the vault.
    pub fn raw_put(
        &self,
        table: Table,
        path: &str,
        bytes: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let _writing = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let key = table.key(path);
        self.cache.invalidate([(table, key.as_slice())]);
        self.backend.apply(vec![(key.clone(), bytes)])?;
        self.cache.invalidate([(table, key.as_slice())]);
        self.backend.sync()
    }
}

#[cfg(test)]
mod tests;
