//! Who is calling and what they may do. The caller is named by its TLS client certificate
//! ([`identity`]); the policy, a TOML file, grants admin rights per workspace and data-plane
//! operations per workspace, connector-name pattern and end user. Anything not granted is denied.

mod identity;
mod rate;
mod rules;

pub use identity::{IdentityError, caller_from_cert};
pub use rate::{Budgets, Exhausted, RateLimiter};
pub use rules::{Operation, Policy, PolicyError};

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// The caller of one request, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    pub id: String,
}

/// The live policy, swapped whole on reload so a request sees one version throughout. Long
/// calls (WatchMail streams) [`PolicyHandle::subscribe`] to hear of each reload and check
/// their grant again.
pub struct PolicyHandle {
    path: Option<PathBuf>,
    current: RwLock<Arc<Policy>>,
    /// How many reloads took effect.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl PolicyHandle {
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let policy = Policy::load(path)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            current: RwLock::new(Arc::new(policy)),
            reloads: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn fixed(policy: Policy) -> Self {
        Self {
            path: None,
            current: RwLock::new(Arc::new(policy)),
            reloads: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Wakes on every reload that took effect (the value counts them).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the policy file. On error the old policy stays in force and the error says why.
    pub fn reload(&self) -> Result<(), PolicyError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let policy = Policy::load(path)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(policy);
        self.reloads.send_modify(|n| *n += 1);
        Ok(())
    }
}
