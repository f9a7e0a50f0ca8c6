//! The outcome of testing credentials (ConnectWithCredentials, TestConnection): one check per
//! thing tried, each saying where it failed in words a user can act on.

use serde::{Deserialize, Serialize};

/// Where a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Dns,
    Tcp,
    Tls,
    Auth,
    Protocol,
    Timeout,
    Config,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Dns => "dns",
            Stage::Tcp => "tcp",
            Stage::Tls => "tls",
            Stage::Auth => "auth",
            Stage::Protocol => "protocol",
            Stage::Timeout => "timeout",
            Stage::Config => "config",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked: "imap", "smtp", "caldav", "identity"…
    pub name: String,
    pub ok: bool,
    /// Set when the check failed.
    pub stage: Option<Stage>,
    /// Never contains a secret.
    pub message: String,
}

impl Check {
    pub fn passed(name: &str, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: true,
            stage: None,
            message: message.into(),
        }
    }

    pub fn failed(name: &str, stage: Stage, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok: false,
            stage: Some(stage),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    pub checks: Vec<Check>,
    /// The account the credentials belong to, when the test could tell (email, team name).
    pub account_label: Option<String>,
}

impl TestReport {
    /// A report of one check, with no account label.
    pub fn one(check: Check) -> Self {
        TestReport {
            checks: vec![check],
            account_label: None,
        }
    }

    pub fn ok(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// True when some check failed because the server refused the credentials.
    pub fn auth_refused(&self) -> bool {
        self.checks.iter().any(|c| c.stage == Some(Stage::Auth))
    }

    /// The failed checks' messages, for a connection's `last_error`.
    pub fn failures(&self) -> String {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.message.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }
}
