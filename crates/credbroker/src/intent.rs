//! Intent records for side effects that happen deep inside a call rather than being the
//! call itself: an OAuth refresh inside a resolve or a mail call, after which the provider may
//! have rotated the refresh token. The API combinator opens a [`scope`] around every call's
//! work; the code about to act [`declare`]s its intent, which is durable before it returns.
//!
//! Invariants: inside a scope, `declare` returns `Ok` only once the intent record (the call's
//! caller, label and request id, outcome `allowed`) is on disk, so the action it guards never
//! happens unrecorded; outside any scope (background work no caller asked for, such as a
//! WatchMail stream's own refresh) there is no caller to record and `declare` does nothing.

use std::sync::Arc;

use crate::audit::{AuditError, AuditEvent, AuditLog, Outcome};
use crate::model::Connector;

/// The call an intent belongs to.
#[derive(Clone)]
pub struct Scope {
    pub audit: Arc<AuditLog>,
    pub caller: String,
    /// The call's audit label.
    pub operation: &'static str,
    pub request_id: String,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// Runs `work` with `scope` as the call its intents belong to.
pub async fn scope<F: Future>(scope: Scope, work: F) -> F::Output {
    SCOPE.scope(scope, work).await
}

/// Records, durably, that the current call is about to `act` on `connector` for `user`.
pub async fn declare(connector: &Connector, user: &str, act: &str) -> Result<(), AuditError> {
    let Ok(scope) = SCOPE.try_with(Scope::clone) else {
        return Ok(());
    };
    let event = AuditEvent {
        caller: scope.caller,
        operation: scope.operation.to_string(),
        workspace: connector.workspace.clone(),
        connector: format!("{} ({})", connector.name, connector.id),
        user_id: user.to_string(),
        outcome: Some(Outcome::Allowed),
        reason: format!("intent: {act}"),
        request_id: scope.request_id,
        detail: String::new(),
    };
    scope.audit.record(event).await.map(drop)
}
