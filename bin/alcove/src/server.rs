//! `alcove server`: the API over this host's node, until SIGINT or SIGTERM.

use std::io::Write;
use std::sync::Arc;

use anyhow::Context;

use crate::backend::NodeBackend;
use crate::config::ServerOptions;

/// Opens the node, serves the API over it, printing how to point the SDKs at it, and on the way
/// out kills the warm pool's VMs (they are nobody's sandboxes).
pub async fn run(opts: ServerOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    // Defence in depth: whatever this process or its children (QEMU) create is owner-only,
    // even where a path is not made by `alcove_node::private` or the store.
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    raise_fd_limit();
    // Egress connections go to the audit log (bounded; the API's writer drains it).
    let (egress_tx, egress_rx) = tokio::sync::mpsc::channel(alcove_api::EGRESS_EVENT_QUEUE);
    let node = opts.node(Some(egress_tx)).await?;
    let served = serve(
        &opts,
        Arc::new(NodeBackend::new(node.clone())),
        egress_rx,
        out,
    )
    .await;
    node.drain_warm_pool().await;
    served
}

/// Every connection and every proxied stream holds descriptors; the usual soft limit (1024)
/// would make the connection caps unreachable. Raises the soft limit to the hard one and logs
/// the result; a failure leaves the limit as it was (and says so).
fn raise_fd_limit() {
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
    backend: Arc<NodeBackend>,
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
    let node_backend = Arc::clone(&backend);
    let server = alcove_api::Server::bind(config, backend)
        .await
        .context("starting the server")?
        .with_egress_events(egress_events);
    // The node serves guests' volume mounts from the registry the API's content calls use.
    node_backend.set_volumes(server.volumes());
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
