//! The Broker service (data plane): credentials, mail and calendar on a user's behalf. Each
//! handler is one [`Services::handle_on`] call: the caller is admitted per its policy grant
//! before the handler's body runs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::call::{Call, audited_outcome};
use super::proto::{self, broker_server::Broker};
use super::{ApiError, Rpc, Services, convert};
use crate::audit::Outcome;
use crate::mail::MailError;
use crate::mail::guard::Grant;
use crate::model::FieldError;
use crate::policy::Operation;

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

/// Audits a WatchMail stream's end, under the request id of its opening: the error the daemon
/// ends it with (written before the client sees that error), or that the client closed it
/// (written when the stream is dropped).
struct StreamEnd {
    services: Arc<Services>,
    call: Call,
    audited: bool,
}

impl StreamEnd {
    fn event(&self, (outcome, why): (Outcome, String)) -> crate::audit::AuditEvent {
        self.call
            .clone()
            .into_audit_event(outcome, format!("stream ended: {why}"))
    }

    /// The daemon ends the stream with `e`.
    async fn ended(&mut self, e: &ApiError) {
        self.audited = true;
        if let Err(write) = self
            .services
            .audit
            .record(self.event(audited_outcome(e)))
            .await
        {
            tracing::error!(error = %write, "could not audit the end of a WatchMail stream");
        }
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        if self.audited {
            return;
        }
        let event = self.event((Outcome::Ok, "the client closed it".into()));
        let audit = self.services.audit.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = audit.record(event).await {
                    tracing::error!(error = %e, "could not audit the end of a WatchMail stream");
                }
            });
        }
    }
}

/// A revoked grant is a refusal like any other.
fn stream_error(e: MailError) -> ApiError {
    match e {
        MailError::Denied(why) => ApiError::Denied(why),
        e => e.into(),
    }
}

/// The watcher's events as the stream's items; its end is audited.
fn audited(watcher: crate::mail::watch::Watcher, end: StreamEnd) -> MailStream {
    Box::pin(futures::stream::unfold(
        (watcher, end),
        async |(mut watcher, mut end)| {
            let item = match watcher.next().await? {
                Ok(event) => Ok(convert::mail_event(event)),
                Err(e) => {
                    let e = stream_error(e);
                    end.ended(&e).await;
                    Err(Status::from(e))
                }
            };
            Some((item, (watcher, end)))
        },
    ))
}

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
                response_cap_reached: fetched.response_cap_reached,
            })
        })
        .await
    }

    type WatchMailStream = MailStream;

    /// The stream is audited when it opens and when it ends; what it delivers in between is
    /// not audited per message. It holds its grant: it ends when that goes ([`Grant`]).
    async fn watch_mail(
        &self,
        req: Request<proto::WatchMailRequest>,
    ) -> Result<Response<Self::WatchMailStream>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::WatchMail, req, async |call, target, r| {
            let grant = Grant {
                policy: s.policy.clone(),
                caller: call.caller.clone(),
                op: Operation::WatchMail,
            };
            let watcher = s
                .mail
                .watch(grant, &target, convert::watch_query(r))
                .await?;
            let end = StreamEnd {
                services: s.clone(),
                call: call.clone(),
                audited: false,
            };
            Ok(audited(watcher, end))
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
            let (prepared, mut exchange) = admitted_call(s, call, &target, r)?;
            let sent = s.proxy.send(&target, &prepared, &mut exchange).await;
            call.detail = exchange.to_string();
            Ok(convert::call_response(sent?))
        })
        .await
    }

    type CallStreamStream = ChunkStream;

    /// Admitted as Call is; audited when the answer's head arrives (the stream opens) and
    /// again when the stream ends, with the bytes handed on and how it ended.
    async fn call_stream(
        &self,
        req: Request<proto::CallRequest>,
    ) -> Result<Response<Self::CallStreamStream>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::CallStream, req, async |call, target, r| {
            let (prepared, mut exchange) = admitted_call(s, call, &target, r)?;
            let opened = s.proxy.open(&target, &prepared, &mut exchange).await;
            call.detail = exchange.to_string();
            let download = opened?;
            // The body's bytes are the end record's.
            call.detail.push_str("; the body follows in the stream");
            let (tx, rx) = tokio::sync::mpsc::channel(CALL_STREAM_BUFFER);
            let head = proto::CallChunk {
                status: download.status.into(),
                headers: convert::http_headers(download.headers.clone()),
                data: Vec::new(),
            };
            // A new channel has room for its first message.
            let _ = tx.try_send(Ok(head));
            let end = (s.clone(), call.clone(), exchange);
            tokio::spawn(stream_body(end, download, tx));
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)) as ChunkStream)
        })
        .await
    }

    async fn list_folders(
        &self,
        req: Request<proto::ListFoldersRequest>,
    ) -> Result<Response<proto::ListFoldersResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::ListFolders, req, async |_, target, _| {
            Ok(convert::folders(s.mail.list_folders(&target).await?))
        })
        .await
    }

    async fn move_messages(
        &self,
        req: Request<proto::MoveMessagesRequest>,
    ) -> Result<Response<proto::OrganizeMailResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::MoveMessages, req, async |call, target, r| {
            self.organize(call, &target, convert::move_request(r)?)
                .await
        })
        .await
    }

    async fn set_flags(
        &self,
        req: Request<proto::SetFlagsRequest>,
    ) -> Result<Response<proto::OrganizeMailResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::SetFlags, req, async |call, target, r| {
            self.organize(call, &target, convert::flags_request(r)?)
                .await
        })
        .await
    }

    async fn delete_messages(
        &self,
        req: Request<proto::DeleteMessagesRequest>,
    ) -> Result<Response<proto::OrganizeMailResponse>, Status> {
        let s = &self.0;
        s.handle_on(Rpc::DeleteMessages, req, async |call, target, r| {
            self.organize(call, &target, convert::delete_request(r)?)
                .await
        })
        .await
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::CallChunk, Status>> + Send>>;

/// Body pieces (of at most [`crate::proxy::STREAM_PIECE_BYTES`]) a CallStream holds for a
/// caller that has not taken them yet: the most it buffers.
const CALL_STREAM_BUFFER: usize = 4;

/// A Call's request checked against the API base and admitted to its method and path (the
/// grant's `calls`), before anything is sent; the call's audit detail says what it is.
fn admitted_call(
    s: &Services,
    call: &mut Call,
    target: &crate::model::Target,
    r: proto::CallRequest,
) -> Result<(crate::proxy::Prepared, crate::proxy::Exchange), ApiError> {
    let prepared = s
        .proxy
        .prepare(&target.connector, convert::call_request(r))?;
    let exchange = prepared.exchange.clone();
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
    Ok((prepared, exchange))
}

/// Hands a CallStream's body on, then audits how it ended under the call's request id (an
/// error before the caller sees it), with the bytes handed on in the detail.
async fn stream_body(
    (s, mut call, mut exchange): (Arc<Services>, Call, crate::proxy::Exchange),
    download: crate::proxy::Download,
    tx: tokio::sync::mpsc::Sender<Result<proto::CallChunk, Status>>,
) {
    let (ending, sent) = download
        .pump(&tx, |data| {
            Ok(proto::CallChunk {
                data,
                ..Default::default()
            })
        })
        .await;
    exchange.bytes_in = usize::try_from(sent).unwrap_or(usize::MAX);
    call.detail = exchange.to_string();
    let why = format!("stream ended: {ending}; {sent} body bytes handed on");
    let (outcome, failure) = match ending {
        crate::proxy::Ending::Failed(e) => {
            let e = ApiError::from(e);
            (audited_outcome(&e).0, Some(e))
        }
        _ => (Outcome::Ok, None),
    };
    let request_id = call.request_id.clone();
    if let Err(e) = s.audit.record(call.into_audit_event(outcome, why)).await {
        tracing::error!(error = %e, request_id = %request_id, "could not audit the end of a CallStream");
    }
    if let Some(e) = failure {
        let _ = tx.send(Err(Status::from(e))).await;
    }
}

impl BrokerApi {
    /// A mail organisation request; its audit detail says what was asked (never anything of
    /// the messages).
    async fn organize(
        &self,
        call: &mut Call,
        target: &crate::model::Target,
        request: crate::mail::organize::Request,
    ) -> Result<proto::OrganizeMailResponse, ApiError> {
        call.detail = request.to_string();
        let outcome = self.0.mail.organize(target, request).await?;
        Ok(convert::organized(outcome))
    }
}
