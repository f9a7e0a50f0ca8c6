//! The typed model: workspaces, connectors, connections and their secrets, with the validation
//! of every name and field, and [`Registry`], the one place that reads and writes them.

mod check;
mod kind;
mod records;
mod registry;
mod secret;
mod validate;

pub use check::{Check, Stage, TestReport};
pub use kind::{Kind, Mode};
pub use records::{
    Connection, ConnectionSecrets, ConnectionStatus, Connector, ConnectorSecrets, Expiry, settings,
};
pub use registry::{
    ConnectorDraft, ConnectorPatch, ConnectorRules, Dependents, KeyStatus, Moved, NewConnector,
    Registry, Target, connection_path,
};
pub use secret::Secret;
pub use validate::{
    DEFAULT_WORKSPACE, FieldError, validate_config, validate_connector_name, validate_secret,
    validate_user_id, workspace_or_default,
};

use crate::store::StoreError;

/// What can go wrong in the model. Each variant maps to one gRPC status in `api`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("{what} {name:?} not found in workspace {workspace:?}")]
    NotFound {
        what: &'static str,
        workspace: String,
        name: String,
    },
    #[error("a connector named {name:?} already exists in workspace {workspace:?}")]
    AlreadyExists { workspace: String, name: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A fresh random id with a readable prefix ("cn_" + 20 hex digits).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        hex::encode(crate::vault::random_bytes::<10>())
    )
}
