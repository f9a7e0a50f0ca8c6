//! The Broker service (data plane): credentials, mail and calendar on a user's behalf.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{self, broker_server::Broker};
use super::{ApiError, Call, Services};
use crate::model::{FieldError, Target, workspace_or_default};
use crate::policy::Operation;

pub struct BrokerApi(pub Arc<Services>);

const DEFAULT_MIN_TTL: u32 = 60;
const MAX_MIN_TTL: u32 = 3600;

impl BrokerApi {
    /// Validates the connection reference, resolves it and checks the caller's grant for `op`.
    pub(super) fn target(
        &self,
        call: &mut Call,
        op: Operation,
        connection: Option<proto::ConnectionRef>,
    ) -> Result<Target, ApiError> {
        let r = connection.ok_or_else(|| FieldError::new("connection", "is required"))?;
        let workspace = workspace_or_default("connection.workspace", &r.workspace)?;
        call.workspace = workspace.clone();
        call.connector = r.connector.clone();
        call.user_id = r.user_id.clone();
        let target = self
            .0
            .registry
            .target(&workspace, &r.connector, &r.user_id)?;
        call.on(&target);
        self.0.authorize(call, op, &target)?;
        Ok(target)
    }

    async fn unimplemented<T>(
        &self,
        mut call: Call,
        op: Operation,
        connection: Option<proto::ConnectionRef>,
    ) -> Result<Response<T>, Status> {
        let result = self.target(&mut call, op, connection).and_then(|_| {
            Err(ApiError::status(
                tonic::Code::Unimplemented,
                "UNSUPPORTED",
                format!("{} is not available in this build", op.name()),
            ))
        });
        self.0.finish(call, result).await
    }
}

type MailStream = Pin<Box<dyn Stream<Item = Result<proto::MailEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerApi {
    async fn resolve_credential(
        &self,
        req: Request<proto::ResolveCredentialRequest>,
    ) -> Result<Response<proto::ResolveCredentialResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "ResolveCredential")?;
        let r = req.into_inner();
        let result = async {
            let target = self.target(&mut call, Operation::Resolve, r.connection)?;
            let min_ttl = match r.min_ttl_seconds {
                0 => DEFAULT_MIN_TTL,
                n if n <= MAX_MIN_TTL => n,
                n => {
                    return Err(FieldError::new(
                        "min_ttl_seconds",
                        format!("is {n}; at most {MAX_MIN_TTL}"),
                    )
                    .into());
                }
            };
            let credential = s
                .resolver
                .resolve(&target, Duration::from_secs(min_ttl.into()))
                .await?;
            Ok(proto::ResolveCredentialResponse {
                kind: convert::kind_to(credential.kind) as i32,
                secret: credential.secret.expose().to_string(),
                token_type: credential.token_type,
                expires_at: convert::opt_timestamp(credential.expires_at),
                scopes: credential.scopes,
                account_label: credential.account_label,
                header_name: credential.header_name,
                header_prefix: credential.header_prefix,
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn send_email(
        &self,
        req: Request<proto::SendEmailRequest>,
    ) -> Result<Response<proto::SendEmailResponse>, Status> {
        let call = self.0.begin(&req, "SendEmail")?;
        self.unimplemented(call, Operation::SendEmail, req.into_inner().connection)
            .await
    }

    async fn fetch_mail(
        &self,
        req: Request<proto::FetchMailRequest>,
    ) -> Result<Response<proto::FetchMailResponse>, Status> {
        let call = self.0.begin(&req, "FetchMail")?;
        self.unimplemented(call, Operation::FetchMail, req.into_inner().connection)
            .await
    }

    type WatchMailStream = MailStream;

    async fn watch_mail(
        &self,
        req: Request<proto::WatchMailRequest>,
    ) -> Result<Response<Self::WatchMailStream>, Status> {
        let call = self.0.begin(&req, "WatchMail")?;
        self.unimplemented(call, Operation::WatchMail, req.into_inner().connection)
            .await
    }

    async fn list_calendar(
        &self,
        req: Request<proto::ListCalendarRequest>,
    ) -> Result<Response<proto::ListCalendarResponse>, Status> {
        let call = self.0.begin(&req, "ListCalendar")?;
        self.list_calendar_call(call, req.into_inner()).await
    }

    async fn create_event(
        &self,
        req: Request<proto::CreateEventRequest>,
    ) -> Result<Response<proto::CreateEventResponse>, Status> {
        let call = self.0.begin(&req, "CreateEvent")?;
        self.create_event_call(call, req.into_inner()).await
    }
}
