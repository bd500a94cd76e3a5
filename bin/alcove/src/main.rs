//! `alcove`: the one user-facing binary. Parses arguments, sets up tracing and calls the libraries.

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
    #[command(flatten)]
    global: config::Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and list templates.
    #[command(subcommand)]
    Template(template::TemplateCmd),
    /// Create, run commands in, list and kill sandboxes on this host.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Measure create → first command latency, restore time and memory per idle sandbox.
    Bench(bench::BenchArgs),
    /// Show which accelerator would be used and why.
    Info,
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let json = cli.global.json;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Template(c) => template::run(&cli.global, c).await,
            Command::Sandbox(c) => sandbox::run(&cli.global, c).await,
            Command::Bench(a) => bench::run(&cli.global, a).await,
            Command::Info => {
                let choice = cli.global.accel();
                if cli.global.json {
                    println!("{}", serde_json::json!({ "accel": choice.accel.as_str(), "reason": choice.reason }));
                } else {
                    println!("accelerator: {}\nreason: {}", choice.accel.as_str(), choice.reason);
                }
                Ok(0)
            }
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
