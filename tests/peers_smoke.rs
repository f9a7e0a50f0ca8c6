//! The test peers answer over TLS with their own CA: a failure here is a harness problem, not a
//! credbroker one, and says so before the domain tests fail in confusing ways.

mod support;

use support::peers::peers;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn greeting(port: u16) -> String {
    let config = credbroker::tls::client_config(Some(&peers().ca_pem)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut line = String::new();
    BufReader::new(tls).read_line(&mut line).await.unwrap();
    line
}

#[tokio::test]
async fn every_peer_answers_over_tls() {
    credbroker::tls::install_crypto_provider();
    assert!(greeting(peers().ports().imaps).await.starts_with("* OK"));
    assert!(greeting(peers().ports().smtps).await.starts_with("220"));
    let http = peers().http();
    let discovery = http
        .get(format!(
            "{}/.well-known/openid-configuration",
            peers().oauth_issuer()
        ))
        .send()
        .await
        .unwrap();
    assert!(discovery.status().is_success());
    let propfind = http
        .request(
            reqwest::Method::from_bytes(b"PROPFIND").unwrap(),
            format!("{}alice/", peers().caldav_url()),
        )
        .basic_auth("alice", Some("secret1"))
        .header("Depth", "0")
        .send()
        .await
        .unwrap();
    assert_eq!(propfind.status().as_u16(), 207);
    // The stats endpoint the OAuth tests count refreshes with answers and parses.
    peers().oauth_stats().await;
}
