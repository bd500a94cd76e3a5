//! The node's side of the link (`alcove node`): a TLS listener that answers the control plane's
//! calls and carries its sandbox traffic to this host's backend, and the heartbeat loop that
//! registers the node and reports its capacity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::path::PathBuf;

use alcove_api::backend::{BackendError, Body, BoxFuture, SandboxBackend};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::blobs::{Blobs, Kind};
use crate::link::{CONTROL_KEY_HEADER, NodeCert, Token};
use crate::wire::{
    Answer, BUILD_FILES_PREFIX, BUILD_PATH, BuildEvent, CALL_PATH, Call, EGRESS_PATH, ERROR_HEADER,
    EgressBatch, EgressReceipt, FORWARD_PREFIX, HEARTBEAT_PATH, Heartbeat, HeartbeatAnswer,
    PORT_HEADER, SANDBOX_HEADER, SECRET_PATH, SecretAnswer, SecretRequest, WireError,
};

/// Largest call body (a create with its env vars and network rules).
const MAX_CALL_BODY: usize = 4 << 20;
/// Connections the listener holds at once (the control plane's replicas need a few each).
const MAX_CONNECTIONS: usize = 512;
/// Bound on a TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Bound on gathering what a heartbeat reports, and on sending it.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(5);

/// Largest `COPY` archive a build may bring to this node (the control plane's own upload
/// limit, 1 GiB by default, is normally the smaller).
const MAX_BUILD_FILE: u64 = 8 << 30;

#[derive(Clone)]
struct NodeState {
    backend: Arc<dyn SandboxBackend>,
    token: Token,
    moves: Option<Moves>,
    /// What the heartbeats announce as `draining` ([`Registration::draining`]).
    draining: Arc<AtomicBool>,
    /// Where the `COPY` archives of builds run here are kept, a directory per build
    /// (`<data>/build-files/<build id>/<files hash>`): never shared between builds, since a
    /// files hash is the uploader's word, not checked against the content.
    build_files: PathBuf,
}

/// Files leaving a host for the blob store, and the scratch dir made for them (removed once
/// they are uploaded).
#[derive(Debug)]
pub struct Outgoing {
    pub files: Vec<(String, PathBuf)>,
    pub scratch: Option<PathBuf>,
}

/// What a host gives for its paused sandboxes and snapshots to move between nodes.
pub trait HostFiles: Send + Sync + 'static {
    /// The files of paused sandbox or snapshot `id`, or why it cannot move.
    fn outgoing<'a>(
        &'a self,
        kind: Kind,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Outgoing, BackendError>>;
    /// An empty place for the files of `id` coming from another node; `None` when this host
    /// has it already (a snapshot).
    fn incoming_dir(&self, kind: Kind, id: &str) -> Result<Option<PathBuf>, BackendError>;
    /// Takes in `id`, whose files are complete in its incoming dir.
    fn adopt<'a>(&'a self, kind: Kind, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>>;
}

/// Moving paused sandboxes and snapshots: the host's files and the cluster's blob store.
#[derive(Clone)]
pub struct Moves {
    pub host: Arc<dyn HostFiles>,
    pub blobs: Blobs,
}

impl Moves {
    /// Uploads `id` (checksummed); answers the bytes.
    async fn export(&self, kind: Kind, id: &str) -> Result<u64, BackendError> {
        let out = self.host.outgoing(kind, id).await?;
        let put = self.blobs.put(kind, id, &out.files).await;
        if let Some(d) = &out.scratch {
            let _ = tokio::fs::remove_dir_all(d).await;
        }
        let m = put.map_err(BackendError::from)?;
        Ok(m.files.iter().map(|f| f.size).sum())
    }

    /// Downloads `id` (each file checked) and takes it in; a snapshot this host has already
    /// is not downloaded again.
    async fn import(&self, kind: Kind, id: &str) -> Result<(), BackendError> {
        let Some(dir) = self.host.incoming_dir(kind, id)? else {
            return Ok(());
        };
        // What an earlier, failed import left.
        let _ = tokio::fs::remove_dir_all(&dir).await;
        self.blobs
            .get(kind, id, &dir)
            .await
            .map_err(BackendError::from)?;
        let adopted = self.host.adopt(kind, id).await;
        if adopted.is_err() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        adopted
    }
}

/// The link listener's routes: `POST /node/v1/call`, template builds (`POST /node/v1/build`,
/// their archives put under `/node/v1/build-files/`, kept in `build_files`) and
/// `/node/v1/forward/…`, each refused without the control plane's key. With `moves`, paused
/// sandboxes can leave and arrive.
pub fn router(
    backend: Arc<dyn SandboxBackend>,
    token: Token,
    moves: Option<Moves>,
    draining: Arc<AtomicBool>,
    build_files: PathBuf,
) -> Router {
    let state = NodeState {
        backend,
        token,
        moves,
        draining,
        build_files,
    };
    Router::new()
        .route(CALL_PATH, axum::routing::post(call))
        .route(BUILD_PATH, axum::routing::post(build))
        .layer(DefaultBodyLimit::max(MAX_CALL_BODY))
        .route(
            &format!("{BUILD_FILES_PREFIX}{{build}}/{{hash}}"),
            axum::routing::put(put_build_file),
        )
        .fallback(forward)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_control_key,
        ))
        .with_state(state)
}

async fn require_control_key(
    State(s): State<NodeState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if req.uri().path() == crate::wire::NODE_HEALTH_PATH && req.method() == http::Method::GET {
        return "ok\n".into_response();
    }
    let ok = req
        .headers()
        .get(CONTROL_KEY_HEADER)
        .is_some_and(|v| s.token.is_control_key(v.as_bytes()));
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            "this is an Alcove node's cluster link: calls need the control plane's key \
             (the same cluster token on both sides)",
        )
            .into_response();
    }
    next.run(req).await
}

fn json(v: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => ([(http::header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn call(State(s): State<NodeState>, body: Bytes) -> Response {
    let call: Call = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a cluster call this node understands: {e}"),
            )
                .into_response();
        }
    };
    let r = match (call.movement(), &s.moves) {
        (Some((true, kind, id)), Some(m)) => value(m.export(kind, id).await),
        (Some((false, kind, id)), Some(m)) => value(m.import(kind, id).await),
        (Some(_), None) => Err(no_blobs()),
        (None, _) if matches!(call, Call::Drain) => {
            if !s.draining.swap(true, Ordering::Relaxed) {
                tracing::info!("draining: this node takes no new sandboxes");
            }
            Ok(serde_json::Value::Bool(true))
        }
        (None, _) => dispatch(s.backend.as_ref(), call).await,
    };
    match r {
        Ok(v) => json(&Answer::Ok(v)),
        Err(e) => json(&Answer::Err(WireError::from(&e))),
    }
}

/// A template build on this host's backend, its events streamed back a line each: log lines
/// as they come, then the outcome. The build runs in a task of its own, stopped when the
/// answer is dropped (the control plane gave up or went away), which kills its builder VM.
async fn build(State(s): State<NodeState>, body: Bytes) -> Response {
    let mut spec: alcove_build_spec::BuildSpec = match serde_json::from_slice(&body) {
        Ok(spec) => spec,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("not a build this node understands: {e}"),
            )
                .into_response();
        }
    };
    let Some(files) = build_dir(&s.build_files, &spec.build_id) else {
        return (StatusCode::BAD_REQUEST, "a build id is a UUID").into_response();
    };
    // The archives were put here beforehand (`put_build_file`); they go with the build.
    spec.files_dir = files.clone();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<BuildEvent>();
    let log: alcove_build_spec::BuildLog = {
        let tx = tx.clone();
        Arc::new(move |entry| {
            let _ = tx.send(BuildEvent::Log { entry });
        })
    };
    let backend = Arc::clone(&s.backend);
    let task = tokio::spawn(async move {
        // Removes the build's archives when the build ends, or is stopped.
        struct Files(PathBuf);
        impl Drop for Files {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let _files = Files(files);
        let event = match backend.build_template(spec, log).await {
            Ok(template) => BuildEvent::Built { template },
            Err(failure) => BuildEvent::Failed { failure },
        };
        let _ = tx.send(event);
    });
    /// Stops the build when the answer (and with it this guard) is dropped before the end.
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let lines = futures::stream::unfold((rx, AbortOnDrop(task)), |(mut rx, guard)| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        Some((
            Ok::<_, std::convert::Infallible>(Bytes::from(line)),
            (rx, guard),
        ))
    });
    (
        [(http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// The directory of build `build_id`'s archives, or `None` for an id that is not a UUID's
/// characters (it names a directory).
fn build_dir(root: &std::path::Path, build_id: &str) -> Option<PathBuf> {
    crate::wire::valid_build_id(build_id).then(|| root.join(build_id))
}

/// A `COPY` archive for build `build` on this node, streamed to
/// `<build_files>/<build>/<hash>` (written aside, then renamed into place, so a build never
/// reads half of one).
async fn put_build_file(
    State(s): State<NodeState>,
    axum::extract::Path((build, hash)): axum::extract::Path<(String, String)>,
    body: axum::body::Body,
) -> Response {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let dir = build_dir(&s.build_files, &build);
    let Some(dir) = dir.filter(|_| {
        !hash.is_empty() && hash.len() <= 128 && hash.chars().all(|c| c.is_ascii_hexdigit())
    }) else {
        return (
            StatusCode::BAD_REQUEST,
            "a build file is named by its build's id (a UUID) and its files hash (hex)",
        )
            .into_response();
    };
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{what} {}: {e}", dir.display()),
        )
            .into_response()
    };
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        return failed("creating", &e);
    }
    let dest = dir.join(&hash);
    let part = dir.join(format!(".{hash}.{}.part", rand::random::<u64>()));
    let mut file = match tokio::fs::File::create(&part).await {
        Ok(f) => f,
        Err(e) => return failed("writing in", &e),
    };
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    let outcome: Result<(), Response> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    format!("the build file's upload broke: {e}"),
                )
                    .into_response()
            })?;
            written += chunk.len() as u64;
            if written > MAX_BUILD_FILE {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("a build file may be at most {MAX_BUILD_FILE} bytes"),
                )
                    .into_response());
            }
            file.write_all(&chunk)
                .await
                .map_err(|e| failed("writing in", &e))?;
        }
        file.sync_all()
            .await
            .map_err(|e| failed("writing in", &e))?;
        tokio::fs::rename(&part, &dest)
            .await
            .map_err(|e| failed("writing in", &e))
    }
    .await;
    match outcome {
        Ok(()) => {
            let root = s.build_files.clone();
            tokio::task::spawn_blocking(move || sweep_build_files(&root, BUILD_FILE_KEPT));
            (StatusCode::NO_CONTENT, "").into_response()
        }
        Err(r) => {
            let _ = tokio::fs::remove_file(&part).await;
            r
        }
    }
}

/// How long the archives of a build that never started (its call never came) stay: longer
/// than any build waits for its turn and runs.
const BUILD_FILE_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Removes the build directories last written more than `kept` ago (a build removes its own
/// when it ends).
fn sweep_build_files(root: &std::path::Path, kept: Duration) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > kept);
        if old {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn no_blobs() -> BackendError {
    BackendError::Failed {
        op: "move a paused sandbox, snapshot or template",
        source: "this node has no blob store: start it with --blob-store, the control plane's"
            .into(),
    }
}

fn value<T: serde::Serialize>(
    r: Result<T, BackendError>,
) -> Result<serde_json::Value, BackendError> {
    r.map(|v| serde_json::to_value(v).unwrap_or(serde_json::Value::Null))
}

/// Runs one call against this host's backend.
pub async fn dispatch(
    b: &dyn SandboxBackend,
    call: Call,
) -> Result<serde_json::Value, BackendError> {
    match call {
        Call::Templates => value(b.templates().await),
        Call::Create { req } => value(b.create(*req).await),
        Call::Kill { sandbox_id } => value(b.kill(&sandbox_id).await),
        Call::List => value(b.list().await),
        Call::Status { sandbox_id } => value(b.status(&sandbox_id).await),
        Call::Metrics { sandbox_id } => value(b.metrics(&sandbox_id).await),
        Call::Logs { sandbox_id } => value(b.logs(&sandbox_id).await),
        Call::UpdateNetwork {
            sandbox_id,
            network,
        } => value(b.update_network(&sandbox_id, network).await),
        Call::WarmPool => value(b.warm_pool().await),
        Call::Network { sandbox_id } => value(b.network(&sandbox_id).await),
        Call::Pause { sandbox_id, keep } => value(b.pause(&sandbox_id, keep).await),
        Call::Resume { sandbox_id, from } => value(b.resume(&sandbox_id, from).await),
        Call::Snapshot {
            sandbox_id,
            snapshot_id,
            keep,
        } => value(b.snapshot(&sandbox_id, &snapshot_id, keep).await),
        Call::DeleteSnapshot { snapshot_id } => value(b.delete_snapshot(&snapshot_id).await),
        Call::StoredBytesEach {
            sandbox_ids,
            snapshot_ids,
        } => value(b.stored_bytes_each(&sandbox_ids, &snapshot_ids).await),
        Call::NetCounters { sandbox_ids } => value(b.net_counters(&sandbox_ids).await),
        Call::Exec { sandbox_id, req } => value(b.exec(&sandbox_id, req).await),
        Call::KillAll => value(kill_all(b).await),
        Call::DeleteTemplate { key } => value(b.delete_template(&key).await),
        Call::Export { .. }
        | Call::Import { .. }
        | Call::ExportSnapshot { .. }
        | Call::ImportSnapshot { .. }
        | Call::ExportTemplate { .. }
        | Call::ImportTemplate { .. } => Err(no_blobs()),
        Call::Drain => Err(BackendError::Unsupported { op: "drain" }),
    }
}

/// Kills every sandbox this host has (paused ones included); answers how many went.
pub async fn kill_all(b: &dyn SandboxBackend) -> Result<usize, BackendError> {
    let all = b.list().await?;
    let n = all.len();
    futures::future::join_all(all.iter().map(|s| b.kill(&s.sandbox_id))).await;
    Ok(n)
}

/// Sandbox traffic: `/node/v1/forward<original path and query>`, the sandbox and port in
/// headers of their own (removed before the request goes on).
async fn forward(State(s): State<NodeState>, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let Some(rest) = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .and_then(|pq| pq.strip_prefix(FORWARD_PREFIX))
        .filter(|r| r.starts_with('/'))
        .map(str::to_owned)
    else {
        return (StatusCode::NOT_FOUND, "no such route on the node link").into_response();
    };
    let sandbox = parts
        .headers
        .remove(SANDBOX_HEADER)
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let port = parts
        .headers
        .remove(PORT_HEADER)
        .and_then(|v| v.to_str().ok().and_then(|p| p.parse::<u16>().ok()));
    parts.headers.remove(CONTROL_KEY_HEADER);
    let (Some(sandbox), Some(port)) = (sandbox, port) else {
        return (
            StatusCode::BAD_REQUEST,
            "a forwarded request names its sandbox and port in headers",
        )
            .into_response();
    };
    parts.uri = match rest.parse() {
        Ok(u) => u,
        Err(_) => return (StatusCode::BAD_REQUEST, "bad forwarded path").into_response(),
    };
    let req = http::Request::from_parts(parts, Body::new(body));
    match s.backend.forward(&sandbox, port, req).await {
        Ok(resp) => resp.into_response(),
        Err(e) => {
            let wire = serde_json::to_string(&WireError::from(&e)).unwrap_or_default();
            let mut r = (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
            if let Ok(v) = HeaderValue::from_str(&wire) {
                r.headers_mut().insert(ERROR_HEADER, v);
            }
            r
        }
    }
}

/// Serves the link on `listener` over TLS with `cert` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cert: &NodeCert,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), crate::link::LinkError> {
    serve_with(listener, Some(cert.server_config()?), app, shutdown).await;
    Ok(())
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown` completes: at most
/// [`MAX_CONNECTIONS`] at once, handshakes and request heads under deadlines. The node's link
/// and the control plane's cluster listener both run on it.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let service = hyper_util::service::TowerToHyperService::new(app);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster link: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::warn!(%peer, "cluster link: too many connections, closing one");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            b.http1()
                .header_read_timeout(Duration::from_secs(30))
                .timer(hyper_util::rt::TokioTimer::new());
            b.http2()
                .max_concurrent_streams(4096)
                .keep_alive_interval(Duration::from_secs(20))
                .timer(hyper_util::rt::TokioTimer::new());
            let served = match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "cluster link: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    b.serve_connection_with_upgrades(TokioIo::new(tls), service)
                        .await
                }
                None => {
                    b.serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "cluster link: connection ended");
            }
        });
    }
}

/// Who the node is and where it reports.
#[derive(Debug, Clone)]
pub struct Registration {
    pub node_id: String,
    /// The link listener as the control plane reaches it (`https://host:port`).
    pub url: String,
    pub cert_sha256: String,
    /// The control plane's cluster listener (`http(s)://host:port`).
    pub server: String,
    pub token: Token,
    /// Set by `alcove node drain`'s signal: the node stops taking new sandboxes.
    pub draining: Arc<AtomicBool>,
}

/// The heartbeat client: the control plane may be plain HTTP only on loopback (heartbeats are
/// signed, never secret, but its answers are trusted), else HTTPS verified by the host's roots
/// plus `extra_ca` (PEM), e.g. the CA of `alcove tls init`.
pub fn heartbeat_client(server: &str, extra_ca: Option<&[u8]>) -> Result<reqwest::Client, String> {
    let url = reqwest::Url::parse(server).map_err(|e| format!("--server {server}: {e}"))?;
    let host = url.host_str().unwrap_or("").trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(format!(
            "--server {server}: use https:// (plain http is allowed only to a loopback address)"
        ));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(HEARTBEAT_DEADLINE);
    if let Some(pem) = extra_ca {
        let ca = reqwest::Certificate::from_pem(pem).map_err(|e| format!("--server-ca: {e}"))?;
        b = b.add_root_certificate(ca);
    }
    b.build().map_err(|e| format!("the heartbeat client: {e}"))
}

/// Secret values for this node's egress proxy (network rules' placeholders), asked of the
/// control plane: each replica in turn until one answers. Requests and answers are signed with
/// the cluster token; a value travels only over the link to the control plane (https off
/// loopback), and the control plane gives it only for a sandbox it knows to run on this node.
pub struct ControlPlaneSecrets {
    node_id: String,
    token: Token,
    /// Each replica's secret URL and client.
    servers: Vec<(String, reqwest::Client)>,
}

impl ControlPlaneSecrets {
    /// `servers`: the control-plane replicas (`--server`) with their heartbeat clients.
    pub fn new(
        node_id: String,
        token: Token,
        servers: Vec<(String, reqwest::Client)>,
    ) -> ControlPlaneSecrets {
        let servers = servers
            .into_iter()
            .map(|(s, c)| (format!("{}{SECRET_PATH}", s.trim_end_matches('/')), c))
            .collect();
        ControlPlaneSecrets {
            node_id,
            token,
            servers,
        }
    }
}

impl alcove_net::secrets::SecretSource for ControlPlaneSecrets {
    fn resolve<'a>(
        &'a self,
        sandbox_id: &'a str,
        name: &'a str,
    ) -> alcove_net::secrets::Resolving<'a> {
        use alcove_net::secrets::SecretLookupError as E;
        Box::pin(async move {
            let req = SecretRequest {
                node_id: self.node_id.clone(),
                sandbox_id: sandbox_id.to_owned(),
                name: name.to_owned(),
            };
            let body = serde_json::to_vec(&req).map_err(|e| E::Unavailable(e.to_string()))?;
            let mut last = String::from("no control plane is configured");
            for (url, client) in &self.servers {
                let ask = post_signed::<SecretAnswer>(client, url, &self.token, body.clone());
                let asked = tokio::time::timeout(HEARTBEAT_DEADLINE, ask).await;
                match asked {
                    Ok(Ok(SecretAnswer::Value { hex })) => {
                        return hex::decode(hex)
                            .map(zeroize::Zeroizing::new)
                            .map_err(|e| E::Unavailable(format!("a bad value: {e}")));
                    }
                    Ok(Ok(SecretAnswer::NotFound)) => return Err(E::NotFound(name.to_owned())),
                    Ok(Ok(SecretAnswer::Refused { reason })) => last = reason,
                    Ok(Err(e)) => last = e,
                    Err(_) => last = "no answer within 5 s".into(),
                }
            }
            Err(E::Unavailable(format!("the control plane: {last}")))
        })
    }
}

/// Most egress events kept while no control plane takes them (older ones are dropped first).
const EGRESS_BACKLOG: usize = 10_000;
/// Most egress events in one batch.
const EGRESS_BATCH: usize = 500;

/// Sends this node's egress events (`rx`: the egress proxy's) to the control plane for its audit
/// log, in signed batches every half second, each replica in turn until one takes a batch.
/// While none does, the newest [`EGRESS_BACKLOG`] wait. Ends when the proxy's side closes.
pub async fn forward_egress(
    mut rx: tokio::sync::mpsc::Receiver<alcove_net::EgressEvent>,
    node_id: String,
    token: Token,
    servers: Vec<(String, reqwest::Client)>,
) {
    let urls: Vec<(String, reqwest::Client)> = servers
        .into_iter()
        .map(|(s, c)| (format!("{}{EGRESS_PATH}", s.trim_end_matches('/')), c))
        .collect();
    let mut backlog = std::collections::VecDeque::new();
    let mut dropped = 0u64;
    let mut failing = false;
    loop {
        if backlog.is_empty() {
            match rx.recv().await {
                Some(ev) => backlog.push_back(ev),
                None => return,
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Ok(ev) = rx.try_recv() {
            backlog.push_back(ev);
            if backlog.len() > EGRESS_BACKLOG {
                backlog.pop_front();
                dropped += 1;
            }
        }
        while !backlog.is_empty() {
            let n = backlog.len().min(EGRESS_BATCH);
            let batch = EgressBatch {
                node_id: node_id.clone(),
                events: backlog.iter().take(n).cloned().collect(),
            };
            let Ok(body) = serde_json::to_vec(&batch) else {
                backlog.drain(..n);
                continue;
            };
            let mut last = String::new();
            let mut sent = false;
            for (url, client) in &urls {
                let post = post_signed::<EgressReceipt>(client, url, &token, body.clone());
                match tokio::time::timeout(HEARTBEAT_DEADLINE, post).await {
                    Ok(Ok(_)) => {
                        sent = true;
                        break;
                    }
                    Ok(Err(e)) => last = format!("{url}: {e}"),
                    Err(_) => last = format!("{url}: no answer within 5 s"),
                }
            }
            if !sent {
                if !failing {
                    tracing::warn!(error = %last, waiting = backlog.len(), "egress events: no control plane takes them; kept and retried");
                    failing = true;
                }
                break;
            }
            failing = false;
            backlog.drain(..n);
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "egress events dropped: more waited than the backlog holds"
            );
            dropped = 0;
        }
    }
}

/// Sends a heartbeat every `interval` until the task is dropped. A `reset` answer (the control
/// plane declared this node lost) kills every sandbox here first.
pub async fn heartbeats(
    backend: Arc<dyn SandboxBackend>,
    reg: Registration,
    client: reqwest::Client,
    interval: Duration,
) {
    let url = format!("{}{HEARTBEAT_PATH}", reg.server.trim_end_matches('/'));
    let mut failing = false;
    let mut wait = interval;
    loop {
        let sent = tokio::time::timeout(HEARTBEAT_DEADLINE, beat(&*backend, &reg, &client, &url))
            .await
            .unwrap_or_else(|_| Err("no answer within 5 s".into()));
        match sent {
            Ok(answer) => {
                if failing {
                    tracing::info!(server = %reg.server, "heartbeats reach the control plane again");
                    failing = false;
                }
                if answer.reset {
                    match kill_all(&*backend).await {
                        Ok(n) => tracing::warn!(
                            killed = n,
                            "the control plane had declared this node lost and reported its \
                             sandboxes so: they were killed"
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, "killing the sandboxes after a reset")
                        }
                    }
                }
                if answer.interval_ms > 0 {
                    wait = Duration::from_millis(answer.interval_ms.clamp(100, 10_000));
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(server = %reg.server, error = %e, "heartbeat failed; retrying");
                    failing = true;
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

async fn beat(
    b: &dyn SandboxBackend,
    reg: &Registration,
    client: &reqwest::Client,
    url: &str,
) -> Result<HeartbeatAnswer, String> {
    let host = b
        .host_info()
        .ok_or("this backend does not describe its host")?;
    let templates = b.templates().await.map_err(|e| e.to_string())?;
    let warm = b
        .warm_pool()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| p.ready > 0)
        .map(|p| p.template_id)
        .collect();
    let hb = Heartbeat {
        node_id: reg.node_id.clone(),
        url: reg.url.clone(),
        cert_sha256: reg.cert_sha256.clone(),
        host,
        templates,
        warm,
        draining: reg.draining.load(Ordering::Relaxed),
        built: b.built_templates().await.map_err(|e| e.to_string())?,
        sandboxes: b
            .list()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|l| l.sandbox_id)
            .collect(),
    };
    let body = serde_json::to_vec(&hb).map_err(|e| e.to_string())?;
    // The answer can order this node to kill its sandboxes: only a signed one is obeyed.
    post_signed(client, url, &reg.token, body).await
}

/// POSTs `body` to the control plane at `url`, signed with `token`, and answers its JSON
/// answer, which must be signed with the same token.
async fn post_signed<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    token: &Token,
    body: Vec<u8>,
) -> Result<T, String> {
    let resp = client
        .post(url)
        .header(crate::link::SIGNATURE_HEADER, token.sign(&body))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = resp.status();
    let sig = resp
        .headers()
        .get(crate::link::SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("the control plane answered {status}: {text}"));
    }
    token
        .verify(&sig, text.as_bytes(), std::time::SystemTime::now())
        .map_err(|why| {
            format!("the control plane's answer is not signed by the cluster token: {why}")
        })?;
    serde_json::from_str(&text).map_err(|e| format!("the control plane's answer: {e}"))
}
