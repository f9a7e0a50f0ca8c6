//! One refresh per connection across every replica sharing the store: the refresh lease.
//!
//! Within a replica, callers of one connection already queue on its single-flight lock; the one
//! at the front then takes the connection's lease from the store's coordinator before asking
//! the provider. A replica that finds the lease held does not refresh: it rereads the stored
//! connection (past its read cache) until the holder's refresh shows there, or the lease frees.
//!
//! Invariants:
//! - the refreshed tokens are written only while the lease is still the latest handed out for
//!   the connection (a fenced commit), and durably before the access token is returned;
//! - a holder killed mid-refresh holds the lease for [`lease_ttl`] at most; the next holder
//!   refreshes with the stored refresh token, so at most that one rotation is lost;
//! - a refresh refused with `invalid_grant` because another holder rotated the refresh token
//!   meanwhile (the stored one is no longer the one sent) serves the stored tokens rather than
//!   expiring the connection.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{AccessToken, OAuth, OAuthError, still_valid};
use crate::driver::{usable_connection, usable_connection_with_secrets};
use crate::model::{Connection, ConnectionSecrets, Connector, Secret};
use crate::store::Lease;

/// How often a replica waiting on another's lease rereads the stored connection.
const POLL: Duration = Duration::from_millis(20);

/// How long a lease lasts: a refresh (its token request and its commit) ends well within it,
/// and a dead holder's lease frees after it.
pub(super) fn lease_ttl(timeout: Duration) -> Duration {
    timeout * 2 + Duration::from_secs(5)
}

fn lease_name(key: &str) -> String {
    format!("refresh/{key}")
}

/// Whose refresh it is.
pub(super) enum Turn {
    /// This caller's: refresh, write fenced by the lease, then release it.
    Ours(Lease),
    /// Another replica refreshed meanwhile: its token.
    Refreshed(AccessToken),
}

impl OAuth {
    /// Waits for the connection's refresh lease, unless another replica refreshes first.
    pub(super) async fn refresh_turn(
        &self,
        connector: &Connector,
        user: &str,
        key: &str,
        seen: Option<DateTime<Utc>>,
    ) -> Result<Turn, OAuthError> {
        let ttl = lease_ttl(self.timeout);
        let give_up = tokio::time::Instant::now() + ttl + POLL * 10;
        let store = self.registry.store();
        loop {
            let taken = store.try_lease(&lease_name(key), ttl).await;
            if let Some(lease) = taken.map_err(|e| OAuthError::Unavailable(e.to_string()))? {
                // Another replica may have refreshed just before its lease freed.
                if let Some(token) = self.refreshed_since(connector, user, seen).await? {
                    self.release_turn(&lease).await;
                    return Ok(Turn::Refreshed(token));
                }
                return Ok(Turn::Ours(lease));
            }
            tokio::time::sleep(POLL).await;
            if let Some(token) = self.refreshed_since(connector, user, seen).await? {
                return Ok(Turn::Refreshed(token));
            }
            if tokio::time::Instant::now() > give_up {
                return Err(OAuthError::Unavailable(
                    "another replica's refresh of this connection did not finish".into(),
                ));
            }
        }
    }

    /// Frees the lease (a failure only delays the next refresh until the lease lapses).
    pub(super) async fn release_turn(&self, lease: &Lease) {
        if let Err(e) = self.registry.store().release(lease).await {
            tracing::warn!(error = %e, "releasing a refresh lease failed; it lapses on its own");
        }
    }

    /// When the connection was last refreshed, as the store holds it now.
    pub(super) async fn last_refreshed(
        &self,
        connector: &Connector,
        user: &str,
    ) -> Result<Option<DateTime<Utc>>, OAuthError> {
        self.registry.forget_connection(connector, user);
        let connection = usable_connection::<OAuthError>(&self.registry, connector, user).await?;
        Ok(connection.last_refreshed_at)
    }

    /// The stored token, if the connection was refreshed since `seen` (by another replica) and
    /// the token is valid; errors if the connection is no longer usable (disconnected there).
    async fn refreshed_since(
        &self,
        connector: &Connector,
        user: &str,
        seen: Option<DateTime<Utc>>,
    ) -> Result<Option<AccessToken>, OAuthError> {
        if self.last_refreshed(connector, user).await? == seen {
            return Ok(None);
        }
        self.stored_valid(connector, user).await
    }

    /// The usable connection and its secrets as the store holds them now, past this
    /// replica's cache (which may not have heard of another replica's refresh yet).
    pub(super) async fn stored_past_cache(
        &self,
        connector: &Connector,
        user: &str,
    ) -> Result<(Connection, ConnectionSecrets), OAuthError> {
        self.registry.forget_connection(connector, user);
        usable_connection_with_secrets::<OAuthError>(&self.registry, connector, user).await
    }

    /// The stored access token while valid, read past the cache.
    async fn stored_valid(
        &self,
        connector: &Connector,
        user: &str,
    ) -> Result<Option<AccessToken>, OAuthError> {
        let (connection, secrets) = self.stored_past_cache(connector, user).await?;
        Ok(still_valid(&connection, &secrets))
    }

    /// After `invalid_grant` for `sent`: the stored tokens, if the stored refresh token is no
    /// longer `sent` (another holder rotated it: the refusal is about a token already replaced).
    pub(super) async fn superseded(
        &self,
        connector: &Connector,
        user: &str,
        sent: &Secret,
    ) -> Result<Option<AccessToken>, OAuthError> {
        let (connection, secrets) = self.stored_past_cache(connector, user).await?;
        if secrets
            .get("refresh_token")
            .is_none_or(|stored| stored == sent)
        {
            return Ok(None);
        }
        Ok(still_valid(&connection, &secrets))
    }
}
