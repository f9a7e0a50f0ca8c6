//! IMAP with async-imap over tokio-rustls: implicit TLS or STARTTLS (never plaintext), LOGIN or
//! XOAUTH2, and FetchMail's search + fetch. Reading uses EXAMINE and BODY.PEEK so that it never
//! marks a message as read unless asked to.
//!
//! Reading is bounded by [`Caps`]: the sizes of the messages are asked first (RFC822.SIZE); a
//! message over the per-message cap is read only up to it (`BODY.PEEK[]<0.n>`) and marked
//! truncated; messages past the per-response cap are left for the next page (the result says
//! so). What the server may send for each command is metered ([`super::meter`]), so a server
//! that sends more than it announced is cut off rather than buffered.

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
use super::meter::{Meter, Metered};
use super::{MailError, Service, bounded};
use crate::model::{FieldError, Stage};
use crate::upstream::Conn;

pub type Stream = Metered<TlsStream<Conn>>;

/// What the server may send besides the messages' bytes: per message (its FETCH line, flags…)
/// and per command (the tagged reply, untagged updates).
const PER_MESSAGE_OVERHEAD: u64 = 4096;
const PER_COMMAND_OVERHEAD: u64 = 64 * 1024;

/// How much one read may take from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Bytes of one message: a longer one is read up to here and marked truncated.
    pub message: u32,
    /// Bytes of the messages of one response (a FetchMail reply, a WatchMail batch), and of
    /// any other one command's reply (a SEARCH): past it, messages are left for the next page.
    pub response: u64,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            message: 4 * 1024 * 1024,
            response: 25 * 1024 * 1024,
        }
    }
}

/// What is left of a response's cap while it is read.
#[derive(Debug, Clone)]
pub struct Budget {
    caps: Caps,
    left: u64,
    /// A message was left out because the cap was reached.
    pub reached: bool,
}

impl Budget {
    pub fn new(caps: Caps) -> Self {
        Budget {
            caps,
            left: caps.response,
            reached: false,
        }
    }
}

/// Which messages one FETCH reads, in full or up to the per-message cap, in the order given:
/// it stops at the first that no longer fits the budget.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    full: Vec<u32>,
    partial: Vec<u32>,
    bytes: u64,
}

fn plan(sizes: &[(u32, u32)], budget: &mut Budget) -> Plan {
    let mut plan = Plan::default();
    for &(uid, size) in sizes {
        let cost = u64::from(size.min(budget.caps.message));
        if cost > budget.left {
            budget.reached = true;
            break;
        }
        budget.left -= cost;
        plan.bytes += cost;
        if size > budget.caps.message {
            plan.partial.push(uid);
        } else {
            plan.full.push(uid);
        }
    }
    plan
}

fn uid_set(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

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
    /// Messages the limit would have taken were left out by the response cap.
    pub response_cap_reached: bool,
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

async fn tls(account: &Account, stream: Conn, meter: &Meter) -> Result<Stream, MailError> {
    let ep = &account.imap;
    let name = ServerName::try_from(ep.host.clone()).map_err(|_| {
        MailError::upstream(
            Service::Imap,
            &ep.addr(),
            Stage::Config,
            "the host is not a valid TLS server name",
        )
    })?;
    let tls = TlsConnector::from(Arc::clone(&account.tls))
        .connect(name, stream)
        .await
        .map_err(|e| {
            let mode = match ep.tls {
                TlsMode::Implicit => "implicit TLS, usually port 993",
                TlsMode::StartTls => "STARTTLS, usually port 143",
            };
            tls_error(
                ep,
                format!(
                    "TLS handshake failed ({e}); check the TLS mode ({mode}) and that the server's certificate is trusted (ca_pem)"
                ),
            )
        })?;
    Ok(Metered::new(tls, meter.clone()))
}

fn tls_error(ep: &Endpoint, message: String) -> MailError {
    MailError::upstream(Service::Imap, &ep.addr(), Stage::Tls, message)
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

/// Connects, secures and authenticates; what the server sends counts against `meter`.
async fn login(account: &Account, meter: &Meter) -> Result<async_imap::Session<Stream>, MailError> {
    let ep = &account.imap;
    let stream = tcp(Service::Imap, ep).await?;
    let client = match ep.tls {
        TlsMode::Implicit => {
            let mut client = async_imap::Client::new(tls(account, stream, meter).await?);
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
                    tls_error(
                        ep,
                        format!("the server refused STARTTLS ({e}); try implicit TLS (port 993)"),
                    )
                })?;
            async_imap::Client::new(tls(account, plain.into_inner(), meter).await?)
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
        let meter = Meter::new(Caps::default().response + PER_COMMAND_OVERHEAD);
        let mut session = login(account, &meter).await?;
        let _ = session.logout().await;
        Ok(())
    })
    .await
}

/// A logged-in session with a mailbox open.
pub struct Session {
    pub inner: async_imap::Session<Stream>,
    pub opened: Opened,
}

/// What a session knows besides its connection (which IDLE takes while it runs): the mailbox
/// it opened, the server, the caps and the meter of what the server sends.
pub struct Opened {
    pub mailbox: String,
    pub uid_validity: u32,
    pub uid_next: u32,
    pub(super) server: String,
    pub(super) caps: Caps,
    meter: Meter,
}

impl Session {
    /// Logs in and opens `mailbox`: read-only (EXAMINE) unless `write`.
    pub async fn open(
        account: &Account,
        mailbox: &str,
        write: bool,
        timeout: Duration,
        caps: Caps,
    ) -> Result<Session, MailError> {
        let server = account.imap.addr();
        let meter = Meter::new(caps.response + PER_COMMAND_OVERHEAD);
        bounded(Service::Imap, &server, timeout, async {
            let mut inner = login(account, &meter).await?;
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
            let opened = Opened {
                mailbox: mailbox.to_string(),
                uid_validity: selected.uid_validity.unwrap_or(0),
                uid_next: selected.uid_next.unwrap_or(0),
                server: server.clone(),
                caps,
                meter: meter.clone(),
            };
            Ok(Session { inner, opened })
        })
        .await
    }

    pub(super) fn err(&self, what: &str, e: impl std::fmt::Display) -> MailError {
        MailError::upstream(
            Service::Imap,
            &self.opened.server,
            Stage::Protocol,
            format!("{what}: {e}"),
        )
    }

    /// UIDs matching an IMAP SEARCH, ascending.
    pub async fn search(&mut self, criteria: &str) -> Result<Vec<u32>, MailError> {
        self.allow_command();
        let found = self
            .inner
            .uid_search(criteria)
            .await
            .map_err(|e| self.err("search", e))?;
        let mut uids: Vec<u32> = found.into_iter().collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The server may send one command's ordinary reply (anything but message bodies).
    pub fn allow_command(&self) {
        self.opened
            .meter
            .allow(self.opened.caps.response + PER_COMMAND_OVERHEAD);
    }

    /// The sizes (RFC822.SIZE) of the given UIDs, in the order given.
    async fn sizes(&mut self, uids: &[u32]) -> Result<Vec<(u32, u32)>, MailError> {
        self.allow_command();
        let err = fetch_error(&self.opened.server);
        let fetched: Vec<Fetch> = self
            .inner
            .uid_fetch(uid_set(uids), "(UID RFC822.SIZE)")
            .await
            .map_err(&err)?
            .try_collect()
            .await
            .map_err(&err)?;
        let sizes: std::collections::HashMap<u32, u32> = fetched
            .iter()
            .filter_map(|f| Some((f.uid?, f.size?)))
            .collect();
        Ok(uids
            .iter()
            .filter_map(|u| sizes.get(u).map(|s| (*u, *s)))
            .collect())
    }

    /// One FETCH of bodies (`BODY[]` or `BODY.PEEK[]`, with a `<0.n>` range or not).
    async fn bodies(&mut self, uids: &[u32], body: &str) -> Result<Vec<Fetch>, MailError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let err = fetch_error(&self.opened.server);
        self.inner
            .uid_fetch(uid_set(uids), format!("(UID FLAGS INTERNALDATE {body})"))
            .await
            .map_err(&err)?
            .try_collect()
            .await
            .map_err(&err)
    }

    /// Fetches and parses the given UIDs, taking them in the order given until `budget` is
    /// spent (see [`Caps`]); ascending by UID.
    pub async fn fetch(
        &mut self,
        uids: &[u32],
        include_html: bool,
        mark_seen: bool,
        budget: &mut Budget,
    ) -> Result<Vec<(MailMessage, Option<DateTime<Utc>>)>, MailError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let sizes = self.sizes(uids).await?;
        let plan = plan(&sizes, budget);
        let count = (plan.full.len() + plan.partial.len()) as u64;
        self.opened
            .meter
            .allow(plan.bytes + count * PER_MESSAGE_OVERHEAD + PER_COMMAND_OVERHEAD);
        let body = if mark_seen { "BODY[]" } else { "BODY.PEEK[]" };
        let mut fetched = self.bodies(&plan.full, body).await?;
        let cut = format!("{body}<0.{}>", budget.caps.message);
        let partial = self.bodies(&plan.partial, &cut).await?;
        self.allow_command();
        fetched.extend(partial);
        let sizes: std::collections::HashMap<u32, u32> = sizes.into_iter().collect();
        let mut out: Vec<(MailMessage, Option<DateTime<Utc>>)> = fetched
            .iter()
            .filter_map(|f| {
                let uid = f.uid?;
                let mut m = parse(f.body().unwrap_or_default(), include_html);
                m.uid = uid;
                m.size = sizes.get(&uid).copied().map_or(0, u64::from);
                m.truncated = plan.partial.contains(&uid);
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

/// How a failed FETCH is told.
fn fetch_error(server: &str) -> impl Fn(async_imap::error::Error) -> MailError {
    let server = server.to_string();
    move |e| {
        MailError::upstream(
            Service::Imap,
            &server,
            Stage::Protocol,
            format!("fetch: {e}"),
        )
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

/// The SEARCH criteria of a query.
fn criteria(q: &FetchQuery) -> String {
    let mut criteria = Vec::new();
    if q.since_uid > 0 {
        criteria.push(format!("UID {}:*", q.since_uid.saturating_add(1)));
    }
    if q.unseen_only {
        criteria.push("UNSEEN".to_string());
    }
    if let Some(since) = q.since {
        // SEARCH SINCE has day granularity in the server's time zone: ask a day early, then
        // compare exactly with each message's internal date.
        let day = since - chrono::TimeDelta::days(1);
        criteria.push(format!("SINCE {}", day.format("%-d-%b-%Y")));
    }
    if criteria.is_empty() {
        criteria.push("ALL".to_string());
    }
    criteria.join(" ")
}

/// The messages of a query, within `budget`: the newest `limit`, or with `since_uid` the
/// oldest `limit` after it. With `since`, some candidates may fall before it: pages are
/// fetched until enough match.
async fn matching(
    session: &mut Session,
    q: &FetchQuery,
    budget: &mut Budget,
) -> Result<Vec<MailMessage>, MailError> {
    let mut uids = session.search(&criteria(q)).await?;
    // "n:*" always matches the last message, even when its UID is below n.
    uids.retain(|u| *u > q.since_uid);
    let limit = q.limit as usize;
    let forward = q.since_uid > 0;
    let pages: Vec<Vec<u32>> = if forward {
        uids.chunks(limit).map(<[u32]>::to_vec).collect()
    } else {
        // Newest first, so that the budget keeps the newest.
        uids.rchunks(limit)
            .map(|p| p.iter().rev().copied().collect())
            .collect()
    };
    let mut messages = Vec::new();
    for page in pages {
        let fetched = session
            .fetch(&page, q.include_html, q.mark_seen, budget)
            .await?;
        let mut fetched: Vec<MailMessage> = fetched
            .into_iter()
            .filter(|(_, received)| match (q.since, received) {
                (Some(since), Some(r)) => *r >= since,
                _ => true,
            })
            .map(|(m, _)| m)
            .collect();
        if forward {
            messages.append(&mut fetched);
            messages.truncate(limit);
        } else {
            fetched.append(&mut messages);
            messages = fetched;
            let excess = messages.len().saturating_sub(limit);
            messages.drain(..excess);
        }
        if messages.len() >= limit || budget.reached {
            break;
        }
    }
    Ok(messages)
}

/// FetchMail: the newest `limit` matching messages, or with `since_uid` the oldest `limit`
/// after it (so a client can page forward), in ascending UID order, within `caps`.
pub async fn fetch(
    account: &Account,
    q: &FetchQuery,
    timeout: Duration,
    caps: Caps,
) -> Result<FetchResult, MailError> {
    let mut session = Session::open(account, &q.mailbox, q.mark_seen, timeout, caps).await?;
    let server = account.imap.addr();
    let mut budget = Budget::new(caps);
    let result = bounded(
        Service::Imap,
        &server,
        timeout,
        matching(&mut session, q, &mut budget),
    )
    .await;
    let highest_uid = session.opened.uid_next.saturating_sub(1);
    let uid_validity = session.opened.uid_validity;
    session.logout().await;
    let messages = result?;
    Ok(FetchResult {
        // Reached only matters if it left out a message the limit would have taken.
        response_cap_reached: budget.reached && messages.len() < q.limit as usize,
        messages,
        uid_validity,
        highest_uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(message: u32, response: u64) -> Budget {
        Budget::new(Caps { message, response })
    }

    #[test]
    fn a_message_over_the_cap_is_read_up_to_it_and_counts_as_much() {
        let mut b = budget(100, 1000);
        let p = plan(&[(1, 50), (2, 5000), (3, 100)], &mut b);
        assert_eq!(
            p,
            Plan {
                full: vec![1, 3],
                partial: vec![2],
                bytes: 250
            }
        );
        assert!(!b.reached);
        assert_eq!(b.left, 750);
    }

    #[test]
    fn the_response_cap_stops_at_the_first_message_that_no_longer_fits() {
        let mut b = budget(100, 250);
        let p = plan(&[(9, 100), (8, 100), (7, 100), (6, 10)], &mut b);
        // 6 would still fit, but would leave a gap where 7 was left out.
        assert_eq!((p.full, p.bytes), (vec![9, 8], 200));
        assert!(b.reached);
        let mut b = budget(100, 150);
        let p = plan(&[(9, 100), (8, 100), (7, 10)], &mut b);
        assert_eq!((p.full, p.bytes), (vec![9], 100));
        assert!(b.reached);
        // What is left is carried to the next page.
        let p = plan(&[(5, 40), (4, 40)], &mut b);
        assert_eq!(p.full, vec![5]);
    }

    #[test]
    fn the_criteria_follow_the_query() {
        let q = FetchQuery {
            since_uid: 7,
            unseen_only: true,
            ..FetchQuery::default()
        };
        assert_eq!(criteria(&q), "UID 8:* UNSEEN");
        assert_eq!(criteria(&FetchQuery::default()), "ALL");
    }
}
