//! Connector kinds and modes. What each kind accepts and does is its driver's
//! ([`crate::driver::driver`]).

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
}
