//! TLS for upstream connections (OAuth servers, SMTP, IMAP, CalDAV, provider APIs): one place
//! that decides which roots are trusted. The roots are Mozilla's (compiled in) plus any CA a
//! connector or connection configures (`ca_pem`); the process environment (`SSL_CERT_FILE`…)
//! is deliberately ignored so that trust never depends on the host's variables.

use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("ca_pem holds no PEM certificate")]
    NoCertificate,
    #[error("ca_pem is not valid PEM: {0}")]
    BadPem(String),
    #[error("ca_pem certificate rejected: {0}")]
    BadCertificate(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// Installs ring as the process-wide rustls provider; harmless if one is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Parses every certificate of a PEM bundle.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

/// Mozilla's roots plus the extra CA, if any.
pub fn root_store(extra_ca_pem: Option<&str>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_ca_pem.filter(|p| !p.trim().is_empty()) {
        for cert in parse_pem_certs(pem)? {
            roots
                .add(cert)
                .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        }
    }
    Ok(roots)
}

/// A rustls client config trusting [`root_store`], no client certificate.
pub fn client_config(extra_ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    install_crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Client(e.to_string()))?
    .with_root_certificates(root_store(extra_ca_pem)?)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// An HTTPS client for upstream calls: explicit roots, a connect timeout and a whole-request
/// timeout, no redirects (an OAuth or CalDAV server that redirects is reported, not followed),
/// and the egress policy and caps on every connection ([`crate::upstream::http::guard`]).
pub fn http_client(
    extra_ca_pem: Option<&str>,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    build(
        crate::upstream::http::guard(reqwest::Client::builder()),
        extra_ca_pem,
        timeout,
    )
}

/// [`http_client`] without the egress policy and caps, for tools' and tests' own requests to
/// servers they run themselves; never for the daemon's upstream calls.
pub fn unchecked_http_client(
    extra_ca_pem: Option<&str>,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    build(reqwest::Client::builder(), extra_ca_pem, timeout)
}

fn build(
    builder: reqwest::ClientBuilder,
    extra_ca_pem: Option<&str>,
    timeout: Duration,
) -> Result<reqwest::Client, TlsError> {
    let tls = client_config(extra_ca_pem)?;
    builder
        .tls_backend_preconfigured((*tls).clone())
        .https_only(true)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| TlsError::Client(e.to_string()))
}
