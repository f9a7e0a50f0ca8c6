//! The authorization-code flow: BeginConnect makes the authorization URL (PKCE S256, a
//! single-use state kept encrypted for ten minutes); the callback or CompleteConnect exchanges
//! the code, reads the account label and stores the tokens. Reconnect is the same flow on an
//! existing connection. Disconnect revokes at the provider where it can.

use chrono::{DateTime, TimeDelta, Utc};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RequestTokenError, RevocationUrl, Scope, StandardRevocableToken, TokenResponse,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::catalog::{Endpoints, Grant, label_at};
use super::http::{self, Identity};
use super::{OAuth, OAuthError, describe, expiry, unavailable};
use crate::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, FieldError, Kind, Secret, Target,
};

/// How long a user has to finish consenting at the provider.
pub const STATE_TTL: TimeDelta = TimeDelta::minutes(10);

/// What BeginConnect stored, keyed by a hash of the state (the state itself is a bearer value).
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingConnect {
    pub workspace: String,
    pub connector_id: String,
    pub user_id: String,
    verifier: Secret,
    redirect_uri: String,
    pub return_url: String,
    pub expires_at: DateTime<Utc>,
}

impl PendingConnect {
    fn check_fresh(&self, now: DateTime<Utc>) -> Result<(), OAuthError> {
        if now > self.expires_at {
            return Err(OAuthError::StateExpired);
        }
        Ok(())
    }
}

pub struct Started {
    pub authorization_url: String,
    pub state: String,
    pub expires_at: DateTime<Utc>,
}

pub struct Completed {
    pub connector: Connector,
    pub connection: Connection,
    pub return_url: String,
}

fn state_key(state: &str) -> String {
    hex::encode(sha2::Sha256::digest(state.as_bytes()))
}

/// Where a browser may be sent back after consenting: the configured origins (`[http]
/// return_origins`, https only) and, when `[http] return_loopback` is set (`credbroker dev`,
/// the tests), any loopback host. Anything else would make the broker's origin an open
/// redirect.
#[derive(Debug, Clone, Default)]
pub struct ReturnOrigins {
    origins: Vec<String>,
    loopback: bool,
}

impl ReturnOrigins {
    /// Checks each configured origin: `https://host[:port]`, nothing after it.
    pub fn new(origins: &[String], loopback: bool) -> Result<Self, String> {
        let origins = origins
            .iter()
            .map(|o| match reqwest::Url::parse(o) {
                Ok(u)
                    if u.scheme() == "https"
                        && u.host().is_some()
                        && u.path() == "/"
                        && u.query().is_none()
                        && u.username().is_empty() =>
                {
                    Ok(u.origin().ascii_serialization())
                }
                _ => Err(format!(
                    "[http] return_origins: {o:?} must be an https://host[:port] origin"
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { origins, loopback })
    }

    /// A return URL is where a browser is sent afterwards: empty, or an absolute URL on an
    /// allowed origin.
    fn check(&self, url: &str) -> Result<(), FieldError> {
        if url.is_empty() {
            return Ok(());
        }
        let allowed = reqwest::Url::parse(url).is_ok_and(|u| {
            let loopback = match u.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            let web = matches!(u.scheme(), "https" | "http");
            (u.scheme() == "https" && self.origins.contains(&u.origin().ascii_serialization()))
                || (self.loopback && loopback && web)
        });
        if allowed {
            Ok(())
        } else {
            Err(FieldError::new(
                "return_url",
                "must be an https:// URL on an origin the broker is configured for ([http] return_origins), or empty",
            ))
        }
    }
}

impl OAuth {
    /// Limits where BeginConnect may send browsers back (by default, nowhere: an empty
    /// `return_url` only).
    pub fn with_return_origins(mut self, origins: ReturnOrigins) -> Self {
        self.return_origins = origins;
        self
    }

    fn redirect_uri(&self, endpoints: &Endpoints) -> String {
        endpoints
            .redirect_uri
            .clone()
            .unwrap_or_else(|| self.callback_url.clone())
    }

    /// Starts connecting (or reconnecting) the target's account.
    pub async fn begin(
        &self,
        target: &Target,
        return_url: &str,
        extra_scopes: &[String],
        login_hint: &str,
    ) -> Result<Started, OAuthError> {
        let connector = &target.connector;
        if connector.kind != Kind::Oauth2 {
            return Err(OAuthError::NotOAuth {
                connector: connector.name.clone(),
            });
        }
        self.return_origins.check(return_url)?;
        let endpoints = Endpoints::of(connector)?;
        if endpoints.grant == Grant::ClientCredentials {
            return Err(FieldError::new(
                "connection",
                "this connector uses client credentials: it needs no consent, resolve it directly",
            )
            .into());
        }
        let auth_url = endpoints.auth_url.clone().unwrap_or_default();
        let redirect_uri = self.redirect_uri(&endpoints);
        let client = BasicClient::new(ClientId::new(endpoints.client_id.clone()))
            .set_auth_uri(
                AuthUrl::new(auth_url)
                    .map_err(|e| FieldError::new("config.auth_url", e.to_string()))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(redirect_uri.clone())
                    .map_err(|e| FieldError::new("config.redirect_uri", e.to_string()))?,
            );
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let state = hex::encode(crate::vault::random_bytes::<32>());
        let mut request = client
            .authorize_url(|| CsrfToken::new(state.clone()))
            .set_pkce_challenge(challenge);
        for scope in endpoints.scopes.iter().chain(extra_scopes) {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        for (name, value) in &endpoints.auth_params {
            request = request.add_extra_param(name.clone(), value.clone());
        }
        if !login_hint.is_empty() {
            request = request.add_extra_param("login_hint", login_hint.to_string());
        }
        if let Some(resource) = &endpoints.resource {
            request = request.add_extra_param("resource", resource.clone());
        }
        let (url, _) = request.url();
        let expires_at = Utc::now() + STATE_TTL;
        let pending = PendingConnect {
            workspace: connector.workspace.clone(),
            connector_id: connector.id.clone(),
            user_id: target.connection_user.clone(),
            verifier: Secret::new(verifier.secret().clone()),
            redirect_uri,
            return_url: return_url.to_string(),
            expires_at,
        };
        self.registry
            .save_oauth_state(&state_key(&state), &pending)
            .await?;
        Ok(Started {
            authorization_url: url.to_string(),
            state,
            expires_at,
        })
    }

    /// Takes a state out of the store: a state works once, and only before it expires.
    pub async fn take_state(&self, state: &str) -> Result<PendingConnect, OAuthError> {
        self.take_state_if(state, |_| Ok(())).await
    }

    /// [`OAuth::take_state`] once `admit` accepts the pending connection the state names: a
    /// caller `admit` refuses leaves the state in place, so it cannot burn someone else's link.
    pub async fn take_state_if<E: From<OAuthError>>(
        &self,
        state: &str,
        admit: impl FnOnce(&PendingConnect) -> Result<(), E>,
    ) -> Result<PendingConnect, E> {
        if state.is_empty() || state.len() > 256 {
            return Err(OAuthError::UnknownState.into());
        }
        let key = state_key(state);
        let _one_at_a_time = self.states.lock().await;
        let found = self.registry.oauth_state::<PendingConnect>(&key).await;
        let pending = found
            .map_err(OAuthError::from)?
            .ok_or(OAuthError::UnknownState)?;
        admit(&pending)?;
        self.registry
            .take_oauth_state::<PendingConnect>(&key)
            .await
            .map_err(OAuthError::from)?
            .ok_or(OAuthError::UnknownState)?;
        pending.check_fresh(Utc::now())?;
        Ok(pending)
    }

    /// Finishes a connection: exchanges the code (with the PKCE verifier), asks the provider
    /// who the account is, and stores the tokens.
    pub async fn complete(
        &self,
        pending: PendingConnect,
        code: &str,
    ) -> Result<Completed, OAuthError> {
        if code.is_empty() || code.len() > 4096 {
            return Err(FieldError::new(
                "code",
                "must be the authorization code the provider returned",
            )
            .into());
        }
        let connector = self
            .registry
            .find_connector(&pending.workspace, &pending.connector_id)
            .await?;
        let endpoints = Endpoints::of(&connector)?;
        let client = self
            .token_client(&connector, &endpoints)
            .await?
            .set_redirect_uri(
                RedirectUrl::new(pending.redirect_uri.clone())
                    .map_err(|e| FieldError::new("config.redirect_uri", e.to_string()))?,
            );
        let http = http::client(endpoints.ca_pem.as_deref(), self.timeout)?;
        let sender = http::Sender(http);
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.expose().to_string()))
            .request_async(&sender)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => OAuthError::Refused(r.to_string()),
                other => unavailable(other),
            })?;
        let access = Secret::new(response.access_token().secret().clone());
        let account_label = match &endpoints.userinfo_url {
            Some(url) => match http::identity(&sender.0, url, &access).await? {
                Identity::Document(doc) => {
                    label_at(&doc, &endpoints.account_label_field).unwrap_or_default()
                }
                Identity::Refused(status) => {
                    return Err(OAuthError::Refused(format!(
                        "the identity endpoint refused the new token (HTTP {status})"
                    )));
                }
            },
            None => String::new(),
        };
        let now = Utc::now();
        let user = &pending.user_id;
        let mut connection = self
            .registry
            .connection(&connector, user)
            .await?
            .unwrap_or_else(|| Connection::new(&connector.id, user));
        connection.status = ConnectionStatus::Connected;
        connection.account_label = account_label;
        connection.connected_at = Some(now);
        connection.last_refreshed_at = Some(now);
        connection.access_expires_at = Some(expiry(now, response.expires_in()));
        connection.last_error.clear();
        connection.scopes = response
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect())
            .unwrap_or_else(|| endpoints.scopes.clone());
        let mut secrets = ConnectionSecrets::default();
        secrets.slots.insert("access_token".into(), access);
        if let Some(refresh) = response.refresh_token() {
            secrets.slots.insert(
                "refresh_token".into(),
                Secret::new(refresh.secret().clone()),
            );
        }
        self.registry
            .save_connection(&connection, Some(&secrets))
            .await?;
        self.backoff_clear(&crate::model::connection_path(&connector.id, user));
        Ok(Completed {
            connector,
            connection,
            return_url: pending.return_url,
        })
    }

    /// Disconnects an OAuth connection: revokes at the provider where it can, then erases the
    /// tokens. Returns the connection as it now is and whether the provider confirmed.
    pub async fn disconnect(&self, target: &Target) -> Result<(Connection, bool), OAuthError> {
        let connector = &target.connector;
        let user = &target.connection_user;
        if connector.kind != Kind::Oauth2 {
            return Err(OAuthError::NotOAuth {
                connector: connector.name.clone(),
            });
        }
        if self.registry.connection(connector, user).await?.is_none() {
            return Err(crate::driver::ConnectionError::not_connected(connector, user).into());
        }
        let revoked = self.revoke(connector, user).await?;
        self.registry.delete_connection(connector, user).await?;
        self.client_tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&connector.id);
        self.backoff_clear(&crate::model::connection_path(&connector.id, user));
        Ok((Connection::new(&connector.id, user), revoked))
    }

    /// Revokes the connection's grant at the provider, if it has a revocation endpoint.
    /// Returns whether the provider confirmed; the caller erases the tokens either way.
    async fn revoke(&self, connector: &Connector, user: &str) -> Result<bool, OAuthError> {
        let endpoints = Endpoints::of(connector)?;
        let Some(url) = &endpoints.revocation_url else {
            return Ok(false);
        };
        let secrets = self.registry.connection_secrets(connector, user).await?;
        let token = match (secrets.get("refresh_token"), secrets.get("access_token")) {
            (Some(refresh), _) => StandardRevocableToken::RefreshToken(oauth2::RefreshToken::new(
                refresh.expose().to_string(),
            )),
            (None, Some(access)) => StandardRevocableToken::AccessToken(oauth2::AccessToken::new(
                access.expose().to_string(),
            )),
            (None, None) => return Ok(false),
        };
        let client = self
            .token_client(connector, &endpoints)
            .await?
            .set_revocation_url(
                RevocationUrl::new(url.clone())
                    .map_err(|e| FieldError::new("config.revocation_url", e.to_string()))?,
            );
        let http = http::client(endpoints.ca_pem.as_deref(), self.timeout)?;
        let sender = http::Sender(http);
        let revoked = match client.revoke_token(token) {
            Ok(request) => request.request_async(&sender).await,
            Err(e) => {
                tracing::warn!(connector = %connector.id, error = %e, "revocation not attempted");
                return Ok(false);
            }
        };
        match revoked {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::warn!(connector = %connector.id, error = %describe(&e), "revocation failed; erasing the tokens anyway");
                Ok(false)
            }
        }
    }
}

/// How often states past their life are swept from the store.
pub const STATE_SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

impl OAuth {
    /// Removes the states that expired before `now`; returns how many.
    pub async fn sweep_states(&self, now: DateTime<Utc>) -> Result<usize, OAuthError> {
        let _one_at_a_time = self.states.lock().await;
        Ok(self
            .registry
            .sweep_oauth_states(|p: &PendingConnect| p.check_fresh(now).is_err())
            .await?)
    }

    /// Sweeps expired states every [`STATE_SWEEP_EVERY`] for as long as the service lives.
    pub fn start_state_sweep(self: &std::sync::Arc<Self>) {
        let oauth = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(STATE_SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(oauth) = oauth.upgrade() else { return };
                match oauth.sweep_states(Utc::now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "expired OAuth states swept"),
                    Err(e) => tracing::warn!(error = %e, "sweeping expired OAuth states failed"),
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expired_states_are_swept_and_live_ones_kept() {
        use crate::vault::{KeySource, generate_key_file};
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        generate_key_file(&key).unwrap();
        let config = crate::config::StoreConfig::at(dir.path().join("db"));
        let store = crate::store::Store::create(&config, &KeySource::KeyFile(key))
            .await
            .unwrap();
        let registry = std::sync::Arc::new(crate::model::Registry::new(
            std::sync::Arc::new(store),
            &crate::driver::DRIVERS,
        ));
        let oauth = OAuth::new(
            registry.clone(),
            String::new(),
            std::time::Duration::from_secs(1),
        );
        let now = Utc::now();
        // 600 states (more than a page): a third expired a minute ago, the rest live.
        for i in 0..600 {
            let pending = PendingConnect {
                workspace: "default".into(),
                connector_id: "cn_x".into(),
                user_id: format!("u{i}"),
                verifier: Secret::new("v"),
                redirect_uri: String::new(),
                return_url: String::new(),
                expires_at: if i % 3 == 0 {
                    now - TimeDelta::minutes(1)
                } else {
                    now + STATE_TTL
                },
            };
            registry
                .save_oauth_state(&state_key(&format!("s{i}")), &pending)
                .await
                .unwrap();
        }
        assert_eq!(oauth.sweep_states(now).await.unwrap(), 200);
        assert_eq!(oauth.sweep_states(now).await.unwrap(), 0);
        for i in 0..600 {
            let taken = oauth.take_state(&format!("s{i}")).await;
            if i % 3 == 0 {
                assert!(matches!(taken, Err(OAuthError::UnknownState)), "s{i}");
            } else {
                assert_eq!(taken.unwrap().user_id, format!("u{i}"));
            }
        }
        // Past their life, the rest go too.
        let later = now + STATE_TTL + TimeDelta::seconds(1);
        assert_eq!(oauth.sweep_states(later).await.unwrap(), 0, "all taken");
    }

    #[test]
    fn a_stale_state_is_refused_and_return_urls_are_checked() {
        let pending = PendingConnect {
            workspace: "default".into(),
            connector_id: "cn_x".into(),
            user_id: String::new(),
            verifier: Secret::new("v"),
            redirect_uri: "https://127.0.0.1/oauth/callback".into(),
            return_url: String::new(),
            expires_at: Utc::now(),
        };
        assert!(
            pending
                .check_fresh(Utc::now() - TimeDelta::seconds(1))
                .is_ok()
        );
        assert!(matches!(
            pending.check_fresh(Utc::now() + TimeDelta::seconds(1)),
            Err(OAuthError::StateExpired)
        ));
        let origins = ReturnOrigins::new(&["https://console.example".into()], false).unwrap();
        assert!(origins.check("https://console.example/settings").is_ok());
        assert!(origins.check("").is_ok());
        for refused in [
            "http://console.example/settings",
            "https://console.example.evil.test/",
            "https://evil.test/",
            "https://127.0.0.1/",
            "javascript:alert(1)",
            "/relative",
        ] {
            assert!(origins.check(refused).is_err(), "{refused}");
        }
        let dev = ReturnOrigins::new(&[], true).unwrap();
        assert!(dev.check("http://127.0.0.1:8080/back").is_ok());
        assert!(dev.check("http://localhost/back").is_ok());
        assert!(dev.check("https://evil.test/").is_err());
        for bad in ["http://console.example", "https://x.test/path", "x"] {
            assert!(ReturnOrigins::new(&[bad.into()], false).is_err(), "{bad}");
        }
    }
}
