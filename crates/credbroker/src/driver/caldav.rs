//! CalDAV connectors: a connection holds the server URL (or takes the connector's), the
//! username and the password, which goes only to that URL. A refused password expires the
//! connection. Nothing of this kind is ever handed to a caller.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::model::{Connector, FieldError, Kind, Secret, Target, TestReport};

pub struct Caldav;

static SCHEMA: Schema = Schema {
    config: &["url", "ca_pem", "oauth_connector", "description"],
    connector_secrets: &[],
    settings: &["url", "username", "ca_pem"],
    connection_secrets: &["password"],
    destinations: &[Destination {
        secret: "password",
        settings: &["url"],
    }],
};

impl ConnectorDriver for Caldav {
    fn schema(&self) -> &'static Schema {
        &SCHEMA
    }

    /// The server URL, checked as a connection would use it (https, no credentials in it).
    fn destination(
        &self,
        connector: &Connector,
        settings: &BTreeMap<String, String>,
        _secret: &str,
    ) -> Result<Vec<String>, FieldError> {
        let url = crate::calendar::caldav::server_url(connector, settings)
            .map_err(|e| FieldError::new("settings.url", e.to_string()))?;
        Ok(vec![url.to_string()])
    }

    fn serves(&self, _connector: &Connector, service: Service) -> bool {
        service == Service::Calendar
    }

    fn credential<'a>(
        &'a self,
        credentials: &'a Credentials,
        target: &'a Target,
        _min_ttl: Duration,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let (connection, password) =
                stored_secret(credentials, target, "password", false).await?;
            Ok(password_credential(
                Kind::Caldav,
                password,
                connection.account_label,
            ))
        }
        .boxed()
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
