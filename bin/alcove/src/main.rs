//! `alcove`: the one user-facing binary. Parses arguments, sets up tracing and calls the libraries.

mod backend;
mod bench;
mod config;
mod sandbox;
mod template;

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
    Server(ServerCli),
    /// Manage API keys in the server's data dir.
    Keys(alcove_api::cli::KeysArgs),
    /// Talk to a running server over its REST API.
    #[command(subcommand)]
    Client(ClientCmd),
    /// Snapshots and the checkpoint tree, through a running server's API.
    Snapshot(alcove_api::cli::SnapshotArgs),
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

#[derive(clap::Args)]
struct ServerCli {
    #[command(flatten)]
    server: alcove_api::cli::ServerArgs,
    #[command(flatten)]
    host: config::HostOptions,
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Sandboxes, through the API.
    Sandbox(alcove_api::cli::SandboxArgs),
    /// Templates, through the API.
    Template(alcove_api::cli::TemplateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ALCOVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let json = match &cli.command {
        Command::Template(c) => c.global.json,
        Command::Sandbox(c) => c.global.json,
        Command::Bench(c) => c.global.json,
        Command::Info(c) => c.global.json,
        Command::Keys(k) => k.json,
        Command::Client(ClientCmd::Sandbox(a)) => a.client.json,
        Command::Client(ClientCmd::Template(a)) => a.client.json,
        Command::Snapshot(a) => a.client.json,
        Command::Server(_) => false,
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
                if c.global.json {
                    println!("{}", serde_json::json!({ "accel": choice.accel.as_str(), "reason": choice.reason }));
                } else {
                    println!("accelerator: {}\nreason: {}", choice.accel.as_str(), choice.reason);
                }
                Ok(0)
            }
            Command::Server(c) => {
                let data_dir = c.server.config().data_dir;
                let node = c.host.node(&data_dir).await?;
                let backend = std::sync::Arc::new(backend::NodeBackend::new(node.clone()));
                let served = alcove_api::cli::run_server(c.server, backend, &mut out).await;
                // Warm VMs are nobody's sandboxes: they go with the server.
                node.drain_warm_pool().await;
                served.map(|()| 0)
            }
            Command::Keys(k) => alcove_api::cli::run_keys(k, &mut out).map(|()| 0),
            Command::Client(ClientCmd::Sandbox(a)) => alcove_api::cli::run_sandbox(a, &mut out)
                .await
                .map(|c| u8::try_from(c).unwrap_or(1)),
            Command::Client(ClientCmd::Template(a)) => alcove_api::cli::run_template(a, &mut out).await.map(|()| 0),
            Command::Snapshot(a) => alcove_api::cli::run_snapshot(a, &mut out).await.map(|()| 0),
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
