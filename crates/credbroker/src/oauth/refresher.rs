//! The background refresher of OAuth tokens (`[refresh]`): **refresh ahead** renews the access
//! token of a recently used connection (or the client-credentials token of a recently used
//! shared connector) before it expires, so that a caller almost never waits on
//! the provider; **keep-alive** refreshes an idle connection's grant on its provider's schedule
//! (`keepalive_days` in `providers.toml`, overridable), before the provider lets an unused
//! refresh token lapse.
//!
//! Invariants:
//! - every refresh goes through [`OAuth::refresh_ahead`], which takes the connection's one
//!   refresh lock and refreshes only if the stored token is still the one planned for: an
//!   on-demand refresh (or another replica's) that came first is never repeated, so there is one
//!   refresh per token whoever meets whom;
//! - "recently used" is kept in memory, one map entry per connection (at most
//!   [`MAX_TRACKED`]), touched on the resolve path without a store write; entries idle past
//!   `recent_secs` are dropped;
//! - at most `concurrency` refreshes run at once and each provider is sent at most
//!   `provider_rate_per_sec` of them;
//! - keep-alive due times are stored in the connection (`next_refresh_at`, written with each
//!   refresh), so a restart keeps the schedule;
//! - stopping ([`Handle::stop`]) ends both loops and waits for the refreshes in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{Notify, Semaphore, watch};

use super::OAuth;
use super::catalog::{self, Endpoints, Grant};
use crate::config::RefreshConfig;
use crate::metrics::Background;
use crate::model::{Connection, ConnectionStatus, Connector, Kind, connection_path};
use crate::policy::RateLimiter;

/// A token is renewed at most this long before... never sooner than this after it was issued.
const MIN_AHEAD_AGE: TimeDelta = TimeDelta::seconds(1);
/// The largest share of a token's lifetime renewed ahead: callers asking for up to half of it
/// (ResolveCredential's `min_ttl` is capped there) find the token fresh, and a quarter is left
/// for the refresh to finish.
const MAX_LEAD_SHARE: f64 = 0.75;
/// When a plan cannot be made better (a refresh backing off, a token without expiry): look again.
const RETRY: TimeDelta = TimeDelta::seconds(1);
/// The loop wakes at least this often, whatever is due (a clock step, a late notification).
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// How long stopping waits for the refreshes in flight.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Connections read per page by the keep-alive scan.
const SCAN_PAGE: usize = 512;
/// Connections tracked at most: past it, a connection not yet tracked is left to on-demand
/// refreshes (and keep-alive), so memory is bounded whatever callers name.
const MAX_TRACKED: usize = 100_000;
/// How long a connection with nothing to refresh ahead is left alone.
const IGNORE_FOR: TimeDelta = TimeDelta::seconds(30);

/// Where the time comes from: the system's, or a test's.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// When to refresh: `[refresh]` as numbers.
#[derive(Debug, Clone)]
pub struct Policy {
    pub ahead: bool,
    pub keepalive: bool,
    window: TimeDelta,
    jitter: f64,
    recent: TimeDelta,
    keepalive_days: f64,
    keepalive_by_provider: std::collections::BTreeMap<String, f64>,
    pub concurrency: usize,
    pub provider_rate: f64,
    pub scan_every: Duration,
}

impl From<&RefreshConfig> for Policy {
    fn from(c: &RefreshConfig) -> Self {
        let secs = |s: u64| TimeDelta::seconds(s.min(i64::MAX as u64 / 1000) as i64);
        Self {
            ahead: c.ahead,
            keepalive: c.keepalive,
            window: secs(c.window_secs),
            jitter: c.jitter.clamp(0.0, 1.0),
            recent: secs(c.recent_secs),
            keepalive_days: c.keepalive_days,
            keepalive_by_provider: c.keepalive_days_by_provider.clone(),
            concurrency: c.concurrency.max(1),
            provider_rate: c.provider_rate_per_sec,
            scan_every: Duration::from_secs(c.keepalive_scan_secs.max(1)),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::from(&RefreshConfig::default())
    }
}

impl Policy {
    /// When a token issued at `issued` (if known) and expiring at `expires` is renewed ahead:
    /// `window` before it expires, at most [`MAX_LEAD_SHARE`] of its lifetime, made longer by
    /// `u` (0 to 1, at random) × `jitter` of that lead; never before [`MIN_AHEAD_AGE`] of age.
    pub fn due_ahead(
        &self,
        issued: Option<DateTime<Utc>>,
        expires: DateTime<Utc>,
        u: f64,
    ) -> DateTime<Utc> {
        let issued = issued.filter(|i| *i <= expires);
        let lead = match issued {
            Some(issued) => {
                let life = (expires - issued).as_seconds_f64();
                self.window.as_seconds_f64().min(life * MAX_LEAD_SHARE)
            }
            None => self.window.as_seconds_f64(),
        };
        let lead = lead * (1.0 + self.jitter * u.clamp(0.0, 1.0));
        let due = expires - TimeDelta::milliseconds((lead * 1000.0) as i64);
        match issued {
            Some(issued) => due.max(issued + MIN_AHEAD_AGE),
            None => due,
        }
    }

    /// How often an idle grant of `connector` is refreshed: `[refresh]
    /// keepalive_days_by_provider`, else the preset's `keepalive_days`, else `[refresh]
    /// keepalive_days`; `None` when that is 0 (or keep-alive is off).
    pub fn keepalive_interval(&self, connector: &Connector) -> Option<TimeDelta> {
        if !self.keepalive {
            return None;
        }
        let days = self
            .keepalive_by_provider
            .get(&connector.provider)
            .copied()
            .or_else(|| catalog::preset(&connector.provider).and_then(|p| p.keepalive_days))
            .unwrap_or(self.keepalive_days);
        (days > 0.0).then(|| TimeDelta::milliseconds((days * 86_400_000.0) as i64))
    }

    /// The keep-alive due time to store with a refresh (or a connection) made at `now`.
    pub fn keepalive_next(
        &self,
        connector: &Connector,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.keepalive_interval(connector).map(|every| now + every)
    }

    /// When an idle connection's keep-alive is due: the stored due time, or its last refresh
    /// plus the interval if that is sooner (the interval was shortened since) or nothing is
    /// stored (a connection made before keep-alive).
    pub fn keepalive_due(
        &self,
        connector: &Connector,
        connection: &Connection,
    ) -> Option<DateTime<Utc>> {
        let every = self.keepalive_interval(connector)?;
        let since = connection
            .last_refreshed_at
            .or(connection.connected_at)
            .map(|t| t + every);
        match (connection.next_refresh_at, since) {
            (Some(stored), Some(since)) => Some(stored.min(since)),
            (stored, since) => stored.or(since),
        }
    }
}

/// What the refresher knows of one recently used connection.
#[derive(Debug, Clone)]
struct Tracked {
    workspace: String,
    connector_id: String,
    user: String,
    last_use: DateTime<Utc>,
    state: State,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Not looked at yet: its token's expiry is to be read.
    New,
    /// Its token (expiring at `expires`, `None` if unknown) is to be renewed at `due`.
    Planned {
        expires: Option<DateTime<Utc>>,
        due: DateTime<Utc>,
        provider: String,
    },
    /// A refresh (or a plan) is running.
    Busy,
    /// Nothing to refresh ahead (not connected, not a user's grant) until `until`, when it is
    /// looked at again (a reconnect): kept so that its uses do not plan it on every call.
    Ignored { until: DateTime<Utc> },
}

/// What is to be done for one tracked connection now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Job {
    Plan {
        key: String,
    },
    Refresh {
        key: String,
        expires: Option<DateTime<Utc>>,
        provider: String,
    },
}

/// The connections used recently: touched on every token use, without a store write.
#[derive(Default)]
pub struct Recent {
    tracking: AtomicBool,
    map: Mutex<HashMap<String, Tracked>>,
    /// Told when a connection is first seen or planned anew, so the loop looks at it at once.
    changed: Notify,
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a use of the connection `key` (`connection_path`) now. A known connection costs a
    /// lookup and a store of the time; nothing at all while the refresher is not running.
    pub fn touch(&self, connector: &Connector, user: &str, key: &str, now: DateTime<Utc>) {
        if !self.tracking.load(Ordering::Relaxed) {
            return;
        }
        let mut map = self.lock();
        if let Some(tracked) = map.get_mut(key) {
            tracked.last_use = now;
            return;
        }
        if map.len() >= MAX_TRACKED {
            return;
        }
        map.insert(
            key.to_string(),
            Tracked {
                workspace: connector.workspace.clone(),
                connector_id: connector.id.clone(),
                user: user.to_string(),
                last_use: now,
                state: State::New,
            },
        );
        drop(map);
        self.changed.notify_one();
    }

    /// The jobs due at `now` (their entries marked busy), and when the next one is due.
    /// Entries unused for longer than `recent` are dropped (unless busy).
    pub(crate) fn due(
        &self,
        now: DateTime<Utc>,
        recent: TimeDelta,
    ) -> (Vec<Job>, Option<DateTime<Utc>>) {
        let mut map = self.lock();
        map.retain(|_, t| t.state == State::Busy || now - t.last_use <= recent);
        let (mut jobs, mut next) = (Vec::new(), None::<DateTime<Utc>>);
        for (key, tracked) in map.iter_mut() {
            match &tracked.state {
                State::New => jobs.push(Job::Plan { key: key.clone() }),
                State::Ignored { until } if *until <= now => {
                    jobs.push(Job::Plan { key: key.clone() })
                }
                State::Planned {
                    expires,
                    due,
                    provider,
                } if *due <= now => jobs.push(Job::Refresh {
                    key: key.clone(),
                    expires: *expires,
                    provider: provider.clone(),
                }),
                State::Planned { due, .. } | State::Ignored { until: due } => {
                    next = Some(next.map_or(*due, |n| n.min(*due)));
                    continue;
                }
                State::Busy => continue,
            }
            tracked.state = State::Busy;
        }
        (jobs, next)
    }

    fn entry(&self, key: &str) -> Option<Tracked> {
        self.lock().get(key).cloned()
    }

    /// Sets a connection's state; the loop is woken to see a new plan.
    fn set(&self, key: &str, state: State) {
        let planned = matches!(state, State::Planned { .. });
        if let Some(tracked) = self.lock().get_mut(key) {
            tracked.state = state;
        }
        if planned {
            self.changed.notify_one();
        }
    }

    fn ignore(&self, key: &str, now: DateTime<Utc>) {
        self.set(
            key,
            State::Ignored {
                until: now + IGNORE_FOR,
            },
        );
    }

    /// When the connection `key` is next refreshed ahead, if it is tracked and planned.
    pub fn planned(&self, key: &str) -> Option<DateTime<Utc>> {
        match self.lock().get(key)?.state {
            State::Planned { due, .. } => Some(due),
            _ => None,
        }
    }

    fn tracked(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }
}

/// The refresher's own part of the OAuth service: its policy, the recently used connections
/// and, once started, the running loops.
pub struct Refresh {
    pub policy: Policy,
    pub recent: Arc<Recent>,
    handle: Mutex<Option<Handle>>,
}

impl Refresh {
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            recent: Arc::default(),
            handle: Mutex::default(),
        }
    }
}

impl Default for Refresh {
    fn default() -> Self {
        Refresh::new(Policy::default())
    }
}

/// The running loops, stopped by [`Handle::stop`].
pub struct Handle {
    stop: watch::Sender<bool>,
    loops: Vec<tokio::task::JoinHandle<()>>,
    permits: Arc<Semaphore>,
    concurrency: usize,
}

impl Handle {
    /// Ends both loops, then waits (up to [`STOP_GRACE`]) for the refreshes in flight.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.loops {
            let _ = task.await;
        }
        let all = self.permits.acquire_many(self.concurrency as u32);
        if tokio::time::timeout(STOP_GRACE, all).await.is_err() {
            tracing::warn!("token refreshes still running after the grace period");
        }
    }
}

/// What the loops share.
struct Inner {
    oauth: Weak<OAuth>,
    recent: Arc<Recent>,
    policy: Policy,
    clock: Arc<dyn Clock>,
    limiter: RateLimiter,
    permits: Arc<Semaphore>,
    /// The clock's time and the monotonic time at start, to give the limiter instants.
    origin: (DateTime<Utc>, Instant),
}

impl Inner {
    fn new(oauth: Weak<OAuth>, recent: Arc<Recent>, policy: Policy, clock: Arc<dyn Clock>) -> Self {
        let rate = policy.provider_rate;
        Self {
            oauth,
            recent,
            permits: Arc::new(Semaphore::new(policy.concurrency)),
            limiter: RateLimiter::new(rate, rate.max(1.0)),
            origin: (clock.now(), Instant::now()),
            policy,
            clock,
        }
    }

    fn instant(&self, at: DateTime<Utc>) -> Instant {
        self.origin.1 + (at - self.origin.0).to_std().unwrap_or_default()
    }

    /// Whether `provider` may be sent one more refresh at `now`; else when it may.
    fn admit(&self, provider: &str, now: DateTime<Utc>) -> Result<(), DateTime<Utc>> {
        self.limiter
            .allow_at(provider, self.instant(now))
            .map_err(|e| now + TimeDelta::from_std(e.retry_after).unwrap_or(RETRY))
    }
}

/// The rate limiter's key for a connector: its preset's name, else its token endpoint's host.
fn provider_key(connector: &Connector) -> String {
    if !connector.provider.is_empty() {
        return connector.provider.clone();
    }
    Endpoints::of(connector)
        .ok()
        .and_then(|e| reqwest::Url::parse(&e.token_url).ok())
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default()
}

/// Whether the keep-alive may refresh this connection: a usable grant with a refresh token.
fn refreshable(connector: &Connector, connection: &Connection) -> bool {
    usable_oauth(connector, connection, Grant::AuthorizationCode)
}

/// Whether refresh ahead may renew this connection's token: a refreshable grant's, or the
/// client-credentials token of a shared connector (which has no grant to keep alive).
fn renewable_ahead(connector: &Connector, connection: &Connection) -> bool {
    refreshable(connector, connection)
        || usable_oauth(connector, connection, Grant::ClientCredentials)
}

fn usable_oauth(connector: &Connector, connection: &Connection, grant: Grant) -> bool {
    connector.kind == Kind::Oauth2
        && Grant::of(connector).is_ok_and(|g| g == grant)
        && matches!(
            connection.status,
            ConnectionStatus::Connected | ConnectionStatus::Error
        )
}

fn jitter_draw() -> f64 {
    rand::random::<f64>()
}

impl OAuth {
    /// Starts the refresher's loops (those `[refresh]` turns on); [`OAuth::stop_refresher`]
    /// stops them.
    pub fn start_refresher(self: &Arc<Self>) {
        self.start_refresher_with(Arc::new(SystemClock));
    }

    fn start_refresher_with(self: &Arc<Self>, clock: Arc<dyn Clock>) {
        let policy = self.refresh.policy.clone();
        if !policy.ahead && !policy.keepalive {
            return;
        }
        let inner = Arc::new(Inner::new(
            Arc::downgrade(self),
            self.refresh.recent.clone(),
            policy.clone(),
            clock,
        ));
        let (stop, stopped) = watch::channel(false);
        let mut loops = Vec::new();
        if policy.ahead {
            inner.recent.tracking.store(true, Ordering::Relaxed);
            loops.push(tokio::spawn(ahead_loop(inner.clone(), stopped.clone())));
        }
        if policy.keepalive {
            loops.push(tokio::spawn(keepalive_loop(inner.clone(), stopped)));
        }
        let handle = Handle {
            stop,
            loops,
            permits: inner.permits.clone(),
            concurrency: policy.concurrency,
        };
        *self
            .refresh
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Stops the refresher and waits for the refreshes it has in flight.
    pub async fn stop_refresher(&self) {
        let handle = self
            .refresh
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.refresh.recent.tracking.store(false, Ordering::Relaxed);
        if let Some(handle) = handle {
            handle.stop().await;
        }
    }

    /// When the broker next refreshes this connection: ahead if it is recently used and
    /// planned, else its keep-alive (for ListConnections and GetConnection).
    pub fn next_refresh_at(&self, connection: &Connection) -> Option<DateTime<Utc>> {
        let key = connection_path(&connection.connector_id, &connection.user_id);
        match (
            self.refresh.recent.planned(&key),
            connection.next_refresh_at,
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Sleeps until `next` (at most [`MAX_SLEEP`]), a new connection, or a stop; false on a stop.
async fn nap(
    inner: &Inner,
    next: Option<DateTime<Utc>>,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let wait = next
        .map(|n| (n - inner.clock.now()).to_std().unwrap_or_default())
        .unwrap_or(MAX_SLEEP)
        .min(MAX_SLEEP);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = inner.recent.changed.notified() => true,
        _ = stopped.changed() => false,
    }
}

/// Refresh ahead: plans each recently used connection, refreshes it when due.
async fn ahead_loop(inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    loop {
        if *stopped.borrow() {
            return;
        }
        let now = inner.clock.now();
        let (jobs, mut next) = inner.recent.due(now, inner.policy.recent);
        for job in jobs {
            let key = match &job {
                Job::Plan { key } | Job::Refresh { key, .. } => key.clone(),
            };
            if let Job::Refresh { provider, .. } = &job
                && let Err(retry) = inner.admit(provider, now)
            {
                requeue(&inner, &key, &job, retry);
                next = Some(next.map_or(retry, |n| n.min(retry)));
                continue;
            }
            let permit = tokio::select! {
                p = inner.permits.clone().acquire_owned() => p,
                _ = stopped.changed() => return,
            };
            let Ok(permit) = permit else { return };
            let inner = inner.clone();
            tokio::spawn(async move {
                run_job(&inner, job).await;
                drop(permit);
            });
        }
        if !nap(&inner, next, &mut stopped).await {
            return;
        }
    }
}

/// Puts a refresh the provider's rate refused back in the plan, due at `retry`.
fn requeue(inner: &Inner, key: &str, job: &Job, retry: DateTime<Utc>) {
    if let Job::Refresh {
        expires, provider, ..
    } = job
    {
        inner.recent.set(
            key,
            State::Planned {
                expires: *expires,
                due: retry,
                provider: provider.clone(),
            },
        );
    }
}

/// Runs one job of the ahead loop: a refresh (if due) then a new plan.
async fn run_job(inner: &Inner, job: Job) {
    let Some(oauth) = inner.oauth.upgrade() else {
        return;
    };
    let (key, refresh) = match job {
        Job::Plan { key } => (key, None),
        Job::Refresh { key, expires, .. } => (key, Some(expires)),
    };
    let Some(tracked) = inner.recent.entry(&key) else {
        return;
    };
    let connector = match oauth
        .registry
        .find_connector(&tracked.workspace, &tracked.connector_id)
        .await
    {
        Ok(c) => c,
        Err(_) => return inner.recent.ignore(&key, inner.clock.now()),
    };
    if let Some(expires) = refresh {
        refresh_one(
            &oauth,
            &connector,
            &tracked.user,
            expires,
            Background::Ahead,
        )
        .await;
    }
    plan(inner, &oauth, &connector, &tracked.user, &key).await;
}

/// Reads the connection's token expiry and plans its next refresh ahead (or ignores it).
async fn plan(inner: &Inner, oauth: &OAuth, connector: &Connector, user: &str, key: &str) {
    let connection = match oauth.registry.connection(connector, user).await {
        Ok(Some(c)) if renewable_ahead(connector, &c) => c,
        Ok(_) => return inner.recent.ignore(key, inner.clock.now()),
        Err(e) => {
            tracing::debug!(error = %e, "refresher: could not read a connection");
            let due = inner.clock.now() + RETRY;
            let provider = provider_key(connector);
            let expires = None;
            return inner.recent.set(
                key,
                State::Planned {
                    expires,
                    due,
                    provider,
                },
            );
        }
    };
    let now = inner.clock.now();
    // A client-credentials token lives in memory, not in the connection.
    let (issued, expires) = match Grant::of(connector) {
        Ok(Grant::ClientCredentials) => match oauth.client_token_times(connector) {
            Some((issued, expires)) => (Some(issued), Some(expires)),
            None => (None, None),
        },
        _ => (connection.last_refreshed_at, connection.access_expires_at),
    };
    let due = match expires {
        Some(at) => inner.policy.due_ahead(issued, at, jitter_draw()),
        None => now + inner.policy.window,
    };
    // A refresh that did not change the token (backing off, failed): not again at once.
    let due = due.max(now + RETRY.min(MIN_AHEAD_AGE));
    let provider = provider_key(connector);
    inner.recent.set(
        key,
        State::Planned {
            expires,
            due,
            provider,
        },
    );
}

/// One background refresh through the connection's one refresh lock.
async fn refresh_one(
    oauth: &OAuth,
    connector: &Connector,
    user: &str,
    expires: Option<DateTime<Utc>>,
    trigger: Background,
) {
    match oauth.refresh_ahead(connector, user, expires).await {
        Ok(true) => crate::metrics::background_refresh(trigger),
        Ok(false) => {}
        Err(e) => {
            tracing::debug!(connector = %connector.id, error = %e, "background refresh failed")
        }
    }
}

/// Keep-alive: every `keepalive_scan_secs`, refreshes the idle connections whose grant is due.
async fn keepalive_loop(inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(inner.policy.scan_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stopped.changed() => return,
        }
        let Some(oauth) = inner.oauth.upgrade() else {
            return;
        };
        match keepalive_due(&inner, &oauth).await {
            Ok(due) => {
                for (connector, user, expires) in due {
                    if !keepalive_one(&inner, &oauth, connector, user, expires, &mut stopped).await
                    {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "keep-alive scan failed"),
        }
    }
}

/// Starts one keep-alive refresh once its provider's rate and a permit allow; false on a stop.
async fn keepalive_one(
    inner: &Arc<Inner>,
    oauth: &Arc<OAuth>,
    connector: Connector,
    user: String,
    expires: Option<DateTime<Utc>>,
    stopped: &mut watch::Receiver<bool>,
) -> bool {
    let provider = provider_key(&connector);
    while let Err(retry) = inner.admit(&provider, inner.clock.now()) {
        let wait = (retry - inner.clock.now()).to_std().unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => return false,
        }
    }
    let permit = tokio::select! {
        p = inner.permits.clone().acquire_owned() => p,
        _ = stopped.changed() => return false,
    };
    let Ok(permit) = permit else { return false };
    let oauth = oauth.clone();
    tokio::spawn(async move {
        refresh_one(&oauth, &connector, &user, expires, Background::KeepAlive).await;
        drop(permit);
    });
    true
}

/// The idle connections whose keep-alive is due now: (connector, user, planned token expiry).
/// Recently used ones are left to refresh ahead.
async fn keepalive_due(
    inner: &Inner,
    oauth: &OAuth,
) -> Result<Vec<(Connector, String, Option<DateTime<Utc>>)>, crate::model::ModelError> {
    let connectors: HashMap<String, Connector> = oauth
        .registry
        .all_connectors()
        .await?
        .into_iter()
        .filter(|c| c.kind == Kind::Oauth2)
        .map(|c| (c.id.clone(), c))
        .collect();
    let now = inner.clock.now();
    let (mut due, mut after) = (Vec::new(), None::<String>);
    loop {
        let page = oauth
            .registry
            .connections_page(after.as_deref(), SCAN_PAGE)
            .await?;
        for (path, connection) in &page {
            let Some(connector) = connectors.get(&connection.connector_id) else {
                continue;
            };
            let idle = !(inner.policy.ahead && inner.recent.tracked(path));
            let is_due = inner
                .policy
                .keepalive_due(connector, connection)
                .is_some_and(|at| at <= now);
            if idle && is_due && refreshable(connector, connection) {
                let expires = connection.access_expires_at;
                due.push((connector.clone(), connection.user_id.clone(), expires));
            }
        }
        match page.last() {
            Some((last, _)) if page.len() == SCAN_PAGE => after = Some(last.clone()),
            _ => break,
        }
    }
    Ok(due)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock the test moves by hand.
    struct FakeClock(Mutex<DateTime<Utc>>);

    impl FakeClock {
        fn at(t: DateTime<Utc>) -> Arc<Self> {
            Arc::new(Self(Mutex::new(t)))
        }
        fn advance(&self, by: TimeDelta) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }
    }

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    fn policy(edit: impl FnOnce(&mut RefreshConfig)) -> Policy {
        let mut config = RefreshConfig::default();
        edit(&mut config);
        Policy::from(&config)
    }

    #[test]
    fn a_token_is_renewed_a_window_before_it_expires_or_at_three_quarters_of_a_short_life() {
        let p = policy(|c| c.jitter = 0.0);
        let t0 = Utc::now();
        // An hour's token: five minutes (the window) before it expires.
        assert_eq!(p.due_ahead(Some(t0), t0 + secs(3600), 0.5), t0 + secs(3300));
        // A five-second token: with a quarter of its life done, 3.75 s left, more than the
        // 2.5 s a caller asking for a minute is capped at.
        let due = p.due_ahead(Some(t0), t0 + secs(5), 0.5);
        assert_eq!(due, t0 + TimeDelta::milliseconds(1250));
        // Never sooner than a second after it was issued.
        assert_eq!(p.due_ahead(Some(t0), t0 + secs(2), 0.0), t0 + MIN_AHEAD_AGE);
        // An issue time unknown: the whole window before.
        assert_eq!(p.due_ahead(None, t0 + secs(3600), 0.0), t0 + secs(3300));
    }

    #[test]
    fn jitter_spreads_the_renewal_earlier_by_up_to_its_share_of_the_lead() {
        let p = policy(|c| c.jitter = 0.2);
        let t0 = Utc::now();
        let expires = t0 + secs(3600);
        assert_eq!(p.due_ahead(Some(t0), expires, 0.0), t0 + secs(3300));
        assert_eq!(p.due_ahead(Some(t0), expires, 1.0), t0 + secs(3240));
        // A thousand draws land within [expires - 360 s, expires - 300 s], spread out.
        let dues: Vec<_> = (0..1000)
            .map(|_| p.due_ahead(Some(t0), expires, jitter_draw()))
            .collect();
        assert!(
            dues.iter()
                .all(|d| *d >= t0 + secs(3240) && *d <= t0 + secs(3300))
        );
        let early = dues.iter().filter(|d| **d < t0 + secs(3270)).count();
        assert!(
            (300..700).contains(&early),
            "{early} of 1000 in the earlier half"
        );
    }

    fn connector(provider: &str) -> Connector {
        let mut c = Connector::for_tests(
            Kind::Oauth2,
            crate::model::Mode::Personal,
            &[
                ("client_id", "c"),
                ("auth_url", "https://as.test/a"),
                ("token_url", "https://as.test/t"),
            ],
        );
        c.provider = provider.to_string();
        c
    }

    #[test]
    fn keepalive_follows_the_preset_unless_the_config_overrides_it() {
        let p = policy(|c| {
            c.keepalive_days_by_provider
                .insert("google-mail".into(), 6.0);
        });
        let day = TimeDelta::days(1);
        assert_eq!(
            p.keepalive_interval(&connector("microsoft-outlook")),
            Some(day * 60)
        );
        assert_eq!(
            p.keepalive_interval(&connector("google-mail")),
            Some(day * 6)
        );
        assert_eq!(
            p.keepalive_interval(&connector("google-drive")),
            Some(day * 150)
        );
        assert_eq!(p.keepalive_interval(&connector("")), Some(day * 30));
        let off = policy(|c| c.keepalive_days = 0.0);
        assert_eq!(off.keepalive_interval(&connector("")), None);
        // The stored due time is kept, unless the last refresh plus the interval is sooner.
        let t0 = Utc::now();
        let mut connection = Connection::new("cn_x", "u1");
        connection.last_refreshed_at = Some(t0);
        assert_eq!(
            p.keepalive_due(&connector(""), &connection),
            Some(t0 + day * 30)
        );
        connection.next_refresh_at = Some(t0 + day);
        assert_eq!(p.keepalive_due(&connector(""), &connection), Some(t0 + day));
        connection.next_refresh_at = Some(t0 + day * 90);
        assert_eq!(
            p.keepalive_due(&connector(""), &connection),
            Some(t0 + day * 30)
        );
    }

    fn recent_with(keys: &[&str], now: DateTime<Utc>) -> Recent {
        let recent = Recent::default();
        recent.tracking.store(true, Ordering::Relaxed);
        let c = connector("");
        for key in keys {
            recent.touch(&c, key, key, now);
        }
        recent
    }

    #[test]
    fn recent_connections_are_planned_refreshed_when_due_and_dropped_when_idle() {
        let clock = FakeClock::at(Utc::now());
        let recent = recent_with(&["a", "b"], clock.now());
        let hour = secs(3600);
        // New ones are planned first, once.
        let (jobs, next) = recent.due(clock.now(), hour);
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| matches!(j, Job::Plan { .. })));
        assert_eq!(next, None);
        assert!(
            recent.due(clock.now(), hour).0.is_empty(),
            "busy while planning"
        );
        let due_a = clock.now() + secs(10);
        for (key, due) in [("a", due_a), ("b", clock.now() + secs(20))] {
            let provider = "p".to_string();
            recent.set(
                key,
                State::Planned {
                    expires: Some(due + secs(300)),
                    due,
                    provider,
                },
            );
        }
        let (jobs, next) = recent.due(clock.now(), hour);
        assert!(jobs.is_empty());
        assert_eq!(next, Some(due_a));
        clock.advance(secs(10));
        let (jobs, _) = recent.due(clock.now(), hour);
        assert_eq!(
            jobs,
            [Job::Refresh {
                key: "a".into(),
                expires: Some(due_a + secs(300)),
                provider: "p".into()
            }]
        );
        // Touched again, a stays; b, unused for over an hour, is dropped.
        clock.advance(hour);
        recent.touch(&connector(""), "a", "a", clock.now());
        recent.due(clock.now(), hour);
        assert!(recent.tracked("a") && !recent.tracked("b"));
        // While the refresher is not running, nothing is tracked.
        let idle = Recent::default();
        idle.touch(&connector(""), "a", "a", clock.now());
        assert!(!idle.tracked("a"));
    }

    #[test]
    fn each_provider_gets_at_most_its_rate_of_refreshes() {
        let clock = FakeClock::at(Utc::now());
        let p = policy(|c| c.provider_rate_per_sec = 2.0);
        let inner = Inner::new(Weak::new(), Arc::default(), p, clock.clone());
        let admitted = |provider: &str| {
            (0..10)
                .filter(|_| inner.admit(provider, clock.now()).is_ok())
                .count()
        };
        // A burst of two per provider, the providers apart.
        assert_eq!(admitted("google-mail"), 2);
        assert_eq!(admitted("as.test"), 2);
        // The next one is said to fit in half a second.
        let retry = inner.admit("google-mail", clock.now()).unwrap_err();
        assert_eq!(retry - clock.now(), TimeDelta::milliseconds(500));
        clock.advance(TimeDelta::milliseconds(500));
        assert_eq!(admitted("google-mail"), 1);
        // Over ten seconds of asking every 100 ms, about twenty go through.
        let mut total = 0;
        for _ in 0..100 {
            clock.advance(TimeDelta::milliseconds(100));
            total += admitted("as.test");
        }
        assert!((19..=21).contains(&total), "{total}");
        let unlimited = Inner::new(
            Weak::new(),
            Arc::default(),
            policy(|c| c.provider_rate_per_sec = 0.0),
            clock.clone(),
        );
        assert!((0..1000).all(|_| unlimited.admit("x", clock.now()).is_ok()));
    }
}
