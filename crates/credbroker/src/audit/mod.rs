//! The audit log: every data-plane call and admin change, allowed or denied, as a hash chain
//! (`h_n = SHA-256(h_{n-1} ‖ record)`), appended by one writer thread that batches whatever is
//! queued into one durable commit, which it syncs itself: every hop between threads costs a
//! wake-up on the path of every call, so the writer does not hand its sync to another thread.
//! [`AuditLog::record`] returns only once its record is on disk; if it cannot be written the
//! caller fails the request (fail closed).
//!
//! Records live in the store (sealed like everything else), up to [`RECORDS_PER_VALUE`] per
//! value under `b/{first seq:020}`, because one store write per record was most of the
//! writer's cost. The latest head is kept beside them under `head`, written in the same commit,
//! so that deleting the last records is detected too. Records never contain a secret.

mod verify;

pub use verify::{VerifyError, VerifySummary, export, verify};

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Batch, Store, StoreError, Table};

/// The audit log's table: `b/{first seq:020}` → up to [`RECORDS_PER_VALUE`] records, and
/// `head` → [`AuditHead`]. Written once and read rarely, so never cached.
pub const TABLE: Table = Table::uncached("audit");

/// Most records one commit carries.
const MAX_BATCH: usize = 4096;
/// Records stored in one value. Small enough that the default backend's pages (up to 17
/// values) stay under its blob threshold (128 KiB): larger pages go to blob files, one file
/// and two syncs each.
const RECORDS_PER_VALUE: usize = 16;
/// Queue depth before callers wait for room (back-pressure, not loss).
const QUEUE: usize = 65536;

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
}

/// A record as chained and stored. Field order is the canonical hashing order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time: DateTime<Utc>,
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
}

pub(crate) const GENESIS: [u8; 32] = [0; 32];

/// Where the batch whose first record is `first_seq` is stored.
pub(crate) fn batch_path(first_seq: u64) -> String {
    format!("{BATCH_PREFIX}{first_seq:020}")
}

pub(crate) const BATCH_PREFIX: &str = "b/";

pub(crate) const HEAD_PATH: &str = "head";

/// `SHA-256(prev ‖ canonical JSON of the record without its hash)`.
pub(crate) fn chain_hash(
    prev: &[u8; 32],
    seq: u64,
    time: &DateTime<Utc>,
    event: &AuditEvent,
) -> [u8; 32] {
    #[derive(Serialize)]
    struct Canonical<'a> {
        seq: u64,
        time: &'a DateTime<Utc>,
        #[serde(flatten)]
        event: &'a AuditEvent,
    }
    let body =
        serde_json::to_vec(&Canonical { seq, time, event }).expect("audit record serializes");
    let mut hasher = Sha256::new();
    hasher.update(prev);
    hasher.update(&body);
    hasher.finalize().into()
}

type Pending = (AuditEvent, oneshot::Sender<Result<u64, Arc<str>>>);

pub struct AuditLog {
    queue: mpsc::Sender<Pending>,
    head: Arc<Mutex<AuditHead>>,
    store: Arc<Store>,
}

impl AuditLog {
    /// Starts the writer task, continuing the chain from the stored head.
    pub async fn start(store: Arc<Store>) -> Result<AuditLog, AuditError> {
        let head = store
            .get::<AuditHead>(TABLE, HEAD_PATH)
            .await?
            .unwrap_or(AuditHead {
                seq: 0,
                hash: hex::encode(GENESIS),
                time: None,
            });
        let (queue, rx) = mpsc::channel(QUEUE);
        let head = Arc::new(Mutex::new(head));
        let (writer_store, writer_head) = (store.clone(), head.clone());
        std::thread::Builder::new()
            .name("credbroker-audit".into())
            .spawn(move || writer(writer_store, writer_head, rx))
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(AuditLog { queue, head, store })
    }

    /// Appends `event`; returns its sequence number once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send((event, tx))
            .await
            .map_err(|_| AuditError::Stopped)?;
        rx.await
            .map_err(|_| AuditError::Stopped)?
            .map_err(|e| AuditError::Write(e.to_string()))
    }

    pub fn head(&self) -> AuditHead {
        self.head.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records after `after_seq` that pass `keep`, at most `limit`, looking at most at
    /// `max_scan` records so one query cannot walk the whole log.
    pub async fn query(
        &self,
        after_seq: u64,
        limit: usize,
        max_scan: usize,
        keep: impl Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let mut out = Vec::new();
        let mut scanned = 0;
        for_each_record(&self.store, after_seq.saturating_add(1), |record| {
            scanned += 1;
            if keep(&record) {
                out.push(record);
            }
            if out.len() < limit && scanned < max_scan {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        })
        .await?;
        Ok(out)
    }

    /// How many events wait to be written.
    pub fn queue_depth(&self) -> usize {
        QUEUE - self.queue.capacity()
    }
}

/// Runs until every [`AuditLog`] (and so every sender) is gone.
fn writer(store: Arc<Store>, head: Arc<Mutex<AuditHead>>, mut rx: mpsc::Receiver<Pending>) {
    let mut pending: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while rx.blocking_recv_many(&mut pending, MAX_BATCH) > 0 {
        let start = head.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut prev = [0u8; 32];
        if hex::decode_to_slice(&start.hash, &mut prev).is_err() {
            fail_all(&mut pending, "the stored audit head is damaged");
            continue;
        }
        let mut seq = start.seq;
        let mut records = Vec::with_capacity(pending.len());
        let time = Utc::now();
        for (event, _) in &pending {
            seq += 1;
            prev = chain_hash(&prev, seq, &time, event);
            records.push(AuditRecord {
                seq,
                time,
                event: event.clone(),
                hash: hex::encode(prev),
            });
        }
        let new_head = AuditHead {
            seq,
            hash: hex::encode(prev),
            time: Some(time),
        };
        let mut batch = Batch::new();
        for chunk in records.chunks(RECORDS_PER_VALUE) {
            batch.put(TABLE, batch_path(chunk[0].seq), &chunk);
        }
        batch.put(TABLE, HEAD_PATH, &new_head);
        let started = std::time::Instant::now();
        // This thread is the writer's own, not a runtime worker: it waits for its commit here.
        let committed = crate::store::wait_inline(store.commit_here(batch));
        crate::metrics::audit_flush(pending.len(), started.elapsed());
        match committed {
            Ok(()) => {
                *head.lock().unwrap_or_else(|p| p.into_inner()) = new_head;
                let first = start.seq + 1;
                for (i, (_, reply)) in pending.drain(..).enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; failing the requests it covers");
                fail_all(&mut pending, &e.to_string());
            }
        }
    }
}

/// Calls `visit` on every stored record from `from_seq` on, in sequence order, until it breaks.
pub(crate) async fn for_each_record(
    store: &Store,
    from_seq: u64,
    mut visit: impl FnMut(AuditRecord) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    // The batch holding `from_seq` is the last one starting at or before it.
    let first = store
        .last::<Vec<AuditRecord>>(TABLE, BATCH_PREFIX, Some(&batch_path(from_seq)))
        .await?;
    let mut after = first.as_ref().map(|(path, _)| path.clone());
    let mut page: Vec<Vec<AuditRecord>> = first.into_iter().map(|(_, records)| records).collect();
    loop {
        for record in page.drain(..).flatten() {
            if record.seq >= from_seq && visit(record).is_break() {
                return Ok(());
            }
        }
        let next = store
            .scan::<Vec<AuditRecord>>(TABLE, BATCH_PREFIX, after.as_deref(), 64)
            .await?;
        let Some((last, _)) = next.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        page.extend(next.into_iter().map(|(_, records)| records));
    }
}

fn fail_all(pending: &mut Vec<Pending>, why: &str) {
    let why: Arc<str> = Arc::from(why);
    for (_, reply) in pending.drain(..) {
        let _ = reply.send(Err(why.clone()));
    }
}
