//! API-key connectors: the key is a connector secret when shared, a connection secret when
//! personal; it is handed to callers as stored, with the header it goes in. A key is tested by
//! calling the connector's `test_url`, the one place the broker itself sends it.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::model::{Check, Connector, FieldError, Kind, Mode, Secret, Stage, Target, TestReport};

pub struct ApiKey;

static SCHEMA: Schema = Schema {
    config: &[
        "header_name",
        "header_prefix",
        "base_url",
        "test_url",
        "api_base",
        "query_param",
        "account_label",
        "ca_pem",
        "description",
    ],
    connector_secrets: &["api_key"],
    settings: &["account_label"],
    connection_secrets: &["api_key"],
    destinations: &[Destination {
        secret: "api_key",
        settings: &["test_url", "api_base"],
    }],
};

/// The header a key goes in and what precedes it: `Authorization: Bearer <key>` unless the
/// connector says otherwise (an empty prefix is kept: some APIs want the bare key).
fn header(connector: &Connector) -> (&str, &str) {
    (
        connector.setting("header_name").unwrap_or(AUTHORIZATION),
        connector
            .config
            .get("header_prefix")
            .map(String::as_str)
            .unwrap_or(BEARER_PREFIX),
    )
}

impl ConnectorDriver for ApiKey {
    fn schema(&self) -> &'static Schema {
        &SCHEMA
    }

    fn check_connector(
        &self,
        mode: Mode,
        provider: &str,
        config: &BTreeMap<String, String>,
        secrets: &BTreeMap<String, Secret>,
    ) -> Result<(), FieldError> {
        check_plain(&SCHEMA, provider, config, secrets)?;
        check_ca("config.ca_pem", config.get("ca_pem"))?;
        if let Some(base) = config.get("api_base") {
            api_base_url("config.api_base", base)?;
        }
        if mode == Mode::Personal && secrets.contains_key("api_key") {
            return Err(FieldError::new(
                "secrets.api_key",
                "a personal API-key connector takes each user's key through ConnectWithCredentials",
            ));
        }
        Ok(())
    }

    fn destination(
        &self,
        connector: &Connector,
        _settings: &BTreeMap<String, String>,
        _secret: &str,
    ) -> Result<Vec<String>, FieldError> {
        Ok(["test_url", "api_base"]
            .into_iter()
            .filter_map(|key| connector.setting(key).map(str::to_string))
            .collect())
    }

    /// A key to test must be given.
    fn check_candidate(
        &self,
        _connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
        check_settings(&SCHEMA, candidate)?;
        check_required(candidate, SCHEMA.connection_secrets)
    }

    fn typed_in(&self, connector: &Connector) -> Result<&'static [&'static str], FieldError> {
        if self.credential_on_connector(connector.mode) {
            return Err(FieldError::new(
                "secrets.api_key",
                "a shared API-key connector's key is set on the connector (UpdateConnector secrets.api_key)",
            ));
        }
        Ok(SCHEMA.connection_secrets)
    }

    fn credential_on_connector(&self, mode: Mode) -> bool {
        mode == Mode::Shared
    }

    fn resolvable(&self) -> bool {
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
            let (connection, key) =
                stored_secret(credentials, target, "api_key", user.is_empty()).await?;
            credentials.registry().record_use(connector, user).await;
            let (name, prefix) = header(connector);
            Ok(Credential {
                kind: Kind::ApiKey,
                form: Form::ApiKey,
                secret: key,
                expires_at: None,
                scopes: Vec::new(),
                account_label: connection.account_label,
                header_name: name.to_string(),
                header_prefix: prefix.to_string(),
            })
        }
        .boxed()
    }

    fn test<'a>(&'a self, run: TestRun<'a>) -> BoxFuture<'a, TestReport> {
        let key = run.candidate.secrets.get("api_key");
        test_key(&run.target.connector, key, run.timeout).boxed()
    }
}

/// An API key is tested by calling the connector's `test_url` with it, when one is configured.
async fn test_key(connector: &Connector, key: Option<&Secret>, timeout: Duration) -> TestReport {
    let Some(key) = key else {
        return TestReport::one(Check::failed(
            "api_key",
            Stage::Auth,
            "no API key is stored",
        ));
    };
    let Some(url) = connector.setting("test_url") else {
        return TestReport::one(Check::passed(
            "api_key",
            "stored untested: the connector has no test_url",
        ));
    };
    let client = match crate::tls::http_client(connector.setting("ca_pem"), timeout) {
        Ok(client) => client,
        Err(e) => return TestReport::one(Check::failed("api_key", Stage::Tls, e.to_string())),
    };
    let (header, prefix) = header(connector);
    let check = match client
        .get(url)
        .header(header, format!("{prefix}{}", key.expose()))
        .send()
        .await
    {
        Ok(resp) if resp.status().is_success() => {
            Check::passed("api_key", format!("{url} accepted the key"))
        }
        Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => Check::failed(
            "api_key",
            Stage::Auth,
            format!(
                "{url} refused the key ({}): check that it is current",
                resp.status()
            ),
        ),
        Ok(resp) => Check::failed(
            "api_key",
            Stage::Protocol,
            format!("{url} answered {}", resp.status()),
        ),
        Err(e) if e.is_timeout() => Check::failed(
            "api_key",
            Stage::Timeout,
            format!("{url} did not answer in {timeout:?}"),
        ),
        Err(e) if e.is_connect() => {
            Check::failed("api_key", Stage::Tcp, format!("cannot connect to {url}"))
        }
        Err(_) => Check::failed(
            "api_key",
            Stage::Protocol,
            format!("request to {url} failed"),
        ),
    };
    TestReport::one(check)
}
