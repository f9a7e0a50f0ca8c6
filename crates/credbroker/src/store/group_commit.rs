//! Group commit: one thread owns the backend's sync. Every writer, after applying its batch,
//! queues a waiter; the thread takes every waiter queued so far, syncs once, and wakes them all.
//!
//! This replaces sled 0.34's `flush_async`, which deadlocks when called from concurrent tasks
//! (sled issue #1308). A waiter queued after its write was applied is covered by the next sync,
//! because that sync starts after the waiter is dequeued.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{Backend, StoreError};

type Waiter = oneshot::Sender<Result<(), Arc<str>>>;

pub struct GroupCommit {
    queue: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for GroupCommit {
    /// Stops the thread and waits for it, so that the backend (and sled's lock on its folder)
    /// is released when the store is dropped, not some time later.
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl GroupCommit {
    pub fn start(backend: Arc<dyn Backend>) -> Self {
        let (queue, waiters) = mpsc::channel::<Waiter>();
        let thread = std::thread::Builder::new()
            .name("credbroker-commit".into())
            .spawn(move || {
                // Ends when every Store handle (and so every sender) is gone.
                while let Ok(first) = waiters.recv() {
                    let mut group = vec![first];
                    group.extend(waiters.try_iter());
                    let started = std::time::Instant::now();
                    let outcome = super::wait_inline(backend.sync())
                        .map_err(|e| Arc::<str>::from(e.to_string()));
                    crate::metrics::store_sync(group.len(), started.elapsed());
                    for waiter in group {
                        let _ = waiter.send(outcome.clone());
                    }
                }
            })
            .expect("spawn commit thread");
        Self {
            queue: Some(queue),
            thread: Some(thread),
        }
    }

    fn enqueue(&self) -> Result<oneshot::Receiver<Result<(), Arc<str>>>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .as_ref()
            .ok_or_else(|| StoreError::Sync("commit thread stopped".into()))?
            .send(tx)
            .map_err(|_| StoreError::Sync("commit thread stopped".into()))?;
        Ok(rx)
    }

    pub async fn wait(&self) -> Result<(), StoreError> {
        let rx = self.enqueue()?;
        rx.await
            .map_err(|_| StoreError::Sync("commit thread stopped".into()))?
            .map_err(|e| StoreError::Sync(e.to_string()))
    }
}
