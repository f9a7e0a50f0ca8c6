//! Request budgets: token buckets keyed by caller identity, and by (caller, user) once the user a
//! call acts for is known. An agent runtime is one caller acting for a whole platform's users,
//! so its own budget is large (a flood guard), while each user it acts for gets a fair share
//! (one user's runaway agent cannot starve the others). A refused call gets RESOURCE_EXHAUSTED,
//! with the time after which a retry will pass, before any work is done.
//!
//! Invariants: a bucket never holds more than its burst; a rate of 0 turns that budget off; at
//! most [`MAX_KEYS`] buckets are kept, full (idle) ones dropped first, so memory is bounded
//! whatever the callers send.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most per budget; idle ones are dropped first (a full bucket carries no state).
const MAX_KEYS: usize = 10_000;

struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// One budget: `per_second` tokens a second, up to `burst` saved, per key.
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A refusal: the budget that ran out and how long until one request fits again.
#[derive(Debug, Clone, PartialEq)]
pub struct Exhausted {
    pub per_second: f64,
    pub retry_after: Duration,
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

    /// Takes one token from `key`'s bucket, or says when one will be there.
    pub fn allow(&self, key: &str) -> Result<(), Exhausted> {
        self.allow_at(key, Instant::now())
    }

    pub(crate) fn allow_at(&self, key: &str, now: Instant) -> Result<(), Exhausted> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let (rate, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * rate < burst
            });
        }
        // Looked up by reference first: a known key (every call but its first) allocates nothing.
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_string(),
                Bucket {
                    tokens: self.burst,
                    updated: now,
                },
            );
        }
        let Some(bucket) = buckets.get_mut(key) else {
            return Ok(());
        };
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) / self.per_second;
        Err(Exhausted {
            per_second: self.per_second,
            retry_after: Duration::from_secs_f64(wait).max(Duration::from_millis(1)),
        })
    }
}

/// The two budgets a call spends from: its caller's, then (caller, user)'s.
pub struct Budgets {
    caller: RateLimiter,
    user: RateLimiter,
}

impl Budgets {
    pub fn new(caller: RateLimiter, user: RateLimiter) -> Self {
        Self { caller, user }
    }

    /// Spent when a call arrives, before its request is looked at.
    pub fn caller(&self, caller: &str) -> Result<(), Exhausted> {
        self.caller.allow(caller)
    }

    /// Spent once the call's user is known (an empty user is a shared connection's).
    pub fn user(&self, caller: &str, user: &str) -> Result<(), Exhausted> {
        if self.user.per_second <= 0.0 {
            return Ok(());
        }
        // The key is built in a buffer kept per thread, so a known (caller, user) allocates
        // nothing, as a known caller does not.
        thread_local! {
            static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        KEY.with_borrow_mut(|key| {
            key.clear();
            key.push_str(caller);
            key.push('\0');
            key.push_str(user);
            self.user.allow(key)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let limiter = RateLimiter::new(10.0, 5.0);
        let t0 = Instant::now();
        assert!((0..5).all(|_| limiter.allow_at("a", t0).is_ok()));
        let refused = limiter.allow_at("a", t0).unwrap_err();
        assert_eq!(refused.per_second, 10.0);
        // One token at 10/s is a tenth of a second away.
        assert!(
            refused.retry_after > Duration::from_millis(90)
                && refused.retry_after <= Duration::from_millis(100),
            "{refused:?}"
        );
        // Another key has its own bucket.
        assert!(limiter.allow_at("b", t0).is_ok());
        // A tenth of a second refills one token at 10/s.
        assert!(
            limiter
                .allow_at("a", t0 + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            limiter
                .allow_at("a", t0 + Duration::from_millis(100))
                .is_err()
        );
        assert!(RateLimiter::new(0.0, 0.0).allow_at("a", t0).is_ok());
    }

    #[test]
    fn one_user_runs_out_while_the_callers_other_users_go_on() {
        let budgets = Budgets::new(RateLimiter::new(1000.0, 1000.0), RateLimiter::new(1.0, 3.0));
        assert!((0..3).all(|_| budgets.user("runtime", "alice").is_ok()));
        assert!(budgets.user("runtime", "alice").is_err());
        assert!(budgets.user("runtime", "bob").is_ok());
        assert!(budgets.user("other-runtime", "alice").is_ok());
        assert!(budgets.caller("runtime").is_ok());
    }

    /// The defaults fit an agent runtime: one caller acting for 80 users at 5,000 calls/s for a
    /// minute (62 a second per user) is never refused. (The defaults before, 2,000/s per caller,
    /// refused it within two seconds.)
    #[test]
    fn the_default_budgets_admit_one_runtime_acting_for_many_users() {
        let limits = crate::config::Limits::default();
        let caller = RateLimiter::new(limits.caller_rate_per_sec, limits.caller_burst);
        let user = RateLimiter::new(limits.user_rate_per_sec, limits.user_burst);
        let t0 = Instant::now();
        let refused = (0..5_000 * 60u64)
            .filter(|call| {
                let at = t0 + Duration::from_micros(call * 200);
                let key = format!("runtime\0user-{}", call % 80);
                caller.allow_at("runtime", at).is_err() || user.allow_at(&key, at).is_err()
            })
            .count();
        assert_eq!(refused, 0);
    }

    #[test]
    fn memory_stays_bounded_under_many_keys() {
        let limiter = RateLimiter::new(1.0, 1.0);
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS * 2) {
            let _ = limiter.allow_at(&format!("k{i}"), t0 + Duration::from_secs(i as u64));
        }
        assert!(limiter.buckets.lock().unwrap().len() <= MAX_KEYS + 1);
    }
}
