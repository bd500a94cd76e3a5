//! The host side of a sandbox's network: the egress proxy (every TCP connection the guest opens)
//! and the resolver (every DNS packet), both enforcing the sandbox's [`Rules`] under the
//! operator's [`Guard`], with per-sandbox connection and bandwidth limits and byte counters.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

mod intercept;
pub use intercept::{CaError, SandboxCa, ca_named, this_year, upstream_tls};

use crate::dns::{self, Bindings};
use crate::netns::{Listeners, original_dst};
use crate::policy::{Guard, NetworkConfig, RuleError, Rules, Verdict, decide};
use crate::sniff::{MAX_SNIFF, Sniff, sniff};

/// Open TCP connections per sandbox when the operator sets no limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Host-wide settings, from the server's configuration.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    pub guard: Guard,
    /// Where allowed DNS queries go (the host's resolver by default).
    pub upstream_dns: SocketAddr,
    /// Concurrent TCP connections per sandbox.
    pub max_connections: usize,
    /// Bytes per second per sandbox and direction; `None` is unlimited.
    pub bandwidth: Option<u64>,
    pub connect_timeout: Duration,
    /// How long a flow that a domain rule decides may take to send its first bytes (SNI/Host).
    pub sniff_timeout: Duration,
    /// Where each connection's record goes when it ends or is refused (the audit log).
    pub events: Option<tokio::sync::mpsc::Sender<EgressEvent>>,
    /// Where secret values come from for the headers network rules set (the server's store).
    pub secrets: Option<Secrets>,
    /// How the proxy verifies the real hosts it forwards intercepted requests to.
    pub upstream_tls: Arc<rustls::ClientConfig>,
}

/// The secret store as the proxy sees it.
#[derive(Clone)]
pub struct Secrets(pub Arc<dyn crate::secrets::SecretSource>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets")
    }
}

/// One egress connection of a sandbox, for its run trace: where it went, the name it asked
/// for (TLS SNI or HTTP Host), what the rules said and, if it was allowed, its bytes. (Serde:
/// a cluster node sends them to the control plane.)
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EgressEvent {
    pub sandbox_id: String,
    /// When it was opened (ms since the epoch).
    pub at_ms: i64,
    pub dst: SocketAddrV4,
    pub name: Option<String>,
    pub allowed: bool,
    /// The rule's verdict in words (`allowed`, or why not).
    pub verdict: String,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
}

fn verdict_words(v: &Verdict) -> String {
    match v {
        Verdict::Allow => "allowed".into(),
        Verdict::Reserved => {
            "denied: a reserved address (this host, a private or link-local range)".into()
        }
        Verdict::Denied => "denied: by denyOut (or internet access off), no allowOut match".into(),
        Verdict::NameNotAllowed(Some(n)) => {
            format!("denied: the name {n:?} is not allowed here or was not resolved by the sandbox")
        }
        Verdict::NameNotAllowed(None) => {
            "denied: a domain rule applies but the client sent no name (SNI or Host)".into()
        }
    }
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl EgressConfig {
    /// Defaults around `guard` and `upstream_dns`.
    pub fn new(guard: Guard, upstream_dns: SocketAddr) -> EgressConfig {
        EgressConfig {
            guard,
            upstream_dns,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            bandwidth: None,
            connect_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_secs(5),
            events: None,
            secrets: None,
            upstream_tls: upstream_tls(b"").unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the egress proxy's TLS client: no roots");
                Arc::new(
                    rustls::ClientConfig::builder_with_provider(Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
            }),
        }
    }
}

/// The first `nameserver` of `/etc/resolv.conf` (port 53), or 127.0.0.53 (systemd-resolved).
pub fn host_resolver() -> SocketAddr {
    let ip = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some("nameserver"))
                    .then(|| w.next()?.parse::<Ipv4Addr>().ok())
                    .flatten()
            })
        })
        .unwrap_or(Ipv4Addr::new(127, 0, 0, 53));
    SocketAddr::V4(SocketAddrV4::new(ip, 53))
}

/// Counters of one sandbox's network, since it was created (or the server restarted).
#[derive(Debug, Default)]
struct Counters {
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    connections: AtomicU64,
    connections_refused: AtomicU64,
    connections_over_limit: AtomicU64,
    dns_queries: AtomicU64,
    dns_refused: AtomicU64,
}

/// A snapshot of [`Counters`], for the API and metering.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetStats {
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub connections: u64,
    pub connections_refused: u64,
    pub connections_over_limit: u64,
    pub active_connections: u64,
    pub dns_queries: u64,
    pub dns_refused: u64,
}

/// A token bucket: at most `rate` bytes per second, bursts of up to a quarter second.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            state: Mutex::new((rate as f64 / 4.0, Instant::now())),
        }
    }

    async fn take(&self, n: usize) {
        let wait = {
            let mut s = self.state.lock().unwrap();
            let now = Instant::now();
            let burst = (self.rate / 4.0).max(64.0 * 1024.0);
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(burst);
            s.1 = now;
            s.0 -= n as f64;
            if s.0 >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-s.0 / self.rate)
        };
        tokio::time::sleep(wait).await;
    }
}

struct Flow {
    ip: Ipv4Addr,
    name: Option<String>,
    cancel: CancellationToken,
}

/// One sandbox's network service. Dropping it does not stop it: call [`SandboxNet::stop`].
pub struct SandboxNet {
    id: String,
    cfg: Arc<EgressConfig>,
    policy: Mutex<(NetworkConfig, Rules)>,
    /// address -> names this sandbox's resolver answered with it (bounded)
    bindings: Mutex<Bindings>,
    counters: Counters,
    conns: Arc<Semaphore>,
    flows: Mutex<HashMap<u64, Flow>>,
    next_flow: AtomicU64,
    bucket_out: Option<Bucket>,
    bucket_in: Option<Bucket>,
    cancel: CancellationToken,
    /// The CA whose leaves the guest sees for hosts with rules (it trusts it from `/init`).
    ca: Option<Arc<SandboxCa>>,
}

impl std::fmt::Debug for SandboxNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxNet").field("id", &self.id).finish()
    }
}

impl SandboxNet {
    /// Serves `listeners` (bound in the sandbox's namespace) under `config`. Must be called
    /// inside a tokio runtime.
    pub fn start(
        cfg: Arc<EgressConfig>,
        id: &str,
        config: NetworkConfig,
        listeners: Listeners,
        ca: Option<Arc<SandboxCa>>,
    ) -> Result<Arc<SandboxNet>, StartError> {
        let rules = Rules::from_config(&config).map_err(StartError::Rules)?;
        let tcp = tokio::net::TcpListener::from_std(listeners.tcp).map_err(StartError::Io)?;
        let udp = UdpSocket::from_std(listeners.udp).map_err(StartError::Io)?;
        let net = Arc::new(SandboxNet {
            id: id.to_string(),
            policy: Mutex::new((config, rules)),
            bindings: Mutex::new(Bindings::default()),
            counters: Counters::default(),
            conns: Arc::new(Semaphore::new(cfg.max_connections)),
            flows: Mutex::new(HashMap::new()),
            next_flow: AtomicU64::new(0),
            bucket_out: cfg.bandwidth.map(Bucket::new),
            bucket_in: cfg.bandwidth.map(Bucket::new),
            cancel: CancellationToken::new(),
            ca,
            cfg,
        });
        tokio::spawn(net.clone().accept_loop(tcp));
        tokio::spawn(net.clone().dns_loop(Arc::new(udp)));
        Ok(net)
    }

    pub fn config(&self) -> NetworkConfig {
        self.policy.lock().unwrap().0.clone()
    }

    /// Replaces the rules (E2B's `PUT /sandboxes/{id}/network`). New connections follow them at
    /// once; open connections the new rules refuse are closed.
    pub fn update(&self, config: NetworkConfig) -> Result<(), RuleError> {
        let rules = Rules::from_config(&config)?;
        *self.policy.lock().unwrap() = (config, rules.clone());
        let flows = self.flows.lock().unwrap();
        for f in flows.values() {
            let v = decide(&self.cfg.guard, &rules, f.ip, f.name.as_deref(), |n| {
                self.bound(f.ip, n)
            });
            if v != Verdict::Allow {
                tracing::info!(sandbox = %self.id, ip = %f.ip, name = ?f.name, verdict = ?v, "closing a connection the new network rules refuse");
                f.cancel.cancel();
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> NetStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            bytes_out: g(&c.bytes_out),
            bytes_in: g(&c.bytes_in),
            connections: g(&c.connections),
            connections_refused: g(&c.connections_refused),
            connections_over_limit: g(&c.connections_over_limit),
            active_connections: self.flows.lock().unwrap().len() as u64,
            dns_queries: g(&c.dns_queries),
            dns_refused: g(&c.dns_refused),
        }
    }

    /// Stops serving: closes the listeners and every open connection.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    fn bound(&self, ip: Ipv4Addr, name: &str) -> bool {
        self.bindings
            .lock()
            .unwrap()
            .bound(ip, name, Instant::now())
    }

    fn bind(&self, name: &str, ips: impl IntoIterator<Item = Ipv4Addr>) {
        let mut b = self.bindings.lock().unwrap();
        let now = Instant::now();
        for ip in ips {
            b.bind(name, ip, now);
        }
    }

    async fn accept_loop(self: Arc<Self>, l: tokio::net::TcpListener) {
        loop {
            let (s, _) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = l.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(sandbox = %self.id, error = %e, "egress accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                self.counters
                    .connections_over_limit
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(sandbox = %self.id, limit = self.cfg.max_connections, "egress connection over the per-sandbox limit: refused");
                reset(s);
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                me.flow(s).await;
                drop(permit);
            });
        }
    }

    async fn flow(self: Arc<Self>, mut guest: TcpStream) {
        let Ok(dst) = original_dst(&guest) else {
            return reset(guest);
        };
        let ip = *dst.ip();
        let rules = self.policy.lock().unwrap().1.clone();
        let mut first = Vec::new();
        let mut name = None;
        // The name decides the flow (a domain rule), or says whether its requests are transformed
        // (the address was answered for a name a network rule covers).
        let transformed_name = !rules.transforms.is_empty()
            && self
                .bindings
                .lock()
                .unwrap()
                .any_bound(ip, Instant::now(), |n| rules.transform_for(n).is_some());
        if rules.needs_name(ip) || transformed_name {
            let read = async {
                let mut buf = vec![0u8; 4096];
                loop {
                    match sniff(&first) {
                        Sniff::Name(n) => return Some(n),
                        Sniff::NoName => return None,
                        Sniff::NeedMore if first.len() >= MAX_SNIFF => return None,
                        Sniff::NeedMore => {}
                    }
                    match guest.read(&mut buf).await {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => first.extend_from_slice(&buf[..n]),
                    }
                }
            };
            name = tokio::time::timeout(self.cfg.sniff_timeout, read)
                .await
                .ok()
                .flatten();
        }
        let verdict = decide(&self.cfg.guard, &rules, ip, name.as_deref(), |n| {
            self.bound(ip, n)
        });
        let opened = (epoch_ms(), Instant::now());
        if verdict != Verdict::Allow {
            self.counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(sandbox = %self.id, %dst, ?name, ?verdict, "egress refused");
            self.emit(EgressEvent {
                sandbox_id: self.id.clone(),
                at_ms: opened.0,
                dst,
                name,
                allowed: false,
                verdict: verdict_words(&verdict),
                bytes_out: 0,
                bytes_in: 0,
                duration_ms: 0,
            });
            return reset(guest);
        }
        if let Some(n) = &name
            && rules.transform_for(n).is_some()
            && self.bound(ip, n)
        {
            return self.intercept(guest, first, dst, n.clone()).await;
        }
        let upstream =
            match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(dst)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(sandbox = %self.id, %dst, error = %e, "egress connect failed");
                    return reset(guest);
                }
                Err(_) => return reset(guest),
            };
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let _ = upstream.set_nodelay(true);
        let _ = guest.set_nodelay(true);
        let cancel = self.cancel.child_token();
        let key = self.next_flow.fetch_add(1, Ordering::Relaxed);
        self.flows.lock().unwrap().insert(
            key,
            Flow {
                ip,
                name: name.clone(),
                cancel: cancel.clone(),
            },
        );
        let (flow_out, flow_in) = (AtomicU64::new(0), AtomicU64::new(0));
        let (gr, mut gw) = guest.into_split();
        let (ur, mut uw) = upstream.into_split();
        let sent = async {
            if !first.is_empty() {
                uw.write_all(&first).await?;
                self.counters
                    .bytes_out
                    .fetch_add(first.len() as u64, Ordering::Relaxed);
                flow_out.fetch_add(first.len() as u64, Ordering::Relaxed);
            }
            pump(
                gr,
                &mut uw,
                self.bucket_out.as_ref(),
                [&self.counters.bytes_out, &flow_out],
            )
            .await
        };
        let received = pump(
            ur,
            &mut gw,
            self.bucket_in.as_ref(),
            [&self.counters.bytes_in, &flow_in],
        );
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = async { let _ = tokio::join!(sent, received); } => {}
        }
        self.flows.lock().unwrap().remove(&key);
        self.emit(EgressEvent {
            sandbox_id: self.id.clone(),
            at_ms: opened.0,
            dst,
            name,
            allowed: true,
            verdict: verdict_words(&Verdict::Allow),
            bytes_out: flow_out.load(Ordering::Relaxed),
            bytes_in: flow_in.load(Ordering::Relaxed),
            duration_ms: opened.1.elapsed().as_millis() as u64,
        });
    }

    /// Hands a connection's record to the audit sink, never waiting in the flow's path.
    fn emit(&self, e: EgressEvent) {
        let Some(tx) = &self.cfg.events else {
            return;
        };
        if let Err(tokio::sync::mpsc::error::TrySendError::Full(e)) = tx.try_send(e) {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(e).await;
            });
        }
    }

    async fn dns_loop(self: Arc<Self>, sock: Arc<UdpSocket>) {
        let inflight = Arc::new(Semaphore::new(64));
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = tokio::select! {
                _ = self.cancel.cancelled() => return,
                r = sock.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(_) => continue,
                },
            };
            let Ok(permit) = inflight.clone().try_acquire_owned() else {
                continue; // the guest retries; a flood is dropped
            };
            let q = buf[..n].to_vec();
            let (me, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(answer) = me.resolve(&q).await {
                    let _ = sock.send_to(&answer, from).await;
                }
                drop(permit);
            });
        }
    }

    /// Answers one DNS packet: refused unless it is one question the rules allow (see
    /// [`crate::dns`]), otherwise relayed to the upstream resolver, remembering the A records'
    /// addresses for the name.
    async fn resolve(&self, query: &[u8]) -> Option<Vec<u8>> {
        self.counters.dns_queries.fetch_add(1, Ordering::Relaxed);
        let decision = {
            let p = self.policy.lock().unwrap();
            dns::check_query(query, |n| p.1.may_resolve(n))
        };
        let (name, packet) = match decision {
            dns::Decision::Forward { name, packet } => (name, packet),
            dns::Decision::Refuse { name, answer } => {
                self.counters.dns_refused.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sandbox = %self.id, ?name, "DNS query refused by the network rules");
                return Some(answer);
            }
            dns::Decision::Drop => return None,
        };
        let up = UdpSocket::bind("0.0.0.0:0").await.ok()?;
        let upstream = self.cfg.upstream_dns;
        let mut resp = vec![0u8; 4096];
        let mut got = None;
        for _ in 0..2 {
            if up.send_to(&packet, upstream).await.is_err() {
                break;
            }
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(2), up.recv_from(&mut resp)).await
                && from == upstream
                && n >= 2
                && resp[..2] == packet[..2]
            {
                got = Some(resp[..n].to_vec());
                break;
            }
        }
        let answer = got?;
        // Addresses the guard refuses are never reachable: not worth a place in the table.
        let ips = dns::answer_addresses(&answer)
            .into_iter()
            .filter(|ip| !self.cfg.guard.reserved(*ip));
        self.bind(&name, ips);
        Some(answer)
    }
}

/// Copies `r` to `w` until EOF, through the bucket, counting bytes; then half-closes `w`.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    w: &mut (impl AsyncWrite + Unpin),
    bucket: Option<&Bucket>,
    counts: [&AtomicU64; 2],
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        if let Some(b) = bucket {
            b.take(n).await;
        }
        w.write_all(&buf[..n]).await?;
        for c in counts {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Closes with a reset, so the guest's connect or first read fails at once.
fn reset(s: TcpStream) {
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Rules(RuleError),
    #[error("serve the sandbox's network: {0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bucket_holds_a_sender_to_its_rate() {
        // 1 MiB/s with a 256 KiB burst: 768 KiB more than the burst needs at least 0.5 s.
        let b = Bucket::new(1 << 20);
        let t0 = Instant::now();
        for _ in 0..32 {
            b.take(32 * 1024).await;
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }
}
