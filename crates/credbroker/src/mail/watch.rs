//! WatchMail: one task per stream that delivers every message after the last UID delivered,
//! then waits in IMAP IDLE. When the server drops the connection it reconnects with
//! exponential backoff and resumes after the last UID delivered; it ends when the receiver is
//! dropped (the client went away) or when the stream may no longer run, after sending that
//! error: credentials refused, mailbox gone, or what its [`Guard`] checks (the grant removed by
//! a policy reload, the connection disconnected or expired, the connector deleted). The guard
//! is checked before every delivery and reconnection, and while idling as soon as something
//! changed; a changed but usable connection makes it reconnect with the new one. Each batch of
//! messages is read within the caps ([`super::imap::Caps`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use async_imap::types::UnsolicitedResponse;
use tokio::sync::mpsc;

use super::guard::Guard;
use super::imap::{Budget, Session, mailbox_name};
use super::message::MailMessage;
use super::{Mail, MailError};
use crate::model::FieldError;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// IDLE is re-issued this often (RFC 2177 asks for less than 29 minutes); each time the mailbox
/// is searched again, which also catches a notification a server failed to send.
const IDLE_REFRESH: Duration = Duration::from_secs(5 * 60);
/// Messages fetched per round trip while catching up.
const BATCH: usize = 50;

#[derive(Debug, Clone, Default)]
pub struct WatchQuery {
    pub mailbox: String,
    /// Deliver messages with a UID above this; 0 means only messages arriving from now on.
    pub since_uid: u32,
    pub include_html: bool,
}

impl WatchQuery {
    pub fn validate(&mut self) -> Result<(), FieldError> {
        self.mailbox = mailbox_name("mailbox", &self.mailbox)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub message: MailMessage,
    pub uid_validity: u32,
}

/// The receiving end of a stream.
pub struct Watcher {
    rx: mpsc::Receiver<Result<WatchEvent, MailError>>,
    /// Set when the guard ended the stream, before its error is sent.
    revoked: Arc<AtomicBool>,
}

impl Watcher {
    /// The next item; None once the stream is over. After a revocation the messages still
    /// queued (checked before it) are dropped: the error comes next.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, MailError>> {
        loop {
            let item = self.rx.recv().await?;
            if item.is_ok() && self.revoked.load(Ordering::Acquire) {
                continue;
            }
            return Some(item);
        }
    }
}

/// One caller's share of the WatchMail streams, given back when the stream ends.
pub struct Slot {
    pub(super) caller: String,
    pub(super) watchers: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.caller) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.caller);
            }
        }
    }
}

pub fn spawn(
    mail: Arc<Mail>,
    guard: Guard,
    query: WatchQuery,
    first: Session,
    slot: Slot,
) -> Watcher {
    let (tx, rx) = mpsc::channel(16);
    let revoked = Arc::new(AtomicBool::new(false));
    let flag = revoked.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let connector = guard.target().connector.id.clone();
        let state = State {
            last_uid: if query.since_uid > 0 {
                query.since_uid
            } else {
                first.opened.uid_next.saturating_sub(1)
            },
            uid_validity: first.opened.uid_validity,
        };
        let mut stream = Stream {
            mail,
            guard,
            query,
            tx,
            revoked: flag,
            state,
        };
        stream.run(first).await;
        tracing::debug!(connector = %connector, "WatchMail stream ended");
    });
    Watcher { rx, revoked }
}

/// Errors after which retrying cannot help.
fn is_final(e: &MailError) -> bool {
    !matches!(e, MailError::Upstream { .. })
}

struct State {
    last_uid: u32,
    uid_validity: u32,
}

/// What comes after a step of the stream. Returned once per step, never stored: its size does
/// not matter.
#[allow(clippy::large_enum_variant)]
enum Next {
    /// Go on with this session.
    Go(Session),
    /// Open a new session (the connection was lost, or the connection's record changed).
    Reconnect,
    /// The stream is over: the client went away, or its last item (an error) was sent.
    End,
}

/// One stream's task.
struct Stream {
    mail: Arc<Mail>,
    guard: Guard,
    query: WatchQuery,
    tx: mpsc::Sender<Result<WatchEvent, MailError>>,
    revoked: Arc<AtomicBool>,
    state: State,
}

impl Stream {
    async fn run(&mut self, first: Session) {
        let mut session = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => match self.reconnect(&mut backoff).await {
                    Next::Go(s) => s,
                    Next::Reconnect => continue,
                    Next::End => return,
                },
            };
            match self.cycle(current).await {
                Next::Go(s) => session = Some(s),
                Next::Reconnect => {}
                Next::End => return,
            }
        }
    }

    /// Ends the stream with `e` as its last item.
    async fn end(&self, e: MailError) -> Next {
        let _ = self.tx.send(Err(e)).await;
        Next::End
    }

    /// The connector or connection changed but can still be used: reconnect with it.
    fn changed(&self) -> Next {
        tracing::info!(connector = %self.guard.target().connector.id, "the connection changed; WatchMail reconnects with it");
        Next::Reconnect
    }

    /// Ends the stream because its guard refused it: what is still queued is not delivered.
    async fn revoke(&self, e: MailError) -> Next {
        self.revoked.store(true, Ordering::Release);
        self.end(e).await
    }

    /// [`Guard::recheck`]: Go(s) when nothing changed, Reconnect when the connection changed
    /// but is usable, End (after sending why) when the stream may no longer run.
    async fn guarded(&mut self, s: Session) -> Next {
        match self.guard.recheck(self.mail.registry()).await {
            Ok(false) => Next::Go(s),
            Ok(true) => self.changed(),
            Err(e) => self.revoke(e).await,
        }
    }

    /// Waits `backoff`, then opens a new session with fresh credentials.
    async fn reconnect(&mut self, backoff: &mut Duration) -> Next {
        tokio::select! {
            _ = self.tx.closed() => return Next::End,
            _ = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(BACKOFF_MAX);
        if let Err(e) = self.guard.check(self.mail.registry()).await {
            return self.revoke(e).await;
        }
        let (mail, target, query) = (&self.mail, self.guard.target(), &self.query);
        let opened = async {
            let account = mail.account(target).await?;
            let opened =
                Session::open(&account, &query.mailbox, false, mail.timeout(), mail.caps()).await;
            mail.on_auth_refused(target, &account, opened).await
        }
        .await;
        let connector = target.connector.id.clone();
        match opened {
            Ok(s) => {
                tracing::info!(connector = %connector, "WatchMail reconnected");
                *backoff = BACKOFF_MIN;
                let new_account = self.guard.take_new_account();
                if new_account || s.opened.uid_validity != self.state.uid_validity {
                    // Another account, or the server renumbered the mailbox: old UIDs mean
                    // nothing now.
                    tracing::warn!(connector = %connector, new_account, "UIDVALIDITY or account changed; resuming from the newest message");
                    self.state.uid_validity = s.opened.uid_validity;
                    self.state.last_uid = s.opened.uid_next.saturating_sub(1);
                }
                Next::Go(s)
            }
            Err(e) if is_final(&e) => self.end(e).await,
            Err(e) => {
                tracing::info!(connector = %connector, error = %e, retry_in_ms = backoff.as_millis() as u64, "WatchMail cannot reconnect yet");
                Next::Reconnect
            }
        }
    }

    /// Delivers what is new, then idles until the server says something changed.
    async fn cycle(&mut self, mut s: Session) -> Next {
        loop {
            s = match self.deliver(s).await {
                Ok(Next::Go(s)) => s,
                Ok(next) => return next,
                Err(e) => return self.lost(e),
            };
            // A message that arrived while we searched was announced during that command:
            // look again rather than idle past it.
            let mut announced = false;
            while let Ok(r) = s.inner.unsolicited_responses.try_recv() {
                announced |= matches!(
                    r,
                    UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_)
                );
            }
            if announced {
                continue;
            }
            s = match self.idle(s).await {
                Ok(Next::Go(s)) => s,
                Ok(next) => return next,
                Err(e) => return self.lost(e),
            };
        }
    }

    fn lost(&self, e: MailError) -> Next {
        tracing::info!(connector = %self.guard.target().connector.id, error = %e, "WatchMail lost the IMAP connection; reconnecting");
        Next::Reconnect
    }

    /// Sends every message after the last UID delivered, in batches within the caps, each
    /// after the guard allowed it. Err: the connection was lost.
    async fn deliver(&mut self, mut s: Session) -> Result<Next, MailError> {
        let timeout = self.mail.timeout();
        let server = s.opened.server.clone();
        let search = format!("UID {}:*", self.state.last_uid.saturating_add(1));
        let uids = tokio::time::timeout(timeout, s.search(&search))
            .await
            .map_err(|_| timed_out(&server, "search"))??;
        let new: Vec<u32> = uids
            .into_iter()
            .filter(|u| *u > self.state.last_uid)
            .collect();
        for batch in new.chunks(BATCH) {
            let mut budget = Budget::new(s.opened.caps);
            let fetched = tokio::time::timeout(
                timeout,
                s.fetch(batch, self.query.include_html, false, &mut budget),
            )
            .await
            .map_err(|_| timed_out(&server, "fetch"))??;
            for (message, _) in fetched {
                s = match self.guarded(s).await {
                    Next::Go(s) => s,
                    next => return Ok(next),
                };
                let uid = message.uid;
                let event = WatchEvent {
                    message,
                    uid_validity: self.state.uid_validity,
                };
                if self.tx.send(Ok(event)).await.is_err() {
                    return Ok(Next::End);
                }
                self.state.last_uid = self.state.last_uid.max(uid);
            }
            if budget.reached {
                // The rest of the batch did not fit: search again from the last delivered.
                return Ok(Next::Go(s));
            }
        }
        Ok(self.guarded(s).await)
    }

    /// Idles until the server announces something, IDLE is due to be renewed, or the guard
    /// says the stream must end or reconnect. Err: the connection was lost.
    async fn idle(&mut self, s: Session) -> Result<Next, MailError> {
        let timeout = self.mail.timeout();
        s.allow_command();
        let Session { inner, opened } = s;
        let server = &opened.server;
        let mut idle = inner.idle();
        tokio::time::timeout(timeout, idle.init())
            .await
            .map_err(|_| idle_err(server, "IDLE timed out"))?
            .map_err(|e| idle_err(server, &format!("IDLE refused: {e}")))?;
        let woke = {
            let (wait, _stop) = idle.wait_with_timeout(IDLE_REFRESH);
            tokio::pin!(wait);
            let registry = self.mail.registry();
            loop {
                tokio::select! {
                    _ = self.tx.closed() => return Ok(Next::End),
                    r = &mut wait => break r,
                    _ = self.guard.changed(registry) => {}
                };
                match self.guard.check(registry).await {
                    Ok(false) => continue,
                    Ok(true) => return Ok(self.changed()),
                    Err(e) => return Ok(self.revoke(e).await),
                }
            }
        };
        match woke {
            Ok(IdleResponse::NewData(_)) | Ok(IdleResponse::Timeout) => {}
            // The stream ended: the server closed the connection.
            Ok(IdleResponse::ManualInterrupt) => {
                return Err(idle_err(server, "the server closed the connection"));
            }
            Err(e) => return Err(idle_err(server, &format!("connection lost: {e}"))),
        }
        let inner = tokio::time::timeout(timeout, idle.done())
            .await
            .map_err(|_| idle_err(server, "ending IDLE timed out"))?
            .map_err(|e| idle_err(server, &format!("ending IDLE failed: {e}")))?;
        Ok(Next::Go(Session { inner, opened }))
    }
}

fn timed_out(server: &str, what: &str) -> MailError {
    MailError::upstream(
        super::Service::Imap,
        server,
        crate::model::Stage::Timeout,
        format!("{what} timed out"),
    )
}

fn idle_err(server: &str, message: &str) -> MailError {
    MailError::upstream(
        super::Service::Imap,
        server,
        crate::model::Stage::Protocol,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(uid: u32) -> Result<WatchEvent, MailError> {
        let message = MailMessage {
            uid,
            ..MailMessage::default()
        };
        Ok(WatchEvent {
            message,
            uid_validity: 1,
        })
    }

    #[tokio::test]
    async fn after_a_revocation_the_queued_messages_give_way_to_the_error() {
        let (tx, rx) = mpsc::channel(16);
        let revoked = Arc::new(AtomicBool::new(false));
        let mut watcher = Watcher {
            rx,
            revoked: revoked.clone(),
        };
        tx.send(event(1)).await.unwrap();
        assert_eq!(watcher.next().await.unwrap().unwrap().message.uid, 1);
        tx.send(event(2)).await.unwrap();
        tx.send(event(3)).await.unwrap();
        revoked.store(true, Ordering::Release);
        tx.send(Err(MailError::Denied("gone".into())))
            .await
            .unwrap();
        drop(tx);
        assert!(matches!(
            watcher.next().await,
            Some(Err(MailError::Denied(_)))
        ));
        assert!(watcher.next().await.is_none());
    }
}
