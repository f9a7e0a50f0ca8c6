//! Debug output for the messages that carry secrets: the values are never printed.

use super::proto::{ResolveCredentialResponse, SecretValue};

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretValue(<redacted>)")
    }
}

impl std::fmt::Debug for ResolveCredentialResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResolveCredentialResponse")
            .field("kind", &self.kind)
            .field("secret", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .field("account_label", &self.account_label)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let value = SecretValue {
            value: "canary-7f3a".into(),
        };
        assert!(!format!("{value:?}").contains("canary"));
        let resp = ResolveCredentialResponse {
            secret: "canary-7f3a".into(),
            ..Default::default()
        };
        assert!(!format!("{resp:?}").contains("canary"));
        let req = super::super::proto::CreateConnectorRequest {
            secrets: [("api_key".to_string(), value)].into(),
            ..Default::default()
        };
        assert!(!format!("{req:?}").contains("canary"));
    }
}
