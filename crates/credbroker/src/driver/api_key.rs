//! API-key connectors: the key is a connector secret when shared, a connection secret when
//! personal; it is handed to callers as stored, with the header it goes in. A key is tested by
//! calling the connector's `test_url`, the one place the broker itself sends it.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use super::*;
use crate::model::{
    Check, Connector, ConnectorDraft, FieldError, Kind, Mode, Secret, Stage, TestReport,
};

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
    // The broker itself sends the key only to the test URL, in that header, to a server the CA
    // vouches for; callers are handed it with the header name.
    destinations: &[Destination {
        secret: "api_key",
        settings: &["test_url", "header_name", "ca_pem", "api_base"],
    }],
    service: None,
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

    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError> {
        check_plain(&SCHEMA, draft)?;
        check_ca("config.ca_pem", draft.config.get("ca_pem"))?;
        if let Some(url) = draft.config.get("test_url").filter(|u| !u.is_empty()) {
            https_url("config.test_url", url)?;
        }
        if let Some(base) = draft.config.get("api_base") {
            api_base_url("config.api_base", base)?;
        }
        if draft.mode == Mode::Personal && draft.secrets.contains_key("api_key") {
            return Err(FieldError::new(
                "secrets.api_key",
                "a personal API-key connector takes each user's key through ConnectWithCredentials",
            ));
        }
        Ok(())
    }

    fn destination(&self, at: Where<'_>, _secret: &str) -> Result<Vec<String>, FieldError> {
        Ok(["test_url", "api_base"]
            .into_iter()
            .filter_map(|key| at.connector.setting(key).map(str::to_string))
            .collect())
    }

    /// A key to test must be given.
    fn check_candidate(
        &self,
        _connector: &Connector,
        candidate: &Candidate,
    ) -> Result<(), FieldError> {
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
        at: Lookup<'a>,
    ) -> BoxFuture<'a, Result<Credential, CredentialError>> {
        async move {
            let (connector, user) = (&at.target.connector, at.target.connection_user.as_str());
            let (connection, key) =
                stored_secret(at.credentials, at.target, "api_key", user.is_empty()).await?;
            at.credentials.registry().record_use(connector, user).await;
            let (name, prefix) = header(connector);
            Ok(Credential {
                kind: Kind::ApiKey,
                form: Form::ApiKey,
                secret: key,
                expires_at: None,
                scopes: Vec::new(),
                account_label: connection.account_label.clone(),
                header_name: name.to_string(),
                header_prefix: prefix.to_string(),
                connection: Some(connection),
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
/// A stored key is tested only where it was saved for: a connector whose test URL, header or CA
/// changed since erased it ([`Destination`]). Reports name the URL's host only: the URL may
/// carry a query key.
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
    let url = match https_url("config.test_url", url) {
        Ok(url) => url,
        Err(e) => return TestReport::one(Check::failed("api_key", Stage::Config, e.to_string())),
    };
    let host = url.host_str().unwrap_or_default().to_string();
    let client = match crate::tls::http_client(connector.setting("ca_pem"), timeout) {
        Ok(client) => client,
        Err(e) => return TestReport::one(Check::failed("api_key", Stage::Tls, e.to_string())),
    };
    let (header, prefix) = header(connector);
    let sent = client
        .get(url)
        .header(header, format!("{prefix}{}", key.expose()))
        .send()
        .await;
    TestReport::one(key_check(&host, sent, timeout))
}

/// What the test URL's answer says of the key.
fn key_check(
    host: &str,
    sent: Result<reqwest::Response, reqwest::Error>,
    timeout: Duration,
) -> Check {
    match sent {
        Ok(resp) if resp.status().is_success() => {
            Check::passed("api_key", format!("{host} accepted the key"))
        }
        Ok(resp) if matches!(resp.status().as_u16(), 401 | 403) => Check::failed(
            "api_key",
            Stage::Auth,
            format!(
                "{host} refused the key ({}): check that it is current",
                resp.status()
            ),
        ),
        Ok(resp) => Check::failed(
            "api_key",
            Stage::Protocol,
            format!("{host} answered {}", resp.status()),
        ),
        Err(e) if e.is_timeout() => Check::failed(
            "api_key",
            Stage::Timeout,
            format!("{host} did not answer in {timeout:?}"),
        ),
        Err(e) if e.is_connect() => match crate::upstream::refusal(&e) {
            Some(refused) => Check::failed("api_key", Stage::Config, refused.to_string()),
            None => Check::failed("api_key", Stage::Tcp, format!("cannot connect to {host}")),
        },
        Err(_) => Check::failed(
            "api_key",
            Stage::Protocol,
            format!("the request to {host} failed"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_test_report_names_the_host_never_the_url() {
        crate::tls::install_crypto_provider();
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("https://{closed}/whoami?api_key=url-canary");
        let connector =
            Connector::for_tests(Kind::ApiKey, Mode::Shared, &[("test_url", url.as_str())]);
        let key = Secret::new("key-canary");
        let report = test_key(&connector, Some(&key), Duration::from_secs(5)).await;
        let message = &report.checks[0].message;
        assert!(message.contains("127.0.0.1"), "{message}");
        assert!(
            !message.contains("canary") && !message.contains("whoami"),
            "{message}"
        );
    }
}
