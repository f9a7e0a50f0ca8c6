//! The one skeleton every RPC runs in: [`Services::handle`] (and [`Services::handle_on`] for
//! RPCs on one connection).
//!
//! Invariants: the caller comes from the TLS layer, never from the request; every call that
//! gets past identity is audited under its [`Rpc`]'s label, and the reply waits for the audit
//! record (if it cannot be written the call fails, whatever its outcome); an RPC that acts on
//! the world ([`Effect::Acts`]) writes a durable intent record once the caller is admitted and
//! before it acts, and does not act if that record cannot be written (the client gets
//! UNAVAILABLE); side effects deep inside a call (an OAuth refresh) declare theirs in the
//! call's [`crate::intent`] scope, opened here; every reply, success or error, carries the call's `x-request-id`, the same id
//! its audit records hold.

use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::gate::Admitted;
use super::proto;
use super::rpc::{Access, Effect, Rpc};
use super::status::exhausted_status;
use super::{ApiError, PeerInfo, Services};
use crate::audit::{AuditEvent, Outcome};
use crate::model::{Connector, FieldError, Target, workspace_or_default};

/// The reply header (or, on an error, trailer) naming the call in the audit log and the logs.
const REQUEST_ID: &str = "x-request-id";

/// One call in progress: who, what, on what; filled in as the request is understood, then
/// written to the audit log when the call ends.
#[derive(Debug, Clone)]
pub struct Call {
    pub rpc: Rpc,
    pub caller: String,
    pub request_id: String,
    pub workspace: String,
    pub connector: String,
    pub user_id: String,
    /// The audit record's `detail` ([`AuditEvent::detail`]).
    pub detail: String,
    pub started: std::time::Instant,
}

/// How an error is audited: a refusal (policy, rate) is denied, anything else an error.
pub fn audited_outcome(e: &ApiError) -> (Outcome, String) {
    match e {
        ApiError::Denied(why) | ApiError::Exhausted { message: why, .. } => {
            (Outcome::Denied, why.clone())
        }
        e => (Outcome::Error, e.to_string()),
    }
}

impl Call {
    /// The call's audit record.
    pub fn into_audit_event(self, outcome: Outcome, reason: String) -> AuditEvent {
        AuditEvent {
            caller: self.caller,
            operation: self.rpc.audit_label().to_string(),
            workspace: self.workspace,
            connector: self.connector,
            user_id: self.user_id,
            outcome: Some(outcome),
            reason,
            request_id: self.request_id,
            detail: self.detail,
        }
    }

    /// Notes the connector the call resolved to, for the audit record.
    pub fn on(&mut self, target: &Target) {
        self.on_connector(&target.connector);
        self.workspace = target.connector.workspace.clone();
        self.user_id = target.on_behalf_of.clone();
    }

    /// Notes the connector the call created, found or changed, for the audit record.
    pub fn on_connector(&mut self, c: &Connector) {
        self.connector = format!("{} ({})", c.name, c.id);
    }
}

/// A request that names one connection (`connection`), taken out for [`Services::handle_on`].
pub trait OnConnection {
    fn take_connection(&mut self) -> Option<proto::ConnectionRef>;
}

macro_rules! on_connection {
    ($($request:ident),* $(,)?) => {
        $(impl OnConnection for proto::$request {
            fn take_connection(&mut self) -> Option<proto::ConnectionRef> {
                self.connection.take()
            }
        })*
    };
}

on_connection!(
    ResolveCredentialRequest,
    SendEmailRequest,
    FetchMailRequest,
    WatchMailRequest,
    ListCalendarRequest,
    CreateEventRequest,
    CallRequest,
    ListFoldersRequest,
    MoveMessagesRequest,
    SetFlagsRequest,
    DeleteMessagesRequest,
    BeginConnectRequest,
    ConnectWithCredentialsRequest,
    TestConnectionRequest,
    DisconnectRequest,
    GetConnectionRequest,
);

fn tag(metadata: &mut MetadataMap, request_id: &str) {
    if let Ok(value) = request_id.parse() {
        metadata.insert(REQUEST_ID, value);
    }
}

fn tagged(mut status: Status, request_id: &str) -> Status {
    tag(status.metadata_mut(), request_id);
    status
}

impl Services {
    /// Runs one RPC: identity, rate limit, `work` (which admits the caller and does the domain
    /// call), audit, metrics, logs and the request id on the reply.
    pub async fn handle<Req, Resp>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        work: impl AsyncFnOnce(&mut Call, Req) -> Result<Resp, ApiError>,
    ) -> Result<Response<Resp>, Status> {
        let mut call = self.begin(rpc, &request).await?;
        let scope = crate::intent::Scope {
            audit: self.audit.clone(),
            caller: call.caller.clone(),
            operation: rpc.audit_label(),
            request_id: call.request_id.clone(),
        };
        let caller = call.caller.clone();
        let work = crate::upstream::as_caller(caller, work(&mut call, request.into_inner()));
        let result = crate::intent::scope(scope, work).await;
        self.finish(call, result).await
    }

    /// [`Services::handle`] for an RPC on one connection: `work` runs once the connection is
    /// resolved and the caller admitted to it ([`Services::target`]).
    pub async fn handle_on<Req: OnConnection, Resp>(
        &self,
        rpc: Rpc,
        request: Request<Req>,
        work: impl AsyncFnOnce(&mut Call, Target, Req) -> Result<Resp, ApiError>,
    ) -> Result<Response<Resp>, Status> {
        self.handle(rpc, request, async |call, mut req| {
            let target = self.target(call, req.take_connection()).await?;
            if rpc.effect() == Effect::Acts {
                self.intend(call).await?;
            }
            work(call, target, req).await
        })
        .await
    }

    /// The intent record of an acting RPC: durable before the action, which does not happen
    /// if it cannot be written.
    async fn intend(&self, call: &Call) -> Result<(), ApiError> {
        let event = call
            .clone()
            .into_audit_event(Outcome::Allowed, "intent: admitted, about to act".into());
        self.audit.record(event).await.map(drop).map_err(|e| {
            tracing::error!(error = %e, request_id = %call.request_id, "intent not written: not acting");
            ApiError::Audit(e)
        })
    }

    /// Starts a call: the caller comes from the TLS layer, never from the request, and is
    /// admitted here unless the gate already did ([`Admitted`]).
    async fn begin<T>(&self, rpc: Rpc, request: &Request<T>) -> Result<Call, Status> {
        let peer = request.extensions().get::<PeerInfo>();
        if request.extensions().get::<Admitted>().is_none() {
            self.admit(rpc, peer).await?;
        }
        let peer = peer.ok_or_else(|| Status::unauthenticated("no verified client certificate"))?;
        Ok(self.call(rpc, &peer.caller.id))
    }

    fn call(&self, rpc: Rpc, caller: &str) -> Call {
        Call {
            rpc,
            caller: caller.to_string(),
            request_id: hex::encode(crate::vault::random_bytes::<8>()),
            workspace: String::new(),
            connector: String::new(),
            user_id: String::new(),
            detail: String::new(),
            started: std::time::Instant::now(),
        }
    }

    /// What the request's headers alone decide, before its body is read: a verified caller,
    /// within its rate limit, that the policy could admit to this RPC somewhere (a caller the
    /// policy does not know is refused here). A policy refusal is audited like any other.
    pub async fn admit(&self, rpc: Rpc, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let request_id = hex::encode(crate::vault::random_bytes::<8>());
        let Some(peer) = peer else {
            let status = Status::unauthenticated("no verified client certificate");
            return Err(tagged(status, &request_id));
        };
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
                    operation: rpc.audit_label().to_string(),
                    outcome: Some(Outcome::Denied),
                    reason: why.clone(),
                    request_id: request_id.clone(),
                    ..AuditEvent::default()
                },
            );
            tokio::spawn(async move { audit.record(event).await });
            return Err(tagged(exhausted_status(why, &exhausted), &request_id));
        }
        let op = match rpc.access() {
            Access::Grant(op) => Some(op),
            Access::Admin => None,
        };
        if let Err(why) = self.policy.current().may_call(&peer.caller.id, op) {
            let call = self.call(rpc, &peer.caller.id);
            return self
                .finish::<()>(call, Err(ApiError::Denied(why)))
                .await
                .map(drop);
        }
        Ok(())
    }

    /// Audits the call's outcome and turns it into the reply. If the audit record cannot be
    /// written, the call fails (fail closed) whatever its outcome.
    async fn finish<T>(
        &self,
        call: Call,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let (outcome, reason) = match &result {
            Ok(_) => (Outcome::Ok, String::new()),
            Err(e) => audited_outcome(e),
        };
        let (rpc, started) = (call.rpc, call.started);
        let (caller, request_id) = (call.caller.clone(), call.request_id.clone());
        let id = &request_id;
        if let Err(e) = self
            .audit
            .record(call.into_audit_event(outcome, reason))
            .await
        {
            tracing::error!(error = %e, request_id = %id, "audit failed: refusing the call");
            crate::metrics::rpc(rpc, tonic::Code::Unavailable, started.elapsed());
            let status =
                Status::unavailable("the audit log cannot be written; the request was refused");
            return Err(tagged(status, id));
        }
        let result = result.map_err(Status::from);
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let elapsed = started.elapsed();
        crate::metrics::rpc(rpc, code, elapsed);
        tracing::info!(
            op = rpc.metric_label(),
            caller = %caller,
            request_id = %id,
            outcome = outcome.name(),
            code = crate::metrics::code_name(code),
            elapsed_us = elapsed.as_micros() as u64,
            "rpc"
        );
        let mut response = Response::new(result.map_err(|s| tagged(s, id))?);
        tag(response.metadata_mut(), id);
        Ok(response)
    }

    /// The connection a request names, with the caller admitted to it as the RPC's
    /// [`Access`] requires. Whatever can be decided from the request is decided before the
    /// connection is looked up, so a caller learns nothing of what exists where it has no
    /// rights: admin rights on the workspace, or a grant that could cover (workspace,
    /// connector reference, user) ([`crate::policy::Policy::may_reach`]); the grant is then
    /// checked again on the connector the reference resolved to (its name, or its exact id).
    pub async fn target(
        &self,
        call: &mut Call,
        connection: Option<proto::ConnectionRef>,
    ) -> Result<Target, ApiError> {
        let r = connection.ok_or_else(|| FieldError::new("connection", "is required"))?;
        let workspace = workspace_or_default("connection.workspace", &r.workspace)?;
        call.workspace = workspace.clone();
        call.connector = r.connector.clone();
        call.user_id = r.user_id.clone();
        match call.rpc.access() {
            Access::Admin => self.admin_of(call, &workspace)?,
            Access::Grant(op) => self
                .policy
                .current()
                .may_reach(&call.caller, op, &workspace, &r.connector, &r.user_id)
                .map_err(ApiError::Denied)?,
        }
        let target = self
            .registry
            .target(&workspace, &r.connector, &r.user_id)
            .await?;
        call.on(&target);
        self.admit_through(call, &target).await?;
        if let Access::Grant(op) = call.rpc.access() {
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
                })?;
        }
        Ok(target)
    }

    /// Admits the caller as an administrator of `scope`: a workspace, or `*` for every one.
    pub fn admin_of(&self, call: &mut Call, scope: &str) -> Result<(), ApiError> {
        call.workspace = scope.to_string();
        let scope = if scope.is_empty() {
            crate::model::DEFAULT_WORKSPACE
        } else {
            scope
        };
        self.policy
            .current()
            .check_admin(&call.caller, scope)
            .map_err(ApiError::Denied)
    }

    /// The workspace in request field `field` (empty: the default one), with the caller
    /// admitted as its administrator.
    pub fn admin_workspace(
        &self,
        call: &mut Call,
        field: &str,
        workspace: &str,
    ) -> Result<String, ApiError> {
        let workspace = workspace_or_default(field, workspace)?;
        self.admin_of(call, &workspace)?;
        Ok(workspace)
    }
}
