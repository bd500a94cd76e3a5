//! The resolver's two pure halves: checking a guest's DNS query against the rules, and the table
//! of names the resolver answered per address (what a domain rule checks a flow against).
//!
//! Invariants:
//! * a query is forwarded only if it has exactly one question, of a well-formed name (letters,
//!   digits, `-`, `_`) the rules let the guest resolve; anything else is answered REFUSED (or
//!   dropped, if it does not parse as a query). Real stub resolvers (glibc, musl, Go, Python,
//!   Node, dig) always send one question; RFC 9619 makes that the rule. Checking every question
//!   of a multi-question packet would still leave the upstream to decide which one it answers,
//!   and which answers we bind to which name, so those packets are refused outright;
//! * the packet forwarded upstream is re-encoded from what was checked (header flags, the one
//!   question, EDNS), never the guest's bytes, so the upstream cannot read a different question
//!   than the one we allowed;
//! * the binding table holds at most [`MAX_BINDINGS`] (address, name) pairs and
//!   [`MAX_NAMES_PER_IP`] names per address, each for [`BINDING_LIFETIME`] after its last answer;
//!   when full, expired pairs go first, then the oldest.
//!
//! Called by [`crate::egress`] for every DNS packet and every flow a domain rule decides.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData};

/// (address, name) pairs remembered per sandbox.
pub const MAX_BINDINGS: usize = 4096;
/// Names remembered per address (a CDN address serves many names; the oldest is forgotten and
/// resolves again when needed).
pub const MAX_NAMES_PER_IP: usize = 32;
/// How long an answer lets flows to its addresses use its name.
pub const BINDING_LIFETIME: Duration = Duration::from_secs(3600);
/// A records of one answer that are bound, at most.
pub const MAX_ADDRESSES_PER_ANSWER: usize = 64;

/// What to do with one packet from the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send `packet` upstream; bind the answer's addresses to `name`.
    Forward { name: String, packet: Vec<u8> },
    /// Answer the guest with `answer` (REFUSED); `name` is the question, if there was one.
    Refuse {
        name: Option<String>,
        answer: Vec<u8>,
    },
    /// Not a DNS query: say nothing.
    Drop,
}

/// A question's name, lower case without the trailing dot, if every label is letters, digits,
/// `-` or `_` and the whole is at most 253 characters.
fn clean_name(name: &hickory_proto::rr::Name) -> Option<String> {
    let mut out = String::new();
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    (!out.is_empty() && out.len() <= 253).then_some(out)
}

/// Decides one packet from the guest; `may_resolve` is the sandbox's rule for a clean name.
pub fn check_query(packet: &[u8], may_resolve: impl Fn(&str) -> bool) -> Decision {
    let Ok(msg) = Message::from_vec(packet) else {
        return Decision::Drop;
    };
    if msg.message_type() != MessageType::Query {
        return Decision::Drop;
    }
    let one = match msg.queries() {
        [q] if msg.op_code() == OpCode::Query && q.query_class() == DNSClass::IN => Some(q),
        _ => None,
    };
    let name = one.and_then(|q| clean_name(q.name()));
    let allowed = name.as_deref().is_some_and(&may_resolve);
    let Some(q) = one.filter(|_| allowed) else {
        let mut r = Message::new();
        r.set_id(msg.id())
            .set_message_type(MessageType::Response)
            .set_op_code(msg.op_code())
            .set_recursion_desired(msg.recursion_desired())
            .set_recursion_available(true)
            .set_response_code(ResponseCode::Refused)
            // one question at most: a refusal is never larger than needed (no amplification)
            .add_queries(msg.queries().iter().take(1).cloned());
        return match r.to_vec() {
            Ok(answer) => Decision::Refuse { name, answer },
            Err(_) => Decision::Drop,
        };
    };
    let mut f = Message::new();
    f.set_id(msg.id())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(msg.recursion_desired())
        .set_checking_disabled(msg.checking_disabled())
        .set_authentic_data(msg.authentic_data())
        .add_query(q.clone());
    if let Some(e) = msg.extensions() {
        f.set_edns(e.clone());
    }
    match (name, f.to_vec()) {
        (Some(name), Ok(packet)) => Decision::Forward { name, packet },
        _ => Decision::Drop,
    }
}

/// The IPv4 addresses in an upstream answer's A records (at most
/// [`MAX_ADDRESSES_PER_ANSWER`]); none if it does not parse.
pub fn answer_addresses(answer: &[u8]) -> Vec<Ipv4Addr> {
    let Ok(m) = Message::from_vec(answer) else {
        return Vec::new();
    };
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .take(MAX_ADDRESSES_PER_ANSWER)
        .collect()
}

/// Which names this sandbox's resolver answered with which address, bounded (see the module).
#[derive(Debug)]
pub struct Bindings {
    by_ip: HashMap<Ipv4Addr, Vec<(String, Instant)>>,
    len: usize,
    max: usize,
    per_ip: usize,
    lifetime: Duration,
}

impl Default for Bindings {
    fn default() -> Bindings {
        Bindings::new(MAX_BINDINGS, MAX_NAMES_PER_IP, BINDING_LIFETIME)
    }
}

impl Bindings {
    pub fn new(max: usize, per_ip: usize, lifetime: Duration) -> Bindings {
        Bindings {
            by_ip: HashMap::new(),
            len: 0,
            max: max.max(1),
            per_ip: per_ip.max(1),
            lifetime,
        }
    }

    /// (address, name) pairs held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `name` was answered with `ip` less than the lifetime ago.
    pub fn bound(&self, ip: Ipv4Addr, name: &str, now: Instant) -> bool {
        self.by_ip.get(&ip).is_some_and(|names| {
            names
                .iter()
                .any(|(n, at)| n == name && now.duration_since(*at) < self.lifetime)
        })
    }

    /// Whether some name answered with `ip` less than the lifetime ago satisfies `f`.
    pub fn any_bound(&self, ip: Ipv4Addr, now: Instant, mut f: impl FnMut(&str) -> bool) -> bool {
        self.by_ip.get(&ip).is_some_and(|names| {
            names
                .iter()
                .any(|(n, at)| now.duration_since(*at) < self.lifetime && f(n))
        })
    }

    /// Remembers (or refreshes) that `name` resolved to `ip` at `now`.
    pub fn bind(&mut self, name: &str, ip: Ipv4Addr, now: Instant) {
        if let Some(names) = self.by_ip.get_mut(&ip) {
            if let Some(e) = names.iter_mut().find(|(n, _)| n == name) {
                e.1 = now;
                return;
            }
            if names.len() >= self.per_ip {
                let oldest = oldest(names);
                names.remove(oldest);
                self.len -= 1;
            }
        }
        if self.len >= self.max {
            self.forget_expired(now);
        }
        if self.len >= self.max {
            self.forget_oldest();
        }
        self.by_ip
            .entry(ip)
            .or_default()
            .push((name.to_string(), now));
        self.len += 1;
    }

    fn forget_expired(&mut self, now: Instant) {
        let lifetime = self.lifetime;
        let mut removed = 0;
        self.by_ip.retain(|_, names| {
            let before = names.len();
            names.retain(|(_, at)| now.duration_since(*at) < lifetime);
            removed += before - names.len();
            !names.is_empty()
        });
        self.len -= removed;
    }

    fn forget_oldest(&mut self) {
        let Some((&ip, _)) = self.by_ip.iter().min_by_key(|(_, names)| {
            names
                .iter()
                .map(|(_, at)| *at)
                .min()
                .expect("no empty lists")
        }) else {
            return;
        };
        let names = self.by_ip.get_mut(&ip).expect("just found");
        let i = oldest(names);
        names.remove(i);
        self.len -= 1;
        if names.is_empty() {
            self.by_ip.remove(&ip);
        }
    }
}

fn oldest(names: &[(String, Instant)]) -> usize {
    names
        .iter()
        .enumerate()
        .min_by_key(|(_, (_, at))| *at)
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::{Name, RecordType};

    pub(crate) fn query(names: &[&str]) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x4242)
            .set_message_type(MessageType::Query)
            .set_recursion_desired(true);
        for n in names {
            m.add_query(Query::query(Name::from_ascii(n).unwrap(), RecordType::A));
        }
        m.to_vec().unwrap()
    }

    fn allow_example(n: &str) -> bool {
        n == "example.com" || n.ends_with(".example.com")
    }

    fn rcode(answer: &[u8]) -> ResponseCode {
        Message::from_vec(answer).unwrap().response_code()
    }

    #[test]
    fn one_allowed_question_is_forwarded_as_checked() {
        let Decision::Forward { name, packet } =
            check_query(&query(&["API.Example.com."]), allow_example)
        else {
            panic!("not forwarded");
        };
        assert_eq!(name, "api.example.com");
        let m = Message::from_vec(&packet).unwrap();
        assert_eq!((m.id(), m.queries().len()), (0x4242, 1));
        assert!(m.recursion_desired());
        match check_query(&query(&["evil.com."]), allow_example) {
            Decision::Refuse { name, answer } => {
                assert_eq!(name.as_deref(), Some("evil.com"));
                assert_eq!(rcode(&answer), ResponseCode::Refused);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_packet_with_more_or_fewer_than_one_question_is_refused() {
        // the first question allowed, the second not: the old resolver checked only the first
        // and forwarded both
        for names in [
            &["api.example.com.", "evil.com."][..],
            &["api.example.com.", "www.example.com."],
            &[],
        ] {
            match check_query(&query(names), allow_example) {
                Decision::Refuse { answer, .. } => {
                    assert_eq!(rcode(&answer), ResponseCode::Refused, "{names:?}")
                }
                d => panic!("{names:?}: {d:?}"),
            }
        }
    }

    #[test]
    fn trailing_records_and_odd_names_do_not_reach_the_upstream() {
        // additional records (e.g. a smuggled second query's worth of data) are dropped; EDNS
        // is kept
        let mut m = Message::from_vec(&query(&["a.example.com."])).unwrap();
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.add_additional(hickory_proto::rr::Record::from_rdata(
            Name::from_ascii("evil.com.").unwrap(),
            60,
            RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(1, 2, 3, 4))),
        ));
        let mut bytes = m.to_vec().unwrap();
        bytes.extend_from_slice(b"trailing garbage");
        let Decision::Forward { packet, .. } = check_query(&bytes, allow_example) else {
            panic!("not forwarded");
        };
        let f = Message::from_vec(&packet).unwrap();
        assert!(f.additionals().is_empty() && f.answers().is_empty());
        assert_eq!(f.max_payload(), 1232);
        // a label holding a dot or a NUL is no name we check
        let odd = Name::from_labels(vec![
            b"evil.com\0".to_vec(),
            b"example".to_vec(),
            b"com".to_vec(),
        ])
        .unwrap();
        let mut m = Message::new();
        m.set_id(1).add_query(Query::query(odd, RecordType::A));
        assert!(matches!(
            check_query(&m.to_vec().unwrap(), |_| true),
            Decision::Refuse { name: None, .. }
        ));
        assert_eq!(check_query(b"\x00\x01", |_| true), Decision::Drop);
        // a response is never relayed
        let mut r = Message::from_vec(&query(&["a.example.com."])).unwrap();
        r.set_message_type(MessageType::Response);
        assert_eq!(check_query(&r.to_vec().unwrap(), |_| true), Decision::Drop);
    }

    #[test]
    fn names_per_address_are_capped_oldest_first() {
        let t0 = Instant::now();
        let ip = Ipv4Addr::new(93, 184, 216, 34);
        let mut b = Bindings::new(1000, 4, BINDING_LIFETIME);
        for i in 0..100 {
            b.bind(
                &format!("n{i}.example.com"),
                ip,
                t0 + Duration::from_millis(i),
            );
        }
        assert_eq!(b.len(), 4);
        let later = t0 + Duration::from_secs(1);
        assert!(b.bound(ip, "n99.example.com", later));
        assert!(b.bound(ip, "n96.example.com", later));
        assert!(!b.bound(ip, "n95.example.com", later));
        assert!(!b.bound(ip, "n0.example.com", later));
        // refreshing a name keeps it
        b.bind("n96.example.com", ip, t0 + Duration::from_millis(200));
        b.bind("new.example.com", ip, t0 + Duration::from_millis(201));
        assert!(b.bound(ip, "n96.example.com", later));
        assert!(!b.bound(ip, "n97.example.com", later));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_expired_then_oldest() {
        let t0 = Instant::now();
        let life = Duration::from_secs(60);
        let mut b = Bindings::new(64, 4, life);
        // a flood of distinct addresses and names
        for i in 0..10_000u32 {
            b.bind(
                &format!("n{i}.example.com"),
                Ipv4Addr::from_bits(0x5db8_0000 + i),
                t0,
            );
            assert!(b.len() <= 64);
        }
        // every earlier pair expires; a new one evicts expired ones, not fresh ones
        let t1 = t0 + life;
        b.bind("fresh.example.com", Ipv4Addr::new(1, 1, 1, 1), t1);
        assert_eq!(b.len(), 1);
        assert!(b.bound(Ipv4Addr::new(1, 1, 1, 1), "fresh.example.com", t1));
        assert!(!b.bound(
            Ipv4Addr::from_bits(0x5db8_0000 + 9_999),
            "n9999.example.com",
            t1
        ));
        for i in 0..100u32 {
            b.bind(
                &format!("m{i}"),
                Ipv4Addr::from_bits(i),
                t1 + Duration::from_millis(i as u64 + 1),
            );
        }
        assert_eq!(b.len(), 64);
        // the oldest went first
        assert!(!b.bound(Ipv4Addr::new(1, 1, 1, 1), "fresh.example.com", t1));
        assert!(b.bound(Ipv4Addr::from_bits(99), "m99", t1 + Duration::from_secs(1)));
    }

    #[test]
    fn answers_bind_a_records_only_and_at_most_a_bounded_number() {
        let mut m = Message::from_vec(&query(&["a.example.com."])).unwrap();
        m.set_message_type(MessageType::Response);
        for i in 0..200u32 {
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                Name::from_ascii("a.example.com.").unwrap(),
                60,
                RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::from_bits(
                    0x0808_0000 + i,
                ))),
            ));
        }
        let ips = answer_addresses(&m.to_vec().unwrap());
        assert_eq!(ips.len(), MAX_ADDRESSES_PER_ANSWER);
        assert!(answer_addresses(b"junk").is_empty());
    }
}
