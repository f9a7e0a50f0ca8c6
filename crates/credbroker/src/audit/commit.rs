//! Group commit: callers queue their records and wake the writer thread if it is idle; the
//! writer takes whatever queued while its previous sync ran, as one batch — one `write`, one
//! `fdatasync` — until the queue is empty, then sleeps.
//!
//! Callers never write a batch themselves: a caller that did (leader–follower, tried and
//! measured in BENCHMARKS.md) blocks a runtime worker for the whole sync, which stalls the
//! other calls queued on that worker; at a fixed rate it made the median 4–8 × slower, and at
//! one call in flight it saved nothing measurable.
//!
//! Invariants:
//! - only the writer thread touches the appender; a record is acknowledged only after the
//!   batch holding it was appended (its `fdatasync` returned), and a failed batch fails every
//!   record it holds;
//! - queued records are never left without the writer awake: it goes idle only under the
//!   queue's lock with the queue empty, and a caller that queues finds it awake or wakes it;
//! - a caller's part has no blocking step (a short lock), so no runtime worker waits on the disk.

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

/// Records waiting for a batch, and whether the writer is awake.
#[derive(Default)]
struct Queue {
    events: Vec<AuditEvent>,
    replies: Vec<Reply>,
    /// The writer is writing, or woken to: it takes what is queued without being woken again.
    awake: bool,
    /// The log is being dropped: no new records; the writer ends once idle.
    closed: bool,
}

/// The writer's own state: the appender and the batch being written (buffers reused).
struct Writing {
    appender: Appender,
    events: Vec<AuditEvent>,
    replies: Vec<Reply>,
    /// The head when maintenance was last nudged (a checkpoint is due every N records).
    nudged_at: u64,
}

/// The queue callers share with the writer thread.
pub(crate) struct GroupCommit {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// What the writer thread needs besides the queue.
struct Writer {
    commit: Arc<GroupCommit>,
    writing: Writing,
    store: Arc<Store>,
    head: Arc<Mutex<AuditHead>>,
    nudge: SyncSender<()>,
    checkpoint_records: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl GroupCommit {
    /// Starts the writer thread over `appender`; `nudge` wakes maintenance after a roll or
    /// every `checkpoint_records` records.
    pub fn start(
        store: Arc<Store>,
        appender: Appender,
        head: Arc<Mutex<AuditHead>>,
        nudge: SyncSender<()>,
        checkpoint_records: u64,
    ) -> Result<Arc<Self>, AuditError> {
        let commit = Arc::new(GroupCommit {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let writer = Writer {
            commit: commit.clone(),
            writing: Writing {
                nudged_at: appender.tail.seq,
                appender,
                events: Vec::with_capacity(MAX_BATCH),
                replies: Vec::with_capacity(MAX_BATCH),
            },
            store,
            head,
            nudge,
            checkpoint_records,
        };
        std::thread::Builder::new()
            .name("credbroker-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| AuditError::Write(format!("cannot start the audit writer: {e}")))?;
        Ok(commit)
    }

    /// Queues `event`, waking the writer if it is idle; the receiver gets its sequence number
    /// once it is durable.
    pub fn submit(
        &self,
        event: AuditEvent,
    ) -> Result<oneshot::Receiver<Result<u64, Arc<str>>>, AuditError> {
        let (tx, rx) = oneshot::channel();
        let wake = {
            let mut queue = lock(&self.queue);
            if queue.closed {
                return Err(AuditError::Stopped);
            }
            queue.events.push(event);
            queue.replies.push(tx);
            !std::mem::replace(&mut queue.awake, true)
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(rx)
    }

    /// How many records wait for a batch.
    pub fn depth(&self) -> usize {
        lock(&self.queue).events.len()
    }

    /// Stops taking records; the writer ends once what is queued is written.
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.wake.notify_one();
    }
}

impl Writer {
    /// Writes batches while records are queued; sleeps while none are; ends once closed.
    fn run(mut self) {
        loop {
            {
                let mut queue = lock(&self.commit.queue);
                while !queue.awake && !queue.closed {
                    queue = self
                        .commit
                        .wake
                        .wait(queue)
                        .unwrap_or_else(|p| p.into_inner());
                }
                if !queue.awake {
                    return;
                }
            }
            while self.take() {
                self.write();
            }
        }
    }

    /// Moves up to [`MAX_BATCH`] queued records into the batch; with none queued, the writer
    /// goes idle (under the queue's lock) and this returns false.
    fn take(&mut self) -> bool {
        let mut queue = lock(&self.commit.queue);
        if queue.events.is_empty() {
            queue.awake = false;
            return false;
        }
        let writing = &mut self.writing;
        if queue.events.len() <= MAX_BATCH {
            std::mem::swap(&mut queue.events, &mut writing.events);
            std::mem::swap(&mut queue.replies, &mut writing.replies);
        } else {
            writing.events.extend(queue.events.drain(..MAX_BATCH));
            writing.replies.extend(queue.replies.drain(..MAX_BATCH));
        }
        true
    }

    /// Appends the batch durably and answers every record in it.
    fn write(&mut self) {
        let writing = &mut self.writing;
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
