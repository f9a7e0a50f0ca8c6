//! ResolveCredential's domain: the short-lived credential a caller may hold for a connection.
//! API keys are returned as stored; OAuth access tokens come from [`crate::oauth`], refreshed
//! first when they are about to expire. Nothing else (refresh tokens, client secrets,
//! passwords) ever leaves through here.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{ConnectionStatus, FieldError, Kind, ModelError, Registry, Secret, Target};

#[derive(Debug, Clone)]
pub struct Credential {
    pub kind: Kind,
    pub secret: Secret,
    pub token_type: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub scopes: Vec<String>,
    pub account_label: String,
    pub header_name: String,
    pub header_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("connector {connector:?} has no connection{for_user}: connect an account first")]
    NotConnected { connector: String, for_user: String },
    #[error(
        "the connection of connector {connector:?}{for_user} has expired: reconnect the account"
    )]
    Expired { connector: String, for_user: String },
    #[error("{0}")]
    Unavailable(String),
    #[error(
        "connector {connector:?} is a {kind} connector: it has no credential to resolve; use the mail or calendar operations"
    )]
    NotResolvable {
        connector: String,
        kind: &'static str,
    },
    #[error(transparent)]
    OAuth(#[from] crate::oauth::OAuthError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<FieldError> for ResolveError {
    fn from(e: FieldError) -> Self {
        ResolveError::Model(e.into())
    }
}

pub fn for_user(user: &str) -> String {
    if user.is_empty() {
        String::new()
    } else {
        format!(" for user {user:?}")
    }
}

/// The stored connection of a target, if it can be used: absent → NOT_CONNECTED, refused by
/// its provider or server → EXPIRED (the user must reconnect).
pub fn usable_connection(
    registry: &Registry,
    connector: &crate::model::Connector,
    user: &str,
) -> Result<crate::model::Connection, ResolveError> {
    let connection =
        registry
            .connection(connector, user)?
            .ok_or_else(|| ResolveError::NotConnected {
                connector: connector.name.clone(),
                for_user: for_user(user),
            })?;
    if connection.status == ConnectionStatus::Expired {
        return Err(ResolveError::Expired {
            connector: connector.name.clone(),
            for_user: for_user(user),
        });
    }
    Ok(connection)
}

pub struct Resolver {
    registry: Arc<Registry>,
    oauth: Arc<crate::oauth::OAuth>,
}

impl Resolver {
    pub fn new(registry: Arc<Registry>, oauth: Arc<crate::oauth::OAuth>) -> Self {
        Self { registry, oauth }
    }

    pub async fn resolve(
        &self,
        target: &Target,
        min_ttl: Duration,
    ) -> Result<Credential, ResolveError> {
        let connector = &target.connector;
        let user = &target.connection_user;
        let not_connected = || ResolveError::NotConnected {
            connector: connector.name.clone(),
            for_user: for_user(user),
        };
        match connector.kind {
            Kind::ApiKey => {
                let connection = usable_connection(&self.registry, connector, user)?;
                let key = if user.is_empty() {
                    self.registry
                        .connector_secrets(connector)?
                        .slots
                        .get("api_key")
                        .cloned()
                } else {
                    self.registry
                        .connection_secrets(connector, user)?
                        .get("api_key")
                        .cloned()
                };
                let key = key.ok_or_else(not_connected)?;
                self.registry.record_use(connector, user);
                Ok(Credential {
                    kind: Kind::ApiKey,
                    secret: key,
                    token_type: "api_key".into(),
                    expires_at: None,
                    scopes: Vec::new(),
                    account_label: connection.account_label.clone(),
                    header_name: connector
                        .setting("header_name")
                        .unwrap_or("Authorization")
                        .to_string(),
                    header_prefix: connector
                        .config
                        .get("header_prefix")
                        .cloned()
                        .unwrap_or_else(|| "Bearer ".into()),
                })
            }
            Kind::Oauth2 => {
                let token = self.oauth.access_token(connector, user, min_ttl).await?;
                Ok(Credential {
                    kind: Kind::Oauth2,
                    secret: token.token,
                    token_type: "Bearer".into(),
                    expires_at: Some(token.expires_at),
                    scopes: token.scopes,
                    account_label: token.account_label,
                    header_name: "Authorization".into(),
                    header_prefix: "Bearer ".into(),
                })
            }
            kind @ (Kind::ImapSmtp | Kind::Caldav) => Err(ResolveError::NotResolvable {
                connector: connector.name.clone(),
                kind: kind.name(),
            }),
        }
    }
}
