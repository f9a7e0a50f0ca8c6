//! TLS to PostgreSQL through rustls (ring provider): the small adapter tokio-postgres needs
//! ([`MakeTlsConnect`]), written here rather than taken from tokio-postgres-rustls, whose
//! releases pull in a second `sha2` (0.11) or `x509-cert` beside the project's own x509-parser.
//!
//! Invariants: the server's certificate is verified against the configured roots and its name
//! (host name or IP address) by rustls; the SCRAM channel binding (`tls-server-end-point`,
//! RFC 5929) is offered whenever the certificate's signature hash is known, so a server that
//! terminates TLS elsewhere cannot relay the authentication.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Makes one TLS connector per connection attempt, for the host tokio-postgres names.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    pub fn new(config: Arc<rustls::ClientConfig>) -> Self {
        Self { config }
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            name: ServerName::try_from(domain.to_string())?,
            connector: tokio_rustls::TlsConnector::from(self.config.clone()),
        })
    }
}

pub struct RustlsConnect {
    name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS connection to the server.
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| server_end_point(leaf.as_ref()))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// RFC 5929 §4.1: the leaf certificate hashed with its signature's hash (SHA-256 for MD5 and
/// SHA-1); `None` for a signature without one (Ed25519), which leaves binding out.
fn server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::oid_registry as oids;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let algorithm = &cert.signature_algorithm.algorithm;
    let sha384 = [
        oids::OID_PKCS1_SHA384WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA384,
    ];
    let sha512 = [
        oids::OID_PKCS1_SHA512WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA512,
    ];
    let sha256 = [
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_PKCS1_SHA1WITHRSA,
        oids::OID_PKCS1_MD5WITHRSAENC,
    ];
    if sha384.contains(algorithm) {
        Some(sha2::Sha384::digest(der).to_vec())
    } else if sha512.contains(algorithm) {
        Some(sha2::Sha512::digest(der).to_vec())
    } else if sha256.contains(algorithm) {
        Some(sha2::Sha256::digest(der).to_vec())
    } else {
        None
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
