//! Group commit, leader–follower: a caller whose record finds no batch being written writes
//! the batch itself, on its own thread — one `write` and one `fdatasync`, no hop to a writer
//! thread and back. Records that arrive meanwhile wait and go in the next batch; if work is
//! left when a leader's batch is durable, leadership passes to a standby thread, so no caller's
//! reply waits behind a batch after its own.
//!
//! Invariants:
//! - at most one leader at a time ([`Queue::leading`]), and only the leader touches the
//!   appender; a record is acknowledged only after the batch holding it was appended (its
//!   `fdatasync` returned), and a failed batch fails every record it holds;
//! - queued records are never left without a leader: a leader steps down only under the queue's
//!   lock with the queue empty, else hands over to the standby thread, which leads until the
//!   queue is empty;
//! - the leader's section has no await point, so a cancelled caller cannot drop leadership.

use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::log::Appender;
use super::{AuditError, AuditEvent, AuditHead};
use crate::store::Store;

/// Most records one batch carries.
const MAX_BATCH: usize = 4096;

/// Where a record's sequence number (or the reason it was not written) is sent.
pub(crate) type Reply = oneshot::Sender<Result<u64, Arc<str>>>;

/// Records waiting for a batch, and who leads.
#[derive(Default)]
struct Queue {
    events: Vec<AuditEvent>,
    replies: Vec<Reply>,
    /// A batch is being written (by a caller or the standby thread).
    leading: bool,
    /// The standby thread is asked to take over as leader.
    handoff: bool,
    /// The log is being dropped: no new records; the standby thread ends once idle.
    closed: bool,
}

/// The leader's state: the appender and the batch being written (buffers reused).
struct Writing {
    appender: Appender,
    events: Vec<AuditEvent>,
    replies: Vec<Reply>,
    /// The head when maintenance was last nudged (a checkpoint is due every N records).
    nudged_at: u64,
}

pub(crate) struct GroupCommit {
    queue: Mutex<Queue>,
    standby: Condvar,
    writing: Mutex<Writing>,
    store: Arc<Store>,
    head: Arc<Mutex<AuditHead>>,
    nudge: SyncSender<()>,
    checkpoint_records: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupCommit {
    /// Takes over `appender` and starts the standby thread; `nudge` wakes maintenance after a
    /// roll or every `checkpoint_records` records.
    pub fn start(
        store: Arc<Store>,
        appender: Appender,
        head: Arc<Mutex<AuditHead>>,
        nudge: SyncSender<()>,
        checkpoint_records: u64,
    ) -> Result<Arc<Self>, AuditError> {
        let nudged_at = appender.tail.seq;
        let commit = Arc::new(GroupCommit {
            queue: Mutex::new(Queue::default()),
            standby: Condvar::new(),
            writing: Mutex::new(Writing {
                appender,
                events: Vec::with_capacity(MAX_BATCH),
                replies: Vec::with_capacity(MAX_BATCH),
                nudged_at,
            }),
            store,
            head,
            nudge,
            checkpoint_records,
        });
        let standby = commit.clone();
        std::thread::Builder::new()
            .name("credbroker-audit".into())
            .spawn(move || standby.run_standby())
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(commit)
    }

    /// Queues `event`, writing its batch on this thread if no batch is being written; the
    /// receiver gets its sequence number once it is durable.
    pub fn submit(
        &self,
        event: AuditEvent,
    ) -> Result<oneshot::Receiver<Result<u64, Arc<str>>>, AuditError> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut queue = lock(&self.queue);
            if queue.closed {
                return Err(AuditError::Stopped);
            }
            queue.events.push(event);
            queue.replies.push(tx);
            !std::mem::replace(&mut queue.leading, true)
        };
        if lead {
            self.lead_one();
        }
        Ok(rx)
    }

    /// How many records wait for a batch.
    pub fn depth(&self) -> usize {
        lock(&self.queue).events.len()
    }

    /// Stops taking records; the standby thread ends once what is queued is written.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.standby.notify_one();
    }

    /// A caller's lead: one batch (holding its own record), then step down or hand over.
    fn lead_one(&self) {
        let mut writing = lock(&self.writing);
        if self.take(&mut writing) {
            self.write(&mut writing);
        }
        let mut queue = lock(&self.queue);
        if queue.events.is_empty() {
            queue.leading = false;
        } else {
            queue.handoff = true;
            self.standby.notify_one();
        }
    }

    /// The standby thread: leads whenever handed over to, until the queue is empty.
    fn run_standby(&self) {
        loop {
            {
                let mut queue = lock(&self.queue);
                while !queue.handoff && !queue.closed {
                    queue = self.standby.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
                if !queue.handoff {
                    return;
                }
                queue.handoff = false;
            }
            let mut writing = lock(&self.writing);
            while self.take(&mut writing) {
                self.write(&mut writing);
            }
        }
    }

    /// Moves up to [`MAX_BATCH`] queued records into the leader's batch; with none queued, the
    /// leader steps down (under the queue's lock) and this returns false.
    fn take(&self, writing: &mut Writing) -> bool {
        let mut queue = lock(&self.queue);
        if queue.events.is_empty() {
            queue.leading = false;
            return false;
        }
        if queue.events.len() <= MAX_BATCH {
            std::mem::swap(&mut queue.events, &mut writing.events);
            std::mem::swap(&mut queue.replies, &mut writing.replies);
        } else {
            writing.events.extend(queue.events.drain(..MAX_BATCH));
            writing.replies.extend(queue.replies.drain(..MAX_BATCH));
        }
        true
    }

    /// Appends the leader's batch durably and answers every record in it.
    fn write(&self, writing: &mut Writing) {
        let count = writing.events.len();
        let started = std::time::Instant::now();
        let appended = writing.appender.append(self.store.vault(), &writing.events);
        crate::metrics::audit_flush(count, started.elapsed());
        writing.events.clear();
        match appended {
            Ok(first) => {
                *lock(&self.head) = writing.appender.tail.head();
                for (i, reply) in writing.replies.drain(..).enumerate() {
                    let _ = reply.send(Ok(first + i as u64));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit write failed; failing the requests it covers");
                let why: Arc<str> = Arc::from(e.to_string());
                for reply in writing.replies.drain(..) {
                    let _ = reply.send(Err(why.clone()));
                }
            }
        }
        let rolled = std::mem::take(&mut writing.appender.rolled);
        let seq = writing.appender.tail.seq;
        if rolled || seq - writing.nudged_at >= self.checkpoint_records {
            writing.nudged_at = seq;
            let _ = self.nudge.try_send(());
        }
    }
}
