//! Every connection the broker opens to the outside: IMAP, SMTP, CalDAV, OAuth token and
//! identity endpoints, Google's API and API-key test URLs. This module owns
//! - the egress policy (`[egress]`): allow and deny rules by CIDR and host pattern over a
//!   built-in deny of loopback, link-local (169.254.169.254 among them), private, shared,
//!   unique-local, unspecified, multicast and reserved addresses;
//! - the upstream connection caps (`[limits] upstream_connections` overall and
//!   `upstream_connections_per_caller`), and the caller identity they are charged to;
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub mod http;

/// `[egress]`: which upstream destinations the broker may connect to.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Reachable even inside the built-in deny: CIDRs (`10.1.0.0/16`, `::1/128`), addresses
    /// or host patterns (`mail.corp.example`, `*.corp.example`).
    pub allow: Vec<String>,
    /// Never reachable, whatever `allow` says.
    pub deny: Vec<String>,
    /// What is neither listed nor in the built-in deny: allowed unless `deny`.
    pub default: Fallback,
}

/// `[egress] default`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    #[default]
    Allow,
    Deny,
}

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

/// The built-in deny, checked after `[egress] deny` and `allow`.
const BUILT_IN: &[(&str, &str)] = &[
    ("0.0.0.0/8", "unspecified"),
    ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared address space"),
    ("169.254.0.0/16", "link-local"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible"),
    ("64:ff9b::/96", "NAT64"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an address or CIDR"))?;
        let bits = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: the prefix must be 0-{bits}"))?,
        };
        Ok(Cidr {
            net: canonical(net),
            prefix,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(n.to_bits(), a.to_bits(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let shift = 128 - u32::from(self.prefix);
                self.prefix == 0 || n.to_bits() >> shift == a.to_bits() >> shift
            }
            _ => false,
        }
    }
}

fn same_prefix(n: u32, a: u32, prefix: u8) -> bool {
    prefix == 0 || n >> (32 - u32::from(prefix)) == a >> (32 - u32::from(prefix))
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One rule of `[egress]` or of the built-in deny.
#[derive(Debug, Clone)]
enum Pattern {
    Net(Cidr),
    /// A lowercase host name; with `subdomains`, any name below it (`*.example.com`).
    Host {
        name: String,
        subdomains: bool,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    pattern: Pattern,
    /// How the refusal names it: `deny 10.0.0.0/8`, `built-in deny 127.0.0.0/8 (loopback)`.
    shown: String,
}

impl Rule {
    fn parse(list: &str, text: &str) -> Result<Rule, String> {
        let t = text.trim();
        let pattern = if t.parse::<IpAddr>().is_ok() || t.contains('/') {
            Pattern::Net(Cidr::parse(t).map_err(|e| format!("[egress] {list}: {e}"))?)
        } else {
            let (name, subdomains) = match t.strip_prefix("*.") {
                Some(rest) => (rest, true),
                None => (t, false),
            };
            let name = host_key(name);
            let valid = !name.is_empty()
                && name.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                });
            if !valid {
                return Err(format!(
                    "[egress] {list}: {text:?} is not a CIDR, an address or a host pattern (host, *.domain)"
                ));
            }
            Pattern::Host { name, subdomains }
        };
        Ok(Rule {
            pattern,
            shown: format!("{list} {t}"),
        })
    }

    fn matches(&self, host: &str, ip: IpAddr) -> bool {
        match &self.pattern {
            Pattern::Net(net) => net.contains(ip),
            Pattern::Host { name, subdomains } => {
                let host = host_key(host);
                match subdomains {
                    false => host == *name,
                    true => host
                        .strip_suffix(name.as_str())
                        .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                }
            }
        }
    }
}

fn host_key(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// The egress policy: `deny`, then `allow`, then the built-in deny, then `default`.
#[derive(Debug, Clone)]
pub struct Policy {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
    built_in: Vec<Rule>,
    default: Fallback,
}

impl Policy {
    pub fn new(config: &EgressConfig) -> Result<Policy, String> {
        let rules = |list: &str, texts: &[String]| -> Result<Vec<Rule>, String> {
            texts.iter().map(|t| Rule::parse(list, t)).collect()
        };
        let built_in = BUILT_IN
            .iter()
            .map(|(cidr, what)| Rule {
                pattern: Pattern::Net(Cidr::parse(cidr).expect("built-in CIDR")),
                shown: format!("built-in deny {cidr} ({what})"),
            })
            .collect();
        Ok(Policy {
            deny: rules("deny", &config.deny)?,
            allow: rules("allow", &config.allow)?,
            built_in,
            default: config.default,
        })
    }

    /// `Err(rule)` when `host` at `ip` may not be reached, naming the rule that refuses it.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), String> {
        let ip = canonical(ip);
        if let Some(rule) = self.deny.iter().find(|r| r.matches(host, ip)) {
            return Err(rule.shown.clone());
        }
        if self.allow.iter().any(|r| r.matches(host, ip)) {
            return Ok(());
        }
        if let Some(rule) = self.built_in.iter().find(|r| r.matches(host, ip)) {
            return Err(rule.shown.clone());
        }
        match self.default {
            Fallback::Allow => Ok(()),
            Fallback::Deny => Err("default deny ([egress] default = \"deny\")".into()),
        }
    }

    /// The addresses of `addrs` that `host` may be reached at, or the refusal of the first.
    pub fn filter(
        &self,
        host: &str,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<Vec<SocketAddr>, UpstreamError> {
        let mut refused = None;
        let mut allowed = Vec::new();
        for addr in addrs {
            match self.check(host, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(rule) if refused.is_none() => refused = Some((addr, rule)),
                Err(_) => {}
            }
        }
        match (allowed.is_empty(), refused) {
            (true, Some((addr, rule))) => Err(UpstreamError::Refused {
                target: target(host, addr),
                rule,
            }),
            _ => Ok(allowed),
        }
    }
}

/// How a refusal names a destination: the address, and the name it was reached by.
fn target(host: &str, addr: SocketAddr) -> String {
    let shown = match addr.port() {
        0 => addr.ip().to_string(),
        _ => addr.to_string(),
    };
    let literal = host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
    match literal {
        true => shown,
        false => format!("{host} ({shown})"),
    }
}

/// The upstream connection caps.
#[derive(Debug)]
struct Caps {
    overall: Arc<Semaphore>,
    overall_max: usize,
    per_caller_max: usize,
    per_caller: Mutex<HashMap<String, usize>>,
}

/// The right to hold one upstream connection; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    _overall: OwnedSemaphorePermit,
    caller: Option<(Arc<Caps>, String)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((caps, caller)) = &self.caller {
            let mut map = caps.per_caller.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(caller) {
                *n -= 1;
                if *n == 0 {
                    map.remove(caller);
                }
            }
        }
    }
}

impl Caps {
    fn new(overall: usize, per_caller: usize) -> Caps {
        let overall = overall.max(1);
        Caps {
            overall: Arc::new(Semaphore::new(overall)),
            overall_max: overall,
            per_caller_max: per_caller.max(1),
            per_caller: Mutex::default(),
        }
    }

    fn take(self: &Arc<Self>, caller: Option<String>) -> Result<Permit, UpstreamError> {
        let overall =
            self.overall
                .clone()
                .try_acquire_owned()
                .map_err(|_| UpstreamError::Busy {
                    scope: "for the whole broker".into(),
                    limit: self.overall_max,
                })?;
        let caller = match caller {
            None => None,
            Some(id) => {
                let mut map = self.per_caller.lock().unwrap_or_else(|p| p.into_inner());
                let n = map.entry(id.clone()).or_default();
                if *n >= self.per_caller_max {
                    return Err(UpstreamError::Busy {
                        scope: format!("for caller {id}"),
                        limit: self.per_caller_max,
                    });
                }
                *n += 1;
                Some((self.clone(), id))
            }
        };
        Ok(Permit {
            _overall: overall,
            caller,
        })
    }
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
pub async fn as_caller<F: Future>(caller: &str, fut: F) -> F::Output {
    CALLER.scope(caller.to_string(), fut).await
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
    let stream = TcpStream::connect(addrs.as_slice()).await.map_err(|e| {
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

/// Loopback addresses, for tests that run their servers there.
pub fn loopback_allowed() -> EgressConfig {
    EgressConfig {
        allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
        ..EgressConfig::default()
    }
}

#[cfg(test)]
mod tests;
