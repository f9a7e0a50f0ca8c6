//! Webhooks: each lifecycle event POSTed as JSON to every `[[webhooks]]` URL whose filter
//! takes it, signed, from a durable outbox, at least once.
//!
//! A delivery carries `credbroker-event-id` (also `idempotency-key`: the event's id, the same
//! on every attempt) and `credbroker-signature: t=<unix seconds>,v1=<hex>`, where `v1` is
//! HMAC-SHA256 under the webhook's secret of `"<t>.<body>"`. A receiver recomputes `v1` over the
//! raw body, compares in constant time, refuses a `t` more than five minutes from its clock
//! (the replay window, [`verify`]), and drops an event id it has seen.
//!
//! Invariants:
//! - a delivery leaves the outbox only once the receiver answered 2xx (or it is older than
//!   `[events] webhook_max_age_hours`, logged): a crash or an outage delays it, never loses it;
//! - one delivery per webhook is in flight, oldest first, retried with exponential backoff
//!   ([`backoff`]); a receiver that is down costs one attempt per backoff step;
//! - deliveries go through the guarded HTTP client ([`crate::tls::http_client`]): the egress
//!   policy and connection caps apply, and a URL the policy refuses fails at start-up;
//! - the secret is read once at start-up and appears nowhere else: not in `Debug`, logs or
//!   errors; logs name the receiver by host only (a URL's path may hold a token of its own).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{Event, EventKind, Events, EventsConfig, WebhookConfig};
use crate::model::Secret;
use crate::store::JobGuard;

pub const SIGNATURE_HEADER: &str = "credbroker-signature";
pub const EVENT_ID_HEADER: &str = "credbroker-event-id";
/// The replay window [`verify`] applies by default: five minutes either way.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// The shortest secret accepted.
pub const MIN_SECRET_CHARS: usize = 32;
/// Deliveries read from an outbox per step.
const OUTBOX_BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("[[webhooks]] {url}: {why}")]
    Invalid { url: String, why: String },
}

/// A configured webhook, its secret read.
pub struct Webhook {
    url: reqwest::Url,
    /// Names its outbox: derived from the URL, so reordering `[[webhooks]]` moves nothing.
    key: String,
    kinds: BTreeSet<EventKind>,
    secret: Secret,
    ca_pem: Option<String>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &self.host())
            .field("key", &self.key)
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

fn read_secret(path: &Path) -> Result<Secret, String> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))?,
    );
    let secret = text.trim();
    if secret.chars().count() < MIN_SECRET_CHARS {
        return Err(format!(
            "the secret in {} is {} characters; at least {MIN_SECRET_CHARS} are needed \
             (e.g. `openssl rand -hex 32`)",
            path.display(),
            secret.chars().count()
        ));
    }
    Ok(Secret::new(secret))
}

fn secret_path(config: &WebhookConfig) -> Result<PathBuf, String> {
    match (&config.secret_file, &config.secret_credential) {
        (Some(path), None) => Ok(path.clone()),
        (None, Some(name)) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                format!(
                    "secret_credential {name:?} needs $CREDENTIALS_DIRECTORY (run under \
                     systemd with LoadCredential=)"
                )
            })?;
            Ok(PathBuf::from(dir).join(name))
        }
        _ => Err("set exactly one of secret_file and secret_credential".into()),
    }
}

impl Webhook {
    /// Checks one `[[webhooks]]` entry and reads its secret (and CA).
    pub fn load(config: &WebhookConfig) -> Result<Webhook, WebhookError> {
        let invalid = |why: String| WebhookError::Invalid {
            url: shown_url(&config.url),
            why,
        };
        let url = reqwest::Url::parse(&config.url).map_err(|e| invalid(e.to_string()))?;
        if url.scheme() != "https" || url.host_str().is_none() {
            return Err(invalid("the URL must be https://host/…".into()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("the URL may not hold a user or password".into()));
        }
        let secret = read_secret(&secret_path(config).map_err(&invalid)?).map_err(&invalid)?;
        let ca_pem = match &config.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| invalid(format!("cannot read ca_file {}: {e}", path.display())))?;
                crate::tls::parse_pem_certs(&pem)
                    .map_err(|e| invalid(format!("ca_file {}: {e}", path.display())))?;
                Some(pem)
            }
        };
        let digest = Sha256::digest(url.as_str().as_bytes());
        Ok(Webhook {
            key: hex::encode(&digest[..8]),
            url,
            kinds: config.events.iter().copied().collect(),
            secret,
            ca_pem,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn kinds(&self) -> &BTreeSet<EventKind> {
        &self.kinds
    }

    fn host(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        match self.url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }

    /// Fails if the egress policy refuses every address the URL's host resolves to. A host
    /// that does not resolve now is only warned about: deliveries wait for it.
    pub async fn check_egress(&self) -> Result<(), WebhookError> {
        let host = self.url.host_str().unwrap_or_default();
        let port = self.url.port_or_known_default().unwrap_or(443);
        match crate::upstream::resolve(host, port).await {
            Ok(_) => Ok(()),
            Err(e @ crate::upstream::UpstreamError::Refused { .. }) => Err(WebhookError::Invalid {
                url: shown_url(self.url.as_str()),
                why: format!("{e}: allow it in [egress]"),
            }),
            Err(e) => {
                tracing::warn!(webhook = %self.host(), error = %e, "webhook receiver not reachable now; deliveries will wait for it");
                Ok(())
            }
        }
    }
}

/// A URL as errors show it: scheme, host and port only.
fn shown_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => format!("{}://{}", u.scheme(), u.host_str().unwrap_or_default()),
        Err(_) => "(an unparsable URL)".into(),
    }
}

fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `credbroker-signature` value of `body` sent at `timestamp` (unix seconds).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let tag = mac(secret, timestamp, body).finalize().into_bytes();
    format!("t={timestamp},v1={}", hex::encode(tag))
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header is not t=<seconds>,v1=<hex>")]
    Malformed,
    #[error("the signature is {age_secs}s from now, outside the replay window")]
    Stale { age_secs: i64 },
    #[error("the signature does not match the body")]
    Mismatch,
}

/// What a receiver checks: `header` signs `body` under `secret`, at most `window_secs` from
/// `now` (unix seconds) either way.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: i64,
    window_secs: i64,
) -> Result<(), SignatureError> {
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err(SignatureError::Malformed);
    };
    let age_secs = now.saturating_sub(t);
    if age_secs.abs() > window_secs {
        return Err(SignatureError::Stale { age_secs });
    }
    mac(secret, t, body)
        .verify_slice(&v1)
        .map_err(|_| SignatureError::Mismatch)
}

/// The wait before attempt `attempt + 1` after `attempt` failures (1-based): `first`, doubling,
/// at most `max`.
pub fn backoff(first: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    first.saturating_mul(1u32 << doublings).min(max)
}

/// One webhook's delivery loop.
struct Deliverer {
    events: Arc<Events>,
    hook: Webhook,
    client: reqwest::Client,
    first: Duration,
    max: Duration,
    max_age: chrono::TimeDelta,
}

/// How often a replica asks for a webhook's delivery job another replica holds.
const TAKEOVER_POLL: Duration = Duration::from_secs(5);

/// Starts delivering `hook`'s outbox, for as long as the daemon runs.
pub fn spawn(
    events: Arc<Events>,
    hook: Webhook,
    config: &EventsConfig,
    timeout: Duration,
) -> Result<(), WebhookError> {
    let client = crate::tls::http_client(hook.ca_pem.as_deref(), timeout).map_err(|e| {
        WebhookError::Invalid {
            url: shown_url(hook.url.as_str()),
            why: e.to_string(),
        }
    })?;
    let deliverer = Deliverer {
        events,
        hook,
        client,
        first: Duration::from_millis(config.webhook_backoff_first_ms.max(1)),
        max: Duration::from_secs(config.webhook_backoff_max_secs.max(1)),
        max_age: chrono::TimeDelta::hours(config.webhook_max_age_hours.min(1 << 20) as i64),
    };
    tokio::spawn(deliverer.run());
    Ok(())
}

impl Deliverer {
    async fn run(self) {
        let mut news = self.events.announcements();
        // With replicas, one of them delivers each webhook (one in flight, oldest first); the
        // others wait for its job, which frees when that replica stops or dies.
        let _turn = self.turn().await;
        loop {
            let pending = match self.events.outbox(&self.hook.key, OUTBOX_BATCH).await {
                Ok(pending) => pending,
                Err(e) => {
                    tracing::error!(webhook = %self.hook.host(), error = %e, "cannot read the webhook outbox; retrying");
                    tokio::time::sleep(self.max).await;
                    continue;
                }
            };
            if pending.is_empty() {
                // A commit announces itself; the timeout is a safety net only.
                let _ = tokio::time::timeout(Duration::from_secs(60), news.changed()).await;
                continue;
            }
            for event in pending {
                self.deliver(&event).await;
            }
        }
    }

    /// This webhook's delivery job across the replicas sharing the store (None without any).
    async fn turn(&self) -> Option<JobGuard> {
        let store = &self.events.store;
        if !store.is_shared() {
            return None;
        }
        let job = format!("webhook/{}", self.hook.key);
        loop {
            match store.job(&job, false).await {
                Ok(Some(turn)) => return Some(turn),
                // Another replica delivers: asked again, to take over when it stops.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(webhook = %self.hook.host(), error = %e, "cannot take the webhook's delivery job; retrying");
                }
            }
            tokio::time::sleep(TAKEOVER_POLL).await;
        }
    }

    /// Attempts `event` until the receiver takes it or it is too old, then clears it.
    async fn deliver(&self, event: &Event) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let why = match self.post(event).await {
                Ok(()) => {
                    crate::metrics::webhook(crate::metrics::Webhook::Delivered);
                    break;
                }
                Err(why) => why,
            };
            crate::metrics::webhook(crate::metrics::Webhook::Failed);
            if Utc::now() - event.time > self.max_age {
                crate::metrics::webhook(crate::metrics::Webhook::Dropped);
                tracing::error!(webhook = %self.hook.host(), event = %event.id, cursor = event.cursor, attempts = attempt, error = %why, "webhook delivery given up: older than webhook_max_age_hours");
                break;
            }
            let wait = backoff(self.first, self.max, attempt);
            tracing::warn!(webhook = %self.hook.host(), event = %event.id, cursor = event.cursor, attempt, retry_in_ms = wait.as_millis() as u64, error = %why, "webhook delivery failed");
            tokio::time::sleep(wait).await;
        }
        if let Err(e) = self.events.delivered(&self.hook.key, event.cursor).await {
            // Left in the outbox: delivered again later (at least once).
            tracing::error!(webhook = %self.hook.host(), error = %e, "cannot clear a webhook delivery");
        }
    }

    /// One attempt: Ok once the receiver answers 2xx.
    async fn post(&self, event: &Event) -> Result<(), String> {
        let body = serde_json::to_vec(event).expect("events serialize");
        let signature = sign(
            self.hook.secret.expose().as_bytes(),
            Utc::now().timestamp(),
            &body,
        );
        let response = self
            .client
            .post(self.hook.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header(EVENT_ID_HEADER, &event.id)
            .header("idempotency-key", &event.id)
            .body(body)
            .send()
            .await
            .map_err(|e| match crate::upstream::refusal(&e) {
                Some(refused) => refused.to_string(),
                None => format!("cannot reach the receiver: {}", e.without_url()),
            })?;
        match response.status() {
            status if status.is_success() => Ok(()),
            status => Err(format!("the receiver answered {status}")),
        }
    }
}
