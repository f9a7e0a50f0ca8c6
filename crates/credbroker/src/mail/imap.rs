//! IMAP with async-imap over tokio-rustls: implicit TLS or STARTTLS (never plaintext), LOGIN or
//! XOAUTH2, and FetchMail's search + fetch. Reading uses EXAMINE and BODY.PEEK so that it never
//! marks a message as read unless asked to.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_imap::types::{Fetch, Flag};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::account::{Account, Auth, Endpoint, TlsMode};
use super::message::{MailMessage, parse};
use super::{MailError, Service, bounded};
use crate::model::{FieldError, Stage};
use crate::upstream::Conn;

pub type Stream = TlsStream<Conn>;

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 200;

/// What FetchMail asks for.
#[derive(Debug, Clone, Default)]
pub struct FetchQuery {
    /// Empty means INBOX.
    pub mailbox: String,
    /// 0 means [`DEFAULT_LIMIT`]; at most [`MAX_LIMIT`].
    pub limit: u32,
    pub unseen_only: bool,
    pub since_uid: u32,
    pub since: Option<DateTime<Utc>>,
    pub include_html: bool,
    pub mark_seen: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FetchResult {
    pub messages: Vec<MailMessage>,
    pub uid_validity: u32,
    pub highest_uid: u32,
}

/// A mailbox name: INBOX by default, no line breaks or control characters.
pub fn mailbox_name(field: &str, mailbox: &str) -> Result<String, FieldError> {
    if mailbox.is_empty() {
        return Ok("INBOX".to_string());
    }
    if mailbox.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain line breaks or control characters",
        ));
    }
    if mailbox.len() > 512 || mailbox.trim() != mailbox {
        return Err(FieldError::new(
            field,
            "must be at most 512 bytes, without leading or trailing spaces",
        ));
    }
    Ok(mailbox.to_string())
}

impl FetchQuery {
    /// Checks the query and fills in the defaults.
    pub fn validate(&mut self) -> Result<(), FieldError> {
        self.mailbox = mailbox_name("mailbox", &self.mailbox)?;
        self.limit = match self.limit {
            0 => DEFAULT_LIMIT,
            n if n <= MAX_LIMIT => n,
            n => {
                return Err(FieldError::new(
                    "limit",
                    format!("is {n}; must be 1-{MAX_LIMIT} (0 means {DEFAULT_LIMIT})"),
                ));
            }
        };
        Ok(())
    }
}

/// An upstream failure of `service` at `ep`: a refusal or cap as itself, DNS and TCP failures
/// as their stage (without the inner cause, [`crate::upstream`]).
pub(super) fn upstream_failure(
    service: Service,
    ep: &Endpoint,
    e: crate::upstream::UpstreamError,
) -> MailError {
    use crate::upstream::UpstreamError as U;
    let stage = match &e {
        U::Dns { .. } => Stage::Dns,
        U::Connect { .. } => Stage::Tcp,
        U::Refused { .. } | U::Busy { .. } => return MailError::Egress(e),
    };
    MailError::upstream(service, &ep.addr(), stage, e.to_string())
}

/// The checked addresses of a server ([`crate::upstream::resolve`]).
pub async fn resolve(service: Service, ep: &Endpoint) -> Result<Vec<SocketAddr>, MailError> {
    crate::upstream::resolve(&ep.host, ep.port)
        .await
        .map_err(|e| upstream_failure(service, ep, e))
}

/// A checked, capped connection to the server ([`crate::upstream::connect`]).
async fn tcp(service: Service, ep: &Endpoint) -> Result<Conn, MailError> {
    crate::upstream::connect(&ep.host, ep.port)
        .await
        .map_err(|e| upstream_failure(service, ep, e))
}

async fn tls(account: &Account, stream: Conn) -> Result<Stream, MailError> {
    let ep = &account.imap;
    let name = ServerName::try_from(ep.host.clone()).map_err(|_| {
        MailError::upstream(
            Service::Imap,
            &ep.addr(),
            Stage::Config,
            "the host is not a valid TLS server name",
        )
    })?;
    TlsConnector::from(Arc::clone(&account.tls))
        .connect(name, stream)
        .await
        .map_err(|e| {
            MailError::upstream(
                Service::Imap,
                &ep.addr(),
                Stage::Tls,
                format!(
                    "TLS handshake failed ({e}); check the TLS mode ({}) and that the server's certificate is trusted (ca_pem)",
                    match ep.tls {
                        TlsMode::Implicit => "implicit TLS, usually port 993",
                        TlsMode::StartTls => "STARTTLS, usually port 143",
                    }
                ),
            )
        })
}

fn protocol(account: &Account, what: &str, e: impl std::fmt::Display) -> MailError {
    MailError::upstream(
        Service::Imap,
        &account.imap.addr(),
        Stage::Protocol,
        format!("{what}: {e}"),
    )
}

/// Reads the server's greeting; an IMAP server always speaks first.
async fn greeting<T>(account: &Account, client: &mut async_imap::Client<T>) -> Result<(), MailError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    match client.read_response().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(protocol(
            account,
            "no greeting",
            "the server closed the connection",
        )),
        Err(e) => Err(protocol(account, "no greeting", e)),
    }
}

struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
}

impl async_imap::Authenticator for XOAuth2<'_> {
    type Response = String;
    fn process(&mut self, _challenge: &[u8]) -> String {
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token)
    }
}

/// Connects, secures and authenticates.
async fn login(account: &Account) -> Result<async_imap::Session<Stream>, MailError> {
    let ep = &account.imap;
    let stream = tcp(Service::Imap, ep).await?;
    let client = match ep.tls {
        TlsMode::Implicit => {
            let mut client = async_imap::Client::new(tls(account, stream).await?);
            greeting(account, &mut client).await?;
            client
        }
        TlsMode::StartTls => {
            let mut plain = async_imap::Client::new(stream);
            greeting(account, &mut plain).await?;
            plain
                .run_command_and_check_ok("STARTTLS", None)
                .await
                .map_err(|e| {
                    MailError::upstream(
                        Service::Imap,
                        &ep.addr(),
                        Stage::Tls,
                        format!("the server refused STARTTLS ({e}); try implicit TLS (port 993)"),
                    )
                })?;
            async_imap::Client::new(tls(account, plain.into_inner()).await?)
        }
    };
    let result = match &account.auth {
        Auth::Password(p) => client.login(&account.username, p.expose()).await,
        Auth::XOAuth2(t) => {
            client
                .authenticate(
                    "XOAUTH2",
                    XOAuth2 {
                        user: &account.username,
                        token: t.expose(),
                    },
                )
                .await
        }
    };
    result.map_err(|(e, _)| match e {
        async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_) => {
            MailError::AuthRefused {
                service: Service::Imap,
                server: ep.addr(),
                what: account.auth.what(),
                hint: "check the username and password (an app password if the account uses two-factor authentication)",
            }
        }
        // The message of a validation error would quote a character of the password.
        async_imap::error::Error::Validate(_) => MailError::upstream(
            Service::Imap,
            &ep.addr(),
            Stage::Config,
            "the username or password contains a character IMAP cannot send",
        ),
        async_imap::error::Error::Io(io) => protocol(account, "login", io),
        _ => protocol(account, "login", "the server ended the connection"),
    })
}

/// The IMAP login of a credentials test.
pub async fn test_login(account: &Account, timeout: Duration) -> Result<(), MailError> {
    bounded(Service::Imap, &account.imap.addr(), timeout, async {
        let mut session = login(account).await?;
        let _ = session.logout().await;
        Ok(())
    })
    .await
}

/// A logged-in session with a mailbox open.
pub struct Session {
    pub inner: async_imap::Session<Stream>,
    pub mailbox: String,
    pub uid_validity: u32,
    pub uid_next: u32,
    pub(super) server: String,
}

impl Session {
    /// Logs in and opens `mailbox`: read-only (EXAMINE) unless `write`.
    pub async fn open(
        account: &Account,
        mailbox: &str,
        write: bool,
        timeout: Duration,
    ) -> Result<Session, MailError> {
        let server = account.imap.addr();
        bounded(Service::Imap, &server, timeout, async {
            let mut inner = login(account).await?;
            let selected = if write {
                inner.select(mailbox).await
            } else {
                inner.examine(mailbox).await
            };
            let selected = selected.map_err(|e| match e {
                async_imap::error::Error::No(message) => MailError::NoMailbox {
                    mailbox: mailbox.to_string(),
                    message,
                },
                e => protocol(account, "opening the mailbox", e),
            })?;
            Ok(Session {
                inner,
                mailbox: mailbox.to_string(),
                uid_validity: selected.uid_validity.unwrap_or(0),
                uid_next: selected.uid_next.unwrap_or(0),
                server: server.clone(),
            })
        })
        .await
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> MailError {
        MailError::upstream(
            Service::Imap,
            &self.server,
            Stage::Protocol,
            format!("{what}: {e}"),
        )
    }

    /// UIDs matching an IMAP SEARCH, ascending.
    pub async fn search(&mut self, criteria: &str) -> Result<Vec<u32>, MailError> {
        let found = self
            .inner
            .uid_search(criteria)
            .await
            .map_err(|e| self.err("search", e))?;
        let mut uids: Vec<u32> = found.into_iter().collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// Fetches and parses the given UIDs, ascending by UID.
    pub async fn fetch(
        &mut self,
        uids: &[u32],
        include_html: bool,
        mark_seen: bool,
    ) -> Result<Vec<(MailMessage, Option<DateTime<Utc>>)>, MailError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let set = uids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let body = if mark_seen { "BODY[]" } else { "BODY.PEEK[]" };
        let server = self.server.clone();
        let err = |e: async_imap::error::Error| {
            MailError::upstream(
                Service::Imap,
                &server,
                Stage::Protocol,
                format!("fetch: {e}"),
            )
        };
        let fetched: Vec<Fetch> = self
            .inner
            .uid_fetch(&set, format!("(UID FLAGS INTERNALDATE {body})"))
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        let mut out: Vec<(MailMessage, Option<DateTime<Utc>>)> = fetched
            .iter()
            .filter_map(|f| {
                let uid = f.uid?;
                let mut m = parse(f.body().unwrap_or_default(), include_html);
                m.uid = uid;
                m.flags = f.flags().map(|fl| flag_name(&fl)).collect();
                let received = f.internal_date().map(|d| d.with_timezone(&Utc));
                if m.date.is_none() {
                    m.date = received;
                }
                Some((m, received))
            })
            .collect();
        out.sort_by_key(|(m, _)| m.uid);
        out.dedup_by_key(|(m, _)| m.uid);
        Ok(out)
    }

    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.inner.logout()).await;
    }
}

fn flag_name(flag: &Flag<'_>) -> String {
    match flag {
        Flag::Seen => "\\Seen".into(),
        Flag::Answered => "\\Answered".into(),
        Flag::Flagged => "\\Flagged".into(),
        Flag::Deleted => "\\Deleted".into(),
        Flag::Draft => "\\Draft".into(),
        Flag::Recent => "\\Recent".into(),
        Flag::MayCreate => "\\*".into(),
        Flag::Custom(s) => s.to_string(),
    }
}

/// FetchMail: the newest `limit` matching messages, or with `since_uid` the oldest `limit`
/// after it (so a client can page forward), in ascending UID order.
pub async fn fetch(
    account: &Account,
    q: &FetchQuery,
    timeout: Duration,
) -> Result<FetchResult, MailError> {
    let mut session = Session::open(account, &q.mailbox, q.mark_seen, timeout).await?;
    let server = account.imap.addr();
    let result = bounded(Service::Imap, &server, timeout, async {
        let mut criteria = Vec::new();
        if q.since_uid > 0 {
            criteria.push(format!("UID {}:*", q.since_uid.saturating_add(1)));
        }
        if q.unseen_only {
            criteria.push("UNSEEN".to_string());
        }
        if let Some(since) = q.since {
            // SEARCH SINCE has day granularity in the server's time zone: ask a day early,
            // then compare exactly with each message's internal date.
            let day = since - chrono::TimeDelta::days(1);
            criteria.push(format!("SINCE {}", day.format("%-d-%b-%Y")));
        }
        if criteria.is_empty() {
            criteria.push("ALL".to_string());
        }
        let mut uids = session.search(&criteria.join(" ")).await?;
        // "n:*" always matches the last message, even when its UID is below n.
        uids.retain(|u| *u > q.since_uid);
        let limit = q.limit as usize;
        let mut messages = Vec::new();
        // With `since`, some candidates may fall before it: fetch in pages until enough match.
        let pages: Vec<Vec<u32>> = if q.since_uid > 0 {
            uids.chunks(limit).map(<[u32]>::to_vec).collect()
        } else {
            uids.rchunks(limit).map(<[u32]>::to_vec).collect()
        };
        for page in pages {
            let fetched = session.fetch(&page, q.include_html, q.mark_seen).await?;
            let mut fetched: Vec<MailMessage> = fetched
                .into_iter()
                .filter(|(_, received)| match (q.since, received) {
                    (Some(since), Some(r)) => *r >= since,
                    _ => true,
                })
                .map(|(m, _)| m)
                .collect();
            if q.since_uid > 0 {
                messages.append(&mut fetched);
                messages.truncate(limit);
            } else {
                fetched.append(&mut messages);
                messages = fetched;
                let excess = messages.len().saturating_sub(limit);
                messages.drain(..excess);
            }
            if messages.len() >= limit {
                break;
            }
        }
        Ok(messages)
    })
    .await;
    let highest_uid = session.uid_next.saturating_sub(1);
    let uid_validity = session.uid_validity;
    session.logout().await;
    Ok(FetchResult {
        messages: result?,
        uid_validity,
        highest_uid,
    })
}
