//! Refusals of callers nobody has authenticated (TLS handshakes that fail, OAuth callbacks with
//! a state that is not ours), audited without letting a flood turn into one durable write each.
//!
//! Invariants, per window (`WINDOW`):
//! - the first refusal of each (operation, source address, reason) is audited as it happens, up
//!   to `MAX_SOURCES` such keys; every later one is only counted;
//! - at the end of the window each source with counted refusals gets one summary record
//!   ("N more refused…"), and the sources past `MAX_SOURCES` one record together;
//! - memory is bounded by `MAX_SOURCES` entries whatever the sources send.
//!
//! So a flood writes at most about `2 × MAX_SOURCES + 1` records a window. Summaries not yet
//! written when the process stops are lost: these are not acknowledged writes of anyone's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit::{AuditEvent, AuditLog, Outcome};

/// How often counted refusals are summarised.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked one by one in a window.
const MAX_SOURCES: usize = 1_000;

#[derive(Default)]
struct Window {
    /// (operation, source, reason) → refusals counted after the first.
    counted: HashMap<(&'static str, IpAddr, String), u64>,
    /// Refusals of sources past `MAX_SOURCES`, per operation.
    overflow: HashMap<&'static str, u64>,
}

impl Window {
    /// True if this refusal is the first of its (operation, source, reason) in the window.
    fn count(&mut self, operation: &'static str, source: IpAddr, reason: &str) -> bool {
        let key = (operation, source, reason.to_string());
        if let Some(n) = self.counted.get_mut(&key) {
            *n += 1;
            return false;
        }
        if self.counted.len() < MAX_SOURCES {
            self.counted.insert(key, 0);
            return true;
        }
        *self.overflow.entry(operation).or_default() += 1;
        false
    }
}

pub struct Refusals {
    audit: Arc<AuditLog>,
    window: Mutex<Window>,
}

impl Refusals {
    /// Starts the summarising task (it lives as long as the returned handle's last clone).
    pub fn start(audit: Arc<AuditLog>) -> Arc<Self> {
        let refusals = Arc::new(Self {
            audit,
            window: Mutex::default(),
        });
        let weak = Arc::downgrade(&refusals);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WINDOW);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(refusals) = weak.upgrade() else {
                    return;
                };
                refusals.summarise().await;
            }
        });
        refusals
    }

    /// Notes one refusal; audits it now if it is the first of its kind from `source` this window.
    pub async fn refuse(&self, operation: &'static str, source: IpAddr, reason: String) {
        let first = self
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count(operation, source, &reason);
        if !first {
            return;
        }
        let event = refused(operation, &source.to_string(), reason);
        if let Err(e) = self.audit.record(event).await {
            tracing::warn!(error = %e, operation, "audit of an unauthenticated refusal failed");
        }
    }

    /// Writes the window's summaries and starts a new window.
    pub async fn summarise(&self) {
        let window = std::mem::take(&mut *self.window.lock().unwrap_or_else(|p| p.into_inner()));
        let minutes = WINDOW.as_secs() / 60;
        let per_source = window.counted.into_iter().filter(|(_, n)| *n > 0);
        let events = per_source
            .map(|((operation, source, reason), n)| {
                let why = format!("{n} more refused in the last {minutes} min: {reason}");
                refused(operation, &source.to_string(), why)
            })
            .chain(window.overflow.into_iter().map(|(operation, n)| {
                let why = format!(
                    "{n} refused in the last {minutes} min from sources past the first {MAX_SOURCES}"
                );
                refused(operation, "(many sources)", why)
            }));
        for event in events {
            if let Err(e) = self.audit.record(event).await {
                tracing::warn!(error = %e, "audit of refusal summaries failed");
                return;
            }
        }
    }
}

fn refused(operation: &'static str, source: &str, reason: String) -> AuditEvent {
    AuditEvent {
        caller: format!("unauthenticated {source}"),
        operation: operation.into(),
        outcome: Some(Outcome::Denied),
        reason,
        ..AuditEvent::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_of_each_kind_is_written_the_rest_counted_and_memory_bounded() {
        let mut window = Window::default();
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(window.count("TlsHandshake", one, "no client certificate"));
        assert!(!window.count("TlsHandshake", one, "no client certificate"));
        assert!(window.count("TlsHandshake", one, "certificate expired"));
        assert!(window.count("OAuthCallback", one, "unknown state"));
        for i in 0..(2 * MAX_SOURCES as u32) {
            let source = IpAddr::from(std::net::Ipv4Addr::from(0x0A00_0000 + i));
            window.count("TlsHandshake", source, "no client certificate");
        }
        assert_eq!(window.counted.len(), MAX_SOURCES);
        assert_eq!(
            window.counted[&("TlsHandshake", one, "no client certificate".into())],
            1
        );
        assert_eq!(window.overflow["TlsHandshake"], MAX_SOURCES as u64 + 3);
    }
}
