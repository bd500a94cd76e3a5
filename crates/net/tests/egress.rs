//! The egress proxy and resolver in real network namespaces, without a VM: a "guest" namespace
//! stands in for the microVM, joined to the sandbox's namespace by a veth named like the tap, and
//! runs Python clients. The "internet" is the test's own DNS zone and servers on 198.51.100.2 and
//! 198.51.100.3 (TEST-NET-2 addresses on a veth interface of the host, which the operator guard
//! trusts here), never an outside address; 198.51.100.1 on the same interface stands for a host
//! service. Needs root, iproute2 and nftables (scripts/setup-host.sh), so the tests are `#[ignore]`d
//! for a plain `cargo test`; `scripts/test.sh` runs them with `--include-ignored`.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use alcove_net::egress::EgressConfig;
use alcove_net::{Cidr, Guard, Netns, NetworkConfig, SandboxNet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A DNS zone: a.test -> 198.51.100.2, b.test -> 198.51.100.3, c.a.test -> 198.51.100.2; else NXDOMAIN.
async fn fake_dns() -> SocketAddr {
    use hickory_proto::op::{Message, MessageType, ResponseCode};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let sock = tokio::net::UdpSocket::bind("198.51.100.2:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .add_queries(q.queries().to_vec());
            let qn = q.queries()[0].name().clone();
            let ip = match qn.to_ascii().trim_end_matches('.') {
                "a.test" | "c.a.test" => Some(Ipv4Addr::new(198, 51, 100, 2)),
                "b.test" => Some(Ipv4Addr::new(198, 51, 100, 3)),
                _ => None,
            };
            match ip {
                Some(ip) if q.queries()[0].query_type() == hickory_proto::rr::RecordType::A => {
                    r.add_answer(Record::from_rdata(qn, 60, RData::A(A(ip))));
                }
                Some(_) => {}
                None => {
                    r.set_response_code(ResponseCode::NXDomain);
                }
            }
            sock.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        }
    });
    addr
}

/// A server on `ip:port` that answers every connection with `hello <tag>` after reading what
/// the client sends first (an HTTP request or a TLS ClientHello), and keeps the connection open
/// while the client does.
async fn fake_server(ip: &str, port: u16, tag: &'static str) {
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
                let body = format!("hello {tag}");
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                // hold until the client closes
                while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            });
        }
    });
}

/// The guest side: a Python client in the guest namespace. Prints one line per check.
const CLIENT: &str = r#"
import socket, ssl, sys, time
def resolve(name):
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        return "ERR"
def rawdns(names):
    # one packet with every name as a question (real stub resolvers send one)
    import struct
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, len(names), 0, 0, 0)
    for n in names:
        for l in n.split("."):
            q += bytes([len(l)]) + l.encode()
        q += b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, ("192.0.2.53", 53))
    try:
        r = s.recv(4096)
    except OSError:
        return "TIMEOUT"
    return "rcode=%d answers=%d" % (r[3] & 15, struct.unpack(">H", r[6:8])[0])
def get(ip, port, host, tls=False):
    try:
        s = socket.create_connection((ip, port), timeout=5)
        if tls:
            ctx = ssl.create_default_context()
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            o = ctx.wrap_bio(inc, out, server_hostname=host)
            try:
                o.do_handshake()
            except ssl.SSLWantReadError:
                pass
            s.sendall(out.read())
        else:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        data = s.recv(4096)
        s.close()
        return data.decode(errors="replace").split("\r\n\r\n")[-1] or "EMPTY"
    except OSError as e:
        return "REFUSED"
for arg in sys.argv[1:]:
    kind, rest = arg.split(":", 1)
    if kind == "dns":
        print(resolve(rest), flush=True)
    elif kind == "rawdns":
        print(rawdns(rest.split("+")), flush=True)
    elif kind == "hold":
        ip, port = rest.split(",")
        s = socket.create_connection((ip, int(port)), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        s.recv(4096)
        print("HELD", flush=True)
        sys.stdin.readline()
        s.settimeout(5)
        try:
            print("CLOSED" if s.recv(1) == b"" else "OPEN", flush=True)
        except OSError:
            print("CLOSED", flush=True)
    else:
        ip, port, host = rest.split(",")
        print(get(ip, int(port), host, tls=(kind == "tls")), flush=True)
"#;

struct Guest {
    name: String,
}

impl Guest {
    /// A guest namespace wired to `ns` through a veth whose sandbox end replaces the tap.
    fn wire(ns: &Netns) -> Guest {
        let name = format!("alcove-test-{}-{}", std::process::id(), rand_suffix());
        sh(Command::new("ip").args(["netns", "add", &name]));
        sh(ns.command("ip").args(["link", "del", "tap0"]));
        sh(ns.command("ip").args([
            "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]));
        sh(ns
            .command("ip")
            .args(["addr", "add", "10.0.2.1/30", "dev", "tap0"]));
        sh(ns.command("ip").args(["link", "set", "tap0", "up"]));
        for c in [
            "ip link set lo up",
            "ip addr add 10.0.2.2/30 dev eth0",
            "ip link set eth0 up",
            "ip route add default via 10.0.2.1",
        ] {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &name]);
            cmd.args(c.split(' '));
            sh(&mut cmd);
        }
        let etc = format!("/etc/netns/{name}");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(format!("{etc}/resolv.conf"), "nameserver 10.0.2.1\n").unwrap();
        Guest { name }
    }

    fn run(&self, checks: &[&str]) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", CLIENT])
            .args(checks)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "guest client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
    }
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

fn sh(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config(internet: bool, allow: &[&str], deny: &[&str]) -> NetworkConfig {
    NetworkConfig {
        allow_internet_access: internet,
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
        ..NetworkConfig::default()
    }
}

/// The veth interface with the test internet's addresses (idempotent; shared by the tests).
fn test_internet() {
    let _ = Command::new("ip")
        .args([
            "link",
            "add",
            "alcove-inet",
            "type",
            "veth",
            "peer",
            "name",
            "alcove-inet1",
        ])
        .output();
    for a in ["198.51.100.1/32", "198.51.100.2/32", "198.51.100.3/32"] {
        let _ = Command::new("ip")
            .args(["addr", "add", a, "dev", "alcove-inet"])
            .output();
    }
    sh(Command::new("ip").args(["link", "set", "alcove-inet", "up"]));
    sh(Command::new("ip").args(["link", "set", "alcove-inet1", "up"]));
}

async fn setup(cfg: NetworkConfig, port: u16) -> (Arc<SandboxNet>, Guest, Netns) {
    setup_with(cfg, port, |_| {}).await
}

async fn setup_with(
    cfg: NetworkConfig,
    port: u16,
    tune: impl FnOnce(&mut EgressConfig),
) -> (Arc<SandboxNet>, Guest, Netns) {
    setup_full(cfg, port, tune, None).await
}

async fn setup_full(
    cfg: NetworkConfig,
    port: u16,
    tune: impl FnOnce(&mut EgressConfig),
    ca: Option<Arc<alcove_net::egress::SandboxCa>>,
) -> (Arc<SandboxNet>, Guest, Netns) {
    test_internet();
    let dns = fake_dns().await;
    fake_server("198.51.100.2", port, "a").await;
    fake_server("198.51.100.3", port, "b").await;
    // a host service the guard does not trust
    fake_server("198.51.100.1", port, "host").await;
    let guard = Guard::new(
        &alcove_net::policy::host_addresses(),
        vec![Cidr::parse("198.51.100.2/31").unwrap()],
    );
    let mut egress = EgressConfig::new(guard, dns);
    tune(&mut egress);
    let egress = Arc::new(egress);
    let (ns, listeners) = tokio::task::spawn_blocking(|| Netns::create(true).unwrap())
        .await
        .unwrap();
    let net = SandboxNet::start(egress, "sbx-test", cfg, listeners.unwrap(), ca).unwrap();
    let guest = Guest::wire(&ns);
    (net, guest, ns)
}

async fn guest_run(g: &Arc<Guest>, checks: &[&str]) -> Vec<String> {
    let g = g.clone();
    let checks: Vec<String> = checks.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        g.run(&checks.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

/// Starts a guest client that holds a connection to `ip,port` open until its stdin gets a line,
/// and waits until the connection is up.
async fn hold(
    guest: &Guest,
    target: &str,
) -> (
    tokio::process::Child,
    tokio::io::BufReader<tokio::process::ChildStdout>,
) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &guest.name, "python3", "-c", CLIENT])
        .arg(format!("hold:{target}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "HELD");
    (child, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn open_internet_reaches_names_but_never_the_host() {
    let (net, guest, _ns) = setup(config(true, &[], &[]), 18080).await;
    let guest = Arc::new(guest);
    let out = guest_run(
        &guest,
        &[
            "dns:a.test",
            "dns:nope.test",
            "http:a.test,18080,a.test",
            "http:198.51.100.3,18080,b.test",
            "http:198.51.100.1,18080,host",
            "http:169.254.169.254,80,metadata",
            "http:10.0.2.1,15001,gateway",
        ],
    )
    .await;
    assert_eq!(
        out,
        [
            "198.51.100.2",
            "ERR",
            "hello a",
            "hello b",
            "REFUSED",
            "REFUSED",
            "REFUSED"
        ]
    );
    let s = net.stats();
    assert!(s.bytes_out > 0 && s.bytes_in > 0, "{s:?}");
    assert_eq!(s.connections, 2, "{s:?}");
    assert_eq!(s.connections_refused, 3, "{s:?}");
    assert!(s.dns_queries >= 2, "{s:?}");
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn internet_off_sends_nothing_not_even_dns() {
    let (net, guest, _ns) = setup(config(false, &[], &[]), 18081).await;
    let guest = Arc::new(guest);
    let out = guest_run(&guest, &["dns:a.test", "http:198.51.100.2,18081,a.test"]).await;
    assert_eq!(out, ["ERR", "REFUSED"]);
    let s = net.stats();
    assert!(
        s.dns_refused >= 1 && s.connections == 0 && s.connections_refused == 1,
        "{s:?}"
    );
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn domain_rules_bind_names_to_resolved_addresses() {
    let cfg = config(true, &["a.test", "*.a.test"], &["0.0.0.0/0"]);
    let (net, guest, _ns) = setup(cfg, 18082).await;
    let guest = Arc::new(guest);
    let out = guest_run(
        &guest,
        &[
            // before the guest resolved it, the address is bound to no name
            "http:198.51.100.2,18082,a.test",
            "dns:a.test",
            "dns:b.test",
            "http:a.test,18082,a.test",
            "tls:198.51.100.2,18082,a.test",
            "dns:c.a.test",
            "http:198.51.100.2,18082,c.a.test",
            // the allowed name's address under another name (Host, then SNI)
            "http:198.51.100.2,18082,b.test",
            "tls:198.51.100.2,18082,b.test",
            // an allowed name on an address it was not resolved to
            "http:198.51.100.3,18082,a.test",
        ],
    )
    .await;
    assert_eq!(
        out,
        [
            "REFUSED",
            "198.51.100.2",
            "ERR",
            "hello a",
            "hello a",
            "198.51.100.2",
            "hello a",
            "REFUSED",
            "REFUSED",
            "REFUSED"
        ]
    );
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn a_live_update_applies_to_new_and_open_connections() {
    let (net, guest, _ns) = setup(config(true, &[], &[]), 18083).await;
    let guest = Arc::new(guest);
    assert_eq!(
        guest_run(&guest, &["http:198.51.100.3,18083,b.test"]).await,
        ["hello b"]
    );
    // hold a connection open, update the rules, see it closed
    let (mut child, mut stdout) = hold(&guest, "198.51.100.3,18083").await;
    assert_eq!(net.stats().active_connections, 1);
    net.update(config(true, &[], &["198.51.100.3"])).unwrap();
    child.stdin.take().unwrap().write_all(b"\n").await.unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(20), stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "CLOSED");
    let _ = child.wait().await;
    assert_eq!(
        guest_run(
            &guest,
            &[
                "http:198.51.100.3,18083,b.test",
                "http:198.51.100.2,18083,a.test"
            ]
        )
        .await,
        ["REFUSED", "hello a"]
    );
    assert_eq!(net.config().deny_out, ["198.51.100.3"]);
    assert!(net.update(config(true, &[], &["example.com"])).is_err());
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn connections_over_the_limit_are_refused_and_counted() {
    let (net, guest, _ns) =
        setup_with(config(true, &[], &[]), 18084, |c| c.max_connections = 1).await;
    let guest = Arc::new(guest);
    let (mut child, _stdout) = hold(&guest, "198.51.100.3,18084").await;
    assert_eq!(
        guest_run(&guest, &["http:198.51.100.2,18084,a.test"]).await,
        ["REFUSED"]
    );
    assert_eq!(net.stats().connections_over_limit, 1);
    child.stdin.take().unwrap().write_all(b"\n").await.unwrap();
    let _ = child.wait().await;
    // the slot is free again once the held connection ends
    let mut ok = Vec::new();
    for _ in 0..20 {
        ok = guest_run(&guest, &["http:198.51.100.2,18084,a.test"]).await;
        if ok == ["hello a"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(ok, ["hello a"]);
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn operator_denied_ranges_hold_against_allow_lists_and_trust() {
    // 198.51.100.3 is trusted by the test's guard and allow-listed by name and address; the
    // operator's --egress-deny still wins.
    let cfg = config(true, &["a.test", "b.test", "198.51.100.3"], &["0.0.0.0/0"]);
    let (net, guest, _ns) = setup_with(cfg, 18085, |c| {
        c.guard = c
            .guard
            .clone()
            .with_denied([alcove_net::Net::parse("198.51.100.3/32").unwrap()]);
    })
    .await;
    let guest = Arc::new(guest);
    let out = guest_run(
        &guest,
        &[
            "dns:a.test",
            "dns:b.test",
            "http:a.test,18085,a.test",
            "http:b.test,18085,b.test",
            "tls:198.51.100.3,18085,b.test",
        ],
    )
    .await;
    assert_eq!(
        out,
        [
            "198.51.100.2",
            "198.51.100.3",
            "hello a",
            "REFUSED",
            "REFUSED"
        ]
    );
    assert_eq!(net.stats().connections_refused, 2);
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn a_dns_packet_with_a_second_question_is_refused() {
    let cfg = config(true, &["a.test"], &["0.0.0.0/0"]);
    let (net, guest, _ns) = setup(cfg, 18086).await;
    let guest = Arc::new(guest);
    let out = guest_run(
        &guest,
        &[
            "rawdns:a.test",
            // an allowed first question used to carry any second one to the upstream
            "rawdns:a.test+b.test",
            "rawdns:a.test+a.test",
            "rawdns:b.test",
        ],
    )
    .await;
    assert_eq!(
        out,
        [
            "rcode=0 answers=1",
            "rcode=5 answers=0",
            "rcode=5 answers=0",
            "rcode=5 answers=0"
        ]
    );
    assert_eq!(net.stats().dns_refused, 3);
    net.stop();
}

/// The test internet's own CA and an HTTPS server on `ip:port` with a certificate for a.test and
/// b.test from it, answering each request with the headers it got (one per line).
async fn echo_tls_server(ip: &str, port: u16) -> String {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, format!("test internet CA {ip}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["a.test".to_string(), "b.test".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let sc = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
    let l = tokio::net::TcpListener::bind((ip, port)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let get = |h: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(h).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let body = format!(
                    "authorization={}\nx-key={}\nhost={}",
                    get("authorization"),
                    get("x-key"),
                    get("host")
                );
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    ca_cert.pem()
}

/// Secrets as the server's store would give them: this sandbox's team has `tok`.
struct FakeSecrets;

impl alcove_net::secrets::SecretSource for FakeSecrets {
    fn resolve<'a>(
        &'a self,
        _sandbox_id: &'a str,
        name: &'a str,
    ) -> alcove_net::secrets::Resolving<'a> {
        Box::pin(async move {
            match name {
                "tok" => Ok(zeroize::Zeroizing::new(b"s3cret".to_vec())),
                _ => Err(alcove_net::secrets::SecretLookupError::NotFound(
                    name.to_string(),
                )),
            }
        })
    }
}

/// The guest's HTTPS client: `cafile` then `host,port,Header=Value;Header=Value` per request.
const HTTPS_CLIENT: &str = r#"
import http.client, ssl, sys
cafile = sys.argv[1]
for arg in sys.argv[2:]:
    host, port, hdrs = arg.split(",", 2)
    try:
        ctx = ssl.create_default_context(cafile=cafile)
        c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
        headers = dict(kv.split("=", 1) for kv in hdrs.split(";") if kv)
        c.request("GET", "/", headers=headers)
        r = c.getresponse()
        print(f"{r.status} " + r.read().decode().strip().replace("\n", "|"), flush=True)
    except Exception as e:
        print("ERR " + type(e).__name__ + " " + str(e).replace("\n", " "), flush=True)
"#;

fn rules_config(rules: &[(&str, &str, &str)]) -> NetworkConfig {
    let mut c = config(true, &[], &[]);
    for (host, header, value) in rules {
        c.rules.insert(
            host.to_string(),
            vec![alcove_net::policy::HostRule {
                transform: Some(alcove_net::policy::Transform {
                    headers: [(header.to_string(), value.to_string())].into(),
                }),
            }],
        );
    }
    c
}

async fn https_run(guest: &Guest, cafile: &str, checks: &[String]) -> Vec<String> {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &guest.name,
            "python3",
            "-c",
            HTTPS_CLIENT,
            cafile,
        ])
        .args(checks)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn rules_set_secret_headers_only_for_their_host() {
    let port = 18443;
    let test_ca = echo_tls_server("198.51.100.2", port).await;
    let test_ca_b = echo_tls_server("198.51.100.3", port).await;
    let ca = Arc::new(alcove_net::egress::SandboxCa::generate("sbx-test").unwrap());
    let cfg = rules_config(&[
        ("a.test", "Authorization", "Bearer ${e2b.secrets.tok}"),
        ("c.a.test", "X-Key", "${e2b.secrets.missing}"),
    ]);
    let test_ca2 = test_ca.clone();
    let (net, guest, _ns) = setup_full(
        cfg,
        18090,
        move |e| {
            e.upstream_tls = alcove_net::egress::upstream_tls(test_ca2.as_bytes()).unwrap();
            e.secrets = Some(alcove_net::egress::Secrets(Arc::new(FakeSecrets)));
        },
        Some(ca.clone()),
    )
    .await;
    // The guest trusts its sandbox's CA (as /init installs it) and the test internet's.
    let dir = tempfile::tempdir().unwrap();
    let cafile = dir.path().join("ca.pem");
    std::fs::write(&cafile, format!("{}{test_ca}{test_ca_b}", ca.cert_pem())).unwrap();
    let cafile = cafile.to_str().unwrap();
    let p = port;
    let out = https_run(
        &guest,
        cafile,
        &[
            format!("a.test,{p},"),
            format!("b.test,{p},Authorization=${{e2b.secrets.tok}}"),
            format!("a.test,{p},X-Key=${{e2b.secrets.tok}}"),
            format!("c.a.test,{p},"),
            format!("a.test,{p},Host=b.test"),
        ],
    )
    .await;
    assert_eq!(
        out[0],
        format!("200 authorization=Bearer s3cret|x-key=|host=a.test:{p}")
    );
    // Another host: the TLS goes through untouched (its own certificate) and the placeholder
    // arrives as written.
    assert_eq!(
        out[1],
        format!("200 authorization=${{e2b.secrets.tok}}|x-key=|host=b.test:{p}")
    );
    assert!(
        out[2].starts_with("403 alcove egress: the request carries"),
        "{}",
        out[2]
    );
    assert!(
        out[3].starts_with("502 alcove egress: the secret \"missing\" does not exist"),
        "{}",
        out[3]
    );
    assert!(
        out[4].starts_with("421 alcove egress: this connection was opened for a.test"),
        "{}",
        out[4]
    );
    assert!(net.stats().connections_refused >= 3);
    net.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: network namespaces, veth and nftables; run by scripts/test.sh"]
async fn an_upstream_the_host_does_not_trust_gets_no_secret() {
    let port = 18444;
    let test_ca = echo_tls_server("198.51.100.2", port).await;
    let ca = Arc::new(alcove_net::egress::SandboxCa::generate("sbx-test").unwrap());
    let cfg = rules_config(&[("a.test", "Authorization", "Bearer ${e2b.secrets.tok}")]);
    // The proxy's trust store lacks the test CA: the real host can't prove it is a.test.
    let (net, guest, _ns) = setup_full(
        cfg,
        18091,
        |e| e.secrets = Some(alcove_net::egress::Secrets(Arc::new(FakeSecrets))),
        Some(ca.clone()),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cafile = dir.path().join("ca.pem");
    std::fs::write(&cafile, format!("{}{}", ca.cert_pem(), test_ca)).unwrap();
    let out = https_run(
        &guest,
        cafile.to_str().unwrap(),
        &[format!("a.test,{port},")],
    )
    .await;
    assert!(
        out[0].starts_with("502 alcove egress: the TLS handshake with a.test failed"),
        "{}",
        out[0]
    );
    net.stop();
}
