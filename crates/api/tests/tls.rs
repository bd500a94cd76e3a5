//! TLS on the listener over the fake backend: certificates from `alcove_api::tls::init`, a
//! client that trusts only their CA reaches the API at `api.<domain>` and a sandbox's port at
//! `<port>-<id>.<domain>`; a client that does not trust it, or that speaks garbage, is refused
//! and the server serves on; loopback peers may still speak plain HTTP (the server's MCP tools).

mod common;

use std::sync::Arc;

use alcove_api::{ServerConfig, tls};
use common::{FakeBackend, fast_limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client(ca: &std::path::Path, names: &[&str], addr: std::net::SocketAddr) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut b = reqwest::Client::builder().tls_backend_preconfigured(config);
    for n in names {
        b = b.resolve(n, addr);
    }
    b.build().unwrap()
}

#[tokio::test]
async fn the_api_and_sandbox_names_are_served_over_tls_with_the_inited_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = tls::init("alcove.localhost", &dir.path().join("tls")).unwrap();
    let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path().join("data"));
    config.limits = fast_limits();
    config.database = Some(alcove_store::Database::from_test_env(
        &dir.path().join("data"),
    ));
    config.domain = Some("alcove.localhost".into());
    config.tls = Some(tls::server_config(&certs.cert, &certs.key).unwrap());
    let backend = Arc::new(FakeBackend::new());
    let server = alcove_api::Server::bind(config, backend.clone())
        .await
        .unwrap();
    let addr = server.local_addr();
    let key = server.first_start_key().unwrap().to_owned();
    let env = server.sdk_env();
    assert!(env.contains("E2B_DOMAIN=alcove.localhost"), "{env}");
    assert!(!env.contains("E2B_SANDBOX_URL"), "{env}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    let port = addr.port();
    let api = format!("api.alcove.localhost:{port}");

    // Garbage and an untrusting client first: refused, nothing else disturbed.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5])
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    let untrusting = client(
        &tls::init("other.test", &dir.path().join("other"))
            .unwrap()
            .ca,
        &["api.alcove.localhost"],
        addr,
    );
    let e = untrusting
        .get(format!("https://{api}/health"))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect() || e.is_request(), "{e:?}");

    let c = client(
        &certs.ca,
        &["api.alcove.localhost", "alcove.localhost"],
        addr,
    );
    let r = c.get(format!("https://{api}/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A create answers with the domain the SDK builds its https:// links from.
    let r = c
        .post(format!("https://{api}/sandboxes"))
        .header("x-api-key", &key)
        .header("content-type", "application/json")
        .body(r#"{"templateID": "base"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(created["domain"], "alcove.localhost");
    let id = created["sandboxID"].as_str().unwrap();
    // `<port>-<id>.<domain>` is routed to the sandbox over the same TLS listener (the fake
    // backend's ports answer with the port they were asked on).
    let host = format!("8080-{id}.alcove.localhost");
    let c = client(&certs.ca, &[&host], addr);
    let r = c
        .get(format!("https://{host}:{port}/index.html"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["port"], 8080, "{body}");

    // Loopback may speak plain HTTP on the same port.
    let r = reqwest::Client::new()
        .get(format!("http://{addr}/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = stop.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
}
