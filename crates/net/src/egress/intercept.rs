//! The egress proxy reading the HTTP(S) requests a sandbox sends to a host its network rules
//! transform (E2B's `network.rules`): TLS is terminated with a leaf for the name the guest asked
//! for, signed by the sandbox's own CA (which the guest trusts from `/init`), the rule's headers
//! are set with `${e2b.secrets.NAME}` filled in from the server's secret store, and the request
//! goes on to the real host over TLS verified against the host's trust store. Every request must
//! name the host the connection was opened for (Host = SNI = a name the sandbox's resolver
//! answered with this address), and a request that carries a placeholder of its own is refused:
//! secrets go only where a rule puts them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderValue, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{EgressEvent, SandboxNet, epoch_ms};
use crate::secrets::{Piece, has_placeholder};

/// How long a request's headers may take to arrive from the guest, and the real host to answer
/// with its response headers (a model API can think for minutes before it answers).
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(60);
const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one secret lookup may take.
const SECRET_TIMEOUT: Duration = Duration::from_secs(5);
/// Leaves kept per sandbox (one per name it sends rule-covered requests to).
const MAX_LEAVES: usize = 64;

/// A sandbox's own certificate authority for the hosts its rules cover. The guest trusts its
/// certificate (sent in `/init`); the key stays on the host, in the sandbox's directory.
pub struct SandboxCa {
    cert_pem: String,
    key_pem: zeroize::Zeroizing<String>,
    issuer: Issuer<'static, KeyPair>,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

/// A CA that could not be made or read back.
#[derive(Debug, thiserror::Error)]
#[error("the sandbox's egress CA: {0}")]
pub struct CaError(String);

fn ca_params(sandbox_id: &str) -> CertificateParams {
    ca_named(&format!("Alcove egress CA for sandbox {sandbox_id}"))
}

/// A certificate authority of Alcove's named `common_name` that signs leaves only (path length
/// 0), without validity dates (the caller sets them when it self-signs; an issuer rebuilt from a
/// kept key needs only the name). Also the server's local TLS CA (`alcove tls init`).
pub fn ca_named(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Alcove");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// The current calendar year (certificate validity is set in whole years).
pub fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

impl SandboxCa {
    /// A new CA for `sandbox_id` (ECDSA P-256).
    pub fn generate(sandbox_id: &str) -> Result<SandboxCa, CaError> {
        let key = KeyPair::generate().map_err(|e| CaError(e.to_string()))?;
        let mut params = ca_params(sandbox_id);
        let y = this_year();
        params.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(y + 20, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| CaError(e.to_string()))?;
        SandboxCa::from_pem(sandbox_id, &cert.pem(), &key.serialize_pem())
    }

    /// The CA `generate` made for `sandbox_id`, from its PEM files.
    pub fn from_pem(sandbox_id: &str, cert_pem: &str, key_pem: &str) -> Result<SandboxCa, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError(format!("its key: {e}")))?;
        Ok(SandboxCa {
            cert_pem: cert_pem.to_string(),
            key_pem: zeroize::Zeroizing::new(key_pem.to_string()),
            issuer: Issuer::new(ca_params(sandbox_id), key),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The certificate the guest trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The private key, for the node to keep (owner-only).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        if let Some(l) = self.leaves.lock().unwrap().get(name) {
            return Ok(l.clone());
        }
        let err = |e: &dyn std::fmt::Display| CaError(format!("a certificate for {name}: {e}"));
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(|e| err(&e))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::NoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let y = this_year();
        p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
        p.not_after = rcgen::date_time_ymd(y + 2, 1, 1);
        let cert = p.signed_by(&key, &self.issuer).map_err(|e| err(&e))?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .map_err(|e| err(&e))?;
        let ck = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signer));
        let mut leaves = self.leaves.lock().unwrap();
        if leaves.len() >= MAX_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_string(), ck.clone());
        Ok(ck)
    }
}

/// The host-wide TLS client the proxy verifies real hosts with: the host's trust store plus
/// any roots the operator adds (`--egress-ca`).
pub fn upstream_tls(extra_roots_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    for c in CertificateDer::pem_slice_iter(extra_roots_pem) {
        let c = c.map_err(|e| format!("the extra egress CA file: {e}"))?;
        roots
            .add(c)
            .map_err(|e| format!("the extra egress CA file: {e}"))?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert("x-alcove-egress", HeaderValue::from_static("refused"));
    r
}

/// The guest's side of an intercepted connection: the bytes already read while sniffing come
/// first; bytes each way are counted.
struct GuestIo {
    inner: TcpStream,
    prefix: Vec<u8>,
    pos: usize,
    out: Arc<AtomicU64>,
    inn: Arc<AtomicU64>,
}

impl AsyncRead for GuestIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let at = self.pos;
            buf.put_slice(&self.prefix[at..at + n]);
            self.pos += n;
            self.out.fetch_add(n as u64, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.out.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for GuestIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.inn.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One intercepted connection.
struct Conn {
    net: Arc<SandboxNet>,
    name: String,
    dst: SocketAddrV4,
    tls: bool,
    upstream: tokio::sync::Mutex<Option<SendRequest<Incoming>>>,
    requests: AtomicU64,
    transformed: AtomicU64,
}

impl SandboxNet {
    /// Serves an allowed connection to `name`, a host the rules transform: `first` is what the
    /// guest sent while the proxy read the name (a TLS ClientHello when `first[0]` is 0x16).
    pub(super) async fn intercept(
        self: Arc<Self>,
        guest: TcpStream,
        first: Vec<u8>,
        dst: SocketAddrV4,
        name: String,
    ) {
        let tls = first.first() == Some(&0x16);
        let opened = (epoch_ms(), Instant::now());
        let (out, inn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let _ = guest.set_nodelay(true);
        let io = GuestIo {
            inner: guest,
            prefix: first,
            pos: 0,
            out: out.clone(),
            inn: inn.clone(),
        };
        let conn = Arc::new(Conn {
            net: self.clone(),
            name: name.clone(),
            dst,
            tls,
            upstream: tokio::sync::Mutex::new(None),
            requests: AtomicU64::new(0),
            transformed: AtomicU64::new(0),
        });
        let cancel = self.cancel.child_token();
        let key = self.next_flow.fetch_add(1, Ordering::Relaxed);
        self.flows.lock().unwrap().insert(
            key,
            super::Flow {
                ip: *dst.ip(),
                name: Some(name.clone()),
                cancel: cancel.clone(),
            },
        );
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let served = async {
            if tls {
                let Some(ca) = self.ca.clone() else {
                    return Err(
                        "this sandbox has no egress CA (it was made before secrets were supported): recreate it to use network rules over HTTPS".to_string(),
                    );
                };
                let leaf = ca.leaf(&name).map_err(|e| e.to_string())?;
                let mut sc = rustls::ServerConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(SingleCertAndKey::from(leaf)));
                sc.alpn_protocols = vec![b"http/1.1".to_vec()];
                let accepted = tokio::time::timeout(
                    self.cfg.sniff_timeout,
                    tokio_rustls::TlsAcceptor::from(Arc::new(sc)).accept(io),
                )
                .await
                .map_err(|_| "the guest's TLS handshake timed out".to_string())?
                .map_err(|e| format!("the guest's TLS handshake failed: {e}"))?;
                serve_http(conn.clone(), TokioIo::new(accepted)).await
            } else {
                serve_http(conn.clone(), TokioIo::new(io)).await
            }
        };
        let outcome = tokio::select! {
            _ = cancel.cancelled() => Ok(()),
            r = served => r,
        };
        self.flows.lock().unwrap().remove(&key);
        let (o, i) = (out.load(Ordering::Relaxed), inn.load(Ordering::Relaxed));
        self.counters.bytes_out.fetch_add(o, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(i, Ordering::Relaxed);
        let verdict = match &outcome {
            Ok(()) => format!(
                "allowed: {} request(s) read by the proxy for the host's network rules, {} with headers set",
                conn.requests.load(Ordering::Relaxed),
                conn.transformed.load(Ordering::Relaxed)
            ),
            Err(e) => {
                tracing::info!(sandbox = %self.id, %dst, %name, error = %e, "intercepted egress connection ended");
                format!("allowed, then ended: {e}")
            }
        };
        self.emit(EgressEvent {
            sandbox_id: self.id.clone(),
            at_ms: opened.0,
            dst,
            name: Some(name),
            allowed: true,
            verdict,
            bytes_out: o,
            bytes_in: i,
            duration_ms: opened.1.elapsed().as_millis() as u64,
        });
    }
}

async fn serve_http<I>(conn: Arc<Conn>, io: I) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let c = conn.clone();
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .serve_connection(
            io,
            hyper::service::service_fn(move |req| {
                let c = c.clone();
                async move { Ok::<_, Infallible>(c.forward(req).await) }
            }),
        )
        .with_upgrades()
        .await
        .map_err(|e| format!("serving the guest's HTTP: {e}"))
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => h,
    }
}

impl Conn {
    fn refuse(&self, status: StatusCode, why: String) -> Response<Body> {
        self.net
            .counters
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(sandbox = %self.net.id, name = %self.name, %why, "egress request refused");
        self.net.emit(EgressEvent {
            sandbox_id: self.net.id.clone(),
            at_ms: epoch_ms(),
            dst: self.dst,
            name: Some(self.name.clone()),
            allowed: false,
            verdict: format!("request refused: {why}"),
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
        });
        text(status, format!("alcove egress: {why}"))
    }

    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().host().map(str::to_string))
            .map(|h| strip_port(&h).trim_end_matches('.').to_ascii_lowercase());
        if host.as_deref() != Some(self.name.as_str()) {
            return self.refuse(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "this connection was opened for {} but the request names {}: open one connection per host",
                    self.name,
                    host.as_deref().unwrap_or("no host")
                ),
            );
        }
        if has_placeholder(req.uri().to_string().as_bytes())
            || req
                .headers()
                .values()
                .any(|v| has_placeholder(v.as_bytes()))
        {
            return self.refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "the request carries a ${{e2b...}} placeholder of its own; secrets are filled in only in the headers a network rule sets (network.rules[\"{}\"].transform.headers), never in what the sandbox sends",
                    self.name
                ),
            );
        }
        let transform = {
            let p = self.net.policy.lock().unwrap();
            p.1.transform_for(&self.name).cloned()
        };
        if let Some(t) = transform {
            for (hname, pieces) in &t.headers {
                let mut value = zeroize::Zeroizing::new(Vec::new());
                for p in pieces {
                    match p {
                        Piece::Text(s) => value.extend_from_slice(s.as_bytes()),
                        Piece::Secret(n) => match self.secret(n).await {
                            Ok(v) => value.extend_from_slice(&v),
                            Err(why) => return self.refuse(StatusCode::BAD_GATEWAY, why),
                        },
                    }
                }
                let Ok(mut hv) = HeaderValue::from_bytes(&value) else {
                    return self.refuse(
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "the value made for header {hname} has a line break or control character (check the secrets it uses)"
                        ),
                    );
                };
                hv.set_sensitive(true);
                let Ok(hn) = hyper::header::HeaderName::from_bytes(hname.as_bytes()) else {
                    continue;
                };
                req.headers_mut().insert(hn, hv);
            }
            if !t.headers.is_empty() {
                self.transformed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let client_upgrade = req
            .headers()
            .contains_key(UPGRADE)
            .then(|| hyper::upgrade::on(&mut req));
        let mut sender = match self.sender().await {
            Ok(s) => s,
            Err(why) => return self.refuse(StatusCode::BAD_GATEWAY, why),
        };
        if tokio::time::timeout(Duration::from_secs(10), sender.ready())
            .await
            .map_or(true, |r| r.is_err())
        {
            return self.refuse(
                StatusCode::BAD_GATEWAY,
                format!("the connection to {} closed", self.name),
            );
        }
        let sent = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, sender.send_request(req)).await;
        *self.upstream.lock().await = Some(sender);
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return self.refuse(
                    StatusCode::BAD_GATEWAY,
                    format!("{} did not answer: {e}", self.name),
                );
            }
            Err(_) => {
                return self.refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "{} sent no response headers within {} s",
                        self.name,
                        RESPONSE_HEAD_TIMEOUT.as_secs()
                    ),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client) = client_upgrade
        {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(a), Ok(b)) = tokio::join!(client, upstream) {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
        resp.map(|b| b.boxed())
    }

    async fn secret(&self, name: &str) -> Result<crate::secrets::SecretValue, String> {
        let Some(src) = &self.net.cfg.secrets else {
            return Err(format!(
                "the rule for {} uses the secret {name:?} but this server has no secret store",
                self.name
            ));
        };
        match tokio::time::timeout(SECRET_TIMEOUT, src.0.resolve(&self.net.id, name)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "looking up the secret {name:?} took over {} s",
                SECRET_TIMEOUT.as_secs()
            )),
        }
    }

    /// The connection to the real host (opened on the first request, reused while it lasts).
    async fn sender(&self) -> Result<SendRequest<Incoming>, String> {
        if let Some(s) = self.upstream.lock().await.take()
            && !s.is_closed()
        {
            let mut s = s;
            if tokio::time::timeout(Duration::from_secs(5), s.ready())
                .await
                .is_ok_and(|r| r.is_ok())
            {
                return Ok(s);
            }
        }
        let cfg = &self.net.cfg;
        let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(self.dst))
            .await
            .map_err(|_| format!("connecting to {} ({}) timed out", self.name, self.dst))?
            .map_err(|e| format!("connecting to {} ({}): {e}", self.name, self.dst))?;
        let _ = tcp.set_nodelay(true);
        let builder = hyper::client::conn::http1::Builder::new();
        if self.tls {
            let server_name = ServerName::try_from(self.name.clone())
                .map_err(|e| format!("{} is not a TLS server name: {e}", self.name))?;
            let tls = tokio::time::timeout(
                cfg.connect_timeout,
                tokio_rustls::TlsConnector::from(cfg.upstream_tls.clone()).connect(server_name, tcp),
            )
            .await
            .map_err(|_| format!("the TLS handshake with {} timed out", self.name))?
            .map_err(|e| {
                format!(
                    "the TLS handshake with {} failed (its certificate is checked against this host's trust store): {e}",
                    self.name
                )
            })?;
            let (s, c) = builder
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("HTTP to {}: {e}", self.name))?;
            tokio::spawn(c.with_upgrades());
            Ok(s)
        } else {
            let (s, c) = builder
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("HTTP to {}: {e}", self.name))?;
            tokio::spawn(c.with_upgrades());
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_signs_leaves_and_comes_back_from_its_pem() {
        let ca = SandboxCa::generate("sbx1").unwrap();
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let again = SandboxCa::from_pem("sbx1", ca.cert_pem(), ca.key_pem()).unwrap();
        let a = again.leaf("api.example.com").unwrap();
        assert!(Arc::ptr_eq(&a, &again.leaf("api.example.com").unwrap()));
        assert_eq!(strip_port("a.test:8443"), "a.test");
        assert_eq!(strip_port("a.test"), "a.test");
    }
}
