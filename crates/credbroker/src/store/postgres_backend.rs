//! The PostgreSQL backend (`[store] backend = "postgres"`): records and metadata in two tables
//! of one PostgreSQL schema ([`schema`]), reached over TLS through rustls with the ring
//! provider ([`tls`]), through a pool of connections ([`pool`]).
//!
//! Client library: tokio-postgres (with a TLS adapter of our own), not sqlx. It sits on the
//! tokio, rustls and sha2 versions the project already has and adds only the protocol crates;
//! sqlx would bring its own pool, macros, migration runner and a second TLS stack's
//! configuration. What sqlx would give is small here: six fixed statements, one pool.
//!
//! Invariants (those of [`Backend`], and):
//! - **Atomic batches**: one `apply` is one SQL statement (a data-modifying CTE: the deletes,
//!   then an upsert of the puts), so one implicit transaction; ops on one key are folded first
//!   (the later wins).
//! - **Durable on sync**: every statement commits with `synchronous_commit` as the server sets
//!   it, checked on every connection to be durable (`on`, `remote_write`, `remote_apply`); so
//!   `apply` and `meta_put` are durable when they return and [`Backend::sync`] has nothing
//!   left to do. With `allow_async_commit = true` against `off`/`local`, `sync` forces a WAL
//!   flush instead (a transaction with an xid committed with `synchronous_commit = on`, which
//!   flushes every earlier commit record), and a failed flush poisons the backend.
//! - **Ordered scans**: `bytea` compares as unsigned bytes; a prefix is the key range
//!   `[prefix, successor(prefix))`.
//! - **Compare-and-swap** is `UPDATE … WHERE key = $1 AND value = $old`.
//! - **Bounded calls**: every call runs on the backend's own runtime (so the synchronous
//!   callers of [`crate::store::wait_inline`] never need a runtime) under one deadline, connect
//!   timeout + statement timeout; past it the call fails with [`StoreError::Timeout`]. A
//!   server that cannot be reached fails calls with [`StoreError::Unavailable`], and the next
//!   call connects again: nothing latches.
//! - **No secret leaves**: the password stays in the connection settings ([`PgUrl`] and the
//!   error messages never show it); values are the vault's envelopes, the key never comes here.

mod pool;
mod schema;
mod tls;

pub use pool::{Conn, Listener, Pool};
pub use schema::MIGRATIONS;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::types::{ToSql, Type};

use super::{Backend, Intent, RawEntry, RawOp, StoreError};
use crate::config::StoreConfig;

/// The `[store] backend` value naming this engine.
pub const NAME: &str = "postgres";

/// A PostgreSQL connection string from the configuration. It may hold a password, so it is
/// never shown: its `Debug` names only that it is set.
#[derive(Clone, serde::Deserialize)]
#[serde(transparent)]
pub struct PgUrl(String);

impl PgUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The connection string itself, password and all: only to hand it on to a connection
    /// or a configuration file, never to show.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgUrl(…)")
    }
}

/// A tokio-postgres error as a [`StoreError`], keeping it as the cause: the server's refusals
/// by SQLSTATE, everything else (connect, TLS, I/O, a closed connection) as unavailable.
pub(crate) fn pg_error(location: &str, e: tokio_postgres::Error) -> StoreError {
    let location = location.to_string();
    let Some(code) = e.code().map(|c| c.code().to_string()) else {
        return StoreError::Unavailable {
            location,
            source: Box::new(e),
        };
    };
    // 08: connection exception; 53: insufficient resources; 57P0x: the server shutting down,
    // restarting or not yet accepting connections.
    if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") {
        StoreError::Unavailable {
            location,
            source: Box::new(e),
        }
    } else {
        StoreError::Database {
            location,
            code,
            source: Box::new(e),
        }
    }
}

/// The statements, with the schema written in (a checked identifier, [`schema`]).
struct Sql {
    get: String,
    get_many: String,
    scan: String,
    last: String,
    apply: String,
    replace_if: String,
    meta_get: String,
    meta_put: String,
    meta_scan: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        Self {
            get: format!("SELECT value FROM {s}.records WHERE key = $1"),
            // One statement sees one snapshot, even under READ COMMITTED (invariant 7).
            get_many: format!("SELECT key, value FROM {s}.records WHERE key = ANY($1)"),
            scan: format!(
                "SELECT key, value FROM {s}.records WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) ORDER BY key LIMIT $3"
            ),
            last: format!(
                "SELECT key, value FROM {s}.records WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) AND ($3::bytea IS NULL OR key <= $3) ORDER BY key DESC LIMIT 1"
            ),
            apply: format!(
                "WITH gone AS (DELETE FROM {s}.records WHERE key = ANY($3)) INSERT INTO {s}.records (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[]) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            ),
            replace_if: format!("UPDATE {s}.records SET value = $3 WHERE key = $1 AND value = $2"),
            meta_get: format!("SELECT value FROM {s}.meta WHERE key = $1"),
            meta_put: format!(
                "INSERT INTO {s}.meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            ),
            meta_scan: format!("SELECT key, value FROM {s}.meta ORDER BY key"),
        }
    }
}

/// What every call shares, moved onto the backend's runtime.
pub struct Shared {
    pool: Arc<Pool>,
    sql: Sql,
    schema: String,
    /// The bound of one whole call: connect timeout + statement timeout.
    deadline: Duration,
    /// `allow_async_commit`: `sync` must flush (see the module comment).
    flush_on_sync: bool,
    sync_failed: AtomicBool,
}

/// Runs `$call` with a pooled connection as `$conn`, retried once on a fresh connection when
/// the pooled one turned out closed (see [`Shared::query`]).
macro_rules! on_connection {
    ($shared:expr, |$conn:ident| $call:expr) => {{
        let mut retried = false;
        loop {
            let mut $conn = $shared.pool.get().await?;
            let outcome = $call.await;
            match outcome {
                Err(e) if e.is_closed() && !retried => retried = true,
                outcome => {
                    $conn.completed();
                    return outcome.map_err(|e| pg_error($shared.location(), e));
                }
            }
        }
    }};
}

type Params<'a> = &'a [(&'a (dyn ToSql + Sync), Type)];

impl Shared {
    fn location(&self) -> &str {
        self.pool.location()
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Runs `sql` on a pooled connection; once more on a fresh one if the pooled one turned
    /// out closed (nothing was sent then, so a retry cannot apply anything twice).
    pub async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        on_connection!(self, |conn| conn.query_typed(sql, params))
    }

    /// As [`Shared::query`], for a statement's count of rows changed.
    pub async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        on_connection!(self, |conn| conn.execute_typed(sql, params))
    }

    /// Forces a WAL flush covering every commit made before it (for `allow_async_commit`).
    async fn flush(&self) -> Result<(), StoreError> {
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(StoreError::Sync(
                "an earlier flush failed, so acknowledged writes may be lost; restart the daemon"
                    .into(),
            ));
        }
        let mut conn = self.pool.get().await?;
        let flushed = conn
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT;",
            )
            .await;
        conn.completed();
        flushed.map_err(|e| {
            self.sync_failed.store(true, Ordering::Release);
            StoreError::Sync(pg_error(self.location(), e).to_string())
        })
    }
}

/// The first key after every key starting with `prefix` (`None`: no such key, for the empty
/// prefix or one of 0xff bytes only).
fn successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < 0xff {
            next.push(last + 1);
            return Some(next);
        }
    }
    None
}

/// The PostgreSQL settings of `[store]`, checked.
struct Settings {
    config: tokio_postgres::Config,
    tls: tls::MakeRustls,
    location: String,
    schema: String,
    pool_size: usize,
    connect_timeout: Duration,
    statement_timeout: Duration,
    allow_async_commit: bool,
}

fn config_error(why: impl Into<String>) -> StoreError {
    StoreError::Config(why.into())
}

impl Settings {
    fn from_config(store: &StoreConfig) -> Result<Self, StoreError> {
        let url = store.url.as_ref().ok_or_else(|| {
            config_error(
                "backend = \"postgres\" needs url = \"postgres://USER@HOST:PORT/DATABASE\"",
            )
        })?;
        let mut config: tokio_postgres::Config = url
            .0
            .parse()
            .map_err(|e| config_error(format!("url is not a PostgreSQL connection string: {e}")))?;
        if let Some(path) = &store.password_file {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                config_error(format!("cannot read password_file {}: {e}", path.display()))
            })?);
            config.password(text.lines().next().unwrap_or_default());
        }
        if !schema::valid_schema_name(&store.schema) {
            return Err(config_error(format!(
                "schema = {:?} is not a plain lower-case identifier ([a-z_][a-z0-9_]*)",
                store.schema
            )));
        }
        let connect_timeout = Duration::from_millis(store.connect_timeout_ms.max(1));
        let statement_timeout = Duration::from_millis(store.statement_timeout_ms.max(1));
        config
            .ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(connect_timeout)
            .tcp_user_timeout(connect_timeout + statement_timeout)
            .keepalives_idle(Duration::from_secs(30))
            .application_name("credbroker");
        let location = Self::location(&config, &store.schema);
        Ok(Settings {
            tls: tls::MakeRustls::new(tls_config(store)?),
            config,
            location,
            schema: store.schema.clone(),
            pool_size: store.pool_size.max(1),
            connect_timeout,
            statement_timeout,
            allow_async_commit: store.allow_async_commit,
        })
    }

    /// `postgres://USER@HOST:PORT/DATABASE (schema S)`: never the password.
    fn location(config: &tokio_postgres::Config, schema: &str) -> String {
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or_default();
        let db = config.get_dbname().unwrap_or(user);
        format!("postgres://{user}@{host}:{port}/{db} (schema {schema})")
    }
}

/// rustls with ring, trusting `ca_file` alone when it is set, else Mozilla's roots.
fn tls_config(store: &StoreConfig) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    let roots = match &store.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                config_error(format!("cannot read ca_file {}: {e}", path.display()))
            })?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in crate::tls::parse_pem_certs(&pem)
                .map_err(|e| config_error(format!("ca_file {}: {e}", path.display())))?
            {
                roots
                    .add(cert)
                    .map_err(|e| config_error(format!("ca_file {}: {e}", path.display())))?;
            }
            roots
        }
        None => crate::tls::root_store(None).map_err(|e| config_error(e.to_string()))?,
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| config_error(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The backend: a pool on a runtime of its own (see the module comment).
pub struct PgBackend {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // Not a blocking shutdown: the last handle may be dropped on an async worker.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl PgBackend {
    /// Connects, checks the server's durability and what the schema holds against `intent`,
    /// then creates or migrates the schema.
    pub async fn open(store: &StoreConfig, intent: Intent) -> Result<Self, StoreError> {
        let settings = Settings::from_config(store)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("credbroker-pg")
            .enable_all()
            .build()
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the PostgreSQL runtime: {e}"))
            })?;
        let pool = Pool::new(
            settings.config,
            settings.tls,
            settings.pool_size,
            settings.location,
            settings.statement_timeout,
            settings.allow_async_commit,
        );
        let backend = PgBackend {
            shared: Arc::new(Shared {
                pool: Arc::new(pool),
                sql: Sql::new(&settings.schema),
                schema: settings.schema,
                deadline: settings.connect_timeout + settings.statement_timeout,
                flush_on_sync: settings.allow_async_commit,
                sync_failed: AtomicBool::new(false),
            }),
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        };
        backend
            .run(move |shared| async move {
                let mut conn = shared.pool.get().await?;
                let prepared =
                    schema::prepare(&mut conn, &shared.schema, intent, shared.location()).await;
                conn.completed();
                prepared
            })
            .await?;
        Ok(backend)
    }

    /// The connection pool (for what else a replica keeps in PostgreSQL: leases, LISTEN).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.shared.pool
    }

    /// The PostgreSQL schema the store's tables live in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// The backend's runtime, where connections must be used (their I/O tasks live there).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `work` on the backend's runtime under the call deadline.
    pub async fn run<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let shared = self.shared.clone();
        let deadline = shared.deadline;
        let location = shared.location().to_string();
        let work = work(shared);
        // The timer is made on the backend's runtime: the caller may be on none (wait_inline).
        let task = self
            .handle
            .spawn(async move { tokio::time::timeout(deadline, work).await });
        match task.await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_elapsed)) => Err(StoreError::Timeout {
                location,
                waited_ms: deadline.as_millis() as u64,
            }),
            Err(e) => Err(StoreError::Backend(format!(
                "a PostgreSQL call failed: {e}"
            ))),
        }
    }
}

fn entry(row: &tokio_postgres::Row) -> RawEntry {
    (row.get(0), row.get(1))
}

#[async_trait]
impl Backend for PgBackend {
    fn location(&self) -> String {
        self.shared.location().to_string()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_vec();
        self.run(move |s| async move {
            let rows = s.query(&s.sql.get, &[(&key, Type::BYTEA)]).await?;
            Ok(rows.first().map(|row| row.get(0)))
        })
        .await
    }

    async fn get_many(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let keys = keys.to_vec();
        self.run(move |s| async move {
            let rows = s
                .query(&s.sql.get_many, &[(&keys, Type::BYTEA_ARRAY)])
                .await?;
            let found: std::collections::HashMap<Vec<u8>, Vec<u8>> =
                rows.iter().map(entry).collect();
            Ok(keys.iter().map(|key| found.get(key).cloned()).collect())
        })
        .await
    }

    async fn scan_prefix(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<RawEntry>, StoreError> {
        // Strictly after `after` is at or after `after ‖ 0x00`.
        let from = match after {
            Some(after) if after >= prefix => [after, &[0]].concat(),
            _ => prefix.to_vec(),
        };
        let below = successor(prefix);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run(move |s| async move {
            let params: Params = &[
                (&from, Type::BYTEA),
                (&below, Type::BYTEA),
                (&limit, Type::INT8),
            ];
            Ok(s.query(&s.sql.scan, params)
                .await?
                .iter()
                .map(entry)
                .collect())
        })
        .await
    }

    async fn last_with_prefix(
        &self,
        prefix: &[u8],
        at_most: Option<&[u8]>,
    ) -> Result<Option<RawEntry>, StoreError> {
        let from = prefix.to_vec();
        let below = successor(prefix);
        let at_most = at_most.map(<[u8]>::to_vec);
        self.run(move |s| async move {
            let params: Params = &[
                (&from, Type::BYTEA),
                (&below, Type::BYTEA),
                (&at_most, Type::BYTEA),
            ];
            Ok(s.query(&s.sql.last, params).await?.first().map(entry))
        })
        .await
    }

    async fn apply(&self, ops: Vec<RawOp>) -> Result<(), StoreError> {
        // The later op on a key wins; then one statement does it all.
        let (keys, values, gone) = split(ops);
        self.run(move |s| async move {
            let params: Params = &[
                (&keys, Type::BYTEA_ARRAY),
                (&values, Type::BYTEA_ARRAY),
                (&gone, Type::BYTEA_ARRAY),
            ];
            s.execute(&s.sql.apply, params).await.map(drop)
        })
        .await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        if !self.shared.flush_on_sync {
            // Every statement was a synchronous commit (see the module comment).
            return Ok(());
        }
        self.run(|s| async move { s.flush().await }).await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = key.to_string();
        self.run(move |s| async move {
            let rows = s.query(&s.sql.meta_get, &[(&key, Type::TEXT)]).await?;
            Ok(rows.first().map(|row| row.get(0)))
        })
        .await
    }

    async fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let (key, value) = (key.to_string(), value.to_vec());
        self.run(move |s| async move {
            let params: Params = &[(&key, Type::TEXT), (&value, Type::BYTEA)];
            s.execute(&s.sql.meta_put, params).await.map(drop)
        })
        .await
    }

    async fn meta_scan(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(|s| async move {
            let rows = s.query(&s.sql.meta_scan, &[]).await?;
            Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
        })
        .await
    }

    async fn replace_if(&self, key: &[u8], old: &[u8], new: Vec<u8>) -> Result<bool, StoreError> {
        let (key, old) = (key.to_vec(), old.to_vec());
        self.run(move |s| async move {
            let params: Params = &[
                (&key, Type::BYTEA),
                (&old, Type::BYTEA),
                (&new, Type::BYTEA),
            ];
            Ok(s.execute(&s.sql.replace_if, params).await? == 1)
        })
        .await
    }
}

/// Keys put, their values, and keys deleted.
pub(super) type Split = (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<Vec<u8>>);

/// A batch's puts and deletes, folded so that a later op on a key wins (invariant 1), as the
/// one `apply` statement and the coordinator's fenced write take them.
pub(super) fn split(ops: Vec<RawOp>) -> Split {
    let folded: BTreeMap<Vec<u8>, Option<Vec<u8>>> = ops.into_iter().collect();
    let (mut keys, mut values, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    for (key, value) in folded {
        match value {
            Some(value) => {
                keys.push(key);
                values.push(value);
            }
            None => gone.push(key),
        }
    }
    (keys, values, gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_successor() {
        assert_eq!(successor(b"t\0"), Some(b"t\x01".to_vec()));
        assert_eq!(successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(successor(b"\xff"), None);
        assert_eq!(successor(b""), None);
    }

    #[test]
    fn durability_is_checked() {
        for ok in ["on", "remote_write", "remote_apply"] {
            assert!(pool::check_durability(ok, "here", false).is_ok(), "{ok}");
        }
        for weak in ["off", "local"] {
            let refused = pool::check_durability(weak, "here", false).unwrap_err();
            assert!(
                refused.to_string().contains("allow_async_commit"),
                "{refused}"
            );
            assert!(pool::check_durability(weak, "here", true).is_ok(), "{weak}");
        }
    }

    #[test]
    fn the_url_is_never_shown() {
        let url = PgUrl::new("postgres://broker:hunter2@db/credbroker");
        assert!(!format!("{url:?}").contains("hunter2"));
        let mut store = StoreConfig::at("unused".into());
        store.url = Some(url);
        let settings = Settings::from_config(&store).unwrap();
        assert_eq!(
            settings.location,
            "postgres://broker@db:5432/credbroker (schema credbroker)"
        );
        assert!(!format!("{store:?}").contains("hunter2"));
    }
}
