//! The control plane's client of one node over the link: calls as JSON over HTTP/2, sandbox
//! traffic streamed both ways (HTTP/2; upgrades such as WebSockets over HTTP/1.1), TLS to the
//! node's pinned certificate, the control key on every request.

use std::time::Duration;

use alcove_api::backend::{BackendError, Body};
use http::{HeaderValue, Version};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::link::{CONTROL_KEY_HEADER, LinkError, Token, pinned_client_config};
use crate::wire::{
    Answer, BUILD_FILES_PREFIX, BUILD_PATH, BuildEvent, CALL_PATH, Call, ERROR_HEADER,
    FORWARD_PREFIX, NodeFailure, PORT_HEADER, SANDBOX_HEADER, WireError,
};

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Largest call answer read from a node (a list of thousands of sandboxes, logs).
const MAX_ANSWER: usize = 64 << 20;
/// Longest line of a build's answer (a log line, the outcome).
const MAX_BUILD_LINE: usize = 1 << 20;
/// Bound on joining both upgraded sides after a 101.
const UPGRADE_JOIN: Duration = Duration::from_secs(30);

pub struct RemoteNode {
    pub id: String,
    pub url: String,
    pub cert_sha256: String,
    key: HeaderValue,
    h2: Client<Connector, Body>,
    h1: Client<Connector, Body>,
}

fn link_failed(node: &str, what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed {
        op: "a call to a cluster node",
        source: Box::new(NodeFailure {
            node: node.to_owned(),
            op: what.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// A node's refusal as text: its status and (the start of) its body.
async fn refusal(status: http::StatusCode, body: hyper::body::Incoming) -> String {
    let bytes = http_body_util::Limited::new(body, 64 << 10)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    format!("{status}: {}", String::from_utf8_lossy(&bytes))
}

/// `Connection: upgrade` with an `Upgrade` header.
fn wants_upgrade(h: &http::HeaderMap) -> bool {
    h.contains_key(http::header::UPGRADE)
        && h.get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

impl RemoteNode {
    pub fn new(id: &str, url: &str, cert_sha256: &str, token: &Token) -> Result<Self, LinkError> {
        let tls = pinned_client_config(cert_sha256)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        let h2c = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_http2()
            .wrap_connector(http.clone());
        let h1c = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .timer(hyper_util::rt::TokioTimer::new());
        Ok(RemoteNode {
            id: id.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            cert_sha256: cert_sha256.to_owned(),
            key: HeaderValue::from_str(token.control_key()).expect("hex is a header value"),
            h2: h2.build(h2c),
            h1: Client::builder(TokioExecutor::new()).build(h1c),
        })
    }

    /// A request to `path` on this node's link: HTTP/2, with the control key.
    fn request(&self, method: http::Method, path: &str) -> http::request::Builder {
        http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .version(Version::HTTP_2)
            .header(CONTROL_KEY_HEADER, self.key.clone())
    }

    /// One call, its answer read within `deadline`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        call: &Call,
        deadline: Duration,
    ) -> Result<T, BackendError> {
        let body = serde_json::to_vec(call).map_err(|e| link_failed(&self.id, "encode", e))?;
        let req = self
            .request(http::Method::POST, CALL_PATH)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .map_err(|e| link_failed(&self.id, "build a call", e))?;
        let exchange = async {
            let resp = self.h2.request(req).await.map_err(|e| {
                link_failed(&self.id, "reach the node", alcove_api::error::chain(&e))
            })?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| link_failed(&self.id, "read the answer", e))?
                .to_bytes();
            if !status.is_success() {
                return Err(link_failed(
                    &self.id,
                    "call",
                    format!("{status}: {}", String::from_utf8_lossy(&bytes)),
                ));
            }
            let answer: Answer = serde_json::from_slice(&bytes)
                .map_err(|e| link_failed(&self.id, "decode the answer", e))?;
            match answer {
                Answer::Ok(v) => serde_json::from_value(v)
                    .map_err(|e| link_failed(&self.id, "decode the answer", e)),
                Answer::Err(w) => Err(w.into_backend(&self.id)),
            }
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .unwrap_or(Err(BackendError::Timeout))
    }

    /// Puts the `COPY` archive at `path` on this node as file `hash` of build `build_id`.
    pub async fn put_build_file(
        &self,
        build_id: &str,
        hash: &str,
        path: &std::path::Path,
        deadline: Duration,
    ) -> Result<(), BackendError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| link_failed(&self.id, "read a build file", e))?;
        let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
        let req = self
            .request(
                http::Method::PUT,
                &format!("{BUILD_FILES_PREFIX}{build_id}/{hash}"),
            )
            .body(body)
            .map_err(|e| link_failed(&self.id, "build a request", e))?;
        let exchange = async {
            let resp = self.h2.request(req).await.map_err(|e| {
                link_failed(&self.id, "reach the node", alcove_api::error::chain(&e))
            })?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            Err(link_failed(
                &self.id,
                "put a build file",
                refusal(status, resp.into_body()).await,
            ))
        };
        tokio::time::timeout(deadline, exchange)
            .await
            .unwrap_or(Err(BackendError::Timeout))
    }

    /// Runs template build `spec` on this node: its log lines go to `log` as they come, and the
    /// outcome is the node's, or the link's failure as a failure of the build's `base` step.
    /// The build's own deadline bounds it, plus `margin`; dropping this future stops it on the
    /// node.
    pub async fn build(
        &self,
        spec: &alcove_build_spec::BuildSpec,
        log: &alcove_build_spec::BuildLog,
        margin: Duration,
    ) -> Result<alcove_build_spec::BuiltTemplate, alcove_build_spec::BuildFailure> {
        use alcove_build_spec::{BuildFailure, StepRef};
        let failed = |message: String| BuildFailure {
            step: StepRef::Base,
            message: format!("the build on cluster node {}: {message}", self.id),
        };
        let body = serde_json::to_vec(spec).map_err(|e| failed(e.to_string()))?;
        let req = self
            .request(http::Method::POST, BUILD_PATH)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .map_err(|e| failed(e.to_string()))?;
        let exchange = async {
            let resp = self.h2.request(req).await.map_err(|e| {
                failed(format!(
                    "could not reach the node: {}",
                    alcove_api::error::chain(&e)
                ))
            })?;
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                return Err(failed(refusal(status, body).await));
            }
            // One event per line; a line is bounded (a log line is, and so is the outcome).
            let mut pending: Vec<u8> = Vec::new();
            loop {
                let frame = match body.frame().await {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => {
                        return Err(failed(format!("the link broke during the build: {e}")));
                    }
                    None => {
                        return Err(failed(
                            "the node ended the build's answer without an outcome".into(),
                        ));
                    }
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                pending.extend_from_slice(&data);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    match serde_json::from_slice::<BuildEvent>(&line) {
                        Ok(BuildEvent::Log { entry }) => log(entry),
                        Ok(BuildEvent::Built { template }) => return Ok(template),
                        Ok(BuildEvent::Failed { failure }) => return Err(failure),
                        Err(e) => {
                            return Err(failed(format!("an answer line it sent: {e}")));
                        }
                    }
                }
                if pending.len() > MAX_BUILD_LINE {
                    return Err(failed("it sent a line longer than allowed".into()));
                }
            }
        };
        tokio::time::timeout(spec.deadline + margin, exchange)
            .await
            .unwrap_or_else(|_| Err(failed("no outcome within the build's deadline".into())))
    }

    /// Sandbox traffic to `port` in `sandbox_id` on this node, streamed both ways.
    pub async fn forward(
        &self,
        sandbox_id: &str,
        port: u16,
        req: http::Request<Body>,
    ) -> Result<http::Response<Body>, BackendError> {
        let (mut parts, body) = req.into_parts();
        let upgrade = wants_upgrade(&parts.headers);
        let incoming = if upgrade {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = format!("{}{FORWARD_PREFIX}{pq}", self.url)
            .parse()
            .map_err(|e| link_failed(&self.id, "build a forwarded request", e))?;
        parts.version = if upgrade {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        };
        let h = &mut parts.headers;
        h.insert(CONTROL_KEY_HEADER, self.key.clone());
        h.insert(
            SANDBOX_HEADER,
            HeaderValue::from_str(sandbox_id).map_err(|_| BackendError::SandboxNotFound)?,
        );
        h.insert(PORT_HEADER, HeaderValue::from(port));
        if !upgrade {
            // Connection-specific headers have no place in HTTP/2.
            for name in ["connection", "keep-alive", "proxy-connection", "upgrade"] {
                h.remove(name);
            }
        }
        let req = http::Request::from_parts(parts, body);
        let client = if upgrade { &self.h1 } else { &self.h2 };
        let mut resp = client
            .request(req)
            .await
            .map_err(|e| link_failed(&self.id, "reach the node", alcove_api::error::chain(&e)))?;
        if let Some(err) = resp.headers().get(ERROR_HEADER) {
            let w: WireError = serde_json::from_slice(err.as_bytes())
                .map_err(|e| link_failed(&self.id, "decode the node's forward error", e))?;
            return Err(w.into_backend(&self.id));
        }
        if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS
            && let Some(incoming) = incoming
        {
            let outgoing = hyper::upgrade::on(&mut resp);
            let node = self.id.clone();
            tokio::spawn(async move {
                let joined = tokio::time::timeout(UPGRADE_JOIN, async {
                    tokio::try_join!(incoming, outgoing)
                })
                .await;
                let (a, b) = match joined {
                    Ok(Ok(x)) => x,
                    Ok(Err(e)) => {
                        tracing::debug!(node, error = %e, "upgrade through the node link failed");
                        return;
                    }
                    Err(_) => return,
                };
                let mut a = hyper_util::rt::TokioIo::new(a);
                let mut b = hyper_util::rt::TokioIo::new(b);
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
        Ok(resp.map(Body::new))
    }
}
