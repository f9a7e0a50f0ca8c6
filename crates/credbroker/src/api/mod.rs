//! The gRPC services. Handlers are thin: they name the caller, check policy, map the request to
//! the domain, and map domain errors to statuses; every call ends with an audit record, and
//! the reply waits for it ([`Services::finish`]).

mod admin;
mod broker;
mod calendar;
mod convert;
mod redact;
mod status;

pub use status::ApiError;

use std::sync::Arc;

use tonic::Request;

use crate::audit::{AuditEvent, AuditLog, Outcome};
use crate::config::Limits;
use crate::connect::Connect;
use crate::model::{Registry, Target};
use crate::oauth::OAuth;
use crate::policy::{Caller, Operation, PolicyHandle};
use crate::resolve::Resolver;

/// The generated protobuf and gRPC code of `proto/credbroker/v1`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("credbroker.v1");

    /// For gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("credbroker_descriptor");
}

/// What the TLS layer learned about the peer, attached to every request of the connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub caller: Caller,
    pub remote: Option<std::net::SocketAddr>,
}

/// Everything the handlers need, shared by both services.
pub struct Services {
    pub registry: Arc<Registry>,
    pub audit: Arc<AuditLog>,
    pub policy: Arc<PolicyHandle>,
    pub resolver: Resolver,
    pub connect: Connect,
    pub mail: Arc<crate::mail::Mail>,
    pub oauth: Arc<OAuth>,
    pub rate: crate::policy::Budgets,
    pub limits: Limits,
    /// Refusals of unauthenticated callers (handshakes, OAuth callbacks), summarised.
    pub refusals: Arc<crate::refusals::Refusals>,
    /// OAuth callbacks one source address may send, per second.
    pub callback_rate: crate::policy::RateLimiter,
}

/// One call in progress: who, what, on what; filled in as the request is understood, then
/// written to the audit log by [`Services::finish`].
#[derive(Debug, Clone)]
pub struct Call {
    pub caller: String,
    pub request_id: String,
    pub operation: &'static str,
    pub workspace: String,
    pub connector: String,
    pub user_id: String,
    pub started: std::time::Instant,
}

impl Call {
    /// Notes the connector the call resolved to, for the audit record.
    pub fn on(&mut self, target: &Target) {
        self.workspace = target.connector.workspace.clone();
        self.connector = format!("{} ({})", target.connector.name, target.connector.id);
        self.user_id = target.on_behalf_of.clone();
    }
}

impl Services {
    /// Starts a call: the caller comes from the TLS layer, never from the request.
    pub fn begin<T>(
        &self,
        request: &Request<T>,
        operation: &'static str,
    ) -> Result<Call, tonic::Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .ok_or_else(|| tonic::Status::unauthenticated("no verified client certificate"))?;
        let request_id = hex::encode(crate::vault::random_bytes::<8>());
        if let Err(exhausted) = self.rate.caller(&peer.caller.id) {
            let why = format!(
                "caller {} exceeded its limit of {} requests per second; retry later",
                peer.caller.id, exhausted.per_second
            );
            // Refused before any work; its audit record need not delay the refusal.
            let (audit, event) = (
                self.audit.clone(),
                AuditEvent {
                    caller: peer.caller.id.clone(),
                    operation: operation.to_string(),
                    outcome: Some(Outcome::Denied),
                    reason: why.clone(),
                    request_id,
                    ..AuditEvent::default()
                },
            );
            tokio::spawn(async move { audit.record(event).await });
            return Err(status::exhausted_status(why, &exhausted));
        }
        Ok(Call {
            caller: peer.caller.id.clone(),
            request_id,
            operation,
            workspace: String::new(),
            connector: String::new(),
            user_id: String::new(),
            started: std::time::Instant::now(),
        })
    }

    pub fn authorize(&self, call: &Call, op: Operation, target: &Target) -> Result<(), ApiError> {
        let c = &target.connector;
        self.policy
            .current()
            .check(
                &call.caller,
                op,
                &c.workspace,
                &c.name,
                &c.id,
                &target.on_behalf_of,
            )
            .map_err(ApiError::Denied)?;
        self.rate
            .user(&call.caller, &target.on_behalf_of)
            .map_err(|exhausted| ApiError::Exhausted {
                message: format!(
                    "caller {} exceeded its limit of {} requests per second for user {:?}; retry later",
                    call.caller, exhausted.per_second, target.on_behalf_of
                ),
                exhausted,
            })
    }

    pub fn authorize_admin(&self, call: &Call, workspace: &str) -> Result<(), ApiError> {
        let workspace = if workspace.is_empty() {
            crate::model::DEFAULT_WORKSPACE
        } else {
            workspace
        };
        self.policy
            .current()
            .check_admin(&call.caller, workspace)
            .map_err(ApiError::Denied)
    }

    /// Audits the call's outcome and turns it into the reply. If the audit record cannot be
    /// written, the call fails (fail closed) whatever its outcome.
    pub async fn finish<T>(
        &self,
        call: Call,
        result: Result<T, ApiError>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        let (outcome, reason) = match &result {
            Ok(_) => (Outcome::Ok, String::new()),
            Err(ApiError::Denied(why) | ApiError::Exhausted { message: why, .. }) => {
                (Outcome::Denied, why.clone())
            }
            Err(e) => (Outcome::Error, e.to_string()),
        };
        let caller = call.caller.clone();
        let event = AuditEvent {
            caller: call.caller,
            operation: call.operation.to_string(),
            workspace: call.workspace,
            connector: call.connector,
            user_id: call.user_id,
            outcome: Some(outcome),
            reason,
            request_id: call.request_id.clone(),
        };
        if let Err(e) = self.audit.record(event).await {
            tracing::error!(error = %e, request_id = %call.request_id, "audit failed: refusing the call");
            crate::metrics::rpc(
                call.operation,
                tonic::Code::Unavailable,
                call.started.elapsed(),
            );
            return Err(tonic::Status::unavailable(
                "the audit log cannot be written; the request was refused",
            ));
        }
        let result = result.map_err(tonic::Status::from);
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let elapsed = call.started.elapsed();
        crate::metrics::rpc(call.operation, code, elapsed);
        tracing::info!(
            op = call.operation,
            caller = %caller,
            request_id = %call.request_id,
            outcome = outcome.name(),
            code = crate::metrics::code_name(code),
            elapsed_us = elapsed.as_micros() as u64,
            "rpc"
        );
        let mut response = tonic::Response::new(result?);
        if let Ok(value) = call.request_id.parse() {
            response.metadata_mut().insert("x-request-id", value);
        }
        Ok(response)
    }
}

pub use admin::AdminApi;
pub use broker::BrokerApi;
