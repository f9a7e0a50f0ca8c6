//! The provider catalog (`providers.toml`, compiled in) and the effective endpoints of one
//! connector: its preset, overridden key by key by the connector's own configuration.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::model::{Connector, FieldError};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// The authorization server's issuer identifier (RFC 8414), for providers that send `iss`
    /// in every authorization response (RFC 9207).
    pub issuer: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub revocation_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub account_label_field: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub auth_params: BTreeMap<String, String>,
    pub token_auth: Option<String>,
    pub base_url: Option<String>,
    /// Where Broker.Call sends requests: the call's relative path is appended to it.
    pub api_base: Option<String>,
    pub imap_host: Option<String>,
    pub imap_port: Option<String>,
    pub imap_tls: Option<String>,
    pub smtp_host: Option<String>,
    pub smtp_port: Option<String>,
    pub smtp_tls: Option<String>,
    /// How often an idle grant is refreshed so the provider does not let it lapse, in days.
    pub keepalive_days: Option<f64>,
}

static CATALOG: LazyLock<BTreeMap<String, Preset>> = LazyLock::new(|| {
    // A test parses this file, so a broken catalog never reaches a build that runs.
    toml::from_str(include_str!("providers.toml")).expect("providers.toml is valid")
});

/// The preset of a provider name, if the catalog has it.
pub fn preset(provider: &str) -> Option<&'static Preset> {
    CATALOG.get(provider)
}

/// Names of every provider in the catalog, for error messages and docs.
pub fn provider_names() -> Vec<&'static str> {
    CATALOG.keys().map(String::as_str).collect()
}

/// Checks a connector's provider field: empty (generic) or a catalog name.
pub fn validate_provider(field: &str, provider: &str) -> Result<(), FieldError> {
    if provider.is_empty() || preset(provider).is_some() {
        return Ok(());
    }
    Err(FieldError::new(
        field,
        format!(
            "unknown provider {provider:?}; known: {}",
            provider_names().join(", ")
        ),
    ))
}

/// Where Broker.Call sends a connector's requests: its `api_base`, else its provider's.
pub fn api_base(connector: &Connector) -> Option<String> {
    connector
        .setting("api_base")
        .map(str::to_string)
        .or_else(|| preset(&connector.provider).and_then(|p| p.api_base.clone()))
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenAuth {
    Basic,
    Post,
}

/// Which grant a connector uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// A person consents in a browser; the broker keeps a refresh token.
    AuthorizationCode,
    /// The broker authenticates as itself (shared connectors only); no person, no refresh token.
    ClientCredentials,
}

impl Grant {
    /// The connector's grant (`config.grant_type`, authorization code by default).
    pub fn of(connector: &Connector) -> Result<Grant, FieldError> {
        match connector.setting("grant_type") {
            None | Some("authorization_code") => Ok(Grant::AuthorizationCode),
            Some("client_credentials") => Ok(Grant::ClientCredentials),
            Some(other) => Err(FieldError::new(
                "config.grant_type",
                format!("{other:?} is not authorization_code or client_credentials"),
            )),
        }
    }
}

/// Everything the flows need to talk to one connector's provider. BeginConnect keeps a copy in
/// the pending state, so the callback talks to the provider the consent was asked of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub client_id: String,
    /// The issuer identifier an authorization response must name (`config.issuer`): when set,
    /// the callback requires `iss` and compares it exactly (RFC 9207).
    pub issuer: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: String,
    pub revocation_url: Option<String>,
    pub userinfo_url: Option<String>,
    pub account_label_field: String,
    pub scopes: Vec<String>,
    pub auth_params: Vec<(String, String)>,
    pub token_auth: TokenAuth,
    pub grant: Grant,
    pub redirect_uri: Option<String>,
    pub resource: Option<String>,
    pub ca_pem: Option<String>,
    /// The provider's API (Google), where access tokens go.
    pub base_url: Option<String>,
}

impl Endpoints {
    /// The connector's effective endpoints; a missing required value names its config key.
    pub fn of(connector: &Connector) -> Result<Self, FieldError> {
        let preset = preset(&connector.provider).cloned().unwrap_or_default();
        let pick = |key: &str, preset_value: Option<String>| -> Option<String> {
            connector.setting(key).map(str::to_string).or(preset_value)
        };
        let required = |key: &str, value: Option<String>| {
            value.ok_or_else(|| {
                FieldError::new(
                    format!("config.{key}"),
                    "is required for this OAuth connector",
                )
            })
        };
        let grant = Grant::of(connector)?;
        let token_auth = match pick("token_auth", preset.token_auth).as_deref() {
            None | Some("basic") => TokenAuth::Basic,
            Some("post") => TokenAuth::Post,
            Some(other) => {
                return Err(FieldError::new(
                    "config.token_auth",
                    format!("{other:?} is not basic or post"),
                ));
            }
        };
        let scopes = match connector.setting("scopes") {
            Some(list) => split_list(list),
            None => preset.scopes,
        };
        let auth_params = match connector.setting("auth_params") {
            Some(query) => url::form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
            None => preset.auth_params.into_iter().collect(),
        };
        let auth_url = pick("auth_url", preset.auth_url);
        if grant == Grant::AuthorizationCode && auth_url.is_none() {
            required("auth_url", None)?;
        }
        Ok(Self {
            client_id: required(
                "client_id",
                connector.setting("client_id").map(str::to_string),
            )?,
            issuer: pick("issuer", preset.issuer),
            auth_url,
            token_url: required("token_url", pick("token_url", preset.token_url))?,
            revocation_url: pick("revocation_url", preset.revocation_url),
            userinfo_url: pick("userinfo_url", preset.userinfo_url),
            account_label_field: pick("account_label_field", preset.account_label_field)
                .unwrap_or_else(|| "email".into()),
            scopes,
            auth_params,
            token_auth,
            grant,
            redirect_uri: connector.setting("redirect_uri").map(str::to_string),
            resource: connector.setting("resource").map(str::to_string),
            ca_pem: connector.setting("ca_pem").map(str::to_string),
            base_url: pick("base_url", preset.base_url),
        })
    }

    /// Where a grant's secrets go, and what names the provider: the values that must not change
    /// between BeginConnect and the callback (the scopes, the label field may).
    pub fn destination(&self) -> impl PartialEq + '_ {
        (
            (&self.client_id, &self.issuer, &self.token_url),
            (&self.revocation_url, &self.userinfo_url, &self.base_url),
            (self.token_auth, self.grant, &self.redirect_uri),
            (&self.resource, &self.ca_pem),
        )
    }
}

/// Splits a list given as one config string, by spaces or commas.
pub fn split_list(list: &str) -> Vec<String> {
    list.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Reads a dotted path ("team.name") out of a JSON document as a label.
pub fn label_at(document: &serde_json::Value, path: &str) -> Option<String> {
    let value = path
        .split('.')
        .try_fold(document, |node, key| node.get(key))?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_parses_and_has_every_promised_provider() {
        for name in [
            "google-mail",
            "google-calendar",
            "google-drive",
            "slack",
            "hubspot",
            "intercom",
            "microsoft-outlook",
        ] {
            let p = preset(name).unwrap_or_else(|| panic!("{name} missing"));
            assert!(
                p.auth_url.as_deref().unwrap().starts_with("https://"),
                "{name}"
            );
            assert!(
                p.token_url.as_deref().unwrap().starts_with("https://"),
                "{name}"
            );
        }
        assert!(
            validate_provider("provider", "gitlab")
                .unwrap_err()
                .to_string()
                .contains("slack")
        );
    }

    #[test]
    fn labels_come_from_dotted_paths() {
        let doc = serde_json::json!({"team": {"name": "Acme"}, "portalId": 42, "email": "a@x"});
        assert_eq!(label_at(&doc, "team.name").as_deref(), Some("Acme"));
        assert_eq!(label_at(&doc, "portalId").as_deref(), Some("42"));
        assert_eq!(label_at(&doc, "missing.path"), None);
    }

    #[test]
    fn lists_split_on_spaces_and_commas() {
        assert_eq!(split_list("a b,c ,, d"), ["a", "b", "c", "d"]);
    }
}
