//! Placeholder until the OAuth module lands (issue 4): every OAuth operation is unavailable.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{Connector, ModelError, Registry, Secret};

pub struct AccessToken {
    pub token: Secret,
    pub expires_at: DateTime<Utc>,
    pub scopes: Vec<String>,
    pub account_label: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    #[error("OAuth is not available in this build")]
    Unavailable,
    #[error(transparent)]
    Model(#[from] ModelError),
}

pub struct OAuth;

impl OAuth {
    pub fn new(_registry: Arc<Registry>, _callback_url: String, _timeout: Duration) -> Self {
        OAuth
    }

    pub async fn access_token(
        &self,
        _c: &Connector,
        _u: &str,
        _min_ttl: Duration,
    ) -> Result<AccessToken, OAuthError> {
        Err(OAuthError::Unavailable)
    }
}

impl From<OAuthError> for crate::resolve::ResolveError {
    fn from(e: OAuthError) -> Self {
        crate::resolve::ResolveError::Unavailable(e.to_string())
    }
}
