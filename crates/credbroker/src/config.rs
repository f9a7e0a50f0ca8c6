//! The daemon's configuration file (TOML) and where the store's key comes from. Relative paths
//! are resolved against the folder of the configuration file.
//!
//! ```toml
//! [store]
//! backend = "sled"                  # the storage engine (sled, the default, is the only one)
//! path = "store"                    # the engine's folder
//! key_file = "store.key"            # or key_credential = "credbroker.key" ($CREDENTIALS_DIRECTORY)
//!                                   # or passphrase_file = "…" / passphrase_env = "VAR"
//! [grpc]
//! listen = "127.0.0.1:7443"
//! cert = "certs/server.pem"
//! key = "certs/server.key"
//! client_ca = "certs/ca.pem"        # client certificates must chain to this
//! crl = []                          # optional PEM CRLs
//! allow_tls12 = false
//! max_concurrent_streams = 256      # calls in flight on one client connection
//! max_connections_per_peer = 256    # connections from one address; more are closed at accept
//! max_connections = 8192            # connections in all
//! [http]                            # OAuth callback and health, HTTPS with the gRPC certificate
//! listen = "127.0.0.1:7444"
//! public_url = "https://127.0.0.1:7444"
//! return_origins = ["https://app.example"]  # where BeginConnect's return_url may point (https)
//! return_loopback = false           # also any loopback return_url (credbroker dev, tests)
//! [policy]
//! file = "policy.toml"
//! [limits]
//! upstream_timeout_secs = 15
//! max_request_bytes = 33554432      # SendEmail/CreateEvent (attachments); others are small
//! max_inflight_request_bytes = 268435456  # large request bytes read at once, all callers
//! rewrap_batch = 256                # records re-sealed per step after a key rotation
//! rewrap_pause_ms = 10              # pause between rewrap steps
//! caller_rate_per_sec = 100000      # per caller identity, a flood guard (0: no limit)…
//! caller_burst = 200000             # …with bursts up to this many
//! free_disk_warn_bytes = 1073741824 # warn below this much free space on the store's disk
//! user_rate_per_sec = 500           # per (caller, user the call acts for) (0: no limit)…
//! user_burst = 1000                 # …with bursts up to this many
//! max_call_request_bytes = 8388608   # Broker.Call: request body sent upstream…
//! max_call_response_bytes = 4128768 # …and response body read back (fits a 4 MiB gRPC reply)
//! max_call_stream_bytes = 1073741824  # Broker.CallStream: response body streamed back…
//! call_stream_timeout_secs = 3600   # …within this long (each piece within upstream_timeout_secs)
//! upstream_connections = 4096       # upstream sockets (IMAP, SMTP, HTTPS) open at once…
//! upstream_connections_per_caller = 1024  # …and per caller (RESOURCE_EXHAUSTED beyond)
//! [egress]                          # where upstream connections may go (crate::upstream)
//! allow = ["10.1.0.0/16", "mail.corp.example", "*.corp.example"]  # even if built-in denied
//! deny = ["203.0.113.0/24"]         # never, whatever allow says
//! default = "allow"                 # the rest (not built-in denied): "allow" or "deny"
//! [audit]                           # the audit log (every key optional)
//! path = "store/audit"              # its folder (default: "audit" in the store's folder)
//! node = "broker-1"                 # this node's id in every record (default: the hostname)
//! segment_bytes = 33554432          # segments roll at this size (preallocated)
//! checkpoint_records = 1000         # a signed checkpoint every this many records…
//! checkpoint_secs = 10              # …or this many seconds, whichever comes first
//! witness_file = "/elsewhere/ckpt"  # each checkpoint appended here as a JSON line
//! witness_url = "https://witness.example/ckpt" # …and/or POSTed here (retried; `[egress]` applies)
//! witness_ca_file = "witness-ca.pem" # extra CA for the witness' certificate (optional)
//! retain_days = 365                 # segments older than this are exported and pruned…
//! retain_bytes = 10737418240        # …and the oldest while the log is larger than this
//! archive = "store/audit-archive"   # where pruned segments are exported (JSON lines)
//! [refresh]                         # OAuth refresh ahead and keep-alive (crate::oauth::refresher)
//! ahead = true                      # renew recently used connections' tokens before they expire
//! window_secs = 300                 # this long before expiry (at most 3/4 of a token's lifetime)…
//! jitter = 0.1                      # …earlier by up to this fraction of it, at random
//! recent_secs = 3600                # "recently used": resolved within this long
//! concurrency = 4                   # refreshes in flight at once
//! provider_rate_per_sec = 5.0       # refreshes per second per provider (token endpoint)
//! keepalive = true                  # refresh idle connections before their grant lapses…
//! keepalive_days = 30.0             # …this often, unless the provider preset names its own…
//! keepalive_scan_secs = 300         # …looking for due ones this often
//! [refresh.keepalive_days_by_provider]
//! microsoft-outlook = 60.0          # a preset's interval overridden
//! [events]                          # lifecycle events (crate::events; every key optional)
//! retain_days = 30                  # events older than this are removed…
//! retain_events = 100000            # …and the oldest beyond this many
//! max_streams = 64                  # WatchEvents streams open at once
//! webhook_backoff_first_ms = 1000   # first wait after a failed delivery, doubling…
//! webhook_backoff_max_secs = 300    # …up to this between two attempts of one delivery
//! webhook_max_age_hours = 72        # a delivery still failing after this long is dropped
//! [[webhooks]]                      # each lifecycle event POSTed, signed, at least once
//! url = "https://platform.example/hooks/credbroker"
//! secret_file = "webhook.secret"    # or secret_credential = "webhook.secret" (systemd)
//! events = ["expired", "reconnected"]  # optional: only these kinds (default: all)
//! ca_file = "platform-ca.pem"       # optional: a CA to trust beside the public roots
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::vault::KeySource;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("configuration {path} is invalid: {why}")]
    Invalid { path: String, why: String },
    #[error("store key: {0}")]
    Key(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub store: StoreConfig,
    pub grpc: GrpcConfig,
    #[serde(default)]
    pub http: HttpConfig,
    pub policy: PolicyConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub egress: crate::upstream::EgressConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub refresh: RefreshConfig,
    #[serde(default)]
    pub events: crate::events::EventsConfig,
    #[serde(default)]
    pub webhooks: Vec<crate::events::WebhookConfig>,
}

/// `[refresh]`: the background refresher of OAuth tokens ([`crate::oauth::refresher`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefreshConfig {
    /// Renew the tokens of recently used connections before they expire.
    pub ahead: bool,
    /// How long before expiry a token is renewed; at most 3/4 of its lifetime, so that a
    /// caller asking for up to half the lifetime left (ResolveCredential's `min_ttl` is capped
    /// there) finds it fresh.
    pub window_secs: u64,
    /// Each lead is made longer by up to this fraction of it, at random (0 to 1), so that
    /// tokens issued together are not renewed together.
    pub jitter: f64,
    /// A connection used within this long is "recently used" and refreshed ahead.
    pub recent_secs: u64,
    /// Refreshes in flight at once (ahead and keep-alive together).
    pub concurrency: usize,
    /// Refreshes per second one provider is sent (by preset name, or token endpoint host);
    /// 0: no limit.
    pub provider_rate_per_sec: f64,
    /// Refresh idle connections before the provider lets their refresh token lapse.
    pub keepalive: bool,
    /// The keep-alive interval of connectors whose provider preset names none (0: none).
    pub keepalive_days: f64,
    /// Per provider preset name: its keep-alive interval in days, over the preset's (0: none).
    pub keepalive_days_by_provider: std::collections::BTreeMap<String, f64>,
    /// How often the store is scanned for connections whose keep-alive is due.
    pub keepalive_scan_secs: u64,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            ahead: true,
            window_secs: 300,
            jitter: 0.1,
            recent_secs: 3600,
            concurrency: 4,
            provider_rate_per_sec: 5.0,
            keepalive: true,
            keepalive_days: 30.0,
            keepalive_days_by_provider: std::collections::BTreeMap::new(),
            keepalive_scan_secs: 300,
        }
    }
}

impl RefreshConfig {
    /// Checks the values that have a range; the error names the key.
    pub fn check(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!(
                "[refresh] jitter is {}; must be between 0 and 1",
                self.jitter
            ));
        }
        if self.concurrency == 0 {
            return Err("[refresh] concurrency must be at least 1".into());
        }
        let days = std::iter::once(("keepalive_days".to_string(), self.keepalive_days)).chain(
            self.keepalive_days_by_provider
                .iter()
                .map(|(p, d)| (format!("keepalive_days_by_provider.{p}"), *d)),
        );
        for (key, d) in days {
            if !d.is_finite() || !(0.0..=3650.0).contains(&d) {
                return Err(format!(
                    "[refresh] {key} is {d}; must be between 0 and 3650 days"
                ));
            }
        }
        if !self.provider_rate_per_sec.is_finite() || self.provider_rate_per_sec < 0.0 {
            return Err("[refresh] provider_rate_per_sec must be 0 or more".into());
        }
        Ok(())
    }
}

/// `[audit]`: where the audit log lives, how it rolls, checkpoints and prunes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The log's folder; `None`: `audit` inside the store's folder.
    pub path: Option<PathBuf>,
    /// This node's id; `None`: the one the log was created with, else the hostname. Replicas
    /// sharing a store each need their own (`node_id` is the same setting).
    #[serde(alias = "node_id")]
    pub node: Option<String>,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    #[serde(default = "default_checkpoint_records")]
    pub checkpoint_records: u64,
    #[serde(default = "default_checkpoint_secs")]
    pub checkpoint_secs: u64,
    pub witness_file: Option<PathBuf>,
    /// An HTTPS URL on another host each checkpoint is POSTed to, as JSON.
    pub witness_url: Option<String>,
    /// A PEM CA trusted for `witness_url` beside the system roots.
    pub witness_ca_file: Option<PathBuf>,
    pub retain_days: Option<u64>,
    pub retain_bytes: Option<u64>,
    /// Where pruned segments are exported; `None`: `audit-archive` beside the log's folder.
    pub archive: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            node: None,
            segment_bytes: default_segment_bytes(),
            checkpoint_records: default_checkpoint_records(),
            checkpoint_secs: default_checkpoint_secs(),
            witness_file: None,
            witness_url: None,
            witness_ca_file: None,
            retain_days: None,
            retain_bytes: None,
            archive: None,
        }
    }
}

fn default_segment_bytes() -> u64 {
    32 << 20
}

fn default_checkpoint_records() -> u64 {
    1000
}

fn default_checkpoint_secs() -> u64 {
    10
}

impl AuditConfig {
    /// The log's folder for a store at `store`.
    pub fn dir(&self, store: &StoreConfig) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| store.path.join("audit"))
    }

    /// Where pruned segments go for a store at `store`.
    pub fn archive_dir(&self, store: &StoreConfig) -> PathBuf {
        self.archive.clone().unwrap_or_else(|| {
            let dir = self.dir(store);
            dir.with_file_name(format!(
                "{}-archive",
                dir.file_name().and_then(|n| n.to_str()).unwrap_or("audit")
            ))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// The storage engine, one of [`crate::store::BACKENDS`] (the first is the default).
    #[serde(default = "default_backend")]
    pub backend: String,
    pub path: PathBuf,
    pub key_file: Option<PathBuf>,
    /// Name of a systemd credential (`LoadCredentialEncrypted=`) holding the key.
    pub key_credential: Option<String>,
    pub passphrase_file: Option<PathBuf>,
    pub passphrase_env: Option<String>,
    /// `backend = "postgres"`: the server, as a `postgres://user@host:port/db` URL (or
    /// key=value string). A password in it is never shown; prefer `password_file`.
    pub url: Option<crate::store::PgUrl>,
    /// `backend = "postgres"`: a file holding the role's password (first line).
    pub password_file: Option<PathBuf>,
    /// `backend = "postgres"`: the CA that signed the server's certificate (PEM); without it,
    /// Mozilla's roots. TLS is always required.
    pub ca_file: Option<PathBuf>,
    /// `backend = "postgres"`: the PostgreSQL schema holding the store's tables.
    #[serde(default = "default_pg_schema")]
    pub schema: String,
    /// `backend = "postgres"`: connections open at once, at most.
    #[serde(default = "default_pg_pool_size")]
    pub pool_size: usize,
    /// `backend = "postgres"`: how long opening a connection may take.
    #[serde(default = "default_pg_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// `backend = "postgres"`: how long one statement may run (PostgreSQL's
    /// `statement_timeout`); a whole call is bounded by connect + statement timeouts.
    #[serde(default = "default_pg_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    /// `backend = "postgres"`: start even though the server's `synchronous_commit` is `off` or
    /// `local` (a commit may then be lost by a crash or a failover after it was acknowledged).
    #[serde(default)]
    pub allow_async_commit: bool,
}

fn default_pg_schema() -> String {
    "credbroker".into()
}

fn default_pg_pool_size() -> usize {
    16
}

fn default_pg_connect_timeout_ms() -> u64 {
    2_000
}

fn default_pg_statement_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    #[serde(default)]
    pub allow_tls12: bool,
    /// HTTP/2 streams (calls in flight) one client connection may have open at once.
    #[serde(default = "default_max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Connections open at once from one remote address; more are closed at accept.
    #[serde(default = "default_max_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Connections open at once in all; more are closed at accept.
    #[serde(default = "default_max_grpc_connections")]
    pub max_connections: usize,
}

fn default_max_concurrent_streams() -> u32 {
    256
}

fn default_max_connections_per_peer() -> usize {
    256
}

fn default_max_grpc_connections() -> usize {
    8192
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: Option<SocketAddr>,
    /// The URL browsers reach the HTTP listener at; the OAuth redirect is `{public_url}/oauth/callback`.
    pub public_url: Option<String>,
    /// TLS 1.3 only unless set (the listener faces browsers, which all speak 1.3).
    pub allow_tls12: bool,
    /// Connections served at once; more are closed as soon as they are accepted, so the
    /// listener never holds the descriptors the gRPC listener and upstream calls need.
    pub max_connections: usize,
    /// Time for a connection to finish its TLS handshake and send a request's headers.
    pub header_timeout_secs: u64,
    /// A connection's whole life: browsers and scrapers make one or two requests and go.
    pub max_connection_secs: u64,
    /// A file holding the bearer token `/metrics` requires; without it `/metrics` is open.
    pub metrics_token_file: Option<PathBuf>,
    /// Origins (`https://host[:port]`) a BeginConnect `return_url` may point at; none by
    /// default (an empty `return_url` only), so the broker is no open redirect.
    pub return_origins: Vec<String>,
    /// Also accept a `return_url` on a loopback host, http or https (development and tests).
    pub return_loopback: bool,
}

impl HttpConfig {
    /// `return_origins` and `return_loopback`, checked.
    pub fn return_origins(&self) -> Result<crate::oauth::ReturnOrigins, String> {
        crate::oauth::ReturnOrigins::new(&self.return_origins, self.return_loopback)
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: None,
            public_url: None,
            allow_tls12: false,
            max_connections: 256,
            header_timeout_secs: 10,
            max_connection_secs: 60,
            metrics_token_file: None,
            return_origins: Vec::new(),
            return_loopback: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deadline of every call to an upstream server (OAuth, SMTP, IMAP, CalDAV).
    pub upstream_timeout_secs: u64,
    /// Largest gRPC message accepted, in bytes: SendEmail and CreateEvent (attachments);
    /// every other RPC has a small fixed bound (`api::rpc`).
    pub max_request_bytes: usize,
    /// Bytes of large requests (over 64 KiB) all callers together may have in flight; a
    /// request past it is refused with RESOURCE_EXHAUSTED before its body is read.
    pub max_inflight_request_bytes: usize,
    /// Concurrent WatchMail streams per caller.
    pub max_watch_streams: usize,
    /// Bytes FetchMail and WatchMail read of one message; a larger one is read up to here and
    /// marked truncated.
    pub max_mail_message_bytes: u32,
    /// Bytes of messages one FetchMail reply (or one WatchMail batch) reads; the messages past
    /// it are left for the next page.
    pub max_mail_response_bytes: u64,
    /// Records the background rewrap re-seals per step after a key rotation…
    pub rewrap_batch: usize,
    /// …and the pause between steps, which bounds the I/O a rewrap adds.
    pub rewrap_pause_ms: u64,
    /// Requests per second one caller may make (0: no limit)…
    pub caller_rate_per_sec: f64,
    /// …with bursts up to this many.
    pub caller_burst: f64,
    /// Below this many free bytes on the store's disk the broker warns (log, and the
    /// `credbroker_store_free_bytes` gauge shows it).
    pub free_disk_warn_bytes: u64,
    /// Requests per second one caller may make for one user (0: no limit)…
    pub user_rate_per_sec: f64,
    /// …with bursts up to this many.
    pub user_burst: f64,
    /// Largest request body Broker.Call sends upstream, in bytes.
    pub max_call_request_bytes: usize,
    /// Largest response body Broker.Call reads from upstream, in bytes.
    pub max_call_response_bytes: usize,
    /// Largest response body Broker.CallStream streams from upstream, in bytes…
    pub max_call_stream_bytes: u64,
    /// …and the longest a CallStream may last, in seconds.
    pub call_stream_timeout_secs: u64,
    /// Upstream connections (IMAP, SMTP, HTTPS) open at once, for the whole broker…
    pub upstream_connections: usize,
    /// …and for one caller; more are refused with RESOURCE_EXHAUSTED before a socket is opened.
    pub upstream_connections_per_caller: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            upstream_timeout_secs: 15,
            max_request_bytes: 32 * 1024 * 1024,
            max_inflight_request_bytes: 256 * 1024 * 1024,
            max_watch_streams: 64,
            max_mail_message_bytes: crate::mail::imap::Caps::default().message,
            max_mail_response_bytes: crate::mail::imap::Caps::default().response,
            rewrap_batch: 256,
            rewrap_pause_ms: 10,
            // An agent runtime is one caller for a whole platform: its budget is a flood
            // guard well above what one broker serves (~40,000/s on 2 cores), and fairness
            // between the users it acts for comes from the per-user budget.
            caller_rate_per_sec: 100_000.0,
            caller_burst: 200_000.0,
            free_disk_warn_bytes: 1 << 30,
            user_rate_per_sec: 500.0,
            user_burst: 1000.0,
            max_call_request_bytes: 8 << 20,
            // A reply must fit the 4 MiB a gRPC client receives by default, with room for
            // the status and headers.
            max_call_response_bytes: (4 << 20) - (64 << 10),
            max_call_stream_bytes: 1 << 30,
            call_stream_timeout_secs: 3600,
            upstream_connections: crate::upstream::DEFAULT_CONNECTIONS,
            upstream_connections_per_caller: crate::upstream::DEFAULT_CONNECTIONS_PER_CALLER,
        }
    }
}

/// The smallest per-message cap: enough for the headers of any ordinary message.
const MIN_MAIL_MESSAGE_BYTES: u32 = 16 * 1024;

impl Limits {
    /// FetchMail's and WatchMail's byte caps; the error names the key that is wrong.
    pub fn mail_caps(&self) -> Result<crate::mail::imap::Caps, String> {
        let (message, response) = (self.max_mail_message_bytes, self.max_mail_response_bytes);
        if message < MIN_MAIL_MESSAGE_BYTES {
            return Err(format!(
                "[limits] max_mail_message_bytes is {message}; must be at least {MIN_MAIL_MESSAGE_BYTES}"
            ));
        }
        if response < u64::from(message) {
            return Err(format!(
                "[limits] max_mail_response_bytes is {response}; must be at least max_mail_message_bytes ({message})"
            ));
        }
        Ok(crate::mail::imap::Caps { message, response })
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            why: e.to_string(),
        })?;
        if !crate::store::BACKENDS.contains(&config.store.backend.as_str()) {
            return Err(ConfigError::Invalid {
                path: shown,
                why: crate::store::StoreError::UnknownBackend {
                    name: config.store.backend,
                }
                .to_string(),
            });
        }
        if let Err(why) = config.http.return_origins() {
            return Err(ConfigError::Invalid { path: shown, why });
        }
        if let Err(why) = config.limits.mail_caps() {
            return Err(ConfigError::Invalid { path: shown, why });
        }
        if let Err(why) = config.upstream() {
            return Err(ConfigError::Invalid { path: shown, why });
        }
        if let Err(why) = config.refresh.check() {
            return Err(ConfigError::Invalid { path: shown, why });
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        for p in [&mut self.store.key_file, &mut self.store.passphrase_file]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
        fix(&mut self.grpc.cert);
        fix(&mut self.grpc.key);
        fix(&mut self.grpc.client_ca);
        self.grpc.crl.iter_mut().for_each(fix);
        fix(&mut self.policy.file);
        if let Some(p) = &mut self.http.metrics_token_file {
            fix(p);
        }
        for hook in &mut self.webhooks {
            for p in [&mut hook.secret_file, &mut hook.ca_file]
                .into_iter()
                .flatten()
            {
                fix(p);
            }
        }
        for p in [
            &mut self.audit.path,
            &mut self.audit.witness_file,
            &mut self.audit.witness_ca_file,
            &mut self.audit.archive,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// The egress policy and upstream caps this configuration sets.
    pub fn upstream(&self) -> Result<crate::upstream::Upstream, String> {
        crate::upstream::Upstream::new(
            &self.egress,
            self.limits.upstream_connections,
            self.limits.upstream_connections_per_caller,
        )
    }

    pub fn upstream_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.limits.upstream_timeout_secs.max(1))
    }
}

fn default_backend() -> String {
    crate::store::BACKENDS[0].to_string()
}

impl StoreConfig {
    /// The default engine at `path`, with no key source named (tests, offline tools).
    pub fn at(path: PathBuf) -> StoreConfig {
        StoreConfig {
            backend: default_backend(),
            path,
            key_file: None,
            key_credential: None,
            passphrase_file: None,
            passphrase_env: None,
            url: None,
            password_file: None,
            ca_file: None,
            schema: default_pg_schema(),
            pool_size: default_pg_pool_size(),
            connect_timeout_ms: default_pg_connect_timeout_ms(),
            statement_timeout_ms: default_pg_statement_timeout_ms(),
            allow_async_commit: false,
        }
    }

    /// The key source this configuration names: exactly one of key file, systemd credential,
    /// passphrase file or passphrase environment variable.
    pub fn key_source(&self) -> Result<KeySource, ConfigError> {
        let given = [
            self.key_file.is_some(),
            self.key_credential.is_some(),
            self.passphrase_file.is_some(),
            self.passphrase_env.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err(ConfigError::Key(format!(
                "[store] must set exactly one of key_file, key_credential, passphrase_file, passphrase_env ({given} set)"
            )));
        }
        if let Some(path) = &self.key_file {
            return Ok(KeySource::KeyFile(path.clone()));
        }
        if let Some(name) = &self.key_credential {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                .ok_or_else(|| ConfigError::Key(format!("key_credential {name:?} needs $CREDENTIALS_DIRECTORY (run under systemd with LoadCredentialEncrypted=)")))?;
            return Ok(KeySource::KeyFile(PathBuf::from(dir).join(name)));
        }
        if let Some(path) = &self.passphrase_file {
            return passphrase_from_file(path);
        }
        let var = self.passphrase_env.as_deref().unwrap_or_default();
        let value = std::env::var(var)
            .map_err(|_| ConfigError::Key(format!("environment variable {var} is not set")))?;
        Ok(KeySource::Passphrase(SecretString::from(value)))
    }
}

/// Reads a passphrase from a file (first line, trailing newline removed).
pub fn passphrase_from_file(path: &Path) -> Result<KeySource, ConfigError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Key(format!(
            "cannot read passphrase file {}: {e}",
            path.display()
        ))
    })?);
    let line = text.lines().next().unwrap_or("");
    Ok(KeySource::Passphrase(SecretString::from(line.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refresh_settings_are_checked_naming_the_key() {
        assert!(RefreshConfig::default().check().is_ok());
        let parsed: RefreshConfig = toml::from_str(
            "window_secs = 60\n[keepalive_days_by_provider]\nmicrosoft-outlook = 45.0\n",
        )
        .unwrap();
        assert_eq!(parsed.window_secs, 60);
        assert_eq!(parsed.keepalive_days_by_provider["microsoft-outlook"], 45.0);
        assert!(parsed.ahead && parsed.keepalive, "defaults kept");
        for (bad, key) in [
            ("jitter = 1.5", "jitter"),
            ("concurrency = 0", "concurrency"),
            ("keepalive_days = -1.0", "keepalive_days"),
            (
                "[keepalive_days_by_provider]\nslack = 9999.0",
                "keepalive_days_by_provider.slack",
            ),
            ("provider_rate_per_sec = -2.0", "provider_rate_per_sec"),
        ] {
            let config: RefreshConfig = toml::from_str(bad).unwrap();
            let why = config.check().unwrap_err();
            assert!(why.contains(&format!("[refresh] {key}")), "{bad}: {why}");
        }
        assert!(toml::from_str::<RefreshConfig>("windows_secs = 1").is_err());
    }

    #[test]
    fn the_mail_caps_are_checked_naming_the_key() {
        let caps = Limits::default().mail_caps().unwrap();
        assert_eq!((caps.message, caps.response), (4 << 20, 25 << 20));
        let small = Limits {
            max_mail_message_bytes: 100,
            ..Limits::default()
        };
        assert!(
            small
                .mail_caps()
                .unwrap_err()
                .contains("max_mail_message_bytes is 100")
        );
        let inverted = Limits {
            max_mail_response_bytes: 1 << 20,
            ..Limits::default()
        };
        let why = inverted.mail_caps().unwrap_err();
        assert!(why.contains("max_mail_response_bytes is 1048576"), "{why}");
    }
}
