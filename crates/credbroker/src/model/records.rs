//! The records the registry stores. Secrets live in their own records, read only where used.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Kind, Mode, Secret};

/// Settings (a connector's config, a connection's settings) from (key, value) pairs, as the
/// benchmark and tests write them.
pub fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connector {
    pub id: String,
    pub workspace: String,
    pub name: String,
    pub kind: Kind,
    pub mode: Mode,
    /// OAuth provider preset ("google-mail", "slack"…); empty for generic.
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Which connector secret slots are set (never their values).
    #[serde(default)]
    pub secrets_set: BTreeSet<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When a setting naming where its connections' secrets go last changed (see
    /// [`crate::driver::Destination`]); a connection connected before it is not used again.
    #[serde(default)]
    pub destinations_at: Option<DateTime<Utc>>,
}

impl Connector {
    /// A connector named "C" (id "cn_1", default workspace) for unit tests.
    #[cfg(test)]
    pub fn for_tests(kind: Kind, mode: Mode, config: &[(&str, &str)]) -> Self {
        let now = Utc::now();
        Connector {
            id: "cn_1".into(),
            workspace: "default".into(),
            name: "C".into(),
            kind,
            mode,
            provider: String::new(),
            config: settings(config),
            secrets_set: BTreeSet::new(),
            created_at: now,
            updated_at: now,
            destinations_at: None,
        }
    }

    pub fn setting(&self, key: &str) -> Option<&str> {
        self.config
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// Whether a connection connected at `connected_at` predates where its secrets go now: its
    /// secrets were given for a destination the connector no longer names.
    pub fn moved_since(&self, connected_at: Option<DateTime<Utc>>) -> bool {
        self.destinations_at
            .is_some_and(|moved| connected_at.is_none_or(|at| at < moved))
    }
}

/// Secrets of a connector: the OAuth client secret, a shared API key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectorSecrets {
    #[serde(default)]
    pub slots: BTreeMap<String, Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    Connected,
    NotConnected,
    Expired,
    Error,
}

/// Why a connection is EXPIRED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// The provider or server refused the stored credential.
    Refused,
    /// A setting naming where its secrets go changed without them: they were erased.
    DestinationChanged,
}

impl Expiry {
    pub fn name(self) -> &'static str {
        match self {
            Expiry::Refused => "refused",
            Expiry::DestinationChanged => "destination_changed",
        }
    }
}

impl ConnectionStatus {
    pub fn name(self) -> &'static str {
        match self {
            ConnectionStatus::Connected => "connected",
            ConnectionStatus::NotConnected => "not_connected",
            ConnectionStatus::Expired => "expired",
            ConnectionStatus::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Connection {
    pub connector_id: String,
    /// Empty for the one connection of a shared connector.
    pub user_id: String,
    pub status: ConnectionStatus,
    #[serde(default)]
    pub account_label: String,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_refreshed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// User-given, non-secret settings (hosts, ports, username, aliases…).
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// When the stored access token expires (OAuth).
    pub access_expires_at: Option<DateTime<Utc>>,
    /// Why the connection is EXPIRED, when it is.
    #[serde(default)]
    pub expired_reason: Option<Expiry>,
    /// When the broker refreshes an idle OAuth grant to keep it from lapsing (keep-alive),
    /// written with each refresh so that the schedule survives restarts.
    #[serde(default)]
    pub next_refresh_at: Option<DateTime<Utc>>,
    /// The class of the last failure ("unreachable", "provider_error", "bad_response", "egress", "other": transient; "refused") and when
    /// it happened; kept after a later success (compare with `last_refreshed_at`).
    #[serde(default)]
    pub last_error_class: String,
    #[serde(default)]
    pub last_error_at: Option<DateTime<Utc>>,
}

impl Connection {
    pub fn new(connector_id: &str, user_id: &str) -> Self {
        Self {
            connector_id: connector_id.to_string(),
            user_id: user_id.to_string(),
            status: ConnectionStatus::NotConnected,
            account_label: String::new(),
            connected_at: None,
            last_used_at: None,
            last_refreshed_at: None,
            last_error: String::new(),
            scopes: Vec::new(),
            settings: BTreeMap::new(),
            access_expires_at: None,
            expired_reason: None,
            next_refresh_at: None,
            last_error_class: String::new(),
            last_error_at: None,
        }
    }

    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

/// Secrets of one connection: API key, password, OAuth access and refresh tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionSecrets {
    #[serde(default)]
    pub slots: BTreeMap<String, Secret>,
}

impl ConnectionSecrets {
    pub fn get(&self, slot: &str) -> Option<&Secret> {
        self.slots.get(slot)
    }
}
