//! The authorization-code flow: BeginConnect makes the authorization URL (PKCE S256, a
//! single-use state kept encrypted for ten minutes) and pins the connector's endpoints in the
//! pending state; the broker's start link binds the browser ([`super::binding`]); the callback
//! or CompleteConnect exchanges the code, reads the account label and stores the tokens.
//! Reconnect is the same flow on an existing connection. Disconnect revokes at the provider
//! where it can.
//!
//! Invariant: the code goes only to the token endpoint pinned at BeginConnect, and only while
//! the connector's destination ([`Endpoints::destination`]) is still the pinned one — tokens of
//! one provider are never stored under a connector that now points elsewhere.

use chrono::{DateTime, TimeDelta, Utc};
use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, RequestTokenError, RevocationUrl, Scope, StandardRevocableToken, TokenResponse,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use super::binding::{self, CALLBACK_PATH, START_PATH};
use super::catalog::{Endpoints, Grant, label_at};
use super::http::{self, Identity};
use super::{OAuth, OAuthError, describe, expiry, unavailable};
use crate::events::{Detail, Occurred};
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
    /// The provider's authorization URL, where the start link sends the bound browser.
    #[serde(default)]
    authorize_url: String,
    /// SHA-256 of the cookie of the browser that opened the start link; none until one did.
    #[serde(default)]
    browser: Option<String>,
    /// The connector's endpoints at BeginConnect (none in a state written before they were
    /// pinned: such a state cannot be completed).
    #[serde(default)]
    endpoints: Option<Endpoints>,
    /// The scopes asked for beyond the connector's (incremental consent).
    #[serde(default)]
    extra_scopes: Vec<String>,
}

impl PendingConnect {
    fn check_fresh(&self, now: DateTime<Utc>) -> Result<(), OAuthError> {
        if now > self.expires_at {
            return Err(OAuthError::StateExpired);
        }
        Ok(())
    }

    /// Refuses any browser but the one that opened the start link (its cookie).
    pub fn check_browser(&self, cookie: Option<&str>) -> Result<(), OAuthError> {
        match &self.browser {
            Some(bound) if binding::matches(bound, cookie) => Ok(()),
            _ => Err(OAuthError::OtherBrowser),
        }
    }

    /// The endpoints pinned at BeginConnect, while the connector's destination is still theirs.
    fn pinned(&self, connector: &Connector) -> Result<Endpoints, OAuthError> {
        let pinned = self.endpoints.clone().ok_or(OAuthError::StateExpired)?;
        if Endpoints::of(connector)?.destination() != pinned.destination() {
            return Err(OAuthError::ConnectorChanged {
                connector: connector.name.clone(),
            });
        }
        Ok(pinned)
    }
}

pub struct Started {
    /// The broker's start link when the broker receives the callback; the provider's URL when
    /// the connector names its own `redirect_uri` (the platform binds the browser then).
    pub authorization_url: String,
    pub state: String,
    pub expires_at: DateTime<Utc>,
}

/// Where the start link sends a browser, and the binding cookie to set (no `Debug`: the cookie
/// is a bearer value).
pub struct Opened {
    pub location: String,
    pub cookie: String,
}

pub struct Completed {
    pub connector: Connector,
    pub connection: Connection,
    pub return_url: String,
}

fn state_key(state: &str) -> String {
    hex::encode(sha2::Sha256::digest(state.as_bytes()))
}

/// The store key of a state a browser or caller presented, if it can be one.
fn checked_key(state: &str) -> Result<String, OAuthError> {
    if state.is_empty() || state.len() > 256 {
        return Err(OAuthError::UnknownState);
    }
    Ok(state_key(state))
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

    /// The broker's start link (`{public_url}/oauth/start`).
    fn start_url(&self) -> String {
        let base = self
            .callback_url
            .strip_suffix(CALLBACK_PATH)
            .unwrap_or(&self.callback_url);
        format!("{base}{START_PATH}")
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
        let redirect_uri = self.redirect_uri(&endpoints);
        let state = hex::encode(crate::vault::random_bytes::<32>());
        let (authorize_url, verifier) =
            authorization_request(&endpoints, &redirect_uri, &state, extra_scopes, login_hint)?;
        // Where the broker receives the callback, it binds the browser first.
        let authorization_url = if redirect_uri == self.callback_url {
            format!("{}?state={state}", self.start_url())
        } else {
            authorize_url.clone()
        };
        let expires_at = Utc::now() + STATE_TTL;
        let pending = PendingConnect {
            workspace: connector.workspace.clone(),
            connector_id: connector.id.clone(),
            user_id: target.connection_user.clone(),
            verifier: Secret::new(verifier.secret().clone()),
            redirect_uri,
            return_url: return_url.to_string(),
            expires_at,
            authorize_url,
            browser: None,
            endpoints: Some(endpoints),
            extra_scopes: extra_scopes.to_vec(),
        };
        self.registry
            .save_oauth_state(&state_key(&state), &pending)
            .await?;
        Ok(Started {
            authorization_url,
            state,
            expires_at,
        })
    }

    /// The start link: on the first open, binds the browser (its earlier cookie, or a new one)
    /// to the state; returns where to send it at the provider and the cookie to set. Another
    /// browser is refused and changes nothing. `note` sees the pending connection (for the
    /// audit) before any check.
    pub async fn open_start(
        &self,
        state: &str,
        cookie: Option<&str>,
        note: impl FnOnce(&PendingConnect),
    ) -> Result<Opened, OAuthError> {
        let key = checked_key(state)?;
        let _one_at_a_time = self.states.lock().await;
        let mut pending = self
            .registry
            .oauth_state::<PendingConnect>(&key)
            .await?
            .ok_or(OAuthError::UnknownState)?;
        note(&pending);
        pending.check_fresh(Utc::now())?;
        if pending.authorize_url.is_empty() {
            return Err(OAuthError::StateExpired);
        }
        let cookie = match &pending.browser {
            Some(_) => {
                pending.check_browser(cookie)?;
                cookie.unwrap_or_default().to_string()
            }
            None => {
                let value = cookie
                    .filter(|c| binding::well_formed(c))
                    .map_or_else(binding::new_cookie, str::to_string);
                pending.browser = Some(binding::digest(&value));
                self.registry.save_oauth_state(&key, &pending).await?;
                value
            }
        };
        Ok(Opened {
            location: pending.authorize_url,
            cookie,
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
        let key = checked_key(state)?;
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

    /// Finishes a connection: checks the response's issuer, exchanges the code (with the PKCE
    /// verifier) at the pinned token endpoint, asks the provider who the account is, and stores
    /// the tokens.
    pub async fn complete(
        &self,
        pending: PendingConnect,
        code: &str,
        iss: Option<&str>,
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
        let endpoints = pending.pinned(&connector)?;
        binding::check_issuer(&endpoints, iss)?;
        let sender = http::Sender(http::client(endpoints.ca_pem.as_deref(), self.timeout)?);
        let response = self
            .exchange_code(&connector, &endpoints, &sender, &pending, code)
            .await?;
        let access = Secret::new(response.access_token().secret().clone());
        let account_label = account_label(&sender, &endpoints, &access).await?;
        let connection = self
            .save_connected(
                &connector,
                &pending,
                &endpoints,
                &response,
                (access, account_label),
            )
            .await?;
        Ok(Completed {
            connector,
            connection,
            return_url: pending.return_url,
        })
    }

    async fn exchange_code(
        &self,
        connector: &Connector,
        endpoints: &Endpoints,
        sender: &http::Sender,
        pending: &PendingConnect,
        code: &str,
    ) -> Result<oauth2::basic::BasicTokenResponse, OAuthError> {
        let client = self
            .token_client(connector, endpoints)
            .await?
            .set_redirect_uri(
                RedirectUrl::new(pending.redirect_uri.clone())
                    .map_err(|e| FieldError::new("config.redirect_uri", e.to_string()))?,
            );
        client
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.expose().to_string()))
            .request_async(sender)
            .await
            .map_err(|e| match e {
                RequestTokenError::ServerResponse(r) => OAuthError::Refused(r.to_string()),
                other => unavailable(other),
            })
    }

    /// Stores a newly connected account's tokens, with the scopes the token response says were
    /// granted (or, when it names none, those that were asked for).
    async fn save_connected(
        &self,
        connector: &Connector,
        pending: &PendingConnect,
        endpoints: &Endpoints,
        response: &oauth2::basic::BasicTokenResponse,
        (access, account_label): (Secret, String),
    ) -> Result<Connection, OAuthError> {
        let (now, user) = (Utc::now(), pending.user_id.as_str());
        let previous = self.registry.connection(connector, user).await?;
        let kind = crate::events::EventKind::on_connect(previous.as_ref());
        let mut connection = previous.unwrap_or_else(|| Connection::new(&connector.id, user));
        connection.status = ConnectionStatus::Connected;
        connection.account_label = account_label;
        connection.connected_at = Some(now);
        connection.last_refreshed_at = Some(now);
        connection.access_expires_at = Some(expiry(now, response.expires_in()));
        connection.next_refresh_at = self.refresh.policy.keepalive_next(connector, now);
        connection.last_error.clear();
        connection.scopes = response
            .scopes()
            .map(|s| s.iter().map(|s| s.to_string()).collect())
            .unwrap_or_else(|| requested_scopes(&endpoints.scopes, &pending.extra_scopes));
        let mut secrets = ConnectionSecrets::default();
        secrets.slots.insert("access_token".into(), access);
        if let Some(refresh) = response.refresh_token() {
            secrets.slots.insert(
                "refresh_token".into(),
                Secret::new(refresh.secret().clone()),
            );
        }
        let event = Occurred::new(kind, connector, user, Detail::NONE);
        self.registry
            .save_connection(&connection, Some(&secrets), Some(event))
            .await?;
        self.backoff_clear(&crate::model::connection_path(&connector.id, user));
        Ok(connection)
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
        let gone = crate::events::EventKind::Disconnected;
        let detail = Detail::new(if revoked { "revoked" } else { "" }, "");
        let event = Occurred::new(gone, connector, user, detail);
        self.registry
            .delete_connection(connector, user, Some(event))
            .await?;
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

/// The connector's scopes and the extra ones asked for, each once, in order.
fn requested_scopes(scopes: &[String], extra: &[String]) -> Vec<String> {
    let mut all: Vec<String> = Vec::with_capacity(scopes.len() + extra.len());
    for scope in scopes.iter().chain(extra) {
        if !all.contains(scope) {
            all.push(scope.clone());
        }
    }
    all
}

/// The provider's authorization URL for one state, and the PKCE verifier that goes with it.
fn authorization_request(
    endpoints: &Endpoints,
    redirect_uri: &str,
    state: &str,
    extra_scopes: &[String],
    login_hint: &str,
) -> Result<(String, PkceCodeVerifier), FieldError> {
    let auth_url = endpoints.auth_url.clone().unwrap_or_default();
    let client = BasicClient::new(ClientId::new(endpoints.client_id.clone()))
        .set_auth_uri(
            AuthUrl::new(auth_url)
                .map_err(|e| FieldError::new("config.auth_url", e.to_string()))?,
        )
        .set_redirect_uri(
            RedirectUrl::new(redirect_uri.to_string())
                .map_err(|e| FieldError::new("config.redirect_uri", e.to_string()))?,
        );
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(|| CsrfToken::new(state.to_string()))
        .set_pkce_challenge(challenge);
    for scope in requested_scopes(&endpoints.scopes, extra_scopes) {
        request = request.add_scope(Scope::new(scope));
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
    Ok((url.to_string(), verifier))
}

/// Who the new token belongs to, from the identity endpoint (empty without one).
async fn account_label(
    sender: &http::Sender,
    endpoints: &Endpoints,
    access: &Secret,
) -> Result<String, OAuthError> {
    let Some(url) = &endpoints.userinfo_url else {
        return Ok(String::new());
    };
    match http::identity(&sender.0, url, access).await? {
        Identity::Document(doc) => {
            Ok(label_at(&doc, &endpoints.account_label_field).unwrap_or_default())
        }
        Identity::Refused(status) => Err(OAuthError::Refused(format!(
            "the identity endpoint refused the new token (HTTP {status})"
        ))),
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

    /// An OAuth service on a fresh store in `dir`.
    async fn service(dir: &std::path::Path) -> (OAuth, std::sync::Arc<crate::model::Registry>) {
        use crate::vault::{KeySource, generate_key_file};
        let key = dir.join("key");
        generate_key_file(&key).unwrap();
        let config = crate::config::StoreConfig::at(dir.join("db"));
        let store = crate::store::Store::create(&config, &KeySource::KeyFile(key))
            .await
            .unwrap();
        let registry = std::sync::Arc::new(crate::model::Registry::new(
            std::sync::Arc::new(store),
            &crate::driver::DRIVERS,
        ));
        let oauth = OAuth::new(
            registry.clone(),
            "https://broker.test/oauth/callback".into(),
            std::time::Duration::from_secs(1),
        );
        (oauth, registry)
    }

    fn connector(extra: &[(&str, &str)]) -> Connector {
        let mut config = vec![
            ("client_id", "c"),
            ("auth_url", "https://as.test/auth"),
            ("token_url", "https://as.test/token"),
            ("userinfo_url", "https://as.test/me"),
        ];
        config.extend_from_slice(extra);
        Connector::for_tests(Kind::Oauth2, crate::model::Mode::Personal, &config)
    }

    #[tokio::test]
    async fn the_start_link_binds_one_browser_and_only_it_may_finish() {
        let dir = tempfile::tempdir().unwrap();
        let (oauth, registry) = service(dir.path()).await;
        let target = Target {
            connector: connector(&[]),
            connection_user: "u1".into(),
            on_behalf_of: "u1".into(),
        };
        let started = oauth.begin(&target, "", &[], "").await.unwrap();
        assert_eq!(
            started.authorization_url,
            format!("https://broker.test/oauth/start?state={}", started.state)
        );
        let state = started.state.as_str();
        let mut noted = String::new();
        let a = oauth
            .open_start(state, None, |p| noted = p.user_id.clone())
            .await
            .unwrap();
        assert_eq!(noted, "u1");
        assert!(
            a.location.starts_with("https://as.test/auth?"),
            "{}",
            a.location
        );
        assert!(a.location.contains(&format!("state={state}")));
        assert!(binding::well_formed(&a.cookie));
        // Another browser, with or without a cookie of its own, is refused; A may reopen.
        let b = binding::new_cookie();
        for other in [None, Some(b.as_str()), Some("junk")] {
            let refused = oauth.open_start(state, other, |_| {}).await;
            assert!(
                matches!(refused, Err(OAuthError::OtherBrowser)),
                "{other:?}"
            );
        }
        let again = oauth.open_start(state, Some(&a.cookie), |_| {}).await;
        assert_eq!(again.unwrap().cookie, a.cookie);
        // The callback in B's browser is refused and leaves the state for A's.
        let refused = oauth
            .take_state_if(state, |p| p.check_browser(Some(&b)))
            .await;
        assert!(matches!(refused, Err(OAuthError::OtherBrowser)));
        let refused = oauth.take_state_if(state, |p| p.check_browser(None)).await;
        assert!(matches!(refused, Err(OAuthError::OtherBrowser)));
        let pending = oauth
            .take_state_if(state, |p| p.check_browser(Some(&a.cookie)))
            .await
            .unwrap();
        assert_eq!(pending.user_id, "u1");
        // A browser that already holds a binding cookie keeps it for its next link.
        let next = oauth.begin(&target, "", &[], "").await.unwrap();
        let opened = oauth
            .open_start(&next.state, Some(&a.cookie), |_| {})
            .await
            .unwrap();
        assert_eq!(opened.cookie, a.cookie);
        // The store keeps only the cookie's digest.
        let kept: PendingConnect = registry
            .oauth_state(&state_key(&next.state))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kept.browser, Some(binding::digest(&a.cookie)));
        assert!(!serde_json::to_string(&kept).unwrap().contains(&a.cookie));
    }

    #[tokio::test]
    async fn a_connector_with_its_own_redirect_gets_the_provider_url() {
        let dir = tempfile::tempdir().unwrap();
        let (oauth, _) = service(dir.path()).await;
        let target = Target {
            connector: connector(&[("redirect_uri", "https://app.test/oauth/back")]),
            connection_user: "u1".into(),
            on_behalf_of: "u1".into(),
        };
        let started = oauth.begin(&target, "", &[], "").await.unwrap();
        assert!(
            started
                .authorization_url
                .starts_with("https://as.test/auth?"),
            "{}",
            started.authorization_url
        );
    }

    #[tokio::test]
    async fn extra_scopes_are_asked_for_and_google_keeps_those_granted_before() {
        let dir = tempfile::tempdir().unwrap();
        let (oauth, _) = service(dir.path()).await;
        let mut google = connector(&[("scopes", "openid email")]);
        google.provider = "google-mail".into();
        let target = Target {
            connector: google,
            connection_user: "u1".into(),
            on_behalf_of: "u1".into(),
        };
        let extra = [
            "https://www.googleapis.com/auth/calendar".to_string(),
            "email".into(),
        ];
        let started = oauth.begin(&target, "", &extra, "").await.unwrap();
        let opened = oauth
            .open_start(&started.state, None, |_| {})
            .await
            .unwrap();
        let url = reqwest::Url::parse(&opened.location).unwrap();
        let query: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        // Each scope once, the connector's first.
        assert_eq!(
            query["scope"],
            "openid email https://www.googleapis.com/auth/calendar"
        );
        assert_eq!(query["include_granted_scopes"], "true");
        // A generic connector asks for no incremental consent of its own.
        let generic = Target {
            connector: connector(&[]),
            ..target
        };
        let started = oauth.begin(&generic, "", &extra, "").await.unwrap();
        let opened = oauth
            .open_start(&started.state, None, |_| {})
            .await
            .unwrap();
        assert!(!opened.location.contains("include_granted_scopes"));
        assert_eq!(
            requested_scopes(&["a".into(), "b".into()], &["b".into(), "c".into()]),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn the_callback_keeps_to_the_endpoints_pinned_at_begin() {
        let at_begin = connector(&[("scopes", "a")]);
        let pending = PendingConnect {
            workspace: "default".into(),
            connector_id: at_begin.id.clone(),
            user_id: "u1".into(),
            verifier: Secret::new("v"),
            redirect_uri: String::new(),
            return_url: String::new(),
            expires_at: Utc::now(),
            authorize_url: String::new(),
            browser: None,
            endpoints: Some(Endpoints::of(&at_begin).unwrap()),
            extra_scopes: Vec::new(),
        };
        let pinned = pending.pinned(&at_begin).unwrap();
        assert_eq!(pinned.token_url, "https://as.test/token");
        // Scopes may change meanwhile; the pinned ones are used.
        let rescoped = connector(&[("scopes", "a b")]);
        assert_eq!(pending.pinned(&rescoped).unwrap().scopes, ["a"]);
        for (key, moved) in [
            ("token_url", "https://evil.test/token"),
            ("userinfo_url", "https://evil.test/me"),
            ("revocation_url", "https://evil.test/revoke"),
            ("client_id", "other"),
            ("ca_pem", "-----BEGIN CERTIFICATE-----"),
            ("issuer", "https://as.test"),
            ("base_url", "https://evil.test/"),
            ("token_auth", "post"),
        ] {
            let changed = connector(&[("scopes", "a"), (key, moved)]);
            assert!(
                matches!(
                    pending.pinned(&changed),
                    Err(OAuthError::ConnectorChanged { .. })
                ),
                "{key}"
            );
        }
        let unpinned = PendingConnect {
            endpoints: None,
            ..pending
        };
        assert!(matches!(
            unpinned.pinned(&at_begin),
            Err(OAuthError::StateExpired)
        ));
    }

    #[tokio::test]
    async fn expired_states_are_swept_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (oauth, registry) = service(dir.path()).await;
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
                authorize_url: String::new(),
                browser: None,
                endpoints: None,
                extra_scopes: Vec::new(),
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
            authorize_url: String::new(),
            browser: None,
            endpoints: None,
            extra_scopes: Vec::new(),
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
