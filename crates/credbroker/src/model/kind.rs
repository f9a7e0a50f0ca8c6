//! Connector kinds and modes, and the settings and secret slots each kind accepts. This table
//! is the schema the API validates against: an unknown key is an error that lists the known ones.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    ApiKey,
    Oauth2,
    ImapSmtp,
    Caldav,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Shared,
    Personal,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::ApiKey => "api_key",
            Kind::Oauth2 => "oauth2",
            Kind::ImapSmtp => "imap_smtp",
            Kind::Caldav => "caldav",
        }
    }

    /// Keys of the connector's (admin-set, non-secret) configuration.
    pub fn config_keys(self) -> &'static [&'static str] {
        match self {
            Kind::ApiKey => &[
                "header_name",
                "header_prefix",
                "base_url",
                "test_url",
                "account_label",
                "ca_pem",
                "description",
            ],
            Kind::Oauth2 => &[
                "client_id",
                "auth_url",
                "token_url",
                "revocation_url",
                "userinfo_url",
                "account_label_field",
                "scopes",
                "grant_type",
                "redirect_uri",
                "auth_params",
                "token_auth",
                "base_url",
                "resource",
                "ca_pem",
                "description",
            ],
            Kind::ImapSmtp => &[
                "imap_host",
                "imap_port",
                "imap_tls",
                "smtp_host",
                "smtp_port",
                "smtp_tls",
                "ca_pem",
                "oauth_connector",
                "description",
            ],
            Kind::Caldav => &["url", "ca_pem", "oauth_connector", "description"],
        }
    }

    /// Secret slots of the connector itself.
    pub fn connector_secret_slots(self) -> &'static [&'static str] {
        match self {
            Kind::ApiKey => &["api_key"],
            Kind::Oauth2 => &["client_secret"],
            Kind::ImapSmtp | Kind::Caldav => &[],
        }
    }

    /// Keys of a connection's (user-given, non-secret) settings.
    pub fn setting_keys(self) -> &'static [&'static str] {
        match self {
            Kind::ApiKey => &["account_label"],
            Kind::Oauth2 => &[],
            Kind::ImapSmtp => &[
                "email",
                "username",
                "aliases",
                "imap_host",
                "imap_port",
                "imap_tls",
                "smtp_host",
                "smtp_port",
                "smtp_tls",
                "ca_pem",
            ],
            Kind::Caldav => &["url", "username", "ca_pem"],
        }
    }

    /// Secret slots of a connection.
    pub fn connection_secret_slots(self) -> &'static [&'static str] {
        match self {
            Kind::ApiKey => &["api_key"],
            Kind::Oauth2 => &["access_token", "refresh_token"],
            Kind::ImapSmtp | Kind::Caldav => &["password"],
        }
    }
}
