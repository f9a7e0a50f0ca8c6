//! Waiting for a condition: the one way a test waits for something to happen. It asks again
//! every [`POLL`] until the condition holds or the bound passes, so a test is as fast as the
//! system under test and never waits forever. (A test that needs time itself to pass, such as a
//! token's lifetime, sleeps instead: there is nothing to ask.)

#![allow(dead_code)]

use std::time::Duration;

/// How often a condition is asked again.
pub const POLL: Duration = Duration::from_millis(100);

/// Asks `probe` until it gives a value, at most for `within` (it is asked at least once, and once
/// more after the bound has passed). `None` when it never did: the caller says what failed.
pub async fn until<T>(within: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let past = tokio::time::Instant::now() >= deadline;
        if let Some(value) = probe().await {
            return Some(value);
        }
        if past {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}
