//! IMAP/SMTP connectors: a connection holds the account's settings and its password, or signs
//! in with XOAUTH2 through the OAuth connector named by `oauth_connector`. The password goes
//! only to the IMAP and SMTP servers the settings name; a refused password expires the
//! connection. Nothing of this kind is ever handed to a caller.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::mail::Auth;
use crate::model::{Check, Connector, FieldError, Kind, Secret, Target, TestReport};

pub struct ImapSmtp;

static SCHEMA: Schema = Schema {
    config: &[
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
    connector_secrets: &[],
    settings: &[
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
    connection_secrets: &["password"],
    destinations: &[Destination {
        secret: "password",
        settings: &["imap_host", "imap_port", "smtp_host", "smtp_port"],
    }],
};

/// How long an access token must stay valid for a test: the test's own deadline and a margin.
fn min_ttl(timeout: Duration) -> Duration {
    timeout + Duration::from_secs(60)
}

impl ConnectorDriver for ImapSmtp {
    fn schema(&self) -> &'static Schema {
        &SCHEMA
    }

    /// The IMAP and SMTP servers (host:port), checked as the account would be built.
    fn destination(
        &self,
        connector: &Connector,
        settings: &BTreeMap<String, String>,
        _secret: &str,
    ) -> Result<Vec<String>, FieldError> {
        let account = crate::mail::account::from_settings(
            connector,
            settings,
            Some(Auth::Password(Secret::new(""))),
        )?;
        Ok(vec![account.imap.addr(), account.smtp.addr()])
    }

    /// Hosts, ports, TLS modes, addresses and CAs are checked before anything is tried, and the
    /// password is required unless the connector signs in with OAuth.
    fn check_candidate(
        &self,
        connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
        check_settings(&SCHEMA, candidate)?;
        self.destination(connector, &candidate.settings, "password")?;
        check_required(candidate, self.typed_in(connector)?)
    }

    /// A mail connector that signs in with OAuth needs no password.
    fn typed_in(&self, connector: &Connector) -> Result<&'static [&'static str], FieldError> {
        Ok(match connector.setting("oauth_connector") {
            Some(_) => &[],
            None => SCHEMA.connection_secrets,
        })
    }

    fn serves(&self, _connector: &Connector, service: Service) -> bool {
        service == Service::Mail
    }

    /// The password, or the access token of the `oauth_connector` connection of the same user.
    fn credential<'a>(
        &'a self,
        credentials: &'a Credentials,
        target: &'a Target,
        min_ttl: Duration,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let connector = &target.connector;
            if let Some(oauth) = connector.setting("oauth_connector") {
                let registry = credentials.registry();
                usable_connection::<CredentialError>(registry, connector, &target.connection_user)
                    .await?;
                return credentials.through(target, oauth, min_ttl).await;
            }
            let (connection, password) =
                stored_secret(credentials, target, "password", false).await?;
            Ok(password_credential(
                Kind::ImapSmtp,
                password,
                connection.account_label,
            ))
        }
        .boxed()
    }

    /// An IMAP login and an SMTP AUTH, with the candidate's password or the OAuth token.
    fn test<'a>(&'a self, run: TestRun<'a>) -> BoxFuture<'a, TestReport> {
        let TestRun {
            credentials,
            target,
            candidate,
            timeout,
        } = run;
        async move {
            let connector = &target.connector;
            let auth = match connector.setting("oauth_connector") {
                Some(oauth) => match credentials.through(target, oauth, min_ttl(timeout)).await {
                    Ok(credential) => Some(Auth::XOAuth2(credential.secret)),
                    Err(e) => {
                        return TestReport::one(Check::failed(
                            "oauth",
                            credential_stage(&e),
                            format!("no access token to sign in with: {e}"),
                        ));
                    }
                },
                None => candidate
                    .secrets
                    .get("password")
                    .cloned()
                    .map(Auth::Password),
            };
            crate::mail::test_account(connector, &candidate.settings, auth, timeout).await
        }
        .boxed()
    }

    fn refusal_expires(&self, _connector: &Connector, secrets: &BTreeMap<String, Secret>) -> bool {
        secrets.contains_key("password")
    }
}
