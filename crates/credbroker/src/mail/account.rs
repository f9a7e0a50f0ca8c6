//! Which servers, TLS modes, addresses and credentials a mail connection uses. A connection's
//! settings override its connector's configuration key by key; OAuth mail providers take their
//! hosts from [`provider_defaults`] and authenticate with XOAUTH2.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::MailError;
use crate::driver::{ConnectionError, Credentials, Form, Service, driver};
use crate::model::{Connector, FieldError, Secret, Target};

/// How a connection to a server is encrypted. There is deliberately no plaintext mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// TLS from the first byte (IMAP 993, SMTP 465).
    Implicit,
    /// Plaintext greeting, then STARTTLS before anything else (IMAP 143, SMTP 587).
    StartTls,
}

impl TlsMode {
    fn name(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit TLS",
            TlsMode::StartTls => "STARTTLS",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.host, self.port, self.tls.name())
    }
}

impl Endpoint {
    /// "host:port", for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How the account authenticates. Debug never shows the secret.
#[derive(Debug, Clone)]
pub enum Auth {
    /// IMAP LOGIN / SMTP AUTH PLAIN or LOGIN.
    Password(Secret),
    /// SASL XOAUTH2 with an OAuth access token.
    XOAuth2(Secret),
}

impl Auth {
    pub fn what(&self) -> &'static str {
        match self {
            Auth::Password(_) => "username or password",
            Auth::XOAuth2(_) => "access token",
        }
    }
}

/// Everything needed to talk to one mail account.
#[derive(Clone)]
pub struct Account {
    /// connector id + connection user: which pool entry is this account's.
    pub key: String,
    /// Changes whenever the settings or credentials change, so a pooled transport built from
    /// older ones is never reused.
    pub fingerprint: String,
    pub email: String,
    pub username: String,
    pub aliases: Vec<String>,
    /// The folder DeleteMessages moves to when the server marks none SPECIAL-USE \Trash
    /// (setting `trash_mailbox`; [`super::organize`] falls back to "Trash").
    pub trash: Option<String>,
    pub imap: Endpoint,
    pub smtp: Endpoint,
    /// Extra CAs (PEM) trusted besides Mozilla's roots for the SMTP server.
    pub ca_pem: Option<String>,
    /// The TLS client configuration for the IMAP server (Mozilla's roots and its extra CAs).
    pub tls: Arc<rustls::ClientConfig>,
    pub auth: Auth,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("email", &self.email)
            .field("username", &self.username)
            .field("imap", &self.imap)
            .field("smtp", &self.smtp)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Account {
    /// True if `address` is the account's address or one of its aliases (case-insensitive).
    pub fn owns(&self, address: &str) -> bool {
        std::iter::once(&self.email)
            .chain(&self.aliases)
            .any(|a| a.eq_ignore_ascii_case(address))
    }
}

/// The settings naming an account's servers and the CA they are checked against: a
/// connector's, or (for a password) a connection's own.
pub const SERVER_SETTINGS: &[&str] = &[
    "imap_host",
    "imap_port",
    "imap_tls",
    "smtp_host",
    "smtp_port",
    "smtp_tls",
    "ca_pem",
];

/// The mail defaults (imap_*/smtp_*) of an OAuth provider preset of the catalog, if it has any.
pub fn provider_defaults(provider: &str) -> Option<BTreeMap<String, String>> {
    let preset = crate::oauth::catalog::preset(provider)?;
    let defaults: BTreeMap<String, String> = [
        ("imap_host", &preset.imap_host),
        ("imap_port", &preset.imap_port),
        ("imap_tls", &preset.imap_tls),
        ("smtp_host", &preset.smtp_host),
        ("smtp_port", &preset.smtp_port),
        ("smtp_tls", &preset.smtp_tls),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
    .collect();
    defaults.contains_key("imap_host").then_some(defaults)
}

/// The connection's settings over the connector's config, with the field each value came from.
struct Merged<'a> {
    connector: &'a Connector,
    settings: &'a BTreeMap<String, String>,
    /// The provider's catalog defaults, for OAuth mail connectors.
    defaults: Option<BTreeMap<String, String>>,
}

impl<'a> Merged<'a> {
    fn get(&self, key: &str) -> Option<(&str, String)> {
        if let Some(v) = self.settings.get(key).filter(|v| !v.trim().is_empty()) {
            return Some((v.trim(), format!("settings.{key}")));
        }
        if let Some(v) = self.connector.setting(key).filter(|v| !v.trim().is_empty()) {
            return Some((v.trim(), format!("config.{key}")));
        }
        self.defaults
            .as_ref()?
            .get(key)
            .map(|v| (v.as_str(), format!("catalog.{key}")))
    }
}

fn parse_tls(value: Option<(&str, String)>) -> Result<Option<TlsMode>, FieldError> {
    let Some((v, field)) = value else {
        return Ok(None);
    };
    match v.to_ascii_lowercase().as_str() {
        "implicit" | "tls" | "ssl" => Ok(Some(TlsMode::Implicit)),
        "starttls" => Ok(Some(TlsMode::StartTls)),
        _ => Err(FieldError::new(
            field,
            format!(
                "is {v:?}; must be \"implicit\" (TLS from the start, ports 993/465) or \"starttls\" (ports 143/587)"
            ),
        )),
    }
}

fn parse_port(value: Option<(&str, String)>) -> Result<Option<u16>, FieldError> {
    let Some((v, field)) = value else {
        return Ok(None);
    };
    match v.parse::<u16>() {
        Ok(p) if p > 0 => Ok(Some(p)),
        _ => Err(FieldError::new(
            field,
            format!("is {v:?}; must be a port number (1-65535)"),
        )),
    }
}

fn parse_host(value: Option<(&str, String)>, missing: &str) -> Result<String, FieldError> {
    let Some((v, field)) = value else {
        return Err(FieldError::new(missing, "is required"));
    };
    if v.len() > 253
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(FieldError::new(
            field,
            "must be a host name or IP address (no scheme, path or spaces)",
        ));
    }
    // The name the server's certificate is checked against: refused here, not at connect time.
    if rustls::pki_types::ServerName::try_from(v).is_err() {
        return Err(FieldError::new(
            field,
            "is not a valid TLS server name (a DNS name or an IP address)",
        ));
    }
    Ok(v.to_string())
}

/// A server of the account, and whether the connection's own settings named its host.
fn endpoint(
    m: &Merged<'_>,
    prefix: &str,
    implicit_port: u16,
    starttls_port: u16,
) -> Result<(Endpoint, bool), FieldError> {
    let given = m.get(&format!("{prefix}_host"));
    let users_own = given
        .as_ref()
        .is_some_and(|(_, field)| field.starts_with("settings."));
    let host = parse_host(given, &format!("settings.{prefix}_host"))?;
    let port = parse_port(m.get(&format!("{prefix}_port")))?;
    let tls = parse_tls(m.get(&format!("{prefix}_tls")))?;
    let tls = tls.unwrap_or(match port {
        Some(p) if p == starttls_port || p == 25 || p == 143 || p == 587 => TlsMode::StartTls,
        _ => TlsMode::Implicit,
    });
    let port = port.unwrap_or(match tls {
        TlsMode::Implicit => implicit_port,
        TlsMode::StartTls => starttls_port,
    });
    Ok((Endpoint { host, port, tls }, users_own))
}

/// The extra CAs trusted for one server: the connection's, and the connector's (an
/// organisation's server) unless the host is the user's own — a connector's CA never vouches
/// for a server the user named.
fn trusted_cas(
    connector: &Connector,
    settings: &BTreeMap<String, String>,
    users_own: bool,
) -> Option<String> {
    let cas: Vec<&str> = [
        connector.setting("ca_pem").filter(|_| !users_own),
        settings.get("ca_pem").map(String::as_str),
    ]
    .into_iter()
    .flatten()
    .filter(|p| !p.trim().is_empty())
    .collect();
    (!cas.is_empty()).then(|| cas.join("\n"))
}

/// An email address as lettre parses it; the error names the field.
pub fn parse_address(field: &str, value: &str) -> Result<lettre::Address, FieldError> {
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain line breaks or control characters",
        ));
    }
    value.trim().parse::<lettre::Address>().map_err(|e| {
        FieldError::new(
            field,
            format!("{value:?} is not a valid email address ({e})"),
        )
    })
}

/// Builds the account from (candidate or stored) settings and a credential.
pub fn from_settings(
    connector: &Connector,
    settings: &BTreeMap<String, String>,
    auth: Option<Auth>,
) -> Result<Account, FieldError> {
    // A user's OAuth token goes only to servers the connector (or the provider's catalog
    // entry) names, never to ones a connection's settings name.
    let kept;
    let settings = if matches!(auth, Some(Auth::XOAuth2(_))) {
        kept = settings
            .iter()
            .filter(|(k, _)| !SERVER_SETTINGS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        &kept
    } else {
        settings
    };
    let m = Merged {
        connector,
        settings,
        // Only OAuth connectors have a provider (the registry refuses one anywhere else).
        defaults: provider_defaults(&connector.provider),
    };
    let (imap, imap_own) = endpoint(&m, "imap", 993, 143)?;
    let (smtp, smtp_own) = endpoint(&m, "smtp", 465, 587)?;
    let username = m.get("username").map(|(v, _)| v.to_string());
    let email = match (m.get("email"), &username) {
        (Some((v, field)), _) => parse_address(&field, v)?.to_string(),
        (None, Some(u)) if u.contains('@') => parse_address("settings.username", u)?.to_string(),
        _ => return Err(FieldError::new("settings.email", "is required")),
    };
    let username = username.unwrap_or_else(|| email.clone());
    if username.chars().any(char::is_control) {
        return Err(FieldError::new(
            "settings.username",
            "must not contain control characters",
        ));
    }
    let mut aliases = Vec::new();
    if let Some((list, field)) = m.get("aliases") {
        for (i, alias) in list
            .split([',', ';'])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .enumerate()
        {
            aliases.push(parse_address(&format!("{field}[{i}]"), alias)?.to_string());
        }
    }
    let trash = m
        .get("trash_mailbox")
        .map(|(v, field)| super::imap::mailbox_name(&field, v))
        .transpose()?;
    let ca_error = |e: crate::tls::TlsError| {
        let field = if settings.contains_key("ca_pem") {
            "settings.ca_pem"
        } else {
            "config.ca_pem"
        };
        FieldError::new(field, e.to_string())
    };
    let ca_pem = trusted_cas(connector, settings, smtp_own);
    crate::tls::client_config(ca_pem.as_deref()).map_err(ca_error)?;
    let tls = crate::tls::client_config(trusted_cas(connector, settings, imap_own).as_deref())
        .map_err(ca_error)?;
    let auth = auth.ok_or_else(|| FieldError::new("secrets.password", "is required"))?;
    Ok(Account {
        key: String::new(),
        fingerprint: String::new(),
        email,
        username,
        aliases,
        trash,
        imap,
        smtp,
        ca_pem,
        tls,
        auth,
    })
}

/// The account of a stored connection, with a current credential (an OAuth access token is
/// refreshed first if it is about to expire). A kind whose connections hold no settings (an
/// OAuth mail provider) takes its servers from the catalog and its address from the account.
pub async fn load(
    credentials: &Credentials,
    target: &Target,
    timeout: Duration,
) -> Result<Account, MailError> {
    let connector = &target.connector;
    let user = &target.connection_user;
    let kind = driver(connector.kind);
    if !kind.serves(connector, Service::Mail) {
        return Err(FieldError::new(
            "connection.connector",
            format!(
                "connector {:?} is a {} connector, not a mail (imap_smtp, google-mail, microsoft-outlook) connector",
                connector.name,
                if connector.provider.is_empty() { connector.kind.name() } else { &connector.provider }
            ),
        )
        .into());
    }
    let min_ttl = timeout + Duration::from_secs(60);
    let mut hash = Sha256::new();
    hash.update(connector.id.as_bytes());
    hash.update([0]);
    hash.update(user.as_bytes());
    hash.update([0]);
    hash.update(connector.updated_at.to_rfc3339().as_bytes());
    let mut credential = credentials.credential(target, min_ttl).await?;
    // The servers the password was given for: the connection read with it.
    let connection = if kind.schema().settings.is_empty() {
        None
    } else {
        let connection = credential
            .connection
            .take()
            .ok_or_else(|| ConnectionError::not_connected(connector, user))?;
        hash.update(
            connection
                .connected_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
                .as_bytes(),
        );
        Some(connection)
    };
    hash.update(format!("{:?}", credential.expires_at).as_bytes());
    let settings = match connection {
        Some(connection) => connection.settings,
        None => BTreeMap::from([("email".to_string(), credential.account_label)]),
    };
    let auth = match credential.form {
        Form::Password => Auth::Password(credential.secret),
        Form::Bearer | Form::ApiKey => Auth::XOAuth2(credential.secret),
    };
    for (k, v) in &settings {
        hash.update(k.as_bytes());
        hash.update([0]);
        hash.update(v.as_bytes());
        hash.update([0]);
    }
    let mut account = from_settings(connector, &settings, Some(auth))?;
    account.key = format!("{}/{}", connector.id, user);
    account.fingerprint = hex::encode(hash.finalize());
    Ok(account)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Mode};

    fn connector(config: &[(&str, &str)]) -> Connector {
        Connector::for_tests(Kind::ImapSmtp, Mode::Personal, config)
    }

    fn settings(s: &[(&str, &str)]) -> BTreeMap<String, String> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pw() -> Option<Auth> {
        Some(Auth::Password(Secret::new("pw")))
    }

    #[test]
    fn settings_override_config_and_ports_follow_tls() {
        let c = connector(&[("imap_host", "imap.corp"), ("smtp_host", "smtp.corp")]);
        let a = from_settings(
            &c,
            &settings(&[
                ("email", "a@corp.test"),
                ("smtp_port", "587"),
                ("imap_tls", "starttls"),
                ("aliases", "b@corp.test, c@corp.test"),
            ]),
            pw(),
        )
        .unwrap();
        assert_eq!(a.imap.host, "imap.corp");
        assert_eq!((a.imap.port, a.imap.tls), (143, TlsMode::StartTls));
        assert_eq!((a.smtp.port, a.smtp.tls), (587, TlsMode::StartTls));
        assert_eq!(a.username, "a@corp.test");
        assert!(a.owns("C@corp.test"));
        assert!(!a.owns("d@corp.test"));
        let a = from_settings(
            &c,
            &settings(&[("email", "a@corp.test"), ("imap_host", "other")]),
            pw(),
        )
        .unwrap();
        assert_eq!(a.imap.host, "other");
        assert_eq!((a.imap.port, a.imap.tls), (993, TlsMode::Implicit));
        assert_eq!((a.smtp.port, a.smtp.tls), (465, TlsMode::Implicit));
    }

    #[test]
    fn errors_name_the_field() {
        let c = connector(&[("smtp_host", "smtp.corp")]);
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("email", "a@corp.test")], "settings.imap_host"),
            (
                &[
                    ("email", "a@corp.test"),
                    ("imap_host", "h"),
                    ("imap_port", "99999"),
                ],
                "settings.imap_port",
            ),
            (
                &[
                    ("email", "a@corp.test"),
                    ("imap_host", "h"),
                    ("imap_tls", "none"),
                ],
                "settings.imap_tls",
            ),
            (
                &[("email", "not an address"), ("imap_host", "h")],
                "settings.email",
            ),
            (
                &[
                    ("email", "a@corp.test"),
                    ("imap_host", "h"),
                    ("aliases", "ok@x.test,bad"),
                ],
                "settings.aliases[1]",
            ),
            (
                &[("email", "a@corp.test"), ("imap_host", "https://h/")],
                "settings.imap_host",
            ),
        ];
        for (s, field) in cases {
            let e = from_settings(&c, &settings(s), pw()).unwrap_err();
            assert_eq!(&e.field, field, "{s:?}: {e}");
        }
    }

    #[test]
    fn a_connectors_ca_vouches_for_its_own_servers_only() {
        let ca = "-----BEGIN CERTIFICATE-----";
        let c = connector(&[("imap_host", "imap.corp"), ("ca_pem", ca)]);
        let own = settings(&[("smtp_host", "smtp.mine.test")]);
        assert_eq!(trusted_cas(&c, &own, false).as_deref(), Some(ca));
        assert_eq!(trusted_cas(&c, &own, true), None);
        let with_own = settings(&[("ca_pem", "mine")]);
        assert_eq!(trusted_cas(&c, &with_own, true).as_deref(), Some("mine"));
        let m = Merged {
            connector: &c,
            settings: &own,
            defaults: None,
        };
        assert!(!endpoint(&m, "imap", 993, 143).unwrap().1);
        assert!(endpoint(&m, "smtp", 465, 587).unwrap().1);
    }

    #[test]
    fn a_token_goes_to_the_connectors_servers_only() {
        let c = connector(&[("imap_host", "imap.corp"), ("smtp_host", "smtp.corp")]);
        let own = settings(&[
            ("email", "a@corp.test"),
            ("imap_host", "evil.test"),
            ("smtp_port", "2525"),
            ("ca_pem", "not even a PEM"),
        ]);
        let token = Some(Auth::XOAuth2(Secret::new("t")));
        let a = from_settings(&c, &own, token).unwrap();
        assert_eq!(
            (a.imap.host.as_str(), a.smtp.addr()),
            ("imap.corp", "smtp.corp:465".into())
        );
        assert_eq!(a.ca_pem, None);
        // A password is the user's: it goes to their own servers.
        let e = from_settings(&c, &own, pw()).unwrap_err();
        assert_eq!(e.field, "settings.ca_pem");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = connector(&[("imap_host", "i"), ("smtp_host", "s")]);
        let a = from_settings(
            &c,
            &settings(&[("email", "a@corp.test")]),
            Some(Auth::Password(Secret::new("canary-pw"))),
        )
        .unwrap();
        assert!(!format!("{a:?}").contains("canary-pw"));
    }
}
