//! The coordination seam: what replicas sharing one store must agree on beyond the records
//! themselves, engine-specific like the [`Backend`] (the one `[store] backend` names picks it,
//! in [`open_coordinator`]).
//!
//! - **Refresh leases.** [`Coordinator::try_lease`] hands a named lease to one holder at a time,
//!   for a bounded time, with a fencing token greater than every token handed out before for
//!   that name. [`Coordinator::apply_fenced`] applies a batch only while its lease is still the
//!   latest one handed out (checked atomically with the write): a holder whose lease lapsed and
//!   was taken over can no longer write.
//! - **Encryption counts.** [`Coordinator::reserve`] adds to a term's encryption counter
//!   atomically and durably and returns the new total: the ranges two callers get never
//!   overlap, whichever replicas they run in, and their sum counts every replica's encryptions.
//! - **Jobs.** [`Coordinator::job`] runs one key-management step (a rotation, a rewrap step, a
//!   retirement), one OAuth state take, one connector name change or one event append at a time
//!   across every replica, and one webhook's deliveries for as long as its holder runs; progress
//!   lives in the store, so any replica resumes where another stopped (a dead holder's job lock
//!   goes with it). On PostgreSQL a job is a session advisory lock on a connection of its own:
//!   if that connection drops, the lock goes and the holder is not told.
//! - **Changes.** [`Coordinator::changes`] reports the record keys other replicas wrote, so that
//!   the read cache drops them ([`Change`]); an engine with one process (sled) reports none.
//!
//! Invariants every coordinator keeps: a lease's token only grows; `apply_fenced` is atomic with
//! its check; `reserve` never returns the same total twice for a term; a job is held by at most
//! one holder at a time, and released when its guard drops (or its holder dies).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Backend, RawOp, StoreError};

/// A held lease: its name and fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub token: u64,
}

/// What another replica changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Full record keys written (put or delete).
    Keys(Vec<Vec<u8>>),
    /// A metadata entry written (the header: a rotation or retirement elsewhere).
    Meta(String),
    /// Changes may have been missed (the notification connection was lost): drop everything
    /// and read through until [`Change::Resumed`].
    Lost,
    /// Changes are followed again (after [`Change::Lost`], or at start).
    Resumed,
}

/// Holds a job until dropped.
pub struct JobGuard(#[allow(dead_code)] Box<dyn Send + Sync>);

impl JobGuard {
    pub fn new(held: impl Send + Sync + 'static) -> Self {
        JobGuard(Box::new(held))
    }
}

/// What replicas sharing a store agree through. See the module comment for the invariants.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Takes lease `name` for `ttl` unless a live holder has it (`None`).
    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StoreError>;

    /// Gives `lease` up; nothing if it was taken over meanwhile.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Applies `ops` atomically if `lease` is still the latest of its name; false (nothing
    /// written) if it was taken over. Durable only after the backend's sync.
    async fn apply_fenced(&self, lease: &Lease, ops: Vec<RawOp>) -> Result<bool, StoreError>;

    /// Adds `count` to term `term`'s encryption counter; returns the new total, durable.
    /// `count` 0 reads the total.
    async fn reserve(&self, term: u32, count: u64) -> Result<u64, StoreError>;

    /// Takes job `name`, waiting for another holder to finish if `wait`, else `None` when held.
    async fn job(&self, name: &str, wait: bool) -> Result<Option<JobGuard>, StoreError>;

    /// The feed of other replicas' changes (taken once); `None` when there are no others.
    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>>;

    /// How long after a rotation every replica is sure to seal under the new term (it follows
    /// [`Change::Meta`] within this): older terms are not retired before.
    fn adoption_grace(&self) -> Duration;
}

/// Opens the coordinator for `config`'s engine.
pub async fn open_coordinator(
    config: &crate::config::StoreConfig,
    backend: Arc<dyn Backend>,
) -> Result<Arc<dyn Coordinator>, StoreError> {
    if config.backend == super::postgres_backend::NAME {
        return Ok(Arc::new(
            super::pg_coord::PgCoordinator::open(backend).await?,
        ));
    }
    Ok(Arc::new(LocalCoordinator::new(backend)))
}

/// The metadata key of a term's encryption counter.
pub(super) fn reservation_key(term: u32) -> String {
    format!("reserved/{term}")
}

#[derive(Default)]
struct LocalLease {
    token: u64,
    held_until: Option<tokio::time::Instant>,
}

/// The coordinator of an engine only one process opens (sled holds a lock on its folder):
/// leases and jobs live in memory, counters in the backend's metadata.
pub struct LocalCoordinator {
    backend: Arc<dyn Backend>,
    /// Held across a fenced apply, so a takeover waits for it (atomic check and write).
    leases: tokio::sync::Mutex<HashMap<String, LocalLease>>,
    /// Serializes counter updates (read, add, write).
    counters: tokio::sync::Mutex<()>,
    jobs: Arc<Mutex<HashSet<String>>>,
    job_freed: Arc<tokio::sync::Notify>,
}

impl LocalCoordinator {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            leases: tokio::sync::Mutex::default(),
            counters: tokio::sync::Mutex::new(()),
            jobs: Arc::default(),
            job_freed: Arc::default(),
        }
    }

    fn try_job(&self, name: &str) -> Option<JobGuard> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if !jobs.insert(name.to_string()) {
            return None;
        }
        struct Held(
            Arc<Mutex<HashSet<String>>>,
            Arc<tokio::sync::Notify>,
            String,
        );
        impl Drop for Held {
            fn drop(&mut self) {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.2);
                self.1.notify_waiters();
            }
        }
        Some(JobGuard::new(Held(
            self.jobs.clone(),
            self.job_freed.clone(),
            name.to_string(),
        )))
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let mut leases = self.leases.lock().await;
        let lease = leases.entry(name.to_string()).or_default();
        let now = tokio::time::Instant::now();
        if lease.held_until.is_some_and(|until| until > now) {
            return Ok(None);
        }
        lease.token += 1;
        lease.held_until = Some(now + ttl);
        Ok(Some(Lease {
            name: name.to_string(),
            token: lease.token,
        }))
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut leases = self.leases.lock().await;
        if let Some(held) = leases
            .get_mut(&lease.name)
            .filter(|l| l.token == lease.token)
        {
            held.held_until = None;
        }
        Ok(())
    }

    async fn apply_fenced(&self, lease: &Lease, ops: Vec<RawOp>) -> Result<bool, StoreError> {
        let leases = self.leases.lock().await;
        if leases.get(&lease.name).map(|l| l.token) != Some(lease.token) {
            return Ok(false);
        }
        self.backend.apply(ops).await?;
        drop(leases);
        Ok(true)
    }

    async fn reserve(&self, term: u32, count: u64) -> Result<u64, StoreError> {
        let _one = self.counters.lock().await;
        let key = reservation_key(term);
        let total = self
            .backend
            .meta_get(&key)
            .await?
            .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        if count == 0 {
            return Ok(total);
        }
        let total = total.saturating_add(count);
        self.backend.meta_put(&key, &total.to_be_bytes()).await?;
        self.backend.sync().await?;
        Ok(total)
    }

    async fn job(&self, name: &str, wait: bool) -> Result<Option<JobGuard>, StoreError> {
        loop {
            let freed = self.job_freed.notified();
            if let Some(guard) = self.try_job(name) {
                return Ok(Some(guard));
            }
            if !wait {
                return Ok(None);
            }
            freed.await;
        }
    }

    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        None
    }

    fn adoption_grace(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn local() -> (tempfile::TempDir, LocalCoordinator) {
        let dir = tempfile::tempdir().unwrap();
        let backend =
            super::super::sled_backend::SledBackend::open(dir.path(), super::super::Intent::Create)
                .unwrap();
        (dir, LocalCoordinator::new(Arc::new(backend)))
    }

    #[tokio::test]
    async fn a_lease_is_held_once_and_a_lapsed_holder_is_fenced_out() {
        let (_dir, coord) = local().await;
        let short = Duration::from_millis(30);
        let first = coord.try_lease("c", short).await.unwrap().unwrap();
        assert!(coord.try_lease("c", short).await.unwrap().is_none(), "held");
        assert!(coord.try_lease("other", short).await.unwrap().is_some());
        tokio::time::sleep(short * 2).await;
        let second = coord.try_lease("c", short).await.unwrap().unwrap();
        assert!(second.token > first.token);
        let op = || vec![(b"t\0k".to_vec(), Some(b"v".to_vec()))];
        assert!(!coord.apply_fenced(&first, op()).await.unwrap(), "stale");
        assert!(coord.apply_fenced(&second, op()).await.unwrap());
        // A stale release changes nothing; the holder's frees the lease.
        coord.release(&first).await.unwrap();
        assert!(coord.try_lease("c", short).await.unwrap().is_none());
        coord.release(&second).await.unwrap();
        let third = coord.try_lease("c", short).await.unwrap().unwrap();
        assert!(third.token > second.token);
    }

    #[tokio::test]
    async fn reservations_add_up_and_jobs_are_exclusive() {
        let (_dir, coord) = local().await;
        assert_eq!(coord.reserve(1, 0).await.unwrap(), 0);
        assert_eq!(coord.reserve(1, 10).await.unwrap(), 10);
        assert_eq!(coord.reserve(1, 5).await.unwrap(), 15);
        assert_eq!(coord.reserve(2, 5).await.unwrap(), 5);
        assert_eq!(coord.reserve(1, 0).await.unwrap(), 15);
        let held = coord.job("rewrap", false).await.unwrap().unwrap();
        assert!(coord.job("rewrap", false).await.unwrap().is_none());
        let coord = Arc::new(coord);
        let waiter = tokio::spawn({
            let coord = coord.clone();
            async move { coord.job("rewrap", true).await.unwrap().is_some() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits for the holder");
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
