//! The state a connection must be in to be used, and what a refused credential does to it.
//! Depends on the model only, so that [`crate::oauth`] can use it without depending on the
//! drivers that call it.
//!
//! Invariants:
//! - a connection is usable only when it is stored and CONNECTED or ERROR: absent or
//!   NOT_CONNECTED is [`ConnectionError::NotConnected`], EXPIRED is [`ConnectionError::Expired`];
//! - a connection made before its connector last moved where its secrets go is never used
//!   ([`ConnectionError::DestinationChanged`]), even before the move's sweep has marked it;
//! - a stored password or grant the server refuses expires the connection ([`expire_refused`]):
//!   the user must reconnect, and every later use says EXPIRED without trying the server again.

use crate::model::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, Expiry, ModelError, Registry,
};

/// Why a connection cannot be used: the one pair every module reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionError {
    #[error(
        "connector {connector:?} has no connection{}: connect an account first",
        for_user(user)
    )]
    NotConnected { connector: String, user: String },
    #[error(
        "the connection of connector {connector:?}{} has expired: reconnect the account",
        for_user(user)
    )]
    Expired { connector: String, user: String },
    #[error(
        "the connection of connector {connector:?}{} was made before a change of where its secrets go (destination_changed): reconnect the account",
        for_user(user)
    )]
    DestinationChanged { connector: String, user: String },
}

impl ConnectionError {
    pub fn not_connected(connector: &Connector, user: &str) -> Self {
        ConnectionError::NotConnected {
            connector: connector.name.clone(),
            user: user.to_string(),
        }
    }

    pub fn expired(connector: &Connector, user: &str) -> Self {
        ConnectionError::Expired {
            connector: connector.name.clone(),
            user: user.to_string(),
        }
    }

    pub fn destination_changed(connector: &Connector, user: &str) -> Self {
        ConnectionError::DestinationChanged {
            connector: connector.name.clone(),
            user: user.to_string(),
        }
    }
}

/// " for user \"u\"", or nothing for a shared connection: for messages.
pub fn for_user(user: &str) -> String {
    if user.is_empty() {
        String::new()
    } else {
        format!(" for user {user:?}")
    }
}

/// The stored connection of a connector and user, if it can be used. A stored NOT_CONNECTED
/// record is refused like an absent one: no account was ever connected through it (nothing
/// stores one today; the rule is OAuth's, which was the stricter of the two copies).
/// The error is the caller's own, so that each module keeps one error type.
pub async fn usable_connection<E: From<ConnectionError> + From<ModelError>>(
    registry: &Registry,
    connector: &Connector,
    user: &str,
) -> Result<Connection, E> {
    Ok(usable(
        connector,
        user,
        registry.connection(connector, user).await?,
    )?)
}

/// [`usable_connection`] with its secrets, both as of one moment
/// ([`Registry::connection_with_secrets`]): what a caller that uses both must read.
pub async fn usable_connection_with_secrets<E: From<ConnectionError> + From<ModelError>>(
    registry: &Registry,
    connector: &Connector,
    user: &str,
) -> Result<(Connection, ConnectionSecrets), E> {
    let (connection, secrets) = registry.connection_with_secrets(connector, user).await?;
    Ok((usable(connector, user, connection)?, secrets))
}

fn usable(
    connector: &Connector,
    user: &str,
    connection: Option<Connection>,
) -> Result<Connection, ConnectionError> {
    let connection = connection.ok_or_else(|| ConnectionError::not_connected(connector, user))?;
    let moved = || Err(ConnectionError::destination_changed(connector, user));
    match connection.status {
        ConnectionStatus::NotConnected => Err(ConnectionError::not_connected(connector, user)),
        ConnectionStatus::Expired
            if connection.expired_reason == Some(Expiry::DestinationChanged) =>
        {
            moved()
        }
        ConnectionStatus::Expired => Err(ConnectionError::expired(connector, user)),
        _ if connector.moved_since(connection.connected_at) => moved(),
        ConnectionStatus::Connected | ConnectionStatus::Error => Ok(connection),
    }
}

/// What a refusal of a stored credential means: the connection is EXPIRED, with `why` (never a
/// secret) as its last error; a refused OAuth grant also loses its tokens (`erase_secrets`).
/// Returns the error to report if a connection was marked, None if there was none to mark.
pub async fn expire_refused(
    registry: &Registry,
    connector: &Connector,
    user: &str,
    why: String,
    erase_secrets: bool,
) -> Result<Option<ConnectionError>, ModelError> {
    let (expired, detail) = (
        crate::events::EventKind::Expired,
        crate::events::Detail::new("refused", &why),
    );
    let event = crate::events::Occurred::new(expired, connector, user, detail);
    let marked = registry
        .mark_expired(connector, user, why.clone(), erase_secrets, Some(event))
        .await?;
    if marked {
        tracing::warn!(connector = %connector.id, "the stored credential was refused: connection marked expired");
    }
    Ok(marked.then(|| ConnectionError::expired(connector, user)))
}
