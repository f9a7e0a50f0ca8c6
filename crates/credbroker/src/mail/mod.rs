//! Mail on a user's behalf: the IMAP/SMTP side of a connection. This module owns
//! - [`account`]: which servers, TLS modes, addresses and credentials a mail connection uses
//!   (settings merged over the connector's config, password or XOAUTH2 token);
//! - [`message`]: validating and building outgoing mail, parsing incoming mail (mail-parser);
//! - [`smtp`]: sending through a pooled lettre transport per connection;
//! - [`imap`]: reading a mailbox with async-imap over tokio-rustls;
//! - [`organize`]: ListFolders, MoveMessages, SetFlags and DeleteMessages, by UID with the
//!   mailbox's UIDVALIDITY checked first;
//! - [`watch`]: the IMAP IDLE loop behind WatchMail, and [`guard`]: what ends a stream when
//!   its grant or its connection goes;
//! - [`test_account`]: the IMAP login + SMTP AUTH check behind ConnectWithCredentials.
//!
//! Every upstream step is bounded by the configured upstream timeout. A stored password the
//! server refuses marks the connection EXPIRED. No password or token ever appears in an error.

pub mod account;
pub mod guard;
pub mod imap;
pub mod message;
mod meter;
pub mod organize;
pub mod smtp;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use account::{Account, Auth, Endpoint, TlsMode};
pub use message::{AttachmentInfo, MailMessage, OutgoingAttachment, SendRequest};

use crate::driver::{ConnectionError, CredentialError, Credentials, driver, expire_refused};
use crate::model::{Check, FieldError, ModelError, Registry, Stage, Target, TestReport};
use crate::oauth::OAuth;

/// Which server a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Imap,
    Smtp,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::Imap => "IMAP",
            Service::Smtp => "SMTP",
        }
    }

    fn check_name(self) -> &'static str {
        match self {
            Service::Imap => "imap",
            Service::Smtp => "smtp",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The server could not be reached or did not speak the protocol (DNS, TCP, TLS, timeout).
    #[error("{} server {server}: {message}", service.name())]
    Upstream {
        service: Service,
        server: String,
        stage: Stage,
        message: String,
    },
    /// The server refused the credentials.
    #[error("{} server {server} refused the {what}: {hint}", service.name())]
    AuthRefused {
        service: Service,
        server: String,
        /// "password" or "access token".
        what: &'static str,
        hint: &'static str,
    },
    /// The server understood the request and refused it (a recipient, a mailbox…).
    #[error("{} server {server} refused the request: {message}", service.name())]
    Rejected {
        service: Service,
        server: String,
        message: String,
        /// The server's limit on message size was exceeded.
        too_large: bool,
    },
    /// The server refused the stored password: the connection is now EXPIRED.
    #[error("{0}")]
    Expired(Box<MailError>),
    #[error("mailbox {mailbox:?} does not exist or cannot be opened: {message}")]
    NoMailbox { mailbox: String, message: String },
    /// The mailbox's UIDVALIDITY is not the one a request's UIDs were read under: they may
    /// name other messages now, so nothing was done.
    #[error(
        "mailbox {mailbox:?} has UIDVALIDITY {actual}, not {expected}: its UIDs were renumbered; fetch it again (nothing was changed)"
    )]
    StaleUidValidity {
        mailbox: String,
        expected: u32,
        actual: u32,
    },
    /// The server lacks an extension a request needs; nothing was changed.
    #[error("IMAP server {server} {what}")]
    Unsupported { server: String, what: String },
    #[error("too many WatchMail streams for this caller (at most {0})")]
    TooManyWatchers(usize),
    /// The policy no longer grants the caller what a stream it holds needs ([`guard`]).
    #[error("{0}")]
    Denied(String),
    /// The egress policy refused the server, or the upstream connection caps are reached.
    #[error(transparent)]
    Egress(crate::upstream::UpstreamError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<ConnectionError> for MailError {
    fn from(e: ConnectionError) -> Self {
        MailError::Credential(e.into())
    }
}

impl MailError {
    fn upstream(
        service: Service,
        server: &str,
        stage: Stage,
        message: impl Into<String>,
    ) -> MailError {
        MailError::Upstream {
            service,
            server: server.to_string(),
            stage,
            message: message.into(),
        }
    }

    fn timeout(service: Service, server: &str, timeout: Duration) -> MailError {
        MailError::upstream(
            service,
            server,
            Stage::Timeout,
            format!("did not answer within {}s", timeout.as_secs()),
        )
    }

    /// As one check of a credentials test.
    fn to_check(&self, service: Service) -> Check {
        let name = service.check_name();
        match self {
            MailError::Upstream { stage, .. } => Check::failed(name, *stage, self.to_string()),
            MailError::AuthRefused { .. } => Check::failed(name, Stage::Auth, self.to_string()),
            MailError::Invalid(_) | MailError::Egress(_) => {
                Check::failed(name, Stage::Config, self.to_string())
            }
            _ => Check::failed(name, Stage::Protocol, self.to_string()),
        }
    }
}

/// The mail service: accounts, the SMTP pools and the watchers.
pub struct Mail {
    credentials: Credentials,
    timeout: Duration,
    smtp: smtp::Pools,
    max_watchers: usize,
    watchers: Arc<Mutex<HashMap<String, usize>>>,
    caps: imap::Caps,
}

impl Mail {
    pub fn new(
        registry: Arc<Registry>,
        oauth: Arc<OAuth>,
        timeout: Duration,
        max_watchers: usize,
        caps: imap::Caps,
    ) -> Self {
        Self {
            credentials: Credentials::new(registry, oauth),
            timeout,
            smtp: smtp::Pools::default(),
            max_watchers,
            watchers: Arc::default(),
            caps,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn caps(&self) -> imap::Caps {
        self.caps
    }

    /// The account behind a connection, with fresh credentials.
    pub async fn account(&self, target: &Target) -> Result<Account, MailError> {
        account::load(&self.credentials, target, self.timeout).await
    }

    pub(crate) fn registry(&self) -> &Registry {
        self.credentials.registry()
    }

    /// Sends a message; returns its Message-ID and the accepted recipients.
    pub async fn send(
        &self,
        target: &Target,
        request: SendRequest,
    ) -> Result<message::Sent, MailError> {
        let account = self.account(target).await?;
        let outgoing = message::build(&account, request)?;
        let result = self.smtp.send(&account, &outgoing, self.timeout).await;
        self.settle(target, &account, result).await
    }

    /// Reads messages from a mailbox.
    pub async fn fetch(
        &self,
        target: &Target,
        mut query: imap::FetchQuery,
    ) -> Result<imap::FetchResult, MailError> {
        query.validate()?;
        let account = self.account(target).await?;
        let result = imap::fetch(&account, &query, self.timeout, self.caps).await;
        self.settle(target, &account, result).await
    }

    /// What a call on the account's server ends with: a refused password expires the
    /// connection ([`Mail::on_auth_refused`]), a success records its use.
    async fn settle<T>(
        &self,
        target: &Target,
        account: &Account,
        result: Result<T, MailError>,
    ) -> Result<T, MailError> {
        let result = self.on_auth_refused(target, account, result).await;
        if result.is_ok() {
            self.record_use(target).await;
        }
        result
    }

    /// Starts watching a mailbox for the holder of `grant`. The first connection is made
    /// before this returns, so that configuration, credential and reachability problems are
    /// answered as errors; afterwards the stream reconnects by itself until the receiver is
    /// dropped, or ends when the grant or the connection goes ([`guard`]).
    pub async fn watch(
        self: &Arc<Self>,
        grant: guard::Grant,
        target: &Target,
        mut query: watch::WatchQuery,
    ) -> Result<watch::Watcher, MailError> {
        query.validate()?;
        let slot = self.watch_slot(&grant.caller)?;
        let mut guard = guard::Guard::new(grant, target.clone(), self.registry());
        guard.check(self.registry()).await?;
        let account = self.account(target).await?;
        let first =
            imap::Session::open(&account, &query.mailbox, false, self.timeout, self.caps).await;
        let first = self.settle(target, &account, first).await?;
        Ok(watch::spawn(self.clone(), guard, query, first, slot))
    }

    /// A password connection is recorded once a call worked; OAuth ones when their token is
    /// served (`OAuth::access_token`).
    async fn record_use(&self, target: &Target) {
        if !driver(target.connector.kind).resolvable() {
            self.registry()
                .record_use(&target.connector, &target.connection_user)
                .await;
        }
    }

    fn watch_slot(&self, caller: &str) -> Result<watch::Slot, MailError> {
        let mut map = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(caller.to_string()).or_default();
        if *n >= self.max_watchers {
            return Err(MailError::TooManyWatchers(self.max_watchers));
        }
        *n += 1;
        Ok(watch::Slot {
            caller: caller.to_string(),
            watchers: self.watchers.clone(),
        })
    }

    /// A stored password the server refused marks the connection EXPIRED ([`expire_refused`]):
    /// the user must reconnect, and the caller is told so. A refused OAuth token is left to the
    /// OAuth module.
    async fn on_auth_refused<T>(
        &self,
        target: &Target,
        account: &Account,
        result: Result<T, MailError>,
    ) -> Result<T, MailError> {
        let refused = match result {
            Err(e @ MailError::AuthRefused { .. }) if matches!(account.auth, Auth::Password(_)) => {
                e
            }
            other => return other,
        };
        if let Err(save) = expire_refused(
            self.registry(),
            &target.connector,
            &target.connection_user,
            format!("{refused}; reconnect the account"),
            false,
        )
        .await
        {
            tracing::warn!(error = %save, "could not mark the mail connection expired");
        }
        Err(MailError::Expired(Box::new(refused)))
    }
}

/// Tests candidate IMAP/SMTP credentials: an IMAP login and an SMTP AUTH, each reported as one
/// check saying where it failed (DNS, TCP, TLS, auth…).
pub async fn test_account(
    connector: &crate::model::Connector,
    settings: &std::collections::BTreeMap<String, String>,
    auth: Option<Auth>,
    timeout: Duration,
) -> TestReport {
    let account = match account::from_settings(connector, settings, auth) {
        Ok(account) => account,
        Err(e) => {
            return TestReport::one(Check::failed("settings", Stage::Config, e.to_string()));
        }
    };
    let (imap, smtp) = tokio::join!(
        imap::test_login(&account, timeout),
        smtp::test_auth(&account, timeout)
    );
    let imap = match imap {
        Ok(()) => Check::passed(
            "imap",
            format!("logged in to {} as {}", account.imap, account.username),
        ),
        Err(e) => e.to_check(Service::Imap),
    };
    let smtp = match smtp {
        Ok(()) => Check::passed(
            "smtp",
            format!("authenticated to {} as {}", account.smtp, account.username),
        ),
        Err(e) => e.to_check(Service::Smtp),
    };
    TestReport {
        checks: vec![imap, smtp],
        account_label: Some(account.email.clone()),
    }
}

/// Runs `fut` within `timeout`; a late answer is an UNAVAILABLE-class error, never a hang.
async fn bounded<T>(
    service: Service,
    server: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, MailError>>,
) -> Result<T, MailError> {
    let started = std::time::Instant::now();
    let result = match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result,
        Err(_) => Err(MailError::timeout(service, server, timeout)),
    };
    let upstream = match service {
        Service::Smtp => crate::metrics::Upstream::Smtp,
        Service::Imap => crate::metrics::Upstream::Imap,
    };
    crate::metrics::upstream(upstream, started.elapsed());
    result
}
