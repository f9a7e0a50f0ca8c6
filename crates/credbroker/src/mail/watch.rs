//! WatchMail: one task per stream that delivers every message after the last UID delivered,
//! then waits in IMAP IDLE. When the server drops the connection it reconnects with
//! exponential backoff and resumes after the last UID delivered; it ends when the receiver is
//! dropped (the client went away) or when the connection can no longer be used (credentials
//! refused, disconnected, mailbox gone), after sending that error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use async_imap::types::UnsolicitedResponse;
use tokio::sync::mpsc;

use super::imap::{Session, mailbox_name};
use super::message::MailMessage;
use super::{Mail, MailError};
use crate::model::{FieldError, Target};

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

pub type Watcher = mpsc::Receiver<Result<WatchEvent, MailError>>;

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
    target: Target,
    query: WatchQuery,
    first: Session,
    slot: Slot,
) -> Watcher {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let _slot = slot;
        run(&mail, &target, &query, first, &tx).await;
        tracing::debug!(connector = %target.connector.id, "WatchMail stream ended");
    });
    rx
}

/// Errors after which retrying cannot help.
fn is_final(e: &MailError) -> bool {
    !matches!(e, MailError::Upstream { .. })
}

struct State {
    last_uid: u32,
    uid_validity: u32,
}

async fn run(
    mail: &Arc<Mail>,
    target: &Target,
    query: &WatchQuery,
    first: Session,
    tx: &mpsc::Sender<Result<WatchEvent, MailError>>,
) {
    let mut state = State {
        last_uid: if query.since_uid > 0 {
            query.since_uid
        } else {
            first.uid_next.saturating_sub(1)
        },
        uid_validity: first.uid_validity,
    };
    let mut session = Some(first);
    let mut backoff = BACKOFF_MIN;
    loop {
        let current = match session.take() {
            Some(s) => s,
            None => {
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                let opened = async {
                    let account = mail.account(target).await?;
                    let opened =
                        Session::open(&account, &query.mailbox, false, mail.timeout()).await;
                    mail.on_auth_refused(target, &account, opened).await
                }
                .await;
                match opened {
                    Ok(s) => {
                        tracing::info!(connector = %target.connector.id, "WatchMail reconnected");
                        backoff = BACKOFF_MIN;
                        if s.uid_validity != state.uid_validity {
                            // The server renumbered the mailbox: old UIDs mean nothing now.
                            tracing::warn!(
                                connector = %target.connector.id,
                                "UIDVALIDITY changed; resuming from the newest message"
                            );
                            state.uid_validity = s.uid_validity;
                            state.last_uid = s.uid_next.saturating_sub(1);
                        }
                        s
                    }
                    Err(e) if is_final(&e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    Err(e) => {
                        tracing::info!(connector = %target.connector.id, error = %e, retry_in_ms = backoff.as_millis() as u64, "WatchMail cannot reconnect yet");
                        continue;
                    }
                }
            }
        };
        match cycle(mail, current, &mut state, query, tx).await {
            Ok(Some(s)) => session = Some(s),
            Ok(None) => return,
            Err(e) => {
                tracing::info!(connector = %target.connector.id, error = %e, "WatchMail lost the IMAP connection; reconnecting");
            }
        }
    }
}

/// Delivers what is new, then idles until the server says something changed. Ok(None): the
/// client went away.
async fn cycle(
    mail: &Mail,
    mut s: Session,
    state: &mut State,
    query: &WatchQuery,
    tx: &mpsc::Sender<Result<WatchEvent, MailError>>,
) -> Result<Option<Session>, MailError> {
    let timeout = mail.timeout();
    loop {
        let server = s.server.clone();
        let bounded = |what: &'static str| {
            let server = server.clone();
            move |_| {
                MailError::upstream(
                    super::Service::Imap,
                    &server,
                    crate::model::Stage::Timeout,
                    format!("{what} timed out"),
                )
            }
        };
        let uids = tokio::time::timeout(
            timeout,
            s.search(&format!("UID {}:*", state.last_uid.saturating_add(1))),
        )
        .await
        .map_err(bounded("search"))??;
        let new: Vec<u32> = uids.into_iter().filter(|u| *u > state.last_uid).collect();
        for batch in new.chunks(BATCH) {
            let fetched = tokio::time::timeout(timeout, s.fetch(batch, query.include_html, false))
                .await
                .map_err(bounded("fetch"))??;
            for (message, _) in fetched {
                let uid = message.uid;
                let event = WatchEvent {
                    message,
                    uid_validity: state.uid_validity,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(None);
                }
                state.last_uid = state.last_uid.max(uid);
            }
        }
        // A message that arrived while we searched was announced during that command: look
        // again rather than idle past it.
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

        let Session {
            inner,
            mailbox,
            uid_validity,
            uid_next,
            server,
        } = s;
        let mut idle = inner.idle();
        tokio::time::timeout(timeout, idle.init())
            .await
            .map_err(|_| idle_err(&server, "IDLE timed out"))?
            .map_err(|e| idle_err(&server, &format!("IDLE refused: {e}")))?;
        let woke = {
            let (wait, _stop) = idle.wait_with_timeout(IDLE_REFRESH);
            tokio::select! {
                _ = tx.closed() => return Ok(None),
                r = wait => r,
            }
        };
        match woke {
            Ok(IdleResponse::NewData(_)) | Ok(IdleResponse::Timeout) => {}
            // The stream ended: the server closed the connection.
            Ok(IdleResponse::ManualInterrupt) => {
                return Err(idle_err(&server, "the server closed the connection"));
            }
            Err(e) => return Err(idle_err(&server, &format!("connection lost: {e}"))),
        }
        let inner = tokio::time::timeout(timeout, idle.done())
            .await
            .map_err(|_| idle_err(&server, "ending IDLE timed out"))?
            .map_err(|e| idle_err(&server, &format!("ending IDLE failed: {e}")))?;
        s = Session {
            inner,
            mailbox,
            uid_validity,
            uid_next,
            server,
        };
    }
}

fn idle_err(server: &str, message: &str) -> MailError {
    MailError::upstream(
        super::Service::Imap,
        server,
        crate::model::Stage::Protocol,
        message,
    )
}
