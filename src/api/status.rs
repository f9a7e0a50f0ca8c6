//! Domain errors → gRPC statuses, each with a message a person can act on and, where a client
//! must branch on it, a `google.rpc.ErrorInfo` reason (NOT_CONNECTED, EXPIRED…).

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::audit::AuditError;
use crate::connect::ConnectError;
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
            ApiError::Resolve(ResolveError::NotConnected { .. }) => with_reason(
                Code::FailedPrecondition,
                "NOT_CONNECTED",
                message,
                HashMap::new(),
            ),
            ApiError::Resolve(ResolveError::Expired { .. }) => {
                with_reason(Code::FailedPrecondition, "EXPIRED", message, HashMap::new())
            }
            ApiError::Resolve(ResolveError::Unavailable(_)) => with_reason(
                Code::Unavailable,
                "UPSTREAM_UNAVAILABLE",
                message,
                HashMap::new(),
            ),
            ApiError::Resolve(ResolveError::NotResolvable { .. }) => with_reason(
                Code::FailedPrecondition,
                "NOT_RESOLVABLE",
                message,
                HashMap::new(),
            ),
            ApiError::Connect(ConnectError::Unsupported(_)) => {
                with_reason(Code::Unimplemented, "UNSUPPORTED", message, HashMap::new())
            }
            ApiError::Audit(_) => with_reason(
                Code::Unavailable,
                "AUDIT_UNAVAILABLE",
                message,
                HashMap::new(),
            ),
            ApiError::Status { code, reason, .. } => {
                with_reason(code, reason, message, HashMap::new())
            }
        }
    }
}

fn oauth_status(e: &OAuthError, message: String) -> Status {
    let (code, reason) = match e {
        OAuthError::NotConnected { .. } => (Code::FailedPrecondition, "NOT_CONNECTED"),
        OAuthError::Expired { .. } => (Code::FailedPrecondition, "EXPIRED"),
        OAuthError::NotOAuth { .. } => (Code::FailedPrecondition, "NOT_OAUTH"),
        OAuthError::UnknownState => (Code::InvalidArgument, "STATE_UNKNOWN"),
        OAuthError::StateExpired => (Code::InvalidArgument, "STATE_EXPIRED"),
        OAuthError::Refused(_) => (Code::FailedPrecondition, "PROVIDER_REFUSED"),
        OAuthError::Unavailable(_) => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
        OAuthError::Model(_) => (Code::Internal, "INTERNAL"),
    };
    with_reason(code, reason, message, HashMap::new())
}
