//! `alcove`: the one user-facing binary. Parses arguments, sets up tracing and calls the libraries.

mod backend;
mod bench;
mod client;
mod config;
mod keys;
mod mcp;
mod node;
mod sandbox;
mod server;
mod template;
mod tls;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "alcove",
    version,
    about = "Sandboxes for AI agents: isolated microVMs restored from template snapshots"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the E2B-compatible API server (sandboxes on this host, SQLite in the data dir).
    Server(Box<config::ServerOptions>),
    /// Run this host's sandboxes for a cluster's control plane (`alcove server
    /// --cluster-listen`): register with it, heartbeat, take its calls (`docs/cluster.md`).
    Node(Box<NodeCli>),
    /// Manage API keys in the server's data dir.
    Keys(keys::KeysArgs),
    /// TLS certificates for the server's listener (`tls init`: a local CA and a wildcard).
    Tls(tls::TlsArgs),
    /// Talk to a running server over its REST API.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Serve the Model Context Protocol on stdio: sandboxes as tools for an LLM client, through
    /// a running server's API (`docs/mcp.md`).
    Mcp(mcp::McpArgs),
    /// Snapshots and the checkpoint tree, through a running server's API.
    Snapshot(client::SnapshotArgs),
    /// Usage and cost (compute, storage, network) through a running server's API.
    Usage(client::UsageArgs),
    /// Team limits and spend caps through a running server's API.
    Teams(client::TeamsArgs),
    /// The audit log: export it (JSONL, hash-chained) and verify an export.
    Audit(client::AuditArgs),
    /// Build and list templates on this host.
    Template(WithGlobal<template::TemplateCmd>),
    /// Create, run commands in, pause, list and kill sandboxes on this host, without a server.
    Sandbox(WithGlobal<sandbox::SandboxCmd>),
    /// Measure create → first command latency, restore time and memory per idle sandbox.
    Bench(BenchCli),
    /// Show which accelerator would be used and why.
    Info(InfoCli),
}

#[derive(clap::Args)]
struct WithGlobal<C: Subcommand> {
    #[command(flatten)]
    global: config::Global,
    #[command(subcommand)]
    command: C,
}

#[derive(clap::Args)]
struct BenchCli {
    #[command(flatten)]
    global: config::Global,
    #[command(flatten)]
    args: bench::BenchArgs,
}

#[derive(clap::Args)]
struct InfoCli {
    #[command(flatten)]
    global: config::Global,
}

/// `alcove node` runs the node; `alcove node ls|drain` ask the control plane about its nodes.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct NodeCli {
    #[command(subcommand)]
    command: Option<client::NodeCommand>,
    #[command(flatten)]
    run: config::NodeOptions,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Sandboxes, through the API.
    Sandbox(client::SandboxArgs),
    /// Templates, through the API.
    Template(client::TemplateArgs),
}

/// `ALCOVE_LOG`, else `RUST_LOG`, else the default: a server logs Alcove's own `info` lines (one
/// per request, one per sandbox state change), other commands only warnings, so that what they
/// print is all a terminal shows. A target directive matches by prefix, so `alcove` covers every
/// crate of the workspace (`alcove_api`, `alcove_node`, ...).
fn log_filter(command: &Command) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    EnvFilter::try_from_env("ALCOVE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            EnvFilter::new(match command {
                Command::Server(_) => "warn,alcove=info",
                Command::Node(c) if c.command.is_none() => "warn,alcove=info",
                _ => "warn",
            })
        })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr only: stdout carries what a command prints (`--json`: one document).
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(&cli.command))
        .with_writer(std::io::stderr)
        .init();
    let json = match &cli.command {
        Command::Template(c) => c.global.json,
        Command::Sandbox(c) => c.global.json,
        Command::Bench(c) => c.global.json,
        Command::Info(c) => c.global.json,
        Command::Keys(k) => k.json,
        Command::Tls(t) => t.json,
        Command::Client(ClientCmd::Sandbox(a)) => a.client.json,
        Command::Client(ClientCmd::Template(a)) => a.client.json,
        Command::Snapshot(a) => a.client.json,
        Command::Usage(a) => a.client.json,
        Command::Teams(a) => a.client.json,
        Command::Audit(a) => a.client.json,
        Command::Node(c) => match &c.command {
            Some(
                client::NodeCommand::Ls { client } | client::NodeCommand::Drain { client, .. },
            ) => client.json,
            None => false,
        },
        Command::Server(_) | Command::Mcp(_) => false,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        let mut out = std::io::stdout();
        match cli.command {
            Command::Template(c) => template::run(&c.global, c.command).await,
            Command::Sandbox(c) => sandbox::run(&c.global, c.command).await,
            Command::Bench(c) => bench::run(&c.global, c.args).await,
            Command::Info(c) => {
                let choice = c.global.accel();
                let boundary = choice.accel == alcove_vmm::Accel::Kvm;
                let warning = (!boundary).then_some(config::TCG_WARNING);
                let jail = if c.global.jail.no_jail {
                    "off (--no-jail): QEMU runs as root".to_string()
                } else {
                    format!(
                        "on: each VM its own uid in {}..={}, minimal mount namespace, no capabilities, no_new_privs, seccomp",
                        u64::from(c.global.jail.jail_uid_base) + 1,
                        u64::from(c.global.jail.jail_uid_base) + u64::from(c.global.jail.jail_uid_count)
                    )
                };
                if c.global.json {
                    println!("{}", serde_json::json!({
                        "accel": choice.accel.as_str(), "reason": choice.reason,
                        "security_boundary": boundary, "warning": warning,
                        "jail": !c.global.jail.no_jail,
                    }));
                } else {
                    println!("accelerator: {}\nreason: {}", choice.accel.as_str(), choice.reason);
                    if let Some(w) = warning {
                        println!("warning: {w}");
                    }
                    println!("jail: {jail}");
                }
                Ok(0)
            }
            Command::Server(c) => server::run(*c, &mut out).await.map(|()| 0),
            Command::Node(c) => match c.command {
                Some(cmd) => client::run_node_command(cmd, &mut out).await,
                None => node::run(c.run, &mut out).await.map(|()| 0),
            },
            Command::Keys(k) => keys::run_keys(k, &mut out).map(|()| 0),
            Command::Tls(t) => tls::run(t, &mut out).map(|()| 0),
            Command::Client(ClientCmd::Sandbox(a)) => client::run_sandbox(a, &mut out)
                .await
                .map(|c| u8::try_from(c).unwrap_or(1)),
            Command::Client(ClientCmd::Template(a)) => client::run_template(a, &mut out).await.map(|()| 0),
            Command::Snapshot(a) => client::run_snapshot(a, &mut out).await.map(|()| 0),
            Command::Usage(a) => client::run_usage(a, &mut out).await.map(|()| 0),
            Command::Teams(a) => client::run_teams(a, &mut out).await.map(|()| 0),
            Command::Audit(a) => client::run_audit(a, &mut out).await,
            Command::Mcp(a) => mcp::run(a).await.map(|()| 0),
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            // The whole chain once: what failed, then why.
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!("\n  caused by: {cause}"));
            }
            if json {
                println!("{}", serde_json::json!({ "error": msg }));
            } else {
                eprintln!("{msg}");
            }
            std::process::ExitCode::from(1)
        }
    }
}
