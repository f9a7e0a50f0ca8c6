//! The upstream connection caps: a permit per connection, overall and per caller, taken
//! before the socket is opened and given back when dropped. Invariant: a refusal takes nothing
//! (an overall permit taken before a per-caller refusal is dropped with it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::UpstreamError;

/// The upstream connection caps.
#[derive(Debug)]
pub(super) struct Caps {
    overall: Arc<Semaphore>,
    overall_max: usize,
    per_caller_max: usize,
    pub(super) per_caller: Mutex<HashMap<String, usize>>,
}

/// The right to hold one upstream connection; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    _overall: OwnedSemaphorePermit,
    caller: Option<(Arc<Caps>, String)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((caps, caller)) = &self.caller {
            let mut map = caps.per_caller.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(caller) {
                *n -= 1;
                if *n == 0 {
                    map.remove(caller);
                }
            }
        }
    }
}

impl Caps {
    pub(super) fn new(overall: usize, per_caller: usize) -> Caps {
        let overall = overall.max(1);
        Caps {
            overall: Arc::new(Semaphore::new(overall)),
            overall_max: overall,
            per_caller_max: per_caller.max(1),
            per_caller: Mutex::default(),
        }
    }

    pub(super) fn take(self: &Arc<Self>, caller: Option<String>) -> Result<Permit, UpstreamError> {
        let overall =
            self.overall
                .clone()
                .try_acquire_owned()
                .map_err(|_| UpstreamError::Busy {
                    scope: "for the whole broker".into(),
                    limit: self.overall_max,
                })?;
        let caller = match caller {
            None => None,
            Some(id) => {
                let mut map = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
                let n = map.entry(id.clone()).or_default();
                if *n >= self.per_caller_max {
                    return Err(UpstreamError::Busy {
                        scope: format!("for caller {id}"),
                        limit: self.per_caller_max,
                    });
                }
                *n += 1;
                Some((self.clone(), id))
            }
        };
        Ok(Permit {
            _overall: overall,
            caller,
        })
    }
}
