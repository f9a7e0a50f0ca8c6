//! An mTLS gRPC client for the CLI's admin commands and for tests: the CA, certificate and key
//! are always given explicitly (never taken from the environment).

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::api::proto::{admin_client::AdminClient, broker_client::BrokerClient};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: String, why: String },
}

/// Paths of the client's TLS material.
#[derive(Debug, Clone)]
pub struct ClientTls<'a> {
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
}

fn read(path: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Opens a channel to `addr` ("https://127.0.0.1:7443") presenting the client certificate.
pub async fn channel(addr: &str, tls: &ClientTls<'_>) -> Result<Channel, ClientError> {
    crate::tls::install_crypto_provider();
    let connect_err = |why: String| ClientError::Connect {
        addr: addr.to_string(),
        why,
    };
    let host = addr
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        .unwrap_or_else(|| "localhost".into());
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(tls.ca)?))
        .identity(Identity::from_pem(read(tls.cert)?, read(tls.key)?))
        .domain_name(host);
    Channel::from_shared(addr.to_string())
        .map_err(|e| connect_err(e.to_string()))?
        .tls_config(config)
        .map_err(|e| connect_err(e.to_string()))?
        .connect()
        .await
        .map_err(|e| {
            connect_err(format!(
                "{e} ({})",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            ))
        })
}

pub async fn admin(addr: &str, tls: &ClientTls<'_>) -> Result<AdminClient<Channel>, ClientError> {
    Ok(AdminClient::new(channel(addr, tls).await?))
}

pub async fn broker(addr: &str, tls: &ClientTls<'_>) -> Result<BrokerClient<Channel>, ClientError> {
    Ok(BrokerClient::new(channel(addr, tls).await?))
}
