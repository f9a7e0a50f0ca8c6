//! Domain errors → gRPC statuses, each with a message a person can act on and, where a client
//! must branch on it, a `google.rpc.ErrorInfo` reason (NOT_CONNECTED, EXPIRED…).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::AuditError;
use crate::connect::ConnectError;
use crate::driver::ConnectionError;
use crate::mail::MailError;
use crate::model::{FieldError, ModelError};
use crate::oauth::OAuthError;
use crate::resolve::ResolveError;

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
    /// A request budget ran out ([`crate::policy::Budgets`]).
    #[error("{message}")]
    Exhausted {
        message: String,
        exhausted: crate::policy::Exhausted,
    },
    #[error("{message}")]
    Status {
        code: Code,
        reason: &'static str,
        message: String,
    },
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::Model(e.into())
    }
}

impl ApiError {
    pub fn status(code: Code, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError::Status {
            code,
            reason,
            message: message.into(),
        }
    }
}

fn with_reason(
    code: Code,
    reason: &str,
    message: String,
    metadata: HashMap<String, String>,
) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// RESOURCE_EXHAUSTED with reason RATE_LIMITED and a `google.rpc.RetryInfo` saying when a
/// retry will pass.
pub fn exhausted_status(message: String, exhausted: &crate::policy::Exhausted) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(exhausted.retry_after));
    details.set_error_info(
        "RATE_LIMITED",
        DOMAIN,
        HashMap::from([("per_second".to_string(), exhausted.per_second.to_string())]),
    );
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

fn model_status(e: ModelError) -> Status {
    let message = e.to_string();
    match e {
        ModelError::Invalid(f) => with_reason(
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            message,
            HashMap::from([("field".to_string(), f.field)]),
        ),
        ModelError::NotFound { .. } => {
            with_reason(Code::NotFound, "NOT_FOUND", message, HashMap::new())
        }
        ModelError::AlreadyExists { .. } => with_reason(
            Code::AlreadyExists,
            "ALREADY_EXISTS",
            message,
            HashMap::new(),
        ),
        ModelError::FailedPrecondition(_) => with_reason(
            Code::FailedPrecondition,
            "FAILED_PRECONDITION",
            message,
            HashMap::new(),
        ),
        ModelError::Store(e) => {
            tracing::error!(error = %e, "storage error");
            with_reason(
                Code::Internal,
                "STORAGE",
                format!("storage error: {e}"),
                HashMap::new(),
            )
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let message = e.to_string();
        match e {
            ApiError::Denied(_) => {
                with_reason(Code::PermissionDenied, "POLICY", message, HashMap::new())
            }
            ApiError::Model(m)
            | ApiError::Connect(ConnectError::Model(m))
            | ApiError::Resolve(ResolveError::Model(m))
            | ApiError::OAuth(OAuthError::Model(m))
            | ApiError::Resolve(ResolveError::OAuth(OAuthError::Model(m))) => model_status(m),
            ApiError::OAuth(o) | ApiError::Resolve(ResolveError::OAuth(o)) => {
                oauth_status(&o, message)
            }
            ApiError::Resolve(ResolveError::Connection(c)) => connection_status(&c, message),
            ApiError::Resolve(ResolveError::NotResolvable { .. }) => with_reason(
                Code::FailedPrecondition,
                "NOT_RESOLVABLE",
                message,
                HashMap::new(),
            ),
            ApiError::Mail(m) => mail_status(m),
            ApiError::Connect(ConnectError::Unsupported(_)) => {
                with_reason(Code::Unimplemented, "UNSUPPORTED", message, HashMap::new())
            }
            ApiError::Audit(_) => with_reason(
                Code::Unavailable,
                "AUDIT_UNAVAILABLE",
                message,
                HashMap::new(),
            ),
            ApiError::Exhausted { message, exhausted } => exhausted_status(message, &exhausted),
            ApiError::Status { code, reason, .. } => {
                with_reason(code, reason, message, HashMap::new())
            }
        }
    }
}

fn connection_status(e: &ConnectionError, message: String) -> Status {
    let reason = match e {
        ConnectionError::NotConnected { .. } => "NOT_CONNECTED",
        ConnectionError::Expired { .. } => "EXPIRED",
    };
    with_reason(Code::FailedPrecondition, reason, message, HashMap::new())
}

fn oauth_status(e: &OAuthError, message: String) -> Status {
    let (code, reason) = match e {
        OAuthError::Connection(c) => return connection_status(c, message),
        OAuthError::NotOAuth { .. } => (Code::FailedPrecondition, "NOT_OAUTH"),
        OAuthError::UnknownState => (Code::InvalidArgument, "STATE_UNKNOWN"),
        OAuthError::StateExpired => (Code::InvalidArgument, "STATE_EXPIRED"),
        OAuthError::Refused(_) => (Code::FailedPrecondition, "PROVIDER_REFUSED"),
        OAuthError::Unavailable(_) => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
        OAuthError::Model(_) => (Code::Internal, "INTERNAL"),
    };
    with_reason(code, reason, message, HashMap::new())
}

fn mail_status(e: MailError) -> Status {
    let message = e.to_string();
    match e {
        MailError::Invalid(f) => model_status(f.into()),
        MailError::Model(m) => model_status(m),
        MailError::Credential(r) => ApiError::Resolve(r).into(),
        MailError::Upstream { service, stage, .. } => with_reason(
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
            message,
            HashMap::from([
                ("service".to_string(), service.name().to_string()),
                ("stage".to_string(), stage.name().to_string()),
            ]),
        ),
        // A stored password refused: the connection is now EXPIRED and must be reconnected.
        MailError::Expired(_) => {
            with_reason(Code::FailedPrecondition, "EXPIRED", message, HashMap::new())
        }
        MailError::AuthRefused { .. } => with_reason(
            Code::Unauthenticated,
            "UPSTREAM_AUTH_REFUSED",
            message,
            HashMap::new(),
        ),
        MailError::Rejected {
            too_large: true, ..
        } => with_reason(
            Code::ResourceExhausted,
            "MESSAGE_TOO_LARGE",
            message,
            HashMap::new(),
        ),
        MailError::Rejected { .. } => with_reason(
            Code::FailedPrecondition,
            "MAIL_REJECTED",
            message,
            HashMap::new(),
        ),
        MailError::NoMailbox { .. } => {
            with_reason(Code::NotFound, "MAILBOX_NOT_FOUND", message, HashMap::new())
        }
        MailError::TooManyWatchers(_) => with_reason(
            Code::ResourceExhausted,
            "TOO_MANY_STREAMS",
            message,
            HashMap::new(),
        ),
    }
}
