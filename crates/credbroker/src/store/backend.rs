//! The storage-engine seam: the [`Backend`] trait every engine implements, and
//! [`open_backend`], the one place that turns `[store] backend` into an engine.
//!
//! The store above this seam is engine-blind and schema-blind (like Vault's physical backend):
//! it hands the backend opaque keys and envelopes, and the layers above the store declare their
//! own tables. A backend never sees a plaintext secret: values are sealed before they reach it.

use std::sync::Arc;

use async_trait::async_trait;

use super::StoreError;
use super::postgres_backend::{self, PgBackend};
use super::sled_backend::{self, SledBackend};
use crate::config::StoreConfig;

/// A raw entry: full record key and envelope bytes.
pub type RawEntry = (Vec<u8>, Vec<u8>);

/// A raw write: a put (Some) or delete (None) of a full record key.
pub type RawOp = (Vec<u8>, Option<Vec<u8>>);

/// The engines `[store] backend` may name; the first is the default.
pub const BACKENDS: &[&str] = &[sled_backend::NAME, postgres_backend::NAME];

/// What opening a backend is for: each intent checks what it needs before anything is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// `credbroker init`: a new store; the location may or may not exist yet.
    Create,
    /// Serve, or any offline command: a store must exist there ([`StoreError::NotInitialized`]).
    Existing,
    /// Restore: the location must hold nothing at all ([`StoreError::NotEmpty`]).
    Empty,
}

/// Opens the engine `config` names, for `intent`. The only place a backend is built.
pub async fn open_backend(
    config: &StoreConfig,
    intent: Intent,
) -> Result<Arc<dyn Backend>, StoreError> {
    match config.backend.as_str() {
        sled_backend::NAME => Ok(Arc::new(SledBackend::open(&config.path, intent)?)),
        postgres_backend::NAME => Ok(Arc::new(PgBackend::open(config, intent).await?)),
        other => Err(StoreError::UnknownBackend {
            name: other.to_string(),
        }),
    }
}

/// What a storage engine must offer. Small on purpose, so that another engine (PostgreSQL)
/// can replace sled without touching any caller. Every method may do I/O, local or over the
/// network, so every method is async; the store never holds a lock of its own across an await
/// that readers wait on.
///
/// Invariants a backend keeps (the conformance suite in `store/tests.rs` checks each):
///
/// 1. **Atomic batches.** [`Backend::apply`] applies all of its ops or none: no reader, and no
///    crash, ever sees part of a batch. Within a batch, a later op on the same key wins.
/// 2. **Durable on sync.** After [`Backend::sync`] returns `Ok`, everything applied (and every
///    metadata write) before the call began survives a crash or power loss. A sync that fails
///    poisons the backend: every later sync fails too, since a failed write-back may have lost
///    data that a later, successful sync would appear to cover.
/// 3. **Read your writes.** A `get` or scan issued after `apply` (or `meta_put`) returned sees
///    it, synced or not.
/// 4. **Ordered scans.** Keys compare as unsigned bytes; [`Backend::scan_prefix`] returns
///    entries in ascending key order and [`Backend::last_with_prefix`] the greatest key, both
///    restricted to keys starting with the prefix (the empty prefix is every record).
/// 5. **Compare-and-swap.** [`Backend::replace_if`] writes only if the key's current value is
///    byte-for-byte `old`, atomically with that check; a key deleted meanwhile stays deleted.
/// 6. **Metadata apart.** Metadata (`meta_*`: the header, counter reservations, rewrap state)
///    lives in its own key space, never returned by record scans, and is not sealed.
/// 7. **One moment for several keys.** [`Backend::get_many`] returns every key's value as of one
///    moment: of a batch that wrote several of them, it sees all or none (two `get`s need not).
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Where this backend keeps its data, for messages (never a credential).
    fn location(&self) -> String;

    /// The engine itself, for what only one engine offers (PostgreSQL's pool, for replicas).
    fn as_any(&self) -> &dyn std::any::Any;

    /// The record stored under `key`, if any.
    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The records stored under `keys`, in their order, all as of one moment (invariant 7).
    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError>;

    /// Up to `limit` entries whose key starts with `prefix` and sorts after `after` (strictly),
    /// in ascending key order.
    async fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StoreError>;

    /// The entry with the greatest key under `prefix`, and not above `at_most` if given.
    async fn last_with_prefix(
        &self,
        prefix: &[u8],
        at_most: Option<&[u8]>,
    ) -> Result<Option<RawEntry>, StoreError>;

    /// Applies every put (Some) and delete (None) atomically; durable only after a sync.
    async fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError>;

    /// Returns once everything applied so far is durable (invariant 2).
    async fn sync(&self) -> Result<(), StoreError>;

    /// Unencrypted metadata: the header, counter reservations, rewrap progress.
    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes one metadata entry; durable only after a sync.
    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Every metadata entry, in key order.
    async fn meta_scan(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Replaces the value of `key` only if it still is `old`; false if it changed (or is gone).
    async fn replace_if(&self, key: &[u8], old: &[u8], new: Vec<u8>) -> Result<bool, StoreError>;
}
