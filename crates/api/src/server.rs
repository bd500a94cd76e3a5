//! Starting the server: data directory, first-start admin key, secrets key and volumes, template
//! sync, reconcile, the router, and the reaper. [`serve`] is the one-call entry point;
//! [`Server::bind`] + [`Server::run`] let callers (the CLI, tests) see the bound address and
//! first-start key.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};

use alcove_store::Store;
use tracing::Instrument;

use crate::backend::SandboxBackend;
use crate::config::{Limits, ServerConfig};
use crate::error::{ApiError, ErrorCause, chain};
use crate::handlers::{self, AppState, BodyLimit};
use crate::metrics::METRICS;
use crate::proxy;
use crate::service::Service;

/// File in the data directory holding the first admin key.
pub const API_KEY_FILE: &str = "api-key";
/// Directory in the data directory holding the volumes, one directory each.
pub const VOLUMES_DIR: &str = "volumes";

/// The volumes' registry of a server with this data directory (`<data_dir>/volumes`). A binary
/// that needs it before the server exists (the node mounts volumes in guests) makes it with
/// this and hands the same `Arc` to [`Server::bind_with_volumes`]: one registry per process
/// keeps one usage count per volume.
pub fn volumes_registry(
    data_dir: &Path,
    limits: alcove_volume::Limits,
) -> Arc<alcove_volume::Volumes> {
    alcove_volume::Volumes::new(data_dir.join(VOLUMES_DIR), limits)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("creating the data directory {0}")]
    CreateDataDir(PathBuf, #[source] std::io::Error),
    #[error("opening the store")]
    OpenStore(#[source] alcove_store::StoreError),
    #[error("creating the admin team and key")]
    Bootstrap(#[source] alcove_store::StoreError),
    #[error("writing the admin key to {0}")]
    WriteApiKey(PathBuf, #[source] std::io::Error),
    #[error("loading the secrets key")]
    SecretsKey(#[source] crate::secrets::KeyError),
    #[error("reconciling stored sandboxes with the backend")]
    Reconcile,
    #[error("binding {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("serving")]
    Serve(#[source] std::io::Error),
}

/// A bound, not yet serving, server.
pub struct Server {
    listener: tokio::net::TcpListener,
    svc: Arc<Service>,
    config: ServerConfig,
    local_addr: SocketAddr,
    first_start_key: Option<String>,
    /// Services the binary mounts beside the API ([`Server::mount_authenticated`]).
    extra: Option<Router<AppState>>,
    /// The egress proxy's connection records, for the audit log.
    egress_events: Option<tokio::sync::mpsc::Receiver<alcove_net::EgressEvent>>,
}

impl Server {
    /// Opens the data directory and store, creates the admin key on first start, syncs
    /// templates from the backend, reconciles stored sandboxes, and binds the listener. Volumes
    /// live in `<data_dir>/volumes` with `config.limits.volumes`.
    pub async fn bind(
        config: ServerConfig,
        backend: Arc<dyn SandboxBackend>,
    ) -> Result<Server, ServeError> {
        let volumes = volumes_registry(&config.data_dir, config.limits.volumes);
        Self::bind_with_volumes(config, backend, volumes).await
    }

    /// [`Server::bind`] over a volumes registry the caller shares (with the node): make it with
    /// [`volumes_registry`].
    pub async fn bind_with_volumes(
        config: ServerConfig,
        backend: Arc<dyn SandboxBackend>,
        volumes: Arc<alcove_volume::Volumes>,
    ) -> Result<Server, ServeError> {
        create_private_dir(&config.data_dir)
            .map_err(|e| ServeError::CreateDataDir(config.data_dir.clone(), e))?;
        let db = config.database();
        let data_dir = config.data_dir.clone();
        // Both block (Postgres' client too), so they run off the async workers.
        let (store, first_start_key) = tokio::task::spawn_blocking(move || {
            let store = Store::connect(&db).map_err(ServeError::OpenStore)?;
            let key = bootstrap(&store, &data_dir)?;
            Ok::<_, ServeError>((store, key))
        })
        .await
        .map_err(|_| ServeError::Reconcile)??;
        let store = Arc::new(store);

        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| ServeError::Bind(config.listen, e))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| ServeError::Bind(config.listen, e))?;
        let domain = config
            .domain
            .clone()
            .unwrap_or_else(|| format!("localhost:{}", local_addr.port()));
        let files = crate::service::TemplateFiles::open(
            config.data_dir.join("template-files"),
            &config.data_dir.join("upload.key"),
        )
        .map_err(|e| ServeError::CreateDataDir(config.data_dir.join("upload.key"), e))?;
        let secrets_key = crate::secrets::SecretKey::load_or_create(
            &config.data_dir.join(crate::secrets::KEY_FILE),
        )
        .map_err(ServeError::SecretsKey)?;
        let svc = Arc::new(
            Service::new(store, backend, config.limits.clone(), domain)
                .with_template_files(files)
                .with_metering(config.metering.clone())
                .with_secrets(Arc::new(secrets_key))
                .with_volumes(volumes),
        );
        match svc.sync_templates().await {
            Ok(n) => tracing::info!(templates = n, "templates synced from the backend"),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "template sync failed; using stored templates")
            }
        }
        svc.interrupt_builds()
            .await
            .map_err(|_| ServeError::Reconcile)?;
        svc.reconcile().await.map_err(|_| ServeError::Reconcile)?;
        Ok(Server {
            listener,
            svc,
            config,
            local_addr,
            first_start_key,
            extra: None,
            egress_events: None,
        })
    }

    /// Records the egress proxy's connections (`alcove_net::EgressConfig::events`) in the
    /// audit log as they arrive.
    pub fn with_egress_events(
        mut self,
        rx: tokio::sync::mpsc::Receiver<alcove_net::EgressEvent>,
    ) -> Self {
        self.egress_events = Some(rx);
        self
    }

    /// Serves `service` at `path` on this listener, behind the API key: a request without a
    /// valid key (`X-API-KEY` or `Authorization: Bearer`) gets the API's structured 401 and never
    /// reaches it. The REST API's body-size refusal, request deadline (the longer one creates
    /// get) and the listener's connection caps apply to it too. This is how the `alcove` binary
    /// adds `/mcp` without this crate knowing about MCP.
    pub fn mount_authenticated<S>(mut self, path: &str, service: S) -> Self
    where
        S: tower::Service<Request, Error = std::convert::Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: IntoResponse,
        S::Future: Send + 'static,
    {
        let route = Router::new().route_service(path, service);
        self.extra = Some(match self.extra.take() {
            Some(r) => r.merge(route),
            None => route,
        });
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The egress proxy's source of secret values over this server's store and key
    /// (`<data-dir>/secrets.key`). Before the server exists, use
    /// [`crate::secrets::StoreSecrets::open`] on the data directory.
    pub fn secret_source(&self) -> crate::secrets::StoreSecrets {
        self.svc
            .secret_source()
            .expect("Server::bind always loads the secrets key")
    }

    /// The volumes' registry (`<data-dir>/volumes`), to share with the node that mounts volumes
    /// in guests.
    pub fn volumes(&self) -> Arc<alcove_volume::Volumes> {
        self.svc
            .volumes()
            .expect("Server::bind always sets up the volumes")
    }

    /// The admin key, when this start created it (empty data directory).
    pub fn first_start_key(&self) -> Option<&str> {
        self.first_start_key.as_deref()
    }

    /// How to point the SDKs at this server, as shell lines. The key is read from its file by the
    /// shell, never printed: these lines end up in logs and terminals.
    pub fn sdk_env(&self) -> String {
        let url = format!("http://{}", self.local_addr);
        let key = format!(
            "$(cat {})",
            self.config.data_dir.join(API_KEY_FILE).display()
        );
        if self.config.tls.is_some() {
            // Over TLS the SDKs build https://api.<domain> and https://<port>-<id>.<domain>
            // themselves; E2B_SANDBOX_URL would drop the sandbox from the host, where signed
            // file URLs need it.
            return format!(
                "export E2B_DOMAIN={}\nexport E2B_API_KEY={key}\n\
                 (trust the certificate's CA: SSL_CERT_FILE for Python, NODE_EXTRA_CA_CERTS for \
                 Node; see `alcove tls init`)\n",
                self.svc.domain()
            );
        }
        format!(
            "export E2B_API_URL={url}\nexport E2B_SANDBOX_URL={url}\n\
             export E2B_VOLUME_API_URL={url}\nexport E2B_API_KEY={key}\n"
        )
    }

    /// Serves until `shutdown` completes, running the reaper beside it.
    ///
    /// The accept loop is ours, not `axum::serve`, for the caps an unauthenticated client meets
    /// first ([`crate::config::ConnectionLimits`]): at most `max_connections` at once (one more
    /// gets a 503 and is closed at once), HTTP/1 headers within `header_read_timeout` (which
    /// also closes idle keep-alive connections), HTTP/2 pings and a stream cap.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
        let reaper = tokio::spawn(reaper(self.svc.clone()));
        let liveness = tokio::spawn(liveness(self.svc.clone()));
        let meter = tokio::spawn(meter(self.svc.clone()));
        let webhook = tokio::spawn(webhook(self.svc.clone()));
        let sampler = tokio::spawn(sampler(self.svc.clone()));
        let audit_writer = {
            let svc = self.svc.clone();
            tokio::spawn(async move { svc.write_audit().await })
        };
        let otlp = {
            let svc = self.svc.clone();
            tokio::spawn(async move {
                if svc.metering().otlp_endpoint.is_none() {
                    return;
                }
                let _ = rustls::crypto::ring::default_provider().install_default();
                match reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build()
                {
                    Ok(c) => svc.export_spans(&c).await,
                    Err(e) => {
                        tracing::error!(error = %chain(&e), "otlp: building the HTTP client; no spans will be exported")
                    }
                }
            })
        };
        let egress_audit = self.egress_events.take().map(|rx| {
            let svc = self.svc.clone();
            tokio::spawn(async move { svc.record_egress(rx).await })
        });
        let app = router_with(self.svc.clone(), self.extra);
        let limits = self.svc.limits().connections.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.keep_alive_interval))
            .keep_alive_timeout(limits.keep_alive_interval)
            .max_concurrent_streams(limits.max_h2_streams);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let tls = self.config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
        let listener = self.listener;
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning; connections that
                        // end free descriptors.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                crate::metrics::Metrics::inc(&METRICS.connections_refused);
                refuse_connection(stream, limits.max_connections);
                continue;
            };
            let app = app.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            let first_bytes = limits.header_read_timeout;
            let tls = tls.clone();
            tokio::spawn(async move {
                // The protocol sniff (HTTP/1 or the HTTP/2 preface) reads with no deadline of its
                // own: a client that connects and stays silent would hold the slot forever.
                if !first_bytes_within(&stream, first_bytes).await {
                    return;
                }
                // Client errors (resets, header timeouts, bad requests) end only their connection.
                // With TLS, plain HTTP is still served to loopback peers (the server's own MCP
                // tools call its API there; sandboxes never reach the host's loopback): a TLS
                // connection starts with a handshake record (0x16).
                let mut first = [0u8; 1];
                let plain_local = peer.ip().is_loopback()
                    && matches!(stream.peek(&mut first).await, Ok(1) if first[0] != 0x16);
                let served = match tls.filter(|_| !plain_local) {
                    None => {
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        watcher.watch(conn).await
                    }
                    Some(tls) => {
                        // The handshake has the same deadline as a request's headers.
                        let stream =
                            match tokio::time::timeout(first_bytes, tls.accept(stream)).await {
                                Ok(Ok(s)) => s,
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                        // Requests on it say so (the proxy's `X-Forwarded-Proto`).
                        let service = hyper_util::service::TowerToHyperService::new(
                            tower::ServiceExt::map_request(
                                app,
                                |mut r: Request<hyper::body::Incoming>| {
                                    r.extensions_mut().insert(crate::proxy::OverTls);
                                    r
                                },
                            ),
                        );
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .into_owned();
                        watcher.watch(conn).await
                    }
                };
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(slot);
            });
        }
        drop(listener);
        // Open streams (command output, watches) get a grace period, not a veto.
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
                tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them");
            }
        }
        reaper.abort();
        liveness.abort();
        meter.abort();
        webhook.abort();
        sampler.abort();
        if let Some(t) = egress_audit {
            t.abort();
        }
        otlp.abort();
        // Events queued by the last requests are written before the server goes.
        self.svc.flush_audit().await;
        audit_writer.abort();
        Ok(())
    }
}

/// Whether the client sends enough to tell HTTP/1 from HTTP/2 within `limit`.
async fn first_bytes_within(stream: &tokio::net::TcpStream, limit: Duration) -> bool {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if n == buf.len() || !H2_PREFACE.starts_with(&buf[..n]) {
            return true;
        }
        // Part of a preface: wait for the rest (peek returns at once while bytes are queued).
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Answers a connection over the cap with a 503 and closes it, without waiting on the client:
/// a fresh socket's send buffer takes the few bytes at once, and if it doesn't, the close alone
/// says no.
fn refuse_connection(stream: tokio::net::TcpStream, limit: usize) {
    let (status, code, message) = ApiError::TooManyConnections { limit }.parts();
    let body = serde_json::json!({
        "code": status.as_u16(),
        "error_code": code,
        "message": message,
    })
    .to_string();
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(resp.as_bytes());
}

/// Starts the server and serves until Ctrl-C. Logs how to point the SDKs at it.
pub async fn serve(
    config: ServerConfig,
    backend: Arc<dyn SandboxBackend>,
) -> Result<(), ServeError> {
    let server = Server::bind(config, backend).await?;
    tracing::info!(addr = %server.local_addr(), "alcove API listening\n{}", server.sdk_env());
    server.run(shutdown_signal()).await
}

/// How long open connections may go on after a shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Completes on Ctrl-C (SIGINT) or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// On an empty store: the admin team and its first key, written to `DIR/api-key` (0600).
fn bootstrap(store: &Store, data_dir: &Path) -> Result<Option<String>, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !store.teams().map_err(ServeError::Bootstrap)?.is_empty() {
        return Ok(None);
    }
    let team = match store.create_team(handlers::ADMIN_TEAM) {
        Ok(team) => team,
        // Another control-plane replica on the same database made it first: its key is the
        // first key.
        Err(_) if !store.teams().map_err(ServeError::Bootstrap)?.is_empty() => return Ok(None),
        Err(e) => return Err(ServeError::Bootstrap(e)),
    };
    let key = store
        .create_api_key(&team.id, "admin (first start)")
        .map_err(ServeError::Bootstrap)?;
    let path = data_dir.join(API_KEY_FILE);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        writeln!(f, "{}", key.secret)?;
        f.sync_all()
    };
    write().map_err(|e| ServeError::WriteApiKey(path.clone(), e))?;
    tracing::info!(path = %path.display(), "created the admin API key");
    Ok(Some(key.secret))
}

/// Kills (or pauses) sandboxes at their end time. Each sandbox's work runs in its own task
/// ([`Service::reap_expired`]), so a tick never waits on the backend. Like every background
/// duty, it runs on one control-plane replica at a time ([`Service::on_duty`]).
async fn reaper(svc: Arc<Service>) {
    let mut tick = tokio::time::interval(svc.limits().reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Builds go stale over minutes (their deadline plus five), not seconds: looked for once a
    // minute, not at every tick (the start-up pass just did).
    let mut builds_checked = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if svc.on_duty().await {
            svc.reap_expired().await;
            if builds_checked.elapsed() >= STALE_BUILD_CHECK {
                builds_checked = tokio::time::Instant::now();
                svc.interrupt_stale_builds().await;
            }
        }
    }
}

/// How often the replica on duty looks for the builds of a replica that died.
const STALE_BUILD_CHECK: Duration = Duration::from_secs(60);

/// Notices VMs that vanished. Its own loop: a slow or hung backend `list` (cut off at its
/// deadline) must not hold up the reaper.
async fn liveness(svc: Arc<Service>) {
    let mut tick = tokio::time::interval(svc.limits().liveness_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick completes at once; reconcile has just checked.
    tick.tick().await;
    loop {
        tick.tick().await;
        if svc.on_duty().await {
            svc.check_liveness("while running").await;
        }
    }
}

/// Writes usage events and checks spend caps every `--meter-interval`. Its own loop: backend
/// size walks must not hold up the reaper or liveness. A replica off duty only checks spend
/// caps (its creates read the standing that check leaves; notices are recorded once).
async fn meter(svc: Arc<Service>) {
    let mut tick = tokio::time::interval(svc.metering().interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        if !svc.on_duty().await {
            svc.check_spend_caps(None).await;
            continue;
        }
        svc.meter_tick().await;
        // Audit retention, about hourly.
        if ticks.is_multiple_of((3600 / svc.metering().interval.as_secs().max(1)).max(1)) {
            svc.prune_audit().await;
        }
        ticks += 1;
    }
}

/// Samples every running sandbox's resources into its metrics history.
async fn sampler(svc: Arc<Service>) {
    let every = svc.metering().sample_interval;
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if svc.on_duty().await {
            svc.sample_metrics().await;
        }
    }
}

/// Delivers spend warnings to the webhook, if one is set; never in a request's path.
async fn webhook(svc: Arc<Service>) {
    if svc.metering().webhook.is_none() {
        return;
    }
    // reqwest's rustls needs a process-wide crypto provider; ring is the one this build has
    // (an error means one is installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %chain(&e), "webhook: building the HTTP client; spend warnings will not be sent");
            return;
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if svc.on_duty().await {
            svc.deliver_spend_notices(&client).await;
        }
    }
}

/// The whole HTTP surface: sandbox traffic dispatch in front of the REST API.
pub fn router(svc: Arc<Service>) -> Router {
    router_with(svc, None)
}

/// [`router`] plus `extra` (what [`Server::mount_authenticated`] collected), which is served
/// behind the API key with the REST API's body-size refusal and the create deadline.
fn router_with(svc: Arc<Service>, extra: Option<Router<AppState>>) -> Router {
    use handlers::{
        audit, extensions, observability as o, persistence as p, sandboxes as s, secrets as k,
        system, templates as t, usage, volumes as v,
    };
    let limits = svc.limits().clone();
    let api = Router::new()
        .route("/sandboxes", post(s::create_v1).get(s::list_v1))
        .route("/v2/sandboxes", post(s::create_v2).get(s::list_v2))
        .route("/sandboxes/metrics", get(o::metrics_many))
        .route("/sandboxes/{sandboxID}", get(s::get).delete(s::kill))
        .route("/sandboxes/{sandboxID}/timeout", post(s::set_timeout))
        .route("/sandboxes/{sandboxID}/refreshes", post(s::refresh))
        .route("/sandboxes/{sandboxID}/connect", post(p::connect_v1))
        .route("/v2/sandboxes/{sandboxID}/connect", post(p::connect))
        .route("/sandboxes/{sandboxID}/metrics", get(o::metrics))
        .route("/sandboxes/{sandboxID}/logs", get(o::logs_v1))
        .route("/v2/sandboxes/{sandboxID}/logs", get(o::logs_v2))
        .route("/sandboxes/{sandboxID}/pause", post(p::pause))
        .route("/sandboxes/{sandboxID}/resume", post(p::resume))
        .route("/sandboxes/{sandboxID}/fork", post(p::fork))
        .route("/sandboxes/{sandboxID}/snapshots", post(p::create_snapshot))
        .route("/snapshots", get(p::list_snapshots))
        .route("/secrets", post(k::create).get(k::list))
        .route(
            "/secrets/{secretID}",
            get(k::get).post(k::update).delete(k::delete),
        )
        .route("/volumes", post(v::create).get(v::list))
        .route("/volumes/{volumeID}", get(v::get).delete(v::delete))
        .route("/sandboxes/{sandboxID}/network", put(s::update_network))
        .route("/templates", get(t::list))
        .route("/v2/templates", get(t::list))
        .route("/default-templates", get(t::defaults))
        .route(
            "/templates/{templateID}",
            get(t::get).delete(t::delete).patch(t::update_v1),
        )
        .route("/v2/templates/{templateID}", patch(t::update))
        .route("/templates/aliases/{alias}", get(t::alias))
        .route("/v3/templates", post(t::request_build))
        .route("/templates/{templateID}/files/{hash}", get(t::file_link))
        .route(
            "/v2/templates/{templateID}/builds/{buildID}",
            post(t::start_build),
        )
        .route(
            "/templates/{templateID}/builds/{buildID}/status",
            get(t::build_status),
        )
        .route(
            "/templates/tags",
            post(t::assign_tags).delete(t::remove_tags),
        )
        .route("/templates/{templateID}/tags", get(t::tags))
        .route(
            "/alcove/v1/sandboxes/{sandboxID}",
            get(extensions::sandbox_record),
        )
        .route(
            "/alcove/v1/sandboxes/{sandboxID}/fork",
            post(extensions::fork),
        )
        .route(
            "/alcove/v1/sandboxes/{sandboxID}/recordings",
            get(extensions::recordings).post(extensions::start_recording),
        )
        .route(
            "/alcove/v1/sandboxes/{sandboxID}/recordings/{recordingID}/stop",
            post(extensions::stop_recording),
        )
        .route("/alcove/v1/snapshots/tree", get(extensions::snapshot_tree))
        .route("/alcove/v1/warm-pool", get(extensions::warm_pool))
        .route("/alcove/v1/nodes", get(extensions::nodes))
        .route(
            "/alcove/v1/nodes/{nodeID}/drain",
            axum::routing::post(extensions::drain_node),
        )
        .route("/alcove/v1/usage", get(usage::usage))
        .route("/alcove/v1/audit", get(audit::audit_export))
        .route(
            "/alcove/v1/sandboxes/{sandboxID}/events",
            get(audit::sandbox_events),
        )
        .route("/alcove/v1/usage/events", get(usage::usage_events))
        .route(
            "/alcove/v1/teams/{team}/limits",
            get(usage::get_limits).put(usage::put_limits),
        )
        .merge(crate::dashboard::routes())
        .route("/health", get(system::health))
        .route("/metrics", get(system::prometheus))
        .route("/openapi.json", get(system::openapi))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            request_timeout,
        ))
        .layer(middleware::from_fn(count_request))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::Extension(BodyLimit(limits.max_body_bytes)))
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            refuse_declared_oversize,
        ));
    // Template file uploads stream up to their own cap under their own deadline
    // (`upload_template_file`), outside the REST body limit and request deadline.
    let uploads = Router::new()
        .route("/alcove/v1/template-files/{token}", put(t::upload))
        .layer(DefaultBodyLimit::disable());
    // The volume content API: its own credentials (the volume's token), file bodies streamed
    // outside the REST body limit (writes have the volume's cap and their own deadlines).
    let content = Router::new()
        .route(
            "/volumecontent/{volumeID}/path",
            get(v::stat).patch(v::set_meta).delete(v::remove),
        )
        .route(
            "/volumecontent/{volumeID}/dir",
            get(v::list_dir).post(v::make_dir),
        )
        .route(
            "/volumecontent/{volumeID}/file",
            get(v::read_file).put(v::write_file),
        )
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            limits.clone(),
            content_timeout,
        ))
        .layer(middleware::from_fn(count_request))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::Extension(BodyLimit(limits.max_body_bytes)));
    let mut app = api.merge(uploads).merge(content);
    if let Some(extra) = extra {
        app = app.merge(
            extra
                .layer(middleware::from_fn_with_state(svc.clone(), require_api_key))
                .layer(middleware::from_fn_with_state(
                    limits.clone(),
                    long_request_timeout,
                ))
                .layer(middleware::from_fn(count_request))
                .layer(middleware::from_fn_with_state(
                    limits.clone(),
                    refuse_declared_oversize,
                )),
        );
    }
    app.layer(middleware::from_fn_with_state(
        proxy::ProxyState::new(svc.clone()),
        proxy::dispatch,
    ))
    .layer(middleware::from_fn_with_state(svc.clone(), observe_request))
    .with_state::<()>(svc as AppState)
}

/// A REST body whose `Content-Length` already passes the limit is refused before any of it is
/// read: waiting for bytes that may never come would hold the connection until the deadline.
async fn refuse_declared_oversize(
    State(limits): State<Limits>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match declared {
        Some(n) if n > limits.max_body_bytes as u64 => ApiError::BodyTooLarge {
            limit: limits.max_body_bytes,
        }
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Every REST request has a deadline; creates get the (longer) create deadline plus slack, so the
/// client sees the create's own outcome.
async fn request_timeout(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    // Creates, and what saves or restores a whole sandbox (pause, resume, connect, snapshots,
    // forks), get the create deadline: under TCG they take seconds, a fork of many longer.
    let path = req.uri().path();
    let is_create = req.method() == http::Method::POST
        && (matches!(path, "/sandboxes" | "/v2/sandboxes")
            || ["/pause", "/resume", "/connect", "/snapshots", "/fork"]
                .iter()
                .any(|s| path.ends_with(s)));
    let limit = if is_create {
        limits
            .request_timeout
            .max(limits.create_timeout + Duration::from_secs(5))
    } else {
        limits.request_timeout
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

/// Volume content calls get the REST deadline, except file writes, which stream for as long as
/// the upload takes (with their own idle and total deadlines, `Service::volume_write`).
async fn content_timeout(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    if req.method() == http::Method::PUT {
        return next.run(req).await;
    }
    match tokio::time::timeout(limits.request_timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

/// Mounted services do whatever their callers ask (an MCP tool call may create a sandbox), so
/// they get the create deadline, never less than the REST one.
async fn long_request_timeout(State(limits): State<Limits>, req: Request, next: Next) -> Response {
    let limit = limits
        .request_timeout
        .max(limits.create_timeout + Duration::from_secs(5));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::RequestTimeout.into_response(),
    }
}

/// The gate of mounted services: the same key check as every REST handler (`Team`).
async fn require_api_key(State(svc): State<AppState>, req: Request, next: Next) -> Response {
    use axum::extract::FromRequestParts;
    let (mut parts, body) = req.into_parts();
    match handlers::Team::from_request_parts(&mut parts, &svc).await {
        Ok(_) => next.run(Request::from_parts(parts, body)).await,
        Err(e) => e.into_response(),
    }
}

static NEXT_REQUEST_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Outermost middleware, REST and sandbox traffic alike: the request's span (request id,
/// method, route, sandbox id when the path or the routing names one) and, when the response is
/// ready, one log line with its status and latency. An error response's cause
/// ([`ErrorCause`]) is logged here, once, and never sent: 5xx at error level with the cause
/// chain, the rest at info with their error code.
async fn observe_request(State(svc): State<AppState>, req: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let request_id = NEXT_REQUEST_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let proxied = proxy::route_of(&parts, svc.domain()).ok().flatten();
    let matched = parts.extensions.get::<MatchedPath>().map(|p| p.as_str());
    let (route, sandbox_id) = match &proxied {
        Some(r) => ("proxy", Some(r.sandbox_id.as_str())),
        None => {
            let route = matched.unwrap_or("unmatched");
            (route, path_sandbox_id(route, parts.uri.path()))
        }
    };
    let span = tracing::info_span!(
        "request",
        request_id,
        method = %parts.method,
        route = %route,
        sandbox_id = tracing::field::Empty,
    );
    if let Some(id) = sandbox_id {
        span.record("sandbox_id", tracing::field::display(id));
    }
    // REST calls are audited with the key that made them; sandbox traffic is traced by what it
    // does (processes, files), not request by request.
    let actor = proxied.is_none().then(handlers::Actor::default);
    let traceparent = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned);
    let audit = actor.clone().map(|a| {
        (
            a,
            format!("{} {route}", parts.method),
            sandbox_id.map(str::to_owned),
        )
    });
    let mut req = Request::from_parts(parts, body);
    if let Some(a) = actor {
        req.extensions_mut().insert(a);
    }
    async move {
        let resp = next.run(req).await;
        let status = resp.status().as_u16();
        let latency_ms = started.elapsed().as_millis() as u64;
        if let Some((actor, action, target)) = audit {
            let who = actor.0.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some((team, key_id)) = who {
                let error_code = resp.extensions().get::<ErrorCause>().map(|e| e.0.parts().1);
                svc.audit(alcove_store::NewAuditRecord {
                    at: alcove_store::now_ms(),
                    team_id: Some(team),
                    actor: key_id,
                    sandbox_id: target.clone(),
                    kind: "api".into(),
                    action,
                    target,
                    result: status.to_string(),
                    detail: serde_json::json!({
                        "requestId": request_id,
                        "latencyMs": latency_ms,
                        "errorCode": error_code,
                        "traceparent": traceparent,
                    }),
                });
            }
        }
        match resp.extensions().get::<ErrorCause>() {
            Some(ErrorCause(e)) if resp.status().is_server_error() => {
                let error_code = e.parts().1;
                tracing::error!(status, latency_ms, error_code, cause = %chain(&**e), "request failed");
            }
            Some(ErrorCause(e)) => {
                let error_code = e.parts().1;
                tracing::info!(status, latency_ms, error_code, "request");
            }
            None => tracing::info!(status, latency_ms, "request"),
        }
        resp
    }
    .instrument(span)
    .await
}

/// The `{sandboxID}` segment of a path matched by `route`, if the route has one.
fn path_sandbox_id<'a>(route: &str, path: &'a str) -> Option<&'a str> {
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| *r == "{sandboxID}")
        .map(|(_, p)| p)
}

async fn count_request(req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    METRICS.request(&method, &route, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::path_sandbox_id;

    #[test]
    fn the_sandbox_id_comes_from_the_matched_route() {
        assert_eq!(
            path_sandbox_id("/sandboxes/{sandboxID}/pause", "/sandboxes/abc/pause"),
            Some("abc")
        );
        assert_eq!(path_sandbox_id("/v2/sandboxes", "/v2/sandboxes"), None);
        assert_eq!(path_sandbox_id("unmatched", "/x/y"), None);
    }
}
