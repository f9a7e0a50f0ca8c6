//! The Broker service (data plane): credentials, mail and calendar on a user's behalf. Each
//! handler is one [`Services::handle_on`] call: the caller is admitted per its policy grant
//! before the handler's body runs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::proto::{self, broker_server::Broker};
use super::{ApiError, Rpc, Services, convert};
use crate::model::FieldError;

pub struct BrokerApi(pub Arc<Services>);

const DEFAULT_MIN_TTL: u32 = 60;
const MAX_MIN_TTL: u32 = 3600;

fn min_ttl(seconds: u32) -> Result<Duration, FieldError> {
    let seconds = match seconds {
        0 => DEFAULT_MIN_TTL,
        n if n <= MAX_MIN_TTL => n,
        n => {
            return Err(FieldError::new(
                "min_ttl_seconds",
                format!("is {n}; at most {MAX_MIN_TTL}"),
            ));
        }
    };
    Ok(Duration::from_secs(seconds.into()))
}

type MailStream = Pin<Box<dyn Stream<Item = Result<proto::MailEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Broker for BrokerApi {
    async fn resolve_credential(
        &self,
        req: Request<proto::ResolveCredentialRequest>,
    ) -> Result<Response<proto::ResolveCredentialResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::ResolveCredential, req, async |_, target, r| {
            let min_ttl = min_ttl(r.min_ttl_seconds)?;
            let credential = s.resolver.resolve(&target, min_ttl).await?;
            Ok(convert::credential(credential))
        })
        .await
    }

    async fn send_email(
        &self,
        req: Request<proto::SendEmailRequest>,
    ) -> Result<Response<proto::SendEmailResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::SendEmail, req, async |_, target, r| {
            let sent = s.mail.send(&target, convert::send_request(r)).await?;
            Ok(proto::SendEmailResponse {
                message_id: sent.message_id,
                accepted: sent.accepted,
            })
        })
        .await
    }

    async fn fetch_mail(
        &self,
        req: Request<proto::FetchMailRequest>,
    ) -> Result<Response<proto::FetchMailResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::FetchMail, req, async |_, target, r| {
            let fetched = s.mail.fetch(&target, convert::fetch_query(r)?).await?;
            Ok(proto::FetchMailResponse {
                messages: fetched.messages.into_iter().map(convert::mail).collect(),
                uid_validity: fetched.uid_validity,
                highest_uid: fetched.highest_uid,
            })
        })
        .await
    }

    type WatchMailStream = MailStream;

    /// The stream is audited when it opens; what it delivers afterwards is not audited per
    /// message.
    async fn watch_mail(
        &self,
        req: Request<proto::WatchMailRequest>,
    ) -> Result<Response<Self::WatchMailStream>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::WatchMail, req, async |call, target, r| {
            let watcher = s
                .mail
                .watch(&call.caller, &target, convert::watch_query(r))
                .await?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(watcher).map(|event| {
                event
                    .map(convert::mail_event)
                    .map_err(|e| Status::from(ApiError::from(e)))
            });
            Ok(Box::pin(stream) as MailStream)
        })
        .await
    }

    async fn list_calendar(
        &self,
        req: Request<proto::ListCalendarRequest>,
    ) -> Result<Response<proto::ListCalendarResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::ListCalendar, req, async |_, target, r| {
            self.listing(&target, r).await
        })
        .await
    }

    async fn create_event(
        &self,
        req: Request<proto::CreateEventRequest>,
    ) -> Result<Response<proto::CreateEventResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::CreateEvent, req, async |_, target, r| {
            self.new_event(&target, r).await
        })
        .await
    }

    /// Admitted to the connection, then to the request's method and path, before anything
    /// is sent; the audit record's detail says what was sent and what came back.
    async fn call(
        &self,
        req: Request<proto::CallRequest>,
    ) -> Result<Response<proto::CallResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::Call, req, async |call, target, r| {
            let prepared = s
                .proxy
                .prepare(&target.connector, convert::call_request(r))?;
            let mut exchange = prepared.exchange.clone();
            call.detail = exchange.to_string();
            let c = &target.connector;
            s.policy
                .current()
                .check_call(
                    &call.caller,
                    &c.workspace,
                    (&c.name, &c.id),
                    &target.on_behalf_of,
                    prepared.method.as_str(),
                    &prepared.path,
                )
                .map_err(ApiError::Denied)?;
            let sent = s.proxy.send(&target, &prepared, &mut exchange).await;
            call.detail = exchange.to_string();
            Ok(convert::call_response(sent?))
        })
        .await
    }
}
