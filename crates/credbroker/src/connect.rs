//! Connecting accounts: testing candidate credentials before they are saved, saving them,
//! testing a stored connection, disconnecting, and the per-user status listing behind an
//! "Integrations" page. OAuth's browser flow lives in [`crate::oauth`]; this module covers
//! credentials a user types in (API keys, IMAP/SMTP and CalDAV passwords).
//!
//! Invariant: input that cannot be used as given is refused as a [`FieldError`] (the driver's
//! `check_candidate`) before anything is sent upstream; a test that ran is a [`TestReport`],
//! whatever it found.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

pub use crate::driver::Candidate;
use crate::driver::{
    ConnectionError, Credentials, check_candidate, driver, expire_refused, for_user,
};
use crate::events::{Detail, Occurred};
use crate::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, FieldError, Mode, ModelError,
    Registry, Target, TestReport,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Unsupported(String),
    /// Nothing stored to test.
    #[error(transparent)]
    Connection(#[from] ConnectionError),
}

impl From<FieldError> for ConnectError {
    fn from(e: FieldError) -> Self {
        ConnectError::Model(e.into())
    }
}

pub struct Connect {
    credentials: Credentials,
    upstream_timeout: Duration,
}

/// Outcome of ConnectWithCredentials.
#[derive(Debug)]
pub struct Connected {
    pub connection: Connection,
    pub report: TestReport,
    pub saved: bool,
}

impl Connect {
    pub fn new(credentials: Credentials, upstream_timeout: Duration) -> Self {
        Self {
            credentials,
            upstream_timeout,
        }
    }

    fn registry(&self) -> &Arc<Registry> {
        self.credentials.registry()
    }

    /// Tests credentials: the candidate's if given, else the stored connection's.
    pub async fn test(
        &self,
        target: &Target,
        candidate: Option<Candidate>,
    ) -> Result<TestReport, ConnectError> {
        let connector = &target.connector;
        let kind = driver(connector.kind);
        let candidate = match candidate {
            Some(candidate) => {
                check_candidate(connector, &candidate)?;
                return Ok(self.run_test(target, &candidate).await);
            }
            None => self.stored(target).await?.ok_or_else(|| {
                ConnectionError::not_connected(connector, &target.connection_user)
            })?,
        };
        let report = self.run_test(target, &candidate).await;
        if report.auth_refused() && kind.refusal_expires(connector, &candidate.secrets) {
            // The stored password no longer works: the user must reconnect. (A refused OAuth
            // token is the OAuth connection's business: it expires through its own refresh.)
            let why = report.failures();
            expire_refused(
                self.registry(),
                connector,
                &target.connection_user,
                format!("{why}; reconnect the account"),
                false,
            )
            .await?;
        }
        Ok(report)
    }

    /// The stored connection's settings and secrets, as a candidate to test again: never those
    /// of a connection made before its connector moved where they go.
    async fn stored(&self, target: &Target) -> Result<Option<Candidate>, ConnectError> {
        let (connector, user) = (&target.connector, target.connection_user.as_str());
        // The settings and the secrets given with them, as of one moment.
        let (connection, secrets) = self
            .registry()
            .connection_with_secrets(connector, user)
            .await?;
        let Some(connection) = connection else {
            return Ok(None);
        };
        if connector.moved_since(connection.connected_at) {
            return Err(ConnectionError::destination_changed(connector, user).into());
        }
        let secrets = if driver(connector.kind).credential_on_connector(connector.mode) {
            self.registry().connector_secrets(connector).await?.slots
        } else {
            secrets.slots
        };
        Ok(Some(Candidate {
            settings: connection.settings,
            secrets,
        }))
    }

    async fn run_test(&self, target: &Target, candidate: &Candidate) -> TestReport {
        self.credentials
            .test(target, candidate, self.upstream_timeout)
            .await
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
        let kind = driver(connector.kind);
        kind.typed_in(connector)?;
        check_candidate(connector, &candidate)?;
        let report = self.run_test(target, &candidate).await;
        let previous = self
            .registry()
            .connection(connector, &target.connection_user)
            .await?;
        let kind = crate::events::EventKind::on_connect(previous.as_ref());
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
        connection.expired_reason = None;
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
        let (user, why) = (&target.connection_user, &connection.last_error);
        let detail = Detail::new(if report.ok() { "" } else { "test_failed" }, why);
        let event = Occurred::new(kind, connector, user, detail);
        self.registry()
            .save_connection(&connection, Some(&secrets), Some(event))
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
        if driver(connector.kind).credential_on_connector(connector.mode) {
            return Err(FieldError::new(
                "connection",
                "a shared API-key connector is disconnected by clearing its key (UpdateConnector secrets.api_key)",
            )
            .into());
        }
        if self
            .registry()
            .connection(connector, &target.connection_user)
            .await?
            .is_none()
        {
            return Err(ModelError::NotFound {
                what: "connection",
                workspace: connector.workspace.clone(),
                name: format!("{}{}", connector.name, for_user(&target.connection_user)),
            }
            .into());
        }
        let (gone, user) = (
            crate::events::EventKind::Disconnected,
            &target.connection_user,
        );
        let event = Occurred::new(gone, connector, user, Detail::NONE);
        self.registry()
            .delete_connection(connector, user, Some(event))
            .await?;
        Ok(Connection::new(&connector.id, &target.connection_user))
    }

    /// One row per connector of the workspace: the shared connection, or this user's.
    pub async fn statuses(
        &self,
        workspace: &str,
        user_id: &str,
    ) -> Result<Vec<(Connector, Connection)>, ModelError> {
        let mut rows = Vec::new();
        for connector in self.registry().list_connectors(workspace).await? {
            let user = match connector.mode {
                Mode::Shared => "",
                Mode::Personal => user_id,
            };
            let connection = if connector.mode == Mode::Personal && user.is_empty() {
                None
            } else {
                self.registry().connection(&connector, user).await?
            };
            rows.push((
                connector.clone(),
                connection.unwrap_or_else(|| Connection::new(&connector.id, user)),
            ));
        }
        Ok(rows)
    }
}
