//! The PostgreSQL [`Coordinator`]: how replicas on one database agree. Its tables and triggers
//! live beside the backend's, in the store's schema: its migration 2 ([`MIGRATION`]), created
//! by `credbroker init` and migrated by `serve` like the rest of the schema:
//!
//! - `leases (name, token, holder, expires_at)`: a lease is taken by one upsert that bumps the
//!   token only if the row is free or lapsed (by the server's clock, so replicas' clocks never
//!   matter); a fenced apply locks the lease row (`FOR UPDATE`) and checks its token in the
//!   transaction that writes the records, so a takeover either waits for the write or the write
//!   sees the new token and writes nothing;
//! - `counters (term, total)`: a reservation is `INSERT … ON CONFLICT DO UPDATE SET total =
//!   total + n RETURNING total`, one atomic statement: no two replicas get the same range;
//! - jobs are session advisory locks, each on a connection of its own held by the guard: a
//!   replica that dies releases its jobs with its connections;
//! - changes: triggers on `records` and `meta` `NOTIFY` every written key on a channel of the
//!   schema's own, delivered when the writing transaction commits. One connection per replica
//!   listens and sends a heartbeat every [`HEARTBEAT`]; if the heartbeat fails or takes longer
//!   than [`HEARTBEAT_TIMEOUT`], or the connection ends, it reports [`Change::Lost`] (the cache
//!   is dropped and bypassed), then reconnects and reports [`Change::Resumed`].
//!
//! The agreement bound: a write committed on one replica is never served from another's cache
//! once the notification arrives (milliseconds, measured by `tests/replicas.rs`); if
//! notifications stop arriving because the connection failed, the other replica stops caching
//! within [`CHANGE_BOUND`] (heartbeat + its timeout).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_postgres::types::{ToSql, Type};

use super::coord::{Change, Coordinator, JobGuard, Lease};
use super::postgres_backend::{PgBackend, Shared, pg_error, split};
use super::{Backend, RawOp, StoreError};

/// How often the listening connection proves it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a heartbeat may take before the connection counts as lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
/// The longest a replica may serve a cached value another replica overwrote: a lost
/// notification connection is noticed (and the cache dropped) within this.
pub const CHANGE_BOUND: Duration = Duration::from_secs(2);
/// How often a waiting job asks again.
const JOB_POLL: Duration = Duration::from_millis(50);
/// The longest a job waits for another holder.
const JOB_WAIT: Duration = Duration::from_secs(30);

type Params<'a> = &'a [(&'a (dyn ToSql + Sync), Type)];

/// The coordination tables and change triggers: migration 2 of the store's schema (see
/// [`super::postgres_backend::MIGRATIONS`]), `{s}` standing for the schema. The channel is named
/// after the schema (its first 50 characters), as [`channel_of`] computes it.
pub const MIGRATION: &str = "
    CREATE TABLE {s}.leases (name text COLLATE \"C\" PRIMARY KEY, token bigint NOT NULL,
      holder text, expires_at timestamptz NOT NULL);
    CREATE TABLE {s}.counters (term bigint PRIMARY KEY, total bigint NOT NULL);
    CREATE FUNCTION {s}.record_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify(left(TG_TABLE_SCHEMA, 50) || '_changes', 'r' || encode(OLD.key, 'hex'));
      ELSE
        PERFORM pg_notify(left(TG_TABLE_SCHEMA, 50) || '_changes', 'r' || encode(NEW.key, 'hex'));
      END IF;
      RETURN NULL;
    END $$;
    CREATE FUNCTION {s}.meta_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      PERFORM pg_notify(left(TG_TABLE_SCHEMA, 50) || '_changes', 'm' || NEW.key);
      RETURN NULL;
    END $$;
    CREATE TRIGGER record_changed AFTER INSERT OR UPDATE OR DELETE ON {s}.records
      FOR EACH ROW EXECUTE FUNCTION {s}.record_changed();
    CREATE TRIGGER meta_changed AFTER INSERT OR UPDATE ON {s}.meta
      FOR EACH ROW EXECUTE FUNCTION {s}.meta_changed();";

struct Sql {
    try_lease: String,
    release: String,
    lock_lease: String,
    apply: String,
    reserve: String,
    reserved: String,
    channel: String,
}

/// The notification channel of `schema` (a plain identifier: the schema's is one).
fn channel_of(schema: &str) -> String {
    format!("{}_changes", &schema[..schema.len().min(50)])
}

impl Sql {
    fn new(s: &str) -> Self {
        Self {
            try_lease: format!(
                "INSERT INTO {s}.leases AS l (name, token, holder, expires_at) \
                 VALUES ($1, 1, $2, clock_timestamp() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET token = l.token + 1, holder = EXCLUDED.holder, \
                   expires_at = EXCLUDED.expires_at \
                 WHERE l.holder IS NULL OR l.expires_at < clock_timestamp() \
                 RETURNING token"
            ),
            release: format!("UPDATE {s}.leases SET holder = NULL WHERE name = $1 AND token = $2"),
            lock_lease: format!(
                "SELECT 1 FROM {s}.leases WHERE name = $1 AND token = $2 FOR UPDATE"
            ),
            apply: format!(
                "WITH gone AS (DELETE FROM {s}.records WHERE key = ANY($3)) INSERT INTO {s}.records (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            ),
            reserve: format!(
                "INSERT INTO {s}.counters AS c (term, total) VALUES ($1, $2) \
                 ON CONFLICT (term) DO UPDATE SET total = c.total + EXCLUDED.total RETURNING total"
            ),
            reserved: format!("SELECT total FROM {s}.counters WHERE term = $1"),
            channel: channel_of(s),
        }
    }
}

/// A replica's name on the leases it holds (for an operator reading the table).
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

pub struct PgCoordinator {
    backend: Arc<dyn Backend>,
    sql: Arc<Sql>,
    holder: String,
    changes: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
}

impl PgCoordinator {
    /// Starts following changes (the tables are the schema's migration 2, [`MIGRATION`]).
    pub async fn open(backend: Arc<dyn Backend>) -> Result<Self, StoreError> {
        let pg = pg_of(backend.as_ref());
        let sql = Arc::new(Sql::new(pg.schema()));
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = pg.run(|s| async move { Ok(s) }).await?;
        pg.runtime().spawn(follow(shared, sql.channel.clone(), tx));
        Ok(Self {
            backend,
            sql,
            holder: holder_name(),
            changes: Mutex::new(Some(rx)),
        })
    }

    fn pg(&self) -> &PgBackend {
        pg_of(self.backend.as_ref())
    }
}

fn pg_of(backend: &dyn Backend) -> &PgBackend {
    backend
        .as_any()
        .downcast_ref::<PgBackend>()
        .expect("the PostgreSQL coordinator runs over the PostgreSQL backend")
}

/// Follows the schema's change channel for as long as anyone takes the changes.
async fn follow(shared: Arc<Shared>, channel: String, tx: mpsc::UnboundedSender<Change>) {
    let mut wait = Duration::from_millis(100);
    loop {
        let outcome = listen(&shared, &channel, &tx).await;
        if tx.send(Change::Lost).is_err() {
            return;
        }
        if let Err(e) = outcome {
            tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "the store's change feed was lost; reconnecting");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

/// One listening connection: `Resumed` once it listens, then every change until it fails.
async fn listen(
    shared: &Shared,
    channel: &str,
    tx: &mpsc::UnboundedSender<Change>,
) -> Result<(), StoreError> {
    let location = shared.pool().location().to_string();
    let error = |e| pg_error(&location, e);
    let mut listener = tokio::time::timeout(HEARTBEAT_TIMEOUT * 2, shared.pool().listen())
        .await
        .map_err(|_| lost("connecting took too long"))??;
    listener
        .client
        .batch_execute(&format!("LISTEN {channel}"))
        .await
        .map_err(error)?;
    if tx.send(Change::Resumed).is_err() {
        return Ok(());
    }
    let mut beat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            first = listener.notifications.recv() => {
                let Some(first) = first else { return Err(lost("the connection ended")) };
                let mut batch = vec![first];
                while let Ok(more) = listener.notifications.try_recv() {
                    batch.push(more);
                }
                for change in decode(batch.iter().map(|n| n.payload())) {
                    if tx.send(change).is_err() {
                        return Ok(());
                    }
                }
            }
            _ = beat.tick() => {
                tokio::time::timeout(HEARTBEAT_TIMEOUT, listener.client.simple_query("SELECT 1"))
                    .await
                    .map_err(|_| lost("a heartbeat went unanswered"))?
                    .map_err(error)?;
            }
        }
    }
}

fn lost(why: &str) -> StoreError {
    StoreError::Backend(format!("the change feed: {why}"))
}

/// Notification payloads as changes: record keys together, metadata keys one by one.
fn decode<'a>(payloads: impl Iterator<Item = &'a str>) -> Vec<Change> {
    let mut keys = Vec::new();
    let mut changes = Vec::new();
    for payload in payloads {
        if let Some(hex_key) = payload.strip_prefix('r') {
            match hex::decode(hex_key) {
                Ok(key) => keys.push(key),
                // Not ours to read: drop everything rather than guess.
                Err(_) => changes.extend([Change::Lost, Change::Resumed]),
            }
        } else if let Some(meta) = payload.strip_prefix('m') {
            changes.push(Change::Meta(meta.to_string()));
        }
    }
    if !keys.is_empty() {
        changes.insert(0, Change::Keys(keys));
    }
    changes
}

/// The fenced write: lock the lease row, check its token, write, commit.
async fn apply_fenced(
    s: &Shared,
    sql: &Sql,
    lease: Lease,
    ops: Vec<RawOp>,
) -> Result<bool, StoreError> {
    let location = s.pool().location().to_string();
    let error = |e| pg_error(&location, e);
    let (keys, values, gone) = split(ops);
    let token = lease.token as i64;
    let mut conn = s.pool().get().await?;
    let tx = conn.transaction().await.map_err(error)?;
    let held = tx
        .query_typed(
            &sql.lock_lease,
            &[(&lease.name, Type::TEXT), (&token, Type::INT8)],
        )
        .await
        .map_err(error)?;
    if held.is_empty() {
        tx.rollback().await.map_err(error)?;
        conn.completed();
        return Ok(false);
    }
    let params: Params = &[
        (&keys, Type::BYTEA_ARRAY),
        (&values, Type::BYTEA_ARRAY),
        (&gone, Type::BYTEA_ARRAY),
    ];
    tx.execute_typed(&sql.apply, params).await.map_err(error)?;
    tx.commit().await.map_err(error)?;
    conn.completed();
    Ok(true)
}

/// Takes the advisory lock of `name` on a connection of its own, held by the returned guard.
async fn take_job(
    s: Arc<Shared>,
    name: String,
    wait: bool,
) -> Result<Option<JobGuard>, StoreError> {
    let location = s.pool().location().to_string();
    let lock = format!("credbroker job {} {name}", s.schema());
    let listener = s.pool().listen().await?;
    let started = tokio::time::Instant::now();
    loop {
        let row = listener
            .client
            .query_typed_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[(&lock, Type::TEXT)],
            )
            .await
            .map_err(|e| pg_error(&location, e))?;
        if row.get::<_, bool>(0) {
            return Ok(Some(JobGuard::new(listener.client)));
        }
        if !wait {
            return Ok(None);
        }
        if started.elapsed() > JOB_WAIT {
            return Err(StoreError::Timeout {
                location,
                waited_ms: JOB_WAIT.as_millis() as u64,
            });
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}

#[async_trait]
impl Coordinator for PgCoordinator {
    async fn try_lease(&self, name: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let (sql, name, holder) = (self.sql.clone(), name.to_string(), self.holder.clone());
        let secs = ttl.as_secs_f64();
        self.pg()
            .run(move |s| async move {
                let params: Params = &[
                    (&name, Type::TEXT),
                    (&holder, Type::TEXT),
                    (&secs, Type::FLOAT8),
                ];
                let rows = s.query(&sql.try_lease, params).await?;
                Ok(rows.first().map(|row| Lease {
                    name: name.clone(),
                    token: row.get::<_, i64>(0) as u64,
                }))
            })
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let (sql, name, token) = (self.sql.clone(), lease.name.clone(), lease.token as i64);
        self.pg()
            .run(move |s| async move {
                let params: Params = &[(&name, Type::TEXT), (&token, Type::INT8)];
                s.execute(&sql.release, params).await.map(drop)
            })
            .await
    }

    async fn apply_fenced(&self, lease: &Lease, ops: Vec<RawOp>) -> Result<bool, StoreError> {
        let (sql, lease) = (self.sql.clone(), lease.clone());
        self.pg()
            .run(move |s| async move { apply_fenced(&s, &sql, lease, ops).await })
            .await
    }

    async fn reserve(&self, term: u32, count: u64) -> Result<u64, StoreError> {
        let sql = self.sql.clone();
        let (term, count) = (i64::from(term), count as i64);
        self.pg()
            .run(move |s| async move {
                if count == 0 {
                    let rows = s.query(&sql.reserved, &[(&term, Type::INT8)]).await?;
                    return Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as u64);
                }
                let params: Params = &[(&term, Type::INT8), (&count, Type::INT8)];
                let rows = s.query(&sql.reserve, params).await?;
                let total = rows.first().map(|r| r.get::<_, i64>(0));
                total
                    .map(|t| t as u64)
                    .ok_or_else(|| StoreError::Backend("a reservation returned no total".into()))
            })
            .await
    }

    async fn job(&self, name: &str, wait: bool) -> Result<Option<JobGuard>, StoreError> {
        // Not under the call deadline: waiting for a holder may take longer than one statement.
        let shared = self.pg().run(|s| async move { Ok(s) }).await?;
        let name = name.to_string();
        self.pg()
            .runtime()
            .spawn(take_job(shared, name, wait))
            .await
            .map_err(|e| StoreError::Backend(format!("a job lock task failed: {e}")))?
    }

    fn changes(&self) -> Option<mpsc::UnboundedReceiver<Change>> {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn adoption_grace(&self) -> Duration {
        CHANGE_BOUND * 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_to_keys_and_metadata() {
        let changes = decode(["r6100", "mheader", "r62", "rzz"].into_iter());
        assert_eq!(
            changes,
            [
                Change::Keys(vec![b"a\0".to_vec(), b"b".to_vec()]),
                Change::Meta("header".into()),
                Change::Lost,
                Change::Resumed,
            ]
        );
        assert_eq!(channel_of("credbroker"), "credbroker_changes");
        assert!(channel_of(&"s".repeat(63)).len() < 63);
    }
}
