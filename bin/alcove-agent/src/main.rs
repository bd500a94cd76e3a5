//! alcove-agent: E2B's envd protocol inside an Alcove sandbox.
//!
//! As the guest's init (`init=/usr/local/bin/alcove-agent`) it sets up the system, serves the host
//! over the `alcove.agent` virtio-serial port and TCP 49983. On a host, `--listen ADDR` serves TCP
//! only, for tests. Everything lives in the library; this file parses flags and sets up logging.

use std::net::{Ipv4Addr, SocketAddr};
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
    #[arg(long, default_value = alcove_guest_contract::AGENT_CHANNEL)]
    channel: String,
    /// TCP address served in guest mode (envd's port).
    #[arg(long, default_value_t = any_addr(alcove_guest_contract::ENVD_PORT))]
    envd_addr: SocketAddr,
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

/// `alcove-agent interpreter`: the code interpreter server (port 49999), started by the
/// `code-interpreter-v1` template's start command. A separate process from the agent, so a
/// misbehaving kernel can never take PID 1 down.
#[derive(Debug, Parser)]
#[command(name = "alcove-agent interpreter")]
struct InterpreterCli {
    /// TCP address to serve the e2b-code-interpreter protocol on.
    #[arg(long, default_value_t = any_addr(alcove_guest_contract::CODE_INTERPRETER_PORT))]
    listen: SocketAddr,
    /// Directory holding `<kernel>/kernel.json` (repeatable; searched in order).
    #[arg(long = "kernel-dir")]
    kernel_dirs: Vec<PathBuf>,
    /// Python interpreter for kernelspecs that name a bare `python`.
    #[arg(long, default_value = "/usr/bin/python3")]
    python: PathBuf,
    /// Scratch directory (connection files, IPython profile).
    #[arg(long, default_value = "/tmp/alcove-interpreter")]
    runtime_dir: PathBuf,
    /// Working directory of contexts created without one.
    #[arg(long, default_value = "/home/user")]
    cwd: PathBuf,
    /// The sandbox's environment variables (JSON object, written by the agent at /init).
    #[arg(long, default_value = alcove_agent::SANDBOX_ENV_FILE)]
    env_file: PathBuf,
    /// Rewritten by the agent when it reseeds the kernel CRNG; Python kernels then reseed.
    #[arg(long, default_value = alcove_agent::RESEED_FILE)]
    reseed_file: PathBuf,
    /// Do not start the default Python kernel before listening.
    #[arg(long)]
    no_warm: bool,
}

/// `mcp-gateway` (a link to the agent in every template; also `alcove-agent mcp-gateway`): the
/// MCP gateway the SDKs start after `Sandbox.create(mcp=...)`. See crates/mcp-gateway.
#[derive(Debug, Parser)]
#[command(
    name = "mcp-gateway",
    about = "Serve stdio MCP servers as one Streamable HTTP endpoint (port 50005, /mcp), behind a bearer token",
    after_help = "Supported servers (--config names):\n  filesystem: {\"paths\": [\"/abs\", ...]}\n  git: {\"paths\": [\"/repo\"]} (optional)\n  memory, sequentialthinking, time: {}"
)]
struct McpGatewayCli {
    /// The servers to run, as JSON: {"<name>": {<settings>}, ...}.
    #[arg(long)]
    config: String,
    /// The bearer token clients must send (generated when absent).
    #[arg(long, env = alcove_mcp_gateway::TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// Address to serve on.
    #[arg(long, default_value_t = any_addr(alcove_guest_contract::MCP_GATEWAY_PORT))]
    listen: SocketAddr,
    /// Where the token is written (root only).
    #[arg(long, default_value = alcove_mcp_gateway::TOKEN_FILE)]
    token_file: PathBuf,
    /// The background gateway's log.
    #[arg(long, default_value = alcove_mcp_gateway::LOG_FILE)]
    log_file: PathBuf,
    /// Serve in this process instead of starting in the background and returning once ready.
    #[arg(long)]
    foreground: bool,
    /// Seconds to wait for the servers before returning with them still starting.
    #[arg(long, hide = true, default_value_t = alcove_mcp_gateway::READY_WAIT.as_secs())]
    ready_wait: u64,
    /// Internal: the background half (says `ready` or `error: ...` on stdout).
    #[arg(long, hide = true)]
    serve: bool,
}

/// Runs the gateway command; `args` start with the program name.
fn mcp_gateway_main(args: Vec<std::ffi::OsString>) -> i32 {
    // `mcp-gateway pull NAME...` (the SDKs' template builder, `add_mcp_server`).
    if args.get(1).and_then(|a| a.to_str()) == Some("pull") {
        let names: Vec<String> = args[2..]
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return match alcove_mcp_gateway::pull(&names) {
            Ok(msg) => {
                println!("{msg}");
                0
            }
            Err(e) => {
                eprintln!("mcp-gateway: {}", alcove_guest_contract::error_chain(&e));
                1
            }
        };
    }
    let cli = McpGatewayCli::parse_from(args);
    let opts = alcove_mcp_gateway::Options {
        config: cli.config.clone(),
        listen: cli.listen,
        token_file: cli.token_file.clone(),
        log_file: cli.log_file.clone(),
        token: cli.token.clone(),
        ready_wait: std::time::Duration::from_secs(cli.ready_wait),
    };
    let fail = |e: &dyn std::error::Error| {
        eprintln!("mcp-gateway: {}", alcove_guest_contract::error_chain(e));
        1
    };
    if cli.serve || cli.foreground {
        init_tracing();
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(&e),
        };
        return match rt.block_on(alcove_mcp_gateway::serve(&opts, cli.serve)) {
            Ok(()) => 0,
            Err(e) => fail(&e),
        };
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let mut serve = std::process::Command::new(exe);
    serve
        .arg("mcp-gateway")
        .arg("--serve")
        .arg("--config")
        .arg(&cli.config)
        .arg("--listen")
        .arg(cli.listen.to_string())
        .arg("--token-file")
        .arg(&cli.token_file)
        .arg("--log-file")
        .arg(&cli.log_file);
    match alcove_mcp_gateway::launch(&opts, serve) {
        Ok(msg) => {
            println!("{msg}");
            0
        }
        Err(e) => fail(&e),
    }
}

/// `0.0.0.0:port`: every interface of the guest.
fn any_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
}

/// Logs to stderr (the console in the guest), filtered by ALCOVE_AGENT_LOG (default info).
fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALCOVE_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
}

fn interpreter_main() -> anyhow::Result<()> {
    let cli = InterpreterCli::parse_from(std::env::args().skip(1));
    init_tracing();
    let mut cfg = alcove_interpreter::Config::guest_defaults();
    cfg.listen = cli.listen;
    if !cli.kernel_dirs.is_empty() {
        cfg.kernel_dirs = cli.kernel_dirs;
    }
    cfg.python = cli.python;
    cfg.runtime_dir = cli.runtime_dir;
    cfg.default_cwd = cli.cwd;
    cfg.sandbox_env_file = cli.env_file;
    cfg.reseed_file = cli.reseed_file;
    cfg.warm_python = !cli.no_warm;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(alcove_interpreter::serve(cfg))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str());
    if called == Some("mcp-gateway") {
        std::process::exit(mcp_gateway_main(args));
    }
    if args.get(1).and_then(|a| a.to_str()) == Some("mcp-gateway") {
        std::process::exit(mcp_gateway_main(args[1..].to_vec()));
    }
    if std::env::args().nth(1).as_deref() == Some("interpreter") {
        return interpreter_main();
    }
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
    init_tracing();
    if let Err(e) = alcove_agent::run(config) {
        tracing::error!("alcove-agent failed: {e:#}");
        return Err(e);
    }
    Ok(())
}
