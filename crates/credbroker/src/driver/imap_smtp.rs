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
use crate::mail::account::SERVER_SETTINGS;
use crate::model::{Check, Connector, FieldError, Secret, TestReport};

pub struct ImapSmtp;

static CONFIG: [&str; 10] = keys(
    SERVER_SETTINGS,
    &[OAUTH_CONNECTOR, "description", "trash_mailbox"],
);
static SETTINGS: [&str; 11] = keys(
    &["email", "username", "aliases", "trash_mailbox"],
    SERVER_SETTINGS,
);

static SCHEMA: Schema = Schema {
    config: &CONFIG,
    connector_secrets: &[],
    settings: &SETTINGS,
    connection_secrets: &["password"],
    // The password, or the access token signed in with through `oauth_connector`.
    destinations: &[Destination {
        secret: "password",
        settings: &[
            "imap_host",
            "imap_port",
            "smtp_host",
            "smtp_port",
            "ca_pem",
            OAUTH_CONNECTOR,
        ],
    }],
    service: Some(Service::Mail),
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
    fn destination(&self, at: Where<'_>, _secret: &str) -> Result<Vec<String>, FieldError> {
        let account = crate::mail::account::from_settings(
            at.connector,
            at.settings,
            Some(Auth::Password(Secret::new(""))),
        )?;
        Ok(vec![account.imap.addr(), account.smtp.addr()])
    }

    /// Hosts, ports, TLS modes, addresses and CAs are checked before anything is tried, and the
    /// password is required unless the connector signs in with OAuth. A connection that signs
    /// in with a user's OAuth token takes its servers from the connector only: the request may
    /// not name where the token goes.
    fn check_candidate(
        &self,
        connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
        if connector.setting(OAUTH_CONNECTOR).is_some() {
            let given = |key: &&str| candidate.settings.get(*key).is_some_and(|v| !v.is_empty());
            if let Some(key) = SERVER_SETTINGS.iter().copied().find(given) {
                return Err(FieldError::new(
                    format!("settings.{key}"),
                    "cannot be given: this connector signs in with the user's OAuth token (oauth_connector), which goes only to the connector's own servers",
                ));
            }
        }
        let settings = &candidate.settings;
        self.destination(
            Where {
                connector,
                settings,
            },
            "password",
        )?;
        check_required(candidate, self.typed_in(connector)?)
    }

    /// A mail connector that signs in with OAuth needs no password.
    fn typed_in(&self, connector: &Connector) -> Result<&'static [&'static str], FieldError> {
        Ok(match connector.setting(OAUTH_CONNECTOR) {
            Some(_) => &[],
            None => SCHEMA.connection_secrets,
        })
    }

    /// The password, or the access token of the `oauth_connector` connection of the same user.
    fn credential<'a>(
        &'a self,
        at: Lookup<'a>,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let (connector, user) = (&at.target.connector, &at.target.connection_user);
            let Some(oauth) = connector.setting(OAUTH_CONNECTOR) else {
                return stored_password(at).await;
            };
            let registry = at.credentials.registry();
            let connection =
                usable_connection::<CredentialError>(registry, connector, user).await?;
            let mut token = at.credentials.through(at.target, oauth, at.min_ttl).await?;
            token.connection = Some(connection);
            Ok(token)
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
            let auth = match connector.setting(OAUTH_CONNECTOR) {
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
