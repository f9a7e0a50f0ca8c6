//! What keeps a WatchMail stream allowed after it opened: the caller's grant under the live
//! policy, and the connector and connection it reads as they were when it (re)connected.
//!
//! [`Guard::changed`] wakes at once on a policy reload, and within [`RECHECK`] of any write to
//! the connectors or connections tables (it watches the store's generation counters, which
//! cost no read of a record); [`Guard::check`] then decides, from cached records only (no
//! upstream call, no secret):
//! - the grant is gone → [`MailError::Denied`] (PERMISSION_DENIED);
//! - the connector is gone → NOT_FOUND; the connection is disconnected or expired (whatever
//!   expired it: a refused password, a changed destination) → the [`ConnectionError`] a new
//!   call would get (FAILED_PRECONDITION, NOT_CONNECTED or EXPIRED);
//! - the connector or connection record changed but is still usable (new credentials, new
//!   servers) → the stream reconnects with the new one; its own session never outlives them.
//!
//! Invariant: a stream delivers nothing after a check that failed: the messages it had queued
//! are dropped ([`super::watch::Watcher::next`]) and the error is its last item.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use super::MailError;
use crate::driver::usable_connection;
use crate::model::{Connection, ConnectionStatus, Connector, Registry, Target};
use crate::policy::{Operation, PolicyHandle};

/// How often the store's generation counters are looked at.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Who holds the stream and under which operation the policy must keep granting it.
pub struct Grant {
    pub policy: Arc<PolicyHandle>,
    pub caller: String,
    pub op: Operation,
}

/// What of a connection's record, when it changes, makes the stream's session stale: its
/// state, its account and servers, and when it was (re)connected (new credentials). Not its
/// use or refresh times, which change while it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    connector_name: String,
    connector_updated: DateTime<Utc>,
    status: ConnectionStatus,
    connected_at: Option<DateTime<Utc>>,
    account_label: String,
    settings: std::collections::BTreeMap<String, String>,
    scopes: Vec<String>,
}

impl Snapshot {
    /// What says which account and servers the stream reads (not how it signs in).
    fn account(
        &self,
    ) -> (
        &DateTime<Utc>,
        &str,
        &std::collections::BTreeMap<String, String>,
    ) {
        (&self.connector_updated, &self.account_label, &self.settings)
    }

    fn of(connector: &Connector, connection: &Connection) -> Self {
        Snapshot {
            connector_name: connector.name.clone(),
            connector_updated: connector.updated_at,
            status: connection.status,
            connected_at: connection.connected_at,
            account_label: connection.account_label.clone(),
            settings: connection.settings.clone(),
            scopes: connection.scopes.clone(),
        }
    }
}

pub struct Guard {
    grant: Grant,
    target: Target,
    reloads: watch::Receiver<u64>,
    /// The connectors' and connections' generations at the last check.
    seen: (u64, u64),
    /// None until the first check.
    snapshot: Option<Snapshot>,
    /// A check saw the account or its servers change since [`Guard::take_new_account`].
    new_account: bool,
}

fn generations(registry: &Registry) -> (u64, u64) {
    (
        registry.connectors_generation(),
        registry.connections_generation(),
    )
}

impl Guard {
    /// A guard on `target` as the caller was admitted to it; [`Guard::check`] takes the first
    /// snapshot.
    pub fn new(grant: Grant, target: Target, registry: &Registry) -> Self {
        let mut reloads = grant.policy.subscribe();
        reloads.mark_unchanged();
        Guard {
            grant,
            target,
            reloads,
            seen: generations(registry),
            snapshot: None,
            new_account: false,
        }
    }

    pub fn caller(&self) -> &str {
        &self.grant.caller
    }

    /// True (once) when the account or its servers changed: UIDs seen before mean nothing on
    /// the new one.
    pub fn take_new_account(&mut self) -> bool {
        std::mem::take(&mut self.new_account)
    }

    /// The connection the stream reads, as of the last check.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// True when a reload or a write happened since the last check (cheap: no record read).
    fn moved(&self, registry: &Registry) -> bool {
        self.reloads.has_changed().unwrap_or(false) || generations(registry) != self.seen
    }

    /// Resolves once something happened that may have revoked the stream.
    pub async fn changed(&mut self, registry: &Registry) {
        loop {
            if self.moved(registry) {
                return;
            }
            tokio::select! {
                r = self.reloads.changed() => {
                    if r.is_err() {
                        // The policy holder is gone (shutdown): nothing can change any more.
                        std::future::pending::<()>().await;
                    }
                    return;
                }
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// [`Guard::check`] only if something moved since the last one.
    pub async fn recheck(&mut self, registry: &Registry) -> Result<bool, MailError> {
        if self.snapshot.is_some() && !self.moved(registry) {
            return Ok(false);
        }
        self.check(registry).await
    }

    /// Err: the stream must end with this error. Ok(true): the connector or connection changed
    /// but can still be used: reconnect to [`Guard::target`]. Ok(false): nothing changed.
    pub async fn check(&mut self, registry: &Registry) -> Result<bool, MailError> {
        self.reloads.mark_unchanged();
        self.seen = generations(registry);
        let workspace = self.target.connector.workspace.clone();
        let connector = registry
            .find_connector(&workspace, &self.target.connector.id)
            .await?;
        self.grant
            .policy
            .current()
            .check(
                &self.grant.caller,
                self.grant.op,
                &connector.workspace,
                &connector.name,
                &connector.id,
                &self.target.on_behalf_of,
            )
            .map_err(MailError::Denied)?;
        let connection: Connection =
            usable_connection::<MailError>(registry, &connector, &self.target.connection_user)
                .await?;
        let now = Snapshot::of(&connector, &connection);
        let changed = self.snapshot.as_ref().is_some_and(|s| *s != now);
        self.new_account |= self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.account() != now.account());
        self.snapshot = Some(now);
        self.target.connector = connector;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{ConnectionError, CredentialError};
    use crate::model::{Kind, Mode, ModelError, NewConnector};

    const GRANTED: &str = r#"
[[callers]]
id = "agent"
[[callers.grants]]
workspace = "*"
connectors = ["*"]
operations = ["fetch_mail", "watch_mail"]
users = ["*"]
"#;

    struct World {
        dir: tempfile::TempDir,
        registry: Registry,
        policy: Arc<PolicyHandle>,
        target: Target,
    }

    async fn world() -> World {
        let (dir, registry) = Registry::temporary(&crate::driver::DRIVERS).await;
        let connector = registry
            .create_connector(NewConnector {
                workspace: String::new(),
                name: "Mail".into(),
                kind: Kind::ImapSmtp,
                mode: Mode::Shared,
                provider: String::new(),
                config: [("imap_host", "imap.test"), ("smtp_host", "smtp.test")]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                secrets: Default::default(),
            })
            .await
            .unwrap();
        let mut connection = Connection::new(&connector.id, "");
        connection.status = ConnectionStatus::Connected;
        connection.connected_at = Some(Utc::now());
        registry
            .save_connection(&connection, None, None)
            .await
            .unwrap();
        std::fs::write(dir.path().join("policy.toml"), GRANTED).unwrap();
        let policy = Arc::new(PolicyHandle::load(&dir.path().join("policy.toml")).unwrap());
        let target = Target {
            connector,
            connection_user: String::new(),
            on_behalf_of: String::new(),
        };
        World {
            dir,
            registry,
            policy,
            target,
        }
    }

    impl World {
        fn guard(&self) -> Guard {
            let grant = Grant {
                policy: self.policy.clone(),
                caller: "agent".into(),
                op: Operation::WatchMail,
            };
            Guard::new(grant, self.target.clone(), &self.registry)
        }

        fn reload(&self, policy: &str) {
            std::fs::write(self.dir.path().join("policy.toml"), policy).unwrap();
            self.policy.reload().unwrap();
        }

        async fn connection(&self) -> Connection {
            self.registry
                .connection(&self.target.connector, "")
                .await
                .unwrap()
                .unwrap()
        }
    }

    #[tokio::test]
    async fn a_reload_that_removes_the_grant_wakes_the_guard_and_denies() {
        let w = world().await;
        let mut guard = w.guard();
        assert!(!guard.check(&w.registry).await.unwrap());
        // A reload that keeps the grant changes nothing.
        w.reload(&format!("{GRANTED}\n"));
        tokio::time::timeout(RECHECK / 2, guard.changed(&w.registry))
            .await
            .expect("a reload wakes the guard at once");
        assert!(!guard.check(&w.registry).await.unwrap());
        w.reload(&GRANTED.replace(", \"watch_mail\"", ""));
        guard.changed(&w.registry).await;
        match guard.check(&w.registry).await {
            Err(MailError::Denied(why)) => assert!(why.contains("watch_mail"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn use_is_no_change_new_credentials_reconnect_expiry_and_deletion_end() {
        let w = world().await;
        let mut guard = w.guard();
        assert!(!guard.check(&w.registry).await.unwrap());
        assert!(!guard.recheck(&w.registry).await.unwrap(), "nothing moved");

        let mut used = w.connection().await;
        used.last_used_at = Some(Utc::now());
        w.registry.save_connection(&used, None, None).await.unwrap();
        tokio::time::timeout(RECHECK * 3, guard.changed(&w.registry))
            .await
            .expect("a write wakes the guard");
        assert!(
            !guard.recheck(&w.registry).await.unwrap(),
            "a use is no change"
        );

        let mut renewed = w.connection().await;
        renewed.connected_at = Some(Utc::now() + chrono::TimeDelta::seconds(1));
        w.registry
            .save_connection(&renewed, None, None)
            .await
            .unwrap();
        assert!(guard.recheck(&w.registry).await.unwrap(), "new credentials");
        assert!(!guard.take_new_account(), "the same account");
        let mut moved = w.connection().await;
        moved
            .settings
            .insert("imap_host".into(), "elsewhere.test".into());
        w.registry
            .save_connection(&moved, None, None)
            .await
            .unwrap();
        assert!(guard.recheck(&w.registry).await.unwrap(), "new servers");
        assert!(guard.take_new_account());
        assert!(!guard.take_new_account(), "told once");

        let ended = async |guard: &mut Guard| match guard.recheck(&w.registry).await {
            Err(MailError::Credential(CredentialError::Connection(e))) => e,
            other => panic!("{other:?}"),
        };
        w.registry
            .mark_expired(
                &w.target.connector,
                "",
                "destination_changed".into(),
                true,
                None,
            )
            .await
            .unwrap();
        let expired = ended(&mut guard).await;
        assert!(matches!(expired, ConnectionError::Expired { .. }));
        w.registry
            .delete_connection(&w.target.connector, "", None)
            .await
            .unwrap();
        let gone = ended(&mut guard).await;
        assert!(matches!(gone, ConnectionError::NotConnected { .. }));
        w.registry
            .delete_connector("", &w.target.connector.id)
            .await
            .unwrap();
        assert!(matches!(
            guard.recheck(&w.registry).await,
            Err(MailError::Model(ModelError::NotFound { .. }))
        ));
    }
}
