//! OAuth 2 connections: the provider catalog ([`catalog`]), the browser flow and disconnect
//! ([`flow`]), and the access tokens callers resolve — served from the store while they have
//! time left, refreshed otherwise with one refresh in flight per connection.
//!
//! Invariants:
//! - a rotated refresh token is durable before the access token that came with it is returned;
//! - a refresh response without a refresh token keeps the stored one;
//! - `invalid_grant` marks the connection EXPIRED (reconnect needed) and erases its tokens;
//! - a transient failure backs off per connection and serves the stored token while it is valid.

pub mod catalog;
mod flow;
mod http;

pub use flow::{Completed, PendingConnect, ReturnOrigins, Started};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
};

use crate::driver::{ConnectionError, expire_refused, usable_connection};
use crate::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, FieldError, Kind, Mode, ModelError,
    Registry, Secret,
};
use catalog::{Endpoints, Grant, TokenAuth};

/// A token endpoint that names no lifetime is assumed to give this much.
const DEFAULT_TOKEN_LIFETIME: TimeDelta = TimeDelta::seconds(3600);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// An access token ready to hand to a caller.
pub struct AccessToken {
    pub token: Secret,
    pub expires_at: DateTime<Utc>,
    pub scopes: Vec<String>,
    pub account_label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("connector {connector:?} is not an OAuth connector")]
    NotOAuth { connector: String },
    #[error("the OAuth state is unknown or was already used: start the connection again")]
    UnknownState,
    #[error("the OAuth state has expired: start the connection again")]
    StateExpired,
    #[error("the provider refused the authorization: {0}")]
    Refused(String),
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl From<FieldError> for OAuthError {
    fn from(e: FieldError) -> Self {
        OAuthError::Model(e.into())
    }
}

impl From<http::HttpError> for OAuthError {
    fn from(e: http::HttpError) -> Self {
        OAuthError::Unavailable(e.to_string())
    }
}

type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// A client-credentials token, kept in memory only: losing it costs one token request.
#[derive(Clone)]
struct CachedToken {
    token: Secret,
    expires_at: DateTime<Utc>,
    scopes: Vec<String>,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    until: Option<tokio::time::Instant>,
}

pub struct OAuth {
    registry: Arc<Registry>,
    callback_url: String,
    timeout: Duration,
    /// One lock per connection: whoever holds it may refresh; the others wait, then reuse.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    client_tokens: Mutex<HashMap<String, CachedToken>>,
    backoff: Mutex<HashMap<String, Backoff>>,
    /// Serializes taking a state out of the store, so a state is used at most once.
    states: tokio::sync::Mutex<()>,
    /// Where BeginConnect may send browsers back ([`OAuth::with_return_origins`]).
    return_origins: ReturnOrigins,
}

impl OAuth {
    pub fn new(registry: Arc<Registry>, callback_url: String, timeout: Duration) -> Self {
        Self {
            registry,
            callback_url,
            timeout,
            in_flight: Mutex::default(),
            client_tokens: Mutex::default(),
            backoff: Mutex::default(),
            states: tokio::sync::Mutex::new(()),
            return_origins: ReturnOrigins::default(),
        }
    }

    fn flight(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    async fn token_client(
        &self,
        connector: &Connector,
        endpoints: &Endpoints,
    ) -> Result<TokenClient, OAuthError> {
        let secret = self
            .registry
            .connector_secrets(connector)
            .await?
            .slots
            .get("client_secret")
            .map(|s| ClientSecret::new(s.expose().to_string()));
        let token_url = TokenUrl::new(endpoints.token_url.clone())
            .map_err(|e| FieldError::new("config.token_url", e.to_string()))?;
        let mut client = BasicClient::new(ClientId::new(endpoints.client_id.clone()))
            .set_token_uri(token_url)
            .set_auth_type(match endpoints.token_auth {
                TokenAuth::Basic => AuthType::BasicAuth,
                TokenAuth::Post => AuthType::RequestBody,
            });
        if let Some(secret) = secret {
            client = client.set_client_secret(secret);
        }
        Ok(client)
    }

    /// The access token a caller may use now: from the store if it has more than `min_ttl`
    /// left, else refreshed (or, for client credentials, requested) first.
    pub async fn access_token(
        &self,
        connector: &Connector,
        user: &str,
        min_ttl: Duration,
    ) -> Result<AccessToken, OAuthError> {
        let token = self.fresh_token(connector, user, min_ttl).await?;
        // Every use of an OAuth connection comes through here: resolve, mail, calendar.
        self.registry.record_use(connector, user).await;
        Ok(token)
    }

    async fn fresh_token(
        &self,
        connector: &Connector,
        user: &str,
        min_ttl: Duration,
    ) -> Result<AccessToken, OAuthError> {
        if connector.kind != Kind::Oauth2 {
            return Err(OAuthError::NotOAuth {
                connector: connector.name.clone(),
            });
        }
        // The endpoints are worked out only when the provider must be asked: serving a
        // stored token (every call but one per token lifetime) needs none of them.
        if Grant::of(connector)? == Grant::ClientCredentials {
            return self.client_credentials(connector, min_ttl).await;
        }
        let key = crate::model::connection_path(&connector.id, user);
        let asked_at = Utc::now();
        if let Some(token) = self.stored_token(connector, user, min_ttl, None).await? {
            return Ok(token);
        }
        let flight = self.flight(&key);
        let _turn = flight.lock().await;
        // Whoever held the lock before us may have refreshed: a token refreshed since we asked
        // is as fresh as the provider makes them, whatever its lifetime.
        if let Some(token) = self
            .stored_token(connector, user, min_ttl, Some(asked_at))
            .await?
        {
            return Ok(token);
        }
        self.refresh(connector, user, &Endpoints::of(connector)?, &key)
            .await
    }

    /// The stored access token if it is fresh enough; errors if there is no usable connection.
    async fn stored_token(
        &self,
        connector: &Connector,
        user: &str,
        min_ttl: Duration,
        refreshed_since: Option<DateTime<Utc>>,
    ) -> Result<Option<AccessToken>, OAuthError> {
        let connection = usable_connection::<OAuthError>(&self.registry, connector, user).await?;
        let (Some(expires_at), Some(token)) = (
            connection.access_expires_at,
            self.registry
                .connection_secrets(connector, user)
                .await?
                .get("access_token")
                .cloned(),
        ) else {
            return Ok(None);
        };
        let now = Utc::now();
        let min_ttl = TimeDelta::from_std(min_ttl).unwrap_or(TimeDelta::MAX);
        let just_refreshed = refreshed_since
            .zip(connection.last_refreshed_at)
            .is_some_and(|(asked, refreshed)| refreshed >= asked);
        let fresh = expires_at - now > min_ttl || (just_refreshed && expires_at > now);
        Ok(fresh.then(|| AccessToken {
            token,
            expires_at,
            scopes: connection.scopes.clone(),
            account_label: connection.account_label.clone(),
        }))
    }

    async fn refresh(
        &self,
        connector: &Connector,
        user: &str,
        endpoints: &Endpoints,
        key: &str,
    ) -> Result<AccessToken, OAuthError> {
        let mut connection =
            usable_connection::<OAuthError>(&self.registry, connector, user).await?;
        let mut secrets = self.registry.connection_secrets(connector, user).await?;
        let still_valid = |connection: &Connection, secrets: &ConnectionSecrets| {
            let expires_at = connection.access_expires_at.filter(|t| *t > Utc::now())?;
            Some(AccessToken {
                token: secrets.get("access_token")?.clone(),
                expires_at,
                scopes: connection.scopes.clone(),
                account_label: connection.account_label.clone(),
            })
        };
        if let Some(wait) = self.backing_off(key) {
            return still_valid(&connection, &secrets).ok_or_else(|| {
                OAuthError::Unavailable(format!(
                    "the last refresh failed ({}); next attempt in {}s",
                    connection.last_error,
                    wait.as_secs().max(1)
                ))
            });
        }
        let Some(refresh_token) = secrets.get("refresh_token").cloned() else {
            return self
                .expire(connector, user, "the provider gave no refresh token")
                .await;
        };
        let client = self.token_client(connector, endpoints).await?;
        let http = http::client(endpoints.ca_pem.as_deref(), self.timeout)?;
        let refresh = RefreshToken::new(refresh_token.expose().to_string());
        let sender = http::Sender(http);
        let response = client
            .exchange_refresh_token(&refresh)
            .request_async(&sender)
            .await;
        crate::metrics::refresh(match &response {
            Ok(_) => crate::metrics::Refresh::Ok,
            Err(RequestTokenError::ServerResponse(e))
                if *e.error() == BasicErrorResponseType::InvalidGrant =>
            {
                crate::metrics::Refresh::Expired
            }
            Err(_) => crate::metrics::Refresh::Failed,
        });
        match response {
            Ok(response) => {
                let now = Utc::now();
                let access = Secret::new(response.access_token().secret().clone());
                let expires_at = now + lifetime(response.expires_in());
                secrets.slots.insert("access_token".into(), access.clone());
                if let Some(rotated) = response.refresh_token() {
                    secrets.slots.insert(
                        "refresh_token".into(),
                        Secret::new(rotated.secret().clone()),
                    );
                }
                if let Some(scopes) = response.scopes() {
                    connection.scopes = scopes.iter().map(|s| s.to_string()).collect();
                }
                connection.status = ConnectionStatus::Connected;
                connection.access_expires_at = Some(expires_at);
                connection.last_refreshed_at = Some(now);
                connection.last_error.clear();
                // Durable before the token is handed out: a crash now must not lose the
                // rotated refresh token the provider has already switched to.
                self.registry
                    .save_connection(&connection, Some(&secrets))
                    .await?;
                self.backoff_clear(key);
                Ok(AccessToken {
                    token: access,
                    expires_at,
                    scopes: connection.scopes,
                    account_label: connection.account_label,
                })
            }
            Err(RequestTokenError::ServerResponse(e))
                if *e.error() == BasicErrorResponseType::InvalidGrant =>
            {
                self.expire(
                    connector,
                    user,
                    "the provider refused the refresh token (invalid_grant)",
                )
                .await
            }
            Err(e) => {
                let why = describe(&e);
                let wait = self.backoff_note(key);
                tracing::warn!(connector = %connector.id, error = %why, retry_in_s = wait.as_secs(), "token refresh failed");
                if connection.status != ConnectionStatus::Error || connection.last_error != why {
                    connection.status = ConnectionStatus::Error;
                    connection.last_error = why.clone();
                    self.registry.save_connection(&connection, None).await?;
                }
                still_valid(&connection, &secrets).ok_or(OAuthError::Unavailable(why))
            }
        }
    }

    /// Marks the connection EXPIRED and erases its tokens, which the provider no longer honours.
    async fn expire(
        &self,
        connector: &Connector,
        user: &str,
        why: &str,
    ) -> Result<AccessToken, OAuthError> {
        expire_refused(&self.registry, connector, user, why.to_string(), true).await?;
        Err(ConnectionError::expired(connector, user).into())
    }

    async fn client_credentials(
        &self,
        connector: &Connector,
        min_ttl: Duration,
    ) -> Result<AccessToken, OAuthError> {
        if connector.mode != Mode::Shared {
            return Err(FieldError::new(
                "config.grant_type",
                "client_credentials serves shared connectors only: the broker acts as itself, not as a user",
            )
            .into());
        }
        let min_ttl = TimeDelta::from_std(min_ttl).unwrap_or(TimeDelta::MAX);
        let cached = || {
            let tokens = self.client_tokens.lock().unwrap_or_else(|p| p.into_inner());
            tokens
                .get(&connector.id)
                .filter(|t| t.expires_at - Utc::now() > min_ttl)
                .cloned()
        };
        let hit = match cached() {
            Some(hit) => hit,
            None => {
                let flight = self.flight(&connector.id);
                let _turn = flight.lock().await;
                match cached() {
                    Some(hit) => hit,
                    None => {
                        self.request_client_token(connector, &Endpoints::of(connector)?)
                            .await?
                    }
                }
            }
        };
        Ok(AccessToken {
            token: hit.token,
            expires_at: hit.expires_at,
            scopes: hit.scopes,
            account_label: connector
                .setting("client_id")
                .unwrap_or_default()
                .to_string(),
        })
    }

    async fn request_client_token(
        &self,
        connector: &Connector,
        endpoints: &Endpoints,
    ) -> Result<CachedToken, OAuthError> {
        let client = self.token_client(connector, endpoints).await?;
        let http = http::client(endpoints.ca_pem.as_deref(), self.timeout)?;
        let sender = http::Sender(http);
        let mut request = client.exchange_client_credentials();
        for scope in &endpoints.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        if let Some(resource) = &endpoints.resource {
            request = request.add_extra_param("resource", resource.clone());
        }
        let response = request.request_async(&sender).await.map_err(|e| match e {
            RequestTokenError::ServerResponse(e) => OAuthError::Refused(e.error().to_string()),
            other => OAuthError::Unavailable(describe(&other)),
        })?;
        let token = CachedToken {
            token: Secret::new(response.access_token().secret().clone()),
            expires_at: Utc::now() + lifetime(response.expires_in()),
            scopes: response
                .scopes()
                .map(|s| s.iter().map(|s| s.to_string()).collect())
                .unwrap_or_else(|| endpoints.scopes.clone()),
        };
        self.client_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(connector.id.clone(), token.clone());
        self.mark_client_connected(connector, &endpoints.client_id)
            .await?;
        Ok(token)
    }

    /// A client-credentials connector shows as connected once the provider has issued a token.
    async fn mark_client_connected(
        &self,
        connector: &Connector,
        client_id: &str,
    ) -> Result<(), OAuthError> {
        let existing = self.registry.connection(connector, "").await?;
        if existing
            .as_ref()
            .is_some_and(|c| c.status == ConnectionStatus::Connected)
        {
            return Ok(());
        }
        let mut connection = existing.unwrap_or_else(|| Connection::new(&connector.id, ""));
        connection.status = ConnectionStatus::Connected;
        connection.connected_at = Some(Utc::now());
        connection.account_label = client_id.to_string();
        connection.last_error.clear();
        self.registry.save_connection(&connection, None).await?;
        Ok(())
    }

    fn backing_off(&self, key: &str) -> Option<Duration> {
        let backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let until = backoff.get(key)?.until?;
        let now = tokio::time::Instant::now();
        (until > now).then(|| until - now)
    }

    fn backoff_note(&self, key: &str) -> Duration {
        let mut backoff = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        let entry = backoff.entry(key.to_string()).or_default();
        entry.failures = entry.failures.saturating_add(1);
        let wait = BACKOFF_FIRST
            .saturating_mul(1 << entry.failures.saturating_sub(1).min(6))
            .min(BACKOFF_MAX);
        entry.until = Some(tokio::time::Instant::now() + wait);
        wait
    }

    fn backoff_clear(&self, key: &str) {
        self.backoff
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

fn lifetime(expires_in: Option<Duration>) -> TimeDelta {
    expires_in
        .and_then(|d| TimeDelta::from_std(d).ok())
        .unwrap_or(DEFAULT_TOKEN_LIFETIME)
}

/// A token-endpoint failure in words, without the response body (it may echo secrets).
fn describe<RE: oauth2::ErrorResponse + 'static>(
    e: &RequestTokenError<http::HttpError, RE>,
) -> String {
    match e {
        RequestTokenError::ServerResponse(r) => format!("the provider answered: {r}"),
        RequestTokenError::Request(e) => e.to_string(),
        RequestTokenError::Parse(_, _) => {
            "the provider's token response could not be parsed".into()
        }
        RequestTokenError::Other(what) => what.clone(),
    }
}
