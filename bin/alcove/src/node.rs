//! `alcove node`: this host's sandboxes for a cluster's control plane, until SIGINT or SIGTERM.
//! The node serves its link (TLS, `alcove_cluster::node`) and heartbeats to the control plane;
//! the control plane places sandboxes on it and carries their traffic over the link.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;

use crate::backend::NodeBackend;
use crate::config::NodeOptions;

/// The host name, for the default node id and link URL.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub async fn run(opts: NodeOptions, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o077));
    crate::server::raise_fd_limit();
    let (false, Some(token_file)) = (opts.server.is_empty(), opts.token_file.clone()) else {
        anyhow::bail!(
            "alcove node needs --server (the control plane's --cluster-listen address; one per \
             control-plane replica) and --token-file (a copy of its cluster.token); see alcove \
             node --help"
        );
    };
    let servers = &opts.server;
    let token = alcove_cluster::Token::read(&token_file)?;
    let node_id = opts.node_id.clone().unwrap_or_else(host_name);
    let server_ca = match &opts.server_ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("--server-ca {}", p.display()))?),
        None => None,
    };
    // Checked before any VM starts: a wrong --server is a message, not a half-started node.
    let clients = servers
        .iter()
        .map(|s| {
            alcove_cluster::node::heartbeat_client(s, server_ca.as_deref())
                .map_err(|e| anyhow::anyhow!("--server {s}: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("--listen {}", opts.listen))?;
    let bound = listener.local_addr()?;
    // Default: the address listened on, or the host name when that is every address.
    let url = opts.advertise.clone().unwrap_or_else(|| {
        if bound.ip().is_unspecified() {
            format!("https://{}:{}", host_name(), bound.port())
        } else {
            format!("https://{bound}")
        }
    });
    if !url.starts_with("https://") {
        anyhow::bail!("--advertise {url}: the link is TLS, so its URL is https://host:port");
    }
    let data_dir = opts.host.data_dir();
    let cert = alcove_cluster::NodeCert::load_or_create(&data_dir.join("node-link"), &node_id)?;
    // Network rules' secret values come from the control plane's store, asked for each time
    // (signed, for a sandbox on this node only), and egress events go to its audit log.
    // Volume mounts are refused for cluster sandboxes.
    let replicas: Vec<_> = servers
        .iter()
        .cloned()
        .zip(clients.iter().cloned())
        .collect();
    let secrets =
        alcove_net::egress::Secrets(Arc::new(alcove_cluster::node::ControlPlaneSecrets::new(
            node_id.clone(),
            token.clone(),
            replicas.clone(),
        )));
    let (egress_tx, egress_rx) = tokio::sync::mpsc::channel(alcove_api::EGRESS_EVENT_QUEUE);
    tokio::spawn(alcove_cluster::node::forward_egress(
        egress_rx,
        node_id.clone(),
        token.clone(),
        replicas,
    ));
    let node = opts.host.node(Some(egress_tx), Some(secrets)).await?;
    let node_backend = Arc::new(NodeBackend::new(node.clone()));
    let backend: Arc<dyn alcove_api::backend::SandboxBackend> = node_backend.clone();
    let moves = match &opts.blob_store {
        Some(url) => Some(alcove_cluster::node::Moves {
            host: node_backend,
            blobs: alcove_cluster::blobs::Blobs::open(url)?,
        }),
        None => None,
    };
    // Every control-plane replica gets the heartbeats: each keeps its own view of the nodes.
    let draining = Arc::new(AtomicBool::new(false));
    let heartbeats: Vec<_> = servers
        .iter()
        .zip(clients)
        .map(|(server, client)| {
            let reg = alcove_cluster::node::Registration {
                node_id: node_id.clone(),
                url: url.clone(),
                cert_sha256: cert.fingerprint(),
                server: server.clone(),
                token: token.clone(),
                draining: Arc::clone(&draining),
            };
            tokio::spawn(alcove_cluster::node::heartbeats(
                Arc::clone(&backend),
                reg,
                client,
                Duration::from_secs(1),
            ))
        })
        .collect();
    writeln!(
        out,
        "alcove node {node_id}: link on {url} (certificate sha256 {}), reporting to {}",
        cert.fingerprint(),
        servers.join(", ")
    )?;
    out.flush()?;
    let app = alcove_cluster::node::router(
        backend,
        token,
        moves,
        draining,
        data_dir.join("build-files"),
    );
    let served =
        alcove_cluster::node::serve(listener, &cert, app, alcove_api::server::shutdown_signal())
            .await;
    for h in heartbeats {
        h.abort();
    }
    node.drain_warm_pool().await;
    served.map_err(Into::into)
}
