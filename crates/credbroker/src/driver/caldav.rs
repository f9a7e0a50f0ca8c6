//! CalDAV connectors: a connection holds the server URL (or takes the connector's), the
//! username and the password, which goes only to that URL. A refused password expires the
//! connection. Nothing of this kind is ever handed to a caller.
//!
//! Invariant: a URL, username, password or CA the test could not use is refused before the test
//! ([`ConnectorDriver::check_candidate`], [`ConnectorDriver::check_connector`]): a test that
//! runs meets only well-formed input.

use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::BTreeMap;

use super::*;
use crate::model::{Connector, ConnectorDraft, FieldError, Secret, TestReport};

pub struct Caldav;

static SCHEMA: Schema = Schema {
    config: &["url", "ca_pem", "oauth_connector", "description"],
    connector_secrets: &[],
    settings: &["url", "username", "ca_pem"],
    connection_secrets: &["password"],
    destinations: &[Destination {
        secret: "password",
        settings: &["url", "ca_pem"],
    }],
    service: Some(Service::Calendar),
};

/// The setting a connection's server URL comes from: its own, or else its connector's (an
/// empty value is unset, as [`crate::calendar::caldav::server_url`] reads it).
fn url_source<'a>(
    connector: &'a Connector,
    settings: &'a BTreeMap<String, String>,
) -> Option<(&'static str, &'a str)> {
    let given = |v: &&String| !v.is_empty();
    match settings.get("url").filter(given) {
        Some(url) => Some(("settings.url", url)),
        None => connector
            .config
            .get("url")
            .filter(given)
            .map(|url| ("config.url", url.as_str())),
    }
}

impl ConnectorDriver for Caldav {
    fn schema(&self) -> &'static Schema {
        &SCHEMA
    }

    /// A connector's URL, when it sets one, is a CalDAV server's (https, no credentials).
    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
        check_plain(&SCHEMA, draft)?;
        if let Some(url) = draft.config.get("url").filter(|u| !u.is_empty()) {
            https_url("config.url", url)?;
        }
        check_ca("config.ca_pem", draft.config.get("ca_pem"))
    }

    /// The server URL, the username, the password and the CA, as the test would use them.
    fn check_candidate(
        &self,
        connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
        let settings = &candidate.settings;
        let (field, url) = url_source(connector, settings).ok_or_else(|| {
            FieldError::new(
                "settings.url",
                "is required: the connector sets no CalDAV server URL",
            )
        })?;
        https_url(field, url)?;
        if settings.get("username").is_none_or(|u| u.trim().is_empty()) {
            return Err(FieldError::new("settings.username", "is required"));
        }
        check_required(candidate, SCHEMA.connection_secrets)?;
        check_ca("settings.ca_pem", settings.get("ca_pem"))
    }

    /// The server URL, checked as a connection would use it (https, no credentials in it).
    fn destination(&self, at: Where<'_>, _secret: &str) -> Result<Vec<String>, FieldError> {
        let (connector, settings) = (at.connector, at.settings);
        let field = url_source(connector, settings).map_or("settings.url", |(field, _)| field);
        let url = crate::calendar::caldav::server_url(connector, settings)
            .map_err(|e| FieldError::new(field, e.to_string()))?;
        Ok(vec![url.to_string()])
    }

    fn credential<'a>(
        &'a self,
        at: Lookup<'a>,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        stored_password(at).boxed()
    }

    fn test<'a>(&'a self, run: TestRun<'a>) -> BoxFuture<'a, TestReport> {
        let TestRun {
            target, candidate, ..
        } = run;
        crate::calendar::caldav::test(
            &target.connector,
            &candidate.settings,
            &candidate.secrets,
            run.timeout,
        )
        .boxed()
    }

    fn refusal_expires(&self, _connector: &Connector, secrets: &BTreeMap<String, Secret>) -> bool {
        secrets.contains_key("password")
    }
}
