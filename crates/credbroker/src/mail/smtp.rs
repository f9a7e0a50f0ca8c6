//! SMTP: a pooled lettre transport per connection (STARTTLS or implicit TLS, rustls with the
//! connection's trusted CAs), replaced whenever the account's settings or credentials change;
//! and the staged AUTH check behind a credentials test.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, Certificate, CertificateStore, Tls, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::{self, PoolConfig};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use super::account::{Account, Auth, TlsMode};
use super::message::{Outgoing, Sent};
use super::{MailError, Service, bounded};
use crate::model::Stage;

type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// Idle pooled connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(60);
const POOL_MAX: u32 = 4;
/// Tries per message (or credentials test) when the server answers 4xx.
const TRANSIENT_ATTEMPTS: u32 = 3;
const TRANSIENT_PAUSE: Duration = Duration::from_millis(200);

/// Above this many pooled transports, those unused for [`POOL_IDLE`] are dropped.
const MAX_POOLS: usize = 256;

struct Pooled {
    /// The account fingerprint the transport was built from…
    fingerprint: String,
    /// …and the checked address it connects to.
    addr: SocketAddr,
    transport: Transport,
    last_used: Instant,
}

/// One pooled transport per connection, tagged with the account fingerprint it was built from.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, Pooled>>,
}

impl Pools {
    fn transport(
        &self,
        account: &Account,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Transport, MailError> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(pooled) = pools.get_mut(&account.key)
            && pooled.fingerprint == account.fingerprint
            && pooled.addr == addr
        {
            pooled.last_used = now;
            return Ok(pooled.transport.clone());
        }
        if pools.len() >= MAX_POOLS {
            pools.retain(|_, p| now.duration_since(p.last_used) < POOL_IDLE);
        }
        let transport = build_transport(account, addr, timeout)?;
        // The old transport (if any) is dropped here: its pooled connections close.
        pools.insert(
            account.key.clone(),
            Pooled {
                fingerprint: account.fingerprint.clone(),
                addr,
                transport: transport.clone(),
                last_used: now,
            },
        );
        Ok(transport)
    }

    /// The checked address a transport for `account` connects to: the pooled one while the
    /// name still resolves to it, else the first of `addrs` that accepts a connection.
    async fn address(
        &self,
        account: &Account,
        addrs: &[SocketAddr],
    ) -> Result<SocketAddr, MailError> {
        let pooled = {
            let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
            pools
                .get(&account.key)
                .filter(|p| p.fingerprint == account.fingerprint)
                .map(|p| p.addr)
        };
        match (pooled.filter(|a| addrs.contains(a)), addrs) {
            (Some(addr), _) => Ok(addr),
            (None, [one]) => Ok(*one),
            (None, _) => {
                let (host, port) = (&account.smtp.host, account.smtp.port);
                let probe = crate::upstream::connect_resolved(host, port, addrs)
                    .await
                    .map_err(|e| super::imap::upstream_failure(Service::Smtp, &account.smtp, e))?;
                Ok(probe.peer_addr().unwrap_or(addrs[0]))
            }
        }
    }

    fn forget(&self, account: &Account) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if pools
            .get(&account.key)
            .is_some_and(|p| p.fingerprint == account.fingerprint)
        {
            pools.remove(&account.key);
        }
    }

    /// Sends a built message within `timeout`.
    pub async fn send(
        &self,
        account: &Account,
        outgoing: &Outgoing,
        timeout: Duration,
    ) -> Result<Sent, MailError> {
        let server = account.smtp.addr();
        let result = bounded(Service::Smtp, &server, timeout, async {
            // The pool's connections are made to the checked address, one in use per permit.
            let _permit = permit(account)?;
            let addrs = super::imap::resolve(Service::Smtp, &account.smtp).await?;
            let addr = self.address(account, &addrs).await?;
            let mut attempt = 1;
            loop {
                let transport = self.transport(account, addr, timeout)?;
                match transport.send(outgoing.message.clone()).await {
                    Ok(_) => return Ok(()),
                    // A 4xx reply means the server did not take the message: trying again on
                    // a fresh connection cannot duplicate it.
                    Err(e) if e.is_transient() && attempt < TRANSIENT_ATTEMPTS => {
                        tracing::info!(server = %server, error = %e, "SMTP temporary failure; trying again");
                        self.forget(account);
                        attempt += 1;
                        tokio::time::sleep(TRANSIENT_PAUSE * attempt).await;
                    }
                    Err(e) => return Err(classify(account, &e)),
                }
            }
        })
        .await;
        if let Err(MailError::AuthRefused { .. } | MailError::Upstream { .. }) = &result {
            // Do not keep connections (or a transport) that just failed.
            self.forget(account);
        }
        result?;
        Ok(Sent {
            message_id: outgoing.message_id.clone(),
            accepted: outgoing.recipients.clone(),
        })
    }
}

fn tls_parameters(account: &Account) -> Result<TlsParameters, MailError> {
    let mut builder = TlsParameters::builder(account.smtp.host.clone())
        .certificate_store(CertificateStore::WebpkiRoots);
    if let Some(pem) = &account.ca_pem {
        let cert = Certificate::from_pem(pem.as_bytes()).map_err(|_| {
            crate::model::FieldError::new("settings.ca_pem", "is not a valid PEM certificate")
        })?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build_rustls().map_err(|e| {
        MailError::upstream(
            Service::Smtp,
            &account.smtp.addr(),
            Stage::Tls,
            format!("cannot set up TLS: {e}"),
        )
    })
}

fn credentials(account: &Account) -> (Credentials, Vec<Mechanism>) {
    match &account.auth {
        Auth::Password(p) => (
            Credentials::new(account.username.clone(), p.expose().to_string()),
            vec![Mechanism::Plain, Mechanism::Login],
        ),
        Auth::XOAuth2(t) => (
            Credentials::new(account.username.clone(), t.expose().to_string()),
            vec![Mechanism::Xoauth2],
        ),
    }
}

fn hello() -> ClientId {
    ClientId::Domain("credbroker.localhost".into())
}

/// A cap permit for one SMTP connection of `account`.
fn permit(account: &Account) -> Result<crate::upstream::Permit, MailError> {
    crate::upstream::current()
        .permit()
        .map_err(|e| super::imap::upstream_failure(Service::Smtp, &account.smtp, e))
}

/// A transport connecting to the checked `addr`; TLS still verifies the server's name.
fn build_transport(
    account: &Account,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Transport, MailError> {
    let params = tls_parameters(account)?;
    let tls = match account.smtp.tls {
        TlsMode::Implicit => Tls::Wrapper(params),
        TlsMode::StartTls => Tls::Required(params),
    };
    let (credentials, mechanisms) = credentials(account);
    Ok(
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(addr.ip().to_string())
            .port(addr.port())
            .tls(tls)
            .hello_name(hello())
            .credentials(credentials)
            .authentication(mechanisms)
            .timeout(Some(timeout))
            .pool_config(PoolConfig::new().max_size(POOL_MAX).idle_timeout(POOL_IDLE))
            .build(),
    )
}

/// Reply codes that mean "these credentials are not accepted".
fn is_auth_code(code: &str) -> bool {
    matches!(code, "535" | "534" | "530" | "538")
}

/// A lettre error as a mail error. Server texts are kept (they never contain the password);
/// lettre's own texts are summarised.
fn auth_refused(account: &Account) -> MailError {
    MailError::AuthRefused {
        service: Service::Smtp,
        server: account.smtp.addr(),
        what: account.auth.what(),
        hint: "check the username and password (an app password if the account uses two-factor authentication)",
    }
}

fn classify(account: &Account, e: &smtp::Error) -> MailError {
    let server = account.smtp.addr();
    let code = e.status().map(|c| c.to_string()).unwrap_or_default();
    if e.is_permanent() && is_auth_code(&code) {
        return auth_refused(account);
    }
    if e.is_permanent() {
        return MailError::Rejected {
            service: Service::Smtp,
            server,
            message: e.to_string(),
            too_large: code == "552",
        };
    }
    let text = e.to_string().to_ascii_lowercase();
    // rustls failures during the handshake surface as connection errors in lettre.
    let tls_failure = e.is_tls()
        || [
            "corrupt message",
            "invalidcontenttype",
            "certificate",
            "handshake",
            "tls",
        ]
        .iter()
        .any(|w| text.contains(w));
    let (stage, message) = if e.is_timeout() {
        (Stage::Timeout, "timed out".to_string())
    } else if tls_failure {
        (
            Stage::Tls,
            format!(
                "TLS failed ({e}); check the TLS mode ({}) and that the server's certificate is trusted (ca_pem)",
                match account.smtp.tls {
                    TlsMode::Implicit => "implicit TLS, usually port 465",
                    TlsMode::StartTls => "STARTTLS, usually port 587",
                }
            ),
        )
    } else if e.is_transient() {
        (Stage::Protocol, format!("temporary failure: {e}"))
    } else if e.is_client() && e.to_string().contains("STARTTLS") {
        (
            Stage::Tls,
            "the server does not offer STARTTLS; try implicit TLS (port 465)".to_string(),
        )
    } else if e.is_client() && e.to_string().contains("authentication mechanism") {
        (
            Stage::Auth,
            format!(
                "the server offers no usable authentication mechanism ({})",
                match account.auth {
                    Auth::Password(_) => "PLAIN or LOGIN",
                    Auth::XOAuth2(_) => "XOAUTH2",
                }
            ),
        )
    } else {
        // The inner cause (refused, reset, unreachable) is the operator's, not the caller's.
        tracing::debug!(server = %server, error = %e, "SMTP connection failed");
        (
            Stage::Tcp,
            "cannot talk to the server; check the host and port".to_string(),
        )
    };
    MailError::upstream(Service::Smtp, &server, stage, message)
}

/// Connects, secures the connection and authenticates, reporting the stage that failed.
pub async fn test_auth(account: &Account, timeout: Duration) -> Result<(), MailError> {
    let server = account.smtp.addr();
    bounded(Service::Smtp, &server, timeout, async {
        let mut attempt = 1;
        loop {
            match try_auth(account, timeout).await {
                Err(TestFailure::Transient(_)) if attempt < TRANSIENT_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(TRANSIENT_PAUSE * attempt).await;
                }
                Err(TestFailure::Transient(e)) => return Err(classify(account, &e)),
                Err(TestFailure::Failed(e)) => return Err(e),
                Ok(()) => return Ok(()),
            }
        }
    })
    .await
}

enum TestFailure {
    /// A 4xx reply: worth another try (e.g. the SASL backend was just restarted).
    Transient(smtp::Error),
    Failed(MailError),
}

impl From<MailError> for TestFailure {
    fn from(e: MailError) -> Self {
        TestFailure::Failed(e)
    }
}

async fn try_auth(account: &Account, timeout: Duration) -> Result<(), TestFailure> {
    let fail = |e: smtp::Error| {
        if e.is_transient() {
            TestFailure::Transient(e)
        } else {
            TestFailure::Failed(classify(account, &e))
        }
    };
    {
        let _permit = permit(account)?;
        let addrs = super::imap::resolve(Service::Smtp, &account.smtp).await?;
        let params = tls_parameters(account)?;
        let wrapper = (account.smtp.tls == TlsMode::Implicit).then(|| params.clone());
        let mut conn = AsyncSmtpConnection::connect_tokio1(
            addrs.as_slice(),
            Some(timeout),
            &hello(),
            wrapper,
            None,
        )
        .await
        .map_err(fail)?;
        if account.smtp.tls == TlsMode::StartTls {
            conn.starttls(params, &hello()).await.map_err(fail)?;
        }
        let (credentials, mechanisms) = credentials(account);
        let result = conn.auth(&mechanisms, &credentials).await;
        let _ = conn.quit().await;
        // Any permanent refusal of AUTH is a refusal, and its text is not kept: a server may
        // echo the AUTH argument, which holds the password.
        result.map_err(|e| match e.is_permanent() {
            true => TestFailure::Failed(auth_refused(account)),
            false => fail(e),
        })?;
        Ok(())
    }
}
