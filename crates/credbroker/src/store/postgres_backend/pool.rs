//! The connection pool of the PostgreSQL backend, and the one way to open a connection.
//!
//! Invariants:
//! - at most `pool_size` connections are out at once; a caller waits for one (the backend
//!   bounds every wait with its call deadline);
//! - every connection is checked when it opens: TLS (always required), the session's
//!   `statement_timeout`, and that `synchronous_commit` is durable (`on`, `remote_write`,
//!   `remote_apply`) unless `allow_async_commit` (see [`check_durability`]);
//! - a connection goes back to the pool only after a call on it completed and it is still
//!   open: one left mid-call (a deadline) or closed by the server is dropped, so a restarted
//!   server costs at most one failed call per pooled connection, and usually none (a closed
//!   connection is replaced before use, [`Pool::get`]).
//!
//! Connections' I/O tasks run on the backend's own runtime: they must be spawned from it
//! (every pool call is made inside [`super::PgBackend::run`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_postgres::{AsyncMessage, Client, Notification, SimpleQueryMessage};

use super::tls::MakeRustls;
use crate::store::StoreError;

/// What opening a connection needs (the password lives in `config`, never shown).
pub struct Pool {
    config: tokio_postgres::Config,
    tls: MakeRustls,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
    location: String,
    statement_timeout: Duration,
    allow_async_commit: bool,
}

/// One pooled connection, back to the pool when dropped (see the module's invariants).
pub struct Conn {
    client: Option<Client>,
    pool: Arc<Pool>,
    completed: bool,
    _permit: OwnedSemaphorePermit,
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("a connection until dropped")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("a connection until dropped")
    }
}

impl Conn {
    /// Marks the call on this connection complete: it may serve the next one.
    pub fn completed(&mut self) {
        self.completed = true;
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take()
            && self.completed
            && !client.is_closed()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(client);
        }
    }
}

/// A connection of its own that delivers `NOTIFY`s: run `LISTEN channel` on `client`; the
/// receiver ends when the connection does (the caller opens a new one and listens again).
pub struct Listener {
    pub client: Client,
    pub notifications: mpsc::UnboundedReceiver<Notification>,
}

/// Whether a `synchronous_commit` setting makes an acknowledged commit survive a crash of this
/// server and a failover to a synchronous standby. `local` flushes locally but does not wait for
/// a standby, and `off` does not wait for the flush at all.
pub fn check_durability(setting: &str, location: &str, allow: bool) -> Result<(), StoreError> {
    match setting {
        "on" | "remote_write" | "remote_apply" => Ok(()),
        _ if allow => Ok(()),
        other => Err(StoreError::AsyncCommit {
            location: location.to_string(),
            setting: other.to_string(),
        }),
    }
}

impl Pool {
    pub fn new(
        config: tokio_postgres::Config,
        tls: MakeRustls,
        size: usize,
        location: String,
        statement_timeout: Duration,
        allow_async_commit: bool,
    ) -> Self {
        Self {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
            location,
            statement_timeout,
            allow_async_commit,
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// A connection: an idle one that is still open, else a new one.
    pub async fn get(self: &Arc<Self>) -> Result<Conn, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Backend("the connection pool is closed".into()))?;
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match reused {
            Some(client) => client,
            None => self.connect().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self.clone(),
            completed: false,
            _permit: permit,
        })
    }

    /// Opens a connection, its I/O driven by a task of the current runtime, and checks it.
    async fn connect(&self) -> Result<Client, StoreError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| super::pg_error(&self.location, e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a PostgreSQL connection ended");
            }
        });
        self.check_session(&client).await?;
        Ok(client)
    }

    /// Sets the session's statement timeout and checks its `synchronous_commit`.
    async fn check_session(&self, client: &Client) -> Result<(), StoreError> {
        let query = format!(
            "SET statement_timeout = {}; SHOW synchronous_commit",
            self.statement_timeout.as_millis().max(1)
        );
        let replies = client
            .simple_query(&query)
            .await
            .map_err(|e| super::pg_error(&self.location, e))?;
        let setting = replies
            .iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                _ => None,
            })
            .unwrap_or_default();
        check_durability(&setting, &self.location, self.allow_async_commit)
    }

    /// A connection outside the pool for `LISTEN` (see [`Listener`]); call it from the
    /// backend's runtime ([`super::PgBackend::run`]).
    pub async fn listen(&self) -> Result<Listener, StoreError> {
        let (client, mut connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| super::pg_error(&self.location, e))?;
        let (tx, notifications) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message
                    && tx.send(n).is_err()
                {
                    break;
                }
            }
        });
        self.check_session(&client).await?;
        Ok(Listener {
            client,
            notifications,
        })
    }
}
