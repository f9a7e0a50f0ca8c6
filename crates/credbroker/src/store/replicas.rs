//! What the store does for replicas sharing it (through its [`Coordinator`]): follows other
//! replicas' changes into the read cache and takes the keyrings they persist, and offers leases,
//! fenced commits and jobs to the layers above.
//!
//! Invariants:
//! - a key another replica wrote is dropped from the cache as soon as the coordinator reports it;
//!   while reports may be missing the cache serves and keeps nothing;
//! - a keyring another replica persisted is taken before this replica's next write (it was told
//!   of it) or as soon as a record sealed under an unknown term is read;
//! - a fenced commit writes nothing once its lease was taken over, and is durable when it
//!   reports success;
//! - a follower of a table's remote writes ([`Store::remote_writes`]) is woken by every
//!   reported write to it, and by every resumed feed (writes may have gone unreported).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::cache::ReadCache;
use super::{
    Batch, Change, HEADER_KEY, JobGuard, Lease, Store, StoreError, Table, read_header, wait_inline,
};

/// The tables whose writes by other replicas someone follows, each with its wake-up count.
#[derive(Default)]
pub(super) struct RemoteWrites {
    watched: Mutex<Vec<(Vec<u8>, watch::Sender<u64>)>>,
}

impl RemoteWrites {
    fn watched(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, watch::Sender<u64>)>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn subscribe(&self, table: Table) -> watch::Receiver<u64> {
        let prefix = table.key("");
        let mut watched = self.watched();
        if let Some((_, tx)) = watched.iter().find(|(p, _)| *p == prefix) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(0);
        watched.push((prefix, tx));
        rx
    }

    /// Wakes the followers of the tables `keys` belong to (all of them for `None`).
    fn report(&self, keys: Option<&[Vec<u8>]>) {
        for (prefix, tx) in self.watched().iter() {
            if keys.is_none_or(|keys| keys.iter().any(|k| k.starts_with(prefix))) {
                tx.send_modify(|n| *n += 1);
            }
        }
    }
}

/// Applies the coordinator's reports of other replicas' changes, for as long as it sends them.
pub(super) async fn follow_changes(
    mut changes: mpsc::UnboundedReceiver<Change>,
    cache: Arc<ReadCache>,
    keyring_moved: Arc<AtomicBool>,
    remote: Arc<RemoteWrites>,
) {
    while let Some(change) = changes.recv().await {
        match change {
            Change::Keys(keys) => {
                cache.invalidate_remote(&keys);
                remote.report(Some(&keys));
            }
            Change::Meta(key) if key == HEADER_KEY => keyring_moved.store(true, Ordering::SeqCst),
            Change::Meta(_) => {}
            Change::Lost => {
                tracing::warn!(
                    "lost the store's change feed: the read cache is off until it is back"
                );
                cache.suspend();
            }
            Change::Resumed => {
                // A rotation elsewhere may have gone unreported too.
                keyring_moved.store(true, Ordering::SeqCst);
                cache.resume();
                remote.report(None);
            }
        }
    }
}

impl Store {
    /// Takes the keyring as the header holds it now (another replica's rotation or
    /// retirement). Returns whether the current term changed.
    pub(super) async fn follow_keyring(&self) -> Result<bool, StoreError> {
        let header = read_header(self.backend.as_ref()).await?;
        let keyring = header.open_keyring(&self.kek)?;
        let moved = self.vault.adopt(keyring);
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        if moved {
            tracing::info!(
                term = self.vault.current_term(),
                "took the key rotation another replica made"
            );
        }
        Ok(moved)
    }

    /// [`Store::follow_keyring`] from a synchronous caller (a read that met an unknown term);
    /// true if the keyring now holds more than before.
    pub(super) fn follow_keyring_now(&self) -> Result<bool, StoreError> {
        let before = self.vault.terms();
        wait_inline(self.follow_keyring())?;
        Ok(self.vault.terms() != before)
    }

    /// Before a write: takes a keyring another replica persisted, if one was reported.
    pub(super) async fn take_moved_keyring(&self) -> Result<(), StoreError> {
        if !self.keyring_moved.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        // No write of ours sits between sealing and applying while the term changes.
        let _quiet = self.gate.write().await;
        if let Err(e) = self.follow_keyring().await {
            self.keyring_moved.store(true, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// Wakes on every write another replica makes to `table`; None when no other replica
    /// shares the store (this process makes every write, and knows of it).
    pub fn remote_writes(&self, table: Table) -> Option<watch::Receiver<u64>> {
        Some(self.remote.as_ref()?.subscribe(table))
    }

    /// Whether other replicas may write to the store too.
    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    /// Takes lease `name` for `ttl` unless a live holder (in any replica) has it.
    pub async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        self.coord.try_lease(name, ttl).await
    }

    /// Gives `lease` up (nothing if it was taken over).
    pub async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.coord.release(lease).await
    }

    /// Takes job `name` across every replica (waiting for its holder if `wait`).
    pub async fn job(&self, name: &str, wait: bool) -> Result<Option<JobGuard>, StoreError> {
        self.coord.job(name, wait).await
    }

    /// Drops `path` of `table` from this replica's read cache: the next read goes to the
    /// backend (a waiter that must see what another replica just wrote).
    pub fn forget(&self, table: Table, path: &str) {
        let key = table.key(path);
        self.cache.invalidate([(table, key.as_slice())]);
    }

    /// As [`Store::commit`], only while `lease` is the latest of its name: false, and nothing
    /// written, if another holder took it over.
    pub async fn commit_fenced(&self, batch: Batch, lease: &Lease) -> Result<bool, StoreError> {
        if batch.is_empty() {
            return Ok(true);
        }
        self.take_moved_keyring().await?;
        let applied = {
            let _writing = self.gate.read().await;
            let (ops, touched) = self.seal_batch(batch)?;
            let keys = || touched.iter().map(|(t, k)| (*t, k.as_slice()));
            self.cache.invalidate(keys());
            let applied = self.coord.apply_fenced(lease, ops).await;
            self.cache.invalidate(keys());
            applied?
        };
        if !applied {
            return Ok(false);
        }
        self.commits.wait().await?;
        self.rotate_if_worn().await?;
        Ok(true)
    }
}
