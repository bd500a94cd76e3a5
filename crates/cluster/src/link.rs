//! What makes the link between the control plane and its nodes trusted.
//!
//! One secret, the **cluster token**, is shared by the control plane and every node (a file each
//! is given). It never crosses the wire; two keys are derived from it:
//! - the **heartbeat key** signs each heartbeat a node sends (HMAC-SHA256 over a timestamp and
//!   the body, `X-Alcove-Node-Signature: t=<unix ms>,v1=<hex>`), so a heartbeat cannot be forged
//!   or altered, and one older than [`MAX_SKEW`] is refused;
//! - the **control key** is what the control plane shows a node on every call
//!   (`X-Alcove-Cluster-Key`), compared in constant time.
//!
//! Calls from the control plane to a node (commands, sandbox traffic, env vars, access tokens)
//! go over TLS to the node's own self-signed certificate, **pinned** by the SHA-256 its signed
//! heartbeat announced: no CA to run, and a node cannot be impersonated without the token.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{KeyInit, Mac};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

type HmacSha256 = hmac::Hmac<Sha256>;

/// The header a node's heartbeat is signed in.
pub const SIGNATURE_HEADER: &str = "x-alcove-node-signature";
/// The header the control plane's key rides in on calls to a node.
pub const CONTROL_KEY_HEADER: &str = "x-alcove-cluster-key";
/// How far a heartbeat's timestamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(30);
/// Shortest token accepted: 32 bytes of randomness, hex.
pub const MIN_TOKEN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(
        "the cluster token in {path} is shorter than {MIN_TOKEN_LEN} characters; use the one \
         `alcove server --cluster-listen` wrote (or 32+ random characters)"
    )]
    ShortToken { path: String },
    #[error("reading the cluster token {path}")]
    ReadToken {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the node's link certificate: {0}")]
    Certificate(String),
    #[error("setting up TLS")]
    Tls(#[from] rustls::Error),
}

/// The cluster token and the keys derived from it.
#[derive(Clone)]
pub struct Token {
    heartbeat: [u8; 32],
    control: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

fn derive(token: &[u8], purpose: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC takes any key length");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().into()
}

impl Token {
    pub fn new(token: &str) -> Token {
        let t = token.trim().as_bytes();
        Token {
            heartbeat: derive(t, "alcove cluster v1: node heartbeat"),
            control: hex::encode(derive(t, "alcove cluster v1: control plane to node")),
        }
    }

    /// Reads the token file (the whole file, trimmed), refusing a short one.
    pub fn read(path: &Path) -> Result<Token, LinkError> {
        let s = std::fs::read_to_string(path).map_err(|source| LinkError::ReadToken {
            path: path.display().to_string(),
            source,
        })?;
        if s.trim().len() < MIN_TOKEN_LEN {
            return Err(LinkError::ShortToken {
                path: path.display().to_string(),
            });
        }
        Ok(Token::new(&s))
    }

    /// Reads the token file, first writing a new random token (owner-only) if there is none.
    /// Answers whether it was made.
    pub fn read_or_create(path: &Path) -> Result<(Token, bool), LinkError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let made = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => {
                let t = hex::encode(rand::random::<[u8; 32]>());
                f.write_all(format!("{t}\n").as_bytes())
                    .map_err(|source| LinkError::Write {
                        path: path.display().to_string(),
                        source,
                    })?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(source) => {
                return Err(LinkError::Write {
                    path: path.display().to_string(),
                    source,
                });
            }
        };
        Ok((Token::read(path)?, made))
    }

    /// The value of [`CONTROL_KEY_HEADER`].
    pub fn control_key(&self) -> &str {
        &self.control
    }

    /// Whether `shown` is the control key (constant time).
    pub fn is_control_key(&self, shown: &[u8]) -> bool {
        let a = Sha256::digest(shown);
        let b = Sha256::digest(self.control.as_bytes());
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }

    fn heartbeat_mac(&self, t_ms: u64, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.heartbeat).expect("any key length");
        mac.update(t_ms.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The [`SIGNATURE_HEADER`] value for a heartbeat body sent now.
    pub fn sign(&self, body: &[u8]) -> String {
        let t = unix_ms(SystemTime::now());
        let sig = self.heartbeat_mac(t, body).finalize().into_bytes();
        format!("t={t},v1={}", hex::encode(sig))
    }

    /// Checks a heartbeat's signature and its age against `now`.
    pub fn verify(&self, header: &str, body: &[u8], now: SystemTime) -> Result<(), &'static str> {
        let mut t = None;
        let mut v1 = None;
        for part in header.split(',') {
            match part.trim().split_once('=') {
                Some(("t", x)) => t = x.parse::<u64>().ok(),
                Some(("v1", x)) => v1 = hex::decode(x).ok(),
                _ => {}
            }
        }
        let (Some(t), Some(v1)) = (t, v1) else {
            return Err("the signature header is not `t=<unix ms>,v1=<hex>`");
        };
        let skew = unix_ms(now).abs_diff(t);
        if skew > MAX_SKEW.as_millis() as u64 {
            return Err("the heartbeat's time is more than 30 s from the control plane's clock");
        }
        self.heartbeat_mac(t, body)
            .verify_slice(&v1)
            .map_err(|_| "the signature does not match: the node has another cluster token")
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The node's link certificate: self-signed, kept in its data directory so its fingerprint
/// stays the same across restarts.
pub struct NodeCert {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl NodeCert {
    /// Loads `<dir>/link-cert.der` and `link-key.der`, making them first if absent.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<NodeCert, LinkError> {
        let cert_path = dir.join("link-cert.der");
        let key_path = dir.join("link-key.der");
        let write = |p: &Path, b: &[u8]| {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .and_then(|mut f| f.write_all(b))
                .map_err(|source| LinkError::Write {
                    path: p.display().to_string(),
                    source,
                })
        };
        if let (Ok(c), Ok(k)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
            let key = PrivateKeyDer::try_from(k).map_err(|e| LinkError::Certificate(e.into()))?;
            return Ok(NodeCert {
                cert: CertificateDer::from(c),
                key,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| LinkError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .map_err(|e| LinkError::Certificate(e.to_string()))?;
        let cert = made.cert.der().to_vec();
        let key = made.signing_key.serialize_der();
        write(&key_path, &key)?;
        write(&cert_path, &cert)?;
        let key = PrivateKeyDer::try_from(key).map_err(|e| LinkError::Certificate(e.into()))?;
        Ok(NodeCert {
            cert: CertificateDer::from(cert),
            key,
        })
    }

    /// The hex SHA-256 of the certificate, as heartbeats announce it.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The node listener's TLS: this certificate, HTTP/2 and HTTP/1.1 (for upgrades).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, LinkError> {
        let mut c = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], self.key.clone_key())?;
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(c))
    }
}

pub fn fingerprint(cert: &[u8]) -> String {
    hex::encode(Sha256::digest(cert))
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client TLS config that accepts exactly the certificate with this SHA-256 (hex).
pub fn pinned_client_config(sha256_hex: &str) -> Result<rustls::ClientConfig, LinkError> {
    let want = hex::decode(sha256_hex)
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| LinkError::Certificate("the fingerprint is not 64 hex digits".into()))?;
    let provider = provider();
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { want, provider }))
            .with_no_client_auth(),
    )
}

/// Accepts the one certificate a signed heartbeat announced, whatever name it is reached by;
/// the handshake's signatures are still checked with the provider's algorithms.
#[derive(Debug)]
struct Pinned {
    want: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.want.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the node's certificate is not the one its heartbeat announced".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_heartbeat_verifies_and_anything_else_does_not() {
        let t = Token::new("0123456789abcdef0123456789abcdef");
        let body = br#"{"node_id":"n1"}"#;
        let sig = t.sign(body);
        let now = SystemTime::now();
        assert_eq!(t.verify(&sig, body, now), Ok(()));
        assert!(t.verify(&sig, br#"{"node_id":"n2"}"#, now).is_err());
        let other = Token::new("another token, just as long as the first one");
        assert!(other.verify(&sig, body, now).is_err());
        assert!(
            t.verify(&sig, body, now + Duration::from_secs(31))
                .unwrap_err()
                .contains("30 s")
        );
        assert!(t.verify("v1=00", body, now).is_err());
    }

    #[test]
    fn the_control_key_is_derived_and_compared_whole() {
        let t = Token::new("0123456789abcdef0123456789abcdef");
        assert!(t.is_control_key(t.control_key().as_bytes()));
        assert!(!t.is_control_key(b""));
        assert!(!t.is_control_key(&t.control_key().as_bytes()[1..]));
        assert!(!t.control_key().contains("0123456789abcdef"));
    }

    #[test]
    fn tokens_are_made_once_owner_only_and_short_ones_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.token");
        let (a, made) = Token::read_or_create(&p).unwrap();
        assert!(made);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (b, made) = Token::read_or_create(&p).unwrap();
        assert!(!made);
        assert_eq!(a.control_key(), b.control_key());
        std::fs::write(&p, "short").unwrap();
        assert!(Token::read(&p).unwrap_err().to_string().contains("shorter"));
    }

    #[test]
    fn the_node_certificate_is_kept_and_its_fingerprint_pins_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = NodeCert::load_or_create(dir.path(), "node-1").unwrap();
        let b = NodeCert::load_or_create(dir.path(), "node-1").unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        assert!(pinned_client_config(&a.fingerprint()).is_ok());
        assert!(pinned_client_config("abcd").is_err());
    }
}
