//! alcove-agent: E2B's envd protocol inside an Alcove sandbox.
//!
//! As the guest's init (`init=/usr/local/bin/alcove-agent`) it sets up the system, serves the host
//! over the `alcove.agent` virtio-serial port and TCP 49983. On a host, `--listen ADDR` serves TCP
//! only, for tests. Everything lives in the library; this file parses flags and sets up logging.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "alcove-agent",
    version,
    about = "Alcove's in-guest agent (E2B envd protocol)"
)]
struct Cli {
    /// Serve HTTP/1.1 and h2c on this TCP address only: no init work, no channel (host tests).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// virtio-serial port name of the host channel (guest mode).
    #[arg(long, default_value = alcove_agent::DEFAULT_CHANNEL)]
    channel: String,
    /// TCP address served in guest mode (envd's port).
    #[arg(long, default_value = "0.0.0.0:49983")]
    envd_addr: std::net::SocketAddr,
    /// Template start configuration read at boot.
    #[arg(long, default_value = alcove_agent::DEFAULT_TEMPLATE_CONFIG)]
    template_config: PathBuf,
    /// How long the template's ready_cmd may take to succeed (seconds), unless template.json says.
    #[arg(long, default_value_t = 300)]
    ready_timeout_secs: u64,
    /// Bytes of output kept per process for slow or absent readers.
    #[arg(long, env = "ALCOVE_AGENT_OUTPUT_BUFFER", default_value_t = 4 << 20)]
    output_buffer: usize,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let guest = cli.listen.is_none();
    let config = alcove_agent::Config {
        mode: match cli.listen {
            Some(addr) => alcove_agent::Mode::Host { listen: addr },
            None => alcove_agent::Mode::Guest {
                channel: cli.channel,
                envd_addr: cli.envd_addr,
            },
        },
        template_config: cli.template_config,
        ready_timeout: Duration::from_secs(cli.ready_timeout_secs),
        output_buffer: cli.output_buffer,
    };
    // PID 1 work happens before any thread exists (it forks); logging comes after.
    if guest && alcove_agent::init::is_pid1() {
        alcove_agent::init::pid1_then_fork()?;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALCOVE_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = alcove_agent::run(config) {
        tracing::error!("alcove-agent failed: {e:#}");
        return Err(e);
    }
    Ok(())
}
