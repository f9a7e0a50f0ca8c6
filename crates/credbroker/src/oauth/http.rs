//! The HTTP side of OAuth: the oauth2 crate's requests sent through our reqwest client (deadline,
//! no redirects, the connector's CA), bounded responses, and the identity lookup.

use std::time::Duration;

use crate::model::Secret;

/// Token and identity responses larger than this are refused, not buffered.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{}", crate::upstream::refusal(.0).map_or_else(|| .0.to_string(), |r| r.to_string()))]
    Request(#[from] reqwest::Error),
    #[error("the request could not be built: {0}")]
    Build(#[from] http::Error),
    #[error("the response is larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// One client per operation: OAuth calls are rare (connect, refresh, revoke), and the
/// connector's own CA may differ from every other connector's.
pub fn client(ca_pem: Option<&str>, timeout: Duration) -> Result<reqwest::Client, HttpError> {
    Ok(crate::tls::http_client(ca_pem, timeout)?)
}

/// The oauth2 crate's HTTP client. A named type with a boxed `Send` future, because a closure
/// here makes the gRPC handlers' futures fail the `Send` check (a higher-ranked lifetime).
pub struct Sender(pub reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for Sender {
    type Error = HttpError;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

/// Sends one oauth2-crate request and returns its bounded response.
async fn send(
    client: &reqwest::Client,
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request)?;
    let started = std::time::Instant::now();
    let response = client.execute(request).await;
    crate::metrics::upstream(crate::metrics::Upstream::OAuth, started.elapsed());
    let response = response?;
    let mut builder = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = read_bounded(response).await?;
    Ok(builder.body(body)?)
}

async fn read_bounded(mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(HttpError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What the identity endpoint said, or why it said nothing useful.
pub enum Identity {
    Document(serde_json::Value),
    Refused(u16),
}

/// Asks the provider's identity endpoint who the access token belongs to.
pub async fn identity(
    client: &reqwest::Client,
    url: &str,
    access_token: &Secret,
) -> Result<Identity, HttpError> {
    let started = std::time::Instant::now();
    let response = client
        .get(url)
        .bearer_auth(access_token.expose())
        .header("accept", "application/json")
        .send()
        .await;
    crate::metrics::upstream(crate::metrics::Upstream::OAuth, started.elapsed());
    let response = response?;
    let status = response.status();
    let body = read_bounded(response).await?;
    if !status.is_success() {
        return Ok(Identity::Refused(status.as_u16()));
    }
    Ok(serde_json::from_slice(&body)
        .map(Identity::Document)
        .unwrap_or(Identity::Refused(status.as_u16())))
}
