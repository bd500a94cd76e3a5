//! Where and how the store reaches Postgres: the client settings of a `postgres://` URL, and TLS
//! when the URL asks for it.
//!
//! `sslmode=require` (and `verify-ca`, `verify-full`, read the same way) connects over TLS with
//! rustls and always checks the server's certificate and its name against the CAs in
//! `sslrootcert=/path/ca.pem`, or the host's trust store without it: a server that cannot prove
//! who it is never sees the store's queries. `disable` and `prefer` (the client's default)
//! connect without TLS.

use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Connections a replica's store keeps when the URL does not say (`connection_limit`).
pub const DEFAULT_CONNECTIONS: usize = 4;
/// The most `connection_limit` may ask for: each connection is a Postgres backend process, and
/// the server's `max_connections` (100 by default) is shared by every replica.
pub const MAX_CONNECTIONS: usize = 64;

/// A parsed `postgres://` URL.
#[derive(Clone)]
pub struct PgTarget {
    pub(crate) config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// How many connections the store opens (`connection_limit=N`; not a libpq parameter, so
    /// it is taken out of the URL before the client reads it).
    pub(crate) connections: usize,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTarget")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl PgTarget {
    /// Parses `url`, and with TLS asked for, loads the CAs its certificate is checked against.
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let (mut root, mut tls) = (None, false);
        let mut connections = DEFAULT_CONNECTIONS;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "connection_limit" => {
                    connections = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_CONNECTIONS).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "connection_limit={v}: give the number of connections this \
                                 replica keeps, 1 to {MAX_CONNECTIONS} (default \
                                 {DEFAULT_CONNECTIONS})"
                            )
                        })?;
                }
                "sslrootcert" => {
                    root = Some(percent_decode_str(v).decode_utf8_lossy().into_owned());
                }
                "sslmode" => match v {
                    "require" | "verify-ca" | "verify-full" => {
                        tls = true;
                        kept.push("sslmode=require".to_owned());
                    }
                    "disable" | "prefer" => kept.push(pair.to_owned()),
                    other => {
                        return Err(format!(
                            "sslmode={other} is not supported: use sslmode=require (TLS, the \
                             server's certificate checked) or sslmode=disable"
                        ));
                    }
                },
                _ => kept.push(pair.to_owned()),
            }
        }
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let config: postgres::Config = url.parse().map_err(|e| {
            format!(
                "not a valid Postgres URL ({e}): write it as \
                 postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE[?sslmode=require]"
            )
        })?;
        if root.is_some() && !tls {
            return Err("sslrootcert is only read with sslmode=require".into());
        }
        let tls = if tls {
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                client_config(root.as_deref())?,
            ))
        } else {
            None
        };
        Ok(PgTarget {
            config,
            tls,
            connections,
        })
    }

    /// Whether connections use TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection (the synchronous client: never call it from an async task).
    pub fn connect(&self) -> Result<postgres::Client, postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(postgres::NoTls),
        }
    }
}

/// rustls settings that trust the CAs in the PEM file `root`, or the host's trust store.
fn client_config(root: Option<&str>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("sslrootcert {path}: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("sslrootcert {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {path}: no certificate in it"));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "sslmode=require: the host's trust store has no CA certificates; name the \
                     server's CA with sslrootcert=/path/ca.pem"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_without_tls_parse_as_before() {
        let t = PgTarget::parse("postgres://a:pw@db.example:5433/alcove").unwrap();
        assert!(!t.tls());
        assert_eq!(t.config.get_ports(), &[5433]);
        let t = PgTarget::parse("postgres://a@h/d?sslmode=disable&connect_timeout=5").unwrap();
        assert!(!t.tls());
        assert!(PgTarget::parse("mysql://x").is_err());
    }

    #[test]
    fn connection_limit_is_read_and_kept_from_the_client() {
        let t = PgTarget::parse("postgres://a@h/d").unwrap();
        assert_eq!(t.connections, DEFAULT_CONNECTIONS);
        let t = PgTarget::parse("postgres://a@h/d?connection_limit=9&connect_timeout=5").unwrap();
        assert_eq!(t.connections, 9);
        assert_eq!(
            t.config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
        for bad in ["0", "65", "many", ""] {
            let err = PgTarget::parse(&format!("postgres://a@h/d?connection_limit={bad}"))
                .expect_err(bad);
            assert!(err.contains("1 to 64"), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_modes_and_root_certificates() {
        let err = PgTarget::parse("postgres://a@h/d?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode=require"), "{err}");
        let err = PgTarget::parse("postgres://a@h/d?sslrootcert=/x.pem").unwrap_err();
        assert!(err.contains("only read with sslmode=require"), "{err}");
        let err =
            PgTarget::parse("postgres://a@h/d?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .unwrap_err();
        assert!(err.contains("/nonexistent.pem"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = PgTarget::parse(&format!(
            "postgres://a@h/d?sslmode=require&sslrootcert={}",
            empty.display()
        ))
        .unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        // The path is percent-decoded, as URL values are.
        let err = PgTarget::parse("postgres://a@h/d?sslmode=require&sslrootcert=%2Fno%20such.pem")
            .unwrap_err();
        assert!(err.contains("sslrootcert /no such.pem"), "{err}");
    }

    /// Against the Postgres of `scripts/with-postgres.sh`, which serves TLS with a certificate
    /// from a CA of its own (without that script there is no server, and nothing to check).
    #[test]
    fn tls_to_a_real_server_checks_its_certificate() {
        let (Ok(url), Ok(ca), Ok(other)) = (
            std::env::var("ALCOVE_TEST_DATABASE_URL"),
            std::env::var("ALCOVE_TEST_PG_CA"),
            std::env::var("ALCOVE_TEST_PG_OTHER_CA"),
        ) else {
            return;
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let with = |ca: &str| format!("{url}{sep}sslmode=verify-full&sslrootcert={ca}");
        let (good, bad) = (with(&ca), with(&other));
        // The synchronous client may not run inside an async runtime; a test thread is none.
        let mut c = PgTarget::parse(&good)
            .unwrap()
            .connect()
            .expect("TLS with the server's CA");
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap();
        assert!(row.get::<_, bool>(0), "the connection is not encrypted");
        let err = PgTarget::parse(&bad)
            .unwrap()
            .connect()
            .err()
            .expect("a server whose certificate another CA signed is refused");
        let text = format!("{err:?}");
        assert!(text.contains("UnknownIssuer"), "{text}");
        // The store itself: its migrations and queries over TLS.
        let schema = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
        let db = crate::Database::postgres_schema(&good, &schema);
        let store = crate::Store::connect(&db).expect("the store opens over TLS");
        assert!(store.hold_duties().unwrap());
    }
}
