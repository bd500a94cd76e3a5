//! TLS for the server's one listener (`alcove server --tls-cert --tls-key`): the REST API and
//! `<port>-<sandboxID>.<domain>` on the same port, so the SDKs' `https://` links work.
//!
//! The certificate is the operator's (a wildcard for `*.<domain>`, which covers `api.<domain>`
//! and every sandbox's names), or one [`init`] makes: a local CA and a wildcard certificate it
//! signs, for a server on a developer's machine or a private network, with the CA to trust on the
//! clients. rustls (on ring, already built for the egress proxy) terminates it; ALPN offers HTTP/2
//! and HTTP/1.1, as the SDKs' clients ask for both.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What [`init`] writes, in its directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The CA's key: kept to sign a new certificate for another domain later; owner-only.
pub const CA_KEY_FILE: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "reading the TLS certificate {0}: {1}; give a PEM file with the server's certificate (a wildcard for *.<domain>) first and its chain after, e.g. from `alcove tls init`"
    )]
    Cert(PathBuf, String),
    #[error(
        "reading the TLS key {0}: {1}; give the PEM private key (PKCS#8, PKCS#1 or SEC1) of the certificate"
    )]
    Key(PathBuf, String),
    #[error("the TLS certificate and key do not go together: {0}")]
    Mismatch(String),
    #[error("making the certificates: {0}")]
    Generate(String),
    #[error("the domain {0:?} cannot name a certificate: {1}")]
    Domain(String, &'static str),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// The rustls server configuration of `cert` (PEM, the leaf first) and `key`.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Cert(cert.into(), e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(cert.into(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Cert(
            cert.into(),
            "it holds no certificate".into(),
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key(key.into(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Mismatch(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The host part of a domain that may carry the listener's port (`alcove.localhost:8443`).
fn host_of(domain: &str) -> &str {
    match domain.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => domain,
    }
}

/// The files [`init`] wrote.
#[derive(Debug, Clone)]
pub struct InitFiles {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The names the certificate is for.
    pub names: Vec<String>,
}

/// Makes a local CA (kept in `dir` for later certificates; an existing one is reused) and a
/// certificate it signs for `domain` and `*.domain` (the API at `api.<domain>` and every
/// `<port>-<sandboxID>.<domain>`), valid for two years. Keys are written owner-only.
pub fn init(domain: &str, dir: &Path) -> Result<InitFiles, TlsError> {
    let host = host_of(domain).trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() || host.starts_with('.') || host.starts_with("*.") {
        return Err(TlsError::Domain(
            domain.into(),
            "give the bare domain the SDKs get as E2B_DOMAIN, like alcove.localhost",
        ));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(TlsError::Domain(
            domain.into(),
            "an IP address has no subdomains for sandboxes; use a name that resolves to it, like \
             alcove.localhost or a name in your DNS",
        ));
    }
    let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
    std::fs::create_dir_all(dir).map_err(|e| TlsError::Write(dir.into(), e))?;
    let ca_path = dir.join(CA_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let y = alcove_net::egress::this_year();
    let (ca_pem, issuer) = match (
        std::fs::read_to_string(&ca_path),
        std::fs::read_to_string(&ca_key_path),
    ) {
        (Ok(cert), Ok(key)) => {
            let key = KeyPair::from_pem(&key).map_err(gen_err)?;
            (cert, Issuer::new(ca_params(y), key))
        }
        _ => {
            let key = KeyPair::generate().map_err(gen_err)?;
            let cert = ca_params(y).self_signed(&key).map_err(gen_err)?;
            write(&ca_key_path, &key.serialize_pem(), 0o600)?;
            write(&ca_path, &cert.pem(), 0o644)?;
            (cert.pem(), Issuer::new(ca_params(y), key))
        }
    };
    let names = vec![host.clone(), format!("*.{host}")];
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut p = CertificateParams::new(names.clone()).map_err(gen_err)?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, format!("*.{host}"));
    p.is_ca = IsCa::NoCa;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.use_authority_key_identifier_extension = true;
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 2, 1, 1);
    let cert = p.signed_by(&key, &issuer).map_err(gen_err)?;
    let out = InitFiles {
        dir: dir.into(),
        ca: ca_path,
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
        names,
    };
    write(&out.key, &key.serialize_pem(), 0o600)?;
    // The chain a client is sent: the leaf, then the CA.
    write(&out.cert, &format!("{}{}", cert.pem(), ca_pem), 0o644)?;
    Ok(out)
}

/// The local CA (the same name each time, so a kept key signs under the same name).
fn ca_params(y: i32) -> CertificateParams {
    let mut p = alcove_net::egress::ca_named("Alcove local CA");
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 10, 1, 1);
    p
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| TlsError::Write(tmp.clone(), e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| TlsError::Write(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| TlsError::Write(path.into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_wildcard_the_server_loads_and_reuses_its_ca() {
        let d = tempfile::tempdir().unwrap();
        let a = init("Alcove.localhost:8443", d.path()).unwrap();
        assert_eq!(a.names, ["alcove.localhost", "*.alcove.localhost"]);
        server_config(&a.cert, &a.key).unwrap();
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        };
        assert_eq!(mode(&a.key), 0o600);
        assert_eq!(mode(&d.path().join(CA_KEY_FILE)), 0o600);
        let ca = std::fs::read(&a.ca).unwrap();
        // A second domain: the same CA signs it.
        let b = init("other.test", d.path()).unwrap();
        assert_eq!(std::fs::read(&b.ca).unwrap(), ca);
        assert!(
            String::from_utf8(std::fs::read(&b.cert).unwrap())
                .unwrap()
                .ends_with(std::str::from_utf8(&ca).unwrap())
        );
        for bad in ["", "*.x.test", "127.0.0.1", ".x"] {
            assert!(
                matches!(init(bad, d.path()), Err(TlsError::Domain(..))),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_files_say_which_and_what_to_give() {
        let d = tempfile::tempdir().unwrap();
        let a = init("x.test", d.path()).unwrap();
        let empty = d.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = server_config(&empty, &a.key).unwrap_err().to_string();
        assert!(
            e.contains("empty.pem") && e.contains("no certificate"),
            "{e}"
        );
        let e = server_config(&a.cert, &empty).unwrap_err().to_string();
        assert!(e.contains("TLS key"), "{e}");
        // The CA's key is not the certificate's.
        let e = server_config(&a.cert, &d.path().join(CA_KEY_FILE))
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not go together"), "{e}");
    }
}
