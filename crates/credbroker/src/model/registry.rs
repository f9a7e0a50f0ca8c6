//! The registry: the one place that reads and writes connectors and connections (and the
//! pending OAuth authorizations that lead to them), and the daemon's one handle on the store's
//! key management (status, rotation, backup). Every write is one atomic, durable batch; name
//! uniqueness is kept under a lock held across check and write. It declares its own tables:
//! the store below is schema-blind.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::Utc;

use super::validate::{validate_connector_name, validate_user_id, workspace_or_default};
use super::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, ConnectorSecrets, Expiry,
    FieldError, Kind, Mode, ModelError, Secret, new_id,
};
use serde::Serialize;

use crate::events::Occurred;
use crate::store::{Batch, Record, RewrapState, Store, Table};

/// `{workspace}/{connector_id}` → Connector
const CONNECTORS: Table = Table::cached("connectors");
/// `{workspace}/{lowercased name}` → connector id
const CONNECTOR_NAMES: Table = Table::cached("connector_names");
/// `{connector_id}` → ConnectorSecrets
const CONNECTOR_SECRETS: Table = Table::cached("connector_secrets");
/// `{connector_id}/{user_id}` → Connection (user_id empty for shared)
const CONNECTIONS: Table = Table::cached("connections");
/// `{connector_id}/{user_id}` → ConnectionSecrets
const CONNECTION_SECRETS: Table = Table::cached("connection_secrets");
/// `{state}` → pending OAuth authorization (read once: never cached)
const OAUTH_STATES: Table = Table::uncached("oauth_states");
/// The store job under which names are checked and written, across replicas.
const NAMES_JOB: &str = "connector-names";

/// How often `last_used_at` is written for a busy connection: it is a hint for people, not a
/// counter, so it must not add a write to every call.
const LAST_USED_GRANULARITY: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// How many records one delete batch removes, so deleting a connector with a million
/// connections never builds one giant batch.
const DELETE_CHUNK: usize = 1000;

/// A connector as an admin sets it (CreateConnector, or UpdateConnector's result), for
/// [`ConnectorRules::check_connector`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectorDraft<'a> {
    pub kind: Kind,
    pub mode: Mode,
    /// OAuth provider preset, empty for generic or non-OAuth kinds.
    pub provider: &'a str,
    pub config: &'a BTreeMap<String, String>,
    pub secrets: &'a BTreeMap<String, Secret>,
}

/// The secrets whose destination a change of connector settings moves.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dependents {
    /// The connector's own secret slots (a client secret, a shared key).
    pub connector_secrets: Vec<&'static str>,
    /// True when the connections' secrets go there too: every connection then expires.
    pub connections: bool,
}

/// What the registry needs to know of connector kinds, given at construction (the drivers',
/// [`crate::driver::DRIVERS`]) so that the model does not depend on the drivers built on it.
pub trait ConnectorRules: Send + Sync {
    /// Checks a connector as an admin sets it (provider, config, connector secrets).
    fn check_connector(&self, draft: &ConnectorDraft<'_>) -> Result<(), FieldError>;

    /// True when the credential is a secret of the connector (a shared API key): its one
    /// connection then mirrors whether it is set.
    fn credential_on_connector(&self, kind: Kind, mode: Mode) -> bool;

    /// The secrets sent where the config keys `changed` say (the kind's destinations).
    fn dependents(&self, kind: Kind, changed: &BTreeSet<String>) -> Dependents;

    /// The config key naming the connector this kind signs in through, if it has one.
    fn through_key(&self, kind: Kind) -> Option<&'static str>;
}

/// What UpdateConnector did besides saving: the secrets it erased because a setting naming
/// where they go changed without them in the same request.
#[derive(Debug, Default)]
pub struct Moved {
    /// The config keys naming a destination that changed.
    pub settings: Vec<String>,
    /// The connector's secret slots erased.
    pub erased: Vec<&'static str>,
    /// Connections marked EXPIRED (destination_changed), their secrets erased.
    pub expired: usize,
}

impl Moved {
    /// For the audit: what moved and what was erased; never a value.
    pub fn describe(&self) -> String {
        format!(
            "destination_changed: config {} changed; erased connector secrets [{}]; {} connections expired",
            self.settings.join(", "),
            self.erased.join(", "),
            self.expired
        )
    }
}

pub struct Registry {
    store: Arc<Store>,
    rules: &'static dyn ConnectorRules,
    /// Serialises the changes that must check-then-write a name (create, rename, delete); the
    /// store job [`NAMES_JOB`] does across replicas.
    names: tokio::sync::Mutex<()>,
    /// The lifecycle events journal, on the same store.
    events: Arc<crate::events::Events>,
}

/// A connector to create, as an admin describes it.
#[derive(Debug)]
pub struct NewConnector {
    pub workspace: String,
    pub name: String,
    pub kind: Kind,
    pub mode: Mode,
    /// OAuth provider preset, empty for generic or non-OAuth kinds.
    pub provider: String,
    pub config: BTreeMap<String, String>,
    pub secrets: BTreeMap<String, Secret>,
}

/// A partial update of a connector, as an `update_mask` describes it.
#[derive(Debug, Default)]
pub struct ConnectorPatch {
    /// Config keys to set (Some) or clear (None).
    pub config: BTreeMap<String, Option<String>>,
    /// Secret slots to set (Some) or clear (None).
    pub secrets: BTreeMap<String, Option<Secret>>,
    pub mode: Option<Mode>,
}

fn connector_path(workspace: &str, id: &str) -> String {
    format!("{workspace}/{id}")
}

fn name_path(workspace: &str, name: &str) -> String {
    format!("{workspace}/{}", name.to_lowercase())
}

/// A resolved connection reference.
#[derive(Debug, Clone)]
pub struct Target {
    pub connector: Connector,
    /// The connection's key: the user for personal connectors, "" for shared ones.
    pub connection_user: String,
    /// The user named in the request (audited), possibly empty.
    pub on_behalf_of: String,
}

pub fn connection_path(connector_id: &str, user_id: &str) -> String {
    format!("{connector_id}/{user_id}")
}

/// What the store's key looks like now: the store's id, the keyring's terms and how much the
/// current one was used.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    pub store_id: String,
    pub current_term: u32,
    pub terms: Vec<u32>,
    pub term_encryptions: u64,
}

async fn count_connections(
    store: &Store,
) -> Result<std::collections::BTreeMap<&'static str, u64>, ModelError> {
    let mut counts = std::collections::BTreeMap::new();
    let mut after: Option<String> = None;
    loop {
        let page = store
            .scan::<Connection>(CONNECTIONS, "", after.as_deref(), 1024)
            .await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        for (_, connection) in &page {
            *counts.entry(connection.status.name()).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

impl Registry {
    pub fn new(store: Arc<Store>, rules: &'static dyn ConnectorRules) -> Self {
        Self {
            events: Arc::new(crate::events::Events::new(store.clone())),
            store,
            rules,
            names: tokio::sync::Mutex::new(()),
        }
    }

    /// The lifecycle events journal ([`crate::events`]).
    pub fn events(&self) -> &Arc<crate::events::Events> {
        &self.events
    }

    pub async fn create_connector(&self, mut new: NewConnector) -> Result<Connector, ModelError> {
        let workspace = workspace_or_default("workspace", &new.workspace)?;
        validate_connector_name("name", &new.name)?;
        self.rules.check_connector(&ConnectorDraft {
            kind: new.kind,
            mode: new.mode,
            provider: &new.provider,
            config: &new.config,
            secrets: &new.secrets,
        })?;
        self.pin_through(&workspace, new.kind, &mut new.config, None)
            .await?;
        let _guard = self.names.lock().await;
        let _across = self.store.job(NAMES_JOB, true).await?;
        self.name_free(&workspace, &new.name).await?;
        let now = Utc::now();
        let connector = Connector {
            id: new_id("cn_"),
            workspace,
            name: new.name,
            kind: new.kind,
            mode: new.mode,
            provider: new.provider,
            config: new.config,
            secrets_set: new.secrets.keys().cloned().collect(),
            created_at: now,
            updated_at: now,
            destinations_at: None,
        };
        let secrets = ConnectorSecrets { slots: new.secrets };
        let ws = &connector.workspace;
        let mut batch = Batch::new();
        batch
            .put(CONNECTORS, connector_path(ws, &connector.id), &connector)
            .put(
                CONNECTOR_NAMES,
                name_path(ws, &connector.name),
                &connector.id,
            );
        if !secrets.slots.is_empty() {
            batch.put(CONNECTOR_SECRETS, connector.id.clone(), &secrets);
        }
        self.shared_key_connection(&mut batch, &connector, &secrets, None, true);
        self.store.commit(batch).await?;
        Ok(connector)
    }

    /// ALREADY_EXISTS if the workspace has a connector of that name (case-insensitive); the
    /// caller holds the names lock until it has written its own.
    async fn name_free(&self, workspace: &str, name: &str) -> Result<(), ModelError> {
        let taken = self
            .store
            .get::<String>(CONNECTOR_NAMES, &name_path(workspace, name))
            .await?;
        match taken {
            Some(_) => Err(ModelError::AlreadyExists {
                workspace: workspace.to_string(),
                name: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// A shared API-key connector's key is a connector secret; its one connection mirrors whether
    /// it is set, so that status listings treat every connector alike.
    fn shared_key_connection(
        &self,
        batch: &mut Batch,
        connector: &Connector,
        secrets: &ConnectorSecrets,
        existing: Option<Connection>,
        key_changed: bool,
    ) {
        if !self
            .rules
            .credential_on_connector(connector.kind, connector.mode)
        {
            return;
        }
        let path = connection_path(&connector.id, "");
        if secrets.slots.contains_key("api_key") {
            let mut connection = existing.unwrap_or_else(|| Connection::new(&connector.id, ""));
            if key_changed || connection.status != ConnectionStatus::Connected {
                connection.status = ConnectionStatus::Connected;
                connection.connected_at = Some(Utc::now());
                connection.last_error.clear();
            }
            connection.account_label = connector
                .setting("account_label")
                .unwrap_or_default()
                .to_string();
            batch.put(CONNECTIONS, path, &connection);
        } else if existing.is_some() {
            batch.delete(CONNECTIONS, path);
        }
    }

    /// Finds a connector by id ("cn_…") or by name (case-insensitive).
    pub async fn find_connector(
        &self,
        workspace: &str,
        name_or_id: &str,
    ) -> Result<Connector, ModelError> {
        let workspace = workspace_or_default("workspace", workspace)?;
        if name_or_id.is_empty() {
            return Err(
                FieldError::new("connector", "must name a connector (its name or id)").into(),
            );
        }
        let id = if name_or_id.starts_with("cn_") {
            Some(name_or_id.to_string())
        } else {
            self.store
                .get::<String>(CONNECTOR_NAMES, &name_path(&workspace, name_or_id))
                .await?
        };
        let found = match id {
            Some(id) => {
                self.store
                    .get::<Connector>(CONNECTORS, &connector_path(&workspace, &id))
                    .await?
            }
            None => None,
        };
        found.ok_or_else(|| ModelError::NotFound {
            what: "connector",
            workspace,
            name: name_or_id.to_string(),
        })
    }

    pub async fn list_connectors(&self, workspace: &str) -> Result<Vec<Connector>, ModelError> {
        let workspace = workspace_or_default("workspace", workspace)?;
        let rows = self
            .store
            .scan::<Connector>(CONNECTORS, &format!("{workspace}/"), None, usize::MAX)
            .await?;
        let mut connectors: Vec<Connector> = rows.into_iter().map(|(_, c)| c).collect();
        connectors.sort_by_key(|c| c.name.to_lowercase());
        Ok(connectors)
    }

    pub async fn connector_secrets(
        &self,
        connector: &Connector,
    ) -> Result<ConnectorSecrets, ModelError> {
        Ok(self
            .store
            .get(CONNECTOR_SECRETS, &connector.id)
            .await?
            .unwrap_or_default())
    }

    /// Applies a patch. A config key naming where secrets go ([`ConnectorRules::dependents`])
    /// that changes without those secrets in the same patch erases them: the connector's own
    /// slots at once, and every connection's, which turns EXPIRED (destination_changed).
    pub async fn update_connector(
        &self,
        workspace: &str,
        name_or_id: &str,
        patch: ConnectorPatch,
    ) -> Result<(Connector, Moved), ModelError> {
        let mut connector = self.find_connector(workspace, name_or_id).await?;
        let kind = connector.kind;
        let before = connector.config.clone();
        for (key, value) in &patch.config {
            match value {
                Some(value) => connector.config.insert(key.clone(), value.clone()),
                None => connector.config.remove(key),
            };
        }
        if let Some(mode) = patch.mode {
            connector.mode = mode;
        }
        let ws = connector.workspace.clone();
        self.pin_through(&ws, kind, &mut connector.config, Some(&connector.id))
            .await?;
        let mut secrets = self.connector_secrets(&connector).await?;
        let key_changed = patch.secrets.contains_key("api_key");
        let carried: BTreeSet<String> = patch
            .secrets
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for (slot, value) in patch.secrets {
            match value {
                Some(value) => secrets.slots.insert(slot, value),
                None => secrets.slots.remove(&slot),
            };
        }
        let now = Utc::now();
        let mut moved = self.moved(&mut connector, &before, &carried, &mut secrets, now);
        self.rules.check_connector(&ConnectorDraft {
            kind,
            mode: connector.mode,
            provider: &connector.provider,
            config: &connector.config,
            secrets: &secrets.slots,
        })?;
        connector.secrets_set = secrets.slots.keys().cloned().collect();
        connector.updated_at = now;
        let mut batch = Batch::new();
        batch
            .put(CONNECTORS, connector_path(&ws, &connector.id), &connector)
            .put(CONNECTOR_SECRETS, connector.id.clone(), &secrets);
        if moved.erased.is_empty() {
            let existing = self.connection(&connector, "").await?;
            self.shared_key_connection(&mut batch, &connector, &secrets, existing, key_changed);
        }
        self.store.commit(batch).await?;
        if connector.destinations_at == Some(now) {
            moved.expired = self.expire_moved(&connector, &moved.settings).await?;
        }
        Ok((connector, moved))
    }

    /// Works out what a change of config moves: erases the dependent connector secrets the
    /// patch did not carry, and dates the move when connections' secrets depend on it.
    fn moved(
        &self,
        connector: &mut Connector,
        before: &BTreeMap<String, String>,
        carried: &BTreeSet<String>,
        secrets: &mut ConnectorSecrets,
        now: chrono::DateTime<Utc>,
    ) -> Moved {
        let changed: BTreeSet<String> = before
            .keys()
            .chain(connector.config.keys())
            .filter(|k| before.get(*k) != connector.config.get(*k))
            .cloned()
            .collect();
        let dependents = self.rules.dependents(connector.kind, &changed);
        let mut moved = Moved::default();
        for slot in dependents.connector_secrets {
            if !carried.contains(slot) && secrets.slots.remove(slot).is_some() {
                moved.erased.push(slot);
            }
        }
        if dependents.connections || !moved.erased.is_empty() {
            connector.destinations_at = Some(now);
            moved.settings = changed.into_iter().collect();
        }
        moved
    }

    /// Resolves the connector a kind signs in through (`oauth_connector`) to its id: an OAuth
    /// connector of the same workspace, never `this` one. A rename cannot then redirect it.
    async fn pin_through(
        &self,
        workspace: &str,
        kind: Kind,
        config: &mut BTreeMap<String, String>,
        this: Option<&str>,
    ) -> Result<(), ModelError> {
        let Some(key) = self.rules.through_key(kind) else {
            return Ok(());
        };
        let Some(named) = config.get(key).filter(|v| !v.trim().is_empty()) else {
            return Ok(());
        };
        let field = format!("config.{key}");
        let through = self
            .find_connector(workspace, named.trim())
            .await
            .map_err(|e| match e {
                ModelError::NotFound { .. } => FieldError::new(
                    &field,
                    format!("names {named:?}, which is not a connector of workspace {workspace:?}"),
                )
                .into(),
                other => other,
            })?;
        if through.kind != Kind::Oauth2 || Some(through.id.as_str()) == this {
            return Err(FieldError::new(
                field,
                format!(
                    "names {:?}, a {} connector: it must name an OAuth connector",
                    through.name,
                    through.kind.name()
                ),
            )
            .into());
        }
        config.insert(key.to_string(), through.id);
        Ok(())
    }

    /// Marks EXPIRED (destination_changed) every connection of the connector connected before
    /// its destinations moved, erasing its secrets; a page of connections per batch. Until a
    /// connection is marked, [`Connector::moved_since`] already keeps it from being used.
    async fn expire_moved(
        &self,
        connector: &Connector,
        settings: &[String],
    ) -> Result<usize, ModelError> {
        let prefix = format!("{}/", connector.id);
        let why = format!(
            "the connector's {} changed (where this connection's secrets go): they were erased; reconnect the account",
            settings.join(", ")
        );
        let (mut after, mut expired) = (None::<String>, 0);
        loop {
            let rows = self
                .store
                .scan::<Connection>(CONNECTIONS, &prefix, after.as_deref(), DELETE_CHUNK)
                .await?;
            let mut batch = Batch::new();
            for (path, connection) in &rows {
                if !connector.moved_since(connection.connected_at) {
                    continue;
                }
                let mut connection = connection.clone();
                connection.status = ConnectionStatus::Expired;
                connection.expired_reason = Some(Expiry::DestinationChanged);
                connection.last_error = why.clone();
                connection.access_expires_at = None;
                batch
                    .put(CONNECTIONS, path.clone(), &connection)
                    .delete(CONNECTION_SECRETS, path.clone());
                expired += 1;
            }
            if !batch.is_empty() {
                self.store.commit(batch).await?;
            }
            match rows.last() {
                Some((last, _)) if rows.len() == DELETE_CHUNK => after = Some(last.clone()),
                _ => return Ok(expired),
            }
        }
    }

    pub async fn rename_connector(
        &self,
        workspace: &str,
        name_or_id: &str,
        new_name: &str,
    ) -> Result<Connector, ModelError> {
        validate_connector_name("new_name", new_name)?;
        let _guard = self.names.lock().await;
        let _across = self.store.job(NAMES_JOB, true).await?;
        let mut connector = self.find_connector(workspace, name_or_id).await?;
        let ws = connector.workspace.clone();
        let taken = self
            .store
            .get::<String>(CONNECTOR_NAMES, &name_path(&ws, new_name))
            .await?;
        if taken.is_some_and(|id| id != connector.id) {
            return Err(ModelError::AlreadyExists {
                workspace: ws,
                name: new_name.to_string(),
            });
        }
        let mut batch = Batch::new();
        batch.delete(CONNECTOR_NAMES, name_path(&ws, &connector.name));
        connector.name = new_name.to_string();
        connector.updated_at = Utc::now();
        batch
            .put(CONNECTOR_NAMES, name_path(&ws, new_name), &connector.id)
            .put(CONNECTORS, connector_path(&ws, &connector.id), &connector);
        self.store.commit(batch).await?;
        Ok(connector)
    }

    /// Deletes a connector and every connection under it; returns how many connections went.
    pub async fn delete_connector(
        &self,
        workspace: &str,
        name_or_id: &str,
    ) -> Result<usize, ModelError> {
        let _guard = self.names.lock().await;
        let _across = self.store.job(NAMES_JOB, true).await?;
        let connector = self.find_connector(workspace, name_or_id).await?;
        let ws = &connector.workspace;
        // The connector goes first: from this commit on, callers get NOT_FOUND.
        let mut batch = Batch::new();
        batch
            .delete(CONNECTORS, connector_path(ws, &connector.id))
            .delete(CONNECTOR_NAMES, name_path(ws, &connector.name))
            .delete(CONNECTOR_SECRETS, connector.id.clone());
        let gone = crate::events::EventKind::ConnectorDeleted;
        let event = Occurred::new(gone, &connector, "", crate::events::Detail::NONE);
        self.commit(batch, Some(event)).await?;
        self.delete_connections_of(&connector.id).await
    }

    async fn delete_connections_of(&self, connector_id: &str) -> Result<usize, ModelError> {
        let prefix = format!("{connector_id}/");
        let mut removed = 0;
        loop {
            let rows = self
                .store
                .scan::<Connection>(CONNECTIONS, &prefix, None, DELETE_CHUNK)
                .await?;
            if rows.is_empty() {
                break;
            }
            let mut batch = Batch::new();
            for (path, _) in &rows {
                batch
                    .delete(CONNECTIONS, path.clone())
                    .delete(CONNECTION_SECRETS, path.clone());
            }
            removed += rows.len();
            self.store.commit(batch).await?;
        }
        Ok(removed)
    }

    /// The connector and the connection's user that a connection reference names: personal
    /// connectors need a user; for shared ones the user is only on whose behalf (the connection
    /// is the shared one, user "").
    pub async fn target(
        &self,
        workspace: &str,
        connector: &str,
        user_id: &str,
    ) -> Result<Target, ModelError> {
        validate_user_id("connection.user_id", user_id)?;
        let connector = self
            .find_connector(workspace, connector)
            .await
            .map_err(|e| match e {
                ModelError::Invalid(f) => ModelError::Invalid(FieldError::new(
                    format!("connection.{}", f.field),
                    f.problem,
                )),
                other => other,
            })?;
        let connection_user = match connector.mode {
            Mode::Shared => String::new(),
            Mode::Personal if user_id.is_empty() => {
                return Err(FieldError::new(
                    "connection.user_id",
                    format!("is required: connector {:?} is personal (each user connects their own account)", connector.name),
                )
                .into());
            }
            Mode::Personal => user_id.to_string(),
        };
        Ok(Target {
            connector,
            connection_user,
            on_behalf_of: user_id.to_string(),
        })
    }

    pub async fn connection(
        &self,
        connector: &Connector,
        user_id: &str,
    ) -> Result<Option<Connection>, ModelError> {
        Ok(self
            .store
            .get(CONNECTIONS, &connection_path(&connector.id, user_id))
            .await?)
    }

    /// A connection and its secrets (empty if none are stored) as of one moment
    /// ([`Store::get_pair`]): never a connection another replica just rewrote joined to the
    /// secrets its write replaced.
    pub async fn connection_with_secrets(
        &self,
        connector: &Connector,
        user_id: &str,
    ) -> Result<(Option<Connection>, ConnectionSecrets), ModelError> {
        let path = connection_path(&connector.id, user_id);
        let (connection, secrets) = self
            .store
            .get_pair((CONNECTIONS, CONNECTION_SECRETS), &path)
            .await?;
        Ok((connection, secrets.unwrap_or_default()))
    }

    pub async fn connection_secrets(
        &self,
        connector: &Connector,
        user_id: &str,
    ) -> Result<ConnectionSecrets, ModelError> {
        Ok(self
            .store
            .get(CONNECTION_SECRETS, &connection_path(&connector.id, user_id))
            .await?
            .unwrap_or_default())
    }

    /// Saves a connection and, when given, replaces its secrets, in one durable batch, with
    /// the lifecycle event it makes, if any.
    pub async fn save_connection(
        &self,
        connection: &Connection,
        secrets: Option<&ConnectionSecrets>,
        event: Option<Occurred>,
    ) -> Result<(), ModelError> {
        let path = connection_path(&connection.connector_id, &connection.user_id);
        let mut batch = Batch::new();
        batch.put(CONNECTIONS, path.clone(), connection);
        if let Some(secrets) = secrets {
            batch.put(CONNECTION_SECRETS, path, secrets);
        }
        self.commit(batch, event).await
    }

    /// As [`Registry::save_connection`], only while `lease` (a refresh lease) is still the
    /// latest: false, and nothing written, if another replica took it over. It carries no
    /// event: it must not wait on the journal's lock (see [`crate::events::Events::commit_with`]).
    pub async fn save_connection_fenced(
        &self,
        connection: &Connection,
        secrets: &ConnectionSecrets,
        lease: &crate::store::Lease,
    ) -> Result<bool, ModelError> {
        let path = connection_path(&connection.connector_id, &connection.user_id);
        let mut batch = Batch::new();
        batch
            .put(CONNECTIONS, path.clone(), connection)
            .put(CONNECTION_SECRETS, path, secrets);
        Ok(self.store.commit_fenced(batch, lease).await?)
    }

    /// Commits `batch`, with `event` in it if given (see [`crate::events::Events::commit_with`]).
    async fn commit(&self, batch: Batch, event: Option<Occurred>) -> Result<(), ModelError> {
        match event {
            None => self.store.commit(batch).await?,
            Some(event) => {
                self.events.commit_with(batch, event).await?;
            }
        }
        Ok(())
    }

    /// Drops a connection and its secrets from this replica's read cache: the next read sees
    /// what another replica wrote last.
    pub fn forget_connection(&self, connector: &Connector, user_id: &str) {
        let path = connection_path(&connector.id, user_id);
        self.store.forget(CONNECTIONS, &path);
        self.store.forget(CONNECTION_SECRETS, &path);
    }

    /// The store (leases and jobs shared by every replica).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Changes whenever a connection is written (see [`Store::generation`]).
    pub fn connections_generation(&self) -> u64 {
        self.store.generation(CONNECTIONS)
    }

    /// Changes whenever a connector is written or deleted (see [`Store::generation`]).
    pub fn connectors_generation(&self) -> u64 {
        self.store.generation(CONNECTORS)
    }

    /// Connections by status across every workspace (for metrics), scanning page by page on a
    /// blocking thread.
    pub async fn count_connections(
        &self,
    ) -> Result<std::collections::BTreeMap<&'static str, u64>, ModelError> {
        let store = self.store.clone();
        crate::store::run_blocking(async move { count_connections(&store).await }).await?
    }

    /// Saves many connections with their secrets in one durable batch (the benchmark's fill).
    pub async fn save_connections(
        &self,
        connections: &[(Connection, ConnectionSecrets)],
    ) -> Result<(), ModelError> {
        let mut batch = Batch::new();
        for (connection, secrets) in connections {
            let path = connection_path(&connection.connector_id, &connection.user_id);
            batch
                .put(CONNECTIONS, path.clone(), connection)
                .put(CONNECTION_SECRETS, path, secrets);
        }
        self.store.commit(batch).await?;
        Ok(())
    }

    /// Keeps a pending OAuth authorization under its state, until [`Registry::take_oauth_state`].
    pub async fn save_oauth_state<T: Serialize>(
        &self,
        state: &str,
        pending: &T,
    ) -> Result<(), ModelError> {
        let mut batch = Batch::new();
        batch.put(OAUTH_STATES, state, pending);
        self.store.commit(batch).await?;
        Ok(())
    }

    /// The pending authorization kept under `state`, if any, left in place.
    pub async fn oauth_state<T: Record>(&self, state: &str) -> Result<Option<T>, ModelError> {
        Ok(self.store.get::<T>(OAUTH_STATES, state).await?)
    }

    /// Removes and returns the pending authorization kept under `state`, if any: once, across
    /// every replica (the take runs as a store job, so two callbacks of one state on two
    /// replicas cannot both get it).
    pub async fn take_oauth_state<T: Record>(&self, state: &str) -> Result<Option<T>, ModelError> {
        let _once = self
            .store
            .job(&format!("oauth-state/{state}"), true)
            .await?;
        let Some(pending) = self.store.get::<T>(OAUTH_STATES, state).await? else {
            return Ok(None);
        };
        let mut batch = Batch::new();
        batch.delete(OAUTH_STATES, state);
        self.store.commit(batch).await?;
        Ok(Some(pending))
    }

    /// Removes the pending authorizations that `expired` says are past their life (a browser
    /// that never came back); returns how many. Reads the table a page at a time.
    pub async fn sweep_oauth_states<T: Record>(
        &self,
        expired: impl Fn(&T) -> bool,
    ) -> Result<usize, ModelError> {
        const PAGE: usize = 512;
        let (mut batch, mut after) = (Batch::new(), None::<String>);
        let mut removed = 0;
        loop {
            let rows = self
                .store
                .scan::<T>(OAUTH_STATES, "", after.as_deref(), PAGE)
                .await?;
            for (path, pending) in &rows {
                if expired(pending) {
                    batch.delete(OAUTH_STATES, path.clone());
                    removed += 1;
                }
            }
            match rows.last() {
                Some((last, _)) if rows.len() == PAGE => after = Some(last.clone()),
                _ => break,
            }
        }
        if !batch.is_empty() {
            self.store.commit(batch).await?;
        }
        Ok(removed)
    }

    /// The store's key as it is now (GetStatus, metrics).
    pub fn key_status(&self) -> KeyStatus {
        let vault = self.store.vault();
        KeyStatus {
            store_id: self.store.header().store_id,
            current_term: vault.current_term(),
            terms: vault.terms(),
            term_encryptions: vault.encryptions(),
        }
    }

    /// Where the rewrap after the latest key rotation stands, if one ever happened.
    pub async fn rewrap_state(&self) -> Result<Option<RewrapState>, ModelError> {
        Ok(self.store.rewrap_state().await?)
    }

    /// Adds a key term (new writes use it at once) and schedules the rewrap of older records.
    pub async fn rotate_key(&self) -> Result<u32, ModelError> {
        let store = self.store.clone();
        Ok(crate::store::run_blocking(async move { store.rotate_key().await }).await??)
    }

    /// A consistent copy of the whole store, still sealed, as a backup file (Backup); with the
    /// number of records it holds.
    pub async fn backup(&self) -> Result<(Vec<u8>, usize), ModelError> {
        let store = self.store.clone();
        let encoded = crate::store::run_blocking(async move {
            let snapshot = store.snapshot().await?;
            Ok::<_, crate::store::StoreError>((snapshot.encode(), snapshot.records.len()))
        });
        Ok(encoded.await??)
    }

    /// Marks a connection EXPIRED (its provider or server refused the stored credential): the
    /// user must reconnect. With `erase_secrets`, the refused credentials are dropped too.
    /// Returns false if there is no such connection.
    pub async fn mark_expired(
        &self,
        connector: &Connector,
        user_id: &str,
        why: String,
        erase_secrets: bool,
        event: Option<Occurred>,
    ) -> Result<bool, ModelError> {
        let Some(mut connection) = self.connection(connector, user_id).await? else {
            return Ok(false);
        };
        connection.status = ConnectionStatus::Expired;
        connection.expired_reason = Some(Expiry::Refused);
        connection.last_error = why;
        connection.last_error_class = "refused".into();
        connection.last_error_at = Some(Utc::now());
        let erased = ConnectionSecrets::default();
        if erase_secrets {
            connection.access_expires_at = None;
        }
        self.save_connection(&connection, erase_secrets.then_some(&erased), event)
            .await?;
        Ok(true)
    }

    /// Records that a connection was used, at most once a minute, without a sync of its own:
    /// `last_used_at` is a hint, made durable by the next commit (the call's audit record).
    /// A concurrent change (a new status, a disconnect) wins over it: the record is rewritten
    /// only if it is still the one read.
    pub async fn record_use(&self, connector: &Connector, user_id: &str) {
        let now = Utc::now();
        let recent = |connection: &Connection| {
            connection
                .last_used_at
                .is_some_and(|t| now - t < LAST_USED_GRANULARITY)
        };
        // The common case (used within the minute) costs one cached read and no write.
        match self.connection(connector, user_id).await {
            Ok(Some(connection)) if !recent(&connection) => {}
            _ => return,
        }
        let path = connection_path(&connector.id, user_id);
        let written = self
            .store
            .update_unsynced(CONNECTIONS, &path, |connection: &mut Connection| {
                if recent(connection) {
                    return false;
                }
                connection.last_used_at = Some(now);
                true
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not record last_used_at");
        }
    }

    /// Every connector of every workspace (the OAuth keep-alive's scan).
    pub async fn all_connectors(&self) -> Result<Vec<Connector>, ModelError> {
        let rows = self
            .store
            .scan::<Connector>(CONNECTORS, "", None, usize::MAX)
            .await?;
        Ok(rows.into_iter().map(|(_, c)| c).collect())
    }

    /// Up to `limit` connections after the path `after`, in path order (a scan page by page).
    pub async fn connections_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Connection)>, ModelError> {
        Ok(self.store.scan(CONNECTIONS, "", after, limit).await?)
    }

    /// Removes a connection's record and secrets, with the lifecycle event it makes, if any.
    pub async fn delete_connection(
        &self,
        connector: &Connector,
        user_id: &str,
        event: Option<Occurred>,
    ) -> Result<(), ModelError> {
        let path = connection_path(&connector.id, user_id);
        let mut batch = Batch::new();
        batch
            .delete(CONNECTIONS, path.clone())
            .delete(CONNECTION_SECRETS, path);
        self.commit(batch, event).await
    }
}

#[cfg(test)]
impl Registry {
    /// A registry on a new store in a temporary folder (removed when the folder is dropped).
    pub async fn temporary(rules: &'static dyn ConnectorRules) -> (tempfile::TempDir, Registry) {
        use crate::vault::{KeySource, generate_key_file};
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        generate_key_file(&key).unwrap();
        let config = crate::config::StoreConfig::at(dir.path().join("db"));
        let store = Store::create(&config, &KeySource::KeyFile(key))
            .await
            .unwrap();
        (dir, Registry::new(Arc::new(store), rules))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules that accept every connector and keep no credential on one; when they name a config
    /// key, it is where the connector's `s` and every connection's secrets go.
    struct TestRules(Option<&'static str>);

    static ANY: TestRules = TestRules(None);

    impl ConnectorRules for TestRules {
        fn check_connector(&self, _: &ConnectorDraft<'_>) -> Result<(), FieldError> {
            Ok(())
        }

        fn credential_on_connector(&self, _: Kind, _: Mode) -> bool {
            false
        }

        fn dependents(&self, _: Kind, changed: &BTreeSet<String>) -> Dependents {
            match self.0 {
                Some(key) if changed.contains(key) => Dependents {
                    connector_secrets: vec!["s"],
                    connections: true,
                },
                _ => Dependents::default(),
            }
        }

        fn through_key(&self, _: Kind) -> Option<&'static str> {
            None
        }
    }

    #[tokio::test]
    async fn a_use_is_recorded_once_a_minute_and_seen_at_once() {
        let (_dir, registry) = Registry::temporary(&ANY).await;
        let connector = registry
            .create_connector(NewConnector {
                workspace: String::new(),
                name: "Personal".into(),
                kind: Kind::ApiKey,
                mode: Mode::Personal,
                provider: String::new(),
                config: BTreeMap::new(),
                secrets: BTreeMap::new(),
            })
            .await
            .unwrap();
        let mut connection = Connection::new(&connector.id, "u1");
        connection.status = ConnectionStatus::Connected;
        registry
            .save_connection(&connection, None, None)
            .await
            .unwrap();
        let last_used = async |registry: &Registry| {
            registry
                .connection(&connector, "u1")
                .await
                .unwrap()
                .unwrap()
                .last_used_at
        };
        assert_eq!(last_used(&registry).await, None);

        registry.record_use(&connector, "u1").await;
        let first = last_used(&registry)
            .await
            .expect("recorded without waiting for a sync");
        registry.record_use(&connector, "u1").await;
        assert_eq!(
            last_used(&registry).await,
            Some(first),
            "once a minute, not per call"
        );

        // A use of a connection that does not exist creates nothing.
        registry.record_use(&connector, "nobody").await;
        assert!(
            registry
                .connection(&connector, "nobody")
                .await
                .unwrap()
                .is_none()
        );
    }

    static URL_MOVES: TestRules = TestRules(Some("url"));

    fn set(pairs: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
            .collect()
    }

    #[tokio::test]
    async fn a_moved_destination_erases_what_the_change_did_not_carry() {
        let (_dir, registry) = Registry::temporary(&URL_MOVES).await;
        let connector = registry
            .create_connector(NewConnector {
                workspace: String::new(),
                name: "C".into(),
                kind: Kind::Oauth2,
                mode: Mode::Personal,
                provider: String::new(),
                config: [("url".to_string(), "https://a/".to_string())].into(),
                secrets: [("s".to_string(), Secret::new("s1"))].into(),
            })
            .await
            .unwrap();
        let mut connection = Connection::new(&connector.id, "u1");
        connection.status = ConnectionStatus::Connected;
        connection.connected_at = Some(Utc::now());
        let secrets = ConnectionSecrets {
            slots: [("t".to_string(), Secret::new("t1"))].into(),
        };
        registry
            .save_connection(&connection, Some(&secrets), None)
            .await
            .unwrap();
        let update = async |config: &[(&str, Option<&str>)], secret: Option<&str>| {
            let patch = ConnectorPatch {
                config: set(config),
                secrets: secret
                    .map(|s| ("s".to_string(), Some(Secret::new(s))))
                    .into_iter()
                    .collect(),
                mode: None,
            };
            registry.update_connector("", "C", patch).await.unwrap()
        };

        // Not a destination: nothing moves.
        let (c, moved) = update(&[("description", Some("d"))], None).await;
        assert!(moved.settings.is_empty() && c.destinations_at.is_none());
        // The URL moves with the secret carried: the connector keeps it (the new value), the
        // connection's secrets go.
        let (c, moved) = update(&[("url", Some("https://b/"))], Some("s2")).await;
        assert_eq!(
            (moved.settings, moved.erased, moved.expired),
            (vec!["url".to_string()], vec![], 1)
        );
        assert_eq!(
            registry.connector_secrets(&c).await.unwrap().slots["s"].expose(),
            "s2"
        );
        let shown = registry.connection(&c, "u1").await.unwrap().unwrap();
        assert_eq!(shown.status, ConnectionStatus::Expired);
        assert_eq!(shown.expired_reason, Some(Expiry::DestinationChanged));
        assert!(
            registry
                .connection_secrets(&c, "u1")
                .await
                .unwrap()
                .slots
                .is_empty()
        );
        // Without it (even to a URL that only looks the same), the connector's secret goes too.
        let (c, moved) = update(&[("url", Some("https://b/x"))], None).await;
        assert_eq!(moved.erased, ["s"]);
        assert!(c.secrets_set.is_empty());
        assert!(
            registry
                .connector_secrets(&c)
                .await
                .unwrap()
                .slots
                .is_empty()
        );
        // A connection made after the move is usable; one made before is not.
        assert!(!c.moved_since(Some(Utc::now())));
        assert!(c.moved_since(connection.connected_at));
    }
}
