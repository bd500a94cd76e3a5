//! alcove-agent as a library: boot-time setup, the transports (virtio-serial h2c session, TCP)
//! and the envd protocol surface (HTTP endpoints plus the `process` and `filesystem` Connect
//! services). `main.rs` only builds a [`Config`] and calls [`run`], so tests drive the same code.
//! What the host relies on (the channel's name, envd's port, the ready line, the `/init` body)
//! comes from `alcove-guest-contract`.

pub mod api;
pub mod channel;
pub mod fs;
pub mod init;
pub mod paths;
pub mod process;
pub mod rpc;
pub mod server;
pub mod state;
pub mod system;
pub mod template;
pub mod users;
pub mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

/// Template start configuration (optional).
pub const DEFAULT_TEMPLATE_CONFIG: &str = "/etc/alcove/template.json";
/// The sandbox's environment variables as a JSON object, rewritten at every `/init` (read by the
/// code interpreter before each cell).
pub const SANDBOX_ENV_FILE: &str = alcove_guest_contract::SANDBOX_ENV_FILE;
/// Rewritten with a fresh random id every time `/init` credits entropy (boot, resume, restore,
/// fork): the code interpreter reseeds its kernels' userspace RNGs when the id changes, so
/// clones of one snapshot don't share Python's `random` or numpy's global state.
pub const RESEED_FILE: &str = "/run/alcove/reseed-id";

#[derive(Debug, Clone)]
pub enum Mode {
    /// Inside the guest: serve the virtio-serial channel and TCP, touch the system on /init.
    Guest {
        channel: String,
        envd_addr: SocketAddr,
    },
    /// On a host (tests): TCP only; /init records but never changes clock, hostname or entropy.
    Host { listen: SocketAddr },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    pub template_config: PathBuf,
    pub ready_timeout: Duration,
    pub output_buffer: usize,
}

/// Runs the agent until it fails; never returns Ok in normal operation.
pub fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    rt.block_on(run_async(config))
}

async fn run_async(config: Config) -> anyhow::Result<()> {
    let guest = matches!(config.mode, Mode::Guest { .. });
    if guest {
        process::protect_from_oom();
    }
    let state = state::AgentState::new(state::StateConfig {
        touch_system: guest,
        output_buffer: config.output_buffer,
    });
    let router = api::router(Arc::clone(&state));

    let tcp_addr = match &config.mode {
        Mode::Guest { envd_addr, .. } => *envd_addr,
        Mode::Host { listen } => *listen,
    };
    let listener = tokio::net::TcpListener::bind(tcp_addr)
        .await
        .with_context(|| format!("listen on {tcp_addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving envd over TCP");
    let tcp = tokio::spawn(server::serve_tcp(listener, router.clone()));

    let channel_task = if let Mode::Guest { channel, .. } = &config.mode {
        let port = channel::VirtioPort::open_named(channel)
            .with_context(|| format!("open the virtio-serial port {channel}"))?;
        tracing::info!(channel, "serving the host channel");
        let router = router.clone();
        Some(tokio::spawn(channel::serve(Arc::new(port), router)))
    } else {
        None
    };

    if guest {
        api::init::restore_persisted_env(
            &state,
            std::path::Path::new(alcove_guest_contract::PERSISTED_ENV_FILE),
        );
    }
    template::start_and_wait(&state, &config.template_config, config.ready_timeout).await;
    announce_ready(guest);

    match channel_task {
        Some(ch) => tokio::select! {
            r = tcp => r.context("TCP server task")?.context("TCP server"),
            r = ch => r.context("channel task")?.context("host channel"),
        },
        None => tcp.await.context("TCP server task")?.context("TCP server"),
    }
}

/// Tells the host it may snapshot: the console in the guest, stdout on a host.
fn announce_ready(guest: bool) {
    use std::io::Write;
    let line = format!("{}\n", alcove_guest_contract::READY_LINE);
    if guest {
        match std::fs::OpenOptions::new().write(true).open("/dev/console") {
            Ok(mut c) => {
                let _ = c.write_all(line.as_bytes());
                return;
            }
            Err(e) => tracing::warn!(error = %e, "open /dev/console for the ready line"),
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}
