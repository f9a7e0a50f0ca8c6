//! Per-caller request rate: a token bucket per caller identity, so one runaway agent cannot
//! starve the others or fill the audit log. A refused call gets RESOURCE_EXHAUSTED before any
//! work is done.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Buckets kept at most; idle ones are dropped first (a full bucket carries no state).
const MAX_CALLERS: usize = 10_000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// `per_second` = 0 turns the limit off.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst: burst.max(1.0),
            buckets: Mutex::default(),
        }
    }

    /// Takes one token from `caller`'s bucket; false if it is empty.
    pub fn allow(&self, caller: &str) -> bool {
        self.allow_at(caller, Instant::now())
    }

    fn allow_at(&self, caller: &str, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        // Looked up by reference first: a known caller (every call but its first) allocates nothing.
        if !buckets.contains_key(caller) {
            buckets.insert(
                caller.to_string(),
                Bucket {
                    tokens: self.burst,
                    updated: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(caller) else {
            return true;
        };
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate_per_caller() {
        let limiter = RateLimiter::new(10.0, 5.0);
        let t0 = Instant::now();
        assert!((0..5).all(|_| limiter.allow_at("a", t0)));
        assert!(!limiter.allow_at("a", t0));
        // Another caller has its own bucket.
        assert!(limiter.allow_at("b", t0));
        // A tenth of a second refills one token at 10/s.
        assert!(limiter.allow_at("a", t0 + Duration::from_millis(100)));
        assert!(!limiter.allow_at("a", t0 + Duration::from_millis(100)));
        assert!(RateLimiter::new(0.0, 0.0).allow_at("a", t0));
    }
}
