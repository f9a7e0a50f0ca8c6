//! The egress policy and the caps in every reqwest client ([`guard`]): names are resolved by
//! [`PolicyResolver`], which returns only allowed addresses (hyper then connects to exactly
//! those); an IP-literal URL, which hyper connects to without asking a resolver, is checked by
//! the [`Guard`] connector layer, which also takes the cap permit before the socket is opened
//! and holds it until the connection is established. Proxies from the environment are off: a
//! proxy would resolve and reach the destination on the broker's behalf, unchecked.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{UpstreamError, current, resolve};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `builder` with the egress policy and caps applied to every connection it makes.
pub fn guard(builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
    builder
        .no_proxy()
        .dns_resolver(Arc::new(PolicyResolver))
        .connector_layer(Guard)
}

/// Resolves a name and keeps only the addresses the policy allows.
pub struct PolicyResolver;

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = resolve(&host, 0)
                .await
                .map_err(|e| Box::new(e) as BoxError)?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The connector layer: an IP literal checked, a permit held while connecting.
#[derive(Clone)]
pub struct Guard;

impl<S> tower::Layer<S> for Guard {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { inner }
    }
}

#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
}

impl<S, R> tower::Service<R> for Guarded<S>
where
    S: tower::Service<R, Error = BoxError>,
    S::Future: Send + 'static,
    R: std::fmt::Debug,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let admitted = admit(&format!("{request:?}"));
        let connecting = self.inner.call(request);
        Box::pin(async move {
            let _permit = admitted.map_err(|e| Box::new(e) as BoxError)?;
            connecting.await
        })
    }
}

/// The checks made before a connection to `shown` (reqwest's destination, printed
/// `Unnameable(https://host:port/)`) is opened. A destination that cannot be read is refused.
fn admit(shown: &str) -> Result<super::Permit, UpstreamError> {
    let upstream = current();
    let permit = upstream.permit()?;
    let uri = destination(shown).ok_or_else(|| UpstreamError::Refused {
        target: "(unreadable destination)".into(),
        rule: "the broker cannot tell where this request goes".into(),
    })?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
    if let Ok(ip) = host.parse::<IpAddr>() {
        let port = uri
            .port_u16()
            .unwrap_or(if uri.scheme_str() == Some("http") {
                80
            } else {
                443
            });
        upstream
            .policy()
            .filter(host, [SocketAddr::new(ip, port)])?;
    }
    Ok(permit)
}

/// The URI inside reqwest's printed destination.
fn destination(shown: &str) -> Option<http::Uri> {
    let inner = shown.strip_prefix("Unnameable(")?.strip_suffix(')')?;
    let uri: http::Uri = inner.parse().ok()?;
    uri.host()?;
    Some(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_destination_reqwest_prints() {
        let uri = destination("Unnameable(https://[::1]:8443/)").unwrap();
        assert_eq!(uri.host(), Some("[::1]"));
        assert_eq!(uri.port_u16(), Some(8443));
        assert!(destination("Unnameable(/relative)").is_none());
        assert!(destination("Something(https://a/)").is_none());
    }
}
