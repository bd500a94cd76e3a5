//! Test harness: a real server on 127.0.0.1:0 over a fake backend, and a tiny HTTP client.

#![allow(dead_code)]

pub mod fake;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use alcove_api::{Limits, MeteringConfig, Server, ServerConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub use fake::FakeBackend;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub key: String,
    pub backend: Arc<FakeBackend>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn fast_limits() -> Limits {
    Limits {
        reaper_interval: Duration::from_millis(100),
        liveness_interval: Duration::from_millis(200),
        ..Limits::default()
    }
}

impl TestServer {
    pub async fn start(dir: &Path, backend: Arc<FakeBackend>, limits: Limits) -> TestServer {
        Self::start_with(dir, backend, limits, |s| s).await
    }

    /// [`TestServer::start`], with `mount` applied to the bound server (extra services).
    pub async fn start_with(
        dir: &Path,
        backend: Arc<FakeBackend>,
        limits: Limits,
        mount: impl FnOnce(Server) -> Server,
    ) -> TestServer {
        Self::start_metered(dir, backend, limits, MeteringConfig::default(), mount).await
    }

    /// [`TestServer::start_with`] with its metering (tick, prices, webhook).
    pub async fn start_metered(
        dir: &Path,
        backend: Arc<FakeBackend>,
        limits: Limits,
        metering: MeteringConfig,
        mount: impl FnOnce(Server) -> Server,
    ) -> TestServer {
        let mut config = ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir);
        config.database = Some(alcove_store::Database::from_test_env(dir));
        config.limits = limits;
        config.metering = metering;
        let server = mount(Server::bind(config, backend.clone()).await.expect("bind"));
        let key = std::fs::read_to_string(dir.join(alcove_api::API_KEY_FILE))
            .unwrap()
            .trim()
            .to_owned();
        let addr = server.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            key,
            backend,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task.take().unwrap()).await;
    }

    pub fn client(&self) -> Api {
        Api {
            base: format!("http://{}", self.addr),
            key: Some(self.key.clone()),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

/// A new team `name` in the server's database at `dir`, and a key of it: `(team id, key)`.
pub fn tenant(dir: &Path, name: &str) -> (String, String) {
    let store = alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir)).unwrap();
    let team = store.create_team(name).unwrap();
    let key = store.create_api_key(&team.id, "k").unwrap().secret;
    (team.id, key)
}

pub struct Api {
    pub base: String,
    pub key: Option<String>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub json: Value,
}

impl Api {
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            b = b.header("content-type", "application/json");
        }
        if let Some(k) = &self.key {
            b = b.header("X-API-KEY", k);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .client
            .request(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Reply {
            status,
            headers,
            json,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], vec![]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, &[], body.to_string().into_bytes())
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send("PUT", path, &[], body.to_string().into_bytes())
            .await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        self.send("DELETE", path, &[], vec![]).await
    }
}

/// Asserts an E2B error body: `code` equals the status, `error_code` is ours, message present.
pub fn assert_error(r: &Reply, status: u16, error_code: &str) {
    assert_eq!(r.status, status, "{:?}", r.json);
    assert_eq!(r.json["code"], status, "{:?}", r.json);
    assert_eq!(r.json["error_code"], error_code, "{:?}", r.json);
    assert!(r.json["message"].as_str().is_some_and(|m| m.len() > 10));
}
