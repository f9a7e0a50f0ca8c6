//! Lifecycle events: what happened to a connection (connected, reconnected, refreshed,
//! refresh_failed, expired, recovered, disconnected) or a connector (connector_deleted,
//! destination_changed), kept in the store as a journal with a cursor, streamed by
//! `Admin.WatchEvents` ([`watch`]) and POSTed, signed, to the configured webhooks
//! ([`webhook`]).
//!
//! Invariants:
//! - cursors increase by one per event, in commit order: an event is appended under one lock,
//!   durably, before it is announced, so a reader that resumes after cursor `n` misses nothing
//!   committed after `n`; retention never removes the newest event, so a cursor is never reused;
//! - with replicas sharing the store, that lock is one job across all of them and the next
//!   cursor is read from the store under it, so no replica reuses another's cursor; readers
//!   wake on other replicas' appends too ([`Store::remote_writes`]);
//! - an event and its webhook deliveries (one outbox row per webhook whose filter matches) are
//!   one atomic batch: a delivery is never lost once its event exists;
//! - an event reporting a write (a connection saved, expired or removed, a connector deleted) is
//!   in that write's batch ([`Events::commit_with`]): a crash keeps both or neither. A refresh's
//!   events (refreshed, recovered, refresh_failed) follow its fenced write instead, which holds
//!   a lease with a deadline and must not wait on the journal's lock: a crash between the two
//!   loses that event only;
//! - an event names a connection and a class of failure, never a secret: it is built from
//!   names, ids and error descriptions that never carry a token (a canary test checks);
//! - an event with no write of its own ([`Events::emit`]) never fails the work that emits: a
//!   store error is logged, and the work goes on.

mod watch;
pub mod webhook;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::Connector;
use crate::store::{Batch, Store, StoreError, Table};

pub use watch::{Watch, WatchQuery};
pub use webhook::{Webhook, WebhookError};

/// `{cursor:020}` → [`Event`]
const EVENTS: Table = Table::uncached("events");
/// `{webhook key}/{cursor:020}` → [`Event`] still to be delivered to that webhook.
const OUTBOX: Table = Table::uncached("event_outbox");

/// The job that appends to the journal, across replicas sharing the store.
const APPEND_JOB: &str = "events/append";

/// Events removed per retention batch.
const PRUNE_CHUNK: usize = 1000;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A connection was made where there was none.
    Connected,
    /// A connection was made again over an existing one (after an expiry, say).
    Reconnected,
    /// An OAuth access token was renewed.
    Refreshed,
    /// A refresh failed for a reason that may pass (the provider unreachable, a 5xx): the
    /// stored token is served while valid and the refresh retried. `class` names the failure.
    RefreshFailed,
    /// The credential is refused for good: the user must reconnect. `class` says why.
    Expired,
    /// A connection that had failed works again.
    Recovered,
    /// The connection was removed (Disconnect).
    Disconnected,
    ConnectorDeleted,
    /// A connector setting naming where its secrets go changed: its connections expired.
    DestinationChanged,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::Connected,
        EventKind::Reconnected,
        EventKind::Refreshed,
        EventKind::RefreshFailed,
        EventKind::Expired,
        EventKind::Recovered,
        EventKind::Disconnected,
        EventKind::ConnectorDeleted,
        EventKind::DestinationChanged,
    ];

    /// What a successful refresh of a connection in `status` is: `recovered` after a failure.
    pub fn after_refresh(status: crate::model::ConnectionStatus) -> EventKind {
        match status {
            crate::model::ConnectionStatus::Error => EventKind::Recovered,
            _ => EventKind::Refreshed,
        }
    }

    /// Connected, or reconnected over a connection made before (`previous`).
    pub fn on_connect(previous: Option<&crate::model::Connection>) -> EventKind {
        match previous.is_some_and(|c| c.connected_at.is_some()) {
            true => EventKind::Reconnected,
            false => EventKind::Connected,
        }
    }

    /// The wire name (`refresh_failed`), as in webhooks, the API and the configuration.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Connected => "connected",
            EventKind::Reconnected => "reconnected",
            EventKind::Refreshed => "refreshed",
            EventKind::RefreshFailed => "refresh_failed",
            EventKind::Expired => "expired",
            EventKind::Recovered => "recovered",
            EventKind::Disconnected => "disconnected",
            EventKind::ConnectorDeleted => "connector_deleted",
            EventKind::DestinationChanged => "destination_changed",
        }
    }

    pub fn parse(field: &str, name: &str) -> Result<EventKind, crate::model::FieldError> {
        EventKind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                let known: Vec<&str> = EventKind::ALL.iter().map(|k| k.name()).collect();
                crate::model::FieldError::new(
                    field,
                    format!(
                        "{name:?} is not an event kind (known: {})",
                        known.join(", ")
                    ),
                )
            })
    }
}

/// One lifecycle event as stored, streamed and POSTed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique: a receiver that sees an id twice has seen a redelivery.
    pub id: String,
    pub cursor: u64,
    pub time: DateTime<Utc>,
    pub kind: EventKind,
    pub workspace: String,
    pub connector_id: String,
    pub connector: String,
    /// Empty for a shared connection or a connector-wide event.
    pub user_id: String,
    /// A short machine-readable class: `invalid_grant`, `network`, `provider_error`, …
    pub class: String,
    /// Why, in words; never a secret.
    pub reason: String,
}

/// The class and reason an emitted event carries ([`Detail::NONE`] for neither).
#[derive(Debug, Clone, Copy, Default)]
pub struct Detail<'a> {
    pub class: &'a str,
    pub reason: &'a str,
}

impl<'a> Detail<'a> {
    pub const NONE: Detail<'static> = Detail {
        class: "",
        reason: "",
    };

    pub fn new(class: &'a str, reason: &'a str) -> Self {
        Detail { class, reason }
    }
}

/// An event not yet in the journal: its cursor is taken when it is committed, with the write
/// it reports ([`Events::commit_with`]).
#[derive(Debug, Clone)]
pub struct Occurred {
    kind: EventKind,
    workspace: String,
    connector_id: String,
    connector: String,
    user_id: String,
    class: String,
    reason: String,
}

impl Occurred {
    pub fn new(kind: EventKind, connector: &Connector, user: &str, detail: Detail<'_>) -> Self {
        Occurred {
            kind,
            workspace: connector.workspace.clone(),
            connector_id: connector.id.clone(),
            connector: connector.name.clone(),
            user_id: user.to_string(),
            class: detail.class.to_string(),
            reason: detail.reason.to_string(),
        }
    }

    fn into_event(self, cursor: u64) -> Event {
        Event {
            id: crate::model::new_id("ev_"),
            cursor,
            time: Utc::now(),
            kind: self.kind,
            workspace: self.workspace,
            connector_id: self.connector_id,
            connector: self.connector,
            user_id: self.user_id,
            class: self.class,
            reason: self.reason,
        }
    }
}

/// `[events]`: retention, stream and webhook retry bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events older than this many days are removed.
    pub retain_days: u64,
    /// At most this many events are kept (the oldest go first).
    pub retain_events: u64,
    /// WatchEvents streams open at once; the next is RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// The first retry of a failed webhook delivery waits this long, each next one twice as
    /// long, up to `webhook_backoff_max_secs`.
    pub webhook_backoff_first_ms: u64,
    pub webhook_backoff_max_secs: u64,
    /// A delivery still failing this long after its event is dropped (logged).
    pub webhook_max_age_hours: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retain_days: 30,
            retain_events: 100_000,
            max_streams: 64,
            webhook_backoff_first_ms: 1000,
            webhook_backoff_max_secs: 300,
            webhook_max_age_hours: 72,
        }
    }
}

/// One `[[webhooks]]` entry. It holds where the secret is, never the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// A file holding the signing secret (at least 32 characters, surrounding blanks trimmed)…
    pub secret_file: Option<PathBuf>,
    /// …or the name of a systemd credential holding it (`$CREDENTIALS_DIRECTORY`).
    pub secret_credential: Option<String>,
    /// Only these kinds are sent (default: every kind).
    #[serde(default)]
    pub events: Vec<EventKind>,
    /// A PEM CA bundle trusted beside the public roots (a receiver on a private CA).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "events after cursor {after} were removed by retention (the oldest kept is {oldest}): \
         read the connections' state again, then resume from cursor {resume}",
        resume = oldest - 1
    )]
    Pruned { after: u64, oldest: u64 },
    #[error("{0} WatchEvents streams are open already; retry when one has ended")]
    TooManyStreams(usize),
}

/// Where an event goes besides the journal: a webhook's outbox, for the kinds it takes.
#[derive(Debug, Clone)]
struct Route {
    key: String,
    kinds: BTreeSet<EventKind>,
}

impl Route {
    fn takes(&self, kind: EventKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }
}

/// The journal: appends events, announces them, reads them back after a cursor, prunes.
pub struct Events {
    store: Arc<Store>,
    /// The next cursor, once read from the store (with other replicas it is read again under
    /// the job at every append); held across an append's commit.
    next: tokio::sync::Mutex<Option<u64>>,
    /// The newest cursor committed (0 before the first), for readers waiting on news.
    head: tokio::sync::watch::Sender<u64>,
    routes: RwLock<Vec<Route>>,
    streams: Arc<tokio::sync::Semaphore>,
    max_streams: RwLock<usize>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("head", &*self.head.borrow())
            .finish()
    }
}

fn cursor_path(cursor: u64) -> String {
    format!("{cursor:020}")
}

fn outbox_path(webhook: &str, cursor: u64) -> String {
    format!("{webhook}/{}", cursor_path(cursor))
}

impl Events {
    pub fn new(store: Arc<Store>) -> Self {
        let defaults = EventsConfig::default();
        Self {
            store,
            next: tokio::sync::Mutex::new(None),
            head: tokio::sync::watch::Sender::new(0),
            routes: RwLock::new(Vec::new()),
            streams: Arc::new(tokio::sync::Semaphore::new(defaults.max_streams)),
            max_streams: RwLock::new(defaults.max_streams),
        }
    }

    /// Applies `[events]` and routes every later event to `webhooks`' outboxes (at start-up,
    /// before anything is emitted).
    pub fn configure(&self, config: &EventsConfig, webhooks: &[Webhook]) {
        let routes = webhooks
            .iter()
            .map(|w| Route {
                key: w.key().to_string(),
                kinds: w.kinds().clone(),
            })
            .collect();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = routes;
        let mut max = self.max_streams.write().unwrap_or_else(|p| p.into_inner());
        if config.max_streams > *max {
            self.streams.add_permits(config.max_streams - *max);
        } else {
            self.streams.forget_permits(*max - config.max_streams);
        }
        *max = config.max_streams;
    }

    /// Records that `kind` happened to `connector` (and `user`'s connection, if not empty),
    /// for what has no write of its own to ride on. Never fails the caller: a store error is
    /// logged. A write that has one records its event with it ([`Events::commit_with`]).
    pub async fn emit(
        &self,
        kind: EventKind,
        connector: &Connector,
        user: &str,
        detail: Detail<'_>,
    ) {
        if let Err(e) = self.append(kind, connector, user, detail).await {
            tracing::error!(connector = %connector.id, kind = kind.name(), error = %e, "a lifecycle event could not be recorded");
        }
    }

    /// Appends one event (and its outbox rows) durably, then announces it.
    pub async fn append(
        &self,
        kind: EventKind,
        connector: &Connector,
        user: &str,
        detail: Detail<'_>,
    ) -> Result<Event, EventsError> {
        let occurred = Occurred::new(kind, connector, user, detail);
        Ok(self.commit_with(Batch::new(), occurred).await?)
    }

    /// Commits `batch` with the event appended to it, in the one batch: a crash keeps the
    /// change and its event, or neither. The event is announced once durable.
    ///
    /// The commit waits for the journal's lock (across replicas, its job): a write that must
    /// not wait on it (a refresh's fenced write, under a lease with a deadline) commits first
    /// and [`Events::emit`]s after.
    pub async fn commit_with(
        &self,
        mut batch: Batch,
        occurred: Occurred,
    ) -> Result<Event, StoreError> {
        let mut next = self.next.lock().await;
        let _across = match self.store.is_shared() {
            true => self.store.job(APPEND_JOB, true).await?,
            false => None,
        };
        let cursor = match *next {
            Some(n) if !self.store.is_shared() => n,
            _ => self.newest().await? + 1,
        };
        let event = occurred.into_event(cursor);
        batch.put(EVENTS, cursor_path(cursor), &event);
        for route in self.routes().iter().filter(|r| r.takes(event.kind)) {
            batch.put(OUTBOX, outbox_path(&route.key, cursor), &event);
        }
        if let Err(e) = self.store.commit(batch).await {
            // The batch may have landed all the same (a failed sync): read the cursor again.
            *next = None;
            return Err(e);
        }
        *next = Some(cursor + 1);
        self.head.send_replace(cursor);
        tracing::info!(kind = event.kind.name(), cursor, connector = %event.connector_id, class = %event.class, "lifecycle event");
        Ok(event)
    }

    fn routes(&self) -> Vec<Route> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest cursor in the store (0 when there is no event).
    async fn newest(&self) -> Result<u64, StoreError> {
        let last = self.store.last::<Event>(EVENTS, "", None).await?;
        let newest = last.map_or(0, |(_, e)| e.cursor);
        self.head.send_if_modified(|h| {
            let changed = *h < newest;
            *h = (*h).max(newest);
            changed
        });
        Ok(newest)
    }

    /// The newest cursor committed.
    pub async fn head(&self) -> Result<u64, StoreError> {
        let next = self.next.lock().await;
        match *next {
            Some(n) if !self.store.is_shared() => Ok(n - 1),
            _ => self.newest().await,
        }
    }

    /// Up to `limit` events after `after`, oldest first.
    pub async fn after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let from = cursor_path(after);
        let rows = self
            .store
            .scan::<Event>(EVENTS, "", Some(&from), limit)
            .await?;
        Ok(rows.into_iter().map(|(_, e)| e).collect())
    }

    /// Wakes a reader of the journal when an event may have been appended.
    fn announcements(&self) -> News {
        News {
            local: self.head.subscribe(),
            remote: self.store.remote_writes(EVENTS),
        }
    }

    /// Removes the events retention no longer keeps: older than `retain_days`, and beyond the
    /// newest `retain_events`; never the newest event. Returns how many it removed.
    pub async fn prune(
        &self,
        config: &EventsConfig,
        now: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let head = self.head().await?;
        let keep_from = head.saturating_sub(config.retain_events.max(1)) + 1;
        let cutoff = now - chrono::TimeDelta::days(config.retain_days.min(36_500) as i64);
        let mut removed = 0;
        loop {
            let oldest = self.after(0, PRUNE_CHUNK).await?;
            let doomed: Vec<u64> = oldest
                .iter()
                .take_while(|e| e.cursor < head && (e.cursor < keep_from || e.time < cutoff))
                .map(|e| e.cursor)
                .collect();
            if doomed.is_empty() {
                return Ok(removed);
            }
            let mut batch = Batch::new();
            for cursor in &doomed {
                batch.delete(EVENTS, cursor_path(*cursor));
            }
            self.store.commit(batch).await?;
            removed += doomed.len();
        }
    }

    /// Up to `limit` deliveries waiting in `webhook`'s outbox, oldest first.
    async fn outbox(&self, webhook: &str, limit: usize) -> Result<Vec<Event>, StoreError> {
        let prefix = format!("{webhook}/");
        let rows = self
            .store
            .scan::<Event>(OUTBOX, &prefix, None, limit)
            .await?;
        Ok(rows.into_iter().map(|(_, e)| e).collect())
    }

    /// Removes the deliveries waiting for webhooks other than `keys` (removed from the
    /// configuration, or their URL changed). Returns how many.
    pub async fn drop_orphans(&self, keys: &[&str]) -> Result<usize, StoreError> {
        let (mut after, mut dropped) = (None::<String>, 0);
        loop {
            let rows = self
                .store
                .scan::<serde::de::IgnoredAny>(OUTBOX, "", after.as_deref(), PRUNE_CHUNK)
                .await?;
            let Some((last, _)) = rows.last() else {
                return Ok(dropped);
            };
            after = Some(last.clone());
            let mut batch = Batch::new();
            let kept = |path: &str| path.split_once('/').is_some_and(|(k, _)| keys.contains(&k));
            for (path, _) in rows.iter().filter(|(path, _)| !kept(path)) {
                batch.delete(OUTBOX, path.clone());
                dropped += 1;
            }
            if !batch.is_empty() {
                self.store.commit(batch).await?;
            }
        }
    }

    /// Removes a delivery from `webhook`'s outbox: it was delivered, or given up on.
    async fn delivered(&self, webhook: &str, cursor: u64) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch.delete(OUTBOX, outbox_path(webhook, cursor));
        self.store.commit(batch).await
    }
}

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Reads `[[webhooks]]` (secrets, CAs, egress), routes events to their outboxes, and starts
/// their deliveries and the journal's retention. Any bad webhook fails the start, named.
pub async fn start(
    config: &crate::config::Config,
    events: &Arc<Events>,
) -> Result<(), WebhookError> {
    let mut hooks = Vec::new();
    for hook in &config.webhooks {
        let hook = Webhook::load(hook)?;
        hook.check_egress().await?;
        hooks.push(hook);
    }
    events.configure(&config.events, &hooks);
    let keys: Vec<&str> = hooks.iter().map(|h| h.key()).collect();
    match events.drop_orphans(&keys).await {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            dropped = n,
            "webhook deliveries for URLs no longer configured were dropped"
        ),
        Err(e) => tracing::error!(error = %e, "cannot clear the outbox of removed webhooks"),
    }
    for hook in hooks {
        webhook::spawn(
            events.clone(),
            hook,
            &config.events,
            config.upstream_timeout(),
        )?;
    }
    spawn_retention(events.clone(), config.events.clone(), PRUNE_EVERY);
    Ok(())
}

/// Prunes the journal now and every `every`, for as long as the daemon runs.
pub fn spawn_retention(events: Arc<Events>, config: EventsConfig, every: Duration) {
    tokio::spawn(async move {
        loop {
            match events.prune(&config, Utc::now()).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "lifecycle events pruned"),
                Err(e) => tracing::error!(error = %e, "pruning lifecycle events failed"),
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// What wakes a reader of the journal: this replica's appends (announced once durable) and,
/// with replicas sharing the store, the writes another reports.
struct News {
    local: tokio::sync::watch::Receiver<u64>,
    remote: Option<tokio::sync::watch::Receiver<u64>>,
}

impl News {
    /// Returns when there may be news: false once the journal is gone.
    async fn changed(&mut self) -> bool {
        match &mut self.remote {
            None => self.local.changed().await.is_ok(),
            Some(remote) => tokio::select! {
                local = self.local.changed() => local.is_ok(),
                remote = remote.changed() => remote.is_ok(),
            },
        }
    }
}

#[cfg(test)]
mod tests;
