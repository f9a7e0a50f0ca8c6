//! ResolveCredential: the short-lived credential a caller may hold for a connection. The
//! credential comes from the credentials service ([`crate::driver::Credentials::resolvable`]);
//! only kinds whose driver says they are resolvable (API keys, OAuth access tokens) answer. Nothing else (refresh
//! tokens, client secrets, passwords) ever leaves through here.
//!
//! Invariant: a caller naming `required_scopes` gets the credential only if its grant holds
//! every one (the scopes stored from the token response); else FAILED_PRECONDITION naming the
//! missing ones ([`crate::oauth::OAuthError::MissingScopes`]).

use std::sync::Arc;
use std::time::Duration;

use crate::driver::{Credential, CredentialError, Credentials};
use crate::model::{Registry, Target};

/// What ResolveCredential fails with: the credentials service's errors.
pub type ResolveError = CredentialError;

pub struct Resolver {
    credentials: Credentials,
}

impl Resolver {
    pub fn new(registry: Arc<Registry>, oauth: Arc<crate::oauth::OAuth>) -> Self {
        Self {
            credentials: Credentials::new(registry, oauth),
        }
    }

    /// The credentials service this use case stands on.
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub async fn resolve(
        &self,
        target: &Target,
        min_ttl: Duration,
        required_scopes: &[String],
    ) -> Result<Credential, ResolveError> {
        let credential = self.credentials.resolvable(target, min_ttl).await?;
        crate::oauth::require_scopes(
            &target.connector,
            &target.connection_user,
            &credential.scopes,
            required_scopes,
        )?;
        Ok(credential)
    }
}
