//! Egress rules: what a sandbox may connect to.
//!
//! Two layers decide a flow:
//! * the operator's [`Guard`]: address ranges no sandbox reaches unless the operator opts in (the
//!   host's own addresses, loopback, private and shared ranges, link-local with the cloud metadata
//!   address, multicast, the control plane), whatever the caller's rules say;
//! * the caller's [`Rules`], with E2B's meaning: `allowOut` (CIDRs, IPs, domains, `*.domain`) always
//!   wins over `denyOut` (CIDRs and IPs); everything else is allowed; `allowInternetAccess: false`
//!   is `denyOut: ["0.0.0.0/0"]`.
//!
//! A domain in `allowOut` allows a flow only when the name the client sends (TLS SNI or HTTP Host)
//! matches it *and* this sandbox's resolver answered that name with the flow's address, so an
//! address resolved for an allowed name cannot be reused for another one.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

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
        }
    }
}

/// Parsed caller rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub allow_nets: Vec<Cidr>,
    pub allow_domains: Vec<Domain>,
    pub deny_nets: Vec<Cidr>,
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
        Ok(r)
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

/// The operator's reserved ranges and the exceptions they opted into.
#[derive(Debug, Clone)]
pub struct Guard {
    reserved: Vec<Cidr>,
    trusted: Vec<Cidr>,
}

/// Ranges no sandbox reaches by default (RFC 6890 special-purpose, private and shared space).
pub const RESERVED: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

impl Guard {
    /// The default reserved ranges plus `host_addrs` (the host's own addresses, so a public
    /// address of the host is not a way to its services), minus `trusted` (operator opt-in).
    pub fn new(host_addrs: &[Ipv4Addr], trusted: Vec<Cidr>) -> Guard {
        let mut reserved: Vec<Cidr> = RESERVED.iter().map(|&(a, p)| Cidr::new(a, p)).collect();
        reserved.extend(host_addrs.iter().map(|&a| Cidr::new(a, 32)));
        Guard { reserved, trusted }
    }

    pub fn reserved(&self, ip: Ipv4Addr) -> bool {
        self.reserved.iter().any(|n| n.contains(ip)) && !self.trusted.iter().any(|n| n.contains(ip))
    }
}

/// The host's IPv4 addresses (every interface), for [`Guard::new`].
pub fn host_addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
                out.push(sin.ip());
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
        let g = Guard::new(&[ip("203.0.113.7")], vec![]);
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
        })
        .unwrap_err();
        assert!(e.why.contains("not supported in denyOut"), "{e}");
        let e = Rules::from_config(&NetworkConfig {
            allow_internet_access: true,
            allow_out: vec!["not a host".into()],
            deny_out: vec![],
        })
        .unwrap_err();
        assert!(e.to_string().contains("not a domain"), "{e}");
    }
}
