//! The egress policy: which upstream addresses the broker may connect to. `[egress] deny`,
//! then `allow`, then the built-in deny of internal ranges, then `default`; rules are CIDRs,
//! addresses or host patterns. Invariant: an address is judged in its canonical form (an
//! IPv4-mapped IPv6 address as the IPv4 address it carries), and a refusal names the rule.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use super::UpstreamError;

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
pub(super) struct Cidr {
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
