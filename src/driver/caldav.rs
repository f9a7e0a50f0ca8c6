//! CalDAV connectors: a connection holds the server URL (or takes the connector's), the
//! username and the password, which goes only to that URL. A refused password expires the
//! connection. Nothing of this kind is ever handed to a caller.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::{
    Candidate, ConnectionError, ConnectorDriver, Credential, CredentialError, Credentials,
    Destination, Schema, Service, usable_connection,
};
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

    fn records_use_after_call(&self) -> bool {
        true
    }

    fn credential<'a>(
        &'a self,
        credentials: &'a Credentials,
        target: &'a Target,
        _min_ttl: Duration,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let (connector, user) = (&target.connector, target.connection_user.as_str());
            let registry = credentials.registry();
            let connection = usable_connection::<CredentialError>(registry, connector, user)?;
            let password = registry
                .connection_secrets(connector, user)?
                .get("password")
                .cloned()
                .ok_or_else(|| ConnectionError::not_connected(connector, user))?;
            Ok(super::password(
                Kind::Caldav,
                password,
                connection.account_label,
            ))
        }
        .boxed()
    }

    fn test<'a>(
        &'a self,
        _credentials: &'a Credentials,
        target: &'a Target,
        candidate: &'a Candidate,
        timeout: Duration,
    ) -> BoxFuture<'a, TestReport> {
        crate::calendar::caldav::test(
            &target.connector,
            &candidate.settings,
            &candidate.secrets,
            timeout,
        )
        .boxed()
    }

    fn refusal_expires(&self, _connector: &Connector, secrets: &BTreeMap<String, Secret>) -> bool {
        secrets.contains_key("password")
    }
}
