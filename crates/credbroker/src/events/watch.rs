//! WatchEvents: one task per stream that sends every event after the cursor it was given
//! (the backlog, from the store), then each new one as it is committed.
//!
//! Invariants: the task reads the journal at its consumer's pace through a bounded channel, so
//! a slow consumer holds nothing but its own place (no event is buffered for it in memory, and
//! nobody else waits on it); one that falls behind retention gets [`EventsError::Pruned`] and
//! the stream ends, never a silent gap. Streams are counted: past `[events] max_streams` a new
//! one is refused. The task ends when the receiver is dropped.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{Event, EventKind, Events, EventsError};

/// Events sent to a stream ahead of its consumer.
const CHANNEL: usize = 32;
/// Events read from the store per step.
const BATCH: usize = 128;

/// What a stream asks for.
#[derive(Debug, Clone, Default)]
pub struct WatchQuery {
    /// Events after this cursor (0: every retained event).
    pub after: u64,
    /// Only these kinds (empty: all).
    pub kinds: BTreeSet<EventKind>,
    /// Only this workspace's events (None: every workspace).
    pub workspace: Option<String>,
    /// End once the events committed when the stream opened are sent.
    pub backlog_only: bool,
}

impl WatchQuery {
    fn wants(&self, event: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&event.kind))
            && self
                .workspace
                .as_ref()
                .is_none_or(|w| *w == event.workspace)
    }
}

/// The receiving end of a stream.
pub struct Watch {
    rx: mpsc::Receiver<Result<Event, EventsError>>,
}

impl Watch {
    /// The next event; None once the stream is over.
    pub async fn next(&mut self) -> Option<Result<Event, EventsError>> {
        self.rx.recv().await
    }
}

impl Events {
    /// Opens a stream of the events `query` asks for.
    pub async fn watch(self: &Arc<Self>, query: WatchQuery) -> Result<Watch, EventsError> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            EventsError::TooManyStreams(*self.max_streams.read().unwrap_or_else(|p| p.into_inner()))
        })?;
        // Subscribed before the backlog is read: nothing committed after it is missed.
        let news = self.announcements();
        let until = match query.backlog_only {
            true => Some(self.head().await?),
            false => None,
        };
        self.check_retained(query.after).await?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let events = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = events.feed(query, until, news, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Watch { rx })
    }

    /// Fails if events after `after` were pruned (the oldest kept is past `after + 1`).
    async fn check_retained(&self, after: u64) -> Result<(), EventsError> {
        if after == 0 {
            return Ok(());
        }
        match self.after(0, 1).await?.first() {
            Some(oldest) if oldest.cursor > after + 1 => Err(EventsError::Pruned {
                after,
                oldest: oldest.cursor,
            }),
            _ => Ok(()),
        }
    }

    /// Sends the stream's events until its consumer goes (Ok) or a read fails (Err).
    async fn feed(
        &self,
        query: WatchQuery,
        until: Option<u64>,
        mut news: super::News,
        tx: &mpsc::Sender<Result<Event, EventsError>>,
    ) -> Result<(), EventsError> {
        let mut cursor = query.after;
        loop {
            if until.is_some_and(|u| cursor >= u) {
                return Ok(());
            }
            let batch = self.after(cursor, BATCH).await?;
            if batch.is_empty() {
                tokio::select! {
                    changed = news.changed() => if !changed { return Ok(()) },
                    () = tx.closed() => return Ok(()),
                }
                continue;
            }
            for event in batch {
                if cursor != 0 && event.cursor != cursor + 1 {
                    // Retention overtook this stream between two reads.
                    return Err(EventsError::Pruned {
                        after: cursor,
                        oldest: event.cursor,
                    });
                }
                cursor = event.cursor;
                if until.is_some_and(|u| cursor > u) {
                    return Ok(());
                }
                if query.wants(&event) && tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}
