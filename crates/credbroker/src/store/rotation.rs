//! Key rotation and the background rewrap, and changing the key that unlocks a store.
//!
//! - [`Store::rotate_key`] adds a keyring term and makes the wrapped keyring durable before any
//!   write uses it (commits are held off meanwhile, so no envelope sealed under the old term
//!   lands afterwards), and records a rewrap to do.
//! - [`Store::rewrap_step`] re-seals one batch of older records under the current term (a record
//!   changed meanwhile is left alone: its new value is already on the current term), then
//!   persists its position: after a crash it resumes there, and redoing a batch is harmless.
//!   A pass that reaches the end is followed by a check of every record; only when none is left
//!   on an older term are those terms retired (their data keys leave the keyring).
//! - [`change_key`] rewraps the keyring under a new passphrase or key file: one header write.
//!
//! Across replicas sharing a store, each of these runs under the coordinator's `keyring` job
//! (one replica at a time) and first takes the keyring as the header holds it, so that no
//! replica persists a keyring missing another's term; the rewrap's position is in the store, so
//! any replica resumes it. Older terms are retired only once every replica has had the
//! coordinator's adoption grace to take the new one (no envelope under a retired term lands).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{HEADER_KEY, Intent, Store, StoreError, open_backend, wait_inline};
use crate::config::StoreConfig;
use crate::vault::{KeySource, Keyring, Vault};

const REWRAP_KEY: &str = "rewrap";
/// The coordinator job every keyring change and rewrap step runs under.
const KEYRING_JOB: &str = "keyring";

/// Where the rewrap after the latest rotation stands (persisted in the store's metadata).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RewrapState {
    /// The term every record ends on.
    pub to_term: u32,
    /// Hex of the last record key handled in the current pass.
    pub after: Option<String>,
    /// Passes so far (a pass that still finds older records is followed by another).
    pub pass: u32,
    /// Records looked at, and re-sealed, over every pass.
    pub scanned: u64,
    pub rewrapped: u64,
    /// Records in the store when the rotation happened (for progress).
    pub total: u64,
    pub finished: bool,
    /// Terms whose keys were removed at the end.
    pub retired: Vec<u32>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What one [`Store::rewrap_step`] did.
#[derive(Debug)]
pub enum RewrapStep {
    /// Nothing to do.
    Idle,
    Progress(RewrapState),
    /// The last step: older terms are retired.
    Finished(RewrapState),
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("metadata serializes")
}

impl Store {
    /// Adds a key term; new writes use it at once; a rewrap of older records is scheduled.
    pub async fn rotate_key(&self) -> Result<u32, StoreError> {
        let _one = self.rotation.lock().await;
        let _job = self.coord.job(KEYRING_JOB, true).await?;
        self.rotate_locked().await
    }

    async fn rotate_locked(&self) -> Result<u32, StoreError> {
        // Counted before writes pause: only an estimate for progress.
        let total = self.record_count().await?;
        // No write is between sealing and applying while the term changes.
        let _quiet = self.gate.write().await;
        // Another replica's rotation first: the new term comes after every term there is.
        self.follow_keyring().await?;
        let term = self.vault.rotate(|keyring| {
            let state = RewrapState {
                to_term: keyring.current_term(),
                total,
                started_at: Some(Utc::now()),
                ..RewrapState::default()
            };
            wait_inline(self.backend.meta_put(REWRAP_KEY, &json(&state)))?;
            self.persist_keyring(keyring)
        })?;
        self.rewrap_wanted.notify_one();
        tracing::info!(term, records = total, "key rotated; rewrap scheduled");
        Ok(term)
    }

    /// Wraps `keyring` under the KEK and makes the header durable (one metadata write). Runs
    /// inside the vault's synchronous swap of the keyring, hence [`wait_inline`].
    fn persist_keyring(&self, keyring: &Keyring) -> Result<(), StoreError> {
        let header = self.header().with_keyring_kek(&self.kek, keyring);
        wait_inline(async {
            self.backend.meta_put(HEADER_KEY, &json(&header)).await?;
            self.backend.sync().await
        })?;
        *self.header.write().unwrap_or_else(|p| p.into_inner()) = header;
        Ok(())
    }

    /// Rotates on its own once the current term nears its encryption limit. A failure is
    /// logged, not returned: the write that noticed it is already durable.
    pub(super) async fn rotate_if_worn(&self) -> Result<(), StoreError> {
        if !self.vault.needs_rotation() {
            return Ok(());
        }
        let Ok(_one) = self.rotation.try_lock() else {
            return Ok(()); // someone is rotating already
        };
        let Some(_job) = self.coord.job(KEYRING_JOB, false).await? else {
            return Ok(()); // another replica is
        };
        if !self.vault.needs_rotation() {
            return Ok(());
        }
        let term = self.vault.current_term();
        tracing::warn!(
            term,
            encryptions = self.vault.encryptions(),
            "key term worn: rotating automatically"
        );
        if let Err(e) = self.rotate_locked().await {
            tracing::error!(error = %e, term, "automatic key rotation failed");
        }
        Ok(())
    }

    /// The rewrap's persisted state, if a rotation ever happened.
    pub async fn rewrap_state(&self) -> Result<Option<RewrapState>, StoreError> {
        match self.backend.meta_get(REWRAP_KEY).await? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| StoreError::Decode {
                    record: REWRAP_KEY.into(),
                    why: e.to_string(),
                }),
        }
    }

    /// Waits until a rotation asks for a rewrap.
    pub async fn rewrap_wanted(&self) {
        self.rewrap_wanted.notified().await
    }

    /// Re-seals up to `batch` records under the current term and persists the position.
    pub async fn rewrap_step(&self, batch: usize) -> Result<RewrapStep, StoreError> {
        let Some(state) = self.rewrap_state().await? else {
            return Ok(RewrapStep::Idle);
        };
        if state.finished {
            return Ok(RewrapStep::Idle);
        }
        // One replica steps at a time; another resumes from the stored position.
        let Some(_job) = self.coord.job(KEYRING_JOB, true).await? else {
            return Ok(RewrapStep::Idle);
        };
        self.follow_keyring().await?;
        // Reread under the job: the last holder may have moved it.
        let Some(mut state) = self.rewrap_state().await?.filter(|s| !s.finished) else {
            return Ok(RewrapStep::Idle);
        };
        let after = match &state.after {
            Some(hex_key) => Some(hex::decode(hex_key).map_err(|e| StoreError::Decode {
                record: REWRAP_KEY.into(),
                why: e.to_string(),
            })?),
            None => None,
        };
        let page = self
            .backend
            .scan_prefix(b"", after.as_deref(), batch.max(1))
            .await?;
        let Some((last, _)) = page.last() else {
            return self.end_of_pass(state).await;
        };
        let last = hex::encode(last);
        {
            let _writing = self.gate.read().await;
            let current = self.vault.current_term();
            state.to_term = current;
            for (key, sealed) in &page {
                state.scanned += 1;
                if Vault::term_of(sealed).is_some_and(|t| t < current) {
                    let plain = self.vault.open(key, sealed)?;
                    let resealed = self.vault.seal(key, &plain)?;
                    if self.backend.replace_if(key, sealed, resealed).await? {
                        state.rewrapped += 1;
                    }
                }
            }
        }
        state.after = Some(last);
        // The records first, then the position: a crash in between only redoes this batch.
        self.backend.sync().await?;
        self.backend.meta_put(REWRAP_KEY, &json(&state)).await?;
        self.backend.sync().await?;
        Ok(RewrapStep::Progress(state))
    }

    async fn end_of_pass(&self, mut state: RewrapState) -> Result<RewrapStep, StoreError> {
        let _one = self.rotation.lock().await;
        let current = self.vault.current_term();
        state.to_term = current;
        // Every replica takes the rotation within the grace: only then can the check below
        // be the last word (no envelope under an older term is still on its way).
        let since = state.started_at.map_or(Default::default(), |at| {
            Utc::now()
                .signed_duration_since(at)
                .to_std()
                .unwrap_or_default()
        });
        if let Some(left) = self.coord.adoption_grace().checked_sub(since) {
            tokio::time::sleep(left).await;
        }
        if self.records_below(current).await? > 0 {
            // Written under an older term before the rotation but after this pass went by, or
            // a later rotation: another pass.
            state.after = None;
            state.pass += 1;
            self.backend.meta_put(REWRAP_KEY, &json(&state)).await?;
            self.backend.sync().await?;
            return Ok(RewrapStep::Progress(state));
        }
        let old: Vec<u32> = self
            .vault
            .terms()
            .into_iter()
            .filter(|t| *t < current)
            .collect();
        state.finished = true;
        state.finished_at = Some(Utc::now());
        let retired = self.vault.retire(&old, |keyring| {
            let mut done = state.clone();
            done.retired = old.clone();
            wait_inline(self.backend.meta_put(REWRAP_KEY, &json(&done)))?;
            self.persist_keyring(keyring)
        })?;
        state.retired = retired;
        // Also when nothing needed retiring (the keyring was already clean).
        self.backend.meta_put(REWRAP_KEY, &json(&state)).await?;
        self.backend.sync().await?;
        tracing::info!(term = current, retired = ?state.retired, rewrapped = state.rewrapped, "rewrap finished; old key terms retired");
        Ok(RewrapStep::Finished(state))
    }

    /// Records whose envelope is sealed under a term older than `term`.
    pub async fn records_below(&self, term: u32) -> Result<u64, StoreError> {
        Ok(self
            .terms_in_use()
            .await?
            .range(..term)
            .map(|(_, n)| n)
            .sum())
    }

    /// Records in the store, counted page by page.
    async fn record_count(&self) -> Result<u64, StoreError> {
        Ok(self.terms_in_use().await?.values().sum())
    }

    /// Every term records are sealed under, with how many records use it.
    pub async fn terms_in_use(&self) -> Result<std::collections::BTreeMap<u32, u64>, StoreError> {
        let mut terms = std::collections::BTreeMap::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .backend
                .scan_prefix(b"", after.as_deref(), 4096)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(terms);
            };
            after = Some(last.clone());
            for (_, v) in &page {
                if let Some(t) = Vault::term_of(v) {
                    *terms.entry(t).or_insert(0) += 1;
                }
            }
        }
    }
}

/// Wraps the keyring of the stopped store `config` names under `new` instead of `old`: one
/// durable header write, so the store opens with exactly one of the two keys whatever happens.
pub async fn change_key(
    config: &StoreConfig,
    old: &KeySource,
    new: &KeySource,
) -> Result<(), StoreError> {
    let backend = open_backend(config, Intent::Existing).await?;
    let header = super::read_header(backend.as_ref()).await?;
    let rewrapped = header.rewrapped(old, new)?;
    backend.meta_put(HEADER_KEY, &json(&rewrapped)).await?;
    backend.sync().await
}
