//! Property-based fuzzing of the parsers that read a guest's bytes on the host: the egress
//! sniffer (TLS ClientHello SNI, HTTP Host), the resolver's DNS query check and answer reader,
//! the binding table, and the rule parsers. Cases: PROPTEST_CASES (256 unless set;
//! scripts/fuzz.sh runs 100,000). No root needed.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use alcove_net::dns::{self, Bindings, Decision};
use alcove_net::policy::{Domain, Net};
use alcove_net::sniff::{MAX_SNIFF, Sniff, sniff};
use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use proptest::prelude::*;

fn clean(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
}

/// A hostname: 1-4 labels of letters, digits and `-`.
fn hostname() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z0-9][a-zA-Z0-9-]{0,20}", 1..5).prop_map(|l| l.join("."))
}

/// A TLS 1.2/1.3 ClientHello record carrying `sni`, with `before` unrelated extensions first.
fn client_hello(sni: &str, before: &[(u16, Vec<u8>)], session: &[u8]) -> Vec<u8> {
    let mut ext = Vec::new();
    for (ty, body) in before {
        ext.extend(ty.to_be_bytes());
        ext.extend((body.len() as u16).to_be_bytes());
        ext.extend(body);
    }
    let mut list = vec![0u8];
    list.extend((sni.len() as u16).to_be_bytes());
    list.extend(sni.as_bytes());
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend(list);
    ext.extend(0u16.to_be_bytes());
    ext.extend((body.len() as u16).to_be_bytes());
    ext.extend(body);
    let mut hello = vec![0x03, 0x03];
    hello.extend([7u8; 32]);
    hello.push(session.len() as u8);
    hello.extend(session);
    hello.extend([0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    hello.extend((ext.len() as u16).to_be_bytes());
    hello.extend(ext);
    let mut hs = vec![1u8];
    hs.extend(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend(hello);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

fn query(names: &[String], id: u16, ty: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true);
    for n in names {
        m.add_query(Query::query(Name::from_ascii(n).unwrap(), ty));
    }
    m.to_vec().unwrap()
}

proptest! {
    #[test]
    fn sniff_never_panics_and_names_are_clean(bytes in prop::collection::vec(any::<u8>(), 0..MAX_SNIFF + 64)) {
        if let Sniff::Name(n) = sniff(&bytes) {
            prop_assert!(clean(&n), "{n:?}");
        }
    }

    #[test]
    fn sniff_of_tls_shaped_bytes_never_panics(
        len in any::<u16>(),
        tail in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        // a record header that passes the first checks, then garbage
        let mut b = vec![0x16, 0x03, 0x01];
        b.extend(len.to_be_bytes());
        b.extend(tail);
        if let Sniff::Name(n) = sniff(&b) {
            prop_assert!(clean(&n), "{n:?}");
        }
    }

    #[test]
    fn a_client_hello_gives_its_sni_and_any_prefix_needs_more(
        name in hostname(),
        before in prop::collection::vec((1u16..0xff00, prop::collection::vec(any::<u8>(), 0..64)), 0..6),
        session in prop::collection::vec(any::<u8>(), 0..32),
        cut in any::<prop::sample::Index>(),
    ) {
        let rec = client_hello(&name, &before, &session);
        prop_assert_eq!(sniff(&rec), Sniff::Name(name.to_ascii_lowercase()));
        let cut = cut.index(rec.len());
        prop_assert_eq!(sniff(&rec[..cut]), Sniff::NeedMore);
    }

    #[test]
    fn an_http_request_gives_its_host(
        name in hostname(),
        port in prop::option::of(any::<u16>()),
        method in "(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT)",
        headers in prop::collection::vec(("X-[a-z]{1,10}", "[ -~&&[^:]]{0,40}"), 0..5),
    ) {
        let mut req = format!("{method} / HTTP/1.1\r\n");
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        match port {
            Some(p) => req.push_str(&format!("Host: {name}:{p}\r\n\r\n")),
            None => req.push_str(&format!("host:{name}\r\n\r\n")),
        }
        prop_assert_eq!(sniff(req.as_bytes()), Sniff::Name(name.to_ascii_lowercase()));
    }

    #[test]
    fn the_dns_check_never_panics_and_answers_are_bounded(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        match dns::check_query(&bytes, |_| true) {
            Decision::Forward { name, packet } => {
                prop_assert!(clean(&name));
                prop_assert!(packet.len() <= 4096);
                let m = Message::from_vec(&packet).unwrap();
                prop_assert_eq!(m.queries().len(), 1);
            }
            Decision::Refuse { answer, .. } => {
                let m = Message::from_vec(&answer).unwrap();
                prop_assert_eq!(m.response_code(), ResponseCode::Refused);
                prop_assert!(answer.len() <= bytes.len() + 512);
            }
            Decision::Drop => {}
        }
        prop_assert!(dns::answer_addresses(&bytes).len() <= dns::MAX_ADDRESSES_PER_ANSWER);
    }

    #[test]
    fn only_one_allowed_question_is_forwarded(
        names in prop::collection::vec(hostname(), 0..4),
        id in any::<u16>(),
        ty in prop::sample::select(vec![RecordType::A, RecordType::AAAA, RecordType::TXT, RecordType::ANY]),
        allowed_suffix in "[a-z]{1,3}",
    ) {
        let allow = |n: &str| n.ends_with(allowed_suffix.as_str());
        let lower: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        match dns::check_query(&query(&names, id, ty), allow) {
            Decision::Forward { name, packet } => {
                prop_assert_eq!(lower.len(), 1);
                prop_assert!(allow(&name));
                prop_assert_eq!(&name, &lower[0]);
                let m = Message::from_vec(&packet).unwrap();
                prop_assert_eq!(m.id(), id);
                prop_assert_eq!(m.queries()[0].query_type(), ty);
            }
            Decision::Refuse { answer, .. } => {
                prop_assert!(lower.len() != 1 || !allow(&lower[0]));
                prop_assert_eq!(Message::from_vec(&answer).unwrap().id(), id);
            }
            Decision::Drop => prop_assert!(false, "a well-formed query was dropped"),
        }
    }

    #[test]
    fn the_binding_table_stays_bounded(
        ops in prop::collection::vec((0u32..64, 0u32..64, 0u64..200), 1..2000),
        max in 1usize..128,
        per_ip in 1usize..8,
    ) {
        let t0 = Instant::now();
        let mut b = Bindings::new(max, per_ip, Duration::from_secs(100));
        let mut clock = 0u64;
        for (ip, name, dt) in ops {
            clock += dt;
            let now = t0 + Duration::from_secs(clock);
            let (ip, name) = (Ipv4Addr::from_bits(ip), format!("n{name}.test"));
            b.bind(&name, ip, now);
            prop_assert!(b.len() <= max);
            prop_assert!(b.bound(ip, &name, now), "the newest binding is kept");
        }
    }

    #[test]
    fn rule_parsers_never_panic(s in "\\PC{0,80}") {
        let _ = Domain::parse(&s);
        if let Ok(n) = Net::parse(&s) {
            prop_assert_eq!(Net::parse(&n.to_string()).unwrap(), n);
        }
    }

    #[test]
    fn nets_round_trip(v4 in any::<u32>(), p4 in 0u8..=32, v6 in any::<u128>(), p6 in 0u8..=128) {
        for s in [
            format!("{}/{p4}", Ipv4Addr::from_bits(v4)),
            format!("{}/{p6}", std::net::Ipv6Addr::from_bits(v6)),
        ] {
            let n = Net::parse(&s).unwrap();
            prop_assert_eq!(Net::parse(&n.to_string()).unwrap(), n);
        }
    }
}
