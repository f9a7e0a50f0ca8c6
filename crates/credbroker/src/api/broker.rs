//! The Broker service (data plane): credentials, mail and calendar on a user's behalf.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::{self, broker_server::Broker};
use super::{ApiError, Call, Services};
use crate::mail::imap::FetchQuery;
use crate::mail::watch::WatchQuery;
use crate::mail::{OutgoingAttachment, SendRequest};
use crate::model::{FieldError, Target, workspace_or_default};
use crate::policy::Operation;

pub struct BrokerApi(pub Arc<Services>);

const DEFAULT_MIN_TTL: u32 = 60;
const MAX_MIN_TTL: u32 = 3600;

impl BrokerApi {
    /// Validates the connection reference, resolves it and checks the caller's grant for `op`.
    pub(super) async fn target(
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
            .target(&workspace, &r.connector, &r.user_id)
            .await?;
        call.on(&target);
        self.0.authorize(call, op, &target)?;
        Ok(target)
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
            let target = self
                .target(&mut call, Operation::Resolve, r.connection)
                .await?;
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
                token_type: credential.form.token_type().to_string(),
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
        let s = &self.0;
        let mut call = s.begin(&req, "SendEmail")?;
        let r = req.into_inner();
        let result = async {
            let target = self
                .target(&mut call, Operation::SendEmail, r.connection)
                .await?;
            let request = SendRequest {
                from: r.from,
                to: r.to,
                cc: r.cc,
                bcc: r.bcc,
                reply_to: r.reply_to,
                subject: r.subject,
                text_body: r.text_body,
                html_body: r.html_body,
                attachments: r
                    .attachments
                    .into_iter()
                    .map(|a| OutgoingAttachment {
                        filename: a.filename,
                        content_type: a.content_type,
                        content: a.content,
                    })
                    .collect(),
                in_reply_to: r.in_reply_to,
                references: r.references,
            };
            let sent = s.mail.send(&target, request).await?;
            Ok(proto::SendEmailResponse {
                message_id: sent.message_id,
                accepted: sent.accepted,
            })
        }
        .await;
        s.finish(call, result).await
    }

    async fn fetch_mail(
        &self,
        req: Request<proto::FetchMailRequest>,
    ) -> Result<Response<proto::FetchMailResponse>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "FetchMail")?;
        let r = req.into_inner();
        let result = async {
            let target = self
                .target(&mut call, Operation::FetchMail, r.connection)
                .await?;
            let query = FetchQuery {
                mailbox: r.mailbox,
                limit: r.limit,
                unseen_only: r.unseen_only,
                since_uid: r.since_uid,
                since: r
                    .since
                    .as_ref()
                    .map(|t| convert::from_timestamp("since", t))
                    .transpose()?,
                include_html: r.include_html,
                mark_seen: r.mark_seen,
            };
            let fetched = s.mail.fetch(&target, query).await?;
            Ok(proto::FetchMailResponse {
                messages: fetched.messages.into_iter().map(convert::mail).collect(),
                uid_validity: fetched.uid_validity,
                highest_uid: fetched.highest_uid,
            })
        }
        .await;
        s.finish(call, result).await
    }

    type WatchMailStream = MailStream;

    /// The stream is audited when it opens; what it delivers afterwards is not audited per
    /// message.
    async fn watch_mail(
        &self,
        req: Request<proto::WatchMailRequest>,
    ) -> Result<Response<Self::WatchMailStream>, Status> {
        let s = &self.0;
        let mut call = s.begin(&req, "WatchMail")?;
        let r = req.into_inner();
        let result = async {
            let target = self
                .target(&mut call, Operation::WatchMail, r.connection)
                .await?;
            let query = WatchQuery {
                mailbox: r.mailbox,
                since_uid: r.since_uid,
                include_html: r.include_html,
            };
            let watcher = s.mail.watch(&call.caller, &target, query).await?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(watcher).map(|event| {
                event
                    .map(|e| proto::MailEvent {
                        message: Some(convert::mail(e.message)),
                        uid_validity: e.uid_validity,
                    })
                    .map_err(|e| Status::from(ApiError::from(e)))
            });
            Ok(Box::pin(stream) as MailStream)
        }
        .await;
        s.finish(call, result).await
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
