//! Calls on a connector that signs in through another (`oauth_connector`): the caller must be
//! allowed on both, and the audit record names both.
//!
//! Invariant: a call reaches a user's OAuth token through another connector only if the caller
//! could have reached that OAuth connector itself — an administrator of its workspace for admin
//! RPCs (the same workspace, since the registry keeps `oauth_connector` in it), a grant of the
//! same operation on it for agents.

use super::rpc::Access;
use super::{ApiError, Call, Services};
use crate::driver::OAUTH_CONNECTOR;
use crate::model::{Connector, FieldError, ModelError, Target};

impl Services {
    /// The connector `connector` signs in through, if it has one, noted in the call's audit
    /// record ("Mail (cn_…) via Mail OAuth (cn_…)").
    pub(super) async fn through_of(
        &self,
        call: &mut Call,
        connector: &Connector,
    ) -> Result<Option<Connector>, ApiError> {
        let Some(named) = connector.setting(OAUTH_CONNECTOR) else {
            return Ok(None);
        };
        let through = self
            .registry
            .find_connector(&connector.workspace, named)
            .await
            .map_err(|e| match e {
                ModelError::NotFound { .. } => ApiError::from(FieldError::new(
                    format!("config.{OAUTH_CONNECTOR}"),
                    format!("names {named:?}, which is not a connector of this workspace"),
                )),
                other => other.into(),
            })?;
        call.connector = format!("{} via {} ({})", call.connector, through.name, through.id);
        Ok(Some(through))
    }

    /// Admits the caller to the connector `target` signs in through, if it has one.
    pub(super) async fn admit_through(
        &self,
        call: &mut Call,
        target: &Target,
    ) -> Result<(), ApiError> {
        let Some(through) = self.through_of(call, &target.connector).await? else {
            return Ok(());
        };
        match call.rpc.access() {
            Access::Admin => Ok(()),
            Access::Grant(op) => self
                .policy
                .current()
                .check(
                    &call.caller,
                    op,
                    &through.workspace,
                    &through.name,
                    &through.id,
                    &target.on_behalf_of,
                )
                .map_err(ApiError::Denied),
        }
    }
}
