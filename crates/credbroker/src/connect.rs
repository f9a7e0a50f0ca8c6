//! Connecting accounts: testing candidate credentials before they are saved, saving them,
//! testing a stored connection, disconnecting, and the per-user status listing behind an
//! "Integrations" page. OAuth's browser flow lives in [`crate::oauth`]; this module covers
//! credentials a user types in (API keys, IMAP/SMTP and CalDAV passwords).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use crate::model::{
    Check, Connection, ConnectionSecrets, ConnectionStatus, Connector, FieldError, Kind, Mode,
    ModelError, Registry, Secret, Stage, Target, TestReport, validate_config, validate_secret,
};

/// Credentials offered by a user, not yet saved.
#[derive(Debug, Default, Clone)]
pub struct Candidate {
    pub settings: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Unsupported(String),
}

impl From<FieldError> for ConnectError {
    fn from(e: FieldError) -> Self {
        ConnectError::Model(e.into())
    }
}

pub struct Connect {
    registry: Arc<Registry>,
    upstream_timeout: Duration,
    /// For mail connections that sign in with OAuth (XOAUTH2).
    mail: Option<Arc<crate::mail::Mail>>,
}

/// Outcome of ConnectWithCredentials.
#[derive(Debug)]
pub struct Connected {
    pub connection: Connection,
    pub report: TestReport,
    pub saved: bool,
}

impl Connect {
    pub fn new(registry: Arc<Registry>, upstream_timeout: Duration) -> Self {
        Self {
            registry,
            upstream_timeout,
            mail: None,
        }
    }

    /// Lets IMAP/SMTP tests of connectors with an `oauth_connector` sign in with XOAUTH2.
    pub fn with_mail(mut self, mail: Arc<crate::mail::Mail>) -> Self {
        self.mail = Some(mail);
        self
    }

    fn check_candidate(connector: &Connector, candidate: &Candidate) -> Result<(), FieldError> {
        validate_config(
            "settings",
            &candidate.settings,
            connector.kind.setting_keys(),
        )?;
        for (slot, value) in &candidate.secrets {
            validate_secret(
                "secrets",
                slot,
                value.expose(),
                connector.kind.connection_secret_slots(),
            )?;
        }
        if connector.kind == Kind::ImapSmtp {
            // Hosts, ports, TLS modes and addresses are checked before anything is tried.
            crate::mail::account::from_settings(
                connector,
                &candidate.settings,
                Some(crate::mail::Auth::Password(Secret::new(""))),
            )?;
        }
        Ok(())
    }

    /// Tests credentials: the candidate's if given, else the stored connection's.
    pub async fn test(
        &self,
        target: &Target,
        candidate: Option<Candidate>,
    ) -> Result<TestReport, ConnectError> {
        let connector = &target.connector;
        let stored = candidate.is_none();
        let candidate = match candidate {
            Some(candidate) => {
                Self::check_candidate(connector, &candidate)?;
                candidate
            }
            None => {
                let connection = self
                    .registry
                    .connection(connector, &target.connection_user)?;
                let Some(connection) = connection else {
                    return Ok(TestReport {
                        checks: vec![Check::failed(
                            "connection",
                            Stage::Config,
                            "not connected: nothing to test",
                        )],
                        account_label: None,
                    });
                };
                let mut secrets = self
                    .registry
                    .connection_secrets(connector, &target.connection_user)?
                    .slots;
                if connector.kind == Kind::ApiKey && connector.mode == Mode::Shared {
                    secrets = self.registry.connector_secrets(connector)?.slots;
                }
                Candidate {
                    settings: connection.settings,
                    secrets,
                }
            }
        };
        let report = self.run_test(target, &candidate).await;
        let signs_in_with_password = candidate.secrets.contains_key("password");
        if stored
            && connector.kind == Kind::ImapSmtp
            && signs_in_with_password
            && report.auth_refused()
        {
            // The stored password no longer works: the user must reconnect. (A refused OAuth
            // token is the OAuth connection's business: it expires through its own refresh.)
            let why = report.failures();
            self.registry
                .mark_expired(
                    connector,
                    &target.connection_user,
                    format!("{why}; reconnect the account"),
                    false,
                )
                .await?;
        }
        Ok(report)
    }

    async fn run_test(&self, target: &Target, candidate: &Candidate) -> TestReport {
        let connector = &target.connector;
        match connector.kind {
            Kind::ApiKey => test_api_key(connector, candidate, self.upstream_timeout).await,
            Kind::Oauth2 => TestReport {
                checks: vec![Check::failed(
                    "oauth2",
                    Stage::Config,
                    "OAuth accounts are connected through BeginConnect; test them with ResolveCredential",
                )],
                account_label: None,
            },
            Kind::ImapSmtp => {
                let oauth = match &self.mail {
                    Some(mail) => mail.oauth_auth(target).await,
                    None => Ok(None),
                };
                let auth = match oauth {
                    Ok(Some(auth)) => Some(auth),
                    Ok(None) => candidate
                        .secrets
                        .get("password")
                        .cloned()
                        .map(crate::mail::Auth::Password),
                    Err(e) => {
                        return TestReport {
                            checks: vec![Check::failed(
                                "oauth",
                                Stage::Config,
                                format!("no access token to sign in with: {e}"),
                            )],
                            account_label: None,
                        };
                    }
                };
                crate::mail::test_account(
                    connector,
                    &candidate.settings,
                    auth,
                    self.upstream_timeout,
                )
                .await
            }
            Kind::Caldav => {
                crate::calendar::test_caldav(
                    connector,
                    &candidate.settings,
                    &candidate.secrets,
                    self.upstream_timeout,
                )
                .await
            }
        }
    }

    /// Tests the candidate credentials and saves them only if the test passes (or the caller
    /// asked to save anyway, which marks the connection ERROR).
    pub async fn connect_with_credentials(
        &self,
        target: &Target,
        candidate: Candidate,
        save_on_failure: bool,
    ) -> Result<Connected, ConnectError> {
        let connector = &target.connector;
        if connector.kind == Kind::Oauth2 {
            return Err(FieldError::new(
                "connection",
                "OAuth connectors are connected through BeginConnect",
            )
            .into());
        }
        if connector.kind == Kind::ApiKey && connector.mode == Mode::Shared {
            return Err(FieldError::new(
                "secrets.api_key",
                "a shared API-key connector's key is set on the connector (UpdateConnector secrets.api_key)",
            )
            .into());
        }
        Self::check_candidate(connector, &candidate)?;
        // A mail connector that signs in with OAuth needs no password.
        let oauth_mail =
            connector.kind == Kind::ImapSmtp && connector.setting("oauth_connector").is_some();
        for slot in connector.kind.connection_secret_slots() {
            if !oauth_mail && !candidate.secrets.contains_key(*slot) {
                return Err(FieldError::new(format!("secrets.{slot}"), "is required").into());
            }
        }
        let report = self.run_test(target, &candidate).await;
        let previous = self
            .registry
            .connection(connector, &target.connection_user)?;
        let mut connection =
            previous.unwrap_or_else(|| Connection::new(&connector.id, &target.connection_user));
        if !report.ok() && !save_on_failure {
            return Ok(Connected {
                connection,
                report,
                saved: false,
            });
        }
        let now = Utc::now();
        connection.settings = candidate.settings.clone();
        connection.account_label = report
            .account_label
            .clone()
            .or_else(|| candidate.settings.get("account_label").cloned())
            .or_else(|| candidate.settings.get("email").cloned())
            .or_else(|| candidate.settings.get("username").cloned())
            .unwrap_or_default();
        connection.connected_at = Some(now);
        connection.last_refreshed_at = None;
        if report.ok() {
            connection.status = ConnectionStatus::Connected;
            connection.last_error.clear();
        } else {
            connection.status = ConnectionStatus::Error;
            connection.last_error = report.failures();
        }
        let secrets = ConnectionSecrets {
            slots: candidate.secrets,
        };
        self.registry
            .save_connection(&connection, Some(&secrets))
            .await?;
        Ok(Connected {
            connection,
            report,
            saved: true,
        })
    }

    /// Erases a credential-based connection (OAuth disconnects go through [`crate::oauth`]).
    pub async fn disconnect(&self, target: &Target) -> Result<Connection, ConnectError> {
        let connector = &target.connector;
        if connector.kind == Kind::ApiKey && connector.mode == Mode::Shared {
            return Err(FieldError::new(
                "connection",
                "a shared API-key connector is disconnected by clearing its key (UpdateConnector secrets.api_key)",
            )
            .into());
        }
        if self
            .registry
            .connection(connector, &target.connection_user)?
            .is_none()
        {
            return Err(ModelError::NotFound {
                what: "connection",
                workspace: connector.workspace.clone(),
                name: format!(
                    "{}{}",
                    connector.name,
                    crate::resolve::for_user(&target.connection_user)
                ),
            }
            .into());
        }
        self.registry
            .delete_connection(connector, &target.connection_user)
            .await?;
        Ok(Connection::new(&connector.id, &target.connection_user))
    }

    /// One row per connector of the workspace: the shared connection, or this user's.
    pub fn statuses(
        &self,
        workspace: &str,
        user_id: &str,
    ) -> Result<Vec<(Connector, Connection)>, ModelError> {
        let mut rows = Vec::new();
        for connector in self.registry.list_connectors(workspace)? {
            let user = match connector.mode {
                Mode::Shared => "",
                Mode::Personal => user_id,
            };
            let connection = if connector.mode == Mode::Personal && user.is_empty() {
                None
            } else {
                self.registry.connection(&connector, user)?
            };
            rows.push((
                connector.clone(),
                connection.unwrap_or_else(|| Connection::new(&connector.id, user)),
            ));
        }
        Ok(rows)
    }
}

/// An API key is tested by calling the connector's `test_url` with it, when one is configured.
async fn test_api_key(
    connector: &Connector,
    candidate: &Candidate,
    timeout: Duration,
) -> TestReport {
    let key = candidate.secrets.get("api_key");
    let Some(key) = key else {
        return TestReport {
            checks: vec![Check::failed("api_key", Stage::Config, "no API key given")],
            account_label: None,
        };
    };
    let Some(url) = connector.setting("test_url") else {
        return TestReport {
            checks: vec![Check::passed(
                "api_key",
                "stored untested: the connector has no test_url",
            )],
            account_label: None,
        };
    };
    let client = match crate::tls::http_client(connector.setting("ca_pem"), timeout) {
        Ok(client) => client,
        Err(e) => {
            return TestReport {
                checks: vec![Check::failed("api_key", Stage::Config, e.to_string())],
                account_label: None,
            };
        }
    };
    let header = connector.setting("header_name").unwrap_or("Authorization");
    let prefix = connector
        .config
        .get("header_prefix")
        .map(String::as_str)
        .unwrap_or("Bearer ");
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
    TestReport {
        checks: vec![check],
        account_label: None,
    }
}
