//! Egress rules: what a sandbox may connect to.
//!
//! Two layers decide a flow:
//! * the operator's [`Guard`]: address ranges no sandbox reaches unless the operator opts in (the
//!   host's own addresses, loopback, private and shared ranges, link-local with the cloud metadata
//!   address, multicast, the control plane, the Azure and Alibaba metadata addresses, and their
//!   IPv6 counterparts), whatever the caller's rules say, minus the ranges the operator trusts
//!   (`--egress-trusted`), plus the ranges the operator always denies (`--egress-deny`, which no
//!   rule or trust overrides);
//! * the caller's [`Rules`], with E2B's meaning: `allowOut` (CIDRs, IPs, domains, `*.domain`) always
//!   wins over `denyOut` (CIDRs and IPs); everything else is allowed; `allowInternetAccess: false`
//!   is `denyOut: ["0.0.0.0/0"]`.
//!
//! A domain in `allowOut` allows a flow only when the name the client sends (TLS SNI or HTTP Host)
//! matches it *and* this sandbox's resolver answered that name with the flow's address, so an
//! address resolved for an allowed name cannot be reused for another one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::secrets::{Piece, parse_template};

/// An IPv4 network: `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: u32,
    prefix: u8,
}

impl Cidr {
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Cidr {
        let bits = addr.to_bits();
        let mask = mask(prefix);
        Cidr {
            addr: bits & mask,
            prefix,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & mask(self.prefix) == self.addr
    }

    /// Parses `a.b.c.d` or `a.b.c.d/n`.
    pub fn parse(s: &str) -> Result<Cidr, RuleError> {
        let bad = || {
            RuleError::new(
                s,
                "not an IPv4 address or CIDR block (like 8.8.8.8 or 10.1.0.0/16)",
            )
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 32),
        };
        if prefix > 32 {
            return Err(bad());
        }
        if ip.contains(':') {
            return Err(RuleError::new(
                s,
                "IPv6 destinations are not supported: sandboxes have IPv4 egress only",
            ));
        }
        let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
        Ok(Cidr::new(ip, prefix))
    }
}

const fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix as u32)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from_bits(self.addr), self.prefix)
    }
}

/// A domain rule: `example.com` (that name only) or `*.example.com` (every name under it, not
/// the apex itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    Exact(String),
    Suffix(String),
}

impl Domain {
    pub fn parse(s: &str) -> Result<Domain, RuleError> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, lower),
        };
        let ok = !name.is_empty()
            && name.len() <= 253
            && name.contains('.')
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !ok {
            return Err(RuleError::new(
                s,
                "not a domain name (like example.com or *.example.com)",
            ));
        }
        Ok(if wild {
            Domain::Suffix(name)
        } else {
            Domain::Exact(name)
        })
    }

    /// `name` in lower case without a trailing dot.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Domain::Exact(d) => name == d,
            Domain::Suffix(d) => {
                name.len() > d.len() + 1
                    && name.ends_with(d.as_str())
                    && name.as_bytes()[name.len() - d.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Exact(d) => f.write_str(d),
            Domain::Suffix(d) => write!(f, "*.{d}"),
        }
    }
}

/// A rule that does not parse, with what to write instead.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("egress rule {rule:?}: {why}")]
pub struct RuleError {
    pub rule: String,
    pub why: String,
}

impl RuleError {
    fn new(rule: &str, why: &str) -> RuleError {
        RuleError {
            rule: rule.to_string(),
            why: why.to_string(),
        }
    }
}

/// The network settings a caller gives at create (and replaces with `PUT /sandboxes/{id}/network`),
/// as E2B names them. Kept verbatim in the sandbox's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkConfig {
    #[serde(default = "yes")]
    pub allow_internet_access: bool,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// E2B's `network.rules`: per-domain transforms of the HTTP(S) requests the sandbox sends
    /// there (headers to set, with `${e2b.secrets.NAME}` placeholders the egress proxy fills in).
    /// Placeholders only: a record of this never holds a secret's value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, Vec<HostRule>>,
}

/// One of a host's rules (E2B's `SandboxNetworkRule`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<Transform>,
}

/// What a rule does to a matching request: headers set (replacing the client's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transform {
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// The default: internet access on, no lists.
impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            allow_internet_access: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            rules: BTreeMap::new(),
        }
    }
}

/// The headers the proxy sets on requests to a host with rules: (name, template), in rule order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTransform {
    pub host: Domain,
    pub headers: Vec<(String, Vec<Piece>)>,
}

/// At most this many hosts with rules, headers per host and bytes per header template.
pub const MAX_RULE_HOSTS: usize = 64;
pub const MAX_RULE_HEADERS: usize = 32;
pub const MAX_HEADER_TEMPLATE: usize = 8 * 1024;

fn valid_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 256
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn transforms(c: &NetworkConfig) -> Result<Vec<HostTransform>, RuleError> {
    if c.rules.len() > MAX_RULE_HOSTS {
        return Err(RuleError::new(
            "rules",
            &format!("at most {MAX_RULE_HOSTS} hosts may have rules"),
        ));
    }
    let mut out = Vec::new();
    for (host, list) in &c.rules {
        let at = |why: &str| RuleError::new(&format!("rules[{host}]"), why);
        let d = host.trim();
        if Cidr::parse(d).is_ok() || d.contains([':', '/']) {
            return Err(at(
                "rules apply to domain names (like api.example.com or *.example.com): the proxy matches them by the TLS SNI or HTTP Host the client sends",
            ));
        }
        let host = Domain::parse(d).map_err(|e| at(&e.why))?;
        let mut headers: Vec<(String, Vec<Piece>)> = Vec::new();
        for rule in list {
            let Some(t) = &rule.transform else { continue };
            for (name, value) in &t.headers {
                if !valid_header_name(name) {
                    return Err(at(&format!("{name:?} is not an HTTP header name")));
                }
                if value.len() > MAX_HEADER_TEMPLATE
                    || value.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
                {
                    return Err(at(&format!(
                        "the value of header {name:?} must be at most {MAX_HEADER_TEMPLATE} bytes with no control characters"
                    )));
                }
                let pieces =
                    parse_template(value).map_err(|e| at(&format!("header {name:?}: {e}")))?;
                let lower = name.to_ascii_lowercase();
                headers.retain(|(n, _)| *n != lower);
                headers.push((lower, pieces));
            }
        }
        if headers.len() > MAX_RULE_HEADERS {
            return Err(at(&format!("at most {MAX_RULE_HEADERS} headers per host")));
        }
        out.push(HostTransform { host, headers });
    }
    // Exact names before wildcards, so the most specific rule wins.
    out.sort_by_key(|t| matches!(t.host, Domain::Suffix(_)));
    Ok(out)
}

/// Parsed caller rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub allow_nets: Vec<Cidr>,
    pub allow_domains: Vec<Domain>,
    pub deny_nets: Vec<Cidr>,
    /// Hosts whose HTTP(S) requests the proxy reads and transforms.
    pub transforms: Vec<HostTransform>,
}

/// At most this many entries per list: rules are checked per connection.
pub const MAX_RULES: usize = 256;

impl Rules {
    pub fn from_config(c: &NetworkConfig) -> Result<Rules, RuleError> {
        if c.allow_out.len() > MAX_RULES || c.deny_out.len() > MAX_RULES {
            return Err(RuleError::new(
                "allowOut/denyOut",
                &format!("at most {MAX_RULES} entries per list"),
            ));
        }
        let mut r = Rules::default();
        for a in &c.allow_out {
            let a = a.trim();
            match Cidr::parse(a) {
                Ok(n) => r.allow_nets.push(n),
                Err(e) if a.contains([':', '/']) => return Err(e),
                Err(_) => r.allow_domains.push(Domain::parse(a)?),
            }
        }
        for d in &c.deny_out {
            let d = d.trim();
            match Cidr::parse(d) {
                Ok(n) => r.deny_nets.push(n),
                Err(e) if Domain::parse(d).is_ok() => {
                    return Err(RuleError::new(
                        &e.rule,
                        "domains are not supported in denyOut (as in E2B): deny all traffic with \"0.0.0.0/0\" and list the domains to allow in allowOut",
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        if !c.allow_internet_access {
            r.deny_nets.push(Cidr::new(Ipv4Addr::UNSPECIFIED, 0));
        }
        r.transforms = transforms(c)?;
        Ok(r)
    }

    /// The transform for requests to `name` (lower case), if a rule covers it.
    pub fn transform_for(&self, name: &str) -> Option<&HostTransform> {
        self.transforms.iter().find(|t| t.host.matches(name))
    }

    /// The secret names the rules refer to, each once.
    pub fn secret_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.transforms {
            for (_, pieces) in &t.headers {
                for p in pieces {
                    if let Piece::Secret(n) = p
                        && !out.contains(n)
                    {
                        out.push(n.clone());
                    }
                }
            }
        }
        out
    }

    fn denies(&self, ip: Ipv4Addr) -> bool {
        self.deny_nets.iter().any(|n| n.contains(ip))
    }

    /// Whether every address is denied unless allowed (then DNS answers only allowed names).
    pub fn denies_everything(&self) -> bool {
        self.deny_nets.iter().any(|n| n.prefix == 0)
    }

    /// Whether the guest may resolve `name` (lower case, no trailing dot): always unless every
    /// address is denied, then only names an allowOut domain covers. With internet access off
    /// and no domain allowed, no query leaves the host.
    pub fn may_resolve(&self, name: &str) -> bool {
        !self.denies_everything() || self.allow_domains.iter().any(|d| d.matches(name))
    }

    /// Whether deciding a flow to `ip` needs the name the client sends.
    pub fn needs_name(&self, ip: Ipv4Addr) -> bool {
        !self.allow_domains.is_empty()
            && self.denies(ip)
            && !self.allow_nets.iter().any(|n| n.contains(ip))
    }
}

/// Why a flow was refused, for logs and counters (the guest only sees the connection reset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// An address range the operator reserves (host, private, metadata...).
    Reserved,
    /// The caller's denyOut (or internet access off), and nothing in allowOut matched.
    Denied,
    /// A domain rule could apply but the client sent no name, or one not bound to the address.
    NameNotAllowed(Option<String>),
}

/// Decides a flow to `ip` given the name the client sent (if it was read) and whether this
/// sandbox's resolver bound that name to `ip`.
pub fn decide(
    guard: &Guard,
    rules: &Rules,
    ip: Ipv4Addr,
    name: Option<&str>,
    bound: impl Fn(&str) -> bool,
) -> Verdict {
    if guard.reserved(ip) {
        return Verdict::Reserved;
    }
    if rules.allow_nets.iter().any(|n| n.contains(ip)) {
        return Verdict::Allow;
    }
    if !rules.denies(ip) {
        return Verdict::Allow;
    }
    if rules.allow_domains.is_empty() {
        return Verdict::Denied;
    }
    match name {
        Some(n) if rules.allow_domains.iter().any(|d| d.matches(n)) && bound(n) => Verdict::Allow,
        other => Verdict::NameNotAllowed(other.map(str::to_string)),
    }
}

/// The operator's reserved ranges, the exceptions they opted into, and the ranges they always
/// deny.
#[derive(Debug, Clone)]
pub struct Guard {
    reserved: Vec<Cidr>,
    reserved6: Vec<Cidr6>,
    trusted: Vec<Cidr>,
    /// `--egress-deny`: refused whatever the sandbox's rules or `trusted` say.
    deny: Vec<Cidr>,
    deny6: Vec<Cidr6>,
}

/// Ranges no sandbox reaches by default (RFC 6890 special-purpose, private and shared space, and
/// the cloud metadata and host-agent addresses that are not link-local).
pub const RESERVED: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    // Alibaba Cloud metadata (inside 100.64/10 already; listed so trusting that range is not
    // enough to reach it by accident)
    (Ipv4Addr::new(100, 100, 100, 200), 32),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    // Azure wireserver (host agent, DHCP, DNS of the VM)
    (Ipv4Addr::new(168, 63, 129, 16), 32),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// Cloud metadata and host-agent addresses: reserved unless trusted one by one (a trusted
/// `169.254.0.0/16` or `100.64.0.0/10` does not open them).
pub const METADATA: &[Ipv4Addr] = &[
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure IMDS, OpenStack...
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
    Ipv4Addr::new(168, 63, 129, 16),   // Azure wireserver
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
];

/// The IPv6 counterparts. Addresses that embed an IPv4 address (v4-mapped `::ffff:0:0/96`,
/// v4-compatible `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are also checked against the
/// IPv4 ranges, so every reserved IPv4 range is reserved in those forms too.
pub const RESERVED_V6: &[(Ipv6Addr, u8)] = &[
    (Ipv6Addr::UNSPECIFIED, 128),
    (Ipv6Addr::LOCALHOST, 128),
    // discard-only
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64),
    // IETF protocol assignments (Teredo, ORCHID, benchmarking...)
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23),
    // documentation
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32),
    // unique local, with AWS's IPv6 metadata address fd00:ec2::254
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    (Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128),
    // link-local, and the deprecated site-local
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
];

impl Guard {
    /// The default reserved ranges plus `host_addrs` (the host's own addresses, so a public
    /// address of the host is not a way to its services), minus `trusted` (operator opt-in).
    pub fn new(host_addrs: &[IpAddr], trusted: Vec<Cidr>) -> Guard {
        let mut reserved: Vec<Cidr> = RESERVED.iter().map(|&(a, p)| Cidr::new(a, p)).collect();
        let mut reserved6: Vec<Cidr6> =
            RESERVED_V6.iter().map(|&(a, p)| Cidr6::new(a, p)).collect();
        for a in host_addrs {
            match *a {
                IpAddr::V4(a) => reserved.push(Cidr::new(a, 32)),
                IpAddr::V6(a) => reserved6.push(Cidr6::new(a, 128)),
            }
        }
        Guard {
            reserved,
            reserved6,
            trusted,
            deny: Vec::new(),
            deny6: Vec::new(),
        }
    }

    /// Adds the operator's `--egress-deny` ranges: refused for every sandbox, whatever its rules
    /// allow and whatever `trusted` says.
    pub fn with_denied(mut self, nets: impl IntoIterator<Item = Net>) -> Guard {
        for n in nets {
            match n {
                Net::V4(c) => self.deny.push(c),
                Net::V6(c) => self.deny6.push(c),
            }
        }
        self
    }

    pub fn reserved(&self, ip: Ipv4Addr) -> bool {
        if self.deny.iter().any(|n| n.contains(ip)) {
            return true;
        }
        // A metadata address is trusted only by name (its /32), never as part of a wider range.
        if METADATA.contains(&ip) {
            return !self
                .trusted
                .iter()
                .any(|n| n.prefix == 32 && n.contains(ip));
        }
        self.reserved.iter().any(|n| n.contains(ip)) && !self.trusted.iter().any(|n| n.contains(ip))
    }

    /// [`Guard::reserved`] for IPv6: the IPv6 ranges, and the IPv4 rules for an address that
    /// embeds an IPv4 one.
    pub fn reserved_v6(&self, ip: Ipv6Addr) -> bool {
        if embedded_v4(ip).is_some_and(|v4| self.reserved(v4)) {
            return true;
        }
        self.deny6.iter().any(|n| n.contains(ip)) || self.reserved6.iter().any(|n| n.contains(ip))
    }

    pub fn reserved_ip(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.reserved(a),
            IpAddr::V6(a) => self.reserved_v6(a),
        }
    }
}

/// The IPv4 address an IPv6 address stands for or tunnels to, if any: v4-mapped, v4-compatible
/// (deprecated, but kernels still route some of them), NAT64 (RFC 6052 well-known prefix) and
/// 6to4.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let b = ip.to_bits();
    let low = Ipv4Addr::from_bits(b as u32);
    match b >> 32 {
        0xffff => Some(low),     // ::ffff:a.b.c.d
        0 if b > 1 => Some(low), // ::a.b.c.d (not :: or ::1)
        _ if b >> 32 == 0x0064_ff9b_0000_0000_0000_0000 => Some(low),
        _ if b >> 112 == 0x2002 => Some(Ipv4Addr::from_bits((b >> 80) as u32)),
        _ => None,
    }
}

/// An IPv6 network: `addr/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr6 {
    addr: u128,
    prefix: u8,
}

impl Cidr6 {
    pub const fn new(addr: Ipv6Addr, prefix: u8) -> Cidr6 {
        Cidr6 {
            addr: addr.to_bits() & mask6(prefix),
            prefix,
        }
    }

    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        ip.to_bits() & mask6(self.prefix) == self.addr
    }
}

const fn mask6(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix as u32)
    }
}

impl fmt::Display for Cidr6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv6Addr::from_bits(self.addr), self.prefix)
    }
}

/// An IPv4 or IPv6 network, as the operator writes it (`--egress-deny`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    V4(Cidr),
    V6(Cidr6),
}

impl Net {
    /// Parses an address or `address/prefix`, IPv4 or IPv6.
    pub fn parse(s: &str) -> Result<Net, RuleError> {
        if !s.contains(':') {
            return Cidr::parse(s).map(Net::V4);
        }
        let bad = || {
            RuleError::new(
                s,
                "not an IPv6 address or CIDR block (like fd00::1 or 2001:db8::/32)",
            )
        };
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse::<u8>().map_err(|_| bad())?),
            None => (s, 128),
        };
        if prefix > 128 {
            return Err(bad());
        }
        let ip: Ipv6Addr = ip.parse().map_err(|_| bad())?;
        Ok(Net::V6(Cidr6::new(ip, prefix)))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Net::V4(c) => c.fmt(f),
            Net::V6(c) => c.fmt(f),
        }
    }
}

/// The host's addresses (every interface, IPv4 and IPv6), for [`Guard::new`]. Read once at start:
/// an address added later is not covered, and a public address the host reaches through NAT is
/// on no interface, so operators list those with `--egress-deny`.
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let Some(s) = a.address.as_ref() else {
                continue;
            };
            if let Some(sin) = s.as_sockaddr_in() {
                out.push(IpAddr::V4(sin.ip()));
            } else if let Some(sin6) = s.as_sockaddr_in6() {
                out.push(IpAddr::V6(sin6.ip()));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn rules(allow: &[&str], deny: &[&str], internet: bool) -> Rules {
        Rules::from_config(&NetworkConfig {
            allow_internet_access: internet,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            ..NetworkConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.255.3")) && !n.contains(ip("10.2.0.1")));
        assert!(Cidr::parse("8.8.8.8").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert_eq!(Cidr::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        for bad in ["10.0.0.0/33", "1.2.3", "x", "::1", "2001:db8::/32", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
        assert!(Cidr::parse("::1").unwrap_err().why.contains("IPv6"));
    }

    #[test]
    fn domains_match_exactly_or_below_a_wildcard() {
        let d = Domain::parse("Example.COM.").unwrap();
        assert!(d.matches("example.com") && !d.matches("a.example.com"));
        let w = Domain::parse("*.example.com").unwrap();
        assert!(w.matches("a.example.com") && w.matches("b.a.example.com"));
        assert!(!w.matches("example.com") && !w.matches("badexample.com"));
        for bad in ["", "*.", "localhost", "a..b", "a b.com", "*.*.x.com"] {
            assert!(Domain::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_wins_over_deny_and_internet_off_denies_all() {
        let g = Guard::new(&[], vec![]);
        let never = |_: &str| false;
        let open = rules(&[], &[], true);
        assert_eq!(
            decide(&g, &open, ip("1.1.1.1"), None, never),
            Verdict::Allow
        );
        let off = rules(&[], &[], false);
        assert_eq!(
            decide(&g, &off, ip("1.1.1.1"), None, never),
            Verdict::Denied
        );
        assert!(!off.may_resolve("example.com"));
        let r = rules(&["1.1.1.1", "8.8.8.0/24"], &["0.0.0.0/0"], true);
        assert_eq!(decide(&g, &r, ip("8.8.8.9"), None, never), Verdict::Allow);
        assert_eq!(decide(&g, &r, ip("9.9.9.9"), None, never), Verdict::Denied);
        let r = rules(&[], &["9.9.9.0/24"], true);
        assert_eq!(decide(&g, &r, ip("9.9.9.9"), None, never), Verdict::Denied);
        assert_eq!(decide(&g, &r, ip("9.9.8.9"), None, never), Verdict::Allow);
    }

    #[test]
    fn domain_rules_need_the_name_and_its_binding() {
        let g = Guard::new(&[], vec![]);
        let r = rules(&["*.example.com"], &[], false);
        assert!(r.may_resolve("api.example.com") && !r.may_resolve("evil.com"));
        assert!(r.needs_name(ip("93.184.216.34")));
        let bound = |n: &str| n == "api.example.com";
        let d = |name| decide(&g, &r, ip("93.184.216.34"), name, bound);
        assert_eq!(d(Some("api.example.com")), Verdict::Allow);
        // the right address under another name (SNI/Host) is refused
        assert_eq!(
            d(Some("www.example.com")),
            Verdict::NameNotAllowed(Some("www.example.com".into()))
        );
        assert_eq!(
            d(Some("evil.com")),
            Verdict::NameNotAllowed(Some("evil.com".into()))
        );
        assert_eq!(d(None), Verdict::NameNotAllowed(None));
    }

    #[test]
    fn reserved_ranges_hold_against_allow_rules_unless_trusted() {
        let r = rules(&["0.0.0.0/0"], &[], true);
        let g = Guard::new(&[ip("203.0.113.7").into()], vec![]);
        for a in [
            "127.0.0.1",
            "169.254.169.254",
            "10.0.2.1",
            "192.168.1.1",
            "203.0.113.7",
        ] {
            assert_eq!(
                decide(&g, &r, ip(a), None, |_| false),
                Verdict::Reserved,
                "{a}"
            );
        }
        let g = Guard::new(&[], vec![Cidr::parse("127.0.0.2/31").unwrap()]);
        assert_eq!(
            decide(&g, &r, ip("127.0.0.3"), None, |_| false),
            Verdict::Allow
        );
        assert_eq!(
            decide(&g, &r, ip("127.0.0.1"), None, |_| false),
            Verdict::Reserved
        );
    }

    #[test]
    fn bad_rules_say_what_to_write() {
        let e = Rules::from_config(&NetworkConfig {
            allow_internet_access: true,
            allow_out: vec![],
            deny_out: vec!["example.com".into()],
            ..NetworkConfig::default()
        })
        .unwrap_err();
        assert!(e.why.contains("not supported in denyOut"), "{e}");
        let e = Rules::from_config(&NetworkConfig {
            allow_internet_access: true,
            allow_out: vec!["not a host".into()],
            deny_out: vec![],
            ..NetworkConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a domain"), "{e}");
    }

    #[test]
    fn cloud_metadata_and_host_agent_addresses_are_reserved() {
        let r = rules(&["0.0.0.0/0", "*.example.com"], &[], true);
        let g = Guard::new(&[], vec![]);
        for a in [
            "168.63.129.16",
            "100.100.100.200",
            "169.254.169.254",
            "169.254.170.2",
        ] {
            assert_eq!(
                decide(&g, &r, ip(a), Some("api.example.com"), |_| true),
                Verdict::Reserved,
                "{a}"
            );
        }
        // trusting the shared range does not open the metadata address inside it
        let g = Guard::new(&[], vec![Cidr::parse("100.64.0.0/10").unwrap()]);
        assert!(!g.reserved(ip("100.100.100.1")));
        assert!(g.reserved(ip("100.100.100.200")));
        assert!(!g.reserved(ip("168.63.129.17")));
        let g = Guard::new(&[], vec![Cidr::parse("100.100.100.200").unwrap()]);
        assert!(!g.reserved(ip("100.100.100.200")));
    }

    fn ip6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_special_ranges_and_v4_forms_of_reserved_ranges_are_reserved() {
        let g = Guard::new(
            &[ip6("2a01:4f8::1234").into(), ip("203.0.113.7").into()],
            vec![],
        );
        for a in [
            "::",
            "::1",
            "fd00:ec2::254",
            "fd12:3456::1",
            "fc00::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
            "2001:db8::1",
            "2001::1",
            "2a01:4f8::1234",
            // v4-mapped, v4-compatible, NAT64 and 6to4 forms of reserved IPv4 addresses
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:168.63.129.16",
            "::ffff:100.100.100.200",
            "::ffff:10.1.2.3",
            "::ffff:203.0.113.7",
            "::10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
        ] {
            assert!(g.reserved_v6(ip6(a)), "{a}");
            assert!(g.reserved_ip(IpAddr::V6(ip6(a))), "{a}");
        }
        for a in [
            "2606:4700::1111",
            "::ffff:1.1.1.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!g.reserved_v6(ip6(a)), "{a}");
        }
        // every IPv4 range, in its v4-mapped form, at both ends
        for &(a, p) in RESERVED {
            let c = Cidr::new(a, p);
            let first = Ipv4Addr::from_bits(c.addr);
            let last = Ipv4Addr::from_bits(c.addr | !mask(p));
            for v4 in [first, last] {
                assert!(g.reserved_v6(v4.to_ipv6_mapped()), "{v4}");
            }
        }
    }

    #[test]
    fn operator_denied_ranges_beat_allow_rules_and_trust() {
        let r = rules(&["0.0.0.0/0", "*.example.com"], &[], true);
        let deny =
            ["93.184.216.0/24", "2606:2800::/32", "198.51.100.9"].map(|s| Net::parse(s).unwrap());
        let g = Guard::new(&[], vec![Cidr::parse("93.184.216.0/24").unwrap()]).with_denied(deny);
        assert_eq!(
            decide(&g, &r, ip("93.184.216.34"), Some("api.example.com"), |_| {
                true
            }),
            Verdict::Reserved
        );
        assert_eq!(
            decide(&g, &r, ip("198.51.100.9"), None, |_| true),
            Verdict::Reserved
        );
        assert_eq!(
            decide(&g, &r, ip("93.184.217.1"), None, |_| true),
            Verdict::Allow
        );
        assert!(g.reserved_v6(ip6("2606:2800::1")));
        assert!(g.reserved_v6(ip6("::ffff:93.184.216.34")));
        assert!(!g.reserved_v6(ip6("2606:2801::1")));
        for bad in ["2001:db8::/129", "fd00::g", "1.2.3.4/33", "example.com"] {
            assert!(Net::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Net::parse("fd00::1/8").unwrap().to_string(), "fd00::/8");
    }
    #[test]
    fn rules_parse_into_host_transforms_and_refuse_what_cannot_work() {
        let mut c = NetworkConfig::default();
        let rule = |h: &str, v: &str| {
            vec![HostRule {
                transform: Some(Transform {
                    headers: [(h.to_string(), v.to_string())].into(),
                }),
            }]
        };
        c.rules.insert("*.example.com".into(), rule("X-A", "1"));
        c.rules.insert(
            "api.example.com".into(),
            rule("Authorization", "Bearer ${e2b.secrets.Key}"),
        );
        let r = Rules::from_config(&c).unwrap();
        // the exact name wins over the wildcard
        let t = r.transform_for("api.example.com").unwrap();
        assert_eq!(t.headers[0].0, "authorization");
        assert_eq!(
            r.transform_for("x.example.com").unwrap().headers[0].0,
            "x-a"
        );
        assert!(r.transform_for("example.org").is_none());
        assert_eq!(r.secret_names(), vec!["key"]);
        for (host, h, v, why) in [
            ("10.0.0.1", "X", "1", "domain names"),
            (
                "a.example.com",
                "Bad Header",
                "1",
                "not an HTTP header name",
            ),
            ("a.example.com", "X", "a\nb", "control characters"),
            (
                "a.example.com",
                "X",
                "${e2b.identity.tokens.aws}",
                "not a secret",
            ),
            ("a.example.com", "X", "${e2b.secrets.x", "no closing"),
        ] {
            let mut c = NetworkConfig::default();
            c.rules.insert(host.into(), rule(h, v));
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.to_string().contains(why), "{host} {h} {v}: {e}");
        }
    }
}
