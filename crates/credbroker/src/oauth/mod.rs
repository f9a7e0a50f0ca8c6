//! OAuth 2 connections: the provider catalog ([`catalog`]), the browser flow and disconnect
//! ([`flow`]), and the access tokens callers resolve — served from the store while they have
//! time left, refreshed otherwise with one refresh in flight per connection.
//!
//! Invariants:
//! - a rotated refresh token is durable before the access token that came with it is returned;
//! - a refresh response without a refresh token keeps the stored one;
//! - `invalid_grant` marks the connection EXPIRED (reconnect needed) and erases its tokens;
//! - a transient failure backs off per connection and serves the stored token while it is valid;
//! - the background refresher ([`refresher`]) refreshes through the same lock and the same
//!   [`OAuth::refresh`] as callers ([`OAuth::refresh_ahead`]): one refresh per token.
//! - one refresh per connection across every replica sharing the store ([`lease`]).

pub mod binding;
pub mod catalog;
mod flow;
mod http;
mod lease;
pub mod refresher;

pub use flow::{Completed, Opened, PendingConnect, ReturnOrigins, Started};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use oauth2::basic::{BasicClient, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
};

use crate::driver::{
    ConnectionError, expire_refused, usable_connection, usable_connection_with_secrets,
};
use crate::events::{Detail, Occurred};
use crate::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, FieldError, Kind, Mode, ModelError,
    Registry, Secret,
};
use catalog::{Endpoints, Grant, TokenAuth};

/// A token endpoint that names no lifetime is assumed to give this much.
const DEFAULT_TOKEN_LIFETIME: TimeDelta = TimeDelta::seconds(3600);
/// The longest lifetime believed from a provider: a year. A larger `expires_in` (however absurd)
/// is stored as a year, so expiry arithmetic cannot overflow and a token is refreshed yearly.
pub const MAX_TOKEN_LIFETIME: TimeDelta = TimeDelta::days(365);
/// While a connection's token is valid, it is refreshed at most once per this long, whatever
/// minimum lifetime callers ask for (and `min_ttl` is capped at half the token's lifetime).
pub const MIN_REFRESH_INTERVAL: TimeDelta = TimeDelta::seconds(2);
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
    #[error(
        "this sign-in was started in another browser, so nothing was linked: open the link from \
         the application in the browser you started from"
    )]
    OtherBrowser,
    #[error(
        "the authorization response names issuer {got:?}, not {expected:?} (RFC 9207): nothing \
         was linked"
    )]
    IssuerMismatch { expected: String, got: String },
    #[error(
        "connector {connector:?} changed its provider endpoints since the connection was \
         started: start the connection again"
    )]
    ConnectorChanged { connector: String },
    #[error("the provider refused the authorization: {0}")]
    Refused(String),
    #[error("the provider is unavailable: {0}")]
    Unavailable(String),
    /// The egress policy refused the endpoint, or the upstream connection caps are reached.
    #[error(transparent)]
    Egress(crate::upstream::UpstreamError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The grant lacks scopes the caller requires (ResolveCredential's `required_scopes`).
    #[error(
        "the grant of connector {connector:?}{} lacks scope(s) {}: reconnect to grant {} (BeginConnect with them in scopes)",
        crate::driver::for_user(user),
        missing.join(", "),
        if missing.len() == 1 { "it" } else { "them" }
    )]
    MissingScopes {
        connector: String,
        user: String,
        missing: Vec<String>,
    },
}

/// Refuses a credential whose grant lacks any of `required` (exact scope strings), naming them.
pub fn require_scopes(
    connector: &Connector,
    user: &str,
    granted: &[String],
    required: &[String],
) -> Result<(), OAuthError> {
    let mut missing: Vec<String> = required
        .iter()
        .filter(|r| !granted.contains(r))
        .cloned()
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    Err(OAuthError::MissingScopes {
        connector: connector.name.clone(),
        user: user.to_string(),
        missing,
    })
}

impl From<FieldError> for OAuthError {
    fn from(e: FieldError) -> Self {
        OAuthError::Model(e.into())
    }
}

impl From<http::HttpError> for OAuthError {
    fn from(e: http::HttpError) -> Self {
        match crate::upstream::refusal(&e) {
            Some(refused) => OAuthError::Egress(refused),
            None => OAuthError::Unavailable(e.to_string()),
        }
    }
}

type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// A client-credentials token, kept in memory only: losing it costs one token request.
#[derive(Clone)]
struct CachedToken {
    token: Secret,
    issued_at: DateTime<Utc>,
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
    /// The background refresher's policy and recently used connections ([`refresher`]).
    refresh: refresher::Refresh,
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
            refresh: refresher::Refresh::default(),
        }
    }

    /// Sets the background refresher's policy (`[refresh]`); [`OAuth::start_refresher`] runs it.
    pub fn with_refresh(mut self, config: &crate::config::RefreshConfig) -> Self {
        self.refresh = refresher::Refresh::new(config.into());
        self
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

    /// Refreshes the access token now because an API refused `rejected` (Broker.Call's one
    /// retry), unless the stored token is already another one (someone refreshed since).
    /// True when there is a new token to try (for a client-credentials connector, a new one
    /// asked for in its place).
    pub async fn replace_rejected(
        &self,
        connector: &Connector,
        user: &str,
        rejected: &Secret,
    ) -> Result<bool, OAuthError> {
        if connector.kind != Kind::Oauth2 {
            return Ok(false);
        }
        if Grant::of(connector)? == Grant::ClientCredentials {
            return self.replace_client_token(connector, rejected).await;
        }
        let key = crate::model::connection_path(&connector.id, user);
        let flight = self.flight(&key);
        let _turn = flight.lock().await;
        // The decision's baseline and the stored token, of one moment, past the cache.
        let (connection, stored) = self.stored_past_cache(connector, user).await?;
        let seen = connection.last_refreshed_at;
        if stored.get("access_token").is_some_and(|t| t != rejected) {
            return Ok(true);
        }
        let token = self
            .refresh(connector, user, &Endpoints::of(connector)?, &key, seen)
            .await?;
        Ok(&token.token != rejected)
    }

    /// A new client-credentials token in place of `rejected`, unless the cached one is
    /// already another (asked for since); true when there is a new token to try.
    async fn replace_client_token(
        &self,
        connector: &Connector,
        rejected: &Secret,
    ) -> Result<bool, OAuthError> {
        let flight = self.flight(&connector.id);
        let _turn = flight.lock().await;
        let cached = self
            .client_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&connector.id)
            .map(|t| t.token.clone());
        if cached.is_some_and(|t| &t != rejected) {
            return Ok(true);
        }
        let token = self
            .request_client_token(connector, &Endpoints::of(connector)?)
            .await?;
        Ok(&token.token != rejected)
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
        self.refresh.recent.touch(connector, user, &key, asked_at);
        if let Some(token) = self.stored_token(connector, user, min_ttl, None).await? {
            return Ok(token);
        }
        crate::metrics::token_wait();
        let flight = self.flight(&key);
        let _turn = flight.lock().await;
        // Whoever held the lock before us, here or on another replica, may have refreshed: read
        // past the cache (another replica's write may not have been announced yet). A token
        // refreshed since we asked is as fresh as the provider makes them, whatever its lifetime.
        let seen = self.last_refreshed(connector, user).await?;
        if let Some(token) = self
            .stored_token(connector, user, min_ttl, Some(asked_at))
            .await?
        {
            return Ok(token);
        }
        self.refresh(connector, user, &Endpoints::of(connector)?, &key, seen)
            .await
    }

    /// The background refresher's refresh: under the connection's one lock, refreshes only if the
    /// stored token is still the one expiring at `planned` (nobody refreshed since) and the
    /// connection is not backing off. True when the provider was asked.
    pub(crate) async fn refresh_ahead(
        &self,
        connector: &Connector,
        user: &str,
        planned: Option<DateTime<Utc>>,
    ) -> Result<bool, OAuthError> {
        if Grant::of(connector)? == Grant::ClientCredentials {
            return self.client_token_ahead(connector, planned).await;
        }
        let key = crate::model::connection_path(&connector.id, user);
        let flight = self.flight(&key);
        let _turn = flight.lock().await;
        let connection = usable_connection::<OAuthError>(&self.registry, connector, user).await?;
        if connection.access_expires_at != planned || self.backing_off(&key).is_some() {
            return Ok(false);
        }
        let seen = connection.last_refreshed_at;
        self.refresh(connector, user, &Endpoints::of(connector)?, &key, seen)
            .await?;
        Ok(true)
    }

    /// [`OAuth::refresh_ahead`] of a client-credentials token: a new one is asked for, under the
    /// connector's one lock, only if the cached one is still the one expiring at `planned`.
    async fn client_token_ahead(
        &self,
        connector: &Connector,
        planned: Option<DateTime<Utc>>,
    ) -> Result<bool, OAuthError> {
        let flight = self.flight(&connector.id);
        let _turn = flight.lock().await;
        if self
            .client_token_times(connector)
            .map(|(_, expires)| expires)
            != planned
        {
            return Ok(false);
        }
        self.request_client_token(connector, &Endpoints::of(connector)?)
            .await?;
        Ok(true)
    }

    /// When the cached client-credentials token of `connector` was issued and when it expires
    /// (None when none is cached): what the refresher plans its renewal from.
    pub(crate) fn client_token_times(
        &self,
        connector: &Connector,
    ) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        let tokens = self.client_tokens.lock().unwrap_or_else(|p| p.into_inner());
        let token = tokens.get(&connector.id)?;
        Some((token.issued_at, token.expires_at))
    }

    /// The stored access token if it is fresh enough; errors if there is no usable connection.
    async fn stored_token(
        &self,
        connector: &Connector,
        user: &str,
        min_ttl: Duration,
        refreshed_since: Option<DateTime<Utc>>,
    ) -> Result<Option<AccessToken>, OAuthError> {
        // The token and the expiry it is judged by, from one moment (a replica's refresh writes
        // both at once; read apart, a new expiry could vouch for the old token).
        let (connection, secrets) =
            usable_connection_with_secrets::<OAuthError>(&self.registry, connector, user).await?;
        let (Some(expires_at), Some(token)) = (
            connection.access_expires_at,
            secrets.get("access_token").cloned(),
        ) else {
            return Ok(None);
        };
        let now = Utc::now();
        let min_ttl = TimeDelta::from_std(min_ttl).unwrap_or(TimeDelta::MAX);
        let just_refreshed = refreshed_since
            .zip(connection.last_refreshed_at)
            .is_some_and(|(asked, refreshed)| refreshed >= asked);
        let fresh = fresh_enough(connection.last_refreshed_at, expires_at, now, min_ttl)
            || (just_refreshed && expires_at > now);
        Ok(fresh.then(|| AccessToken {
            token,
            expires_at,
            scopes: connection.scopes.clone(),
            account_label: connection.account_label.clone(),
        }))
    }

    /// Refreshes under the connection's lease across replicas ([`lease`]), or takes the token
    /// another replica's refresh stored meanwhile. `seen` is the `last_refreshed_at` the decision
    /// to refresh was made on: a refresh stored after it, by anyone, is taken instead.
    async fn refresh(
        &self,
        connector: &Connector,
        user: &str,
        endpoints: &Endpoints,
        key: &str,
        seen: Option<DateTime<Utc>>,
    ) -> Result<AccessToken, OAuthError> {
        let lease = match self.refresh_turn(connector, user, key, seen).await? {
            lease::Turn::Ours(lease) => lease,
            lease::Turn::Refreshed(token) => return Ok(token),
        };
        let refreshed = self
            .refresh_leased(connector, user, endpoints, key, &lease)
            .await;
        self.release_turn(&lease).await;
        refreshed
    }

    async fn refresh_leased(
        &self,
        connector: &Connector,
        user: &str,
        endpoints: &Endpoints,
        key: &str,
        lease: &crate::store::Lease,
    ) -> Result<AccessToken, OAuthError> {
        // Under the lease, the stored refresh token is the latest (the last holder's write was
        // durable before it let go): read it past the cache, which may not have heard of it.
        let (mut connection, mut secrets) = self.stored_past_cache(connector, user).await?;
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
        // The provider may rotate the refresh token: not without an intent record.
        let act = "token refresh (the provider may rotate the refresh token)";
        crate::intent::declare(connector, user, act)
            .await
            .map_err(|e| OAuthError::Unavailable(format!("{e}; the refresh was not attempted")))?;
        let sender = http::Sender(http);
        let response = client
            .exchange_refresh_token(&refresh)
            .request_async(&sender)
            .await;
        crate::metrics::refresh(match &response {
            Ok(_) => crate::metrics::Refresh::Ok,
            Err(e) if invalid_grant(e) => crate::metrics::Refresh::Expired,
            Err(_) => crate::metrics::Refresh::Failed,
        });
        match response {
            Ok(response) => {
                let kind = crate::events::EventKind::after_refresh(connection.status);
                let token = self
                    .store_refreshed(connector, &mut connection, &mut secrets, &response, lease)
                    .await?;
                self.backoff_clear(key);
                self.registry
                    .events()
                    .emit(kind, connector, user, Detail::NONE)
                    .await;
                Ok(token)
            }
            Err(e) if invalid_grant(&e) => {
                if let Some(token) = self.superseded(connector, user, &refresh_token).await? {
                    return Ok(token);
                }
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
                    connection.last_error_class = failure_class(&e).into();
                    connection.last_error_at = Some(Utc::now());
                    // Fenced: a holder whose lease was taken over must not write its failure
                    // over the refresh the next holder stored.
                    let saved = self
                        .registry
                        .save_connection_fenced(&connection, &secrets, lease)
                        .await?;
                    if saved {
                        let failed = crate::events::EventKind::RefreshFailed;
                        let detail = Detail::new(failure_class(&e), &why);
                        self.registry
                            .events()
                            .emit(failed, connector, user, detail)
                            .await;
                    }
                }
                still_valid(&connection, &secrets).ok_or(OAuthError::Unavailable(why))
            }
        }
    }

    /// Stores what a successful refresh returned; durable before the token is handed out: a
    /// crash after this must not lose the rotated refresh token the provider has switched to.
    async fn store_refreshed(
        &self,
        connector: &Connector,
        connection: &mut Connection,
        secrets: &mut ConnectionSecrets,
        response: &oauth2::basic::BasicTokenResponse,
        lease: &crate::store::Lease,
    ) -> Result<AccessToken, OAuthError> {
        let now = Utc::now();
        let access = Secret::new(response.access_token().secret().clone());
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
        let expires_at = expiry(now, response.expires_in());
        connection.access_expires_at = Some(expires_at);
        connection.last_refreshed_at = Some(now);
        connection.next_refresh_at = self.refresh.policy.keepalive_next(connector, now);
        connection.last_error.clear();
        let saved = self
            .registry
            .save_connection_fenced(connection, secrets, lease)
            .await?;
        if !saved {
            return Err(OAuthError::Unavailable(
                "another replica took this connection's refresh over; try again".into(),
            ));
        }
        Ok(AccessToken {
            token: access,
            expires_at,
            scopes: connection.scopes.clone(),
            account_label: connection.account_label.clone(),
        })
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
                .filter(|t| fresh_enough(Some(t.issued_at), t.expires_at, Utc::now(), min_ttl))
                // Not a token asked for before the connector moved where tokens go.
                .filter(|t| !connector.moved_since(Some(t.issued_at)))
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
        // Noted once a token (and the connection it marks) exists: the refresher plans from it.
        let key = crate::model::connection_path(&connector.id, "");
        self.refresh.recent.touch(connector, "", &key, Utc::now());
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
            other => unavailable(other),
        })?;
        let issued_at = Utc::now();
        let token = CachedToken {
            token: Secret::new(response.access_token().secret().clone()),
            issued_at,
            expires_at: expiry(issued_at, response.expires_in()),
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
        let connected = crate::events::EventKind::Connected;
        let event = Occurred::new(connected, connector, "", Detail::NONE);
        self.registry
            .save_connection(&connection, None, Some(event))
            .await?;
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

/// The stored access token while it has not expired.
fn still_valid(connection: &Connection, secrets: &ConnectionSecrets) -> Option<AccessToken> {
    let expires_at = connection.access_expires_at.filter(|t| *t > Utc::now())?;
    Some(AccessToken {
        token: secrets.get("access_token")?.clone(),
        expires_at,
        scopes: connection.scopes.clone(),
        account_label: connection.account_label.clone(),
    })
}

fn invalid_grant<RE>(e: &RequestTokenError<RE, oauth2::basic::BasicErrorResponse>) -> bool
where
    RE: std::error::Error + 'static,
{
    matches!(e, RequestTokenError::ServerResponse(r) if *r.error() == BasicErrorResponseType::InvalidGrant)
}

/// The lifetime a token response names, capped at [`MAX_TOKEN_LIFETIME`].
fn lifetime(expires_in: Option<Duration>) -> TimeDelta {
    match expires_in {
        None => DEFAULT_TOKEN_LIFETIME,
        Some(d) => TimeDelta::from_std(d)
            .unwrap_or(MAX_TOKEN_LIFETIME)
            .min(MAX_TOKEN_LIFETIME),
    }
}

/// When a token issued at `issued_at` expires: never overflows, whatever the provider said.
fn expiry(issued_at: DateTime<Utc>, expires_in: Option<Duration>) -> DateTime<Utc> {
    issued_at
        .checked_add_signed(lifetime(expires_in))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whether a stored token may be served to a caller asking for `min_ttl` left, rather than
/// refreshed. `min_ttl` is capped at half the token's lifetime (a caller asking for more than the
/// provider gives would otherwise refresh on every call), and a valid token refreshed less than
/// [`MIN_REFRESH_INTERVAL`] ago is served as it is.
fn fresh_enough(
    issued_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
    min_ttl: TimeDelta,
) -> bool {
    let left = expires_at.signed_duration_since(now);
    if left <= TimeDelta::zero() {
        return false;
    }
    let Some(issued_at) = issued_at.filter(|t| *t <= expires_at) else {
        return left > min_ttl;
    };
    let half_life = expires_at.signed_duration_since(issued_at) / 2;
    left > min_ttl.min(half_life) || now.signed_duration_since(issued_at) < MIN_REFRESH_INTERVAL
}

/// A token-endpoint failure that is not the provider's answer: an egress or cap refusal as
/// itself ([`OAuthError::Egress`]), anything else as unavailable.
fn unavailable<RE: oauth2::ErrorResponse + 'static>(
    e: RequestTokenError<http::HttpError, RE>,
) -> OAuthError {
    match e {
        RequestTokenError::Request(h) => OAuthError::from(h),
        other => OAuthError::Unavailable(describe(&other)),
    }
}

/// A token-endpoint failure's class, as a `refresh_failed` event names it.
fn failure_class<RE: oauth2::ErrorResponse + 'static>(
    e: &RequestTokenError<http::HttpError, RE>,
) -> &'static str {
    match e {
        RequestTokenError::ServerResponse(_) => "provider_error",
        RequestTokenError::Request(h) if crate::upstream::refusal(h).is_some() => "egress",
        RequestTokenError::Request(_) => "unreachable",
        RequestTokenError::Parse(_, _) => "bad_response",
        RequestTokenError::Other(_) => "other",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    #[test]
    fn a_missing_scope_is_named_with_the_way_to_get_it() {
        let connector = Connector::for_tests(Kind::Oauth2, Mode::Personal, &[]);
        let granted = ["openid".to_string(), "mail.read".into()];
        let want = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(require_scopes(&connector, "u1", &granted, &want(&["mail.read"])).is_ok());
        assert!(require_scopes(&connector, "u1", &granted, &[]).is_ok());
        let e = require_scopes(
            &connector,
            "u1",
            &granted,
            &want(&["mail.send", "mail.read"]),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(&e, OAuthError::MissingScopes { missing, .. } if missing == &["mail.send"]),
            "{text}"
        );
        assert!(text.contains("mail.send: reconnect to grant it"), "{text}");
        assert!(text.contains("for user \"u1\""), "{text}");
    }

    #[test]
    fn any_expires_in_gives_a_lifetime_without_overflow() {
        let now = Utc::now();
        for (expires_in, want) in [
            (
                Some(Duration::from_secs(9_000_000_000_000)),
                MAX_TOKEN_LIFETIME,
            ),
            (Some(Duration::from_secs(u64::MAX)), MAX_TOKEN_LIFETIME),
            (Some(Duration::MAX), MAX_TOKEN_LIFETIME),
            (Some(Duration::from_secs(3600)), secs(3600)),
            (Some(Duration::ZERO), TimeDelta::zero()),
            (None, DEFAULT_TOKEN_LIFETIME),
        ] {
            assert_eq!(expiry(now, expires_in) - now, want, "{expires_in:?}");
        }
        // Even at the end of time, no panic.
        assert_eq!(
            expiry(
                DateTime::<Utc>::MAX_UTC - secs(1),
                Some(Duration::from_secs(60))
            ),
            DateTime::<Utc>::MAX_UTC
        );
    }

    /// Odd numbers in a token response are refused by the parser (a clean "could not be
    /// parsed", never a panic); numbers that parse become capped lifetimes.
    #[test]
    fn odd_expires_in_values_parse_or_are_refused_without_panic() {
        let now = Utc::now();
        for (value, parses) in [
            ("9000000000000", true),
            ("18446744073709551615", true),
            ("0", true),
            ("-1", false),
            ("\"3600\"", false),
            ("1e300", false),
            ("3600.5", false),
            ("null", true),
            ("184467440737095516150", false),
        ] {
            let body = format!(
                r#"{{"access_token":"a","token_type":"Bearer","expires_in":{value},"refresh_token":"r"}}"#
            );
            let parsed = serde_json::from_str::<oauth2::basic::BasicTokenResponse>(&body);
            assert_eq!(parsed.is_ok(), parses, "{value}");
            if let Ok(response) = parsed {
                let at = expiry(now, response.expires_in());
                assert!(at >= now && at <= now + MAX_TOKEN_LIFETIME, "{value}");
            }
        }
        let missing = r#"{"access_token":"a","token_type":"Bearer"}"#;
        let response: oauth2::basic::BasicTokenResponse = serde_json::from_str(missing).unwrap();
        assert_eq!(
            expiry(now, response.expires_in()) - now,
            DEFAULT_TOKEN_LIFETIME
        );
    }

    #[test]
    fn min_ttl_above_the_token_lifetime_is_capped_at_half_of_it() {
        let issued = Utc::now();
        let expires = issued + secs(60);
        let year = secs(365 * 86400);
        // A caller asking for an hour of a 60 s token gets the stored one until half is gone.
        assert!(fresh_enough(Some(issued), expires, issued + secs(10), year));
        assert!(fresh_enough(Some(issued), expires, issued + secs(29), year));
        assert!(!fresh_enough(
            Some(issued),
            expires,
            issued + secs(31),
            year
        ));
        // A smaller min_ttl is honoured as asked.
        assert!(fresh_enough(
            Some(issued),
            expires,
            issued + secs(45),
            secs(10)
        ));
        assert!(!fresh_enough(
            Some(issued),
            expires,
            issued + secs(55),
            secs(10)
        ));
        // An expired token is never fresh.
        assert!(!fresh_enough(
            Some(issued),
            expires,
            issued + secs(61),
            secs(0)
        ));
        // Without a refresh time the asked minimum applies.
        assert!(!fresh_enough(None, expires, issued + secs(10), year));
    }

    #[test]
    fn a_valid_token_is_refreshed_at_most_once_per_interval() {
        let issued = Utc::now();
        // A provider handing out three-second tokens: served for the interval while valid...
        let expires = issued + secs(3);
        let year = secs(365 * 86400);
        let within = issued + MIN_REFRESH_INTERVAL - TimeDelta::milliseconds(1);
        assert!(fresh_enough(Some(issued), expires, within, year));
        // ...and refreshed after it.
        let after = issued + MIN_REFRESH_INTERVAL + TimeDelta::milliseconds(1);
        assert!(!fresh_enough(Some(issued), expires, after, year));
        // Counting refreshes over a minute of calls every 10 ms from a caller asking for a year:
        // a 3 s token is refreshed once per interval (2 s, longer than its half-life) at most,
        // 30 times (never on every call, which would be 6,000).
        let (mut issued, mut refreshes) = (issued, 0);
        let start = issued;
        for step in 0..6000 {
            let now = start + TimeDelta::milliseconds(10 * step);
            if !fresh_enough(Some(issued), issued + secs(3), now, year) {
                issued = now;
                refreshes += 1;
            }
        }
        assert!(refreshes <= 30, "{refreshes}");
        assert!(refreshes >= 20, "{refreshes}");
    }
}
