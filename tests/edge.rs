//! The edge under floods: what a client that is not welcome, or too eager, can hold of the
//! broker. Each test counts outcomes (connections held, refused, closed), never timings.

mod support;

use std::sync::Arc;
use std::time::Duration;

use credbroker::api::proto;
use support::daemon::Daemon;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Adds `keys` at the top of the configuration's `[section]` and restarts the daemon on it.
fn reconfigure(daemon: &mut Daemon, section: &str, keys: &str) {
    let path = daemon.config();
    let text = std::fs::read_to_string(&path).unwrap();
    let header = format!("[{section}]\n");
    assert!(text.contains(&header), "no {header} in the test config");
    std::fs::write(&path, text.replace(&header, &format!("{header}{keys}\n"))).unwrap();
    daemon.restart();
}

/// A TLS client of the HTTPS listener trusting the test CA, limited to `versions`.
fn https_client(
    daemon: &Daemon,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut daemon.ca.cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// The gRPC listener answers an agent: a resolve of a connector that does not exist is
/// NOT_FOUND (an answer from the broker, not a refused or hung connection).
async fn assert_grpc_answers(daemon: &Daemon) {
    let missing = daemon
        .agent()
        .await
        .resolve_credential(proto::ResolveCredentialRequest {
            connection: Some(proto::ConnectionRef {
                connector: "nothing-here".into(),
                ..Default::default()
            }),
            min_ttl_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
}

#[tokio::test]
async fn idle_https_connections_are_capped_closed_and_never_starve_grpc() {
    let mut daemon = Daemon::start();
    reconfigure(
        &mut daemon,
        "http",
        "max_connections = 8\nheader_timeout_secs = 5\nmax_connection_secs = 10",
    );
    let addr = daemon.http.expect("http listener");
    let tls13 = https_client(&daemon, &[&rustls::version::TLS13]);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // 24 clients finish a handshake and then say nothing, as a slowloris would.
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..24 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), tls13.connect(name.clone(), tcp)).await {
            Ok(Ok(tls)) => held.push(tls),
            _ => refused += 1,
        }
    }
    assert!(
        held.len() <= 8,
        "{} connections held past the cap of 8",
        held.len()
    );
    assert!(refused >= 16, "only {refused} of 24 refused at a cap of 8");

    // While they are held, the gRPC listener answers as usual.
    assert_grpc_answers(&daemon).await;

    // The broker closes every silent connection itself.
    for mut tls in held {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(60), tls.read(&mut byte))
            .await
            .expect("the broker closes a connection that sends no request");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    // Served again once they are gone, and the refusals are counted.
    let (status, metrics) = daemon.http_get("/metrics").await;
    assert_eq!(status, 200);
    let counted = support::daemon::metric(&metrics, "credbroker_http_connections_refused_total");
    assert!(counted >= 16.0, "{counted} refusals counted");

    // TLS 1.2 is not offered unless configured.
    let tls12 = https_client(&daemon, &[&rustls::version::TLS12]);
    let tcp = TcpStream::connect(addr).await.unwrap();
    assert!(
        tls12.connect(name, tcp).await.is_err(),
        "a TLS 1.2 handshake succeeded"
    );
}

async fn audit_head(daemon: &Daemon) -> u64 {
    let mut admin = daemon.admin().await;
    let head = admin.get_audit_head(proto::GetAuditHeadRequest {}).await;
    head.unwrap().into_inner().seq
}

#[tokio::test]
async fn floods_of_junk_callbacks_and_refused_handshakes_write_a_few_records() {
    let mut daemon = Daemon::start();
    let before = audit_head(&daemon).await;

    // 10,000 OAuth callbacks with states the broker never issued.
    let https = daemon.https();
    let http = daemon.http.expect("http listener");
    let (mut refused, mut limited) = (0, 0);
    for i in 0..10_000 {
        let url = format!("https://{http}/oauth/callback?state=junk{i}&code=x");
        match https.get(url).send().await.unwrap().status().as_u16() {
            400 => refused += 1,
            429 => limited += 1,
            other => panic!("a junk callback answered {other}"),
        }
    }
    assert_eq!(refused + limited, 10_000);

    // 2,000 TLS handshakes without a client certificate on the gRPC port.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let anonymous = https_client(&daemon, &[&rustls::version::TLS13]);
    let mut handshakes = Vec::new();
    for _ in 0..16 {
        let (anonymous, name, grpc) = (anonymous.clone(), name.clone(), daemon.grpc);
        handshakes.push(tokio::spawn(async move {
            for _ in 0..125 {
                let tcp = TcpStream::connect(grpc).await.unwrap();
                // The server may finish its side before it refuses; either way nothing is served.
                if let Ok(mut tls) = anonymous.connect(name.clone(), tcp).await {
                    let mut byte = [0u8; 1];
                    let _ = tls.read(&mut byte).await;
                }
            }
        }));
    }
    for task in handshakes {
        task.await.unwrap();
    }

    // Legitimate callers are served throughout, and the audit log grew by a handful.
    assert_grpc_answers(&daemon).await;
    let grown = audit_head(&daemon).await - before;
    assert!(grown <= 20, "12,000 refusals wrote {grown} audit records");

    // The summaries are written at the window's end; the chain verifies with them.
    daemon.stop();
    let config = daemon.config();
    let verify = daemon.cli(&["audit", "verify", "--config", config.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    println!("callbacks refused {refused}, rate-limited {limited}; audit grew by {grown}");
}

#[tokio::test]
async fn metrics_can_require_a_bearer_token() {
    let mut daemon = Daemon::start();
    let token = "scrape-token-0123456789";
    std::fs::write(daemon.path("metrics.token"), format!("{token}\n")).unwrap();
    reconfigure(
        &mut daemon,
        "http",
        "metrics_token_file = \"metrics.token\"",
    );
    let url = format!("https://{}/metrics", daemon.http.expect("http listener"));
    let https = daemon.https();
    let anonymous = https.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let wrong = https
        .get(&url)
        .bearer_auth("scrape-token-0123456788")
        .send();
    assert_eq!(wrong.await.unwrap().status().as_u16(), 401);
    let scraped = https.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(scraped.status().as_u16(), 200);
    assert!(
        scraped
            .text()
            .await
            .unwrap()
            .contains("credbroker_rpc_total")
    );
    // Probes need no token.
    assert_eq!(daemon.http_get("/healthz").await.0, 200);
    // The store's free disk space is watched and shown.
    let free = support::wait::until(Duration::from_secs(30), async || {
        let body = https.get(&url).bearer_auth(token).send().await.ok()?;
        let free = support::daemon::metric(&body.text().await.ok()?, "credbroker_store_free_bytes");
        (free > 0.0).then_some(free)
    })
    .await;
    assert!(
        free.is_some(),
        "credbroker_store_free_bytes never became positive"
    );
}
