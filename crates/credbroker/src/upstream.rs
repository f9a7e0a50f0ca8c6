//! Every connection the broker opens to the outside: IMAP, SMTP, CalDAV, OAuth token and
//! identity endpoints, Google's API and API-key test URLs. This module owns
//! - the egress policy (`[egress]`, `policy.rs`): allow and deny rules by CIDR and host pattern
//!   over a built-in deny of loopback, link-local (169.254.169.254 among them), private, shared,
//!   unique-local, unspecified, multicast and reserved addresses;
//! - the upstream connection caps (`[limits] upstream_connections` overall and
//!   `upstream_connections_per_caller`, `caps.rs`), and the caller identity they are charged to
//!   ([`as_caller`], set for every RPC by the handler combinator);
//! - [`connect`] (a checked, capped TCP connection) and [`http`] (the same rules in every
//!   reqwest client).
//!
//! Invariants:
//! - The policy is checked on the *resolved* address of every connection, and the connection is
//!   made to exactly the addresses that passed: a name is resolved once, here, and never again
//!   by the socket layer, so a DNS answer that changes between check and connect (rebinding)
//!   cannot reach a refused address. IPv4-mapped IPv6 addresses are checked as the IPv4 address
//!   they carry.
//! - A cap permit is taken before any socket (DNS included) is opened; with none free the call
//!   is refused at once with [`UpstreamError::Busy`] (RESOURCE_EXHAUSTED), never queued without
//!   bound. IMAP and SMTP-test connections hold their permit for their whole life (it travels
//!   with the socket, [`Conn`]); HTTP connections and pooled SMTP sends hold one while they are
//!   opened or in use.
//! - Errors name the stage (DNS, TCP) and, for a refusal, the address and the rule; they never
//!   carry the operating system's inner cause ("connection refused" versus "timed out"), which
//!   would make the broker a port scanner of the networks it can reach.
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

mod caps;
pub mod http;
mod policy;

use caps::Caps;
pub use caps::Permit;
pub use policy::{EgressConfig, Fallback, Policy};

/// Why an upstream connection was not made. The messages are meant for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {target} refused by egress rule {rule}")]
    Refused { target: String, rule: String },
    #[error(
        "too many upstream connections {scope} (at most {limit}); retry when some have finished"
    )]
    Busy { scope: String, limit: usize },
    #[error("cannot resolve {host:?}; check the server name")]
    Dns { host: String },
    #[error("cannot connect to {target}; check the host and port, and that the server is running")]
    Connect { target: String },
}

/// The egress policy and the caps, as the daemon was configured.
#[derive(Debug)]
pub struct Upstream {
    policy: Policy,
    caps: Arc<Caps>,
}

impl Upstream {
    pub fn new(
        egress: &EgressConfig,
        overall: usize,
        per_caller: usize,
    ) -> Result<Upstream, String> {
        Ok(Upstream {
            policy: Policy::new(egress)?,
            caps: Arc::new(Caps::new(overall, per_caller)),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A permit for the current caller ([`as_caller`]); a call with no caller (a background
    /// task) counts against the overall cap only.
    pub fn permit(&self) -> Result<Permit, UpstreamError> {
        self.caps.take(CALLER.try_with(Clone::clone).ok())
    }
}

/// Defaults of `[limits]`: with the unit's `LimitNOFILE=16384`, upstream sockets take at most
/// a quarter of the descriptors, and one caller at most a quarter of those.
pub const DEFAULT_CONNECTIONS: usize = 4096;
pub const DEFAULT_CONNECTIONS_PER_CALLER: usize = 1024;

static CURRENT: RwLock<Option<Arc<Upstream>>> = RwLock::new(None);

/// Makes `upstream` the one every later connection goes through (at start-up).
pub fn install(upstream: Upstream) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(upstream));
}

/// The installed policy and caps; before [`install`], the built-in deny and default caps.
pub fn current() -> Arc<Upstream> {
    if let Some(u) = CURRENT.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
        return u.clone();
    }
    let mut slot = CURRENT.write().unwrap_or_else(|p| p.into_inner());
    slot.get_or_insert_with(|| {
        Arc::new(
            Upstream::new(
                &EgressConfig::default(),
                DEFAULT_CONNECTIONS,
                DEFAULT_CONNECTIONS_PER_CALLER,
            )
            .expect("the default egress policy is valid"),
        )
    })
    .clone()
}

tokio::task_local! {
    static CALLER: String;
}

/// Runs `fut` with upstream connections charged to `caller`.
pub async fn as_caller<F: Future>(caller: String, fut: F) -> F::Output {
    CALLER.scope(caller, fut).await
}

/// Resolves `host` and keeps the addresses the policy allows (an IP literal is not looked up).
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, UpstreamError> {
    let bare = host.trim_matches(['[', ']']);
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| {
                tracing::debug!(host, error = %e, "upstream name lookup failed");
                UpstreamError::Dns { host: host.into() }
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(UpstreamError::Dns { host: host.into() });
    }
    current().policy.filter(host, addrs)
}

/// A TCP connection to `host:port` that passed the policy, holding its cap permit.
pub async fn connect(host: &str, port: u16) -> Result<Conn, UpstreamError> {
    let permit = current().permit()?;
    let addrs = resolve(host, port).await?;
    open(host, port, &addrs, permit).await
}

/// A TCP connection to the first of `addrs` that answers, holding its cap permit: for a
/// caller that already has the addresses [`resolve`] returned for `host:port` (and only
/// those: they are not checked again).
pub async fn connect_resolved(
    host: &str,
    port: u16,
    addrs: &[SocketAddr],
) -> Result<Conn, UpstreamError> {
    let permit = current().permit()?;
    open(host, port, addrs, permit).await
}

async fn open(
    host: &str,
    port: u16,
    addrs: &[SocketAddr],
    permit: Permit,
) -> Result<Conn, UpstreamError> {
    let stream = TcpStream::connect(addrs).await.map_err(|e| {
        tracing::debug!(host, port, error = %e, "upstream connect failed");
        UpstreamError::Connect {
            target: format!("{host}:{port}"),
        }
    })?;
    let _ = stream.set_nodelay(true);
    Ok(Conn {
        stream,
        _permit: permit,
    })
}

/// An upstream TCP connection and the cap permit it holds.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _permit: Permit,
}

impl Conn {
    /// The address this connection reached.
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.peer_addr()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The egress or cap refusal somewhere in `e`'s chain of causes (a reqwest error carries the
/// one its resolver or connector layer returned).
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<UpstreamError> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(u @ (UpstreamError::Refused { .. } | UpstreamError::Busy { .. })) =
            e.downcast_ref::<UpstreamError>()
        {
            return Some(u.clone());
        }
        next = e.source();
    }
    None
}

#[cfg(test)]
mod tests;
