//! One driver per connector kind — [`api_key`], [`oauth2`], [`imap_smtp`], [`caldav`] — and
//! the credentials service built on them. A driver owns everything that differs between kinds:
//! the settings and secret slots its connectors and connections take ([`Schema`]) and their
//! validation, which settings name where each secret is sent ([`Destination`]), how the broker
//! gets a connection's credential, how candidate credentials are tested, and what a refusal
//! means for the connection. Drivers are registered once, in [`driver`]; the rest of the crate
//! asks the driver instead of matching on the kind.
//!
//! Invariants:
//! - only API keys and OAuth access tokens are [`ConnectorDriver::resolvable`]: passwords,
//!   refresh tokens and client secrets never leave through ResolveCredential;
//! - a credential is served only for a usable connection ([`usable_connection`]);
//! - a stored password or grant the server refuses expires the connection
//!   ([`expire_refused`]), whoever found out (mail, calendar, a connection test, OAuth).

mod api_key;
mod caldav;
mod connection;
mod imap_smtp;
mod oauth2;

pub use connection::{
    ConnectionError, expire_refused, for_user, usable_connection, usable_connection_with_secrets,
};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use crate::model::{
    Connection, Connector, ConnectorDraft, ConnectorRules, Dependents, FieldError, Kind, Mode,
    ModelError, Registry, Secret, Stage, Target, TestReport, validate_config, validate_secret,
};
use crate::oauth::{OAuth, OAuthError};

/// The settings and secret slots of one kind: the schema the API validates against. An unknown
/// key is an error that lists the known ones.
#[derive(Debug)]
pub struct Schema {
    /// Keys of the connector's (admin-set, non-secret) configuration.
    pub config: &'static [&'static str],
    /// Secret slots of the connector itself.
    pub connector_secrets: &'static [&'static str],
    /// Keys of a connection's (user-given, non-secret) settings.
    pub settings: &'static [&'static str],
    /// Secret slots of a connection.
    pub connection_secrets: &'static [&'static str],
    /// Which settings name where each secret may be sent: the one list of them (UpdateConnector
    /// erases what a change moves, candidates may not move a stored secret).
    pub destinations: &'static [Destination],
    /// The service every connector of the kind serves besides ResolveCredential, if any.
    pub service: Option<Service>,
}

/// The settings (a connection's, over its connector's config) that name where a secret goes:
/// hosts, ports, URLs, the CA that says who the server is, the header it is sent in, the
/// connector signed in through. A secret is meant for that destination only: a change of any
/// of them without the secret in the same request erases it ([`Registry::update_connector`]).
#[derive(Debug)]
pub struct Destination {
    pub secret: &'static str,
    pub settings: &'static [&'static str],
}

/// The config key naming the OAuth connector a kind signs in through.
pub const OAUTH_CONNECTOR: &str = "oauth_connector";

/// `a` then `b`, for schemas whose key lists share a part (`N` must be their total length).
const fn keys<const N: usize>(a: &[&'static str], b: &[&'static str]) -> [&'static str; N] {
    assert!(a.len() + b.len() == N, "N is the total length");
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = if i < a.len() { a[i] } else { b[i - a.len()] };
        i += 1;
    }
    out
}

/// A connection's settings over its connector's config: where [`ConnectorDriver::destination`]
/// looks.
#[derive(Clone, Copy)]
pub struct Where<'a> {
    pub connector: &'a Connector,
    pub settings: &'a BTreeMap<String, String>,
}

/// What a driver looks a credential up with: the service, the target, how long it must last.
#[derive(Clone, Copy)]
pub struct Lookup<'a> {
    pub credentials: &'a Credentials,
    pub target: &'a Target,
    pub min_ttl: Duration,
}

/// What kind of secret a [`Credential`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    ApiKey,
    Bearer,
    /// A password the broker signs in with itself; never handed to a caller.
    Password,
}

impl Form {
    /// The ResolveCredential `token_type`.
    pub fn token_type(self) -> &'static str {
        match self {
            Form::ApiKey => "api_key",
            Form::Bearer => "Bearer",
            Form::Password => "password",
        }
    }
}

/// The credential of a connection, ready to use now.
#[derive(Debug, Clone)]
pub struct Credential {
    pub kind: Kind,
    pub form: Form,
    pub secret: Secret,
    pub expires_at: Option<DateTime<Utc>>,
    pub scopes: Vec<String>,
    pub account_label: String,
    pub header_name: String,
    pub header_prefix: String,
    /// The connection the secret was read with (None for OAuth tokens): a driver whose
    /// destination is in the connection's settings (a user's own IMAP or CalDAV server) takes
    /// them from here, never from a second read that a reconnect could land between.
    pub connection: Option<Connection>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(
        "connector {connector:?} is a {kind} connector: it has no credential to resolve; use the mail or calendar operations"
    )]
    NotResolvable {
        connector: String,
        kind: &'static str,
    },
    #[error(transparent)]
    OAuth(OAuthError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// OAuth's connection and model errors are told like everyone else's.
impl From<OAuthError> for CredentialError {
    fn from(e: OAuthError) -> Self {
        match e {
            OAuthError::Connection(c) => c.into(),
            OAuthError::Model(m) => m.into(),
            other => CredentialError::OAuth(other),
        }
    }
}

/// Credentials offered by a user, not yet saved.
#[derive(Debug, Default, Clone)]
pub struct Candidate {
    pub settings: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Secret>,
}

/// One credentials test: what is tested, for which connection, under which deadline.
pub struct TestRun<'a> {
    pub credentials: &'a Credentials,
    pub target: &'a Target,
    pub candidate: &'a Candidate,
    pub timeout: Duration,
}

/// A service of the broker a connector may serve besides ResolveCredential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Mail,
    Calendar,
}

/// What one connector kind does. Implementations are stateless; see [`driver`].
pub trait ConnectorDriver: Send + Sync {
    fn schema(&self) -> &'static Schema;

    /// Checks a connector as an admin sets it: provider, config and connector secrets.
    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
        check_plain(self.schema(), draft)
    }

    /// Where each secret of a connection would be sent, e.g. "imap.corp:993": errors name the
    /// setting that does not say it properly.
    fn destination(&self, at: Where<'_>, secret: &str) -> Result<Vec<String>, FieldError>;

    /// Checks credentials a user offers (ConnectWithCredentials, TestConnection) before anything
    /// is tried: known settings and slots, the secrets the test needs, and every value the
    /// test would use, so that malformed input is a [`FieldError`] naming the field and a
    /// test only ever reports what the upstream said.
    /// Known keys and slots are checked before ([`check_candidate`]).
    fn check_candidate(
        &self,
        connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
        check_required(candidate, self.typed_in(connector)?)
    }

    /// Whether a user may connect this connector with typed-in credentials
    /// (ConnectWithCredentials), and which secrets they must give.
    fn typed_in(&self, connector: &Connector) -> Result<&'static [&'static str], FieldError> {
        let _ = connector;
        Ok(self.schema().connection_secrets)
    }

    /// True when the credential is a secret of the connector, not of a connection (a shared API
    /// key): it is set and cleared on the connector.
    fn credential_on_connector(&self, mode: Mode) -> bool {
        let _ = mode;
        false
    }

    /// Whether ResolveCredential may hand this kind's credential to a caller. The use of a
    /// resolvable credential is recorded as it is served; any other is recorded by the mail or
    /// calendar call that used it, once the call worked.
    fn resolvable(&self) -> bool {
        false
    }

    /// Whether a connector of this kind can serve `service`.
    fn serves(&self, connector: &Connector, service: Service) -> bool {
        let _ = connector;
        self.schema().service == Some(service)
    }

    /// The credential of a stored connection, current (an OAuth token refreshed first if it has
    /// less than `min_ttl` left).
    fn credential<'a>(
        &'a self,
        at: Lookup<'a>,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>>;

    /// Tests credentials (a candidate's, or the stored ones) against the upstream.
    fn test<'a>(&'a self, run: TestRun<'a>) -> BoxFuture<'a, TestReport>;

    /// What a refusal of these stored secrets by the upstream means: true when it expires the
    /// connection (a password the user typed in no longer works).
    fn refusal_expires(&self, connector: &Connector, secrets: &BTreeMap<String, Secret>) -> bool {
        let _ = (connector, secrets);
        false
    }
}

/// The header a bearer credential goes in, unless an API-key connector names another.
const AUTHORIZATION: &str = "Authorization";
const BEARER_PREFIX: &str = "Bearer ";

/// The driver of a kind: the one registration of every kind.
pub fn driver(kind: Kind) -> &'static dyn ConnectorDriver {
    match kind {
        Kind::ApiKey => &api_key::ApiKey,
        Kind::Oauth2 => &oauth2::OAuth2,
        Kind::ImapSmtp => &imap_smtp::ImapSmtp,
        Kind::Caldav => &caldav::Caldav,
    }
}

/// The drivers as the registry asks them (see [`ConnectorRules`]).
pub struct Drivers;

/// What [`Registry::new`] is given.
pub static DRIVERS: Drivers = Drivers;

impl ConnectorRules for Drivers {
    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
        driver(draft.kind).check_connector(draft)
    }

    fn credential_on_connector(&self, kind: Kind, mode: Mode) -> bool {
        driver(kind).credential_on_connector(mode)
    }

    fn dependents(&self, kind: Kind, changed: &BTreeSet<String>) -> Dependents {
        dependents(driver(kind).schema(), changed)
    }

    fn through_key(&self, kind: Kind) -> Option<&'static str> {
        let schema = driver(kind).schema();
        schema
            .config
            .contains(&OAUTH_CONNECTOR)
            .then_some(OAUTH_CONNECTOR)
    }
}

/// The secrets of a schema sent where the `changed` settings say.
fn dependents(schema: &Schema, changed: &BTreeSet<String>) -> Dependents {
    let mut out = Dependents::default();
    let moved = schema
        .destinations
        .iter()
        .filter(|d| d.settings.iter().any(|s| changed.contains(*s)));
    for d in moved {
        if schema.connector_secrets.contains(&d.secret)
            && !out.connector_secrets.contains(&d.secret)
        {
            out.connector_secrets.push(d.secret);
        }
        out.connections |= schema.connection_secrets.contains(&d.secret);
    }
    out
}

/// A connector of a kind without providers: no provider, then [`check_schema`].
fn check_plain(schema: &Schema, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
    if !draft.provider.is_empty() {
        return Err(FieldError::new(
            "provider",
            "only OAuth connectors take a provider",
        ));
    }
    check_schema(schema, draft)
}

/// Config keys and connector secret slots against a schema.
fn check_schema(schema: &Schema, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
    validate_config("config", draft.config, schema.config)?;
    for (slot, value) in draft.secrets {
        validate_secret("secrets", slot, value.expose(), schema.connector_secrets)?;
    }
    Ok(())
}

/// Checks credentials a user offers: the keys and slots of the kind's schema, then what the
/// driver checks ([`ConnectorDriver::check_candidate`]).
pub fn check_candidate(connector: &Connector, candidate: &Candidate) -> Result<(), FieldError> {
    let kind = driver(connector.kind);
    check_settings(kind.schema(), candidate)?;
    kind.check_candidate(connector, candidate)
}

/// A candidate's settings keys and connection secret slots against a schema.
fn check_settings(schema: &Schema, candidate: &Candidate) -> Result<(), FieldError> {
    validate_config("settings", &candidate.settings, schema.settings)?;
    for (slot, value) in &candidate.secrets {
        validate_secret("secrets", slot, value.expose(), schema.connection_secrets)?;
    }
    Ok(())
}

/// Every secret slot of `required` is given by the candidate.
fn check_required(candidate: &Candidate, required: &[&str]) -> Result<(), FieldError> {
    match required
        .iter()
        .find(|slot| !candidate.secrets.contains_key(**slot))
    {
        Some(slot) => Err(FieldError::new(format!("secrets.{slot}"), "is required")),
        None => Ok(()),
    }
}

/// A URL a secret may be sent to: absolute, https, with a host and no credentials in it. The
/// error never quotes the value (a malformed URL may still carry a password).
pub(crate) fn https_url(field: &str, value: &str) -> Result<url::Url, FieldError> {
    let url = url::Url::parse(value.trim())
        .map_err(|_| FieldError::new(field, "is not an absolute URL (https://host/…)"))?;
    if url.scheme() != "https" {
        return Err(FieldError::new(field, "must be an https:// URL"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FieldError::new(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(FieldError::new(
            field,
            "must not contain a username or password: credentials go in their own fields",
        ));
    }
    Ok(url)
}

/// An API base (`api_base`): an [`https_url`] without query or fragment, the call's path is
/// appended to it.
pub(crate) fn api_base_url(field: &str, value: &str) -> Result<url::Url, FieldError> {
    let url = https_url(field, value)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(
            field,
            "must not have a query or fragment: the call gives its own query",
        ));
    }
    Ok(url)
}

/// An extra CA (PEM) a connector or connection trusts, when given, must parse.
fn check_ca(field: &str, pem: Option<&String>) -> Result<(), FieldError> {
    match pem.filter(|p| !p.trim().is_empty()) {
        Some(pem) => crate::tls::client_config(Some(pem))
            .map(|_| ())
            .map_err(|e| FieldError::new(field, e.to_string())),
        None => Ok(()),
    }
}

/// The usable connection of the target and one of its stored secrets (the connector's, for a
/// credential kept on the connector). A missing secret is NOT_CONNECTED.
async fn stored_secret(
    credentials: &Credentials,
    target: &Target,
    slot: &str,
    on_connector: bool,
) -> Result<(Connection, Secret), CredentialError> {
    let (connector, user) = (&target.connector, target.connection_user.as_str());
    let registry = credentials.registry();
    let (connection, secret) = if on_connector {
        let connection = usable_connection::<CredentialError>(registry, connector, user).await?;
        let secrets = registry.connector_secrets(connector).await?;
        (connection, secrets.slots.get(slot).cloned())
    } else {
        let (connection, secrets) =
            usable_connection_with_secrets::<CredentialError>(registry, connector, user).await?;
        (connection, secrets.get(slot).cloned())
    };
    let secret = secret.ok_or_else(|| ConnectionError::not_connected(connector, user))?;
    Ok((connection, secret))
}

/// Where a test failed that could not get the credential it signs in with: at the provider
/// when the provider could not be reached or answered nonsense, else at authentication (no
/// connection, an expired or refused grant, a connector it cannot sign in through).
fn credential_stage(e: &CredentialError) -> Stage {
    match e {
        CredentialError::OAuth(OAuthError::Unavailable(_)) => Stage::Protocol,
        _ => Stage::Auth,
    }
}

/// The stored password of the target's connection, for the broker's own sign-in (mail,
/// calendar).
async fn stored_password(at: Lookup<'_>) -> Result<Credential, CredentialError> {
    let (connection, secret) = stored_secret(at.credentials, at.target, "password", false).await?;
    Ok(Credential {
        kind: at.target.connector.kind,
        form: Form::Password,
        secret,
        expires_at: None,
        scopes: Vec::new(),
        account_label: connection.account_label.clone(),
        header_name: String::new(),
        header_prefix: String::new(),
        connection: Some(connection),
    })
}

/// The credentials service: the one way mail, calendar, connection tests and ResolveCredential
/// get a connection's credential.
#[derive(Clone)]
pub struct Credentials {
    registry: Arc<Registry>,
    oauth: Arc<OAuth>,
}

impl Credentials {
    pub fn new(registry: Arc<Registry>, oauth: Arc<OAuth>) -> Self {
        Self { registry, oauth }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The current credential of the target's connection.
    pub async fn credential(
        &self,
        target: &Target,
        min_ttl: Duration,
    ) -> Result<Credential, CredentialError> {
        let at = Lookup {
            credentials: self,
            target,
            min_ttl,
        };
        driver(target.connector.kind).credential(at).await
    }

    /// The credential of the connector a connector signs in through (`oauth_connector`: an
    /// OAuth connector of the same workspace), for the same user, if that user's grant was made
    /// after the connector last changed where it sends it: a token is never sent to servers
    /// set after the user consented.
    pub async fn through(
        &self,
        target: &Target,
        oauth_connector: &str,
        min_ttl: Duration,
    ) -> Result<Credential, CredentialError> {
        let (connector, user) = (&target.connector, &target.on_behalf_of);
        let field = format!("config.{OAUTH_CONNECTOR}");
        let through = self
            .registry
            .target(&connector.workspace, oauth_connector, user)
            .await
            .map_err(|e| match e {
                ModelError::NotFound { .. } => ModelError::from(FieldError::new(
                    &field,
                    format!(
                        "names {oauth_connector:?}, which is not a connector of this workspace"
                    ),
                ))
                .into(),
                other => CredentialError::from(other),
            })?;
        let oauth = &through.connector;
        if oauth.kind != Kind::Oauth2 {
            let why = format!("names {:?}, which is not an OAuth connector", oauth.name);
            return Err(ModelError::from(FieldError::new(field, why)).into());
        }
        let since = Some(connector.destinations_at.unwrap_or(connector.created_at));
        let grant = self
            .registry
            .connection(oauth, &through.connection_user)
            .await?;
        if let Some(grant) = grant.filter(|g| g.connected_at < since) {
            return Err(ConnectionError::destination_changed(oauth, &grant.user_id).into());
        }
        self.resolvable(&through, min_ttl).await
    }

    /// The credential of a kind that may be handed out (an API key, an OAuth access token):
    /// to a caller through ResolveCredential, or to a connector that signs in through it. Any
    /// other kind is [`CredentialError::NotResolvable`].
    pub async fn resolvable(
        &self,
        target: &Target,
        min_ttl: Duration,
    ) -> Result<Credential, CredentialError> {
        let connector = &target.connector;
        if !driver(connector.kind).resolvable() {
            return Err(CredentialError::NotResolvable {
                connector: connector.name.clone(),
                kind: connector.kind.name(),
            });
        }
        self.credential(target, min_ttl).await
    }

    /// After an API refused `rejected` (the target's OAuth access token): refreshes it once,
    /// true when the next [`Credentials::credential`] gives another token to try.
    pub async fn replace_rejected(
        &self,
        target: &Target,
        rejected: &Secret,
    ) -> Result<bool, CredentialError> {
        Ok(self
            .oauth
            .replace_rejected(&target.connector, &target.connection_user, rejected)
            .await?)
    }

    /// Tests credentials: the candidate's, or the stored connection's.
    pub async fn test(
        &self,
        target: &Target,
        candidate: &Candidate,
        timeout: Duration,
    ) -> TestReport {
        driver(target.connector.kind)
            .test(TestRun {
                credentials: self,
                target,
                candidate,
                timeout,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [Kind; 4] = [Kind::ApiKey, Kind::Oauth2, Kind::ImapSmtp, Kind::Caldav];

    #[test]
    fn destinations_name_secrets_and_settings_of_the_schema() {
        for kind in KINDS {
            let schema = driver(kind).schema();
            for d in schema.destinations {
                assert!(
                    schema.connection_secrets.contains(&d.secret)
                        || schema.connector_secrets.contains(&d.secret),
                    "{kind:?}: {}",
                    d.secret
                );
                for key in d.settings {
                    assert!(
                        schema.settings.contains(key) || schema.config.contains(key),
                        "{kind:?}: {key}"
                    );
                }
            }
        }
    }

    fn at<'a>(connector: &'a Connector, settings: &'a BTreeMap<String, String>) -> Where<'a> {
        Where {
            connector,
            settings,
        }
    }

    #[test]
    fn the_api_base_is_where_calls_send_the_credential() {
        let none = BTreeMap::new();
        let key = Connector::for_tests(
            Kind::ApiKey,
            Mode::Shared,
            &[("api_base", "https://api.corp/v2")],
        );
        assert_eq!(
            driver(Kind::ApiKey)
                .destination(at(&key, &none), "api_key")
                .unwrap(),
            ["https://api.corp/v2"]
        );
        let mut slack = Connector::for_tests(Kind::Oauth2, Mode::Personal, &[("client_id", "c")]);
        slack.provider = "slack".into();
        let token = driver(Kind::Oauth2)
            .destination(at(&slack, &none), "access_token")
            .unwrap();
        assert!(
            token.contains(&"https://slack.com/api".to_string()),
            "{token:?}"
        );
        let refresh = driver(Kind::Oauth2)
            .destination(at(&slack, &none), "refresh_token")
            .unwrap();
        assert!(
            !refresh.contains(&"https://slack.com/api".to_string()),
            "{refresh:?}"
        );
    }

    #[test]
    fn destinations_are_where_the_settings_point() {
        let imap = Connector::for_tests(
            Kind::ImapSmtp,
            Mode::Personal,
            &[("imap_host", "imap.corp"), ("smtp_host", "smtp.corp")],
        );
        let settings = BTreeMap::from([("email".to_string(), "a@corp.test".to_string())]);
        assert_eq!(
            driver(Kind::ImapSmtp)
                .destination(at(&imap, &settings), "password")
                .unwrap(),
            ["imap.corp:993", "smtp.corp:465"]
        );
        let caldav =
            Connector::for_tests(Kind::Caldav, Mode::Personal, &[("url", "http://dav.corp/")]);
        // The plain-http URL is the connector's: the error names where it came from.
        assert_eq!(
            driver(Kind::Caldav)
                .destination(at(&caldav, &BTreeMap::new()), "password")
                .unwrap_err()
                .field,
            "config.url"
        );
        let ftp = BTreeMap::from([("url".to_string(), "ftp://dav.corp/".to_string())]);
        assert_eq!(
            driver(Kind::Caldav)
                .destination(at(&caldav, &ftp), "password")
                .unwrap_err()
                .field,
            "settings.url"
        );
        let https = BTreeMap::from([("url".to_string(), "https://dav.corp/u".to_string())]);
        assert_eq!(
            driver(Kind::Caldav)
                .destination(at(&caldav, &https), "password")
                .unwrap(),
            ["https://dav.corp/u/"]
        );
    }

    #[test]
    fn urls_secrets_go_to_are_https_without_credentials_and_never_quoted() {
        for bad in [
            "",
            "dav.corp/x",
            "ftp://dav.corp/",
            "http://dav.corp/",
            "https://u:canary@dav.corp/",
        ] {
            let err = https_url("config.token_url", bad).unwrap_err();
            assert_eq!(err.field, "config.token_url", "{bad}");
            assert!(!err.problem.contains("dav.corp"), "{bad}: {err}");
        }
        assert!(https_url("config.token_url", "https://idp.corp/token").is_ok());
        let config = BTreeMap::from([(
            "revocation_url".to_string(),
            "http://idp.corp/revoke".to_string(),
        )]);
        let err = driver(Kind::Oauth2)
            .check_connector(&draft(Mode::Shared, "", &config, &BTreeMap::new()))
            .unwrap_err();
        assert_eq!(err.field, "config.revocation_url");
        for kind in [Kind::Oauth2, Kind::ApiKey] {
            for bad in [
                "http://api.corp",
                "https://u:canary@api.corp",
                "https://api.corp/v1?key=x",
                "https://api.corp/#x",
            ] {
                let config = BTreeMap::from([("api_base".to_string(), bad.to_string())]);
                let err = driver(kind)
                    .check_connector(&draft(Mode::Shared, "", &config, &BTreeMap::new()))
                    .unwrap_err();
                assert_eq!(err.field, "config.api_base", "{kind:?} {bad}");
                assert!(!err.problem.contains("canary"), "{err}");
            }
        }
    }

    fn draft<'a>(
        mode: Mode,
        provider: &'a str,
        config: &'a BTreeMap<String, String>,
        secrets: &'a BTreeMap<String, Secret>,
    ) -> ConnectorDraft<'a> {
        ConnectorDraft {
            kind: Kind::ApiKey,
            mode,
            provider,
            config,
            secrets,
        }
    }

    #[test]
    fn connector_rules_per_kind() {
        let key = BTreeMap::from([("api_key".to_string(), Secret::new("k"))]);
        let none = BTreeMap::new();
        let no_config = BTreeMap::new();
        let api = driver(Kind::ApiKey);
        assert!(
            api.check_connector(&draft(Mode::Shared, "", &no_config, &key))
                .is_ok()
        );
        assert_eq!(
            api.check_connector(&draft(Mode::Personal, "", &no_config, &key))
                .unwrap_err()
                .field,
            "secrets.api_key"
        );
        assert_eq!(
            api.check_connector(&draft(Mode::Shared, "slack", &no_config, &none))
                .unwrap_err()
                .field,
            "provider"
        );
        assert!(
            driver(Kind::Oauth2)
                .check_connector(&draft(Mode::Shared, "slack", &no_config, &none))
                .is_ok()
        );
        assert!(api.credential_on_connector(Mode::Shared));
        assert!(!api.credential_on_connector(Mode::Personal));
        let resolvable: Vec<_> = KINDS
            .into_iter()
            .filter(|k| driver(*k).resolvable())
            .collect();
        assert_eq!(resolvable, [Kind::ApiKey, Kind::Oauth2]);
    }

    #[test]
    fn a_moved_destination_names_the_secrets_it_carries_off() {
        let changed = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect();
        let of = |kind: Kind, keys: &[&str]| DRIVERS.dependents(kind, &changed(keys));
        assert_eq!(
            of(Kind::Oauth2, &["token_url"]),
            Dependents {
                connector_secrets: vec!["client_secret"],
                connections: true
            }
        );
        assert_eq!(
            of(Kind::Oauth2, &["userinfo_url"]),
            Dependents {
                connector_secrets: vec![],
                connections: true
            }
        );
        for key in ["ca_pem", "base_url", "revocation_url"] {
            assert!(of(Kind::Oauth2, &[key]).connections, "{key}");
        }
        assert_eq!(
            of(Kind::Oauth2, &["scopes", "description"]),
            Dependents::default()
        );
        assert_eq!(
            of(Kind::ApiKey, &["header_name"]).connector_secrets,
            ["api_key"]
        );
        assert_eq!(
            of(Kind::ApiKey, &["header_prefix", "base_url"]),
            Dependents::default()
        );
        for key in ["imap_host", "smtp_port", "ca_pem", OAUTH_CONNECTOR] {
            assert!(of(Kind::ImapSmtp, &[key]).connections, "{key}");
        }
        assert!(of(Kind::Caldav, &["url"]).connections);
        assert!(!of(Kind::ImapSmtp, &["description"]).connections);
        assert_eq!(DRIVERS.through_key(Kind::ImapSmtp), Some(OAUTH_CONNECTOR));
        assert_eq!(DRIVERS.through_key(Kind::ApiKey), None);
    }
}
