//! Stores written before the audit log had files of its own kept its records in the store's
//! `audit` table. The daemon refuses to start over such a store; `credbroker audit migrate`
//! (daemon stopped) re-chains those records, with their times, into the segment log and then
//! removes the table. Invariant: the table is removed only after every record is durable in
//! the log, so a migration cut short is simply run again (it refuses a log that already holds
//! records, and the table is still whole).

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::log::Appender;
use super::{AuditError, AuditEvent};
use crate::store::{Batch, Store, Table};

/// The old table: `b/{first seq:020}` → records, `head` → the head.
const OLD_TABLE: Table = Table::uncached("audit");
const OLD_BATCH_PREFIX: &str = "b/";
const OLD_HEAD: &str = "head";

#[derive(Deserialize)]
struct OldHead {
    seq: u64,
}

#[derive(Deserialize)]
struct OldRecord {
    seq: u64,
    time: DateTime<Utc>,
    #[serde(flatten)]
    event: AuditEvent,
}

/// Records the old table says it holds (0: none, or already migrated).
pub(crate) async fn old_count(store: &Store) -> Result<u64, AuditError> {
    Ok(store
        .get::<serde_json::Value>(OLD_TABLE, OLD_HEAD)
        .await?
        .and_then(|v| serde_json::from_value::<OldHead>(v).ok())
        .map_or(0, |h| h.seq))
}

/// How many old-format records `store` holds.
pub async fn old_records(store: &Store) -> Result<u64, AuditError> {
    old_count(store).await
}

/// Moves the old table's records into the (empty) log in `dir`; returns how many.
pub async fn migrate(store: &Store, dir: &Path, node: Option<&str>) -> Result<u64, AuditError> {
    if old_count(store).await? == 0 {
        return Ok(0);
    }
    let mut appender = Appender::open(dir, store.vault(), node, 32 << 20)?;
    if appender.tail.seq != 0 {
        return Err(AuditError::Damaged(format!(
            "{} already holds {} records; migrate only into an empty log",
            dir.display(),
            appender.tail.seq
        )));
    }
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page: Vec<(String, Vec<serde_json::Value>)> = store
            .scan(OLD_TABLE, OLD_BATCH_PREFIX, after.as_deref(), 64)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (path, records) in page {
            keys.push(path);
            let mut records: Vec<OldRecord> = records
                .into_iter()
                .map(serde_json::from_value)
                .collect::<Result<_, _>>()
                .map_err(|e| AuditError::Damaged(format!("an old audit record: {e}")))?;
            records.sort_by_key(|r| r.seq);
            for same_time in records.chunk_by(|a, b| a.time == b.time) {
                let events: Vec<_> = same_time.iter().map(|r| r.event.clone()).collect();
                appender.append_at(store.vault(), &events, same_time[0].time)?;
            }
        }
    }
    let moved = appender.tail.seq;
    let mut batch = Batch::new();
    for key in keys {
        batch.delete(OLD_TABLE, key);
    }
    batch.delete(OLD_TABLE, OLD_HEAD);
    store.commit(batch).await?;
    Ok(moved)
}
