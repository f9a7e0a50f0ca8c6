//! OAuth 2 connectors: the client secret is the connector's, the access and refresh tokens the
//! connection's; callers are handed access tokens from [`crate::oauth`], which refreshes them
//! and expires a connection whose grant the provider refuses. Accounts connect through the
//! browser flow (BeginConnect), never with typed-in credentials.

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::model::{Check, Connector, ConnectorDraft, FieldError, Kind, TestReport};
use crate::oauth::catalog::Endpoints;

pub struct OAuth2;

static SCHEMA: Schema = Schema {
    config: &[
        "client_id",
        "issuer",
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
        "api_base",
        "resource",
        "ca_pem",
        "description",
    ],
    connector_secrets: &["client_secret"],
    settings: &[],
    connection_secrets: &["access_token", "refresh_token"],
    // The CA says who the servers are; `base_url` is where the broker's own calls (Google
    // Calendar) send the access token.
    destinations: &[
        Destination {
            secret: "client_secret",
            settings: &["token_url", "revocation_url", "ca_pem"],
        },
        Destination {
            secret: "refresh_token",
            settings: &["token_url", "revocation_url", "ca_pem"],
        },
        Destination {
            secret: "access_token",
            settings: &[
                "userinfo_url",
                "revocation_url",
                "base_url",
                "ca_pem",
                "api_base",
            ],
        },
    ],
    service: None,
};

/// The provider endpoints a connector may set: each is where a secret (the client secret, a
/// grant, a token) or the user's consent goes, so each is https and carries no credentials.
const ENDPOINTS: &[&str] = &["auth_url", "token_url", "revocation_url", "userinfo_url"];

impl ConnectorDriver for OAuth2 {
    fn schema(&self) -> &'static Schema {
        &SCHEMA
    }

    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
        crate::oauth::catalog::validate_provider("provider", draft.provider)?;
        check_schema(&SCHEMA, draft)?;
        for key in ENDPOINTS {
            if let Some(url) = draft.config.get(*key) {
                https_url(&format!("config.{key}"), url)?;
            }
        }
        if let Some(base) = draft.config.get("api_base") {
            api_base_url("config.api_base", base)?;
        }
        // The issuer identifier an authorization response must name (RFC 9207): an https URL.
        if let Some(issuer) = draft.config.get("issuer") {
            https_url("config.issuer", issuer)?;
        }
        check_ca("config.ca_pem", draft.config.get("ca_pem"))
    }

    /// The provider's endpoints (catalog preset, overridden by the connector's config).
    fn destination(&self, at: Where<'_>, secret: &str) -> Result<Vec<String>, FieldError> {
        let endpoints = Endpoints::of(at.connector)?;
        let urls = match secret {
            "client_secret" | "refresh_token" => {
                [Some(endpoints.token_url), endpoints.revocation_url]
            }
            _ => [endpoints.userinfo_url, endpoints.revocation_url],
        };
        let api_base = match secret {
            "access_token" => crate::oauth::catalog::api_base(at.connector),
            _ => None,
        };
        Ok(urls.into_iter().flatten().chain(api_base).collect())
    }

    /// There are no typed-in OAuth credentials to test.
    fn check_candidate(
        &self,
        connector: &Connector,
        _candidate: &Candidate,
    ) -> Result<(), FieldError> {
        self.typed_in(connector).map(|_| ())
    }

    fn typed_in(&self, _connector: &Connector) -> Result<&'static [&'static str], FieldError> {
        Err(FieldError::new(
            "connection",
            "OAuth connectors are connected through BeginConnect",
        ))
    }

    fn resolvable(&self) -> bool {
        true
    }

    fn serves(&self, connector: &Connector, service: Service) -> bool {
        match service {
            Service::Mail => crate::mail::account::provider_defaults(&connector.provider).is_some(),
            Service::Calendar => connector.provider == crate::calendar::GOOGLE_PROVIDER,
        }
    }

    fn credential<'a>(
        &'a self,
        at: Lookup<'a>,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let target = at.target;
            let token = at
                .credentials
                .oauth
                .access_token(&target.connector, &target.connection_user, at.min_ttl)
                .await?;
            Ok(Credential {
                kind: Kind::Oauth2,
                form: Form::Bearer,
                secret: token.token,
                expires_at: Some(token.expires_at),
                scopes: token.scopes,
                account_label: token.account_label,
                header_name: AUTHORIZATION.into(),
                header_prefix: BEARER_PREFIX.into(),
                connection: None,
            })
        }
        .boxed()
    }

    /// A stored grant is tested by getting a current access token (refreshed if it is about to
    /// expire), as ResolveCredential would. Candidates are refused before: see `check_candidate`.
    fn test<'a>(&'a self, run: TestRun<'a>) -> BoxFuture<'a, TestReport> {
        async move {
            match run.credentials.credential(run.target, run.timeout).await {
                Ok(token) => TestReport {
                    checks: vec![Check::passed(
                        "oauth2",
                        format!(
                            "the grant is current: an access token is valid until {}",
                            token.expires_at.map(|t| t.to_rfc3339()).unwrap_or_default()
                        ),
                    )],
                    account_label: Some(token.account_label).filter(|l| !l.is_empty()),
                },
                Err(e) => {
                    TestReport::one(Check::failed("oauth2", credential_stage(&e), e.to_string()))
                }
            }
        }
        .boxed()
    }
}
