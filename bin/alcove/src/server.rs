//! `alcove server`: the API over this host's node, until SIGINT or SIGTERM.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;

use crate::backend::NodeBackend;
use crate::config::ServerOptions;

/// Opens the node, serves the API over it, printing how to point the SDKs at it, and on the way
/// out kills the warm pool's VMs (they are nobody's sandboxes). With `--cluster-listen`, serves
/// the API over the cluster's nodes instead.
pub async fn run(opts: ServerOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    // Defence in depth: whatever this process or its children (QEMU) create is owner-only,
    // even where a path is not made by `alcove_node::private` or the store.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    raise_fd_limit();
    // A bad --database-url stops here, before anything starts.
    opts.database()?;
    // Egress connections go to the audit log (bounded; the API's writer drains it).
    let (egress_tx, egress_rx) = tokio::sync::mpsc::channel(alcove_api::EGRESS_EVENT_QUEUE);
    if let Some(addr) = opts.cluster.cluster_listen {
        return run_control_plane(&opts, addr, egress_tx, egress_rx, out).await;
    }
    // The egress proxy reads secret values for network rules from the server's store.
    let secrets = alcove_net::egress::Secrets(Arc::new(
        alcove_api::StoreSecrets::open(&opts.data_dir(), &opts.database()?)
            .map_err(|e| anyhow::anyhow!("the secret store: {e}"))?,
    ));
    let node = opts.host.node(Some(egress_tx), Some(secrets)).await?;
    let backend = Arc::new(NodeBackend::new(node.clone()));
    let served = serve(
        &opts,
        backend.clone(),
        // The node serves guests' volume mounts from the registry the API's content calls use.
        |server| backend.set_volumes(server.volumes()),
        egress_rx,
        out,
    )
    .await;
    node.drain_warm_pool().await;
    served
}

/// `alcove server --cluster-listen`: the API over [`alcove_cluster::ClusterBackend`], the
/// nodes' heartbeats taken on `addr`.
async fn run_control_plane(
    opts: &ServerOptions,
    addr: std::net::SocketAddr,
    egress_tx: tokio::sync::mpsc::Sender<alcove_net::EgressEvent>,
    egress_rx: tokio::sync::mpsc::Receiver<alcove_net::EgressEvent>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let data_dir = opts.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token_file = opts
        .cluster
        .cluster_token_file
        .clone()
        .unwrap_or_else(|| data_dir.join("cluster.token"));
    let (token, made) = alcove_cluster::Token::read_or_create(&token_file)?;
    let mut cfg = alcove_cluster::ClusterConfig::new(token);
    if opts.cluster.placement == "pack" {
        cfg.policy = alcove_placement::Policy::Pack;
    }
    if let Some(url) = &opts.cluster.blob_store {
        cfg.blobs = Some(alcove_cluster::blobs::Blobs::open(url)?);
    }
    // The nodes' egress events go to the audit log like this host's would.
    cfg.egress = Some(egress_tx);
    // The nodes' egress proxies fill network rules' secrets from this store, through the link.
    cfg.secrets = Some(Arc::new(
        alcove_api::StoreSecrets::open(&data_dir, &opts.database()?)
            .map_err(|e| anyhow::anyhow!("the secret store: {e}"))?,
    ));
    let cluster = Arc::new(alcove_cluster::ClusterBackend::new(cfg));
    let stored = cluster
        .load_stored()
        .await
        .context("listing the paused sandboxes in the blob store")?;
    if stored > 0 {
        tracing::info!(sandboxes = stored, "paused sandboxes in the blob store");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--cluster-listen {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Arc::clone(&cluster).router();
    // Over TLS with the API's own certificate when it has one: nodes on other hosts reach it
    // as https:// (they refuse plain http except on loopback).
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(cert), Some(key)) => Some(alcove_api::tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(alcove_cluster::node::serve_with(
        listener,
        tls,
        app,
        std::future::pending(),
    ));
    writeln!(
        out,
        "alcove cluster listener on {scheme}://{bound} ({} the cluster token in {}; give each \
         `alcove node` a copy)",
        if made { "made" } else { "using" },
        token_file.display()
    )?;
    serve(opts, cluster, |_| {}, egress_rx, out).await
}
/// Every connection and every proxied stream holds descriptors; the usual soft limit (1024)
/// would make the connection caps unreachable. Raises the soft limit to the hard one and logs
/// the result; a failure leaves the limit as it was (and says so).
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    let before = lim.current;
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!(error = %e, soft = ?before, "could not raise RLIMIT_NOFILE");
            return;
        }
    }
    let after = getrlimit(Resource::Nofile);
    tracing::info!(soft = ?after.current, hard = ?after.maximum, "open file limit (RLIMIT_NOFILE)");
}

async fn serve(
    opts: &ServerOptions,
    backend: Arc<dyn alcove_api::backend::SandboxBackend>,
    bound: impl FnOnce(&alcove_api::Server),
    egress_events: tokio::sync::mpsc::Receiver<alcove_net::EgressEvent>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut config = opts.api();
    config.metering = opts.metering()?;
    if let (Some(cert), Some(key)) = (&opts.tls_cert, &opts.tls_key) {
        config.tls = Some(alcove_api::tls::server_config(cert, key)?);
    }
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let data_dir = config.data_dir.clone();
    let max_body = config.limits.max_body_bytes;
    let server = alcove_api::Server::bind(config, backend)
        .await
        .context("starting the server")?
        .with_egress_events(egress_events);
    bound(&server);
    let server = mount_mcp(server, max_body);
    writeln!(
        out,
        "alcove API listening on {scheme}://{}",
        server.local_addr()
    )?;
    if server.first_start_key().is_some() {
        writeln!(
            out,
            "First start: created the admin API key in {}",
            data_dir.join(alcove_api::API_KEY_FILE).display()
        )?;
    }
    writeln!(
        out,
        "Point the E2B SDKs at it with:\n\n{}",
        server.sdk_env()
    )?;
    out.flush()?;
    server
        .run(alcove_api::server::shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

/// `/mcp`: the MCP server over Streamable HTTP on this listener, behind the API key. Its tools
/// call this server's own REST API on loopback with the caller's key.
fn mount_mcp(server: alcove_api::Server, max_body: usize) -> alcove_api::Server {
    let addr = server.local_addr();
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let base = format!("http://{}", std::net::SocketAddr::new(ip, addr.port()));
    let service = alcove_mcp::http_service(alcove_mcp::Target::new(&base, None), max_body);
    server.mount_authenticated(alcove_mcp::HTTP_PATH, service)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, getrlimit};
        super::raise_fd_limit();
        let lim = getrlimit(Resource::Nofile);
        assert_eq!(lim.current, lim.maximum);
    }
}
