//! The audit log: every data-plane call and admin change, allowed or denied, as a hash chain
//! (`h_n = SHA-256(h_{n-1} ‖ record)`), kept in an append-only segment log of its own beside the
//! store (`[audit] path`), outside the storage engine.
//!
//! Records are written in batches with one `write` and one `fdatasync` each: callers queue, and
//! one writer thread takes whatever queued while its previous sync ran as the next batch (group
//! commit, [`commit`]; see [`log`] for the files' invariants). [`AuditLog::record`] returns only once its record is on
//! disk; if it cannot be written the caller fails the request (fail closed). Records never
//! contain a secret; they may name users, so batches are sealed with a key from the vault.
//!
//! A maintenance thread, off the writer's path, zero-fills the next segment, signs a
//! [`Checkpoint`] every `checkpoint_records` records or `checkpoint_secs` seconds (kept in the
//! log's folder and appended to the witness file), and prunes old segments ([`retention`]).

mod checkpoint;
mod commit;
mod log;
mod migrate;
mod nodes;
mod retention;
mod segment;
#[cfg(test)]
mod tests;
mod verify;
mod witness;

pub use checkpoint::{Checkpoint, Kind as CheckpointKind};
pub use migrate::{migrate, old_records};
pub use nodes::{NodeSummary, NodesError, node_of, verify_nodes};
pub use verify::{VerifyError, VerifySummary, export, verify, verify_against};

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::store::{Store, StoreError};
use crate::vault::VaultError;
use commit::GroupCommit;
use log::{Appender, CHECKPOINT_FILE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Allowed and done.
    Ok,
    /// Admitted, and about to act: the intent record an acting RPC writes before its side
    /// effect (its outcome follows in a record of its own).
    Allowed,
    /// Refused by policy or by authentication.
    Denied,
    /// Allowed, but failed (bad input, upstream error…); `reason` says why.
    Error,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// The `operation` labels of the records no RPC writes; an RPC's records take theirs from
/// the RPC table ([`crate::api::Rpc::audit_label`]).
pub mod label {
    /// The browser's return from an OAuth provider (the HTTP listener's callback).
    pub const OAUTH_CALLBACK: &str = "OAuthCallback";
    /// A browser opening BeginConnect's start link (the HTTP listener's `/oauth/start`).
    pub const OAUTH_START: &str = "OAuthStart";
    /// A TLS handshake the gRPC listener refused.
    pub const TLS_HANDSHAKE: &str = "TlsHandshake";
}

/// What a caller asks to be recorded.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    pub caller: String,
    pub operation: String,
    pub workspace: String,
    pub connector: String,
    pub user_id: String,
    pub outcome: Option<Outcome>,
    pub reason: String,
    pub request_id: String,
    /// What the call did, where an RPC says more than its outcome (Broker.Call: method, host,
    /// path, query names, status, bytes). Never a secret, a header, a body or a query value.
    /// Left out of the record when empty, so records written before it hash as they did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A record as read back. Field order is the canonical hashing order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time: DateTime<Utc>,
    /// The node whose log holds it.
    #[serde(default)]
    pub node: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hex SHA-256 of the chain up to and including this record.
    pub hash: String,
}

/// The chain's latest position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditHead {
    pub seq: u64,
    pub hash: String,
    pub time: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be written: {0}")]
    Write(String),
    #[error("the audit writer has stopped")]
    Stopped,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the audit log is damaged: {0}")]
    Damaged(String),
    #[error(
        "the audit log ends at record {last}, but its latest signed checkpoint covers record {checkpoint}: acknowledged records are gone (restore the log, or see `credbroker audit verify`)"
    )]
    Lost { checkpoint: u64, last: u64 },
    #[error("[audit] witness_url {0}")]
    Witness(String),
    #[error("the audit keys: {0}")]
    Keys(VaultError),
    #[error(
        "this store keeps {records} audit records in the old in-store format; move them to the audit log with `credbroker audit migrate --config …` (daemon stopped)"
    )]
    OldFormat { records: u64 },
}

impl AuditError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        AuditError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Appends the canonical JSON of a record without its hash (the bytes its chain hash covers)
/// to `out`. Field order is the hashing order.
pub(crate) fn write_canonical(
    out: &mut Vec<u8>,
    seq: u64,
    time: &DateTime<Utc>,
    node: &str,
    event: &AuditEvent,
) {
    #[derive(Serialize)]
    struct Canonical<'a> {
        seq: u64,
        time: &'a DateTime<Utc>,
        node: &'a str,
        #[serde(flatten)]
        event: &'a AuditEvent,
    }
    serde_json::to_writer(
        out,
        &Canonical {
            seq,
            time,
            node,
            event,
        },
    )
    .expect("audit record serializes");
}

/// `SHA-256(prev ‖ canonical)`: one link of the chain.
pub(crate) fn chain_step(prev: &[u8; 32], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(canonical);
    hasher.finalize().into()
}

/// `SHA-256(prev ‖ canonical JSON of the record without its hash)`.
pub(crate) fn chain_hash(
    prev: &[u8; 32],
    seq: u64,
    time: &DateTime<Utc>,
    node: &str,
    event: &AuditEvent,
) -> [u8; 32] {
    let mut body = Vec::with_capacity(256);
    write_canonical(&mut body, seq, time, node, event);
    chain_step(prev, &body)
}

/// Where the log lives and how it checkpoints and prunes (`[audit]`, resolved).
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub dir: PathBuf,
    pub node: Option<String>,
    pub segment_bytes: u64,
    pub checkpoint_records: u64,
    pub checkpoint_every: Duration,
    pub witness_file: Option<PathBuf>,
    /// Where each checkpoint is POSTed ([`witness`]), and a CA file trusted for it.
    pub witness_url: Option<String>,
    pub witness_ca_file: Option<PathBuf>,
    pub retention: retention::Retention,
}

pub use retention::Retention;

impl LogSettings {
    /// The defaults, for a log in `dir` (tests, tools).
    pub fn at(dir: PathBuf) -> Self {
        let defaults = crate::config::AuditConfig::default();
        Self {
            dir,
            node: None,
            segment_bytes: defaults.segment_bytes,
            checkpoint_records: defaults.checkpoint_records,
            checkpoint_every: Duration::from_secs(defaults.checkpoint_secs),
            witness_file: None,
            witness_url: None,
            witness_ca_file: None,
            retention: Retention::default(),
        }
    }

    pub fn from_config(config: &Config) -> Self {
        let audit = &config.audit;
        Self {
            dir: audit.dir(&config.store),
            node: audit.node.clone(),
            segment_bytes: audit.segment_bytes,
            checkpoint_records: audit.checkpoint_records.max(1),
            checkpoint_every: Duration::from_secs(audit.checkpoint_secs.max(1)),
            witness_file: audit.witness_file.clone(),
            witness_url: audit.witness_url.clone(),
            witness_ca_file: audit.witness_ca_file.clone(),
            retention: Retention {
                max_age: audit.retain_days.map(|d| Duration::from_secs(d * 86_400)),
                max_bytes: audit.retain_bytes,
                archive: audit.archive_dir(&config.store),
            },
        }
    }
}

/// The sink for `[audit] witness_url`, if set (its CA file read now).
fn witness_sink(settings: &LogSettings) -> Result<Option<witness::Handoff>, AuditError> {
    let Some(url) = &settings.witness_url else {
        return Ok(None);
    };
    let ca = match &settings.witness_ca_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| AuditError::io(path, e))?),
        None => None,
    };
    witness::start(url, ca.as_deref()).map(Some)
}

/// Signs and keeps checkpoints; shared by the maintenance thread and [`AuditLog::checkpoint_now`].
struct Checkpointer {
    store: Arc<Store>,
    settings: LogSettings,
    node: String,
    head: Arc<Mutex<AuditHead>>,
    /// The latest checkpoint; held while one is signed, stored and witnessed.
    latest: Mutex<Option<Checkpoint>>,
    /// The witness URL's sink, if one is configured.
    witness_url: Option<witness::Handoff>,
}

impl Checkpointer {
    /// Signs the current head unless the latest checkpoint covers it; returns the latest.
    fn checkpoint(&self) -> Result<Option<Checkpoint>, AuditError> {
        let mut latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if head.seq == 0 || latest.as_ref().is_some_and(|cp| cp.seq >= head.seq) {
            return Ok(latest.clone());
        }
        let cp = Checkpoint::sign(
            self.store.vault(),
            CheckpointKind::Checkpoint,
            &self.node,
            head.seq,
            &head.hash,
            head.time.unwrap_or_else(Utc::now),
        )?;
        cp.store(&self.settings.dir.join(CHECKPOINT_FILE))?;
        *latest = Some(cp.clone());
        if let Some(sink) = &self.witness_url {
            sink.send_replace(Some(cp.clone()));
        }
        if let Some(witness) = &self.settings.witness_file {
            cp.witness(witness)?;
        }
        Ok(Some(cp))
    }

    fn due(&self, since: std::time::Instant) -> bool {
        let head = self.head.lock().unwrap_or_else(|p| p.into_inner()).seq;
        let covered = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |cp| cp.seq);
        head > covered
            && (head - covered >= self.settings.checkpoint_records
                || since.elapsed() >= self.settings.checkpoint_every)
    }
}

pub struct AuditLog {
    commit: Arc<GroupCommit>,
    head: Arc<Mutex<AuditHead>>,
    store: Arc<Store>,
    checkpoints: Arc<Checkpointer>,
    dir: PathBuf,
    node: String,
}

impl AuditLog {
    /// Opens the log `settings` names (recovering its tail) and starts its writer.
    pub async fn start(store: Arc<Store>, settings: LogSettings) -> Result<AuditLog, AuditError> {
        let old = migrate::old_count(&store).await?;
        if old > 0 {
            return Err(AuditError::OldFormat { records: old });
        }
        let appender = {
            let (store, settings) = (store.clone(), settings.clone());
            crate::store::run_blocking(async move {
                Appender::open(
                    &settings.dir,
                    store.vault(),
                    settings.node.as_deref(),
                    settings.segment_bytes,
                )
            })
            .await??
        };
        let node = appender.node.clone();
        let head = Arc::new(Mutex::new(appender.tail.head()));
        let latest = checkpoint::Checkpoint::load(&settings.dir.join(CHECKPOINT_FILE))?;
        let checkpoints = Arc::new(Checkpointer {
            store: store.clone(),
            settings: settings.clone(),
            node: node.clone(),
            head: head.clone(),
            latest: Mutex::new(latest),
            witness_url: witness_sink(&settings)?,
        });
        let (nudge, nudges) = std::sync::mpsc::sync_channel(1);
        let commit = GroupCommit::start(
            store.clone(),
            appender,
            head.clone(),
            nudge,
            settings.checkpoint_records,
        )?;
        let maintained = checkpoints.clone();
        std::thread::Builder::new()
            .name("credbroker-audit-maint".into())
            .spawn(move || maintain(maintained, nudges))
            .map_err(|e| AuditError::Write(format!("cannot start the audit maintenance: {e}")))?;
        Ok(AuditLog {
            commit,
            head,
            store,
            checkpoints,
            dir: settings.dir,
            node,
        })
    }

    /// Appends `event`; returns its sequence number once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let written = self.commit.submit(event)?;
        written
            .await
            .map_err(|_| AuditError::Stopped)?
            .map_err(|e| AuditError::Write(e.to_string()))
    }

    pub fn head(&self) -> AuditHead {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This node's id, as every record of its log carries it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Hex of the Ed25519 key the log's checkpoints are signed with.
    pub fn public_key(&self) -> Result<String, AuditError> {
        self.store
            .vault()
            .audit_public_key()
            .map_err(AuditError::Keys)
    }

    /// The latest signed checkpoint, if any was made yet.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        self.checkpoints
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Signs a checkpoint of the current head now (unless the latest covers it), stores and
    /// witnesses it.
    pub async fn checkpoint_now(&self) -> Result<Option<Checkpoint>, AuditError> {
        let checkpoints = self.checkpoints.clone();
        crate::store::run_blocking(async move { checkpoints.checkpoint() }).await?
    }

    /// Records after `after_seq` that pass `keep`, at most `limit`, looking at most at
    /// `max_scan` records so one query cannot walk the whole log. Reads only what the writer
    /// has acknowledged.
    pub async fn query(
        &self,
        after_seq: u64,
        limit: usize,
        max_scan: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let upto = self.head().seq;
        let mut out = Vec::new();
        let mut scanned = 0;
        if after_seq >= upto {
            return Ok(out);
        }
        log::read_records(
            &self.dir,
            self.store.vault(),
            after_seq + 1,
            upto,
            |record| {
                scanned += 1;
                if keep(&record) {
                    out.push(record);
                }
                if out.len() < limit && scanned < max_scan {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )?;
        Ok(out)
    }

    /// How many events wait to be written.
    pub fn queue_depth(&self) -> usize {
        self.commit.depth()
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.commit.close();
    }
}

/// The maintenance thread: a spare segment, checkpoints, pruning. Ends (with a last
/// checkpoint) when the writer does.
fn maintain(checkpoints: Arc<Checkpointer>, nudges: std::sync::mpsc::Receiver<()>) {
    use std::sync::mpsc::RecvTimeoutError;
    let settings = checkpoints.settings.clone();
    let mut since = std::time::Instant::now();
    loop {
        let stopped = matches!(
            nudges.recv_timeout(settings.checkpoint_every.min(Duration::from_secs(1))),
            Err(RecvTimeoutError::Disconnected)
        );
        if let Err(e) = Appender::prepare_spare(&settings.dir, settings.segment_bytes) {
            tracing::warn!(error = %e, "audit log: cannot prepare the next segment");
        }
        if stopped || checkpoints.due(since) {
            since = std::time::Instant::now();
            match checkpoints.checkpoint() {
                Ok(Some(cp)) => {
                    if let Err(e) = retention::prune(&checkpoints.store, &settings, &cp) {
                        tracing::error!(error = %e, "audit log: pruning failed");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "audit log: cannot sign a checkpoint"),
            }
        }
        if stopped {
            return;
        }
    }
}
