//! A fake HTTPS API for the tests: an axum router served over TLS with a certificate from a
//! test CA ([`credbroker_devpki`]), so the daemon reaches it as it would a real API.

#![allow(dead_code)]

/// Serves `app` over HTTPS with a certificate from `ca`; returns its address.
pub async fn serve_https(
    ca: &credbroker_devpki::CertAuthority,
    app: axum::Router,
) -> std::net::SocketAddr {
    let cert = ca.issue_server(&["127.0.0.1"]).unwrap();
    let certs = credbroker::tls::parse_pem_certs(&cert.cert_pem).unwrap();
    let key = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap()
    };
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_one(acceptor.clone(), tcp, app.clone()));
        }
    });
    addr
}

/// Serves `app` on one accepted connection, after its TLS handshake.
pub async fn serve_one(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    app: axum::Router,
) {
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = hyper_util::service::TowerToHyperService::new(app);
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
        .await;
}
