//! Domain errors → gRPC statuses, in one place: every error class names a [`Reason`], every
//! reason has one gRPC code, and the reply carries the reason in a `google.rpc.ErrorInfo`
//! (domain "credbroker") with, where it helps, the field, service or stage at fault.
//!
//! Invariants: the message is the error's own text (a person can act on it; it never holds a
//! secret), a client branches on the reason, not the message, and mail, calendar, OAuth and
//! model errors all map through [`classify`].

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::AuditError;
use crate::calendar::CalendarError;
use crate::connect::ConnectError;
use crate::driver::ConnectionError;
use crate::mail::MailError;
use crate::model::{Expiry, FieldError, ModelError};
use crate::oauth::OAuthError;
use crate::proxy::CallError;
use crate::resolve::ResolveError;
use crate::upstream::UpstreamError;

const DOMAIN: &str = "credbroker";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("permission denied: {0}")]
    Denied(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    OAuth(#[from] OAuthError),
    #[error(transparent)]
    Mail(#[from] MailError),
    #[error(transparent)]
    Calendar(#[from] CalendarError),
    #[error(transparent)]
    Call(#[from] CallError),
    /// A request budget ran out ([`crate::policy::Budgets`]).
    #[error("{message}")]
    Exhausted {
        message: String,
        exhausted: crate::policy::Exhausted,
    },
    #[error(transparent)]
    Events(#[from] crate::events::EventsError),
    /// A blocking task of the call panicked or was cancelled.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Model(e.into())
    }
}

/// Why a call failed, as a client branches on it: the `reason` of the reply's ErrorInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Policy,
    RateLimited,
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Storage,
    AuditUnavailable,
    Internal,
    Unsupported,
    Config,
    NotConnected,
    Expired,
    NotResolvable,
    NotOauth,
    StateUnknown,
    StateExpired,
    ProviderRefused,
    UpstreamUnavailable,
    UpstreamAuthRefused,
    UpstreamUnauthenticated,
    UpstreamForbidden,
    UpstreamRejected,
    UpstreamMalformed,
    MailRejected,
    MessageTooLarge,
    MailboxNotFound,
    TooManyStreams,
    EgressRefused,
    UpstreamBusy,
}

impl Reason {
    const fn row(self) -> (&'static str, Code) {
        use Code::*;
        match self {
            Reason::Policy => ("POLICY", PermissionDenied),
            Reason::RateLimited => ("RATE_LIMITED", ResourceExhausted),
            Reason::InvalidArgument => ("INVALID_ARGUMENT", InvalidArgument),
            Reason::NotFound => ("NOT_FOUND", NotFound),
            Reason::AlreadyExists => ("ALREADY_EXISTS", AlreadyExists),
            Reason::FailedPrecondition => ("FAILED_PRECONDITION", FailedPrecondition),
            Reason::Storage => ("STORAGE", Internal),
            Reason::AuditUnavailable => ("AUDIT_UNAVAILABLE", Unavailable),
            Reason::Internal => ("INTERNAL", Internal),
            Reason::Unsupported => ("UNSUPPORTED", Unimplemented),
            Reason::Config => ("CONFIG", FailedPrecondition),
            Reason::NotConnected => ("NOT_CONNECTED", FailedPrecondition),
            Reason::Expired => ("EXPIRED", FailedPrecondition),
            Reason::NotResolvable => ("NOT_RESOLVABLE", FailedPrecondition),
            Reason::NotOauth => ("NOT_OAUTH", FailedPrecondition),
            Reason::StateUnknown => ("STATE_UNKNOWN", InvalidArgument),
            Reason::StateExpired => ("STATE_EXPIRED", InvalidArgument),
            Reason::ProviderRefused => ("PROVIDER_REFUSED", FailedPrecondition),
            Reason::UpstreamUnavailable => ("UPSTREAM_UNAVAILABLE", Unavailable),
            Reason::UpstreamAuthRefused => ("UPSTREAM_AUTH_REFUSED", Unauthenticated),
            Reason::UpstreamUnauthenticated => ("UPSTREAM_UNAUTHENTICATED", Unauthenticated),
            Reason::UpstreamForbidden => ("UPSTREAM_FORBIDDEN", PermissionDenied),
            Reason::UpstreamRejected => ("UPSTREAM_REJECTED", FailedPrecondition),
            Reason::UpstreamMalformed => ("UPSTREAM_MALFORMED", Internal),
            Reason::MailRejected => ("MAIL_REJECTED", FailedPrecondition),
            Reason::MessageTooLarge => ("MESSAGE_TOO_LARGE", ResourceExhausted),
            Reason::MailboxNotFound => ("MAILBOX_NOT_FOUND", NotFound),
            Reason::TooManyStreams => ("TOO_MANY_STREAMS", ResourceExhausted),
            Reason::EgressRefused => ("EGRESS_REFUSED", FailedPrecondition),
            Reason::UpstreamBusy => ("UPSTREAM_BUSY", ResourceExhausted),
        }
    }

    /// The ErrorInfo reason, upper snake case.
    pub const fn name(self) -> &'static str {
        self.row().0
    }

    /// The one gRPC code this reason is sent with.
    pub const fn code(self) -> Code {
        self.row().1
    }
}

/// A reason and the ErrorInfo metadata that goes with it.
type Class = (Reason, Vec<(&'static str, String)>);

fn plain(reason: Reason) -> Class {
    (reason, Vec::new())
}

/// The error class of `e`: the one mapping from domain errors to reasons.
pub fn classify(e: &ApiError) -> Class {
    match e {
        ApiError::Denied(_) => plain(Reason::Policy),
        ApiError::Exhausted { exhausted, .. } => (
            Reason::RateLimited,
            vec![("per_second", exhausted.per_second.to_string())],
        ),
        ApiError::Model(m) => model(m),
        ApiError::Resolve(r) => resolve(r),
        ApiError::Connect(ConnectError::Model(m)) => model(m),
        ApiError::Connect(ConnectError::Unsupported(_)) => plain(Reason::Unsupported),
        ApiError::Connect(ConnectError::Connection(c)) => connection(c),
        ApiError::Audit(_) => plain(Reason::AuditUnavailable),
        ApiError::OAuth(o) => oauth(o),
        ApiError::Mail(m) => mail(m),
        ApiError::Calendar(c) => calendar(c),
        ApiError::Call(c) => call(c),
        ApiError::Task(_) => plain(Reason::Internal),
        ApiError::Events(e) => events(e),
    }
}

fn events(e: &crate::events::EventsError) -> Class {
    use crate::events::EventsError;
    match e {
        EventsError::Store(_) => plain(Reason::Storage),
        EventsError::Pruned { .. } => (
            Reason::InvalidArgument,
            vec![("field", "after_cursor".to_string())],
        ),
        EventsError::TooManyStreams(_) => plain(Reason::TooManyStreams),
    }
}

fn model(e: &ModelError) -> Class {
    match e {
        ModelError::Invalid(f) => (Reason::InvalidArgument, vec![("field", f.field.clone())]),
        ModelError::NotFound { .. } => plain(Reason::NotFound),
        ModelError::AlreadyExists { .. } => plain(Reason::AlreadyExists),
        ModelError::FailedPrecondition(_) => plain(Reason::FailedPrecondition),
        ModelError::Store(_) => plain(Reason::Storage),
    }
}

fn resolve(e: &ResolveError) -> Class {
    match e {
        ResolveError::Connection(c) => connection(c),
        ResolveError::NotResolvable { .. } => plain(Reason::NotResolvable),
        ResolveError::OAuth(o) => oauth(o),
        ResolveError::Model(m) => model(m),
    }
}

fn connection(e: &ConnectionError) -> Class {
    match e {
        ConnectionError::NotConnected { .. } => plain(Reason::NotConnected),
        ConnectionError::Expired { .. } => plain(Reason::Expired),
        ConnectionError::DestinationChanged { .. } => (
            Reason::Expired,
            vec![("expired", Expiry::DestinationChanged.name().to_string())],
        ),
    }
}

fn oauth(e: &OAuthError) -> Class {
    match e {
        OAuthError::Connection(c) => connection(c),
        OAuthError::NotOAuth { .. } => plain(Reason::NotOauth),
        OAuthError::UnknownState => plain(Reason::StateUnknown),
        OAuthError::StateExpired => plain(Reason::StateExpired),
        OAuthError::OtherBrowser => plain(Reason::Policy),
        OAuthError::IssuerMismatch { .. } => plain(Reason::ProviderRefused),
        OAuthError::ConnectorChanged { .. } => plain(Reason::FailedPrecondition),
        OAuthError::Refused(_) => plain(Reason::ProviderRefused),
        OAuthError::Unavailable(_) => plain(Reason::UpstreamUnavailable),
        OAuthError::Egress(e) => upstream(e),
        OAuthError::Model(m) => model(m),
    }
}

fn mail(e: &MailError) -> Class {
    match e {
        MailError::Invalid(f) => (Reason::InvalidArgument, vec![("field", f.field.clone())]),
        MailError::Model(m) => model(m),
        MailError::Credential(r) => resolve(r),
        MailError::Upstream { service, stage, .. } => (
            Reason::UpstreamUnavailable,
            vec![
                ("service", service.name().to_string()),
                ("stage", stage.name().to_string()),
            ],
        ),
        // A stored password refused: the connection is now EXPIRED and must be reconnected.
        MailError::Expired(_) => plain(Reason::Expired),
        MailError::AuthRefused { .. } => plain(Reason::UpstreamAuthRefused),
        MailError::Rejected {
            too_large: true, ..
        } => plain(Reason::MessageTooLarge),
        MailError::Rejected { .. } => plain(Reason::MailRejected),
        MailError::NoMailbox { .. } => plain(Reason::MailboxNotFound),
        MailError::TooManyWatchers(_) => plain(Reason::TooManyStreams),
        MailError::StaleUidValidity { mailbox, .. } => (
            Reason::FailedPrecondition,
            vec![("mailbox", mailbox.clone())],
        ),
        MailError::Unsupported { .. } => plain(Reason::Unsupported),
        MailError::Denied(_) => plain(Reason::Policy),
        MailError::Egress(e) => upstream(e),
    }
}

/// An egress refusal or a cap, whichever service it came from.
fn upstream(e: &UpstreamError) -> Class {
    match e {
        UpstreamError::Refused { .. } => plain(Reason::EgressRefused),
        UpstreamError::Busy { .. } => plain(Reason::UpstreamBusy),
        UpstreamError::Dns { .. } | UpstreamError::Connect { .. } => {
            plain(Reason::UpstreamUnavailable)
        }
    }
}

fn calendar(e: &CalendarError) -> Class {
    match e {
        CalendarError::Invalid(f) => (Reason::InvalidArgument, vec![("field", f.field.clone())]),
        CalendarError::Credential(r) => resolve(r),
        CalendarError::Model(m) => model(m),
        CalendarError::Config(_) => plain(Reason::Config),
        CalendarError::Unsupported(_) => plain(Reason::Unsupported),
        CalendarError::Unreachable { .. } | CalendarError::ServerError { .. } => {
            plain(Reason::UpstreamUnavailable)
        }
        CalendarError::AuthRefused { .. } => plain(Reason::UpstreamUnauthenticated),
        CalendarError::Forbidden { .. } => plain(Reason::UpstreamForbidden),
        CalendarError::NotFound(_) => plain(Reason::NotFound),
        CalendarError::Conflict(_) => plain(Reason::AlreadyExists),
        CalendarError::Rejected { .. } => plain(Reason::UpstreamRejected),
        CalendarError::Malformed { .. } => plain(Reason::UpstreamMalformed),
        CalendarError::Internal(_) => plain(Reason::Internal),
        CalendarError::Egress(e) => upstream(e),
    }
}

fn call(e: &CallError) -> Class {
    match e {
        CallError::Invalid(f) => (Reason::InvalidArgument, vec![("field", f.field.clone())]),
        CallError::Credential(r) => resolve(r),
        CallError::NoBase { .. } => plain(Reason::Config),
        CallError::RequestTooLarge { .. } | CallError::ResponseTooLarge { .. } => {
            plain(Reason::MessageTooLarge)
        }
        CallError::Timeout { .. } | CallError::Unreachable { .. } => {
            plain(Reason::UpstreamUnavailable)
        }
        CallError::Redirected { .. } => plain(Reason::UpstreamRejected),
    }
}

fn error_info(reason: Reason, metadata: Vec<(&'static str, String)>) -> ErrorDetails {
    let metadata: HashMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    ErrorDetails::with_error_info(reason.name(), DOMAIN, metadata)
}

/// RESOURCE_EXHAUSTED with reason RATE_LIMITED and a `google.rpc.RetryInfo` saying when a
/// retry will pass.
pub fn exhausted_status(message: String, exhausted: &crate::policy::Exhausted) -> Status {
    let e = ApiError::Exhausted {
        message,
        exhausted: exhausted.clone(),
    };
    Status::from(e)
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let (reason, metadata) = classify(&e);
        let message = if reason == Reason::Storage {
            tracing::error!(error = %e, "storage error");
            format!("storage error: {e}")
        } else {
            e.to_string()
        };
        let mut details = error_info(reason, metadata);
        if let ApiError::Exhausted { exhausted, .. } = &e {
            details.set_retry_info(Some(exhausted.retry_after));
        }
        Status::with_error_details(reason.code(), message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mail_and_calendar_errors_map_through_the_same_classes() {
        let field = || FieldError::new("to", "is required");
        for e in [
            ApiError::from(MailError::Invalid(field())),
            ApiError::from(CalendarError::Invalid(field())),
            ApiError::from(field()),
        ] {
            let status = Status::from(e);
            assert_eq!(status.code(), Code::InvalidArgument);
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, "INVALID_ARGUMENT");
            assert_eq!(info.metadata["field"], "to");
        }
        let not_connected = || {
            ResolveError::Connection(ConnectionError::NotConnected {
                connector: "c".into(),
                user: String::new(),
            })
        };
        for e in [
            ApiError::from(MailError::Credential(not_connected())),
            ApiError::from(CalendarError::Credential(not_connected())),
        ] {
            assert_eq!(classify(&e).0, Reason::NotConnected);
            assert_eq!(Status::from(e).code(), Code::FailedPrecondition);
        }
        // A connection made before its destinations moved is EXPIRED, and says why.
        let moved = ApiError::from(ResolveError::Connection(
            ConnectionError::DestinationChanged {
                connector: "c".into(),
                user: "u".into(),
            },
        ));
        let status = Status::from(moved);
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "EXPIRED");
        assert_eq!(info.metadata["expired"], "destination_changed");
    }

    #[test]
    fn a_stale_uidvalidity_names_its_mailbox_and_a_missing_extension_is_unsupported() {
        let stale = Status::from(ApiError::from(MailError::StaleUidValidity {
            mailbox: "Archive".into(),
            expected: 5,
            actual: 6,
        }));
        assert_eq!(stale.code(), Code::FailedPrecondition);
        assert!(
            stale.message().contains("\"Archive\""),
            "{}",
            stale.message()
        );
        let info = stale.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.metadata["mailbox"].as_str()),
            ("FAILED_PRECONDITION", "Archive")
        );
        let labels = Status::from(ApiError::from(MailError::Unsupported {
            server: "imap.test:993".into(),
            what: "has no labels".into(),
        }));
        assert_eq!(labels.code(), Code::Unimplemented);
        assert_eq!(
            labels.get_details_error_info().unwrap().reason,
            "UNSUPPORTED"
        );
    }
}
